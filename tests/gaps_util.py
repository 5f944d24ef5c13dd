"""Helpers of the gap tests (issue 15): comparisons that treat NaN and +-inf exactly and
report the worst element, and the compiled backends under test."""

from __future__ import annotations

import numpy as np

import fastkl
from fastkl import _estimators

BACKENDS = fastkl.available_backends()
COMPILED = [b for b in BACKENDS if b != "numpy"]
# (estimator, reverse) pairs and their ids, from fastkl's estimator table
ESTIMATORS = [(e.name, e.reverse) for e in _estimators.ESTIMATORS]
EST_IDS = [e.label for e in _estimators.ESTIMATORS]


def close(got, ref, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """|got - ref| <= max(rtol |ref|, atol) where ref is finite; NaN and +-inf identical."""
    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(ref, dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != {e.shape}"
    gn, en = np.isnan(g), np.isnan(e)
    assert np.array_equal(gn, en), (
        f"{what}: NaN at {np.argwhere(gn).tolist()[:8]}, expected at "
        f"{np.argwhere(en).tolist()[:8]}")
    ginf, einf = np.isinf(g), np.isinf(e)
    assert np.array_equal(ginf, einf) and np.array_equal(g[einf], e[einf]), (
        f"{what}: inf at {np.argwhere(ginf).tolist()[:8]} ({g[ginf][:8]}), expected at "
        f"{np.argwhere(einf).tolist()[:8]} ({e[einf][:8]})")
    fin = np.isfinite(e)
    err = np.abs(g[fin] - e[fin])
    lim = np.maximum(rtol * np.abs(e[fin]), atol)
    if err.size and not (err <= lim).all():
        k = int(np.argmax(err / np.maximum(lim, 1e-300)))
        raise AssertionError(
            f"{what}: {int((err > lim).sum())} of {err.size} beyond rtol={rtol:g} "
            f"atol={atol:g}; worst got {g[fin][k]!r} vs ref {e[fin][k]!r} "
            f"(error {err[k]:.3g}, limit {lim[k]:.3g})")


def rel_err(got: float, ref: float) -> float:
    return abs(got - ref) / abs(ref)
