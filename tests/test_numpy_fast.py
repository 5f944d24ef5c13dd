"""The ``numpy`` backend (``backends/numpy/fast.py``: the spec blocked over tiles, float32
lanes for float32 inputs) against the readable specification (the hidden backend
``"reference"``) and against mpmath (issue 12, item 6).

Per-term tolerances are the contract's: ``1e-6 * max(1, |l|)`` relative for float32 inputs,
``1e-12`` (the equivalence tests' float64 bound) for float64 inputs; a block sum may move by
the same relative bound on ``sum |w t| max(1, |l|)``.
"""

from __future__ import annotations

import tracemalloc

import arrays
import numpy as np
import pytest
from test_numerics import check_terms, exact_terms

import fastkl
from fastkl.backends import BACKEND_NAMES, available_backends, get_backend
from fastkl.backends._contract import BLOCK, EST_CODES
from fastkl.backends.numpy import fast
from fastkl.backends.numpy import mc as spec

FAST = get_backend("numpy")
REF = get_backend("reference")
INF = np.inf
NOCLAMP = (-INF, INF, -INF, INF, 0)
CLAMPS = [NOCLAMP, (-2.0, 1.0, -0.5, 3.0, 0), (-2.0, 1.0, -0.5, 3.0, 1), (-INF, 0.5, -INF, INF, 1)]
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


def test_reference_is_hidden_but_usable():
    assert "reference" not in BACKEND_NAMES
    assert "reference" not in available_backends()
    assert REF.name == "reference" and FAST.name == "numpy"
    assert REF.mc_partials is spec.mc_partials and FAST.mc_partials is fast.mc_partials
    q = np.zeros(10, np.float32)
    assert fastkl.kl_mc(q, q + 0.5, backend="reference") == pytest.approx(
        fastkl.kl_mc(q, q + 0.5, backend="numpy"), rel=1e-6)
    with pytest.raises(ValueError, match="backend must be"):
        get_backend("fast")


def _pair(rng, shape, dtype, spread=0.7):
    q = rng.normal(-2.0, 1.0, shape).astype(dtype)
    p = (q + rng.normal(0.0, spread, shape)).astype(dtype)
    return q, p


def _masks(rng, shape):
    return {"none": None, "bool": (rng.random(shape) < 0.7).astype(np.uint8),
            "weights": np.where(rng.random(shape) < 0.2, 0.0, rng.uniform(0.1, 3.0, shape))}


def _bound(q, p, mask, log_iw, est, clamp, dtype):
    """Per-block bound of |fast - reference| for S (and M2's scale), from the spec's terms."""
    l, t, w = spec._prepared(q, p, mask, log_iw, est, clamp)
    with np.errstate(invalid="ignore"):
        a = np.where(np.isfinite(t), np.abs(w * t) * np.maximum(1.0, np.abs(l)), 0.0)
    blocks = spec._block_partials(a, np.ones_like(a), False)[..., 1]
    return RTOL[np.dtype(dtype)] * blocks + 1e-300


def _check_partials(got, ref, bound, what):
    assert got.shape == ref.shape, what
    for k in (0, 3, 4, 5):  # W, sum w**2, NaN count, count: the same numbers
        np.testing.assert_allclose(got[..., k], ref[..., k], rtol=1e-15, atol=0, err_msg=what)
    s_ok = np.abs(got[..., 1] - ref[..., 1]) <= bound
    nan_same = np.isnan(got[..., 1]) == np.isnan(ref[..., 1])
    assert (s_ok | (got[..., 1] == ref[..., 1])).all() and nan_same.all(), what
    # M2: the same relative bound on its own scale (a sum of squares of deviations)
    m2 = np.abs(got[..., 2] - ref[..., 2]) <= 4 * bound / np.maximum(got[..., 0], 1) * (
        np.abs(ref[..., 1]) + 1) + 1e-6 * np.abs(ref[..., 2]) + 1e-300
    assert (m2 | (got[..., 2] == ref[..., 2])).all(), what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mk", ["none", "bool", "weights"])
@pytest.mark.parametrize("est", list(EST_CODES.values()))
def test_partials_and_terms_match_reference(est, mk, dtype):
    rng = np.random.default_rng(est * 7 + len(mk))
    shape = (3, 2 * BLOCK + 37)
    q, p = _pair(rng, shape, dtype)
    mask = _masks(rng, shape)[mk]
    for log_iw in (None, rng.normal(0.0, 0.3, shape).astype(dtype)):
        for clamp in CLAMPS:
            for m2 in (False, True):
                what = f"est={est} mask={mk} {np.dtype(dtype)} iw={log_iw is not None} {clamp}"
                got = FAST.mc_partials(q, p, mask, log_iw, est, clamp, m2)
                ref = REF.mc_partials(q, p, mask, log_iw, est, clamp, m2)
                _check_partials(got, ref, _bound(q, p, mask, log_iw, est, clamp, dtype), what)
            o1, o2 = np.empty(shape, dtype), np.empty(shape, dtype)
            FAST.mc_terms(q, p, mask, log_iw, est, clamp, o1)
            REF.mc_terms(q, p, mask, log_iw, est, clamp, o2)
            l = p.astype(np.float64) - q.astype(np.float64)
            tol = RTOL[np.dtype(dtype)] * np.maximum(1, np.abs(l)) * np.abs(o2.astype(float))
            assert (np.abs(o1.astype(float) - o2) <= tol + 1e-300).all(), what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("iw_grad", [0, 1, 2])
@pytest.mark.parametrize("est", list(EST_CODES.values()))
def test_grad_matches_reference(est, iw_grad, dtype):
    rng = np.random.default_rng(100 + est)
    shape = (2, BLOCK + 5)
    q, p = _pair(rng, shape, dtype)
    rowscale = np.array([0.5, 2.0])
    for mk, mask in _masks(rng, shape).items():
        for log_iw in (None, rng.normal(0.0, 0.3, shape).astype(dtype)):
            for clamp in CLAMPS:
                g1, g2 = np.empty(shape, dtype), np.empty(shape, dtype)
                a = FAST.mc_grad(q, p, mask, log_iw, est, clamp, iw_grad, rowscale, g1)
                b = REF.mc_grad(q, p, mask, log_iw, est, clamp, iw_grad, rowscale, g2)
                what = f"{mk} iw={log_iw is not None} {clamp}"
                np.testing.assert_array_equal(a, b, err_msg=what)  # the spec, tile by tile
                np.testing.assert_array_equal(g1, g2, err_msg=what)


def _check_public(q, p, what, **kw):
    for est, rev in arrays.ESTIMATORS:
        for red in ({"reduction": "none"}, {"reduction": "sum", "axis": -1},
                    {"reduction": "mean"}):
            got = fastkl.kl_mc(q, p, est, reverse=rev, backend="numpy", **kw, **red)
            ref = fastkl.kl_mc(q, p, est, reverse=rev, backend="reference", **kw, **red)
            l = np.asarray(p, np.float64) - np.asarray(q, np.float64)
            t = fastkl.kl_mc(np.asarray(q, np.float64), np.asarray(p, np.float64), est,
                             reverse=rev, backend="reference", reduction="none", **kw)
            with np.errstate(invalid="ignore"):
                a = np.where(np.isfinite(t), np.abs(t) * np.maximum(1.0, np.abs(l)), 0.0)
            rtol = RTOL[np.result_type(q, p)]
            if red["reduction"] == "none":
                bound = rtol * a + np.finfo(np.float32).tiny
            elif red["reduction"] == "sum":
                bound = rtol * a.sum(axis=-1) + 1e-300
            else:
                bound = rtol * a.mean() + 1e-300
            arrays.assert_within(got, ref, bound, f"{what} {est} {rev} {red}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts(dtype):
    """Strided, transposed, negative-stride, broadcast and read-only inputs, unchanged."""
    rng = np.random.default_rng(3)
    q, p = _pair(rng, (70, 2 * BLOCK + 3), dtype)
    views = {
        "strided": (q[::2, ::3], p[::2, ::3]),
        "transposed": (q[:, :300].T, p[:, :300].T),
        "negative": (q[::-1, ::-2], p[::-1, ::-2]),
        "broadcast": (np.broadcast_to(q[0], (5, q.shape[1])), p[:5]),
    }
    for name, (a, b) in views.items():
        snap = arrays.snapshot(a, b, None, None)
        _check_public(a, b, name)
        arrays.assert_unchanged(snap)
    ro_q, ro_p = q.copy(), p.copy()
    ro_q.flags.writeable = ro_p.flags.writeable = False
    _check_public(ro_q, ro_p, "read-only", mask=rng.random(q.shape) < 0.5)


@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 1, fast.CHUNK - 1,
                               fast.CHUNK, fast.CHUNK + 1, 2 * fast.CHUNK + BLOCK + 7])
def test_chunk_boundaries(n):
    rng = np.random.default_rng(n)
    for rows in (1, 3):
        q, p = _pair(rng, (rows, n), np.float32, spread=1.5)
        mask = (rng.random((rows, n)) < 0.8).astype(np.uint8)
        for est in EST_CODES.values():
            for m in (None, mask):
                got = FAST.mc_partials(q, p, m, None, est, NOCLAMP, True)
                ref = REF.mc_partials(q, p, m, None, est, NOCLAMP, True)
                _check_partials(got, ref, _bound(q, p, m, None, est, NOCLAMP, np.float32),
                                f"n={n} rows={rows} est={est}")


def test_many_short_rows_and_empty():
    rng = np.random.default_rng(11)
    for shape in [(5000, 3), (700, 100), (9, 5000), (0, 4), (4, 0)]:
        q, p = _pair(rng, shape, np.float32)
        for est in EST_CODES.values():
            got = FAST.mc_partials(q, p, None, None, est, NOCLAMP, True)
            ref = REF.mc_partials(q, p, None, None, est, NOCLAMP, True)
            _check_partials(got, ref, _bound(q, p, None, None, est, NOCLAMP, np.float32),
                            f"{shape} est={est}")


@pytest.mark.parametrize("policy", ["propagate", "omit", "raise"])
def test_nan_inf_lanes(policy):
    """NaN / inf lanes (in one tile of several, masked or not) follow the reference."""
    rng = np.random.default_rng(5)
    q, p = _pair(rng, (2, fast.CHUNK + 3 * BLOCK), np.float32)
    q[0, 7], p[0, 9], p[1, fast.CHUNK + 5], q[1, 100] = np.nan, np.inf, -np.inf, np.inf
    mask = np.ones(q.shape, bool)
    mask[0, 7] = False
    for est, rev in arrays.ESTIMATORS:
        for m in (None, mask):
            def call(be, est=est, rev=rev, m=m):
                try:
                    return fastkl.kl_mc(q, p, est, reverse=rev, mask=m, nan_policy=policy,
                                        reduction="sum", axis=-1, backend=be), None
                except ValueError as exc:
                    return None, str(exc)
            (a, ea), (b, eb) = call("numpy"), call("reference")
            assert ea == eb
            if ea is None:
                np.testing.assert_allclose(a, b, rtol=1e-6)


def _fast_inputs():
    """float32 (logq, logp) inside the float32 lanes: |l| from 2**-62 to 80 and 0, both
    signs, dense around the polynomial / direct split at |l| = 1, from several offsets."""
    mags = np.concatenate([np.logspace(-18, np.log10(80.0), 400), np.linspace(0.9, 1.1, 401),
                           np.linspace(0.0, 1.0, 301)[1:]])
    cut = np.float32(1.0)
    near = [cut]
    up = dn = cut
    for _ in range(4):
        up, dn = np.nextafter(up, np.float32(2)), np.nextafter(dn, np.float32(0))
        near += [up, dn]
    ls = np.concatenate([mags, np.float32(near), [0.0]])
    ls = np.concatenate([ls, -ls])
    qs, ps = [], []
    for off in (0.0, -0.7, 3.25):
        qs.append(np.full(ls.shape, off))
        ps.append(off + ls)
    return np.concatenate(qs).astype(np.float32), np.concatenate(ps).astype(np.float32)


@pytest.mark.parametrize("est", arrays.ESTIMATORS, ids=arrays.EST_IDS)
def test_float32_lanes_match_mpmath(est, monkeypatch):
    """Every float32 lane term within 1e-6 * max(1, |l|) of mpmath (l the exact difference of
    the inputs), as a term (``reduction="none"``) and as a one-term float64 sum, with the
    spec unreachable (so the float32 lanes computed every one of them)."""
    q, p = _fast_inputs()
    exact, l = exact_terms(q, p, est)

    def no_spec(*a, **k):
        raise AssertionError("the float32 lanes fell back to the spec")

    monkeypatch.setattr(fast, "_spec_partials", no_spec)
    monkeypatch.setattr(spec, "mc_terms", no_spec)
    for mask in (None, np.ones((q.size, 1), bool)):
        got = fastkl.kl_mc(q[:, None], p[:, None], est[0], reverse=est[1], reduction="sum",
                           axis=1, mask=mask, backend="numpy")
        bad = check_terms(got, exact, l, 1e-6)
        assert not bad, f"{len(bad)} of {q.size}:\n" + "\n".join(bad[:10])
    got = fastkl.kl_mc(q, p, est[0], reverse=est[1], reduction="none", backend="numpy")
    assert got.dtype == np.float32
    bad = check_terms(got, exact, l, 1e-6)
    assert not bad, f"{len(bad)} of {q.size}:\n" + "\n".join(bad[:10])


def test_k3_polynomial_error_budget():
    """The fitted polynomials (float32 coefficients) in float64 arithmetic: 5x inside the
    contract, leaving the rest to float32 rounding."""
    x = np.linspace(-1.0, 1.0, 20001)
    x = x[x != 0]
    for coefs, f in ((fast.P_K3, lambda v: (np.expm1(v) - v) / v**2),
                     (fast.Q_RK3, lambda v: (np.exp(v) * (v - 1) + 1) / v**2)):
        big = np.abs(x) > 1e-2  # where the float64 closed form is itself accurate
        val = np.polynomial.polynomial.polyval(x[big], np.float64(coefs))
        assert np.max(np.abs(val / f(x[big]) - 1)) < 2e-7


def test_thread_count_does_not_change_bits():
    rng = np.random.default_rng(9)
    q, p = _pair(rng, (3, fast.CHUNK + 11), np.float32)
    res = []
    for n in (1, 2):
        with fastkl.threads(n):
            res.append([fastkl.kl_mc(q, p, e, reverse=r, backend="numpy")
                        for e, r in arrays.ESTIMATORS])
    assert res[0] == res[1]


def test_no_float64_copy_of_the_input():
    """A k3 mean (and stats) of 2e7 float32 pairs allocates a few tiles, not a float64 copy
    (160 MB) of the input."""
    n = 20_000_000
    rng = np.random.default_rng(2)
    q = rng.standard_normal(n, dtype=np.float32)
    p = q + np.float32(0.3)
    mask = q > 0
    for fn in (lambda: fastkl.kl_mc(q, p, "k3", backend="numpy"),
               lambda: fastkl.kl_mc_stats(q, p, "k3", backend="numpy"),
               lambda: fastkl.kl_mc(q, p, "k3", mask=mask, backend="numpy")):
        fn()  # warm caches, imports
        tracemalloc.start()
        try:
            fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16e6, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("spread", [0.05, 0.3, 1.5])
@pytest.mark.parametrize("est", [EST_CODES[("k3", False)], EST_CODES[("k3", True)]])
def test_direct_lanes_gathered_or_selected(est, spread):
    """|l| > 1 lanes: none (polynomial only), few (gathered) and many (bitwise select)."""
    rng = np.random.default_rng(int(spread * 100))
    q, p = _pair(rng, (2, fast.CHUNK + 2 * BLOCK + 1), np.float32, spread=spread)
    for m in (None, (rng.random(q.shape) < 0.5).astype(np.uint8)):
        got = FAST.mc_partials(q, p, m, None, est, NOCLAMP, True)
        ref = REF.mc_partials(q, p, m, None, est, NOCLAMP, True)
        _check_partials(got, ref, _bound(q, p, m, None, est, NOCLAMP, np.float32),
                        f"spread={spread}")
        o1, o2 = np.empty(q.shape, np.float32), np.empty(q.shape, np.float32)
        FAST.mc_terms(q, p, m, None, est, NOCLAMP, o1)
        REF.mc_terms(q, p, m, None, est, NOCLAMP, o2)
        l = p.astype(np.float64) - q.astype(np.float64)
        tol = 1e-6 * np.maximum(1, np.abs(l)) * np.abs(o2.astype(float))
        assert (np.abs(o1.astype(float) - o2) <= tol).all()
