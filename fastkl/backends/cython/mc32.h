/* float32 term lanes of the Cython Monte Carlo kernels (issue 12; docs/kernel_math.md,
 * "float32 lanes"): the numba backend's _partials32_kernel in C.
 *
 * Included from mc.h (after fk_term_slow and fk_exp_core); fk_task sends a task here when
 * fk_lanes32_ok(): float32 inputs, no mask or a uint8 (bool) mask, no log_iw, no clamp,
 * estimator k1, k2, k3 or reverse k3, mode terms or partials. Everything else keeps the
 * float64 lanes of fk_block.
 *
 * Per sub-chunk of FK_SUB32 = 512 lanes (a short or strided one is gathered into float32
 * buffers and padded with zero lanes, which give zero terms, so every term goes through the
 * same vectorized loop):
 *
 *   1. l = p - q in float32 (one rounding), the float32 term (fk_k3_32 ...), and two integer
 *      flags: max of bits(|l|) (NaN, inf, |l| > 87, > 80 for reverse k3) and min of
 *      bits(|l|) - 1 (0 < |l| < 2**-62, where l**2/2 leaves float32's normal range); a zero
 *      lane and a lane with w = 0 never flag.
 *   2. clean sub-chunk: acc[i % 32] += (double)t[i] (w t for a mask), in position order: every
 *      term widened at the accumulator (the prototype's "runs8" float32 sums of 8 were 15%
 *      faster but made sums depend on where a block starts, ~1e-9: chunked, streamed and
 *      dask results must match the in-memory one to 1e-12);
 *   3. flagged sub-chunk: lane by lane in float64 into the same acc[i % 32]: the float32 term
 *      where the lane formula holds, else the float64 lanes' term of the exact float64 l
 *      (fk_term64: the float64 fast path with the float32 inputs' series, libm beyond 700);
 *      a NaN term is excluded and counted.
 *
 * 16-bit inputs (A->qfmt FK_FMT_F16 / FK_FMT_BF16, raw bits): a full contiguous sub-chunk is
 * widened to float32 inside the term loop (fk_terms32_h16; the float32 values are gathered
 * only when the sub-chunk is flagged), a short or strided one gathered and widened into the
 * float32 buffers; the float32 values are the same either way, so the terms and sums are
 * those of float32 inputs holding the widened values.
 *
 * S is the fixed pairwise fold of the 32 float64 lanes; M2 a second pass over the block's
 * float32 terms in 16 float64 lanes (a block with fix-up or NaN lanes recomputes them in
 * float64 from the inputs: a float32 copy of a reverse-k3 term beyond l = 84.3 is inf).
 * The order never depends on the thread or the layout: the same bits for any thread count.
 * Cross-clone bits may differ in a term's last float32 bit (FMA in the polynomial), as
 * between the float64 lanes' clones.
 */
#ifndef FASTKL_MC32_H
#define FASTKL_MC32_H

#define FK_SUB32 512                 /* lanes per sub-chunk; divides FK_BLOCK */
#define FK_ACC32 32                  /* float64 accumulator lanes (4 AVX2 / 2 AVX-512 chains) */
#define FK_FAST32_BITS 0x42AE0000u   /* 87.0f: e^l and the terms stay finite in float32 */
#define FK_FAST32_BITS_R 0x42A00000u /* 80.0f: reverse k3 overflows float32 from l = 84.3 */
#define FK_TINY32_BITS 0x20800000u   /* 2**-62 */
#define FK_NEG_CLAMP32 (-87.0f)      /* exp argument floor: e^l < 2e-38 there */

/* 1 (default): eligible tasks take the float32 lanes; 0: the float64 lanes (``_mc``'s
 * set_f32_lanes, for comparisons and benchmarks). Read by the tasks, set between calls. */
static int fk_lanes32_on = 1;
static void fk_set_lanes32(int on) { fk_lanes32_on = on; }
static int fk_get_lanes32(void) { return fk_lanes32_on; }

/* e^x = s (1 + r + q) in float32 for -87 <= x <= 87: s = 2^k, |r| <= ln2/2 + eps, q = e^r - 1
 * - r by the degree-5 minimax series of fk_exp_series (rounded to float32). LN2_HI =
 * 0x3f317200 has 9 trailing zero bits: kf * LN2_HI is exact. */
FK_INLINE void fk_exp_parts32(float x, float *s, float *r, float *q) {
    const float t = x * 1.44269504088896341f + 12582912.0f; /* + 1.5 * 2**23 */
    const float kf = t - 12582912.0f;
    const float rr = (x - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;
    float P = 0.00019857847267093069348f;
    P = P * rr + 0.0013933726747929464043f;
    P = P * rr + 0.0083333608728334880738f;
    P = P * rr + 0.04166646436477276519f;
    P = P * rr + 0.16666666531201065386f;
    P = P * rr + 0.50000000134956292519f;
    *q = (rr * rr) * P;
    *r = rr;
    *s = fk_from_bits32((fk_bits32(t) + 127u) << 23);
}

/* k3 = E = s q + ((s r + (s - 1)) - l): for k == 0, s = 1 and r = l, so E = q exactly (no
 * cancellation); the exp argument is floored at -87 (l = -inf gives +inf, NaN stays NaN). */
FK_INLINE float fk_k3_32(float l) {
    const float lc = (l < FK_NEG_CLAMP32) ? FK_NEG_CLAMP32 : l;
    float s, r, q;
    fk_exp_parts32(lc, &s, &r, &q);
    return s * q + ((s * r + (s - 1.0f)) - l);
}

/* reverse k3: l*l + (l - 1) E for l >= -1, e^l (l - 1) + 1 below */
FK_INLINE float fk_rk3_32(float l) {
    const float lc = (l < FK_NEG_CLAMP32) ? FK_NEG_CLAMP32 : l;
    float s, r, q;
    fk_exp_parts32(lc, &s, &r, &q);
    const float E = s * q + ((s * r + (s - 1.0f)) - l);
    const float R = s * (r + q) + s;
    const float a = (l - 1.0f) * E + l * l;
    const float b = R * (l - 1.0f) + 1.0f;
    return (l >= -1.0f) ? a : b;
}

/* The term of a fix-up lane, as the float64 lanes compute it for float32 inputs. */
static double fk_term64(double l, int est) {
    double t, E, R;
    if (!(fabs(l) <= FK_FAST_MAX)) {
        fk_term_slow(l, est, &t, NULL);
        return t;
    }
    switch (est) {
    case FK_K1:
        return -l;
    case FK_K2:
        return 0.5 * l * l;
    case FK_K3:
        fk_exp_core(l, &E, &R, FK_SERIES_LO);
        return E;
    default: /* FK_RK3 */
        fk_exp_core(l, &E, &R, FK_SERIES_LO);
        return (l < -1.0) ? R * (l - 1.0) + 1.0 : l * l + (l - 1.0) * E;
    }
}

/* Whether the float32 lane formula holds for l (the complement of the flags). */
FK_INLINE int fk_ok32(float l, uint32_t fast_bits) {
    const uint32_t a = fk_bits32(l) & 0x7fffffffu;
    return a <= fast_bits && (a >= FK_TINY32_BITS || a == 0u);
}

/* Which tasks take the float32 lanes. */
FK_INLINE int fk_lanes32_ok(const fk_arrays *A, const fk_params *P) {
    return fk_lanes32_on && A->f32 && (A->mkind == 0 || A->mkind == 1) && !A->iw &&
           !P->clamp_l && !P->clamp_v && (P->mode == FK_PARTIALS || P->mode == FK_TERMS) &&
           (P->est == FK_K1 || P->est == FK_K2 || P->est == FK_K3 || P->est == FK_RK3);
}

/* T[i] = the float32 term of p[i] - q[i], i < FK_SUB32; W (NULL: no mask) the float32
 * weights. Returns whether some included lane needs the float64 fix-up. */
#define FK_LD_F32(x) (x)
#define FK_LD_F16(x) fk_f16_to_f32(x)
#define FK_LD_BF16(x) fk_bf16_to_f32(x)
#define FK_LANES32_LOOP(EXPR) FK_LANES32_LOOP_LD(FK_LD_F32, EXPR)
#define FK_LANES32_LOOP_LD(LD, EXPR)                                                           \
    do {                                                                                       \
        if (W) {                                                                               \
            for (i = 0; i < FK_SUB32; i++) {                                                   \
                const float l = LD(p[i]) - LD(q[i]);                                           \
                const uint32_t a = (W[i] != 0.0f) ? (fk_bits32(l) & 0x7fffffffu) : 0u;         \
                T[i] = EXPR;                                                                   \
                mx = a > mx ? a : mx;                                                          \
                mn = (a - 1u) < mn ? (a - 1u) : mn;                                            \
            }                                                                                  \
        } else {                                                                               \
            for (i = 0; i < FK_SUB32; i++) {                                                   \
                const float l = LD(p[i]) - LD(q[i]);                                           \
                const uint32_t a = fk_bits32(l) & 0x7fffffffu;                                 \
                T[i] = EXPR;                                                                   \
                mx = a > mx ? a : mx;                                                          \
                mn = (a - 1u) < mn ? (a - 1u) : mn;                                            \
            }                                                                                  \
        }                                                                                      \
    } while (0)

FK_INLINE int fk_terms32(int est, const float *FK_RESTRICT q, const float *FK_RESTRICT p,
                         const float *FK_RESTRICT W, float *FK_RESTRICT T, uint32_t fast_bits) {
    ptrdiff_t i;
    uint32_t mx = 0u, mn = 0xffffffffu;
    switch (est) {
    case FK_K1:
        FK_LANES32_LOOP(-l);
        mn = 0xffffffffu; /* -l is exact: no tiny-lane fix-up */
        break;
    case FK_K2:
        FK_LANES32_LOOP(0.5f * l * l);
        break;
    case FK_K3:
        FK_LANES32_LOOP(fk_k3_32(l));
        break;
    default: /* FK_RK3 */
        FK_LANES32_LOOP(fk_rk3_32(l));
        break;
    }
    return mx > fast_bits || mn < FK_TINY32_BITS - 1u;
}

/* fk_terms32 over 16-bit inputs (one full contiguous sub-chunk of raw bits), each element
 * widened to float32 in the loop that computes its term (no buffer pass): the same float32
 * values, so the same terms and flags. */
#define FK_TERMS32_H16(LD)                                                                     \
    do {                                                                                       \
        switch (est) {                                                                         \
        case FK_K1:                                                                            \
            FK_LANES32_LOOP_LD(LD, -l);                                                        \
            mn = 0xffffffffu;                                                                  \
            break;                                                                             \
        case FK_K2:                                                                            \
            FK_LANES32_LOOP_LD(LD, 0.5f * l * l);                                              \
            break;                                                                             \
        case FK_K3:                                                                            \
            FK_LANES32_LOOP_LD(LD, fk_k3_32(l));                                               \
            break;                                                                             \
        default:                                                                               \
            FK_LANES32_LOOP_LD(LD, fk_rk3_32(l));                                              \
            break;                                                                             \
        }                                                                                      \
    } while (0)

FK_INLINE int fk_terms32_h16(int est, const uint16_t *FK_RESTRICT q,
                             const uint16_t *FK_RESTRICT p, const float *FK_RESTRICT W,
                             float *FK_RESTRICT T, uint32_t fast_bits, const int bf) {
    ptrdiff_t i;
    uint32_t mx = 0u, mn = 0xffffffffu;
    if (bf)
        FK_TERMS32_H16(FK_LD_BF16);
    else
        FK_TERMS32_H16(FK_LD_F16);
    return mx > fast_bits || mn < FK_TINY32_BITS - 1u;
}

/* acc[k] += (double)V[g + k], k < FK_ACC32, for every run g of FK_ACC32 lanes: each float32
 * term widened at the accumulator (V = w t with a mask), FK_ACC32 independent float64 lanes in
 * position order. No float32 partial sums: a sum's rounding is float64 alone, so the result
 * does not depend on where a block starts (chunked, streamed, dask: ~1e-16, as the float64
 * lanes). */
FK_INLINE void fk_widen_sum(const float *FK_RESTRICT T, const float *FK_RESTRICT W,
                            double *FK_RESTRICT acc) {
    ptrdiff_t g;
    int k;
    if (W) {
        for (g = 0; g < FK_SUB32; g += FK_ACC32)
            for (k = 0; k < FK_ACC32; k++)
                acc[k] += (W[g + k] != 0.0f) ? (double)(W[g + k] * T[g + k]) : 0.0;
    } else {
        for (g = 0; g < FK_SUB32; g += FK_ACC32)
            for (k = 0; k < FK_ACC32; k++) acc[k] += (double)T[g + k];
    }
}

/* out[i] = (float)p[o + i * s] for i < c, zeros up to FK_SUB32 */
FK_INLINE void fk_gather32(const float *FK_RESTRICT x, ptrdiff_t s, ptrdiff_t c,
                           float *FK_RESTRICT out) {
    ptrdiff_t i;
    if (s == 1)
        for (i = 0; i < c; i++) out[i] = x[i];
    else
        for (i = 0; i < c; i++) out[i] = x[i * s];
    for (i = c; i < FK_SUB32; i++) out[i] = 0.0f;
}

/* out[i] = widen(x[i * s]) (16-bit bits; bf: bfloat16, else float16) for i < c, zeros up to
 * FK_SUB32 */
FK_INLINE void fk_gather_h16(const uint16_t *FK_RESTRICT x, ptrdiff_t s, ptrdiff_t c,
                             float *FK_RESTRICT out, const int bf) {
    ptrdiff_t i;
    if (bf) {
        if (s == 1)
            for (i = 0; i < c; i++) out[i] = fk_bf16_to_f32(x[i]);
        else
            for (i = 0; i < c; i++) out[i] = fk_bf16_to_f32(x[i * s]);
    } else {
        if (s == 1)
            for (i = 0; i < c; i++) out[i] = fk_f16_to_f32(x[i]);
        else
            for (i = 0; i < c; i++) out[i] = fk_f16_to_f32(x[i * s]);
    }
    for (i = c; i < FK_SUB32; i++) out[i] = 0.0f;
}

FK_INLINE void fk_gather_w32(const uint8_t *FK_RESTRICT x, ptrdiff_t s, ptrdiff_t c,
                             float *FK_RESTRICT out) {
    ptrdiff_t i;
    if (s == 1)
        for (i = 0; i < c; i++) out[i] = (float)x[i];
    else
        for (i = 0; i < c; i++) out[i] = (float)x[i * s];
    for (i = c; i < FK_SUB32; i++) out[i] = 0.0f;
}

/* One (row, block) task in float32 lanes (mode FK_PARTIALS or FK_TERMS). ``work`` is the
 * task's FK_WORK_DOUBLES doubles, used as float32 buffers. */
FK_CLONES
static void fk_block32(const fk_arrays *A, const fk_params *P, ptrdiff_t row, ptrdiff_t b,
                       double *FK_RESTRICT work, double *FK_RESTRICT part) {
    const ptrdiff_t start = b * FK_BLOCK;
    const ptrdiff_t rem = A->n - start;
    const ptrdiff_t nb = rem < FK_BLOCK ? rem : FK_BLOCK;
    const int est = P->est, masked = A->mkind == 1, terms = P->mode == FK_TERMS;
    const uint32_t fast_bits = est == FK_RK3 ? FK_FAST32_BITS_R : FK_FAST32_BITS;
    float *Tb = (float *)work;       /* [FK_BLOCK] float32 terms of the block */
    float *Wblk = Tb + FK_BLOCK;     /* [FK_BLOCK] weights of the block (masked) */
    float *qg = Wblk + FK_BLOCK;     /* [FK_SUB32] gathered logq */
    float *pg = qg + FK_SUB32;       /* [FK_SUB32] gathered logp */
    /* 16-bit inputs (FK_FMT_F16 / BF16): every sub-chunk is gathered, widened to float32 */
    const int half = A->qfmt >= FK_FMT_F16, bf = A->qfmt == FK_FMT_BF16;
    const size_t isz = half ? 2 : 4;
    const char *qrow = (const char *)A->q + (row * A->q0 + start * A->q1) * (ptrdiff_t)isz;
    const char *prow = (const char *)A->p + (row * A->p0 + start * A->p1) * (ptrdiff_t)isz;
    const uint8_t *mrow = masked ? (const uint8_t *)A->m + row * A->m0 + start * A->m1 : NULL;
    double acc[FK_ACC32] FK_ALIGN(64);
    double W = 0.0, W2 = 0.0, nbad = 0.0, cnt = 0.0;
    int dirty = 0;
    ptrdiff_t off, i;
    for (i = 0; i < FK_ACC32; i++) acc[i] = 0.0;

    for (off = 0; off < nb; off += FK_SUB32) {
        const ptrdiff_t c = (nb - off) < FK_SUB32 ? (nb - off) : FK_SUB32;
        float *T = Tb + off;
        float *Wv = masked ? Wblk + off : NULL;
        const float *q, *p;
        int flagged;
        if (half && c == FK_SUB32 && A->q1 == 1 && A->p1 == 1) {
            /* widened in the term loop; the float32 values only for a flagged sub-chunk */
            if (masked) fk_gather_w32(mrow + off * A->m1, A->m1, c, Wv);
            flagged = fk_terms32_h16(est, (const uint16_t *)qrow + off,
                                     (const uint16_t *)prow + off, Wv, T, fast_bits, bf);
            if (flagged) {
                fk_gather_h16((const uint16_t *)qrow + off, 1, c, qg, bf);
                fk_gather_h16((const uint16_t *)prow + off, 1, c, pg, bf);
            }
            q = qg;
            p = pg;
        } else {
            if (half) {
                fk_gather_h16((const uint16_t *)qrow + off * A->q1, A->q1, c, qg, bf);
                fk_gather_h16((const uint16_t *)prow + off * A->p1, A->p1, c, pg, bf);
                q = qg;
                p = pg;
            } else if (c == FK_SUB32 && A->q1 == 1 && A->p1 == 1) {
                q = (const float *)qrow + off;
                p = (const float *)prow + off;
            } else {
                fk_gather32((const float *)qrow + off * A->q1, A->q1, c, qg);
                fk_gather32((const float *)prow + off * A->p1, A->p1, c, pg);
                q = qg;
                p = pg;
            }
            if (masked) fk_gather_w32(mrow + off * A->m1, A->m1, c, Wv);
            flagged = fk_terms32(est, q, p, Wv, T, fast_bits);
        }

        if (!flagged) {
            if (terms) {
                /* nothing to fix */
            } else {
                fk_widen_sum(T, Wv, acc);
                if (masked) {
                    double sw = 0.0, sw2 = 0.0, nz = 0.0;
                    for (i = 0; i < c; i++) {
                        const double w = (double)Wv[i];
                        sw += w;
                        sw2 += w * w;
                        nz += (w != 0.0) ? 1.0 : 0.0;
                    }
                    W += sw;
                    W2 += sw2;
                    cnt += nz;
                } else {
                    cnt += (double)c;
                }
            }
        } else {
            dirty = 1;
            for (i = 0; i < c; i++) {
                const double w = masked ? (double)Wv[i] : 1.0;
                double t;
                if (w == 0.0) continue;
                t = fk_ok32(p[i] - q[i], fast_bits)
                        ? (double)T[i]
                        : fk_term64((double)p[i] - (double)q[i], est);
                if (terms) {
                    T[i] = (float)t;
                } else if (t != t) {
                    nbad += 1.0;
                    T[i] = NAN;
                } else {
                    acc[i % FK_ACC32] += w * t;
                    W += w;
                    W2 += w * w;
                    cnt += 1.0;
                    T[i] = (float)t;
                }
            }
        }
        if (terms) {
            float *o = (float *)A->out + row * A->n + start + off;
            if (masked)
                for (i = 0; i < c; i++) o[i] = (Wv[i] == 0.0f) ? 0.0f : (float)((double)Wv[i] * (double)T[i]);
            else
                for (i = 0; i < c; i++) o[i] = T[i];
        }
    }
    if (terms) return;

    {
        double S;
        int h;
        for (h = FK_ACC32 / 2; h >= 1; h /= 2) /* a fixed tree over the lanes */
            for (i = 0; i < h; i++) acc[i] = acc[i] + acc[i + h];
        S = acc[0];
        double M2 = 0.0;
        if (!masked) {
            W = cnt;
            W2 = cnt;
            nbad = (double)nb - cnt;
        }
        if (P->want_m2 && W > 0.0) {
            const double mean = S / W;
            double a[FK_NACC];
            int j;
            for (j = 0; j < FK_NACC; j++) a[j] = 0.0;
            if (dirty) { /* the fix-up lanes again in float64, from the inputs */
                for (i = 0; i < nb; i++) {
                    const double w = masked ? (double)Wblk[i] : 1.0;
                    const float qx = (float)fk_ld(qrow, i * A->q1, A->qfmt);
                    const float px = (float)fk_ld(prow, i * A->p1, A->qfmt);
                    double t = (double)Tb[i], d;
                    if (w == 0.0) continue;
                    if (!fk_ok32(px - qx, fast_bits)) t = fk_term64((double)px - (double)qx, est);
                    if (t != t) continue;
                    d = t - mean;
                    a[i % FK_NACC] += masked ? w * (d * d) : d * d;
                }
            } else if (masked) {
                for (i = 0; i + FK_NACC <= nb; i += FK_NACC)
                    for (j = 0; j < FK_NACC; j++) {
                        const double w = (double)Wblk[i + j], d = (double)Tb[i + j] - mean;
                        a[j] += (w != 0.0) ? w * (d * d) : 0.0;
                    }
                for (; i < nb; i++) {
                    const double w = (double)Wblk[i], d = (double)Tb[i] - mean;
                    a[i % FK_NACC] += (w != 0.0) ? w * (d * d) : 0.0;
                }
            } else {
                for (i = 0; i + FK_NACC <= nb; i += FK_NACC)
                    for (j = 0; j < FK_NACC; j++) {
                        const double d = (double)Tb[i + j] - mean;
                        a[j] += d * d;
                    }
                for (; i < nb; i++) {
                    const double d = (double)Tb[i] - mean;
                    a[i % FK_NACC] += d * d;
                }
            }
            M2 = fk_sum_lanes(a);
            /* as fk_block: where mean**2 overflows, a padded or excluded position of the
             * reference's zero-padded block adds 0 * inf = NaN */
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

#endif /* FASTKL_MC32_H */
