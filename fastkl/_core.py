"""The private middle layer: how per-block partials become results, written once.

Every public path (``fastkl.mc``, ``fastkl.logits``, the accumulators of ``fastkl.stream``,
the file functions of ``fastkl.outofcore`` and the dask graphs of ``fastkl._dask``) reduces
through the functions here, so that one formula is never written twice:

* ``merge_blocks``: per-block partials ``[rows, nblk, N_PARTIALS]`` merged in block order
  (Chan et al.) into ``[rows, N_PARTIALS]``;
* ``finish`` / ``finish_scalar``: per-row mean or sum from merged partials;
* ``seq_row_values`` / ``rl_reduce``: the RL reductions over ``[batch, tokens]`` rows;
* ``stats``: merged partials -> ``KLStats`` (mean, std, sem, 95% interval; ``Z95``);
* ``in_units`` / ``ratio_weights``: the power-of-two unit of extreme weight sums;
* ``reduce_rows``: per-row values of the logits ops -> "none" / "mean" / "sum";
* ``raise_first_nan``: the one ``nan_policy="raise"`` error.

Partials are ``[W, S, M2, sum w**2, NaN count, n]`` (``backends._contract``). This module
imports no public fastkl module, so every one of them may import it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from . import _checks

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Aggregation:
    """The options of the RL reductions beyond their name (``_validate.aggregation``).

    ``norm``: the divisor of "seq-mean-token-sum-norm" (None: the token-axis length);
    ``empty_rows``: "skip" (seq-mean-* average the rows with a token) or "zero" (every row
    counts, a row without tokens as 0); ``empty``: the value of a mean over zero total
    weight; ``denominator``: a given token count (token-mean) or sequence count
    (seq-mean-*) that divides the sum instead of the local one."""

    norm: float | None = None
    empty_rows: str = "skip"
    empty: float = math.nan
    denominator: float | None = None


DEFAULT_AGG = Aggregation()


@dataclass(frozen=True)
class KLStats:
    """Summary of per-sample KL terms: mean with its standard error and a 95% interval.

    ``std`` is the (weighted, unbiased) standard deviation of the terms, ``sem = std /
    sqrt(n_eff)`` with Kish's effective size ``n_eff = (sum w)**2 / sum w**2`` (= ``n`` for an
    unweighted or boolean mask), ``ci95 = mean -+ 1.96 sem`` (normal approximation).
    """

    mean: float
    std: float
    sem: float
    n: int
    ci95: tuple[float, float]


# its public home (pickles name the class by it; fastkl.mc re-exports it)
KLStats.__module__ = "fastkl.mc"


# --------------------------------------------------------------------------- partials


def merge_blocks(part: np.ndarray, m2: bool = True) -> np.ndarray:
    """Merge per-block partials ``[rows, nblk, N_PARTIALS]`` in block order (Chan et al.):
    returns ``[rows, N_PARTIALS]`` with column 2 the merged M2. ``m2=False``: the caller
    reads no M2 (a mean, a sum): column 2 is then the plain sum of the blocks' M2, every
    other column the same bits.

    The order of every floating-point operation is part of the determinism contract (same
    bits for any thread count, chunking of a stream, backend): the column sums run over the
    blocks in order from +0.0 (numpy's ``sum`` over a non-contiguous axis), the spread
    ``sum_b W_b (mean_b - mean)**2`` is numpy's pairwise sum (``_pairwise``). One row of at
    most ``_MERGE_PY_MAX`` blocks is merged in Python floats (the same operations in the same
    order, so the same bits: tests/test_merge.py checks it against the numpy form; a row
    whose merge holds a NaN is redone in numpy, whose vector loops decide which NaN, of
    which sign, an add keeps): numpy's per-call overhead on arrays this small is ~15 us, the
    Python merge of 3 blocks ~3 us."""
    rows, nblk = part.shape[0], part.shape[1]
    if nblk == 1:  # one block per row: nothing to merge (the small-input fast path)
        return part[:, 0, :]
    if not m2:
        if rows == 1 and nblk <= _MERGE_PY_MAX and part.dtype == np.float64:
            return np.array([_column_sums(part[0].tolist())])
        return part.sum(axis=1)
    if rows == 1 and nblk <= _MERGE_PY_MAX and part.dtype == np.float64:
        tot = _merge_row(part[0].tolist())
        s = 0.0
        for x in tot:
            s += x
        if s == s:  # no NaN (inf - inf also lands in numpy, harmlessly)
            return np.array([tot])
        # a NaN result: numpy's vector loops decide which operand's NaN (and sign) an add
        # keeps, so a NaN is only bit-identical when numpy makes it
    return _merge_numpy(part)


def merged_sums(part: np.ndarray):
    """``merge_blocks(part, m2=False)[0]`` of a one-row ``part``: a list of Python floats
    (the same values) when the row has few blocks, which saves building arrays."""
    nblk = part.shape[1]
    if nblk == 1:
        return part[0, 0].tolist()
    if nblk <= _MERGE_PY_MAX and part.dtype == np.float64:
        return _column_sums(part[0].tolist())
    return part[0].sum(axis=0)


# one row of up to this many blocks is merged in Python floats (above it numpy is faster)
_MERGE_PY_MAX = 64
_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE: the unrolled pairwise sum's largest leaf


def _pairwise(a: list, lo: int, n: int) -> float:
    """numpy's pairwise sum of the floats ``a[lo:lo + n]`` (``n >= 1``), operation for
    operation: a plain loop below 8, eight interleaved accumulators up to 128, halves (cut
    at a multiple of 8) above."""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    if n <= _PW_BLOCK:
        r0, r1, r2, r3, r4, r5, r6, r7 = a[lo:lo + 8]
        end = lo + n - n % 8
        i = lo + 8
        while i < end:
            r0 += a[i]
            r1 += a[i + 1]
            r2 += a[i + 2]
            r3 += a[i + 3]
            r4 += a[i + 4]
            r5 += a[i + 5]
            r6 += a[i + 6]
            r7 += a[i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < lo + n:
            res += a[i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise(a, lo, n2) + _pairwise(a, lo + n2, n - n2)


def _column_sums(blocks: list) -> list:
    """``part.sum(axis=1)`` of one row, its blocks given as lists of floats: the blocks
    added in order to +0.0, column by column (a sum has no NaN-sign ambiguity here: numpy's
    strided reduction adds in the same order, tests/test_merge.py)."""
    tot = [0.0] * len(blocks[0])
    for b in blocks:
        tot = [t + x for t, x in zip(tot, b, strict=True)]
    return tot


def _merge_row(blocks: list) -> list:
    """``_merge_numpy`` of one row, its blocks given as lists of floats (``tolist``)."""
    cols = list(zip(*blocks, strict=True))
    tot = []
    for col in cols:
        s = 0.0
        for x in col:
            s += x
        tot.append(s)
    W = tot[0]
    mean = tot[1] / W if W > 0 else 0.0
    spread = []
    for w, s in zip(cols[0], cols[1], strict=True):
        d = (s / w if w > 0 else 0.0) - mean
        spread.append(w * (d * d))
    tot[2] = tot[2] + (0.0 + _pairwise(spread, 0, len(spread)))
    return tot


def _merge_numpy(part: np.ndarray) -> np.ndarray:
    """``merge_blocks`` in numpy (any rows and blocks): the reference form."""
    tot = part.sum(axis=1)
    W = tot[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(W > 0, tot[:, 1] / W, 0.0)
        bmean = np.where(part[..., 0] > 0, part[..., 1] / part[..., 0], 0.0)
        spread = (part[..., 0] * (bmean - mean[:, None]) ** 2).sum(axis=1)
    tot[:, 2] = tot[:, 2] + spread
    return tot


def finish_scalar(row: np.ndarray, how: str, policy: str, agg: Aggregation = DEFAULT_AGG
                  ) -> float:
    """``finish`` for a single row, in Python floats (cheap for small inputs). A mean is
    ``S / W`` (``S / agg.denominator`` when given; ``agg.empty`` when ``W == 0``)."""
    W, S, nbad = float(row[0]), float(row[1]), row[4]
    if policy == "propagate" and nbad > 0:
        return math.nan
    if how == "sum":
        return S
    if agg.denominator is not None:
        return S / agg.denominator
    return S / W if W > 0 else agg.empty


def finish(tot: np.ndarray, how: str, policy: str, empty: float = math.nan) -> np.ndarray:
    """Per-row mean or sum from merged partials, honouring the NaN policy (a mean over no
    weight is ``empty``)."""
    W, S, nbad = tot[:, 0], tot[:, 1], tot[:, 4]
    with np.errstate(invalid="ignore", divide="ignore"):
        val = S / W if how == "mean" else S.copy()
    if how == "mean":
        val[W == 0] = empty
    if policy == "propagate":
        val[nbad > 0] = np.nan
    return val


def seq_row_values(W, S, nbad, reduction: str, policy: str, e: int = 0) -> np.ndarray:
    """The per-row values a seq-mean-* reduction averages, for the rows that count (a
    token, or a NaN term under "propagate"): the row mean ``S / W`` (seq-mean-token-mean)
    or sum ``S`` (seq-mean-token-sum) of rows with weights ``W`` and sums ``S`` (both in
    units of ``2**e``) and NaN counts ``nbad``."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        per_row = S / W if reduction == "seq-mean-token-mean" else np.ldexp(S, e)
    has = W > 0
    if policy == "propagate":
        per_row = np.where(nbad > 0, np.nan, per_row)
        has = has | (nbad > 0)
    return per_row[has]


def rl_reduce(tot: np.ndarray, reduction: str, policy: str, agg: Aggregation = DEFAULT_AGG,
              ncols: int = 0) -> float:
    """seq-mean-token-mean / seq-mean-token-sum / seq-mean-token-sum-norm from merged
    partials per row (``[rows, N_PARTIALS]``, weights in units of 1 unless the value is a
    ratio): the mean over rows with a token (``agg.empty_rows="zero"``: over all rows;
    ``agg.denominator``: the sum divided by it) of the per-row mean / sum; for "-norm" the
    sum over all rows divided by ``agg.norm`` (default ``ncols``, the token-axis length).
    A mean over no rows is ``agg.empty``."""
    if reduction == "seq-mean-token-sum-norm":
        if policy == "propagate" and (tot[:, 4] > 0).any():
            return math.nan
        norm = float(ncols) if agg.norm is None else agg.norm
        return float(np.sum(tot[:, 1])) / norm if norm > 0 else agg.empty
    vals = seq_row_values(tot[:, 0], tot[:, 1], tot[:, 4], reduction, policy)
    if agg.denominator is not None:
        return float(np.sum(vals)) / agg.denominator
    if agg.empty_rows == "zero":
        return float(np.sum(vals)) / tot.shape[0] if tot.shape[0] else agg.empty
    if not vals.size:
        return agg.empty
    return float(np.mean(vals))


def row_grad_scale(wrow: np.ndarray, how: str, agg: Aggregation = DEFAULT_AGG,
                   ncols: int = 0) -> np.ndarray:
    """The factor of each row's per-term derivatives for a reduction ``how`` ("none", "sum",
    "mean", or an RL reduction after "token-mean" became "mean") of rows with weight sums
    ``wrow``: the derivative of ``finish`` / ``rl_reduce`` with respect to a row's weighted
    sum (0 for rows without weight, where an ``empty`` value is a constant)."""
    has = wrow > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        if how in ("none", "sum"):
            return np.ones(wrow.shape)
        if how == "mean":
            if agg.denominator is not None:
                return np.where(has, 1.0 / agg.denominator, 0.0)
            return np.where(has, 1.0 / wrow, 0.0)
        if how == "seq-mean-token-sum-norm":
            norm = float(ncols) if agg.norm is None else agg.norm
            return np.where(has, 1.0 / norm, 0.0) if norm > 0 else np.zeros(wrow.shape)
        if agg.denominator is not None:
            nrows = agg.denominator
        elif agg.empty_rows == "zero":
            nrows = max(wrow.size, 1)
        else:
            nrows = max(int(has.sum()), 1)
        base = np.where(has, 1.0 / nrows, 0.0)
        rowscale = base / wrow if how == "seq-mean-token-mean" else base
        return np.where(has, rowscale, 0.0)


def stats(tot: np.ndarray, policy: str) -> KLStats:
    """``KLStats`` from merged partials ``[W, S, M2, sum w**2, NaN count, n, ...]``: the one
    place partials become statistics (``kl_mc_stats``, ``MCAccumulator``, files, dask).
    Every field is a ratio, so the unit of the weight sums (``2**e`` for scaled weights)
    does not matter."""
    W, S, M2, W2, nbad, cnt = (float(v) for v in tot[:6])
    n = int(cnt)
    if (policy == "propagate" and nbad > 0) or not W > 0:
        nan = math.nan
        return KLStats(nan, nan, nan, n, (nan, nan))
    mean = S / W
    denom = W - W2 / W
    std = math.sqrt(M2 / denom) if n > 1 and denom > 0 else math.nan
    # sum w**2 == 0 only for weights that were never scaled (user partials): no n_eff
    sem = std / math.sqrt(W * W / W2) if W2 > 0 else math.nan
    return KLStats(mean, std, sem, n, (mean - Z95 * sem, mean + Z95 * sem))


# --------------------------------------------------------------------------- weight units


def in_units(part: np.ndarray, e_from: int, e_to: int) -> np.ndarray:
    """Partials (``N_PARTIALS`` along the last axis) whose weight sums are in units of
    ``2**e_from`` re-expressed in units of ``2**e_to`` (W, S, M2 scale by ``2**d``, sum w**2
    by ``4**d``: exact, or negligible where they fall below 2**-1022); ``part`` itself when
    the units agree, else a new array."""
    if e_from == e_to:
        return part
    out = np.array(part, dtype=np.float64)
    d = e_from - e_to
    with np.errstate(over="ignore", under="ignore"):
        out[..., 0:3] = np.ldexp(out[..., 0:3], d)
        out[..., 3] = np.ldexp(out[..., 3], 2 * d)
    return out


def ratio_weights(mask: np.ndarray | None) -> np.ndarray | None:
    """Weights for a ratio (a weighted mean): extreme ones scaled by a power of two
    (``_checks.weight_exponent``), so that 1e-300 or 1e308 weights give the mean of 1s."""
    e = _checks.weight_exponent(mask)
    return mask if e == 0 else np.ldexp(mask, -e)


# --------------------------------------------------------------------------- logits rows


def reduce_rows(vals: np.ndarray, mask: np.ndarray | None, reduction: str, out_dtype,
                empty: float = math.nan):
    """Per-row float64 values -> "none" (w * v, input precision) / "mean" / "sum" (float);
    a mean over zero total weight is ``empty``."""
    if reduction == "mean":
        mask = ratio_weights(mask)
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
    return total / weight if weight > 0 else empty


# --------------------------------------------------------------------------- errors


def raise_first_nan(terms: np.ndarray, weights: np.ndarray | None, locate, where: str = "",
                    context: str = "") -> None:
    """nan_policy='raise': the ValueError naming the first NaN term at an included position
    (``weights`` != 0, or everywhere without weights) of ``terms`` in C order.
    ``locate(k)`` gives ``(index, logq, logp)`` of flat position ``k`` in the caller's
    array; ``where`` prefixes the message (a file), ``context`` follows the index (an
    update). Returns only if no included term is NaN."""
    bad = np.isnan(terms)
    if weights is not None:
        bad &= weights != 0
    hits = np.flatnonzero(bad.ravel())
    if hits.size == 0:
        return
    idx, q, p = locate(int(hits[0]))
    raise ValueError(
        f"{where}nan_policy='raise': the term at index {tuple(int(i) for i in idx)}{context} "
        f"is NaN (logq={float(q)!r}, logp={float(p)!r})"
    )


# --------------------------------------------------------------------------- layout


def memory_perm(a: np.ndarray) -> list[int]:
    """The axes of ``a`` from the largest stride to the smallest (its memory order)."""
    strides = a.strides
    return sorted(range(a.ndim), key=lambda i: -abs(strides[i]))


def flat_slice(a: np.ndarray, e0: int, e1: int) -> np.ndarray:
    """Elements ``e0:e1`` of ``a``'s C-order flattening, copying only those (a view where
    numpy can): a strided, transposed or broadcast array is never copied whole."""
    if a.ndim <= 1 or a.flags.c_contiguous:
        return a.reshape(-1)[e0:e1]
    if e1 <= e0:
        return np.empty(0, a.dtype)
    inner = math.prod(a.shape[1:])
    r0, o0 = divmod(e0, inner)
    r1, o1 = divmod(e1, inner)
    if r0 == r1:
        return flat_slice(a[r0], o0, o1)
    parts = []
    if o0:
        parts.append(flat_slice(a[r0], o0, inner))
        r0 += 1
    if r1 > r0:
        parts.append(a[r0:r1].reshape(-1))  # a copy of these rows only
    if o1:
        parts.append(flat_slice(a[r1], 0, o1))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def progress_bar(total: int, desc: str, progress: bool | None, unit: str):
    """A tqdm bar on stderr (``progress`` None: only when stderr is a terminal), or None."""
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if show:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                        file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    return None
