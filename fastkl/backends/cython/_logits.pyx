# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
# cython: initializedcheck=False, nonecheck=False
"""Compiled logits kernels of the Cython backend (see ``logits`` for the contract).

The arithmetic lives in ``logits.h`` (branch-free C, compiled once per ISA through
target_clones); this module only unpacks the arrays into raw pointers and element strides and
runs the rows, in parallel with OpenMP ``prange`` when the build has it. One row is computed
by one thread in a fixed order, so results never depend on the thread count.

The wrapper ``logits`` hands over 2-D native-order arrays of float32/float64 whose byte
strides are multiples of the item size (any sign, read-only is fine); ``out`` is a contiguous
float64 ``[rows]``, ``active``/``tokens``/``rowscale`` contiguous ``[rows]`` arrays, ``grad``
C-contiguous ``[rows, V]`` of the input dtype.
"""

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t
from cython.parallel cimport prange

import os

cnp.import_array()

cdef extern from "logits.h" nogil:
    int FKL_KL
    int FKL_JSD
    int FKL_ENT
    int FKL_TOKEN
    int FKL_GRAD
    int FKL_NOPS
    int FKL_CHUNK

    ctypedef struct fkl_args:
        const void *a
        const void *b
        Py_ssize_t a0, a1, b0, b1
        Py_ssize_t rows, V
        int f32
        int op
        int log_probs
        double inv_t, beta
        const uint8_t *active
        const int64_t *tokens
        int64_t ignore_index
        const double *rowscale
        int gop
        void *grad
        void *grad_b
        double *out
        double *scratch

    void fkl_row(const fkl_args *A, Py_ssize_t row)
    Py_ssize_t fkl_scratch_doubles(Py_ssize_t V)
    const char *fk_isa()
    int fk_openmp()
    int fk_max_threads()

CHUNK = FKL_CHUNK
# the op codes of logits.h shared with the contract (tests/test_kernel_codes.py: equal to
# fastkl.backends._contract.LOGITS_OPS), and the backend's own two
LOGITS_OPS = {"kl": FKL_KL, "jsd": FKL_JSD, "entropy": FKL_ENT}
OP_TOKEN = FKL_TOKEN
OP_GRAD = FKL_GRAD

from fastkl.backends import _threads as _policy

# below this many elements one thread does all rows (a parallel region costs a few us); the
# value lives in the thread policy (``backends._threads``), read once here
cdef Py_ssize_t _parallel_min = _policy.CYTHON_LOGITS_MIN


include "runtime.pxi"


cdef void _run(const fkl_args *A, int nthreads, Py_ssize_t chunk) noexcept nogil:
    cdef Py_ssize_t r
    if nthreads <= 1:
        for r in range(A.rows):
            fkl_row(A, r)
    else:
        for r in prange(A.rows, num_threads=nthreads, schedule="dynamic", chunksize=chunk):
            fkl_row(A, r)


def run(int op, cnp.ndarray a, cnp.ndarray b, double inv_t, double beta, bint log_probs,
        object active, object tokens, long long ignore_index, object rowscale,
        cnp.ndarray out, object grad, object grad_b=None, int gop=0):
    """One kernel call over all rows: op 0 KL, 1 JSD, 2 entropy, 3 token log-prob (``b``),
    4 the value of op ``gop`` (0 KL, 1 JSD, 2 entropy, 3 token log-prob) and its gradients
    w.r.t. ``a`` into ``grad`` and ``b`` into ``grad_b`` (None: not wanted), times
    ``rowscale``. Results into ``out``.
    ``log_probs``: the rows are log-probabilities and inv_t == 1 (no max, no normaliser)."""
    cdef fkl_args A
    cdef cnp.ndarray act_arr, tok_arr, rs_arr, grad_arr, gradb_arr, scratch_arr
    cdef cnp.npy_intp dims[1]
    cdef int nthreads = 1
    cdef Py_ssize_t chunk

    if not 0 <= op < FKL_NOPS:
        raise ValueError(f"unknown logits op code {op} (the kernel codes: {LOGITS_OPS}, "
                         f"token {FKL_TOKEN}, grad {FKL_GRAD})")
    if op == FKL_GRAD and not (0 <= gop <= FKL_TOKEN and rowscale is not None):
        raise ValueError(f"unknown logits op code {gop} to differentiate (the kernel codes: "
                         f"{LOGITS_OPS}, token {FKL_TOKEN}), or no rowscale")
    if op == FKL_GRAD and gop == FKL_TOKEN and (tokens is None or grad_b is None):
        raise ValueError("the token gradient needs tokens and grad_b")
    A.f32 = cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32
    _set(a, &A.a, &A.a0, &A.a1)
    _set(b, &A.b, &A.b0, &A.b1)
    A.rows = cnp.PyArray_DIM(a, 0)
    A.V = cnp.PyArray_DIM(a, 1)
    A.op = op
    A.log_probs = log_probs
    A.inv_t = inv_t
    A.beta = beta
    A.active = NULL
    if active is not None:
        act_arr = <cnp.ndarray>active
        A.active = <const uint8_t *>cnp.PyArray_DATA(act_arr)
    A.tokens = NULL
    if tokens is not None:
        tok_arr = <cnp.ndarray>tokens
        A.tokens = <const int64_t *>cnp.PyArray_DATA(tok_arr)
    A.ignore_index = ignore_index
    A.rowscale = NULL
    if rowscale is not None:
        rs_arr = <cnp.ndarray>rowscale
        A.rowscale = <const double *>cnp.PyArray_DATA(rs_arr)
    A.grad = NULL
    if grad is not None:
        grad_arr = <cnp.ndarray>grad
        A.grad = cnp.PyArray_DATA(grad_arr)
    A.grad_b = NULL
    if grad_b is not None:
        gradb_arr = <cnp.ndarray>grad_b
        A.grad_b = cnp.PyArray_DATA(gradb_arr)
    A.gop = gop
    A.out = <double *>cnp.PyArray_DATA(out)
    A.scratch = NULL

    if A.rows == 0 or A.V == 0:
        return
    if A.rows > 1 and A.rows * A.V >= _parallel_min:
        nthreads = min(_nthreads(), A.rows)
    if (op == FKL_JSD or (op == FKL_GRAD and gop == FKL_JSD)) and not log_probs:
        # per thread: a row's exps from pass 1, which pass 2 rescales instead of recomputing
        dims[0] = nthreads * fkl_scratch_doubles(A.V)
        scratch_arr = cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT64, 0)
        A.scratch = <double *>cnp.PyArray_DATA(scratch_arr)
    # rows per scheduling step: about 16k elements, so tiny rows do not pay per-row overhead
    chunk = max(1, (1 << 14) // A.V)
    with nogil:
        _run(&A, nthreads, chunk)
