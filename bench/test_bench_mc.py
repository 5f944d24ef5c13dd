"""pytest-benchmark suite over the implementations of ``registry.py`` (the same registry as
``bench_mc.py``), at small sizes.

    python -m pytest bench                              # timings (pytest-benchmark table)
    python -m pytest -q bench --benchmark-disable       # CI smoke pass: each runs once

Every test asserts that the implementation's result equals the float64 reference, so the
smoke pass checks every implementation, not only that it runs. Sizes: ``1e3, 1e5, 1e6``, or
``FASTKL_BENCH_SIZES`` (comma-separated, e.g. ``1000,100000``). Timings are never asserted.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import registry as reg  # noqa: E402

SIZES = [int(float(s)) for s in os.environ.get("FASTKL_BENCH_SIZES", "1e3,1e5,1e6").split(",")]
DTYPES = ["float32", "float64"]
IMPLS = reg.implementations()

_cases: dict = {}
_refs: dict = {}


def _case(n, dtype):
    key = (n, dtype)
    if key not in _cases:
        _cases[key] = reg.make_case(n, dtype, seed=n)
    return _cases[key]


def _ref(op, n, dtype):
    key = (op, n, dtype)
    if key not in _refs:
        _refs[key] = reg.reference(op, _case(n, dtype))
    return _refs[key]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("im", IMPLS, ids=lambda im: f"{im.impl}-{im.op}".replace(" ", "_"))
def test_mc(benchmark, im, n, dtype):
    case = _case(n, dtype)
    if case.n == 0:
        pytest.skip("empty case")
    benchmark.group = f"{im.op} {dtype} n={n:.0e}"
    benchmark.extra_info["bytes"] = case.input_bytes(im.op)
    if not getattr(benchmark, "disabled", False):
        im.fn(case)  # keep JIT compile / first-call costs out of the timings
    got = benchmark(im.fn, case)
    ref = _ref(im.op, n, dtype)
    assert reg.matches_op(im.op, got, ref), f"{im.id}: result differs from the reference"


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("name_fn", reg.roofline_impls(), ids=lambda t: t[0].replace(" ", "_"))
def test_roofline(benchmark, name_fn, n):
    case = _case(n, "float32")
    benchmark.group = f"roofline float32 n={n:.0e}"
    name_fn[1](case)  # numba compile
    got = benchmark(name_fn[1], case)
    assert reg.matches(got, reg.roofline_reference(case), rtol=1e-4)


def test_registry_covers_every_backend():
    import fastkl

    names = {im.impl for im in IMPLS}
    for be in fastkl.available_backends():
        assert f"fastkl {be}" in names
    assert "numpy textbook" in names
