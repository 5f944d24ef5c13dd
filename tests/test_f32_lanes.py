"""float32 term lanes of the numba Monte Carlo partials (issue 12; docs/kernel_math.md,
"float32 lanes"), measured through ``fastkl.backends.numba.mc.mc_partials``.

Per term: an ``[N, 1]`` input makes every row one block whose S is that row's term (the
lanes of a short block are padded with zeros and go through the same vectorized loop as a
full sub-chunk), compared with a float64 reference (series for |l| < 0.5, libm beyond;
itself checked against mpmath) at the contract ``1e-6 * max(1, |l|)`` relative, ``l`` the
exact difference of the float32 inputs: |l| from 1e-10 to 88 dense and random, both signs,
+-8 ulp around the regime boundaries (ln2/2, 0.5, 1, 2, 80, 87, 88, 2**-62), subnormals, +-0,
and (logq, logp) pairs whose float32 difference rounds. Special lanes (+-inf, NaN, beyond
the float32 range) must give the float64 lanes' partials. Block sums (several blocks, ragged
tail, strided and reversed rows, a block with fix-up lanes) against ``math.fsum`` of float64
reference terms; M2 against a float64 two-pass; the same bits for 1, 2 and 3 threads.

``python tests/test_f32_lanes.py`` prints the error table (docs/kernel_math.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastkl
from fastkl._estimators import K1, K2, K3, RK3
from fastkl.backends.numba import mc

try:  # the Cython backend's float32 lanes (mc32.h), when the extension is built
    from fastkl.backends.cython import _mc as _cy_k
    from fastkl.backends.cython import mc as _cy_mc
except ImportError:  # pragma: no cover
    _cy_k = _cy_mc = None

F32 = np.float32
NC = (-math.inf, math.inf, -math.inf, math.inf, 0.0)
ESTS = {"k1": K1, "k2": K2, "k3": K3, "rk3": RK3}
REGIMES = [(0.0, 1e-10), (1e-10, 1e-4), (1e-4, 0.35), (0.35, 1.0), (1.0, 10.0), (10.0, 88.0),
           (88.0, math.inf)]


LANE_BACKENDS = ["numba"] + (["cython"] if _cy_k is not None else [])


@pytest.fixture(autouse=True)
def _lanes_on():
    saved = mc.F32_LANES
    mc.F32_LANES = True
    cy = _cy_k.set_f32_lanes(True) if _cy_k is not None else None
    yield
    mc.F32_LANES = saved
    if _cy_k is not None:
        _cy_k.set_f32_lanes(cy)


def _partials(q, p, est, want_m2=False, lanes=True, mask=None, be="numba"):
    if be == "cython":
        saved = _cy_k.set_f32_lanes(lanes)
        try:
            return _cy_mc.mc_partials(q, p, mask, None, est, NC, want_m2)
        finally:
            _cy_k.set_f32_lanes(saved)
    saved = mc.F32_LANES
    mc.F32_LANES = lanes
    try:
        return mc.mc_partials(q, p, mask, None, est, NC, want_m2)
    finally:
        mc.F32_LANES = saved


# --------------------------------------------------------------------------- reference


def ref_terms(l: np.ndarray, name: str) -> np.ndarray:
    """Exact-enough float64 terms of float64 ``l`` (relative error < 1e-14, checked below)."""
    l = np.asarray(l, np.float64)
    if name == "k1":
        return -l
    if name == "k2":
        return 0.5 * l * l
    with np.errstate(over="ignore", invalid="ignore"):
        if name == "k3":
            out = np.expm1(l) - l
            coef = [1.0 / math.factorial(n) for n in range(2, 22)]
        else:
            out = np.exp(l) * (l - 1.0) + 1.0
            coef = [(n - 1) / math.factorial(n) for n in range(2, 23)]
    s = np.abs(l) < 0.5
    x = l[s]
    poly = np.zeros_like(x)
    for c in reversed(coef):
        poly = poly * x + c
    out[s] = x * x * poly
    out[np.isinf(l)] = np.inf
    if name == "rk3":
        out[l == -np.inf] = 1.0
    return out


def test_reference_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 120  # 1e-45 - expm1(1e-45) needs ~100 digits
    rng = np.random.default_rng(1)
    l = (10.0 ** rng.uniform(-10, math.log10(88.0), 300) * rng.choice([-1.0, 1.0], 300))
    l = np.concatenate([l.astype(F32), F32([1e-45, -1e-40, 2.0**-62, 87.9])]).astype(float)
    for name in ("k3", "rk3"):
        ref = ref_terms(l, name)
        for x, r in zip(l, ref, strict=True):
            X = mpmath.mpf(float(x))
            e = mpmath.expm1(X) - X if name == "k3" else X * mpmath.exp(X) - mpmath.expm1(X)
            assert abs(r - float(e)) <= 1e-14 * abs(float(e)), (name, x, r, e)


# --------------------------------------------------------------------------- per term


def _boundaries() -> np.ndarray:
    pts = []
    for b in (math.log(2) / 2, 0.5, 1.0, 2.0, 80.0, 87.0, 88.0, 2.0**-62, 1e-10):
        c = F32(b)
        up = np.nextafter(c, F32(np.inf)) - c
        dn = c - np.nextafter(c, F32(0))
        pts.append(c + np.arange(0, 9, dtype=F32) * up)
        pts.append(c - np.arange(1, 9, dtype=F32) * dn)
    v = np.concatenate(pts)
    return np.concatenate([v, -v])


def lanes_sweep() -> tuple[np.ndarray, np.ndarray]:
    """(logq, logp) float32: logq = 0 (l exactly float32: the lanes alone) and pairs around
    logq ~ 30 N(0, 1) (l32 = fl32(logp - logq) rounds; the exact l is the float64 one)."""
    rng = np.random.default_rng(12)
    mag = np.concatenate([np.logspace(-10, math.log10(88.0), 20000),
                          10.0 ** rng.uniform(-10, math.log10(88.0), 40000)])
    l = np.concatenate([mag, -mag]).astype(F32)
    tiny = F32([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.2e-38, 1e-30, -1e-20, 2e-19])
    l = np.concatenate([l, _boundaries(), tiny])
    q1 = np.zeros_like(l)
    q2 = (30.0 * rng.standard_normal(30000)).astype(F32)
    m2 = 10.0 ** rng.uniform(-10, math.log10(87.0), 30000) * rng.choice([-1.0, 1.0], 30000)
    p2 = (q2.astype(float) + m2).astype(F32)
    return np.concatenate([q1, q2]), np.concatenate([l, p2])


_SWEEP: dict = {}


def per_term_errors(name: str, be: str = "numba"):
    """(exact l, err = |t - exact| / |exact| / max(1, |l|), t) over the sweep."""
    if (be, name) not in _SWEEP:
        q, p = lanes_sweep()
        part = _partials(q[:, None], p[:, None], ESTS[name], be=be)[:, 0, :]
        l = p.astype(np.float64) - q.astype(np.float64)
        ref = ref_terms(l, name)
        t = part[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.where(ref != 0, np.abs(t - ref) / np.abs(ref), np.abs(t))
        err = err / np.maximum(1.0, np.abs(l))
        assert np.array_equal(part[:, 0], np.ones(len(q))), name  # every lane included
        _SWEEP[(be, name)] = (l, err, t)
    return _SWEEP[(be, name)]


@pytest.mark.parametrize("be", LANE_BACKENDS)
@pytest.mark.parametrize("name", list(ESTS))
def test_every_term_within_contract(name, be):
    l, err, t = per_term_errors(name, be)
    bad = np.flatnonzero(~(err <= 1e-6))
    assert bad.size == 0, [(float(l[i]), float(t[i]), float(err[i])) for i in bad[:10]]
    if name in ("k2", "k3", "rk3"):
        assert (t >= 0).all(), name  # never negative (tiny lanes: float64, not a float32 zero)


@pytest.mark.parametrize("be", LANE_BACKENDS)
@pytest.mark.parametrize("name", list(ESTS))
def test_mask_of_ones_same_sums(name, be):
    """A 0/1 mask multiplies exactly: with every w = 1 the sums are those without a mask."""
    q, p = lanes_sweep()
    q, p = q[::7, None], p[::7, None]
    a = _partials(q, p, ESTS[name], want_m2=True, be=be)
    b = _partials(q, p, ESTS[name], want_m2=True, mask=np.ones(q.shape, np.uint8), be=be)
    assert a[..., 1:3].tobytes() == b[..., 1:3].tobytes()
    np.testing.assert_array_equal(b[..., [0, 3, 5]], np.ones(q.shape + (3,)))


def error_table() -> list[tuple[str, str, int, float]]:
    rows = []
    for be in LANE_BACKENDS:
        for name in ESTS:
            l, err, _ = per_term_errors(name, be)
            a = np.abs(l)
            for lo, hi in REGIMES:
                sel = (a >= lo) & (a < hi) if hi < math.inf else (a >= lo)
                if sel.any():
                    rows.append((f"{be} {name}", f"[{lo:g}, {hi:g})", int(sel.sum()),
                                 float(err[sel].max())))
    return rows


# --------------------------------------------------------------------------- specials


@pytest.mark.parametrize("be", LANE_BACKENDS)
@pytest.mark.parametrize("name", list(ESTS))
def test_special_lanes_as_float64_lanes(name, be):
    """NaN (excluded, counted), +-inf, |l| beyond the float32 range: the float64 fix-up,
    the same partials as the float64 lanes; inside a full sub-chunk too."""
    sp = F32([np.nan, np.inf, -np.inf, 87.5, -88.5, 95.0, -300.0, 81.0, 3e38, 0.0, -0.0])
    q = np.zeros((sp.size, 1), F32)
    p = sp[:, None].copy()
    q[8, 0] = F32(-3e38)  # l overflows float32 (6e38), finite in float64
    got = _partials(q, p, ESTS[name], want_m2=True, be=be)
    ref = _partials(q, p, ESTS[name], want_m2=True, lanes=False, be=be)
    with np.errstate(invalid="ignore", over="ignore"):
        l32 = (p - q)[:, 0]
    fix = ~(np.abs(l32) <= (80.0 if name == "rk3" else 87.0))  # the float64 fix-up lanes
    assert fix.sum() >= 8
    np.testing.assert_array_equal(got[fix], ref[fix])
    np.testing.assert_allclose(got[~fix], ref[~fix], rtol=1e-6, atol=0)
    # one block: clean lanes around the special ones (the dirty sub-chunk path, and M2)
    rng = np.random.default_rng(3)
    n = 3 * 4096 + 517
    q = rng.standard_normal((2, n)).astype(F32)
    p = (q + rng.standard_normal((2, n)) - 0.5).astype(F32)
    p[0, 100 : 100 + sp.size] = sp
    p[1, 4096 + 5] = np.nan
    p[1, 3 * 4096 + 3] = 90.0
    got = _partials(q, p, ESTS[name], want_m2=True, be=be)
    ref = _partials(q, p, ESTS[name], want_m2=True, lanes=False, be=be)
    np.testing.assert_array_equal(got[..., [0, 3, 4, 5]], ref[..., [0, 3, 4, 5]])
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), fin)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- block sums


def _block_ref(q, p, name, w=None):
    """float64 [rows, nblk, 4]: W, math.fsum of the reference terms, two-pass M2, and the
    sum of |terms| (k1 terms have both signs: a block sum may cancel)."""
    l = p.astype(np.float64) - q.astype(np.float64)
    t = ref_terms(l, name)
    if w is not None:
        t = np.where(w != 0, t, np.nan)  # excluded (0/1 weights: w*t == t)
    rows, n = t.shape
    nblk = -(-n // 4096)
    out = np.zeros((rows, nblk, 4))
    for r in range(rows):
        for b in range(nblk):
            x = t[r, b * 4096 : (b + 1) * 4096]
            x = x[~np.isnan(x)]
            if x.size:
                s = math.fsum(x)
                out[r, b] = (x.size, s, math.fsum((x - s / x.size) ** 2), math.fsum(np.abs(x)))
    return out


def _cases():
    rng = np.random.default_rng(5)
    n = 3 * 4096 + 517
    q = rng.standard_normal((2, n)).astype(F32)
    yield "N(-0.5, 1)", q, (q + rng.standard_normal((2, n)) - 0.5).astype(F32)
    q = (-rng.uniform(0.1, 8.0, (2, n))).astype(F32)
    yield "N(0, 0.1)", q, (q + 0.1 * rng.standard_normal((2, n))).astype(F32)
    q = rng.standard_normal((2, 2 * n)).astype(F32)
    p = (q + 3.0 * rng.standard_normal((2, 2 * n))).astype(F32)
    p[0, 77] = 120.0  # a dirty sub-chunk: summed lane by lane
    yield "strided reversed N(0, 3)", q[:, ::-2], p[:, ::-2]


_BLOCKS: dict = {}


def block_errors(name, be="numba"):
    """max over blocks of |S - exact| / sum |exact terms| and of the relative error of M2."""
    if (be, name) not in _BLOCKS:
        out = {}
        for label, q, p in _cases():
            _check_blocks(name, label, q, p, None, out, be)
            w = (np.random.default_rng(4).random(q.shape) < 0.7).astype(np.uint8)
            w[0, :5000] = 0  # the first block fully masked out, the second partly
            p = p.copy()
            idx = np.flatnonzero(w[1] == 0)[:3]
            p[1, idx] = [np.nan, np.inf, 200.0]  # ignored where w == 0
            _check_blocks(name, label + ", 0/1 mask", q, p, w, out, be)
        _BLOCKS[(be, name)] = out
    return _BLOCKS[(be, name)]


def _check_blocks(name, label, q, p, w, out, be):
    got = _partials(q, p, ESTS[name], want_m2=True, mask=w, be=be)
    ref = _block_ref(q, p, name, w)
    old = _partials(q, p, ESTS[name], want_m2=True, mask=w, lanes=False, be=be)
    # weights and counts: exactly the float64 lanes'
    assert np.array_equal(got[..., [0, 3, 4, 5]], old[..., [0, 3, 4, 5]]), (name, label)
    assert np.array_equal(got[..., 0], ref[..., 0]), (name, label)
    live = ref[..., 0] > 0
    assert np.all(got[~live][:, 1:3] == 0.0), (name, label)
    es = np.abs(got[..., 1] - ref[..., 1])[live] / ref[..., 3][live]
    em = np.abs(got[..., 2] - ref[..., 2])[live] / np.abs(ref[..., 2][live])
    out[label] = (float(es.max()), float(em.max()))


@pytest.mark.parametrize("be", LANE_BACKENDS)
@pytest.mark.parametrize("name", list(ESTS))
def test_block_sums(name, be):
    for label, (es, em) in block_errors(name, be).items():
        assert es <= 1e-6, (name, label, es)
        assert em <= 1e-6, (name, label, em)


@pytest.mark.parametrize("be", LANE_BACKENDS)
@pytest.mark.parametrize("name", list(ESTS))
def test_same_bits_any_layout_and_thread_count(name, be):
    rng = np.random.default_rng(9)
    n = 5 * 4096 + 300  # above the threaded kernel's threshold
    q = rng.standard_normal((2, n)).astype(F32)
    p = (q + rng.standard_normal((2, n)) - 0.5).astype(F32)
    p[1, 10] = np.nan
    p[0, 9000] = 100.0
    w = (rng.random((2, n)) < 0.8).astype(np.uint8)
    for mask in (None, w):
        runs = []
        for k in (1, 2, 3):
            with fastkl.threads(k):
                runs.append(_partials(q, p, ESTS[name], want_m2=True, mask=mask, be=be).tobytes())
        assert runs[0] == runs[1] == runs[2]
    # a reversed view (gather path) gives the bits of its contiguous copy
    qr, pr = q[:, ::-1], p[:, ::-1]
    a = _partials(qr, pr, ESTS[name], want_m2=True, be=be)
    b = _partials(np.ascontiguousarray(qr), np.ascontiguousarray(pr), ESTS[name], want_m2=True,
                  be=be)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("be", LANE_BACKENDS)
def test_other_paths_unchanged(be):
    """float64 inputs, float64 weights, clamps and reverse k1 keep the float64 lanes."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 5000)).astype(F32)
    p = (q + 0.3).astype(F32)
    w = (rng.random((1, 5000)) < 0.5).astype(np.float64)
    cases = [(q.astype(float), p.astype(float), None, K3, NC), (q, p, w, K3, NC),
             (q, p, None, K3, (-1.0, 1.0, -math.inf, math.inf, 0.0)), (q, p, None, 3, NC)]
    for qq, pp, m, est, cl in cases:
        if be == "cython":
            _cy_k.set_f32_lanes(True)
            a = _cy_mc.mc_partials(qq, pp, m, None, est, cl, True)
            _cy_k.set_f32_lanes(False)
            b = _cy_mc.mc_partials(qq, pp, m, None, est, cl, True)
        else:
            mc.F32_LANES = True
            a = mc.mc_partials(qq, pp, m, None, est, cl, True)
            mc.F32_LANES = False
            b = mc.mc_partials(qq, pp, m, None, est, cl, True)
        assert a.tobytes() == b.tobytes()


@pytest.mark.skipif(_cy_k is None, reason="Cython extension not built")
@pytest.mark.parametrize("name", list(ESTS))
def test_cython_terms_within_contract(name):
    """The Cython backend's float32 lanes also give ``mc_terms`` (float32 output): every
    term of the sweep within the contract, as the partials; NaN, +-inf and the fix-up lanes
    as the float64 lanes give them; 0 where a bool mask excludes a lane."""
    q, p = lanes_sweep()
    l, err, t = per_term_errors(name, "cython")
    out = np.empty(q.shape, F32)
    _cy_mc.mc_terms(q[None], p[None], None, None, ESTS[name], NC, out[None])
    ref = ref_terms(l, name)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e = np.where(ref != 0, np.abs(out - ref) / np.abs(ref), np.abs(out))
    e = e / np.maximum(1.0, np.abs(l))
    # terms representable in float32 (below its normal range a float32 output cannot hold
    # the term to 1e-6: the float64 lanes round those to subnormals or 0 as well)
    fits = (np.abs(ref) < float(np.finfo(F32).max)) & (
        (np.abs(ref) >= float(np.finfo(F32).tiny)) | (ref == 0))
    bad = np.flatnonzero(~(e[fits] <= 1e-6))
    assert bad.size == 0, [(float(l[fits][i]), float(out[fits][i])) for i in bad[:10]]
    sp = F32([np.nan, np.inf, -np.inf, 87.5, -88.5, 95.0, 0.0, -0.0, 1e-40, 0.25])
    z = np.zeros((1, sp.size), F32)
    a, b = np.empty_like(z), np.empty_like(z)
    _cy_k.set_f32_lanes(True)
    _cy_mc.mc_terms(z, sp[None], None, None, ESTS[name], NC, a)
    _cy_k.set_f32_lanes(False)
    _cy_mc.mc_terms(z, sp[None], None, None, ESTS[name], NC, b)
    _cy_k.set_f32_lanes(True)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    m = np.array([[1, 0, 1, 0, 1, 0, 1, 0, 1, 0]], np.uint8)
    _cy_mc.mc_terms(z, sp[None], m, None, ESTS[name], NC, a)
    assert np.all(a[m == 0] == 0)
    np.testing.assert_allclose(a[m == 1], b[m == 1], rtol=1e-6, atol=0)


@pytest.mark.skipif(_cy_k is None, reason="Cython extension not built")
@pytest.mark.parametrize("name", list(ESTS))
def test_backends_agree(name):
    """numba and Cython float32 lanes: the same W / counts, S and M2 within the contract of
    each other, on every block case (both are checked against the reference above)."""
    for _label, q, p in _cases():
        a = _partials(q, p, ESTS[name], want_m2=True, be="numba")
        b = _partials(q, p, ESTS[name], want_m2=True, be="cython")
        np.testing.assert_array_equal(a[..., [0, 3, 4, 5]], b[..., [0, 3, 4, 5]])
        np.testing.assert_allclose(a[..., 1:3], b[..., 1:3], rtol=2e-6, atol=0)


@pytest.mark.parametrize("env,want", [(None, True), ("0", False), ("1", True)])
def test_on_by_default_env_off_switch(env, want):
    """The lanes are on by default; ``FASTKL_NUMBA_F32_LANES=0`` turns them off."""
    import os
    import subprocess
    import sys

    e = {k: v for k, v in os.environ.items() if k != "FASTKL_NUMBA_F32_LANES"}
    if env is not None:
        e["FASTKL_NUMBA_F32_LANES"] = env
    code = "from fastkl.backends.numba import mc; print(mc.F32_LANES)"
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(want)


if __name__ == "__main__":
    mc.F32_LANES = True
    print("| estimator | abs(l) in | points | max abs(t - exact) / abs(exact) / max(1, abs(l)) |")
    print("| --- | --- | ---: | ---: |")
    for r in error_table():
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} |")
    print()
    print("| estimator | data | block S: err / sum abs(t) | block M2 rel err |")
    print("| --- | --- | ---: | ---: |")
    for be in LANE_BACKENDS:
        for name in ESTS:
            for label, (es, em) in block_errors(name, be).items():
                print(f"| {be} {name} | {label} | {es:.2e} | {em:.2e} |")
