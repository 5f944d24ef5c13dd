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
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from .backends import get_backend
from .backends._contract import BLOCK
from .files import LlamaSource, Source, load_small, open_source
from .stream import LogitsAccumulator, LogitsReport, MCAccumulator, merge_block_partials

ArrayLike = Any
PathOrArray = Any

DEFAULT_MEMORY_LIMIT = 256 << 20  # bytes
_MARGIN = 24 << 20  # allocator slack, Python objects, kernel scratch
_Z95 = 1.959963984540054


def _rss() -> int:
    """Resident set size of this process in bytes (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def _progress(total: int, desc: str, progress: bool | None, unit: str):
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if show:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                        file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return None


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


def _seq_terms(W, S, nbad, reduction: str, policy: str, e: int = 0) -> tuple[float, int]:
    """(sum of the per-row values, number of rows counted) of a seq-mean-* reduction for
    rows with weights ``W``, sums ``S`` (both in units of ``2**e``) and NaN counts ``nbad``
    (as ``kl_mc`` counts them)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        per_row = S / W if reduction == "seq-mean-token-mean" else np.ldexp(S, e)
    has = W > 0
    if policy == "propagate":
        per_row = np.where(nbad > 0, np.nan, per_row)
        has = has | (nbad > 0)
    return float(per_row[has].sum()), int(has.sum())


def _fold_piece(row_acc, piece: np.ndarray, e: int):
    """Adds one piece's (W, S, NaN count), in units of ``2**e``, to a long row's running
    ``(W, S, NaN count, unit exponent)`` (None: the row's first piece), both brought to the
    larger unit exactly (power-of-two scaling)."""
    w, s_, nb = float(piece[0]), float(piece[1]), float(piece[4])
    if row_acc is None:
        return (w, s_, nb, e)
    W, S, NB, E = row_acc
    top = max(E, e)
    return (math.ldexp(W, E - top) + math.ldexp(w, e - top),
            math.ldexp(S, E - top) + math.ldexp(s_, e - top), NB + nb, top)


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


_FILE_REDUCTIONS = ("mean", "sum", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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
    nan_policy: str = "propagate",
    backend: str | None = None,
    memory_limit: float = DEFAULT_MEMORY_LIMIT,
    progress: bool | None = None,
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
    only when stderr is a terminal).
    """
    acc = MCAccumulator(estimator, reverse=reverse, clamp_log_ratio=clamp_log_ratio,
                        clamp_value=clamp_value, backend=backend)
    policy = _checks.nan_policy(nan_policy)
    limit = _memory_limit(memory_limit)
    be = get_backend(backend)
    srcs: list[Source | None] = []
    try:
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
        _checks.reduction(reduction, len(q.shape))
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
        dtype = _checks.compute_dtype(np.empty(0, q.dtype if q.dtype.itemsize <= 8 else "f8"),
                                      np.empty(0, p.dtype if p.dtype.itemsize <= 8 else "f8"))
        seq = reduction.startswith("seq-")
        total = q.size
        per_el = q.dtype.itemsize + p.dtype.itemsize + 2 * dtype.itemsize + 16
        if m is not None:
            per_el += m.dtype.itemsize + 8
        if iw is not None:
            per_el += iw.dtype.itemsize + dtype.itemsize
        if getattr(be, "name", "") == "numpy":
            per_el += 80  # the reference allocates float64 temporaries
        tiny = np.zeros((1, 2), dtype=dtype)
        be.mc_partials(tiny, tiny, None, None, acc._est, acc._clamp, True)  # load / compile
        bar = _progress(total, "fastkl mc", progress, "el")
        # The reduction order is fixed by the data alone: units of _UNIT elements (groups
        # of whole short rows, or _UNIT-element pieces of a long row), each merged from its
        # kernel blocks by one call of the same shape, then folded in file order. The memory
        # budget only chooses how many units one read covers, so neither it nor the RSS of
        # the process changes a bit of the result.
        nrows, ncol = (math.prod(q.shape[:-1]), q.shape[-1]) if seq else (1, total)
        unit = _UNIT if ncol > _UNIT else _UNIT // max(ncol, 1) * max(ncol, 1)
        avail = _budget(limit, 0)
        if avail < unit * per_el:
            warnings.warn(f"memory_limit={limit} bytes is below what one block of {_UNIT} "
                          "elements needs here; streaming one block at a time", stacklevel=2)
        k = int(max(1, min(avail // (unit * per_el), (1 << 26) // unit)))
        seq_sum, seq_rows = 0.0, 0
        row_acc = None  # (W, S, NaN count, 2**e unit) of the long row being read
        for e0, e1, vshape, groups in _mc_reads(nrows, ncol, k):
            views = []
            for s in (q, p, m, iw):
                if s is None:
                    views.append(None)
                    continue
                v = s.read(e0, e1)
                if s is m:
                    v = _file_mask(v, m.path, e0, q.shape)
                else:
                    v = _checks.as_kernel_dtype(v, dtype)
                views.append(v.reshape(vshape))
            # extreme weights: each unit's weights divided by its own 2**e (exact), its sums
            # kept in 2**e units; per unit, so the bits do not depend on the read size
            wexp = [0] * len(groups)
            if views[2] is not None:
                wflat = views[2].reshape(-1)
                for g, (kind, a0, a1, _) in enumerate(groups):
                    lo, hi = (a0 * ncol, a1 * ncol) if kind == "rows" else (a0 * BLOCK,
                                                                            a1 * BLOCK)
                    wexp[g] = _checks.scale_weights(wflat[lo:hi])
            part = be.mc_partials(*views, acc._est, acc._clamp, True)
            if policy == "raise" and (part[..., 4] > 0).any():
                out = np.empty(vshape, dtype=dtype)
                be.mc_terms(*views, acc._est, acc._clamp, out)
                bad = np.isnan(out)
                if views[2] is not None:
                    bad &= views[2] != 0
                k0 = e0 + int(np.flatnonzero(bad.ravel())[0])
                idx = tuple(int(i) for i in np.unravel_index(k0, q.shape))
                raise ValueError(f"{q.path}: nan_policy='raise': the term at index {idx} is "
                                 "NaN")
            for (kind, a0, a1, row_end), e in zip(groups, wexp, strict=True):
                if kind == "rows":  # whole short rows [a0, a1) of this read
                    rows = merge_block_partials(part[a0:a1])  # [rows, 6]
                    acc.add_partials(np.append(merge_block_partials(rows[None])[0], e))
                    if seq:
                        s_, r_ = _seq_terms(rows[:, 0], rows[:, 1], rows[:, 4], reduction,
                                            policy, e)
                        seq_sum += s_
                        seq_rows += r_
                else:  # kernel blocks [a0, a1) of one piece of a long row
                    piece = merge_block_partials(part[:, a0:a1])[0]
                    acc.add_partials(np.append(piece, e))
                    if seq:
                        row_acc = _fold_piece(row_acc, piece, e)
                        if row_end:
                            s_, r_ = _seq_terms(*(np.array([v]) for v in row_acc[:3]),
                                                reduction, policy, row_acc[3])
                            seq_sum += s_
                            seq_rows += r_
                            row_acc = None
            del views, part
            for s in (q, p, m, iw):
                if s is not None:
                    s.release(e0, e1)
            if bar is not None:
                bar.update(e1 - e0)
        if bar is not None:
            bar.close()
    finally:
        _close_all(srcs)

    tot = acc._tot
    from .stream import stats_from_partials

    st = stats_from_partials(tot, "propagate" if policy == "propagate" else "omit")
    (S, W), nbad = acc.total, int(tot[4])
    nan_out = policy == "propagate" and nbad > 0
    if reduction in ("mean", "token-mean"):
        value = st.mean
    elif reduction == "sum":
        value = math.nan if nan_out else S
    else:
        value = seq_sum / seq_rows if seq_rows else math.nan
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
        if tokens is not None:
            tok = load_small(tokens, "tokens")
            where = tokens if isinstance(tokens, (str, os.PathLike)) else "tokens"
            if tok.size != rows:
                raise ValueError(f"{where}: {tok.size} tokens for {rows} rows of logits")
            try:
                tok = _checks.tokens_array(tok.reshape(rows), (rows,), vocab, ignore_index)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
        else:
            tok = None
            for s in (bs, ts):
                if s.tokens is not None and s.tokens.size == rows:
                    tok = _checks.tokens_array(s.tokens.reshape(rows), (rows,), vocab,
                                               ignore_index)
                    break
        keep = None
        if mask is not None:
            mk = load_small(mask, "mask")
            if mk.size != rows:
                raise ValueError(f"mask: {mk.size} values for {rows} rows of logits")
            keep = _checks.mask_array(mk.reshape(rows), (rows,)) != 0
        if exact_percentiles == "auto":
            exact = rows * 16 <= limit // 8
        else:
            exact = bool(exact_percentiles)
        acc = LogitsAccumulator(op, temperature=temperature, beta=beta, keep_values=exact,
                                nan_policy=nan_policy, ignore_index=ignore_index,
                                backend=backend)
        be = get_backend(backend)
        # warm the kernels up (extension load, JIT compile) before measuring the baseline
        tiny = np.zeros((1, 2), dtype=_checks.compute_dtype(
            np.empty(0, np.float32 if bs.dtype.itemsize < 8 else np.float64),
            np.empty(0, np.float32 if ts.dtype.itemsize < 8 else np.float64)))
        be.logits_rows(tiny, tiny, 0, 0.5, 1.0, False, None, np.empty(1))
        be.logits_token(tiny, np.zeros(1, np.int64), 1.0, -100, np.empty(1))
        bar = _progress(rows, "fastkl compare", progress, "row")
        per_row = _row_cost(bs, vocab) + _row_cost(ts, vocab) + 64
        if getattr(be, "name", "") == "numpy":
            per_row += vocab * 8 * 12  # the reference materializes float64 temporaries
        use_raw = acc.temperature == 1.0
        llama = isinstance(bs, LlamaSource) and op == "kl" and use_raw
        # + the llama.cpp arithmetic's temporaries (at most 1 M elements at a time)
        reserve = (rows * 16 if exact else 0) + (4 << 20) + ((28 << 20) if llama else 0)
        avail = _budget(limit, reserve)
        step = int(min(max(1, avail // per_row), 1 << 16, max(rows, 1)))
        if avail < per_row:
            warnings.warn(f"memory_limit={limit} bytes is below what one row of {vocab} "
                          "logits needs here; streaming one row at a time", stacklevel=2)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            if llama:
                a, _ = bs.decode(r0, r1, floor=False)
                b, _ = _read_rows(ts, r0, r1, vocab, floor=False)
                if b.dtype != np.float64:
                    b = b.astype(np.float32, copy=False)
                rpc = bs.rows_per_chunk
                c0 = r0
                while c0 < r1:  # llama.cpp's per-chunk table: a snapshot at each chunk end
                    c1 = min(r1, (c0 // rpc + 1) * rpc)
                    acc._add_llama_block(a[c0 - r0:c1 - r0], b[c0 - r0:c1 - r0],
                                         isinstance(ts, LlamaSource),
                                         None if tok is None else tok[c0:c1],
                                         None if keep is None else keep[c0:c1])
                    if c1 % rpc == 0:
                        acc._mark_chunk()
                    c0 = c1
                del a, b
                bs.release(r0 * vocab, r1 * vocab)
                ts.release(r0 * vocab, r1 * vocab)
                if bar is not None:
                    bar.update(r1 - r0)
                continue
            a, la = _read_rows(bs, r0, r1, vocab)
            b, lb = _read_rows(ts, r0, r1, vocab, floor=False)
            dt = _checks.compute_dtype(a, b)
            a = _checks.as_kernel_dtype(a, dt)
            b = _checks.as_kernel_dtype(b, dt)
            acc._add_block(a, b, None if tok is None else tok[r0:r1],
                           None if keep is None else keep[r0:r1],
                           token_logp_base=la if use_raw else None,
                           token_logp_test=lb if use_raw else None)
            del a, b
            bs.release(r0 * vocab, r1 * vocab)
            ts.release(r0 * vocab, r1 * vocab)
            if bar is not None:
                bar.update(r1 - r0)
        if bar is not None:
            bar.close()
    finally:
        _close_all(srcs)
    rep = acc.result()
    extra = {
        "base": os.fspath(base) if isinstance(base, (str, os.PathLike)) else "array",
        "test": os.fspath(test) if isinstance(test, (str, os.PathLike)) else "array",
        "rows": rows, "vocab": vocab, "temperature": acc.temperature, "block_rows": step,
    }
    from dataclasses import replace

    return replace(rep, extra=extra)
