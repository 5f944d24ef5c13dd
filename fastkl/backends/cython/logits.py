"""The logits half of the Cython backend: the kernel contract (``_contract``, bottom half)
over the compiled extension ``fastkl.backends.cython._logits``.

The package re-exports ``logits_rows``, ``logits_token``, ``logits_grad`` and
``logits_token_grad`` from here. Importing this module raises ImportError when the extension
is not built. The wrappers only make sure the arrays are what the extension reads (2-D,
native order, float32/float64, element-aligned strides of any sign; the big arrays are copied
only in the rare cases where they are not, e.g. unaligned or byte-swapped views) and never
modify an input.
"""

from __future__ import annotations

import numpy as np

from .. import in_forked_child
from . import _logits as _k

# first imported in a forked child: serial from the start (an OpenMP pool the parent
# started, e.g. through numba's omp layer, cannot be used here)
if in_forked_child():
    _k._after_fork_in_child()


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_OPS = {0: 0, 1: 1, 2: 2}  # contract op code -> extension op code (KL, JSD, entropy)
_TOKEN, _GRAD = 3, 4


def isa() -> str:
    """Instruction set of the logits kernel version running on this CPU ("avx512f",
    "avx2", "default")."""
    return _k.isa()


def _fit(a: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """``a`` as the extension reads it: the same array when it already fits, else a copy."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"kernel arrays must be 2-D, got {a.ndim}-D")
    if dtype is None:
        dtype = _F32 if a.dtype == _F32 else _F64
    if (
        a.dtype == dtype
        and a.dtype.isnative
        and a.flags.aligned
        and a.strides[0] % dtype.itemsize == 0
        and a.strides[1] % dtype.itemsize == 0
    ):
        return a
    return np.ascontiguousarray(a, dtype=dtype)


def _small(x, dtype, rows: int) -> np.ndarray:
    """A per-row array as a contiguous ``[rows]`` array of ``dtype`` (O(rows) copy at most)."""
    return np.ascontiguousarray(np.asarray(x).reshape(rows), dtype=dtype)


def _out_buffer(out: np.ndarray, rows: int) -> tuple[np.ndarray, bool]:
    direct = (out.dtype == _F64 and out.ndim == 1 and out.shape[0] == rows
              and out.flags.c_contiguous and out.flags.writeable)
    return (out if direct else np.empty(rows, dtype=_F64)), direct


def logits_rows(a, b, op, beta, inv_t, log_probs, active, out):
    """Per-row value into ``out`` (float64 ``[rows]``): op 0 KL(P||Q), 1 JSD_beta(P, Q),
    2 entropy of P (``b`` ignored). Rows with ``active[r] == 0`` get 0.0."""
    a = _fit(a)
    b = a if int(op) == 2 else _fit(b, a.dtype)
    rows = a.shape[0]
    act = None if active is None else _small(active, np.uint8, rows)
    dest, direct = _out_buffer(out, rows)
    inv_t = float(inv_t)
    fixed = bool(log_probs) and inv_t == 1.0
    _k.run(_OPS[int(op)], a, b, inv_t, float(beta), fixed, act, None, 0, None, dest, None)
    if not direct:
        out[...] = dest


def logits_token(b, tokens, inv_t, ignore_index, out):
    """out[r] = log softmax(b[r]/T)[tokens[r]] (float64), 0.0 where tokens == ignore_index."""
    b = _fit(b)
    rows = b.shape[0]
    tok = _small(tokens, np.int64, rows)
    dest, direct = _out_buffer(out, rows)
    _k.run(_TOKEN, b, b, float(inv_t), 0.5, False, None, tok, int(ignore_index), None, dest,
           None)
    if not direct:
        out[...] = dest


def _grad_dest(g, a: np.ndarray):
    """The buffer the extension writes a gradient into: ``g`` itself when C-contiguous of the
    input dtype, else a fresh one (copied back by ``_grad_back``); None stays None."""
    if g is None:
        return None
    direct = (g.dtype == a.dtype and g.shape == a.shape and g.flags.c_contiguous
              and g.flags.writeable)
    return g if direct else np.empty(a.shape, dtype=a.dtype)


def _grad_back(g, dest) -> None:
    if g is not None and dest is not g:
        g[...] = dest


def logits_grad(a, b, op, beta, inv_t, rowscale, out_val, grad_a, grad_b):
    """The op's row value into ``out_val`` and ``rowscale[r] * inv_t *`` its gradients with
    respect to ``a*inv_t`` / ``b*inv_t`` into ``grad_a`` / ``grad_b`` (None: not computed);
    see ``numpy.logits.logits_grad``."""
    op = int(op)
    if op not in _OPS:
        raise ValueError(f"unknown logits op code {op}: the kernels know {_OPS}")
    a = _fit(a)
    b = a if op == 2 else _fit(b, a.dtype)
    if op == 2:
        grad_b = None
    rows = a.shape[0]
    rs = _small(rowscale, np.float64, rows)
    dest, direct = _out_buffer(out_val, rows)
    ga, gb = _grad_dest(grad_a, a), _grad_dest(grad_b, a)
    _k.run(_GRAD, a, b, float(inv_t), float(beta), False, None, None, 0, rs, dest, ga, gb,
           _OPS[op])
    if not direct:
        out_val[...] = dest
    _grad_back(grad_a, ga)
    _grad_back(grad_b, gb)


def logits_token_grad(b, tokens, inv_t, ignore_index, rowscale, out_val, grad_b):
    """``logits_token`` into ``out_val`` and ``rowscale[r] * inv_t * (onehot - Q)`` into
    ``grad_b`` (zeros where tokens == ignore_index)."""
    b = _fit(b)
    rows = b.shape[0]
    tok = _small(tokens, np.int64, rows)
    rs = _small(rowscale, np.float64, rows)
    dest, direct = _out_buffer(out_val, rows)
    gb = _grad_dest(grad_b, b)
    _k.run(_GRAD, b, b, float(inv_t), 0.5, False, None, tok, int(ignore_index), rs, dest, None,
           gb, _TOKEN)
    if not direct:
        out_val[...] = dest
    _grad_back(grad_b, gb)
