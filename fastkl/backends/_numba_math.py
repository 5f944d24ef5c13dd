"""Bit-level helpers for the numba kernels: float64 <-> int64 reinterpretation.

A plain LLVM ``bitcast`` per lane: inside a loop it vectorizes like any other arithmetic, so
the ``2**k`` of the range-reduced exp is built from bits in the same loop as the polynomial
(no round trip through an int64 view of a buffer).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


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
