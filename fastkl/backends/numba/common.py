"""Helpers shared by the numba kernels: float64 <-> int64 reinterpretation, fma, the
range-reduced exp (``exp_parts``, ``exp_parts_lo``; docs/kernel_math.md), ``flat_buffer``,
``specialize`` and ``threaded_kernel`` (serial twins, thread and fork safety).

The reinterpretations are a plain LLVM ``bitcast`` per lane: inside a loop they vectorize
like any other arithmetic, so the ``2**k`` of the exp is built from bits in the same loop as
the polynomial (no round trip through an int64 view of a buffer).
"""

from __future__ import annotations

import os
import threading
import types as pytypes
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .. import _threads, in_forked_child
from .cache import jit


@intrinsic
def f64_as_i64(typingctx, x):
    """The bits of a float64 as an int64."""
    if x != types.float64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def i64_as_f64(typingctx, x):
    """An int64 reinterpreted as the bits of a float64."""
    if x != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


def _host_has_fma() -> bool:
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("fma", False))
    except Exception:  # pragma: no cover - unknown host: the plain form is always correct
        return False


HAS_FMA = _host_has_fma()


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: a vector FMA on hosts that have one)."""
    if not (a == b == c == types.float64):
        return None

    def codegen(context, builder, sig, args):
        if HAS_FMA:
            return builder.fma(*args)
        return builder.fadd(builder.fmul(args[0], args[1]), args[2])

    return types.float64(types.float64, types.float64, types.float64), codegen


def flat_buffer(a: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """A 1-D read-only view spanning ``a``'s memory, and (offset, row stride, col stride) of
    ``a`` in elements within it. No copy unless a stride is not a multiple of the itemsize."""
    rows, n = a.shape
    if a.flags.c_contiguous:
        flat = a.reshape(-1)
        flat.flags.writeable = False
        return flat, 0, n, 1
    isz = a.itemsize
    st0, st1 = a.strides
    if st0 % isz or st1 % isz:
        return flat_buffer(np.ascontiguousarray(a))
    s0 = st0 // isz if rows > 1 else 0
    s1 = st1 // isz if n > 1 else 0
    lo = (rows - 1) * min(s0, 0) + (n - 1) * min(s1, 0)
    span = 1 + (rows - 1) * abs(s0) + (n - 1) * abs(s1)
    r0 = rows - 1 if s0 < 0 else 0
    c0 = n - 1 if s1 < 0 else 0
    corner = a[r0 : r0 + 1, c0 : c0 + 1]  # a view whose data pointer is the lowest address
    flat = np.lib.stride_tricks.as_strided(corner, shape=(span,), strides=(isz,),
                                           writeable=False)
    return flat, -lo, s0, s1


_GEOS: dict = {}


def geometry(g: tuple) -> np.ndarray:
    """The (offset, row stride, col stride) triples in ``g`` as a read-only int64 [k, 3]
    array, built once per distinct ``g``: a small-input call saves the ~1 us of filling a
    fresh array."""
    geo = _GEOS.get(g)
    if geo is None:
        geo = np.array(g, dtype=np.int64).reshape(-1, 3)
        geo.flags.writeable = False
        if len(_GEOS) >= 1024:
            _GEOS.clear()
        _GEOS[g] = geo
    return geo


# Below ``_threads.NUMBA_MIN`` elements of work a kernel runs its serial compilation: waking
# numba's thread pool for a ``prange`` costs 6-12 us a call, more than a whole block of k3
# terms (measured: 1,000 float32 k3 pairs took 25.5 us through the threaded kernel, about 2x
# the numpy textbook formula). Both compilations compute every block the same way, so the
# choice never changes a bit of the result. The threshold and the thread count
# (``fastkl.set_num_threads``) are the thread policy's (``backends/_threads.py``), read here
# in Python on each call: no compiled code depends on them.

# Threads and fork. fastkl keeps numba's choice of threading layer (NUMBA_THREADING_LAYER, or
# numba's default: tbb, else omp, else workqueue; 'safe' would fail where tbb is missing) and
# makes every layer safe for its own calls:
# * one threaded kernel at a time: a call that finds another one running (from another
#   Python thread) runs the serial twin instead of waiting. The workqueue layer aborts the
#   process on concurrent launches; the others would only oversubscribe the cores;
# * a child made by fork() runs the serial twins only: numba's omp layer kills a forked child
#   at its first parallel launch (GNU OpenMP's pool does not survive fork) and libgomp hangs;
# * a threading layer numba cannot load (an explicit NUMBA_THREADING_LAYER=tbb without tbb)
#   is one warning, then serial twins, not a ValueError of every call.
# The serial twin computes the same blocks in the same order: same bits either way.
_parallel_lock = threading.Lock()
_serial_only = in_forked_child()  # first imported in a forked child: serial from the start


def _after_fork_in_child() -> None:
    global _serial_only, _parallel_lock
    _serial_only = True
    _parallel_lock = threading.Lock()  # a lock held by a parent thread stays held here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _no_threading_layer(exc: ValueError) -> None:
    global _serial_only
    _serial_only = True
    layer = os.environ.get("NUMBA_THREADING_LAYER", "default")
    warnings.warn(f"fastkl: numba could not load a threading layer (NUMBA_THREADING_LAYER="
                  f"{layer}): its kernels run on one thread in this process ({exc})",
                  RuntimeWarning, stacklevel=3)


def specialize(fn, name: str, **globals_):
    """A copy of the plain function ``fn`` named ``name`` (qualname too), whose globals are
    ``fn``'s with ``globals_`` replacing some: one source compiled into several kernels
    that differ in a helper or a constant. Never a closure: numba names a function's cache
    files and compiled symbols after its qualname, and two closures from one factory share
    it (a float64 kernel could load the float32 one from the cache)."""
    g = fn.__globals__
    if globals_:
        g = dict(g)
        g.update(globals_)
    f = pytypes.FunctionType(fn.__code__, g, name, fn.__defaults__, fn.__closure__)
    f.__qualname__ = name
    f.__doc__ = fn.__doc__
    f.__module__ = fn.__module__
    return f


def _launch(kernel, n, args):
    """``kernel(*args)`` on ``n`` threads of numba's pool (None: numba's current count).
    numba's count is per Python thread: it is set for this launch and put back after."""
    if n is None:
        return kernel(*args)
    prev = numba.get_num_threads()
    want = min(n, numba.config.NUMBA_NUM_THREADS)
    if want == prev:
        return kernel(*args)
    numba.set_num_threads(want)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(prev)


class ThreadedKernel:
    """One kernel source compiled twice: with ``prange`` spread over threads, and serially
    (``prange`` is a plain ``range`` there). ``kernel(work, *args)`` picks the serial one
    below ``_threads.NUMBA_MIN`` elements of work, when ``fastkl.set_num_threads(1)`` is in
    effect, in a forked child, while another threaded call runs, and when numba has no
    threading layer; else the threaded one on the policy's thread count (``_launch``)."""

    def __init__(self, fn):
        self.threaded = jit(parallel=True, nogil=True)(fn)
        # a renamed copy: a parallel and a serial build must not share cache files
        self.serial = jit(nogil=True)(specialize(fn, fn.__name__ + "_serial"))
        self.__doc__ = fn.__doc__

    def __call__(self, work, *args):
        n = _threads._num_threads
        if work < _threads.NUMBA_MIN or _serial_only or n == 1:
            return self.serial(*args)
        lock = _parallel_lock
        if not lock.acquire(blocking=False):
            return self.serial(*args)
        try:
            return _launch(self.threaded, n, args)
        except ValueError as exc:  # raised by numba before any work is done
            if "threading layer" not in str(exc):
                raise
            _no_threading_layer(exc)
        finally:
            lock.release()
        return self.serial(*args)


def threaded_kernel(fn) -> ThreadedKernel:
    """Decorator: ``fn`` as a ``ThreadedKernel``."""
    return ThreadedKernel(fn)


# --------------------------------------------------------------------------- exp
# The range-reduced exp of docs/kernel_math.md, shared by both numba modules.

LOG2E = 1.4426950408889634
SHIFT = 6755399441055744.0  # 1.5 * 2**52: t = x + SHIFT rounds x to an integer
LN2_HI = 6.93147180369123816490e-01  # 21 trailing zero bits: kf * LN2_HI is exact
LN2_LO = 1.90821492927058770002e-10

# 1/n! for n = 2..13 (Taylor of (e^r - 1 - r) / r**2; truncation < 1e-16 relative, |r| <= ln2/2)
C2 = 1.0 / 2
C3 = 1.0 / 6
C4 = 1.0 / 24
C5 = 1.0 / 120
C6 = 1.0 / 720
C7 = 1.0 / 5040
C8 = 1.0 / 40320
C9 = 1.0 / 362880
C10 = 1.0 / 3628800
C11 = 1.0 / 39916800
C12 = 1.0 / 479001600
C13 = 1.0 / 6227020800


@jit(nogil=True)
def _reduce(x):
    """(t, r): t holds k = round(x / ln2) in its low mantissa bits, r = x - k ln2."""
    t = fma(x, LOG2E, SHIFT)
    kf = t - SHIFT
    r = fma(-kf, LN2_LO, fma(-kf, LN2_HI, x))  # the inner fma is exact (= x - kf*LN2_HI)
    return t, r


@jit(nogil=True)
def _scale(t):
    """2**k from the t of ``_reduce``."""
    return i64_as_f64((f64_as_i64(t) + 1023) << 52)


@jit(nogil=True)
def exp_parts(x):
    """(s, r, q) with e^x = s * (1 + r + q), s = 2**k, q = e^r - 1 - r (|x| <= FAST_MAX)."""
    t, r = _reduce(x)
    p = fma(C13, r, C12)
    p = fma(p, r, C11)
    p = fma(p, r, C10)
    p = fma(p, r, C9)
    p = fma(p, r, C8)
    p = fma(p, r, C7)
    p = fma(p, r, C6)
    p = fma(p, r, C5)
    p = fma(p, r, C4)
    p = fma(p, r, C3)
    p = fma(p, r, C2)
    return _scale(t), r, (r * r) * p


# Minimax fit (Remez, relative error) of (e^r - 1 - r) / r**2 on |r| <= ln2/2 + 5e-4 by a
# degree-5 polynomial: relative error 2.7e-9 (0.05 float32 ulp), two FMAs fewer than the
# Taylor series cut at r**9 it replaces. Docs/kernel_math.md has the fit.
M0 = 0.50000000134956292519
M1 = 0.16666666531201065386
M2 = 0.04166646436477276519
M3 = 0.0083333608728334880738
M4 = 0.0013933726747929464043
M5 = 0.00019857847267093069348


@jit(nogil=True)
def exp_parts_lo(x):
    """``exp_parts`` with the minimax series above (relative error < 3e-9): for float32
    inputs, whose results need 1e-6 (the Cython kernels use the same coefficients)."""
    t, r = _reduce(x)
    p = fma(M5, r, M4)
    p = fma(p, r, M3)
    p = fma(p, r, M2)
    p = fma(p, r, M1)
    p = fma(p, r, M0)
    return _scale(t), r, (r * r) * p


# --------------------------------------------------------------------------- float32 lanes
# The float32 term lanes of the Monte Carlo partials (issue 12; docs/kernel_math.md, "float32
# lanes"). numba widens int32 arithmetic to int64 and a Python float literal promotes a
# float32 lane to float64, so the bit tricks are intrinsics and every constant is an
# ``np.float32`` global.


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32 (one rounding where the host has FMA, as ``fma``)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        if HAS_FMA:
            return builder.fma(*args)
        return builder.fadd(builder.fmul(args[0], args[1]), args[2])

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def pow2_of32(typingctx, t):
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
def abs_bits32(typingctx, x):
    """bits(x) & 0x7fffffff as int32: ordered like |x|, NaN above inf."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def tiny_key32(typingctx, x):
    """((bits(x) & 0x7fffffff) - 1) ^ 0x80000000 as int32: the unsigned order of |bits| - 1
    as a signed one, so a signed min over lanes finds the smallest nonzero |x| (a zero maps
    to the int32 maximum and never flags a lane)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        b = builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))
        b = builder.sub(b, ir.Constant(i32, 1))
        return builder.xor(b, ir.Constant(i32, -0x80000000))

    return types.int32(types.float32), codegen


F32 = np.float32
LOG2E_32 = F32(LOG2E)
SHIFT_32 = F32(12582912.0)  # 1.5 * 2**23
LN2_HI_32 = F32(0.693145751953125)  # 0x3f317200: 9 trailing zero bits, kf * LN2_HI_32 exact
LN2_LO_32 = F32(1.428606765330187045e-06)
M0_32 = F32(M0)
M1_32 = F32(M1)
M2_32 = F32(M2)
M3_32 = F32(M3)
M4_32 = F32(M4)
M5_32 = F32(M5)
ONE_32 = F32(1.0)
HALF_32 = F32(0.5)
ZERO_32 = F32(0.0)


@jit(nogil=True)
def exp_parts32(x):
    """``exp_parts_lo`` in float32 lanes: (s, r, q), e^x = s * (1 + r + q), for
    -87 <= x <= 87 (2**k a normal float32)."""
    t = fma32(x, LOG2E_32, SHIFT_32)
    kf = t - SHIFT_32
    r = fma32(-kf, LN2_LO_32, fma32(-kf, LN2_HI_32, x))
    p = fma32(M5_32, r, M4_32)
    p = fma32(p, r, M3_32)
    p = fma32(p, r, M2_32)
    p = fma32(p, r, M1_32)
    p = fma32(p, r, M0_32)
    return pow2_of32(t), r, (r * r) * p
