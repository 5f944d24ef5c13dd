"""Dask arrays in, lazy dask results out: ``kl_mc``, ``kl_mc_stats`` and the logits ops.

``fastkl.mc`` and ``fastkl.logits`` call ``is_dask`` first; it costs a dict look-up when dask
was never imported, and this module imports dask only when a dask array actually arrives, so
``import fastkl`` never pays for it.

The graph follows the in-memory code path step for step, so the numbers are the same:

* Monte Carlo reductions: each dask chunk runs the backend's ``mc_partials`` on its
  ``[rows, n]`` view (reduced axes last, exactly the in-memory ``_as_rows`` layout) and keeps
  its per-``BLOCK`` partials (a ``[1, ...]`` object array per chunk: 6 float64 per 4096
  elements, ~0.3% of float32 input). The ordered merge concatenates the partials of every
  chunk along the reduced axes in chunk order (row-major over the chunk grid) and runs the
  in-memory merge (``_core.merge_blocks``, Chan et al.) and finish. Same chunking -> same
  bits on every run, any scheduler. When only the first reduced axis is chunked, at offsets
  that are multiples of ``BLOCK`` elements of the flattened reduced axes, the partials are
  the in-memory ones and so are the bits; otherwise the merge groups blocks differently and
  the result agrees to rounding (~1e-16 relative).
* Logits ops: each chunk computes one float64 value per row (a row is always whole: the
  vocabulary axis must be one chunk), exactly the in-memory per-row values. ``"none"`` weighs
  them per chunk; ``"mean"``/``"sum"`` gather the per-row values (8 bytes a row, 1/vocab of
  the input) into one task and reduce them with the in-memory code: the same bits as
  in-memory for every chunking.

Every kernel releases the GIL, so the threaded scheduler runs chunks in parallel. Errors that
depend on values (mask weights that are negative or not finite, ``nan_policy="raise"``) are
raised when the result is computed; everything else is checked when the graph is built.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from . import _checks, _core
from ._validate import LogitsRows, aggregation, logits_options, mc_inputs, meta, natural_rows
from .backends._contract import LOGITS_OPS, N_PARTIALS

ArrayLike = Any


# --------------------------------------------------------------------------- detection


def is_dask(*xs: Any) -> bool:
    """True if any argument is a dask collection (no import of dask, ever)."""
    if "dask" not in sys.modules:
        return False
    return any(type(x).__module__.startswith("dask") for x in xs if x is not None)


def unsupported(func: str) -> None:
    """Raise the TypeError for public functions that take no dask arrays (their output has
    the size of the input, so there is no reduction to distribute)."""
    raise TypeError(
        f"{func} does not take dask arrays; call .compute() on the inputs first, or apply "
        f"{func} per chunk with dask.array.map_blocks"
    )


def _da():
    try:
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - a dask array implies dask is importable
        raise ImportError(
            "dask inputs need dask[array]: pip install 'fastkl[dask]'"
        ) from exc
    return da


def _backend_name(backend: str | None) -> str:
    """The registry name of the backend ``backend`` resolves to here; tasks carry the name
    (modules do not pickle) and look the module up where they run."""
    from .backends import _MODULES, get_backend

    mod = get_backend(backend)  # validates the name and availability now, not at compute
    if backend is not None:
        return backend
    return next(n for n, path in _MODULES.items() if path == mod.__name__)


def _get_backend(name: str):
    from .backends import get_backend

    return get_backend(name)


# --------------------------------------------------------------------------- input checks


def _known_shape(x, name: str) -> None:
    if any(isinstance(s, float) and math.isnan(s) for s in x.shape):
        raise ValueError(
            f"{name} has unknown chunk sizes (shape {x.shape}); call "
            f"{name}.compute_chunk_sizes() first"
        )


def _dask_or_numpy(x, name: str, da):
    """A dask array as is (its collection type checked), anything else through numpy."""
    if type(x).__module__.startswith("dask"):
        if not isinstance(x, da.Array):
            raise TypeError(
                f"{name} is a {type(x).__name__}; fastkl takes dask.array.Array, not other "
                "dask collections (use .to_dask_array())"
            )
        _known_shape(x, name)
        return x
    try:
        return _checks._to_numpy(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None


def _empty_like_dtype(x) -> np.ndarray:
    """A zero-size 1-D numpy array of ``x``'s dtype: runs the in-memory dtype checks on a
    dask array without computing it."""
    return np.empty(0, dtype=x.dtype)


def _input(x, name: str, da):
    """A dask array as is, anything else through numpy; None refused as in memory."""
    if x is None:
        raise TypeError(f"{name} must be a float array, got None")
    return _dask_or_numpy(x, name, da)


def _aligned(a, chunks, da):
    """``a`` as a dask array with exactly ``chunks`` (the first dask input's chunking)."""
    if isinstance(a, da.Array):
        return a if a.chunks == chunks else a.rechunk(chunks)
    return da.from_array(a, chunks=chunks)


def _first_chunks(arrays, da):
    return next(a.chunks for a in arrays if isinstance(a, da.Array))


def _check_mask_dtype(m, shape: tuple, ref: str) -> None:
    _checks.same_shape(m, shape, "mask", ref)
    _checks.mask_array(_empty_like_dtype(m), (0,))


# --------------------------------------------------------------------------- MC: blocks


def _block_inputs(q, p, m, iw, est, clamp, dtype, ratio_only=False):
    """A chunk validated and converted as ``mc_inputs`` converts whole arrays (in the kernel
    dtype of the whole array)."""
    return mc_inputs(q, p, mask=m, log_iw=iw, ratio_only=ratio_only, est=est, clamp=clamp,
                     dtype=dtype)


def _raise_block_nan(terms, inp, offsets, perm) -> None:
    """nan_policy='raise': name the first NaN term of this chunk (``terms``, in its C order)
    by its index in the caller's (untransposed) array, with the message of the in-memory
    path."""
    shape = inp.shape

    def locate(k):
        local = np.unravel_index(k, shape) if shape else ()
        glob = [int(i) + off for i, off in zip(local, offsets, strict=False)]
        idx = [0] * len(perm)
        for axis, g in zip(perm, glob, strict=False):
            idx[axis] = g
        return idx, inp.logq[tuple(local)], inp.logp[tuple(local)]

    _core.raise_first_nan(terms, inp.mask, locate)


def _terms(be, inp) -> np.ndarray:
    """The weighted terms of a chunk, in its shape and kernel dtype."""
    out = np.empty(inp.shape, dtype=inp.dtype)
    if out.size:
        views = natural_rows(inp.arrays(), inp.shape)
        be.mc_terms(*views, inp.est, inp.clamp, out.reshape(views[0].shape))
    return out


def _offsets(block_info, ndim: int) -> list[int]:
    if not block_info or 0 not in block_info:
        return [0] * ndim
    return [int(lo) for lo, _ in block_info[0]["array-location"]]


def _mc_terms_block(q, p, m, iw, *, est, clamp, kdtype, policy, bname, block_info=None):
    """``reduction="none"`` for one chunk: the weighted terms, like the in-memory path."""
    inp = _block_inputs(q, p, m, iw, est, clamp, kdtype)
    out = _terms(_get_backend(bname), inp)
    if policy == "raise":
        ndim = len(inp.shape)
        _raise_block_nan(out, inp, _offsets(block_info, ndim), list(range(ndim)))
    return out


class _Scaled:
    """A cell's block partials whose weight sums are in units of ``2**e`` (extreme weights
    scaled by ``_checks.scale_weights``)."""

    __slots__ = ("part", "e")

    def __init__(self, part: np.ndarray, e: int) -> None:
        self.part, self.e = part, e


def _mc_partials_block(q, p, m, iw, *, est, clamp, kdtype, want_m2, nred, policy, bname,
                       perm, ndim, ratio_only=False, block_info=None):
    """Per-BLOCK partials of one chunk (reduced axes last), wrapped in a ``[1, ...]`` object
    array so that dask keeps one grid cell per chunk. ``ratio_only``: only ratios are
    wanted, so extreme weights are scaled (the cell is then a ``_Scaled``)."""
    inp = _block_inputs(q, p, m, iw, est, clamp, kdtype, ratio_only)
    wexp = inp.wexp
    shape = inp.shape
    nk = len(shape) - nred
    rows, n = math.prod(shape[:nk]), math.prod(shape[nk:])
    views = [None if a is None else a.reshape(rows, n) for a in inp.arrays()]
    be = _get_backend(bname)
    if rows * n == 0:
        part = np.zeros((rows, 1, N_PARTIALS))
    else:
        part = be.mc_partials(*views, est, clamp, want_m2)
    if policy == "raise" and (part[..., 4] > 0).any():
        _raise_block_nan(_terms(be, inp), inp, _offsets(block_info, len(shape)), perm)
    cell = np.empty((1,) * len(shape), dtype=object)
    cell[(0,) * len(shape)] = _Scaled(part, wexp) if wexp else part
    return cell


def _merged(cells: np.ndarray) -> np.ndarray:
    """The merged partials ``[rows, N_PARTIALS]`` of a grid of chunk cells that share their
    rows: blocks concatenated in row-major chunk order, then the in-memory merge."""
    parts = list(cells.reshape(-1))
    if any(isinstance(c, _Scaled) for c in parts):
        # one unit for all: the largest exponent of a cell with weight (the others' sums
        # shrink by powers of two: exact, or negligible where they fall below 2**-1022)
        es = [(c.e, c.part) if isinstance(c, _Scaled) else (0, c) for c in parts]
        top = max((e for e, pt in es if (pt[..., 0] > 0).any()), default=0)
        parts = [_core.in_units(pt, e, top) for e, pt in es]
    part = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return _core.merge_blocks(part)


def _mc_finish_block(cells, *, how, policy, nk, agg=_core.DEFAULT_AGG, block_info=None):
    """Mean or sum per output row of one output chunk (``cells``: its kept axes, of size 1,
    then the chunk grid of the reduced axes)."""
    tot = _merged(cells)
    if nk == 0:
        return np.asarray(_core.finish_scalar(tot[0], how, policy, agg), dtype=np.float64)
    shape = tuple(block_info[None]["chunk-shape"])
    return _core.finish(tot, how, policy, agg.empty).reshape(shape)


def _mc_rl_block(cells, *, reduction, policy, agg=_core.DEFAULT_AGG, ncols=0):
    """seq-mean-*: merge each row chunk across the token chunks, then the in-memory mean
    over rows (which needs every row, so this is one task)."""
    tot = np.concatenate([_merged(cells[i]) for i in range(cells.shape[0])], axis=0)
    return np.asarray(_core.rl_reduce(tot, reduction, policy, agg, ncols), dtype=np.float64)


def _stats_finish(cells, policy):
    """``kl_mc_stats`` from the merged partials: the in-memory formulas."""
    return _core.stats(_merged(cells)[0], policy)


# --------------------------------------------------------------------------- MC: graph


class _MCInputs:
    __slots__ = ("arrays", "est", "clamp", "dtype", "ndim")


def _mc_inputs(logq, logp, estimator, reverse, mask, log_iw, clamp_log_ratio,
               clamp_value, clamp_order="term") -> _MCInputs:
    """The in-memory validator (``_validate.mc_inputs``) run on zero-size stand-ins of the
    inputs' dtypes, then the shapes checked; every input becomes a dask array with the
    chunks of the first dask input."""
    da = _da()
    q, p = _input(logq, "logq", da), _input(logp, "logp", da)
    m = None if mask is None else _dask_or_numpy(mask, "mask", da)
    iw = None if log_iw is None else _input(log_iw, "log_iw", da)
    chk = mc_inputs(*(None if a is None else _empty_like_dtype(a) for a in (q, p)), estimator,
                    reverse, *(None if a is None else _empty_like_dtype(a) for a in (m, iw)),
                    clamp_log_ratio, clamp_value, clamp_order=clamp_order)
    for a, nm in ((p, "logp"), (m, "mask"), (iw, "log_iw")):
        if a is not None:
            _checks.same_shape(a, q.shape, nm)
    inp = _MCInputs()
    inp.est, inp.dtype, inp.clamp = chk.est, chk.dtype, chk.clamp
    chunks = _first_chunks([q, p, m, iw], da)
    inp.arrays = [None if a is None else _aligned(a, chunks, da) for a in (q, p, m, iw)]
    inp.ndim = len(q.shape)
    return inp


def _partials_grid(inp: _MCInputs, red_axes, want_m2: bool, policy: str, bname: str,
                   ratio_only: bool = False):
    """A dask object array with one cell per chunk of the (transposed) inputs, each holding
    that chunk's per-BLOCK partials; returns it with the number of kept axes."""
    da = _da()
    nd = inp.ndim
    red = tuple(range(nd)) if red_axes is None else tuple(red_axes)
    kept = tuple(i for i in range(nd) if i not in red)
    perm = kept + red
    arrays = inp.arrays
    if perm != tuple(range(nd)):
        arrays = [None if a is None else a.transpose(perm) for a in arrays]
    nred = len(red)
    if nred == 0:  # reduce over nothing: one-element rows, as the in-memory path does
        arrays = [None if a is None else a[..., None] for a in arrays]
        nred = 1
    ref = arrays[0]
    grid_chunks = tuple((1,) * len(c) for c in ref.chunks)
    cells = da.map_blocks(
        _mc_partials_block, *arrays,
        est=inp.est, clamp=inp.clamp, kdtype=inp.dtype.str, want_m2=want_m2, nred=nred,
        policy=policy, bname=bname, perm=perm, ndim=nd, ratio_only=ratio_only,
        chunks=grid_chunks, dtype=object, meta=np.empty((0,) * ref.ndim, dtype=object),
        token="fastkl-mc-partials",
    )
    return cells, ref.chunks[: ref.ndim - nred], nred


def kl_mc(logq, logp, estimator="k3", *, reverse=False, reduction="mean", axis=None,
          mask=None, log_iw=None, clamp_log_ratio=None, clamp_value=None,
          clamp_order="term", nan_policy="propagate", backend=None, norm=None,
          empty_rows="skip", empty=math.nan, denominator=None):
    """``fastkl.kl_mc`` on dask arrays: a lazy dask array (0-d for full reductions)."""
    da = _da()
    inp = _mc_inputs(logq, logp, estimator, reverse, mask, log_iw, clamp_log_ratio,
                     clamp_value, clamp_order)
    reduction = _checks.reduction(reduction, inp.ndim, allow_norm=True)
    agg = aggregation(reduction, norm, empty_rows, empty, denominator)
    red_axes = _checks.axes(axis, inp.ndim)
    policy = _checks.nan_policy(nan_policy)
    bname = _backend_name(backend)

    if reduction == "none":
        q = inp.arrays[0]
        return da.map_blocks(
            _mc_terms_block, *inp.arrays, est=inp.est, clamp=inp.clamp, kdtype=inp.dtype.str,
            dtype=inp.dtype, policy=policy, bname=bname,
            meta=np.empty((0,) * q.ndim, dtype=inp.dtype), token="fastkl-mc-terms",
        )

    if reduction == "token-mean":
        red_axes, how = None, "mean"
    elif reduction in _checks.RL_REDUCTIONS or reduction in _checks.NORM_REDUCTIONS:
        red_axes, how = (1,), None
    else:
        how = reduction
    cells, kept_chunks, nred = _partials_grid(
        inp, red_axes, False, policy, bname,
        ratio_only=(how == "mean" or reduction == "seq-mean-token-mean")
        and agg.denominator is None)
    nk = len(kept_chunks)
    red_pos = list(range(nk, cells.ndim))
    if how is None:
        cells = cells.rechunk({0: -1, 1: -1})
        return da.map_blocks(
            _mc_rl_block, cells, reduction=reduction, policy=policy, agg=agg,
            ncols=int(inp.arrays[0].shape[1]), drop_axis=[0, 1],
            chunks=(), dtype=np.float64, meta=np.empty((), dtype=np.float64),
            token="fastkl-mc-rl",
        )
    cells = cells.rechunk({ax: -1 for ax in red_pos})
    return da.map_blocks(
        _mc_finish_block, cells, how=how, policy=policy, nk=nk, agg=agg, drop_axis=red_pos,
        chunks=kept_chunks, dtype=np.float64, meta=np.empty((0,) * nk, dtype=np.float64),
        token="fastkl-mc-" + how,
    )


def kl_mc_stats(logq, logp, estimator="k3", *, reverse=False, mask=None, log_iw=None,
                clamp_log_ratio=None, clamp_value=None, clamp_order="term",
                nan_policy="propagate", backend=None):
    """``fastkl.kl_mc_stats`` on dask arrays: a ``dask.delayed`` object whose ``.compute()``
    is the ``KLStats``."""
    import dask

    inp = _mc_inputs(logq, logp, estimator, reverse, mask, log_iw, clamp_log_ratio,
                     clamp_value, clamp_order)
    policy = _checks.nan_policy(nan_policy)
    bname = _backend_name(backend)
    cells, _, _ = _partials_grid(inp, None, True, policy, bname, ratio_only=True)
    whole = cells.rechunk(-1).to_delayed().reshape(-1)[0]
    return dask.delayed(_stats_finish, pure=True)(whole, policy)


# --------------------------------------------------------------------------- logits


def _logits_block(a, b, m, *, op, names, beta, inv_t, log_probs, bname, reduction, kdtype,
                  slice_elems):
    """One chunk of rows (vocabulary last and whole): float64 value per row, computed as in
    ``logits``' in-memory ops; with ``reduction="none"`` also weighted and cast as there."""
    arrays = [a] if b is None else [a, b]
    arrays = [_checks.float_array(x, nm) for x, nm in zip(arrays, names, strict=True)]
    rows = LogitsRows(arrays, names, -1, m)
    vals = rows.values(_get_backend(bname), op, beta, inv_t, log_probs, slice_elems)
    if reduction == "none":
        return np.asarray(_core.reduce_rows(vals, rows.mask, "none", np.dtype(kdtype)))
    return vals


def _logits_total(vals, m, *, reduction, kdtype, empty=math.nan):
    """"mean"/"sum" over every row: the in-memory reduction of the gathered values (a mean
    over zero total weight is ``empty``)."""
    mask = _checks.mask_array(m, vals.shape)
    return np.asarray(_core.reduce_rows(vals, mask, reduction, np.dtype(kdtype), empty),
                      dtype=np.float64)


def logits_op(op: str, arrays: list, names: list[str], beta: float, temperature, axis, mask,
              reduction, log_probs, backend, slice_elems: int, empty=math.nan):
    """``kl_logits`` / ``jsd_logits`` / ``entropy_logits`` on dask arrays (``op`` as in
    ``LOGITS_OPS``): a lazy dask array of per-row values for ``reduction="none"``, a 0-d
    one for "mean"/"sum". ``slice_elems``: elements per kernel call in a chunk."""
    da = _da()
    conv, dtypes = [], []
    for x, nm in zip(arrays, names, strict=True):
        a = _input(x, nm, da)
        conv.append(a)
        dtypes.append(_checks.float_array(_empty_like_dtype(a), nm).dtype)
    reduction, inv_t = logits_options(reduction, temperature, log_probs)
    # the in-memory checks of shapes, axis and dtype, on stand-ins that take no memory
    rows = LogitsRows([meta(dt, a.shape) for a, dt in zip(conv, dtypes, strict=True)], names,
                      axis, None)
    ax, dtype, ref = rows.axis, rows.dtype, conv[0]
    m = None
    if mask is not None:
        m = _dask_or_numpy(mask, "mask", da)
        _check_mask_dtype(m, rows.lead, rows.mask_ref)
    for a, nm in zip(conv, names, strict=True):
        if isinstance(a, da.Array) and len(a.chunks[ax]) > 1:
            raise ValueError(
                f"{nm} is split into {len(a.chunks[ax])} chunks along the vocabulary axis "
                f"({ax}); each row must be one chunk: use {nm}.rechunk({{{ax}: -1}})"
            )
    bname = _backend_name(backend)

    chunks = _first_chunks(conv + [m], da)
    if not any(isinstance(a, da.Array) for a in conv):  # only the mask is a dask array
        chunks = chunks[:ax] + ((ref.shape[ax],),) + chunks[ax:]
    conv = [_aligned(a, chunks, da) for a in conv]
    moved = [da.moveaxis(a, ax, -1) if ax != ref.ndim - 1 else a for a in conv]
    lead_chunks = moved[0].chunks[:-1]
    if m is not None:
        m = _aligned(m, lead_chunks, da)

    nl = len(lead_chunks)
    lead = tuple(range(nl))
    full = lead + (nl,)
    args: list = [moved[0], full, moved[1] if len(moved) > 1 else None,
                  full if len(moved) > 1 else None, m, lead if m is not None else None]
    out_dtype = dtype if reduction == "none" else np.dtype(np.float64)
    vals = da.blockwise(
        _logits_block, lead, *args,
        op=LOGITS_OPS[op], names=names, beta=beta, inv_t=inv_t, log_probs=bool(log_probs),
        bname=bname, reduction=reduction, kdtype=dtype.str, slice_elems=slice_elems,
        dtype=out_dtype, concatenate=True,
        meta=np.empty((0,) * nl, dtype=out_dtype), token=f"fastkl-{op}-rows",
    )
    if reduction == "none":
        return vals
    whole = vals.rechunk(-1) if nl else vals
    mwhole = None if m is None else (m.rechunk(-1) if nl else m)
    return da.blockwise(
        _logits_total, (), whole, lead, mwhole, lead if mwhole is not None else None,
        reduction=reduction, kdtype=dtype.str, empty=empty, dtype=np.float64,
        concatenate=True, meta=np.empty((), dtype=np.float64), token=f"fastkl-{op}-{reduction}",
    )
