"""Shared fixtures: the backends under test, the array-generator cases, hypothesis profiles."""

from __future__ import annotations

import os

import arrays
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastkl

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
