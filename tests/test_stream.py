"""MCAccumulator / LogitsAccumulator: chunked updates and merges in any grouping equal one
pass over the concatenated data; pickling; option checks."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import fastkl
from fastkl.stream import QuantileSketch

REL = 1e-12


def _close(a: float, b: float, rel: float = REL) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def _stats_close(s, r, rel=REL):
    assert s.n == r.n
    for f in ("mean", "std", "sem"):
        assert _close(getattr(s, f), getattr(r, f), rel), (f, getattr(s, f), getattr(r, f))
    assert _close(s.ci95[0], r.ci95[0], rel) and _close(s.ci95[1], r.ci95[1], rel)


@pytest.fixture(scope="module")
def mc_data():
    rng = np.random.default_rng(1)
    n = 50_021
    logq = rng.normal(-2, 1, n)
    logp = logq + rng.normal(0, 0.5, n)
    mask = rng.random(n) < 0.8
    log_iw = rng.normal(0, 0.1, n)
    return logq, logp, mask, log_iw


def _groupings(n, rng):
    cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("est,rev", [("k1", False), ("k2", False), ("k3", False), ("k3", True)])
def test_mc_chunks_equal_one_pass(mc_data, backend, est, rev):
    logq, logp, mask, log_iw = mc_data
    ref = fastkl.kl_mc_stats(logq, logp, est, reverse=rev, mask=mask, log_iw=log_iw,
                             backend=backend)
    acc = fastkl.MCAccumulator(est, reverse=rev, backend=backend)
    for idx in _groupings(logq.size, np.random.default_rng(2)):
        acc.update(logq[idx], logp[idx], mask=mask[idx], log_iw=log_iw[idx])
    _stats_close(acc.result(), ref)


def test_mc_merge_any_grouping(mc_data):
    logq, logp, mask, _ = mc_data
    ref = fastkl.kl_mc_stats(logq, logp, mask=mask, clamp_log_ratio=(-1, 1))
    parts = []
    for idx in _groupings(logq.size, np.random.default_rng(3)):
        a = fastkl.MCAccumulator(clamp_log_ratio=(-1, 1))
        parts.append(a.update(logq[idx], logp[idx], mask=mask[idx]))
    # left fold, right fold, and a tree
    left = pickle.loads(pickle.dumps(parts[0]))
    for p in parts[1:]:
        left.merge(p)
    right = pickle.loads(pickle.dumps(parts[-1]))
    for p in parts[-2::-1]:
        p2 = pickle.loads(pickle.dumps(p))
        right = p2.merge(right)
    tree = [pickle.loads(pickle.dumps(p)) for p in parts]
    while len(tree) > 1:
        tree = [tree[i].merge(tree[i + 1]) if i + 1 < len(tree) else tree[i]
                for i in range(0, len(tree), 2)]
    for acc in (left, right, tree[0]):
        _stats_close(acc.result(), ref)


def test_mc_deterministic_and_pickle(mc_data):
    logq, logp, _, _ = mc_data

    def run():
        acc = fastkl.MCAccumulator("k3")
        for i in range(0, logq.size, 9000):
            acc.update(logq[i:i + 9000], logp[i:i + 9000])
        return acc

    a, b = run(), run()
    assert a.result() == b.result()  # same chunking, same bits
    c = pickle.loads(pickle.dumps(a))
    assert c.result() == a.result() and c.n == a.n
    c.update(logq[:10], logp[:10])
    assert c.n == a.n + 10


def test_mc_2d_float32_and_empty():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(40, 300)).astype(np.float32)
    p = (q + rng.normal(scale=0.2, size=q.shape)).astype(np.float32)
    ref = fastkl.kl_mc_stats(q, p)
    acc = fastkl.MCAccumulator()
    acc.update(q[:17], p[:17]).update(q[17:].T, p[17:].T)  # a transposed view too
    _stats_close(acc.result(), ref, 1e-12)
    empty = fastkl.MCAccumulator().result()
    assert empty.n == 0 and math.isnan(empty.mean)


def test_mc_nan_policies():
    q = np.array([0.0, 1.0, np.nan, 2.0])
    p = np.zeros(4)
    assert math.isnan(fastkl.MCAccumulator().update(q, p).result().mean)
    om = fastkl.MCAccumulator(nan_policy="omit").update(q, p).result()
    assert om.n == 3 and _close(om.mean, fastkl.kl_mc_stats(q, p, nan_policy="omit").mean)
    acc = fastkl.MCAccumulator(nan_policy="raise").update(q[:2], p[:2])
    with pytest.raises(ValueError, match=r"index \(2,\) of update 1"):
        acc.update(q, p)
    assert acc.n == 2  # unchanged by the failed update


def test_mc_bad_options():
    with pytest.raises(ValueError, match="estimator"):
        fastkl.MCAccumulator("k4")
    with pytest.raises(ValueError, match="reverse"):
        fastkl.MCAccumulator("k2", reverse=True)
    with pytest.raises(ValueError, match="nan_policy"):
        fastkl.MCAccumulator(nan_policy="drop")
    with pytest.raises(ValueError, match="logp has shape"):
        fastkl.MCAccumulator().update(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="different"):
        fastkl.MCAccumulator("k3").merge(fastkl.MCAccumulator("k1"))
    with pytest.raises(TypeError):
        fastkl.MCAccumulator().merge(fastkl.LogitsAccumulator())
    q = np.zeros(5)
    fastkl.MCAccumulator().update(q, q)
    assert not q.any()


# --------------------------------------------------------------------------- logits


@pytest.fixture(scope="module")
def logits_data():
    rng = np.random.default_rng(5)
    a = (rng.normal(size=(600, 257)) * 2).astype(np.float32)
    b = (a + rng.normal(scale=0.4, size=a.shape)).astype(np.float32)
    tok = rng.integers(0, 257, 600)
    tok[::50] = -100
    return a, b, tok


def _reference(a, b, tok, T=1.0):
    kl = fastkl.kl_logits(a.astype(np.float64), b.astype(np.float64), temperature=T)
    keep = tok != -100
    lp = fastkl.token_logprobs(a.astype(np.float64)[keep], tok[keep], temperature=T)
    lq = fastkl.token_logprobs(b.astype(np.float64)[keep], tok[keep], temperature=T)
    same = np.argmax(a, 1) == np.argmax(b, 1)
    return kl, lp, lq, same


@pytest.mark.parametrize("T", [1.0, 1.7])
def test_logits_one_pass_vs_reference(logits_data, T):
    a, b, tok = logits_data
    kl, lp, lq, same = _reference(a, b, tok, T)
    rep = fastkl.LogitsAccumulator(temperature=T, keep_values=True).update(
        a, b, tokens=tok).result()
    assert rep.n == 600 and rep.n_tokens == int((tok != -100).sum())
    assert _close(rep.mean, kl.mean(), 1e-6)
    assert _close(rep.std, kl.std(ddof=1), 1e-5)
    assert rep.maximum == pytest.approx(kl.max(), rel=1e-6)
    assert rep.minimum == pytest.approx(kl.min(), rel=1e-5)
    for pct, v in rep.percentiles.items():
        assert v == pytest.approx(np.percentile(kl, pct), rel=1e-5)
    assert rep.percentiles_exact
    assert rep.same_top == pytest.approx(same.mean())
    dp = np.exp(lq) - np.exp(lp)
    assert rep.dp_mean == pytest.approx(dp.mean(), rel=1e-6, abs=1e-9)
    assert rep.rms_dp == pytest.approx(np.sqrt((dp**2).mean()), rel=1e-6)
    assert rep.ppl_test == pytest.approx(np.exp(-lq.mean()), rel=1e-6)
    assert rep.ppl_base == pytest.approx(np.exp(-lp.mean()), rel=1e-6)
    assert rep.ln_ppl_ratio == pytest.approx((lp - lq).mean(), rel=1e-6)
    assert rep.ppl_ratio == pytest.approx(np.exp((lp - lq).mean()), rel=1e-6)
    assert rep.cor_ln_ppl == pytest.approx(np.corrcoef(-lq, -lp)[0, 1], rel=1e-6)
    assert rep.ln_ppl_ratio_sem == pytest.approx(np.std(lp - lq, ddof=1) / np.sqrt(lp.size),
                                                 rel=1e-6)


def test_logits_merge_any_grouping(logits_data):
    a, b, tok = logits_data
    one = fastkl.LogitsAccumulator(keep_values=True).update(a, b, tokens=tok).result()
    parts = []
    for idx in _groupings(a.shape[0], np.random.default_rng(6)):
        acc = fastkl.LogitsAccumulator(keep_values=True)
        parts.append(pickle.loads(pickle.dumps(acc.update(a[idx], b[idx], tokens=tok[idx]))))
    tree = [pickle.loads(pickle.dumps(p)) for p in parts[::-1]]
    fwd = parts[0]
    for p in parts[1:]:
        fwd.merge(p)
    while len(tree) > 1:
        tree = [tree[i].merge(tree[i + 1]) if i + 1 < len(tree) else tree[i]
                for i in range(0, len(tree), 2)]
    for acc in (fwd, tree[0]):
        rep = acc.result()
        for k, v in one.to_dict().items():
            w = rep.to_dict()[k]
            if isinstance(v, float):
                assert _close(w, v), k
            elif isinstance(v, dict):
                assert all(_close(w[kk], vv) for kk, vv in v.items()), k
            else:
                assert w == v, k


def test_logits_sketch_accuracy_and_merge_exact(logits_data):
    a, b, tok = logits_data
    exact = fastkl.LogitsAccumulator(keep_values=True).update(a, b, tokens=tok).result()
    s1 = fastkl.LogitsAccumulator().update(a, b, tokens=tok).result()
    acc = fastkl.LogitsAccumulator()
    for i in range(0, 600, 97):
        acc.merge(fastkl.LogitsAccumulator().update(a[i:i + 97], b[i:i + 97],
                                                    tokens=tok[i:i + 97]))
    s2 = acc.result()
    assert not s1.percentiles_exact
    assert s1.percentiles == s2.percentiles  # sketch merges are exact
    for pct, v in exact.percentiles.items():
        assert s1.percentiles[pct] == pytest.approx(v, rel=1.5e-3)
    for pct, v in exact.dp_percentiles.items():
        assert s1.dp_percentiles[pct] == pytest.approx(v, rel=1.5e-3, abs=1e-12)


def test_sketch_properties():
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.lognormal(-5, 3, 20000), -rng.lognormal(-3, 1, 5000),
                        np.zeros(100), [np.inf]])
    sk = QuantileSketch()
    sk.update(x)
    qs = [0.0, 0.01, 0.3, 0.5, 0.9, 0.999]
    est = sk.quantiles(qs)
    ref = np.quantile(x[np.isfinite(x)], qs)
    for e, r in zip(est[:-1], ref[:-1], strict=True):
        assert e == pytest.approx(r, rel=2e-3, abs=1e-12)
    assert sk.quantiles([1.0]) == [np.inf] and sk.quantiles([0.0])[0] == x.min()
    vals, cnts = sk.buckets()
    assert cnts.sum() == x.size and np.all(np.diff(vals) >= 0)


def test_logits_entropy_jsd_mask_nan():
    rng = np.random.default_rng(8)
    a = rng.normal(size=(50, 33))
    b = rng.normal(size=(50, 33))
    m = rng.random(50) < 0.6
    ent = fastkl.LogitsAccumulator("entropy").update(a, mask=m).result()
    assert ent.n == m.sum()
    assert _close(ent.mean, fastkl.entropy_logits(a, mask=m, reduction="mean"), 1e-12)
    js = fastkl.LogitsAccumulator("jsd", beta=0.3).update(a, b).result()
    assert _close(js.mean, fastkl.jsd_logits(a, b, 0.3, reduction="mean"), 1e-12)
    bad = a.copy()
    bad[3, 4] = np.nan
    prop = fastkl.LogitsAccumulator().update(bad, b).result()
    assert math.isnan(prop.mean) and prop.n_nan == 1
    om = fastkl.LogitsAccumulator(nan_policy="omit").update(bad, b).result()
    assert om.n_nan == 1 and not math.isnan(om.mean)
    # axis: vocabulary first
    t = fastkl.LogitsAccumulator().update(a.T, b.T, axis=0).result()
    assert _close(t.mean, fastkl.kl_logits(a, b, reduction="mean"), 1e-12)


def test_logits_bad_input():
    a = np.zeros((4, 5))
    with pytest.raises(ValueError, match="op must be"):
        fastkl.LogitsAccumulator("kld")
    with pytest.raises(ValueError, match="temperature"):
        fastkl.LogitsAccumulator(temperature=0)
    with pytest.raises(TypeError, match="needs logits_q"):
        fastkl.LogitsAccumulator().update(a)
    with pytest.raises(ValueError, match="logits_q has shape"):
        fastkl.LogitsAccumulator().update(a, np.zeros((4, 6)))
    with pytest.raises(ValueError, match="tokens must be in"):
        fastkl.LogitsAccumulator().update(a, a, tokens=[0, 1, 2, 5])
    with pytest.raises(ValueError, match="different"):
        fastkl.LogitsAccumulator().merge(fastkl.LogitsAccumulator(temperature=2))
