"""The thread policy of the compiled backends: the small-input thresholds and the thread count.

* **Thresholds.** Below these many elements of work a kernel call runs on the calling thread
  alone: starting a parallel region (OpenMP) or waking numba's pool costs microseconds, more
  than the work. The Cython extensions read theirs once, at import; numba's
  ``ThreadedKernel`` reads ``NUMBA_MIN`` on each call (in Python, never in compiled code).
  The split into blocks (``_contract.BLOCK``) never depends on them, so neither does a bit
  of any result.
* **Thread count.** ``None`` (the default): each runtime's own setting — OpenMP's maximum
  (``omp_get_max_threads``, i.e. ``OMP_NUM_THREADS`` or the cores) for the Cython kernels,
  numba's current count (``numba.get_num_threads``, by default ``NUMBA_NUM_THREADS``) for
  the numba kernels. ``FASTKL_NUM_THREADS`` (a positive integer) in the environment at import,
  or ``set_num_threads(n)``, sets one count for both: the Cython kernels pass it to OpenMP
  as the ``num_threads`` of their parallel loop, the numba kernels set numba's count around
  each threaded launch (clamped to ``NUMBA_NUM_THREADS``, the size of numba's pool, fixed at
  numba's import). The setting is process-wide, not per Python thread.
* A child made by fork() runs every kernel serially whatever the setting (see
  ``backends.in_forked_child``).

This module imports nothing heavy: ``import fastkl`` reads it.
"""

from __future__ import annotations

import contextlib
import operator
import os
import warnings
from collections.abc import Callable, Iterator

# Small-input thresholds, in elements (rows * n) of one call. Measured where they were set:
# a Cython MC call of 1,000 k3 pairs is ~1 us of work, a parallel region 3-10 us; a logits
# row is costlier per element (two exps and a log), so its threshold is half; numba's pool
# wake-up costs 6-12 us, about a block of k3 terms.
# CYTHON_MC_MIN re-measured 2026-12-02 (2-vCPU EPYC AVX2 at load average ~4.5, min of
# 100 interleaved rounds, one call 1 thread vs 2): float64 k1/k3 gain from 2 threads from
# 16,384 elements (k3: 59 -> 42 us), float32 k3 from ~24,576 (20 -> 17 us); float32 k1 (the
# cheapest term, ~0.8 ns) loses below ~40,000 (16,384: 13 -> 31 us) and breaks even there.
# 1 << 15 keeps every measured loss serial (it was 1 << 16).
CYTHON_MC_MIN = 1 << 15  # Cython Monte Carlo kernels (``cython/_mc.pyx``)
CYTHON_LOGITS_MIN = 1 << 15  # Cython logits kernels (``cython/_logits.pyx``)
NUMBA_MIN = 1 << 14  # every numba kernel (``numba/common.py``: ``ThreadedKernel``)

ENV_VAR = "FASTKL_NUM_THREADS"

_num_threads: int | None = None  # None: each runtime's own default
_sinks: list[Callable[[int], None]] = []  # extensions told of a change (0: their default)


def _check(n) -> int:
    if isinstance(n, bool) or not hasattr(n, "__index__"):
        raise TypeError(f"n must be an int (the number of threads), got {type(n).__name__}")
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"n must be >= 1 (the number of threads), got {n}")
    return n


def _publish() -> None:
    for sink in _sinks:
        sink(_num_threads or 0)


def register(sink: Callable[[int], None]) -> None:
    """Called by a compiled extension at import: ``sink(n)`` now and on every change (n = 0:
    the runtime's default). The extension then reads the count from a C variable, so a
    kernel call pays nothing for the policy."""
    _sinks.append(sink)
    sink(_num_threads or 0)


def requested() -> int | None:
    """The count set by ``set_num_threads`` or ``FASTKL_NUM_THREADS``; None: the runtimes'
    defaults."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (``n >= 1``) in every compiled kernel call from now on, in both
    backends; 1 runs every kernel serially. Results never depend on it (same bits for any
    count). The Cython kernels ask OpenMP for exactly ``n`` threads (more than the cores is
    allowed, and slower); the numba kernels use ``min(n, NUMBA_NUM_THREADS)``: numba's pool is
    sized once, at its import, and cannot grow. Process-wide (every Python thread sees it);
    a forked child stays serial. Raises TypeError if ``n`` is not an int, ValueError if
    ``n < 1``."""
    global _num_threads
    _num_threads = _check(n)
    _publish()


def _reset() -> None:
    """Back to the runtimes' defaults (what ``threads`` restores when nothing was set)."""
    global _num_threads
    _num_threads = None
    _publish()


def _restore(saved: int | None) -> None:
    if saved is None:
        _reset()
    else:
        set_num_threads(saved)


def get_num_threads() -> int:
    """The number of threads a large compiled kernel call uses: the count set by
    ``set_num_threads`` (or ``FASTKL_NUM_THREADS``) if any, else the default backend's own
    (the fastest available: OpenMP's maximum for Cython, numba's current count for numba); 1
    in a forked child, or when that backend cannot run threads."""
    from . import get_backend, in_forked_child

    if in_forked_child():
        return 1
    if _num_threads is not None:
        return _num_threads
    mod = get_backend(None)
    if mod.name == "cython":
        from .cython import _mc

        return int(_mc.max_threads())  # 1 without OpenMP
    if mod.name == "numba":
        import numba

        try:
            return int(numba.get_num_threads())
        except ValueError:  # no threading layer: the kernels run serially
            return 1
    return 1


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """``with fastkl.threads(n):`` run the compiled kernels on ``n`` threads inside the
    block (see ``set_num_threads``), then restore the previous setting, also when the block
    raises. Process-wide, like ``set_num_threads``: do not nest it across Python threads."""
    n = _check(n)
    saved = _num_threads
    set_num_threads(n)
    try:
        yield
    finally:
        _restore(saved)


def _from_env() -> None:
    global _num_threads
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return
    try:
        n = int(raw.strip())
        if n < 1:
            raise ValueError
    except ValueError:
        warnings.warn(f"fastkl: ignoring {ENV_VAR}={raw!r} (not a positive integer); the "
                      f"kernels use each runtime's default thread count", RuntimeWarning,
                      stacklevel=2)
        return
    _num_threads = n


_from_env()
