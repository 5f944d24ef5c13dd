"""torch autograd for fastkl (issue 13): ``kl_mc`` and ``kl_logits`` on torch CPU tensors,
returning torch tensors in the autograd graph.

The forward pass is fastkl's (float64 accumulation); when a gradient is wanted it runs the
fused value-and-gradient kernel once (``fastkl.kl_mc_grad`` / ``fastkl.kl_logits_grad``) and
keeps the gradient for the backward pass, which only scales it by the upstream gradient.

What is differentiated:

* ``kl_mc``: ``logq`` (the policy being trained), ``logp`` and ``log_iw``, each where it
  requires grad, with every option of ``fastkl.kl_mc_grad`` (clamps, ``clamp_order``,
  ``grad_estimator``, ``iw_grad``); a weight ``mask`` that requires grad raises
  ``NotImplementedError`` rather than being detached behind the user's back.
* ``kl_logits``: ``logits_q``, the student's logits of KL(P||Q) in distillation; a
  ``logits_p`` (teacher) that requires grad raises ``NotImplementedError``.

Options the fused kernels cannot differentiate yet (``log_probs=True`` of ``kl_logits``)
raise ``NotImplementedError`` when a gradient is wanted; without one (no input requires
grad, or under ``torch.no_grad()``) every option of the numpy API works. Gradients are
first-order only (a double backward raises).

Tensors must be on the CPU (fastkl computes there): a CUDA, meta or other device tensor is a
``TypeError``. float32/float64 tensors are read in place (``tensor.detach().numpy()``, no
copy); bfloat16/float16 ones are widened to float32 for the kernels, and results and gradients
come back in the input dtype.

``torch`` is imported on first use: ``import fastkl`` (and ``import fastkl.torch``) never
imports it.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

import fastkl

ArrayLike = Any

_FUNCTIONS: dict[str, Any] = {}


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------- conversions


def _is_tensor(torch, x) -> bool:
    return isinstance(x, torch.Tensor)


def _check_device(torch, x, name: str) -> None:
    dev = x.device
    if dev.type != "cpu":
        raise TypeError(
            f"{name} is a {dev} tensor: fastkl computes on the CPU; move it there with "
            f"{name}.cpu() (the result and the gradient then live on the CPU too)")
    if x.layout != torch.strided:
        raise TypeError(f"{name} is a {x.layout} tensor: fastkl needs a dense (strided) one; "
                        f"use {name}.to_dense()")


def _as_numpy(torch, x, name: str):
    """A tensor as a numpy array for the kernels: a view for float32/float64 (and bool or
    integer masks), a float32 copy for bfloat16/float16. Anything else is passed through (the
    numpy API validates it)."""
    if not _is_tensor(torch, x):
        return x
    _check_device(torch, x, name)
    t = x.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    elif t.is_complex():
        t = t.resolve_conj()
    return t.resolve_neg().numpy()


def _wants_grad(torch, x) -> bool:
    return _is_tensor(torch, x) and x.requires_grad and torch.is_grad_enabled()


def _no_grad_for(torch, func: str, x, name: str, hint: str) -> None:
    if _wants_grad(torch, x):
        raise NotImplementedError(
            f"fastkl.torch.{func} does not differentiate {name}, which requires grad: {hint}")


def _out_dtype(torch, func: str, a, b, names):
    dts = [x.dtype for x in (a, b) if _is_tensor(torch, x)]
    if not dts:
        raise TypeError(f"fastkl.torch.{func} takes torch tensors ({names[0]}, {names[1]}); "
                        f"for numpy arrays use fastkl.{func}")
    out = dts[0] if len(dts) == 1 else torch.promote_types(*dts)
    if not out.is_floating_point:
        raise TypeError(f"fastkl.torch.{func}: {names[0]} and {names[1]} must be floating "
                        f"tensors, got {', '.join(str(d) for d in dts)}")
    return out


def _to_tensor(torch, value, dtype):
    """A fastkl result (a Python float or a numpy array) as a CPU tensor of ``dtype``."""
    a = np.asarray(value)
    if not a.dtype.isnative or not a.flags.writeable:
        a = a.astype(a.dtype.newbyteorder("="))
    return torch.from_numpy(a).to(dtype)


def _normal_axes(axis, ndim: int) -> tuple[int, ...] | None:
    """Sorted non-negative axes (the numpy API has already validated them), None for all."""
    if axis is None:
        return None
    items = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(operator.index(a) % ndim for a in items))


# --------------------------------------------------------------------------- autograd


class _Saved:
    """What the backward pass needs: the fused gradient, the shape the upstream gradient is
    viewed as to broadcast against it, and the dtype of the differentiated input."""

    __slots__ = ("grad", "go_shape", "dtype")


def _functions() -> dict[str, Any]:
    """The autograd Functions, created on first use (torch is imported then)."""
    if _FUNCTIONS:
        return _FUNCTIONS
    torch = _torch()
    from torch.autograd.function import once_differentiable

    def _backward(saved: _Saved, grad_output):
        g = saved.grad
        go = grad_output.reshape(saved.go_shape).to(g.dtype)
        return (g * go).to(saved.dtype)

    class FastklKLMC(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logq, logp, log_iw, call):
            value, saved = call()
            ctx.fastkl_saved = saved
            return value

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_output):
            saved = ctx.fastkl_saved  # {input index: _Saved}
            return tuple(None if k not in saved else _backward(saved[k], grad_output)
                         for k in range(3)) + (None,)

    class FastklKLLogits(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits_q, call):
            value, saved = call()
            ctx.fastkl_saved = saved
            return value

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_output):
            return _backward(ctx.fastkl_saved, grad_output), None

    _FUNCTIONS.update(kl_mc=FastklKLMC, kl_logits=FastklKLLogits)
    return _FUNCTIONS


# --------------------------------------------------------------------------- public API


def kl_mc(
    logq,
    logp,
    estimator: str = "k3",
    *,
    reverse: bool = False,
    reduction: str = "mean",
    axis: int | tuple[int, ...] | None = None,
    mask=None,
    log_iw=None,
    clamp_log_ratio: tuple[float, float] | None = None,
    clamp_value: tuple[float, float] | None = None,
    clamp_order: str = "term",
    grad_estimator: str | None = None,
    iw_grad: bool = False,
    backend: str | None = None,
    norm: float | None = None,
    empty_rows: str = "skip",
    empty: float = math.nan,
    denominator: float | None = None,
):
    """``fastkl.kl_mc`` on torch CPU tensors, differentiable with respect to ``logq``,
    ``logp`` and ``log_iw``.

    Same arguments and semantics as ``fastkl.kl_mc`` / ``fastkl.kl_mc_grad`` (NaN
    propagating; clamps and ``clamp_order``, ``norm``, ``empty_rows``, ``empty`` and
    ``denominator`` included). Returns a tensor of the inputs' dtype (promoted if ``logq``
    and ``logp`` differ): 0-d for a full reduction ("mean"/"sum" with ``axis=None`` and the
    RL reductions), otherwise shaped like the numpy API's result. Accumulation is float64
    as in fastkl; the result is then rounded to the dtype.

    For each of ``logq``, ``logp``, ``log_iw`` that requires grad (with grad mode on) the
    forward pass runs the fused ``fastkl.kl_mc_grad`` kernel (``wrt=`` that input; one pass
    for ``logq`` alone) and the backward pass multiplies its gradient by the upstream one.
    The derivative is that of ``kl_mc_grad``: clamps pass no gradient where they bite,
    ``grad_estimator`` makes it straight-through, and ``iw_grad=True`` lets it flow through
    ``exp(log_iw)`` into ``logq`` (for a ``log_iw`` that does not itself carry ``logq``'s
    graph; one that does, e.g. ``logq - old.detach()``, gets that gradient from autograd).
    A weight ``mask`` that requires grad raises ``NotImplementedError`` (detach it).

    Raises ``TypeError`` for a tensor that is not on the CPU or not dense.
    """
    torch = _torch()
    for x, name in ((logq, "logq"), (logp, "logp"), (mask, "mask"), (log_iw, "log_iw")):
        if _is_tensor(torch, x):
            _check_device(torch, x, name)
    out_dtype = _out_dtype(torch, "kl_mc", logq, logp, ("logq", "logp"))
    _no_grad_for(torch, "kl_mc", mask, "mask", "pass mask.detach()")
    q = _as_numpy(torch, logq, "logq")
    p = _as_numpy(torch, logp, "logp")
    m = _as_numpy(torch, mask, "mask")
    iw = _as_numpy(torch, log_iw, "log_iw")
    kw = dict(reverse=reverse, reduction=reduction, axis=axis, mask=m, log_iw=iw,
              clamp_log_ratio=clamp_log_ratio, clamp_value=clamp_value,
              clamp_order=clamp_order, backend=backend, norm=norm, empty_rows=empty_rows,
              empty=empty, denominator=denominator)
    wanted = [k for k, x in enumerate((logq, logp, log_iw)) if _wants_grad(torch, x)]
    if not wanted:
        if grad_estimator is not None or iw_grad:  # checked as kl_mc_grad would
            fastkl.kl_mc_grad(np.zeros(1), np.zeros(1), estimator, reverse=reverse,
                              grad_estimator=grad_estimator, iw_grad=iw_grad)
        value = fastkl.kl_mc(q, p, estimator, **kw)
        return _to_tensor(torch, value, out_dtype)

    def call():
        saved: dict[int, _Saved] = {}
        value = None
        for k in wanted:
            x = (logq, logp, log_iw)[k]
            value, grad = fastkl.kl_mc_grad(q, p, estimator, grad_estimator=grad_estimator,
                                            iw_grad=iw_grad, wrt=("logq", "logp", "log_iw")[k],
                                            **kw)
            shape = tuple(x.shape)
            s = _Saved()
            s.grad = torch.from_numpy(grad)
            s.dtype = x.dtype
            red = _normal_axes(axis, len(shape)) if reduction in ("mean", "sum") else None
            if reduction == "none":
                s.go_shape = shape
            elif red is None:
                s.go_shape = (1,) * len(shape)
            else:
                s.go_shape = tuple(1 if i in red else n for i, n in enumerate(shape))
            saved[k] = s
        return _to_tensor(torch, value, out_dtype), saved

    return _functions()["kl_mc"].apply(logq, logp, log_iw, call)


def kl_logits(
    logits_p,
    logits_q,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask=None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
):
    """``fastkl.kl_logits`` (KL(P||Q), ``P = softmax(logits_p / T)``, ``Q = softmax(logits_q
    / T)`` along ``axis``) on torch CPU tensors, differentiable with respect to ``logits_q``.

    Same arguments and semantics as ``fastkl.kl_logits``. Returns a tensor of the inputs'
    dtype: one value per row (the input shape without ``axis``, times the mask weight) for
    ``reduction="none"``, 0-d for "mean"/"sum" (accumulated in float64, then rounded).

    When ``logits_q`` requires grad (and grad mode is on), the forward pass is one fused
    ``fastkl.kl_logits_grad`` call (``d KL / d logits_q = (Q - P) / T`` per row, with the
    reduction's weights) and the backward pass scales it by the upstream gradient.
    ``logits_p`` (the teacher) and ``mask`` must not require grad (``NotImplementedError``),
    nor may ``log_probs=True`` be combined with a gradient (normalised log-probabilities are
    valid logits: pass them with ``log_probs=False``; the value and gradient are the same).

    Raises ``TypeError`` for a tensor that is not on the CPU or not dense.
    """
    torch = _torch()
    for x, name in ((logits_p, "logits_p"), (logits_q, "logits_q"), (mask, "mask")):
        if _is_tensor(torch, x):
            _check_device(torch, x, name)
    out_dtype = _out_dtype(torch, "kl_logits", logits_p, logits_q, ("logits_p", "logits_q"))
    _no_grad_for(torch, "kl_logits", logits_p, "logits_p",
                 "only the gradient with respect to logits_q (the student in distillation) "
                 "has a fused kernel so far; pass logits_p.detach() if the teacher is fixed")
    _no_grad_for(torch, "kl_logits", mask, "mask", "pass mask.detach()")
    a = _as_numpy(torch, logits_p, "logits_p")
    b = _as_numpy(torch, logits_q, "logits_q")
    m = _as_numpy(torch, mask, "mask")
    kw = dict(temperature=temperature, axis=axis, mask=m, reduction=reduction, backend=backend)

    if not _wants_grad(torch, logits_q):
        return _to_tensor(torch, fastkl.kl_logits(a, b, log_probs=log_probs, **kw), out_dtype)
    if not isinstance(log_probs, (bool, np.bool_)):
        raise TypeError(f"log_probs must be a bool, got {type(log_probs).__name__}")
    if log_probs:
        raise NotImplementedError(
            "fastkl.torch.kl_logits: log_probs=True with a gradient is not supported; "
            "normalised log-probabilities are valid logits, so pass them with "
            "log_probs=False (same value, same gradient)")

    def call():
        value, grad = fastkl.kl_logits_grad(a, b, **kw)
        shape = tuple(logits_q.shape)
        saved = _Saved()
        saved.grad = torch.from_numpy(grad)
        saved.dtype = logits_q.dtype
        if reduction == "none":
            ax = operator.index(axis) % len(shape)
            saved.go_shape = tuple(1 if i == ax else n for i, n in enumerate(shape))
        else:
            saved.go_shape = (1,) * len(shape)
        return _to_tensor(torch, value, out_dtype), saved

    return _functions()["kl_logits"].apply(logits_q, call)


__all__ = ["kl_mc", "kl_logits"]
