"""The logits half of the reference backend: plain numpy, written to be read.

The specification of the logits part of the kernel contract (``backends/_contract.py``,
bottom half); ``docs/logits_math.md`` has the derivations.
"""

from __future__ import annotations

import numpy as np

from .._contract import LOGITS_OPS

OP_KL = LOGITS_OPS["kl"]
OP_JSD = LOGITS_OPS["jsd"]
OP_ENTROPY = LOGITS_OPS["entropy"]

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
    """Per-row value into ``out`` (float64 ``[rows]``): ``OP_KL`` KL(P||Q), ``OP_JSD``
    JSD_beta(P, Q), ``OP_ENTROPY`` entropy of P (``b`` ignored). Rows with ``active[r] == 0``
    get 0.0 (``active`` None: all rows)."""
    if op not in (OP_KL, OP_JSD, OP_ENTROPY):
        raise ValueError(f"unknown logits op code {op!r}: the kernels know {LOGITS_OPS}")
    x, lza = _shifted(a, inv_t, log_probs)
    logp = x - lza[:, None]
    p = np.exp(logp)
    # a row without probability mass (all -inf, also as log-probabilities) is no distribution
    empty = np.sum(p, axis=1) == 0
    if op == OP_ENTROPY:
        val = -_xlogy_diff(p, logp, 0.0)
    else:
        y, lzb = _shifted(b, inv_t, log_probs)
        logq = y - lzb[:, None]
        q = np.exp(logq)
        empty |= np.sum(q, axis=1) == 0
        if op == OP_KL:
            val = _xlogy_diff(p, logp, logq)
        else:  # OP_JSD
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
    logits_rows(a, b, OP_KL, 0.5, inv_t, False, None, out_val)
    x, lza = _shifted(a, inv_t, False)
    y, lzb = _shifted(b, inv_t, False)
    g = (np.exp(y - lzb[:, None]) - np.exp(x - lza[:, None])) * (inv_t * rowscale[:, None])
    out_grad[...] = np.where(rowscale[:, None] == 0, 0.0, g)
