"""Hypothesis properties of the full-vocabulary ops, for every backend: KL(P||P) = JSD(P, P)
= 0.0 exactly; KL, JSD >= 0; invariance to a per-row constant added to the logits; JSD_0.5
symmetric and <= log 2; 0 <= entropy <= log V; token log-probs <= 0 with logsumexp 0.

Tolerances are those of issue 3 (``test_logits.TOL``). Example counts follow the hypothesis
profile of ``conftest.py`` (modest by default).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp
from test_logits import BACKENDS, TOL, assert_close, ref_rows, result_dtype

import fastkl

DTYPES = [np.float16, np.float32, np.float64]
TEMPS = st.sampled_from([0.5, 1.0, 2.3])


@st.composite
def logit_rows(draw, dtype=None, ninf=True, grid=None, lo=-30.0, hi=30.0):
    """(rows, V) logits; some entries -inf (never a whole row). ``grid``: values are
    multiples of it (so that adding a constant on the same grid is exact)."""
    dt = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 40))
    if grid is None:
        hi_ = 8.0 if dt == np.float16 else hi  # float16 logits stay small
        elem = st.floats(-hi_ if lo < 0 else lo, hi_, width=16 if dt == np.float16 else 64)
        x = draw(hnp.arrays(np.float64, (rows, vocab), elements=elem))
    else:
        k = int(hi / grid)
        x = draw(hnp.arrays(np.int64, (rows, vocab), elements=st.integers(-k, k))) * grid
    if ninf and vocab > 1:
        holes = draw(hnp.arrays(np.bool_, (rows, vocab)))
        holes[np.arange(rows), draw(st.integers(0, vocab - 1))] = False  # one finite per row
        x = np.where(holes, -np.inf, x)
    return x.astype(dt)


@pytest.mark.parametrize("backend", BACKENDS)
@given(a=logit_rows(), t=TEMPS, beta=st.floats(0.0, 1.0), lp=st.booleans())
def test_self_divergence_is_exactly_zero(backend, a, t, beta, lp):
    b = a.copy()
    kl = fastkl.kl_logits(a, b, temperature=t, log_probs=lp, backend=backend)
    assert (kl == 0.0).all(), kl
    assert (fastkl.kl_logits(a, a, temperature=t, backend=backend) == 0.0).all()
    js = fastkl.jsd_logits(a, b, beta, temperature=t, log_probs=lp, backend=backend)
    assert (js == 0.0).all(), js
    value, grad = fastkl.kl_logits_grad(a, b, temperature=t, backend=backend)
    assert value == 0.0 and (grad == 0.0).all()


@st.composite
def same_shape_pair(draw, grid=None, **kw):
    a = draw(logit_rows(grid=grid, **kw))
    if grid is None:
        b = draw(hnp.arrays(np.float64, a.shape, elements=st.floats(-20, 20, width=16)))
    else:
        k = int(20 / grid)
        b = draw(hnp.arrays(np.int64, a.shape, elements=st.integers(-k, k))) * grid
    holes = draw(hnp.arrays(np.bool_, a.shape)) & draw(st.booleans())
    holes[:, 0] = False
    b = np.where(holes, -np.inf, b).astype(a.dtype)
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
@given(ab=same_shape_pair(), t=TEMPS, beta=st.floats(0.0, 1.0))
def test_divergences_non_negative_pairs(backend, ab, t, beta):
    a, b = ab
    kl = fastkl.kl_logits(a, b, temperature=t, backend=backend)
    js = fastkl.jsd_logits(a, b, beta, temperature=t, backend=backend)
    assert not np.isnan(kl).any() and (kl >= 0).all(), kl
    assert not np.isnan(js).any() and np.isfinite(js).all() and (js >= 0).all(), js
    assert_close(kl, ref_rows("kl", a, b, temperature=t), result_dtype(a), "kl")
    assert_close(js, ref_rows("jsd", a, b, temperature=t, beta=beta), result_dtype(a),
                 f"jsd beta={beta}")


@pytest.mark.parametrize("backend", BACKENDS)
@given(ab=same_shape_pair(dtype=np.float32, grid=2.0**-10), data=st.data(), t=TEMPS,
       dtype=st.sampled_from([np.float32, np.float64]))
def test_shift_invariance(backend, ab, data, t, dtype):
    """Adding c_row in [-50, 50] to the logits of P (or Q) changes nothing beyond the
    tolerance; values and shifts lie on a 2^-10 grid so the shifted inputs are exact."""
    a, b = (x.astype(dtype) for x in ab)
    rows = a.shape[0]
    c = np.array(data.draw(st.lists(st.integers(-50 * 1024, 50 * 1024), min_size=rows,
                                    max_size=rows))) / 1024.0
    a2 = a + c[:, None].astype(dtype)
    b2 = b + c[::-1, None].astype(dtype)
    assert np.array_equal(a2 - c[:, None].astype(dtype), a)  # the shift is exact
    dt = result_dtype(a)
    for name, f in [
        ("kl", lambda x, y: fastkl.kl_logits(x, y, temperature=t, backend=backend)),
        ("jsd", lambda x, y: fastkl.jsd_logits(x, y, 0.3, temperature=t, backend=backend)),
        ("entropy", lambda x, y: fastkl.entropy_logits(x, temperature=t, backend=backend)),
        ("token", lambda x, y: fastkl.token_logprobs(
            x, np.zeros(rows, dtype=np.int64), temperature=t, backend=backend)),
    ]:
        r0 = f(a, b)
        assert_close(f(a2, b), r0, dt, f"{name} shift P")
        assert_close(f(a, b2), r0, dt, f"{name} shift Q")
        assert_close(f(a2, b2), r0, dt, f"{name} shift both")


@pytest.mark.parametrize("backend", BACKENDS)
@given(ab=same_shape_pair(), t=TEMPS)
def test_jsd_half_symmetric_and_bounded(backend, ab, t):
    a, b = ab
    dt = result_dtype(a)
    j1 = fastkl.jsd_logits(a, b, 0.5, temperature=t, backend=backend)
    j2 = fastkl.jsd_logits(b, a, 0.5, temperature=t, backend=backend)
    assert_close(j1, j2, dt, "JSD_0.5 symmetric")
    rtol, _ = TOL[dt]
    assert (j1 <= math.log(2) * (1 + rtol)).all(), j1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_jsd_disjoint_supports_is_log2(backend, dtype):
    """Not vacuous: the bound log 2 is reached by disjoint supports."""
    a = np.array([[0.0, 1.0, -np.inf, -np.inf], [2.0, -np.inf, -np.inf, -np.inf]], dtype)
    b = np.array([[-np.inf, -np.inf, 0.5, 0.0], [-np.inf, -np.inf, 3.0, -1.0]], dtype)
    assert_close(fastkl.jsd_logits(a, b, backend=backend), [math.log(2)] * 2,
                 result_dtype(a), "JSD disjoint")


@pytest.mark.parametrize("backend", BACKENDS)
@given(a=logit_rows(), t=TEMPS)
def test_entropy_bounds(backend, a, t):
    h = fastkl.entropy_logits(a, temperature=t, backend=backend)
    dt = result_dtype(a)
    rtol, atol = TOL[dt]
    vocab = a.shape[-1]
    assert (h >= 0).all(), h
    assert (h <= math.log(vocab) * (1 + rtol)).all(), (h, math.log(vocab))
    support = np.isfinite(a).sum(-1)  # the entropy is at most log(support size)
    assert (h <= np.maximum(np.log(support) * (1 + rtol), atol)).all(), (h, support)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_uniform_is_log_v(backend, dtype):
    a = np.full((2, 50257), 3.0, dtype)
    assert_close(fastkl.entropy_logits(a, backend=backend), [math.log(50257)] * 2,
                 result_dtype(a), "entropy uniform")


@pytest.mark.parametrize("backend", BACKENDS)
@given(a=logit_rows(), t=TEMPS)
def test_token_logprobs_normalized(backend, a, t):
    rows, vocab = a.shape
    tok = np.repeat(np.arange(vocab)[None, :], rows, 0)  # every token of every row
    a_rep = np.repeat(a[:, None, :], vocab, 1)  # [rows, vocab(copies), vocab]
    lq = fastkl.token_logprobs(a_rep, tok, temperature=t, backend=backend)
    assert lq.shape == (rows, vocab)
    assert not np.isnan(lq).any()
    assert (lq <= 0.0).all(), lq
    assert (lq[~np.isfinite(a)] == -np.inf).all()
    lq64 = lq.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(np.where(np.isinf(lq64), 0.0, np.exp(lq64) * lq64), axis=-1)
    rtol, atol = TOL[result_dtype(a)]
    # The bound follows from the arithmetic, not from the examples seen so far. logsumexp has
    # gradient Q (entries >= 0, summing to 1), so
    # * a relative error of at most rtol in each log Q_j moves it by at most
    #   sum_j Q_j rtol |log Q_j| = rtol H(Q);
    # * an absolute error common to the row (the kernel's log Z, the normaliser: a sum of V
    #   terms in (0, 1] plus one log) moves it by that error, and the check's own logsumexp
    #   (V exps, a sum of V terms in (0, 1], one log) adds the same kind of error again:
    #   recursive summation of V non-negative terms is within (V - 1) u of the sum
    #   (u = eps / 2, Higham 2002, section 4.2), the exps and the log add a few u: in all at
    #   most (V + 4) eps of the result dtype, the condition of this row's normalisation.
    # (The former bound, 4 eps, was exceeded by a correct float64 row a = [[1.25, -21.5 x 38]]:
    # |logsumexp| = 8.9e-16 > 8.88e-16; a bug is off by orders of magnitude more.)
    lse = logsumexp(lq64, axis=-1)
    slack = (vocab + 4) * np.finfo(lq.dtype).eps
    assert (np.abs(lse) <= rtol * h + slack).all(), (lse, h, slack)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_logprobs_normalized_regression(backend, dtype):
    """The example that failed the former bound (4 eps) although every value was right."""
    a = np.array([[1.25] + [-21.5] * 38], dtype)
    test_token_logprobs_normalized.hypothesis.inner_test(backend, a, 1.0)
