"""numba's on-disk cache for fastkl's kernels: what keys it, where it lives, and why a bad
cache file never breaks a call. ``jit`` is ``numba.njit`` with this cache.

* **Key.** numba keys a cached function by its own bytecode and the stamp of its own source
  file, but a compiled kernel also contains the helpers it calls from other modules
  (``common``) and the constants it reads (``_contract.BLOCK``, ``_estimators.K1``): with
  numba's key a changed helper kept serving kernels compiled with the old one. Here every
  cached function is stamped with ``cache_key()``: fastkl's version, numba's and Python's,
  and a hash of the source of every module the compiled code depends on (``KEY_MODULES``;
  not the thread policy, ``_threads``, read in Python only). The cache directory
  is named after the key too, so an upgrade or an edit starts a fresh directory instead of
  rewriting the files another installation may be using.
* **Names.** numba names a function's cache files (and its compiled symbols) after its
  qualname and first line: two functions built by one factory (closures) share them, and
  numba hashed their closure cells through a per-process identity. fastkl caches no closure:
  a specialised copy of a function gets its own qualname (``common.specialize``).
* **Location**, the first directory that is writable: ``$NUMBA_CACHE_DIR/fastkl-<key>`` when
  numba's cache directory is set; ``fastkl/backends/__pycache__/fastkl-<key>`` (next to the
  sources, as numba's own default); the user cache directory (``$XDG_CACHE_HOME/fastkl/numba``
  or the platform's equivalent); else (or when the sources are not plain files) no disk
  cache: the kernels compile in each process, silently. ``FASTKL_NUMBA_CACHE=0`` turns the
  disk cache off.
* **Bad files.** A truncated or corrupt index or data file (another process killed while
  writing, a full disk) is a cache miss: the kernel is recompiled and the file rewritten. A
  failed write is ignored. Neither is ever an error of the call.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import re
import sys
import tempfile

import numba
from numba import njit

HERE = os.path.dirname(os.path.abspath(__file__))  # fastkl/backends/numba
BACKENDS = os.path.dirname(HERE)  # KEY_MODULES are relative to fastkl/backends

# every module whose source reaches the compiled numba code (``_estimators``: the estimator
# codes the kernels branch on, frozen into them as constants)
KEY_MODULES = ("_contract.py", "numba/common.py", "numba/mc.py", "numba/logits.py",
               "../_estimators.py")


def source_texts() -> dict[str, bytes]:
    """The source bytes of ``KEY_MODULES`` as installed."""
    out = {}
    for name in KEY_MODULES:
        with open(os.path.join(BACKENDS, name), "rb") as f:
            out[name] = f.read()
    return out


def fastkl_version() -> str:
    """fastkl's ``__version__``, read from the package source (this module may be imported
    while ``fastkl/__init__.py`` is still running)."""
    mod = sys.modules.get("fastkl")
    v = getattr(mod, "__version__", None)
    if isinstance(v, str):
        return v
    try:
        with open(os.path.join(os.path.dirname(BACKENDS), "__init__.py"), encoding="utf-8") as f:
            m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def cache_key(sources: dict[str, bytes] | None = None, version: str | None = None) -> str:
    """The key of the cached kernels: a hex digest of fastkl's version (``version``, default
    the installed one), numba's and Python's, and ``sources`` (default ``source_texts()``),
    the source of every module in ``KEY_MODULES``."""
    if sources is None:
        sources = source_texts()
    if version is None:
        version = fastkl_version()
    h = hashlib.sha256()
    h.update(f"fastkl {version}; numba {numba.__version__}; python {sys.version_info[:2]}"
             .encode())
    for name in KEY_MODULES:
        h.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return h.hexdigest()[:24]


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _user_cache_root() -> str:
    try:
        from numba.misc.appdirs import AppDirs

        return AppDirs(appname="fastkl", appauthor=False).user_cache_dir
    except Exception:  # pragma: no cover - numba moved its appdirs: the XDG default
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        return os.path.join(base, "fastkl")


@functools.cache
def cache_dir() -> str | None:
    """The directory of fastkl's numba cache in this process, or None (no disk cache)."""
    if os.environ.get("FASTKL_NUMBA_CACHE", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        sub = "fastkl-" + _key()
    except OSError:  # the sources are not files (a zip or frozen install): no disk cache
        return None
    candidates = []
    if numba.config.CACHE_DIR:
        candidates.append(os.path.join(numba.config.CACHE_DIR, sub))
    candidates.append(os.path.join(HERE, "__pycache__", sub))
    candidates.append(os.path.join(_user_cache_root(), "numba", sub))
    for path in candidates:
        if _writable(path):
            return path
    return None


try:
    from numba.core.caching import (
        CompileResultCacheImpl,
        FunctionCache,
        IndexDataCacheFile,
        _CacheLocator,
    )
except ImportError:  # pragma: no cover - numba reorganised its cache: compile, uncached
    FunctionCache = None
else:

    class _Locator(_CacheLocator):
        """The directory chosen once per process (``cache_dir``), stamped with the key."""

        def __init__(self, py_func, path: str, key: str):
            self._py_file = inspect.getfile(py_func)
            self._lineno = py_func.__code__.co_firstlineno
            self._path = path
            self._key = key

        def ensure_cache_path(self):
            os.makedirs(self._path, exist_ok=True)

        def get_cache_path(self):
            return self._path

        def get_source_stamp(self):
            return self._key

        def get_disambiguator(self):
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):  # pragma: no cover - built directly
            raise NotImplementedError

    class _Impl(CompileResultCacheImpl):
        """numba's compile-result cache, located by ``_Locator`` (no search: numba's own
        locators key by the function's file only)."""

        def __init__(self, py_func):
            self._lineno = py_func.__code__.co_firstlineno
            self._locator = _Locator(py_func, cache_dir(), _key())
            modname = os.path.splitext(os.path.basename(inspect.getfile(py_func)))[0]
            self._filename_base = self.get_filename_base(
                f"{modname}.{py_func.__qualname__}", getattr(sys, "abiflags", ""))

    class _CacheFile(IndexDataCacheFile):
        def _load_index(self):
            try:
                return super()._load_index()
            except Exception:  # truncated or corrupt: a miss; the next save rewrites it
                return {}

    class KernelCache(FunctionCache):
        """numba's function cache with fastkl's key and location; a bad file is a miss."""

        _impl_class = _Impl

        def __init__(self, py_func):
            super().__init__(py_func)
            self._cache_file = _CacheFile(cache_path=self._cache_path,
                                          filename_base=self._impl.filename_base,
                                          source_stamp=self._impl.locator.get_source_stamp())

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception:  # a truncated / corrupt data file: recompile (and rewrite)
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception:  # read-only or full disk: the kernel works, uncached
                pass


@functools.cache
def _key() -> str:
    return cache_key()


def attach_cache(dispatcher):
    """Give a numba dispatcher fastkl's on-disk cache (no-op when there is none)."""
    if FunctionCache is None or cache_dir() is None:
        return dispatcher
    try:
        dispatcher._cache = KernelCache(dispatcher.py_func)
    except Exception:  # pragma: no cover - numba internals changed: compile, uncached
        pass
    return dispatcher


def jit(fn=None, **options):
    """``numba.njit(**options)`` with fastkl's on-disk cache (never ``cache=True``)."""

    def deco(f):
        return attach_cache(njit(**options)(f))

    return deco if fn is None else deco(fn)
