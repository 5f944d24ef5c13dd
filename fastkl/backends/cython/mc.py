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


_U16 = np.dtype(np.uint16)


def _half_fmt(a: np.ndarray) -> int:
    """The extension's format of a 16-bit float array (float16 or ml_dtypes' bfloat16), or
    -1 for any other array."""
    if a.dtype.itemsize == 2:
        if a.dtype == np.float16:
            return _k.FMT_F16
        if a.dtype.name == "bfloat16":
            return _k.FMT_BF16
    return -1


def _fit_any(a: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """(``a`` as the extension reads it, its format): a 16-bit float array as a uint16 view
    of its bits (no copy), anything else converted to ``dtype`` where needed (``_fit``)."""
    a = np.asarray(a)
    fmt = _half_fmt(a)
    if fmt >= 0 and a.dtype.isnative:
        return _fit(a.view(_U16), _U16), fmt
    return _fit(a, dtype), -1


def _inputs(logq, logp, mask, log_iw):
    """(q, p, m, iw, the output dtype, q's format, iw's format). The contract's 16-bit logq
    and logp (one dtype) are read in place; log_iw may be 16-bit (of that dtype) or float32
    alongside them."""
    logq, logp = np.asarray(logq), np.asarray(logp)
    qfmt = _half_fmt(logq)
    if qfmt >= 0 and logp.dtype == logq.dtype and logq.dtype.isnative:
        dtype = _F32
        q, _ = _fit_any(logq, dtype)
        p, _ = _fit_any(logp, dtype)
    else:
        qfmt = -1
        dtype = _F32 if logq.dtype == _F32 or logq.dtype.itemsize == 2 else _F64
        q = _fit(logq, dtype)
        p = _fit(logp, dtype)
    m = None
    if mask is not None:
        mask = np.asarray(mask)
        m = _fit(mask, np.dtype(np.uint8) if mask.dtype.itemsize == 1 else _F64)
    iw, iwfmt = (None, -1) if log_iw is None else _fit_any(log_iw, dtype)
    if iw is not None and iwfmt < 0:
        iwfmt = _k.FMT_F32 if dtype == _F32 else _k.FMT_F64
    return q, p, m, iw, dtype, qfmt, iwfmt


def _clamp(clamp):
    """``run``'s clamp arguments (lr_lo, lr_hi, v_lo, v_hi, weighted) of a contract tuple."""
    lo, hi, vlo, vhi, weighted = clamp
    return float(lo), float(hi), float(vlo), float(vhi), bool(weighted)


def mc_terms(logq, logp, mask, log_iw, est, clamp, out):
    """out[...] = w * exp(log_iw) * clamp_v(t(clamp_lr(l))); 0 wherever w == 0."""
    q, p, m, iw, dtype, qfmt, iwfmt = _inputs(logq, logp, mask, log_iw)
    if q.size == 0:
        return
    direct = out.dtype == dtype and out.flags.c_contiguous and out.flags.writeable
    dest = out if direct else np.empty(q.shape, dtype=dtype)
    _k.run(_TERMS, q, p, m, iw, int(est), *_clamp(clamp), 0, False, dest, None, qfmt, iwfmt)
    if not direct:
        out[...] = dest


def mc_partials(logq, logp, mask, log_iw, est, clamp, want_m2):
    """Per-block partials ``[rows, nblk, N_PARTIALS]`` (see ``_contract``)."""
    q, p, m, iw, _, qfmt, iwfmt = _inputs(logq, logp, mask, log_iw)
    return _k.run(_PARTIALS, q, p, m, iw, int(est), *_clamp(clamp), 0, bool(want_m2), None,
                  None, qfmt, iwfmt)


def mc_grad(logq, logp, mask, log_iw, est, clamp, iw_grad, rowscale, out_grad):
    """The partials of the terms of ``mc_partials(..., clamp)``; out_grad = rowscale * w *
    dv/dlogq (numpy/mc.py ``mc_grad``)."""
    q, p, m, iw, dtype, qfmt, iwfmt = _inputs(logq, logp, mask, log_iw)
    rs = np.ascontiguousarray(rowscale, dtype=np.float64).reshape(q.shape[0])
    direct = (out_grad.dtype == dtype and out_grad.flags.c_contiguous
              and out_grad.flags.writeable)
    dest = out_grad if direct else np.empty(q.shape, dtype=dtype)
    part = _k.run(_GRAD, q, p, m, iw, int(est), *_clamp(clamp), int(iw_grad), False, dest, rs,
                  qfmt, iwfmt)
    if not direct:
        out_grad[...] = dest
    return part


# the logits half of the contract, over the second extension
