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


def _empty(empty, dask: bool) -> float:
    """The checked ``empty`` of a logits op (dask graphs take only the default NaN)."""
    e = _checks.empty_value(empty)
    if dask and not math.isnan(e):
        raise NotImplementedError("empty= other than NaN is not supported for dask arrays yet; "
                                  "call .compute() on the inputs first")
    return e


def _row_op(op: str, arrays, names, beta, temperature, axis, mask, reduction, log_probs,
            backend, empty=math.nan):
    """A logits op (``LOGITS_OPS``) per row of ``arrays``, reduced (dask arrays: lazily); a
    "mean" over zero total weight is ``empty``."""
    if _dask.is_dask(*arrays, mask):
        _empty(empty, True)
        return _dask.logits_op(op, arrays, names, beta, temperature, axis, mask, reduction,
                               log_probs, backend, _mc.SLICE)
    arrays = _float_arrays(*zip(arrays, names, strict=True))
    reduction, inv_t = logits_options(reduction, temperature, log_probs)
    empty = _empty(empty, False)
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


def kl_logits_grad(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    empty: float = math.nan,
) -> tuple[float | np.ndarray, np.ndarray]:
    """KL(P||Q) reduced as in ``kl_logits``, and its gradient with respect to ``logits_q``:
    ``d KL_row / d logits_q = (Q - P) / T`` per row, times ``w_row / sum w`` ("mean"),
    ``w_row`` ("sum"; and "none", where it is the gradient of ``sum_row w_row KL_row``) —
    the distillation backward pass, fused with the forward one.

    Returns ``(value, grad)``; ``grad`` has the shape of ``logits_q`` (float32 for
    float16/32 inputs, float64 for float64). A "mean" over zero total weight is ``empty``
    (its gradient 0).
    """
    if _dask.is_dask(logits_p, logits_q, mask):
        _dask.unsupported("kl_logits_grad")
    arrays = _float_arrays((logits_p, "logits_p"), (logits_q, "logits_q"))
    reduction, inv_t = logits_options(reduction, temperature)
    empty = _empty(empty, False)
    rows = LogitsRows(arrays, ["logits_p", "logits_q"], axis, mask)
    be = get_backend(backend)
    w = np.ones(rows.lead) if rows.mask is None else rows.mask.astype(np.float64)
    if reduction == "mean":
        w = _core.ratio_weights(w)
        total = float(w.sum())
        scale = w / total if total > 0 else np.zeros_like(w)
    else:
        scale = w
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    vals = np.zeros(rows.lead, dtype=np.float64)
    grad = np.empty(rows.lead + (rows.vocab,), dtype=rows.dtype)
    for prefix, sl, views in rows.pieces(_mc.SLICE):
        out = rows_of(vals, prefix, sl)
        if out.size:
            g = grad[prefix + (...,)].reshape(-1, rows.vocab)[sl]
            be.logits_kl_grad(views[0], views[1], inv_t, rows_of(scale, prefix, sl), out, g)
    value = _core.reduce_rows(vals, rows.mask, reduction, rows.dtype, empty)
    return value, np.moveaxis(grad, -1, rows.axis)
