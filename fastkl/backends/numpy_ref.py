"""The reference backend: plain numpy, written to be read, never optimized.

This module *is* the specification of the kernel contract (see ``backends/__init__.py``).
Every compiled backend is tested against it.

Notation: samples x ~ q, ``l = logp - logq = log r``.

=========  ===========  =============================  =====================
code       target       term t(l)                      d t / d logq
=========  ===========  =============================  =====================
0 (k1)     KL(q||p)     -l                             1
1 (k2)     KL(q||p)     l**2 / 2                       -l
2 (k3)     KL(q||p)     expm1(l) - l                   -expm1(l)
3 (rk1)    KL(p||q)     r * l                          -r * (l + 1)
4 (rk3)    KL(p||q)     r * l - expm1(l)               -r * l
=========  ===========  =============================  =====================

Numerics (float64 throughout):

* ``E(l) = exp(l) - 1 - l`` cancels catastrophically for small |l|; below |l| < 0.5 it is
  the Taylor series sum_{n>=2} l**n / n! (20 terms: truncation < 1e-22 relative), above it
  ``expm1(l) - l`` (cancellation at most a factor ~5 there).
* reverse k3 ``r*l - (r - 1)`` is written ``l**2 + (l - 1) * E(l)`` (cancellation at most a
  factor 2 near 0), and ``exp(l) * (l - 1) + 1`` for l < -1 where the first form cancels.
"""

from __future__ import annotations

import numpy as np

from ._contract import BLOCK, N_PARTIALS

name = "numpy"

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
        if est == 0:
            t = -l
            g = np.ones_like(l)
        elif est == 1:
            t = 0.5 * l * l
            g = -l
        elif est == 2:
            e = expm1_minus_x(l)
            t = e
            g = -(e + l)  # -expm1(l), accurate near 0
        elif est == 3:
            r = np.exp(l)
            t = r * l
            g = -r * (l + 1.0)
        elif est == 4:
            e = expm1_minus_x(l)
            r = np.exp(l)
            t = np.where(l < -1.0, r * (l - 1.0) + 1.0, l * l + (l - 1.0) * e)
            g = -r * l
        else:  # pragma: no cover - the public layer validates
            raise ValueError(f"unknown estimator code {est}")
        # a term is a function of the log-ratio alone; at l = +-inf take its limit
        # (e.g. k3 at l = -inf is +inf, not inf - inf)
        if est in (2, 4):
            t = np.where(np.isposinf(l), np.inf, t)
            t = np.where(np.isneginf(l), np.inf if est == 2 else 1.0, t)
        if est == 3:
            t = np.where(np.isneginf(l), 0.0, t)
    return (t, g) if want_grad else t


def _prepared(logq, logp, mask, log_iw, est, clamp):
    """float64 (term, weight, importance weight) arrays for 2-D inputs."""
    lr_lo, lr_hi, v_lo, v_hi = clamp
    l = logp.astype(np.float64) - logq.astype(np.float64)
    l = np.where(np.isnan(l), l, np.clip(l, lr_lo, lr_hi))
    t = term_and_grad(l, est)
    t = np.where(np.isnan(t), t, np.clip(t, v_lo, v_hi))
    if log_iw is not None:
        with np.errstate(invalid="ignore"):
            t = t * np.exp(log_iw.astype(np.float64))
    w = np.ones(l.shape) if mask is None else mask.astype(np.float64)
    return l, t, w


def mc_terms(logq, logp, mask, log_iw, est, clamp, out):
    """out[...] = w * exp(log_iw) * clamp_v(t(clamp_lr(l))); 0 wherever w == 0."""
    _, t, w = _prepared(logq, logp, mask, log_iw, est, clamp)
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
    _, t, w = _prepared(logq, logp, mask, log_iw, est, clamp)
    return _block_partials(t, w, want_m2)


def mc_grad(logq, logp, mask, log_iw, est, rowscale, out_grad):
    """Partials of the unclamped terms, and out_grad = rowscale * w * exp(log_iw) * dt/dlogq."""
    l = logp.astype(np.float64) - logq.astype(np.float64)
    t, g = term_and_grad(l, est, want_grad=True)
    w = np.ones(l.shape) if mask is None else mask.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        if log_iw is not None:
            iw = np.exp(log_iw.astype(np.float64))
            t = t * iw
            g = g * iw
        out_grad[...] = np.where(w == 0, 0.0, g * w * rowscale[:, None])
    return _block_partials(t, w, False)


# --------------------------------------------------------------------------- logits ops
#
# Rows of logits ``a`` (P) and ``b`` (Q), 2-D ``[rows, V]``; ``x = a/T - max(a/T)``,
# ``y = b/T - max(b/T)``, ``ZA = sum exp(x)``, ``ZB = sum exp(y)``, so that
# ``log P = x - log ZA`` and ``log Q = y - log ZB``. Written in these shifted variables, every
# sum is of quantities that vanish when P == Q, so identical rows give exactly 0.0.


def _shifted(a, inv_t, log_probs):
    """(x, log Z) per row in float64: x = a/T - max(a/T), log Z = log sum exp(x).

    ``log_probs`` with T == 1: the row is already log P, so x = a and log Z = 0 (no
    normalisation); with T != 1 the tempered row must be renormalised all the same."""
    x = a.astype(np.float64) * inv_t
    if log_probs and inv_t == 1.0:
        return x, np.zeros(x.shape[0])
    m = np.max(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        x = x - m
    with np.errstate(divide="ignore"):
        return x, np.log(np.sum(np.exp(x), axis=1))


def _xlogy_diff(p, u, v):
    """sum over a row of p * (u - v), counting 0 where p == 0 (a -inf logit)."""
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p == 0, 0.0, p * (u - v)), axis=1)


def logits_rows(a, b, op, beta, inv_t, log_probs, active, out):
    """Per-row value into ``out`` (float64 ``[rows]``): op 0 KL(P||Q), 1 JSD_beta(P, Q),
    2 entropy of P (``b`` ignored). Rows with ``active[r] == 0`` get 0.0 (``active`` None:
    all rows)."""
    x, lza = _shifted(a, inv_t, log_probs)
    logp = x - lza[:, None]
    p = np.exp(logp)
    # a row without probability mass (all -inf, also as log-probabilities) is no distribution
    empty = np.sum(p, axis=1) == 0
    if op == 2:
        val = -_xlogy_diff(p, logp, 0.0)
    else:
        y, lzb = _shifted(b, inv_t, log_probs)
        logq = y - lzb[:, None]
        q = np.exp(logq)
        empty |= np.sum(q, axis=1) == 0
        if op == 0:
            val = _xlogy_diff(p, logp, logq)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):  # log 0 = -inf; NaN rows
                logm = np.logaddexp(np.log(beta) + logp, np.log1p(-beta) + logq)
            same = logp == logq  # exactly 0 there, so identical rows give exactly 0.0
            sp = _xlogy_diff(np.where(same, 0.0, p), logp, logm)
            sq = _xlogy_diff(np.where(same, 0.0, q), logq, logm)
            # a zero weight drops its sum (KL(P||Q) may be +inf where beta = 0)
            val = (0.0 if beta == 0.0 else beta * sp) + (0.0 if beta == 1.0 else (1.0 - beta) * sq)
            if beta in (0.0, 1.0):  # JSD_0 = KL(Q||Q), JSD_1 = KL(P||P): 0 unless NaN
                val = np.where(np.isnan(val), val, 0.0)
        with np.errstate(invalid="ignore"):
            val = np.where(val < 0, 0.0, val)  # rounding noise only: KL, JSD >= 0
    val = np.where(empty, np.nan, val)
    if active is not None:
        val = np.where(active != 0, val, 0.0)
    out[...] = val


def logits_token(b, tokens, inv_t, ignore_index, out):
    """out[r] = log softmax(b[r]/T)[tokens[r]] (float64), 0.0 where tokens == ignore_index.
    ``tokens`` are int64, validated in range by the public layer."""
    y, lzb = _shifted(b, inv_t, False)
    keep = tokens != ignore_index
    idx = np.where(keep, tokens, 0)
    val = np.take_along_axis(y, idx[:, None], axis=1)[:, 0] - lzb
    out[...] = np.where(keep, val, 0.0)


def logits_kl_grad(a, b, inv_t, rowscale, out_val, out_grad):
    """out_val[r] = KL(P||Q) per row (float64); out_grad = rowscale[r] * (Q - P) / T,
    the gradient with respect to ``b`` (rows with rowscale 0 get zeros)."""
    logits_rows(a, b, 0, 0.5, inv_t, False, None, out_val)
    x, lza = _shifted(a, inv_t, False)
    y, lzb = _shifted(b, inv_t, False)
    g = (np.exp(y - lzb[:, None]) - np.exp(x - lza[:, None])) * (inv_t * rowscale[:, None])
    out_grad[...] = np.where(rowscale[:, None] == 0, 0.0, g)
