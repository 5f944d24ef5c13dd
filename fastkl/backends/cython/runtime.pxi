# The runtime part both extensions share, included by _mc.pyx and _logits.pyx (each extension
# keeps its own copies of these flags). The includer provides ``import os``, ``cimport numpy as
# cnp``, ``_policy`` (``fastkl.backends._threads``), ``_parallel_min``, and declares
# ``fk_max_threads``, ``fk_openmp`` and ``fk_isa`` from common.h.

# A child made by fork() runs every kernel on its own thread: the OpenMP runtime's worker
# pool belongs to the parent (libgomp's threads do not survive fork(), and the child's first
# parallel region waits for them forever). Serial runs compute the same blocks in the same
# order, so the child's results have the same bits as the parent's.
cdef bint _forked = False


def _after_fork_in_child():
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked():
    """True in a process made by fork() after this module was imported: kernels run
    serially there."""
    return bool(_forked)


cdef inline int _threads() noexcept nogil:
    """Threads a parallel kernel may use: OpenMP's maximum, 1 after fork()."""
    return 1 if _forked else fk_max_threads()


# threads asked for by fastkl.set_num_threads (0: OpenMP's maximum); the policy module
# pushes every change here, so a call reads a C int
cdef int _num_threads = 0


def set_num_threads(int n):
    """The thread count of the parallel kernels (0: OpenMP's maximum). Called by
    ``fastkl.backends._threads``; use ``fastkl.set_num_threads``."""
    global _num_threads
    _num_threads = n if n > 0 else 0


cdef inline int _nthreads() noexcept nogil:
    """Threads a parallel kernel uses: the policy's count, else ``_threads()`` (OpenMP's
    maximum); 1 after fork() or without OpenMP."""
    if _num_threads > 0 and not _forked and fk_openmp():
        return _num_threads
    return _threads()


_policy.register(set_num_threads)


def isa():
    """The instruction set of the kernel clone the loader picked: "avx512f", "avx2" (with
    FMA) or "default" (the baseline of the platform)."""
    return fk_isa().decode()


def openmp():
    """True when the extension was built with OpenMP."""
    return bool(fk_openmp())


def max_threads():
    """Threads a parallel kernel call may use (``fastkl.set_num_threads``'s count, else
    OpenMP's current maximum; 1 without OpenMP or in a child made by fork())."""
    return _nthreads()


cdef inline void _set(cnp.ndarray a, const void **ptr, Py_ssize_t *s0, Py_ssize_t *s1):
    """The data pointer and the two strides (in elements) of a 2-D array."""
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    ptr[0] = cnp.PyArray_DATA(a)
    s0[0] = cnp.PyArray_STRIDES(a)[0] // item
    s1[0] = cnp.PyArray_STRIDES(a)[1] // item
