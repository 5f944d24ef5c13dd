"""Numba backend of the kernel contract (``_contract``; spec: ``backends.numpy``).

Terms follow ``docs/kernel_math.md``: float64 lanes, Cody-Waite range reduction, ``2**k``
built from bits, a degree-13 Taylor polynomial, and a scalar libm fix-up for lanes outside
the fast range (NaN, +-inf, |l| > 700). Work is split into (row, block) tasks of ``BLOCK``
elements; every task writes its own partials slot, so the bits never depend on the thread
count. Nothing is compiled at import: the kernels compile (or load from the on-disk cache)
on first use, one specialization per (input dtype, mask dtype).

Layout: each input reaches the kernels as a 1-D read-only buffer spanning its memory plus
(offset, row stride, column stride) in elements, so one compiled specialization serves
C-ordered, transposed and negative-stride inputs; rows with unit stride take a contiguous
load loop, others a gather loop.
"""

from __future__ import annotations

import math
import os

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from ..._estimators import ABS, BY_CODE, K1, K2, K3, RK1, RK3
from .._contract import BLOCK, N_PARTIALS
from .cache import jit
from .common import (
    HALF_32,
    ONE_32,
    ZERO_32,
    abs_bits32,
    exp_parts32,
    f64_as_i64,
    flat_buffer,
    fma,
    fma32,
    geometry,
    specialize,
    threaded_kernel,
    tiny_key32,
)
from .common import exp_parts as _exp_parts
from .common import exp_parts_lo as _exp_parts_lo

SUB = 512  # elements per sub-chunk: the l / exp(log_iw) scratch buffers stay in L1
NCHUNK = 256  # parallel chunks of consecutive tasks (any value gives the same bits)

FAST_MAX = 700.0  # |l| <= FAST_MAX: 2**k is a normal double and exp(l) cannot overflow
FAST_BITS = 0x4085E00000000000  # the bits of 700.0
ABS_BITS = 0x7FFFFFFFFFFFFFFF

# float32 lanes (``_partials32_kernel``): the lane formulas hold for |l| <= 87 (80 for
# reverse k3, whose term overflows float32 from l = 84.3) and |l| >= 2**-62 (below, k2, k3
# and reverse k3 terms, about l**2/2, leave float32's normal range); other lanes (NaN, inf,
# out of range) go through the float64 fix-up. ``F32_LANES`` (on by default; env
# ``FASTKL_NUMBA_F32_LANES=0`` turns it off, read in Python only: no compiled code depends on
# it) selects the float32 lanes for eligible float32 inputs.
F32_LANES = os.environ.get("FASTKL_NUMBA_F32_LANES", "1") != "0"
FAST32 = np.float32(87.0)
FAST32_R = np.float32(80.0)
FAST32_BITS = np.int32(0x42AE0000)  # bits of 87.0f
FAST32_BITS_R = np.int32(0x42A00000)  # bits of 80.0f
TINY32 = np.float32(2.0**-62)
TINY32_KEY = np.int32((0x20800000 - 1) - 2**31)  # tiny_key32 of 2**-62: below it, fix-up
NEG_CLAMP32 = np.float32(-87.0)  # exp argument floor: e^l < 2e-38 there, l -> -inf is +inf
SUB32 = 512  # a float32 sub-chunk: 8 runs of LANES32 lanes
LANES32 = 64


# --------------------------------------------------------------------------- 16-bit loads
# float16 and bfloat16 inputs (the contract's 16-bit logq / logp / log_iw) reach the kernels
# as their raw bits: float16 as a uint16 view, bfloat16 as an int16 view (numba has no
# float16 arrays on the CPU; the integer type tells the two formats apart at compile time,
# so each specialization has one branch-free load). ``wide`` turns an element into float32
# in registers (exact); any other element (float32, float64, the uint8 mask) is unchanged.


@intrinsic
def wide(typingctx, x):
    """An element as the kernels read it: float16 bits (uint16) or bfloat16 bits (int16) ->
    the float32 of the same value (exact; NaN stays NaN, infinities and subnormals kept);
    anything else unchanged."""
    if x == types.uint16:  # float16
        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            h = builder.zext(args[0], i32)
            a = builder.and_(h, ir.Constant(i32, 0x7FFF))
            sh = builder.shl(a, ir.Constant(i32, 13))
            normal = builder.add(sh, ir.Constant(i32, 112 << 23))  # rebias 15 -> 127
            nonfin = builder.or_(sh, ir.Constant(i32, 0x7F800000))  # inf, NaN (payload kept)
            # subnormal or zero: a * 2**-24, exact in float32 (a < 1024)
            sub = builder.fmul(builder.uitofp(a, ir.FloatType()),
                               ir.Constant(ir.FloatType(), 2.0**-24))
            sub = builder.bitcast(sub, i32)
            r = builder.select(builder.icmp_unsigned(">=", a, ir.Constant(i32, 0x400)),
                               normal, sub)
            r = builder.select(builder.icmp_unsigned(">=", a, ir.Constant(i32, 0x7C00)),
                               nonfin, r)
            sign = builder.shl(builder.and_(h, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
            return builder.bitcast(builder.or_(r, sign), ir.FloatType())

        return types.float32(x), codegen
    if x == types.int16:  # bfloat16: the high half of a float32
        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            b = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
            return builder.bitcast(b, ir.FloatType())

        return types.float32(x), codegen
    if isinstance(x, (types.Float, types.Integer)):
        def codegen(context, builder, sig, args):
            return args[0]

        return x(x), codegen
    return None


# --------------------------------------------------------------------------- lane math


@jit(nogil=True)
def _em1x(x, s, r, q):
    """e^x - 1 - x from _exp_parts; for k == 0 (s == 1, r == x) exactly q."""
    return fma(s, q, fma(s, r, s - 1.0) - x)


@jit(nogil=True)
def _ex(s, r, q):
    """e^x from _exp_parts."""
    return fma(s, r + q, s)


@jit(nogil=True)
def _clip(x, lo, hi):
    """clip keeping NaN."""
    x = lo if x < lo else x
    return hi if x > hi else x


@jit(nogil=True)
def _neg_sign(l):
    """-sign(l), the derivative of |l| with respect to logq (0 at 0, NaN for NaN)."""
    return -1.0 if l > 0.0 else (1.0 if l < 0.0 else l * 0.0)


@jit(nogil=True)
def _term_scalar(l, est):
    """(term, d term / d logq) with libm, for any l: numpy.mc.term_and_grad, one element.
    ``est`` is one of the codes K1..ABS (checked by the wrappers)."""
    if est == K1:
        return -l, 1.0
    if est == K2:
        return 0.5 * l * l, -l
    if est == ABS:
        return abs(l), _neg_sign(l)
    if est == RK1:
        r = math.exp(l)
        t = r * l
        if l == -math.inf:
            t = 0.0
        return t, -r * (l + 1.0)
    e = math.expm1(l) - l  # only reached for |l| > FAST_MAX, NaN or +-inf
    if est == K3:
        t = e
        g = -(e + l)
        if l == -math.inf:
            t = math.inf
    else:  # RK3
        r = math.exp(l)
        t = r * (l - 1.0) + 1.0 if l < -1.0 else l * l + (l - 1.0) * e
        g = -r * l
        if l == -math.inf:
            t = 1.0
    if l == math.inf:
        t = math.inf
    return t, g


# --------------------------------------------------------------------------- stages
# Each stage is one branch-free loop over a sub-chunk that LLVM vectorizes (checked in the
# assembly: zmm FMAs, vpsllq for 2**k); the estimator switch and the clamps sit outside the
# loops so each loop body is a fixed formula. Lanes outside the fast range are detected with
# an integer max over |bits| (2 integer ops per vector, cheaper than counting them).
# Measured (znver4, 1 thread, k3, float32, cycles/element): terms loop 1.9 with FMA (3.0
# without), load 0.5, sum 0.4.


@jit(nogil=True)
def _load_l(qb, pb, geo, row, j, mm, lb):
    """lb[:mm] = float64(logp) - float64(logq) for row ``row`` from column j."""
    qs = geo[0, 2]
    ps = geo[1, 2]
    qo = geo[0, 0] + row * geo[0, 1] + j * qs
    po = geo[1, 0] + row * geo[1, 1] + j * ps
    if qs == 1 and ps == 1:
        qv = qb[qo : qo + mm]
        pv = pb[po : po + mm]
        for i in range(mm):
            lb[i] = np.float64(wide(pv[i])) - np.float64(wide(qv[i]))
    else:
        for i in range(mm):
            lb[i] = np.float64(wide(pb[po + i * ps])) - np.float64(wide(qb[qo + i * qs]))


@jit(nogil=True)
def _load_x(xb, geo, k, row, j, mm, out):
    """out[:mm] = float64 of array k (geo row k) for row ``row`` from column j."""
    s = geo[k, 2]
    o = geo[k, 0] + row * geo[k, 1] + j * s
    if s == 1:
        v = xb[o : o + mm]
        for i in range(mm):
            out[i] = np.float64(wide(v[i]))
    else:
        for i in range(mm):
            out[i] = np.float64(wide(xb[o + i * s]))


@jit(nogil=True)
def _clip_pass(x, mm, lo, hi):
    for i in range(mm):
        x[i] = _clip(x[i], lo, hi)


@jit(nogil=True)
def _slow(x):
    """True where the fast path does not apply (NaN, +-inf, |x| > FAST_MAX)."""
    return not abs(x) <= FAST_MAX


# The terms stage over one exp series (the series degree is then a constant of each compiled
# copy: a loop-invariant flag inside the loops stopped LLVM vectorizing them). One source,
# two kernels with their own names (``specialize``): ``_stage_exp`` is the series.
_stage_exp = _exp_parts


def _terms_stage(lb, tb, gb, mm, est, want_g):
    """tb[:mm] = t(lb) (and gb[:mm] = dt/dlogq if want_g), unclamped; ``est`` one of the
    codes K1..ABS (checked by the wrappers).

    Returns True when some lane went through the libm fix-up (its term may be NaN/inf)."""
    mx = 0  # max |bits| of l: > FAST_BITS iff some lane is NaN, inf or beyond FAST_MAX
    if est == K1 or est == K2 or est == ABS:  # exact for every l (NaN, inf included): no
        if est == K1:  # fix-up; NaN counts
            for i in range(mm):
                l = lb[i]
                tb[i] = -l
                mx = max(mx, f64_as_i64(l) & ABS_BITS)
        elif est == ABS:
            for i in range(mm):
                l = lb[i]
                tb[i] = abs(l)
                mx = max(mx, f64_as_i64(l) & ABS_BITS)
        else:
            for i in range(mm):
                l = lb[i]
                tb[i] = 0.5 * l * l
                mx = max(mx, f64_as_i64(l) & ABS_BITS)
        if want_g:
            if est == ABS:
                for i in range(mm):
                    gb[i] = _neg_sign(lb[i])
            else:
                for i in range(mm):
                    gb[i] = 1.0 if est == K1 else -lb[i]
        return mx > FAST_BITS
    if est == K3:
        if want_g:
            for i in range(mm):
                l = lb[i]
                s, r, q = _stage_exp(l)
                e = _em1x(l, s, r, q)
                tb[i] = e
                gb[i] = -(e + l)
                mx = max(mx, f64_as_i64(l) & ABS_BITS)
        else:
            for i in range(mm):
                l = lb[i]
                s, r, q = _stage_exp(l)
                tb[i] = _em1x(l, s, r, q)
                mx = max(mx, f64_as_i64(l) & ABS_BITS)
    elif est == RK1:
        for i in range(mm):
            l = lb[i]
            s, r, q = _stage_exp(l)
            rr = _ex(s, r, q)
            tb[i] = rr * l
            gb[i] = -rr * (l + 1.0)  # gb is scratch when not want_g: cheaper than a 2nd loop
            mx = max(mx, f64_as_i64(l) & ABS_BITS)
    else:  # RK3
        for i in range(mm):
            l = lb[i]
            s, r, q = _stage_exp(l)
            e = _em1x(l, s, r, q)
            rr = _ex(s, r, q)
            tb[i] = rr * (l - 1.0) + 1.0 if l < -1.0 else l * l + (l - 1.0) * e
            gb[i] = -rr * l
            mx = max(mx, f64_as_i64(l) & ABS_BITS)
    if mx <= FAST_BITS:
        return False
    for i in range(mm):
        l = lb[i]
        if _slow(l):
            tb[i], gb[i] = _term_scalar(l, est)
    return True


# the series choice is called ``lo`` throughout the numba code (True: the short series, for
# float32 inputs); ``_terms_stage13`` (the full, degree-13 series) keeps the name the cache
# tests know it by
_terms_stage13 = jit(nogil=True)(specialize(_terms_stage, "_terms_stage13"))
_terms_stage_lo = jit(nogil=True)(  # float32 inputs
    specialize(_terms_stage, "_terms_stage_lo", _stage_exp=_exp_parts_lo))


@jit(nogil=True)
def _exp_stage(xb, eb, mm):
    """eb[:mm] = exp(xb[:mm]); returns True when some lane was computed by libm."""
    mx = 0
    for i in range(mm):
        x = xb[i]
        s, r, q = _exp_parts(x)
        eb[i] = _ex(s, r, q)
        mx = max(mx, f64_as_i64(x) & ABS_BITS)
    if mx <= FAST_BITS:
        return False
    for i in range(mm):
        x = xb[i]
        if _slow(x):
            eb[i] = math.exp(x)
    return True


@jit(nogil=True)
def _gate_pass(x, g, mm, lo, hi):
    """g[i] = 0 wherever x[i] is outside [lo, hi] or NaN (the derivative of a clip)."""
    for i in range(mm):
        xi = x[i]
        g[i] = g[i] if (xi >= lo and xi <= hi) else 0.0


@jit(nogil=True)
def _sub_terms(qb, pb, ib, geo, row, j, mm, est, has_iw, clamp, want_g, lb, xb, eb, tb, gb,
               ab):
    """Weighted terms ``v`` of ``mm`` elements of a row into tb (and dv/dlogq into gb if
    want_g): numpy.mc._terms_grads. ``clamp`` = (lr_lo, lr_hi, v_lo, v_hi, weighted,
    iw_grad); ``ab`` is scratch for the log-ratios before their clamp (want_g only).

    Returns True when some lane went through a libm fix-up (a term may be NaN or inf)."""
    _load_l(qb, pb, geo, row, j, mm, lb)
    clamp_l = clamp[0] > -math.inf or clamp[1] < math.inf
    if clamp_l:
        if want_g:
            for i in range(mm):
                ab[i] = lb[i]
        _clip_pass(lb, mm, clamp[0], clamp[1])
    if qb.itemsize <= 4:  # float32 (and 16-bit) inputs: the short series (``lo``)
        fixed_up = _terms_stage_lo(lb, tb, gb, mm, est, want_g)
    else:
        fixed_up = _terms_stage13(lb, tb, gb, mm, est, want_g)
    clamp_v = clamp[2] > -math.inf or clamp[3] < math.inf
    weighted = clamp[4] != 0.0
    iw_grad = clamp[5] if want_g else 0.0  # 0, 1 or 2 (dv/dlog_iw alone)
    if has_iw:
        _load_x(ib, geo, 3, row, j, mm, xb)
        fixed_up |= _exp_stage(xb, eb, mm)
    if clamp_l and want_g and not weighted:  # the derivative of the log-ratio clip
        _gate_pass(ab, gb, mm, clamp[0], clamp[1])
    if clamp_v and not weighted:  # v = iw * clip(t)
        if want_g:
            _gate_pass(tb, gb, mm, clamp[2], clamp[3])
        _clip_pass(tb, mm, clamp[2], clamp[3])
    if iw_grad == 1.0:  # d iw / d logq = iw: + iw * (the term so far)
        for i in range(mm):
            gb[i] += tb[i]
    elif iw_grad == 2.0:
        for i in range(mm):
            gb[i] = tb[i]
    if has_iw:
        for i in range(mm):
            tb[i] *= eb[i]
        if want_g:
            for i in range(mm):
                gb[i] *= eb[i]
    if clamp_v and weighted:  # v = clip(iw * t)
        if want_g:
            _gate_pass(tb, gb, mm, clamp[2], clamp[3])
        _clip_pass(tb, mm, clamp[2], clamp[3])
    if clamp_l and want_g and weighted:  # NeMo-RL: no gradient, through iw neither
        _gate_pass(ab, gb, mm, clamp[0], clamp[1])
    return fixed_up


# --------------------------------------------------------------------------- reductions
# Sums in a fixed order: 8 independent lanes (i mod 8), a scalar tail, then a fixed tree, per
# sub-chunk; sub-chunk sums are added in order. No reassociation is ever allowed, so the
# result is the same on every call and for any number of threads. (A 64-lane accumulator
# array that LLVM vectorizes measured 0.30 vs 0.38 cycles/element here: not worth it.)


@jit(nogil=True)
def _sum8(x, m):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m8 = m - m % 8
    for i in range(0, m8, 8):
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        a4 += x[i + 4]
        a5 += x[i + 5]
        a6 += x[i + 6]
        a7 += x[i + 7]
    tail = 0.0
    for i in range(m8, m):
        tail += x[i]
    return (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))) + tail


@jit(nogil=True)
def _nz(t):
    """t, or 0.0 where t is NaN."""
    return t if t == t else 0.0


@jit(nogil=True)
def _sum8_nn(x, m):
    """(sum of the non-NaN values, number of NaNs)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m8 = m - m % 8
    for i in range(0, m8, 8):
        a0 += _nz(x[i])
        a1 += _nz(x[i + 1])
        a2 += _nz(x[i + 2])
        a3 += _nz(x[i + 3])
        a4 += _nz(x[i + 4])
        a5 += _nz(x[i + 5])
        a6 += _nz(x[i + 6])
        a7 += _nz(x[i + 7])
    tail = 0.0
    for i in range(m8, m):
        tail += _nz(x[i])
    nbad = 0
    for i in range(m):
        nbad += 0 if x[i] == x[i] else 1
    return (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))) + tail, nbad


@jit(nogil=True)
def _sums_w(t, w, m):
    """Over the included elements (w != 0, t not NaN): (sum w, sum w*t, sum w*w, nbad, cnt)."""
    w0 = w1 = w2 = w3 = s0 = s1 = s2 = s3 = v0 = v1 = v2 = v3 = 0.0
    m4 = m - m % 4
    for i in range(0, m4, 4):
        ok0 = (t[i] == t[i]) & (w[i] != 0.0)
        ok1 = (t[i + 1] == t[i + 1]) & (w[i + 1] != 0.0)
        ok2 = (t[i + 2] == t[i + 2]) & (w[i + 2] != 0.0)
        ok3 = (t[i + 3] == t[i + 3]) & (w[i + 3] != 0.0)
        a0 = w[i] if ok0 else 0.0
        a1 = w[i + 1] if ok1 else 0.0
        a2 = w[i + 2] if ok2 else 0.0
        a3 = w[i + 3] if ok3 else 0.0
        w0 += a0
        w1 += a1
        w2 += a2
        w3 += a3
        s0 += a0 * (t[i] if ok0 else 0.0)
        s1 += a1 * (t[i + 1] if ok1 else 0.0)
        s2 += a2 * (t[i + 2] if ok2 else 0.0)
        s3 += a3 * (t[i + 3] if ok3 else 0.0)
        v0 += a0 * a0
        v1 += a1 * a1
        v2 += a2 * a2
        v3 += a3 * a3
    tw = ts = tv = 0.0
    for i in range(m4, m):
        ok = (t[i] == t[i]) & (w[i] != 0.0)
        a = w[i] if ok else 0.0
        tw += a
        ts += a * (t[i] if ok else 0.0)
        tv += a * a
    nbad = 0
    cnt = 0
    for i in range(m):
        nbad += 1 if (t[i] != t[i]) & (w[i] != 0.0) else 0
        cnt += 1 if (t[i] == t[i]) & (w[i] != 0.0) else 0
    return (((w0 + w1) + (w2 + w3)) + tw, ((s0 + s1) + (s2 + s3)) + ts,
            ((v0 + v1) + (v2 + v3)) + tv, nbad, cnt)


@jit(nogil=True)
def _wdev2(t, u, c):
    """w * (t - c)**2 with t, w zeroed for an excluded element, as the reference (0 * inf = NaN)."""
    ok = (t == t) & (u != 0.0)
    d = (t if ok else 0.0) - c
    return (u if ok else 0.0) * (d * d)


@jit(nogil=True)
def _dev2(t, w, c, m, has_w, skip_nan):
    """sum w * (t - c)**2 over the block (w == 1 when not has_w; NaN terms excluded)."""
    a0 = a1 = a2 = a3 = 0.0
    m4 = m - m % 4
    if has_w:
        for i in range(0, m4, 4):
            a0 += _wdev2(t[i], w[i], c)
            a1 += _wdev2(t[i + 1], w[i + 1], c)
            a2 += _wdev2(t[i + 2], w[i + 2], c)
            a3 += _wdev2(t[i + 3], w[i + 3], c)
    elif skip_nan:
        for i in range(0, m4, 4):
            a0 += _wdev2(t[i], 1.0, c)
            a1 += _wdev2(t[i + 1], 1.0, c)
            a2 += _wdev2(t[i + 2], 1.0, c)
            a3 += _wdev2(t[i + 3], 1.0, c)
    else:
        for i in range(0, m4, 4):
            d0 = t[i] - c
            d1 = t[i + 1] - c
            d2 = t[i + 2] - c
            d3 = t[i + 3] - c
            a0 += d0 * d0
            a1 += d1 * d1
            a2 += d2 * d2
            a3 += d3 * d3
    tail = 0.0
    for i in range(m4, m):
        tail += _wdev2(t[i], w[i] if has_w else 1.0, c)
    return ((a0 + a1) + (a2 + a3)) + tail


# --------------------------------------------------------------------------- kernels


@jit(nogil=True)
def _task(rows, nblk, n, task):
    row = task // nblk
    j0 = (task - row * nblk) * BLOCK
    return row, j0, min(BLOCK, n - j0)


@jit(nogil=True)
def _chunk_sums(tb, wb, mm, has_mask, fixed_up):
    """(sum w, sum w t, sum w**2, NaN count, count) of a chunk's terms; without a mask only
    the sum and the NaN count (``fixed_up``: some lane went through the fix-up, so NaN terms
    are possible and skipped)."""
    if has_mask:
        return _sums_w(tb, wb, mm)
    if fixed_up:
        ss, nb = _sum8_nn(tb, mm)
        return 0.0, ss, 0.0, nb, 0
    return 0.0, _sum8(tb, mm), 0.0, 0, 0


@jit(nogil=True)
def _write_part(out, W, S, W2, nbad, cnt, m, has_mask):
    """The block's partials (M2 left 0.0); without a mask the weights are the counts."""
    if not has_mask:
        cnt = m - nbad
        W = W2 = float(cnt)
    out[0] = W
    out[1] = S
    out[2] = 0.0
    out[3] = W2
    out[4] = float(nbad)
    out[5] = float(cnt)


@threaded_kernel
def _partials_kernel(qb, pb, mb, ib, geo, rows, n, est, has_mask, has_iw, clamp, want_m2,
                     part):
    nblk = part.shape[1]
    ntasks = rows * nblk
    nchunk = min(ntasks, NCHUNK)
    for c in prange(nchunk):
        lb = np.empty(SUB)
        xb = np.empty(SUB)
        eb = np.empty(SUB)
        gb = np.empty(SUB)
        tblk = np.empty(BLOCK)
        wblk = np.empty(BLOCK)
        for task in range(c * ntasks // nchunk, (c + 1) * ntasks // nchunk):
            row, j0, m = _task(rows, nblk, n, task)
            W = S = W2 = 0.0
            nbad = cnt = 0
            dirty = False
            o = 0
            while o < m:
                mm = min(SUB, m - o)
                ob = o if want_m2 else 0  # keep the whole block only for the M2 pass
                tb = tblk[ob : ob + mm]
                wb = wblk[ob : ob + mm]
                fixed_up = _sub_terms(qb, pb, ib, geo, row, j0 + o, mm, est, has_iw, clamp,
                                      False, lb, xb, eb, tb, gb, gb)
                if has_mask:
                    _load_x(mb, geo, 2, row, j0 + o, mm, wb)
                if fixed_up and not has_mask:
                    dirty = True
                sw, ss, sv, nb, cn = _chunk_sums(tb, wb, mm, has_mask, fixed_up)
                W += sw
                S += ss
                W2 += sv
                nbad += nb
                cnt += cn
                o += mm
            out = part[row, j0 // BLOCK]
            _write_part(out, W, S, W2, nbad, cnt, m, has_mask)
            W = out[0]
            if want_m2 and W > 0:
                mean = S / W
                out[2] = _dev2(tblk, wblk, mean, m, has_mask, dirty)
                if m < BLOCK:  # the reference pads a short block with w = t = 0: 0*(0-mean)**2
                    out[2] += 0.0 * (mean * mean)  # (NaN when the mean is +-inf)


# --------------------------------------------------------------------------- float32 lanes
# Float32 inputs, no mask, no log_iw, no clamp, k1/k2/k3/reverse k3 (issue 12;
# docs/kernel_math.md "float32 lanes"): l = logp - logq and the terms in float32 lanes, summed
# in the loop that computes them into 64 float64 lane sums (u[k], k = i mod 64; each float32
# term widened at the accumulator: no float32 partial sums, so a sum does not depend on where
# a block starts, as chunked / streamed / dask results need), added into 64 float64
# accumulators per sub-chunk of 512 and folded by a fixed tree at the end of the block.
# Every inner loop is a loop over k with no reduction: LLVM vectorizes it
# (numba never reorders a float reduction). A sub-chunk with a lane outside the float32 range
# (NaN, inf, |l| > 87 (80), 0 < |l| < 2**-62) is summed lane by lane in float64, those lanes
# computed by the float64 lanes' formula (``_term64``). The order is fixed: same bits for
# any thread count.


@jit(nogil=True)
def _k3_32(l):
    """k3 in float32, one range-reduced exp: E = s q + ((s r + (s - 1)) - l); the exp
    argument is floored at -87 (l -> -inf gives +inf, NaN stays NaN)."""
    lc = l if not (l < NEG_CLAMP32) else NEG_CLAMP32
    s, r, q = exp_parts32(lc)
    return fma32(s, q, fma32(s, r, s - ONE_32) - l)


@jit(nogil=True)
def _rk3_32(l):
    """reverse k3 in float32: l*l + (l - 1) E for l >= -1, e^l (l - 1) + 1 below."""
    lc = l if not (l < NEG_CLAMP32) else NEG_CLAMP32
    s, r, q = exp_parts32(lc)
    e = fma32(s, q, fma32(s, r, s - ONE_32) - l)
    rr = fma32(s, r + q, s)
    a = fma32(l - ONE_32, e, l * l)
    b = fma32(rr, l - ONE_32, ONE_32)
    return a if l >= -ONE_32 else b


@jit(nogil=True)
def _term64(l, est):
    """The term of a fix-up lane, as the float64 lanes compute it for float32 inputs."""
    if _slow(l):
        return _term_scalar(l, est)[0]
    if est == K1:
        return -l
    if est == K2:
        return 0.5 * l * l
    s, r, q = _exp_parts_lo(l)
    e = _em1x(l, s, r, q)
    if est == K3:
        return e
    rr = _ex(s, r, q)
    return rr * (l - 1.0) + 1.0 if l < -1.0 else l * l + (l - 1.0) * e


@jit(nogil=True)
def _stage32(qv, pv, ts, u, est):
    """ts[:SUB32] = float32 terms of pv - qv, u[k] = float64 sum of ts[k::LANES32] (each
    term widened at the accumulator, in order); returns (max abs_bits32(l), min
    tiny_key32(l)) over the lanes."""
    mx = np.int32(0)
    mn = np.int32(0x7FFFFFFF)
    for k in range(LANES32):
        u[k] = 0.0
    if est == K1:
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                t = -l
                ts[g + k] = t
                mx = max(mx, abs_bits32(l))
    elif est == K2:
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                t = HALF_32 * l * l
                ts[g + k] = t
                mx = max(mx, abs_bits32(l))
                mn = min(mn, tiny_key32(l))
    elif est == K3:
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                t = _k3_32(l)
                ts[g + k] = t
                mx = max(mx, abs_bits32(l))
                mn = min(mn, tiny_key32(l))
    else:  # RK3
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                t = _rk3_32(l)
                ts[g + k] = t
                mx = max(mx, abs_bits32(l))
                mn = min(mn, tiny_key32(l))
    # widen at the accumulator, in a loop of its own: inside the term loop the float64 adds
    # made LLVM pick 4-wide float32 vectors for the term math (measured: numba k3 1.3x slower)
    for g in range(0, SUB32, LANES32):
        for k in range(LANES32):
            u[k] += np.float64(ts[g + k])
    return mx, mn


@jit(nogil=True)
def _wterm32(t, w):
    """t * w for an included lane (w != 0), exactly 0 for an excluded one (even if t is NaN)."""
    return t * w if w != ZERO_32 else ZERO_32


@jit(nogil=True)
def _stage32m(qv, pv, mv, ts, u, est):
    """``_stage32`` with a uint8 mask: u[k] sums w * t of the included lanes (w != 0; a
    0/1 mask multiplies exactly); the flags look at included lanes only. Returns (max abs
    bits, min tiny key, sum w, sum w**2, number of lanes with w != 0)."""
    mx = np.int32(0)
    mn = np.int32(0x7FFFFFFF)
    for k in range(LANES32):
        u[k] = 0.0
    if est == K1:
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                w = np.float32(mv[g + k])
                t = -l
                ts[g + k] = t
                mx = max(mx, abs_bits32(l) if w != ZERO_32 else np.int32(0))
    elif est == K2:
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                w = np.float32(mv[g + k])
                t = HALF_32 * l * l
                ts[g + k] = t
                mx = max(mx, abs_bits32(l) if w != ZERO_32 else np.int32(0))
                mn = min(mn, tiny_key32(l) if w != ZERO_32 else np.int32(0x7FFFFFFF))
    elif est == K3:
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                w = np.float32(mv[g + k])
                t = _k3_32(l)
                ts[g + k] = t
                mx = max(mx, abs_bits32(l) if w != ZERO_32 else np.int32(0))
                mn = min(mn, tiny_key32(l) if w != ZERO_32 else np.int32(0x7FFFFFFF))
    else:  # RK3
        for g in range(0, SUB32, LANES32):
            for k in range(LANES32):
                l = wide(pv[g + k]) - wide(qv[g + k])
                w = np.float32(mv[g + k])
                t = _rk3_32(l)
                ts[g + k] = t
                mx = max(mx, abs_bits32(l) if w != ZERO_32 else np.int32(0))
                mn = min(mn, tiny_key32(l) if w != ZERO_32 else np.int32(0x7FFFFFFF))
    for g in range(0, SUB32, LANES32):
        for k in range(LANES32):
            u[k] += np.float64(_wterm32(ts[g + k], np.float32(mv[g + k])))
    sw = 0
    sw2 = 0
    nz = 0
    for i in range(SUB32):
        wi = np.int64(mv[i])
        sw += wi
        sw2 += wi * wi
        nz += 1 if wi != 0 else 0
    return mx, mn, sw, sw2, nz


@jit(nogil=True)
def _ok32(l, fast):
    """True where the float32 lane formula holds (see TINY32 / FAST32)."""
    a = abs(l)
    return a <= fast and (a >= TINY32 or a == ZERO_32)


@jit(nogil=True)
def _sub32(qv, pv, mv, ts, u, acc, mm, est, has_mask, fast, fast_bits):
    """One sub-chunk of SUB32 lanes (the first ``mm`` real, the rest zeros, with w = 0 if
    ``has_mask``) into acc; returns (sum w, sum w**2, NaN count, count, whether some lane
    went through the float64 fix-up). Without a mask the weights and counts are left to
    ``_write_part`` (0.0, 0.0, nbad, 0)."""
    if has_mask:
        mx, mn, sw, sw2, nz = _stage32m(qv, pv, mv, ts, u, est)
    else:
        mx, mn = _stage32(qv, pv, ts, u, est)
        sw = sw2 = nz = 0
    if mx <= fast_bits and mn >= TINY32_KEY:
        for k in range(LANES32):
            acc[k] += np.float64(u[k])
        return np.float64(sw), np.float64(sw2), 0, nz, False
    W = W2 = 0.0
    nbad = cnt = 0
    dirty = False
    for i in range(mm):
        w = np.float64(mv[i]) if has_mask else 1.0
        if w == 0.0:
            continue
        px = wide(pv[i])
        qx = wide(qv[i])
        l = px - qx
        if _ok32(l, fast):
            t = np.float64(ts[i])
        else:
            dirty = True
            t = _term64(np.float64(px) - np.float64(qx), est)
        if t != t:
            nbad += 1
            ts[i] = np.nan
        else:
            acc[i % LANES32] += w * t
            W += w
            W2 += w * w
            cnt += 1
            ts[i] = np.float32(t)  # (M2 of a dirty block recomputes the fix-up lanes)
    if not has_mask:
        W = W2 = 0.0
        cnt = 0
    return W, W2, nbad, cnt, dirty


@jit(nogil=True)
def _gather32(xb, o, s, mm, out):
    """out[:mm] = xb[o + i*s], out[mm:] = 0 (zero lanes give zero terms)."""
    if s == 1:  # a short contiguous block (a row shorter than a sub-chunk): a plain copy
        v = xb[o : o + mm]
        for i in range(mm):
            out[i] = wide(v[i])
    else:
        for i in range(mm):
            out[i] = wide(xb[o + i * s])
    for i in range(mm, SUB32):
        out[i] = ZERO_32


@jit(nogil=True)
def _gather8(xb, o, s, mm, out):
    """``_gather32`` for the uint8 mask (w = 0 past ``mm``)."""
    if s == 1:
        v = xb[o : o + mm]
        for i in range(mm):
            out[i] = v[i]
    else:
        for i in range(mm):
            out[i] = xb[o + i * s]
    for i in range(mm, SUB32):
        out[i] = 0


@jit(nogil=True)
def _dev2_64m(tb, wb, m, mean, acc):
    """``_dev2_64`` with uint8 weights, as ``_wdev2`` (an excluded lane adds 0 * mean**2)."""
    for k in range(LANES32):
        acc[k] = 0.0
    m64 = m - m % LANES32
    for g in range(0, m64, LANES32):
        for k in range(LANES32):
            acc[k] += _wdev2(np.float64(tb[g + k]), np.float64(wb[g + k]), mean)
    for i in range(m64, m):
        acc[i % LANES32] += _wdev2(np.float64(tb[i]), np.float64(wb[i]), mean)
    return _fold64(acc)


@jit(nogil=True)
def _dev2_64(tb, m, mean, acc):
    """sum (t - mean)**2 over tb[:m] in 64 float64 lanes (k = i mod 64), then a fixed tree:
    the loop over k has no reduction, so LLVM vectorizes it."""
    for k in range(LANES32):
        acc[k] = 0.0
    m64 = m - m % LANES32
    for g in range(0, m64, LANES32):
        for k in range(LANES32):
            d = np.float64(tb[g + k]) - mean
            acc[k] += d * d
    for i in range(m64, m):
        d = np.float64(tb[i]) - mean
        acc[i % LANES32] += d * d
    return _fold64(acc)


@jit(nogil=True)
def _fold64(acc):
    """The fixed tree over the 64 float64 lanes."""
    w = LANES32 // 2
    while w >= 1:
        for k in range(w):
            acc[k] = acc[k] + acc[k + w]
        w //= 2
    return acc[0]


@threaded_kernel
def _partials32_kernel(qb, pb, mb, geo, rows, n, est, has_mask, want_m2, part):
    nblk = part.shape[1]
    ntasks = rows * nblk
    nchunk = min(ntasks, NCHUNK)
    fast = FAST32_R if est == RK3 else FAST32
    fast_bits = FAST32_BITS_R if est == RK3 else FAST32_BITS
    qs = geo[0, 2]
    ps = geo[1, 2]
    ms = geo[2, 2]
    for c in prange(nchunk):
        tblk = np.empty(BLOCK, np.float32)
        wblk = np.zeros(BLOCK if has_mask else 1, np.uint8)
        qg = np.empty(SUB32, np.float32)
        pg = np.empty(SUB32, np.float32)
        u = np.empty(LANES32)  # float64: every term is widened before it is added
        acc = np.empty(LANES32)
        for task in range(c * ntasks // nchunk, (c + 1) * ntasks // nchunk):
            row, j0, m = _task(rows, nblk, n, task)
            qo = geo[0, 0] + row * geo[0, 1] + j0 * qs
            po = geo[1, 0] + row * geo[1, 1] + j0 * ps
            mo = geo[2, 0] + row * geo[2, 1] + j0 * ms
            for k in range(LANES32):
                acc[k] = 0.0
            W = W2 = 0.0
            nbad = cnt = 0
            dirty = False
            o = 0
            while o < m:
                mm = min(SUB32, m - o)
                ts = tblk[o : o + SUB32]
                mv = wblk[o : o + SUB32] if has_mask else wblk
                if has_mask:
                    _gather8(mb, mo + o * ms, ms, mm, mv)
                if mm == SUB32 and qs == 1 and ps == 1:
                    sw, sv, nb, cn, d = _sub32(qb[qo + o : qo + o + SUB32],
                                               pb[po + o : po + o + SUB32], mv, ts, u, acc,
                                               mm, est, has_mask, fast, fast_bits)
                else:
                    _gather32(qb, qo + o * qs, qs, mm, qg)
                    _gather32(pb, po + o * ps, ps, mm, pg)
                    sw, sv, nb, cn, d = _sub32(qg, pg, mv, ts, u, acc, mm, est, has_mask, fast,
                                               fast_bits)
                W += sw
                W2 += sv
                nbad += nb
                cnt += cn
                dirty |= d
                o += mm
            out = part[row, j0 // BLOCK]
            _write_part(out, W, _fold64(acc), W2, nbad, cnt, m, has_mask)
            W = out[0]
            if want_m2 and W > 0:
                mean = out[1] / W
                if dirty or nbad:  # the fix-up lanes again in float64 (a float32 copy may be inf)
                    M2 = 0.0
                    for i in range(m):
                        t = np.float64(tblk[i])
                        qx = wide(qb[qo + i * qs])
                        px = wide(pb[po + i * ps])
                        if not _ok32(px - qx, fast):
                            t = _term64(np.float64(px) - np.float64(qx), est)
                        M2 += _wdev2(t, np.float64(wblk[i]) if has_mask else 1.0, mean)
                    out[2] = M2
                elif has_mask:
                    out[2] = _dev2_64m(tblk, wblk, m, mean, acc)
                else:
                    out[2] = _dev2_64(tblk, m, mean, acc)
                if m < BLOCK:  # the reference pads a short block with w = t = 0: 0*(0-mean)**2
                    out[2] += 0.0 * (mean * mean)


@threaded_kernel
def _terms_kernel(qb, pb, mb, ib, geo, rows, n, est, has_mask, has_iw, clamp, out):
    nblk = max(1, -(-n // BLOCK))
    ntasks = rows * nblk
    nchunk = min(ntasks, NCHUNK)
    for c in prange(nchunk):
        lb = np.empty(SUB)
        xb = np.empty(SUB)
        eb = np.empty(SUB)
        gb = np.empty(SUB)
        tb = np.empty(SUB)
        wb = np.empty(SUB)
        for task in range(c * ntasks // nchunk, (c + 1) * ntasks // nchunk):
            row, j0, m = _task(rows, nblk, n, task)
            o = 0
            while o < m:
                mm = min(SUB, m - o)
                _sub_terms(qb, pb, ib, geo, row, j0 + o, mm, est, has_iw, clamp, False, lb,
                           xb, eb, tb, gb, gb)
                ov = out[row * n + j0 + o : row * n + j0 + o + mm]
                if has_mask:
                    _load_x(mb, geo, 2, row, j0 + o, mm, wb)
                    for i in range(mm):
                        w = wb[i]
                        ov[i] = 0.0 if w == 0.0 else w * tb[i]
                else:
                    for i in range(mm):
                        ov[i] = tb[i]
                o += mm


@threaded_kernel
def _grad_kernel(qb, pb, mb, ib, geo, rows, n, est, has_mask, has_iw, clamp, rowscale, out,
                 part):
    nblk = part.shape[1]
    ntasks = rows * nblk
    nchunk = min(ntasks, NCHUNK)
    for c in prange(nchunk):
        lb = np.empty(SUB)
        xb = np.empty(SUB)
        eb = np.empty(SUB)
        gb = np.empty(SUB)
        tb = np.empty(SUB)
        wb = np.empty(SUB)
        ab = np.empty(SUB)
        for task in range(c * ntasks // nchunk, (c + 1) * ntasks // nchunk):
            row, j0, m = _task(rows, nblk, n, task)
            rs = rowscale[row]
            W = S = W2 = 0.0
            nbad = cnt = 0
            o = 0
            while o < m:
                mm = min(SUB, m - o)
                fixed_up = _sub_terms(qb, pb, ib, geo, row, j0 + o, mm, est, has_iw, clamp,
                                      True, lb, xb, eb, tb, gb, ab)
                ov = out[row * n + j0 + o : row * n + j0 + o + mm]
                if has_mask:
                    _load_x(mb, geo, 2, row, j0 + o, mm, wb)
                    for i in range(mm):
                        w = wb[i]
                        ov[i] = 0.0 if w == 0.0 else gb[i] * w * rs
                else:
                    for i in range(mm):
                        ov[i] = gb[i] * rs
                sw, ss, sv, nb, cn = _chunk_sums(tb, wb, mm, has_mask, fixed_up)
                W += sw
                S += ss
                W2 += sv
                nbad += nb
                cnt += cn
                o += mm
            _write_part(part[row, j0 // BLOCK], W, S, W2, nbad, cnt, m, has_mask)


# --------------------------------------------------------------------------- wrappers


def _ro_zero(dtype) -> np.ndarray:
    a = np.zeros(1, dtype=dtype)
    a.flags.writeable = False
    return a


# stand-ins for an absent mask / log_iw (never read)
_DUMMY_MASK = _ro_zero(np.uint8)
_DUMMY_F = {np.dtype(t).char: _ro_zero(t) for t in (np.float32, np.float64, np.uint16,
                                                     np.int16)}


def _bits(a: np.ndarray | None) -> np.ndarray | None:
    """A 16-bit float input as the kernels read it (see ``wide``): float16 -> a uint16 view,
    bfloat16 (``ml_dtypes``) -> an int16 view; anything else unchanged. Never a copy."""
    if a is None or a.dtype.itemsize != 2:
        return a
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype.name == "bfloat16":
        return a.view(np.int16)
    return a


def _wide16(a: np.ndarray | None) -> np.ndarray | None:
    """A 16-bit float input as a float32 copy (exact); anything else unchanged. Only the
    float32-lane partials (``_partials32_kernel``: means, sums, stats) read 16-bit inputs in
    place: every other kernel compiled for two more input types would cost numba minutes of
    first-use compilation for options (``reduction="none"``, clamps, ``log_iw``, gradients)
    that are rare on 16-bit data."""
    return a.astype(np.float32) if a is not None and a.dtype.itemsize == 2 else a


def _prepare(logq, logp, mask, log_iw):
    """Kernel arguments: four flat buffers, their geometry [4, 3] and the two flags."""
    logq, logp, log_iw = _bits(logq), _bits(logp), _bits(log_iw)
    if (mask is None and log_iw is None and logq.flags.c_contiguous
            and logp.flags.c_contiguous):
        # the common case, without the general loop (about 1 us of a small call)
        n = logq.shape[1]
        qf = logq.reshape(-1)
        qf.flags.writeable = False
        pf = logp.reshape(-1)
        pf.flags.writeable = False
        geo = geometry((0, n, 1, 0, n, 1, 0, 0, 0, 0, 0, 0))
        return [qf, pf, _DUMMY_MASK, _DUMMY_F[logq.dtype.char]], geo, False, False
    g: tuple = ()
    bufs = []
    for k, a in enumerate((logq, logp, mask, log_iw)):
        if a is None:
            bufs.append(_DUMMY_MASK if k == 2 else bufs[0][:1])
            g += (0, 0, 0)
            continue
        flat, off, s0, s1 = flat_buffer(a)
        g += (off, s0, s1)
        bufs.append(flat)
    return bufs, geometry(g), mask is not None, log_iw is not None


# the kernels' clamp array: (lr_lo, lr_hi, v_lo, v_hi, weighted, iw_grad)
_NO_CLAMP = np.array([-np.inf, np.inf, -np.inf, np.inf, 0.0, 0.0])
_NO_CLAMP.flags.writeable = False
_CLAMPS: dict = {((-np.inf, np.inf, -np.inf, np.inf, 0.0), 0): _NO_CLAMP}


def _clamp(clamp, iw_grad: int = 0) -> np.ndarray:
    """The kernels' clamp array of a contract clamp tuple (and ``iw_grad``), read-only, built
    once per distinct value (saves about 1 us a call on small inputs)."""
    key = (clamp, int(iw_grad))
    arr = _CLAMPS.get(key)
    if arr is None:
        lr_lo, lr_hi, v_lo, v_hi, weighted = (float(c) for c in clamp)
        arr = np.array([lr_lo, lr_hi, v_lo, v_hi, weighted, float(iw_grad)])
        arr.flags.writeable = False
        if len(_CLAMPS) < 64:
            _CLAMPS[key] = arr
    return arr


_EST32 = (K1, K2, K3, RK3)  # the estimators with float32 lanes (reverse k1: float64 only)


def _nblk(n: int) -> int:
    return max(1, -(-n // BLOCK))


def _est(est) -> int:
    """``est`` as a kernel code; ValueError for an unknown one, before any kernel runs (the
    kernels' last branch would silently compute reverse k3)."""
    code = int(est)
    if code not in BY_CODE:
        raise ValueError(f"unknown estimator code {est!r}: the kernels know {sorted(BY_CODE)}")
    return code


def mc_terms(logq: np.ndarray, logp: np.ndarray, mask: np.ndarray | None,
             log_iw: np.ndarray | None, est: int, clamp: tuple, out: np.ndarray) -> None:
    """out[...] = w * exp(log_iw) * clip(t(clip(l))); exactly 0 wherever w == 0."""
    est = _est(est)
    rows, n = logq.shape
    if rows * n == 0:
        return
    flat = out.reshape(-1) if out.flags.c_contiguous else np.empty(rows * n, out.dtype)
    (qb, pb, mb, ib), geo, has_m, has_iw = _prepare(_wide16(logq), _wide16(logp), mask,
                                                    _wide16(log_iw))
    _terms_kernel(rows * n, qb, pb, mb, ib, geo, rows, n, est, has_m, has_iw,
                  _clamp(clamp), flat)
    if not out.flags.c_contiguous:
        out[...] = flat.reshape(rows, n)


def mc_partials(logq: np.ndarray, logp: np.ndarray, mask: np.ndarray | None,
                log_iw: np.ndarray | None, est: int, clamp: tuple,
                want_m2: bool) -> np.ndarray:
    """Per-block partials, float64 [rows, nblk, N_PARTIALS] (see ``_contract``)."""
    est = _est(est)
    rows, n = logq.shape
    part = np.zeros((rows, _nblk(n), N_PARTIALS))
    if rows * n == 0:
        return part
    (qb, pb, mb, ib), geo, has_m, has_iw = _prepare(logq, logp, mask, log_iw)
    cl = _clamp(clamp)
    if (F32_LANES and qb.itemsize <= 4 and mb.dtype == np.uint8 and not has_iw
            and cl is _NO_CLAMP and est in _EST32):
        _partials32_kernel(rows * n, qb, pb, mb, geo, rows, n, est, has_m, bool(want_m2), part)
        return part
    if qb.itemsize == 2 or ib.itemsize == 2:
        (qb, pb, mb, ib), geo, has_m, has_iw = _prepare(_wide16(logq), _wide16(logp), mask,
                                                        _wide16(log_iw))
    _partials_kernel(rows * n, qb, pb, mb, ib, geo, rows, n, est, has_m, has_iw, cl,
                     bool(want_m2), part)
    return part


def mc_grad(logq: np.ndarray, logp: np.ndarray, mask: np.ndarray | None,
            log_iw: np.ndarray | None, est: int, clamp: tuple, iw_grad: int,
            rowscale: np.ndarray, out_grad: np.ndarray) -> np.ndarray:
    """out_grad = rowscale * w * dv/dlogq (numpy.mc.mc_grad); returns the partials of the
    same terms (no M2)."""
    est = _est(est)
    rows, n = logq.shape
    part = np.zeros((rows, _nblk(n), N_PARTIALS))
    if rows * n == 0:
        return part
    flat = (out_grad.reshape(-1) if out_grad.flags.c_contiguous
            else np.empty(rows * n, out_grad.dtype))
    rs = np.ascontiguousarray(rowscale, dtype=np.float64)
    (qb, pb, mb, ib), geo, has_m, has_iw = _prepare(_wide16(logq), _wide16(logp), mask,
                                                    _wide16(log_iw))
    _grad_kernel(rows * n, qb, pb, mb, ib, geo, rows, n, est, has_m, has_iw,
                 _clamp(clamp, iw_grad), rs, flat, part)
    if not out_grad.flags.c_contiguous:
        out_grad[...] = flat.reshape(rows, n)
    return part


# the logits half of the contract lives in its own module
