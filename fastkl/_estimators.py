"""The one table of Monte Carlo estimators.

Everything that needs to know which estimators exist derives from ``ESTIMATORS``: the
argument checks (``_checks.estimator_code``), the kernel codes (``backends._contract``), the
command line's choices, the demo, the tests' parametrisation and the benchmark registry.

Notation: samples x ~ q, ``l = logp - logq = log r``. Each row gives the estimator's public
name, whether it estimates the reverse divergence KL(p||q), the integer code the kernels
branch on, the per-sample term t(l), its derivative d t / d logq (as text, for docs and
messages), and the term's limits as l -> -inf and l -> +inf (the kernels return these at
l = +-inf instead of inf - inf or 0 * inf).

Adding an estimator: add its row here, its term and derivative in each backend's term
function (``backends/numpy``, ``backends/numba``, ``backends/cython``), and its mpmath
reference in ``tests/test_numerics.py``.

This module imports nothing from fastkl: the backends and the public layer both read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimator:
    name: str  # public name, as passed to ``estimator=``
    reverse: bool  # True: estimates KL(p||q) (``reverse=True``)
    code: int  # what the kernels branch on
    label: str  # short id used by tests, benchmarks and the command line
    target: str  # the divergence it estimates
    term: str  # t(l)
    derivative: str  # d t / d logq
    at_minus_inf: float  # lim t(l), l -> -inf
    at_plus_inf: float  # lim t(l), l -> +inf


ESTIMATORS: tuple[Estimator, ...] = (
    Estimator("k1", False, 0, "k1", "KL(q||p)", "-l", "1", math.inf, -math.inf),
    Estimator("k2", False, 1, "k2", "KL(q||p)", "l**2 / 2", "-l", math.inf, math.inf),
    Estimator("k3", False, 2, "k3", "KL(q||p)", "expm1(l) - l", "-expm1(l)", math.inf, math.inf),
    Estimator("k1", True, 3, "rk1", "KL(p||q)", "r * l", "-r * (l + 1)", 0.0, math.inf),
    Estimator("k3", True, 4, "rk3", "KL(p||q)", "r * l - expm1(l)", "-r * l", 1.0, math.inf),
    # verl's "abs" penalty: not an estimate of a KL divergence, a distance-like penalty
    Estimator("abs", False, 5, "abs", "E_q|log r|", "abs(l)", "-sign(l)", math.inf, math.inf),
)

# named codes, for the kernels (numba freezes module globals; C mirrors them in an enum)
K1, K2, K3, RK1, RK3, ABS = (e.code for e in ESTIMATORS)

BY_KEY: dict[tuple[str, bool], Estimator] = {(e.name, e.reverse): e for e in ESTIMATORS}
BY_CODE: dict[int, Estimator] = {e.code: e for e in ESTIMATORS}
BY_LABEL: dict[str, Estimator] = {e.label: e for e in ESTIMATORS}
NAMES: tuple[str, ...] = tuple(dict.fromkeys(e.name for e in ESTIMATORS))
REVERSIBLE: tuple[str, ...] = tuple(e.name for e in ESTIMATORS if e.reverse)


def lookup(name: str, reverse: bool) -> Estimator | None:
    """The row for ``(name, reverse)``, or None."""
    return BY_KEY.get((name, bool(reverse)))
