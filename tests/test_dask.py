"""Dask inputs: lazy results equal to the in-memory ones (bit for bit where the chunking
allows, to 1e-12 relative everywhere), clear errors, and a real two-process cluster."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastkl

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

from dask.delayed import Delayed  # noqa: E402

from fastkl.backends._contract import BLOCK  # noqa: E402

REL = 1e-12


def _rel(a, b) -> float:
    """Max relative difference; NaNs must sit at the same places (and count as equal)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    assert np.array_equal(na, nb), "NaN positions differ"
    a, b = a[~na], b[~nb]
    if a.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    r[a == b] = 0.0  # equal infinities
    return float(r.max())


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20240501)
    shape = (12, 9000)
    q = rng.standard_normal(shape)
    p = q + 0.4 * rng.standard_normal(shape)
    d = {
        "q": q,
        "p": p,
        "bool": rng.random(shape) < 0.8,
        "weights": rng.random(shape) * (rng.random(shape) < 0.9),
        "log_iw": 0.1 * rng.standard_normal(shape),
    }
    d["bool"][3] = False  # a row without tokens (skipped by the seq-mean-* modes)
    qn = q.copy()
    qn[[2, 7, 7], [5, 4100, 8999]] = np.nan
    d["qnan"] = qn
    return d


def _mc_args(data, case, dtype):
    kw = dict(case)
    q = data["qnan"] if kw.pop("nan", False) else data["q"]
    p = data["p"]
    for name in ("mask", "log_iw"):
        if name in kw:
            kw[name] = data[kw[name]]
    return q.astype(dtype), p.astype(dtype), kw


def _chunked(kw, chunks):
    return {k: da.from_array(v, chunks=chunks) if isinstance(v, np.ndarray) else v
            for k, v in kw.items()}


MC_CHUNKS = [(12, 9000), (5, 4096), (12, 2500), (1, 9000), (7, 3333)]
MC_CASES = [
    {},
    {"axis": 1},
    {"axis": 0},
    {"axis": (0, 1), "reduction": "sum"},
    {"axis": -1, "reduction": "sum", "mask": "weights"},
    {"axis": ()},
    {"reduction": "token-mean", "mask": "bool"},
    {"reduction": "seq-mean-token-mean", "mask": "bool"},
    {"reduction": "seq-mean-token-sum", "mask": "weights"},
    {"estimator": "k1", "reverse": True, "log_iw": "log_iw", "axis": 1},
    {"estimator": "k2", "clamp_log_ratio": (-0.5, 0.5), "clamp_value": (0.0, 0.1)},
    {"mask": "weights", "axis": 0},
    {"nan": True, "nan_policy": "omit", "axis": 1, "mask": "bool"},
    {"nan": True, "axis": 1},
    {"nan": True},
]


@pytest.mark.parametrize("chunks", MC_CHUNKS, ids=str)
@pytest.mark.parametrize("case", MC_CASES, ids=str)
def test_kl_mc_matches_in_memory(data, chunks, case):
    q, p, kw = _mc_args(data, case, np.float64)
    expect = fastkl.kl_mc(q, p, **kw)
    got = fastkl.kl_mc(da.from_array(q, chunks=chunks), da.from_array(p, chunks=chunks),
                       **_chunked(kw, chunks))
    assert isinstance(got, da.Array)
    value = got.compute()
    assert value.dtype == np.float64
    assert _rel(value, expect) <= REL


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", [{}, {"axis": 1, "mask": "bool"},
                                  {"reduction": "seq-mean-token-mean", "mask": "bool"}], ids=str)
def test_kl_mc_low_precision_inputs(data, dtype, case):
    q, p, kw = _mc_args(data, case, dtype)
    expect = fastkl.kl_mc(q, p, **kw)
    got = fastkl.kl_mc(da.from_array(q, chunks=(5, 2000)), da.from_array(p, chunks=(5, 2000)),
                       **_chunked(kw, (5, 2000))).compute()
    assert _rel(got, expect) <= REL


@pytest.mark.parametrize("case", [None, 1, (0, 2), 2, (), (1, 2)], ids=str)
def test_kl_mc_3d_axes(case):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 6, 700))
    p = q[::-1] * 0.9
    mask = rng.random(q.shape) < 0.7
    expect = fastkl.kl_mc(q, p, axis=case, mask=mask)
    chunks = (3, 4, 256)
    got = fastkl.kl_mc(da.from_array(q, chunks=chunks), da.from_array(p, chunks=chunks),
                       axis=case, mask=da.from_array(mask, chunks=chunks)).compute()
    assert _rel(got, expect) <= REL


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("chunks", [(12, 9000), (5, 4096), (7, 1000)], ids=str)
def test_kl_mc_none_is_elementwise_identical(data, chunks, dtype):
    q, p = data["q"].astype(dtype), data["p"].astype(dtype)
    kw = {"mask": data["weights"], "log_iw": data["log_iw"].astype(dtype),
          "clamp_value": (-10, 10)}
    expect = fastkl.kl_mc(q, p, "k3", reduction="none", **kw)
    got = fastkl.kl_mc(da.from_array(q, chunks=chunks), da.from_array(p, chunks=chunks), "k3",
                       reduction="none", **_chunked(kw, chunks))
    assert isinstance(got, da.Array) and got.dtype == expect.dtype
    assert _same_bits(got.compute(), expect)


def test_bit_for_bit_when_chunks_follow_the_blocks():
    """Chunks split only the first reduced axis at multiples of BLOCK elements: the per-block
    partials are the in-memory ones, and so are the bits."""
    rng = np.random.default_rng(11)
    q = rng.standard_normal((8, 3 * BLOCK))
    p = q + rng.standard_normal(q.shape)
    mask = rng.random(q.shape) < 0.9
    dq, dp, dm = (da.from_array(a, chunks=(3, BLOCK)) for a in (q, p, mask))
    for kw in ({"axis": 1}, {"axis": 1, "reduction": "sum"},
               {"reduction": "seq-mean-token-mean"}, {"reduction": "seq-mean-token-sum"}):
        assert _same_bits(fastkl.kl_mc(dq, dp, mask=dm, **kw).compute(),
                          np.asarray(fastkl.kl_mc(q, p, mask=mask, **kw)))
    rows = [da.from_array(a, chunks=(2, -1)) for a in (q, p, mask)]  # 2 rows = 6 blocks
    assert float(fastkl.kl_mc(*rows[:2], mask=rows[2]).compute()) == fastkl.kl_mc(
        q, p, mask=mask)
    assert fastkl.kl_mc_stats(*rows[:2], mask=rows[2]).compute() == fastkl.kl_mc_stats(
        q, p, mask=mask)


def test_same_chunking_same_bits_on_any_scheduler(data):
    dq, dp, dm = (da.from_array(data[k], chunks=(5, 2222)) for k in ("q", "p", "weights"))
    results = []
    for scheduler in ("threads", "synchronous", "threads"):
        with dask.config.set(scheduler=scheduler):
            results.append((fastkl.kl_mc(dq, dp, mask=dm).compute(),
                            fastkl.kl_mc(dq, dp, axis=0).compute(),
                            fastkl.kl_mc_stats(dq, dp, mask=dm).compute()))
    for other in results[1:]:
        assert _same_bits(other[0], results[0][0])
        assert _same_bits(other[1], results[0][1])
        assert other[2] == results[0][2]


@pytest.mark.parametrize("chunks", [(12, 9000), (5, 4096), (7, 3333)], ids=str)
@pytest.mark.parametrize("case", [{}, {"mask": "weights"}, {"mask": "bool", "log_iw": "log_iw"},
                                  {"nan": True, "nan_policy": "omit"}, {"nan": True},
                                  {"estimator": "k3", "reverse": True}], ids=str)
def test_kl_mc_stats_matches_in_memory(data, chunks, case):
    q, p, kw = _mc_args(data, case, np.float64)
    expect = fastkl.kl_mc_stats(q, p, **kw)
    lazy = fastkl.kl_mc_stats(da.from_array(q, chunks=chunks), da.from_array(p, chunks=chunks),
                              **_chunked(kw, chunks))
    assert isinstance(lazy, Delayed)
    got = lazy.compute()
    assert isinstance(got, fastkl.KLStats)
    assert got.n == expect.n
    for field in ("mean", "std", "sem"):
        assert _rel(getattr(got, field), getattr(expect, field)) <= REL
    assert _rel(got.ci95, expect.ci95) <= REL


def test_mixed_numpy_and_dask_inputs(data):
    q, p, m = data["q"], data["p"], data["bool"]
    expect = fastkl.kl_mc(q, p, mask=m, axis=1)
    for args, mask in [((q, da.from_array(p, chunks=(4, 3000))), m),
                       ((da.from_array(q, chunks=(4, 3000)), p), da.from_array(m, chunks=5)),
                       ((q, p), da.from_array(m, chunks=(6, 4500)))]:
        got = fastkl.kl_mc(*args, mask=mask, axis=1)
        assert isinstance(got, da.Array)
        assert _rel(got.compute(), expect) <= REL


def test_empty_and_zero_d():
    e = np.zeros((0,))
    assert math.isnan(float(fastkl.kl_mc(da.from_array(e), da.from_array(e)).compute()))
    assert float(fastkl.kl_mc(da.from_array(e), da.from_array(e), reduction="sum")
                 .compute()) == 0.0
    e2 = da.zeros((3, 0), chunks=(2, 0))
    assert np.isnan(fastkl.kl_mc(e2, e2, axis=1).compute()).all()
    q, p = np.array(0.3), np.array(-0.2)
    assert float(fastkl.kl_mc(da.from_array(q), da.from_array(p)).compute()) == fastkl.kl_mc(q, p)


def test_every_backend_under_threads(data, backend):
    q, p, m = data["q"], data["p"], data["bool"]
    dq, dp, dm = (da.from_array(a, chunks=(3, 3000)) for a in (q, p, m))
    with dask.config.set(scheduler="threads", num_workers=2):
        got = fastkl.kl_mc(dq, dp, mask=dm, axis=1, backend=backend).compute()
        terms = fastkl.kl_mc(dq, dp, reduction="none", backend=backend).compute()
    assert _rel(got, fastkl.kl_mc(q, p, mask=m, axis=1, backend=backend)) <= REL
    assert _same_bits(terms, fastkl.kl_mc(q, p, reduction="none", backend=backend))


# --------------------------------------------------------------------------- NaN policy


@pytest.mark.parametrize("chunks", [(12, 9000), (5, 4096)], ids=str)
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"reduction": "none"}], ids=str)
def test_nan_policy_raise_at_compute(data, chunks, kw):
    q = data["q"].copy()
    q[7, 5000] = np.nan
    lazy = fastkl.kl_mc(da.from_array(q, chunks=chunks), da.from_array(data["p"], chunks=chunks),
                        nan_policy="raise", **kw)  # nothing computed, nothing raised yet
    with pytest.raises(ValueError, match=r"nan_policy='raise': the term at index \(7, 5000\)"):
        lazy.compute()
    stats = fastkl.kl_mc_stats(da.from_array(q, chunks=chunks),
                               da.from_array(data["p"], chunks=chunks), nan_policy="raise")
    with pytest.raises(ValueError, match=r"index \(7, 5000\)"):
        stats.compute()


def test_nan_policy_raise_ignores_masked_nan(data):
    q = data["q"].copy()
    q[7, 5000] = np.nan
    m = np.ones(q.shape, dtype=bool)
    m[7, 5000] = False
    got = fastkl.kl_mc(da.from_array(q, chunks=(5, 4096)), data["p"], mask=m,
                       nan_policy="raise").compute()
    assert _rel(got, fastkl.kl_mc(q, data["p"], mask=m)) <= REL


# --------------------------------------------------------------------------- logits


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 10, 96)) * 3
    b = a + rng.standard_normal(a.shape)
    return {"a": a, "b": b, "bool": rng.random((6, 10)) < 0.7,
            "weights": rng.random((6, 10)) * 2}


LOGIT_OPS = [
    (fastkl.kl_logits, 2, {}),
    (fastkl.jsd_logits, 2, {"beta": 0.3}),
    (fastkl.entropy_logits, 1, {}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("chunks", [(6, 10, 96), (2, 3, 96), (1, 10, 96)], ids=str)
@pytest.mark.parametrize("op", LOGIT_OPS, ids=lambda o: o[0].__name__)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("mask", [None, "bool", "weights"])
def test_logits_ops_match_in_memory_bit_for_bit(logits, op, reduction, mask, chunks, dtype):
    func, nargs, kw = op
    arrays = [logits[k].astype(dtype) for k in "ab"[:nargs]]
    m = None if mask is None else logits[mask]
    expect = func(*arrays, mask=m, reduction=reduction, temperature=0.8, **kw)
    dm = None if m is None else da.from_array(m, chunks=chunks[:2])
    got = func(*(da.from_array(x, chunks=chunks) for x in arrays), mask=dm,
               reduction=reduction, temperature=0.8, **kw)
    assert isinstance(got, da.Array)
    value = got.compute()
    if reduction == "none":
        assert _same_bits(value, expect)
    else:
        assert float(value) == expect or (math.isnan(expect) and math.isnan(float(value)))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_logits_other_vocabulary_axes(logits, axis):
    a = np.moveaxis(logits["a"], -1, axis)
    b = np.moveaxis(logits["b"], -1, axis)
    chunks = [2, 5, 48]
    chunks.insert(axis % 3, -1)
    chunks = tuple(chunks[:3]) if axis % 3 != 2 else (2, 5, -1)
    lead = tuple(c for i, c in enumerate(chunks) if i != axis % 3)
    mask = logits["bool"] if axis % 3 == 2 else np.ones([s for i, s in enumerate(a.shape)
                                                          if i != axis % 3], dtype=bool)
    for reduction in ("none", "mean"):
        expect = fastkl.kl_logits(a, b, axis=axis, mask=mask, reduction=reduction)
        got = fastkl.kl_logits(da.from_array(a, chunks=chunks), da.from_array(b, chunks=chunks),
                               axis=axis, mask=da.from_array(mask, chunks=lead),
                               reduction=reduction).compute()
        assert _same_bits(got, np.asarray(expect))


def test_logits_log_probs_and_one_row(logits):
    a, b = logits["a"][0, 0], logits["b"][0, 0]
    la = a - np.log(np.exp(a).sum())
    lb = b - np.log(np.exp(b).sum())
    got = fastkl.kl_logits(da.from_array(la), da.from_array(lb), log_probs=True).compute()
    assert _same_bits(got, np.asarray(fastkl.kl_logits(la, lb, log_probs=True)))


@pytest.mark.parametrize("which", ["logits_p", "logits_q"])
def test_logits_chunked_vocabulary_is_a_clear_error(logits, which):
    good = da.from_array(logits["a"], chunks=(2, 5, -1))
    bad = da.from_array(logits["b"], chunks=(2, 5, 32))
    args = (bad, good) if which == "logits_p" else (good, bad)
    with pytest.raises(ValueError, match=rf"{which} is split into 3 chunks along the "
                                         r"vocabulary axis \(2\).*rechunk"):
        fastkl.kl_logits(*args)
    with pytest.raises(ValueError, match="vocabulary axis"):
        fastkl.entropy_logits(da.from_array(logits["a"], chunks=(6, 10, 50)))
    # the remedy the message names works
    fixed = fastkl.kl_logits(*(x.rechunk({2: -1}) for x in args)).compute()
    assert fixed.shape == (6, 10)


# --------------------------------------------------------------------------- laziness


def test_nothing_is_computed_before_compute(data, logits):
    calls = []

    def source(block):
        if block.size:  # dask probes the function with empty meta arrays: not a computation
            calls.append(block.shape)
        return block

    dq = da.from_array(data["q"], chunks=(4, 3000)).map_blocks(source, meta=np.empty((0, 0)))
    dp = da.from_array(data["p"], chunks=(4, 3000))
    lazy = [fastkl.kl_mc(dq, dp), fastkl.kl_mc(dq, dp, axis=1),
            fastkl.kl_mc(dq, dp, reduction="none"),
            fastkl.kl_mc(dq, dp, reduction="seq-mean-token-mean"),
            fastkl.kl_mc_stats(dq, dp)]
    la = da.from_array(logits["a"], chunks=(2, 5, -1)).map_blocks(source,
                                                                   meta=np.empty((0,) * 3))
    lazy += [fastkl.kl_logits(la, la), fastkl.jsd_logits(la, la, reduction="mean"),
             fastkl.entropy_logits(la, reduction="sum")]
    assert calls == []
    dask.compute(*lazy)
    assert calls


# --------------------------------------------------------------------------- errors


def test_errors_at_call_time(data, logits):
    dq = da.from_array(data["q"], chunks=(4, 3000))
    with pytest.raises(TypeError, match="logp must have a floating dtype"):
        fastkl.kl_mc(dq, dq.astype(np.int64))
    with pytest.raises(ValueError, match="logp has shape"):
        fastkl.kl_mc(dq, dq[:3])
    with pytest.raises(ValueError, match="reduction"):
        fastkl.kl_mc(dq, dq, reduction="median")
    with pytest.raises(ValueError, match="2-D"):
        fastkl.kl_mc(dq[None], dq[None], reduction="token-mean")
    with pytest.raises(TypeError, match="mask must be bool or real numeric"):
        fastkl.kl_mc(dq, dq, mask=dq.astype(np.complex128))
    with pytest.raises(ValueError, match="mask has shape"):
        fastkl.kl_mc(dq, dq, mask=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="backend"):
        fastkl.kl_mc(dq, dq, backend="fortran")
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        fastkl.kl_mc(dq[dq > 0], dq[dq > 0])
    la = da.from_array(logits["a"], chunks=(2, 5, -1))
    with pytest.raises(ValueError, match="temperature"):
        fastkl.kl_logits(la, la, temperature=0)
    with pytest.raises(ValueError, match="mask has shape"):
        fastkl.kl_logits(la, la, mask=np.ones((6, 96), dtype=bool))
    with pytest.raises(ValueError, match="reduction"):
        fastkl.entropy_logits(la, reduction="token-mean")
    for call in (lambda: fastkl.kl_mc_grad(dq, dq),
                 lambda: fastkl.token_logprobs(la, np.zeros((6, 10), dtype=np.int64)),
                 lambda: fastkl.kl_logits_grad(la, la)):
        with pytest.raises(TypeError, match="does not take dask arrays"):
            call()


def test_mask_weights_checked_at_compute(data, logits):
    dq = da.from_array(data["q"], chunks=(4, 3000))
    bad = da.from_array(-data["weights"], chunks=(4, 3000))
    lazy = fastkl.kl_mc(dq, dq, mask=bad)
    with pytest.raises(ValueError, match="mask weights must be finite and >= 0"):
        lazy.compute()
    la = da.from_array(logits["a"], chunks=(2, 5, -1))
    lazy = fastkl.kl_logits(la, la, mask=-np.ones((6, 10)), reduction="mean")
    with pytest.raises(ValueError, match="mask weights must be finite and >= 0"):
        lazy.compute()


def test_inputs_are_not_modified(data):
    arrays = {k: data[k].copy() for k in ("q", "p", "weights", "log_iw")}
    d = {k: da.from_array(v, chunks=(5, 2000)) for k, v in arrays.items()}
    dask.compute(fastkl.kl_mc(d["q"], d["p"], mask=d["weights"], log_iw=d["log_iw"], axis=0),
                 fastkl.kl_mc(d["q"], d["p"], reduction="none", mask=d["weights"]))
    for k, v in arrays.items():
        assert np.array_equal(v, data[k])


# --------------------------------------------------------------------------- cluster


def test_distributed_local_cluster_matches_in_memory(data, logits):
    """Two worker processes, one thread each: every result equals the in-memory one to
    1e-12 relative (the partials travel between processes by pickle)."""
    distributed = pytest.importorskip("distributed")
    q, p, m = data["q"], data["p"], data["bool"]
    a, b = logits["a"], logits["b"]
    chunks = (5, 2500)
    dq, dp, dm = (da.from_array(x, chunks=chunks) for x in (q, p, m))
    la, lb = (da.from_array(x, chunks=(2, 4, -1)) for x in (a, b))
    lazy = {
        "mean": fastkl.kl_mc(dq, dp, mask=dm),
        "axis1": fastkl.kl_mc(dq, dp, axis=1, log_iw=da.from_array(data["log_iw"], chunks)),
        "axis0_sum": fastkl.kl_mc(dq, dp, "k3", reverse=True, axis=0, reduction="sum"),
        "seq": fastkl.kl_mc(dq, dp, mask=dm, reduction="seq-mean-token-mean"),
        "stats": fastkl.kl_mc_stats(dq, dp, mask=dm),
        "kl_rows": fastkl.kl_logits(la, lb),
        "jsd_mean": fastkl.jsd_logits(la, lb, reduction="mean"),
        "entropy_sum": fastkl.entropy_logits(la, reduction="sum", temperature=1.5),
    }
    expect = {
        "mean": fastkl.kl_mc(q, p, mask=m),
        "axis1": fastkl.kl_mc(q, p, axis=1, log_iw=data["log_iw"]),
        "axis0_sum": fastkl.kl_mc(q, p, "k3", reverse=True, axis=0, reduction="sum"),
        "seq": fastkl.kl_mc(q, p, mask=m, reduction="seq-mean-token-mean"),
        "stats": fastkl.kl_mc_stats(q, p, mask=m),
        "kl_rows": fastkl.kl_logits(a, b),
        "jsd_mean": fastkl.jsd_logits(a, b, reduction="mean"),
        "entropy_sum": fastkl.entropy_logits(a, reduction="sum", temperature=1.5),
    }
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        # one compute per result: dask 2026.8 returns a list that mixes arrays and
        # delayed objects in the wrong order (dask.compute(x.sum(), delayed_obj) too)
        keys = list(lazy)
        futures = {k: client.compute(lazy[k]) for k in keys}
        results = {k: f.result() for k, f in futures.items()}
    worst = 0.0
    for k in keys:
        got, exp = results[k], expect[k]
        if isinstance(exp, fastkl.KLStats):
            assert got.n == exp.n
            got = [got.mean, got.std, got.sem, *got.ci95]
            exp = [exp.mean, exp.std, exp.sem, *exp.ci95]
        worst = max(worst, _rel(got, exp))
    print(f"LocalCluster vs in-memory: max relative difference {worst:.3g}")
    assert worst <= REL
