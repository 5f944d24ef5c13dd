"""Prototype numba kernels: float32 term lanes, float64 block accumulators (issue 12).

Not part of the package: measured by ``f32_lanes.py``, checked by ``f32_accuracy.py``;
docs/kernel_f32_prototype.md has the formulation and the results.

Inputs: 1-D contiguous float32 ``logq``, ``logp``. ``l = logp - logq`` in float32 (one
rounding: relative error <= 2**-24 of the exact difference). Per block of BLOCK = 4096
elements (as ``fastkl.backends._contract``), each block by one thread, in a fixed order:

* term loop: float32 terms of SUB elements into a float32 scratch (branch-free, vectorized:
  8 float32 lanes per ymm, 16 per zmm), plus an integer max over |bits(l)| that flags lanes
  outside the fast range (|l| > 87, 80 for reverse k3, NaN, inf);
* sum loop: float32 sums of ``RUN`` = 8 terms per lane (pairwise: a tree of depth 3), widened
  to float64 and added into 8 float64 lane accumulators (``acc[k]``, k = position mod 8),
  folded in a fixed tree at the end of the block. Error added to a block sum: <= 3 u32
  (u32 = 2**-24) times the sum of |terms| of each run (bounded in f32_accuracy.py);
* or, the shape to port (``_make_partials64``, kernels ``*_lanes64``): the term loop itself
  adds each term into a float32 lane sum u[k] (k = i mod 64, 8 terms a lane), widened into 64
  float64 lanes per sub-chunk: the only shape whose sums numba vectorizes;
* M2 (stats): a second pass over the block's float32 scratch (still in L1), d = t - mean in
  float64, 8 float64 lane accumulators;
* fix-up: a sub-chunk with a lane whose |l| > FAST (87) or NaN/inf is recomputed by a
  scalar float64 loop (libm), NaN terms excluded and counted, as the real kernels do.

k3 term, two formulations:

* ``split``  (the issue's proposal): |l| <= 1: l*l * P9(l), P9 the Taylor series of
  (e^l - 1 - l)/l**2 to l**9/11!; else (exp32(l) - 1) - l. Both computed, one selected.
* ``fused``  (range-reduced, one exp): l = k ln2 + r, q = r*r*P5(r) (minimax, the degree-5
  fit of docs/kernel_math.md in float32), s = 2**k from bits;
  E = s*q + ((s - 1 + s*r) - l) with FMAs; for k == 0 (|l| <= ln2/2) s == 1, r == l and E == q
  exactly. For l < -87 the exp part uses -87 (e^l is below 1e-37 of the result there), so
  l = -inf gives +inf and NaN propagates through ``- l`` with no fix-up.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

BLOCK = 4096
SUB = 512  # elements per sub-chunk of the sum pass
RUN = 8  # float32 terms per lane summed before widening

f32 = np.float32


# --------------------------------------------------------------------------- intrinsics
@intrinsic
def f32_as_i32(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def i32_as_f32(typingctx, x):
    if x != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def pow2_of(typingctx, t):
    """2**k from t = k + 1.5*2**23 (float32): (bits(t) + 127) << 23 in int32 lanes."""
    if t != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        b = builder.shl(builder.add(b, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(b, ir.FloatType())

    return types.float32(types.float32), codegen


@intrinsic
def abs_bits(typingctx, x):
    """bits(x) & 0x7fffffff as int32 (ordered like |x|; NaN above inf)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """a*b + c, one rounding (llvm.fma.f32; the host has FMA)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


# --------------------------------------------------------------------------- constants
LOG2E = f32(1.4426950408889634)
SHIFT = f32(12582912.0)  # 1.5 * 2**23: t = x*log2e + SHIFT rounds to an integer k
LN2_HI = f32(0.693145751953125)  # 0x3f317200: 9 trailing zero bits
LN2_LO = f32(1.428606765330187045e-06)
ONE = f32(1.0)
HALF = f32(0.5)
ZERO = f32(0.0)
NEG_CLAMP = f32(-87.0)
FAST_BITS = np.int32(0x42AE0000)  # bits of 87.0f: |l| above (or NaN/inf) -> fix-up
# reverse k3 overflows float32 from l ~ 84.3 (e^l (l - 1) > 3.4e38): fix-up above 80
FAST_BITS_R = np.int32(0x42A00000)  # bits of 80.0f
ABS32 = np.int32(0x7FFFFFFF)
# minimax (Remez, relative) of (e^r - 1 - r)/r**2 on |r| <= ln2/2 + 5e-4 (docs/kernel_math.md)
M0 = f32(0.50000000134956292519)
M1 = f32(0.16666666531201065386)
M2 = f32(0.04166646436477276519)
M3 = f32(0.0083333608728334880738)
M4 = f32(0.0013933726747929464043)
M5 = f32(0.00019857847267093069348)
# Taylor 1/(j+2)! for j = 0..9: (e^l - 1 - l)/l**2 on |l| <= 1, truncation < 3e-9 relative
T = [f32(1.0 / math.factorial(j + 2)) for j in range(10)]
T0, T1, T2, T3, T4, T5, T6, T7, T8, T9 = T


# --------------------------------------------------------------------------- lane math
@njit(inline="always")
def exp_parts32(x):
    """(s, r, q): e^x = s*(1 + r + q), s = 2**k, q = e^r - 1 - r; -87 <= x <= 87."""
    t = fma32(x, LOG2E, SHIFT)
    kf = t - SHIFT
    r = fma32(-kf, LN2_HI, x)
    r = fma32(-kf, LN2_LO, r)
    p = fma32(M5, r, M4)
    p = fma32(p, r, M3)
    p = fma32(p, r, M2)
    p = fma32(p, r, M1)
    p = fma32(p, r, M0)
    q = (r * r) * p
    s = pow2_of(t)
    return s, r, q


@njit(inline="always")
def k3_fused(l):
    lc = l if not (l < NEG_CLAMP) else NEG_CLAMP  # NaN stays NaN
    s, r, q = exp_parts32(lc)
    return fma32(s, q, fma32(s, r, s - ONE) - l)


@njit(inline="always")
def k3_split(l):
    p = fma32(T9, l, T8)
    p = fma32(p, l, T7)
    p = fma32(p, l, T6)
    p = fma32(p, l, T5)
    p = fma32(p, l, T4)
    p = fma32(p, l, T3)
    p = fma32(p, l, T2)
    p = fma32(p, l, T1)
    p = fma32(p, l, T0)
    small = (l * l) * p
    lc = l if not (l < NEG_CLAMP) else NEG_CLAMP
    s, r, q = exp_parts32(lc)
    e = fma32(s, r + q, s)
    big = (e - ONE) - l
    return small if abs(l) <= ONE else big


@njit(inline="always")
def rk3_fused(l):
    """reverse k3: e^l*l - (e^l - 1) = l*l + (l - 1)*E for l >= -1, e^l*(l - 1) + 1 below."""
    lc = l if not (l < NEG_CLAMP) else NEG_CLAMP
    s, r, q = exp_parts32(lc)
    E = fma32(s, q, fma32(s, r, s - ONE) - l)
    R = fma32(s, r + q, s)
    a = fma32(l - ONE, E, l * l)
    b = fma32(R, l - ONE, ONE)
    return a if l >= -ONE else b


def _term_f64(l, est):
    """float64 libm term for a fix-up lane (numpy_ref semantics)."""
    if est == 0:
        return -l
    if est == 1:
        return 0.5 * l * l
    if est == 2:
        if l == math.inf or l == -math.inf:
            return math.inf
        return math.expm1(l) - l
    # reverse k3
    if l == math.inf:
        return math.inf
    if l == -math.inf:
        return 1.0
    r = math.exp(l)
    return r * (l - 1.0) + 1.0 if l < -1.0 else l * l + (l - 1.0) * (math.expm1(l) - l)


term_f64 = njit(inline="always")(_term_f64)


# --------------------------------------------------------------------------- stages
def _make_terms(term):
    @njit(inline="always")
    def terms(qv, pv, tb, m):
        mx = np.int32(0)
        for i in range(m):
            l = pv[i] - qv[i]
            tb[i] = term(l)
            mx = max(mx, abs_bits(l))
        return mx

    return terms


@njit(inline="always")
def _terms_k1(qv, pv, tb, m):
    mx = np.int32(0)
    for i in range(m):
        l = pv[i] - qv[i]
        tb[i] = -l
        mx = max(mx, abs_bits(l))
    return mx


@njit(inline="always")
def _terms_k2(qv, pv, tb, m):
    mx = np.int32(0)
    for i in range(m):
        l = pv[i] - qv[i]
        tb[i] = HALF * l * l
        mx = max(mx, abs_bits(l))
    return mx


@njit(inline="always")
def sum_runs(tb, o, m, acc):
    """acc[k] += float64(float32 pairwise sum of tb[o+g+k], g = 0, 8, .., 56) for each run of
    64 terms; a tail shorter than 64 goes term by term into acc[i % 8]. Fixed order."""
    m64 = m - m % 64
    for g in range(o, o + m64, 64):
        for k in range(8):
            a = (tb[g + k] + tb[g + 8 + k]) + (tb[g + 16 + k] + tb[g + 24 + k])
            b = (tb[g + 32 + k] + tb[g + 40 + k]) + (tb[g + 48 + k] + tb[g + 56 + k])
            acc[k] += np.float64(a + b)
    for i in range(o + m64, o + m):
        acc[i % 8] += np.float64(tb[i])


@njit(inline="always")
def sum_f64(tb, o, m, acc):
    """acc[k] += float64(tb[i]) for i = k mod 8 (no float32 partials): the reference shape."""
    m8 = m - m % 8
    for g in range(o, o + m8, 8):
        for k in range(8):
            acc[k] += np.float64(tb[g + k])
    for i in range(o + m8, o + m):
        acc[i % 8] += np.float64(tb[i])


@njit(inline="always")
def fold8(acc):
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@njit(inline="always")
def dev2(tb, m, mean, acc):
    for k in range(8):
        acc[k] = 0.0
    m8 = m - m % 8
    for g in range(0, m8, 8):
        for k in range(8):
            d = np.float64(tb[g + k]) - mean
            acc[k] += d * d
    for i in range(m8, m):
        d = np.float64(tb[i]) - mean
        acc[i % 8] += d * d
    return fold8(acc)


@njit(inline="always")
def dev2_64(tb, m, mean, acc):
    """sum (t - mean)**2 over the block in 64 float64 lanes (k = i mod 64), then a fixed tree:
    the loop over k has no reduction, so LLVM vectorizes it (``dev2``'s 8-lane form stays
    scalar in numba)."""
    for k in range(64):
        acc[k] = 0.0
    m64 = m - m % 64
    for g in range(0, m64, 64):
        v = tb[g : g + 64]
        for k in range(64):
            d = np.float64(v[k]) - mean
            acc[k] += d * d
    for i in range(m64, m):
        d = np.float64(tb[i]) - mean
        acc[i % 64] += d * d
    for w in (32, 16, 8, 4, 2, 1):
        for k in range(w):
            acc[k] = acc[k] + acc[k + w]
    return acc[0]


def _make_partials(terms, est, runs):
    """Kernel (logq, logp, want_m2, part[nblk, 3]) -> None: W, S, M2 per block."""
    summ = sum_runs if runs else sum_f64
    fast_bits = FAST_BITS_R if est == 4 else FAST_BITS
    fast = np.float32(80.0) if est == 4 else np.float32(87.0)

    def kernel(qv, pv, want_m2, part):
        n = qv.size
        nblk = part.shape[0]
        for b in prange(nblk):
            tb = np.empty(BLOCK, np.float32)
            acc = np.zeros(8)
            j0 = b * BLOCK
            m = min(BLOCK, n - j0)
            S = 0.0
            W = 0
            nbad = 0
            dirty = False
            for o in range(0, m, SUB):
                mm = min(SUB, m - o)
                mx = terms(qv[j0 + o : j0 + o + mm], pv[j0 + o : j0 + o + mm],
                           tb[o : o + mm], mm)
                if mx > fast_bits:  # NaN, inf or |l| > 87 in this sub-chunk: float64 path
                    dirty = True
                    for i in range(mm):
                        l32 = pv[j0 + o + i] - qv[j0 + o + i]
                        t = term_f64(np.float64(pv[j0 + o + i]) - np.float64(qv[j0 + o + i]),
                                     est) if not (abs(l32) <= fast) else np.float64(tb[o + i])
                        if t != t:
                            nbad += 1
                            tb[o + i] = np.nan
                        else:
                            acc[i % 8] += t
                            tb[o + i] = np.float32(t)  # M2 of a dirty block: float32 copy
                else:
                    summ(tb, o, mm, acc)
            S = fold8(acc)
            W = m - nbad
            part[b, 0] = W
            part[b, 1] = S
            part[b, 2] = 0.0
            if want_m2 and W > 0:
                mean = S / W
                if dirty:
                    M2 = 0.0
                    for i in range(m):
                        t = np.float64(tb[i])
                        if t == t:
                            M2 += (t - mean) * (t - mean)
                    part[b, 2] = M2
                else:
                    part[b, 2] = dev2(tb, m, mean, acc)

    return kernel


def _make_partials64(term, est):
    """The fused shape: each sub-chunk of 512 is 8 runs of 64 lanes; the term loop adds each
    term into a float32 lane sum u[k] (k = position mod 64, 8 terms per lane, in order) in the
    same loop that computes it, then u is widened into 64 float64 accumulators. Every inner
    loop is a plain loop over k with no reduction, so LLVM vectorizes it (a float reduction
    it may not reorder is what kept the separate sum loops scalar). Fixed order: same bits for
    any thread count."""
    fast_bits = FAST_BITS_R if est == 4 else FAST_BITS
    fast = np.float32(80.0) if est == 4 else np.float32(87.0)

    def kernel(qv, pv, want_m2, part):
        n = qv.size
        nblk = part.shape[0]
        for b in prange(nblk):
            tb = np.empty(BLOCK, np.float32)
            u = np.empty(64, np.float32)
            acc = np.zeros(64)
            j0 = b * BLOCK
            m = min(BLOCK, n - j0)
            nbad = 0
            dirty = False
            for o in range(0, m, SUB):
                mm = min(SUB, m - o)
                qs = qv[j0 + o : j0 + o + mm]
                ps = pv[j0 + o : j0 + o + mm]
                ts = tb[o : o + mm]
                mx = np.int32(0)
                if mm == SUB:
                    for k in range(64):
                        u[k] = ZERO
                    for r in range(8):
                        for k in range(64):
                            l = ps[r * 64 + k] - qs[r * 64 + k]
                            t = term(l)
                            ts[r * 64 + k] = t
                            u[k] += t
                            mx = max(mx, abs_bits(l))
                else:
                    for i in range(mm):
                        l = ps[i] - qs[i]
                        ts[i] = term(l)
                        mx = max(mx, abs_bits(l))
                if mx > fast_bits or mm < SUB:
                    for i in range(mm):
                        l32 = ps[i] - qs[i]
                        t = np.float64(ts[i])
                        if not (abs(l32) <= fast):
                            dirty = True
                            t = term_f64(np.float64(ps[i]) - np.float64(qs[i]), est)
                        if t != t:
                            nbad += 1
                            ts[i] = np.nan
                        else:
                            acc[i % 64] += t
                            ts[i] = np.float32(t)
                else:
                    for k in range(64):
                        acc[k] += np.float64(u[k])
            # fixed tree over the 64 lanes
            for w in (32, 16, 8, 4, 2, 1):
                for k in range(w):
                    acc[k] = acc[k] + acc[k + w]
            S = acc[0]
            W = m - nbad
            part[b, 0] = W
            part[b, 1] = S
            part[b, 2] = 0.0
            if want_m2 and W > 0:
                mean = S / W
                if dirty or nbad:  # float64 terms again for the fix-up lanes
                    M2 = 0.0
                    for i in range(m):
                        t = np.float64(tb[i])
                        l32 = pv[j0 + i] - qv[j0 + i]
                        if not (abs(l32) <= fast):
                            t = term_f64(np.float64(pv[j0 + i]) - np.float64(qv[j0 + i]), est)
                        if t == t:
                            M2 += (t - mean) * (t - mean)
                    part[b, 2] = M2
                else:
                    part[b, 2] = dev2_64(tb, m, mean, acc)

    return kernel


KERNELS = {}


def _build():
    specs = {
        "k1": (_terms_k1, 0),
        "k2": (_terms_k2, 1),
        "k3_fused": (_make_terms(k3_fused), 2),
        "k3_split": (_make_terms(k3_split), 2),
        "rk3_fused": (_make_terms(rk3_fused), 4),
    }
    for name, (terms, est) in specs.items():
        for runs in (True, False):
            py = _make_partials(terms, est, runs)
            key = name + ("" if runs else "_sum64")
            KERNELS[key] = njit(parallel=True, nogil=True, boundscheck=False)(py)
    for name in ("k1", "k2", "k3_fused", "k3_split", "rk3_fused"):
        py = _make_partials64(ALL_TERMS[name], specs[name][1])
        KERNELS[name + "_lanes64"] = njit(parallel=True, nogil=True, boundscheck=False)(py)


# the lane functions alone (vectorized loops over a whole array) for the accuracy checks
TERM_FUNCS = {"k3_fused": k3_fused, "k3_split": k3_split, "rk3_fused": rk3_fused}


@njit(inline="always")
def k1_term(l):
    return -l


@njit(inline="always")
def k2_term(l):
    return HALF * l * l


ALL_TERMS = dict(TERM_FUNCS, k1=k1_term, k2=k2_term)

_build()


def _make_map(term):
    @njit(nogil=True)
    def f(l, out):
        for i in range(l.size):
            out[i] = term(l[i])

    return f


MAPS = {name: _make_map(fn) for name, fn in TERM_FUNCS.items()}


def terms32(name: str, l: np.ndarray) -> np.ndarray:
    """The fast-path float32 terms of float32 ``l`` (no fix-up): for the accuracy check."""
    out = np.empty_like(l)
    MAPS[name](np.ascontiguousarray(l, np.float32), out)
    return out


def partials(name: str, logq: np.ndarray, logp: np.ndarray, want_m2: bool = False) -> np.ndarray:
    nblk = max(1, -(-logq.size // BLOCK))
    part = np.zeros((nblk, 3))
    KERNELS[name](logq, logp, want_m2, part)
    return part


def mean(name: str, logq: np.ndarray, logp: np.ndarray) -> float:
    part = partials(name, logq, logp, False)
    W = 0.0
    S = 0.0
    for b in range(part.shape[0]):  # in block order
        W += part[b, 0]
        S += part[b, 1]
    return S / W


def set_threads(n: int) -> None:
    numba.set_num_threads(n)
