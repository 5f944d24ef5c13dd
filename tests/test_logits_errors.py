"""Bad input to the full-vocabulary ops: a ValueError / TypeError whose message names the
offending argument, for every backend, and the caller's arrays left untouched."""

from __future__ import annotations

import numpy as np
import pytest
from test_logits import BACKENDS, Unmodified

import fastkl

OPS2 = ["kl", "jsd", "grad"]  # two logits inputs
OPS1 = ["entropy", "token"]
ALL_OPS = OPS2 + OPS1


def _arrays(shape=(3, 7), dtype=np.float32):
    rng = np.random.default_rng(7)
    a = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape).astype(dtype)
    return a, b


_DEFAULT = object()


def call(op, backend, a, b=None, *, tokens=_DEFAULT, beta=0.5, **kw):
    """The public function for ``op``; default tokens are valid for ``a`` (vocab on axis)."""
    if op == "kl":
        return fastkl.kl_logits(a, b, backend=backend, **kw)
    if op == "jsd":
        return fastkl.jsd_logits(a, b, beta, backend=backend, **kw)
    if op == "grad":
        return fastkl.kl_logits_grad(a, b, backend=backend, **kw)
    if op == "entropy":
        return fastkl.entropy_logits(a, backend=backend, **kw)
    if op == "token":
        kw.pop("mask", None)
        kw.pop("reduction", None)
        kw.pop("log_probs", None)
        if tokens is _DEFAULT:
            lead = np.delete(np.array(np.shape(a)), kw.get("axis", -1) % max(np.ndim(a), 1))
            tokens = np.zeros(tuple(lead), dtype=np.int64)
        return fastkl.token_logprobs(a, tokens, backend=backend, **kw)
    raise AssertionError(op)


def raises(exc, match, op, backend, a, b=None, **kw):
    if kw.get("tokens", _DEFAULT) is None and op != "token":
        kw.pop("tokens")
    guard = Unmodified(a, b, kw.get("tokens"), kw.get("mask"))
    with pytest.raises(exc, match=match):
        call(op, backend, a, b, **kw)
    guard.check()


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS2)
@pytest.mark.parametrize("shape_q", [(3, 8), (4, 7), (7, 3), (3, 7, 1), (21,)])
def test_shape_mismatch(backend, op, shape_q):
    a, _ = _arrays((3, 7))
    b = np.zeros(shape_q, np.float32)
    raises(ValueError, "logits_q", op, backend, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "grad", "entropy"])
@pytest.mark.parametrize("mshape", [(7,), (3, 7), (4,), (), (3, 1)])
def test_mask_wrong_shape(backend, op, mshape):
    a, b = _arrays((3, 7))
    raises(ValueError, "mask", op, backend, a, b, mask=np.ones(mshape, bool))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "grad", "entropy"])
def test_mask_wrong_shape_with_axis(backend, op):
    """mask has the shape without the vocabulary axis: for [3, 7] with axis 0 that is (7,)."""
    a, b = _arrays((3, 7))
    raises(ValueError, "mask", op, backend, a, b, axis=0, mask=np.ones(3, bool))
    ok = call(op, backend, a, b, axis=0, mask=np.ones(7, bool))
    assert np.shape(ok[1] if op == "grad" else ok) == ((3, 7) if op == "grad" else (7,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "grad", "entropy"])
@pytest.mark.parametrize("weights", [[1.0, -0.5, 1.0], [1.0, np.nan, 1.0], [np.inf, 1, 1]])
def test_mask_bad_weights(backend, op, weights):
    a, b = _arrays((3, 7))
    raises(ValueError, "mask", op, backend, a, b, mask=np.array(weights))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "grad", "entropy"])
def test_mask_non_numeric(backend, op):
    a, b = _arrays((3, 7))
    raises(TypeError, "mask", op, backend, a, b, mask=np.array(["a", "b", "c"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
def test_zero_dim_input(backend, op):
    a = np.asarray(np.float32(1.0))
    raises(ValueError, "logits", op, backend, a, a.copy(),
           tokens=np.asarray(0) if op == "token" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("shape,axis", [((3, 0), -1), ((0,), 0), ((0, 4), 0), ((2, 0, 3), 1)])
def test_empty_vocabulary(backend, op, shape, axis):
    a = np.zeros(shape, np.float32)
    raises(ValueError, "vocabulary", op, backend, a, a.copy(), axis=axis)


# --------------------------------------------------------------------------- axis


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("axis", [2, -3, 100])
def test_axis_out_of_range(backend, op, axis):
    a, b = _arrays((3, 7))
    raises(ValueError, "axis", op, backend, a, b, axis=axis,
           tokens=np.zeros(3, np.int64) if op == "token" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("axis", [None, 1.0, (0, 1), "x"])
def test_axis_not_an_int(backend, op, axis):
    a, b = _arrays((3, 7))
    raises(TypeError, "axis", op, backend, a, b, axis=axis,
           tokens=np.zeros(3, np.int64) if op == "token" else None)


# --------------------------------------------------------------------------- temperature, beta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("t", [0.0, -0.0, -1.0, np.nan, np.inf, -np.inf, np.float32(0)])
def test_temperature_bad_value(backend, op, t):
    a, b = _arrays()
    raises(ValueError, "temperature", op, backend, a, b, temperature=t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("t", [None, "abc", [1.0], object(), 1 + 1j])
def test_temperature_not_a_number(backend, op, t):
    a, b = _arrays()
    raises(TypeError, "temperature", op, backend, a, b, temperature=t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
def test_temperature_numeric_string_rejected(backend, op):
    """'2.0' is not a number: it must not be silently parsed."""
    a, b = _arrays()
    raises(TypeError, "temperature", op, backend, a, b, temperature="2.0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [-0.1, 1.0000001, 2.0, np.nan, np.inf, -np.inf])
def test_beta_bad_value(backend, beta):
    a, b = _arrays()
    raises(ValueError, "beta", "jsd", backend, a, b, beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [None, "abc", [0.5], 0.5j])
def test_beta_not_a_number(backend, beta):
    a, b = _arrays()
    raises(TypeError, "beta", "jsd", backend, a, b, beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_numeric_string_rejected(backend):
    a, b = _arrays()
    raises(TypeError, "beta", "jsd", backend, a, b, beta="0.5")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "entropy"])
@pytest.mark.parametrize("lp", [None, 1, "yes", np.array([True])])
def test_log_probs_not_bool(backend, op, lp):
    a, b = _arrays()
    raises(TypeError, "log_probs", op, backend, a, b, log_probs=lp)


# --------------------------------------------------------------------------- dtypes


BAD_LOGITS = {
    "int": np.arange(21, dtype=np.int64).reshape(3, 7),
    "int32": np.arange(21, dtype=np.int32).reshape(3, 7),
    "bool": np.ones((3, 7), dtype=bool),
    "complex": np.ones((3, 7), dtype=np.complex128),
    "object": np.ones((3, 7), dtype=object),
    "str": np.full((3, 7), "x"),
    "none": None,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("kind", list(BAD_LOGITS))
def test_non_float_logits_first(backend, op, kind):
    _, b = _arrays()
    name = "logits_p" if op in OPS2 else "logits"
    raises(TypeError, name, op, backend, BAD_LOGITS[kind], b,
           tokens=np.zeros(3, np.int64) if op == "token" else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS2)
@pytest.mark.parametrize("kind", list(BAD_LOGITS))
def test_non_float_logits_second(backend, op, kind):
    a, _ = _arrays()
    raises(TypeError, "logits_q", op, backend, a, BAD_LOGITS[kind])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS2)
def test_python_lists_of_ints_rejected(backend, op):
    """Integer lists are integer arrays: not logits."""
    with pytest.raises(TypeError, match="logits_p"):
        call(op, backend, [[1, 2, 3]], [[1.0, 2.0, 3.0]])


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [7, 8, -1, -101, 2**40, -(2**40)])
def test_tokens_out_of_range(backend, bad):
    a, _ = _arrays((3, 7))
    tok = np.array([0, bad, -100])
    raises(ValueError, "tokens", "token", backend, a, tokens=tok)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_out_of_range_custom_ignore(backend):
    a, _ = _arrays((3, 7))
    # -1 is valid with ignore_index=-1, but then -100 no longer is
    ok = fastkl.token_logprobs(a, np.array([0, -1, 6]), ignore_index=-1, backend=backend)
    assert ok[1] == 0.0
    raises(ValueError, "tokens", "token", backend, a, tokens=np.array([0, -100, 6]),
           ignore_index=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_out_of_range_vocab_axis0(backend):
    """Range is checked against the vocabulary axis, not the last axis."""
    a, _ = _arrays((7, 3))  # vocab 7 on axis 0, 3 rows
    raises(ValueError, "tokens", "token", backend, a, tokens=np.array([0, 1, 7]), axis=0)
    got = fastkl.token_logprobs(a, np.array([0, 1, 6]), axis=0, backend=backend)
    assert got.shape == (3,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tok", [np.array([0.0, 1.0, 2.0]), np.array([True, False, True]),
                                 np.array(["0", "1", "2"]), np.array([0, 1, 2], dtype=object),
                                 [0.0, 1.0, 2.0], 1.5, None])
def test_tokens_not_integers(backend, tok):
    a, _ = _arrays((3, 7))
    raises(TypeError, "tokens", "token", backend, a, tokens=tok)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4,), (3, 1), (1, 3), (), (7,)])
def test_tokens_wrong_shape(backend, shape):
    a, _ = _arrays((3, 7))
    raises(ValueError, "tokens", "token", backend, a, tokens=np.zeros(shape, np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ig", [1.5, None, "x"])
def test_ignore_index_not_int(backend, ig):
    a, _ = _arrays((3, 7))
    raises(TypeError, "ignore_index", "token", backend, a, tokens=np.zeros(3, np.int64),
           ignore_index=ig)


# --------------------------------------------------------------------------- reduction, backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl", "jsd", "grad", "entropy"])
@pytest.mark.parametrize("red", ["avg", "MEAN", "token-mean", "seq-mean-token-sum", None, 0])
def test_unknown_reduction(backend, op, red):
    a, b = _arrays()
    raises(ValueError, "reduction", op, backend, a, b, reduction=red)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("be", ["torch", "NUMPY", "", 3])
def test_unknown_backend(op, be):
    a, b = _arrays()
    raises(ValueError, "backend", op, be, a, b)


# --------------------------------------------------------------------------- order of checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_leave_memmap_and_readonly_inputs_alone(backend, tmp_path):
    a, b = _arrays((3, 7), np.float16)
    np.save(tmp_path / "a.npy", a.astype(">f2"))
    am = np.load(tmp_path / "a.npy", mmap_mode="r")
    b.setflags(write=False)
    raises(ValueError, "temperature", "kl", backend, am, b, temperature=0.0)
    raises(ValueError, "logits_q", "kl", backend, am, b[:, :6])
    raises(ValueError, "mask", "jsd", backend, am, b, mask=np.ones(4))
