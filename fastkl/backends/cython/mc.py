"""The Cython backend: the kernel contract (``_contract``) over the compiled extension
``fastkl.backends.cython._mc``.

Importing this module raises ImportError when the extension is not built, which makes the
registry mark the backend unavailable. This wrapper only makes sure the arrays are what the
extension reads (2-D, native order, the kernel dtype, element-aligned strides; a copy only in
the rare cases where they are not) and never modifies an input.
"""

from __future__ import annotations

import numpy as np

from .. import in_forked_child
from .._contract import BLOCK, N_PARTIALS
from . import _mc as _k
from .logits import _fit as _fit_2d

if _k.BLOCK != BLOCK or _k.N_PARTIALS != N_PARTIALS:  # pragma: no cover - build mismatch
    raise ImportError(
        f"fastkl.backends.cython._mc was built with BLOCK={_k.BLOCK}, "
        f"N_PARTIALS={_k.N_PARTIALS}; the contract says {BLOCK}, {N_PARTIALS}: rebuild it"
    )

# first imported in a forked child: serial from the start (an OpenMP pool the parent
# started, e.g. through numba's omp layer, cannot be used here)
if in_forked_child():
    _k._after_fork_in_child()


_TERMS, _PARTIALS, _GRAD = 0, 1, 2
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def isa() -> str:
    """Instruction set of the kernel version running on this CPU ("avx512f", "avx2",
    "default")."""
    return _k.isa()


def _fit(a: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """``a`` as the extension reads it (``logits._fit``), or None."""
    return None if a is None else _fit_2d(a, dtype)


def _inputs(logq, logp, mask, log_iw):
    logq = np.asarray(logq)
    dtype = _F32 if logq.dtype == _F32 else _F64
    q = _fit(logq, dtype)
    p = _fit(logp, dtype)
    m = None
    if mask is not None:
        mask = np.asarray(mask)
        m = _fit(mask, np.dtype(np.uint8) if mask.dtype.itemsize == 1 else _F64)
    iw = _fit(log_iw, dtype)
    return q, p, m, iw, dtype


def _clamp(clamp):
    """``run``'s clamp arguments (lr_lo, lr_hi, v_lo, v_hi, weighted) of a contract tuple."""
    lo, hi, vlo, vhi, weighted = clamp
    return float(lo), float(hi), float(vlo), float(vhi), bool(weighted)


def mc_terms(logq, logp, mask, log_iw, est, clamp, out):
    """out[...] = w * exp(log_iw) * clamp_v(t(clamp_lr(l))); 0 wherever w == 0."""
    q, p, m, iw, dtype = _inputs(logq, logp, mask, log_iw)
    if q.size == 0:
        return
    direct = out.dtype == dtype and out.flags.c_contiguous and out.flags.writeable
    dest = out if direct else np.empty(q.shape, dtype=dtype)
    _k.run(_TERMS, q, p, m, iw, int(est), *_clamp(clamp), 0, False, dest, None)
    if not direct:
        out[...] = dest


def mc_partials(logq, logp, mask, log_iw, est, clamp, want_m2):
    """Per-block partials ``[rows, nblk, N_PARTIALS]`` (see ``_contract``)."""
    q, p, m, iw, _ = _inputs(logq, logp, mask, log_iw)
    return _k.run(_PARTIALS, q, p, m, iw, int(est), *_clamp(clamp), 0, bool(want_m2), None,
                  None)


def mc_grad(logq, logp, mask, log_iw, est, clamp, iw_grad, rowscale, out_grad):
    """The partials of the terms of ``mc_partials(..., clamp)``; out_grad = rowscale * w *
    dv/dlogq (numpy/mc.py ``mc_grad``)."""
    q, p, m, iw, dtype = _inputs(logq, logp, mask, log_iw)
    rs = np.ascontiguousarray(rowscale, dtype=np.float64).reshape(q.shape[0])
    direct = (out_grad.dtype == dtype and out_grad.flags.c_contiguous
              and out_grad.flags.writeable)
    dest = out_grad if direct else np.empty(q.shape, dtype=dtype)
    part = _k.run(_GRAD, q, p, m, iw, int(est), *_clamp(clamp), int(iw_grad), False, dest, rs)
    if not direct:
        out_grad[...] = dest
    return part


# the logits half of the contract, over the second extension
