"""Mergeable, pickleable accumulators: ``MCAccumulator`` (Monte Carlo KL estimates with error
bars, chunk by chunk) and ``LogitsAccumulator`` (per-row KL / JSD / entropy between full
distributions, with the statistics llama.cpp's ``--kl-divergence`` reports).

Both keep only O(1) state (plus a fixed-size quantile sketch, and the per-row values when
asked for). Partial results merge with the formulas of Chan, Golub & LeVeque (1979): for two
parts with weights ``W_a, W_b``, weighted sums ``S_a, S_b`` and centred second moments
``M2_a, M2_b``::

    W = W_a + W_b,   S = S_a + S_b,
    M2 = M2_a + M2_b + (S_b/W_b - S_a/W_a)**2 * W_a * W_b / W

so any grouping of chunks gives the one-pass result up to rounding (a few ulp; the tests
check 1e-12 relative), and a fixed chunking always gives the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _checks, _core, _llama
from . import mc as _mc
from ._core import KLStats
from ._validate import CONVERT_CHUNK_BYTES, LogitsRows, mc_inputs, mc_options
from .backends import get_backend
from .backends._contract import LOGITS_OPS, N_PARTIALS

ArrayLike = Any

# the percentiles llama.cpp prints, highest first (as fractions of 100): of the KLD ...
PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
# ... and of Δp
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


# --------------------------------------------------------------------------- helpers


def merge_block_partials(part: np.ndarray) -> np.ndarray:
    """Merge per-block partials ``[rows, nblk, N_PARTIALS]`` (the kernel contract's
    ``mc_partials``) in block order into ``[rows, N_PARTIALS]`` (Chan et al.), exactly as
    ``kl_mc_stats`` does: the same function, so streamed results match one-shot ones."""
    return _core.merge_blocks(part).copy()


def chan_merge(Wa: float, Sa: float, M2a: float, Wb: float, Sb: float, M2b: float
               ) -> tuple[float, float, float]:
    """(W, S, M2) of the union of two weighted parts (Chan et al.)."""
    if Wb <= 0:
        return Wa + Wb, Sa + Sb, M2a + M2b
    if Wa <= 0:
        return Wa + Wb, Sa + Sb, M2a + M2b
    W = Wa + Wb
    d = Sb / Wb - Sa / Wa
    return W, Sa + Sb, M2a + M2b + d * d * (Wa * Wb / W)


# --------------------------------------------------------------------------- MC


class MCAccumulator:
    """Running Monte Carlo KL estimate with its error bar, fed chunk by chunk.

    ``update(logq, logp, mask=None, log_iw=None)`` adds samples (any shape; the same options
    as ``kl_mc_stats``), ``merge(other)`` adds another accumulator's samples (same estimator
    and options), ``result()`` returns the ``KLStats`` that ``kl_mc_stats`` returns for all the
    samples at once: ``mean = S/W``, ``std = sqrt(M2 / (W - sum w**2 / W))``, ``sem = std /
    sqrt(W**2 / sum w**2)``, ``ci95 = mean -+ 1.96 sem``.

    State: ``W = sum w``, ``S = sum w t``, ``M2 = sum w (t - S/W)**2``, ``sum w**2``, the number
    of NaN terms and of included samples, merged with Chan's formulas (module docstring).
    Extreme weights (largest outside [2**-250, 2**250]) are scaled by a power of two per
    chunk (``_checks.scale_weights``): the state then holds the weight sums in units of
    ``2**e`` (``_e``), so 1e-300 or 1e300 weights give the statistics of weights 1.

    >>> acc = MCAccumulator("k3")
    >>> for q, p in chunks:                       # doctest: +SKIP
    ...     acc.update(q, p)
    >>> acc.result().mean                         # doctest: +SKIP
    """

    _e = 0  # the unit exponent of the sums (a class default: states pickled before it)

    def __init__(
        self,
        estimator: str = "k3",
        *,
        reverse: bool = False,
        clamp_log_ratio: tuple[float, float] | None = None,
        clamp_value: tuple[float, float] | None = None,
        clamp_order: str = "term",
        nan_policy: str = "propagate",
        backend: str | None = None,
    ) -> None:
        self._est, self._clamp = mc_options(estimator, reverse, clamp_log_ratio, clamp_value,
                                            clamp_order)
        self.estimator = estimator
        self.reverse = bool(reverse)
        self.nan_policy = _checks.nan_policy(nan_policy)
        get_backend(backend)  # fail early on an unknown backend
        self.backend = backend
        self._tot = np.zeros(N_PARTIALS)  # W, S, M2, sum w**2, NaN count, n
        self._e = 0  # W, S, M2 are in units of 2**_e, sum w**2 in units of 4**_e
        self.n_updates = 0

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        if len(self._clamp) == 4:  # pickled before clamp_order: the "term" order
            self._clamp = tuple(self._clamp) + (0.0,)

    # options that must agree for a merge
    def _key(self) -> tuple:
        return (self._est, self._clamp, self.nan_policy)

    def partials(self, logq: ArrayLike, logp: ArrayLike, mask: ArrayLike | None = None,
                 log_iw: ArrayLike | None = None) -> np.ndarray:
        """Merged partials ``[W, S, M2, sum w**2, NaN count, n, e]`` of one chunk (validated
        like ``kl_mc_stats``), without adding them: the weight sums are in units of ``2**e``
        (e = 0 unless the weights are extreme, see the class docstring)."""
        inp = mc_inputs(logq, logp, mask=mask, log_iw=log_iw, ratio_only=True, est=self._est,
                        clamp=self._clamp)
        if not inp.logq.size:
            return np.zeros(N_PARTIALS + 1)
        # memory order of logq, as kl_mc_stats reads a full reduction (no copy for views)
        perm = _core.memory_perm(inp.logq)
        views = [None if a is None else a.transpose(perm).reshape(1, -1) for a in inp.arrays()]
        be = get_backend(self.backend)
        part = _mc.mc_partials_sliced(be, views, self._est, self._clamp, True)
        tot = merge_block_partials(part)[0]
        if self.nan_policy == "raise" and tot[4] > 0:
            out = np.empty(views[0].shape, dtype=inp.dtype)
            be.mc_terms(*views, self._est, self._clamp, out)
            shp = tuple(inp.shape[i] for i in perm)

            def locate(k):  # position k of the memory-order flattening -> index of logq
                idx = [0] * len(perm)
                for ax, v in zip(perm, np.unravel_index(k, shp), strict=True):
                    idx[ax] = int(v)
                return idx, inp.logq[tuple(idx)], inp.logp[tuple(idx)]

            _core.raise_first_nan(out, views[2], locate, context=f" of update {self.n_updates}")
        return np.append(tot, inp.wexp)

    def add_partials(self, tot: np.ndarray) -> MCAccumulator:
        """Add merged partials ``[W, S, M2, sum w**2, NaN count, n]`` (from ``partials`` or
        a kernel's ``mc_partials`` merged in block order), optionally with a 7th entry ``e``:
        the weight sums are then in units of ``2**e``."""
        a = self._tot
        b = np.asarray(tot, dtype=np.float64)[:N_PARTIALS].copy()
        e = int(tot[N_PARTIALS]) if len(tot) > N_PARTIALS else 0
        # one unit for both: the larger exponent (the smaller part's sums shrink, exactly
        # unless they fall below 2**-1022, where they are negligible next to the other part)
        if b[0] > 0 and (a[0] <= 0 or e > self._e):
            a = _core.in_units(a, self._e, e)
            self._e = e
        else:
            b = _core.in_units(b, e, self._e)
        W, S, M2 = chan_merge(a[0], a[1], a[2], float(b[0]), float(b[1]), float(b[2]))
        self._tot = np.array([W, S, M2, a[3] + b[3], a[4] + b[4], a[5] + b[5]])
        self.n_updates += 1
        return self

    def update(self, logq: ArrayLike, logp: ArrayLike, mask: ArrayLike | None = None,
               log_iw: ArrayLike | None = None) -> MCAccumulator:
        """Add the samples of one chunk (any shape; ``mask``, ``log_iw`` of the same shape).
        With ``nan_policy="raise"`` a NaN term raises and leaves the state unchanged."""
        return self.add_partials(self.partials(logq, logp, mask, log_iw))

    def merge(self, other: MCAccumulator) -> MCAccumulator:
        """Add the samples another accumulator (same estimator, clamps and NaN policy) saw."""
        if not isinstance(other, MCAccumulator):
            raise TypeError(f"other must be an MCAccumulator, got {type(other).__name__}")
        if other._key() != self._key():
            raise ValueError("other was made with a different estimator, clamps or nan_policy")
        n = self.n_updates + other.n_updates
        self.add_partials(np.append(other._tot, other._e))
        self.n_updates = n
        return self

    @property
    def n(self) -> int:
        """Samples included so far (mask != 0, term not NaN)."""
        return int(self._tot[5])

    @property
    def n_nan(self) -> int:
        """NaN terms at included positions so far."""
        return int(self._tot[4])

    @property
    def kernel_options(self) -> tuple[int, tuple]:
        """``(estimator code, clamp bounds)`` as the backends' ``mc_partials`` / ``mc_terms``
        take them: for callers that run the kernels themselves and ``add_partials`` the
        merged result (``kl_mc_file``)."""
        return self._est, self._clamp

    @property
    def total(self) -> tuple[float, float]:
        """``(sum w t, sum w)`` so far: ``kl_mc(..., reduction="sum")`` and its weight
        (+-inf where the true sum overflows float64)."""
        with np.errstate(over="ignore"):
            S, W = np.ldexp(self._tot[1:None:-1], self._e)
        return float(S), float(W)

    def result(self) -> KLStats:
        """The ``KLStats`` of every sample seen (NaN fields when there is none, or a NaN term
        under ``nan_policy="propagate"``)."""
        return stats_from_partials(self._tot, self.nan_policy)

    def __repr__(self) -> str:
        return (f"MCAccumulator({self.estimator!r}, reverse={self.reverse}, n={self.n}, "
                f"updates={self.n_updates})")


def stats_from_partials(tot: np.ndarray, policy: str = "propagate") -> KLStats:
    """``KLStats`` from merged partials ``[W, S, M2, sum w**2, NaN count, n]`` (an optional
    7th entry, the exponent of their unit, changes nothing: every statistic is a ratio).
    The formulas of ``kl_mc_stats`` (``_core.stats``)."""
    return _core.stats(np.asarray(tot, dtype=np.float64), policy)


# --------------------------------------------------------------------------- sketch


class QuantileSketch:
    """A mergeable quantile sketch with relative accuracy ``alpha`` (DDSketch-style
    logarithmic buckets: Masson, Rim & Lee, VLDB 2019).

    A value x with ``|x|`` in ``[1e-12, 1e12]`` goes to bucket ``i = ceil(log|x| / log g)``,
    ``g = (1 + alpha) / (1 - alpha)``, one array per sign; the bucket's representative
    ``2 g**i / (g + 1)`` is within ``alpha`` relative of every value in it. ``|x| < 1e-12``
    counts as 0, larger magnitudes (and infinities) go to an overflow bucket read back as the
    exact minimum / maximum. Merging adds the counts, so it is exact and order-free.
    A percentile (linear interpolation between order statistics, like numpy's default) is
    within ``alpha`` relative of the exact one when both neighbouring order statistics have
    the same sign, within ``alpha * max|neighbour|`` otherwise.
    """

    LO, HI = 1e-12, 1e12

    def __init__(self, alpha: float = 1e-3) -> None:
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)
        self._lng = math.log((1 + alpha) / (1 - alpha))
        self._i0 = math.floor(math.log(self.LO) / self._lng)  # index of bucket 0
        self._nb = math.ceil(math.log(self.HI) / self._lng) - self._i0 + 2  # + overflow
        self.pos = np.zeros(self._nb, dtype=np.int64)
        self.neg = np.zeros(self._nb, dtype=np.int64)
        self.zero = 0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, x: np.ndarray) -> None:
        """Add the non-NaN values of ``x``."""
        x = np.asarray(x, dtype=np.float64).ravel()
        x = x[~np.isnan(x)]
        if x.size == 0:
            return
        self.count += x.size
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        ax = np.abs(x)
        small = ax < self.LO
        self.zero += int(small.sum())
        big = ax > self.HI
        with np.errstate(divide="ignore", invalid="ignore"):
            idx = np.ceil(np.log(np.where(small | big, 1.0, ax)) / self._lng) - self._i0
        idx = np.clip(idx, 0, self._nb - 2).astype(np.int64)
        idx[big] = self._nb - 1
        for sign, arr in ((x > 0, self.pos), (x < 0, self.neg)):
            keep = sign & ~small
            if keep.any():
                arr += np.bincount(idx[keep], minlength=self._nb)

    def merge(self, other: QuantileSketch) -> None:
        if other.alpha != self.alpha:
            raise ValueError("cannot merge sketches of different accuracy")
        self.pos += other.pos
        self.neg += other.neg
        self.zero += other.zero
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _rep(self, idx: np.ndarray) -> np.ndarray:
        g = math.exp(self._lng)
        return 2.0 * np.exp((idx + self._i0) * self._lng) / (g + 1.0)

    def buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """(representative values ascending, counts) of the non-empty buckets; overflow
        buckets are represented by the exact min / max."""
        ip, ineg = np.flatnonzero(self.pos), np.flatnonzero(self.neg)
        vp, vn = self._rep(ip.astype(float)), -self._rep(ineg.astype(float))
        vp[ip == self._nb - 1] = self.max
        vn[ineg == self._nb - 1] = self.min
        vals = np.concatenate([vn[::-1], [0.0] if self.zero else [], vp])
        cnts = np.concatenate([self.neg[ineg][::-1], [self.zero] if self.zero else [],
                               self.pos[ip]]).astype(np.int64)
        return np.clip(vals, self.min, self.max), cnts

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """Approximate quantiles (fractions in [0, 1])."""
        qs = list(qs)
        if self.count == 0:
            return [math.nan] * len(qs)
        vals, cnts = self.buckets()
        cum = np.cumsum(cnts)
        out = []
        for q in qs:
            k = q * (self.count - 1)
            lo, hi = math.floor(k), math.ceil(k)
            vlo = vals[np.searchsorted(cum, lo, side="right")]
            vhi = vals[np.searchsorted(cum, hi, side="right")]
            if lo == 0:
                vlo = self.min
            if hi == self.count - 1:
                vhi = self.max
            out.append(float(vlo if k == lo or vhi == vlo else vlo + (vhi - vlo) * (k - lo)))
        return out


# --------------------------------------------------------------------------- moments


@dataclass
class _Moments:
    """Count, sum and centred second moment of a stream of values (unweighted), plus NaN
    count, min and max; a quantile sketch and optionally the values themselves. With
    ``llama``, percentiles (of ``pcts``) interpolate as llama.cpp does (float32)."""

    keep: bool = False
    n: int = 0
    s: float = 0.0
    m2: float = 0.0
    nan: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    sketch: QuantileSketch | None = None
    values: list = field(default_factory=list)
    pcts: tuple = PERCENTILES
    llama: bool = False

    def update(self, x: np.ndarray, stored: np.ndarray | None = None) -> None:
        """Add the values ``x``; ``stored`` (same size, e.g. ``x`` rounded to float32 as
        llama.cpp keeps its per-row values) replaces them in min, max and percentiles."""
        x = np.asarray(x, dtype=np.float64).ravel()
        st = None if stored is None else np.asarray(stored, dtype=np.float64).ravel()
        bad = np.isnan(x)
        nbad = int(bad.sum())
        if nbad:
            x = x[~bad]
            st = None if st is None else st[~bad]
            self.nan += nbad
        if x.size:
            s = float(x.sum())
            with np.errstate(invalid="ignore"):
                m2 = float(((x - s / x.size) ** 2).sum())
            _, self.s, self.m2 = chan_merge(self.n, self.s, self.m2, x.size, s, m2)
            self.n += x.size
            if st is not None:
                x = st
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            if self.sketch is not None:
                self.sketch.update(x)
            if self.keep:
                self.values.append(x.copy())

    def merge(self, o: _Moments) -> None:
        _, self.s, self.m2 = chan_merge(self.n, self.s, self.m2, o.n, o.s, o.m2)
        self.n += o.n
        self.nan += o.nan
        self.lo, self.hi = min(self.lo, o.lo), max(self.hi, o.hi)
        if self.sketch is not None:
            self.sketch.merge(o.sketch)
        if self.keep:
            if o.keep:
                self.values.extend(v.copy() for v in o.values)
            else:  # the merged result can no longer give exact percentiles
                self.keep = False
                self.values = []

    def mean(self, policy: str) -> float:
        if self.n == 0 or (policy == "propagate" and self.nan):
            return math.nan
        return self.s / self.n

    def std(self, policy: str) -> float:
        if self.n < 2 or (policy == "propagate" and self.nan):
            return math.nan
        return math.sqrt(self.m2 / (self.n - 1))

    def sem(self, policy: str) -> float:
        return self.std(policy) / math.sqrt(self.n) if self.n else math.nan

    def percentiles(self, policy: str) -> tuple[dict[float, float], bool]:
        """({percent: value}, exact?)."""
        pcts = self.pcts
        if self.n == 0 or (policy == "propagate" and self.nan):
            return {q: math.nan for q in pcts}, self.keep
        if self.keep and self.llama:
            v = np.sort(np.concatenate(self.values).astype(np.float32))
            return {q: _llama.median(v) if q == 50.0 else _llama.percentile(v, round(q / 100, 4))
                    for q in pcts}, True
        if self.keep:
            v = np.concatenate(self.values)
            return dict(zip(pcts, (float(x) for x in np.percentile(v, pcts)),
                            strict=True)), True
        qs = self.sketch.quantiles(p / 100.0 for p in pcts)
        return dict(zip(pcts, qs, strict=True)), False


# --------------------------------------------------------------------------- logits


@dataclass(frozen=True)
class LogitsReport:
    """Statistics of a per-row divergence between two sets of next-token distributions
    (``LogitsAccumulator.result()``, ``compare_logits``), llama.cpp ``--kl-divergence`` style.

    ``mean``, ``std``, ``sem = std / sqrt(n)`` of the per-row values (KL(P_base || P_test)
    for ``op="kl"``), ``minimum``, ``maximum``, ``percentiles`` ({99.9: ..., 50.0: ...,
    0.1: ...}; exact when ``percentiles_exact``, else from a quantile sketch within 0.1%
    relative), ``same_top`` = fraction of rows where argmax P_base = argmax P_test with
    ``same_top_sem = sqrt(f (1 - f) / (n - 1))``.

    With tokens (``n_tokens > 0``): ``dp_*`` the statistics of ``Δp = p_test(token) -
    p_base(token)``; ``rms_dp = sqrt(mean Δp²)`` with ``rms_dp_sem = sem(Δp²) / (2 rms_dp)``;
    ``ppl_test = exp(mean NLL_test)``, ``ppl_base`` (``sem`` = ppl * sem(NLL)),
    ``ln_ppl_ratio = mean(NLL_test - NLL_base)`` with its sem, ``ppl_ratio = exp(ln_ppl_ratio)``,
    ``cor_ln_ppl`` the correlation of the per-token NLLs and ``ppl_diff = ppl_test -
    ppl_base`` with its delta-method sem. ``dp_percentiles`` has 75 and 25 besides.

    ``llama_compat``: the per-row values follow llama.cpp's arithmetic (a llama.cpp base file
    at temperature 1: see docs/llama_compat.md): base entries with log p <= -16 dropped and
    the rest not renormalized, negative per-row KL kept, minimum / maximum / percentiles of
    the float32 per-row values with llama.cpp's float32 interpolation. ``chunks``: the
    running statistics after each chunk of a llama.cpp base file (llama.cpp's per-chunk
    table), dicts with ``rows``, ``ppl``, ``ln_ppl_ratio``, ``kld``, ``rms_dp``,
    ``same_top`` and their ``*_sem`` (0 up to 10 rows, as llama.cpp prints them).
    """

    op: str
    n: int
    n_nan: int
    mean: float
    std: float
    sem: float
    minimum: float
    maximum: float
    percentiles: dict
    percentiles_exact: bool
    same_top: float
    same_top_sem: float
    n_tokens: int = 0
    dp_mean: float = math.nan
    dp_std: float = math.nan
    dp_sem: float = math.nan
    dp_minimum: float = math.nan
    dp_maximum: float = math.nan
    dp_percentiles: dict = field(default_factory=dict)
    rms_dp: float = math.nan
    rms_dp_sem: float = math.nan
    ppl_test: float = math.nan
    ppl_test_sem: float = math.nan
    ppl_base: float = math.nan
    ppl_base_sem: float = math.nan
    ln_ppl_ratio: float = math.nan
    ln_ppl_ratio_sem: float = math.nan
    ppl_ratio: float = math.nan
    ppl_ratio_sem: float = math.nan
    cor_ln_ppl: float = math.nan
    ppl_diff: float = math.nan
    ppl_diff_sem: float = math.nan
    llama_compat: bool = False
    chunks: tuple = ()
    extra: dict = field(default_factory=dict)
    # (values, counts) of the quantile sketches ("values", "dp"), for histograms; not in
    # to_dict()
    histograms: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready apart from NaN/inf floats); percentile keys are strings
        such as ``"99.9"``."""
        d = {}
        for k in self.__dataclass_fields__:
            if k == "histograms":
                continue
            v = getattr(self, k)
            if k in ("percentiles", "dp_percentiles"):
                v = {f"{p:g}": float(x) for p, x in v.items()}
            elif k == "extra":
                v = dict(v)
            elif k == "chunks":
                v = [dict(c) for c in v]
            d[k] = v
        return d


def _argmax_rows(x: np.ndarray) -> np.ndarray:
    """argmax of each row, a few MB of rows at a time: numpy copies a read-only input (a
    memory-mapped file block) whole before reducing it."""
    if x.flags.writeable:
        return np.argmax(x, axis=1)
    step = max(1, (4 << 20) // max(1, x.shape[1] * x.itemsize))
    return np.concatenate([np.argmax(x[i:i + step], axis=1)
                           for i in range(0, x.shape[0], step)])


def _rate_with_sem(hits: int, n: int) -> tuple[float, float]:
    """A rate ``f = hits / n`` ("Same top p") and its error bar ``sqrt(f (1 - f) / (n - 1))``
    (NaN without rows; the bar NaN for one row)."""
    if not n:
        return math.nan, math.nan
    f = hits / n
    return f, math.sqrt(f * (1 - f) / (n - 1)) if n > 1 else math.nan


def _rms_with_sem(mean_sq: float, sem_sq: float) -> tuple[float, float]:
    """RMS ``sqrt(mean Δp²)`` and its error bar ``sem(Δp²) / (2 RMS)`` (delta method) from
    the mean of the squares and its sem."""
    rms = math.sqrt(mean_sq) if mean_sq >= 0 else math.nan
    return rms, sem_sq / (2 * rms) if rms > 0 else math.nan


class LogitsAccumulator:
    """Per-row divergences between two sets of logits, accumulated chunk by chunk.

    ``update(logits_p, logits_q, tokens=None, mask=None)`` with ``P = softmax(logits_p / T)``
    (the base) and ``Q = softmax(logits_q / T)`` (the test), vocabulary along ``axis``: per row
    ``op="kl"``: KL(P||Q); ``"jsd"``: JSD_beta(P, Q); ``"entropy"``: H(P) (``logits_q`` may be
    omitted). Keeps count, sum, M2 (mean, std, sem), min, max, NaN count, a quantile sketch
    (or every value with ``keep_values=True``: exact percentiles, 8 bytes per row), and the
    rate of rows where argmax P = argmax Q. With ``tokens`` (the observed next token per row;
    ``ignore_index`` rows skipped): ``Δp = Q(token) - P(token)``, its square, the per-token
    NLLs ``-log Q(token)``, ``-log P(token)`` and their difference (for PPL(Q)/PPL(base)).

    ``mask`` (bool per row) drops rows entirely. ``nan_policy``: "propagate" (a NaN row value
    makes the mean, std and percentiles NaN) or "omit". ``merge`` combines accumulators made
    with the same options; ``result()`` gives a ``LogitsReport``.
    """

    def __init__(
        self,
        op: str = "kl",
        *,
        temperature: float = 1.0,
        beta: float = 0.5,
        keep_values: bool = False,
        nan_policy: str = "propagate",
        ignore_index: int = -100,
        backend: str | None = None,
    ) -> None:
        if op not in LOGITS_OPS:
            raise ValueError(f"op must be one of {list(LOGITS_OPS)}, got {op!r}")
        self.op = op
        self.temperature = _checks.temperature(temperature)
        self.beta = _checks.beta(beta)
        if not isinstance(keep_values, (bool, np.bool_)):
            raise TypeError(f"keep_values must be a bool, got {type(keep_values).__name__}")
        policy = _checks.nan_policy(nan_policy)
        if policy == "raise":
            raise ValueError("nan_policy must be 'propagate' or 'omit' for LogitsAccumulator")
        self.nan_policy = policy
        self.ignore_index = int(ignore_index)
        get_backend(backend)
        self.backend = backend
        self.keep_values = bool(keep_values)
        self.values = _Moments(keep=self.keep_values, sketch=QuantileSketch())
        self.dp = _Moments(keep=self.keep_values, sketch=QuantileSketch(), pcts=DP_PERCENTILES)
        self.dp2 = _Moments()
        self.nll_test = _Moments()
        self.nll_base = _Moments()
        self.nll_diff = _Moments()
        self.n_rows = 0
        self.n_top = 0
        self.n_same_top = 0
        self.llama = False  # rows added by _add_llama_block (llama.cpp arithmetic)
        self.chunks: list[dict] = []  # running statistics at chunk ends (_mark_chunk)

    def _key(self) -> tuple:
        return (self.op, self.temperature, self.beta, self.nan_policy, self.ignore_index)

    # ---------------------------------------------------------------- feeding

    def update(self, logits_p: ArrayLike, logits_q: ArrayLike | None = None, *,
               tokens: ArrayLike | None = None, mask: ArrayLike | None = None,
               axis: int = -1) -> LogitsAccumulator:
        """Add the rows of one chunk (``[..., vocab]`` along ``axis``)."""
        a = _checks.float_array(logits_p, "logits_p")
        if logits_q is None:
            if self.op != "entropy":
                raise TypeError(f"op={self.op!r} needs logits_q")
            arrays = [a]
        else:
            arrays = [a, _checks.float_array(logits_q, "logits_q")]
        rows = LogitsRows(arrays, ["logits_p", "logits_q"][:len(arrays)], axis, mask)
        keep = None if rows.mask is None else (rows.mask != 0).reshape(-1)
        tok = None
        if tokens is not None:
            if len(arrays) == 1:
                raise TypeError("tokens need logits_q (Δp and perplexities compare two models)")
            tok = _checks.tokens_array(tokens, rows.lead, rows.vocab,
                                       self.ignore_index).reshape(-1)
        dtype = rows.dtype
        a2 = rows.moved[0].reshape(-1, rows.vocab)
        b2 = None if len(arrays) == 1 else rows.moved[1].reshape(-1, rows.vocab)
        # convert a bounded number of bytes of rows at a time (float16, byte-swapped inputs)
        step = max(1, CONVERT_CHUNK_BYTES // max(1, rows.vocab * dtype.itemsize))
        for r0 in range(0, a2.shape[0], step):
            sl = slice(r0, min(a2.shape[0], r0 + step))
            aa = _checks.as_kernel_dtype(a2[sl], dtype)
            bb = None if b2 is None else _checks.as_kernel_dtype(b2[sl], dtype)
            self._add_block(aa, bb, None if tok is None else tok[sl],
                            None if keep is None else keep[sl])
        return self

    def _add_block(self, a: np.ndarray, b: np.ndarray | None, tok: np.ndarray | None,
                   keep: np.ndarray | None, *, token_logp_base: np.ndarray | None = None,
                   token_logp_test: np.ndarray | None = None) -> None:
        """Native float32/64 ``[rows, V]`` blocks -> statistics. ``token_logp_base`` /
        ``token_logp_test`` override log P(token) / log Q(token) (llama.cpp files store
        them directly)."""
        if self.llama:
            raise ValueError("this accumulator holds rows of llama.cpp arithmetic (a llama.cpp "
                             "base file): exact softmax KL rows cannot join them")
        if keep is not None and not keep.all():
            a = a[keep]
            b = None if b is None else b[keep]
            tok = None if tok is None else tok[keep]
            if token_logp_base is not None:
                token_logp_base = token_logp_base[keep]
            if token_logp_test is not None:
                token_logp_test = token_logp_test[keep]
        rows = a.shape[0]
        if rows == 0:
            return
        be = get_backend(self.backend)
        inv_t = 1.0 / self.temperature
        vals = np.empty(rows, dtype=np.float64)
        be.logits_rows(a, a if b is None else b, LOGITS_OPS[self.op], self.beta, inv_t, False,
                       None, vals)
        self.values.update(vals)
        self.n_rows += rows
        if b is not None:
            self.n_top += rows
            self.n_same_top += int((_argmax_rows(a) == _argmax_rows(b)).sum())
        if tok is not None:
            sel = tok != self.ignore_index
            if not sel.all():
                a, b, tok = a[sel], b[sel], tok[sel]
                if token_logp_base is not None:
                    token_logp_base = token_logp_base[sel]
                if token_logp_test is not None:
                    token_logp_test = token_logp_test[sel]
            if tok.size:
                lp = np.empty(tok.size)
                lq = np.empty(tok.size)
                if token_logp_base is None:
                    be.logits_token(a, tok, inv_t, self.ignore_index, lp)
                else:
                    lp[:] = token_logp_base
                if token_logp_test is None:
                    be.logits_token(b, tok, inv_t, self.ignore_index, lq)
                else:
                    lq[:] = token_logp_test
                dp = np.exp(lq) - np.exp(lp)
                self.dp.update(dp)
                self.dp2.update(dp * dp)
                self.nll_test.update(-lq)
                self.nll_base.update(-lp)
                with np.errstate(invalid="ignore"):
                    self.nll_diff.update(lp - lq)

    def _add_llama_block(self, base_logp: np.ndarray, test: np.ndarray, test_is_logprob: bool,
                         tok: np.ndarray | None, keep: np.ndarray | None) -> None:
        """Rows of a llama.cpp base file (decoded float32 log p, not floored) against test
        logits (or a second base file's log p, ``test_is_logprob``), with llama.cpp's
        per-row arithmetic (``fastkl._llama.kl_rows``); op "kl", temperature 1 only."""
        if self.op != "kl" or self.temperature != 1.0:
            raise ValueError("llama.cpp arithmetic is defined for op='kl' at temperature 1")
        if self.n_rows and not self.llama:
            raise ValueError("this accumulator already holds rows of exact softmax KL")
        self.llama = self.values.llama = self.dp.llama = True
        if keep is not None and not keep.all():
            base_logp, test = base_logp[keep], test[keep]
            tok = None if tok is None else tok[keep]
        # bound the temporaries of the arithmetic (~24 bytes an element): 1 M elements at a time
        step = max(1, (1 << 20) // max(1, test.shape[1]))
        for r0 in range(0, test.shape[0], step):
            sl = slice(r0, r0 + step)
            t = None if tok is None else tok[sl]
            sel = None
            if t is not None:
                sel = t != self.ignore_index
                t = np.where(sel, t, 0)
            r = _llama.kl_rows(base_logp[sl], test[sl], test_is_logprob, t)
            kld = r["kld"]
            self.values.update(kld, stored=kld.astype(np.float32))
            self.n_rows += kld.size
            self.n_top += kld.size
            self.n_same_top += int(r["same_top"].sum())
            if t is None or not sel.any():
                continue
            nll, nllb = r["nll"][sel].astype(np.float64), r["nll_base"][sel].astype(np.float64)
            dp = r["p_diff"][sel].astype(np.float64)
            self.dp.update(dp)
            self.dp2.update(dp * dp)
            self.nll_test.update(nll)
            self.nll_base.update(nllb)
            with np.errstate(invalid="ignore"):
                self.nll_diff.update(nll - nllb)

    def _mark_chunk(self) -> None:
        """Record the running statistics of llama.cpp's per-chunk table (cumulative over the
        rows so far; uncertainties 0 up to 10 rows, as llama.cpp's mean_and_uncertainty)."""
        pol = self.nan_policy
        n = self.n_rows

        def sem(m: _Moments) -> float:
            return m.sem(pol) if m.n + m.nan > 10 else 0.0

        lt = self.nll_test.mean(pol)
        with np.errstate(over="ignore", invalid="ignore"):
            ppl = float(np.exp(lt))
        rms, rms_sem = _rms_with_sem(self.dp2.mean(pol), sem(self.dp2))
        f, f_sem = _rate_with_sem(self.n_same_top, self.n_top)
        self.chunks.append({
            "rows": n, "ppl": ppl, "ppl_sem": ppl * sem(self.nll_test),
            "ln_ppl_ratio": self.nll_diff.mean(pol), "ln_ppl_ratio_sem": sem(self.nll_diff),
            "kld": self.values.mean(pol), "kld_sem": sem(self.values),
            "rms_dp": rms, "rms_dp_sem": rms_sem, "same_top": f, "same_top_sem": f_sem,
        })

    def merge(self, other: LogitsAccumulator) -> LogitsAccumulator:
        """Add the rows another accumulator (same op, temperature, beta, NaN policy) saw."""
        if not isinstance(other, LogitsAccumulator):
            raise TypeError(f"other must be a LogitsAccumulator, got {type(other).__name__}")
        if other._key() != self._key():
            raise ValueError("other was made with a different op, temperature, beta, "
                             "nan_policy or ignore_index")
        if self.n_rows and other.n_rows and self.llama != other.llama:
            raise ValueError("cannot merge rows of llama.cpp arithmetic with rows of exact "
                             "softmax KL")
        if other.llama:
            self.llama = self.values.llama = self.dp.llama = True
        for name in ("values", "dp", "dp2", "nll_test", "nll_base", "nll_diff"):
            getattr(self, name).merge(getattr(other, name))
        self.n_rows += other.n_rows
        self.n_top += other.n_top
        self.n_same_top += other.n_same_top
        return self

    # ---------------------------------------------------------------- results

    def result(self) -> LogitsReport:
        pol = self.nan_policy
        v = self.values
        pct, exact = v.percentiles(pol)
        f, f_sem = _rate_with_sem(self.n_same_top, self.n_top)
        prop = pol == "propagate" and v.nan > 0
        kw: dict[str, Any] = dict(
            op=self.op, n=v.n + v.nan, n_nan=v.nan, mean=v.mean(pol), std=v.std(pol),
            sem=v.sem(pol), minimum=math.nan if prop or not v.n else v.lo,
            maximum=math.nan if prop or not v.n else v.hi, percentiles=pct,
            percentiles_exact=exact, same_top=f, same_top_sem=f_sem, llama_compat=self.llama,
            chunks=tuple(dict(c) for c in self.chunks),
            histograms={"values": v.sketch.buckets(), "dp": self.dp.sketch.buckets()},
        )
        nt = self.dp.n + self.dp.nan
        if nt:
            d, d2 = self.dp, self.dp2
            dprop = pol == "propagate" and d.nan > 0
            rms, rms_sem = _rms_with_sem(d2.mean(pol), d2.sem(pol))
            lt, lb, ld = (m.mean(pol) for m in (self.nll_test, self.nll_base, self.nll_diff))
            st, sb, sd = (m.sem(pol) for m in (self.nll_test, self.nll_base, self.nll_diff))
            vt, vb, vd = (m.std(pol) ** 2 for m in (self.nll_test, self.nll_base,
                                                     self.nll_diff))
            cov = 0.5 * (vt + vb - vd)
            cor = cov / math.sqrt(vt * vb) if vt > 0 and vb > 0 else math.nan
            dpct, _ = d.percentiles(pol)
            with np.errstate(over="ignore", invalid="ignore"):
                ppl_t, ppl_b, ratio = (float(np.exp(x)) for x in (lt, lb, ld))
                # delta method, Var(a X - b Y) with a, b = PPL(Q), PPL(base), written as
                # (a - b)(a Vx - b Vy) + a b V(X - Y): no cancellation when a ~ b, X ~ Y
                vdiff = ((ppl_t - ppl_b) * (ppl_t * vt - ppl_b * vb)
                         + ppl_t * ppl_b * vd) / self.nll_diff.n if self.nll_diff.n else math.nan
            diff_sem = math.sqrt(vdiff) if vdiff >= 0 else math.nan
            kw.update(
                n_tokens=nt, dp_mean=d.mean(pol), dp_std=d.std(pol), dp_sem=d.sem(pol),
                dp_minimum=math.nan if dprop or not d.n else d.lo,
                dp_maximum=math.nan if dprop or not d.n else d.hi, dp_percentiles=dpct,
                rms_dp=rms, rms_dp_sem=rms_sem, ppl_test=ppl_t, ppl_test_sem=ppl_t * st,
                ppl_base=ppl_b, ppl_base_sem=ppl_b * sb, ln_ppl_ratio=ld, ln_ppl_ratio_sem=sd,
                ppl_ratio=ratio, ppl_ratio_sem=ratio * sd, cor_ln_ppl=cor,
                ppl_diff=ppl_t - ppl_b, ppl_diff_sem=diff_sem,
            )
        return LogitsReport(**kw)

    def __repr__(self) -> str:
        return f"LogitsAccumulator({self.op!r}, rows={self.n_rows}, tokens={self.dp.n})"
