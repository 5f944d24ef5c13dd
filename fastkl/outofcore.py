"""Out-of-core statistics over files larger than memory: ``kl_mc_file`` (Monte Carlo KL from
two log-density files) and ``compare_logits`` (llama.cpp-style comparison of two logit files).

Both read their inputs in blocks of rows (``files.Source``): each block is memory-mapped (or
decompressed), reduced by the same kernels as the in-memory API, folded into an accumulator
(``stream.MCAccumulator`` / ``stream.LogitsAccumulator``), and its pages are then dropped from
the process with ``madvise(MADV_DONTNEED)``. The block size is chosen from ``memory_limit``
minus the resident memory at the start of the call, so peak RSS (as ``/usr/bin/time -v``
reports it, mapped pages included) stays near ``memory_limit`` whatever the file size (in a
process that already holds more than that, the blocks take a quarter of ``memory_limit``).
In ``kl_mc_file`` that choice never reaches the arithmetic: the reduction is cut into units
fixed by the file's shape (``_UNIT`` elements; a long row in pieces), so the same file gives
the same bits under any memory limit, process size or thread count.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import _checks, _core
from ._validate import aggregation
from .backends import get_backend
from .backends._contract import BLOCK
from .files import LlamaSource, Source, load_small, open_source
from .stream import LogitsAccumulator, LogitsReport, MCAccumulator, merge_block_partials

ArrayLike = Any
PathOrArray = Any

DEFAULT_MEMORY_LIMIT = 256 << 20  # bytes
_MARGIN = 24 << 20  # allocator slack, Python objects, kernel scratch


def _rss() -> int:
    """Resident set size of this process in bytes (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def _memory_limit(value) -> int:
    v = _checks.real_scalar(value, "memory_limit")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"memory_limit must be a positive number of bytes, got {value!r}")
    return int(v)


def _budget(limit: int, reserve: int) -> int:
    """Bytes the blocks may take: ``limit`` less what the process already holds, ``reserve``
    and a margin; but at least a quarter of ``limit``. A process already holding more than
    ``limit`` (a notebook with data loaded, a long test run) cannot be brought under it by the
    stream; there the blocks keep a bounded size instead of shrinking to a row at a time."""
    return max(limit - _rss() - reserve - _MARGIN, (limit - reserve) // 4)


def _close_all(sources):
    for s in sources:
        if s is not None:
            s.close()


# --------------------------------------------------------------------------- kl_mc_file

# elements per unit of kl_mc_file's fixed reduction order: each unit costs one merge call in
# Python (at 16 * BLOCK that was ~20% of the kernel time of a 5e7-element file, here within
# the noise) and about 10 MB of blocks in flight (float32 pairs, compiled backends)
_UNIT = 64 * BLOCK


def _mc_reads(nrows: int, ncol: int, k: int):
    """The reads of ``kl_mc_file`` over ``[nrows, ncol]`` (C order), ``k`` units each:
    ``(e0, e1, view shape, groups)``. Rows of at most ``_UNIT`` elements go in units of
    ``_UNIT // ncol`` whole rows (groups ``("rows", r0, r1, True)`` index the view's rows);
    a longer row is read in ``_UNIT``-element pieces (groups ``("piece", b0, b1, last)``
    index the kernel blocks of the ``[1, n]`` view; ``last`` marks the row's end)."""
    if nrows * ncol == 0:
        return
    if ncol <= _UNIT:
        per = _UNIT // ncol
        for r0 in range(0, nrows, per * k):
            r1 = min(nrows, r0 + per * k)
            groups = [("rows", g - r0, min(r1, g + per) - r0, True) for g in range(r0, r1, per)]
            yield r0 * ncol, r1 * ncol, (r1 - r0, ncol), groups
        return
    ub = _UNIT // BLOCK
    for r in range(nrows):
        for j0 in range(0, ncol, _UNIT * k):
            j1 = min(ncol, j0 + _UNIT * k)
            nblk = -(-(j1 - j0) // BLOCK)
            groups = [("piece", b, min(nblk, b + ub), j1 == ncol and b + ub >= nblk)
                      for b in range(0, nblk, ub)]
            yield r * ncol + j0, r * ncol + j1, (1, j1 - j0), groups


class _SeqRows:
    """The running seq-mean-* reduction of ``kl_mc_file``: the sum of the per-row values
    (``_core.seq_row_values``) and the number of rows counted, in file order; a long row
    read in pieces is first merged from its pieces (``row``: partials in units of ``2**e``,
    both sides brought to the larger unit exactly)."""

    def __init__(self, reduction: str, policy: str) -> None:
        self.reduction, self.policy = reduction, policy
        self.total, self.rows = 0.0, 0
        self.all_rows = 0  # rows with or without a token (empty_rows="zero")
        self.row: np.ndarray | None = None  # merged partials of the long row being read
        self.e = 0

    def add_rows(self, rows: np.ndarray, e: int) -> None:
        """Whole rows (merged partials ``[rows, N_PARTIALS]`` in units of ``2**e``)."""
        vals = _core.seq_row_values(rows[:, 0], rows[:, 1], rows[:, 4], self.reduction,
                                    self.policy, e)
        self.total += float(vals.sum())
        self.rows += vals.size
        self.all_rows += rows.shape[0]

    def add_piece(self, piece: np.ndarray, e: int, row_end: bool) -> None:
        """One piece of a long row (merged partials in units of ``2**e``)."""
        if self.row is None:
            self.row, self.e = piece, e
        else:
            top = max(self.e, e)
            self.row = _core.in_units(self.row, self.e, top) + _core.in_units(piece, e, top)
            self.e = top
        if row_end:
            self.add_rows(self.row[None], self.e)
            self.row = None

    def value(self, agg: _core.Aggregation) -> float:
        """``_core.rl_reduce``'s value, from the running sums."""
        if agg.denominator is not None:
            return self.total / agg.denominator
        n = self.all_rows if agg.empty_rows == "zero" else self.rows
        return self.total / n if n else agg.empty


def _file_mask(v: np.ndarray, path: str, e0: int, shape: tuple) -> np.ndarray:
    """``_checks.mask_array`` of a block of a mask file; a bad weight names the file and
    its index."""
    try:
        return _checks.mask_array(v, v.shape)
    except ValueError:
        w = v.astype(np.float64)
        i = int(np.flatnonzero(~(np.isfinite(w) & (w >= 0)))[0])
        idx = tuple(int(j) for j in np.unravel_index(e0 + i, shape))
        raise ValueError(f"{path}: mask weights must be finite and >= 0; found {float(w[i])!r} at "
                         f"index {idx}") from None
    except TypeError as exc:
        raise TypeError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class MCFileReport:
    """Result of ``kl_mc_file``: the ``kl_mc_stats`` fields (``mean``, ``std``, ``sem``, ``n``,
    ``ci95``), ``value`` (the requested ``reduction``), ``sum = sum w t``, ``weight = sum w``,
    ``n_nan`` (NaN terms at included positions) and the options used."""

    mean: float
    std: float
    sem: float
    n: int
    ci95: tuple[float, float]
    value: float
    reduction: str
    sum: float
    weight: float
    n_nan: int
    estimator: str
    reverse: bool

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["ci95"] = list(self.ci95)
        return d


_FILE_REDUCTIONS = ("mean", "sum", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                    "seq-mean-token-sum-norm")


def kl_mc_file(
    logq_path: PathOrArray,
    logp_path: PathOrArray,
    estimator: str = "k3",
    *,
    reverse: bool = False,
    reduction: str = "mean",
    mask: PathOrArray | None = None,
    log_iw: PathOrArray | None = None,
    clamp_log_ratio: tuple[float, float] | None = None,
    clamp_value: tuple[float, float] | None = None,
    clamp_order: str = "term",
    nan_policy: str = "propagate",
    backend: str | None = None,
    memory_limit: float = DEFAULT_MEMORY_LIMIT,
    progress: bool | None = None,
    norm: float | None = None,
    empty_rows: str = "skip",
    empty: float = math.nan,
    denominator: float | None = None,
) -> MCFileReport:
    """``kl_mc_stats`` (and ``kl_mc``'s reductions) over arrays in files, streamed in blocks.

    ``logq_path``, ``logp_path`` (and optionally ``mask``, ``log_iw``): paths of ``.npy``
    files (also ``.npz`` / ``.safetensors``; ``path::name`` picks a member) or arrays (a
    read-only ``np.memmap`` is paged like a file). Each block's per-4096-element partials
    ``(W, S, M2, ...)`` are merged in file order (Chan et al.), so the result matches
    ``kl_mc_stats`` on the whole array to rounding, and the same file gives the same bits.

    ``reduction``: "mean" / "token-mean" (``S / W``), "sum" (``S``), or for 2-D
    ``[batch, tokens]`` files "seq-mean-token-mean" / "seq-mean-token-sum" (mean over rows
    with a token of the per-row mean / sum), returned as ``.value``; the report always has
    the token-level mean, std, sem and 95% interval. Peak resident memory stays near
    ``memory_limit`` bytes (default 256 MiB), long rows included (a seq-mean-* row is read
    in pieces); the bits of the result do not depend on it. ``progress``: a tqdm bar (None:
    only when stderr is a terminal). ``reduction="seq-mean-token-sum-norm"`` and ``norm``,
    ``empty_rows``, ``empty``, ``denominator``: as ``kl_mc`` (they change ``.value`` only).
    """
    acc = MCAccumulator(estimator, reverse=reverse, clamp_log_ratio=clamp_log_ratio,
                        clamp_value=clamp_value, clamp_order=clamp_order,
                        nan_policy=nan_policy, backend=backend)
    limit = _memory_limit(memory_limit)
    be = get_backend(backend)
    srcs: list[Source | None] = []
    try:
        q, p, m, iw = _open_mc_sources(logq_path, logp_path, mask, log_iw, reduction, srcs)
        agg = aggregation(reduction, norm, empty_rows, empty, denominator)
        dtype = _checks.compute_dtype(*(np.empty(0, s.dtype if s.dtype.itemsize <= 8 else "f8")
                                        for s in (q, p)))
        seq = (_SeqRows(reduction, acc.nan_policy)
               if reduction in _checks.SEQ_REDUCTIONS else None)
        est, clamp = acc.kernel_options
        tiny = np.zeros((1, 2), dtype=dtype)
        be.mc_partials(tiny, tiny, None, None, est, clamp, True)  # load / compile
        bar = _core.progress_bar(q.size, "fastkl mc", progress, "el")
        # The reduction order is fixed by the data alone: units of _UNIT elements (groups
        # of whole short rows, or _UNIT-element pieces of a long row), each merged from its
        # kernel blocks by one call of the same shape, then folded in file order. The memory
        # budget only chooses how many units one read covers, so neither it nor the RSS of
        # the process changes a bit of the result.
        nrows, ncol = (math.prod(q.shape[:-1]), q.shape[-1]) if seq else (1, q.size)
        k = _units_per_read(ncol, _mc_bytes_per_element(be, q, p, m, iw, dtype), limit)
        for e0, e1, vshape, groups in _mc_reads(nrows, ncol, k):
            views = _read_views((q, p, m, iw), e0, e1, vshape, dtype)
            wexp = _unit_exponents(views[2], groups, ncol)
            part = be.mc_partials(*views, est, clamp, True)
            if acc.nan_policy == "raise" and (part[..., 4] > 0).any():
                _raise_file_nan(be, views, est, clamp, e0, q)
            _fold_units(acc, seq, part, groups, wexp)
            del views, part
            _release((q, p, m, iw), e0, e1, bar, e1 - e0)
        if bar is not None:
            bar.close()
    finally:
        _close_all(srcs)
    return _mc_file_report(acc, reduction, seq, agg, q.shape[-1] if q.shape else 0)


def _open_mc_sources(logq_path, logp_path, mask, log_iw, reduction, srcs: list):
    """The sources of ``kl_mc_file`` (appended to ``srcs`` as they open, for closing),
    checked: float logq / logp of one shape, a file reduction, mask and log_iw alike."""
    q = open_source(logq_path, "logq", prefer="logq")
    srcs.append(q)
    p = open_source(logp_path, "logp", prefer="logp")
    srcs.append(p)
    for s, nm in ((q, "logq"), (p, "logp")):
        if isinstance(s, LlamaSource) or (s.dtype.kind != "f"
                                          and not getattr(s, "_bf16", False)):
            raise TypeError(f"{s.path}: {nm} must hold a float array, got "
                            f"{'a llama.cpp logits file' if s.kind == 'llama' else s.dtype}")
    if p.shape != q.shape:
        raise ValueError(f"{p.path}: logp has shape {p.shape} but logq ({q.path}) has "
                         f"shape {q.shape}")
    if not isinstance(reduction, str) or reduction not in _FILE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_FILE_REDUCTIONS)} for files, got "
                         f"{reduction!r}")
    _checks.reduction(reduction, len(q.shape), allow_norm=True)
    m = iw = None
    if mask is not None:
        m = open_source(mask, "mask", prefer="mask")
        srcs.append(m)
        if m.shape != q.shape:
            raise ValueError(f"{m.path}: mask has shape {m.shape} but logq has {q.shape}")
        if m.dtype.kind not in "biuf":
            raise TypeError(f"{m.path}: mask must be bool or numeric, got {m.dtype}")
    if log_iw is not None:
        iw = open_source(log_iw, "log_iw", prefer="log_iw")
        srcs.append(iw)
        if iw.shape != q.shape:
            raise ValueError(f"{iw.path}: log_iw has shape {iw.shape} but logq has "
                             f"{q.shape}")
        if iw.dtype.kind != "f":
            raise TypeError(f"{iw.path}: log_iw must be a float array, got {iw.dtype}")
    return q, p, m, iw


def _mc_bytes_per_element(be, q, p, m, iw, dtype) -> int:
    """Bytes a read of ``kl_mc_file`` holds per element: mapped input, converted copies,
    the kernels' scratch."""
    per_el = q.dtype.itemsize + p.dtype.itemsize + 2 * dtype.itemsize + 16
    if m is not None:
        per_el += m.dtype.itemsize + 8
    if iw is not None:
        per_el += iw.dtype.itemsize + dtype.itemsize
    if getattr(be, "name", "") == "numpy":
        per_el += 80  # the reference allocates float64 temporaries
    return per_el


def _units_per_read(ncol: int, per_el: int, limit: int) -> int:
    """How many units of ``_UNIT`` elements one read of ``kl_mc_file`` covers."""
    unit = _UNIT if ncol > _UNIT else _UNIT // max(ncol, 1) * max(ncol, 1)
    avail = _budget(limit, 0)
    if avail < unit * per_el:
        warnings.warn(f"memory_limit={limit} bytes is below what one block of {_UNIT} "
                      "elements needs here; streaming one block at a time", stacklevel=3)
    return int(max(1, min(avail // (unit * per_el), (1 << 26) // unit)))


def _read_views(sources, e0: int, e1: int, vshape: tuple, dtype) -> list:
    """Elements ``e0:e1`` of (logq, logp, mask, log_iw) as kernel inputs of ``vshape``."""
    q, _, m, _ = sources
    views = []
    for s in sources:
        if s is None:
            views.append(None)
            continue
        v = s.read(e0, e1)
        if s is m:
            v = _file_mask(v, m.path, e0, q.shape)
        else:
            v = _checks.as_kernel_dtype(v, dtype)
        views.append(v.reshape(vshape))
    return views


def _unit_exponents(w: np.ndarray | None, groups, ncol: int) -> list[int]:
    """Extreme weights: each unit's weights divided in place by its own ``2**e`` (exact),
    its sums kept in ``2**e`` units; per unit, so the bits do not depend on the read size.
    Returns the e of each group (0 without weights)."""
    wexp = [0] * len(groups)
    if w is not None:
        wflat = w.reshape(-1)
        for g, (kind, a0, a1, _) in enumerate(groups):
            lo, hi = (a0 * ncol, a1 * ncol) if kind == "rows" else (a0 * BLOCK, a1 * BLOCK)
            wexp[g] = _checks.scale_weights(wflat[lo:hi])
    return wexp


def _raise_file_nan(be, views, est, clamp, e0: int, q: Source) -> None:
    """nan_policy='raise' in ``kl_mc_file``: the first NaN term of this read, named by the
    logq file and the index in it."""
    out = np.empty(views[0].shape, dtype=views[0].dtype)
    be.mc_terms(*views, est, clamp, out)

    def locate(k):
        return (np.unravel_index(e0 + k, q.shape), views[0].reshape(-1)[k],
                views[1].reshape(-1)[k])

    _core.raise_first_nan(out, views[2], locate, where=f"{q.path}: ")


def _fold_units(acc: MCAccumulator, seq: _SeqRows | None, part: np.ndarray, groups,
                wexp) -> None:
    """Each unit of a read merged from its kernel blocks and added, in file order, to the
    token-level accumulator and the seq-mean-* rows."""
    for (kind, a0, a1, row_end), e in zip(groups, wexp, strict=True):
        if kind == "rows":  # whole short rows [a0, a1) of this read
            rows = merge_block_partials(part[a0:a1])  # [rows, 6]
            acc.add_partials(np.append(merge_block_partials(rows[None])[0], e))
            if seq is not None:
                seq.add_rows(rows, e)
        else:  # kernel blocks [a0, a1) of one piece of a long row
            piece = merge_block_partials(part[:, a0:a1])[0]
            acc.add_partials(np.append(piece, e))
            if seq is not None:
                seq.add_piece(piece, e, row_end)


def _mc_file_report(acc: MCAccumulator, reduction: str, seq: _SeqRows | None,
                    agg: _core.Aggregation, ncols: int) -> MCFileReport:
    st = acc.result()
    (S, W), nbad = acc.total, acc.n_nan
    nan_out = acc.nan_policy == "propagate" and nbad > 0
    if reduction in ("mean", "token-mean"):
        if agg.denominator is not None:
            value = math.nan if nan_out else S / agg.denominator
        else:
            value = agg.empty if W == 0 and not nan_out else st.mean
    elif reduction == "sum":
        value = math.nan if nan_out else S
    elif reduction == "seq-mean-token-sum-norm":
        nrm = float(ncols) if agg.norm is None else agg.norm
        value = math.nan if nan_out else (S / nrm if nrm > 0 else agg.empty)
    else:
        value = seq.value(agg)
    return MCFileReport(st.mean, st.std, st.sem, st.n, st.ci95, value, reduction,
                        math.nan if nan_out else S, W, nbad, acc.estimator, acc.reverse)


# --------------------------------------------------------------------------- compare_logits


def _logits_geometry(s: Source, role: str) -> tuple[int, int]:
    if isinstance(s, LlamaSource):
        return s.shape
    if s.dtype.kind != "f" and not getattr(s, "_bf16", False):
        raise TypeError(f"{s.path}: {role} logits must be floating point, got {s.dtype}")
    if len(s.shape) == 0:
        raise ValueError(f"{s.path}: {role} logits must have a vocabulary axis, got a scalar")
    vocab = s.shape[-1]
    if vocab == 0:
        raise ValueError(f"{s.path}: {role} logits have an empty vocabulary axis")
    return math.prod(s.shape[:-1]), vocab


def _read_rows(s: Source, r0: int, r1: int, vocab: int, floor: bool = True):
    """(float32/64 [rows, V], raw token log p or None) for rows r0:r1. ``floor``: entries of
    a llama.cpp file at or below log p = -16 as -inf (the base side only: llama.cpp floors
    the base distribution, never the test one)."""
    if isinstance(s, LlamaSource):
        return s.decode(r0, r1, floor=floor)
    return s.read(r0 * vocab, r1 * vocab).reshape(r1 - r0, vocab), None


def _row_cost(s: Source, vocab: int) -> int:
    if isinstance(s, LlamaSource):
        return vocab * (2 + 4 + 1 + 4)  # mapped uint16, decoded float32, floor mask, slack
    isz = s.dtype.itemsize
    native = s.dtype.kind == "f" and isz >= 4 and s.dtype.isnative
    return vocab * (isz + (0 if native else 4 + isz))


def compare_logits(
    base: PathOrArray,
    test: PathOrArray,
    *,
    tokens: PathOrArray | None = None,
    temperature: float = 1.0,
    op: str = "kl",
    beta: float = 0.5,
    mask: PathOrArray | None = None,
    ignore_index: int = -100,
    exact_percentiles: bool | str = "auto",
    nan_policy: str = "propagate",
    backend: str | None = None,
    memory_limit: float = DEFAULT_MEMORY_LIMIT,
    progress: bool | None = None,
) -> LogitsReport:
    """Compare the next-token distributions of two models row by row, streaming from files:
    the statistics of llama.cpp's ``llama-perplexity --kl-divergence``.

    ``base`` and ``test``: logits ``[..., vocab]`` (vocabulary last) as arrays or paths of
    ``.npy``, ``.npz``, ``.safetensors`` or llama.cpp ``--kl-divergence-base`` files (see
    ``fastkl.files``); the same number of rows and vocabulary size. Per row, with
    ``P = softmax(base / T)`` and ``Q = softmax(test / T)``: ``op="kl"`` KL(P||Q) (llama.cpp's
    KLD), ``"jsd"`` JSD_beta(P, Q), ``"entropy"`` H(P). Also the rate of rows where argmax P =
    argmax Q ("Same top p").

    ``tokens`` (the observed next token per row; a path or array, else taken from a llama.cpp
    base file or a ``tokens`` array stored beside the logits): ``Δp = Q(tok) - P(tok)``
    statistics, RMS Δp, PPL(Q) = exp(mean -log Q(tok)), PPL(base), their ratio and ln ratio.
    ``mask``: bool per row, False rows skipped.

    With a llama.cpp base file, ``op="kl"`` and temperature 1, every per-row value follows
    llama.cpp's own arithmetic (``report.llama_compat``; docs/llama_compat.md): only base
    entries with log p > -16 count, their stored probabilities are not renormalized, the
    test side is the full float32 log-softmax of its logits (or, for a second base file, its
    stored log-probabilities as they are), negative per-row KL is kept, and percentiles
    interpolate in float32 as llama.cpp does, so the printed report equals llama.cpp's.

    Percentiles are exact when the per-row values are kept (``exact_percentiles=True``, or
    "auto" when 16 bytes per row fit in an eighth of ``memory_limit``), else from a quantile
    sketch accurate to 0.1% relative. Peak resident memory stays near ``memory_limit`` bytes
    (default 256 MiB). Returns a ``LogitsReport`` (``.to_dict()``).
    """
    limit = _memory_limit(memory_limit)
    if exact_percentiles not in (True, False, "auto"):
        raise ValueError(f"exact_percentiles must be True, False or 'auto', got "
                         f"{exact_percentiles!r}")
    srcs: list[Source] = []
    try:
        bs, ts, rows, vocab = _open_logits_sources(base, test, srcs)
        tok = _row_tokens(tokens, (bs, ts), rows, vocab, ignore_index)
        keep = None if mask is None else _row_keep(mask, rows)
        if exact_percentiles == "auto":
            exact = rows * 16 <= limit // 8
        else:
            exact = bool(exact_percentiles)
        acc = LogitsAccumulator(op, temperature=temperature, beta=beta, keep_values=exact,
                                nan_policy=nan_policy, ignore_index=ignore_index,
                                backend=backend)
        be = get_backend(backend)
        _warm_logits(be, bs, ts)  # before measuring the baseline
        bar = _core.progress_bar(rows, "fastkl compare", progress, "row")
        use_raw = acc.temperature == 1.0
        llama = isinstance(bs, LlamaSource) and op == "kl" and use_raw
        step = _rows_per_read(be, bs, ts, rows, vocab, limit, exact, llama)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            tk = None if tok is None else tok[r0:r1]
            kp = None if keep is None else keep[r0:r1]
            if llama:
                _add_llama_rows(acc, bs, ts, r0, r1, vocab, tk, kp)
            else:
                a, la = _read_rows(bs, r0, r1, vocab)
                b, lb = _read_rows(ts, r0, r1, vocab, floor=False)
                dt = _checks.compute_dtype(a, b)
                acc._add_block(_checks.as_kernel_dtype(a, dt), _checks.as_kernel_dtype(b, dt),
                               tk, kp, token_logp_base=la if use_raw else None,
                               token_logp_test=lb if use_raw else None)
                del a, b
            _release((bs, ts), r0 * vocab, r1 * vocab, bar, r1 - r0)
        if bar is not None:
            bar.close()
    finally:
        _close_all(srcs)
    extra = {
        "base": os.fspath(base) if isinstance(base, (str, os.PathLike)) else "array",
        "test": os.fspath(test) if isinstance(test, (str, os.PathLike)) else "array",
        "rows": rows, "vocab": vocab, "temperature": acc.temperature, "block_rows": step,
    }
    return replace(acc.result(), extra=extra)


def _open_logits_sources(base, test, srcs: list):
    """The base and test sources (appended to ``srcs``), with their common rows and vocab."""
    bs = open_source(base, "base")
    srcs.append(bs)
    ts = open_source(test, "test")
    srcs.append(ts)
    rows, vocab = _logits_geometry(bs, "base")
    trows, tvocab = _logits_geometry(ts, "test")
    if (rows, vocab) != (trows, tvocab):
        raise ValueError(f"shape mismatch: base {bs.path} has {rows} rows x {vocab} vocab "
                         f"(shape {bs.shape}) but test {ts.path} has {trows} rows x "
                         f"{tvocab} vocab (shape {ts.shape})")
    return bs, ts, rows, vocab


def _row_tokens(tokens, sources, rows: int, vocab: int, ignore_index):
    """The checked token per row: ``tokens`` (a path or array), else those stored with a
    source, else None."""
    if tokens is not None:
        tok = load_small(tokens, "tokens")
        where = tokens if isinstance(tokens, (str, os.PathLike)) else "tokens"
        if tok.size != rows:
            raise ValueError(f"{where}: {tok.size} tokens for {rows} rows of logits")
        try:
            return _checks.tokens_array(tok.reshape(rows), (rows,), vocab, ignore_index)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    for s in sources:
        if s.tokens is not None and s.tokens.size == rows:
            return _checks.tokens_array(s.tokens.reshape(rows), (rows,), vocab, ignore_index)
    return None


def _row_keep(mask, rows: int) -> np.ndarray:
    """The rows to keep (mask != 0) of a per-row mask (a path or array)."""
    mk = load_small(mask, "mask")
    if mk.size != rows:
        raise ValueError(f"mask: {mk.size} values for {rows} rows of logits")
    return _checks.mask_array(mk.reshape(rows), (rows,)) != 0


def _warm_logits(be, bs: Source, ts: Source) -> None:
    """Load / compile the logits kernels (extension load, JIT) on a tiny input."""
    tiny = np.zeros((1, 2), dtype=_checks.compute_dtype(
        np.empty(0, np.float32 if bs.dtype.itemsize < 8 else np.float64),
        np.empty(0, np.float32 if ts.dtype.itemsize < 8 else np.float64)))
    be.logits_rows(tiny, tiny, 0, 0.5, 1.0, False, None, np.empty(1))
    be.logits_token(tiny, np.zeros(1, np.int64), 1.0, -100, np.empty(1))


def _rows_per_read(be, bs, ts, rows: int, vocab: int, limit: int, exact: bool,
                   llama: bool) -> int:
    """Rows of ``compare_logits``'s reads: what the memory budget allows."""
    per_row = _row_cost(bs, vocab) + _row_cost(ts, vocab) + 64
    if getattr(be, "name", "") == "numpy":
        per_row += vocab * 8 * 12  # the reference materializes float64 temporaries
    # + the llama.cpp arithmetic's temporaries (at most 1 M elements at a time)
    reserve = (rows * 16 if exact else 0) + (4 << 20) + ((28 << 20) if llama else 0)
    avail = _budget(limit, reserve)
    step = int(min(max(1, avail // per_row), 1 << 16, max(rows, 1)))
    if avail < per_row:
        warnings.warn(f"memory_limit={limit} bytes is below what one row of {vocab} "
                      "logits needs here; streaming one row at a time", stacklevel=3)
    return step


def _add_llama_rows(acc: LogitsAccumulator, bs: LlamaSource, ts: Source, r0: int, r1: int,
                    vocab: int, tok, keep) -> None:
    """Rows ``r0:r1`` in llama.cpp arithmetic, with a snapshot of the running statistics
    at each end of a llama.cpp chunk (its per-chunk table)."""
    a, _ = bs.decode(r0, r1, floor=False)
    b, _ = _read_rows(ts, r0, r1, vocab, floor=False)
    if b.dtype != np.float64:
        b = b.astype(np.float32, copy=False)
    rpc = bs.rows_per_chunk
    c0 = r0
    while c0 < r1:
        c1 = min(r1, (c0 // rpc + 1) * rpc)
        sl = slice(c0 - r0, c1 - r0)
        acc._add_llama_block(a[sl], b[sl], isinstance(ts, LlamaSource),
                             None if tok is None else tok[sl],
                             None if keep is None else keep[sl])
        if c1 % rpc == 0:
            acc._mark_chunk()
        c0 = c1


def _release(sources, e0: int, e1: int, bar, done: int) -> None:
    """Drop the pages of elements ``e0:e1`` of each source; advance the progress bar."""
    for s in sources:
        if s is not None:
            s.release(e0, e1)
    if bar is not None:
        bar.update(done)
