/* Branch-free term arithmetic and per-block loops of the Cython backend.
 *
 * The algorithm is docs/kernel_math.md; the semantics are fastkl/backends/numpy/mc.py.
 *
 * One call of fk_task() handles one (row, block) task: FK_BLOCK consecutive elements of a row,
 * processed in chunks of FK_CHUNK elements through small buffers that stay in L1:
 *
 *   1. l = (double)logp - (double)logq, clamped          (load loop)
 *   2. term (and derivative) in float64 lanes           (branch-free loop, vectorized)
 *   3. scalar libm fix-up of lanes with NaN/inf/|l|>700 (rare; a second look at the chunk)
 *   4. value clamp, x exp(log_iw) (same vectorized exp), x w
 *   5. output, or partials into FK_NACC independent float64 accumulators per quantity
 *      (lane = position mod FK_NACC), summed in a fixed order at the end of the block.
 *
 * Nothing depends on which thread runs a task, so results are bit-identical for any thread
 * count. The block function is compiled several times (GCC/Clang target_clones) and the
 * dynamic loader picks the best clone for the CPU once; FASTKL_CLONES (set by setup.py after
 * a test compile) chooses the clone list, 0 or undefined gives one portable version.
 *
 * No -ffast-math: NaN tests (x != x), the order of every sum and the clamps rely on IEEE
 * semantics. Build with -fno-math-errno (libm calls in the fix-up) and -fno-trapping-math
 * (lets the compiler if-convert selects; no value changes).
 */
#ifndef FASTKL_MATH_H
#define FASTKL_MATH_H

#include "common.h"

#define FK_BLOCK 4096 /* must equal fastkl.backends._contract.BLOCK */
#define FK_CHUNK 512  /* elements per L1-resident chunk; divides FK_BLOCK, multiple of FK_NACC */
#define FK_NACC 16    /* independent accumulators per quantity (fixed: the summation order) */
#define FK_NPART 6
/* doubles of per-thread workspace: block terms + block weights + 5 chunk buffers */
#define FK_WORK_DOUBLES (2 * FK_BLOCK + 5 * FK_CHUNK)

/* ------------------------------------------------------------------ arguments */
typedef struct {
    const void *q, *p, *m, *iw; /* first element of each 2-D array (m, iw may be NULL) */
    ptrdiff_t q0, q1, p0, p1, m0, m1, iw0, iw1; /* element strides (row, column) */
    void *out;                  /* C-contiguous [rows, n] float/double, or NULL */
    const double *rowscale;     /* [rows] (mode FK_GRAD) */
    ptrdiff_t rows, n, nblk;
    int f32;    /* 1: float32 outputs (float32 or 16-bit inputs), 0: float64 */
    int mkind;  /* 0: no mask, 1: uint8, 2: float64 weights */
    int qfmt;   /* element format of q and p: FK_FMT_* */
    int iwfmt;  /* element format of iw: FK_FMT_* */
} fk_arrays;

/* Element formats of the inputs: float64, float32, and the 16-bit ones read in place as raw
 * bits (uint16) and widened to float32 in registers: float16, bfloat16. */
enum { FK_FMT_F64 = 0, FK_FMT_F32 = 1, FK_FMT_F16 = 2, FK_FMT_BF16 = 3 };


/* float16 bits -> float32, exact, branch-free and table-free (vectorizes in every clone):
 * normal numbers are rebiased (exponent + 112), inf/NaN get the all-ones exponent (payload
 * kept), subnormals and zero are a * 2**-24 (exact: a < 1024). */
FK_INLINE float fk_f16_to_f32(uint16_t h) {
    const uint32_t a = (uint32_t)h & 0x7fffu, sh = a << 13;
    const uint32_t normal = sh + (112u << 23), nonfin = sh | 0x7f800000u;
    const uint32_t sub = fk_bits32((float)(int32_t)a * 5.9604644775390625e-08f);
    uint32_t r = (a >= 0x400u) ? normal : sub;
    r = (a >= 0x7c00u) ? nonfin : r;
    return fk_from_bits32(r | (((uint32_t)h & 0x8000u) << 16));
}

/* bfloat16 bits -> float32: the high half of a float32 (exact). */
FK_INLINE float fk_bf16_to_f32(uint16_t h) { return fk_from_bits32((uint32_t)h << 16); }

/* Element k of an array of format fmt, as float64 (exact). */
FK_INLINE double fk_ld(const void *base, ptrdiff_t k, int fmt) {
    switch (fmt) {
    case FK_FMT_F64: return ((const double *)base)[k];
    case FK_FMT_F32: return (double)((const float *)base)[k];
    case FK_FMT_F16: return (double)fk_f16_to_f32(((const uint16_t *)base)[k]);
    default: return (double)fk_bf16_to_f32(((const uint16_t *)base)[k]);
    }
}

/* X[i] = (double)widen(p[i * s]) for 16-bit elements (bf: bfloat16, else float16) */
FK_INLINE void fk_get_h16(const void *base, ptrdiff_t s, ptrdiff_t c, double *FK_RESTRICT X,
                          const int bf) {
    const uint16_t *p = (const uint16_t *)base;
    ptrdiff_t i;
    if (bf) {
        for (i = 0; i < c; i++) X[i] = (double)fk_bf16_to_f32(p[i * s]);
    } else {
        for (i = 0; i < c; i++) X[i] = (double)fk_f16_to_f32(p[i * s]);
    }
}

/* L[i] = (double)widen(p[i * sp]) - (double)widen(q[i * sq]), 16-bit elements */
FK_INLINE void fk_get_diff_h16(const void *pbase, ptrdiff_t sp, const void *qbase, ptrdiff_t sq,
                               ptrdiff_t c, double *FK_RESTRICT L, const int bf) {
    const uint16_t *p = (const uint16_t *)pbase, *q = (const uint16_t *)qbase;
    ptrdiff_t i;
    if (bf) {
        for (i = 0; i < c; i++)
            L[i] = (double)fk_bf16_to_f32(p[i * sp]) - (double)fk_bf16_to_f32(q[i * sq]);
    } else {
        for (i = 0; i < c; i++)
            L[i] = (double)fk_f16_to_f32(p[i * sp]) - (double)fk_f16_to_f32(q[i * sq]);
    }
}

enum { FK_TERMS = 0, FK_PARTIALS = 1, FK_GRAD = 2 };

/* The estimator codes: must equal the ``code`` column of fastkl._estimators.ESTIMATORS
 * (tests/test_kernel_codes.py compares them through _mc.EST_CODES). _mc.run rejects any
 * other code before a kernel runs; the kernels' ``default:`` gives NaN, never a term. */
enum { FK_K1 = 0, FK_K2 = 1, FK_K3 = 2, FK_RK1 = 3, FK_RK3 = 4, FK_ABS = 5, FK_NEST = 6 };

/* clamp_l / clamp_v: the log-ratio / value clamp is active; weighted: the value clamp acts on
 * exp(log_iw) * t (clamp_order="weighted") instead of t; iw_grad (mode FK_GRAD): 1, the
 * derivative also flows through exp(log_iw) (d exp(log_iw) / d logq = exp(log_iw)); 2, the
 * derivative with respect to log_iw alone. */
typedef struct {
    int mode, est, want_m2;
    int clamp_l, clamp_v, weighted, iw_grad;
    double lr_lo, lr_hi, v_lo, v_hi;
} fk_params;

/* ------------------------------------------------------------------ constants */
#define FK_FAST_MAX 700.0

/* E = e^l - 1 - l and R = e^l for finite |l| <= 700 (docs/kernel_math.md). ``full`` (a
 * compile-time constant at every call site): FK_SERIES_FULL, the Taylor series to r^13
 * (float64), or FK_SERIES_LO, the minimax series of fk_exp_series (relative error < 3e-9,
 * for float32 inputs, whose results need 1e-6). */
FK_INLINE void fk_exp_core(double l, double *E, double *R, const int full) {
    double s, r, q;
    fk_exp_parts(l, full, &s, &r, &q);
    *E = s * q + (((s - 1.0) + s * r) - l);
    *R = s + s * (r + q);
}

/* -sign(l), the derivative of |l| with respect to logq (0 at 0, NaN for NaN). */
FK_INLINE double fk_neg_sign(double l) { return l > 0.0 ? -1.0 : (l < 0.0 ? 1.0 : l * 0.0); }

/* numpy.mc.term_and_grad for one lane outside the fast path (NaN, +-inf, |l| > 700). */
static void fk_term_slow(double l, int est, double *t, double *g) {
    const double inf = (double)INFINITY;
    double e, r, tt = l, gg = 1.0;
    switch (est) {
    case FK_K1:
        tt = -l;
        gg = 1.0;
        break;
    case FK_K2:
        tt = 0.5 * l * l;
        gg = -l;
        break;
    case FK_ABS:
        tt = fabs(l);
        gg = fk_neg_sign(l);
        break;
    case FK_K3:
        e = expm1(l) - l;
        tt = e;
        gg = -(e + l);
        if (l == inf || l == -inf) tt = inf;
        break;
    case FK_RK1:
        r = exp(l);
        tt = r * l;
        gg = -r * (l + 1.0);
        if (l == -inf) tt = 0.0;
        break;
    case FK_RK3:
        e = expm1(l) - l;
        r = exp(l);
        tt = (l < -1.0) ? r * (l - 1.0) + 1.0 : l * l + (l - 1.0) * e;
        gg = -r * l;
        if (l == inf) tt = inf;
        if (l == -inf) tt = 1.0;
        break;
    default: /* an unknown code (_mc.run rejects it first): NaN, never another term */
        tt = NAN;
        gg = NAN;
        break;
    }
    *t = tt;
    if (g) *g = gg;
}

/* ------------------------------------------------------------------ chunk stages */

/* L[i] = (double)p[i] - (double)q[i], clamped (NaN stays NaN); when Raw != NULL it
 * receives the log-ratios before the clamp. */
FK_INLINE void fk_load_l(const fk_arrays *A, const fk_params *P, ptrdiff_t row, ptrdiff_t col,
                         ptrdiff_t c, double *FK_RESTRICT L, double *FK_RESTRICT Raw) {
    ptrdiff_t i;
    if (A->qfmt >= FK_FMT_F16)
        fk_get_diff_h16((const uint16_t *)A->p + row * A->p0 + col * A->p1, A->p1,
                        (const uint16_t *)A->q + row * A->q0 + col * A->q1, A->q1, c, L,
                        A->qfmt == FK_FMT_BF16);
    else if (A->qfmt == FK_FMT_F32)
        fk_get_diff_f32((const float *)A->p + row * A->p0 + col * A->p1, A->p1,
                        (const float *)A->q + row * A->q0 + col * A->q1, A->q1, c, L);
    else
        fk_get_diff_f64((const double *)A->p + row * A->p0 + col * A->p1, A->p1,
                        (const double *)A->q + row * A->q0 + col * A->q1, A->q1, c, L);
    if (P->clamp_l) {
        const double lo = P->lr_lo, hi = P->lr_hi;
        if (Raw)
            for (i = 0; i < c; i++) Raw[i] = L[i];
        for (i = 0; i < c; i++) {
            double l = L[i];
            l = (l < lo) ? lo : l;
            l = (l > hi) ? hi : l;
            L[i] = l;
        }
    }
}

/* G[i] = 0 where X[i] is outside [lo, hi] or NaN (the derivative of a clip of X). */
FK_INLINE void fk_gate(const double *FK_RESTRICT X, double *FK_RESTRICT G, ptrdiff_t c,
                       double lo, double hi) {
    ptrdiff_t i;
    for (i = 0; i < c; i++) {
        const double x = X[i];
        G[i] = (x >= lo && x <= hi) ? G[i] : 0.0;
    }
}

/* T[i] = clip(T[i], lo, hi) (NaN stays NaN); with G, G[i] = 0 where T[i] was outside
 * [lo, hi] or NaN (the derivative of the clip, as autograd's). */
FK_INLINE void fk_clip_value(double *FK_RESTRICT T, double *FK_RESTRICT G, ptrdiff_t c,
                             double lo, double hi) {
    ptrdiff_t i;
    if (G)
        for (i = 0; i < c; i++) {
            const double t = T[i];
            G[i] = (t >= lo && t <= hi) ? G[i] : 0.0;
        }
    for (i = 0; i < c; i++) {
        double t = T[i];
        t = (t < lo) ? lo : t;
        t = (t > hi) ? hi : t;
        T[i] = t;
    }
}

/* Terms (and derivatives when G != NULL) of a chunk; returns nonzero when a lane needs the
 * scalar fix-up. Branch-free inner loops, one per estimator. */
FK_INLINE int fk_terms(int est, const double *FK_RESTRICT L, ptrdiff_t c, double *FK_RESTRICT T,
                       double *FK_RESTRICT G, const int full) {
    ptrdiff_t i;
    int bad = 0;
    switch (est) {
    case FK_K1:
        for (i = 0; i < c; i++) T[i] = -L[i];
        if (G)
            for (i = 0; i < c; i++) G[i] = 1.0;
        return 0;
    case FK_K2:
        for (i = 0; i < c; i++) T[i] = 0.5 * L[i] * L[i];
        if (G)
            for (i = 0; i < c; i++) G[i] = -L[i];
        return 0;
    case FK_ABS:
        for (i = 0; i < c; i++) T[i] = fabs(L[i]);
        if (G)
            for (i = 0; i < c; i++) G[i] = fk_neg_sign(L[i]);
        return 0;
    case FK_K3:
        if (G) {
            for (i = 0; i < c; i++) {
                double l = L[i], E, R;
                fk_exp_core(l, &E, &R, full);
                T[i] = E;
                G[i] = -(E + l);
                bad |= !(fabs(l) <= FK_FAST_MAX);
            }
        } else {
            for (i = 0; i < c; i++) {
                double l = L[i], E, R;
                fk_exp_core(l, &E, &R, full);
                T[i] = E;
                bad |= !(fabs(l) <= FK_FAST_MAX);
            }
        }
        return bad;
    case FK_RK1:
        if (G) {
            for (i = 0; i < c; i++) {
                double l = L[i], E, R;
                fk_exp_core(l, &E, &R, full);
                T[i] = R * l;
                G[i] = -R * (l + 1.0);
                bad |= !(fabs(l) <= FK_FAST_MAX);
            }
        } else {
            for (i = 0; i < c; i++) {
                double l = L[i], E, R;
                fk_exp_core(l, &E, &R, full);
                T[i] = R * l;
                bad |= !(fabs(l) <= FK_FAST_MAX);
            }
        }
        return bad;
    case FK_RK3:
        if (G) {
            for (i = 0; i < c; i++) {
                double l = L[i], E, R;
                fk_exp_core(l, &E, &R, full);
                const double lo = R * (l - 1.0) + 1.0, hi = l * l + (l - 1.0) * E;
                T[i] = (l < -1.0) ? lo : hi;
                G[i] = -R * l;
                bad |= !(fabs(l) <= FK_FAST_MAX);
            }
        } else {
            for (i = 0; i < c; i++) {
                double l = L[i], E, R;
                fk_exp_core(l, &E, &R, full);
                const double lo = R * (l - 1.0) + 1.0, hi = l * l + (l - 1.0) * E;
                T[i] = (l < -1.0) ? lo : hi;
                bad |= !(fabs(l) <= FK_FAST_MAX);
            }
        }
        return bad;
    default: /* an unknown code (_mc.run rejects it first): NaN, never another term */
        for (i = 0; i < c; i++) T[i] = NAN;
        if (G)
            for (i = 0; i < c; i++) G[i] = NAN;
        return 0;
    }
}

/* X[i] = exp(log_iw[i]) for a chunk (vectorized core, libm for the rare other lanes);
 * Y receives the raw log_iw. */
FK_INLINE void fk_load_exp_iw(const fk_arrays *A, ptrdiff_t row, ptrdiff_t col, ptrdiff_t c,
                              double *FK_RESTRICT X, double *FK_RESTRICT Y) {
    ptrdiff_t i;
    int bad = 0;
    if (A->iwfmt >= FK_FMT_F16)
        fk_get_h16((const uint16_t *)A->iw + row * A->iw0 + col * A->iw1, A->iw1, c, Y,
                   A->iwfmt == FK_FMT_BF16);
    else if (A->iwfmt == FK_FMT_F32)
        fk_get_f32((const float *)A->iw + row * A->iw0 + col * A->iw1, A->iw1, c, Y);
    else
        fk_get_f64((const double *)A->iw + row * A->iw0 + col * A->iw1, A->iw1, c, Y);
    for (i = 0; i < c; i++) {
        double x = Y[i], E, R;
        fk_exp_core(x, &E, &R, FK_SERIES_FULL);
        X[i] = R;
        bad |= !(fabs(x) <= FK_FAST_MAX);
    }
    if (bad) {
        for (i = 0; i < c; i++) {
            const double x = Y[i];
            if (!(fabs(x) <= FK_FAST_MAX)) X[i] = exp(x);
        }
    }
}

/* Wb[i] = mask as float64 for a chunk. */
FK_INLINE void fk_load_w(const fk_arrays *A, ptrdiff_t row, ptrdiff_t col, ptrdiff_t c,
                         double *FK_RESTRICT Wb) {
    if (A->mkind == 1)
        fk_get_u8((const uint8_t *)A->m + row * A->m0 + col * A->m1, A->m1, c, Wb);
    else
        fk_get_f64((const double *)A->m + row * A->m0 + col * A->m1, A->m1, c, Wb);
}

/* out[i] = w == 0 ? 0 : w * V[i] (V = term or derivative), in the output dtype. */
FK_INLINE void fk_store(const fk_arrays *A, ptrdiff_t off, ptrdiff_t c,
                        const double *FK_RESTRICT V, const double *FK_RESTRICT Wb, double scale,
                        int use_scale) {
    if (A->f32)
        fk_put_f32((float *)A->out + off, c, V, Wb, scale, use_scale);
    else
        fk_put_f64((double *)A->out + off, c, V, Wb, scale, use_scale);
}

typedef struct {
    double w[FK_NACC], s[FK_NACC], w2[FK_NACC], cnt[FK_NACC], bad[FK_NACC];
} fk_acc;

/* The accumulators: lane j of every quantity takes the block positions == j mod FK_NACC,
 * always in position order, so the bits are fixed by the data alone. GCC/Clang get the
 * 16 lanes as two 8-wide vector-extension values (NaN-skipping selects as bit masks; the
 * compiler lowers them to zmm, ymm or xmm per clone); other compilers run the same
 * arithmetic lane by lane. */
#if defined(__GNUC__) && FK_NACC == 16
#define FK_VECEXT 1
typedef double fk_v8d __attribute__((vector_size(64)));
typedef long long fk_v8i __attribute__((vector_size(64)));
#define FK_LDV(dst, src) memcpy(&(dst), (src), sizeof(fk_v8d))
#define FK_STV(dst, src) memcpy((dst), &(src), sizeof(fk_v8d))
#define FK_SEL(x, m) ((fk_v8d)((fk_v8i)(x) & (m))) /* m all-ones lanes keep x, else +0.0 */
#endif

/* Accumulate the partials of a chunk (it starts at a multiple of FK_NACC in its block). */
FK_INLINE void fk_accumulate(fk_acc *FK_RESTRICT a, const double *FK_RESTRICT T,
                             const double *FK_RESTRICT Wb, ptrdiff_t c) {
    ptrdiff_t i = 0, j;
    const ptrdiff_t cm = c - c % FK_NACC;
#ifdef FK_VECEXT
    const fk_v8d one = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0};
    fk_v8d s0, s1, k0, k1;
    FK_LDV(s0, a->s);
    FK_LDV(s1, a->s + 8);
    FK_LDV(k0, a->cnt);
    FK_LDV(k1, a->cnt + 8);
    if (!Wb) {
        for (i = 0; i < cm; i += FK_NACC) {
            fk_v8d t0, t1;
            FK_LDV(t0, T + i);
            FK_LDV(t1, T + i + 8);
            const fk_v8i m0 = (t0 == t0), m1 = (t1 == t1);
            s0 += FK_SEL(t0, m0);
            s1 += FK_SEL(t1, m1);
            k0 += FK_SEL(one, m0);
            k1 += FK_SEL(one, m1);
        }
    } else {
        /* the weighted lanes in plain C: written with the vector-extension masks above, GCC
         * scalarized this loop (4.5x slower than without a mask); this form vectorizes and
         * adds the same values in the same order */
        double w[FK_NACC], q[FK_NACC], b[FK_NACC], sv[FK_NACC], kv[FK_NACC];
        FK_STV(sv, s0);
        FK_STV(sv + 8, s1);
        FK_STV(kv, k0);
        FK_STV(kv + 8, k1);
        for (j = 0; j < FK_NACC; j++) {
            w[j] = a->w[j];
            q[j] = a->w2[j];
            b[j] = a->bad[j];
        }
        for (i = 0; i < cm; i += FK_NACC) {
            for (j = 0; j < FK_NACC; j++) {
                const double t = T[i + j], x = Wb[i + j];
                const int nz = (x != 0.0), isn = (t != t);
                const int ok = nz & !isn;
                w[j] += ok ? x : 0.0;
                sv[j] += ok ? x * t : 0.0;
                q[j] += ok ? x * x : 0.0;
                kv[j] += ok ? 1.0 : 0.0;
                b[j] += (nz & isn) ? 1.0 : 0.0;
            }
        }
        for (j = 0; j < FK_NACC; j++) {
            a->w[j] = w[j];
            a->w2[j] = q[j];
            a->bad[j] = b[j];
        }
        FK_LDV(s0, sv);
        FK_LDV(s1, sv + 8);
        FK_LDV(k0, kv);
        FK_LDV(k1, kv + 8);
    }
    FK_STV(a->s, s0);
    FK_STV(a->s + 8, s1);
    FK_STV(a->cnt, k0);
    FK_STV(a->cnt + 8, k1);
#else
    (void)cm;
#endif
    /* the rest (everything without vector extensions, else the tail of the block) */
    for (; i < c; i += FK_NACC) {
        for (j = 0; j < FK_NACC && i + j < c; j++) {
            const double t = T[i + j], w = Wb ? Wb[i + j] : 1.0;
            const int nz = (w != 0.0), isn = (t != t);
            const int ok = nz & !isn;
            const double wt = w * t, ww = w * w;
            a->w[j] += ok ? w : 0.0;
            a->s[j] += ok ? (Wb ? wt : t) : 0.0;
            a->w2[j] += ok ? ww : 0.0;
            a->cnt[j] += ok ? 1.0 : 0.0;
            a->bad[j] += (nz & isn) ? 1.0 : 0.0;
        }
    }
}

FK_INLINE double fk_sum_lanes(const double *x) {
    /* fixed pairwise order over the FK_NACC lanes */
    double h[FK_NACC / 2];
    int j, m;
    for (j = 0; j < FK_NACC / 2; j++) h[j] = x[j] + x[j + FK_NACC / 2];
    for (m = FK_NACC / 4; m >= 1; m /= 2)
        for (j = 0; j < m; j++) h[j] = h[j] + h[j + m];
    return h[0];
}

/* M2 = sum w (t - mean)^2 over the included elements of the block (second pass). */
FK_INLINE double fk_block_m2(const double *FK_RESTRICT T, const double *FK_RESTRICT Wb,
                             ptrdiff_t nb, double mean) {
    double acc[FK_NACC];
    ptrdiff_t i = 0, j;
    const ptrdiff_t cm = nb - nb % FK_NACC;
    for (j = 0; j < FK_NACC; j++) acc[j] = 0.0;
#ifdef FK_VECEXT
    {
        fk_v8d a0 = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}, a1 = a0;
        const fk_v8d zero = a0;
        const fk_v8d mu = a0 + mean;
        for (i = 0; i < cm; i += FK_NACC) {
            fk_v8d t0, t1;
            FK_LDV(t0, T + i);
            FK_LDV(t1, T + i + 8);
            const fk_v8d d0 = t0 - mu, d1 = t1 - mu;
            fk_v8d v0 = d0 * d0, v1 = d1 * d1;
            fk_v8i ok0 = (t0 == t0), ok1 = (t1 == t1);
            if (Wb) {
                fk_v8d x0, x1;
                FK_LDV(x0, Wb + i);
                FK_LDV(x1, Wb + i + 8);
                v0 = x0 * v0;
                v1 = x1 * v1;
                ok0 &= (x0 != zero);
                ok1 &= (x1 != zero);
            }
            a0 += FK_SEL(v0, ok0);
            a1 += FK_SEL(v1, ok1);
        }
        FK_STV(acc, a0);
        FK_STV(acc + 8, a1);
    }
#else
    (void)cm;
#endif
    for (; i < nb; i += FK_NACC) {
        for (j = 0; j < FK_NACC && i + j < nb; j++) {
            const double t = T[i + j], w = Wb ? Wb[i + j] : 1.0, d = t - mean;
            const double v = Wb ? w * (d * d) : d * d;
            acc[j] += ((w != 0.0) & (t == t)) ? v : 0.0;
        }
    }
    return fk_sum_lanes(acc);
}

/* ------------------------------------------------------------------ one (row, block) task */
FK_CLONES
static void fk_block(const fk_arrays *A, const fk_params *P, ptrdiff_t row, ptrdiff_t b,
                     double *FK_RESTRICT work, double *FK_RESTRICT part) {
    const ptrdiff_t start = b * FK_BLOCK;
    const ptrdiff_t rem = A->n - start;
    const ptrdiff_t nb = rem < FK_BLOCK ? rem : FK_BLOCK;
    const int grad = P->mode == FK_GRAD;
    double *Tb = work;                  /* [FK_BLOCK] terms of the block */
    double *Wblk = work + FK_BLOCK;     /* [FK_BLOCK] weights of the block */
    double *L = work + 2 * FK_BLOCK;    /* [FK_CHUNK] log-ratios */
    double *G = L + FK_CHUNK;           /* [FK_CHUNK] derivatives */
    double *X = G + FK_CHUNK;           /* [FK_CHUNK] exp(log_iw) */
    double *Y = X + FK_CHUNK;           /* [FK_CHUNK] log_iw */
    double *Raw = Y + FK_CHUNK;         /* [FK_CHUNK] log-ratios before their clamp (grad) */
    const double rs = grad ? A->rowscale[row] : 1.0;
    const int gate_l = grad && P->clamp_l;
    fk_acc acc;
    ptrdiff_t off, i;
    memset(&acc, 0, sizeof acc);

    for (off = 0; off < nb; off += FK_CHUNK) {
        const ptrdiff_t c = (nb - off) < FK_CHUNK ? (nb - off) : FK_CHUNK;
        const ptrdiff_t col = start + off;
        double *T = Tb + off;
        double *Wb = A->mkind ? Wblk + off : NULL;
        double *Gc = grad ? G : NULL;

        fk_load_l(A, P, row, col, c, L, gate_l ? Raw : NULL);
        /* two inlined copies: the series is a constant in each */
        if (A->f32 ? fk_terms(P->est, L, c, T, Gc, FK_SERIES_LO)
                   : fk_terms(P->est, L, c, T, Gc, FK_SERIES_FULL)) {
            for (i = 0; i < c; i++) {
                const double l = L[i];
                if (!(fabs(l) <= FK_FAST_MAX)) fk_term_slow(l, P->est, T + i, grad ? G + i : NULL);
            }
        }
        /* v = exp(log_iw) * clip(t) ("term" order) or clip(exp(log_iw) * t) ("weighted"); the
         * derivative is autograd's (numpy/mc.py _terms_grads) */
        if (gate_l && !P->weighted) fk_gate(Raw, G, c, P->lr_lo, P->lr_hi);
        if (P->clamp_v && !P->weighted) fk_clip_value(T, Gc, c, P->v_lo, P->v_hi);
        if (grad && P->iw_grad == 1)
            for (i = 0; i < c; i++) G[i] = G[i] + T[i];
        else if (grad && P->iw_grad == 2) /* dv / dlog_iw alone */
            for (i = 0; i < c; i++) G[i] = T[i];
        if (A->iw) {
            fk_load_exp_iw(A, row, col, c, X, Y);
            for (i = 0; i < c; i++) T[i] = T[i] * X[i];
            if (grad)
                for (i = 0; i < c; i++) G[i] = G[i] * X[i];
        }
        if (P->clamp_v && P->weighted) fk_clip_value(T, Gc, c, P->v_lo, P->v_hi);
        /* NeMo-RL: where the log-ratio clamp bites, no gradient (through exp(log_iw) neither) */
        if (gate_l && P->weighted) fk_gate(Raw, G, c, P->lr_lo, P->lr_hi);
        if (Wb) fk_load_w(A, row, col, c, Wb);

        if (P->mode == FK_TERMS) {
            fk_store(A, row * A->n + col, c, T, Wb, 1.0, 0);
        } else {
            if (grad) fk_store(A, row * A->n + col, c, G, Wb, rs, 1);
            fk_accumulate(&acc, T, Wb, c);
        }
    }
    if (P->mode == FK_TERMS) return;

    {
        const double cnt = fk_sum_lanes(acc.cnt);
        const double S = fk_sum_lanes(acc.s);
        double W, W2, nbad, M2 = 0.0;
        if (A->mkind) {
            W = fk_sum_lanes(acc.w);
            W2 = fk_sum_lanes(acc.w2);
            nbad = fk_sum_lanes(acc.bad);
        } else {
            W = cnt;
            W2 = cnt;
            nbad = (double)nb - cnt;
        }
        if (P->want_m2 && W > 0.0) {
            const double mean = S / W;
            M2 = fk_block_m2(Tb, A->mkind ? Wblk : NULL, nb, mean);
            /* the reference sums w * (t - mean)**2 over the whole zero-padded block: where
             * mean**2 overflows (or mean is not finite) an excluded or padded position adds
             * 0 * inf = NaN */
            if (!(mean * mean <= 1.7976931348623157e308) && cnt < (double)FK_BLOCK) M2 = NAN;
        }
        part[0] = W;
        part[1] = S;
        part[2] = M2;
        part[3] = W2;
        part[4] = nbad;
        part[5] = cnt;
    }
}

#include "mc32.h" /* float32 lanes: fk_block32, fk_lanes32_ok */

/* Task index -> (row, block); each task writes only its own FK_NPART partials. */
static void fk_task(const fk_arrays *A, const fk_params *P, ptrdiff_t task, double *work,
                    double *parts) {
    const ptrdiff_t row = task / A->nblk, b = task % A->nblk;
    if (fk_lanes32_ok(A, P)) { /* float32 inputs, no weights / log_iw / clamp: mc32.h */
        fk_block32(A, P, row, b, work, parts ? parts + task * FK_NPART : NULL);
        return;
    }
    fk_block(A, P, row, b, work, parts ? parts + task * FK_NPART : NULL);
}

#endif /* FASTKL_MATH_H */
