"""llama.cpp's ``llama-perplexity --kl-divergence`` arithmetic, per row, in numpy.

What ``compare_logits`` computes when the base is a llama.cpp ``--kl-divergence-base`` file
(op "kl", temperature 1), written from ``tools/perplexity/perplexity.cpp`` (the
``log_softmax`` overload that takes the base row, ``kl_divergence``); see
docs/llama_compat.md. float32 where llama.cpp computes in ``float``, float64 where it uses
``double``; C's ``expf`` is emulated by a float64 exp rounded to float32.
"""

from __future__ import annotations

import numpy as np

FLOOR = np.float32(-16.0)  # llama.cpp counts base entries with log p > -16 only


def expf(x: np.ndarray) -> np.ndarray:
    """float32 exp as C's ``expf`` gives it (correctly rounded but for rare ties); numpy's own
    float32 exp is 1-2 ulp off on about a third of the inputs. float64 input: ``np.exp``."""
    if x.dtype == np.float64:
        return np.exp(x)
    return np.exp(x.astype(np.float64)).astype(np.float32)


def kl_rows(base_logp: np.ndarray, test: np.ndarray, test_is_logprob: bool,
            tokens: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-row llama.cpp statistics of base log-probabilities ``base_logp`` (float32
    ``[rows, V]``, decoded ``scale * q + min_log_prob``, not floored) against the test
    ``test`` ([rows, V] float32 logits, or float64 computed alike in float64; with
    ``test_is_logprob`` the decoded log-probabilities of a second base file, used as they
    are: no max, no log-sum-exp).

    Returns float64 ``kld`` (``sum over log p_base > -16 of p_base * (log p_base - log q)``,
    the base mass not renormalized, negative values kept), bool ``same_top`` (first argmax
    of test = first argmax of base) and, with ``tokens`` (int, every row a token),
    ``nll`` = -log q(tok), ``nll_base`` = -log p_base(tok), ``p_diff`` = q(tok) - p(tok)
    in the test's float type.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # inf/NaN logits
        return _kl_rows(base_logp, test, test_is_logprob, tokens)


def _kl_rows(base_logp, test, test_is_logprob, tokens):
    ft = np.float64 if test.dtype == np.float64 else np.float32
    t = test.astype(ft, copy=False)
    lb = base_logp.astype(ft, copy=False)
    rows = t.shape[0]
    if test_is_logprob:
        shift = np.zeros(rows, dtype=ft)
    else:
        mx = t.max(axis=1)
        sum_exp = expf(t - mx[:, None]).sum(axis=1, dtype=np.float64)
        lse = np.log(sum_exp).astype(ft)
        shift = mx + lse  # max_logit + log_sum_exp, in float
    pb = expf(lb)
    term = pb * ((lb - t) + shift[:, None])
    term[~(lb > ft(FLOOR))] = 0
    out = {"kld": term.sum(axis=1, dtype=np.float64),
           "same_top": np.argmax(t, axis=1) == np.argmax(lb, axis=1)}
    if tokens is not None:
        r = np.arange(rows)
        nll = shift - t[r, tokens]
        nll_base = -lb[r, tokens]
        out.update(nll=nll, nll_base=nll_base, p_diff=expf(-nll) - expf(-nll_base))
    return out


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's ``percentile`` of ascending float32 values: ``p = fraction * (n - 1)`` and
    ``(1 - p') v[i] + p' v[i + 1]`` (``i = int(p)``, ``p' = p - i``), all in float32."""
    v = sorted_values
    f32 = np.float32
    fr = f32(fraction)
    if fr <= 0:
        return float(v[0])
    if fr >= 1:
        return float(v[-1])
    p = fr * f32(v.size - 1)
    ip = int(p)
    p = p - f32(ip)
    lo, hi = v[ip], v[min(ip + 1, v.size - 1)]
    if not (np.isfinite(lo) and np.isfinite(hi)) and (p == 0 or lo == hi):
        return float(lo)  # an infinite row value: no 0 * inf in the interpolation
    with np.errstate(invalid="ignore", over="ignore"):
        return float((f32(1) - p) * lo + p * hi)


def median(sorted_values: np.ndarray) -> float:
    """llama.cpp's median: the middle value, or ``0.5f * (a + b)`` of the middle two."""
    v = sorted_values
    n = v.size
    if n % 2:
        return float(v[n // 2])
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1]))
