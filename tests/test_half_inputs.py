"""16-bit float inputs read in place (issue 12, item 3): numpy float16, ``ml_dtypes.bfloat16``
(optional: those cases skip without it) and torch bfloat16/float16 tensors reach the kernels
without a converted copy and give the results of the float32 path on the widened values: the
same bits, since the same lanes run (float32 lanes where eligible, float64 lanes otherwise).
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

import fastkl
from fastkl import _checks
from fastkl._estimators import ESTIMATORS

try:
    import ml_dtypes
except ImportError:  # optional: the bfloat16 cases skip
    ml_dtypes = None

COMPILED = [b for b in ("cython", "numba") if b in fastkl.available_backends()]
BACKENDS = COMPILED + ["numpy"]
HALVES = [
    pytest.param(np.float16, id="float16"),
    pytest.param(
        None if ml_dtypes is None else ml_dtypes.bfloat16, id="bfloat16",
        marks=pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")),
]
EST = [(e.name, e.reverse) for e in ESTIMATORS]


def _pair(dt, shape=(6, 1500), seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(-2.0, 1.2, shape)
    p = q + rng.normal(0.0, 0.4, shape)
    return q.astype(dt), p.astype(dt)


def _wide(a):
    return a.astype(np.float32)


def _same(a, b):
    """Bit-for-bit equal results (floats, arrays, KLStats), NaN equal to NaN."""
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
        return
    if dataclasses.is_dataclass(a):  # KLStats
        _same(dataclasses.astuple(a), dataclasses.astuple(b))
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ the widening itself


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("lanes", ["f32", "f64"])
def test_every_bit_pattern_widens_exactly(backend, dt, lanes):
    """All 65536 values (subnormals, +-0, +-inf, NaNs) as logq against logp = 0: the k1
    terms are -l = logq widened exactly, in the float32 lanes and (a log-ratio clamp that
    never bites) the float64 lanes."""
    q = np.arange(1 << 16, dtype=np.uint16).view(dt).reshape(256, 256)
    p = np.zeros_like(q)
    kw = {} if lanes == "f32" else {"clamp_log_ratio": (-np.inf, 1e300)}
    got = fastkl.kl_mc(q, p, "k1", reduction="none", backend=backend, **kw)
    assert got.dtype == np.float32
    ref = fastkl.kl_mc(_wide(q), _wide(p), "k1", reduction="none", backend=backend, **kw)
    _same(got, ref)
    exact = _wide(q)
    fin = np.isfinite(exact)
    np.testing.assert_array_equal(got[fin], (np.float32(0) - exact[fin]) * np.float32(-1))
    assert np.array_equal(np.isnan(got), np.isnan(exact))


# ------------------------------------------------------------------ every estimator, options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("est", EST, ids=lambda e: f"{e[0]}{'-rev' if e[1] else ''}")
def test_estimators_match_float32_path(backend, dt, est):
    name, rev = est
    q, p = _pair(dt)
    q32, p32 = _wide(q), _wide(p)
    m = np.random.default_rng(1).random(q.shape) < 0.7
    w = np.random.default_rng(2).random(q.shape) * 2.0
    # float weights for float16 only: each (dtype, mask dtype) is a numba specialization to
    # compile, and the weights' load path does not depend on the input dtype
    for kw in ({}, {"mask": m}) + (({"mask": w},) if dt == np.float16 else ()):
        for red in ("mean", "sum", "none", "seq-mean-token-mean"):
            _same(fastkl.kl_mc(q, p, name, reverse=rev, reduction=red, backend=backend, **kw),
                  fastkl.kl_mc(q32, p32, name, reverse=rev, reduction=red, backend=backend,
                               **kw))
        _same(fastkl.kl_mc_stats(q, p, name, reverse=rev, backend=backend, **kw),
              fastkl.kl_mc_stats(q32, p32, name, reverse=rev, backend=backend, **kw))
        for red in ("mean", "none"):
            _same(fastkl.kl_mc_grad(q, p, name, reverse=rev, reduction=red, backend=backend,
                                    **kw),
                  fastkl.kl_mc_grad(q32, p32, name, reverse=rev, reduction=red,
                                    backend=backend, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", HALVES)
def test_log_iw_and_clamps(backend, dt):
    q, p = _pair(dt, seed=3)
    iw = (0.3 * np.random.default_rng(4).normal(size=q.shape)).astype(dt)
    pairs = [(iw, _wide(iw))]  # 16-bit log_iw, and (bfloat16 only: compile time) float32
    if dt != np.float16:
        pairs.append((_wide(iw), _wide(iw)))
    for liw, liw32 in pairs:
        for kw in ({}, {"clamp_log_ratio": (-0.5, 0.5)},
                   {"clamp_value": (0.0, 0.05), "clamp_order": "weighted"}):
            args = dict(log_iw=liw, backend=backend, **kw)
            args32 = dict(log_iw=liw32, backend=backend, **kw)
            _same(fastkl.kl_mc(q, p, "k3", **args), fastkl.kl_mc(_wide(q), _wide(p), "k3",
                                                                 **args32))
            _same(fastkl.kl_mc(q, p, "k3", reduction="none", **args),
                  fastkl.kl_mc(_wide(q), _wide(p), "k3", reduction="none", **args32))
            for wrt in ("logq", "logp", "log_iw"):
                _same(fastkl.kl_mc_grad(q, p, "k3", iw_grad=True, wrt=wrt, **args),
                      fastkl.kl_mc_grad(_wide(q), _wide(p), "k3", iw_grad=True, wrt=wrt,
                                        **args32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", HALVES)
def test_layouts(backend, dt):
    """Transposed, negative-stride, odd-stride (a bfloat16 array sliced every 3rd element)
    and broadcast views: read in place, the float32 path's results."""
    q, p = _pair(dt, shape=(40, 2100), seed=5)
    views = [
        (q.T, p.T),
        (q[::-1, ::-1], p[::-1, ::-1]),
        (q[:, ::3], p[:, ::3]),
        (q[::7, 5::3].T, p[::7, 5::3].T),
        (np.broadcast_to(q[0], q.shape), p),
    ]
    for a, b in views:
        for red, kw in (("mean", {}), ("none", {}), ("mean", {"axis": 0}),
                        ("mean", {"clamp_log_ratio": (-3.0, 3.0)})):
            _same(fastkl.kl_mc(a, b, "k3", reduction=red, backend=backend, **kw),
                  fastkl.kl_mc(_wide(a), _wide(b), "k3", reduction=red, backend=backend, **kw))
        _same(fastkl.kl_mc_grad(a, b, "k2", backend=backend),
              fastkl.kl_mc_grad(_wide(a), _wide(b), "k2", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", HALVES)
def test_special_values(backend, dt):
    q, p = _pair(dt, shape=(3, 5000), seed=6)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-7, -1e-7, 6e-8, 60.0, -60.0,
                         3e4], dtype=np.float32).astype(dt)
    q.reshape(-1)[: specials.size * 37 : 37] = specials
    p.reshape(-1)[5 : 5 + specials.size * 53 : 53] = specials
    for name, rev in EST:
        for red in ("mean", "none"):
            _same(fastkl.kl_mc(q, p, name, reverse=rev, reduction=red, nan_policy="omit"
                               if red == "mean" else "propagate", backend=backend),
                  fastkl.kl_mc(_wide(q), _wide(p), name, reverse=rev, reduction=red,
                               nan_policy="omit" if red == "mean" else "propagate",
                               backend=backend))
        _same(fastkl.kl_mc_stats(q, p, name, reverse=rev, nan_policy="omit", backend=backend),
              fastkl.kl_mc_stats(_wide(q), _wide(p), name, reverse=rev, nan_policy="omit",
                                 backend=backend))
    with pytest.raises(ValueError):
        fastkl.kl_mc(q, p, "k3", nan_policy="raise", backend=backend)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dt", HALVES)
def test_mixed_dtypes_are_converted(backend, dt):
    q, p = _pair(dt, seed=7)
    _same(fastkl.kl_mc(q, _wide(p), "k3", backend=backend),
          fastkl.kl_mc(_wide(q), _wide(p), "k3", backend=backend))
    ref = fastkl.kl_mc(q.astype(np.float64), p.astype(np.float64), "k3", backend=backend)
    assert fastkl.kl_mc(q, p.astype(np.float64), "k3", backend=backend) == ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_byteswapped_float16(backend):
    q, p = _pair(np.float16, seed=8)
    qs, ps = q.astype(">f2"), p.astype(">f2")
    _same(fastkl.kl_mc(qs, ps, "k3", backend=backend), fastkl.kl_mc(q, p, "k3", backend=backend))


@pytest.mark.parametrize("dt", HALVES)
def test_inputs_untouched_and_read_only(dt):
    q, p = _pair(dt, seed=9)
    q.flags.writeable = False
    p.flags.writeable = False
    q0, p0 = q.copy(), p.copy()
    for be in BACKENDS:
        fastkl.kl_mc_grad(q, p, "k3", log_iw=q, iw_grad=True, backend=be)
        fastkl.kl_mc(q, p, "k3", reverse=True, reduction="none", backend=be)
    assert q.tobytes() == q0.tobytes() and p.tobytes() == p0.tobytes()


# ------------------------------------------------------------------ no converted copy


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dt", HALVES)
def test_no_full_size_copy(backend, dt):
    n = 20_000_000
    q = np.zeros(n, dtype=dt)
    p = np.full(n, 0.5, dtype=np.float32).astype(dt)
    fastkl.kl_mc(q[:10000], p[:10000], "k3", backend=backend)  # compile / warm up
    tracemalloc.start()
    try:
        v = fastkl.kl_mc(q, p, "k3", backend=backend)
        s = fastkl.kl_mc_stats(q, p, "k2", backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a float32 copy of one input alone would be 80 MB
    assert peak < 8 << 20, peak
    assert v == pytest.approx(np.expm1(0.5) - 0.5, rel=1e-6)
    assert s.mean == pytest.approx(0.125, rel=1e-6)


# ------------------------------------------------------------------ checks


def test_dtype_errors_unchanged():
    q = np.zeros(8, dtype=np.float32)
    for bad in (np.zeros(8, dtype=np.int16), np.zeros(8, dtype=np.uint16),
                np.zeros(8, dtype=np.complex64), np.zeros(8, dtype=[("bfloat16", "<u2")]),
                np.zeros(8, dtype="V2")):
        with pytest.raises(TypeError, match="logp must have a floating dtype"):
            fastkl.kl_mc(q, bad, "k3")
        with pytest.raises(TypeError, match="logq must have a floating dtype"):
            fastkl.kl_mc(bad, q, "k3")
        with pytest.raises(TypeError, match="log_iw must have a floating dtype"):
            fastkl.kl_mc(q, q, "k3", log_iw=bad)


def test_half_kind():
    assert _checks.half_kind(np.dtype(np.float16)) == "float16"
    assert _checks.half_kind(np.dtype(">f2")) is None
    assert _checks.half_kind(np.dtype(np.float32)) is None
    assert _checks.half_kind(np.dtype(np.uint16)) is None
    if ml_dtypes is not None:
        assert _checks.half_kind(np.dtype(ml_dtypes.bfloat16)) == "bfloat16"
        assert _checks.bfloat16_dtype() == np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------ torch


@pytest.mark.parametrize("tdt", ["bfloat16", "float16"])
def test_torch_half_tensors(tdt):
    torch = pytest.importorskip("torch")
    import fastkl.torch as fkt

    dt = getattr(torch, tdt)
    if dt == torch.bfloat16 and ml_dtypes is None:
        pytest.skip("bfloat16 tensors are read in place only with ml_dtypes")
    rng = np.random.default_rng(10)
    q = torch.tensor(rng.normal(-2, 1, (4, 3000))).to(dt)
    p = torch.tensor(rng.normal(-2, 1, (4, 3000))).to(dt)
    arr = fkt._as_numpy(torch, q, "logq")
    assert arr.__array_interface__["data"][0] == q.data_ptr()  # a view, no copy
    arr_t = fkt._as_numpy(torch, q.T, "logq")
    assert arr_t.__array_interface__["data"][0] == q.data_ptr()
    q32, p32 = q.float(), p.float()
    for be in COMPILED:
        qg = q.clone().requires_grad_()
        v = fkt.kl_mc(qg, p, "k3", backend=be)
        v.backward()
        q32g = q32.clone().requires_grad_()
        v32 = fkt.kl_mc(q32g, p32, "k3", backend=be)
        v32.backward()
        assert v.dtype == dt and qg.grad.dtype == dt
        assert float(v) == float(v32.to(dt))
        assert torch.equal(qg.grad, q32g.grad.to(dt))
        # the numpy API on a tensor: same bits as on the widened values
        assert fastkl.kl_mc(q, p, "k3", backend=be) == fastkl.kl_mc(q32.numpy(), p32.numpy(),
                                                                     "k3", backend=be)
