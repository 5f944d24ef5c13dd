"""Exact divergences between full next-token distributions, one fused pass per row.

``P = softmax(logits_p / T)`` and ``Q = softmax(logits_q / T)`` along ``axis`` (the
vocabulary). The kernels keep a running max and log-sum-exp per row and write nothing but the
per-row result: no ``[rows, vocab]`` temporaries, extra memory O(rows).

This module owns axes, shapes, masks, reductions, dtypes and errors; the arithmetic is in the
backends (``fastkl.backends``, contract in ``backends/_contract.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _checks, _core, _dask
from . import mc as _mc
from ._validate import LogitsRows, logits_options, rows_of
from .backends import get_backend
from .backends._contract import LOGITS_OPS

ArrayLike = Any


def _float_arrays(*pairs) -> list[np.ndarray]:
    return [_checks.float_array(x, name) for x, name in pairs]




def _row_op(op: str, arrays, names, beta, temperature, axis, mask, reduction, log_probs,
            backend, empty=math.nan):
    """A logits op (``LOGITS_OPS``) per row of ``arrays``, reduced (dask arrays: lazily); a
    "mean" over zero total weight is ``empty``."""
    empty = _checks.empty_value(empty)
    if _dask.is_dask(*arrays, mask):
        return _dask.logits_op(op, arrays, names, beta, temperature, axis, mask, reduction,
                               log_probs, backend, _mc.SLICE, empty)
    arrays = _float_arrays(*zip(arrays, names, strict=True))
    reduction, inv_t = logits_options(reduction, temperature, log_probs)
    rows = LogitsRows(arrays, names, axis, mask)
    be = get_backend(backend)
    vals = rows.values(be, LOGITS_OPS[op], beta, inv_t, log_probs, _mc.SLICE)
    return _core.reduce_rows(vals, rows.mask, reduction, rows.dtype, empty)


# --------------------------------------------------------------------------- public API


def kl_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
    empty: float = math.nan,
) -> float | np.ndarray:
    """KL(P||Q) = sum_v P_v (log P_v - log Q_v) per row, ``P = softmax(logits_p / T)``,
    ``Q = softmax(logits_q / T)`` along ``axis``.

    Computed per row in one fused pass as ``sum_v e^x_v (x_v - y_v) / ZA - log(ZA / ZB)``
    with ``x = a/T - max(a/T)``, ``ZA = sum e^x`` (y, ZB likewise for Q), so identical rows
    give exactly 0.0; never negative. ``-inf`` logits are zero probabilities (+inf where
    P > 0 = Q).

    Parameters
    ----------
    logits_p, logits_q : array_like, float16/32/64, same shape ``[..., vocab, ...]``
    temperature : float > 0
    axis : int, the vocabulary axis
    mask : array_like of bool or weights, shape = input shape without ``axis``; optional
    reduction : {"none", "mean", "sum"}
        "none": one value per row (float32 for float16/32 inputs, float64 for float64),
        times the mask weight; "mean" = sum w KL / sum w and "sum" = sum w KL, in float64.
    log_probs : bool
        Inputs are already normalized log-probabilities (the log-sum-exp is skipped at
        T == 1; at other temperatures the tempered rows are renormalized).
    empty : float
        The "mean" over zero total weight (every row masked): NaN by default, 0.0 as Liger.

    Dask array inputs (the vocabulary axis in one chunk) give a lazy dask array.
    """
    return _row_op("kl", [logits_p, logits_q], ["logits_p", "logits_q"], 0.5, temperature,
                   axis, mask, reduction, log_probs, backend, empty)


def jsd_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    beta: float = 0.5,
    *,
    endpoints: str = "mixture",
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
    empty: float = math.nan,
) -> float | np.ndarray:
    """Generalized Jensen-Shannon divergence per row,
    ``JSD_beta(P, Q) = beta KL(P||M) + (1 - beta) KL(Q||M)``, ``M = beta P + (1 - beta) Q``.

    ``beta`` in [0, 1]; symmetric in (P, Q) at 0.5, where it is bounded by log 2.

    ``endpoints``: "mixture" (the formula above at every beta, so beta = 0 and 1 give 0) or
    "kl": beta = 0 gives KL(P||Q) and beta = 1 gives KL(Q||P), the mixture in between —
    TRL GKD's ``generalized_jsd_loss`` and Liger's JSD with P the teacher
    (``jsd_logits(teacher_logits, student_logits, beta, endpoints="kl")``). Other
    parameters as ``kl_logits``.
    """
    b = _checks.beta(beta)
    ends = _checks.choice(endpoints, _checks.JSD_ENDPOINTS, "endpoints")
    if ends == "kl" and b == 0.0:
        return _row_op("kl", [logits_p, logits_q], ["logits_p", "logits_q"], 0.5, temperature,
                       axis, mask, reduction, log_probs, backend, empty)
    if ends == "kl" and b == 1.0:
        return _row_op("kl", [logits_q, logits_p], ["logits_q", "logits_p"], 0.5, temperature,
                       axis, mask, reduction, log_probs, backend, empty)
    return _row_op("jsd", [logits_p, logits_q], ["logits_p", "logits_q"], b, temperature,
                   axis, mask, reduction, log_probs, backend, empty)


def entropy_logits(
    logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
    empty: float = math.nan,
) -> float | np.ndarray:
    """Entropy ``H(P) = -sum_v P_v log P_v`` per row, ``P = softmax(logits / T)``;
    computed as ``log ZA - sum e^x x / ZA`` (two non-negative parts, no cancellation).
    Parameters as ``kl_logits``."""
    return _row_op("entropy", [logits], ["logits"], 0.5, temperature, axis, mask, reduction,
                   log_probs, backend, empty)


def token_logprobs(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    ignore_index: int = -100,
    backend: str | None = None,
) -> np.ndarray:
    """``log softmax(logits / T)[token]`` per row — the input ``kl_mc`` needs in RL —
    without a ``[rows, vocab]`` log-softmax: ``b_tok / T - max(b / T) - log sum e^y``.

    ``tokens``: integers of the input shape without ``axis``, each in [0, vocab) or equal to
    ``ignore_index`` (those rows give 0.0; exclude them with a mask). Returns float32 for
    float16/32 logits, float64 for float64.
    """
    if _dask.is_dask(logits, tokens):
        _dask.unsupported("token_logprobs")
    (b,) = _float_arrays((logits, "logits"))
    inv_t = 1.0 / _checks.temperature(temperature)
    rows = LogitsRows([b], ["logits"], axis, None)
    tok = _checks.tokens_array(tokens, rows.lead, rows.vocab, ignore_index)
    be = get_backend(backend)
    vals = np.zeros(rows.lead, dtype=np.float64)
    for prefix, sl, views in rows.pieces(_mc.SLICE):
        out = rows_of(vals, prefix, sl)
        if out.size:
            t = rows_of(tok, prefix, sl)
            be.logits_token(views[0], t, inv_t, int(ignore_index), out)
    res = vals.astype(rows.dtype)
    return res if res.ndim else res[()]


def _rowscale(rows: LogitsRows, reduction: str) -> np.ndarray:
    """The reduction's weight of each row's gradient: ``w_row / sum w`` ("mean"; zeros when
    the total weight is 0), ``w_row`` ("sum", "none"), 1 without a mask."""
    w = np.ones(rows.lead) if rows.mask is None else rows.mask.astype(np.float64)
    if reduction == "mean":
        w = _core.ratio_weights(w)
        total = float(w.sum())
        w = w / total if total > 0 else np.zeros_like(w)
    return np.ascontiguousarray(w, dtype=np.float64)


def _grad_op(op: str, arrays, names, want, beta, temperature, axis, mask, reduction, backend,
             empty, func: str):
    """The reduced value of a logits op and its gradients with respect to the arrays flagged
    in ``want`` (None for the others), from one fused kernel call per piece of rows."""
    if _dask.is_dask(*arrays, mask):
        _dask.unsupported(func)
    arrays = _float_arrays(*zip(arrays, names, strict=True))
    reduction, inv_t = logits_options(reduction, temperature)
    rows = LogitsRows(arrays, names, axis, mask)
    be = get_backend(backend)
    scale = _rowscale(rows, reduction)
    vals = np.zeros(rows.lead, dtype=np.float64)
    shape = rows.lead + (rows.vocab,)
    grads = [np.empty(shape, dtype=rows.dtype) if w else None for w in want]
    for prefix, sl, views in rows.pieces(_mc.SLICE):
        out = rows_of(vals, prefix, sl)
        if out.size:
            gs = [None if g is None else g[prefix + (...,)].reshape(-1, rows.vocab)[sl]
                  for g in grads] + [None]
            b = views[1] if len(views) > 1 else views[0]
            be.logits_grad(views[0], b, LOGITS_OPS[op], beta, inv_t,
                           rows_of(scale, prefix, sl), out, gs[0], gs[1])
    value = _core.reduce_rows(vals, rows.mask, reduction, rows.dtype, empty)
    return value, [None if g is None else np.moveaxis(g, -1, rows.axis) for g in grads]


_WRT = ("q", "p", "both")


def _pair_grad(op: str, logits_p, logits_q, beta, wrt, temperature, axis, mask, reduction,
               backend, empty, func: str, swap: bool = False):
    """(value, grad) for wrt "p" / "q", (value, grad_p, grad_q) for "both"; ``swap``: the
    kernel's P is ``logits_q`` (KL(Q||P))."""
    wrt = _checks.choice(wrt, _WRT, "wrt")
    arrays, names = [logits_p, logits_q], ["logits_p", "logits_q"]
    want = [wrt in ("p", "both"), wrt in ("q", "both")]
    if swap:
        arrays, names, want = arrays[::-1], names[::-1], want[::-1]
    value, grads = _grad_op(op, arrays, names, want, beta, temperature, axis, mask, reduction,
                            backend, empty, func)
    gp, gq = grads[::-1] if swap else grads
    if wrt == "both":
        return value, gp, gq
    return value, (gp if wrt == "p" else gq)


def kl_logits_grad(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    wrt: str = "q",
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    empty: float = math.nan,
) -> tuple:
    """KL(P||Q) reduced as in ``kl_logits``, and its gradient, fused with the forward pass
    (the distillation backward pass):

    * ``d KL_row / d logits_q = (Q - P) / T``
    * ``d KL_row / d logits_p = P * (log P - log Q - KL_row) / T``

    per row, times ``w_row / sum w`` ("mean"), ``w_row`` ("sum"; and "none", where it is the
    gradient of ``sum_row w_row KL_row``).

    ``wrt``: "q" (default) returns ``(value, grad_q)``, "p" ``(value, grad_p)``, "both"
    ``(value, grad_p, grad_q)``; only the gradients asked for are computed. Each gradient
    has the shape of the logits (float32 for float16/32 inputs, float64 for float64). An
    entry with P = 0 (a ``-inf`` logit) has gradient 0 w.r.t. ``logits_p``; a row whose KL
    is +inf (P > 0 = Q somewhere) has no finite gradient w.r.t. ``logits_p``. A "mean" over
    zero total weight is ``empty`` (its gradient 0).
    """
    return _pair_grad("kl", logits_p, logits_q, 0.5, wrt, temperature, axis, mask, reduction,
                      backend, empty, "kl_logits_grad")


def jsd_logits_grad(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    beta: float = 0.5,
    *,
    endpoints: str = "mixture",
    wrt: str = "q",
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    empty: float = math.nan,
) -> tuple:
    """``jsd_logits`` reduced, and its gradient (fused, as ``kl_logits_grad``). With
    ``M = beta P + (1 - beta) Q``:

    * ``d JSD_row / d logits_p = beta P (log P - log M - KL(P||M)) / T``
    * ``d JSD_row / d logits_q = (1 - beta) Q (log Q - log M - KL(Q||M)) / T``

    (both 0 at beta = 0 and 1 with ``endpoints="mixture"``; with ``endpoints="kl"`` beta = 0
    and 1 are the gradients of KL(P||Q) and KL(Q||P), see ``kl_logits_grad``). ``wrt``,
    the reduction weights, ``empty`` and the returned tuple as ``kl_logits_grad``.
    """
    b = _checks.beta(beta)
    ends = _checks.choice(endpoints, _checks.JSD_ENDPOINTS, "endpoints")
    args = (wrt, temperature, axis, mask, reduction, backend, empty, "jsd_logits_grad")
    if ends == "kl" and b in (0.0, 1.0):
        return _pair_grad("kl", logits_p, logits_q, 0.5, *args, swap=b == 1.0)
    return _pair_grad("jsd", logits_p, logits_q, b, *args)


def entropy_logits_grad(
    logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    empty: float = math.nan,
) -> tuple:
    """``entropy_logits`` reduced, and its gradient ``d H_row / d logits = -P (log P + H_row)
    / T`` per row, with the reduction's weights as ``kl_logits_grad`` (0 where P = 0).
    Returns ``(value, grad)``."""
    value, (g,) = _grad_op("entropy", [logits], ["logits"], [True], 0.5, temperature, axis,
                           mask, reduction, backend, empty, "entropy_logits_grad")
    return value, g


def token_logprobs_grad(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    ignore_index: int = -100,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``token_logprobs`` and its gradient, fused: ``d log Q[token] / d logits =
    (onehot(token) - Q) / T`` per row (``Q = softmax(logits / T)``), zeros in rows whose token
    is ``ignore_index``. The gradient is that of the sum of the returned values; it has the
    shape of ``logits`` (float32 for float16/32 inputs, float64 for float64). Returns
    ``(values, grad)``."""
    if _dask.is_dask(logits, tokens):
        _dask.unsupported("token_logprobs_grad")
    (b,) = _float_arrays((logits, "logits"))
    inv_t = 1.0 / _checks.temperature(temperature)
    rows = LogitsRows([b], ["logits"], axis, None)
    tok = _checks.tokens_array(tokens, rows.lead, rows.vocab, ignore_index)
    be = get_backend(backend)
    vals = np.zeros(rows.lead, dtype=np.float64)
    grad = np.empty(rows.lead + (rows.vocab,), dtype=rows.dtype)
    ones = np.ones(rows.lead, dtype=np.float64)
    for prefix, sl, views in rows.pieces(_mc.SLICE):
        out = rows_of(vals, prefix, sl)
        if out.size:
            g = grad[prefix + (...,)].reshape(-1, rows.vocab)[sl]
            be.logits_token_grad(views[0], rows_of(tok, prefix, sl), inv_t, int(ignore_index),
                                 rows_of(ones, prefix, sl), out, g)
    res = vals.astype(rows.dtype)
    return (res if res.ndim else res[()]), np.moveaxis(grad, -1, rows.axis)
