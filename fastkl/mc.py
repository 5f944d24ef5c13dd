"""Monte Carlo KL estimators from samples (Schulman 2020): ``kl_mc``, ``kl_mc_stats``,
``kl_mc_grad``.

Samples x ~ q; inputs are ``logq = log q(x)`` and ``logp = log p(x)``; ``l = logp - logq``.

=========  ==========  ==========================  =================
estimator  reverse     term                        estimates
=========  ==========  ==========================  =================
k1         False       -l                          KL(q||p)
k2         False       l**2 / 2                    KL(q||p) (biased)
k3         False       (r - 1) - l,  r = exp(l)    KL(q||p)
k1         True        r * l                       KL(p||q)
k3         True        r * l - (r - 1)             KL(p||q)
abs        False       |l|                         E_q|l| (verl "abs")
=========  ==========  ==========================  =================

This module owns shapes, axes, masks, reductions and errors; the arithmetic lives in the
backends (``fastkl.backends``), all implementing one small kernel contract.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _checks, _core, _dask
from ._core import KLStats
from ._validate import NO_CLAMPS, MCInputs, aggregation, mc_inputs, natural_rows
from .backends import get_backend
from .backends._contract import BLOCK, N_PARTIALS

ArrayLike = Any

# reductions whose value is a ratio of weighted sums (extreme weights may be scaled)
_RATIO_REDUCTIONS = ("mean", "token-mean", "seq-mean-token-mean")


# --------------------------------------------------------------------------- layout


def _as_rows(arrays, shape, red_axes):
    """2-D ``[rows, n]`` views (copies only where numpy cannot view) with the reduced axes
    last, the output shape, and the axis permutation used.

    ``red_axes=None`` reduces everything; the axes are then taken in the memory order of
    ``logq`` so that a transposed or Fortran-ordered input is read without a copy.
    """
    ndim = len(shape)
    if red_axes is None:
        n = math.prod(shape)
        rows, out_shape = 1, ()
        if ndim <= 1:  # the common small-input case: nothing to order (saves ~1 us a call)
            return [None if a is None else a.reshape(1, n) for a in arrays], out_shape, (0,)[:ndim]
        perm = _core.memory_perm(arrays[0])
    else:
        kept = [i for i in range(ndim) if i not in red_axes]
        perm = kept + list(red_axes)
        out_shape = tuple(shape[i] for i in kept)
        rows, n = math.prod(out_shape), math.prod(shape[i] for i in red_axes)
    views = [None if a is None else a.transpose(perm).reshape(rows, n) for a in arrays]
    return views, out_shape, perm


def _flat_view(a: np.ndarray) -> np.ndarray | None:
    """``a`` as one ``[1, size]`` row without copying, or None where that needs a copy."""
    try:
        return np.reshape(a, (1, a.size), copy=False)
    except ValueError:
        return None
    except TypeError:  # numpy < 2.1: no copy= argument
        v = a.view()
        try:
            v.shape = (1, a.size)
        except AttributeError:
            return None
        return v


_SEGMENT = 256 * BLOCK  # elements per segment of _segmented_partials (a multiple of BLOCK)


def _segmented_partials(backend, inp: MCInputs, want_m2: bool) -> np.ndarray | None:
    """Partials of a full reduction ``[1, nblk, N_PARTIALS]`` over broadcast inputs (a
    stride-0 axis), whose flattening copy would be as large as the virtual array: their
    C-order flattening in memory order (as ``_as_rows`` takes it) is read in segments of
    ``_SEGMENT`` elements, so each kernel block sees the elements it would see in the copy
    and the partials are bit for bit the same, in bounded memory. None for other inputs
    (a copy of a strided array is no larger than the array, and faster)."""
    arrays = inp.arrays()
    if not any(a is not None and any(st == 0 and n > 1 for st, n in zip(a.strides, a.shape,
                                                                         strict=True))
               for a in arrays):
        return None
    perm = _core.memory_perm(inp.logq)
    arrays = [None if a is None else a.transpose(perm) for a in arrays]
    if all(a is None or _flat_view(a) is not None for a in arrays):
        return None
    total = math.prod(inp.shape)
    parts = []
    for e0 in range(0, total, _SEGMENT):
        e1 = min(total, e0 + _SEGMENT)
        views = [None if a is None else _core.flat_slice(a, e0, e1).reshape(1, e1 - e0)
                 for a in arrays]
        parts.append(backend.mc_partials(*views, inp.est, inp.clamp, want_m2))
    return np.concatenate(parts, axis=1)


# Elements per kernel call. A kernel runs without the GIL and cannot see Ctrl-C, so a long
# call is cut into slices of whole blocks and rows (partials are per fixed block, so the bits
# do not change); Python raises KeyboardInterrupt between slices. 2**25 elements take ~10 ms
# on a core: the extra calls cost nothing measurable.
SLICE = 1 << 25


def _slices(rows: int, n: int):
    """(row slice, column slice) pieces of a ``[rows, n]`` kernel call, in order: groups of
    whole rows, or one row in runs of whole BLOCKs when a row alone exceeds ``SLICE``. Each
    piece of a C-contiguous output is C-contiguous."""
    if rows * n <= SLICE:
        yield slice(0, rows), slice(0, n)
    elif n <= SLICE:
        step = SLICE // n
        for r0 in range(0, rows, step):
            yield slice(r0, min(rows, r0 + step)), slice(0, n)
    else:
        step = max(BLOCK, SLICE // BLOCK * BLOCK)
        for r in range(rows):
            for c0 in range(0, n, step):
                yield slice(r, r + 1), slice(c0, min(n, c0 + step))


def _sub(views, rs, cs):
    return [None if v is None else v[rs, cs] for v in views]


def _sliced_partials(call, views, rows: int, n: int) -> np.ndarray:
    """``call(sub_views, rs, cs)`` (a kernel returning block partials) over ``_slices``,
    assembled into the ``[rows, nblk, N_PARTIALS]`` of one whole call."""
    pieces = list(_slices(rows, n))
    if len(pieces) == 1:
        return call(views, pieces[0][0], pieces[0][1])
    part = np.empty((rows, max(1, -(-n // BLOCK)), N_PARTIALS))
    for rs, cs in pieces:
        p = call(_sub(views, rs, cs), rs, cs)
        b0 = cs.start // BLOCK
        part[rs, b0:b0 + p.shape[1]] = p
    return part


def mc_partials_sliced(backend, views, est, clamp, want_m2: bool) -> np.ndarray:
    """``backend.mc_partials`` (non-empty ``[rows, n]`` views), interruptible."""
    rows, n = views[0].shape
    return _sliced_partials(lambda v, rs, cs: backend.mc_partials(*v, est, clamp, want_m2),
                            views, rows, n)


def mc_terms_sliced(backend, views, est, clamp, out: np.ndarray) -> None:
    """``backend.mc_terms`` (``out`` C-contiguous ``[rows, n]``), interruptible."""
    rows, n = views[0].shape
    for rs, cs in _slices(rows, n):
        backend.mc_terms(*_sub(views, rs, cs), est, clamp, out[rs, cs])


def _row_partials(backend, inp: MCInputs, red_axes, want_m2: bool):
    """Merged partials per output row (``[rows, N_PARTIALS]``; column 2 the merged M2 only
    with ``want_m2``), the out shape and the rows (None where the rows were read in
    segments)."""
    if red_axes is None and len(inp.shape) >= 2 and math.prod(inp.shape) > _SEGMENT:
        part = _segmented_partials(backend, inp, want_m2)  # a broadcast view is never copied
        if part is not None:
            return _core.merge_blocks(part, want_m2), (), None
    views, out_shape, perm = _as_rows(inp.arrays(), inp.shape, red_axes)
    rows, n = views[0].shape
    if rows * n == 0:
        part = np.zeros((rows, 1, N_PARTIALS))
    elif rows * n <= SLICE:  # one kernel call (mc_partials_sliced's first piece, directly)
        part = backend.mc_partials(*views, inp.est, inp.clamp, want_m2)
    else:
        part = mc_partials_sliced(backend, views, inp.est, inp.clamp, want_m2)
    return _core.merge_blocks(part, want_m2), out_shape, views


def _raise_first_nan(backend, inp: MCInputs):
    """nan_policy='raise': find the first NaN term at an included position and say where."""
    views = natural_rows(inp.arrays(), inp.shape)
    out = np.empty(views[0].shape, dtype=inp.out_dtype)
    mc_terms_sliced(backend, views, inp.est, inp.clamp, out)

    def locate(k):
        idx = np.unravel_index(k, inp.shape) if inp.shape else ()
        return idx, inp.logq[idx], inp.logp[idx]

    _core.raise_first_nan(out, views[2], locate)


def _plain_scalar(logq, logp, estimator, reverse, reduction, backend) -> float | None:
    """``kl_mc`` of the commonest call, or None where it does not apply: two C-contiguous
    native float32/float64 ndarrays of one dtype and shape (at least one element, one kernel
    call), a full "mean" or "sum", no option beyond the estimator and the backend (the
    caller checked that). The steps are the general path's (``mc_inputs``'s fast path,
    ``_as_rows``, one ``mc_partials`` call, ``merge_blocks(m2=False)``, ``finish_scalar``),
    and none of the layers between: the same bits, several us less per call
    (tests/test_merge.py compares the two paths)."""
    if not (type(logq) is np.ndarray and type(logp) is np.ndarray and type(reduction) is str
            and (reduction == "mean" or reduction == "sum")):
        return None
    shape, dt = logq.shape, logq.dtype
    if not (logp.shape == shape and logp.dtype == dt and dt.char in "fd" and dt.isnative
            and shape and logq.flags.c_contiguous and logp.flags.c_contiguous
            and 0 < logq.size <= SLICE):
        return None
    est = _checks.estimator_code(estimator, reverse)
    be = get_backend(backend)
    n = logq.size
    part = be.mc_partials(logq.reshape(1, n), logp.reshape(1, n), None, None, est, NO_CLAMPS,
                          False)
    return _core.finish_scalar(_core.merged_sums(part), reduction, "propagate")


# --------------------------------------------------------------------------- public API


def kl_mc(
    logq: ArrayLike,
    logp: ArrayLike,
    estimator: str = "k3",
    *,
    reverse: bool = False,
    reduction: str = "mean",
    axis: int | tuple[int, ...] | None = None,
    mask: ArrayLike | None = None,
    log_iw: ArrayLike | None = None,
    clamp_log_ratio: tuple[float, float] | None = None,
    clamp_value: tuple[float, float] | None = None,
    clamp_order: str = "term",
    nan_policy: str = "propagate",
    backend: str | None = None,
    norm: float | None = None,
    empty_rows: str = "skip",
    empty: float = math.nan,
    denominator: float | None = None,
) -> float | np.ndarray:
    """Monte Carlo estimate of KL(q||p) (or KL(p||q) with ``reverse=True``) from samples x ~ q.

    With ``l = logp - logq`` and ``r = exp(l)``, each sample contributes the term
    ``k1 = -l``, ``k2 = l**2/2``, ``k3 = (r - 1) - l`` (forward) or ``k1 = r*l``,
    ``k3 = r*l - (r - 1)`` (reverse), optionally clamped (``clamp_log_ratio`` on l,
    ``clamp_value`` on the term) and multiplied by ``exp(log_iw)``: ``exp(log_iw) *
    clip(t)`` with ``clamp_order="term"`` (verl, OpenRLHF, TRL), ``clip(exp(log_iw) * t)``
    with ``clamp_order="weighted"`` (NeMo-RL).

    Parameters
    ----------
    logq, logp : array_like of float16/32/64, same shape
        Log-densities of the samples under q (the sampling distribution) and p.
    estimator : {"k1", "k2", "k3", "abs"}
        The per-sample term (``fastkl._estimators`` has the table; "abs" is verl's ``|l|``
        penalty, not a KL estimate).
    reduction : {"none", "mean", "sum", "token-mean", "seq-mean-token-mean",
        "seq-mean-token-sum", "seq-mean-token-sum-norm"}
        "none" returns the weighted terms ``w * t`` (float32 for float16/32 inputs);
        "mean" is ``sum w*t / sum w`` and "sum" is ``sum w*t`` over ``axis``, accumulated in
        float64 (a Python float for a full reduction). The RL modes need 2-D
        ``[batch, tokens]`` inputs: masked mean over all tokens; masked mean per row then
        mean over rows with a token; masked sum per row then mean over rows with a token;
        masked sum over everything divided by ``norm`` (verl's "seq-mean-token-sum-norm":
        no division by the batch size).
    mask : array_like of bool or non-negative weights, optional
        0 excludes a position (a NaN there is ignored).
    log_iw : array_like, optional
        Log importance weights ``log q(x) - log mu(x)`` for samples drawn from mu.
    nan_policy : {"propagate", "omit", "raise"}
    backend : {None, "cython", "numba", "numpy"}
    norm : float > 0, optional
        The divisor of "seq-mean-token-sum-norm" (default: the token-axis length,
        ``logq.shape[1]``; verl's ``loss_scale_factor``; TRL ``dr_grpo``: batch size times
        ``max_completion_length``).
    empty_rows : {"skip", "zero"}
        seq-mean-* modes: average the rows with a token ("skip", verl) or every row, a row
        without tokens counting as 0 ("zero", TRL ``grpo``).
    empty : float
        The value of a mean over zero total weight (default NaN; 0.0 as TRL ``bnpo`` and
        Liger).
    denominator : float > 0, optional
        Data-parallel shards: the global token count (token-mean) or sequence count
        (seq-mean-*) that divides this shard's sum instead of the local count (verl's
        ``batch_num_tokens`` / ``global_batch_size``).

    Returns
    -------
    float or ndarray
        A lazy dask array (0-d for a full reduction) when an input is a dask array.
    """
    if (axis is None and mask is None and log_iw is None and clamp_log_ratio is None
            and clamp_value is None and norm is None and denominator is None
            and type(clamp_order) is str and clamp_order == "term"
            and type(nan_policy) is str and nan_policy == "propagate"
            and type(empty_rows) is str and empty_rows == "skip"
            and type(empty) is float and empty != empty):
        val = _plain_scalar(logq, logp, estimator, reverse, reduction, backend)
        if val is not None:
            return val
    if _dask.is_dask(logq, logp, mask, log_iw):
        return _dask.kl_mc(logq, logp, estimator, reverse=reverse, reduction=reduction,
                           axis=axis, mask=mask, log_iw=log_iw,
                           clamp_log_ratio=clamp_log_ratio, clamp_value=clamp_value,
                           clamp_order=clamp_order, nan_policy=nan_policy, backend=backend,
                           norm=norm, empty_rows=empty_rows, empty=empty,
                           denominator=denominator)
    inp = mc_inputs(logq, logp, estimator, reverse, mask, log_iw, clamp_log_ratio, clamp_value,
                    clamp_order=clamp_order,
                    ratio_only=reduction in _RATIO_REDUCTIONS and denominator is None)
    reduction = _checks.reduction(reduction, len(inp.shape), allow_norm=True)
    agg = aggregation(reduction, norm, empty_rows, empty, denominator)
    red_axes = _checks.axes(axis, len(inp.shape))
    policy = _checks.nan_policy(nan_policy)
    be = get_backend(backend)

    if reduction == "none":
        out = np.empty(inp.shape, dtype=inp.out_dtype)
        if out.size:
            views = natural_rows(inp.arrays(), inp.shape)
            mc_terms_sliced(be, views, inp.est, inp.clamp, out.reshape(views[0].shape))
            if policy == "raise":
                bad = np.isnan(out)
                if inp.mask is not None:
                    bad &= inp.mask != 0
                if bad.any():
                    _raise_first_nan(be, inp)
        return out if out.ndim else out[()]

    if reduction in _checks.RL_REDUCTIONS or reduction in _checks.NORM_REDUCTIONS:
        if reduction == "token-mean":
            red_axes, how = None, "mean"
        else:
            red_axes, how = (1,), None
    else:
        how = reduction
    tot, out_shape, _ = _row_partials(be, inp, red_axes, want_m2=False)
    if policy == "raise" and (tot[:, 4] > 0).any():
        _raise_first_nan(be, inp)
    if how is None:
        return _core.rl_reduce(tot, reduction, policy, agg, inp.shape[1])
    if out_shape == ():
        return _core.finish_scalar(tot[0], how, policy, agg)
    return _core.finish(tot, how, policy, agg.empty).reshape(out_shape)


def kl_mc_stats(
    logq: ArrayLike,
    logp: ArrayLike,
    estimator: str = "k3",
    *,
    reverse: bool = False,
    mask: ArrayLike | None = None,
    log_iw: ArrayLike | None = None,
    clamp_log_ratio: tuple[float, float] | None = None,
    clamp_value: tuple[float, float] | None = None,
    clamp_order: str = "term",
    nan_policy: str = "propagate",
    backend: str | None = None,
) -> KLStats:
    """Mean of the per-sample KL terms (see ``kl_mc``) with its error bar, in one fused pass.

    Per block of samples the kernel keeps (sum w, sum w*t, M2 = sum w*(t - mean)**2, ...);
    blocks merge in order (Chan et al.), so the result is identical for any thread count.
    ``std = sqrt(M2 / (W - sum w**2 / W))`` (reliability weights; ``M2 / (n - 1)`` without
    weights), ``sem = std / sqrt(n_eff)``, ``ci95 = mean -+ 1.96 * sem``.
    With dask array inputs: a ``dask.delayed`` object whose ``.compute()`` is the KLStats.
    """
    if _dask.is_dask(logq, logp, mask, log_iw):
        return _dask.kl_mc_stats(logq, logp, estimator, reverse=reverse, mask=mask,
                                 log_iw=log_iw, clamp_log_ratio=clamp_log_ratio,
                                 clamp_value=clamp_value, clamp_order=clamp_order,
                                 nan_policy=nan_policy, backend=backend)
    inp = mc_inputs(logq, logp, estimator, reverse, mask, log_iw, clamp_log_ratio, clamp_value,
                    clamp_order=clamp_order, ratio_only=True)
    policy = _checks.nan_policy(nan_policy)
    be = get_backend(backend)
    tot, _, _ = _row_partials(be, inp, None, want_m2=True)
    if policy == "raise" and tot[0, 4] > 0:
        _raise_first_nan(be, inp)
    return _core.stats(tot[0], policy)


def kl_mc_grad(
    logq: ArrayLike,
    logp: ArrayLike,
    estimator: str = "k3",
    *,
    reverse: bool = False,
    reduction: str = "mean",
    axis: int | tuple[int, ...] | None = None,
    mask: ArrayLike | None = None,
    log_iw: ArrayLike | None = None,
    clamp_log_ratio: tuple[float, float] | None = None,
    clamp_value: tuple[float, float] | None = None,
    clamp_order: str = "term",
    grad_estimator: str | None = None,
    iw_grad: bool = False,
    wrt: str = "logq",
    backend: str | None = None,
    norm: float | None = None,
    empty_rows: str = "skip",
    empty: float = math.nan,
    denominator: float | None = None,
) -> tuple[float | np.ndarray, np.ndarray]:
    """The reduced KL estimate (as ``kl_mc``, NaN propagating) and its derivative with
    respect to ``logq``, elementwise, in one fused pass.

    Per-term derivatives ``dt/dlogq``: k1 ``1``, k2 ``-l``, k3 ``-(r - 1)``, reverse k1
    ``-r (l + 1)``, reverse k3 ``-r l``, abs ``-sign(l)``. With ``iw = exp(log_iw)`` (1
    without ``log_iw``) the weighted term is ``v = iw * clip_v(t(clip_l(l)))``
    (``clamp_order="term"``) or ``v = clip_v(iw * t(clip_l(l)))`` (``"weighted"``,
    NeMo-RL), and the derivative is autograd's of that formula: a clamp passes the gradient
    where its input lies inside the bounds (inclusive) and 0 where it bites, so a clamped
    term has derivative 0 (verl ``low_var_kl``: logq = 0, logp = [0.1, 3, 25] gives
    [-0.105, 0, 0]). In the "weighted" order ``iw`` is also held constant where the
    log-ratio clamp bites (NeMo-RL's ``calculate_kl``), so such an element passes no
    gradient at all.

    ``iw_grad=True``: ``log_iw = logq - log mu`` depends on ``logq``, so the derivative
    also flows through the importance weight (``d iw / d logq = iw``): TRL's
    bias-corrected KL, and NeMo-RL's on-policy KL. Without ``log_iw`` the weight is
    ``exp(logq - stop_gradient(logq))``: 1 in value, with that derivative (NeMo-RL's KL
    without importance sampling).

    ``grad_estimator`` (straight-through, verl's "k1+", "k3+", "low_var_kl+" =
    ``grad_estimator="k2"``): the value is that of ``estimator`` (with its clamps), the
    derivative that of ``iw * t_g`` with ``t_g`` the unclamped term of ``grad_estimator``
    (taken with the same ``reverse``; ``iw_grad`` as above). This costs a second pass.

    ``wrt``: the input differentiated: "logq" (default), "logp" (the derivative of ``v``
    with respect to ``logp``: minus that with respect to ``logq`` with ``iw`` held fixed) or
    "log_iw" (``dv / dlog_iw``; needs ``log_iw``). The gradient has that input's shape.

    Each derivative is multiplied by the mask weight ``w`` and the reduction's
    normalisation (``1 / sum w`` for "mean" and "token-mean", ``1 / (B sum_j w_bj)`` for
    "seq-mean-token-mean", ``1 / B`` for "seq-mean-token-sum", B the number of rows with a
    token (every row with ``empty_rows="zero"``; ``denominator`` in place of ``sum w`` or B
    when given), ``1 / norm`` for "seq-mean-token-sum-norm"). Where a mean is over zero
    total weight the value is ``empty`` and the gradient 0. Returns ``(value, grad)`` with
    ``grad.shape == logq.shape``. ``norm``, ``empty_rows``, ``empty``, ``denominator``: as
    ``kl_mc``.
    """
    if _dask.is_dask(logq, logp, mask, log_iw):
        _dask.unsupported("kl_mc_grad")
    inp = mc_inputs(logq, logp, estimator, reverse, mask, log_iw, clamp_log_ratio,
                    clamp_value, clamp_order=clamp_order,
                    ratio_only=reduction in _RATIO_REDUCTIONS and denominator is None)
    gest = _checks.grad_estimator_code(grad_estimator, reverse)
    iw_grad = _checks.flag(iw_grad, "iw_grad")
    wrt = _checks.choice(wrt, _checks.GRAD_WRT, "wrt")
    if wrt == "log_iw" and inp.log_iw is None:
        raise ValueError("wrt='log_iw' needs log_iw (the derivative with respect to an "
                         "input that was not given)")
    # the kernels' iw_grad: 0 iw fixed, 1 also through iw (d iw/d logq = iw), 2 d/dlog_iw
    iw_mode = {"logq": int(iw_grad), "logp": 0, "log_iw": 2}[wrt]
    reduction = _checks.reduction(reduction, len(inp.shape), allow_norm=True)
    agg = aggregation(reduction, norm, empty_rows, empty, denominator)
    red_axes = _checks.axes(axis, len(inp.shape))
    be = get_backend(backend)
    how = reduction
    if reduction == "none":
        red_axes = None if len(inp.shape) < 2 else (len(inp.shape) - 1,)
    elif reduction == "token-mean":
        red_axes, how = None, "mean"
    elif reduction in _checks.RL_REDUCTIONS or reduction in _checks.NORM_REDUCTIONS:
        red_axes = (1,)
    views, out_shape, perm = _as_rows(inp.arrays(), inp.shape, red_axes)
    rows, n = views[0].shape
    # the normalisation depends on the weights only, so it is known before the fused pass
    if inp.mask is None:
        wrow = np.full(rows, float(n))
    else:
        wrow = views[2].sum(axis=1, dtype=np.float64)
    ncols = inp.shape[1] if len(inp.shape) == 2 else 0
    rowscale = _core.row_grad_scale(wrow, how, agg, ncols)

    # one fused pass, unless the derivative is another term's (straight-through)
    g_est, g_clamp = (inp.est, inp.clamp) if gest is None else (gest, NO_CLAMPS)
    gperm = np.empty(tuple(inp.shape[i] for i in perm), dtype=inp.out_dtype)
    if rows * n:
        g2 = gperm.reshape(rows, n)
        part = _sliced_partials(
            lambda v, rs, cs: be.mc_grad(*v, g_est, g_clamp, iw_mode, rowscale[rs],
                                         g2[rs, cs]), views, rows, n)
        if wrt == "logp":  # v depends on logp - logq: d/dlogp = -d/dlogq (iw fixed)
            np.negative(gperm, out=gperm)
    else:
        part = np.zeros((rows, 1, N_PARTIALS))
    grad = gperm.transpose(np.argsort(perm))
    if not grad.flags.c_contiguous:  # a copy only if an axis moved (ascontiguousarray would
        grad = grad.copy(order="C")  # also turn a 0-d gradient into shape (1,))
    if how == "none":
        value = np.empty(inp.shape, dtype=inp.out_dtype)
        if value.size:
            vviews = natural_rows(inp.arrays(), inp.shape)
            mc_terms_sliced(be, vviews, inp.est, inp.clamp, value.reshape(vviews[0].shape))
        return (value if value.ndim else value[()]), grad
    if gest is not None and rows * n:  # the value's own pass
        part = mc_partials_sliced(be, views, inp.est, inp.clamp, False)
    tot = _core.merge_blocks(part, m2=False)
    if how in ("mean", "sum"):
        if out_shape == ():
            return _core.finish_scalar(tot[0], how, "propagate", agg), grad
        return _core.finish(tot, how, "propagate", agg.empty).reshape(out_shape), grad
    return _core.rl_reduce(tot, reduction, "propagate", agg, ncols), grad
