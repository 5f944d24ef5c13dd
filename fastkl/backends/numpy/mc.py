"""The reference backend: plain numpy, written to be read, never optimized.

This module *is* the specification of the kernel contract (see ``backends/__init__.py``).
Every compiled backend is tested against it.

Notation: samples x ~ q, ``l = logp - logq = log r``.

=========  ===========  =============================  =====================
code       target       term t(l)                      d t / d logq
=========  ===========  =============================  =====================
K1         KL(q||p)     -l                             1
K2         KL(q||p)     l**2 / 2                       -l
K3         KL(q||p)     expm1(l) - l                   -expm1(l)
RK1        KL(p||q)     r * l                          -r * (l + 1)
RK3        KL(p||q)     r * l - expm1(l)               -r * l
ABS        (verl "abs") |l|                            -sign(l)
=========  ===========  =============================  =====================

(the codes, ``fastkl._estimators.K1..ABS``, are the integers of its table; an unknown code is
a ValueError of ``mc_terms``, ``mc_partials`` and ``mc_grad``.)

Numerics (float64 throughout):

* ``E(l) = exp(l) - 1 - l`` cancels catastrophically for small |l|; below |l| < 0.5 it is
  the Taylor series sum_{n>=2} l**n / n! (20 terms: truncation < 1e-22 relative), above it
  ``expm1(l) - l`` (cancellation at most a factor ~5 there).
* reverse k3 ``r*l - (r - 1)`` is written ``l**2 + (l - 1) * E(l)`` (cancellation at most a
  factor 2 near 0), and ``exp(l) * (l - 1) + 1`` for l < -1 where the first form cancels.
"""

from __future__ import annotations

import numpy as np

from ..._estimators import ABS, BY_CODE, K1, K2, K3, RK1, RK3
from .._contract import BLOCK, N_PARTIALS

_TAYLOR_N = 20
_TAYLOR_CUT = 0.5


def expm1_minus_x(l: np.ndarray) -> np.ndarray:
    """exp(l) - 1 - l in float64, accurate to a few ulp for every l."""
    l = np.asarray(l, dtype=np.float64)
    small = np.abs(l) < _TAYLOR_CUT
    ls = np.where(small, l, 0.0)
    # Horner: l**2 * (1/2! + l*(1/3! + l*(1/4! + ...)))
    acc = np.zeros_like(ls)
    fact = [1.0]
    for n in range(1, _TAYLOR_N + 3):
        fact.append(fact[-1] * n)
    for n in range(_TAYLOR_N + 1, 1, -1):
        acc = acc * ls + 1.0 / fact[n]
    series = acc * ls * ls
    with np.errstate(over="ignore", invalid="ignore"):
        direct = np.expm1(l) - l
    return np.where(small, series, direct)


def term_and_grad(l: np.ndarray, est: int, want_grad: bool = False):
    """Per-sample estimator term t(l) and, if asked, d t / d logq (float64 arrays)."""
    l = np.asarray(l, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if est == K1:
            t = -l
            g = np.ones_like(l)
        elif est == K2:
            t = 0.5 * l * l
            g = -l
        elif est == K3:
            e = expm1_minus_x(l)
            t = e
            g = -(e + l)  # -expm1(l), accurate near 0
        elif est == RK1:
            r = np.exp(l)
            t = r * l
            g = -r * (l + 1.0)
        elif est == RK3:
            e = expm1_minus_x(l)
            r = np.exp(l)
            t = np.where(l < -1.0, r * (l - 1.0) + 1.0, l * l + (l - 1.0) * e)
            g = -r * l
        elif est == ABS:
            t = np.abs(l)
            g = 0.0 - np.sign(l)  # (+0.0 at l = 0, as the compiled backends)
        else:  # pragma: no cover - the entry points check it first
            raise ValueError(f"unknown estimator code {est!r}")
        # a term is a function of the log-ratio alone; at l = +-inf take its limit
        # (e.g. k3 at l = -inf is +inf, not inf - inf)
        if est in (K3, RK3):
            t = np.where(np.isposinf(l), np.inf, t)
            t = np.where(np.isneginf(l), np.inf if est == K3 else 1.0, t)
        if est == RK1:
            t = np.where(np.isneginf(l), 0.0, t)
    return (t, g) if want_grad else t


def _check_est(est) -> int:
    """``est`` as a code of ``fastkl._estimators``; ValueError for an unknown one."""
    code = int(est)
    if code not in BY_CODE:
        raise ValueError(f"unknown estimator code {est!r}: the kernels know {sorted(BY_CODE)}")
    return code


def _prepared(logq, logp, mask, log_iw, est, clamp):
    """float64 (log-ratio, weighted term, weight) arrays for 2-D inputs."""
    l, t, _, w = _terms_grads(logq, logp, mask, log_iw, est, clamp, None)
    return l, t, w


def _terms_grads(logq, logp, mask, log_iw, est, clamp, iw_grad):
    """float64 (l, v, dv/dlogq, w) for 2-D inputs; the derivative is None when ``iw_grad``
    is None.

    ``clamp = (lr_lo, lr_hi, v_lo, v_hi, weighted)``, ``iw = exp(log_iw)`` (1 without it):

    * ``weighted == 0`` (``clamp_order="term"``): ``v = iw * clip(t(clip(l)))``;
    * ``weighted == 1`` (``"weighted"``, NeMo-RL): ``v = clip(iw * t(clip(l)))``.

    The derivative is autograd's of that formula (``clip`` passes the gradient where
    ``lo <= x <= hi``, inclusive, and 0 elsewhere and at NaN). In the "weighted" order, as in
    NeMo-RL's ``calculate_kl``, ``iw`` is also held constant where the log-ratio clamp bites,
    so such an element passes no gradient at all. ``iw_grad``: 0, ``iw`` is a constant; 1,
    ``log_iw = logq - log mu`` depends on ``logq`` (``d iw / d logq = iw``); 2, the
    derivative with respect to ``log_iw`` alone (``dv / dlog_iw``).
    """
    lr_lo, lr_hi, v_lo, v_hi, weighted = clamp
    want_g = iw_grad is not None
    with np.errstate(invalid="ignore", over="ignore"):
        l = logp.astype(np.float64) - logq.astype(np.float64)
        if lr_lo > -np.inf or lr_hi < np.inf:
            a = ((l >= lr_lo) & (l <= lr_hi)).astype(np.float64)
            l = np.where(np.isnan(l), l, np.clip(l, lr_lo, lr_hi))
        else:
            a = None
        t, g = term_and_grad(l, est, want_grad=True)
        iw = None if log_iw is None else np.exp(log_iw.astype(np.float64))
        clip_v = v_lo > -np.inf or v_hi < np.inf

        def clipped(x):  # (clip(x), [x inside the bounds])
            if not clip_v:
                return x, None
            return (np.where(np.isnan(x), x, np.clip(x, v_lo, v_hi)),
                    ((x >= v_lo) & (x <= v_hi)).astype(np.float64))

        d = None
        if weighted:
            s = t if iw is None else t * iw
            v, b = clipped(s)
            if want_g:
                d = t if iw_grad == 2 else (g + t if iw_grad else g)
                if iw is not None:
                    d = d * iw
                if b is not None:
                    d = np.where(b == 0, 0.0, d)
        else:
            u, b = clipped(t)
            v = u if iw is None else u * iw
            if want_g:
                d = g if b is None else np.where(b == 0, 0.0, g)
                if a is not None:  # the log-ratio clip's derivative
                    d = np.where(a == 0, 0.0, d)
                d = u if iw_grad == 2 else (d + u if iw_grad else d)
                if iw is not None:
                    d = d * iw
        if want_g and weighted and a is not None:  # NeMo-RL: iw detached where it bites
            d = np.where(a == 0, 0.0, d)
    w = np.ones(l.shape) if mask is None else mask.astype(np.float64)
    return l, v, d, w


def mc_terms(logq, logp, mask, log_iw, est, clamp, out):
    """out[...] = w * v (``_terms_grads``); 0 wherever w == 0."""
    _, t, w = _prepared(logq, logp, mask, log_iw, _check_est(est), clamp)
    with np.errstate(invalid="ignore"):
        out[...] = np.where(w == 0, 0.0, w * t)


def _block_partials(t, w, want_m2):
    rows, n = t.shape
    nblk = max(1, -(-n // BLOCK))
    pad = nblk * BLOCK - n
    bad = np.isnan(t) & (w != 0)
    keep = (w != 0) & ~bad
    wk = np.where(keep, w, 0.0)
    tk = np.where(keep, t, 0.0)
    shape = (rows, nblk, BLOCK)

    def blocks(a):
        return np.pad(a, ((0, 0), (0, pad))).reshape(shape)

    wb, tb = blocks(wk), blocks(tk)
    out = np.zeros((rows, nblk, N_PARTIALS))
    W = wb.sum(axis=-1)
    with np.errstate(invalid="ignore"):
        S = (wb * tb).sum(axis=-1)
    out[..., 0] = W
    out[..., 1] = S
    if want_m2:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(W > 0, S / W, 0.0)
            out[..., 2] = (wb * (tb - mean[..., None]) ** 2).sum(axis=-1)
    out[..., 3] = (wb * wb).sum(axis=-1)
    out[..., 4] = blocks(bad.astype(np.float64)).sum(axis=-1)
    out[..., 5] = blocks(keep.astype(np.float64)).sum(axis=-1)
    return out


def mc_partials(logq, logp, mask, log_iw, est, clamp, want_m2):
    """Per-block partials, shape [rows, nblk, N_PARTIALS] (see ``_contract``)."""
    _, t, w = _prepared(logq, logp, mask, log_iw, _check_est(est), clamp)
    return _block_partials(t, w, want_m2)


def mc_grad(logq, logp, mask, log_iw, est, clamp, iw_grad, rowscale, out_grad):
    """The partials of ``mc_partials(..., clamp, want_m2=False)`` (the same terms), and
    ``out_grad = rowscale * w * dv/dlogq`` (0 where ``w == 0``), with v and its derivative
    as ``_terms_grads`` defines them (``iw_grad`` 0, 1 or 2; 2: ``dv/dlog_iw``)."""
    est = _check_est(est)
    _, v, d, w = _terms_grads(logq, logp, mask, log_iw, est, clamp, int(iw_grad))
    with np.errstate(invalid="ignore", over="ignore"):
        out_grad[...] = np.where(w == 0, 0.0, d * w * rowscale[:, None])
    return _block_partials(v, w, False)
