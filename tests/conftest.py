"""Shared fixtures: the backends under test, the array-generator cases, hypothesis profiles."""

from __future__ import annotations

import os

# numba sizes its thread pool once, at import, from NUMBA_NUM_THREADS (default: the CPU
# count); test_accumulation.py compares 1, 2 and 3 threads, so the pool must hold 3 even on a
# 2-core machine. The default thread count stays the CPU count (set after the import).
_CPUS = os.cpu_count() or 1
if "NUMBA_NUM_THREADS" not in os.environ and _CPUS < 3:
    os.environ["NUMBA_NUM_THREADS"] = "3"
    import numba

    numba.set_num_threads(_CPUS)

import arrays  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import fastkl  # noqa: E402

BACKENDS = fastkl.available_backends()

# modest example counts by default (the suite must run in minutes on 2 cores); more with
# HYPOTHESIS_PROFILE=thorough. Locally every run explores new random examples (and replays
# the failures kept in .hypothesis/); under CI (the CI variable set, as `.ci/run` does) the
# "ci" profile is derandomized: the same examples on every run, no example database, so a
# CI verdict depends on the submitted code alone, never on the draw of a random seed.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=40, **_COMMON)
settings.register_profile("ci", max_examples=40, derandomize=True, database=None,
                          print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)


def pytest_report_header(config):
    return (f"fastkl backends available: {BACKENDS}; hypothesis profile "
            f"{settings._current_profile!r}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    """Builds generator cases on demand (memmaps live in a session temp dir), cached."""
    tmp = tmp_path_factory.mktemp("cases")
    cache: dict[str, arrays.Case] = {}

    def get(name: str) -> arrays.Case:
        if name not in cache:
            cache[name] = arrays.make_case(name, tmp)
        return cache[name]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
