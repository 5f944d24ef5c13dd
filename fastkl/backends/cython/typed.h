/* The dtype-dependent chunk loops of both headers, written once: common.h includes this file
 * once per element type, with
 *
 *   FK_T    the element type (float, double, uint8_t)
 *   FK_SFX  the suffix of the generated names (f32, f64, u8)
 *
 * so FK_TYPED(fk_get) is fk_get_f32, fk_get_f64, fk_get_u8. Every loop reads or writes
 * FK_T elements and computes in double: for FK_T = double the casts are no-ops, for float
 * they are exact widenings (loads) or the one rounding to float (stores), as before.
 * The float64 and float32 kernels select an instance with FK_BY_DTYPE (common.h).
 * No include guard: included once per type on purpose. */
#if !defined(FK_T) || !defined(FK_SFX)
#error "typed.h needs FK_T and FK_SFX (include common.h instead)"
#endif

/* X[i] = (double)p[i * s] */
FK_INLINE void FK_TYPED(fk_get)(const void *base, ptrdiff_t s, ptrdiff_t c,
                                double *FK_RESTRICT X) {
    const FK_T *p = (const FK_T *)base;
    ptrdiff_t i;
    if (s == 1) {
        for (i = 0; i < c; i++) X[i] = (double)p[i];
    } else {
        for (i = 0; i < c; i++) X[i] = (double)p[i * s];
    }
}

/* X[i] = (double)p[i * s] * inv_t (an exact product when inv_t == 1) */
FK_INLINE void FK_TYPED(fk_get_scaled)(const void *base, ptrdiff_t s, ptrdiff_t c, double inv_t,
                                       double *FK_RESTRICT X) {
    const FK_T *p = (const FK_T *)base;
    ptrdiff_t i;
    if (s == 1) {
        for (i = 0; i < c; i++) X[i] = (double)p[i] * inv_t;
    } else {
        for (i = 0; i < c; i++) X[i] = (double)p[i * s] * inv_t;
    }
}

/* L[i] = (double)p[i * sp] - (double)q[i * sq]: float32 inputs are subtracted in float64 */
FK_INLINE void FK_TYPED(fk_get_diff)(const void *pbase, ptrdiff_t sp, const void *qbase,
                                     ptrdiff_t sq, ptrdiff_t c, double *FK_RESTRICT L) {
    const FK_T *p = (const FK_T *)pbase, *q = (const FK_T *)qbase;
    ptrdiff_t i;
    if (sq == 1 && sp == 1) {
        for (i = 0; i < c; i++) L[i] = (double)p[i] - (double)q[i];
    } else {
        for (i = 0; i < c; i++) L[i] = (double)p[i * sp] - (double)q[i * sq];
    }
}

/* out[i] = w == 0 ? 0 : w * V[i] (times scale when use_scale), rounded once to FK_T; no
 * weights (Wb == NULL) means w = 1 everywhere. */
FK_INLINE void FK_TYPED(fk_put)(void *out, ptrdiff_t c, const double *FK_RESTRICT V,
                                const double *FK_RESTRICT Wb, double scale, int use_scale) {
    FK_T *o = (FK_T *)out;
    ptrdiff_t i;
    if (!Wb && !use_scale) {
        for (i = 0; i < c; i++) o[i] = (FK_T)V[i];
    } else if (!Wb) {
        for (i = 0; i < c; i++) o[i] = (FK_T)(V[i] * scale);
    } else if (!use_scale) {
        for (i = 0; i < c; i++) {
            const double w = Wb[i], v = w * V[i];
            o[i] = (FK_T)((w == 0.0) ? 0.0 : v);
        }
    } else {
        for (i = 0; i < c; i++) {
            const double w = Wb[i], v = V[i] * w * scale;
            o[i] = (FK_T)((w == 0.0) ? 0.0 : v);
        }
    }
}

/* out[i] = (A[i] - B[i]) * k, rounded once to FK_T */
FK_INLINE void FK_TYPED(fk_put_diff)(void *out, ptrdiff_t c, const double *FK_RESTRICT A,
                                     const double *FK_RESTRICT B, double k) {
    FK_T *o = (FK_T *)out;
    ptrdiff_t i;
    for (i = 0; i < c; i++) o[i] = (FK_T)((A[i] - B[i]) * k);
}
