/* gpu_test.h: what every kernel test shares: the skip when no GPU is
 * present (exit 77), seeded random inputs, device upload/download in bf16
 * or fp32, the relative error ||out - ref|| / ||ref|| against a named
 * tolerance with the first mismatches printed, and --bench timing with
 * CUDA events after a warm-up.
 *
 * Each test prints "ok NAME" / "not ok NAME" lines (tests/run.sh counts
 * them) and exits 1 when any check failed. */
#ifndef GPU_TEST_H
#define GPU_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "../../kernels/kernels.h"
#include "ops_ref.h"

/* Tolerances, named (METHOD: bf16 operands land between 1e-3 and 1e-2). */
#define TOL_EXACT 0.0         /* bit-identical */
#define TOL_F32 1e-5          /* fp32 arithmetic, different order */
#define TOL_BF16_OUT 8e-3     /* one rounding to bf16 of an fp32 result */
#define TOL_BF16_CHAIN 1e-2   /* bf16 operands through a product chain */

static int gt_failures;
static int gt_bench;
static uint64_t gt_rng = 0x243f6a8885a308d3ull;

/* Skips (exit 77) when there is no usable GPU; sets --bench. */
static inline void gt_init(const char *name, int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--bench"))
            gt_bench = 1;
    if (kn_device_count() < 1) {
        printf("skip %s: no CUDA device\n", name);
        exit(77);
    }
    if (kn_init(0) != 0) {
        printf("skip %s: CUDA device unusable\n", name);
        exit(77);
    }
}

static inline void gt_seed(uint64_t s) { gt_rng = s * 0x9e3779b97f4a7c15ull + 1; }

static inline uint64_t gt_u64(void)
{
    uint64_t z = (gt_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [-a, a). */
static inline float gt_uniform(float a)
{
    return ((float)(gt_u64() >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * a;
}

static inline float *gt_rand(int64_t n, float a)
{
    float *x = malloc((size_t)(n ? n : 1) * sizeof *x);
    for (int64_t i = 0; i < n; i++)
        x[i] = gt_uniform(a);
    return x;
}

/* Rounds every element through bf16 (the values a bf16 tensor holds). */
static inline void gt_round_bf16(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = ops_round_bf16(x[i]);
}

static inline void *gt_dev(size_t bytes)
{
    void *p = kn_malloc(bytes);
    kn_memset(p, 0xff, bytes, 0); /* poison: NaN in bf16 and fp32 */
    return p;
}

static inline kn_bf16 *gt_up_bf16(const float *x, int64_t n)
{
    uint16_t *h = malloc((size_t)(n ? n : 1) * 2);
    for (int64_t i = 0; i < n; i++)
        h[i] = ops_bf16_from_f32(x[i]);
    kn_bf16 *d = kn_malloc((size_t)(n ? n : 1) * 2);
    kn_memcpy_h2d(d, h, (size_t)n * 2, 0);
    kn_stream_sync(0);
    free(h);
    return d;
}

static inline float *gt_up_f32(const float *x, int64_t n)
{
    float *d = kn_malloc((size_t)(n ? n : 1) * 4);
    kn_memcpy_h2d(d, x, (size_t)n * 4, 0);
    kn_stream_sync(0);
    return d;
}

static inline void *gt_up(const void *x, size_t bytes)
{
    void *d = kn_malloc(bytes ? bytes : 1);
    kn_memcpy_h2d(d, x, bytes, 0);
    kn_stream_sync(0);
    return d;
}

static inline float *gt_down_bf16(const kn_bf16 *d, int64_t n)
{
    uint16_t *h = malloc((size_t)(n ? n : 1) * 2);
    float *x = malloc((size_t)(n ? n : 1) * sizeof *x);
    kn_memcpy_d2h(h, d, (size_t)n * 2, 0);
    for (int64_t i = 0; i < n; i++)
        x[i] = ops_f32_from_bf16(h[i]);
    free(h);
    return x;
}

static inline float *gt_down_f32(const float *d, int64_t n)
{
    float *x = malloc((size_t)(n ? n : 1) * sizeof *x);
    kn_memcpy_d2h(x, d, (size_t)n * 4, 0);
    return x;
}

/* ||out - ref|| / ||ref||; infinity when out has a NaN or an infinity. */
static inline double gt_rel_err(const float *out, const float *ref, int64_t n)
{
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(out[i]))
            return INFINITY;
        double d = (double)out[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    if (den == 0.0)
        return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

/* Checks out against ref with tolerance tol (named tol_name); on failure
 * prints the first elements that stand out (|d| > tol * rms(ref), or not
 * finite). */
static inline void gt_compare(const char *what, const float *out, const float *ref,
                       int64_t n, double tol, const char *tol_name)
{
    double err = gt_rel_err(out, ref, n);
    int pass = tol == 0.0 ? err == 0.0 : err <= tol;
    if (pass) {
        printf("ok %s (rel err %.2e <= %s %.0e)\n", what, err, tol_name, tol);
    } else {
        printf("not ok %s (rel err %.3e > %s %.1e)\n", what, err, tol_name, tol);
        double rms = 0.0;
        for (int64_t i = 0; i < n; i++)
            rms += (double)ref[i] * ref[i];
        rms = sqrt(rms / (n ? n : 1));
        int shown = 0;
        for (int64_t i = 0; i < n && shown < 8; i++) {
            double d = fabs((double)out[i] - ref[i]);
            if (!isfinite(out[i]) || d > tol * rms || (tol == 0.0 && d > 0)) {
                printf("#   [%lld] got %.6g want %.6g\n", (long long)i,
                       out[i], ref[i]);
                shown++;
            }
        }
        gt_failures++;
    }
    fflush(stdout);
}

static inline void gt_check(int cond, const char *what)
{
    printf("%s %s\n", cond ? "ok" : "not ok", what);
    if (!cond)
        gt_failures++;
    fflush(stdout);
}

/* Times fn(ctx) with CUDA events: `warm` runs, then `iters` timed runs one
 * by one; prints the median in microseconds, and the rate when work > 0
 * (bytes -> GB/s when is_bytes, else FLOP -> TFLOP/s). */
typedef void (*gt_fn)(void *ctx);

static inline int gt_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static inline void gt_time(const char *what, gt_fn fn, void *ctx, double work,
                    int is_bytes)
{
    enum { WARM = 5, ITERS = 30 };
    cudaEvent_t a, b;
    float ms[ITERS];
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int i = 0; i < WARM; i++)
        fn(ctx);
    for (int i = 0; i < ITERS; i++) {
        cudaEventRecord(a, 0);
        fn(ctx);
        cudaEventRecord(b, 0);
        cudaEventSynchronize(b);
        cudaEventElapsedTime(&ms[i], a, b);
    }
    qsort(ms, ITERS, sizeof ms[0], gt_cmp_float);
    double med = ms[ITERS / 2];
    if (work > 0)
        printf("# bench %s: %.1f us, %.1f %s\n", what, med * 1e3,
               is_bytes ? work / (med * 1e-3) / 1e9 : work / (med * 1e-3) / 1e12,
               is_bytes ? "GB/s" : "TFLOP/s");
    else
        printf("# bench %s: %.1f us\n", what, med * 1e3);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    fflush(stdout);
}

static inline int gt_done(void) { return gt_failures ? 1 : 0; }

/* A random document layout over n tokens: start[t] (first token of t's
 * document) and pos[t] = t - start[t], documents of length 1..maxlen. */
static inline void gt_docs(int32_t *start, int32_t *pos, int64_t n, int maxlen)
{
    int64_t t = 0;
    while (t < n) {
        int64_t len = 1 + (int64_t)(gt_u64() % (uint64_t)maxlen);
        if (len > n - t)
            len = n - t;
        for (int64_t i = 0; i < len; i++) {
            start[t + i] = (int32_t)t;
            if (pos)
                pos[t + i] = (int32_t)i;
        }
        t += len;
    }
}

#endif
