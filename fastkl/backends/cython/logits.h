/* Per-row logits kernels of the Cython backend (KL, JSD, entropy, token log-prob, KL grad).
 *
 * Algorithm: docs/logits_math.md; semantics: fastkl/backends/numpy/logits.py;
 * contract: fastkl/backends/_contract.py (bottom half).
 *
 * One row is computed by one thread, in chunks of FKL_CHUNK elements, always in the same
 * order, so the bits never depend on the thread count. A chunk goes through small buffers
 * that stay in L1:
 *
 *   1. load: X = (double)a * inv_t (and Y for b), any element stride     (vectorized)
 *   2. chunk max (8 independent lanes); rescale of the row sums when the max grows (scalar)
 *   3. exp and per-element terms, branch-free, float64 lanes              (vectorized)
 *   4. scalar libm fix-up of the rare lanes outside the fast exp/log range
 *   5. chunk sums over FKL_NACC lanes in a fixed order, added to the row sums
 *
 * exp is the range-reduced exp of common.h (docs/kernel_math.md): e^r = 1 + r + r^2 P(r) with
 * P the Taylor series to r^13 for float64 inputs (FK_SERIES_FULL) and, for float32 inputs
 * (FK_SERIES_LO), the degree-5 minimax fit of fk_exp_series (relative error 2.7e-9, far
 * inside the float32 tolerance); log (JSD only) is 2 atanh((f-1)/(f+1)) on the mantissa, to
 * s^21 (full) or s^11 (lo). Shares common.h (macros, the dtype instances of typed.h,
 * multiversioning, OpenMP queries) with mc.h.
 *
 * No -ffast-math: NaN/inf semantics and the order of every sum matter. Build with -O3
 * -fno-math-errno; -fno-trapping-math lets the compiler if-convert the selects.
 */
#ifndef FASTKL_LOGITS_H
#define FASTKL_LOGITS_H

#include "common.h"

#define FKL_CHUNK 256 /* elements per L1-resident chunk; multiple of FKL_NACC */
#define FKL_NACC 8    /* independent accumulators per sum (fixed: the summation order) */

/* ------------------------------------------------------------------ arguments */
/* The op codes. FKL_KL, FKL_JSD, FKL_ENT must equal fastkl.backends._contract.LOGITS_OPS
 * (tests/test_kernel_codes.py compares them through _logits.LOGITS_OPS); FKL_TOKEN and
 * FKL_GRAD are the backend's own. _logits.run rejects any other code before a kernel runs;
 * fkl_row gives NaN for one. */
enum { FKL_KL = 0, FKL_JSD = 1, FKL_ENT = 2, FKL_TOKEN = 3, FKL_GRAD = 4, FKL_NOPS = 5 };

typedef struct {
    const void *a, *b;          /* first element of each 2-D array */
    ptrdiff_t a0, a1, b0, b1;   /* element strides (row, vocabulary), any sign */
    ptrdiff_t rows, V;
    int f32;                    /* 1: float32 inputs (and grad output), 0: float64 */
    int op;                     /* FKL_* */
    int log_probs;              /* log-probabilities with inv_t == 1: no max, no normaliser */
    double inv_t, beta;
    const uint8_t *active;      /* [rows] or NULL (ops KL, JSD, ENT) */
    const int64_t *tokens;      /* [rows] (FKL_TOKEN) */
    int64_t ignore_index;
    const double *rowscale;     /* [rows] (FKL_GRAD) */
    int gop;                    /* FKL_GRAD: the op differentiated (FKL_KL, JSD, ENT, TOKEN) */
    void *grad;                 /* FKL_GRAD: C-contiguous [rows, V], d/da (NULL: not wanted) */
    void *grad_b;               /* FKL_GRAD: C-contiguous [rows, V], d/db (NULL: not wanted) */
    double *out;                /* [rows] float64 */
    double *scratch;            /* FKL_JSD: fkl_scratch_doubles(V) per thread, or NULL */
} fkl_args;

/* ------------------------------------------------------------------ constants */
#define FKL_EXP_LO -700.0     /* fast exp valid on [EXP_LO, EXP_HI] */
#define FKL_EXP_HI 700.0
#define FKL_EXP_ZERO -746.0   /* e^z rounds to +0.0 below this (libm agrees) */
#define FKL_SQRT2 1.41421356237309504880
#define FKL_DBL_MIN 2.2250738585072014e-308
#define FKL_DBL_MAX 1.7976931348623157e308

/* chunks of FKL_CHUNK entries in a row of V */
FK_INLINE ptrdiff_t fkl_nchunks(ptrdiff_t V) { return (V + FKL_CHUNK - 1) / FKL_CHUNK; }

/* doubles of JSD scratch per thread: a row's exps of a and b, and pass 1's shift per chunk */
static inline ptrdiff_t fkl_scratch_doubles(ptrdiff_t V) { return 2 * V + 2 * fkl_nchunks(V); }

/* e^z for z in [EXP_LO, EXP_HI] (callers clamp z there first; NaN stays NaN).
 * full: the Taylor series to r^13 (float64, ~1 ulp), else (lo) the minimax series of
 * fk_exp_series (relative error < 3e-9, float32 inputs). */
FK_INLINE double fkl_exp_core(double z, const int full) {
    double s, r, q;
    fk_exp_parts(z, full, &s, &r, &q);
    return s + s * (r + q);
}

/* e^z for every z: exact 0 below EXP_ZERO (so e^-inf = 0), NaN stays NaN. Sets *bad when the
 * lane needs libm (z in [EXP_ZERO, EXP_LO) for subnormal results, or z > EXP_HI). */
FK_INLINE double fkl_exp(double z, const int full, int *bad) {
    double zc = (z < FKL_EXP_LO) ? FKL_EXP_LO : z;
    zc = (zc > FKL_EXP_HI) ? FKL_EXP_HI : zc;
    const double e = fkl_exp_core(zc, full);
    *bad |= ((z < FKL_EXP_LO) & (z >= FKL_EXP_ZERO)) | (z > FKL_EXP_HI);
    return (z < FKL_EXP_ZERO) ? 0.0 : e;
}

/* The libm exp for a fix-up lane. */
static double fkl_exp_slow(double z) { return exp(z); }

/* log(m) for normal positive finite m (log 0 = -inf handled by the caller's select).
 * *bad set for subnormal, negative, inf or NaN m (libm fix-up). full (loop-invariant): the
 * series to s^21, else to s^11 (relative error < 6e-11, for float32 inputs). */
FK_INLINE double fkl_log(double m, int *bad, const int full) {
    const uint64_t u = fk_to_bits(m);
    /* exponent as a double without an int->double conversion (AVX2 has none for int64) */
    const double e0 = fk_from_bits((u >> 52) | 0x4330000000000000ULL) - 4503599627370496.0;
    double f = fk_from_bits((u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL); /* [1,2) */
    const int hi = f > FKL_SQRT2;
    f = hi ? 0.5 * f : f;                         /* [sqrt(1/2), sqrt(2)) */
    const double e = (e0 - 1023.0) + (hi ? 1.0 : 0.0);
    const double s = (f - 1.0) / (f + 1.0);       /* |s| <= 0.1716 */
    const double s2 = s * s;
    /* 2 atanh(s) = 2 (s + s^3/3 + ... + s^21/21): truncation < 1e-18 relative */
    double P;
    if (full) {
        P = 2.0 / 21.0;
        P = P * s2 + 2.0 / 19.0;
        P = P * s2 + 2.0 / 17.0;
        P = P * s2 + 2.0 / 15.0;
        P = P * s2 + 2.0 / 13.0;
        P = P * s2 + 2.0 / 11.0;
    } else {
        P = 2.0 / 11.0;
    }
    P = P * s2 + 2.0 / 9.0;
    P = P * s2 + 2.0 / 7.0;
    P = P * s2 + 2.0 / 5.0;
    P = P * s2 + 2.0 / 3.0;
    const double lf = 2.0 * s + s * (s2 * P);
    *bad |= !(m >= FKL_DBL_MIN) & (m != 0.0);
    *bad |= !(m <= FKL_DBL_MAX);
    const double lm = e * FK_LN2_HI + (e * FK_LN2_LO + lf);
    return (m == 0.0) ? -(double)INFINITY : lm;
}

/* ------------------------------------------------------------------ chunk helpers */

/* X[i] = (double)row[i * s] * inv_t (an exact product when inv_t == 1). */
FK_INLINE void fkl_load(const void *base, int f32, ptrdiff_t s, ptrdiff_t c, double inv_t,
                         double *FK_RESTRICT X) {
    FK_BY_DTYPE(f32, fk_get_scaled, base, s, c, inv_t, X);
}

/* max of a chunk, NaN ignored (it propagates through the exp later). */
FK_INLINE double fkl_max(const double *FK_RESTRICT X, ptrdiff_t c) {
    double m[FKL_NACC];
    ptrdiff_t i = 0, j;
    const ptrdiff_t cm = c - c % FKL_NACC;
    for (j = 0; j < FKL_NACC; j++) m[j] = -(double)INFINITY;
    for (i = 0; i < cm; i += FKL_NACC)
        for (j = 0; j < FKL_NACC; j++) m[j] = (X[i + j] > m[j]) ? X[i + j] : m[j];
    for (; i < c; i++) m[0] = (X[i] > m[0]) ? X[i] : m[0];
    for (j = 1; j < FKL_NACC; j++) m[0] = (m[j] > m[0]) ? m[j] : m[0];
    return m[0];
}

/* The total of FKL_NACC lane sums, pairwise in a fixed order (a is overwritten). */
FK_INLINE double fkl_lanes(double *a) {
    ptrdiff_t j;
    for (j = 0; j < FKL_NACC / 2; j++) a[j] += a[j + FKL_NACC / 2];
    for (j = 0; j < FKL_NACC / 4; j++) a[j] += a[j + FKL_NACC / 4];
    return a[0] + a[1];
}

/* The sum of a chunk over FKL_NACC lanes (lane = position mod FKL_NACC, in position order),
 * then the lanes pairwise in a fixed order. */
FK_INLINE double fkl_sum(const double *FK_RESTRICT X, ptrdiff_t c) {
    double a[FKL_NACC];
    ptrdiff_t i = 0, j;
    const ptrdiff_t cm = c - c % FKL_NACC;
    for (j = 0; j < FKL_NACC; j++) a[j] = 0.0;
    for (i = 0; i < cm; i += FKL_NACC)
        for (j = 0; j < FKL_NACC; j++) a[j] += X[i + j];
    for (j = 0; i < c; i++, j++) a[j] += X[i];
    return fkl_lanes(a);
}

/* The hot loop of pass 1 for KL: exps and sums fused. z[0] = sum e^(x - mA), z[1] =
 * sum e^(y - mB), z[2] = sum e^(x - mA) * ((x - mA) - (y - mB)). Lane j of each sum takes
 * the positions == j mod FKL_NACC in order, the order of fkl_sum, so a chunk redone by libm
 * gives its sums in the same order. Returns nonzero when a lane needs libm (the sums are then
 * to be discarded). */
FK_INLINE int fkl_fused_kl(const double *FK_RESTRICT X, const double *FK_RESTRICT Y,
                            double mA, double mB, ptrdiff_t c, const int full, double *z) {
    double sA[FKL_NACC], sB[FKL_NACC], sT[FKL_NACC], sBad[FKL_NACC];
    const ptrdiff_t cm = c - c % FKL_NACC;
    ptrdiff_t i, j;
    for (j = 0; j < FKL_NACC; j++) sA[j] = sB[j] = sT[j] = sBad[j] = 0.0;
#define FKL_FUSED_LANE(k, j)                                                                   \
    do {                                                                                       \
        int lane_bad = 0;                                                                      \
        const double za = X[k] - mA, zb = Y[k] - mB;                                           \
        const double ea = fkl_exp(za, full, &lane_bad);                                       \
        const double eb = fkl_exp(zb, full, &lane_bad);                                       \
        sA[j] += ea;                                                                           \
        sB[j] += eb;                                                                           \
        /* ea == 0 exactly where za < EXP_ZERO (tested on za: see pass 2) */                   \
        sT[j] += (za < FKL_EXP_ZERO) ? 0.0 : ea * (za - zb);                                   \
        sBad[j] += lane_bad ? 1.0 : 0.0;                                                       \
    } while (0)
    /* a fixed-count inner loop (GCC vectorizes it across the lanes), then the tail */
    for (i = 0; i < cm; i += FKL_NACC)
        for (j = 0; j < FKL_NACC; j++) FKL_FUSED_LANE(i + j, j);
    for (j = 0; i < c; i++, j++) FKL_FUSED_LANE(i, j);
#undef FKL_FUSED_LANE
    z[0] = fkl_lanes(sA);
    z[1] = fkl_lanes(sB);
    z[2] = fkl_lanes(sT);
    return fkl_lanes(sBad) != 0.0;
}

/* ------------------------------------------------------------------ pass 1 */
/* Running max / rescaled sums over a row (docs/logits_math.md). Sums are relative to the
 * current maxima MA, MB; S = sum eA * ((xa - MA) - (xb - MB)) for KL (want 3), sum eA *
 * (xa - MA) for the entropy (want 1), none otherwise. want: 1 = a only, 2 = b only, 3 =
 * both. In log_probs mode (inv_t == 1) MA = MB = 0 and no max is taken. */
typedef struct {
    double MA, MB, ZA, ZB, S;
    double XI; /* KL: max xa over entries with P > 0 = Q when seen (their +inf terms are kept
                * out of S: P may underflow to 0 once the max grows); -inf: none */
} fkl_state;

enum { FKL_S_NONE = 0, FKL_S_KL = 1, FKL_S_ENT = 2 };

FK_INLINE void fkl_pass1_impl(const fkl_args *A, ptrdiff_t row, int want, int smode,
                              fkl_state *st, double *keep, const int full) {
    FK_ALIGN(64) double X[FKL_CHUNK], Y[FKL_CHUNK], EA[FKL_CHUNK], EB[FKL_CHUNK],
        T[FKL_CHUNK];
    const double ninf = -(double)INFINITY;
    const int wa = want & 1, wb = (want & 2) != 0, log_probs = A->log_probs;
    const size_t isz = A->f32 ? sizeof(float) : sizeof(double);
    const char *pa = (const char *)A->a + (ptrdiff_t)isz * row * A->a0;
    const char *pb = (const char *)A->b + (ptrdiff_t)isz * row * A->b0;
    double MA = log_probs ? 0.0 : ninf, MB = log_probs ? 0.0 : ninf;
    double ZA = 0.0, ZB = 0.0, S = 0.0, XI = ninf;
    ptrdiff_t off, i;

    for (off = 0; off < A->V; off += FKL_CHUNK) {
        const ptrdiff_t c = (A->V - off) < FKL_CHUNK ? (A->V - off) : FKL_CHUNK;
        int bad = 0;
        if (wa) fkl_load(pa + (ptrdiff_t)isz * off * A->a1, A->f32, A->a1, c, A->inv_t, X);
        if (wb) fkl_load(pb + (ptrdiff_t)isz * off * A->b1, A->f32, A->b1, c, A->inv_t, Y);
        if (!log_probs) {
            const double ma = wa ? fkl_max(X, c) : ninf, mb = wb ? fkl_max(Y, c) : ninf;
            if (ma > MA || mb > MB) {
                const double NA = ma > MA ? ma : MA, NB = mb > MB ? mb : MB;
                /* scale factors of the old sums; an old max of -inf means empty sums */
                const double cA = (MA == ninf) ? 0.0 : exp(MA - NA);
                const double cB = (MB == ninf) ? 0.0 : exp(MB - NB);
                if (smode == FKL_S_KL) {
                    /* S' = e^-dA (S - (dA - dB) ZA): one combined update, so identical rows
                     * (dA == dB) keep S == 0 exactly. cA == 0 (a jump > 745, maybe an
                     * overflowing one): every old e^(xa - NA) is 0, so is their sum (not
                     * 0 * inf); a NaN input stays in ZA, ZB */
                    if (MA == ninf || cA == 0.0) {
                        S = 0.0;
                    } else {
                        /* an unchanged max moves by 0 (not -inf - -inf = NaN) */
                        const double dA = (NA == MA) ? 0.0 : NA - MA;
                        const double dB = (NB == MB) ? 0.0 : NB - MB;
                        S = cA * (S - (dA - dB) * ZA);
                    }
                } else if (smode == FKL_S_ENT) {
                    S = (MA == ninf || cA == 0.0) ? 0.0 : cA * (S - (NA - MA) * ZA);
                }
                /* an old max of -inf: the sums are 0, or NaN from a NaN entry (kept) */
                ZA = (MA == ninf) ? 0.0 * ZA : cA * ZA;
                ZB = (MB == ninf) ? 0.0 * ZB : cB * ZB;
                MA = NA;
                MB = NB;
            }
        }
        {
            /* -inf max (nothing finite yet): subtract 0 so -inf -> e^-inf = 0, NaN stays */
            const double mA = (MA == ninf) ? 0.0 : MA, mB = (MB == ninf) ? 0.0 : MB;
            if (smode == FKL_S_KL) {
                double z[3];
                const int slow = fkl_fused_kl(X, Y, mA, mB, c, full, z);
                if (slow) {
                    /* a lane needs libm: the chunk again, sums in the same lane order */
                    for (i = 0; i < c; i++) {
                        const double za = X[i] - mA, zb = Y[i] - mB;
                        const double ea = fkl_exp_slow(za), eb = fkl_exp_slow(zb);
                        EA[i] = ea;
                        EB[i] = eb;
                        T[i] = (ea == 0.0) ? 0.0 : ea * (za - zb);
                    }
                    z[0] = fkl_sum(EA, c);
                    z[1] = fkl_sum(EB, c);
                    z[2] = fkl_sum(T, c);
                }
                if (z[2] == (double)INFINITY) {
                    /* rare: entries with P > 0 = Q (or an overflowing term). Their x goes to
                     * XI, the rest of the chunk's terms to S, in the same order, from the
                     * same exps; fkl_row decides at the end whether P is still > 0 there */
                    for (i = 0; i < c; i++) {
                        const double za = X[i] - mA, zb = Y[i] - mB;
                        int lane_bad = 0;
                        const double ea = slow ? fkl_exp_slow(za) : fkl_exp(za, full, &lane_bad);
                        const int zero = slow ? (ea == 0.0) : (za < FKL_EXP_ZERO);
                        if (!zero && zb == ninf && X[i] > XI) XI = X[i];
                        T[i] = (zero || zb == ninf) ? 0.0 : ea * (za - zb);
                    }
                    z[2] = fkl_sum(T, c);
                }
                ZA += z[0];
                ZB += z[1];
                S += z[2];
            } else if (smode == FKL_S_ENT) {
                /* (the same fusion measured 4x slower here: GCC then leaves the loop scalar) */
                for (i = 0; i < c; i++) {
                    const double za = X[i] - mA;
                    const double ea = fkl_exp(za, full, &bad);
                    const double t = ea * za;
                    EA[i] = ea;
                    T[i] = (ea == 0.0) ? 0.0 : t;
                }
                if (bad) {
                    for (i = 0; i < c; i++) {
                        const double za = X[i] - mA, ea = fkl_exp_slow(za);
                        EA[i] = ea;
                        T[i] = (ea == 0.0) ? 0.0 : ea * za;
                    }
                }
                ZA += fkl_sum(EA, c);
                S += fkl_sum(T, c);
            } else {
                /* keep (JSD): the exps go straight into the row's scratch, with the shifts
                 * used for the chunk, for pass 2 to rescale instead of recomputing them */
                double *ea = keep ? keep + off : EA;
                double *eb = keep ? keep + A->V + off : EB;
                if (keep) {
                    keep[2 * A->V + off / FKL_CHUNK] = mA;
                    keep[2 * A->V + fkl_nchunks(A->V) + off / FKL_CHUNK] = mB;
                }
                if (wa) {
                    for (i = 0; i < c; i++) ea[i] = fkl_exp(X[i] - mA, full, &bad);
                }
                if (wb) {
                    for (i = 0; i < c; i++) eb[i] = fkl_exp(Y[i] - mB, full, &bad);
                }
                if (bad) {
                    if (wa)
                        for (i = 0; i < c; i++) ea[i] = fkl_exp_slow(X[i] - mA);
                    if (wb)
                        for (i = 0; i < c; i++) eb[i] = fkl_exp_slow(Y[i] - mB);
                }
                if (wa) ZA += fkl_sum(ea, c);
                if (wb) ZB += fkl_sum(eb, c);
            }
        }
    }
    st->MA = MA;
    st->MB = MB;
    st->ZA = ZA;
    st->ZB = ZB;
    st->S = S;
    st->XI = XI;
}

/* The passes are compiled once per exp series (full a constant in each copy): with full a
 * run-time flag GCC computes both series for every lane and selects (measured: float32 KL
 * slower with the shorter series than with the longer one). */
FK_CLONES
static void fkl_pass1(const fkl_args *A, ptrdiff_t row, int want, int smode, fkl_state *st,
                      double *keep) {
    if (A->f32)
        fkl_pass1_impl(A, row, want, smode, st, keep, FK_SERIES_LO);
    else
        fkl_pass1_impl(A, row, want, smode, st, keep, FK_SERIES_FULL);
}

/* ------------------------------------------------------------------ pass 2: JSD */
/* log(beta p + omb q) by libm, in log space where the sum underflows (beta or omb tiny) */
static double fkl_log_mix(double beta, double omb, double p, double q, double lp, double lq) {
    const double m = beta * p + omb * q;
    double u, v, hi, lo;
    if (!(m < FKL_DBL_MIN) || !((p > 0.0) || (q > 0.0))) return log(m);
    u = (beta > 0.0 && p > 0.0) ? log(beta) + lp : -(double)INFINITY;
    v = (omb > 0.0 && q > 0.0) ? log(omb) + lq : -(double)INFINITY;
    hi = u > v ? u : v;
    lo = u > v ? v : u;
    return hi + log1p(exp(lo - hi));
}

/* JSD = beta sum p (lp - lm) + (1 - beta) sum q (lq - lm), lp = (xa - MA) - log ZA, ...;
 * elements with lp == lq add exactly 0 (so identical rows give 0.0). Returns both sums, and
 * the total masses sum p, sum q (0 for a row without mass).
 * keep (pass 1's exps and shifts, see fkl_pass1_impl): p = e^(xa - m_k) * (e^(m_k - MA) /
 * ZA) with m_k the shift pass 1 used for chunk k, one product instead of an exp per entry
 * (no rounding of log ZA inside the exponent either). Without keep (log_probs mode): p = e^lp. */
FK_INLINE void fkl_pass2_jsd_impl(const fkl_args *A, ptrdiff_t row, double MA, double lZA,
                                   double ZA, double MB, double lZB, double ZB,
                                   const double *keep, double *SP, double *SQ, double *ZP,
                                   double *ZQ, const int full) {
    FK_ALIGN(64) double X[FKL_CHUNK], Y[FKL_CHUNK], TP[FKL_CHUNK], TQ[FKL_CHUNK],
        PP[FKL_CHUNK], QQ[FKL_CHUNK], BAD[FKL_CHUNK];
    const double beta = A->beta, omb = 1.0 - A->beta;
    const size_t isz = A->f32 ? sizeof(float) : sizeof(double);
    const char *pa = (const char *)A->a + (ptrdiff_t)isz * row * A->a0;
    const char *pb = (const char *)A->b + (ptrdiff_t)isz * row * A->b0;
    const ptrdiff_t nch = fkl_nchunks(A->V);
    double sp = 0.0, sq = 0.0, zp = 0.0, zq = 0.0;
    ptrdiff_t off, i;

    for (off = 0; off < A->V; off += FKL_CHUNK) {
        const ptrdiff_t c = (A->V - off) < FKL_CHUNK ? (A->V - off) : FKL_CHUNK;
        double fa = 0.0, fb = 0.0;
        int bad = 0;
        fkl_load(pa + (ptrdiff_t)isz * off * A->a1, A->f32, A->a1, c, A->inv_t, X);
        fkl_load(pb + (ptrdiff_t)isz * off * A->b1, A->f32, A->b1, c, A->inv_t, Y);
        if (keep) {
            const double *ka = keep + off, *kb = keep + A->V + off;
            const double sa = keep[2 * A->V + off / FKL_CHUNK];
            const double sb = keep[2 * A->V + nch + off / FKL_CHUNK];
            /* a shift above the row max is the 0 of a chunk of all -inf (exps all 0): its
             * factor e^(0 - MA) may overflow, and 0 * inf is no probability */
            fa = (sa > MA) ? 0.0 : exp(sa - MA) / ZA;
            fb = (sb > MB) ? 0.0 : exp(sb - MB) / ZB;
            for (i = 0; i < c; i++) {
                PP[i] = ka[i] * fa;
                QQ[i] = kb[i] * fb;
            }
        } else {
            for (i = 0; i < c; i++) {
                const double lp = (X[i] - MA) - lZA, lq = (Y[i] - MB) - lZB;
                PP[i] = fkl_exp(lp, full, &bad);
                QQ[i] = fkl_exp(lq, full, &bad);
            }
        }
        /* the lanes needing libm are flagged in a buffer and counted after the loop: GCC
         * does not vectorize this loop with an OR-reduction of the flags */
        for (i = 0; i < c; i++) {
            int lane_bad = 0;
            const double lp = (X[i] - MA) - lZA, lq = (Y[i] - MB) - lZB;
            const double p = PP[i], q = QQ[i];
            const double m = beta * p + omb * q;
            const double lm = fkl_log(m, &lane_bad, full);
            const double tp = p * (lp - lm), tq = q * (lq - lm);
            /* m underflowed (a tiny beta or 1 - beta): log M is taken in log space */
            lane_bad |= (m < FKL_DBL_MIN) & ((lp >= FKL_EXP_ZERO) | (lq >= FKL_EXP_ZERO));
            BAD[i] = lane_bad ? 1.0 : 0.0;
            const int same = (lp == lq);
            /* p == 0 exactly where lp < EXP_ZERO (other lanes that round to 0 are flagged);
             * tested on lp, not p: GCC does not vectorize a select on a test of a select */
            TP[i] = ((lp < FKL_EXP_ZERO) | same) ? 0.0 : tp;
            TQ[i] = ((lq < FKL_EXP_ZERO) | same) ? 0.0 : tq;
        }
        bad |= fkl_sum(BAD, c) != 0.0;
        if (bad) {
            for (i = 0; i < c; i++) {
                const double lp = (X[i] - MA) - lZA, lq = (Y[i] - MB) - lZB;
                const double p = keep ? keep[off + i] * fa : exp(lp);
                const double q = keep ? keep[A->V + off + i] * fb : exp(lq);
                const double lm = fkl_log_mix(beta, omb, p, q, lp, lq);
                const int same = (lp == lq);
                PP[i] = p;
                QQ[i] = q;
                TP[i] = ((p == 0.0) | same) ? 0.0 : p * (lp - lm);
                TQ[i] = ((q == 0.0) | same) ? 0.0 : q * (lq - lm);
            }
        }
        sp += fkl_sum(TP, c);
        sq += fkl_sum(TQ, c);
        zp += fkl_sum(PP, c);
        zq += fkl_sum(QQ, c);
    }
    *SP = sp;
    *SQ = sq;
    *ZP = zp;
    *ZQ = zq;
}

FK_CLONES
static void fkl_pass2_jsd(const fkl_args *A, ptrdiff_t row, double MA, double lZA, double ZA,
                          double MB, double lZB, double ZB, const double *keep, double *SP,
                          double *SQ, double *ZP, double *ZQ) {
    /* log_probs mode takes unnormalised rows as they come (p may be >> 1, where the first-order
     * parts of the two sums cancel): the full series there */
    if (A->f32 && !A->log_probs)
        fkl_pass2_jsd_impl(A, row, MA, lZA, ZA, MB, lZB, ZB, keep, SP, SQ, ZP, ZQ, FK_SERIES_LO);
    else
        fkl_pass2_jsd_impl(A, row, MA, lZA, ZA, MB, lZB, ZB, keep, SP, SQ, ZP, ZQ,
                           FK_SERIES_FULL);
}

/* ------------------------------------------------------------------ gradients */
/* E[i] = e^((X[i] - M) - l), branch-free, with the libm fix-up of the rare lanes */
FK_INLINE void fkl_exp_chunk(const double *FK_RESTRICT X, double M, double l, ptrdiff_t c,
                             double *FK_RESTRICT E, const int full) {
    ptrdiff_t i;
    int bad = 0;
    for (i = 0; i < c; i++) E[i] = fkl_exp((X[i] - M) - l, full, &bad);
    if (bad)
        for (i = 0; i < c; i++) E[i] = exp((X[i] - M) - l);
}

/* k * T[i] into row `row` of a C-contiguous [rows, V] gradient, columns off..off+c */
FK_INLINE void fkl_put_grad(const fkl_args *A, void *g, ptrdiff_t row, ptrdiff_t off,
                            ptrdiff_t c, const double *T, double k) {
    if (A->f32)
        fk_put_f32((float *)g + row * A->V + off, c, T, NULL, k, 1);
    else
        fk_put_f64((double *)g + row * A->V + off, c, T, NULL, k, 1);
}

/* The write pass of the gradients (docs/logits_math.md), k = rowscale * inv_t, with p =
 * e^lp, q = e^lq, lp = (xa - MA) - lZA, lq = (xb - MB) - lZB and K the op's row sums:
 *   KL:  d/dx = p (lp - lq - K),  d/dy = q - p
 *   JSD: d/dx = beta p (lp - lm - K),  d/dy = (1 - beta) q (lq - lm - KQ)  (lp == lq: 0)
 *   ENT: d/dx = -p (lp + K)
 *   TOKEN: d/dy = -q (the caller adds k at the token)
 * An entry whose probability is 0 gives exactly 0. */
FK_INLINE void fkl_pass_grad_impl(const fkl_args *A, ptrdiff_t row, int gop, double MA,
                                  double lZA, double MB, double lZB, double K, double KQ,
                                  double k, const int full) {
    FK_ALIGN(64) double X[FKL_CHUNK], Y[FKL_CHUNK], EP[FKL_CHUNK], EQ[FKL_CHUNK],
        TA[FKL_CHUNK], TB[FKL_CHUNK];
    const double beta = A->beta, omb = 1.0 - A->beta;
    const int wa = A->grad != NULL && gop != FKL_TOKEN;
    const int wb = A->grad_b != NULL && gop != FKL_ENT;
    const int ua = gop != FKL_TOKEN, ub = gop != FKL_ENT;
    /* q itself is needed by every op on b but KL's d/da alone (which reads only y) */
    const int uq = ub && !(gop == FKL_KL && !wb);
    const size_t isz = A->f32 ? sizeof(float) : sizeof(double);
    const char *pa = (const char *)A->a + (ptrdiff_t)isz * row * A->a0;
    const char *pb = (const char *)A->b + (ptrdiff_t)isz * row * A->b0;
    ptrdiff_t off, i;

    for (off = 0; off < A->V; off += FKL_CHUNK) {
        const ptrdiff_t c = (A->V - off) < FKL_CHUNK ? (A->V - off) : FKL_CHUNK;
        if (ua) {
            fkl_load(pa + (ptrdiff_t)isz * off * A->a1, A->f32, A->a1, c, A->inv_t, X);
            fkl_exp_chunk(X, MA, lZA, c, EP, full);
        }
        if (ub) fkl_load(pb + (ptrdiff_t)isz * off * A->b1, A->f32, A->b1, c, A->inv_t, Y);
        if (uq) fkl_exp_chunk(Y, MB, lZB, c, EQ, full);
        if (gop == FKL_ENT) {
            for (i = 0; i < c; i++) {
                const double p = EP[i];
                TA[i] = (p == 0.0) ? 0.0 : -p * (((X[i] - MA) - lZA) + K);
            }
        } else if (gop == FKL_KL) {
            if (wa) {
                for (i = 0; i < c; i++) {
                    const double p = EP[i];
                    const double d = ((X[i] - MA) - lZA) - ((Y[i] - MB) - lZB);
                    TA[i] = (p == 0.0) ? 0.0 : p * (d - K);
                }
            }
            if (wb)
                for (i = 0; i < c; i++) TB[i] = EQ[i] - EP[i];
        } else if (gop == FKL_TOKEN) {
            for (i = 0; i < c; i++) TB[i] = -EQ[i];
        } else if (beta == 0.0 || beta == 1.0) { /* JSD_0, JSD_1 are 0 for every input */
            for (i = 0; i < c; i++) TA[i] = TB[i] = 0.0;
        } else {
            int bad = 0;
            for (i = 0; i < c; i++) {
                const double p = EP[i], q = EQ[i];
                const double lp = (X[i] - MA) - lZA, lq = (Y[i] - MB) - lZB;
                const double m = beta * p + omb * q;
                const double lm = fkl_log(m, &bad, full);
                const int same = (lp == lq);
                const double dp = same ? 0.0 : lp - lm, dq = same ? 0.0 : lq - lm;
                bad |= (m < FKL_DBL_MIN) & ((p > 0.0) | (q > 0.0));
                TA[i] = (p == 0.0) ? 0.0 : beta * p * (dp - K);
                TB[i] = (q == 0.0) ? 0.0 : omb * q * (dq - KQ);
            }
            if (bad) {
                for (i = 0; i < c; i++) {
                    const double p = EP[i], q = EQ[i];
                    const double lp = (X[i] - MA) - lZA, lq = (Y[i] - MB) - lZB;
                    const double lm = fkl_log_mix(beta, omb, p, q, lp, lq);
                    const int same = (lp == lq);
                    const double dp = same ? 0.0 : lp - lm, dq = same ? 0.0 : lq - lm;
                    TA[i] = (p == 0.0) ? 0.0 : beta * p * (dp - K);
                    TB[i] = (q == 0.0) ? 0.0 : omb * q * (dq - KQ);
                }
            }
        }
        if (wa) fkl_put_grad(A, A->grad, row, off, c, TA, k);
        if (wb) fkl_put_grad(A, A->grad_b, row, off, c, TB, k);
    }
}

FK_CLONES
static void fkl_pass_grad(const fkl_args *A, ptrdiff_t row, int gop, double MA, double lZA,
                          double MB, double lZB, double K, double KQ, double k) {
    if (A->f32)
        fkl_pass_grad_impl(A, row, gop, MA, lZA, MB, lZB, K, KQ, k, FK_SERIES_LO);
    else
        fkl_pass_grad_impl(A, row, gop, MA, lZA, MB, lZB, K, KQ, k, FK_SERIES_FULL);
}

/* the wanted gradient rows set to v (0: rowscale 0 or an ignored token; NaN: a NaN row) */
static void fkl_fill_grad(const fkl_args *A, ptrdiff_t row, int gop, double v) {
    ptrdiff_t i;
    void *gs[2];
    int n;
    gs[0] = (gop == FKL_TOKEN) ? NULL : A->grad;
    gs[1] = (gop == FKL_ENT) ? NULL : A->grad_b;
    for (n = 0; n < 2; n++) {
        if (!gs[n]) continue;
        if (A->f32) {
            float *g = (float *)gs[n] + row * A->V;
            for (i = 0; i < A->V; i++) g[i] = (float)v;
        } else {
            double *g = (double *)gs[n] + row * A->V;
            for (i = 0; i < A->V; i++) g[i] = v;
        }
    }
}

/* ------------------------------------------------------------------ one row */
/* KL from pass 1's state: NaN for a row without mass; +inf when an entry with Q = 0 still has P = e^(x - MA - log ZA)
 * > 0 at the row's final max (the reference's test), NaN kept. */
static double fkl_kl_value(const fkl_args *A, const fkl_state *st) {
    const double lza = A->log_probs ? 0.0 : log(st->ZA);
    const double val = A->log_probs ? st->S : st->S / st->ZA - log(st->ZA / st->ZB);
    if (st->ZA == 0.0 || st->ZB == 0.0) return NAN; /* a row without probability mass */
    if (st->XI > -(double)INFINITY && val == val && exp((st->XI - st->MA) - lza) > 0.0)
        return (double)INFINITY;
    return val;
}

/* FKL_GRAD: the value of op A->gop for the row, and rowscale * inv_t * its gradients: pass 1
 * (maxima, normalisers and the KL / entropy sum), for JSD pass 2 (its two sums), then the
 * write pass. */
static void fkl_grad_row(const fkl_args *A, ptrdiff_t row) {
    fkl_state st;
    const int gop = A->gop;
    const double rs = A->rowscale[row];
    double val, K = 0.0, KQ = 0.0, lZA = 0.0, lZB = 0.0;

    if (gop == FKL_TOKEN) {
        const int64_t tok = A->tokens[row];
        double lq;
        if (tok == A->ignore_index) {
            A->out[row] = 0.0;
            fkl_fill_grad(A, row, gop, 0.0);
            return;
        }
        fkl_pass1(A, row, 2, FKL_S_NONE, &st, NULL);
        {
            const size_t isz = A->f32 ? sizeof(float) : sizeof(double);
            const char *pb = (const char *)A->b + (ptrdiff_t)isz * (row * A->b0 + tok * A->b1);
            const double xb = A->f32 ? (double)*(const float *)pb : *(const double *)pb;
            lZB = log(st.ZB);
            lq = (xb * A->inv_t - st.MB) - lZB;
        }
        A->out[row] = lq;
        if (rs == 0.0 || lq != lq) {
            fkl_fill_grad(A, row, gop, rs == 0.0 ? 0.0 : NAN);
            return;
        }
        fkl_pass_grad(A, row, gop, 0.0, 0.0, st.MB, lZB, 0.0, 0.0, rs * A->inv_t);
        {
            double one = 1.0 - exp(lq);
            fkl_put_grad(A, A->grad_b, row, tok, 1, &one, rs * A->inv_t);
        }
        return;
    }
    if (gop == FKL_ENT) {
        fkl_pass1(A, row, 1, FKL_S_ENT, &st, NULL);
        val = log(st.ZA) - st.S / st.ZA;
        if (st.ZA == 0.0) val = NAN;
        K = val;
    } else if (gop == FKL_KL) {
        fkl_pass1(A, row, 3, FKL_S_KL, &st, NULL);
        K = fkl_kl_value(A, &st);
        val = (K < 0.0) ? 0.0 : K;
    } else { /* FKL_JSD */
        double SP, SQ, ZP, ZQ;
        /* pass 1 keeps its exps as in fkl_row, so the value has the bits of FKL_JSD's */
        double *keep = A->scratch
            ? A->scratch + (ptrdiff_t)fk_thread_num() * fkl_scratch_doubles(A->V) : NULL;
        fkl_pass1(A, row, 3, FKL_S_NONE, &st, keep);
        lZA = log(st.ZA);
        lZB = log(st.ZB);
        if (!(st.ZA > 0.0 && st.ZB > 0.0 && st.ZA <= FKL_DBL_MAX && st.ZB <= FKL_DBL_MAX &&
              st.MA == st.MA && st.MB == st.MB))
            keep = NULL;
        fkl_pass2_jsd(A, row, st.MA, lZA, st.ZA, st.MB, lZB, st.ZB, keep, &SP, &SQ, &ZP, &ZQ);
        val = (A->beta == 0.0 ? 0.0 : A->beta * SP) + (A->beta == 1.0 ? 0.0 : (1.0 - A->beta) * SQ);
        val = (val < 0.0) ? 0.0 : val;
        if ((A->beta == 0.0 || A->beta == 1.0) && val == val) val = 0.0;
        if (ZP == 0.0 || ZQ == 0.0) val = NAN;
        K = SP;
        KQ = SQ;
    }
    A->out[row] = val;
    if (rs == 0.0 || val != val) {
        fkl_fill_grad(A, row, gop, rs == 0.0 ? 0.0 : NAN);
        return;
    }
    lZA = log(st.ZA);
    lZB = (gop == FKL_ENT) ? 0.0 : log(st.ZB);
    fkl_pass_grad(A, row, gop, st.MA, lZA, st.MB, lZB, K, KQ, rs * A->inv_t);
}

static void fkl_row(const fkl_args *A, ptrdiff_t row) {
    fkl_state st;
    double val;
    const int op = A->op;

    if (op == FKL_TOKEN) {
        const int64_t tok = A->tokens[row];
        double xb;
        if (tok == A->ignore_index) {
            A->out[row] = 0.0;
            return;
        }
        fkl_pass1(A, row, 2, FKL_S_NONE, &st, NULL);
        {
            const size_t isz = A->f32 ? sizeof(float) : sizeof(double);
            const char *pb = (const char *)A->b + (ptrdiff_t)isz * (row * A->b0 + tok * A->b1);
            xb = A->f32 ? (double)*(const float *)pb : *(const double *)pb;
        }
        A->out[row] = (xb * A->inv_t - st.MB) - log(st.ZB);
        return;
    }
    if (op == FKL_GRAD) {
        fkl_grad_row(A, row);
        return;
    }
    if (A->active && !A->active[row]) {
        A->out[row] = 0.0;
        return;
    }
    /* a row without probability mass (all -inf, also as log-probabilities) gives NaN */
    if (op == FKL_ENT) {
        fkl_pass1(A, row, 1, FKL_S_ENT, &st, NULL);
        val = A->log_probs ? -st.S : log(st.ZA) - st.S / st.ZA;
        if (st.ZA == 0.0) val = NAN;
    } else if (op == FKL_KL) {
        fkl_pass1(A, row, 3, FKL_S_KL, &st, NULL);
        val = fkl_kl_value(A, &st);
        val = (val < 0.0) ? 0.0 : val;
    } else if (op == FKL_JSD) {
        double SP, SQ, ZP, ZQ, lZA = 0.0, lZB = 0.0;
        double *keep = NULL;
        if (A->log_probs) {
            st.MA = st.MB = 0.0;
            st.ZA = st.ZB = 1.0;
        } else {
            if (A->scratch)
                keep = A->scratch + (ptrdiff_t)fk_thread_num() * fkl_scratch_doubles(A->V);
            fkl_pass1(A, row, 3, FKL_S_NONE, &st, keep);
            lZA = log(st.ZA);
            lZB = log(st.ZB);
            /* rows without mass, or NaN: the exps are recomputed (NaN / inf propagate as
             * in the reference) */
            if (!(st.ZA > 0.0 && st.ZB > 0.0 && st.ZA <= FKL_DBL_MAX && st.ZB <= FKL_DBL_MAX &&
                  st.MA == st.MA && st.MB == st.MB))
                keep = NULL;
        }
        fkl_pass2_jsd(A, row, st.MA, lZA, st.ZA, st.MB, lZB, st.ZB, keep, &SP, &SQ, &ZP, &ZQ);
        /* a zero weight drops its sum (KL(P||Q) may be +inf where beta = 0) */
        val = (A->beta == 0.0 ? 0.0 : A->beta * SP) + (A->beta == 1.0 ? 0.0 : (1.0 - A->beta) * SQ);
        val = (val < 0.0) ? 0.0 : val;
        /* JSD_0 = KL(Q||Q), JSD_1 = KL(P||P): 0 unless NaN */
        if ((A->beta == 0.0 || A->beta == 1.0) && val == val) val = 0.0;
        if (ZP == 0.0 || ZQ == 0.0) val = NAN;
    } else { /* an unknown op (_logits.run rejects it first): NaN, never another op */
        val = NAN;
    }
    A->out[row] = val;
}

#endif /* FASTKL_LOGITS_H */
