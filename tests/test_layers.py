"""The layering of the package, read from the source (no import, nothing runs):

* no module of ``fastkl`` uses a private (underscore) name of a public-API module
  (``mc``, ``logits``, ``stream``, ``outofcore``, ``files``): what they share lives in the
  private core (``_core``, ``_validate``, ``_checks``) instead;
* the imports between the modules of ``fastkl`` (those inside functions included) have no
  cycle.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

# the source of the fastkl under test (the source tree, or site-packages when the tests run
# against an installed wheel from a copy of tests/); found without importing it
PACKAGE = Path(importlib.util.find_spec("fastkl").origin).resolve().parent
PUBLIC = ("mc", "logits", "stream", "outofcore", "files")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = ("fastkl",) + f.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _is_extension(name: str) -> bool:
    """A compiled submodule (``from . import _mc``): its source is a ``.pyx``."""
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".pyx").exists()


def _imports(name: str, path: Path):
    """(line, imported module, imported name or None) for every import in the file, with
    ``from . import x`` resolved to the module ``x`` where it is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None, alias.asname
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                if sub in MODULES or _is_extension(sub):
                    yield node.lineno, sub, None, alias.asname or alias.name
                else:
                    yield node.lineno, mod, alias.name, alias.asname or alias.name


def _is_public_api(mod: str) -> bool:
    return mod in {f"fastkl.{m}" for m in PUBLIC}


def test_no_private_names_of_public_modules():
    bad = []
    for name, path in MODULES.items():
        bound = {}  # local name -> public-API module it is bound to
        for line, mod, item, local in _imports(name, path):
            if _is_public_api(mod) and item is not None and item.startswith("_"):
                bad.append(f"{name}:{line} imports {mod}.{item}")
            if _is_public_api(mod) and item is None:
                bound[local or mod] = mod
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{name}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not bad, "private names of public-API modules used:\n" + "\n".join(bad)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, mod, _, _ in _imports(name, path):
            if mod in MODULES and mod != name:
                graph[name].add(mod)
    return graph


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles inside fastkl:\n" + "\n".join(cycles)


def test_the_check_sees_imports():
    """The graph is not empty by mistake: the public modules import the core."""
    graph = _graph()
    assert "fastkl._core" in graph["fastkl.mc"]
    assert "fastkl.mc" in graph["fastkl"]
