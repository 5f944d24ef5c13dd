"""float64 accumulation and thread-count invariance of the Monte Carlo functions (issue 15).

* float32 inputs: the float32 lanes (issue 12) round each term to float32 (within
  ``1e-6 * max(1, |l|)`` of the exact term: ``test_numerics.py``), so exactness is tested
  where the terms are exact in float32: dyadic inputs whose float64 sums are exact and whose
  float32 block sums are not (``sum`` equal to ``math.fsum`` bit for bit); k3 / reverse k3
  sums within the per-term contract (terms widened before they are added), on data that a
  float32 block accumulator misses 100x; beyond the lanes' range (|l| > 87, the float64
  fix-up) and with float64 weights (the float64 lanes) sums within 1e-12 of ``math.fsum`` of
  the exact float64 terms, for unaligned starts, strided rows, masks, several blocks.
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
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_float32_beyond_lanes_sums_are_float64_exact(backend, offset, est):
    """|l| in (540, 1800): beyond the float32 lanes' range, every term is computed in float64
    from the exact l (the fix-up lanes): sums stay within 1e-12 of ``math.fsum``."""
    q, p = _f32_inputs(offset, scale=30.0)
    t = _exact_terms(q, p, est)
    ref_sum = math.fsum(t)
    ref_mean = ref_sum / t.size
    what = f"{backend} {est} offset={offset}"
    got = fastkl.kl_mc(q, p, est, reduction="sum", backend=backend)
    assert abs(got - ref_sum) <= 1e-12 * abs(ref_sum), (what, got, ref_sum)
    got = fastkl.kl_mc(q, p, est, backend=backend)
    assert abs(got - ref_mean) <= 1e-12 * abs(ref_mean), (what, got, ref_mean)
    st = fastkl.kl_mc_stats(q, p, est, backend=backend)
    assert abs(st.mean - ref_mean) <= 1e-12 * abs(ref_mean), (what, st.mean, ref_mean)
    sd = float(np.std(t, ddof=1))
    assert abs(st.std - sd) <= 1e-9 * sd, (what, st.std, sd)
    v, _ = fastkl.kl_mc_grad(q, p, est, reduction="sum", backend=backend)
    assert abs(v - ref_sum) <= 1e-12 * abs(ref_sum), (what, v, ref_sum)


def _dyadic_inputs(offset: int, est: str, seed: int = 4):
    """float32 (logq, logp) whose l and k1 / k2 terms are exact in float32 and whose float64
    block sums are exact, but whose float32 block sums are not.

    k1: l = -m / 2**20, m uniform in [0, 2**20] (terms of 2**-20 granularity, all >= 0: a
    4096-term block sums to ~2048, 31 bits: a float32 accumulator rounds). k2: l = m / 2**10,
    |m| <= 2**10 (terms m**2 / 2**21 <= 1/2; a block sums to ~680, 31 bits).
    logq = j / 4, |j| <= 8, so p = logq + l is exact in float32 and so is fl32(p - q)."""
    rng = np.random.default_rng(seed)
    if est == "k1":
        l = -rng.integers(0, 2**20, N, endpoint=True) / 2.0**20
    else:
        l = rng.integers(-(2**10), 2**10, N, endpoint=True) / 2.0**10
    qv = rng.integers(-8, 8, N, endpoint=True) / 4.0
    q = np.zeros(N + 8, np.float32)
    p = np.zeros(N + 8, np.float32)
    q[offset : offset + N] = qv
    p[offset : offset + N] = qv + l
    q, p = q[offset : offset + N], p[offset : offset + N]
    assert np.array_equal(p.astype(np.float64) - q.astype(np.float64), l)
    assert np.array_equal((p - q).astype(np.float64), l)  # exact in float32 too
    return q, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("est", ["k1", "k2"])
def test_float32_sums_are_float64_exact(backend, offset, est):
    """float32 inputs whose terms are exact in float32 (and in the float32 lanes) and whose
    sums are exact in float64 but not in float32 (``_dyadic_inputs``): ``sum`` equals
    ``math.fsum`` bit for bit, the mean and the statistics' mean are the correctly rounded
    quotient (1 ulp), unmasked and with a bool mask. Any float32 accumulation of more than
    8 terms (a float32 block sum, float32 lane sums of 16 or more) fails it. (The lanes widen
    every term before adding it; float32 sums of 8 would pass here but move chunked results
    by ~1e-9: test_dask.py / test_stream.py compare them with the in-memory one at 1e-12.)"""
    q, p = _dyadic_inputs(offset, est)
    t = _exact_terms(q, p, est)
    assert np.array_equal(t.astype(np.float32).astype(np.float64), t)
    ref_sum = math.fsum(t)
    assert float(np.float32(np.cumsum(t[:4096], dtype=np.float32)[-1])) != math.fsum(t[:4096])
    what = f"{backend} {est} offset={offset}"
    mask = np.ones(q.shape, bool)
    mask[100:700] = False
    ref_m = math.fsum(t[mask])
    for mk, ref in ((None, ref_sum), (mask, ref_m)):
        got = fastkl.kl_mc(q, p, est, reduction="sum", mask=mk, backend=backend)
        assert got == ref, (what, mk is not None, got, ref, (got - ref) / ref)
        n = t.size if mk is None else int(mk.sum())
        got = fastkl.kl_mc(q, p, est, mask=mk, backend=backend)
        assert abs(got - ref / n) <= 2.3e-16 * abs(ref / n), (what, got, ref / n)
        st = fastkl.kl_mc_stats(q, p, est, mask=mk, backend=backend)
        assert abs(st.mean - ref / n) <= 2.3e-16 * abs(ref / n), (what, st.mean, ref / n)
    sd = float(np.std(t, ddof=1))
    st = fastkl.kl_mc_stats(q, p, est, backend=backend)
    assert abs(st.std - sd) <= 1e-12 * sd, (what, st.std, sd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("est", ["k3", "rk3"])
def test_float32_k3_block_sums_not_float32(backend, offset, est):
    """k3 terms are rounded to float32 in the lanes (contract: within 1e-6 * max(1, |l|) of
    the exact term) and widened before they are added, so the sum is bounded, not exact:
    |sum - fsum(exact)| <= the sum of the terms' contract errors + 1e-12 of the sum.
    The data breaks a float32 block accumulator: the first lane of every block has l = 1
    (k3 = 0.718, half a float32 ulp 3e-8; reverse k3 = 1, 6e-8) and the rest |l| ~ 2e-4
    (terms ~ 2e-8), which a float32 running sum drops: 1e-4 of the block sum, over 20x the
    bound (and 8u = 4.8e-7 of the sum on top would not hide it)."""
    rng = np.random.default_rng(9)
    l = rng.uniform(1.5e-4, 2.2e-4, N) * rng.choice([-1.0, 1.0], N)
    l[::4096] = 1.0
    q = np.zeros(N + 8, np.float32)
    p = np.zeros(N + 8, np.float32)
    p[offset : offset + N] = l
    q, p = q[offset : offset + N], p[offset : offset + N]
    lx = p.astype(np.float64)
    if est == "k3":
        t = np.expm1(lx) - lx
        name, rev = "k3", False
    else:
        t = lx * np.exp(lx) - np.expm1(lx)
        name, rev = "k3", True
    ref = math.fsum(t)
    bound = math.fsum(1e-6 * np.abs(t) * np.maximum(1.0, np.abs(lx))) + 1e-12 * ref
    # the mutant: a float32 running sum over the first block, against the bound's share
    naive = float(np.cumsum(t[:4096].astype(np.float32), dtype=np.float32)[-1])
    b0 = math.fsum(1e-6 * np.abs(t[:4096]) * np.maximum(1.0, np.abs(lx[:4096])))
    assert abs(naive - math.fsum(t[:4096])) > 20 * (b0 + 4.8e-7 * math.fsum(t[:4096]))
    got = fastkl.kl_mc(q, p, name, reverse=rev, reduction="sum", backend=backend)
    assert abs(got - ref) <= bound, (backend, est, got, ref, (got - ref) / ref)
    mean = fastkl.kl_mc(q, p, name, reverse=rev, mask=np.ones(N, bool), backend=backend)
    assert abs(mean - ref / N) <= bound / N, (backend, est, mean, ref / N)


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
