"""Gradients (issue 15): ``kl_mc_grad`` of every backend, estimator, mask, ``log_iw`` and
reduction against the numpy reference; the reference against central finite differences;
the lanes the kernels special-case (|l| > 700 and the libm fix-up, overflow of e^l, +-inf,
NaN, subnormal l, the Taylor / expm1 and reverse-k3 switch points); ``kl_logits_grad`` with
logits far below the row maximum (the subnormal-exp fix-up lanes of the logits kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
from gaps_util import BACKENDS, COMPILED, EST_IDS, ESTIMATORS, close
from scipy.special import softmax

import fastkl

REDUCTIONS = ["mean", "sum", "none", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


def _inputs(dtype, shape=(5, 67), seed=3):
    """logq, logp with l of both signs and a spread of sizes; masks (bool with an empty row,
    float weights with zeros) and log importance weights."""
    rng = np.random.default_rng(seed)
    logq = rng.normal(-2.0, 1.5, shape)
    logp = logq + rng.normal(0.0, 1.2, shape)
    bmask = rng.random(shape) < 0.7
    bmask[1] = False  # a row without tokens: the RL reductions skip it
    wmask = np.where(rng.random(shape) < 0.2, 0.0, rng.uniform(0.1, 3.0, shape))
    log_iw = rng.normal(0.0, 0.5, shape)
    return (logq.astype(dtype), logp.astype(dtype), bmask, wmask, log_iw.astype(dtype))


MASKS = ["none", "bool", "weights"]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_grad_matches_reference(backend, dtype, est):
    """Every (mask, log_iw, reduction) of one estimator: value and gradient equal the
    reference's to the per-term tolerance (and the gradient has the reference's dtype)."""
    logq, logp, bmask, wmask, log_iw = _inputs(dtype)
    name, rev = est
    rtol = RTOL[np.dtype(dtype)]
    for mk in MASKS:
        mask = {"none": None, "bool": bmask, "weights": wmask}[mk]
        for iw in (None, log_iw):
            for red in REDUCTIONS:
                what = f"{backend} {name} rev={rev} mask={mk} iw={iw is not None} {red}"
                kw = dict(reverse=rev, reduction=red, mask=mask, log_iw=iw)
                v, g = fastkl.kl_mc_grad(logq, logp, name, backend=backend, **kw)
                v0, g0 = fastkl.kl_mc_grad(logq, logp, name, backend="reference", **kw)
                assert g.dtype == g0.dtype == np.dtype(dtype) and g.shape == logq.shape, what
                scale = float(np.max(np.abs(g0)))
                close(g, g0, rtol, rtol * scale * 1e-3, what + " grad")
                close(v, v0, rtol, 0.0, what + " value")


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_grad_axis_and_layouts(backend, est):
    """Strided, transposed and negative-stride inputs, and a reduction over one axis."""
    logq, logp, _, wmask, log_iw = _inputs(np.float64, (6, 40), seed=4)
    name, rev = est
    views = {
        "strided": (logq[:, ::2], logp[:, ::2], wmask[:, ::2], log_iw[:, ::2]),
        "transposed": (logq.T, logp.T, wmask.T, log_iw.T),
        "negative": (logq[::-1, ::-1], logp[::-1, ::-1], wmask[::-1, ::-1],
                     log_iw[::-1, ::-1]),
    }
    for lay, (q, p, m, iw) in views.items():
        for axis in (None, 0, 1):
            for red in ("mean", "sum"):
                what = f"{backend} {name} rev={rev} {lay} axis={axis} {red}"
                kw = dict(reverse=rev, reduction=red, axis=axis, mask=m, log_iw=iw)
                v, g = fastkl.kl_mc_grad(q, p, name, backend=backend, **kw)
                v0, g0 = fastkl.kl_mc_grad(q, p, name, backend="reference", **kw)
                close(g, g0, 1e-12, 1e-15, what + " grad")
                close(v, v0, 1e-12, 0.0, what + " value")


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("red", REDUCTIONS)
def test_reference_grad_is_the_derivative(est, red):
    """Central finite differences of the reference's reduced value (``kl_mc``, or each term
    for "none") with respect to each logq, with float weights and log importance weights."""
    logq, logp, _, wmask, log_iw = _inputs(np.float64, (3, 6), seed=5)
    wmask[0, 0] = 0.0
    name, rev = est
    kw = dict(reverse=rev, reduction=red, mask=wmask, log_iw=log_iw, backend="reference")
    _, g = fastkl.kl_mc_grad(logq, logp, name, **kw)
    h = 1e-5
    fd = np.empty_like(logq)
    if red == "none":
        up = fastkl.kl_mc(logq + h, logp, name, **kw)
        dn = fastkl.kl_mc(logq - h, logp, name, **kw)
        fd = (up - dn) / (2 * h)
    else:
        for idx in np.ndindex(logq.shape):
            a, b = logq.copy(), logq.copy()
            a[idx] += h
            b[idx] -= h
            fd[idx] = (fastkl.kl_mc(a, logp, name, **kw)
                       - fastkl.kl_mc(b, logp, name, **kw)) / (2 * h)
    close(g, fd, 1e-6, 1e-8, f"{name} rev={rev} {red}: grad vs finite differences")


# l values at every boundary the kernels special-case: 0, subnormal and tiny |l|, the
# Taylor cut-offs (0.5 in the reference, 1 in the float32 series), the reverse-k3 switch at
# -1, the fast-path limit 700 (Cython FK_FAST_MAX, numba FAST_MAX), float32 and float64
# overflow of e^l (88.7, 709.8), e^l underflow (-745), huge, +-inf and NaN.
_LANES = [0.0, 5e-324, -5e-324, 1e-310, -1e-310, 1e-300, 1e-8, -1e-8, 0.4999, 0.5001, -0.5001,
          0.9999, 1.0001, -1.0000001, -0.9999999, 3.0, -3.0, 88.0, 89.0, -104.0, 699.9, 700.0,
          700.1, -699.9, -700.0, -700.1, 709.7, 709.8, 710.0, -708.5, -745.2, -746.0, -1e4, 1e4,
          np.inf, -np.inf, np.nan]


def _lane_inputs(dtype):
    l = np.array(_LANES)
    logq = np.zeros(l.size)
    logq[1::2] = -0.25  # a nonzero logq too (then logp = logq + l is rounded; l recomputed)
    logp = logq + l
    logp[np.isposinf(l)] = 0.0
    logq[np.isposinf(l)] = -np.inf  # l = +inf comes from logq = -inf
    logp[np.isnan(l)] = np.nan
    # repeated with padding so that the special lanes sit in vector bodies and tails
    logq = np.concatenate([logq, np.full(29, -1.0), logq])
    logp = np.concatenate([logp, np.full(29, -1.5), logp])
    return logq.astype(dtype), logp.astype(dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_grad_special_lanes(backend, dtype, est):
    """Terms and derivatives at the special lanes equal the reference's ("none" gives the
    per-element derivative unscaled; "sum" the partials of every lane, NaN propagating)."""
    logq, logp = _lane_inputs(dtype)
    name, rev = est
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    for red in ("none", "sum"):
        kw = dict(reverse=rev, reduction=red)
        v, g = fastkl.kl_mc_grad(logq, logp, name, backend=backend, **kw)
        v0, g0 = fastkl.kl_mc_grad(logq, logp, name, backend="reference", **kw)
        what = f"{backend} {name} rev={rev} {red}"
        close(g, g0, rtol, 0.0, what + " grad")
        close(v, v0, rtol, 0.0, what + " value")
        ok = ~np.isnan(logp - logq)  # without the NaN lane: every other lane in the sum
        kw["mask"] = ok
        close(fastkl.kl_mc_grad(logq, logp, name, backend=backend, **kw)[0],
              fastkl.kl_mc_grad(logq, logp, name, backend="reference", **kw)[0], rtol, 0.0,
              what + " value without NaN")


# --------------------------------------------------------------------------- logits grad


def _far_rows(dtype, seed=6):
    """Rows whose logits sit at every distance from the row maximum the logits kernels treat
    apart: ~720 below (e^x subnormal: numba's [-745.2, -708) and Cython's [-745.2, -700)
    fix-up lanes), -700 +- eps, below -745.2 (exactly 0), beyond 700 in both rows (the
    kernels shift by the row max; |logits| > 700), -inf, and ordinary values."""
    rng = np.random.default_rng(seed)
    V = 1100  # two+ chunks of 512, so a fix-up lane can sit in any chunk
    base = rng.normal(0.0, 2.0, (6, V))
    a = base.copy()
    b = base + rng.normal(0.0, 0.5, (6, V))
    far = rng.choice(V, 40, replace=False)
    offs = np.array([-699.0, -700.5, -705.0, -708.5, -710.0, -715.0, -720.0, -725.0, -730.0,
                     -740.0, -745.0, -745.3, -746.0, -800.0] * 3)[:40]
    a[0, far] = offs  # P has entries ~720 below its max; Q ordinary
    b[1, far] = offs  # Q has them; P ordinary
    a[2, far] = offs
    b[2, far] = offs[::-1]  # both, at different places
    a[3] += 900.0  # everything beyond 700, and entries ~720 below the max
    b[3] += 650.0
    a[3, far] = 900.0 + offs
    a[4, far[:5]] = -np.inf
    b[4, far[5:10]] = -np.inf
    b[5, far] = -720.0 + rng.normal(0, 1e-3, far.size)
    a[1, far[:4]] = [5e-324, -5e-324, 1e-310, -2.5e-308]  # subnormal logits themselves
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("t", [1.0, 0.75])
def test_logits_grad_far_below_row_max(backend, dtype, t):
    """``(Q - P) / T`` where e^(log P) or e^(log Q) is subnormal or exactly 0: equal to the
    reference (absolute tolerance far below the smallest normal double, so a subnormal
    lane with the wrong sign or magnitude fails), value too."""
    a, b = _far_rows(dtype)
    if dtype == np.float32:
        a = a.astype(np.float64)  # the grad dtype follows the inputs: keep float64 lanes
        b = b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        pq = np.nan_to_num(softmax(a / t, axis=-1) + softmax(b / t, axis=-1))
    for red in ("none", "mean"):
        v, g = fastkl.kl_logits_grad(a, b, temperature=t, reduction=red, backend=backend)
        v0, g0 = fastkl.kl_logits_grad(a, b, temperature=t, reduction=red, backend="reference")
        what = f"{backend} T={t} {red}"
        # Q - P cancels where Q ~ P: the error bound is relative to P + Q, not to Q - P
        scale = (1.0 if red == "none" else 1.0 / a.shape[0]) / t
        err = np.abs(g - g0)
        lim = 1e-12 * pq * scale + 1e-320
        fin = np.isfinite(g0)
        assert np.array_equal(fin, np.isfinite(g)), what
        assert (err[fin] <= lim[fin]).all(), (what, np.max(err[fin] / lim[fin]))
        close(v, v0, 1e-12, 1e-300, what + " value")
        # the sign of every tiny lane, and its ratio to the reference
        tiny = (np.abs(g0) < 1e-300) & (g0 != 0)
        assert tiny.any() or t != 1.0, "no subnormal gradient lane: the test lost its point"
        assert np.array_equal(np.sign(g[tiny]), np.sign(g0[tiny])), what


@pytest.mark.parametrize("backend", COMPILED)
def test_logits_grad_far_below_float32(backend):
    """float32 logits: gradient in float32, lanes ~720 below the max are exactly 0."""
    a, b = _far_rows(np.float32)
    v, g = fastkl.kl_logits_grad(a, b, reduction="none", backend=backend)
    v0, g0 = fastkl.kl_logits_grad(a, b, reduction="none", backend="reference")
    assert g.dtype == np.float32
    close(g, g0, 1e-6, 1e-12, f"{backend} grad float32")
    close(v, v0, 1e-6, 1e-12, f"{backend} value float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_grad_is_the_derivative(backend):
    """Central differences of KL(P||Q) in logits_q (float64, T = 0.8, "mean" over rows)."""
    rng = np.random.default_rng(8)
    a = rng.normal(0, 2, (3, 9))
    b = rng.normal(0, 2, (3, 9))
    kw = dict(temperature=0.8, backend=backend, reduction="mean")
    _, g = fastkl.kl_logits_grad(a, b, **kw)
    h = 1e-5
    fd = np.empty_like(b)
    for idx in np.ndindex(b.shape):
        up, dn = b.copy(), b.copy()
        up[idx] += h
        dn[idx] -= h
        fd[idx] = (fastkl.kl_logits(a, up, **kw) - fastkl.kl_logits(a, dn, **kw)) / (2 * h)
    close(g, fd, 1e-6, 1e-9, f"{backend} kl_logits_grad vs finite differences")
