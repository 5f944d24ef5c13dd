/* What both Cython headers share (_fastkl_math.h: Monte Carlo terms; _fastkl_logits.h: the
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

#endif /* FASTKL_COMMON_H */
