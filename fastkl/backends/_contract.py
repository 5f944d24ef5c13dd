"""The kernel contract every backend implements (the numpy reference is its spec).

All arrays handed to a kernel are already validated and shaped by the public layer:

* ``logq``, ``logp``: 2-D ``[rows, n]``, same shape, same dtype (float32 or float64),
  native byte order, any strides (negative included).
* ``mask``: ``None`` or 2-D same shape, dtype ``uint8`` (a viewed bool mask) or float64
  weights (finite, >= 0).
* ``log_iw``: ``None`` or 2-D same shape, same dtype as ``logq``.
* ``est``: an estimator code from ``EST_CODES``.
* ``clamp``: ``(lr_lo, lr_hi, v_lo, v_hi)`` floats; +-inf when not clamping.

Functions:

``mc_terms(logq, logp, mask, log_iw, est, clamp, out) -> None``
    ``out`` (C-contiguous ``[rows, n]``, float32 for float32 inputs, float64 for float64)
    receives ``w * exp(log_iw) * clip(t(clip(l, lr_lo, lr_hi)), v_lo, v_hi)``, exactly 0.0
    wherever ``w == 0`` (a NaN or inf there is ignored).

``mc_partials(logq, logp, mask, log_iw, est, clamp, want_m2) -> float64 [rows, nblk, 6]``
    Each row is cut into blocks of ``BLOCK`` consecutive elements (``nblk = max(1,
    ceil(n / BLOCK))``; blocks never straddle rows). Per block, over the *included* elements
    (``w != 0`` and term not NaN), with ``t`` the term of ``mc_terms`` before the weight:
    ``[0] W = sum w``, ``[1] S = sum w*t``, ``[2] M2 = sum w*(t - S/W)**2`` (0.0 unless
    ``want_m2``; 0.0 when ``W == 0``), ``[3] sum w**2``, ``[4]`` the number of NaN terms with
    ``w != 0`` (excluded from the others), ``[5]`` the number of included elements.
    Which thread computes which block never changes the bits: the public layer merges
    blocks in order.

``mc_grad(logq, logp, mask, log_iw, est, rowscale, out_grad) -> partials``
    Unclamped terms. ``out_grad`` (like ``out``) receives ``rowscale[row] * w *
    exp(log_iw) * dt/dlogq`` (0.0 where ``w == 0``); returns ``mc_partials(..., want_m2=
    False)`` of the same terms.

Backends must agree with the reference to the per-term tolerance of the public docs.
"""

BLOCK = 4096  # elements per partial; fixed so results never depend on the thread count
N_PARTIALS = 6

# (estimator, reverse) -> code, shared by every backend
EST_CODES = {("k1", False): 0, ("k2", False): 1, ("k3", False): 2, ("k1", True): 3, ("k3", True): 4}
