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


def _grad_rows(ga, gb, rowscale, inv_t):
    """The gradients times ``rowscale[r] * inv_t``; rows with rowscale 0 are exact zeros."""
    k = (inv_t * rowscale)[:, None]
    with np.errstate(invalid="ignore"):
        return [None if g is None else np.where(k == 0, 0.0, g * k) for g in (ga, gb)]


def logits_grad(a, b, op, beta, inv_t, rowscale, out_val, grad_a, grad_b):
    """The op's value per row into ``out_val`` (float64 ``[rows]``, as ``logits_rows``) and
    ``rowscale[r] * inv_t *`` its gradient with respect to ``x = a*inv_t`` into ``grad_a``
    and to ``y = b*inv_t`` into ``grad_b`` (either None: not computed). With p = e^lp,
    q = e^lq, m = beta p + (1 - beta) q (docs/logits_math.md):

    * KL:      d/dx = p (lp - lq - KL),  d/dy = q - p
    * JSD:     d/dx = beta p (lp - lm - KL(P||M)),  d/dy = (1 - beta) q (lq - lm - KL(Q||M))
    * entropy: d/dx = -p (lp + H)   (``b`` ignored, ``grad_b`` None)

    An entry with p == 0 (q == 0 for the terms in q) contributes 0, never NaN; entries with
    lp == lq count lp - lm as 0 in JSD (identical rows: exact zeros). KL(P||M), KL(Q||M) and
    the KL in the formulas are the unclipped sums. A row whose value is NaN has NaN
    gradients throughout; rows with rowscale 0 get zeros."""
    if op not in (OP_KL, OP_JSD, OP_ENTROPY):
        raise ValueError(f"unknown logits op code {op!r}: the kernels know {LOGITS_OPS}")
    logits_rows(a, b, op, beta, inv_t, False, None, out_val)
    x, lza = _shifted(a, inv_t, False)
    logp = x - lza[:, None]
    p = np.exp(logp)
    ga = gb = None
    with np.errstate(invalid="ignore", divide="ignore"):
        if op == OP_ENTROPY:
            h = -_xlogy_diff(p, logp, 0.0)
            ga = np.where(p == 0, 0.0, -p * (logp + h[:, None]))
        else:
            y, lzb = _shifted(b, inv_t, False)
            logq = y - lzb[:, None]
            q = np.exp(logq)
            if op == OP_KL:
                kl = _xlogy_diff(p, logp, logq)
                ga = np.where(p == 0, 0.0, p * ((logp - logq) - kl[:, None]))
                gb = q - p
            else:  # OP_JSD
                logm = np.logaddexp(np.log(beta) + logp, np.log1p(-beta) + logq)
                same = logp == logq
                dp = np.where(same, 0.0, logp - logm)
                dq = np.where(same, 0.0, logq - logm)
                kp = np.sum(np.where(p == 0, 0.0, p * dp), axis=1)
                kq = np.sum(np.where(q == 0, 0.0, q * dq), axis=1)
                ga = np.where(p == 0, 0.0, beta * p * (dp - kp[:, None]))
                gb = np.where(q == 0, 0.0, (1.0 - beta) * q * (dq - kq[:, None]))
                # beta = 0 (1): p (q) carries no weight and M = Q (P): both gradients are 0
                if beta in (0.0, 1.0):
                    ga = np.zeros_like(p)
                    gb = np.zeros_like(q)
    # a NaN row (NaN or +inf logits, no probability mass) has NaN gradients throughout
    nan = np.isnan(out_val)[:, None]
    ga, gb = (None if g is None else np.where(nan, np.nan, g) for g in (ga, gb))
    ga, gb = _grad_rows(ga, gb, rowscale, inv_t)
    if grad_a is not None:
        grad_a[...] = ga
    if grad_b is not None:
        grad_b[...] = gb


def logits_token_grad(b, tokens, inv_t, ignore_index, rowscale, out_val, grad_b):
    """``logits_token`` into ``out_val``, and into ``grad_b`` ``rowscale[r] * inv_t *
    (onehot(tokens[r]) - Q)``, the gradient of log Q[r, tokens[r]] with respect to ``b``;
    rows with tokens == ignore_index (or rowscale 0) get zeros."""
    logits_token(b, tokens, inv_t, ignore_index, out_val)
    y, lzb = _shifted(b, inv_t, False)
    g = -np.exp(y - lzb[:, None])
    keep = tokens != ignore_index
    rows = np.arange(b.shape[0])[keep]
    g[rows, tokens[keep]] += 1.0
    g = np.where(keep[:, None], np.where(np.isnan(out_val)[:, None], np.nan, g), 0.0)
    (gb,) = _grad_rows(g, None, rowscale, inv_t)[:1]
    grad_b[...] = gb
