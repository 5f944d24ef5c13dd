"""The ``numpy`` backend's Monte Carlo kernels: the specification (``mc.py``) blocked over
cache-sized tiles, with float32 lanes for float32 inputs (issue 12, item 6).

``mc.py`` stays the readable specification and the tests' oracle (registered as the hidden
backend ``"reference"``). This module computes the same contract tile by tile: a tile is a
``[g, m]`` piece of the ``[rows, n]`` inputs (``m`` a multiple of ``BLOCK`` unless it ends a
row, about ``CHUNK`` elements), so no float64 copy of the whole input is ever made and block
partials are those of whole blocks, as in the spec.

Fast path (float32 inputs, and float16 / bfloat16 ones widened to float32 per tile; no
weights or a uint8 mask, no ``log_iw``, no clamp; every estimator): the terms are computed
in float32 (``l = logp - logq`` rounded once, <= 2**-24 relative) and widened to float64
before they are summed per block:

* k3: ``|l| <= 1``: ``l*l*P(l)``, P a degree-6 fit of ``(e^l - 1 - l)/l**2`` (relative
  error 8.5e-8 in exact arithmetic, 1.1e-7 with its float32-rounded coefficients, 2.4e-7
  evaluated in float32 with Horner, measured against mpmath); ``|l| > 1``:
  ``(exp(l) - 1) - l`` (cancellation below a factor 4 there).
* reverse k3: ``|l| <= 1``: ``l*l*Q(l)``, Q a degree-7 fit of ``(e^l (l - 1) + 1)/l**2``
  (3.8e-8 exact, 2.2e-7 in float32); ``|l| > 1``: ``exp(l) * (l - 1) + 1``.
* k1 ``-l``, k2 ``l*l/2``, abs ``|l|``, reverse k1 ``exp(l) * l``.

A tile takes the fast path only when every ``|l|`` is finite, at most ``LMAX`` (80: no float32
overflow of any term) and either 0 or at least ``TINY`` (2**-62: ``l*l`` stays a normal
float32); any other tile (NaN, inf, huge or tiny log-ratios, float weights, ``log_iw``,
clamps, float64 inputs) and every gradient call run the specification's own functions on
that tile, so the rare options cannot drift from the spec. docs/kernel_math.md ("The numpy
backend") has the measured errors and timings.
"""

from __future__ import annotations

import numpy as np

from ..._estimators import ABS, K1, K2, K3, RK1, RK3
from .._contract import BLOCK, N_PARTIALS
from . import mc as spec

CHUNK = 16 * BLOCK  # elements per tile (float32 buffers of 256 KiB: they stay in L2)
LMAX = np.float32(80.0)
TINY = np.float32(2.0 ** -62)
CUT = np.float32(1.0)  # polynomial for |l| <= CUT, the direct formula above

# P(l) ~ (e^l - 1 - l) / l**2 on [-1, 1], increasing powers (a least-squares fit of the
# relative error iterated to near-minimax, coefficients rounded to float32)
P_K3 = tuple(np.float32(c) for c in (
    0.5, 0.16666695475578308, 0.04166651517152786, 0.008330930024385452,
    0.0013891335111111403, 0.00020325486548244953, 2.496079650882166e-05))
# Q(l) ~ (e^l (l - 1) + 1) / l**2 on [-1, 1]
Q_RK3 = tuple(np.float32(c) for c in (
    0.4999999701976776, 0.33333340287208557, 0.12500056624412537, 0.03333279862999916,
    0.0069414773024618626, 0.0011913791531696916, 0.000178510817931965,
    2.184663389925845e-05))


def _tiles(rows: int, n: int):
    """(r0, r1, c0, c1) tiles in row-major order: whole rows grouped when a row is short,
    ``CHUNK``-element pieces of a row (a multiple of ``BLOCK``) when it is long."""
    if n <= CHUNK:
        g = max(1, CHUNK // max(n, 1))
        for r0 in range(0, rows, g):
            yield r0, min(rows, r0 + g), 0, n
    else:
        for r in range(rows):
            for c0 in range(0, n, CHUNK):
                yield r, r + 1, c0, min(n, c0 + CHUNK)


class _Buffers:
    """Scratch reused across the tiles of one call (float32 lanes, float64 widened terms)."""

    def __init__(self, size: int):
        self.l = np.empty(size, np.float32)
        self.a = np.empty(size, np.float32)
        self.t = np.empty(size, np.float32)
        self.d = np.empty(size, np.float32)
        self.big = np.empty(size, np.bool_)
        self.sel = np.empty(size, np.int32)
        self.t64 = np.empty(size, np.float64)


def _poly(l, sq, coefs, out):
    """out = l*l*C(l) in float32 (Horner, ``sq`` as scratch for l*l)."""
    np.multiply(l, coefs[-1], out=out)
    for c in coefs[-2:0:-1]:
        out += c
        out *= l
    out += coefs[0]
    np.multiply(l, l, out=sq)
    out *= sq


def _fast_terms(q, p, est, buf: _Buffers, size: int):
    """float32 terms of a [g, m] tile into ``buf.t[:size]`` (shaped like the tile), or None
    when a lane is outside the float32 lanes' range (the caller then runs the spec)."""
    shape = q.shape
    l = buf.l[:size].reshape(shape)
    a = buf.a[:size].reshape(shape)
    t = buf.t[:size].reshape(shape)
    with np.errstate(invalid="ignore", over="ignore"):
        np.subtract(p, q, out=l)
        np.abs(l, out=a)
    amax = a.max() if size else np.float32(0)
    if not amax <= LMAX:  # NaN, inf or a term that could overflow float32
        return None
    if est == K1:
        np.negative(l, out=t)
        return t
    if est == ABS:
        np.copyto(t, a)
        return t
    if est == RK1:
        np.exp(l, out=t)
        t *= l
        return t
    if est not in (K2, K3, RK3):
        return None  # an estimator without float32 lanes runs the spec
    if size and a.min() < TINY and np.any((a > 0) & (a < TINY)):
        return None  # l*l would leave float32's normal range
    if est == K2:
        np.multiply(l, l, out=t)
        t *= np.float32(0.5)
        return t
    _poly(l, buf.d[:size].reshape(shape), P_K3 if est == K3 else Q_RK3, t)
    if amax > CUT:
        _direct(est, buf, size)
    return t


def _direct_formula(est, l, d, scratch):
    """d = the direct float32 term for |l| > CUT (three distinct arrays)."""
    np.exp(l, out=d)
    if est == K3:  # (e^l - 1) - l
        d -= np.float32(1.0)
        d -= l
    else:  # reverse k3: e^l (l - 1) + 1
        np.subtract(l, np.float32(1.0), out=scratch)
        d *= scratch
        d += np.float32(1.0)


def _direct(est, buf: _Buffers, size: int):
    """Replace the polynomial's value by the direct formula in the lanes with |l| > CUT:
    gathered when they are few (RL data: nearly none), a bitwise select otherwise (numpy's
    masked copy is several times slower than the arithmetic)."""
    l, a, t = buf.l[:size], buf.a[:size], buf.t[:size]
    m = buf.big[:size]
    np.greater(a, CUT, out=m)
    idx = np.flatnonzero(m)
    if idx.size * 8 <= size:
        lb = l[idx]
        db = np.empty_like(lb)
        _direct_formula(est, lb, db, np.empty_like(lb))
        t[idx] = db
        return
    d = buf.d[:size]
    _direct_formula(est, l, d, a)  # (|l| is no longer needed)
    sel = buf.sel[:size]  # all ones where |l| > CUT, zeros elsewhere
    np.subtract(0, m.view(np.uint8), out=sel, dtype=np.int32)
    db, tb = d.view(np.int32), t.view(np.int32)
    np.bitwise_and(db, sel, out=db)
    np.invert(sel, out=sel)
    np.bitwise_and(tb, sel, out=tb)
    np.bitwise_or(tb, db, out=tb)


def _blocks(x, full: int):
    """The first ``full`` runs of BLOCK elements of each row of a C-contiguous [g, m] array,
    as a [g, full, BLOCK] view."""
    g, m = x.shape
    if m == full * BLOCK:
        return x.reshape(g, full, BLOCK)
    if g == 1:
        return x[0, :full * BLOCK].reshape(1, full, BLOCK)
    return np.lib.stride_tricks.as_strided(
        x, (g, full, BLOCK), (m * x.itemsize, BLOCK * x.itemsize, x.itemsize))


def _sum_blocks(x, m: int, out):
    """out[..., j] = sum of x's j-th run of BLOCK elements along the last axis (the last run
    may be short): x is a C-contiguous [g, m] float64 array."""
    full = m // BLOCK
    if full:
        np.add.reduce(_blocks(x, full), axis=2, out=out[:, :full])
    if full * BLOCK < m:
        np.add.reduce(x[:, full * BLOCK:], axis=1, out=out[:, full])


def _fast_partials(t, mask, want_m2, buf: _Buffers, size: int, out):
    """Block partials of float32 terms ``t`` (all finite) into ``out`` [g, nb, 6]."""
    g, m = t.shape
    t64 = buf.t64[:size].reshape(g, m)
    if mask is not None:
        t *= mask  # w in {0, 1}: w*t exactly, 0 where w == 0 (t is finite)
        w64 = buf.t64[:size].reshape(g, m)
        np.copyto(w64, mask)
        _sum_blocks(w64, m, out[..., 0])
        out[..., 3] = out[..., 0]
        out[..., 5] = out[..., 0]
    else:
        full = m // BLOCK
        out[:, :full, 0] = BLOCK
        if full * BLOCK < m:
            out[:, full, 0] = m - full * BLOCK
        out[..., 3] = out[..., 0]
        out[..., 5] = out[..., 0]
    np.copyto(t64, t)
    _sum_blocks(t64, m, out[..., 1])
    out[..., 4] = 0.0
    if want_m2:
        W, S = out[..., 0], out[..., 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(W > 0, S / W, 0.0)
        full = m // BLOCK
        if full:
            _blocks(t64, full)[...] -= mean[:, :full, None]
        if full * BLOCK < m:
            t64[:, full * BLOCK:] -= mean[:, full, None]
        t64 *= t64
        if mask is not None:
            t64 *= mask
        _sum_blocks(t64, m, out[..., 2])
    else:
        out[..., 2] = 0.0


def _w32(a):
    """A tile of a 16-bit input (float16, bfloat16) as float32 (exact): the float32 lanes
    then run on the widened values, as the compiled backends' do; anything else unchanged."""
    return a.astype(np.float32) if a is not None and a.dtype.itemsize == 2 else a


def _eligible(logq, mask, log_iw, clamp) -> bool:
    lr_lo, lr_hi, v_lo, v_hi, _ = clamp
    return (logq.dtype.itemsize in (2, 4) and log_iw is None
            and (mask is None or mask.dtype == np.uint8)
            and lr_lo == -np.inf and lr_hi == np.inf and v_lo == -np.inf and v_hi == np.inf)


def _spec_partials(q, p, mask, iw, est, clamp, want_m2):
    _, t, w = spec._prepared(q, p, mask, iw, est, clamp)
    return spec._block_partials(t, w, want_m2)


def _sub(a, r0, r1, c0, c1):
    return None if a is None else a[r0:r1, c0:c1]


def mc_partials(logq, logp, mask, log_iw, est, clamp, want_m2):
    """Per-block partials [rows, nblk, N_PARTIALS] (``_contract``; spec: ``mc.mc_partials``)."""
    est = spec._check_est(est)
    rows, n = logq.shape
    nblk = max(1, -(-n // BLOCK))
    out = np.zeros((rows, nblk, N_PARTIALS))
    if n == 0 or rows == 0:
        return out
    fast = _eligible(logq, mask, log_iw, clamp)
    buf = _Buffers(min(rows * n, CHUNK)) if fast else None
    for r0, r1, c0, c1 in _tiles(rows, n):
        q, p = _w32(logq[r0:r1, c0:c1]), _w32(logp[r0:r1, c0:c1])
        m = _sub(mask, r0, r1, c0, c1)
        b0, b1 = c0 // BLOCK, -(-c1 // BLOCK)
        dst = out[r0:r1, b0:b1]
        if fast:
            size = (r1 - r0) * (c1 - c0)
            t = _fast_terms(q, p, est, buf, size)
            if t is not None:
                _fast_partials(t, m, want_m2, buf, size, dst)
                continue
        dst[...] = _spec_partials(q, p, m, _sub(log_iw, r0, r1, c0, c1), est, clamp, want_m2)
    return out


def mc_terms(logq, logp, mask, log_iw, est, clamp, out):
    """out[...] = w * v (``_contract``; spec: ``mc.mc_terms``)."""
    est = spec._check_est(est)
    rows, n = logq.shape
    if n == 0 or rows == 0:
        return
    fast = _eligible(logq, mask, log_iw, clamp)
    buf = _Buffers(min(rows * n, CHUNK)) if fast else None
    for r0, r1, c0, c1 in _tiles(rows, n):
        q, p = _w32(logq[r0:r1, c0:c1]), _w32(logp[r0:r1, c0:c1])
        m = _sub(mask, r0, r1, c0, c1)
        dst = out[r0:r1, c0:c1]
        if fast:
            t = _fast_terms(q, p, est, buf, (r1 - r0) * (c1 - c0))
            if t is not None:
                if m is not None:
                    t *= m
                np.copyto(dst, t)
                continue
        spec.mc_terms(q, p, m, _sub(log_iw, r0, r1, c0, c1), est, clamp, dst)


def mc_grad(logq, logp, mask, log_iw, est, clamp, iw_grad, rowscale, out_grad):
    """``_contract``'s mc_grad: the spec's ``mc.mc_grad`` run tile by tile (no float64 copy
    of the whole input)."""
    est = spec._check_est(est)
    rows, n = logq.shape
    nblk = max(1, -(-n // BLOCK))
    out = np.zeros((rows, nblk, N_PARTIALS))
    if n == 0 or rows == 0:
        return out
    for r0, r1, c0, c1 in _tiles(rows, n):
        b0, b1 = c0 // BLOCK, -(-c1 // BLOCK)
        out[r0:r1, b0:b1] = spec.mc_grad(
            logq[r0:r1, c0:c1], logp[r0:r1, c0:c1], _sub(mask, r0, r1, c0, c1),
            _sub(log_iw, r0, r1, c0, c1), est, clamp, iw_grad, rowscale[r0:r1],
            out_grad[r0:r1, c0:c1])
    return out
