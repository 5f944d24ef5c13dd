# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
# cython: initializedcheck=False, nonecheck=False
"""Compiled kernels of the Cython backend (see ``mc`` for the contract).

The arithmetic lives in ``mc.h`` (branch-free C, compiled once per ISA through
target_clones); this module only unpacks the arrays into raw pointers and element strides and
runs the (row, block) tasks, in parallel with OpenMP ``prange`` when the build has it. Every
task writes its own partials slot, so results never depend on the thread count.

The wrapper ``mc`` hands over 2-D native-order arrays of the kernel dtype whose
byte strides are multiples of the item size (any sign); ``out`` is C-contiguous.
"""

cimport numpy as cnp
from libc.math cimport INFINITY
from cython.parallel cimport prange, threadid

import os

import numpy as np

cnp.import_array()

cdef extern from "mc.h" nogil:
    int FK_BLOCK
    int FK_NPART
    int FK_WORK_DOUBLES
    int FK_TERMS
    int FK_PARTIALS
    int FK_GRAD
    int FK_K1
    int FK_K2
    int FK_K3
    int FK_RK1
    int FK_RK3
    int FK_ABS
    int FK_NEST
    int FK_FMT_F64
    int FK_FMT_F32
    int FK_FMT_F16
    int FK_FMT_BF16

    ctypedef struct fk_arrays:
        const void *q
        const void *p
        const void *m
        const void *iw
        Py_ssize_t q0, q1, p0, p1, m0, m1, iw0, iw1
        void *out
        const double *rowscale
        Py_ssize_t rows, n, nblk
        int f32
        int mkind
        int qfmt
        int iwfmt

    ctypedef struct fk_params:
        int mode, est, want_m2
        int clamp_l, clamp_v, weighted, iw_grad
        double lr_lo, lr_hi, v_lo, v_hi

    void fk_task(const fk_arrays *A, const fk_params *P, Py_ssize_t task, double *work,
                 double *parts)
    void fk_set_lanes32(int on)
    int fk_get_lanes32()
    const char *fk_isa()
    int fk_openmp()
    int fk_max_threads()

BLOCK = FK_BLOCK
N_PARTIALS = FK_NPART
# the estimator codes of mc.h, by label (tests/test_kernel_codes.py: equal to
# fastkl._estimators)
EST_CODES = {"k1": FK_K1, "k2": FK_K2, "k3": FK_K3, "rk1": FK_RK1, "rk3": FK_RK3,
             "abs": FK_ABS}



def set_f32_lanes(bint on):
    """Whether eligible float32 tasks take the float32 lanes (mc32.h; on by default, off
    from import with FASTKL_CYTHON_F32_LANES=0). Returns the previous setting."""
    cdef int old = fk_get_lanes32()
    fk_set_lanes32(on)
    return bool(old)


set_f32_lanes(os.environ.get("FASTKL_CYTHON_F32_LANES", "1") != "0")

from fastkl.backends import _threads as _policy

# below this many elements one thread does all tasks (a parallel region costs a few us);
# the value lives in the thread policy (``backends._threads``), read once here
cdef Py_ssize_t _parallel_min = _policy.CYTHON_MC_MIN


include "runtime.pxi"


cdef void _run(const fk_arrays *A, const fk_params *P, Py_ssize_t ntasks, Py_ssize_t per,
               double *parts, double *work, int nthreads) noexcept nogil:
    """The tasks in groups of ``per`` consecutive ones (short rows: one task is a few hundred
    elements, and handing them out one at a time made two threads no faster than one on
    [100000, 500] inputs). Each task writes only its own partials: same bits for any
    grouping and thread count."""
    cdef Py_ssize_t t, g, ngroups = (ntasks + per - 1) // per
    if nthreads <= 1:
        for t in range(ntasks):
            fk_task(A, P, t, work, parts)
    else:
        for g in prange(ngroups, num_threads=nthreads, schedule="dynamic", chunksize=1):
            for t in range(g * per, min(ntasks, (g + 1) * per)):
                fk_task(A, P, t, work + threadid() * FK_WORK_DOUBLES, parts)


# element formats of the inputs (mc.h FK_FMT_*): 16-bit inputs arrive as uint16 bits
FMT_F64, FMT_F32, FMT_F16, FMT_BF16 = FK_FMT_F64, FK_FMT_F32, FK_FMT_F16, FK_FMT_BF16


cdef int _fmt(cnp.ndarray a, int fmt) except -1:
    """The element format of ``a``: ``fmt`` when given (>= 0; a 16-bit format needs 2-byte
    elements), else float32 / float64 by its dtype."""
    if fmt < 0:
        return FK_FMT_F32 if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32 else FK_FMT_F64
    if not FK_FMT_F64 <= fmt <= FK_FMT_BF16:
        raise ValueError(f"unknown element format {fmt}")
    if cnp.PyArray_ITEMSIZE(a) != (8 if fmt == FK_FMT_F64 else 4 if fmt == FK_FMT_F32 else 2):
        raise ValueError(f"element format {fmt} does not match itemsize "
                         f"{cnp.PyArray_ITEMSIZE(a)}")
    return fmt


def run(int mode, cnp.ndarray logq, cnp.ndarray logp, object mask, object log_iw, int est,
        double lr_lo, double lr_hi, double v_lo, double v_hi, bint weighted, int iw_grad,
        bint want_m2, object out=None, object rowscale=None, int qfmt=-1, int iwfmt=-1):
    """One kernel call. ``mode``: 0 terms (into ``out``), 1 partials, 2 grad (into ``out``,
    with ``rowscale``). ``weighted``: clamp_order="weighted"; ``iw_grad`` (mode 2): 1, the
    derivative flows through exp(log_iw) too; 2, the derivative with respect to log_iw.
    ``qfmt`` / ``iwfmt``: the element format (``FMT_*``) of logq and logp / of log_iw
    (-1: float32 or float64 by the dtype); 16-bit inputs are uint16 arrays of their bits and
    give float32 outputs. Returns the partials ``[rows, nblk, N_PARTIALS]`` (modes 1, 2)."""
    cdef fk_arrays A
    cdef fk_params P
    cdef Py_ssize_t rows = cnp.PyArray_DIM(logq, 0), n = cnp.PyArray_DIM(logq, 1)
    cdef Py_ssize_t nblk = max(1, (n + FK_BLOCK - 1) // FK_BLOCK)
    cdef Py_ssize_t ntasks = rows * nblk if n > 0 else 0
    cdef int nthreads = 1
    cdef cnp.ndarray parts_arr = None, work_arr, m_arr, iw_arr, out_arr, rs_arr
    cdef double *parts = NULL

    if not 0 <= est < FK_NEST:
        raise ValueError(f"unknown estimator code {est} (the kernel codes: {EST_CODES})")
    if not 0 <= mode <= FK_GRAD:
        raise ValueError(f"unknown mode {mode}")
    A.qfmt = _fmt(logq, qfmt)
    if cnp.PyArray_ITEMSIZE(logp) != cnp.PyArray_ITEMSIZE(logq):
        raise ValueError("logq and logp must have one element format")
    A.f32 = A.qfmt != FK_FMT_F64
    A.iwfmt = A.qfmt
    _set(logq, &A.q, &A.q0, &A.q1)
    _set(logp, &A.p, &A.p0, &A.p1)
    A.m = NULL
    A.m0 = A.m1 = 0
    A.mkind = 0
    if mask is not None:
        m_arr = <cnp.ndarray>mask
        A.mkind = 1 if cnp.PyArray_TYPE(m_arr) == cnp.NPY_UINT8 else 2
        _set(m_arr, &A.m, &A.m0, &A.m1)
    A.iw = NULL
    A.iw0 = A.iw1 = 0
    if log_iw is not None:
        iw_arr = <cnp.ndarray>log_iw
        A.iwfmt = _fmt(iw_arr, iwfmt)
        _set(iw_arr, &A.iw, &A.iw0, &A.iw1)
    A.out = NULL
    if out is not None:
        out_arr = <cnp.ndarray>out
        A.out = cnp.PyArray_DATA(out_arr)
    A.rowscale = NULL
    if rowscale is not None:
        rs_arr = <cnp.ndarray>rowscale
        A.rowscale = <const double *>cnp.PyArray_DATA(rs_arr)
    A.rows = rows
    A.n = n
    A.nblk = nblk

    P.mode = mode
    P.est = est
    P.want_m2 = want_m2
    P.lr_lo = lr_lo
    P.lr_hi = lr_hi
    P.v_lo = v_lo
    P.v_hi = v_hi
    P.clamp_l = not (lr_lo == -INFINITY and lr_hi == INFINITY)
    P.clamp_v = not (v_lo == -INFINITY and v_hi == INFINITY)
    P.weighted = weighted
    if not 0 <= iw_grad <= 2:
        raise ValueError(f"iw_grad must be 0, 1 or 2, got {iw_grad}")
    P.iw_grad = iw_grad if mode == FK_GRAD else 0

    if mode != FK_TERMS:
        parts_arr = np.zeros((rows, nblk, FK_NPART), dtype=np.float64)
        parts = <double *>cnp.PyArray_DATA(parts_arr)
    if rows * n >= _parallel_min and ntasks > 1:
        nthreads = min(_nthreads(), ntasks)
    work_arr = np.empty(max(nthreads, 1) * FK_WORK_DOUBLES, dtype=np.float64)
    with nogil:
        _run(&A, &P, ntasks, max(1, FK_BLOCK // n) if n < FK_BLOCK else 1, parts,
             <double *>cnp.PyArray_DATA(work_arr), nthreads)
    return parts_arr
