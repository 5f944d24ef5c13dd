"""The installation under test has the backends it was meant to have.

``FASTKL_REQUIRE_BACKENDS`` (set by ``.ci/run``) names backends that must load: without this
check, a Cython build that failed (now an optional extension, skipped with a warning) or a numba
that does not import would silently shrink every backend-parametrized test to the numpy one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastkl
from fastkl.backends import BACKEND_NAMES, _errors


def _required() -> list[str]:
    spec = os.environ.get("FASTKL_REQUIRE_BACKENDS", "")
    return [n.strip() for n in spec.split(",") if n.strip()]


def test_required_backends_names_are_known():
    unknown = [n for n in _required() if n not in BACKEND_NAMES]
    assert not unknown, f"FASTKL_REQUIRE_BACKENDS names unknown backends {unknown}"


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_required_backend_loads(name):
    if name not in _required():
        pytest.skip(f"{name} is not in FASTKL_REQUIRE_BACKENDS")
    assert name in fastkl.available_backends(), f"{name}: {_errors.get(name)}"


def test_numpy_backend_always_loads():
    assert "numpy" in fastkl.available_backends()


def test_missing_extension_says_why():
    """An install without the compiled extension keeps numba and numpy and says why not cython."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.startswith('fastkl.backends.cython._'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastkl\n"
        "from fastkl.backends import _errors\n"
        "print(fastkl.available_backends())\n"
        "print(_errors['cython'])\n"
        "print(fastkl.kl_mc([0.0, 1.0], [1.0, 0.5]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert "cython" not in out[0] and "numpy" in out[0]
    assert "not built" in out[1] and "C compiler" in out[1]
    assert float(out[2]) > 0


def test_every_subpackage_is_installed():
    """Each package directory of the source tree is in pyproject's package list, and the
    installed fastkl has it (a package left off the list installs without error and then
    fails on import)."""
    import importlib
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    src, toml = repo / "fastkl", repo / "pyproject.toml"
    if not (src.is_dir() and toml.is_file()):
        pytest.skip("no source tree beside the tests (an artefact's copy of tests/)")
    listed = toml.read_text(encoding="utf-8")
    for init in sorted(src.rglob("__init__.py")):
        name = ".".join(("fastkl",) + init.parent.relative_to(src).parts)
        assert f'"{name}"' in listed, f"{name} is not in pyproject.toml's packages"
        try:
            importlib.import_module(name)  # and the fastkl under test has it
        except ModuleNotFoundError:
            raise
        except ImportError:  # a backend that cannot load here (e.g. an unbuilt extension)
            if name.rsplit(".", 1)[-1] in _required():
                raise
