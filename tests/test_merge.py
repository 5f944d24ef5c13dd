"""The block merge and the small-input call path (issue 12 item 5, "no size where fastkl loses
to numpy"): ``_core.merge_blocks`` merges one row of a few blocks in Python floats; this file
checks it bit for bit against the numpy form it replaced (kept below as the oracle), on random
partials with NaN, inf, zero and negative-zero weights and sums, and on kernel partials.
"""

from __future__ import annotations

import numpy as np
import pytest
from gaps_util import BACKENDS, COMPILED

import fastkl
from fastkl import _core
from fastkl.backends import _threads, get_backend
from fastkl.backends._contract import BLOCK, N_PARTIALS


def _merge_oracle(part: np.ndarray) -> np.ndarray:
    """``merge_blocks`` as it was before the Python fast path (commit 1d7d5f6)."""
    if part.shape[1] == 1:
        return part[:, 0, :]
    tot = part.sum(axis=1)
    W = tot[:, 0]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = np.where(W > 0, tot[:, 1] / W, 0.0)
        bmean = np.where(part[..., 0] > 0, part[..., 1] / part[..., 0], 0.0)
        spread = (part[..., 0] * (bmean - mean[:, None]) ** 2).sum(axis=1)
    tot[:, 2] = tot[:, 2] + spread
    return tot


def _same_bits(a, b) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


_SPECIAL = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1e308, -1e308, 1.0])


def _random_partials(rng, rows: int, nblk: int, special: float) -> np.ndarray:
    """Partials like a kernel's (W >= 0 mostly, counts integral) with magnitudes over 40
    decades and a fraction ``special`` of entries replaced by specials."""
    part = rng.normal(size=(rows, nblk, N_PARTIALS)) * 10.0 ** rng.integers(
        -20, 20, size=(rows, nblk, N_PARTIALS))
    part[..., 0] = np.abs(part[..., 0])
    part[..., 3] = np.abs(part[..., 3])
    part[..., 4] = rng.integers(0, 3, size=(rows, nblk))
    part[..., 5] = rng.integers(0, BLOCK + 1, size=(rows, nblk))
    zero_w = rng.random((rows, nblk)) < 0.2
    part[..., 0][zero_w] = 0.0
    hit = rng.random(part.shape) < special
    part[hit] = rng.choice(_SPECIAL, size=int(hit.sum()))
    return part


@pytest.mark.parametrize("nblk", [*range(1, 20), 24, 25, 31, 32, 33, 63, 64, 65, 127, 128,
                                  129, 130, 200])
def test_merge_blocks_bits_random(nblk):
    rng = np.random.default_rng(1000 + nblk)
    for trial in range(60):
        rows = 1 if trial % 3 else int(rng.integers(1, 4))
        special = (0.0, 0.02, 0.3)[trial % 3]
        part = _random_partials(rng, rows, nblk, special)
        got = _core.merge_blocks(part.copy())
        want = _merge_oracle(part.copy())
        assert _same_bits(got, want), (nblk, trial, part)


def test_merge_blocks_bits_all_special():
    """Every combination of specials in W and S for two and three blocks."""
    for nblk in (2, 3):
        grid = np.array(np.meshgrid(*[_SPECIAL] * (2 * nblk))).reshape(2 * nblk, -1).T
        for row in grid[::7]:
            part = np.zeros((1, nblk, N_PARTIALS))
            part[0, :, 0] = row[:nblk]
            part[0, :, 1] = row[nblk:]
            part[0, :, 2] = row[::-1][:nblk]
            assert _same_bits(_core.merge_blocks(part.copy()), _merge_oracle(part.copy())), row


def test_merge_blocks_signed_zeros():
    for nblk in (2, 3, 9):
        part = np.full((1, nblk, N_PARTIALS), -0.0)
        assert _same_bits(_core.merge_blocks(part.copy()), _merge_oracle(part.copy()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("est", [0, 1, 2, 3])
def test_merge_blocks_bits_kernel_partials(backend, dtype, est):
    """Kernel partials (M2 on) of 1e3..2e5 pairs with a weighted mask, NaN and inf."""
    be = get_backend(backend)
    rng = np.random.default_rng(7 + est)
    clamps = (-np.inf, np.inf, -np.inf, np.inf, 0.0)
    for n in (1000, 5000, 10_000, 100_000, 200_000):
        q = rng.normal(-3, 1, n).astype(dtype)
        p = (q + rng.normal(0, 0.5, n)).astype(dtype)
        p[rng.integers(0, n, 3)] = np.nan
        p[rng.integers(0, n, 2)] = np.inf
        m = rng.random(n) * (rng.random(n) < 0.9)
        for mask in (None, m):
            views = [q.reshape(1, n), p.reshape(1, n),
                     None if mask is None else mask.reshape(1, n), None]
            part = be.mc_partials(*views, est, clamps, True)
            assert _same_bits(_core.merge_blocks(part.copy()), _merge_oracle(part.copy()))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_sizes_same_bits_any_threads(backend, dtype):
    """The public results at the benchmarked sizes (and either side of the thresholds) are
    the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(3)
    lim = max(_threads.CYTHON_MC_MIN, _threads.NUMBA_MIN)
    for n in (1000, 10_000, 100_000, lim - 1, lim, lim + 1):
        q = rng.normal(-3, 1, n).astype(dtype)
        p = (q + rng.normal(0, 0.5, n)).astype(dtype)
        got = {}
        for t in (1, 2):
            with fastkl.threads(t):
                got[t] = [fastkl.kl_mc(q, p, est, backend=backend, reduction=red)
                          for est in ("k1", "k2", "k3") for red in ("mean", "sum")]
                s = fastkl.kl_mc_stats(q, p, backend=backend)
                got[t] += [s.mean, s.std, s.sem]
        assert _same_bits(got[1], got[2]), n


@pytest.mark.parametrize("backend", [None, *BACKENDS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_call_same_bits_as_general_path(backend, dtype):
    """``kl_mc(q, p)`` of plain contiguous arrays (``mc._plain_scalar``) against the general
    path of the same reduction (an explicit ``axis`` covering every axis), NaN and inf
    included; and against ``merge_blocks`` with M2 (the old merge of every call)."""
    rng = np.random.default_rng(11)
    for shape in [(1,), (7,), (1000,), (4096,), (4097,), (10_000,), (3, 5000), (100_000,),
                  (2, 3, 40_000)]:
        n = int(np.prod(shape))
        q = rng.normal(-3, 1, n).astype(dtype).reshape(shape)
        p = (q + rng.normal(0, 0.5, n).reshape(shape)).astype(dtype)
        cases = [(q, p)]
        bad = p.copy()
        bad.reshape(-1)[n // 2] = np.inf
        cases.append((q, bad))
        nan = p.copy()
        nan.reshape(-1)[-1] = np.nan
        cases.append((q, nan))
        axis = tuple(range(len(shape)))
        for a, b in cases:
            for est in ("k1", "k2", "k3", "abs"):
                for red in ("mean", "sum"):
                    got = fastkl.kl_mc(a, b, est, reduction=red, backend=backend)
                    want = fastkl.kl_mc(a, b, est, reduction=red, backend=backend, axis=axis)
                    assert type(got) is float
                    assert _same_bits(got, want), (shape, est, red)
            rev = fastkl.kl_mc(a, b, "k3", reverse=True, backend=backend)
            assert _same_bits(rev, fastkl.kl_mc(a, b, "k3", reverse=True, backend=backend,
                                                axis=axis))
        # the mean from the merge with M2 (what every call used before)
        be = get_backend(backend)
        part = be.mc_partials(q.reshape(1, n), p.reshape(1, n), None, None, 2,
                              (-np.inf, np.inf, -np.inf, np.inf, 0.0), False)
        tot = _merge_oracle(part)
        assert _same_bits(fastkl.kl_mc(q, p, backend=backend), tot[0, 1] / tot[0, 0])


def test_plain_call_errors_unchanged():
    q = np.zeros(10)
    with pytest.raises(ValueError, match="estimator must be"):
        fastkl.kl_mc(q, q, "k9")
    with pytest.raises(TypeError, match="reverse must be a bool"):
        fastkl.kl_mc(q, q, reverse=1)
    with pytest.raises(ValueError, match="backend must be"):
        fastkl.kl_mc(q, q, backend="torch")
    with pytest.raises(ValueError, match="reduction must be"):
        fastkl.kl_mc(q, q, reduction="MEAN")
