"""Bit-level helpers for the numba kernels: float64 <-> int64 reinterpretation.

A plain LLVM ``bitcast`` per lane: inside a loop it vectorizes like any other arithmetic, so
the ``2**k`` of the range-reduced exp is built from bits in the same loop as the polynomial
(no round trip through an int64 view of a buffer).
"""

from __future__ import annotations

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
