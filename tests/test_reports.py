"""Every number of the reports against its own numpy formula, and every number the CLI
prints against the API's (issue 15): the text tests of test_cli.py check labels, so a CLI
printing the sem as the standard deviation, or an error bar off by a factor 2 or by n vs
n - 1, passed them.

Formulas (numpy, from the per-row / per-sample values the public functions return):
``KLStats``: mean = sum w t / W, std = sqrt(M2 / (W - sum w^2 / W)), sem = std / sqrt(n_eff)
with n_eff = W^2 / sum w^2, ci95 = mean -+ 1.959964 sem. ``LogitsReport``: per-row values
with ddof=1 std, sem = std / sqrt(n); same_top_sem = sqrt(f (1 - f) / (n - 1));
rms_dp_sem = sem(dp^2) / (2 rms_dp); ppl = exp(mean NLL) with sem ppl * sem(NLL); ratio the
same on NLL_test - NLL_base; cor = Pearson correlation of the two NLLs.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from gaps_util import BACKENDS, close

import fastkl
from fastkl._demo import closed_form, gaussian_samples
from fastkl.cli import main

Z95 = 1.959963984540054


def _sem(x):
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


# --------------------------------------------------------------------------- KLStats


def _stats_ref(t, w):
    W, W2 = w.sum(), (w * w).sum()
    mean = (w * t).sum() / W
    m2 = (w * (t - mean) ** 2).sum()
    std = math.sqrt(m2 / (W - W2 / W))
    sem = std / math.sqrt(W * W / W2)
    return mean, std, sem


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mk", ["none", "bool", "weights"])
def test_klstats_error_bars(backend, mk):
    rng = np.random.default_rng(13)
    q = rng.normal(0.0, 1.0, 9000)
    p = q + rng.normal(0.0, 0.6, q.size)
    mask = {"none": None, "bool": rng.random(q.size) < 0.6,
            "weights": np.where(rng.random(q.size) < 0.1, 0.0, rng.uniform(0.2, 4.0, q.size))}[mk]
    w = np.ones(q.size) if mask is None else np.asarray(mask, np.float64)
    for est, rev in (("k1", False), ("k3", False), ("k3", True)):
        t = fastkl.kl_mc(q, p, est, reverse=rev, reduction="none", backend="reference")
        mean, std, sem = _stats_ref(t.astype(np.float64), w)
        st = fastkl.kl_mc_stats(q, p, est, reverse=rev, mask=mask, backend=backend)
        what = f"{backend} {est} rev={rev} mask={mk}"
        close(st.mean, mean, 1e-12, 0, what + " mean")
        close(st.std, std, 1e-10, 0, what + " std")
        close(st.sem, sem, 1e-10, 0, what + " sem")
        close(st.ci95, [mean - Z95 * sem, mean + Z95 * sem], 1e-10, 0, what + " ci95")
        assert st.n == int((w != 0).sum()), what
        # the streaming accumulator, fed in three uneven pieces, reports the same
        acc = fastkl.MCAccumulator(est, reverse=rev, backend=backend)
        for sl in (slice(0, 1000), slice(1000, 5003), slice(5003, None)):
            acc.update(q[sl], p[sl], mask=None if mask is None else mask[sl])
        r = acc.result()
        close([r.mean, r.std, r.sem, *r.ci95], [st.mean, st.std, st.sem, *st.ci95], 1e-10, 0,
              what + " MCAccumulator")


# --------------------------------------------------------------------------- LogitsReport


def _logits(seed=17, rows=300, V=64):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 2.0, (rows, V))
    b = a + rng.normal(0.0, 0.7, a.shape)
    tok = rng.integers(0, V, rows)
    return a, b, tok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1.0, 1.7])
def test_logits_report_error_bars(backend, t):
    a, b, tok = _logits()
    acc = fastkl.LogitsAccumulator("kl", temperature=t, keep_values=True, backend=backend)
    for sl in (slice(0, 77), slice(77, 200), slice(200, None)):
        acc.update(a[sl], b[sl], tokens=tok[sl])
    r = acc.result()
    kl = fastkl.kl_logits(a, b, temperature=t, backend="reference")
    lp = fastkl.token_logprobs(a, tok, temperature=t, backend="reference")  # base
    lq = fastkl.token_logprobs(b, tok, temperature=t, backend="reference")  # test
    dp = np.exp(lq) - np.exp(lp)
    nll_t, nll_b = -lq, -lp
    n = kl.size
    f = float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))
    ref = {
        "n": n, "mean": kl.mean(), "std": np.std(kl, ddof=1), "sem": _sem(kl),
        "minimum": kl.min(), "maximum": kl.max(),
        "same_top": f, "same_top_sem": math.sqrt(f * (1 - f) / (n - 1)),
        "n_tokens": n, "dp_mean": dp.mean(), "dp_std": np.std(dp, ddof=1), "dp_sem": _sem(dp),
        "dp_minimum": dp.min(), "dp_maximum": dp.max(),
        "rms_dp": math.sqrt(np.mean(dp**2)),
        "rms_dp_sem": _sem(dp**2) / (2 * math.sqrt(np.mean(dp**2))),
        "ppl_test": math.exp(nll_t.mean()), "ppl_test_sem": math.exp(nll_t.mean()) * _sem(nll_t),
        "ppl_base": math.exp(nll_b.mean()), "ppl_base_sem": math.exp(nll_b.mean()) * _sem(nll_b),
        "ln_ppl_ratio": (nll_t - nll_b).mean(), "ln_ppl_ratio_sem": _sem(nll_t - nll_b),
        "ppl_ratio": math.exp((nll_t - nll_b).mean()),
        "ppl_ratio_sem": math.exp((nll_t - nll_b).mean()) * _sem(nll_t - nll_b),
        "cor_ln_ppl": np.corrcoef(nll_t, nll_b)[0, 1],
    }
    assert 0.05 < f < 0.95  # the same-top error bar is not degenerate
    for k, v in ref.items():
        close(getattr(r, k), v, 1e-9, 1e-15, f"{backend} T={t} LogitsReport.{k}")
    pct = dict(zip(r.percentiles, np.percentile(kl, list(r.percentiles)), strict=True))
    close(list(r.percentiles.values()), list(pct.values()), 1e-9, 1e-15, "percentiles")
    dpct = np.percentile(dp, list(r.dp_percentiles))
    close(list(r.dp_percentiles.values()), dpct, 1e-9, 1e-15, "dp percentiles")


# --------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    return out


_NUM = r"[-+]?\d+\.\d+(?:e[-+]?\d+)?"


def _nums(out: str, label: str) -> list[float]:
    """The numbers on the line that starts with ``label`` (after the label)."""
    lines = [ln for ln in out.splitlines() if ln.startswith(label)]
    assert len(lines) == 1, (label, lines)
    return [float(x) for x in re.findall(_NUM, lines[0][len(label):])]


def _printed(got: list[float], want: list[float], decimals: int, what: str) -> None:
    """Printed with ``decimals`` digits after the point: within half a unit of the last."""
    assert len(got) == len(want), (what, got, want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 0.5 * 10.0**-decimals + 1e-12 * abs(w), (what, got, want)


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reports")
    rng = np.random.default_rng(23)
    q = rng.normal(size=6000)
    np.save(d / "q.npy", q)
    np.save(d / "p.npy", q + rng.normal(0.3, 0.5, q.size))
    np.save(d / "m.npy", rng.random(q.size) < 0.7)
    np.save(d / "q2.npy", q.reshape(60, 100))
    np.save(d / "p2.npy", (q + rng.normal(0.3, 0.5, q.size)).reshape(60, 100))
    a, b, tok = _logits(29, rows=200, V=50)
    np.save(d / "a.npy", a.astype(np.float32))
    np.save(d / "b.npy", b.astype(np.float32))
    np.save(d / "tok.npy", tok)
    return d


@pytest.mark.parametrize("opts", [("k3",), ("k1", "--reverse"), ("k2", "--mask")])
def test_cli_mc_values(mc_files, capsys, opts):
    est, *rest = opts
    argv = ["mc", mc_files / "q.npy", mc_files / "p.npy", "--estimator", est]
    kw = {}
    if "--reverse" in rest:
        argv.append("--reverse")
        kw["reverse"] = True
    if "--mask" in rest:
        argv += ["--mask", mc_files / "m.npy"]
        kw["mask"] = np.load(mc_files / "m.npy")
    out = _run(capsys, *argv)
    q, p = np.load(mc_files / "q.npy"), np.load(mc_files / "p.npy")
    st = fastkl.kl_mc_stats(q, p, est, **kw)
    assert st.std > 2 * st.sem  # printing one for the other is visible
    _printed(_nums(out, "Mean    KL:"), [st.mean, st.sem], 6, "Mean ± sem")
    _printed(_nums(out, "95% CI    :"), list(st.ci95), 6, "95% CI")
    _printed(_nums(out, "Std dev   :"), [st.std], 6, "Std dev")
    assert re.search(rf"^n +: {st.n}$", out, re.M), out


def test_cli_mc_rl_reduction_value(mc_files, capsys):
    out = _run(capsys, "mc", mc_files / "q2.npy", mc_files / "p2.npy", "--reduction",
               "seq-mean-token-sum")
    q, p = np.load(mc_files / "q2.npy"), np.load(mc_files / "p2.npy")
    v = fastkl.kl_mc(q, p, "k3", reduction="seq-mean-token-sum")
    _printed(_nums(out, "seq-mean-token-sum:"), [v], 6, "reduction value")
    st = fastkl.kl_mc_stats(q, p, "k3")
    _printed(_nums(out, "Mean    KL:"), [st.mean, st.sem], 6, "Mean ± sem")


@pytest.mark.parametrize("tokens", [False, True])
def test_cli_compare_values(mc_files, capsys, tokens):
    """Every printed number of ``fastkl compare`` is the report's (in %, where printed so)."""
    argv = ["compare", mc_files / "a.npy", mc_files / "b.npy", "--temperature", "1.3"]
    kw = dict(temperature=1.3)
    if tokens:
        argv += ["--tokens", mc_files / "tok.npy"]
        kw["tokens"] = mc_files / "tok.npy"
    out = _run(capsys, *argv)
    r = fastkl.compare_logits(mc_files / "a.npy", mc_files / "b.npy", **kw)
    _printed(_nums(out, "Mean    KLD:"), [r.mean, r.sem], 6, "KLD mean ± sem")
    _printed(_nums(out, "Maximum KLD:"), [r.maximum], 6, "KLD max")
    _printed(_nums(out, "Minimum KLD:"), [r.minimum], 6, "KLD min")
    for pc, v in r.percentiles.items():
        head = "Median  KLD:" if pc == 50.0 else f"{pc:4.1f}%   KLD:"
        _printed(_nums(out, head), [v], 6, head)
    _printed(_nums(out, "Same top p:"), [100 * r.same_top, 100 * r.same_top_sem], 3,
             "same top")
    if not tokens:
        return
    _printed(_nums(out, "Mean PPL(Q)    "), [r.ppl_test, r.ppl_test_sem], 6, "PPL(Q)")
    _printed(_nums(out, "Mean PPL(base) "), [r.ppl_base, r.ppl_base_sem], 6, "PPL(base)")
    _printed(_nums(out, "Mean ln(PPL(Q)/PPL(base))"), [r.ln_ppl_ratio, r.ln_ppl_ratio_sem],
             6, "ln ratio")
    _printed(_nums(out, "Mean PPL(Q)/PPL(base) "), [r.ppl_ratio, r.ppl_ratio_sem], 6, "ratio")
    _printed(_nums(out, "Cor(ln(PPL(Q)), ln(PPL(base))):"), [100 * r.cor_ln_ppl], 2, "cor")
    _printed(_nums(out, "Mean    Δp:"), [100 * r.dp_mean, 100 * r.dp_sem], 3, "dp mean")
    _printed(_nums(out, "Maximum Δp:"), [100 * r.dp_maximum], 3, "dp max")
    _printed(_nums(out, "Minimum Δp:"), [100 * r.dp_minimum], 3, "dp min")
    for pc, v in r.dp_percentiles.items():
        head = "Median  Δp:" if pc == 50.0 else f"{pc:4.1f}%   Δp:"
        _printed(_nums(out, head), [100 * v], 3, head)
    _printed(_nums(out, "RMS Δp    :"), [100 * r.rms_dp, 100 * r.rms_dp_sem], 3, "RMS dp")


def test_cli_demo_values(capsys):
    """The demo's table: bias/true, its 95% half-width and stdev/true are those of
    ``kl_mc_stats`` on the same samples; the closed forms are checked by quadrature."""
    n, seed = 20000, 5
    out = _run(capsys, "demo", "--samples", n, "--seed", seed, "--no-bench", "--backend",
               "numpy")
    rng = np.random.default_rng(seed)
    labels = (("k1", "k1", False), ("k2", "k2", False), ("k3", "k3", False),
              ("reverse k3", "k3", True))
    blocks = out.split("mu = ")[1:]
    assert len(blocks) == 2
    for mu, block in zip((0.1, 1.0), blocks, strict=True):
        logq, logp = gaussian_samples(mu, n, rng)
        true = mu * mu / 2
        for label, est, rev in labels:
            st = fastkl.kl_mc_stats(logq, logp, est, reverse=rev, backend="numpy")
            cb, cs = closed_form(label, mu)
            line = [ln for ln in block.splitlines() if ln.startswith(f"  {label:<11} ")]
            assert len(line) == 1, (label, block)
            got = [float(x) for x in re.findall(_NUM, line[0].split("|", 1)[1])]
            want = [(st.mean - true) / true, Z95 * st.sem / true, cb, st.std / true, cs]
            _printed(got, want, 4, f"demo mu={mu} {label}")


def _quad_moments(mu, est, rev):
    """(bias/true, stdev/true) of a term under x ~ N(0, 1), p = N(mu, 1), by quadrature."""
    from scipy.integrate import quad

    def t(x):
        l = -0.5 * (x - mu) ** 2 + 0.5 * x * x
        r = math.exp(l)
        if est == "k1":
            return r * l if rev else -l
        if est == "k2":
            return 0.5 * l * l
        return r * l - math.expm1(l) if rev else math.expm1(l) - l

    def pdf(x):
        return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    m1 = quad(lambda x: t(x) * pdf(x), -40, 40, epsabs=0, epsrel=1e-12, limit=200)[0]
    m2 = quad(lambda x: (t(x) - m1) ** 2 * pdf(x), -40, 40, epsabs=0, epsrel=1e-12,
              limit=200)[0]
    true = mu * mu / 2
    return (m1 - true) / true, math.sqrt(m2) / true


@pytest.mark.parametrize("mu", [0.1, 1.0, 1.6])
def test_demo_closed_forms(mu):
    for label, est, rev in (("k1", "k1", False), ("k2", "k2", False), ("k3", "k3", False),
                            ("reverse k3", "k3", True)):
        cb, cs = closed_form(label, mu)
        qb, qs = _quad_moments(mu, est, rev)
        assert abs(cb - qb) <= 1e-7 * max(1.0, abs(qb)), (label, mu, cb, qb)
        assert abs(cs - qs) <= 1e-7 * qs, (label, mu, cs, qs)
