"""Every memory layout x a temperature != 1, for every logits op and backend (issue 15).

The kernels load a row through one of two paths (unit column stride, or any stride), and the
temperature is applied in that load: a layout tested only at T = 1 hides a wrong temperature
in the other path. Each case is compared with the reference on a C-contiguous copy.
"""

from __future__ import annotations

import numpy as np
import pytest
from gaps_util import BACKENDS, close

import fastkl

ROWS, V = 6, 700  # V > 512: two vocabulary chunks in the compiled kernels


def _base(dtype, seed=11):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 3.0, (ROWS, 2 * V))
    b = a + rng.normal(0.0, 1.0, a.shape)
    a[0, 5] = -np.inf  # a zero probability in P and another in Q
    b[2, 9] = -np.inf
    return a.astype(dtype), b.astype(dtype)


def _layout(x: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """(a view of ``x``'s first V columns in the named layout, the vocabulary axis)."""
    c = x[:, :V]
    if name == "contiguous":
        return np.ascontiguousarray(c), -1
    if name == "strided":  # column stride 2
        return x[:, : 2 * V : 2], -1
    if name == "fortran":  # C-order values, F-order memory: column stride ROWS
        return np.asfortranarray(c), -1
    if name == "transposed":  # vocabulary along axis 0 of a C array
        return np.ascontiguousarray(c.T), 0
    if name == "negative":  # column stride -1
        return np.ascontiguousarray(c[:, ::-1])[:, ::-1], -1
    if name == "negative-rows":  # row stride < 0 and column stride -2
        return np.ascontiguousarray(x[::-1, ::-1])[::-1, 1::2][:, ::-1][:, :V], -1
    raise AssertionError(name)


LAYOUTS = ["contiguous", "strided", "fortran", "transposed", "negative", "negative-rows"]
TOL = {np.dtype(np.float32): (1e-6, 1e-7), np.dtype(np.float64): (1e-12, 1e-14)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("t", [0.45, 2.3])
def test_logits_ops_layout_temperature(backend, dtype, layout, t):
    a0, b0 = _base(dtype)
    a, ax = _layout(a0, layout)
    b, _ = _layout(b0, layout)
    # the same values, C-contiguous, vocabulary last: what the reference sees
    ra = np.ascontiguousarray(np.moveaxis(a, ax, -1))
    rb = np.ascontiguousarray(np.moveaxis(b, ax, -1))
    assert layout == "contiguous" or not (a.flags.c_contiguous and ax == -1)
    rtol, atol = TOL[np.dtype(dtype)]
    tok = np.arange(ROWS) * 97 % V
    what = f"{backend} {layout} {np.dtype(dtype).name} T={t}"

    def both(fn):
        return fn(a, b, ax, backend), fn(ra, rb, -1, "reference")

    cases = {
        "kl": lambda x, y, k, be: fastkl.kl_logits(x, y, temperature=t, axis=k, backend=be),
        "jsd": lambda x, y, k, be: fastkl.jsd_logits(x, y, 0.3, temperature=t, axis=k,
                                                     backend=be),
        "entropy": lambda x, y, k, be: fastkl.entropy_logits(x, temperature=t, axis=k,
                                                             backend=be),
        "token": lambda x, y, k, be: fastkl.token_logprobs(y, tok, temperature=t, axis=k,
                                                           backend=be),
        "kl log_probs": lambda x, y, k, be: fastkl.kl_logits(
            x - 5.0, y - 5.0, temperature=t, axis=k, log_probs=True, backend=be),
    }
    for op, fn in cases.items():
        got, ref = both(fn)
        close(got, ref, rtol, atol, f"{what} {op}")
    v, g = fastkl.kl_logits_grad(a, b, temperature=t, axis=ax, reduction="sum", backend=backend)
    v0, g0 = fastkl.kl_logits_grad(ra, rb, temperature=t, reduction="sum", backend="reference")
    close(v, v0, rtol, atol, f"{what} grad value")
    assert g.shape == b.shape
    close(np.moveaxis(g, ax, -1), g0, rtol, atol, f"{what} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_really_applies(backend):
    """Not vacuous: the layouts above see values that depend on T (a kernel ignoring the
    temperature, or dividing by 1/T, fails them)."""
    a0, b0 = _base(np.float64)
    a, _ = _layout(a0, "strided")
    b, _ = _layout(b0, "strided")
    k1 = fastkl.kl_logits(a, b, temperature=2.3, backend=backend)
    k2 = fastkl.kl_logits(a, b, temperature=1 / 2.3, backend=backend)
    assert (np.abs(k1 - k2) > 0.1 * np.abs(k1)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("t", [1.0, 0.7])
def test_row_max_grows_in_different_chunks(backend, dtype, t):
    """The kernels keep running maxima of a and b per 512-entry chunk and rescale their sums
    when one grows (``S' = e^-dA (S - (dA - dB) ZA)``). With a and b of similar rows both
    maxima grow together (dA ~ dB) and a wrong rescale hides; here they grow by moderate,
    different steps in different chunks (a large step would make the old sums negligible)."""
    rng = np.random.default_rng(31)
    rows, vocab = 8, 4 * 512 + 100
    a = rng.normal(0.0, 1.0, (rows, vocab))
    b = rng.normal(0.0, 1.0, (rows, vocab))
    for r in range(rows):  # a's max steps up by ~1 in chunks 2 and 3; b's in chunk 4 or 1
        a[r, 600 + r] = 4.0 + 0.1 * r
        a[r, 1100 + 7 * r] = 5.0 + 0.2 * r
        b[r, 30 + r] = 4.5
        b[r, 1600 + 11 * r] = 5.0 + 0.3 * r if r % 2 else 3.0
    a, b = a.astype(dtype), b.astype(dtype)
    rtol, atol = TOL[np.dtype(dtype)]
    what = f"{backend} {np.dtype(dtype).name} T={t}"
    tok = np.arange(rows) * 131 % vocab
    for name, fn in {
        "kl": lambda x, y, be: fastkl.kl_logits(x, y, temperature=t, backend=be),
        "kl reversed": lambda x, y, be: fastkl.kl_logits(y, x, temperature=t, backend=be),
        "jsd": lambda x, y, be: fastkl.jsd_logits(x, y, 0.3, temperature=t, backend=be),
        "entropy": lambda x, y, be: fastkl.entropy_logits(x, temperature=t, backend=be),
        "token": lambda x, y, be: fastkl.token_logprobs(x, tok, temperature=t, backend=be),
        "grad": lambda x, y, be: fastkl.kl_logits_grad(x, y, temperature=t, backend=be)[1],
    }.items():
        close(fn(a, b, backend), fn(a, b, "reference"), rtol, atol, f"{what} {name}")
