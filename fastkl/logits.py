"""Exact divergences between full next-token distributions, one fused pass per row.

``P = softmax(logits_p / T)`` and ``Q = softmax(logits_q / T)`` along ``axis`` (the
vocabulary). The kernels keep a running max and log-sum-exp per row and write nothing but the
per-row result: no ``[rows, vocab]`` temporaries, extra memory O(rows).

This module owns axes, shapes, masks, reductions, dtypes and errors; the arithmetic is in the
backends (``fastkl.backends``, contract in ``backends/_contract.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _checks, _dask
from . import mc as _mc
from .backends import get_backend
from .backends._contract import LOGITS_OPS

ArrayLike = Any

# float16 / byte-swapped inputs are widened this many bytes of input at a time, so memory
# stays O(rows) whatever the array size
_CONVERT_CHUNK_BYTES = 32 << 20


# --------------------------------------------------------------------------- layout


def _as_2d(x: np.ndarray) -> np.ndarray | None:
    """``x`` (vocabulary last) as a ``[rows, V]`` view, or None if the leading axes cannot be
    merged without a copy."""
    lead, lead_strides = x.shape[:-1], x.strides[:-1]
    dims = [(n, s) for n, s in zip(lead, lead_strides, strict=True) if n != 1]
    for (_, s0), (n1, s1) in zip(dims, dims[1:], strict=False):
        if s0 != n1 * s1:
            return None
    rows = math.prod(lead)
    row_stride = dims[-1][1] if dims else 0
    return as_strided(x, (rows, x.shape[-1]), (row_stride, x.strides[-1]), writeable=False)


def _plan(arrays: list[np.ndarray], prefix: tuple = ()) -> Iterator[tuple[tuple, list]]:
    """(leading-index prefix, 2-D views) pieces covering the arrays; one piece when the
    leading axes merge, else one per index of the first leading axis (recursively)."""
    views = [_as_2d(a) for a in arrays]
    if all(v is not None for v in views):
        yield prefix, views
        return
    for i in range(arrays[0].shape[0]):
        yield from _plan([a[i] for a in arrays], prefix + (i,))


def _native_chunks(views: list[np.ndarray], dtype: np.dtype) -> Iterator[tuple[slice, list]]:
    """Row slices of the 2-D views in the kernel dtype: the views themselves when they are
    already native ``dtype``, otherwise converted a bounded chunk of rows at a time."""
    rows, vocab = views[0].shape
    if all(v.dtype == dtype and v.dtype.isnative for v in views):
        yield slice(0, rows), views
        return
    step = max(1, _CONVERT_CHUNK_BYTES // max(1, vocab * dtype.itemsize))
    for r0 in range(0, rows, step):
        sl = slice(r0, min(rows, r0 + step))
        yield sl, [_checks.as_kernel_dtype(v[sl], dtype) for v in views]


class _Rows:
    """Validated logits moved to vocabulary-last, with row shape, dtype and row mask."""

    def __init__(self, arrays: list[np.ndarray], names: list[str], axis, mask):
        ref = arrays[0]
        for a, nm in zip(arrays[1:], names[1:], strict=True):
            _checks.same_shape(a, ref.shape, nm, names[0])
        if ref.ndim == 0:
            raise ValueError(f"{names[0]} must have at least 1 dimension (the vocabulary)")
        ax = _checks.single_axis(axis, ref.ndim)
        self.axis = ax
        self.moved = [np.moveaxis(a, ax, -1) for a in arrays]
        self.lead = self.moved[0].shape[:-1]
        self.vocab = self.moved[0].shape[-1]
        if self.vocab == 0:
            raise ValueError(f"{names[0]} has an empty vocabulary axis ({ax}): softmax undefined")
        self.dtype = _checks.compute_dtype(*arrays)
        self.mask = _checks.mask_array(mask, self.lead, f"{names[0]} without axis {ax}")

    def pieces(self) -> Iterator[tuple[tuple, slice, list]]:
        """(prefix, row slice, native 2-D views) for every kernel call: at most
        ``mc.SLICE`` elements (whole rows) each, so that Ctrl-C is seen between calls."""
        step = max(1, _mc.SLICE // self.vocab)
        for prefix, views in _plan(self.moved):
            for sl, native in _native_chunks(views, self.dtype):
                nrows = sl.stop - sl.start
                if nrows <= step:
                    yield prefix, sl, native
                    continue
                for k0 in range(0, nrows, step):
                    k1 = min(nrows, k0 + step)
                    yield (prefix, slice(sl.start + k0, sl.start + k1),
                           [v[k0:k1] for v in native])


def _rows_of(arr: np.ndarray, prefix: tuple, sl: slice) -> np.ndarray:
    """The rows of a piece in a C-contiguous per-row array (a view)."""
    return arr[prefix + (...,)].reshape(-1)[sl]


def _float_arrays(*pairs) -> list[np.ndarray]:
    return [_checks.float_array(x, name) for x, name in pairs]


def _reduce(vals: np.ndarray, mask: np.ndarray | None, reduction: str, out_dtype):
    """Per-row float64 values -> "none" (w * v, input precision) / "mean" / "sum" (float)."""
    if reduction == "mean":
        mask = _ratio_weights(mask)
    if mask is not None:
        with np.errstate(invalid="ignore"):
            vals = np.where(mask != 0, vals * mask, 0.0)
    if reduction == "none":
        out = vals.astype(out_dtype)
        return out if out.ndim else out[()]
    total = float(np.sum(vals))
    if reduction == "sum":
        return total
    weight = float(vals.size) if mask is None else float(np.sum(mask, dtype=np.float64))
    return total / weight if weight > 0 else math.nan


def _ratio_weights(mask: np.ndarray | None) -> np.ndarray | None:
    """Weights for a ratio (a weighted mean): extreme ones scaled by a power of two
    (``_checks.weight_exponent``), so that 1e-300 or 1e308 weights give the mean of 1s."""
    e = _checks.weight_exponent(mask)
    return mask if e == 0 else np.ldexp(mask, -e)


def _row_op(op: str, arrays, names, beta, temperature, axis, mask, reduction, log_probs,
            backend):
    reduction = _checks.reduction(reduction, 0, allow_rl=False)
    inv_t = 1.0 / _checks.temperature(temperature)
    if not isinstance(log_probs, (bool, np.bool_)):
        raise TypeError(f"log_probs must be a bool, got {type(log_probs).__name__}")
    rows = _Rows(arrays, names, axis, mask)
    be = get_backend(backend)
    vals = np.zeros(rows.lead, dtype=np.float64)
    active = None if rows.mask is None else (rows.mask != 0).astype(np.uint8)
    code = LOGITS_OPS[op]
    for prefix, sl, views in rows.pieces():
        out = _rows_of(vals, prefix, sl)
        act = None if active is None else _rows_of(active, prefix, sl)
        b = views[1] if len(views) > 1 else views[0]
        if out.size:
            be.logits_rows(views[0], b, code, beta, inv_t, bool(log_probs), act, out)
    return _reduce(vals, rows.mask, reduction, rows.dtype)


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

    Dask array inputs (the vocabulary axis in one chunk) give a lazy dask array.
    """
    if _dask.is_dask(logits_p, logits_q, mask):
        return _dask.logits_op("kl", [logits_p, logits_q], ["logits_p", "logits_q"], 0.5,
                               temperature, axis, mask, reduction, log_probs, backend)
    arrays = _float_arrays((logits_p, "logits_p"), (logits_q, "logits_q"))
    return _row_op("kl", arrays, ["logits_p", "logits_q"], 0.5, temperature, axis, mask,
                   reduction, log_probs, backend)


def jsd_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    beta: float = 0.5,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
) -> float | np.ndarray:
    """Generalized Jensen-Shannon divergence per row,
    ``JSD_beta(P, Q) = beta KL(P||M) + (1 - beta) KL(Q||M)``, ``M = beta P + (1 - beta) Q``.

    ``beta`` in [0, 1] (0 and 1 give 0); symmetric in (P, Q) at 0.5, where it is bounded by
    log 2. Other parameters as ``kl_logits``.
    """
    b = _checks.beta(beta)
    if _dask.is_dask(logits_p, logits_q, mask):
        return _dask.logits_op("jsd", [logits_p, logits_q], ["logits_p", "logits_q"], b,
                               temperature, axis, mask, reduction, log_probs, backend)
    arrays = _float_arrays((logits_p, "logits_p"), (logits_q, "logits_q"))
    return _row_op("jsd", arrays, ["logits_p", "logits_q"], b, temperature, axis, mask,
                   reduction, log_probs, backend)


def entropy_logits(
    logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: int = -1,
    mask: ArrayLike | None = None,
    reduction: str = "none",
    log_probs: bool = False,
    backend: str | None = None,
) -> float | np.ndarray:
    """Entropy ``H(P) = -sum_v P_v log P_v`` per row, ``P = softmax(logits / T)``;
    computed as ``log ZA - sum e^x x / ZA`` (two non-negative parts, no cancellation).
    Parameters as ``kl_logits``."""
    if _dask.is_dask(logits, mask):
        return _dask.logits_op("entropy", [logits], ["logits"], 0.5, temperature, axis, mask,
                               reduction, log_probs, backend)
    arrays = _float_arrays((logits, "logits"))
    return _row_op("entropy", arrays, ["logits"], 0.5, temperature, axis, mask, reduction,
                   log_probs, backend)


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
    rows = _Rows([b], ["logits"], axis, None)
    tok = _checks.tokens_array(tokens, rows.lead, rows.vocab, ignore_index)
    be = get_backend(backend)
    vals = np.zeros(rows.lead, dtype=np.float64)
    for prefix, sl, views in rows.pieces():
        out = _rows_of(vals, prefix, sl)
        if out.size:
            t = _rows_of(tok, prefix, sl)
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
) -> tuple[float | np.ndarray, np.ndarray]:
    """KL(P||Q) reduced as in ``kl_logits``, and its gradient with respect to ``logits_q``:
    ``d KL_row / d logits_q = (Q - P) / T`` per row, times ``w_row / sum w`` ("mean"),
    ``w_row`` ("sum"; and "none", where it is the gradient of ``sum_row w_row KL_row``) —
    the distillation backward pass, fused with the forward one.

    Returns ``(value, grad)``; ``grad`` has the shape of ``logits_q`` (float32 for
    float16/32 inputs, float64 for float64).
    """
    if _dask.is_dask(logits_p, logits_q, mask):
        _dask.unsupported("kl_logits_grad")
    arrays = _float_arrays((logits_p, "logits_p"), (logits_q, "logits_q"))
    reduction = _checks.reduction(reduction, 0, allow_rl=False)
    inv_t = 1.0 / _checks.temperature(temperature)
    rows = _Rows(arrays, ["logits_p", "logits_q"], axis, mask)
    be = get_backend(backend)
    w = np.ones(rows.lead) if rows.mask is None else rows.mask.astype(np.float64)
    if reduction == "mean":
        w = _ratio_weights(w)
        total = float(w.sum())
        scale = w / total if total > 0 else np.zeros_like(w)
    else:
        scale = w
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    vals = np.zeros(rows.lead, dtype=np.float64)
    grad = np.empty(rows.lead + (rows.vocab,), dtype=rows.dtype)
    for prefix, sl, views in rows.pieces():
        out = _rows_of(vals, prefix, sl)
        if out.size:
            g = grad[prefix + (...,)].reshape(-1, rows.vocab)[sl]
            be.logits_kl_grad(views[0], views[1], inv_t, _rows_of(scale, prefix, sl), out, g)
    value = _reduce(vals, rows.mask, reduction, rows.dtype)
    return value, np.moveaxis(grad, -1, rows.axis)
