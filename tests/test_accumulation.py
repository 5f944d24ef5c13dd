"""float64 accumulation and thread-count invariance of the Monte Carlo functions (issue 15).

* float32 inputs: ``l = float64(logp) - float64(logq)`` is exact when the two are of
  different magnitudes, and a sum of same-sign terms accumulated in float64 is within
  ~1e-14 of the exactly rounded sum; a float32 subtraction (or float32 accumulation) drifts
  by 1e-8..1e-7. So sums and means are compared with ``math.fsum`` of the exact float64
  terms at 1e-12 relative, for unaligned starts, strided rows, masks, several blocks.
* Same bits for 1, 2 and 3 threads (numba: ``numba.set_num_threads``; Cython: OpenMP's
  ``omp_set_num_threads`` of the libgomp the extension loaded), for ``kl_mc`` (every
  reduction), ``kl_mc_stats``, ``kl_mc_grad`` and the logits ops.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
from gaps_util import BACKENDS, COMPILED

import fastkl

N = 3 * 4096 + 517  # several blocks of the contract, a ragged tail


def _f32_inputs(offset: int, seed: int = 1, scale: float = 1.0):
    """float32 logq ~ -U(0.1, 2), logp ~ -scale U(20, 60): l in (-60 scale, -18 scale),
    exactly representable in float64 but not in float32 (a float32 subtraction rounds it, by
    up to 2e-6 scale); scale 30 puts most |l| beyond 700 (the kernels' libm lanes)."""
    rng = np.random.default_rng(seed)
    q = np.empty(N + 8, np.float32)
    p = np.empty(N + 8, np.float32)
    q[offset : offset + N] = -rng.uniform(0.1, 2.0, N)
    p[offset : offset + N] = -rng.uniform(20.0, 60.0, N) * scale
    return q[offset : offset + N], p[offset : offset + N]  # starts off 16-byte alignment


def _exact_terms(q, p, est):
    l = p.astype(np.float64) - q.astype(np.float64)  # exact (both float32)
    assert np.array_equal((l + q.astype(np.float64)).astype(np.float32), p)
    if est == "k1":
        return -l
    if est == "k2":
        return 0.5 * l * l
    return np.expm1(l) - l  # l <= -18: expm1 is -1 + e^l, no cancellation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset,scale", [(0, 1.0), (1, 1.0), (3, 1.0), (1, 30.0)])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_float32_sums_are_float64_exact(backend, offset, scale, est):
    q, p = _f32_inputs(offset, scale=scale)
    t = _exact_terms(q, p, est)
    ref_sum = math.fsum(t)
    ref_mean = ref_sum / t.size
    what = f"{backend} {est} offset={offset} scale={scale}"
    got = fastkl.kl_mc(q, p, est, reduction="sum", backend=backend)
    assert abs(got - ref_sum) <= 1e-12 * abs(ref_sum), (what, got, ref_sum)
    got = fastkl.kl_mc(q, p, est, backend=backend)
    assert abs(got - ref_mean) <= 1e-12 * abs(ref_mean), (what, got, ref_mean)
    st = fastkl.kl_mc_stats(q, p, est, backend=backend)
    assert abs(st.mean - ref_mean) <= 1e-12 * abs(ref_mean), (what, st.mean, ref_mean)
    sd = float(np.std(t, ddof=1))
    assert abs(st.std - sd) <= 1e-9 * sd, (what, st.std, sd)
    # the fused gradient pass reports the same value
    v, _ = fastkl.kl_mc_grad(q, p, est, reduction="sum", backend=backend)
    assert abs(v - ref_sum) <= 1e-12 * abs(ref_sum), (what, v, ref_sum)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_strided_masked_rows(backend):
    """The strided load and the weighted accumulators, per row (axis=1) and RL reductions."""
    q, p = _f32_inputs(1, seed=2)
    q2 = np.stack([q, q[::-1]])
    p2 = np.stack([p, p[::-1]])
    qs, ps = q2[:, ::2], p2[:, ::2]
    w = np.where(np.arange(qs.shape[1]) % 5 == 0, 0.0, 1.5)
    w = np.stack([w, w[::-1]])
    for est in ("k1", "k3"):
        t = _exact_terms(qs, ps, est)
        ref = np.array([math.fsum(r) for r in t * w])
        got = fastkl.kl_mc(qs, ps, est, reduction="sum", axis=1, mask=w, backend=backend)
        assert np.all(np.abs(got - ref) <= 1e-12 * np.abs(ref)), (backend, est, got, ref)
        ref_m = float(np.mean(ref / w.sum(axis=1)))
        got_m = fastkl.kl_mc(qs, ps, est, reduction="seq-mean-token-mean", mask=w,
                             backend=backend)
        assert abs(got_m - ref_m) <= 1e-12 * abs(ref_m), (backend, est, got_m, ref_m)


# --------------------------------------------------------------------------- threads


def _libgomp():
    """The OpenMP runtime the Cython extension loaded (None if none)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libgomp" in ln or "libomp" in ln}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


class _Threads:
    """Context setting the number of threads a backend's kernels use."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "numba":
            import numba

            self.numba = numba
            if numba.config.NUMBA_NUM_THREADS < 3:
                pytest.skip("numba's pool has fewer than 3 threads (NUMBA_NUM_THREADS < 3)")
            self.saved = numba.get_num_threads()
        else:
            from fastkl.backends.cython import _mc as _cython_kernels

            if not _cython_kernels.openmp():
                pytest.skip("the Cython extension was built without OpenMP")
            self.lib = _libgomp()
            if self.lib is None:
                pytest.skip("OpenMP runtime not found in this process")
            self.kern = _cython_kernels
            self.saved = _cython_kernels.max_threads()

    def set(self, k: int) -> None:
        if self.backend == "numba":
            self.numba.set_num_threads(k)
            assert self.numba.get_num_threads() == k
        else:
            self.lib.omp_set_num_threads(k)
            assert self.kern.max_threads() == k

    def restore(self) -> None:
        self.set(self.saved)


def _bits(x) -> bytes:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64)).tobytes()


def _mc_results(backend: str) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(9)
    shape = (6, 13001)  # 78,006 elements: above both backends' parallel thresholds
    q = rng.normal(0.0, 1.0, shape)
    p = q + rng.normal(0.0, 0.8, shape)
    mask = rng.random(shape) < 0.8
    iw = rng.normal(0.0, 0.3, shape)
    q32, p32 = q.astype(np.float32), p.astype(np.float32)
    out = []
    for est, rev in (("k1", False), ("k3", False), ("k3", True)):
        for red in ("mean", "sum", "none", "seq-mean-token-mean", "seq-mean-token-sum"):
            kw = dict(reverse=rev, reduction=red, mask=mask, log_iw=iw, backend=backend)
            out.append((f"kl_mc {est} {rev} {red}", _bits(fastkl.kl_mc(q, p, est, **kw))))
            v, g = fastkl.kl_mc_grad(q32, p32, est, **kw)
            out.append((f"kl_mc_grad {est} {rev} {red}", _bits(v) + _bits(g)))
        out.append((f"kl_mc axis=1 {est}",
                    _bits(fastkl.kl_mc(q32, p32, est, reverse=rev, axis=1, backend=backend))))
        for m in (None, mask):
            st = fastkl.kl_mc_stats(q, p, est, reverse=rev, mask=m, backend=backend)
            out.append((f"kl_mc_stats {est} {rev} mask={m is not None}",
                        _bits([st.mean, st.std, st.sem, st.n, *st.ci95])))
    a = rng.normal(0.0, 2.0, (48, 1700))
    b = a + rng.normal(0.0, 0.5, a.shape)
    out.append(("kl_logits", _bits(fastkl.kl_logits(a, b, temperature=0.7, backend=backend))))
    out.append(("jsd_logits", _bits(fastkl.jsd_logits(a, b, 0.3, backend=backend))))
    v, g = fastkl.kl_logits_grad(a, b, backend=backend)
    out.append(("kl_logits_grad", _bits(v) + _bits(g)))
    return out


@pytest.mark.parametrize("backend", COMPILED)
def test_same_bits_for_1_2_3_threads(backend):
    th = _Threads(backend)
    try:
        runs = {}
        for k in (1, 2, 3, 1):
            th.set(k)
            runs.setdefault(k, []).append(_mc_results(backend))
    finally:
        th.restore()
    first = runs[1][0]
    for k, results in runs.items():
        for res in results:
            for (name, b0), (_, b1) in zip(first, res, strict=True):
                assert b0 == b1, f"{backend}: {name} differs between 1 and {k} threads"
