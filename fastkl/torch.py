"""torch autograd for fastkl (issue 13): ``kl_mc``, ``kl_logits``, ``jsd_logits``,
``entropy_logits`` and ``token_logprobs`` on torch CPU tensors, returning torch tensors in the
autograd graph.

The forward pass is fastkl's (float64 accumulation); when a gradient is wanted it runs the
fused value-and-gradient kernel once (``fastkl.kl_mc_grad``, ``fastkl.kl_logits_grad``, ...) and
keeps the gradient for the backward pass, which only scales it by the upstream gradient.

What is differentiated:

* ``kl_mc``: ``logq`` (the policy being trained), ``logp`` and ``log_iw``, each where it
  requires grad, with every option of ``fastkl.kl_mc_grad`` (clamps, ``clamp_order``,
  ``grad_estimator``, ``iw_grad``); a weight ``mask`` that requires grad raises
  ``NotImplementedError`` rather than being detached behind the user's back.
* ``kl_logits``, ``jsd_logits``: ``logits_p`` and ``logits_q`` (only those that require
  grad are differentiated: a fixed teacher costs nothing); ``entropy_logits`` and
  ``token_logprobs``: ``logits``. Their fused kernel is ``fastkl.backends``' ``logits_grad``
  / ``logits_token_grad`` (``fastkl.kl_logits_grad``, ``jsd_logits_grad``,
  ``entropy_logits_grad``, ``token_logprobs_grad``).

Options the fused kernels cannot differentiate yet (``log_probs=True`` of the logits ops)
raise ``NotImplementedError`` when a gradient is wanted; without one (no input requires
grad, or under ``torch.no_grad()``) every option of the numpy API works. Gradients are
first-order only (a double backward raises).

Tensors must be on the CPU (fastkl computes there): a CUDA, meta or other device tensor is a
``TypeError``. float32/float64 tensors are read in place (``tensor.detach().numpy()``, no
copy); so are float16 ones and, where ``ml_dtypes`` is installed, bfloat16 ones (viewed as
``ml_dtypes.bfloat16``; without it they are widened to a float32 copy): the compiled kernels
widen 16-bit inputs to float32 in registers. Results and gradients come back in the input
dtype.

``torch`` is imported on first use: ``import fastkl`` (and ``import fastkl.torch``) never
imports it.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

import fastkl
from fastkl import _checks

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
    """A tensor as a numpy array for the kernels: a view for float32/float64/float16 (and
    bool or integer masks), and for bfloat16 an ``ml_dtypes.bfloat16`` view of its buffer
    (a float32 copy without ml_dtypes). Anything else is passed through (the numpy API
    validates it)."""
    if not _is_tensor(torch, x):
        return x
    _check_device(torch, x, name)
    t = x.detach()
    if t.dtype == torch.bfloat16:
        bf16 = _checks.bfloat16_dtype()
        if bf16 is None:  # numpy has no bfloat16 without ml_dtypes: an exact float32 copy
            return t.to(torch.float32).numpy()
        # the raw 16-bit buffer as ml_dtypes.bfloat16, read in place (no copy)
        return t.resolve_neg().view(torch.int16).numpy().view(bf16)
    if t.is_complex():
        t = t.resolve_conj()
    return t.resolve_neg().numpy()  # float16: numpy's own float16, read in place


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

    class FastklLogits(torch.autograd.Function):
        """A logits op: ``call()`` returns the value and one ``_Saved`` (or None: no
        gradient) per differentiable input, in the order of ``inputs``."""

        @staticmethod
        def forward(ctx, call, *inputs):
            value, saved = call()
            ctx.fastkl_saved = saved
            return value

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_output):
            return (None,) + tuple(None if s is None else _backward(s, grad_output)
                                   for s in ctx.fastkl_saved)

    _FUNCTIONS.update(kl_mc=FastklKLMC, logits=FastklLogits)
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


def _check_logits_tensors(torch, func: str, named) -> None:
    """Device checks of every tensor argument; a mask that requires grad raises."""
    for x, name in named:
        if _is_tensor(torch, x):
            _check_device(torch, x, name)
    for x, name in named:
        if name == "mask":
            _no_grad_for(torch, func, x, "mask", "pass mask.detach()")


def _no_log_probs_grad(func: str, log_probs) -> None:
    if not isinstance(log_probs, (bool, np.bool_)):
        raise TypeError(f"log_probs must be a bool, got {type(log_probs).__name__}")
    if log_probs:
        raise NotImplementedError(
            f"fastkl.torch.{func}: log_probs=True with a gradient is not supported; "
            "normalised log-probabilities are valid logits, so pass them with "
            "log_probs=False (same value, same gradient)")


def _logits_apply(torch, inputs, want, grad_call, row_values: bool, axis, out_dtype):
    """The autograd node of a logits op over ``inputs`` (the tensors that may carry a
    gradient): ``grad_call()`` is one fused numpy call returning ``(value, [grad or None per
    input])`` for the inputs flagged in ``want``. ``row_values``: one value per row (the
    upstream gradient broadcasts over the vocabulary axis), else a 0-d value."""

    def call():
        value, grads = grad_call()
        saved = []
        for x, g, w in zip(inputs, grads, want, strict=True):
            if not w:
                saved.append(None)
                continue
            shape = tuple(x.shape)
            s = _Saved()
            s.grad = torch.from_numpy(g)
            s.dtype = x.dtype
            if row_values:
                ax = operator.index(axis) % len(shape)
                s.go_shape = tuple(1 if i == ax else n for i, n in enumerate(shape))
            else:
                s.go_shape = (1,) * len(shape)
            saved.append(s)
        return _to_tensor(torch, value, out_dtype), saved

    return _functions()["logits"].apply(call, *inputs)


def _pair_op(func: str, value_fn, grad_fn, logits_p, logits_q, mask, log_probs, reduction,
             axis, kw: dict):
    """kl_logits / jsd_logits: the value alone when no gradient is wanted, else one fused
    ``grad_fn`` call for the logits that require grad."""
    torch = _torch()
    _check_logits_tensors(torch, func, ((logits_p, "logits_p"), (logits_q, "logits_q"),
                                        (mask, "mask")))
    out_dtype = _out_dtype(torch, func, logits_p, logits_q, ("logits_p", "logits_q"))
    a = _as_numpy(torch, logits_p, "logits_p")
    b = _as_numpy(torch, logits_q, "logits_q")
    kw = dict(kw, axis=axis, mask=_as_numpy(torch, mask, "mask"), reduction=reduction)
    want = [_wants_grad(torch, logits_p), _wants_grad(torch, logits_q)]
    if not any(want):
        return _to_tensor(torch, value_fn(a, b, log_probs=log_probs, **kw), out_dtype)
    _no_log_probs_grad(func, log_probs)
    wrt = "both" if all(want) else ("p" if want[0] else "q")

    def grad_call():
        res = grad_fn(a, b, wrt=wrt, **kw)
        if wrt == "both":
            return res[0], list(res[1:])
        return res[0], [res[1], None] if wrt == "p" else [None, res[1]]

    return _logits_apply(torch, (logits_p, logits_q), want, grad_call, reduction == "none",
                         axis, out_dtype)


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
    empty: float = math.nan,
):
    """``fastkl.kl_logits`` (KL(P||Q), ``P = softmax(logits_p / T)``, ``Q = softmax(logits_q
    / T)`` along ``axis``) on torch CPU tensors, differentiable with respect to both logits.

    Same arguments and semantics as ``fastkl.kl_logits``. Returns a tensor of the inputs'
    dtype: one value per row (the input shape without ``axis``, times the mask weight) for
    ``reduction="none"``, 0-d for "mean"/"sum" (accumulated in float64, then rounded).

    When ``logits_q`` and/or ``logits_p`` require grad (and grad mode is on), the forward
    pass is one fused ``fastkl.kl_logits_grad`` call for just those (``d KL / d logits_q =
    (Q - P) / T``, ``d KL / d logits_p = P (log P - log Q - KL) / T`` per row, with the
    reduction's weights) and the backward pass scales it by the upstream gradient. ``mask``
    must not require grad (``NotImplementedError``), nor may ``log_probs=True`` be combined
    with a gradient (normalised log-probabilities are valid logits: pass them with
    ``log_probs=False``; the value and gradient are the same).

    Raises ``TypeError`` for a tensor that is not on the CPU or not dense.
    """
    return _pair_op("kl_logits", fastkl.kl_logits, fastkl.kl_logits_grad, logits_p, logits_q,
                    mask, log_probs, reduction, axis,
                    dict(temperature=temperature, backend=backend, empty=empty))


def jsd_logits(
    logits_p,
    logits_q,
    beta: float = 0.5,
    *,
    endpoints: str = "mixture",
    temperature: float = 1.0,
    axis: int = -1,
    mask=None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
    empty: float = math.nan,
):
    """``fastkl.jsd_logits`` (``JSD_beta(P, Q) = beta KL(P||M) + (1 - beta) KL(Q||M)``,
    ``M = beta P + (1 - beta) Q``; ``endpoints="kl"``: KL(P||Q) at beta 0, KL(Q||P) at 1) on
    torch CPU tensors, differentiable with respect to both logits through one fused
    ``fastkl.jsd_logits_grad`` call (``d / d logits_p = beta P (log P - log M - KL(P||M))
    / T``, ``d / d logits_q = (1 - beta) Q (log Q - log M - KL(Q||M)) / T``). Arguments,
    result and errors as ``kl_logits``; TRL GKD / Liger: ``jsd_logits(teacher, student,
    beta, endpoints="kl")``.
    """
    return _pair_op("jsd_logits", fastkl.jsd_logits, fastkl.jsd_logits_grad, logits_p,
                    logits_q, mask, log_probs, reduction, axis,
                    dict(beta=beta, endpoints=endpoints, temperature=temperature,
                         backend=backend, empty=empty))


def entropy_logits(
    logits,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask=None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
    empty: float = math.nan,
):
    """``fastkl.entropy_logits`` (``H(P) = -sum P log P``, ``P = softmax(logits / T)``) on
    torch CPU tensors, differentiable through one fused ``fastkl.entropy_logits_grad`` call
    (``d H / d logits = -P (log P + H) / T`` per row). Arguments, result and errors as
    ``kl_logits``."""
    torch = _torch()
    func = "entropy_logits"
    _check_logits_tensors(torch, func, ((logits, "logits"), (mask, "mask")))
    if not _is_tensor(torch, logits) or not logits.dtype.is_floating_point:
        raise TypeError(f"fastkl.torch.{func} takes a floating torch tensor (logits); for "
                        f"numpy arrays use fastkl.{func}")
    out_dtype = logits.dtype
    x = _as_numpy(torch, logits, "logits")
    kw = dict(temperature=temperature, axis=axis, mask=_as_numpy(torch, mask, "mask"),
              reduction=reduction, backend=backend, empty=empty)
    if not _wants_grad(torch, logits):
        return _to_tensor(torch, fastkl.entropy_logits(x, log_probs=log_probs, **kw),
                          out_dtype)
    _no_log_probs_grad(func, log_probs)

    def grad_call():
        value, g = fastkl.entropy_logits_grad(x, **kw)
        return value, [g]

    return _logits_apply(torch, (logits,), [True], grad_call, reduction == "none", axis,
                         out_dtype)


def token_logprobs(
    logits,
    tokens,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    ignore_index: int = -100,
    backend: str | None = None,
):
    """``fastkl.token_logprobs`` (``log softmax(logits / T)[token]`` per row, 0 where the
    token is ``ignore_index``) on torch CPU tensors, differentiable with respect to
    ``logits`` through one fused ``fastkl.token_logprobs_grad`` call (``(onehot(token) - Q)
    / T`` per row, 0 in ignored rows). ``tokens``: an integer tensor (or array) of the logits'
    shape without ``axis``. Returns a tensor of the logits' dtype, one value per row.

    Raises ``TypeError`` for a tensor that is not on the CPU or not dense.
    """
    torch = _torch()
    func = "token_logprobs"
    _check_logits_tensors(torch, func, ((logits, "logits"), (tokens, "tokens")))
    if not _is_tensor(torch, logits) or not logits.dtype.is_floating_point:
        raise TypeError(f"fastkl.torch.{func} takes a floating torch tensor (logits); for "
                        f"numpy arrays use fastkl.{func}")
    out_dtype = logits.dtype
    x = _as_numpy(torch, logits, "logits")
    tok = _as_numpy(torch, tokens, "tokens")
    kw = dict(temperature=temperature, axis=axis, ignore_index=ignore_index, backend=backend)
    if not _wants_grad(torch, logits):
        return _to_tensor(torch, fastkl.token_logprobs(x, tok, **kw), out_dtype)

    def grad_call():
        value, g = fastkl.token_logprobs_grad(x, tok, **kw)
        return value, [g]

    return _logits_apply(torch, (logits,), [True], grad_call, True, axis, out_dtype)


__all__ = ["entropy_logits", "jsd_logits", "kl_logits", "kl_mc", "token_logprobs"]
