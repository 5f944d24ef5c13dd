"""The kernel contract every backend implements (the numpy reference is its spec).

All arrays handed to a kernel are already validated and shaped by the public layer:

* ``logq``, ``logp``: 2-D ``[rows, n]``, same shape, same dtype (float32 or float64, or a
  16-bit float: numpy ``float16`` or ``ml_dtypes.bfloat16``, dtype name "bfloat16"),
  native byte order, any strides (negative included). A 16-bit input is read in place (no
  converted copy) and widened to float32 exactly, element by element: the results are those
  of float32 inputs holding the widened values (float32 ``out``, float64 partials). The
  numpy reference converts (``astype``); the compiled backends read the raw bits (bfloat16:
  ``bits << 16``; float16: rebiased exponent, subnormals and inf/NaN kept). The public layer
  hands over 16-bit inputs only when ``logq`` and ``logp`` share that dtype (mixed dtypes
  are converted to float32 first).
* ``mask``: ``None`` or 2-D same shape, dtype ``uint8`` (a viewed bool mask) or float64
  weights (finite, >= 0).
* ``log_iw``: ``None`` or 2-D same shape, same dtype as ``logq`` (or float32 when ``logq``
  is 16-bit).
* ``est``: an estimator code from ``EST_CODES``.
* ``clamp``: ``(lr_lo, lr_hi, v_lo, v_hi, weighted)``: bounds (+-inf when not clamping) and
  the order flag: with ``iw = exp(log_iw)`` (1 without it) the weighted term is
  ``v = iw * clip(t(clip(l, lr_lo, lr_hi)), v_lo, v_hi)`` for ``weighted == 0`` and
  ``v = clip(iw * t(clip(l, lr_lo, lr_hi)), v_lo, v_hi)`` for ``weighted == 1``.

Functions:

``mc_terms(logq, logp, mask, log_iw, est, clamp, out) -> None``
    ``out`` (C-contiguous ``[rows, n]``, float32 for float32 and 16-bit inputs, float64 for
    float64)
    receives ``w * v``, exactly 0.0 wherever ``w == 0`` (a NaN or inf there is ignored).

``mc_partials(logq, logp, mask, log_iw, est, clamp, want_m2) -> float64 [rows, nblk, 6]``
    Each row is cut into blocks of ``BLOCK`` consecutive elements (``nblk = max(1,
    ceil(n / BLOCK))``; blocks never straddle rows). Per block, over the *included* elements
    (``w != 0`` and term not NaN), with ``t`` the term ``v`` of ``mc_terms`` before ``w``:
    ``[0] W = sum w``, ``[1] S = sum w*t``, ``[2] M2 = sum w*(t - S/W)**2`` (0.0 unless
    ``want_m2``; 0.0 when ``W == 0``), ``[3] sum w**2``, ``[4]`` the number of NaN terms with
    ``w != 0`` (excluded from the others), ``[5]`` the number of included elements.
    Which thread computes which block never changes the bits: the public layer merges
    blocks in order.

``mc_grad(logq, logp, mask, log_iw, est, clamp, iw_grad, rowscale, out_grad) -> partials``
    ``out_grad`` (like ``out``) receives ``rowscale[row] * w * dv/dlogq`` (0.0 where
    ``w == 0``); returns ``mc_partials(..., clamp, want_m2=False)`` of the same terms. The
    derivative is autograd's of ``v``: a clip passes it where its input is inside the
    bounds (inclusive) and gives 0 where it bites or the input is NaN; with ``weighted``,
    where the log-ratio clip bites the whole derivative is 0 (``iw`` is held constant
    there too, as NeMo-RL's ``calculate_kl``). ``iw_grad``:
    0, ``iw`` is a constant; 1, ``log_iw`` depends on ``logq`` (``d iw / d logq = iw``);
    2, the derivative with respect to ``log_iw`` alone. (``numpy/mc.py``'s
    ``_terms_grads`` is the specification.)

Backends must agree with the reference to the per-term tolerance of the public docs.
"""

from .._estimators import ESTIMATORS

BLOCK = 4096  # elements per partial; fixed so results never depend on the thread count
N_PARTIALS = 6

# (estimator, reverse) -> code, shared by every backend; the rows live in ``fastkl._estimators``
EST_CODES = {(e.name, e.reverse): e.code for e in ESTIMATORS}

# ---------------------------------------------------------------------------------------
# Full-distribution (logits) ops. Rows of the vocabulary: ``a`` (P) and ``b`` (Q) are 2-D
# ``[rows, V]`` (V >= 1), same shape, same dtype (float32 or float64), native byte order, any
# strides; ``inv_t = 1 / temperature`` (finite, > 0). With ``x = a*inv_t - max_row(a*inv_t)``,
# ``ZA = sum exp(x)`` (and y, ZB for b): ``log P = x - log ZA``, ``log Q = y - log ZB``.
# ``log_probs=True`` with ``inv_t == 1``: rows are already log-probabilities, log P = a
# (no max, no normaliser); with ``inv_t != 1`` they are renormalised like logits.
# A -inf logit is a zero probability: it contributes 0 where P (resp. Q, M) is 0, and KL is
# +inf where P > 0 = Q. A row of all -inf (or any NaN) gives NaN. KL and JSD are clipped
# at 0 from below (rounding noise); identical rows give exactly 0.0. Each row is computed
# by one thread in a fixed order, so the bits never depend on the thread count.
#
# ``logits_rows(a, b, op, beta, inv_t, log_probs, active, out) -> None``
#     ``out`` float64 ``[rows]``: op 0 = KL(P||Q), 1 = JSD_beta = beta KL(P||M) +
#     (1 - beta) KL(Q||M) with M = beta P + (1 - beta) Q (0.0 for beta in {0, 1} unless
#     NaN), 2 = entropy -sum P log P (``b`` is ignored; pass ``a``). ``active``: None or
#     uint8 ``[rows]``; rows with 0 are skipped and get 0.0.
# ``logits_token(b, tokens, inv_t, ignore_index, out) -> None``
#     ``out[r]`` float64 = log Q[r, tokens[r]]; 0.0 where ``tokens[r] == ignore_index``.
#     ``tokens`` int64 ``[rows]``, every other value in [0, V).
# ``logits_grad(a, b, op, beta, inv_t, rowscale, out_val, grad_a, grad_b) -> None``
#     ``out_val`` float64 ``[rows]`` = the op's row value (as ``logits_rows``, every row
#     active, ``log_probs`` False); ``grad_a`` / ``grad_b``: None (not computed, nothing
#     paid for it) or C-contiguous ``[rows, V]`` (dtype of the inputs) receiving
#     ``rowscale[r] * inv_t * d value_r / d x`` (resp. ``d / d y``), x = a*inv_t, y = b*inv_t:
#     KL: ``p (lp - lq - KL)`` and ``q - p``; JSD: ``beta p (lp - lm - KL(P||M))`` and
#     ``(1 - beta) q (lq - lm - KL(Q||M))`` (lp - lm, lq - lm taken as 0 where lp == lq; both 0
#     at beta in {0, 1}); entropy: ``-p (lp + H)`` (``b`` is ``a``, ``grad_b`` None). An entry
#     with zero probability gives 0 (never NaN); a NaN row is all NaN; rows with rowscale 0
#     are zeros (their value is still computed). docs/logits_math.md has the derivations.
# ``logits_token_grad(b, tokens, inv_t, ignore_index, rowscale, out_val, grad_b) -> None``
#     ``out_val`` as ``logits_token``; ``grad_b`` C-contiguous ``[rows, V]`` = ``rowscale[r] *
#     inv_t * (onehot(tokens[r]) - Q)``; zeros where ``tokens[r] == ignore_index``.

LOGITS_OPS = {"kl": 0, "jsd": 1, "entropy": 2}
