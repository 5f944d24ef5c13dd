"""Backend registry: name -> module implementing the kernel contract (``_contract``).

Backends are imported lazily, on first use, so ``import fastkl`` stays cheap (numba alone
takes ~0.5 s to import).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

# preference order for backend=None: Cython needs no JIT warm-up, numba is next
_MODULES = {
    "cython": "fastkl.backends.cython",
    "numba": "fastkl.backends.numba",
    "numpy": "fastkl.backends.numpy",
    # the readable specification (backends/numpy/mc.py, logits.py): the tests' oracle. Accepted
    # by get_backend and ``backend=``, never chosen for None nor listed by available_backends
    "reference": "fastkl.backends.reference",
}
HIDDEN = ("reference",)
BACKEND_NAMES = tuple(n for n in _MODULES if n not in HIDDEN)

# Set in a child made by fork() (os.fork, multiprocessing's "fork" start method) of a process
# that had imported fastkl: the compiled backends then run serially, as their thread pools
# (libgomp's, numba's) do not survive fork. A backend first imported in such a child reads
# it; a loaded one also has its own handler (see ``numba.common``, ``cython/runtime.pxi``).
_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def in_forked_child() -> bool:
    """True in a process made by fork() after fastkl was imported (kernels run serially)."""
    return _forked


_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def _try_load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as exc:  # missing optional dependency or unbuilt extension
            _loaded[name] = None
            _errors[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that work in this installation, fastest first."""
    return [n for n in BACKEND_NAMES if _try_load(n) is not None]


_default: ModuleType | None = None  # get_backend(None), once found (_loaded never changes)


def get_backend(name: str | None) -> ModuleType:
    """The module for ``name`` (None: the fastest available)."""
    global _default
    if name is None:
        if _default is not None:
            return _default
        for n in BACKEND_NAMES:
            mod = _try_load(n)
            if mod is not None:
                _default = mod
                return mod
        raise RuntimeError("no fastkl backend could be loaded")  # the numpy backend always loads
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend must be None or one of {list(BACKEND_NAMES)}, got {name!r}")
    mod = _try_load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not available here ({_errors.get(name)})")
    return mod
