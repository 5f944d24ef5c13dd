"""Full-vocabulary ops (``kl_logits``, ``jsd_logits``, ``entropy_logits``, ``token_logprobs``,
``kl_logits_grad``) of every backend against an independent float64 reference written here
(scipy ``log_softmax`` in float64, not fastkl's ``numpy_ref``) and against torch when it is
installed.

Tolerance (issue 3), per row: relative 1e-6 for float32 results / 1e-12 for float64 results,
or absolute 1e-7 / 1e-14 where the value is tiny; NaN and +-inf positions must match exactly.

Backends: every ``fastkl.available_backends()``; ``FASTKL_TEST_BACKENDS=numpy,numba`` restricts
the run (names listed there that are not available are reported as skipped).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

import fastkl

try:  # optional peer (not imported by the thread-count subprocesses: it is slow to import)
    if os.environ.get("_FASTKL_TEST_NO_TORCH"):
        raise ImportError
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    F = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

# --------------------------------------------------------------------------- backends


def backend_params() -> list:
    avail = fastkl.available_backends()
    env = os.environ.get("FASTKL_TEST_BACKENDS", "").strip()
    if not env:
        return list(avail)
    out = []
    for name in (n.strip() for n in env.split(",")):
        if not name:
            continue
        if name in avail:
            out.append(name)
        else:
            out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} unavailable")))
    return out


BACKENDS = backend_params()
OPS = ["kl", "jsd", "entropy", "token", "grad"]
DTYPES = [np.float16, np.float32, np.float64]
DT_IDS = ["f16", "f32", "f64"]

# --------------------------------------------------------------------------- tolerance


def result_dtype(*arrays) -> np.dtype:
    """float64 if any input is float64, else float32 (issue 3)."""
    if any(np.asarray(x).dtype.itemsize == 8 for x in arrays):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


TOL = {np.dtype(np.float32): (1e-6, 1e-7), np.dtype(np.float64): (1e-12, 1e-14)}


def assert_close(got, ref, dtype, what="", rtol=None, atol=None):
    """|got - ref| <= max(rtol |ref|, atol) elementwise; NaN / +-inf positions equal."""
    r, a = TOL[np.dtype(dtype)]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(ref, dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != {e.shape}"
    gn, en = np.isnan(g), np.isnan(e)
    assert np.array_equal(gn, en), (
        f"{what}: NaN positions differ: got NaN at {np.argwhere(gn).tolist()}, "
        f"expected at {np.argwhere(en).tolist()}; got={g.ravel()[:8]}, ref={e.ravel()[:8]}"
    )
    gi, ei = np.isinf(g), np.isinf(e)
    assert np.array_equal(gi, ei) and np.array_equal(g[gi], e[ei]), (
        f"{what}: inf positions differ: got {g[gi | ei]}, expected {e[gi | ei]}"
    )
    fin = np.isfinite(e)
    err = np.abs(g[fin] - e[fin])
    bound = np.maximum(rtol * np.abs(e[fin]), atol)
    bad = err > bound
    if bad.any():
        i = int(np.argmax(err / bound))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} values out of tolerance "
            f"(rtol={rtol}, atol={atol}); worst: got {g[fin][i]!r}, expected {e[fin][i]!r}, "
            f"|err|={err[i]:.3e}, rel={err[i] / max(abs(e[fin][i]), 1e-300):.3e}"
        )


# --------------------------------------------------------------------------- reference


def _lp(x, temperature, log_probs):
    """log-probabilities (float64, vocabulary last) of logits or log-probs ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if log_probs and temperature == 1.0:
        return x  # already log P: used as given (no renormalisation), as documented
    with np.errstate(invalid="ignore"):
        return log_softmax(x / temperature, axis=-1)


def _xdiff(p, u, v):
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p == 0, 0.0, p * (u - v)), axis=-1)


def ref_rows(op, a, b=None, *, temperature=1.0, beta=0.5, axis=-1, log_probs=False):
    """Per-row float64 value (shape = input shape without ``axis``)."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    lp = _lp(a, temperature, log_probs)
    with np.errstate(over="ignore"):
        p = np.exp(lp)
    if op == "entropy":
        return -_xdiff(p, lp, 0.0)
    b = np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1)
    lq = _lp(b, temperature, log_probs)
    q = np.exp(lq)
    if op == "kl":
        return _xdiff(p, lp, lq)
    assert op == "jsd"
    row_nan = np.isnan(lp).any(-1) | np.isnan(lq).any(-1)
    if beta in (0.0, 1.0):  # M = Q (resp. P): JSD = KL(Q||Q) = 0 whatever the supports
        return np.where(row_nan, np.nan, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lm = np.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
    return beta * _xdiff(p, lp, lm) + (1.0 - beta) * _xdiff(q, lq, lm)


def ref_token(b, tokens, *, temperature=1.0, axis=-1, ignore_index=-100):
    b = np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1)
    lq = _lp(b, temperature, False)
    t = np.asarray(tokens, dtype=np.int64)
    keep = t != ignore_index
    idx = np.where(keep, t, 0)
    val = np.take_along_axis(lq, idx[..., None], axis=-1)[..., 0]
    return np.where(keep, val, 0.0)


def ref_grad_rows(a, b, *, temperature=1.0, axis=-1):
    """(KL per row, (Q - P)/T per element, vocabulary last)."""
    a64 = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    b64 = np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1)
    lp, lq = _lp(a64, temperature, False), _lp(b64, temperature, False)
    return ref_rows("kl", a, b, temperature=temperature, axis=axis), (
        (np.exp(lq) - np.exp(lp)) / temperature
    )


def ref_reduce(vals, mask, reduction):
    vals = np.asarray(vals, dtype=np.float64)
    if mask is not None:
        w = np.asarray(mask, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            vals = np.where(w != 0, vals * w, 0.0)
    else:
        w = np.ones_like(vals)
    if reduction == "none":
        return vals
    if reduction == "sum":
        return float(vals.sum())
    return float(vals.sum() / w.sum())


def grad_scale(lead_shape, mask, reduction):
    w = np.ones(lead_shape) if mask is None else np.asarray(mask, dtype=np.float64)
    return w / w.sum() if reduction == "mean" else w


# --------------------------------------------------------------------------- input guard


class Unmodified:
    """Snapshots arrays (values, dtype, strides, flags) and checks them after a call."""

    def __init__(self, *arrays):
        self.items = [
            (x, np.array(x, copy=True), x.dtype, x.strides, x.flags.writeable)
            for x in arrays
            if isinstance(x, np.ndarray)
        ]

    def check(self):
        for x, copy, dt, st, wr in self.items:
            assert x.dtype == dt and x.strides == st and x.flags.writeable == wr
            same = np.array_equal(x, copy, equal_nan=x.dtype.kind in "fc")
            assert same, "an input array was modified"


def run_op(op, backend, a, b=None, *, tokens=None, beta=0.5, **kw):
    """Calls the public function for ``op``; checks the inputs are left alone."""
    guard = Unmodified(a, b, tokens, kw.get("mask"))
    if op == "kl":
        res = fastkl.kl_logits(a, b, backend=backend, **kw)
    elif op == "jsd":
        res = fastkl.jsd_logits(a, b, beta, backend=backend, **kw)
    elif op == "entropy":
        res = fastkl.entropy_logits(a, backend=backend, **kw)
    elif op == "token":
        res = fastkl.token_logprobs(a, tokens, backend=backend, **kw)
    elif op == "grad":
        res = fastkl.kl_logits_grad(a, b, backend=backend, **kw)
    else:
        raise AssertionError(op)
    guard.check()
    return res


def check_op(op, backend, a, b, *, axis=-1, temperature=1.0, beta=0.5, tokens=None,
             log_probs=False, what=""):
    """One op of one backend against the float64 reference, result dtype included."""
    dt = result_dtype(a) if op in ("entropy", "token") else result_dtype(a, b)
    lead = np.moveaxis(np.asarray(a), axis, -1).shape[:-1]
    kw = {"axis": axis, "temperature": temperature}
    if op in ("kl", "jsd", "entropy"):
        kw["log_probs"] = log_probs
        got = run_op(op, backend, a, b, beta=beta, **kw)
        ref = ref_rows(op, a, b, temperature=temperature, beta=beta, axis=axis,
                       log_probs=log_probs)
    elif op == "token":
        got = run_op(op, backend, a, tokens=tokens, **kw)
        ref = ref_token(a, tokens, temperature=temperature, axis=axis)
    else:
        value, grad = run_op("grad", backend, a, b, **kw)
        kl, g = ref_grad_rows(a, b, temperature=temperature, axis=axis)
        assert type(value) is float, f"{what}: reduction returned {type(value)}"
        assert_close(value, kl.mean(), dt, f"{what} grad value")
        assert grad.shape == np.shape(b) and grad.dtype == dt, (grad.shape, grad.dtype)
        check_grad(grad, g, grad_scale(lead, None, "mean"), a, b, temperature, axis, dt, what)
        return
    got_arr = np.asarray(got)
    assert got_arr.dtype == dt, f"{what}: result dtype {got_arr.dtype}, expected {dt}"
    assert got_arr.shape == lead, f"{what}: result shape {got_arr.shape}, expected {lead}"
    assert_close(got_arr, ref, dt, what)


def check_grad(grad, g_ref, scale, a, b, temperature, axis, dt, what):
    """grad (vocabulary at ``axis``) vs scale[row] * (Q - P)/T; bound per element
    rtol * scale * (P + Q)/T (the rounding of a difference of probabilities), or atol."""
    rtol, atol = TOL[np.dtype(dt)]
    got = np.moveaxis(np.asarray(grad, dtype=np.float64), axis, -1)
    ref = scale[..., None] * g_ref
    lp = _lp(np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1), temperature, False)
    lq = _lp(np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1), temperature, False)
    mag = np.abs(scale[..., None]) * (np.exp(lp) + np.exp(lq)) / temperature
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{what}: grad NaN positions differ"
    fin = np.isfinite(ref)
    err = np.abs(got[fin] - ref[fin])
    bound = np.maximum(rtol * mag[fin], atol)
    bad = err > bound
    if bad.any():
        i = int(np.argmax(err / bound))
        raise AssertionError(
            f"{what}: grad {int(bad.sum())}/{bad.size} elements out of tolerance; worst got "
            f"{got[fin][i]!r} expected {ref[fin][i]!r} (bound {bound[i]:.3e})"
        )


# --------------------------------------------------------------------------- layouts


def logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def pair(rng, shape, dtype):
    """(logits_p, logits_q): correlated, so KL is moderate (~0.1 - 1)."""
    a = rng.standard_normal(shape) * 3.0
    b = 0.8 * a + rng.standard_normal(shape)
    return a.astype(dtype), b.astype(dtype)


def _memmap(tmp_path, name, x):
    path = Path(tmp_path) / f"{name}.npy"
    np.save(path, x)
    return np.load(path, mmap_mode="r")


V = 37  # odd, and not a multiple of any SIMD width


def make_layout(name, rng, dtype, tmp_path):
    """(a, b, axis) for one layout; a, b share shape, dtype and layout."""
    def both(f, shape):
        a, b = pair(rng, shape, dtype)
        return f(a, "a"), f(b, "b")

    ident = lambda x, _: x  # noqa: E731
    if name == "1d":
        return (*both(ident, (V,)), -1)
    if name == "2d":
        return (*both(ident, (5, V)), -1)
    if name == "3d":
        return (*both(ident, (2, 3, V)), -1)
    if name == "2d-axis0":
        return (*both(ident, (V, 4)), 0)
    if name == "3d-axis0":
        return (*both(ident, (V, 2, 3)), 0)
    if name == "3d-axis1":  # [B, V, S]: leading axes of the moved view cannot be merged
        return (*both(ident, (2, V, 3)), 1)
    if name == "3d-axis-neg2":
        return (*both(ident, (3, V, 2)), -2)
    if name == "transposed":
        return (*both(lambda x, _: x.T, (V, 5)), -1)
    if name == "fortran":
        return (*both(lambda x, _: np.asfortranarray(x), (5, V)), -1)
    if name == "strided":
        return (*both(lambda x, _: x[:, ::2], (5, 2 * V)), -1)
    if name == "strided-rows":
        return (*both(lambda x, _: x[::2], (10, V)), -1)
    if name == "3d-strided-seq":  # [B, S, V][:, ::2]: rows not mergeable
        return (*both(lambda x, _: x[:, ::2], (2, 6, V)), -1)
    if name == "negstride":
        return (*both(lambda x, _: x[::-1, ::-1], (5, V)), -1)
    if name == "3d-axis1-negstride":
        return (*both(lambda x, _: x[::-1, ::-1, ::-1], (2, V, 3)), 1)
    if name == "bigendian":
        return (*both(lambda x, _: x.astype(x.dtype.newbyteorder(">")), (5, V)), -1)
    if name == "bigendian-3d-axis1":
        return (*both(lambda x, _: x.astype(x.dtype.newbyteorder(">")), (2, V, 3)), 1)
    if name == "readonly":
        def ro(x, _):
            x.setflags(write=False)
            return x
        return (*both(ro, (5, V)), -1)
    if name == "memmap":
        return (*both(lambda x, n: _memmap(tmp_path, n, x), (5, V)), -1)
    if name == "memmap-bigendian-transposed":
        return (*both(lambda x, n: _memmap(tmp_path, n, x.astype(x.dtype.newbyteorder(">"))).T,
                      (V, 4)), -1)
    raise AssertionError(name)


LAYOUTS = ["1d", "2d", "3d", "2d-axis0", "3d-axis0", "3d-axis1", "3d-axis-neg2", "transposed",
           "fortran", "strided", "strided-rows", "3d-strided-seq", "negstride",
           "3d-axis1-negstride", "bigendian", "bigendian-3d-axis1", "readonly", "memmap",
           "memmap-bigendian-transposed"]


def tokens_for(rng, a, axis, ignore_index=-100):
    lead = np.moveaxis(np.asarray(a), axis, -1).shape[:-1]
    vocab = np.shape(a)[axis]
    t = rng.integers(0, vocab, size=lead)
    if t.ndim and t.size > 1:
        t.ravel()[1] = ignore_index
    return t


# --------------------------------------------------------------------------- 1. vs reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_layouts_vs_reference(backend, dtype, layout, op, tmp_path):
    rng = np.random.default_rng(zlib.crc32(f"{layout}-{np.dtype(dtype)}".encode()))
    a, b, axis = make_layout(layout, rng, dtype, tmp_path)
    tokens = tokens_for(rng, a, axis) if op == "token" else None
    check_op(op, backend, a, b, axis=axis, tokens=tokens, what=f"{op}/{layout}")
    if op == "jsd":
        check_op(op, backend, a, b, axis=axis, beta=0.1, what=f"{op}0.1/{layout}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "grad"])
def test_mixed_dtypes_computed_in_float64(backend, op, rng):
    a, b = pair(rng, (4, V), np.float64)
    a32 = a.astype(np.float32)
    check_op(op, backend, a32, b, what=f"{op} f32/f64")
    check_op(op, backend, b, a.astype(np.float16), what=f"{op} f64/f16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("vocab", [1, 2, 7, 50257])
@pytest.mark.parametrize("op", OPS)
def test_vocab_sizes(backend, dtype, vocab, op, rng):
    rows = 3 if vocab > 1000 else 6
    a, b = pair(rng, (rows, vocab), dtype)
    tokens = tokens_for(rng, a, -1) if op == "token" else None
    check_op(op, backend, a, b, tokens=tokens, what=f"{op} V={vocab}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("vocab", [151936, 256000])
@pytest.mark.parametrize("op", OPS)
def test_large_vocab(backend, dtype, vocab, op, rng):
    a, b = pair(rng, (2, vocab), dtype)
    tokens = tokens_for(rng, a, -1) if op == "token" else None
    check_op(op, backend, a, b, tokens=tokens, what=f"{op} V={vocab}")
    # the vocabulary on axis 0 (strided rows inside the kernel)
    check_op(op, backend, a.T, b.T, axis=0,
             tokens=tokens, what=f"{op} V={vocab} axis 0")


def test_vocab_one_is_degenerate(rng):
    """V = 1: P = Q = [1]: KL = JSD = entropy = 0, log Q[0] = 0 (checks the reference)."""
    a, b = pair(rng, (4, 1), np.float64)
    for op in ("kl", "jsd", "entropy"):
        assert np.array_equal(ref_rows(op, a, b), np.zeros(4))
    assert np.array_equal(ref_token(b, np.zeros(4, dtype=int)), np.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.3])
@pytest.mark.parametrize("op", OPS)
def test_temperatures(backend, dtype, temperature, op, rng):
    a, b = pair(rng, (2, 3, 101), dtype)
    tokens = tokens_for(rng, a, -1) if op == "token" else None
    check_op(op, backend, a, b, temperature=temperature, tokens=tokens,
             what=f"{op} T={temperature}")
    # and with the vocabulary in the middle
    a1, b1 = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)
    t1 = tokens
    check_op(op, backend, a1, b1, axis=1, temperature=temperature, tokens=t1,
             what=f"{op} T={temperature} axis 1")


def test_temperature_changes_result(rng):
    """Guards the temperature tests against vacuity: the reference depends on T."""
    a, b = pair(rng, (3, 11), np.float64)
    v = [ref_rows("kl", a, b, temperature=t) for t in (0.5, 1.0, 2.3)]
    assert not np.allclose(v[0], v[1]) and not np.allclose(v[1], v[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.3])
@pytest.mark.parametrize("op", ["kl", "jsd", "entropy"])
def test_log_probs(backend, dtype, temperature, op, rng):
    a, b = pair(rng, (4, 53), np.float64)
    la = log_softmax(a, axis=-1).astype(dtype)
    lb = log_softmax(b, axis=-1).astype(dtype)
    # the input taken as log P as given at T=1, renormalised at other T
    check_op(op, backend, la, lb, temperature=temperature, log_probs=True,
             what=f"{op} log_probs T={temperature}")
    # and in float64, log_probs=True on log_softmax(a) agrees with log_probs=False on a
    if dtype == np.float64:
        got = run_op(op, backend, la, lb, temperature=temperature, log_probs=True)
        ref = ref_rows(op, a, b, temperature=temperature)
        assert_close(got, ref, np.float64, f"{op} log_probs vs logits")


# --------------------------------------------------------------------------- -inf and NaN


def special_rows(dtype):
    """(a, b) of 9 rows x 6 with -inf / NaN patterns, and the expected class of KL."""
    base_a = np.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.5])
    base_b = np.array([-0.3, 0.7, 1.0, 0.2, -2.0, 0.9])
    a = np.tile(base_a, (9, 1))
    b = np.tile(base_b, (9, 1))
    ninf = -np.inf
    a[0, 1] = ninf                 # zero probability in P only
    b[1, 2] = ninf                 # in Q only, where P > 0: KL = +inf
    a[2, 3] = b[2, 3] = ninf       # in both
    a[3, :] = b[3, :] = ninf       # all -inf: NaN
    a[4, 1:] = ninf                # P a point mass, Q full support
    b[4, :3] = ninf                # and Q zero at two tokens where P is 0 too
    b[4, 0] = 0.0
    a[5, 0] = np.nan               # NaN in P
    b[6, 4] = np.nan               # NaN in Q
    a[7, :] = ninf                 # P all -inf, Q finite: NaN
    a[8, [0, 2]] = ninf            # P zero where Q > 0 and Q zero where P > 0
    b[8, [1, 3]] = ninf
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.3])
@pytest.mark.parametrize("op", ["kl", "jsd0", "jsd0.1", "jsd0.5", "jsd1", "entropy_p",
                                "entropy_q", "token", "grad"])
def test_inf_nan_patterns(backend, dtype, temperature, op):
    a, b = special_rows(dtype)
    what = f"{op} -inf/NaN T={temperature}"
    if op.startswith("jsd"):
        check_op("jsd", backend, a, b, beta=float(op[3:]), temperature=temperature, what=what)
    elif op == "entropy_p":
        check_op("entropy", backend, a, None, temperature=temperature, what=what)
    elif op == "entropy_q":
        check_op("entropy", backend, b, None, temperature=temperature, what=what)
    elif op == "token":
        # token 2 is -inf in row 1 (log Q = -inf), row 3 all -inf (NaN), row 4 -inf
        tok = np.full(9, 2)
        tok[0] = -100
        check_op("token", backend, b, None, tokens=tok, temperature=temperature, what=what)
        got = fastkl.token_logprobs(b, tok, temperature=temperature, backend=backend)
        assert got[0] == 0.0 and got[1] == -np.inf and np.isnan(got[3])
    elif op == "grad":
        value, grad = fastkl.kl_logits_grad(a, b, temperature=temperature, reduction="none",
                                            backend=backend)
        kl, g = ref_grad_rows(a, b, temperature=temperature)
        assert_close(value, kl, result_dtype(a), what)
        check_grad(grad, g, np.ones(9), a, b, temperature, -1, result_dtype(a), what)
    else:
        check_op(op, backend, a, b, temperature=temperature, what=what)
    if op == "kl":  # the documented classes, independent of the reference
        got = fastkl.kl_logits(a, b, temperature=temperature, backend=backend)
        assert np.isfinite(got[[0, 2, 4]]).all() and (got[[0, 2, 4]] > 0).all()
        assert got[1] == np.inf and got[8] == np.inf
        assert np.isnan(got[[3, 5, 6, 7]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [5e-324, 1e-310, 1e-300, 1.0 - 2.0**-53])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_jsd_tiny_weight_with_disjoint_support(backend, beta, dtype):
    """beta P + (1 - beta) Q underflows where Q = 0 < P and beta is tiny: log M must be taken
    in log space (found by hypothesis: beta = 5e-324 gave +inf)."""
    a, b = special_rows(dtype)
    ok = [0, 1, 2, 4, 8]  # rows without NaN / all -inf; 1 and 8 have disjoint supports
    for t in (1.0, 0.5):
        check_op("jsd", backend, a[ok], b[ok], beta=beta, temperature=t, what=f"jsd {beta}")
        check_op("jsd", backend, b[ok], a[ok], beta=beta, temperature=t, what=f"jsd {beta}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_jsd_running_max_grows_along_the_row(backend, dtype, beta, rng):
    """Rows whose maximum grows chunk after chunk (and one that drops to -inf and back):
    the Cython JSD keeps pass 1's exps, taken against the running maximum of their chunk,
    and rescales them in pass 2; the result must not depend on where the maximum was
    found."""
    V = 3000
    ramp = np.linspace(-30.0, 30.0, V)
    a = np.stack([ramp, ramp[::-1], ramp + rng.normal(0, 2, V), np.full(V, 1.5)])
    b = a + rng.normal(0, 1, a.shape)
    a[1, 1000:1600] = -np.inf
    b[3, ::7] = -np.inf
    a, b = a.astype(dtype), b.astype(dtype)
    for x, y in ((a, b), (b, a)):
        check_op("jsd", backend, x, y, beta=beta, what="jsd ramp")
    same = fastkl.jsd_logits(a, a.copy(), beta, backend=backend)
    assert np.array_equal(same, np.zeros(len(a))), same


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_beta_endpoints_zero_with_disjoint_support(backend, beta):
    """JSD_0 = KL(Q||Q) = 0 and JSD_1 = KL(P||P) = 0 for rows with -inf logits too
    ('beta in [0, 1] (0 and 1 give 0)', '-inf logits are valid')."""
    a, b = special_rows(np.float64)
    ok = [0, 1, 2, 4, 8]  # rows without NaN / all -inf
    got = fastkl.jsd_logits(a[ok], b[ok], beta, backend=backend)
    assert np.array_equal(got, np.zeros(len(ok))), got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "entropy"])
def test_all_ninf_row_is_nan_with_log_probs(backend, op):
    """'A row of all -inf is NaN' — also for log_probs=True inputs (it is no distribution)."""
    a = log_softmax(np.array([[0.1, 2.0, -1.0], [0.0, 0.0, 0.0]]), axis=-1)
    a[1] = -np.inf
    got = run_op(op, backend, a, a[::-1].copy(), log_probs=True)
    assert np.isnan(got[1]), f"{op} of an all -inf row with log_probs=True gave {got[1]!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "entropy", "token"])
def test_nan_stays_in_its_row(backend, op, rng):
    a, b = pair(rng, (4, 300), np.float32)
    a[2, 150] = np.nan
    b[2, 7] = np.nan
    tok = np.arange(4)
    got = run_op(op, backend, a, b, tokens=tok)
    assert np.isnan(got[2]) and np.isfinite(got[[0, 1, 3]]).all()


# --------------------------------------------------------------------------- masks, reductions


def _mask(kind, shape, rng):
    if kind is None:
        return None
    if kind == "bool":
        m = rng.random(shape) < 0.6
        m.ravel()[0] = True
        m.ravel()[-1] = False
        return m
    if kind == "weights":
        w = rng.random(shape) * 2.0
        w.ravel()[-1] = 0.0
        return w
    if kind == "int":
        w = rng.integers(0, 3, size=shape)
        w.ravel()[0], w.ravel()[-1] = 2, 0
        return w
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "weights", "int"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("op", ["kl", "jsd", "entropy"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_mask_and_reduction(backend, dtype, mask_kind, reduction, op, axis, rng):
    a, b = pair(rng, (3, 4, 29), dtype)
    if axis == 1:
        a, b = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)
    lead = (3, 4)
    mask = _mask(mask_kind, lead, rng)
    # a NaN in a masked-out row must not reach the result
    if mask is not None:
        off = np.argwhere(np.asarray(mask) == 0)[0]
        idx = (off[0], 5, off[1]) if axis == 1 else (off[0], off[1], 5)
        a = a.copy()
        a[idx] = np.nan
    got = run_op(op, backend, a, b, axis=axis, mask=mask, reduction=reduction)
    ref = ref_reduce(ref_rows(op, a, b, axis=axis), mask, reduction)
    dt = result_dtype(a, b)
    if reduction == "none":
        assert isinstance(got, np.ndarray) and got.dtype == dt and got.shape == lead
        if mask is not None:
            assert (got[np.asarray(mask) == 0] == 0.0).all()
    else:
        assert type(got) is float, type(got)
        assert np.isfinite(got)
    assert_close(got, ref, dt, f"{op} {reduction} mask={mask_kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_row_results(backend, rng):
    """1-D input: 'none' gives a 0-d float32/float64 value; reductions a Python float."""
    for dt in DTYPES:
        a, b = pair(rng, (17,), dt)
        r = fastkl.kl_logits(a, b, backend=backend)
        assert np.ndim(r) == 0 and np.asarray(r).dtype == result_dtype(a)
        assert type(fastkl.kl_logits(a, b, reduction="mean", backend=backend)) is float
        assert type(fastkl.entropy_logits(a, reduction="sum", backend=backend)) is float
        t = fastkl.token_logprobs(a, 3, backend=backend)
        assert np.ndim(t) == 0 and np.asarray(t).dtype == result_dtype(a)


# --------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 7])
def test_token_ignore_index(backend, dtype, ignore_index, rng):
    b = logits(rng, (3, 5, 11), dtype)
    tok = rng.integers(0, 11, size=(3, 5))
    tok[0, 0] = tok[2, 4] = ignore_index
    if ignore_index == 7:
        tok[tok == 7] = ignore_index  # a valid id used as ignore_index: those rows give 0
    got = run_op("token", backend, b, tokens=tok, ignore_index=ignore_index)
    ref = ref_token(b, tok, ignore_index=ignore_index)
    assert (got[tok == ignore_index] == 0.0).all()
    assert (got[tok != ignore_index] < 0).all()
    assert_close(got, ref, result_dtype(b), f"token ignore_index={ignore_index}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tok_dtype", [np.int8, np.uint16, np.int32, np.int64, np.uint64])
def test_token_integer_dtypes(backend, tok_dtype, rng):
    b = logits(rng, (6, 19), np.float64)
    tok = rng.integers(0, 19, size=6).astype(tok_dtype)
    got = run_op("token", backend, b, tokens=tok, ignore_index=-100)
    assert_close(got, ref_token(b, tok.astype(np.int64)), np.float64, "token int dtypes")


# --------------------------------------------------------------------------- kl_logits_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "weights"])
@pytest.mark.parametrize("temperature", [1.0, 2.3])
def test_grad_vs_reference(backend, dtype, reduction, mask_kind, temperature, rng):
    a, b = pair(rng, (2, 3, 23), dtype)
    a, b = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)  # vocabulary on axis 1
    lead = (2, 3)
    mask = _mask(mask_kind, lead, rng)
    value, grad = run_op("grad", backend, a, b, axis=1, mask=mask, reduction=reduction,
                         temperature=temperature)
    kl, g = ref_grad_rows(a, b, temperature=temperature, axis=1)
    dt = result_dtype(a)
    ref_value = ref_reduce(kl, mask, reduction)
    if reduction == "none":
        assert isinstance(value, np.ndarray) and value.dtype == dt and value.shape == lead
    else:
        assert type(value) is float
    assert_close(value, ref_value, dt, f"grad value {reduction}")
    # same value as kl_logits with the same arguments
    kv = fastkl.kl_logits(a, b, axis=1, mask=mask, reduction=reduction,
                          temperature=temperature, backend=backend)
    assert_close(value, kv, dt, "grad value vs kl_logits")
    assert grad.shape == b.shape and grad.dtype == dt
    check_grad(grad, g, grad_scale(lead, mask, reduction), a, b, temperature, 1, dt,
               f"grad {reduction} mask={mask_kind}")
    if mask is not None:  # masked-out rows have exactly zero gradient
        zero = np.moveaxis(grad, 1, -1)[np.asarray(mask) == 0]
        assert (zero == 0.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_finite_differences(backend, reduction, rng):
    """d value / d logits_q by central differences in float64 (sum over rows for 'none')."""
    a, b = pair(rng, (3, 5), np.float64)
    mask = np.array([1.0, 0.5, 2.0])
    temperature = 1.7

    def f(bq):
        v = fastkl.kl_logits(a, bq, temperature=temperature, mask=mask, reduction=reduction,
                             backend=backend)
        return float(np.sum(v))

    _, grad = fastkl.kl_logits_grad(a, b, temperature=temperature, mask=mask,
                                    reduction=reduction, backend=backend)
    h = 1e-5
    fd = np.empty_like(b)
    for idx in np.ndindex(b.shape):
        bp, bm = b.copy(), b.copy()
        bp[idx] += h
        bm[idx] -= h
        fd[idx] = (f(bp) - f(bm)) / (2 * h)
    # truncation O(h^2) ~ 1e-10, rounding ~ 1e-16 / h ~ 1e-11
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-9)
    assert np.abs(fd).max() > 1e-2  # not vacuous


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_mean_zero_weight_gives_zero_grad(backend, rng):
    a, b = pair(rng, (3, 9), np.float32)
    value, grad = fastkl.kl_logits_grad(a, b, mask=np.zeros(3, dtype=bool), backend=backend)
    assert math.isnan(value)  # mean over no rows
    assert grad.dtype == np.float32 and (grad == 0.0).all()


# --------------------------------------------------------------------------- torch


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float64)))


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.3])
def test_vs_torch(backend, dtype, temperature, rng):
    a, b = pair(rng, (2, 3, 211), dtype)
    tp, tq = _t(a) / temperature, _t(b) / temperature
    lp, lq = F.log_softmax(tp, -1), F.log_softmax(tq, -1)
    dt = result_dtype(a)
    # KL
    kl_t = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).numpy()
    assert_close(ref_rows("kl", a, b, temperature=temperature), kl_t, np.float64, "ref vs torch")
    assert_close(fastkl.kl_logits(a, b, temperature=temperature, backend=backend), kl_t, dt,
                 "kl vs torch")
    # JSD (beta = 0.1, 0.5), from torch log-probabilities
    for beta in (0.1, 0.5):
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        js = (beta * F.kl_div(lm, lp, log_target=True, reduction="none").sum(-1)
              + (1 - beta) * F.kl_div(lm, lq, log_target=True, reduction="none").sum(-1))
        assert_close(fastkl.jsd_logits(a, b, beta, temperature=temperature, backend=backend),
                     js.numpy(), dt, f"jsd{beta} vs torch")
    # entropy
    ent = torch.distributions.Categorical(logits=tp).entropy().numpy()
    assert_close(fastkl.entropy_logits(a, temperature=temperature, backend=backend), ent, dt,
                 "entropy vs torch")
    # token log-probs: log_softmax + gather
    tok = rng.integers(0, 211, size=(2, 3))
    g = lq.gather(-1, torch.from_numpy(tok)[..., None])[..., 0].numpy()
    assert_close(fastkl.token_logprobs(b, tok, temperature=temperature, backend=backend), g, dt,
                 "token vs torch")
    # gradient by autograd, mean over rows with weights
    w = rng.random((2, 3))
    tq2 = _t(b).requires_grad_(True)
    lq2 = F.log_softmax(tq2 / temperature, -1)
    kl_rows = F.kl_div(lq2, lp, log_target=True, reduction="none").sum(-1)
    loss = (kl_rows * _t(w)).sum() / w.sum()
    loss.backward()
    value, grad = fastkl.kl_logits_grad(a, b, temperature=temperature, mask=w,
                                        backend=backend)
    assert_close(value, loss.item(), dt, "grad value vs torch")
    P = np.exp(lp.numpy())
    Q = np.exp(lq.detach().numpy())
    mag = (w / w.sum())[..., None] * (P + Q) / temperature
    err = np.abs(grad.astype(np.float64) - tq2.grad.numpy())
    rtol, atol = TOL[dt]
    assert (err <= np.maximum(rtol * mag, atol)).all(), err.max()


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
def test_vs_torch_big_vocab(backend, rng):
    a, b = pair(rng, (3, 50257), np.float32)
    kl_t = F.kl_div(F.log_softmax(_t(b), -1), F.log_softmax(_t(a), -1), log_target=True,
                    reduction="none").sum(-1).numpy()
    assert_close(fastkl.kl_logits(a, b, backend=backend), kl_t, np.float32, "kl vs torch V=50257")


# --------------------------------------------------------------------------- determinism


def _det_inputs():
    rng = np.random.default_rng(2024)
    a, b = pair(rng, (37, 8191), np.float32)
    return a, b, rng.integers(0, 8191, size=37)


def _digest(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x, dtype=np.float64)).tobytes()
                          ).hexdigest()


def _all_results(backend, a, b, tok):
    out = {}
    for dt in (np.float32, np.float64):
        a1, b1 = a.astype(dt), b.astype(dt)
        out[f"kl{dt.__name__}"] = fastkl.kl_logits(a1, b1, temperature=1.3, backend=backend)
        out[f"klmean{dt.__name__}"] = fastkl.kl_logits(a1, b1, reduction="mean", backend=backend)
        out[f"jsd{dt.__name__}"] = fastkl.jsd_logits(a1, b1, 0.3, backend=backend)
        out[f"ent{dt.__name__}"] = fastkl.entropy_logits(a1, backend=backend)
        out[f"tok{dt.__name__}"] = fastkl.token_logprobs(b1, tok, backend=backend)
        v, g = fastkl.kl_logits_grad(a1, b1, backend=backend)
        out[f"gradv{dt.__name__}"] = v
        out[f"grad{dt.__name__}"] = g
        kw = dict(wrt="both", reduction="none", temperature=0.8, backend=backend)
        for name, res in (("klgrad2", fastkl.kl_logits_grad(a1, b1, **kw)),
                          ("jsdgrad", fastkl.jsd_logits_grad(a1, b1, 0.3, **kw)),
                          ("entgrad", fastkl.entropy_logits_grad(a1, reduction="none",
                                                                 backend=backend)),
                          ("tokgrad", fastkl.token_logprobs_grad(b1, tok, backend=backend))):
            for k, x in enumerate(res):
                out[f"{name}{k}{dt.__name__}"] = x
    out["kl_f16_axis0"] = fastkl.kl_logits(a[:8].T.astype(np.float16),
                                           b[:8].T.astype(np.float16), axis=0, backend=backend)
    return {k: _digest(v) for k, v in out.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_call_to_call(backend):
    a, b, tok = _det_inputs()
    first = _all_results(backend, a, b, tok)
    assert _all_results(backend, a, b, tok) == first
    assert _all_results(backend, a, b, tok) == first


_THREAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import test_logits as T
    a, b, tok = T._det_inputs()
    res = {{}}
    for be in {backends!r}:
        try:
            res[be] = T._all_results(be, a, b, tok)
        except Exception as exc:
            res[be] = repr(exc)
    print(json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def thread_results():
    names = [p if isinstance(p, str) else None for p in BACKENDS]
    names = [n for n in names if n]
    script = _THREAD_SCRIPT.format(tests=str(Path(__file__).parent), backends=names)
    out = {}
    for n in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n),
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", _FASTKL_TEST_NO_TORCH="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(fastkl.__file__).parent.parent), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_across_thread_counts(backend, thread_results):
    one, two = thread_results[1][backend], thread_results[2][backend]
    assert isinstance(one, dict), f"backend failed with 1 thread: {one}"
    assert isinstance(two, dict), f"backend failed with 2 threads: {two}"
    differ = [k for k in one if one[k] != two.get(k)]
    assert not differ, f"results differ between 1 and 2 threads: {differ}"
    # and the same bits as in this process
    a, b, tok = _det_inputs()
    assert _all_results(backend, a, b, tok) == one


# --------------------------------------------------------------------------- peak memory

_MEM_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import fastkl
    backend = None if sys.argv[1] == "default" else sys.argv[1]
    dtype = np.dtype(sys.argv[2])
    rows, vocab = 256, 131072
    rng = np.random.default_rng(0)
    a = np.empty((rows, vocab), dtype)
    b = np.empty((rows, vocab), dtype)
    for i in range(0, rows, 16):  # fill without a big float64 temporary
        a[i:i + 16] = rng.standard_normal((16, vocab), dtype=np.float32) * 3
        b[i:i + 16] = rng.standard_normal((16, vocab), dtype=np.float32) * 3
    fastkl.kl_logits(a[:2, :1000], b[:2, :1000], backend=backend)  # JIT / import warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = fastkl.kl_logits(a, b, backend=backend)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert r.shape == (rows,) and np.isfinite(r).all()
    print((after - before) * 1024)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "backend",
    [b for b in BACKENDS if b != "numpy"]
    # backend=None (the fastest available) unless the run is restricted to some backends
    + ([] if os.environ.get("FASTKL_TEST_BACKENDS", "").strip() else ["default"]))
def test_peak_memory(backend, dtype):
    """Extra memory O(rows): peak RSS rises by < 100 MB on two [256, 131072] inputs (the
    numpy reference backend materializes [rows, V] float64 temporaries by design and is not
    held to this)."""
    if dtype == "float16" and backend != "default":
        pytest.skip("float16 conversion is in the public layer: checked once")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(fastkl.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, backend, dtype], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = int(proc.stdout.strip().splitlines()[-1])
    assert extra < 100e6, f"peak RSS rose by {extra / 1e6:.1f} MB"


_GRAD_MEM_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import fastkl
    backend = None if sys.argv[1] == "default" else sys.argv[1]
    op = sys.argv[2]
    rows, vocab = 128, 131072
    rng = np.random.default_rng(0)
    a = np.empty((rows, vocab), np.float32)
    b = np.empty((rows, vocab), np.float32)
    for i in range(0, rows, 16):
        a[i:i + 16] = rng.standard_normal((16, vocab), dtype=np.float32) * 3
        b[i:i + 16] = rng.standard_normal((16, vocab), dtype=np.float32) * 3
    tok = rng.integers(0, vocab, rows)
    calls = {
        "kl": lambda x, y: fastkl.kl_logits_grad(x, y, wrt="both", backend=backend),
        "jsd": lambda x, y: fastkl.jsd_logits_grad(x, y, 0.3, wrt="both", backend=backend),
        "entropy": lambda x, y: fastkl.entropy_logits_grad(x, backend=backend),
        "token": lambda x, y: fastkl.token_logprobs_grad(y, tok[:len(y)] % y.shape[1],
                                                         backend=backend),
    }
    calls[op](a[:2, :1000], b[:2, :1000])  # JIT / import warm-up

    def kb(field):
        with open("/proc/self/status") as f:
            return int(f.read().split(field + ":")[1].split()[0])

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = kb("VmHWM")
    res = calls[op](a, b)
    after = kb("VmHWM")
    grads = [g for g in res[1:] if g is not None]
    assert all(g.shape == a.shape and g.dtype == np.float32 for g in grads)
    print(len(grads), (after - before) * 1024)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["kl", "jsd", "entropy", "token"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_gradient_peak_memory(backend, op):
    """The fused gradients allocate their outputs and O(rows) more: peak RSS (VmHWM, reset
    just before the call) rises by less than the gradients' bytes + 40 MB on [128, 131072]
    float32 inputs (one float64 [rows, V] temporary would be 128 MB)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(fastkl.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _GRAD_MEM_SCRIPT, backend, op], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, extra = (int(x) for x in proc.stdout.strip().splitlines()[-1].split())
    budget = n * 128 * 131072 * 4 + 40e6
    assert extra < budget, f"peak RSS rose by {extra / 1e6:.1f} MB ({n} gradients)"


def test_reference_self_check(rng):
    """The float64 reference against 50-digit mpmath on random rows (T = 2.3, beta = 0.3):
    within 1e-13, well inside the 1e-12 the backends are held to."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = 50
    a, b = pair(rng, (3, 7), np.float64)
    a[0, 2] = -np.inf
    T, beta = 2.3, 0.3

    def probs(row):
        e = [mp.mpf(0) if math.isinf(x) else mp.exp(mp.mpf(x) / mp.mpf(T)) for x in row]
        z = mp.fsum(e)
        return [x / z for x in e]

    def kl(p, q):
        return mp.fsum(pi * mp.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi != 0)

    for r in range(3):
        P, Q = probs(a[r]), probs(b[r])
        M = [beta * pi + (1 - beta) * qi for pi, qi in zip(P, Q, strict=True)]
        exact = {
            "kl": kl(P, Q),
            "jsd": beta * kl(P, M) + (1 - beta) * kl(Q, M),
            "entropy": -mp.fsum(pi * mp.log(pi) for pi in P if pi != 0),
        }
        for op, val in exact.items():
            got = ref_rows(op, a[r], b[r], temperature=T, beta=beta)
            assert abs(got - float(val)) <= 1e-13 * abs(float(val)), (op, got, val)
        tok = ref_token(b[r], 4, temperature=T)
        assert abs(tok - float(mp.log(Q[4]))) <= 1e-14 * abs(float(mp.log(Q[4])))
    lq = ref_token(np.tile(b[0], (7, 1)), np.arange(7))
    assert abs(logsumexp(lq)) < 1e-15


# --------------------------------------------------------------------------- fused gradients
# ``logits_grad`` / ``logits_token_grad`` (kl_logits_grad with wrt=, jsd_logits_grad,
# entropy_logits_grad, token_logprobs_grad): the numpy reference against central finite
# differences of the value reference, every backend against the numpy reference.

GRAD_OPS = [("kl", None, None), ("jsd", 0.3, "mixture"), ("jsd", 0.0, "mixture"),
            ("jsd", 1.0, "mixture"), ("jsd", 0.0, "kl"), ("jsd", 1.0, "kl"),
            ("jsd", 1e-300, "mixture"), ("entropy", None, None)]
GRAD_IDS = ["kl", "jsd0.3", "jsd0", "jsd1", "jsd0-kl", "jsd1-kl", "jsd1e-300", "entropy"]


def grads_of(op, beta, ends, a, b, **kw):
    """(value, grad_p, grad_q) of a public gradient function (grad_q None for entropy)."""
    if op == "entropy":
        v, g = fastkl.entropy_logits_grad(a, **kw)
        return v, g, None
    if op == "kl":
        return fastkl.kl_logits_grad(a, b, wrt="both", **kw)
    return fastkl.jsd_logits_grad(a, b, beta, endpoints=ends, wrt="both", **kw)


def _value_rows(op, beta, ends, a, b, temperature):
    if op == "entropy":
        return ref_rows("entropy", a, temperature=temperature)
    if op == "kl" or (ends == "kl" and beta == 0.0):
        return ref_rows("kl", a, b, temperature=temperature)
    if ends == "kl" and beta == 1.0:
        return ref_rows("kl", b, a, temperature=temperature)
    return ref_rows("jsd", a, b, temperature=temperature, beta=beta)


@pytest.mark.parametrize(("op", "beta", "ends"), GRAD_OPS, ids=GRAD_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_reference_gradients_vs_finite_differences(op, beta, ends, temperature, rng):
    """d sum_r w_r value_r / d logits by central differences of the scipy value reference,
    against the numpy backend (reduction "sum" with weights: rowscale = w)."""
    a, b = pair(rng, (4, 9), np.float64)
    w = np.array([1.0, 0.0, 2.5, 0.5])
    v, gp, gq = grads_of(op, beta, ends, a, b, temperature=temperature, mask=w,
                         reduction="sum", backend="reference")
    np.testing.assert_allclose(v, np.sum(w * _value_rows(op, beta, ends, a, b, temperature)),
                               rtol=1e-12)
    h = 1e-6
    for x, g in ((a, gp), (b, gq)):
        if g is None:
            continue
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            args_p = (xp, b) if x is a else (a, xp)
            args_m = (xm, b) if x is a else (a, xm)
            fp = np.sum(w * _value_rows(op, beta, ends, *args_p, temperature))
            fm = np.sum(w * _value_rows(op, beta, ends, *args_m, temperature))
            num[idx] = (fp - fm) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)
        assert not g[1].any()  # weight 0: no gradient


def _grad_tol(dtype):
    return 1e-12 if np.dtype(dtype) == np.float64 else 2e-6


def assert_grads_match(got, ref, dtype, what):
    """Same NaN / inf positions; finite entries within tol * (1 + max |row of ref|)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(ref)), f"{what}: NaN positions differ"
    assert np.array_equal(np.isinf(got), np.isinf(ref)), f"{what}: inf positions differ"
    fin = np.isfinite(ref)
    scale = 1.0 + np.max(np.where(fin, np.abs(ref), 0.0), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        err = np.where(fin, np.abs(got - ref), 0.0) / scale
    assert err.max(initial=0.0) <= _grad_tol(dtype), f"{what}: max scaled error {err.max()}"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p != "numpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(("op", "beta", "ends"), GRAD_OPS, ids=GRAD_IDS)
def test_fused_gradients_vs_reference(backend, dtype, op, beta, ends, rng):
    """Every backend's fused gradients (both inputs, and each alone: the same bits) against
    the numpy reference: rows over several chunks, -inf / NaN patterns, identical rows
    (exact zeros), weights with zeros, a transposed layout, two temperatures."""
    a, b = pair(rng, (6, 1100), np.float64)
    a[1, ::3] = -np.inf
    b[1, ::3] = -np.inf
    a[2, 5] = -np.inf  # P = 0 where Q > 0
    b[3] = a[3]  # identical rows
    sa, sb = special_rows(np.float64)
    sa, sb = np.pad(sa, ((0, 0), (0, 1094))), np.pad(sb, ((0, 0), (0, 1094)))
    a, b = np.concatenate([a, sa]).astype(dtype), np.concatenate([b, sb]).astype(dtype)
    w = rng.random(len(a)) * 2
    w[4] = 0.0
    for temperature in (1.0, 0.7):
        for axis, (x, y) in ((-1, (a, b)), (0, (a.T, b.T))):
            kw = dict(temperature=temperature, axis=axis, mask=w, reduction="none")
            what = f"{backend} {dtype.__name__} {op} T={temperature} axis={axis}"
            v, gp, gq = grads_of(op, beta, ends, x, y, backend=backend, **kw)
            v0, gp0, gq0 = grads_of(op, beta, ends, x, y, backend="reference", **kw)
            assert_close(v, v0, result_dtype(x), what + " value")
            for g, g0, nm in ((gp, gp0, "p"), (gq, gq0, "q")):
                if g0 is None:
                    continue
                assert g.dtype == result_dtype(x) and g.shape == x.shape, what
                assert_grads_match(np.moveaxis(g, axis, -1), np.moveaxis(g0, axis, -1), dtype,
                                   f"{what} grad {nm}")
            assert not np.moveaxis(gp, axis, -1)[4].any()  # weight 0
            if op == "entropy":
                continue
            # one gradient alone: the same bits as with both
            fn = fastkl.kl_logits_grad if op == "kl" else (
                lambda *xs, **k: fastkl.jsd_logits_grad(*xs, beta, endpoints=ends, **k))
            _, only_p = fn(x, y, wrt="p", backend=backend, **kw)
            _, only_q = fn(x, y, wrt="q", backend=backend, **kw)
            assert np.array_equal(only_p, gp, equal_nan=True), what
            assert np.array_equal(only_q, gq, equal_nan=True), what
            if op == "kl" or ends == "mixture":  # identical rows: exact zeros
                assert not np.moveaxis(gp, axis, -1)[3].any()
                assert not np.moveaxis(gq, axis, -1)[3].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_token_logprobs_grad_vs_reference(backend, dtype, rng):
    a = logits(rng, (7, 1030), np.float64)
    a[1, ::4] = -np.inf
    a[2, 3] = np.nan
    a[5] = -np.inf
    a = a.astype(dtype)
    tok = rng.integers(0, 1030, 7)
    tok[0] = -100
    tok[1] = 4  # a -inf logit: log Q = -inf, finite gradient
    for temperature in (1.0, 0.7):
        v, g = fastkl.token_logprobs_grad(a, tok, temperature=temperature, backend=backend)
        assert_close(v, fastkl.token_logprobs(a, tok, temperature=temperature,
                                              backend=backend), result_dtype(a), "value")
        x = np.asarray(a, dtype=np.float64)
        q = np.exp(_lp(x, temperature, False))
        ref = -q
        ref[np.arange(7), np.where(tok < 0, 0, tok)] += 1.0
        ref[0] = 0.0
        ref /= temperature
        assert_grads_match(g, ref, dtype, f"{backend} token T={temperature}")
        assert not g[0].any() and np.isnan(g[[2, 5]]).all() and np.isfinite(g[1]).all()
        assert v[1] == -np.inf and np.isnan(v[[2, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reductions_and_empty(backend, rng):
    """The reduction's weights are the gradient's scale: "mean" = "sum" / sum w, "none" =
    "sum"; a mean over zero weight is ``empty`` with a zero gradient."""
    a, b = pair(rng, (3, 5, 40), np.float64)
    w = rng.random((3, 5))
    w[0] = 0.0
    for op, beta, ends in GRAD_OPS[:2] + GRAD_OPS[-1:]:
        kw = dict(mask=w, temperature=1.4, backend=backend)
        vs, ps, qs = grads_of(op, beta, ends, a, b, reduction="sum", **kw)
        vm, pm, qm = grads_of(op, beta, ends, a, b, reduction="mean", **kw)
        vn, pn, qn = grads_of(op, beta, ends, a, b, reduction="none", **kw)
        np.testing.assert_allclose(vm, vs / w.sum(), rtol=1e-13)
        np.testing.assert_allclose(np.sum(vn), vs, rtol=1e-13)
        for gs, gm, gn in ((ps, pm, pn), (qs, qm, qn)):
            if gs is None:
                continue
            np.testing.assert_allclose(gm, gs / w.sum(), rtol=1e-12, atol=1e-300)
            assert np.array_equal(gn, gs)
        none = np.zeros((3, 5))
        v, *gs = grads_of(op, beta, ends, a, b, reduction="mean", mask=none, empty=0.0,
                          backend=backend)
        assert v == 0.0 and not any(g.any() for g in gs if g is not None)
        v, *_ = grads_of(op, beta, ends, a, b, reduction="mean", mask=none, backend=backend)
        assert math.isnan(v)


def test_gradient_argument_errors():
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match="wrt"):
        fastkl.kl_logits_grad(a, a, wrt="teacher")
    with pytest.raises(ValueError, match="wrt"):
        fastkl.jsd_logits_grad(a, a, wrt=None)
    with pytest.raises(ValueError, match="beta"):
        fastkl.jsd_logits_grad(a, a, 2.0)
    with pytest.raises(ValueError, match="endpoints"):
        fastkl.jsd_logits_grad(a, a, endpoints="both")
    with pytest.raises(ValueError, match="reduction"):
        fastkl.entropy_logits_grad(a, reduction="token-mean")
    with pytest.raises(ValueError, match="tokens"):
        fastkl.token_logprobs_grad(a, np.array([0, 3]))
    with pytest.raises(ValueError, match="mask"):
        fastkl.entropy_logits_grad(a, mask=np.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        fastkl.jsd_logits_grad(a, a, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        fastkl.kl_logits_grad(a, np.zeros((2, 4)), wrt="p")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [99, -1, 3])
def test_unknown_op_code_in_logits_grad_raises(backend, op):
    from fastkl.backends import get_backend

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 50)), rng.normal(size=(2, 50))
    out = np.full(a.shape[0], 7.0)
    grad = np.full(a.shape, 7.0)
    with pytest.raises(ValueError, match="logits op code"):
        get_backend(backend).logits_grad(a, b, op, 0.5, 1.0, np.ones(2), out, grad, grad)
    assert (out == 7.0).all() and (grad == 7.0).all()
