"""Per-term accuracy against an mpmath reference, overflow, and accumulation accuracy.

The exact value for given float inputs: ``l = logp - logq`` computed exactly (mpmath, from
the float values), then the term at 60 digits. Tolerances are the issue's:
``1e-6 * max(1, |l|)`` relative for float32 results, ``1e-14 * max(1, |l|)`` for float64.
"""

from __future__ import annotations

import math

import arrays
import mpmath
import numpy as np
import pytest

import fastkl
from fastkl._estimators import BY_KEY

mpmath.mp.dps = 60

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def exact_term(q: float, p: float, est: tuple[str, bool]) -> mpmath.mpf:
    l = mpmath.mpf(p) - mpmath.mpf(q)
    r = mpmath.exp(l)
    name, rev = est
    if not rev:
        if name == "k1":
            return -l
        if name == "k2":
            return l * l / 2
        if name == "abs":
            return abs(l)
        return mpmath.expm1(l) - l
    if name == "k1":
        return r * l
    return r * l - mpmath.expm1(l)


def exact_terms(q: np.ndarray, p: np.ndarray, est) -> tuple[np.ndarray, np.ndarray]:
    """(exact term as float64 (may be inf beyond float64), exact l as float64)."""
    t = np.array([float(exact_term(float(a), float(b), est)) for a, b in zip(q, p, strict=True)])
    l = np.array([float(mpmath.mpf(float(b)) - mpmath.mpf(float(a)))
                  for a, b in zip(q, p, strict=True)])
    return t, l


def sweep_inputs(dtype) -> tuple[np.ndarray, np.ndarray]:
    """(logq, logp) in ``dtype`` with |log r| from 1e-10 to 80, both signs, from several
    offsets (logq = 0 makes l exactly representable; other offsets round logp)."""
    mags = np.logspace(-10, np.log10(80.0), 141)
    ls = np.concatenate([mags, -mags])
    qs, ps = [], []
    for off in (0.0, -0.7, 3.25, -37.0):
        q = np.full(ls.shape, off)
        qs.append(q)
        ps.append(off + ls)
    q = np.concatenate(qs).astype(dtype)
    p = np.concatenate(ps).astype(dtype)
    l = p.astype(np.float64) - q.astype(np.float64)  # exact for float16/32; filter below
    keep = (np.abs(l) >= 1e-10) & (np.abs(l) <= 80.0)
    return q[keep], p[keep]


def check_terms(got: np.ndarray, exact: np.ndarray, l: np.ndarray, rtol: float) -> list[str]:
    """Descriptions of the terms outside ``rtol * max(1, |l|)`` relative error."""
    bad = []
    for g, e, li in zip(got.astype(np.float64), exact, l, strict=True):
        err = abs(g - e) / abs(e) if e != 0 else abs(g)
        if not (err <= rtol * max(1.0, abs(li))):  # NaN fails too
            bad.append(f"l={li!r}: got {g!r}, exact {e!r}, rel err {err:.3g}")
    return bad


_EXACT_CACHE: dict = {}


def _exact_for(dtype, est):
    key = (np.dtype(dtype).name, est)
    if key not in _EXACT_CACHE:
        q, p = sweep_inputs(dtype)
        t, l = exact_terms(q, p, est)
        _EXACT_CACHE[key] = (q, p, t, l)
    return _EXACT_CACHE[key]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
def test_terms_match_mpmath(backend, est, dtype):
    q, p, exact, l = _exact_for(dtype, est)
    assert q.size > 100
    got = fastkl.kl_mc(q, p, est[0], reverse=est[1], reduction="none", backend=backend)
    out_dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
    assert got.dtype == out_dtype
    bad = check_terms(got, exact, l, arrays.RTOL[out_dtype])
    assert not bad, f"{len(bad)} of {q.size} terms out of tolerance:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
def test_float32_series_error_in_float64_lanes(backend, est):
    """float32 inputs with float64 weights (and reverse k1, log_iw, clamps) keep the float64
    lanes, whose short minimax exp series (relative error 2.7e-9, docs/kernel_math.md) a
    float64 sum of one term shows unrounded: within 1e-8 * max(1, |l|) of the exact term,
    100x tighter than the float32 contract. (Unweighted or 0/1-masked float32 sums go
    through the float32 lanes: ``test_float32_lane_terms_in_sums``.)"""
    q, p, exact, l = _exact_for(np.float32, est)
    w = np.ones((q.size, 1))
    got = fastkl.kl_mc(q[:, None], p[:, None], est[0], reverse=est[1], reduction="sum",
                       axis=1, mask=w, backend=backend)
    assert got.dtype == np.float64
    bad = check_terms(got, exact, l, 1e-8)
    assert not bad, f"{len(bad)} of {q.size} terms out of tolerance:\n" + "\n".join(bad[:10])


def _f32_boundaries() -> np.ndarray:
    """+-4 float32 ulp around the lanes' regime boundaries (docs/kernel_math.md: the exp
    reduction's k = 0 / +-1 edge ln2/2, the polynomial / direct split of the proposals at
    0.5, 1, 2, the reverse-k3 fix-up edge 80, its float32 overflow 84.3, the fix-up edge 87,
    88, the tiny-lane edge 2**-62), both signs."""
    pts = []
    for b in (math.log(2) / 2, 0.5, 1.0, 2.0, 80.0, 84.3, 87.0, 88.0, 2.0**-62):
        up = dn = np.float32(b)
        pts.append(up)
        for _ in range(4):
            up = np.nextafter(up, np.float32(np.inf))
            dn = np.nextafter(dn, np.float32(0))
            pts += [up, dn]
    v = np.unique(np.array(pts, np.float32))
    return np.concatenate([v, -v])


def f32_lane_inputs() -> tuple[np.ndarray, np.ndarray]:
    """float32 (logq, logp) for the float32 lanes: ``sweep_inputs`` extended to |l| = 88
    (log-spaced from 1e-10, both signs, four offsets), the regime boundaries +-4 ulp,
    subnormal and tiny l, +-0 (logq = 0: l exactly the float32 value)."""
    mags = np.logspace(-10, np.log10(88.0), 161)
    ls = np.concatenate([mags, -mags])
    qs, ps = [], []
    for off in (0.0, -0.7, 3.25, -37.0):
        qs.append(np.full(ls.shape, off))
        ps.append(off + ls)
    q = np.concatenate(qs).astype(np.float32)
    p = np.concatenate(ps).astype(np.float32)
    l = p.astype(np.float64) - q.astype(np.float64)
    keep = (np.abs(l) >= 1e-10) & (np.abs(l) <= 88.0)
    tiny = np.float32([0.0, -0.0, 1e-45, -1e-45, 3e-42, -1e-40, 1.1754942e-38, -1.1754944e-38,
                       1e-30, -1e-20, 2e-19, -5e-15])
    extra = np.concatenate([_f32_boundaries(), tiny])
    return (np.concatenate([q[keep], np.zeros(extra.shape, np.float32)]),
            np.concatenate([p[keep], extra]))


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
def test_float32_lane_terms_in_sums(backend, est):
    """The float32 inputs' contract (issue 12) where the compiled backends sum float32 terms
    (unweighted and 0/1-masked sums, means, statistics): every term within
    ``1e-6 * max(1, |l|)`` of mpmath, l the exact difference of the inputs, over |l| from
    1e-10 to 88, the regime boundaries +-4 ulp, subnormals and +-0; a one-term float64 sum
    shows the term as the kernel accumulates it (unmasked and with a bool mask of ones)."""
    key = ("f32lanes", est)
    if key not in _EXACT_CACHE:
        q, p = f32_lane_inputs()
        t, l = exact_terms(q, p, est)
        _EXACT_CACHE[key] = (q, p, t, l)
    q, p, exact, l = _EXACT_CACHE[key]
    assert q.size > 1000
    for mask in (None, np.ones((q.size, 1), bool)):
        got = fastkl.kl_mc(q[:, None], p[:, None], est[0], reverse=est[1], reduction="sum",
                           axis=1, mask=mask, backend=backend)
        assert got.dtype == np.float64
        bad = check_terms(got, exact, l, arrays.RTOL[np.dtype(np.float32)])
        assert not bad, (f"mask={mask is not None}: {len(bad)} of {q.size} terms out of "
                         "tolerance:\n" + "\n".join(bad[:10]))


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
def test_float32_special_lanes_in_sums(backend, est):
    """+-inf and NaN l in a float32 sum give the reference's limits (NaN propagates), alone
    and inside a block of ordinary lanes; a NaN is excluded and counted under
    ``nan_policy="omit"``."""
    from fastkl.backends import numpy as numpy_ref

    code = BY_KEY[est].code
    specials = np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0])
    rng = np.random.default_rng(3)
    for sp in specials:
        lim = float(numpy_ref.term_and_grad(np.array([float(sp)]), code)[0])
        q = np.zeros(1, np.float32)
        p = np.array([sp], np.float32)
        got = fastkl.kl_mc(q, p, est[0], reverse=est[1], reduction="sum", backend=backend)
        assert got == lim or (math.isnan(got) and math.isnan(lim)), (sp, got, lim)
        # inside a full block: the rest of the block is ordinary lanes
        p = rng.normal(0, 0.5, 3000).astype(np.float32)
        p[1234] = sp
        q = np.zeros_like(p)
        got = fastkl.kl_mc(q, p, est[0], reverse=est[1], reduction="sum", backend=backend)
        if math.isinf(lim) or math.isnan(lim):
            assert got == lim or (math.isnan(got) and math.isnan(lim)), (sp, got, lim)
        if math.isnan(sp):
            st = fastkl.kl_mc_stats(q, p, est[0], reverse=est[1], nan_policy="omit",
                                    backend=backend)
            assert st.n == p.size - 1, st


@pytest.mark.parametrize("est", [("k3", False), ("k3", True)], ids=["k3", "rk3"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_k3_never_negative(backend, est, dtype):
    rng = np.random.default_rng(7)
    l = np.concatenate([np.logspace(-12, 1.9, 400), -np.logspace(-12, 1.9, 400),
                        rng.normal(0, 1e-3, 2000), rng.normal(0, 1e-2, 2000),
                        rng.normal(0, 3, 2000), [0.0]])
    for off in (0.0, -5.3, 11.0):
        q = np.full(l.shape, off).astype(dtype)
        p = (off + l).astype(dtype)
        t = fastkl.kl_mc(q, p, est[0], reverse=est[1], reduction="none", backend=backend)
        assert (t >= 0).all(), f"negative/NaN terms: {t[~(t >= 0)][:5]}"


def _overflow_inputs(dtype, lmax):
    l = np.concatenate([np.linspace(60.0, lmax, 400), -np.linspace(60.0, lmax, 400)])
    return np.zeros(l.shape, dtype), l.astype(dtype)


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
@pytest.mark.parametrize("dtype,lmax", [(np.float32, 95.0), (np.float64, 720.0)])
def test_no_spurious_overflow(backend, est, dtype, lmax):
    """No inf for finite inputs whose exact term fits the output dtype; accurate there too."""
    q, p = _overflow_inputs(dtype, lmax)
    got = fastkl.kl_mc(q, p, est[0], reverse=est[1], reduction="none", backend=backend)
    big = float(np.finfo(dtype).max)
    exact = [exact_term(float(a), float(b), est) for a, b in zip(q, p, strict=True)]
    l = p.astype(np.float64) - q.astype(np.float64)
    fits = np.array([abs(e) < big * (1 - 1e-5) for e in exact])
    assert fits.sum() > 100
    assert np.isfinite(got[fits]).all(), (
        f"inf/NaN where the exact term fits: l={l[fits & ~np.isfinite(got)][:5]}")
    ex = np.array([float(e) for e in exact])
    bad = check_terms(got[fits], ex[fits], l[fits], arrays.RTOL[np.dtype(dtype)])
    assert not bad, "\n".join(bad[:10])
    # beyond the dtype's range the term is +-inf (or the exact huge value), never NaN
    assert not np.isnan(got).any()


@pytest.mark.parametrize("est,l", [(("k3", False), 85.0), (("k1", True), 80.0),
                                   (("k3", True), 84.0), (("k3", False), 88.5)])
def test_float32_large_log_ratio_finite(backend, est, l):
    got = fastkl.kl_mc(np.float32(0.0), np.float32(l), est[0], reverse=est[1],
                       reduction="none", backend=backend)
    assert got.dtype == np.float32
    exact = float(exact_term(0.0, float(np.float32(l)), est))
    assert exact < _FLOAT32_MAX
    assert np.isfinite(got) and abs(float(got) - exact) <= 1e-6 * l * exact


def test_textbook_float32_fails_the_tolerance():
    """The check above has teeth: textbook float32 ``exp(l) - 1 - l`` misses it by orders of
    magnitude and goes negative."""
    q, p, exact, l = _exact_for(np.float32, ("k3", False))
    lf = p - q  # float32 arithmetic throughout
    textbook = np.exp(lf) - np.float32(1) - lf
    bad = check_terms(textbook, exact, l, arrays.RTOL[np.dtype(np.float32)])
    assert len(bad) > q.size // 4
    small = np.abs(l) < 1e-2
    rel = np.abs(textbook.astype(np.float64)[small] - exact[small]) / exact[small]
    assert np.median(rel) > 1e-3
    ls = np.float32(np.linspace(-1e-2, 1e-2, 2001))
    assert (np.exp(ls) - np.float32(1) - ls < 0).any()


# --------------------------------------------------------------------------- accumulation


def test_cases_cross_the_kernels_blocks():
    """The array cases' sizes cross BLOCK boundaries (arrays.BLOCK): the kernels' BLOCK."""
    from fastkl.backends._contract import BLOCK

    assert arrays.BLOCK == BLOCK


def _exact_mean(q: np.ndarray, p: np.ndarray, est, chunk=1 << 22) -> float:
    """math.fsum mean of float64 terms (the reference's float64 formulas are within a few
    ulp per term, far below the 1e-12 tolerance) computed from the exact float64 l."""
    from fastkl.backends import numpy as numpy_ref

    code = BY_KEY[est].code
    parts = []
    for i in range(0, q.size, chunk):
        l = p[i:i + chunk].astype(np.float64) - q[i:i + chunk].astype(np.float64)
        parts.append(math.fsum(numpy_ref.term_and_grad(l, code)))
    return math.fsum(parts) / q.size


def _gaussian_pair(n, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    mu = 1.0
    q = (-0.5 * x * x - 0.9189385332046727).astype(dtype)
    p = (-0.5 * (x - mu) ** 2 - 0.9189385332046727).astype(dtype)
    return q, p


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_mean_accumulation(backend, est, dtype):
    n = 2_000_000
    q, p = _gaussian_pair(n, dtype, 11)
    exact = _exact_mean(q, p, est)
    got = fastkl.kl_mc(q, p, est[0], reverse=est[1], backend=backend)
    assert type(got) is float
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert abs(got - exact) <= tol * abs(exact), (got, exact)


@pytest.mark.slow
@pytest.mark.parametrize("est", [("k3", False), ("k1", False)], ids=["k3", "k1"])
def test_mean_of_1e8_float32_terms(backend, est):
    n = 100_000_000
    rng = np.random.default_rng(5)
    q = np.empty(n, np.float32)
    p = np.empty(n, np.float32)
    for i in range(0, n, 1 << 23):
        x = rng.standard_normal(min(1 << 23, n - i))
        q[i:i + x.size] = -0.5 * x * x
        p[i:i + x.size] = -0.5 * (x - 1.0) ** 2
    exact = _exact_mean(q, p, est)
    got = fastkl.kl_mc(q, p, est[0], reverse=est[1], backend=backend)
    assert abs(got - exact) <= 1e-6 * abs(exact), (got, exact)
    # a float32 running sum is the failure this test exists for: show it misses
    if est == ("k3", False):
        t = fastkl.kl_mc(q[: 1 << 24], p[: 1 << 24], "k3", reduction="none", backend=backend)
        naive = np.cumsum(t, dtype=np.float32)[-1] / np.float32(t.size)
        ex = _exact_mean(q[: 1 << 24], p[: 1 << 24], est)
        assert abs(float(naive) - ex) > 1e-6 * ex
