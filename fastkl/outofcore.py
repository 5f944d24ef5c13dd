"""Out-of-core statistics over files larger than memory: ``kl_mc_file`` (Monte Carlo KL from
two log-density files) and ``compare_logits`` (llama.cpp-style comparison of two logit files).

Both read their inputs in blocks of rows (``files.Source``): each block is memory-mapped (or
decompressed), reduced by the same kernels as the in-memory API, folded into an accumulator
(``stream.MCAccumulator`` / ``stream.LogitsAccumulator``), and its pages are then dropped from
the process with ``madvise(MADV_DONTNEED)``. The block size is chosen from ``memory_limit``
minus the resident memory at the start of the call, so peak RSS (as ``/usr/bin/time -v``
reports it, mapped pages included) stays near ``memory_limit`` whatever the file size (in a
process that already holds more than that, the blocks take a quarter of ``memory_limit``).
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
    ``memory_limit`` bytes (default 256 MiB); ``progress``: a tqdm bar (None: only when
    stderr is a terminal).
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
        ncol = q.shape[-1] if seq else 1
        per_el = q.dtype.itemsize + p.dtype.itemsize + 2 * dtype.itemsize + 16
        if m is not None:
            per_el += m.dtype.itemsize + 8
        if iw is not None:
            per_el += iw.dtype.itemsize + dtype.itemsize
        if getattr(be, "name", "") == "numpy" or be.__name__.endswith("numpy_ref"):
            per_el += 80  # the reference allocates float64 temporaries
        tiny = np.zeros((1, 2), dtype=dtype)
        be.mc_partials(tiny, tiny, None, None, acc._est, acc._clamp, True)  # load / compile
        bar = _progress(total, "fastkl mc", progress, "el")
        avail = _budget(limit, 0)
        step = max(BLOCK, avail // per_el // BLOCK * BLOCK)
        step = min(step, 1 << 26)
        if seq:
            step = max(ncol, step // max(ncol, 1) * ncol)
        seq_sum, seq_rows = 0.0, 0
        e0 = 0
        while e0 < total:
            e1 = min(total, e0 + step)
            views = []
            for s in (q, p, m, iw):
                if s is None:
                    views.append(None)
                    continue
                v = s.read(e0, e1)
                if s is m:
                    v = _checks.mask_array(v, v.shape)
                else:
                    v = _checks.as_kernel_dtype(v, dtype)
                views.append(v.reshape(-1, ncol) if seq else v.reshape(1, -1))
            wexp = _checks.scale_weights(views[2])  # extreme weights: sums in 2**wexp units
            part = be.mc_partials(*views, acc._est, acc._clamp, True)
            rows = merge_block_partials(part)  # [rows, 6]
            nbad = rows[:, 4]
            if policy == "raise" and (nbad > 0).any():
                out = np.empty(views[0].shape, dtype=dtype)
                be.mc_terms(*views, acc._est, acc._clamp, out)
                bad = np.isnan(out)
                if views[2] is not None:
                    bad &= views[2] != 0
                k = e0 + int(np.flatnonzero(bad.ravel())[0])
                idx = tuple(int(i) for i in np.unravel_index(k, q.shape))
                raise ValueError(f"{q.path}: nan_policy='raise': the term at index {idx} is "
                                 "NaN")
            if seq:
                W, S = rows[:, 0], rows[:, 1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    per_row = S / W if reduction == "seq-mean-token-mean" else np.ldexp(S, wexp)
                has = W > 0
                if policy == "propagate":
                    per_row[nbad > 0] = np.nan
                    has |= nbad > 0
                seq_sum += float(per_row[has].sum())
                seq_rows += int(has.sum())
            acc.add_partials(np.append(merge_block_partials(rows[None])[0], wexp))
            del views, part
            for s in (q, p, m, iw):
                if s is not None:
                    s.release(e0, e1)
            if bar is not None:
                bar.update(e1 - e0)
            e0 = e1
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


def _read_rows(s: Source, r0: int, r1: int, vocab: int):
    """(float32/64 [rows, V], raw token log p or None) for rows r0:r1."""
    if isinstance(s, LlamaSource):
        return s.decode(r0, r1)
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
        if be.__name__.endswith("numpy_ref"):
            per_row += vocab * 8 * 12  # the reference materializes float64 temporaries
        reserve = (rows * 16 if exact else 0) + (4 << 20)
        avail = _budget(limit, reserve)
        step = int(min(max(1, avail // per_row), 1 << 16, max(rows, 1)))
        if avail < per_row:
            warnings.warn(f"memory_limit={limit} bytes is below what one row of {vocab} "
                          "logits needs here; streaming one row at a time", stacklevel=2)
        use_raw = acc.temperature == 1.0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            a, la = _read_rows(bs, r0, r1, vocab)
            b, lb = _read_rows(ts, r0, r1, vocab)
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
