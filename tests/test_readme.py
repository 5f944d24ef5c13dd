"""The README's Python examples run, in order, in one namespace (as a reader pastes them),
from an empty directory: a renamed argument or a changed default breaks this test, not a
user's first session."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    if not README.exists():  # pragma: no cover - tests run from a checkout
        pytest.skip("README.md not found beside tests/")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 8, "the README lost its examples"
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, f"README.md python block {i}", "exec"), ns)
