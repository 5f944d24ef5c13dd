"""fastkl.torch (issue 13): ``kl_mc`` and ``kl_logits`` on torch CPU tensors with autograd.

gradcheck in float64 over every estimator, mask, ``log_iw`` and reduction (the backward pass
is the fused ``kl_mc_grad`` / ``kl_logits_grad`` kernel); values equal to the numpy API's;
float32/bfloat16/float16 gradients against the same formulas written in torch and
differentiated by torch in float64; clamped, straight-through and importance-weight
gradients, and those with respect to logp and log_iw; the errors (non-CPU tensors, gradients
the kernels do not compute); no copies of float32/float64 inputs; and ``import
fastkl`` without torch.
"""

from __future__ import annotations

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
    with pytest.raises(NotImplementedError, match=r"logits_p"):
        ft.kl_logits(a.clone().requires_grad_(), b)
    with pytest.raises(NotImplementedError, match=r"logits_p"):
        ft.kl_logits(a.clone().requires_grad_(), b.detach())
    with pytest.raises(NotImplementedError, match="log_probs"):
        ft.kl_logits(torch.log_softmax(a, -1), torch.log_softmax(b, -1), log_probs=True)
    with pytest.raises(NotImplementedError, match="mask"):
        ft.kl_logits(a, b, mask=torch.ones(3, 4, dtype=torch.float64, requires_grad=True))
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_real_cuda_tensor_is_a_type_error():  # pragma: no cover - CPU machines
    q = torch.randn(4, device="cuda", requires_grad=True)
    with pytest.raises(TypeError, match="CPU"):
        ft.kl_mc(q, q.detach())
    with pytest.raises(TypeError, match="CPU"):
        ft.kl_logits(q.detach(), q)


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
