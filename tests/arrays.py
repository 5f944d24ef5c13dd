"""Shared test helpers: an exhaustive array generator in the style of bottleneck's
``tests/util.py`` and the tolerance checks every equivalence test uses.

``case_names()`` lists the cases; ``make_case(name, tmpdir)`` builds one (memmap cases write
a ``.npy`` file under ``tmpdir`` and load it read-only). Each case is a ``(logq, logp)``
pair, optionally with a mask and log importance weights, and covers one layout or dtype
corner: empty, 0-d, 1-4-d, transposed, Fortran, strided and negative-stride views,
big-endian, read-only arrays and memmaps, float16/32/64 (and mixes), NaN/+-inf mixes, sizes
crossing the kernels' BLOCK boundaries, Python lists, and inputs that must raise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastkl import _estimators

BLOCK = 4096  # mirrors fastkl.backends._contract.BLOCK (checked in test_numerics.py)

# (estimator, reverse) pairs: every estimator the API offers (fastkl's estimator table, in its
# order: k1, k2, k3, rk1, rk3)
ESTIMATORS = [(e.name, e.reverse) for e in _estimators.ESTIMATORS]
EST_IDS = [e.label for e in _estimators.ESTIMATORS]

# per-term relative tolerances of the issue (times max(1, |log r|))
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-14}
# backend-vs-reference tolerance used by the equivalence tests
EQUIV_RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


@dataclass
class Case:
    name: str
    logq: Any
    logp: Any
    mask: Any = None
    log_iw: Any = None

    def kwargs(self) -> dict:
        kw = {}
        if self.mask is not None:
            kw["mask"] = self.mask
        if self.log_iw is not None:
            kw["log_iw"] = self.log_iw
        return kw

    @property
    def ndim(self) -> int:
        return np.ndim(self.logq)


_BUILDERS: dict[str, Callable[[np.random.Generator, Path], Case]] = {}


def _register(name: str):
    def deco(fn):
        assert name not in _BUILDERS, name
        _BUILDERS[name] = fn
        return fn

    return deco


def case_names() -> list[str]:
    return list(_BUILDERS)


def make_case(name: str, tmpdir: Path | str) -> Case:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    case = _BUILDERS[name](rng, Path(tmpdir))
    case.name = name
    return case


def pair(rng, shape, dtype=np.float64, spread=1.0, loc=-1.0):
    """Random (logq, logp) with ``logp - logq ~ N(0, spread)``; log-densities may be > 0."""
    q = rng.normal(loc, 1.5, size=shape)
    p = q + rng.normal(0.0, spread, size=shape)
    return q.astype(dtype), p.astype(dtype)


def _memmap(tmpdir: Path, tag: str, a: np.ndarray) -> np.ndarray:
    path = tmpdir / f"{tag}.npy"
    np.save(path, a)
    m = np.load(path, mmap_mode="r")
    assert not m.flags.writeable
    return m


_DTYPES = {"f2": np.float16, "f4": np.float32, "f8": np.float64}


def _add_dtype_cases(tag: str, dt) -> None:
    def simple(shape, spread=1.0):
        return lambda rng, tmp: Case("", *pair(rng, shape, dt, spread))

    shapes = {"0d": (), "empty": (0,), "empty2d": (3, 0), "empty2d-rows": (0, 4),
              "1d": (13,), "2d": (5, 7), "3d": (3, 4, 5), "4d": (2, 3, 4, 5)}
    for sname, shape in shapes.items():
        _register(f"{tag}-{sname}")(simple(shape))
    for n in (1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5):
        _register(f"{tag}-n{n}")(simple((n,)))
    _register(f"{tag}-2d-rows-cross-block")(simple((3, BLOCK + 1)))
    _register(f"{tag}-wide-logratio")(simple((6, 50), spread=30.0))

    @_register(f"{tag}-transposed")
    def _(rng, tmp):
        q, p = pair(rng, (7, 5), dt)
        return Case("", q.T, p.T)

    @_register(f"{tag}-3d-transposed")
    def _(rng, tmp):
        q, p = pair(rng, (3, 4, 5), dt)
        # logq a transposed view, logp a C-contiguous copy of the same layout
        return Case("", q.transpose(2, 0, 1), np.ascontiguousarray(p.transpose(2, 0, 1)))

    @_register(f"{tag}-fortran")
    def _(rng, tmp):
        q, p = pair(rng, (6, 9), dt)
        return Case("", np.asfortranarray(q), p)

    @_register(f"{tag}-strided")
    def _(rng, tmp):
        q, p = pair(rng, (40,), dt)
        return Case("", q[::3], p[1::3])

    @_register(f"{tag}-strided2d")
    def _(rng, tmp):
        q, p = pair(rng, (8, 30), dt)
        return Case("", q[::2, 1::3], p[1::2, ::3])

    @_register(f"{tag}-strided-cross-block")
    def _(rng, tmp):
        q, p = pair(rng, (2 * (BLOCK + 3),), dt)
        return Case("", q[::2], p[1::2])

    @_register(f"{tag}-negstride")
    def _(rng, tmp):
        q, p = pair(rng, (17,), dt)
        return Case("", q[::-1], p[::-1])

    @_register(f"{tag}-negstride2d")
    def _(rng, tmp):
        q, p = pair(rng, (6, 11), dt)
        return Case("", q[::-2, ::-1], p[::-2, ::-1])

    @_register(f"{tag}-negstride-cross-block")
    def _(rng, tmp):
        q, p = pair(rng, (2, BLOCK + 7), dt)
        return Case("", q[:, ::-1], p[::-1, :])

    @_register(f"{tag}-bigendian")
    def _(rng, tmp):
        q, p = pair(rng, (5, 9), dt)
        be = np.dtype(dt).newbyteorder(">")
        return Case("", q.astype(be), p.astype(be))

    @_register(f"{tag}-bigendian-strided")
    def _(rng, tmp):
        q, p = pair(rng, (6, 10), dt)
        be = np.dtype(dt).newbyteorder(">")
        return Case("", q.astype(be)[::-1, ::2], p[::-1, 1::2])

    @_register(f"{tag}-readonly")
    def _(rng, tmp):
        q, p = pair(rng, (4, 6), dt)
        q.flags.writeable = False
        p.flags.writeable = False
        return Case("", q, p)

    @_register(f"{tag}-memmap")
    def _(rng, tmp):
        q, p = pair(rng, (9, 11), dt)
        return Case("", _memmap(tmp, f"{tag}-mm-q", q), _memmap(tmp, f"{tag}-mm-p", p))

    @_register(f"{tag}-memmap-cross-block")
    def _(rng, tmp):
        q, p = pair(rng, (2 * BLOCK + 1,), dt)
        return Case("", _memmap(tmp, f"{tag}-mmb-q", q), _memmap(tmp, f"{tag}-mmb-p", p))

    @_register(f"{tag}-memmap-bigendian-view")
    def _(rng, tmp):
        q, p = pair(rng, (7, 8), dt)
        be = np.dtype(dt).newbyteorder(">")
        return Case("", _memmap(tmp, f"{tag}-mmbe-q", q.astype(be))[:, ::-1],
                    _memmap(tmp, f"{tag}-mmbe-p", p.astype(be))[:, ::-1])

    def nan_inf(rng, shape):
        q, p = pair(rng, shape, dt)
        flat_q, flat_p = q.reshape(-1), p.reshape(-1)
        specials = [
            (np.nan, 0.0), (0.0, np.nan), (np.nan, np.nan),
            (np.inf, 0.0), (-np.inf, 0.0), (0.0, np.inf), (0.0, -np.inf),
            (np.inf, np.inf), (-np.inf, -np.inf), (np.inf, -np.inf), (-np.inf, np.inf),
        ]
        idx = rng.choice(flat_q.size, size=len(specials), replace=False)
        for i, (a, b) in zip(idx, specials, strict=True):
            flat_q[i], flat_p[i] = a, b
        return q, p

    @_register(f"{tag}-nan-inf")
    def _(rng, tmp):
        return Case("", *nan_inf(rng, (6, 10)))

    @_register(f"{tag}-nan-only-one")
    def _(rng, tmp):
        q, p = pair(rng, (3, 5), dt)
        q[1, 2] = np.nan
        return Case("", q, p)

    @_register(f"{tag}-nan-cross-block")
    def _(rng, tmp):
        q, p = pair(rng, (BLOCK + 9,), dt)
        q[BLOCK + 3] = np.nan
        p[17] = np.nan
        return Case("", q, p)

    @_register(f"{tag}-inf-only")
    def _(rng, tmp):
        q, p = pair(rng, (4, 5), dt)
        q[0, 1] = -np.inf  # l = +inf
        p[2, 3] = -np.inf  # l = -inf
        return Case("", q, p)

    @_register(f"{tag}-nan-inf-masked")
    def _(rng, tmp):
        q, p = nan_inf(rng, (6, 10))
        bad = ~(np.isfinite(q) & np.isfinite(p))
        mask = rng.random((6, 10)) < 0.7
        mask[bad] = False
        mask[0, 0] = True  # keep one non-finite pair included (both raise or neither)
        return Case("", q, p, mask=mask)

    @_register(f"{tag}-nan-masked-out")
    def _(rng, tmp):
        q, p = pair(rng, (4, 9), dt)
        q[1, 3] = np.nan
        p[2, 5] = np.nan
        q[3, 0] = np.inf
        mask = np.ones((4, 9), dtype=bool)
        mask[1, 3] = mask[2, 5] = mask[3, 0] = False
        return Case("", q, p, mask=mask)

    @_register(f"{tag}-mask-bool")
    def _(rng, tmp):
        q, p = pair(rng, (6, 10), dt)
        mask = rng.random((6, 10)) < 0.6
        mask[2] = False  # a row with no tokens
        return Case("", q, p, mask=mask)

    @_register(f"{tag}-mask-bool-cross-block")
    def _(rng, tmp):
        q, p = pair(rng, (2, BLOCK + 100), dt)
        mask = rng.random(q.shape) < 0.5
        mask[:, BLOCK:] = False
        return Case("", q, p, mask=mask)

    @_register(f"{tag}-mask-weights")
    def _(rng, tmp):
        q, p = pair(rng, (6, 10), dt)
        w = rng.random((6, 10)) * 3.0
        w[w < 0.8] = 0.0
        w[4] = 0.0
        return Case("", q, p, mask=w.astype(np.float32 if tag == "f2" else np.float64))

    @_register(f"{tag}-mask-int")
    def _(rng, tmp):
        q, p = pair(rng, (5, 8), dt)
        return Case("", q, p, mask=rng.integers(0, 3, size=(5, 8)).astype(np.int32))

    @_register(f"{tag}-mask-strided")
    def _(rng, tmp):
        q, p = pair(rng, (5, 8), dt)
        m = rng.random((10, 8)) < 0.5
        return Case("", q, p, mask=m[::-2])

    @_register(f"{tag}-log-iw")
    def _(rng, tmp):
        q, p = pair(rng, (5, 12), dt)
        return Case("", q, p, log_iw=rng.normal(0.0, 0.5, size=(5, 12)).astype(dt))

    @_register(f"{tag}-log-iw-mask-cross-block")
    def _(rng, tmp):
        q, p = pair(rng, (BLOCK + 33,), dt)
        iw = rng.normal(0.0, 0.5, size=q.shape).astype(dt)[::-1]
        return Case("", q, p, mask=rng.random(q.shape) < 0.8, log_iw=iw)


for _tag, _dt in _DTYPES.items():
    _add_dtype_cases(_tag, _dt)


@_register("mixed-f4-f8")
def _(rng, tmp):
    q, p = pair(rng, (6, 7))
    return Case("", q.astype(np.float32), p)


@_register("mixed-f2-f4")
def _(rng, tmp):
    q, p = pair(rng, (6, 7))
    return Case("", q.astype(np.float16), p.astype(np.float32))


@_register("mixed-f8-bigendian-f2")
def _(rng, tmp):
    q, p = pair(rng, (6, 7))
    return Case("", q.astype(">f8"), p.astype(np.float16)[::-1])


@_register("mixed-f4-log-iw-f8")
def _(rng, tmp):
    q, p = pair(rng, (4, 5), np.float32)
    return Case("", q, p, log_iw=rng.normal(0, 0.3, size=(4, 5)))


@_register("list-1d")
def _(rng, tmp):
    q, p = pair(rng, (9,))
    return Case("", q.tolist(), p.tolist())


@_register("list-2d")
def _(rng, tmp):
    q, p = pair(rng, (3, 4))
    return Case("", q.tolist(), p.tolist(), mask=[[True, False, True, True]] * 3)


@_register("python-scalars")
def _(rng, tmp):
    return Case("", -1.25, 0.5)


@_register("bad-int-logq")
def _(rng, tmp):
    q, p = pair(rng, (4,))
    return Case("", np.arange(4), p)


@_register("bad-shape-mismatch")
def _(rng, tmp):
    q, p = pair(rng, (4, 5))
    return Case("", q, p[:, :4])


@_register("bad-mask-shape")
def _(rng, tmp):
    q, p = pair(rng, (4, 5))
    return Case("", q, p, mask=np.ones((5, 4), dtype=bool))


@_register("bad-negative-weights")
def _(rng, tmp):
    q, p = pair(rng, (4, 5))
    w = np.ones((4, 5))
    w[1, 1] = -1.0
    return Case("", q, p, mask=w)


# --------------------------------------------------------------------------- reductions


def reductions_for(shape: tuple) -> list[dict]:
    """Keyword sets of the reductions that apply to an input of this shape.

    Reductions that leave more than 512 output rows are skipped: the reference pads every
    row to a full BLOCK, so e.g. ``axis=()`` over 12k elements would cost 50M elements.
    """
    ndim = len(shape)
    out = [{"reduction": "none"}, {"reduction": "mean"}, {"reduction": "sum"}]
    if ndim >= 1:
        out += [{"reduction": "mean", "axis": 0}, {"reduction": "sum", "axis": -1},
                {"reduction": "mean", "axis": ()}]
    if ndim >= 2:
        out += [{"reduction": "mean", "axis": (0, 1)}, {"reduction": "sum", "axis": (-1, 0)},
                {"reduction": "mean", "axis": 1}]
    if ndim >= 3:
        out += [{"reduction": "sum", "axis": (0, 2)}, {"reduction": "mean", "axis": (1, -1)}]
    if ndim == 2:
        out += [{"reduction": r} for r in
                ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")]

    def out_rows(red):
        axis = red.get("axis")
        if red["reduction"] in ("none", "token-mean") or axis is None:
            return 1
        if red["reduction"] != "mean" and red["reduction"] != "sum":
            return shape[0]
        axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        return math.prod(n for i, n in enumerate(shape) if i not in axes)

    return [r for r in out if out_rows(r) <= 512]


# --------------------------------------------------------------------------- comparisons


def snapshot(*objs):
    """Copies (and writeable flags) of the ndarray arguments, to check they never change."""
    snap = []
    for o in objs:
        if isinstance(o, np.ndarray):
            snap.append((o, np.array(o, copy=True), o.flags.writeable, o.dtype, o.strides))
    return snap


def assert_unchanged(snap) -> None:
    for orig, copy, writeable, dtype, strides in snap:
        assert orig.flags.writeable == writeable, "the writeable flag of an input changed"
        assert orig.dtype == dtype and orig.strides == strides, "an input was re-viewed"
        assert np.array_equal(np.asarray(orig), copy, equal_nan=True), "an input was modified"


def log_ratio(logq, logp) -> np.ndarray:
    """Exact-as-possible float64 log r from the given inputs (exact for float16/32)."""
    q = np.asarray(logq, dtype=np.float64)
    p = np.asarray(logp, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return p - q


def term_scale(logq, logp, log_iw=None) -> np.ndarray:
    """``max(1, |log r|)`` (plus |log_iw|), the per-term tolerance factor of the issue."""
    with np.errstate(invalid="ignore"):
        s = np.abs(log_ratio(logq, logp))
        if log_iw is not None:
            s = s + np.abs(np.asarray(log_iw, dtype=np.float64))
        s = np.where(np.isfinite(s), s, 0.0)
    return np.maximum(1.0, s)


def assert_same_specials(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    gn, rn = np.isnan(got), np.isnan(ref)
    if got.ndim == 0:
        if gn or rn or np.isinf(got) or np.isinf(ref):
            assert (gn and rn) or got == ref, f"{what}: got {got!r}, reference {ref!r}"
        return
    assert np.array_equal(gn, rn), f"{what}: NaN positions differ: got {np.argwhere(gn)}, " \
        f"reference {np.argwhere(rn)}"
    for sign in (1, -1):
        gi, ri = got == sign * np.inf, ref == sign * np.inf
        assert np.array_equal(gi, ri), f"{what}: {sign:+d}inf positions differ"


def assert_within(got, ref, bound, what: str) -> None:
    """NaN/inf positions equal and ``|got - ref| <= bound`` elsewhere (all float64)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    assert_same_specials(got, ref, what)
    fin = np.isfinite(ref)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), ref.shape)
    err = np.abs(got[fin] - ref[fin])
    ok = err <= bound[fin]
    if not ok.all():
        i = int(np.argmax(~ok))
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.size} values out of tolerance; first: "
            f"got {got[fin][i]!r}, reference {ref[fin][i]!r}, |diff| {err[i]:.3e} > "
            f"bound {bound[fin][i]:.3e}"
        )


def result_dtype(logq, logp) -> np.dtype:
    """dtype of the per-sample terms: float64 if either input is float64, else float32."""
    wide = any(np.asarray(a).dtype.itemsize == 8 for a in (logq, logp))
    return np.dtype(np.float64 if wide else np.float32)


def rel_err(got, exact) -> float:
    return abs(got - exact) / abs(exact) if exact != 0 else abs(got)


def is_python_float(x) -> bool:
    return type(x) is float


def isclose_nan(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b))
