"""One validator per path: ``mc_inputs`` for the Monte Carlo functions (``kl_mc*``,
``MCAccumulator``, the dask graphs and their chunks) and ``LogitsRows`` with
``logits_options`` for the logits ops (in memory, dask, ``LogitsAccumulator``).

The checks themselves (and every message) are ``fastkl._checks``'; this module fixes their
order and the conversions between them. Dask graphs run them on stand-ins of the inputs'
dtypes and shapes (``meta``) when the graph is built.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _checks, _core

# the kernels' clamp tuple (lr_lo, lr_hi, v_lo, v_hi, weighted): weighted = 1.0 for
# clamp_order="weighted" with a clamp (without one the order changes nothing)
NO_CLAMPS = (-math.inf, math.inf, -math.inf, math.inf, 0.0)

# float16 / byte-swapped logits are widened this many bytes of input at a time, so memory
# stays O(rows) whatever the array size
CONVERT_CHUNK_BYTES = 32 << 20


def meta(dtype, shape: tuple) -> np.ndarray:
    """A read-only stand-in of an array of ``dtype`` and ``shape`` that takes no memory
    (all its elements are one zero): the dtype and shape checks run on it unchanged."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


# --------------------------------------------------------------------------- Monte Carlo


class MCInputs:
    """Validated inputs: converted arrays plus the options the kernels take."""

    __slots__ = ("logq", "logp", "mask", "log_iw", "est", "clamp", "shape", "dtype", "out_dtype",
                 "wexp")

    def arrays(self) -> list:
        return [self.logq, self.logp, self.mask, self.log_iw]


def mc_options(estimator, reverse, clamp_log_ratio, clamp_value,
               clamp_order="term") -> tuple[int, tuple]:
    """(kernel estimator code, the clamp tuple): the options an ``MCAccumulator`` keeps."""
    return _checks.estimator_code(estimator, reverse), clamp_bounds(clamp_log_ratio,
                                                                   clamp_value, clamp_order)


def clamp_bounds(clamp_log_ratio, clamp_value, clamp_order="term") -> tuple:
    """The kernels' clamp tuple ``(lr_lo, lr_hi, v_lo, v_hi, weighted)``."""
    lr = _checks.clamp_pair(clamp_log_ratio, "clamp_log_ratio")
    v = _checks.clamp_pair(clamp_value, "clamp_value")
    order = _checks.choice(clamp_order, _checks.CLAMP_ORDERS, "clamp_order")
    if lr == v == (-math.inf, math.inf):
        return NO_CLAMPS  # nothing to clamp: the order changes nothing
    weighted = 1.0 if order == "weighted" else 0.0
    return lr + v + (weighted,)


def mc_inputs(logq, logp, estimator=None, reverse=False, mask=None, log_iw=None,
              clamp_log_ratio=None, clamp_value=None, ratio_only=False, *, est=None,
              clamp=None, dtype=None, clamp_order="term") -> MCInputs:
    """The Monte Carlo inputs, checked and converted for the kernels.

    ``ratio_only``: only ratios of weighted sums are wanted (means, std, sem), so extreme
    weights may be scaled by ``2**-wexp`` (``_checks.scale_weights``). ``est`` / ``clamp``:
    already checked options (an accumulator's), used instead of ``estimator`` / the clamps;
    ``dtype``: the kernel dtype of the whole array a chunk belongs to."""
    if (type(logq) is np.ndarray and type(logp) is np.ndarray and mask is None
            and log_iw is None and clamp_log_ratio is None and clamp_value is None
            and clamp_order == "term" and logq.shape == logp.shape and logq.dtype == logp.dtype
            and logq.dtype.char in "fd" and logq.dtype.isnative
            and (dtype is None or dtype == logq.dtype)):
        # the common small-input case: two native float32/float64 arrays of one dtype and
        # shape, nothing optional. The general path below gives the same MCInputs (no
        # conversion, no copy), through ten more calls: about 1 us of a 9 us call.
        inp = MCInputs()
        inp.est = _checks.estimator_code(estimator, reverse) if est is None else est
        inp.dtype = inp.out_dtype = logq.dtype
        inp.logq, inp.logp, inp.shape = logq, logp, logq.shape
        inp.mask = inp.log_iw = None
        inp.clamp = NO_CLAMPS if clamp is None else clamp
        inp.wexp = 0
        return inp
    q = _checks.float_array(logq, "logq", int_lists=True)
    p = _checks.float_array(logp, "logp", int_lists=True)
    _checks.same_shape(p, q.shape, "logp")
    inp = MCInputs()
    inp.est = _checks.estimator_code(estimator, reverse) if est is None else est
    inp.dtype = _checks.compute_dtype(q, p) if dtype is None else np.dtype(dtype)
    inp.out_dtype = inp.dtype
    # float16 / bfloat16 logq and logp of one dtype are read in place by the kernels (the
    # contract's 16-bit inputs); mixed with another dtype they are converted to float32
    half = _checks.common_half(q, p)
    inp.logq = _checks.as_kernel_input(q, inp.dtype, half)
    inp.logp = _checks.as_kernel_input(p, inp.dtype, half)
    inp.shape = q.shape
    inp.mask = _checks.mask_array(mask, q.shape)
    inp.wexp = _checks.scale_weights(inp.mask) if ratio_only else 0
    inp.log_iw = _checks.log_iw_array(log_iw, q.shape, inp.dtype, half)
    inp.clamp = (clamp_bounds(clamp_log_ratio, clamp_value, clamp_order) if clamp is None
                 else clamp)
    return inp


def aggregation(reduction: str, norm=None, empty_rows="skip", empty=math.nan,
                denominator=None):
    """The checked ``_core.Aggregation`` of a Monte Carlo reduction (already checked):
    ``norm`` only with "seq-mean-token-sum-norm", ``denominator`` only with "token-mean" and
    the seq-mean-* modes, ``empty_rows="zero"`` only with seq-mean-*; ``_core.DEFAULT_AGG``
    (the same object) when every option has its default."""
    if (norm is None and denominator is None and isinstance(empty_rows, str)
            and empty_rows == "skip" and isinstance(empty, float) and math.isnan(empty)):
        return _core.DEFAULT_AGG
    if norm is not None:
        if reduction != "seq-mean-token-sum-norm":
            raise ValueError(f"norm is for reduction='seq-mean-token-sum-norm', not "
                             f"reduction={reduction!r}")
        norm = _checks.positive_count(norm, "norm")
    empty_rows = _checks.choice(empty_rows, _checks.EMPTY_ROWS, "empty_rows")
    if empty_rows != "skip" and reduction not in _checks.SEQ_REDUCTIONS:
        raise ValueError(f"empty_rows={empty_rows!r} is for the seq-mean-token-mean / "
                         f"seq-mean-token-sum reductions, not reduction={reduction!r}")
    empty = _checks.empty_value(empty)
    if denominator is not None:
        if reduction not in _checks.RL_REDUCTIONS:
            raise ValueError(
                f"denominator (a global token or sequence count) is for reduction="
                f"'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum', not "
                f"reduction={reduction!r}")
        denominator = _checks.positive_count(denominator, "denominator")
    return _core.Aggregation(norm, empty_rows, empty, denominator)


def natural_rows(arrays, shape):
    """2-D views for elementwise work, rows = all leading axes."""
    if len(shape) == 0:
        new = (1, 1)
    elif len(shape) == 1:
        new = (1, shape[0])
    else:
        new = (math.prod(shape[:-1]), shape[-1])
    return [None if a is None else a.reshape(new) for a in arrays]


# --------------------------------------------------------------------------- logits


def logits_options(reduction, temperature, log_probs=False) -> tuple[str, float]:
    """(reduction, 1 / temperature) of a logits op, checked in the order of its
    parameters."""
    reduction = _checks.reduction(reduction, 0, allow_rl=False)
    inv_t = 1.0 / _checks.temperature(temperature)
    if not isinstance(log_probs, (bool, np.bool_)):
        raise TypeError(f"log_probs must be a bool, got {type(log_probs).__name__}")
    return reduction, inv_t


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
    step = max(1, CONVERT_CHUNK_BYTES // max(1, vocab * dtype.itemsize))
    for r0 in range(0, rows, step):
        sl = slice(r0, min(rows, r0 + step))
        yield sl, [_checks.as_kernel_dtype(v[sl], dtype) for v in views]


class LogitsRows:
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
        self.mask_ref = f"{names[0]} without axis {ax}"
        self.mask = _checks.mask_array(mask, self.lead, self.mask_ref)

    def pieces(self, slice_elems: int) -> Iterator[tuple[tuple, slice, list]]:
        """(prefix, row slice, native 2-D views) for every kernel call: at most
        ``slice_elems`` elements (whole rows) each, so that Ctrl-C is seen between calls."""
        step = max(1, slice_elems // self.vocab)
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

    def values(self, be, op_code: int, beta: float, inv_t: float, log_probs: bool,
               slice_elems: int) -> np.ndarray:
        """The float64 value of a logits op per row (``lead`` shape; masked rows 0)."""
        vals = np.zeros(self.lead, dtype=np.float64)
        active = None if self.mask is None else (self.mask != 0).astype(np.uint8)
        for prefix, sl, views in self.pieces(slice_elems):
            out = rows_of(vals, prefix, sl)
            act = None if active is None else rows_of(active, prefix, sl)
            b = views[1] if len(views) > 1 else views[0]
            if out.size:
                be.logits_rows(views[0], b, op_code, beta, inv_t, bool(log_probs), act, out)
        return vals


def rows_of(arr: np.ndarray, prefix: tuple, sl: slice) -> np.ndarray:
    """The rows of a piece in a C-contiguous per-row array (a view)."""
    return arr[prefix + (...,)].reshape(-1)[sl]
