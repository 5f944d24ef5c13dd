/* Prototype C kernels for issue 12: float32 term lanes, float64 block accumulators.
 * Same algorithm as f32_kernels.py (read its docstring); built by f32_lanes.py three ways:
 * portable (setup.py's flags, one baseline version), clones (FK_CLONES: target_clones
 * x86-64-v4 / x86-64-v3 / default, as setup.py's FASTKL_CLONES=2) and -march=native.
 * Plain a*b + c everywhere: -ffp-contract=fast makes FMAs where the clone has them; the
 * formulas give the same bits for the parts that matter without FMA (s is a power of 2). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 4096
#define SUB 512

#ifdef FK_CLONES
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INL static inline __attribute__((always_inline))

INL uint32_t bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
INL float from_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

#define LOG2E 1.44269504088896341f
#define SHIFT 12582912.0f
#define LN2_HI 0.693145751953125f
#define LN2_LO 1.428606765330187045e-06f
#define NEG_CLAMP -87.0f
#define FAST_BITS 0x42AE0000u

INL void exp_parts(float x, float *s, float *r, float *q) {
    float t = x * LOG2E + SHIFT;
    float kf = t - SHIFT;
    float rr = x - kf * LN2_HI;
    rr = rr - kf * LN2_LO;
    float p = 0.00019857847267093069348f;
    p = p * rr + 0.0013933726747929464043f;
    p = p * rr + 0.0083333608728334880738f;
    p = p * rr + 0.04166646436477276519f;
    p = p * rr + 0.16666666531201065386f;
    p = p * rr + 0.50000000134956292519f;
    *q = (rr * rr) * p;
    *r = rr;
    *s = from_bits((bits(t) + 127u) << 23);
}

INL float k3_fused(float l) {
    float lc = (l < NEG_CLAMP) ? NEG_CLAMP : l;
    float s, r, q;
    exp_parts(lc, &s, &r, &q);
    return s * q + ((s * r + (s - 1.0f)) - l);
}

INL float k3_split(float l) {
    float p = 1.0f / 39916800.0f;
    p = p * l + 1.0f / 3628800.0f;
    p = p * l + 1.0f / 362880.0f;
    p = p * l + 1.0f / 40320.0f;
    p = p * l + 1.0f / 5040.0f;
    p = p * l + 1.0f / 720.0f;
    p = p * l + 1.0f / 120.0f;
    p = p * l + 1.0f / 24.0f;
    p = p * l + 1.0f / 6.0f;
    p = p * l + 0.5f;
    float small = (l * l) * p;
    float lc = (l < NEG_CLAMP) ? NEG_CLAMP : l;
    float s, r, q;
    exp_parts(lc, &s, &r, &q);
    float e = s * (r + q) + s;
    float big = (e - 1.0f) - l;
    return (fabsf(l) <= 1.0f) ? small : big;
}

INL float rk3_fused(float l) {
    float lc = (l < NEG_CLAMP) ? NEG_CLAMP : l;
    float s, r, q;
    exp_parts(lc, &s, &r, &q);
    float E = s * q + ((s * r + (s - 1.0f)) - l);
    float R = s * (r + q) + s;
    float a = (l - 1.0f) * E + l * l;
    float b = R * (l - 1.0f) + 1.0f;
    return (l >= -1.0f) ? a : b;
}

static double term_f64(double l, int est) {
    switch (est) {
    case 0: return -l;
    case 1: return 0.5 * l * l;
    case 2: return isinf(l) ? INFINITY : expm1(l) - l;
    default:
        if (l == INFINITY) return INFINITY;
        if (l == -INFINITY) return 1.0;
        return (l < -1.0) ? exp(l) * (l - 1.0) + 1.0 : l * l + (l - 1.0) * (expm1(l) - l);
    }
}

/* one vectorized term loop per estimator; returns max |bits(l)| */
#define TERM_LOOP(EXPR)                                                         \
    for (ptrdiff_t i = 0; i < m; i++) {                                         \
        float l = p[i] - q[i];                                                  \
        t[i] = EXPR;                                                            \
        uint32_t b = bits(l) & 0x7fffffffu;                                     \
        mx = b > mx ? b : mx;                                                   \
    }

INL uint32_t terms(int est, const float *restrict q, const float *restrict p,
                   float *restrict t, ptrdiff_t m) {
    uint32_t mx = 0;
    switch (est) {
    case 0: TERM_LOOP(-l) break;
    case 1: TERM_LOOP(0.5f * l * l) break;
    case 2: TERM_LOOP(k3_fused(l)) break;
    case 3: TERM_LOOP(k3_split(l)) break;
    default: TERM_LOOP(rk3_fused(l)) break;
    }
    return mx;
}

/* acc[k] += (double)(pairwise float32 sum of 8 terms t[g + k + 8j]) per run of 64 */
INL void sum_runs(const float *restrict t, ptrdiff_t m, double *restrict acc) {
    ptrdiff_t m64 = m - m % 64, i;
    for (ptrdiff_t g = 0; g < m64; g += 64)
        for (int k = 0; k < 8; k++) {
            float a = (t[g + k] + t[g + 8 + k]) + (t[g + 16 + k] + t[g + 24 + k]);
            float b = (t[g + 32 + k] + t[g + 40 + k]) + (t[g + 48 + k] + t[g + 56 + k]);
            acc[k] += (double)(a + b);
        }
    for (i = m64; i < m; i++) acc[i % 8] += (double)t[i];
}

INL void sum_f64(const float *restrict t, ptrdiff_t m, double *restrict acc) {
    ptrdiff_t m8 = m - m % 8, i;
    for (ptrdiff_t g = 0; g < m8; g += 8)
        for (int k = 0; k < 8; k++) acc[k] += (double)t[g + k];
    for (i = m8; i < m; i++) acc[i % 8] += (double)t[i];
}

/* The fused shape (runs == 2): 8 runs of 64 lanes per sub-chunk; each term is added into a
 * float32 lane sum u[k] in the loop that computes it, u is widened into acc64 after the
 * sub-chunk. Returns max |bits(l)|. */
#define LANES64(EXPR)                                                           \
    for (int r = 0; r < 8; r++)                                                 \
        for (int k = 0; k < 64; k++) {                                          \
            float l = p[r * 64 + k] - q[r * 64 + k];                            \
            float t = EXPR;                                                     \
            tb[r * 64 + k] = t;                                                 \
            u[k] += t;                                                          \
            uint32_t b = bits(l) & 0x7fffffffu;                                 \
            mx = b > mx ? b : mx;                                               \
        }

INL uint32_t terms64(int est, const float *restrict q, const float *restrict p,
                     float *restrict tb, float *restrict u) {
    uint32_t mx = 0;
    switch (est) {
    case 0: LANES64(-l) break;
    case 1: LANES64(0.5f * l * l) break;
    case 2: LANES64(k3_fused(l)) break;
    case 3: LANES64(k3_split(l)) break;
    default: LANES64(rk3_fused(l)) break;
    }
    return mx;
}

INL double fold8(const double *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* est: 0 k1, 1 k2, 2 k3 fused, 3 k3 split, 4 reverse k3 fused (real est code 2 for 2, 3) */
CLONES void block_partials(int est, int runs, const float *q, const float *p, ptrdiff_t m,
                           int want_m2, double *out) {
    float tb[BLOCK] __attribute__((aligned(64)));
    float u[64] __attribute__((aligned(64)));
    double acc[8] __attribute__((aligned(64))) = {0};
    double acc64[64] __attribute__((aligned(64))) = {0};
    int fest = est == 0 ? 0 : est == 1 ? 1 : est <= 3 ? 2 : 4;
    ptrdiff_t nbad = 0;
    int dirty = 0;
    for (ptrdiff_t o = 0; o < m; o += SUB) {
        ptrdiff_t mm = m - o < SUB ? m - o : SUB;
        uint32_t mx;
        if (runs == 2 && mm == SUB) {
            for (int k = 0; k < 64; k++) u[k] = 0.0f;
            mx = terms64(est, q + o, p + o, tb + o, u);
        } else {
            mx = terms(est, q + o, p + o, tb + o, mm);
        }
        const uint32_t fast_bits = est == 4 ? 0x42A00000u : FAST_BITS; /* 80.0f : 87.0f */
        const float fast = est == 4 ? 80.0f : 87.0f;
        if (mx > fast_bits) {
            dirty = 1;
            for (ptrdiff_t i = 0; i < mm; i++) {
                float l32 = p[o + i] - q[o + i];
                double t = fabsf(l32) <= fast ? (double)tb[o + i]
                                               : term_f64((double)p[o + i] - (double)q[o + i], fest);
                if (t != t) {
                    nbad++;
                    tb[o + i] = NAN;
                } else {
                    acc[i % 8] += t;
                    tb[o + i] = (float)t;
                }
            }
        } else if (runs == 2 && mm == SUB) {
            for (int k = 0; k < 64; k++) acc64[k] += (double)u[k];
        } else if (runs) {
            sum_runs(tb + o, mm, acc);
        } else {
            sum_f64(tb + o, mm, acc);
        }
    }
    for (int w = 32; w >= 1; w /= 2) /* fixed tree over the 64 lanes, then the 8 */
        for (int k = 0; k < w; k++) acc64[k] += acc64[k + w];
    double S = fold8(acc) + acc64[0], W = (double)(m - nbad), M2 = 0.0;
    if (want_m2 && W > 0) {
        double mean = S / W;
        if (dirty) {
            const float fast = est == 4 ? 80.0f : 87.0f;
            for (ptrdiff_t i = 0; i < m; i++) { /* float64 terms again for fix-up lanes */
                double t = tb[i];
                if (!(fabsf(p[i] - q[i]) <= fast)) t = term_f64((double)p[i] - (double)q[i], fest);
                if (t == t) M2 += (t - mean) * (t - mean);
            }
        } else {
            double a[8] = {0};
            ptrdiff_t m8 = m - m % 8, i;
            for (ptrdiff_t g = 0; g < m8; g += 8)
                for (int k = 0; k < 8; k++) {
                    double d = (double)tb[g + k] - mean;
                    a[k] += d * d;
                }
            for (i = m8; i < m; i++) {
                double d = (double)tb[i] - mean;
                a[i % 8] += d * d;
            }
            M2 = fold8(a);
        }
    }
    out[0] = W;
    out[1] = S;
    out[2] = M2;
}

/* part: [nblk, 3] */
void f32_partials(int est, int runs, const float *q, const float *p, ptrdiff_t n, int want_m2,
                  double *part, int nthreads) {
    ptrdiff_t nblk = n > 0 ? (n + BLOCK - 1) / BLOCK : 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
    for (ptrdiff_t b = 0; b < nblk; b++) {
        ptrdiff_t j0 = b * BLOCK, m = n - j0 < BLOCK ? n - j0 : BLOCK;
        block_partials(est, runs, q + j0, p + j0, m, want_m2, part + 3 * b);
    }
}

/* fast-path terms of float32 l (no fix-up), for the accuracy check */
CLONES void f32_terms(int est, const float *l, float *out, ptrdiff_t n) {
    switch (est) {
    case 2: for (ptrdiff_t i = 0; i < n; i++) out[i] = k3_fused(l[i]); break;
    case 3: for (ptrdiff_t i = 0; i < n; i++) out[i] = k3_split(l[i]); break;
    default: for (ptrdiff_t i = 0; i < n; i++) out[i] = rk3_fused(l[i]); break;
    }
}
