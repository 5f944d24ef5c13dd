"""Gradient options of ``kl_mc_grad`` (issue 13): clamped gradients, ``clamp_order``,
``grad_estimator`` (straight-through) and ``iw_grad``.

* the numpy reference against torch autograd of the documented formula (float64), for every
  estimator, clamp, order and ``iw_grad``: the semantics;
* each compiled backend against the reference (value and gradient, float32 and float64, with
  masks and ``log_iw``): the kernels;
* the values of ``kl_mc`` / ``kl_mc_stats`` / accumulators / ``kl_mc_file`` / dask with
  ``clamp_order="weighted"`` against the formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from gaps_util import BACKENDS, COMPILED, EST_IDS, ESTIMATORS, close

import fastkl

CLAMPS = {
    "lr": dict(clamp_log_ratio=(-0.9, 1.3)),
    "value": dict(clamp_value=(-0.25, 0.6)),
    "both": dict(clamp_log_ratio=(-1.1, 1.2), clamp_value=(-0.4, 0.5)),
}


def _inputs(dtype, shape=(4, 301), seed=11):
    rng = np.random.default_rng(seed)
    logq = rng.normal(-1.5, 1.0, shape)
    logp = logq + rng.normal(0.1, 1.0, shape)
    w = np.where(rng.random(shape) < 0.15, 0.0, rng.uniform(0.2, 2.0, shape))
    log_iw = rng.normal(0.0, 0.6, shape)
    return logq.astype(dtype), logp.astype(dtype), w, log_iw.astype(dtype)


def _torch_value(torch, est, logq, logp, log_iw, clamps, order, iw_grad):
    """The documented formula in torch: v per element (autograd gives the derivative)."""
    name, rev = est
    l = logp - logq
    lr = clamps.get("clamp_log_ratio")
    lc = l.clamp(*lr) if lr else l
    r = torch.exp(lc)
    t = {("k1", False): -lc, ("k2", False): 0.5 * lc * lc, ("k3", False): torch.expm1(lc) - lc,
         ("k1", True): r * lc, ("k3", True): r * lc - torch.expm1(lc),
         ("abs", False): lc.abs()}[(name, rev)]
    base = torch.zeros_like(logq) if log_iw is None else log_iw
    # iw_grad: log_iw = logq - log mu, so d log_iw / d logq = 1 (value unchanged)
    liw = base + (logq - logq.detach()) if iw_grad else base
    iw = torch.exp(liw)
    if lr and order == "weighted":  # NeMo-RL: where the log-ratio clamp bites, the weight
        iw = torch.where(l == lc, iw, iw.detach())  # passes no gradient either
    vc = clamps.get("clamp_value")
    if order == "term":
        return iw * (t.clamp(*vc) if vc else t)
    s = iw * t
    return s.clamp(*vc) if vc else s


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("clamp", list(CLAMPS))
@pytest.mark.parametrize("order", ["term", "weighted"])
def test_reference_is_autograd_of_the_formula(est, clamp, order):
    """The numpy reference's value and gradient equal torch autograd's of the formula
    (float64), with and without log_iw, with iw_grad False and True."""
    torch = pytest.importorskip("torch")
    logq, logp, w, log_iw = _inputs(np.float64, (3, 50))
    clamps = CLAMPS[clamp]
    for iw in (None, log_iw):
        for iw_grad in (False, True):
            what = f"{est} {clamp} {order} iw={iw is not None} iw_grad={iw_grad}"
            tq = torch.tensor(logq, requires_grad=True)
            v = _torch_value(torch, est, tq, torch.tensor(logp),
                             None if iw is None else torch.tensor(iw), clamps, order, iw_grad)
            (v * torch.tensor(w)).sum().backward()
            val, g = fastkl.kl_mc_grad(logq, logp, est[0], reverse=est[1], reduction="sum",
                                       mask=w, log_iw=iw, clamp_order=order, iw_grad=iw_grad,
                                       backend="reference", **clamps)
            ref_g = tq.grad.numpy()
            close(g, ref_g, 1e-12, 1e-14, what + " grad")
            close(val, float((v.detach() * torch.tensor(w)).sum()), 1e-12, 1e-14,
                  what + " value")
            # the clamps bite somewhere (else the test would not test them)
            if iw_grad is False and iw is None:
                _, g0 = fastkl.kl_mc_grad(logq, logp, est[0], reverse=est[1],
                                          reduction="sum", mask=w, backend="reference")
                assert ((g == 0) & (g0 != 0)).any(), what + ": no clamp bit"


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_clamped_grad_backends_match_reference(backend, dtype, est):
    """Every clamp, order, log_iw and iw_grad: the compiled kernels give the reference's
    value and gradient (one reduction per row, so every row's normalisation is used)."""
    logq, logp, w, log_iw = _inputs(dtype)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    name, rev = est
    for clamp, clamps in CLAMPS.items():
        for order in ("term", "weighted"):
            for iw in (None, log_iw):
                for iw_grad in (False, True):
                    for mask, red in ((None, "mean"), (w, "seq-mean-token-mean"), (w, "none")):
                        what = (f"{backend} {name} rev={rev} {clamp} {order} iw={iw is not None}"
                                f" iw_grad={iw_grad} {red}")
                        kw = dict(reverse=rev, reduction=red, mask=mask, log_iw=iw,
                                  clamp_order=order, iw_grad=iw_grad, **clamps)
                        v, g = fastkl.kl_mc_grad(logq, logp, name, backend=backend, **kw)
                        v0, g0 = fastkl.kl_mc_grad(logq, logp, name, backend="reference", **kw)
                        assert g.dtype == np.dtype(dtype), what
                        scale = float(np.max(np.abs(g0)))
                        close(g, g0, rtol, rtol * scale * 1e-3, what + " grad")
                        close(v, v0, rtol, rtol * 1e-3, what + " value")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_estimator_is_straight_through(backend):
    """grad_estimator: the value of ``estimator`` (clamped), the derivative of the unclamped
    grad_estimator term (times exp(log_iw)); equal to kl_mc and to kl_mc_grad of the other
    estimator respectively."""
    logq, logp, w, log_iw = _inputs(np.float64, (3, 90), seed=5)
    for est, gest in (("k1", "k2"), ("k3", "k2"), ("k3", "k1"), ("k2", "k3"), ("k3", "k3")):
        for red in ("mean", "seq-mean-token-sum", "none"):
            for iw, iw_grad in ((None, False), (log_iw, False), (log_iw, True)):
                kw = dict(reduction=red, mask=w, log_iw=iw)
                cl = dict(clamp_log_ratio=(-20, 20), clamp_value=(-0.3, 0.3))
                v, g = fastkl.kl_mc_grad(logq, logp, est, grad_estimator=gest, iw_grad=iw_grad,
                                         backend=backend, **kw, **cl)
                ref_v = fastkl.kl_mc(logq, logp, est, backend=backend, **kw, **cl)
                _, ref_g = fastkl.kl_mc_grad(logq, logp, gest, iw_grad=iw_grad,
                                             backend=backend, **kw)
                what = f"{backend} {est}->{gest} {red} iw={iw is not None} {iw_grad}"
                close(v, ref_v, 1e-15, 0.0, what + " value")
                close(g, ref_g, 1e-15, 0.0, what + " grad")
                if est != gest:
                    _, own = fastkl.kl_mc_grad(logq, logp, est, backend=backend, **kw, **cl)
                    assert not np.allclose(g, own), what


def test_grad_estimator_errors():
    q = np.zeros(3)
    with pytest.raises(ValueError, match="grad_estimator"):
        fastkl.kl_mc_grad(q, q, grad_estimator="k4")
    with pytest.raises(ValueError, match="grad_estimator"):
        fastkl.kl_mc_grad(q, q, "k3", reverse=True, grad_estimator="k2")
    with pytest.raises(TypeError, match="iw_grad"):
        fastkl.kl_mc_grad(q, q, iw_grad="yes")
    with pytest.raises(ValueError, match="clamp_order"):
        fastkl.kl_mc_grad(q, q, clamp_order="after")
    with pytest.raises(ValueError, match="clamp_order"):
        fastkl.kl_mc(q, q, clamp_order=None)


def test_verl_low_var_kl_example():
    """The issue's example: logprob 0, ref [0.1, 3, 25], verl's low_var_kl (log-ratio clamp
    +-20, value clamp +-10): gradient [-(e^0.1 - 1), 0, 0]; the unclamped k3 gives
    [-0.105, -19.1, -7.2e10]."""
    q = np.zeros(3)
    p = np.array([0.1, 3.0, 25.0])
    for backend in BACKENDS:
        v, g = fastkl.kl_mc_grad(q, p, "k3", reduction="none", clamp_log_ratio=(-20, 20),
                                 clamp_value=(-10, 10), backend=backend)
        np.testing.assert_allclose(g, [-math.expm1(0.1), 0.0, 0.0], rtol=1e-14)
        np.testing.assert_allclose(v, [math.expm1(0.1) - 0.1, 10.0, 10.0], rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_clamp_order_values(backend):
    """l = 3, w = exp(log_iw) = 0.5, k3 clamp_value (-10, 10): "weighted" clip(0.5 * 16.09)
    = 8.04 (NeMo-RL); "term" 0.5 * clip(16.09) = 5.0. Every reducing entry point agrees."""
    q = np.zeros((2, 3))
    p = np.full((2, 3), 3.0)
    liw = np.full((2, 3), math.log(0.5))
    t = math.expm1(3.0) - 3.0
    for order, want in (("weighted", 0.5 * t), ("term", 5.0)):
        kw = dict(log_iw=liw, clamp_value=(-10, 10), clamp_order=order, backend=backend)
        assert math.isclose(fastkl.kl_mc(q, p, **kw), want, rel_tol=1e-14), order
        assert math.isclose(fastkl.kl_mc_stats(q, p, **kw).mean, want, rel_tol=1e-14)
        np.testing.assert_allclose(fastkl.kl_mc(q, p, reduction="none", **kw), want,
                                   rtol=1e-14)
        acc = fastkl.MCAccumulator("k3", clamp_value=(-10, 10), clamp_order=order,
                                   backend=backend)
        acc.update(q, p, log_iw=liw)
        assert math.isclose(acc.result().mean, want, rel_tol=1e-14), order
        rep = fastkl.kl_mc_file(q, p, log_iw=liw, clamp_value=(-10, 10), clamp_order=order,
                                backend=backend)
        assert math.isclose(rep.mean, want, rel_tol=1e-14), order


def test_weighted_clamp_order_dask():
    da = pytest.importorskip("dask.array")
    q = np.zeros((4, 6))
    p = np.full((4, 6), 3.0)
    liw = np.full((4, 6), math.log(0.5))
    for order, want in (("weighted", 0.5 * (math.expm1(3.0) - 3.0)), ("term", 5.0)):
        got = fastkl.kl_mc(da.from_array(q, chunks=2), da.from_array(p, chunks=2),
                           log_iw=da.from_array(liw, chunks=2), clamp_value=(-10, 10),
                           clamp_order=order).compute()
        assert math.isclose(float(got), want, rel_tol=1e-14), order


def test_old_pickled_accumulator_keeps_term_order():
    """An MCAccumulator pickled before clamp_order existed (a 4-tuple of bounds) still
    updates, in the "term" order."""
    import pickle

    acc = fastkl.MCAccumulator("k3", clamp_value=(-10, 10))
    state = acc.__dict__.copy()
    state["_clamp"] = state["_clamp"][:4]
    old = fastkl.MCAccumulator.__new__(fastkl.MCAccumulator)
    old.__setstate__(state)
    back = pickle.loads(pickle.dumps(old))
    back.update(np.zeros(3), np.full(3, 3.0), log_iw=np.full(3, math.log(0.5)))
    assert math.isclose(back.result().mean, 5.0, rel_tol=1e-14)
