"""Numba kernels of the logits ops (contract: bottom half of ``_contract``; spec:
``numpy.logits.logits_rows`` / ``logits_token`` / ``logits_grad`` / ``logits_token_grad``;
algorithm: ``docs/logits_math.md``).

One row is computed by one thread, in chunks of ``CH`` consecutive vocabulary entries, in a
fixed order, so the bits never depend on the thread count (``prange`` only spreads whole rows).
Per chunk:

1. load: ``x = float64(a) * inv_t`` into an L1 buffer, and the chunk max as an integer max
   over order-preserving keys of the float bits (an integer max reduction vectorizes without
   fastmath; a float ``max`` reduction does not);
2. if the max grew: one scalar rescale of the running sums (``S' = e^-dA (S - (dA - dB) ZA)``);
3. one branch-free loop (vectorized: zmm FMAs) computing ``e^(x - M)`` by the range-reduced
   polynomial of ``docs/kernel_math.md`` and the terms, into buffers; lanes whose argument is
   below -745.2 (``-inf`` included) are selected to exactly 0.0; the rare lanes of the
   subnormal range (or above 700 with ``log_probs``) are redone by a scalar libm fix-up;
4. each buffer summed by in-place halving (elementwise adds, vectorized; pairwise, hence
   accurate), the chunk sums then added to the row sums in chunk order.

Any NaN, or a ``+inf`` logit, makes the row NaN (as in the reference, where the max is NaN or
``inf - inf`` appears); rows of all ``-inf`` are NaN. With ``log_probs`` at ``inv_t == 1`` the
rows are used as log-probabilities directly (no max, no normaliser).

Inputs reach the kernels as 1-D read-only buffers spanning their memory plus (offset, row
stride, column stride) in elements, so one compiled specialization per dtype serves C-ordered,
transposed and negative-stride views (no copies). Nothing is compiled at import; the kernels
compile on first use, and later processes load them from the on-disk cache
(``cache``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .._contract import LOGITS_OPS
from .cache import jit
from .common import (
    LN2_HI,
    LN2_LO,
    exp_parts,
    exp_parts_lo,
    f64_as_i64,
    flat_buffer,
    fma,
    geometry,
    i64_as_f64,
    threaded_kernel,
)

# the contract's op codes (frozen into the kernels as constants)
OP_KL = LOGITS_OPS["kl"]
OP_JSD = LOGITS_OPS["jsd"]
OP_ENTROPY = LOGITS_OPS["entropy"]
_OP_CODES = frozenset(LOGITS_OPS.values())

CH = 512  # vocabulary entries per chunk (a power of two >= 8): the buffers stay in L1
NCHUNK = 256  # parallel groups of consecutive rows (any value gives the same bits)
NBUF = 8  # float64 scratch buffers of CH entries per thread

EXP_LO = -708.0  # x >= EXP_LO: 2**k is a normal double
EXP_HI = 700.0  # x <= EXP_HI: no overflow
EXP_ZERO = -745.2  # x < EXP_ZERO: e^x rounds to 0.0 (-inf included)

# log: m = 2**k f, f in [sqrt(1/2), sqrt(2)), log f = 2 atanh(s), s = (f - 1) / (f + 1)
SQRTH_BITS = 0x3FE6A09E667F3BCD  # the bits of sqrt(1/2)
MIN_NORMAL = 2.2250738585072014e-308
MAX_FINITE = 1.7976931348623157e308
ABS_BITS = 0x7FFFFFFFFFFFFFFF
MIN_KEY = -0x8000000000000000
# 2/(2n+1), n = 0..11: |s| <= 0.1716, s**24 / 25 < 1e-19
L1 = 2.0
L3 = 2.0 / 3
L5 = 2.0 / 5
L7 = 2.0 / 7
L9 = 2.0 / 9
L11 = 2.0 / 11
L13 = 2.0 / 13
L15 = 2.0 / 15
L17 = 2.0 / 17
L19 = 2.0 / 19
L21 = 2.0 / 21
L23 = 2.0 / 23

INF = math.inf


# --------------------------------------------------------------------------- lane math


@jit(nogil=True)
def _exp_fast(x):
    """e^x for EXP_LO <= x <= EXP_HI (NaN stays NaN); other lanes: see ``_exp_lane_in``."""
    s, r, q = exp_parts(x)
    return fma(s, r + q, s)


@jit(nogil=True)
def _exp_fast_lo(x):
    """``_exp_fast`` with the degree-5 minimax series (``exp_parts_lo``, relative error
    < 3e-9): enough for float32 inputs (the Cython kernels make the same choice), six FMAs
    fewer."""
    s, r, q = exp_parts_lo(x)
    return fma(s, r + q, s)


@jit(nogil=True)
def _exp_lane_in(x, lo):
    """e^x, branch-free: exact 0.0 below EXP_ZERO (``-inf`` included); by the shorter series
    when ``lo`` (float32 inputs; loop-invariant, so the compiler unswitches the loops that
    call it)."""
    e = _exp_fast_lo(x) if lo else _exp_fast(x)
    return 0.0 if x < EXP_ZERO else e


@jit(nogil=True)
def _exp_bad(x):
    """1 where ``_exp_lane_in`` is not valid (subnormal result, or x > EXP_HI), else 0."""
    return np.int64((x < EXP_LO) & (x >= EXP_ZERO)) | np.int64(x > EXP_HI)


@jit(nogil=True)
def _exp_exact(x):
    """Scalar e^x for every x (the fix-up)."""
    if x < EXP_ZERO:
        return 0.0
    if (x < EXP_LO) | (x > EXP_HI):
        return math.exp(x)
    return _exp_fast(x)


# error_model="numpy": numba's default ("python") guards every float division with a
# ZeroDivisionError branch, which kept LLVM from vectorizing any loop calling this (f + 1.0
# is never 0 here). Measured: the JSD pass ran scalar, half the Cython kernel's speed.
@jit(nogil=True, error_model="numpy")
def _log_reduce(m):
    """(k, s, z) with m = 2**k f, f in [sqrt(1/2), sqrt(2)), s = (f - 1) / (f + 1), z = s*s."""
    b = f64_as_i64(m)
    k = (b - SQRTH_BITS) >> 52
    f = i64_as_f64(b - (k << 52))
    s = (f - 1.0) / (f + 1.0)
    return np.float64(k), s, s * s


@jit(nogil=True)
def _log_join(m, kf, s, z, p):
    """k ln2 + 2 s + s z p (p: the series from 2/3 up), and -inf for m == 0."""
    v = fma(kf, LN2_HI, fma(s * z, p, fma(kf, LN2_LO, L1 * s)))
    return -INF if m == 0.0 else v


@jit(nogil=True, error_model="numpy")
def _log_lane(m):
    """log m for normal finite m > 0, and -inf for m == 0; other lanes: ``_log_bad``."""
    kf, s, z = _log_reduce(m)
    p = fma(L23, z, L21)
    p = fma(p, z, L19)
    p = fma(p, z, L17)
    p = fma(p, z, L15)
    p = fma(p, z, L13)
    p = fma(p, z, L11)
    p = fma(p, z, L9)
    p = fma(p, z, L7)
    p = fma(p, z, L5)
    p = fma(p, z, L3)
    return _log_join(m, kf, s, z, p)


@jit(nogil=True, error_model="numpy")
def _log_lane_lo(m):
    """``_log_lane`` with the series cut at s**11 (relative error < 6e-11, |s| <= 0.1716):
    for float32 inputs, six FMAs fewer."""
    kf, s, z = _log_reduce(m)
    p = fma(L11, z, L9)
    p = fma(p, z, L7)
    p = fma(p, z, L5)
    p = fma(p, z, L3)
    return _log_join(m, kf, s, z, p)


@jit(nogil=True, error_model="numpy")
def _log_lane_in(m, lo):
    """``_log_lane``, by the shorter series only when ``lo`` (loop-invariant)."""
    return _log_lane_lo(m) if lo else _log_lane(m)


@jit(nogil=True)
def _log_bad(m):
    """1 where ``_log_lane`` is not valid (subnormal, > MAX_FINITE, negative, NaN)."""
    return np.int64(not ((m >= MIN_NORMAL) & (m <= MAX_FINITE))) & np.int64(m != 0.0)


@jit(nogil=True)
def _log_mix(beta, omb, p, q, lp, lq):
    """log(beta p + omb q) by libm, in log space where the sum underflows."""
    m = beta * p + omb * q
    if (m >= MIN_NORMAL) | ((p == 0.0) & (q == 0.0)) | (m != m):
        return _log_exact(m)
    u = math.log(beta) + lp if (beta > 0.0) & (p > 0.0) else -INF
    v = math.log(omb) + lq if (omb > 0.0) & (q > 0.0) else -INF
    hi = max(u, v)
    return hi + math.log1p(math.exp(min(u, v) - hi))


@jit(nogil=True)
def _log_exact(m):
    if m == 0.0:
        return -INF
    if m != m or m < 0.0:
        return math.nan
    return math.log(m)


@jit(nogil=True)
def _key(x):
    """An int64 that orders like the float64 x."""
    b = f64_as_i64(x)
    return b ^ ((b >> 63) & ABS_BITS)


@jit(nogil=True)
def _unkey(k):
    return i64_as_f64(k ^ ((k >> 63) & ABS_BITS))


# --------------------------------------------------------------------------- chunk stages


@jit(nogil=True)
def _load(buf, geo, k, row, j, mm, inv_t, dst):
    """dst[:mm] = float64(array k)[row, j:j+mm] * inv_t; returns their max (NaN ignored
    unless its sign bit is clear, in which case it may come back as NaN)."""
    off = geo[k, 0] + row * geo[k, 1]
    s1 = geo[k, 2]
    o = off + j * s1
    km = MIN_KEY
    if s1 == 1:
        v = buf[o : o + mm]
        for i in range(mm):
            x = np.float64(v[i]) * inv_t
            dst[i] = x
            km = max(km, _key(x))
    else:
        for i in range(mm):
            x = np.float64(buf[o + i * s1]) * inv_t
            dst[i] = x
            km = max(km, _key(x))
    return _unkey(km)


@jit(nogil=True)
def _tsum(x, mm):
    """Sum of x[:mm] by in-place halving (x has room for the next power of two >= 8)."""
    n = 8
    while n < mm:
        n *= 2
    for i in range(mm, n):
        x[i] = 0.0
    h = n // 2
    while h >= 8:
        for i in range(h):
            x[i] += x[i + h]
        h //= 2
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))


@jit(nogil=True)
def _chunk_ab(xa, xb, ra, rb, ea, eb, tt, mm, want_s, lo):
    """ea = e^(xa - ra), eb = e^(xb - rb), tt = ea * ((xa - ra) - (xb - rb)) (0 where ea
    == 0) if want_s; ``lo``: float32 inputs (``_exp_lane_in``)."""
    bad = 0
    if want_s:
        for i in range(mm):
            da = xa[i] - ra
            db = xb[i] - rb
            u = _exp_lane_in(da, lo)
            w = _exp_lane_in(db, lo)
            bad |= _exp_bad(da) | _exp_bad(db)
            ea[i] = u
            eb[i] = w
            tt[i] = 0.0 if u == 0.0 else u * (da - db)
    else:
        for i in range(mm):
            da = xa[i] - ra
            db = xb[i] - rb
            ea[i] = _exp_lane_in(da, lo)
            eb[i] = _exp_lane_in(db, lo)
            bad |= _exp_bad(da) | _exp_bad(db)
    if bad:
        for i in range(mm):
            da = xa[i] - ra
            db = xb[i] - rb
            if _exp_bad(da) | _exp_bad(db):
                u = _exp_exact(da)
                ea[i] = u
                eb[i] = _exp_exact(db)
                if want_s:
                    tt[i] = 0.0 if u == 0.0 else u * (da - db)


@jit(nogil=True)
def _chunk_a(xa, ra, ea, tt, mm, want_h, lo):
    """ea = e^(xa - ra), tt = ea * (xa - ra) (0 where ea == 0) if want_h; ``lo``: float32
    inputs (``_exp_lane_in``)."""
    bad = 0
    if want_h:
        for i in range(mm):
            da = xa[i] - ra
            u = _exp_lane_in(da, lo)
            bad |= _exp_bad(da)
            ea[i] = u
            tt[i] = 0.0 if u == 0.0 else u * da
    else:
        for i in range(mm):
            da = xa[i] - ra
            ea[i] = _exp_lane_in(da, lo)
            bad |= _exp_bad(da)
    if bad:
        for i in range(mm):
            da = xa[i] - ra
            if _exp_bad(da):
                u = _exp_exact(da)
                ea[i] = u
                if want_h:
                    tt[i] = 0.0 if u == 0.0 else u * da


@jit(nogil=True)
def _chunk_finite_s(xa, xb, ra, rb, tt, mm, lo):
    """The rare chunk whose S sum came out +inf: its terms again from the same exps as
    ``_chunk_ab``, those with P > 0 = Q left out. Returns (their sum, the largest xa of the
    left-out entries or -inf): whether P is still > 0 there is known only at the row's end,
    once the max is final (it may have grown by > 745 since)."""
    xi = -INF
    for i in range(mm):
        da = xa[i] - ra
        db = xb[i] - rb
        u = _exp_exact(da) if _exp_bad(da) | _exp_bad(db) else _exp_lane_in(da, lo)
        if u != 0.0 and db == -INF:
            xi = max(xi, xa[i])
            tt[i] = 0.0
        else:
            tt[i] = 0.0 if u == 0.0 else u * (da - db)
    return _tsum(tt, mm), xi


@jit(nogil=True)
def _kl_value(MA, ZA, ZB, S, XI):
    """KL from ``_pass_ab``: +inf when an entry with Q = 0 still has P = e^(xa - MA -
    log ZA) > 0 at the final max (the reference's test); NaN kept."""
    val = S / ZA - math.log1p((ZA - ZB) / ZB)
    if (XI > -INF) & (val == val):
        if math.exp((XI - MA) - math.log(ZA)) > 0.0:
            val = INF
    return val


# --------------------------------------------------------------------------- row passes


@jit(nogil=True)
def _ref(m):
    """The shift actually used for a running max m: 0 while the row is all -inf so far."""
    return m if m > -INF else 0.0


@jit(nogil=True)
def _pass_ab(ab, bb, geo, row, V, inv_t, want_s, bufs):
    """One pass over a row of a and b: (MA, ZA, MB, ZB, S, XI) with ZA = sum e^(xa - MA),
    S = sum e^(xa - MA) ((xa - MA) - (xb - MB)) over the entries with Q > 0 or P = 0, XI the
    largest xa of an entry with P > 0 = Q (-inf: none; see ``_kl_value``). NaN in MA when the
    row must be NaN."""
    xa = bufs[0]
    xb = bufs[1]
    ea = bufs[2]
    eb = bufs[3]
    tt = bufs[4]
    MA = -INF
    MB = -INF
    ZA = 0.0
    ZB = 0.0
    S = 0.0
    XI = -INF
    lo = ab.itemsize == 4
    for j in range(0, V, CH):
        mm = min(CH, V - j)
        ma = _load(ab, geo, 0, row, j, mm, inv_t, xa)
        mb = _load(bb, geo, 1, row, j, mm, inv_t, xb)
        if not ((ma < INF) & (mb < INF)):  # NaN or +inf: the row is NaN
            return math.nan, 0.0, math.nan, 0.0, math.nan, -INF
        if (ma > MA) | (mb > MB):
            na = max(MA, ma)
            nb = max(MB, mb)
            da = _ref(na) - _ref(MA)
            db = _ref(nb) - _ref(MB)
            if ZA != 0.0:
                sa = math.exp(-da)
                S = 0.0 if sa == 0.0 else sa * (S - (da - db) * ZA)
                ZA *= sa
            if ZB != 0.0:
                ZB *= math.exp(-db)
            MA = na
            MB = nb
        _chunk_ab(xa, xb, _ref(MA), _ref(MB), ea, eb, tt, mm, want_s, lo)
        ZA += _tsum(ea, mm)
        ZB += _tsum(eb, mm)
        if want_s:
            s = _tsum(tt, mm)
            if s == INF:  # rare: entries with P > 0 = Q (or an overflowing term)
                s, xi = _chunk_finite_s(xa, xb, _ref(MA), _ref(MB), tt, mm, lo)
                XI = max(XI, xi)
            S += s
    if (MA == -INF) | (MB == -INF):
        return math.nan, 0.0, math.nan, 0.0, math.nan, -INF
    return MA, ZA, MB, ZB, S, XI


@jit(nogil=True)
def _pass_a(ab, geo, k, row, V, inv_t, want_h, bufs):
    """One pass over a row of array k: (MA, ZA, H) with H = sum e^(xa - MA) (xa - MA)."""
    xa = bufs[0]
    ea = bufs[2]
    tt = bufs[4]
    MA = -INF
    ZA = 0.0
    H = 0.0
    for j in range(0, V, CH):
        mm = min(CH, V - j)
        ma = _load(ab, geo, k, row, j, mm, inv_t, xa)
        if not (ma < INF):
            return math.nan, 0.0, math.nan
        if ma > MA:
            da = _ref(ma) - _ref(MA)
            if ZA != 0.0:
                sa = math.exp(-da)
                # sa == 0 (a jump > 745, maybe an overflowing one): every old term is 0
                H = 0.0 if sa == 0.0 else sa * (H - da * ZA)
                ZA *= sa
            MA = ma
        _chunk_a(xa, _ref(MA), ea, tt, mm, want_h, ab.itemsize == 4)
        ZA += _tsum(ea, mm)
        if want_h:
            H += _tsum(tt, mm)
    if MA == -INF:
        return math.nan, 0.0, math.nan
    return MA, ZA, H


@jit(nogil=True)
def _jsd_pass2(ab, bb, geo, row, V, inv_t, ra, la, rb, lb, beta, lo, bufs):
    """(sum p (lp - lm), sum q (lq - lm), sum p, sum q) with lp = xa - ra - la, lq = xb - rb -
    lb; elements with lp == lq add exactly 0 (identical rows give 0.0). ``lo``: the shorter
    exp and log series (float32 inputs of normalised rows)."""
    xa = bufs[0]
    xb = bufs[1]
    tp = bufs[2]
    tq = bufs[3]
    lpb = bufs[4]
    lqb = bufs[5]
    pb = bufs[6]
    qb = bufs[7]
    b1 = 1.0 - beta
    SP = 0.0
    SQ = 0.0
    ZP = 0.0
    ZQ = 0.0
    for j in range(0, V, CH):
        mm = min(CH, V - j)
        _load(ab, geo, 0, row, j, mm, inv_t, xa)
        _load(bb, geo, 1, row, j, mm, inv_t, xb)
        bad = 0
        for i in range(mm):
            lp = (xa[i] - ra) - la
            lq = (xb[i] - rb) - lb
            p = _exp_lane_in(lp, lo)
            q = _exp_lane_in(lq, lo)
            bad |= _exp_bad(lp) | _exp_bad(lq)
            lpb[i] = lp
            lqb[i] = lq
            pb[i] = p
            qb[i] = q
        if bad:
            for i in range(mm):
                if _exp_bad(lpb[i]) | _exp_bad(lqb[i]):
                    pb[i] = _exp_exact(lpb[i])
                    qb[i] = _exp_exact(lqb[i])
        bad = 0
        for i in range(mm):
            p = pb[i]
            q = qb[i]
            m = beta * p + b1 * q
            lm = _log_lane_in(m, lo)
            # m underflowed (a tiny beta or 1 - beta): log M is taken in log space
            bad |= _log_bad(m) | np.int64((m < MIN_NORMAL) & ((p > 0.0) | (q > 0.0)))
            same = lpb[i] == lqb[i]
            tp[i] = 0.0 if (p == 0.0) | same else p * (lpb[i] - lm)
            tq[i] = 0.0 if (q == 0.0) | same else q * (lqb[i] - lm)
        if bad:
            for i in range(mm):
                p = pb[i]
                q = qb[i]
                m = beta * p + b1 * q
                if _log_bad(m) | ((m < MIN_NORMAL) & ((p > 0.0) | (q > 0.0))):
                    lm = _log_mix(beta, b1, p, q, lpb[i], lqb[i])
                    same = lpb[i] == lqb[i]
                    tp[i] = 0.0 if (p == 0.0) | same else p * (lpb[i] - lm)
                    tq[i] = 0.0 if (q == 0.0) | same else q * (lqb[i] - lm)
        SP += _tsum(tp, mm)
        SQ += _tsum(tq, mm)
        ZP += _tsum(pb, mm)
        ZQ += _tsum(qb, mm)
    return SP, SQ, ZP, ZQ


@jit(nogil=True)
def _row_logprobs(ab, bb, geo, row, V, op, beta, bufs):
    """``log_probs`` (at inv_t == 1): rows are log P, log Q as given (no max, no
    normaliser). Returns (S1, S2, sum P, sum Q): the op's sums and the rows' masses (0 for a
    row without mass, which has no distribution)."""
    if op == OP_JSD:
        # unnormalised rows as given (p may be >> 1, where the first-order parts of the two
        # sums cancel): the full series, as the Cython kernel
        return _jsd_pass2(ab, bb, geo, row, V, 1.0, 0.0, 0.0, 0.0, 0.0, beta, False, bufs)
    xa = bufs[0]
    xb = bufs[1]
    ea = bufs[2]
    eb = bufs[3]
    tt = bufs[4]
    S = 0.0
    ZA = 0.0
    ZB = 0.0
    for j in range(0, V, CH):
        mm = min(CH, V - j)
        _load(ab, geo, 0, row, j, mm, 1.0, xa)
        if op == OP_ENTROPY:
            _chunk_a(xa, 0.0, ea, tt, mm, True, ab.itemsize == 4)
        else:
            _load(bb, geo, 1, row, j, mm, 1.0, xb)
            _chunk_ab(xa, xb, 0.0, 0.0, ea, eb, tt, mm, True, ab.itemsize == 4)
            ZB += _tsum(eb, mm)
        ZA += _tsum(ea, mm)
        S += _tsum(tt, mm)
    return S, 0.0, ZA, (ZA if op == OP_ENTROPY else ZB)


@jit(nogil=True)
def _jsd_value(beta, sp, sq):
    """beta sp + (1 - beta) sq, a zero weight dropping its sum (sp may be +inf at beta 0)."""
    return (0.0 if beta == 0.0 else beta * sp) + (0.0 if beta == 1.0 else (1.0 - beta) * sq)


@jit(nogil=True)
def _row_value(ab, bb, geo, row, V, op, beta, inv_t, log_probs, bufs):
    """The op's value for one row; ``log_probs``: the rows are log-probabilities used as
    given (the contract's ``log_probs`` at inv_t == 1)."""
    if log_probs:
        s1, s2, za, zb = _row_logprobs(ab, bb, geo, row, V, op, beta, bufs)
        if (za == 0.0) | (zb == 0.0):
            return math.nan  # a row without probability mass
        if op == OP_ENTROPY:
            return -s1
        val = s1 if op == OP_KL else _jsd_value(beta, s1, s2)
    elif op == OP_ENTROPY:
        MA, ZA, H = _pass_a(ab, geo, 0, row, V, inv_t, True, bufs)
        return math.log(ZA) - H / ZA if MA == MA else math.nan
    elif op == OP_KL:
        MA, ZA, MB, ZB, S, XI = _pass_ab(ab, bb, geo, row, V, inv_t, True, bufs)
        if MA != MA:
            return math.nan
        val = _kl_value(MA, ZA, ZB, S, XI)
    else:  # OP_JSD
        MA, ZA, MB, ZB, _, _ = _pass_ab(ab, bb, geo, row, V, inv_t, False, bufs)
        if MA != MA:
            return math.nan
        sp, sq, _, _ = _jsd_pass2(ab, bb, geo, row, V, inv_t, MA, math.log(ZA), MB,
                                  math.log(ZB), beta, ab.itemsize == 4, bufs)
        val = _jsd_value(beta, sp, sq)
    if val < 0.0:
        val = 0.0  # rounding noise: KL, JSD >= 0 (NaN kept)
    if op == OP_JSD and (beta == 0.0 or beta == 1.0) and val == val:
        val = 0.0
    return val


# --------------------------------------------------------------------------- kernels


@threaded_kernel
def _rows_kernel(ab, bb, geo, rows, V, op, beta, inv_t, log_probs, act, has_act, out):
    nch = min(rows, NCHUNK)
    for c in prange(nch):
        bufs = np.empty((NBUF, CH))
        for r in range(c * rows // nch, (c + 1) * rows // nch):
            if has_act and act[r] == 0:
                out[r] = 0.0
            else:
                out[r] = _row_value(ab, bb, geo, r, V, op, beta, inv_t, log_probs, bufs)


@threaded_kernel
def _token_kernel(bb, geo, rows, V, tokens, inv_t, ignore_index, out):
    nch = min(rows, NCHUNK)
    for c in prange(nch):
        bufs = np.empty((NBUF, CH))
        for r in range(c * rows // nch, (c + 1) * rows // nch):
            tok = tokens[r]
            if tok == ignore_index:
                out[r] = 0.0
                continue
            MB, ZB, _ = _pass_a(bb, geo, 0, r, V, inv_t, False, bufs)
            if MB != MB:
                out[r] = math.nan
            else:
                y = np.float64(bb[geo[0, 0] + r * geo[0, 1] + tok * geo[0, 2]]) * inv_t
                out[r] = (y - MB) - math.log(ZB)


@jit(nogil=True)
def _exp_chunk(x, r, l, e, mm, lo):
    """e[:mm] = e^((x - r) - l), branch-free with the scalar fix-up of the rare lanes."""
    bad = 0
    for i in range(mm):
        z = (x[i] - r) - l
        bad |= _exp_bad(z)
        e[i] = _exp_lane_in(z, lo)
    if bad:
        for i in range(mm):
            z = (x[i] - r) - l
            if _exp_bad(z):
                e[i] = _exp_exact(z)


@jit(nogil=True)
def _grad_row(ab, bb, geo, r, V, op, beta, inv_t, rs, ga, gb, want_a, want_b, bufs):
    """The op's value for row r (returned) and, unless rs == 0, ``rs * inv_t *`` its
    gradients w.r.t. x and y into ga[r*V:(r+1)*V] / gb[...] (when wanted): pass 1 (maxima,
    normalisers and the KL / entropy sum), for JSD pass 2 (its two sums), then the write pass."""
    lo = ab.itemsize == 4
    MB = 0.0
    lb = 0.0
    SP = 0.0
    SQ = 0.0
    if op == OP_ENTROPY:
        MA, ZA, H = _pass_a(ab, geo, 0, r, V, inv_t, True, bufs)
        val = math.log(ZA) - H / ZA if MA == MA else math.nan
        K = val
    elif op == OP_KL:
        MA, ZA, MB, ZB, S, XI = _pass_ab(ab, bb, geo, r, V, inv_t, True, bufs)
        K = _kl_value(MA, ZA, ZB, S, XI) if MA == MA else math.nan
        val = 0.0 if K < 0.0 else K
        if MA == MA:
            lb = math.log(ZB)
    else:  # OP_JSD
        MA, ZA, MB, ZB, _, _ = _pass_ab(ab, bb, geo, r, V, inv_t, False, bufs)
        K = 0.0
        if MA != MA:
            val = math.nan
        else:
            lb = math.log(ZB)
            SP, SQ, _, _ = _jsd_pass2(ab, bb, geo, r, V, inv_t, MA, math.log(ZA), MB, lb, beta,
                                      lo, bufs)
            val = _jsd_value(beta, SP, SQ)
            if val < 0.0:
                val = 0.0
            if (beta == 0.0 or beta == 1.0) and val == val:
                val = 0.0
    if rs == 0.0 or val != val:
        fill = 0.0 if rs == 0.0 else math.nan
        if want_a:
            for i in range(V):
                ga[r * V + i] = fill
        if want_b:
            for i in range(V):
                gb[r * V + i] = fill
        return val
    f = inv_t * rs
    la = math.log(ZA)
    xa = bufs[0]
    xb = bufs[1]
    pb = bufs[2]
    qb = bufs[3]
    ta = bufs[4]
    tb = bufs[5]
    b1 = 1.0 - beta
    zero_jsd = op == OP_JSD and (beta == 0.0 or beta == 1.0)
    for j in range(0, V, CH):
        mm = min(CH, V - j)
        _load(ab, geo, 0, r, j, mm, inv_t, xa)
        _exp_chunk(xa, MA, la, pb, mm, lo)
        if op == OP_ENTROPY:
            for i in range(mm):
                p = pb[i]
                ta[i] = 0.0 if p == 0.0 else -p * (((xa[i] - MA) - la) + K)
        else:
            _load(bb, geo, 1, r, j, mm, inv_t, xb)
            if op != OP_KL or want_b:  # KL's d/da alone needs y, not q
                _exp_chunk(xb, MB, lb, qb, mm, lo)
            if op == OP_KL:
                if want_a:
                    for i in range(mm):
                        p = pb[i]
                        d = ((xa[i] - MA) - la) - ((xb[i] - MB) - lb)
                        ta[i] = 0.0 if p == 0.0 else p * (d - K)
                if want_b:
                    for i in range(mm):
                        tb[i] = qb[i] - pb[i]
            elif zero_jsd:
                for i in range(mm):
                    ta[i] = 0.0
                    tb[i] = 0.0
            else:
                bad = 0
                for i in range(mm):
                    p = pb[i]
                    q = qb[i]
                    lp = (xa[i] - MA) - la
                    lq = (xb[i] - MB) - lb
                    m = beta * p + b1 * q
                    lm = _log_lane_in(m, lo)
                    bad |= _log_bad(m) | np.int64((m < MIN_NORMAL) & ((p > 0.0) | (q > 0.0)))
                    same = lp == lq
                    dp = 0.0 if same else lp - lm
                    dq = 0.0 if same else lq - lm
                    ta[i] = 0.0 if p == 0.0 else beta * p * (dp - SP)
                    tb[i] = 0.0 if q == 0.0 else b1 * q * (dq - SQ)
                if bad:
                    for i in range(mm):
                        p = pb[i]
                        q = qb[i]
                        m = beta * p + b1 * q
                        if _log_bad(m) | ((m < MIN_NORMAL) & ((p > 0.0) | (q > 0.0))):
                            lp = (xa[i] - MA) - la
                            lq = (xb[i] - MB) - lb
                            lm = _log_mix(beta, b1, p, q, lp, lq)
                            same = lp == lq
                            dp = 0.0 if same else lp - lm
                            dq = 0.0 if same else lq - lm
                            ta[i] = 0.0 if p == 0.0 else beta * p * (dp - SP)
                            tb[i] = 0.0 if q == 0.0 else b1 * q * (dq - SQ)
        if want_a:
            for i in range(mm):
                ga[r * V + j + i] = ta[i] * f
        if want_b and op != OP_ENTROPY:
            for i in range(mm):
                gb[r * V + j + i] = tb[i] * f
    return val


@threaded_kernel
def _grad_kernel(ab, bb, geo, rows, V, op, beta, inv_t, rowscale, out_val, ga, gb, want_a,
                 want_b):
    nch = min(rows, NCHUNK)
    for c in prange(nch):
        bufs = np.empty((NBUF, CH))
        for r in range(c * rows // nch, (c + 1) * rows // nch):
            out_val[r] = _grad_row(ab, bb, geo, r, V, op, beta, inv_t, rowscale[r], ga, gb,
                                   want_a, want_b, bufs)


@threaded_kernel
def _token_grad_kernel(bb, geo, rows, V, tokens, inv_t, ignore_index, rowscale, out, gb):
    nch = min(rows, NCHUNK)
    lo = bb.itemsize == 4
    for c in prange(nch):
        bufs = np.empty((NBUF, CH))
        xb = bufs[0]
        qb = bufs[2]
        for r in range(c * rows // nch, (c + 1) * rows // nch):
            tok = tokens[r]
            rs = rowscale[r]
            if tok == ignore_index or rs == 0.0:
                for i in range(V):
                    gb[r * V + i] = 0.0
                if tok == ignore_index:
                    out[r] = 0.0
                    continue
            MB, ZB, _ = _pass_a(bb, geo, 0, r, V, inv_t, False, bufs)
            if MB != MB:
                out[r] = math.nan
                if rs != 0.0:
                    for i in range(V):
                        gb[r * V + i] = math.nan
                continue
            lb = math.log(ZB)
            y = np.float64(bb[geo[0, 0] + r * geo[0, 1] + tok * geo[0, 2]]) * inv_t
            out[r] = (y - MB) - lb
            if rs == 0.0:
                continue
            f = inv_t * rs
            for j in range(0, V, CH):
                mm = min(CH, V - j)
                _load(bb, geo, 0, r, j, mm, inv_t, xb)
                _exp_chunk(xb, MB, lb, qb, mm, lo)
                for i in range(mm):
                    gb[r * V + j + i] = -qb[i] * f
            if 0 <= tok < V:
                gb[r * V + tok] = (1.0 - _exp_exact((y - MB) - lb)) * f


# --------------------------------------------------------------------------- wrappers


def _geometry(*arrays):
    """Flat read-only buffers and their int64 [len(arrays), 3] (offset, row, col) strides."""
    g: tuple = ()
    bufs = []
    for a in arrays:
        flat, off, s0, s1 = flat_buffer(a)
        g += (off, s0, s1)
        bufs.append(flat)
    return bufs, geometry(g)


def _ro(x: np.ndarray, dtype) -> np.ndarray:
    """A read-only contiguous 1-D view (a copy only if dtype or layout differ; O(rows))."""
    v = np.ascontiguousarray(x, dtype=dtype).reshape(-1).view()
    v.flags.writeable = False
    return v


_NO_ACTIVE = np.zeros(1, dtype=np.uint8)
_NO_ACTIVE.flags.writeable = False


def _out_buffer(out: np.ndarray) -> np.ndarray:
    return out if out.flags.c_contiguous else np.empty(out.shape, np.float64)


def logits_rows(a, b, op, beta, inv_t, log_probs, active, out):
    """Per-row KL(P||Q) (``OP_KL``), JSD_beta (``OP_JSD``) or entropy of P (``OP_ENTROPY``)
    into ``out`` (float64 [rows]); rows with ``active[r] == 0`` get 0.0."""
    op = int(op)
    if op not in _OP_CODES:
        raise ValueError(f"unknown logits op code {op}: the kernels know {LOGITS_OPS}")
    rows, V = a.shape
    if rows == 0:
        return
    inv_t = float(inv_t)
    (ab, bb), geo = _geometry(a, a if op == OP_ENTROPY else b)
    has_act = active is not None
    act = _ro(active, np.uint8) if has_act else _NO_ACTIVE
    o = _out_buffer(out)
    # the kernels' log_probs: rows used as given, only at inv_t == 1 (renormalised otherwise)
    log_probs = bool(log_probs) and inv_t == 1.0
    _rows_kernel(rows * V, ab, bb, geo, rows, V, op, float(beta), inv_t, log_probs, act,
                 has_act, o)
    if o is not out:
        out[...] = o


def logits_token(b, tokens, inv_t, ignore_index, out):
    """out[r] = log softmax(b[r] * inv_t)[tokens[r]] (float64); 0.0 where tokens ==
    ignore_index."""
    rows, V = b.shape
    if rows == 0:
        return
    (bb,), geo = _geometry(b)
    o = _out_buffer(out)
    _token_kernel(rows * V, bb, geo, rows, V, _ro(tokens, np.int64), float(inv_t),
                  int(ignore_index), o)
    if o is not out:
        out[...] = o


def _grad_out(g, rows, V, dtype):
    """A flat C-ordered buffer for a gradient output (the array's own memory when it is
    C-contiguous), and whether it is wanted; a 1-element dummy for None."""
    if g is None:
        return np.zeros(1, dtype), False
    if g.flags.c_contiguous:
        return g.reshape(-1), True
    return np.empty(rows * V, dtype), True


def _grad_back(g, flat):
    if g is not None and not g.flags.c_contiguous:
        g[...] = flat.reshape(g.shape)


def logits_grad(a, b, op, beta, inv_t, rowscale, out_val, grad_a, grad_b):
    """The op's row value into ``out_val`` and ``rowscale[r] * inv_t *`` its gradients with
    respect to ``a*inv_t`` / ``b*inv_t`` into ``grad_a`` / ``grad_b`` (None: not computed);
    see ``numpy.logits.logits_grad``."""
    op = int(op)
    if op not in _OP_CODES:
        raise ValueError(f"unknown logits op code {op}: the kernels know {LOGITS_OPS}")
    rows, V = a.shape
    if rows == 0:
        return
    (ab, bb), geo = _geometry(a, a if op == OP_ENTROPY else b)
    o = _out_buffer(out_val)
    fa, want_a = _grad_out(grad_a, rows, V, ab.dtype)
    fb, want_b = _grad_out(None if op == OP_ENTROPY else grad_b, rows, V, ab.dtype)
    _grad_kernel(rows * V, ab, bb, geo, rows, V, op, float(beta), float(inv_t),
                 _ro(rowscale, np.float64), o, fa, fb, want_a, want_b)
    if o is not out_val:
        out_val[...] = o
    _grad_back(grad_a, fa)
    if op != OP_ENTROPY:
        _grad_back(grad_b, fb)


def logits_token_grad(b, tokens, inv_t, ignore_index, rowscale, out_val, grad_b):
    """``logits_token`` into ``out_val`` and ``rowscale[r] * inv_t * (onehot - Q)`` into
    ``grad_b`` (zeros where tokens == ignore_index)."""
    rows, V = b.shape
    if rows == 0:
        return
    (bb,), geo = _geometry(b)
    o = _out_buffer(out_val)
    fb, _ = _grad_out(grad_b, rows, V, bb.dtype)
    _token_grad_kernel(rows * V, bb, geo, rows, V, _ro(tokens, np.int64), float(inv_t),
                       int(ignore_index), _ro(rowscale, np.float64), o, fb)
    if o is not out_val:
        out_val[...] = o
    _grad_back(grad_b, fb)
