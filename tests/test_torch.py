"""fastkl.torch (issue 13): ``kl_mc``, ``kl_logits``, ``jsd_logits``, ``entropy_logits`` and
``token_logprobs`` on torch CPU tensors with autograd.

gradcheck in float64 over every estimator, mask, ``log_iw`` and reduction (the backward pass
is the fused ``kl_mc_grad`` / ``kl_logits_grad`` kernel); values equal to the numpy API's;
float32/bfloat16/float16 gradients against the same formulas written in torch and
differentiated by torch in float64; clamped, straight-through and importance-weight
gradients, and those with respect to logp and log_iw; the errors (non-CPU tensors, gradients
the kernels do not compute); no copies of float32/float64 inputs; and ``import
fastkl`` without torch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastkl  # noqa: E402
import fastkl.torch as ft  # noqa: E402

ESTIMATORS = [("k1", False), ("k2", False), ("k3", False), ("k1", True), ("k3", True)]
EST_IDS = ["k1", "k2", "k3", "rk1", "rk3"]
REDUCTIONS = ["mean", "sum", "none", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
MASKS = ["none", "bool", "weights"]
LOW = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # rtol of the max


def _mc_inputs(shape=(4, 6), seed=0, dtype=torch.float64):
    """logq (requires grad), logp, a bool mask with an empty row, weights with zeros,
    log importance weights."""
    g = torch.Generator().manual_seed(seed)
    logq = -2.0 + 1.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    logp = logq + 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)
    bmask = torch.rand(shape, generator=g) < 0.7
    if len(shape) == 2:
        bmask[1] = False  # a row without tokens: the RL reductions skip it
    wmask = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0,
                        0.1 + 2.0 * torch.rand(shape, generator=g, dtype=torch.float64))
    log_iw = 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    return (logq.to(dtype).requires_grad_(), logp.to(dtype), bmask, wmask, log_iw.to(dtype))


def _mask(kind, bmask, wmask):
    return {"none": None, "bool": bmask, "weights": wmask}[kind]


# --------------------------------------------------------------------------- torch formulas


def _terms(logq, logp, est, reverse):
    l = logp - logq
    if not reverse:
        return {"k1": -l, "k2": 0.5 * l * l, "k3": torch.expm1(l) - l}[est]
    r = torch.exp(l)
    return {"k1": r * l, "k3": r * l - torch.expm1(l)}[est]


def _mc_formula(logq, logp, est, reverse, reduction, mask=None, log_iw=None, axis=None):
    """kl_mc written in torch (float64 in, float64 out): w * exp(log_iw) * term, reduced."""
    t = _terms(logq, logp, est, reverse)
    w = torch.ones_like(t) if mask is None else torch.as_tensor(mask).to(t.dtype)
    if log_iw is not None:
        t = t * torch.exp(log_iw)
    wt = torch.where(w != 0, w * t, torch.zeros_like(t))
    if reduction == "none":
        return wt
    dims = tuple(range(t.ndim)) if axis is None else axis
    if reduction == "sum":
        return wt.sum(dim=dims)
    if reduction in ("mean", "token-mean"):
        if reduction == "token-mean":
            dims = (0, 1)
        return wt.sum(dim=dims) / w.sum(dim=dims)
    rows = w.sum(dim=1) > 0
    per_row = wt.sum(dim=1)
    if reduction == "seq-mean-token-mean":
        per_row = per_row / torch.where(rows, w.sum(dim=1), torch.ones_like(per_row))
    return per_row[rows].mean()


def _kl_logits_formula(a, b, temperature, axis, mask, reduction):
    lp = torch.log_softmax(a / temperature, dim=axis)
    lq = torch.log_softmax(b / temperature, dim=axis)
    kl = (lp.exp() * (lp - lq)).sum(dim=axis)
    w = torch.ones_like(kl) if mask is None else torch.as_tensor(mask).to(kl.dtype)
    wkl = torch.where(w != 0, w * kl, torch.zeros_like(kl))
    if reduction == "none":
        return wkl
    if reduction == "sum":
        return wkl.sum()
    return wkl.sum() / w.sum()


def _np(x):
    return None if x is None else x.detach().numpy()


def _close(got, ref, rtol, what=""):
    """|got - ref| <= rtol * max|ref| (+ a tiny floor), elementwise, in float64."""
    g = got.detach().to(torch.float64)
    r = ref.detach().to(torch.float64)
    assert g.shape == r.shape, f"{what}: shape {tuple(g.shape)} != {tuple(r.shape)}"
    scale = float(r.abs().max()) if r.numel() else 0.0
    err = float((g - r).abs().max()) if r.numel() else 0.0
    assert err <= rtol * scale + 1e-300, f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


# --------------------------------------------------------------------------- kl_mc


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_gradcheck(est):
    """torch.autograd.gradcheck (float64) for every mask, log_iw and reduction."""
    name, rev = est
    logq, logp, bmask, wmask, log_iw = _mc_inputs()
    for mk in MASKS:
        for iw in (None, log_iw):
            for red in REDUCTIONS:
                kw = dict(reverse=rev, reduction=red, mask=_mask(mk, bmask, wmask), log_iw=iw)

                def f(x, kw=kw):
                    return ft.kl_mc(x, logp, name, **kw)

                assert torch.autograd.gradcheck(f, (logq,)), (mk, iw is not None, red)


@pytest.mark.parametrize("axis", [0, 1, -1, (0, 2), (2, 0, 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mc_gradcheck_axis(axis, reduction):
    """A reduction over some axes: a per-row upstream gradient, broadcast."""
    logq, logp, _, wmask, log_iw = _mc_inputs((3, 4, 5), seed=1)
    for mask in (None, wmask):

        def f(x, mask=mask):
            return ft.kl_mc(x, logp, "k3", axis=axis, reduction=reduction, mask=mask,
                            log_iw=log_iw)

        assert torch.autograd.gradcheck(f, (logq,))
        v = f(logq)
        ref = fastkl.kl_mc(_np(logq), _np(logp), "k3", axis=axis, reduction=reduction,
                           mask=_np(mask), log_iw=_np(log_iw))
        assert v.shape == np.shape(ref) and v.dtype == torch.float64
        assert np.array_equal(v.detach().numpy(), ref)


@pytest.mark.parametrize("backend", fastkl.available_backends())
def test_mc_gradcheck_backends(backend):
    logq, logp, bmask, _, log_iw = _mc_inputs(seed=2)
    for est, rev in ESTIMATORS:
        for red in ("none", "seq-mean-token-mean"):

            def f(x, est=est, rev=rev, red=red):
                return ft.kl_mc(x, logp, est, reverse=rev, reduction=red, mask=bmask,
                                log_iw=log_iw, backend=backend)

            assert torch.autograd.gradcheck(f, (logq,)), (est, rev, red)


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_values_and_grads_equal_numpy_api(est):
    """The value is bit for bit fastkl.kl_mc's (with or without a gradient), the gradient
    kl_mc_grad's; shapes: 0-d for full reductions, the numpy result's otherwise."""
    name, rev = est
    logq, logp, bmask, wmask, log_iw = _mc_inputs((5, 67), seed=3)
    for mk in MASKS:
        mask = _mask(mk, bmask, wmask)
        for red in REDUCTIONS:
            kw = dict(reverse=rev, reduction=red, mask=_np(mask), log_iw=_np(log_iw))
            ref = fastkl.kl_mc(_np(logq), _np(logp), name, **kw)
            _, gref = fastkl.kl_mc_grad(_np(logq), _np(logp), name, **kw)
            v = ft.kl_mc(logq, logp, name, reverse=rev, reduction=red, mask=mask,
                         log_iw=log_iw)
            assert v.requires_grad and v.dtype == torch.float64
            assert v.shape == np.shape(ref), (mk, red)
            assert np.array_equal(v.detach().numpy(), ref, equal_nan=True), (mk, red)
            (g,) = torch.autograd.grad(v.sum(), logq)
            assert np.array_equal(g.numpy(), gref), (mk, red)
            with torch.no_grad():
                v0 = ft.kl_mc(logq, logp, name, reverse=rev, reduction=red, mask=mask,
                              log_iw=log_iw)
            assert not v0.requires_grad
            assert np.array_equal(v0.numpy(), ref, equal_nan=True), (mk, red)


@pytest.mark.parametrize("dtype", list(LOW), ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_low_precision_vs_torch_float64(dtype, est):
    """float32/bfloat16/float16 inputs: value and gradient in the input dtype, close to the
    torch formula differentiated by torch in float64 at the same (rounded) inputs."""
    name, rev = est
    logq, logp, bmask, wmask, log_iw = _mc_inputs((4, 40), seed=4, dtype=dtype)
    for mk in MASKS:
        mask = _mask(mk, bmask, wmask)
        for iw in (None, log_iw):
            for red in REDUCTIONS:
                what = f"{dtype} {name} rev={rev} mask={mk} iw={iw is not None} {red}"
                v = ft.kl_mc(logq, logp, name, reverse=rev, reduction=red, mask=mask, log_iw=iw)
                go = torch.linspace(0.5, 1.5, v.numel(), dtype=torch.float64).reshape(v.shape)
                (g,) = torch.autograd.grad(v, logq, go.to(dtype))
                assert v.dtype == dtype and g.dtype == dtype, what
                q64 = logq.detach().double().requires_grad_()
                iw64 = None if iw is None else iw.double()
                ref = _mc_formula(q64, logp.double(), name, rev, red, mask, iw64)
                (gref,) = torch.autograd.grad(ref, q64, go)
                _close(v, ref, LOW[dtype], what + " value")
                _close(g, gref, LOW[dtype], what + " grad")


def test_mc_upstream_gradient_and_graph():
    """kl_mc inside a larger graph: a loss built on it, retain_graph, accumulation into
    .grad, mixed dtypes (the gradient comes back in logq's dtype)."""
    logq, logp, bmask, _, _ = _mc_inputs((3, 8), seed=5)
    x = logq.detach().clone().requires_grad_()
    y = 2.0 * x + 1.0
    kl = ft.kl_mc(y, logp, "k3", reduction="none", mask=bmask)
    loss = (kl * torch.arange(24.0, dtype=torch.float64).reshape(3, 8)).sum()
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    assert torch.equal(x.grad, 2 * g1)
    y64 = (2.0 * x + 1.0).detach().requires_grad_()
    ref = (_mc_formula(y64, logp, "k3", False, "none", bmask)
           * torch.arange(24.0, dtype=torch.float64).reshape(3, 8)).sum()
    (gref,) = torch.autograd.grad(ref, y64)
    _close(g1, 2.0 * gref, 1e-12, "chain rule")

    q32 = logq.detach().float().requires_grad_()
    v = ft.kl_mc(q32, logp, "k3")  # float32 logq, float64 logp: a float64 result
    v.backward()
    assert v.dtype == torch.float64 and q32.grad.dtype == torch.float32


def test_mc_no_copy_of_float_inputs(monkeypatch):
    """float32/float64 tensors (contiguous or strided) reach the kernels as views."""
    seen = {}
    real = fastkl.kl_mc_grad

    def spy(logq, logp, *args, **kw):
        seen["q"], seen["p"] = logq, logp
        return real(logq, logp, *args, **kw)

    monkeypatch.setattr(fastkl, "kl_mc_grad", spy)
    for dtype in (torch.float32, torch.float64):
        base_q = torch.randn(6, 8, dtype=dtype)
        base_p = torch.randn(6, 8, dtype=dtype)
        for q, p in ((base_q, base_p), (base_q.t(), base_p.t()), (base_q[:, ::2], base_p[:, ::2])):
            q = q.detach().requires_grad_()
            ft.kl_mc(q, p, "k3").backward()
            assert np.shares_memory(seen["q"], base_q.numpy())
            assert np.shares_memory(seen["p"], base_p.numpy())


def test_mc_empty_and_0d():
    q = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    v = ft.kl_mc(q, torch.zeros(0, dtype=torch.float64))
    v.backward()
    assert v.shape == () and torch.isnan(v) and q.grad.shape == (0,)
    q = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(-1.5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ft.kl_mc(x, p, "k3", reduction="none"), (q,))
    assert torch.autograd.gradcheck(lambda x: ft.kl_mc(x, p, "k2"), (q,))


def test_mc_clamps():
    """Clamps with a gradient: gradcheck (float64) for both clamp orders, with log_iw and
    iw_grad; the values equal the numpy API's; the clamps bite on these inputs."""
    logq, logp, bmask, wmask, log_iw = _mc_inputs((3, 8), seed=6)
    clamps = dict(clamp_log_ratio=(-0.5, 0.5), clamp_value=(0.0, 0.3))
    ref = fastkl.kl_mc(_np(logq), _np(logp), "k3", mask=_np(bmask), **clamps)
    with torch.no_grad():
        assert float(ft.kl_mc(logq, logp, "k3", mask=bmask, **clamps)) == ref
    assert float(ft.kl_mc(logq.detach(), logp, "k3", mask=bmask, **clamps)) == ref
    _, g = fastkl.kl_mc_grad(_np(logq), _np(logp), "k3", **clamps)
    assert (g == 0).any() and (g != 0).any()
    old = logq.detach() - log_iw  # iw_grad: log_iw = logq - old (its value follows logq)
    for order in ("term", "weighted"):
        for iw, iw_grad in ((None, False), (log_iw, False), ("from logq", True)):
            if order == "weighted" and iw_grad:  # NeMo-RL's detached weight: not gradcheck's
                continue
            def f(x, order=order, iw=iw, iw_grad=iw_grad):
                liw = (x - old).detach() if iw_grad else iw
                return ft.kl_mc(x, logp, "k3", mask=wmask, log_iw=liw, clamp_order=order,
                                iw_grad=iw_grad, reduction="seq-mean-token-mean", **clamps)
            assert torch.autograd.gradcheck(f, (logq,)), (order, iw is not None, iw_grad)


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_mc_gradcheck_all_inputs(est):
    """Gradients with respect to logq, logp and log_iw together (float64 gradcheck), with
    and without clamps."""
    logq, logp, _, wmask, log_iw = _mc_inputs((3, 7), seed=8)
    p = logp.clone().requires_grad_()
    w = log_iw.clone().requires_grad_()
    # ("weighted" with a log-ratio clamp holds the weight fixed where that clamp bites, as
    # NeMo-RL does: not the derivative of the value there, so not gradcheck's business)
    for clamps, order in (({}, "term"), ({}, "weighted"),
                          (dict(clamp_log_ratio=(-0.6, 0.7), clamp_value=(-0.2, 0.25)), "term"),
                          (dict(clamp_value=(-0.2, 0.25)), "weighted")):
        def f(a, b, c, clamps=clamps, order=order):
            return ft.kl_mc(a, b, est[0], reverse=est[1], mask=wmask, log_iw=c,
                            clamp_order=order, reduction="token-mean", **clamps)
        assert torch.autograd.gradcheck(f, (logq, p, w)), (clamps, order)


def test_mc_log_iw_from_logq_is_iw_grad():
    """A log_iw built from logq (TRL: logq - old) is differentiated by autograd into logq:
    the same gradient as iw_grad=True with the detached weights."""
    logq, logp, bmask, _, log_iw = _mc_inputs((3, 8), seed=9)
    old = logq.detach() - log_iw
    v = ft.kl_mc(logq, logp, mask=bmask, log_iw=logq - old)
    (g1,) = torch.autograd.grad(v, logq)
    v2 = ft.kl_mc(logq, logp, mask=bmask, log_iw=(logq - old).detach(), iw_grad=True)
    (g2,) = torch.autograd.grad(v2, logq)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)
    assert float(v) == float(v2)


def test_mc_straight_through():
    """grad_estimator="k2" with verl's low_var_kl clamps: the value of the clamped k3, the
    gradient of k2 (verl's "low_var_kl+")."""
    logq, logp, bmask, _, _ = _mc_inputs((3, 8), seed=10)
    kw = dict(clamp_log_ratio=(-20, 20), clamp_value=(-10, 10))
    v = ft.kl_mc(logq, logp, "k3", mask=bmask, reduction="token-mean", grad_estimator="k2",
                 **kw)
    (g,) = torch.autograd.grad(v, logq)
    x = logq.detach().clone().requires_grad_()
    b = 0.5 * (x - logp) ** 2
    d = (logp - x).clamp(-20, 20)
    fwd = (torch.exp(d) - d - 1).clamp(-10, 10)
    per = b - b.detach() + fwd.detach()
    ref = (per * bmask).sum() / bmask.sum()
    (gref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, gref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(v, ref.detach(), rtol=1e-12, atol=0.0)


def test_mc_gradients_it_does_not_compute_raise():
    logq, logp, _, wmask, log_iw = _mc_inputs((3, 8), seed=7)
    with pytest.raises(NotImplementedError, match="mask"):
        ft.kl_mc(logq, logp, mask=wmask.clone().requires_grad_())
    with pytest.raises(ValueError, match="grad_estimator"):
        ft.kl_mc(logq, logp, grad_estimator="k9")
    with pytest.raises(ValueError, match="grad_estimator"):  # checked without a gradient too
        ft.kl_mc(logq.detach(), logp, grad_estimator="k9")
    with torch.no_grad():  # no gradient wanted: nothing to refuse
        ft.kl_mc(logq, logp, mask=wmask.clone().requires_grad_())
    y = logq.detach().clone().requires_grad_()
    y.sum().backward()
    # a double backward is refused, never silently zero
    v = ft.kl_mc(logq, logp)
    (g,) = torch.autograd.grad(v, logq, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), logq)


def test_mc_argument_errors_pass_through():
    logq, logp, _, _, _ = _mc_inputs((3, 8))
    with pytest.raises(ValueError, match="estimator"):
        ft.kl_mc(logq, logp, "k4")
    with pytest.raises(ValueError, match="reduction"):
        ft.kl_mc(logq, logp, reduction="avg")
    with pytest.raises(ValueError, match="2-D"):
        ft.kl_mc(logq[0], logp[0], reduction="token-mean")
    with pytest.raises(TypeError, match="numpy arrays use fastkl.kl_mc"):
        ft.kl_mc(_np(logq), _np(logp))
    # one tensor and one array is fine: the array is a constant
    assert torch.equal(ft.kl_mc(logq, _np(logp)), ft.kl_mc(logq, logp))


# --------------------------------------------------------------------------- kl_logits


def _logits_inputs(shape=(3, 4, 7), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    b = 0.7 * a + torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype).requires_grad_()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_logits_gradcheck(reduction, axis):
    a, b = _logits_inputs()
    lead = tuple(n for i, n in enumerate(a.shape) if i != axis % 3)
    g = torch.Generator().manual_seed(1)
    masks = [None, torch.rand(lead, generator=g) < 0.6,
             torch.where(torch.rand(lead, generator=g) < 0.3, 0.0, 2 * torch.rand(lead))]
    for mask in masks:
        for temperature in (1.0, 0.7, 2.5):

            def f(y, mask=mask, temperature=temperature):
                return ft.kl_logits(a, y, temperature=temperature, axis=axis, mask=mask,
                                    reduction=reduction)

            assert torch.autograd.gradcheck(f, (b,)), (mask, temperature)
            v = f(b)
            ref = fastkl.kl_logits(_np(a), _np(b), temperature=temperature, axis=axis,
                                   mask=_np(mask), reduction=reduction)
            assert v.shape == np.shape(ref) and v.dtype == torch.float64
            assert np.array_equal(v.detach().numpy(), ref, equal_nan=True)
            with torch.no_grad():
                assert np.array_equal(f(b).numpy(), ref, equal_nan=True)


@pytest.mark.parametrize("backend", fastkl.available_backends())
def test_logits_gradcheck_backends(backend):
    a, b = _logits_inputs((5, 33), seed=2)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda y, r=reduction: ft.kl_logits(a, y, temperature=1.3, reduction=r,
                                                backend=backend), (b,))


@pytest.mark.parametrize("dtype", list(LOW), ids=["f32", "bf16", "f16"])
def test_logits_low_precision_vs_torch_float64(dtype):
    a, b = _logits_inputs((2, 6, 50), seed=3, dtype=dtype)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    for reduction in ("none", "mean", "sum"):
        for temperature in (1.0, 1.8):
            what = f"{dtype} {reduction} T={temperature}"
            v = ft.kl_logits(a, b, temperature=temperature, mask=mask, reduction=reduction)
            go = torch.linspace(0.5, 1.5, v.numel(), dtype=torch.float64).reshape(v.shape)
            (g,) = torch.autograd.grad(v, b, go.to(dtype))
            assert v.dtype == dtype and g.dtype == dtype, what
            b64 = b.detach().double().requires_grad_()
            ref = _kl_logits_formula(a.double(), b64, temperature, -1, mask, reduction)
            (gref,) = torch.autograd.grad(ref, b64, go)
            _close(v, ref, LOW[dtype], what + " value")
            _close(g, gref, LOW[dtype], what + " grad")


def test_logits_gradients_it_does_not_compute_raise():
    a, b = _logits_inputs()
    x = a.clone().requires_grad_()
    for f in (ft.kl_logits, ft.jsd_logits):
        with pytest.raises(NotImplementedError, match="log_probs"):
            f(torch.log_softmax(a, -1), torch.log_softmax(b, -1), log_probs=True)
        with pytest.raises(NotImplementedError, match="log_probs"):
            f(torch.log_softmax(x, -1), b.detach(), log_probs=True)
        with pytest.raises(NotImplementedError, match="mask"):
            f(a, b, mask=torch.ones(3, 4, dtype=torch.float64, requires_grad=True))
    with pytest.raises(NotImplementedError, match="log_probs"):
        ft.entropy_logits(torch.log_softmax(x, -1), log_probs=True)
    with pytest.raises(NotImplementedError, match="mask"):
        ft.entropy_logits(x, mask=torch.ones(3, 4, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        v = ft.kl_logits(torch.log_softmax(a, -1), torch.log_softmax(b, -1), log_probs=True)
    ref = fastkl.kl_logits(_np(a), _np(b))
    np.testing.assert_allclose(v.numpy(), ref, rtol=1e-12, atol=1e-15)
    # the suggested alternative: log-probabilities passed as logits, same value and gradient
    lq = torch.log_softmax(b, -1)
    (g1,) = torch.autograd.grad(ft.kl_logits(a, lq, reduction="sum"), b)
    (g2,) = torch.autograd.grad(ft.kl_logits(a, b, reduction="sum"), b)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)


def test_logits_no_copy(monkeypatch):
    seen = {}
    real = fastkl.kl_logits_grad

    def spy(a, b, **kw):
        seen["a"], seen["b"] = a, b
        return real(a, b, **kw)

    monkeypatch.setattr(fastkl, "kl_logits_grad", spy)
    for dtype in (torch.float32, torch.float64):
        a, b = _logits_inputs(dtype=dtype)
        ft.kl_logits(a, b, reduction="mean").backward()
        assert np.shares_memory(seen["a"], a.numpy())
        assert np.shares_memory(seen["b"], b.detach().numpy())


# --------------------------------------- jsd, entropy, token; both inputs; torch formulas


def _lsm(x, temperature, axis):
    return torch.log_softmax(x / temperature, dim=axis)


def _xlogy_sum(p, u, v, axis):
    """sum p (u - v) over axis, 0 where p == 0 (the -inf entries), as the kernels count it."""
    return torch.where(p == 0, torch.zeros_like(p), p * (u - v)).sum(dim=axis)


def _row_formula(op, a, b, temperature=1.0, axis=-1, beta=0.5, endpoints="mixture"):
    """The per-row value of a logits op written in torch (differentiable by torch)."""
    lp = _lsm(a, temperature, axis)
    if op == "entropy":
        return -_xlogy_sum(lp.exp(), lp, 0.0, axis)
    lq = _lsm(b, temperature, axis)
    if op == "kl" or (endpoints == "kl" and beta == 0.0):
        return _xlogy_sum(lp.exp(), lp, lq, axis)
    if endpoints == "kl" and beta == 1.0:
        return _xlogy_sum(lq.exp(), lq, lp, axis)
    if beta in (0.0, 1.0):
        return 0.0 * (lp + lq).sum(dim=axis)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return (beta * _xlogy_sum(lp.exp(), lp, lm, axis)
            + (1 - beta) * _xlogy_sum(lq.exp(), lq, lm, axis))


def _reduce_formula(rows, mask, reduction):
    w = torch.ones_like(rows) if mask is None else torch.as_tensor(mask).to(rows.dtype)
    wr = torch.where(w != 0, w * rows, torch.zeros_like(rows))
    if reduction == "none":
        return wr
    if reduction == "sum":
        return wr.sum()
    return wr.sum() / w.sum()


# (op, beta, endpoints) of the two-input ops
JSD_CASES = [(beta, ends) for beta in (0.0, 0.3, 1.0) for ends in ("mixture", "kl")]
PAIR_OPS = [("kl", None, None)] + [("jsd", beta, ends) for beta, ends in JSD_CASES]
PAIR_IDS = ["kl"] + [f"jsd-{beta}-{ends}" for beta, ends in JSD_CASES]


def _pair_call(op, beta, ends, a, b, **kw):
    if op == "kl":
        return ft.kl_logits(a, b, **kw)
    return ft.jsd_logits(a, b, beta, endpoints=ends, **kw)


def _pair_numpy(op, beta, ends, a, b, **kw):
    if op == "kl":
        return fastkl.kl_logits(a, b, **kw)
    return fastkl.jsd_logits(a, b, beta, endpoints=ends, **kw)


def _lead_masks(lead, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [None, torch.rand(lead, generator=g) < 0.6,
            torch.where(torch.rand(lead, generator=g) < 0.3, 0.0,
                        2 * torch.rand(lead, generator=g, dtype=torch.float64))]


@pytest.mark.parametrize(("op", "beta", "ends"), PAIR_OPS, ids=PAIR_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_pair_ops_gradcheck_both_inputs(op, beta, ends, reduction):
    """gradcheck w.r.t. logits_p and logits_q together and each alone, every mask kind,
    three temperatures, vocabulary axis last and first; the value equals the numpy API's."""
    a, b = _logits_inputs((3, 4, 7), seed=5)
    a = a.clone().requires_grad_()
    for axis in (-1, 0):
        lead = (3, 4) if axis == -1 else (4, 7)
        for mask in _lead_masks(lead):
            for temperature in (1.0, 0.7):
                kw = dict(temperature=temperature, axis=axis, mask=mask, reduction=reduction)

                def f(x, y, kw=kw):
                    return _pair_call(op, beta, ends, x, y, **kw)

                what = (axis, mask is None or mask.dtype, temperature)
                assert torch.autograd.gradcheck(f, (a, b)), what
                if temperature == 1.0:  # P alone (a fixed Q: the kernel computes d/da only)
                    assert torch.autograd.gradcheck(lambda x, kw=kw: f(x, b.detach(), kw),
                                                    (a,)), what
                ref = _pair_numpy(op, beta, ends, _np(a), _np(b), temperature=temperature,
                                  axis=axis, mask=_np(mask), reduction=reduction)
                assert np.array_equal(f(a, b).detach().numpy(), ref, equal_nan=True), what


@pytest.mark.parametrize("backend", fastkl.available_backends())
def test_new_ops_gradcheck_backends(backend):
    """Every backend's fused kernel passes gradcheck for each op (the other tests use the
    default backend)."""
    a, b = _logits_inputs((5, 33), seed=2)
    a = a.clone().requires_grad_()
    tok = torch.tensor([0, 32, -100, 7, 7])
    kw = dict(temperature=1.3, backend=backend)
    for reduction in ("none", "mean"):
        kw["reduction"] = reduction
        assert torch.autograd.gradcheck(lambda x, y: ft.kl_logits(x, y, **kw), (a, b))
        assert torch.autograd.gradcheck(lambda x, y: ft.jsd_logits(x, y, 0.3, **kw), (a, b))
        assert torch.autograd.gradcheck(lambda x: ft.entropy_logits(x, **kw), (a,))
    assert torch.autograd.gradcheck(
        lambda x: ft.token_logprobs(x, tok, temperature=1.3, backend=backend), (a,))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_entropy_gradcheck(reduction, axis):
    a, _ = _logits_inputs((3, 4, 7), seed=6)
    a = a.requires_grad_()
    lead = (3, 4) if axis == -1 else (3, 7)
    for mask in _lead_masks(lead):
        for temperature in (1.0, 0.6, 3.0):
            kw = dict(temperature=temperature, axis=axis, mask=mask, reduction=reduction)
            assert torch.autograd.gradcheck(lambda x, kw=kw: ft.entropy_logits(x, **kw), (a,))
            ref = fastkl.entropy_logits(_np(a), **dict(kw, mask=_np(mask)))
            assert np.array_equal(ft.entropy_logits(a, **kw).detach().numpy(), ref)


@pytest.mark.parametrize("axis", [-1, 0])
def test_token_logprobs_gradcheck(axis):
    a, _ = _logits_inputs((3, 4, 7), seed=7)
    a = a.requires_grad_()
    g = torch.Generator().manual_seed(2)
    vocab = a.shape[axis]
    lead = (3, 4) if axis == -1 else (4, 7)
    tok = torch.randint(0, vocab, lead, generator=g)
    tok[0, 1] = -100
    tok[1, 2] = 3 % vocab
    for temperature in (1.0, 0.7):
        for ignore, t in ((-100, tok), (5, torch.where(tok == -100, 5, tok))):
            kw = dict(temperature=temperature, axis=axis, ignore_index=ignore)
            assert torch.autograd.gradcheck(lambda x, t=t, kw=kw: ft.token_logprobs(x, t, **kw),
                                            (a,))
            v = ft.token_logprobs(a, t, **kw)
            ref = fastkl.token_logprobs(_np(a), t.numpy(), **kw)
            assert np.array_equal(v.detach().numpy(), ref)
    # an ignored row has value 0 and gradient 0; the others, onehot - softmax
    v = ft.token_logprobs(a, tok, axis=axis)
    (gr,) = torch.autograd.grad(v.sum(), a)
    gr = torch.movedim(gr, axis, -1)
    assert v[0, 1] == 0 and not gr[0, 1].any()
    q = torch.softmax(torch.movedim(a.detach(), axis, -1), -1)
    onehot = torch.nn.functional.one_hot(tok.clamp(min=0), vocab).to(q.dtype)
    keep = (tok != -100)[..., None]
    torch.testing.assert_close(gr, torch.where(keep, onehot - q, 0.0), rtol=1e-12, atol=1e-14)


ALL_OPS = PAIR_OPS + [("entropy", None, None), ("token", None, None)]
ALL_IDS = PAIR_IDS + ["entropy", "token"]


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=["f64", "f32", "bf16", "f16"])
@pytest.mark.parametrize(("op", "beta", "ends"), ALL_OPS, ids=ALL_IDS)
def test_values_and_grads_vs_torch_formula(dtype, op, beta, ends):
    """Value and both gradients (scaled by a non-uniform upstream gradient) against the
    formula written in torch and differentiated by torch in float64 (the low-precision
    inputs rounded first, so only fastkl's arithmetic is measured)."""
    a, b = _logits_inputs((2, 6, 50), seed=8, dtype=dtype)
    a = a.detach().clone().requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, 50, (2, 6), generator=g)
    tok[1, 4] = -100
    rtol = 1e-11 if dtype == torch.float64 else LOW[dtype]
    reductions = ["none"] if op == "token" else ["none", "mean", "sum"]
    for reduction in reductions:
        for temperature in (1.0, 1.8):
            what = f"{dtype} {op} {reduction} T={temperature}"
            a64 = a.detach().double().requires_grad_()
            b64 = b.detach().double().requires_grad_()
            if op == "token":
                v = ft.token_logprobs(b, tok, temperature=temperature)
                lq = _lsm(b64, temperature, -1)
                keep = tok != -100
                ref = torch.where(keep, lq.gather(-1, tok.clamp(min=0)[..., None])[..., 0], 0.0)
                ins, ins64 = (b,), (b64,)
            else:
                kw = dict(temperature=temperature, mask=mask, reduction=reduction)
                if op == "entropy":
                    v = ft.entropy_logits(a, **kw)
                    rows = _row_formula("entropy", a64, None, temperature)
                    ins, ins64 = (a,), (a64,)
                else:
                    v = _pair_call(op, beta, ends, a, b, **kw)
                    rows = _row_formula(op, a64, b64, temperature, beta=beta,
                                        endpoints=ends or "mixture")
                    ins, ins64 = (a, b), (a64, b64)
                ref = _reduce_formula(rows, mask, reduction)
            assert v.dtype == dtype, what
            go = torch.linspace(0.5, 1.5, v.numel(), dtype=torch.float64).reshape(v.shape)
            grads = torch.autograd.grad(v, ins, go.to(dtype))
            refs = torch.autograd.grad(ref, ins64, go, allow_unused=True)
            _close(v, ref, rtol, what + " value")
            for k, (gg, gr) in enumerate(zip(grads, refs, strict=True)):
                assert gg.dtype == dtype, what
                gr = torch.zeros_like(ins64[k]) if gr is None else gr
                _close(gg, gr, rtol, f"{what} grad {k}")


def test_only_the_wanted_gradients_are_computed(monkeypatch):
    """A fixed teacher (or student) costs nothing: the fused call asks only for the gradient
    of the input that requires grad; without any, no gradient call at all."""
    a, b = _logits_inputs()
    calls = []
    for name in ("kl_logits_grad", "jsd_logits_grad"):
        real = getattr(fastkl, name)

        def spy(*args, real=real, name=name, **kw):
            calls.append((name, kw["wrt"]))
            return real(*args, **kw)

        monkeypatch.setattr(fastkl, name, spy)
    x = a.clone().requires_grad_()
    ft.kl_logits(x, b.detach(), reduction="sum").backward()
    ft.kl_logits(a, b, reduction="sum").backward()
    ft.jsd_logits(x, b, reduction="sum").backward()
    with torch.no_grad():
        ft.jsd_logits(x, b)
    ft.jsd_logits(a, b.detach())
    assert calls == [("kl_logits_grad", "p"), ("kl_logits_grad", "q"),
                     ("jsd_logits_grad", "both")]
    assert b.grad is not None and x.grad is not None


def test_no_grad_path_returns_plain_tensors(monkeypatch):
    a, b = _logits_inputs()
    tok = torch.zeros(3, 4, dtype=torch.int64)

    def boom(*args, **kw):
        raise AssertionError("a gradient kernel ran without a gradient wanted")

    for name in ("kl_logits_grad", "jsd_logits_grad", "entropy_logits_grad",
                 "token_logprobs_grad"):
        monkeypatch.setattr(fastkl, name, boom)
    x = a.clone().requires_grad_()
    with torch.no_grad():
        outs = [ft.kl_logits(x, b), ft.jsd_logits(x, b, 0.2), ft.entropy_logits(x),
                ft.token_logprobs(x, tok)]
    refs = [fastkl.kl_logits(_np(a), _np(b)), fastkl.jsd_logits(_np(a), _np(b), 0.2),
            fastkl.entropy_logits(_np(a)), fastkl.token_logprobs(_np(a), tok.numpy())]
    for v, ref in zip(outs, refs, strict=True):
        assert v.grad_fn is None and not v.requires_grad
        assert np.array_equal(v.numpy(), ref)


def test_minus_inf_logits_have_zero_gradient():
    """Entries with -inf logits (zero probability, in both P and Q) get gradient exactly 0,
    never NaN, and the other entries the gradient of the problem without them."""
    a, b = _logits_inputs((3, 9), seed=9)
    a = a.detach().clone()
    b = b.detach().clone()
    a[0, [1, 4]] = -math.inf
    b[0, [1, 4]] = -math.inf
    a[1, 0] = -math.inf  # P = 0 there, Q > 0
    keep = torch.ones(9, dtype=torch.bool)
    keep[[1, 4]] = False
    cases = [("kl", None, None), ("jsd", 0.3, "mixture"), ("jsd", 0.0, "kl"),
             ("entropy", None, None)]
    for op, beta, ends in cases:
        x = a.clone().requires_grad_()
        y = b.clone().requires_grad_()
        if op == "entropy":
            v = ft.entropy_logits(x)
            ins = (x,)
        else:
            v = _pair_call(op, beta, ends, x, y)
            ins = (x, y)
        grads = torch.autograd.grad(v.sum(), ins)
        for gr in grads:
            assert torch.isfinite(gr).all(), op
            assert not gr[0, ~keep].any(), op
        # row 0 without its -inf entries: the same value and gradients
        x0 = a[0, keep].clone().requires_grad_()
        y0 = b[0, keep].clone().requires_grad_()
        v0 = ft.entropy_logits(x0) if op == "entropy" else _pair_call(op, beta, ends, x0, y0)
        g0 = torch.autograd.grad(v0, (x0,) if op == "entropy" else (x0, y0))
        torch.testing.assert_close(v[0], v0, rtol=1e-13, atol=1e-15)
        for gr, gr0 in zip(grads, g0, strict=True):
            torch.testing.assert_close(gr[0, keep], gr0, rtol=1e-12, atol=1e-15)
        # row 1: P = 0 at entry 0, so d/d logits_p is 0 there
        assert grads[0][1, 0] == 0
    # the token log-prob of a row with -inf logits: 0 gradient at the -inf entries
    x = b.clone().requires_grad_()
    (gr,) = torch.autograd.grad(ft.token_logprobs(x, torch.tensor([0, 2, 3])).sum(), x)
    assert torch.isfinite(gr).all() and not gr[0, ~keep].any()


def test_nan_rows_have_nan_gradients_only_there():
    a, b = _logits_inputs((3, 9), seed=10)
    a = a.detach().clone()
    a[1, 3] = math.nan
    for op, beta, ends in [("kl", None, None), ("jsd", 0.4, "mixture"), ("entropy", None, None)]:
        x = a.clone().requires_grad_()
        y = b.detach().clone().requires_grad_()
        v = ft.entropy_logits(x) if op == "entropy" else _pair_call(op, beta, ends, x, y)
        assert torch.isnan(v[1]) and torch.isfinite(v[[0, 2]]).all(), op
        ins = (x,) if op == "entropy" else (x, y)
        for gr in torch.autograd.grad(v.sum(), ins):
            assert torch.isnan(gr[1]).all() and torch.isfinite(gr[[0, 2]]).all(), op
        # a masked-out NaN row: excluded from the mean, zero gradient
        m = torch.tensor([True, False, True])
        kw = dict(mask=m, reduction="mean")
        vm = ft.entropy_logits(x, **kw) if op == "entropy" else _pair_call(op, beta, ends, x, y,
                                                                             **kw)
        assert torch.isfinite(vm)
        for gr in torch.autograd.grad(vm, ins):
            assert not gr[1].any() and torch.isfinite(gr).all(), op
    x = a.clone().requires_grad_()
    v = ft.token_logprobs(x, torch.tensor([0, 1, -100]))
    (gr,) = torch.autograd.grad(v.sum(), x)
    assert torch.isnan(v[1]) and torch.isnan(gr[1]).all() and not gr[2].any()


def test_empty_option_and_all_masked_mean():
    a, b = _logits_inputs()
    x = a.clone().requires_grad_()
    none = torch.zeros(3, 4, dtype=torch.bool)
    for f in (lambda **kw: ft.kl_logits(x, b, **kw), lambda **kw: ft.jsd_logits(x, b, **kw),
              lambda **kw: ft.entropy_logits(x, **kw)):
        assert torch.isnan(f(mask=none, reduction="mean"))
        v = f(mask=none, reduction="mean", empty=0.0)
        assert v.item() == 0.0
        for gr in torch.autograd.grad(v, (x, b), allow_unused=True):
            assert gr is None or not gr.any()


# --------------------------------------------------------------------------- devices


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device (no GPU needed to test the check)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _fake_cuda(t):
    return t.detach().as_subclass(_FakeCuda)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize("make", [_fake_cuda, _meta], ids=["fake-cuda", "meta"])
@pytest.mark.parametrize("arg", ["logq", "logp", "mask", "log_iw"])
def test_mc_non_cpu_tensor_is_a_type_error(make, arg):
    logq, logp, bmask, _, log_iw = _mc_inputs((3, 8))
    args = dict(logq=logq, logp=logp, mask=bmask, log_iw=log_iw)
    args[arg] = make(args[arg])
    dev = "cuda" if make is _fake_cuda else "meta"
    with pytest.raises(TypeError, match=rf"{arg} is a {dev}.*CPU.*{arg}\.cpu\(\)"):
        ft.kl_mc(args["logq"], args["logp"], mask=args["mask"], log_iw=args["log_iw"])
    with torch.no_grad(), pytest.raises(TypeError, match="CPU"):  # with no gradient too
        ft.kl_mc(args["logq"], args["logp"], mask=args["mask"], log_iw=args["log_iw"])


@pytest.mark.parametrize("make", [_fake_cuda, _meta], ids=["fake-cuda", "meta"])
@pytest.mark.parametrize("arg", ["logits_p", "logits_q", "mask"])
def test_logits_non_cpu_tensor_is_a_type_error(make, arg):
    a, b = _logits_inputs()
    args = dict(logits_p=a, logits_q=b, mask=torch.ones(3, 4, dtype=torch.bool))
    args[arg] = make(args[arg])
    with pytest.raises(TypeError, match=rf"{arg} is a .*CPU.*{arg}\.cpu\(\)"):
        ft.kl_logits(args.pop("logits_p"), args.pop("logits_q"), **args)


@pytest.mark.parametrize("make", [_fake_cuda, _meta], ids=["fake-cuda", "meta"])
@pytest.mark.parametrize("func", ["jsd_logits", "entropy_logits", "token_logprobs"])
def test_new_logits_ops_non_cpu_tensor_is_a_type_error(make, func):
    a, b = _logits_inputs()
    tok = torch.zeros(3, 4, dtype=torch.int64)
    calls = {"jsd_logits": lambda x, y, m, t: ft.jsd_logits(x, y, mask=m),
             "entropy_logits": lambda x, y, m, t: ft.entropy_logits(y, mask=m),
             "token_logprobs": lambda x, y, m, t: ft.token_logprobs(y, t)}[func]
    args = dict(x=a, y=b, m=torch.ones(3, 4, dtype=torch.bool), t=tok)
    names = dict(x="logits_p", y="logits" if func != "jsd_logits" else "logits_q", m="mask",
                 t="tokens")
    used = {"jsd_logits": "xym", "entropy_logits": "ym", "token_logprobs": "yt"}[func]
    for k in used:
        bad = dict(args)
        bad[k] = make(args[k])
        with pytest.raises(TypeError, match=rf"{names[k]} is a .*CPU.*{names[k]}\.cpu\(\)"):
            calls(**bad)
        with torch.no_grad(), pytest.raises(TypeError, match="CPU"):
            calls(**bad)


def test_new_logits_ops_need_tensors():
    a, b = _logits_inputs()
    with pytest.raises(TypeError, match="torch tensor"):
        ft.entropy_logits(_np(a))
    with pytest.raises(TypeError, match="torch tensor"):
        ft.token_logprobs(_np(a), np.zeros((3, 4), np.int64))
    with pytest.raises(TypeError, match="torch tensors"):
        ft.jsd_logits(_np(a), _np(b))
    with pytest.raises(ValueError, match="beta"):
        ft.jsd_logits(a, b, 1.5)
    with pytest.raises(ValueError, match="endpoints"):
        ft.jsd_logits(a, b, endpoints="reverse")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_real_cuda_tensor_is_a_type_error():  # pragma: no cover - CPU machines
    q = torch.randn(4, device="cuda", requires_grad=True)
    with pytest.raises(TypeError, match="CPU"):
        ft.kl_mc(q, q.detach())
    with pytest.raises(TypeError, match="CPU"):
        ft.kl_logits(q.detach(), q)
    for f in (lambda: ft.jsd_logits(q.detach(), q), lambda: ft.entropy_logits(q),
              lambda: ft.token_logprobs(q, torch.zeros((), dtype=torch.int64))):
        with pytest.raises(TypeError, match="CPU"):
            f()


# --------------------------------------------------------------------------- import


def test_import_fastkl_does_not_import_torch():
    """``import fastkl`` (and ``import fastkl.torch``) leave torch unimported; the first call
    of a fastkl.torch function imports it."""
    code = ("import sys, fastkl, fastkl.torch\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
            "import torch\n"
            "fastkl.torch.kl_mc(torch.zeros(3), torch.zeros(3))\n"
            "print('ok')\n")
    env = dict(os.environ)
    path = [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_readme_torch_example_runs():
    """The README's torch example (fenced ```py, so that test_readme.py, which runs the
    ```python blocks, does not need torch) runs and fills the gradients."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists():  # pragma: no cover - tests run from a checkout
        pytest.skip("README.md not found beside tests/")
    blocks = re.findall(r"```py\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "the README lost its torch example"
    ns: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md py block {i}", "exec"), ns)
    assert ns["logq"].grad is not None and ns["student"].grad is not None
