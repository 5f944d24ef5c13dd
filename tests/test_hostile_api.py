"""Hostile inputs at the API level (issue 10, items 3, 6, 9, 12): -inf entries and huge gaps
in logits rows, extreme mask weights, out-of-range token ids, small API promises and Ctrl-C.

Every compiled backend is checked against the numpy reference: same value (to the backend
tolerance), same NaN / inf, both raise or neither.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import BACKENDS
from hypothesis import given
from hypothesis import strategies as st

import fastkl
from fastkl.logits import (
    entropy_logits,
    jsd_logits,
    kl_logits,
    kl_logits_grad,
    token_logprobs,
)

COMPILED = [b for b in BACKENDS if b != "numpy"]


def _same(got, ref, rtol):
    """Equal, or both NaN, or within rtol (relative to max(1, |ref|)), elementwise."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    nan_g, nan_r = np.isnan(got), np.isnan(ref)
    assert (nan_g == nan_r).all(), (got, ref)
    g, r = got[~nan_r], ref[~nan_r]
    exact = g == r
    with np.errstate(invalid="ignore"):  # inf - inf where one side is inf: not close
        close = np.abs(g - r) <= rtol * np.maximum(1.0, np.abs(r))
    assert (exact | (np.isfinite(g) & np.isfinite(r) & close)).all(), (got, ref)


def _all_ops(a, b, t, backend):
    """Every logits op on one pair of [rows, V] arrays, as a dict of float64 arrays."""
    tok = np.zeros(a.shape[0], dtype=np.int64)
    tok[:] = a.shape[1] - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val, grad = kl_logits_grad(a, b, temperature=t, reduction="none", backend=backend)
        return {
            "kl": kl_logits(a, b, temperature=t, backend=backend),
            "kl_rev": kl_logits(b, a, temperature=t, backend=backend),
            "jsd": jsd_logits(a, b, 0.5, temperature=t, backend=backend),
            "jsd_0.1": jsd_logits(a, b, 0.1, temperature=t, backend=backend),
            "entropy_p": entropy_logits(a, temperature=t, backend=backend),
            "entropy_q": entropy_logits(b, temperature=t, backend=backend),
            "token": token_logprobs(b, tok, temperature=t, backend=backend),
            "kl_grad_value": val,
            "kl_grad": grad,
        }


def _check_vs_ref(a, b, t):
    rtol = 1e-9 if a.dtype == np.float64 else 2e-5
    ref = _all_ops(a, b, t, "reference")
    for be in COMPILED:
        got = _all_ops(a, b, t, be)
        for k in ref:
            try:
                _same(got[k], ref[k], 1e-6 if k == "kl_grad" else rtol)
            except AssertionError as exc:
                raise AssertionError(f"{be} {k} (T={t}, {a.dtype}): {exc}") from None


# --------------------------------------------------------------------------- item 3


def _issue_row(v=1000):
    """The issue's row: P's maximum (80, 800 after T = 0.1) in a later 256-entry chunk than
    the -inf of Q: e^(x - max) of entry 0 underflows to 0 only once the max is seen."""
    a = np.zeros(v)
    a[300] = 80.0
    b = a.copy()
    b[0] = -np.inf
    return a, b


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_before_a_late_huge_max_gives_zero(backend, dtype):
    a, b = _issue_row()
    a, b = a[None].astype(dtype), b[None].astype(dtype)
    assert kl_logits(a, b, temperature=0.1, backend=backend)[0] == 0.0
    value, _ = kl_logits_grad(a, b, temperature=0.1, backend=backend)
    assert value == 0.0
    # one such row must not turn a batch mean into NaN
    assert kl_logits(np.repeat(a, 3, 0), np.repeat(b, 3, 0), temperature=0.1,
                     reduction="mean", backend=backend) == 0.0


def _hostile_rows():
    """Rows with -inf entries before, after and among huge maxima (gaps > 745 after the
    temperature), gaps that overflow float64, NaN among -inf, rows without mass."""
    rows = {}
    v = 1100  # crosses the chunk sizes of both compiled backends (256, 512)
    a, b = _issue_row(v)
    rows["issue"] = (a, b, 0.1)
    a = np.zeros(v)
    a[0], a[1000] = -100.0, 700.0  # -inf of Q at P = e^-800 once the max is 700: 0 term
    b = np.zeros(v)
    b[0] = -np.inf
    rows["inf_term_underflows_later"] = (a, b, 1.0)
    a2 = a.copy()
    a2[0] = -10.0  # e^-710 > 0: the term stays +inf
    rows["inf_term_survives"] = (a2, b, 1.0)
    a = np.full(v, -1e308)
    a[700] = 1e308  # the max jumps by 2e308 = inf in float64
    rows["overflowing_gap_same"] = (a, a.copy(), 1.0)
    rows["overflowing_gap_p"] = (a, np.zeros(v), 1.0)
    rows["overflowing_gap_q"] = (np.zeros(v), a, 1.0)
    a = np.full(v, -1000.0)
    a[:600] = -np.inf  # whole chunks of -inf before a max far below 0
    rows["neg_max_after_inf_chunks"] = (a, np.full(v, -1000.0), 1.0)
    a = np.full(v, -np.inf)
    a[900] = 1.0
    a[10] = np.nan  # a NaN in a chunk with nothing finite: the row is NaN
    rows["nan_among_inf"] = (a, np.zeros(v), 1.0)
    rows["no_mass_q"] = (np.zeros(v), np.full(v, -np.inf), 1.0)
    return rows


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(_hostile_rows()))
def test_hostile_logits_rows_match_reference(name, dtype):
    a, b, t = _hostile_rows()[name]
    with np.errstate(over="ignore"):
        _check_vs_ref(a[None].astype(dtype), b[None].astype(dtype), t)


@st.composite
def _hostile_pair(draw):
    v = draw(st.sampled_from([1, 5, 257, 600, 1100]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def one():
        scale = draw(st.sampled_from([1.0, 30.0, 1e3, 1e5, 1e30]))
        r = rng.standard_normal(v) * scale
        for _ in range(draw(st.integers(0, 3))):
            r[rng.integers(v)] = draw(st.sampled_from([-np.inf, 80.0, -1e3 * scale]))
        if draw(st.booleans()):
            r[: rng.integers(0, v + 1)] = -np.inf
        if draw(st.booleans()):
            r[rng.integers(v):] += draw(st.sampled_from([700.0, 760.0, 2000.0, 1e6]))
        return r

    a = one()
    b = a.copy() if draw(st.booleans()) else one()
    if draw(st.booleans()):
        b[rng.integers(v)] = -np.inf
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    t = draw(st.sampled_from([1.0, 0.1, 1e-3, 10.0]))
    return a[None].astype(dtype), b[None].astype(dtype), t


@pytest.mark.skipif(not COMPILED, reason="no compiled backend")
@given(_hostile_pair())
def test_hostile_logits_property_every_backend_vs_reference(abt):
    a, b, t = abt
    _check_vs_ref(a, b, t)


# --------------------------------------------------------------------------- item 9

_TOKEN_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
                 np.int64, ">u8", ">i4"]


@pytest.mark.parametrize("dtype", _TOKEN_DTYPES)
def test_tokens_of_every_integer_dtype_work(dtype):
    logits = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    tok = np.array([1, 9, 0], dtype=dtype)
    ref = token_logprobs(logits, tok.astype(np.int64))
    np.testing.assert_array_equal(token_logprobs(logits, tok), ref)


@pytest.mark.parametrize("bad, dtype", [(2**64 - 100, np.uint64), (2**64 - 1, np.uint64),
                                         (2**63, np.uint64), (200, np.uint8), (-5, np.int8),
                                         (2**32 - 100, np.uint32)])
def test_out_of_range_token_is_an_error_not_a_wrap(bad, dtype):
    logits = np.zeros((3, 10), dtype=np.float32)
    tok = np.array([1, bad, 3], dtype=dtype)
    with pytest.raises(ValueError, match=rf"tokens.*found {bad} at index \(1,\)"):
        token_logprobs(logits, tok)
    acc = fastkl.LogitsAccumulator()
    with pytest.raises(ValueError, match="tokens.*at index"):
        acc.update(logits, logits, tokens=tok)


def test_uint64_token_file_is_an_error_not_a_wrap(tmp_path):
    logits = np.zeros((3, 10), dtype=np.float32)
    np.save(tmp_path / "a.npy", logits)
    np.save(tmp_path / "t.npy", np.array([1, 2**64 - 100, 3], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"t\.npy.*tokens.*at index \(1,\)"):
        fastkl.compare_logits(str(tmp_path / "a.npy"), str(tmp_path / "a.npy"),
                              tokens=str(tmp_path / "t.npy"))


def test_ignore_index_of_a_narrow_dtype_and_out_of_int64():
    logits = np.zeros((3, 10), dtype=np.float32)
    got = token_logprobs(logits, np.array([1, 255, 3], dtype=np.uint8), ignore_index=255)
    assert got[1] == 0.0
    got = token_logprobs(logits, np.array([1, -100, 3], dtype=np.int8))
    assert got[1] == 0.0
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        token_logprobs(logits, np.array([1, 2, 3]), ignore_index=2**70)


# --------------------------------------------------------------------------- item 6

_SCALES = [1e-300, 1e-200, 2.0**-260, 1e-100, 3.0, 1e100, 2.0**260, 1e200, 1e300, 1e308]


def _mc_data(n=6000):
    rng = np.random.default_rng(6)
    q = rng.standard_normal(n)
    p = q + 0.1 * rng.standard_normal(n)
    w = rng.random(n)
    w[::7] = 0.0
    return q, p, w


def _close_stats(got, ref):
    for f in ("mean", "std", "sem"):
        assert getattr(got, f) == pytest.approx(getattr(ref, f), rel=1e-12, abs=0), f
    assert got.n == ref.n


@pytest.mark.parametrize("c", _SCALES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_are_scale_invariant_in_the_weights(backend, c):
    q, p, w = _mc_data()
    ref = fastkl.kl_mc_stats(q, p, mask=w, backend=backend)
    assert ref.mean == pytest.approx(0.005, rel=0.1)
    _close_stats(fastkl.kl_mc_stats(q, p, mask=w * c, backend=backend), ref)
    assert fastkl.kl_mc(q, p, mask=w * c, backend=backend) == pytest.approx(ref.mean, rel=1e-12)
    # chunks of different scales merge: a 1e-300 * w chunk next to a w chunk is negligible
    acc = fastkl.MCAccumulator(backend=backend)
    acc.update(q[:2500], p[:2500], mask=w[:2500] * c)
    other = fastkl.MCAccumulator(backend=backend).update(q[2500:], p[2500:], mask=w[2500:] * c)
    _close_stats(acc.merge(other).result(), ref)
    s, wsum = acc.total
    with np.errstate(over="ignore"):
        assert s == pytest.approx(float(np.sum(w * c * fastkl.kl_mc(q, p, reduction="none"))),
                                  rel=1e-9)
        assert wsum == pytest.approx(float(np.sum(w * c)), rel=1e-12)
    val, grad = fastkl.kl_mc_grad(q, p, mask=w * c, backend=backend)
    val1, grad1 = fastkl.kl_mc_grad(q, p, mask=w, backend=backend)
    assert val == pytest.approx(val1, rel=1e-12)
    np.testing.assert_allclose(grad, grad1, rtol=1e-12, atol=0)


@pytest.mark.parametrize("c", [1e-200, 1e308])
def test_file_stats_are_scale_invariant_in_the_weights(tmp_path, c):
    q, p, w = _mc_data()
    for name, arr in (("q", q), ("p", p), ("w", w), ("wc", w * c)):
        np.save(tmp_path / f"{name}.npy", arr)
    ref = fastkl.kl_mc_file(str(tmp_path / "q.npy"), str(tmp_path / "p.npy"),
                            mask=str(tmp_path / "w.npy"))
    got = fastkl.kl_mc_file(str(tmp_path / "q.npy"), str(tmp_path / "p.npy"),
                            mask=str(tmp_path / "wc.npy"))
    _close_stats(got, ref)


@pytest.mark.parametrize("c", [1e-300, 1e308])
def test_logits_weighted_mean_is_scale_invariant(c):
    rng = np.random.default_rng(1)
    a, b, w = rng.standard_normal((40, 30)), rng.standard_normal((40, 30)), rng.random(40)
    ref = kl_logits(a, b, mask=w, reduction="mean")
    assert kl_logits(a, b, mask=w * c, reduction="mean") == pytest.approx(ref, rel=1e-12)
    val, grad = kl_logits_grad(a, b, mask=w * c)
    val1, grad1 = kl_logits_grad(a, b, mask=w)
    assert val == pytest.approx(val1, rel=1e-12)
    np.testing.assert_allclose(grad, grad1, rtol=1e-12, atol=0)


def test_stats_from_partials_without_sum_w2_is_nan_not_an_error():
    st_ = fastkl.stream.stats_from_partials(np.array([1e-300, 1e-302, 0.0, 0.0, 0, 3]))
    assert st_.mean == pytest.approx(0.01) and math.isnan(st_.sem)


# --------------------------------------------------------------------------- item 12


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_0d_input_is_0d(backend, reduction):
    for dtype in (np.float64, np.float32):
        q, p = np.array(0.3, dtype), np.array(0.1, dtype)
        _, grad = fastkl.kl_mc_grad(q, p, reduction=reduction, backend=backend)
        assert grad.shape == () and grad.dtype == dtype
        _, g1 = fastkl.kl_mc_grad(q[None], p[None], reduction=reduction, backend=backend)
        assert grad[()] == g1[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_lists_work_as_float64(backend):
    assert fastkl.kl_mc([0, 1], [1, 0], backend=backend) == fastkl.kl_mc(
        [0.0, 1.0], [1.0, 0.0], backend=backend)
    assert fastkl.kl_mc(0, 1, backend=backend) == fastkl.kl_mc(0.0, 1.0, backend=backend)
    acc = fastkl.MCAccumulator(backend=backend).update([0, 1], [1, 0])
    assert acc.result().mean == fastkl.kl_mc([0.0, 1.0], [1.0, 0.0], backend=backend)
    # integer lists of logits stay token ids passed by mistake (test_logits_errors)
    with pytest.raises(TypeError, match="logits_p"):
        kl_logits([[0, 1, 2]], [[1.0, 1, 1]], backend=backend)
    # integer arrays, bools, None entries and ints beyond float64 stay a TypeError
    for bad in (np.array([0, 1]), [True, False], [None, 1.0], [10**400, 1]):
        with pytest.raises(TypeError, match="logq"):
            fastkl.kl_mc(bad, [1.0, 0.0], backend=backend)


@pytest.fixture
def small_slices(monkeypatch):
    """Kernel calls cut every 3 blocks (the default is 2**25 elements)."""
    from fastkl import mc

    monkeypatch.setattr(mc, "SLICE", 3 * 4096 + 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_kernel_calls_give_the_same_bits(backend, small_slices):
    rng = np.random.default_rng(12)
    q1 = rng.standard_normal(50_000).astype(np.float32)  # one row of several slices
    p1 = q1 + rng.standard_normal(50_000).astype(np.float32)
    q2, p2 = q1[:49_000].reshape(7, 7000), p1[:49_000].reshape(7, 7000)  # rows of 7000
    q3, p3 = q1[:48_000].reshape(400, 120), p1[:48_000].reshape(400, 120)  # groups of rows
    w1 = rng.random(50_000)
    from fastkl import mc

    def results():
        out = []
        for q, p in ((q1, p1), (q2, p2), (q3, p3), (q1[::-2], p1[::-2])):
            w = w1[: q.size].reshape(q.shape)
            out.append(fastkl.kl_mc_stats(q, p, mask=w, backend=backend))
            for red in ("mean", "sum", "none"):
                out.append(fastkl.kl_mc(q, p, mask=w, reduction=red, backend=backend))
                out.extend(fastkl.kl_mc_grad(q, p, mask=w, reduction=red, backend=backend))
            if q.ndim == 2:
                out.append(fastkl.kl_mc(q, p, axis=1, reduction="mean", backend=backend))
                out.append(kl_logits(q, p, backend=backend))
                out.append(jsd_logits(q, p, backend=backend))
                out.extend(kl_logits_grad(q, p, backend=backend))
                tok = np.zeros(q.shape[0], dtype=np.int64)
                out.append(token_logprobs(q, tok, backend=backend))
        acc = fastkl.MCAccumulator(backend=backend).update(q1, p1, mask=w1)
        out.append(acc.result())
        return out

    sliced = results()
    assert mc.SLICE < 20_000
    mc.SLICE = 1 << 40
    whole = results()
    for s, w in zip(sliced, whole, strict=True):
        if isinstance(s, fastkl.KLStats):
            assert s == w or (math.isnan(s.std) and math.isnan(w.std))
        else:
            np.testing.assert_array_equal(s, w)


_LONG_CALL = """
import sys, numpy as np, fastkl
n = 20_000_000_000  # one long kernel call before slicing (stride 0: ~no memory)
q = np.broadcast_to(np.float32(-1.0), (n,))
p = np.broadcast_to(np.float32(-1.5), (n,))
print("started", flush=True)
fastkl.kl_mc(q, p)
print("finished", flush=True)
"""


def test_ctrl_c_interrupts_a_long_call_promptly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(fastkl.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _LONG_CALL], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.5)  # inside the kernel calls now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the call did not stop within 10 s of SIGINT")
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "KeyboardInterrupt" in err, err
    assert "finished" not in out
    assert proc.returncode != 0
    assert waited < 10


@pytest.mark.parametrize("c", [1e-300, 1e-200, 1e308])
def test_dask_stats_are_scale_invariant_in_the_weights(c):
    da = pytest.importorskip("dask.array")
    q, p, w = _mc_data()
    w = w.copy()
    w[:3000] *= 2.0**-600  # chunks of different exponents in one graph
    ref = fastkl.kl_mc_stats(q, p, mask=w * c)  # in memory (scale-invariant: tested above)
    assert ref.mean == pytest.approx(fastkl.kl_mc_stats(q, p, mask=w).mean, rel=0.2)
    dq, dp = da.from_array(q, chunks=1000), da.from_array(p, chunks=1000)
    dw = da.from_array(w * c, chunks=1000)
    _close_stats(fastkl.kl_mc_stats(dq, dp, mask=dw).compute(), ref)
    assert float(fastkl.kl_mc(dq, dp, mask=dw).compute()) == pytest.approx(ref.mean, rel=1e-12)
    q2, p2, w2 = (x.reshape(6, 1000) for x in (q, p, w))
    ref2 = fastkl.kl_mc(q2, p2, mask=w2 * c, reduction="seq-mean-token-mean")
    got2 = fastkl.kl_mc(da.from_array(q2, chunks=(3, 500)), da.from_array(p2, chunks=(3, 500)),
                        mask=da.from_array(w2 * c, chunks=(3, 500)),
                        reduction="seq-mean-token-mean").compute()
    assert float(got2) == pytest.approx(ref2, rel=1e-12)
