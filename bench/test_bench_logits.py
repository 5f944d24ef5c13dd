"""pytest-benchmark suite over the logits implementations of ``registry_logits.py`` (the
same registry as ``bench_logits.py``), at small sizes.

    python -m pytest bench/test_bench_logits.py                  # timings
    python -m pytest -q bench --benchmark-disable                # CI smoke pass

Every test asserts that the implementation's result equals the float64 reference, so the
smoke pass checks every implementation, not only that it runs. Shapes: ``64 x 32000`` and
``8 x 50257``, or ``FASTKL_BENCH_LOGITS`` (e.g. ``4x1000,16x32000``). Timings are never
asserted.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import registry_logits as reg  # noqa: E402

SHAPES = [tuple(int(v) for v in s.split("x"))
          for s in os.environ.get("FASTKL_BENCH_LOGITS", "64x32000,8x50257").split(",")]
DTYPES = ["float32", "float64"]
IMPLS = reg.implementations()

_cases: dict = {}
_refs: dict = {}


def _case(shape, dtype):
    key = (shape, dtype)
    if key not in _cases:
        _cases[key] = reg.make_case(*shape, dtype, seed=shape[0])
    return _cases[key]


def _ref(op, shape, dtype):
    key = (op, shape, dtype)
    if key not in _refs:
        _refs[key] = reg.reference(op, _case(shape, dtype))
    return _refs[key]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("im", IMPLS, ids=lambda im: f"{im.impl}-{im.op}".replace(" ", "_"))
def test_logits(benchmark, im, shape, dtype):
    case = _case(shape, dtype)
    benchmark.group = f"{im.op} {dtype} {shape[0]}x{shape[1]}"
    benchmark.extra_info["bytes"] = case.input_bytes(im.op)
    if not getattr(benchmark, "disabled", False):
        im.fn(case)  # keep JIT compile / first-call costs out of the timings
    got = benchmark(im.fn, case)
    assert reg.matches(im.op, got, _ref(im.op, shape, dtype)), f"{im.id}: differs from reference"


@pytest.mark.parametrize("name_fn", reg.roofline_impls(), ids=lambda t: t[0].replace(" ", "_"))
def test_roofline(benchmark, name_fn):
    case = _case(SHAPES[0], "float32")
    benchmark.group = f"roofline float32 {SHAPES[0][0]}x{SHAPES[0][1]}"
    name_fn[1](case)  # numba compile
    got = benchmark(name_fn[1], case)
    assert abs(got - reg.roofline_reference(case)) <= 1e-4 * abs(reg.roofline_reference(case))


def test_registry_covers_every_backend_and_op():
    import fastkl

    pairs = {(im.impl, im.op) for im in IMPLS}
    for be in fastkl.available_backends():
        for op in reg.OPS:
            assert (f"fastkl {be}", op) in pairs
    assert ("numpy logsumexp", "kl") in pairs and ("scipy", "kl") in pairs
