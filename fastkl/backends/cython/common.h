/* What both Cython headers share (mc.h: Monte Carlo terms; logits.h: the
 * logits ops): includes, inlining/alignment macros, function multiversioning and the
 * OpenMP queries. */
#ifndef FASTKL_COMMON_H
#define FASTKL_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_MSC_VER)
#define FK_INLINE static __forceinline
#define FK_RESTRICT __restrict
#define FK_ALIGN(n) __declspec(align(n))
#elif defined(__GNUC__)
#define FK_INLINE static inline __attribute__((always_inline))
#define FK_RESTRICT __restrict__
#define FK_ALIGN(n) __attribute__((aligned(n)))
#else
#define FK_INLINE static inline
#define FK_RESTRICT
#define FK_ALIGN(n)
#endif

/* ------------------------------------------------------------------ dtype instances */
/* The loops that differ only in the element type are written once, in typed.h, and
 * instantiated here per type: FK_TYPED(fk_get) -> fk_get_f32 / fk_get_f64 / fk_get_u8. */
#define FK_CAT2_(a, b) a##_##b
#define FK_CAT2(a, b) FK_CAT2_(a, b)
#define FK_TYPED(name) FK_CAT2(name, FK_SFX)

#define FK_T float
#define FK_SFX f32
#include "typed.h"
#undef FK_T
#undef FK_SFX

#define FK_T double
#define FK_SFX f64
#include "typed.h"
#undef FK_T
#undef FK_SFX

#define FK_T uint8_t /* the uint8 mask: only fk_get_u8 is used */
#define FK_SFX u8
#include "typed.h"
#undef FK_T
#undef FK_SFX

/* The float32 or float64 instance of a typed.h function, by a run-time flag (a statement). */
#define FK_BY_DTYPE(f32, fn, ...)                                                              \
    do {                                                                                       \
        if (f32)                                                                               \
            fn##_f32(__VA_ARGS__);                                                             \
        else                                                                                   \
            fn##_f64(__VA_ARGS__);                                                             \
    } while (0)

/* ------------------------------------------------------------------ exp */
#define FK_LOG2E 1.4426950408889634074
#define FK_SHIFT 6755399441055744.0 /* 1.5 * 2**52 */
#define FK_LN2_HI 6.93147180369123816490e-01 /* 0x3fe62e42fee00000: trailing zero bits */
#define FK_LN2_LO 1.90821492927058770002e-10

FK_INLINE double fk_from_bits(uint64_t u) {
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

FK_INLINE uint64_t fk_to_bits(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

/* float32 <-> its bits (mc.h: 16-bit widening; mc32.h: the lane range checks) */
FK_INLINE uint32_t fk_bits32(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

FK_INLINE float fk_from_bits32(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The two exp series, the value of every ``full`` flag of both headers: FK_SERIES_FULL for
 * float64 inputs, FK_SERIES_LO for float32 inputs (see fk_exp_series). */
enum { FK_SERIES_LO = 0, FK_SERIES_FULL = 1 };

/* P(r) = (e^r - 1 - r) / r^2 for |r| <= ln2/2 (the range-reduced exp of both headers,
 * docs/kernel_math.md). full: the Taylor series to 1/13! (float64, < 1e-16 relative). Else
 * (lo) a degree-5 minimax fit (Remez, relative error 2.7e-9 = 0.05 float32 ulp; for float32
 * inputs, whose results need 1e-6): two FMAs fewer than the Taylor series to 1/9! it
 * replaces. The numba kernels use the same coefficients (numba.common.M0..M5). ``full`` is a
 * compile-time constant or loop-invariant at every call site. */
FK_INLINE double fk_exp_series(double r, const int full) {
    double P;
    if (full) {
        P = 1.0 / 6227020800.0;
        P = P * r + 1.0 / 479001600.0;
        P = P * r + 1.0 / 39916800.0;
        P = P * r + 1.0 / 3628800.0;
        P = P * r + 1.0 / 362880.0;
        P = P * r + 1.0 / 40320.0;
        P = P * r + 1.0 / 5040.0;
        P = P * r + 1.0 / 720.0;
        P = P * r + 1.0 / 120.0;
        P = P * r + 1.0 / 24.0;
        P = P * r + 1.0 / 6.0;
        P = P * r + 0.5;
    } else {
        P = 0.00019857847267093069348;
        P = P * r + 0.0013933726747929464043;
        P = P * r + 0.0083333608728334880738;
        P = P * r + 0.04166646436477276519;
        P = P * r + 0.16666666531201065386;
        P = P * r + 0.50000000134956292519;
    }
    return P;
}

/* The range-reduced exp of both headers (docs/kernel_math.md): e^x = s (1 + r + q) with
 * s = 2^k, |r| <= ln2/2 and q = e^r - 1 - r, for finite |x| <= 700 (callers keep x there). */
FK_INLINE void fk_exp_parts(double x, const int full, double *s, double *r, double *q) {
    const double t = x * FK_LOG2E + FK_SHIFT;
    const double kf = t - FK_SHIFT;
    const double rr = (x - kf * FK_LN2_HI) - kf * FK_LN2_LO;
    /* Horner; Estrin measured no faster here: the loops are bound by FMA throughput */
    *q = (rr * rr) * fk_exp_series(rr, full);
    *r = rr;
    /* 2**k: the low mantissa bits of t hold k (+2**51); shift them into the exponent */
    *s = fk_from_bits((fk_to_bits(t) + (uint64_t)1023) << 52);
}

/* ------------------------------------------------------------------ multiversioning */
/* FASTKL_CLONES (defined by setup.py's build_ext after a test compile, for every extension):
 * 2 = x86-64-v4 / x86-64-v3 (AVX-512 / AVX2+FMA) / baseline, 1 = avx512f / avx2 / baseline,
 * 0 or undefined = one portable version. */
#if defined(FASTKL_CLONES) && FASTKL_CLONES == 2
/* x86-64-v4 = AVX-512 F/BW/CD/DQ/VL (+FMA), x86-64-v3 = AVX2 + FMA + BMI2 */
#define FK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(FASTKL_CLONES) && FASTKL_CLONES == 1
#define FK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FK_CLONES
#endif

/* Which clone the loader's resolver picks (it tries them in this same order). */
static inline const char *fk_isa(void) {
#if defined(FASTKL_CLONES) && FASTKL_CLONES == 2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "avx512f";
    if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
    return "default";
#elif defined(FASTKL_CLONES) && FASTKL_CLONES == 1
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "avx512f";
    if (__builtin_cpu_supports("avx2")) return "avx2";
    return "default";
#else
    return "default";
#endif
}

static inline int fk_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int fk_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* The calling thread's number inside a parallel region (0 outside one, or without OpenMP). */
static inline int fk_thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#endif /* FASTKL_COMMON_H */
