# Included by _mc.pyx and _logits.pyx (each extension keeps its own flag;
# both need ``import os`` and ``fk_max_threads`` from common.h).

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
