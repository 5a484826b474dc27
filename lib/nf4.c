/* nf4.c: NF4 quantization and dequantization, bit-exact with bitsandbytes.
 *
 * Every floating-point step is the one bitsandbytes' CUDA kernels and torch
 * perform, in the same precision and order, because the goal is byte
 * identity, not just closeness:
 *   - block absmax: max |x| in fp32 (NaN ignored, as fmaxf);
 *   - the scale is the fp32 reciprocal 1/absmax, and each value is x * scale
 *     (the GPU's reciprocal is approximate; see nf4-quant(1), CAVEATS);
 *   - NF4 code = number of thresholds (midpoints of the code book, as fp32
 *     literals) strictly below the value: the same answer as bitsandbytes'
 *     comparison tree, computed by compare-and-count (SSE2, AVX2) or a
 *     binary search over a table (AVX-512), chosen at run time;
 *   - the double-quantization offset is torch's CUDA mean (its summation
 *     tree reproduced in nf4_torch_mean), the 8-bit absmax codes come from
 *     bitsandbytes' own binary search over the dynamic map (not "nearest":
 *     its search has quirks at the ends that we must share);
 *   - the dynamic map is built as torch builds it on the GPU (linspace with
 *     fused multiply-adds).
 * The file is compiled without floating-point contraction (no FMA) so that
 * a * b + c stays two roundings wherever bitsandbytes does two.
 *
 * Threads are plain pthreads that wait by blocking, never spinning: on a
 * shared 2-core machine OpenMP's spin-waits cost more than they gained.
 * Checkpoints are processed a whole weight per thread, in a pipeline
 * ahead of the (sequential) writer.
 */
#define _POSIX_C_SOURCE 200809L
#include "nf4.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "io.h"
#include "json.h"
#include "msg.h"

#pragma GCC optimize("fp-contract=off")

const float nf4_code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/* Midpoints between consecutive codes, as bitsandbytes' kernel spells them
 * (fp32 literals). code(x) = #{k : x > nf4_threshold[k]}. */
static const float nf4_threshold[15] = {
    -0.8480964004993439f,   -0.6106329262256622f,  -0.4599952697753906f,
    -0.33967943489551544f,  -0.23460740596055984f, -0.13791173323988914f,
    -0.045525018125772476f, 0.03979014977812767f,  0.1202552504837513f,
    0.2035212516784668f,    0.2920137718319893f,   0.3893125355243683f,
    0.5016634166240692f,    0.6427869200706482f,   0.8614784181118011f,
};

int nf4_blocksize_ok(int bs)
{
    return bs == 32 || bs == 64 || bs == 128 || bs == 256 || bs == 512 ||
           bs == 1024 || bs == 2048 || bs == 4096;
}

/* ---- the dynamic map ------------------------------------------------ */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static float dynamic_map[256];
/* its odd entries, then +inf: the table the vector search walks */
static float dynamic_odd[128];
static pthread_once_t dynamic_map_once = PTHREAD_ONCE_INIT;

/* create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for
 * i = 0..6, the midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), with
 * both signs; then 0 and 1; sorted. torch's CUDA linspace computes
 * start + step * i (first half) and end - step * (steps - i - 1) (second
 * half) with fused multiply-adds, hence fmaf. */
static void build_dynamic_map(void)
{
    static const double scale[7] = {1e-06, 1e-05, 0.0001, 0.001, 0.01, 0.1, 1};
    double data[256];
    int n = 0;
    for (int i = 0; i < 7; i++) {
        int steps = (1 << i) + 1, half = steps / 2;
        float start = 0.1f, end = 1.0f,
              step = (end - start) / (float)(steps - 1);
        float b[65];
        for (int k = 0; k < steps; k++)
            b[k] = k < half ? fmaf(step, (float)k, start)
                            : fmaf(-step, (float)(steps - k - 1), end);
        for (int k = 0; k + 1 < steps; k++) {
            float mean = (b[k] + b[k + 1]) / 2.0f;
            float v = (float)scale[i] * mean;
            data[n++] = v;
            data[n++] = -v;
        }
    }
    data[n++] = 0.0;
    data[n++] = 1.0;
    qsort(data, (size_t)n, sizeof *data, cmp_double);
    for (int k = 0; k < 256; k++)
        dynamic_map[k] = (float)data[k];
    for (int k = 0; k < 127; k++)
        dynamic_odd[k] = dynamic_map[2 * k + 1];
    dynamic_odd[127] = INFINITY;
}

const float *nf4_dynamic_map(void)
{
    pthread_once(&dynamic_map_once, build_dynamic_map);
    return dynamic_map;
}

/* bitsandbytes' dQuantize<0>: a 7-step binary search from the middle of the
 * map, then a choice between the final pivot and its neighbour by the
 * midpoint. Kept literally: its edge behaviour is part of the format. */
static unsigned char dquantize_dynamic(const float *code, float x)
{
    /* written with selects rather than branches: the branches of the
     * search are unpredictable, and this runs once per block absmax */
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        int gt = x > val;
        lower_pivot = gt ? pivot : lower_pivot;
        lower = gt ? val : lower;
        upper_pivot = gt ? upper_pivot : pivot;
        upper = gt ? upper : val;
        pivot += gt ? i : -i;
        val = code[pivot];
    }
    upper = upper_pivot == 255 ? code[255] : upper;
    lower = lower_pivot == 0 ? code[0] : lower;
    int gt = x > val;
    float midpoint = gt ? (upper + val) * 0.5f : (lower + val) * 0.5f;
    return (unsigned char)(gt ? (x > midpoint ? upper_pivot : pivot)
                              : (x < midpoint ? lower_pivot : pivot));
}

/* ---- loading source values ------------------------------------------ */

/* n elements of src starting at element i0, as fp32. */
static void load_f32(const void *src, st_dtype dtype, int64_t i0, int n,
                     float *dst)
{
    if (dtype == ST_F32) {
        memcpy(dst, (const float *)src + i0, (size_t)n * 4);
    } else if (dtype == ST_BF16) {
        const uint16_t *s = (const uint16_t *)src + i0;
        for (int j = 0; j < n; j++) {
            uint32_t u = (uint32_t)s[j] << 16;
            memcpy(dst + j, &u, 4);
        }
    } else {
        const uint16_t *s = (const uint16_t *)src + i0;
        for (int j = 0; j < n; j++)
            dst[j] = st_f16_to_f32(s[j]);
    }
}

/* max |x| as the kernel computes it: fmaxf ignores NaN; a partial block
 * also sees the zero padding. */
static float block_absmax(const float *v, int n, int padded)
{
    float m = padded ? 0.0f : -FLT_MAX;
    for (int j = 0; j < n; j++) {
        float a = fabsf(v[j]);
        m = a > m ? a : m;
    }
    return m;
}

/* The scale: bitsandbytes computes 1.0f / absmax on the GPU. */
static inline float reciprocal(float x)
{
    return 1.0f / x;
}

static int64_t nblocks_of(int64_t n, int bs)
{
    return (n + bs - 1) / bs;
}

static int threads_for(int requested)
{
    long n = requested > 0 ? requested : sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 64 ? 64 : (int)n;
}

/* Parallel loops on plain threads: fn(ctx, task) for every task in
 * [0, ntasks), tasks handed out one at a time from a shared counter, the
 * calling thread working too. Waiting is by pthread_join, never by
 * spinning, so on a busy machine an idle worker costs nothing (OpenMP's
 * spin-waits cost more than the parallelism gained on 2 shared cores). */
typedef void (*task_fn)(void *ctx, int64_t task);

typedef struct par_loop {
    task_fn fn;
    void *ctx;
    int64_t ntasks;
    atomic_llong next;
} par_loop;

static void *par_worker(void *arg)
{
    par_loop *p = arg;
    for (;;) {
        int64_t t = atomic_fetch_add(&p->next, 1);
        if (t >= p->ntasks)
            break;
        p->fn(p->ctx, t);
    }
    return NULL;
}

static void par_for(int64_t ntasks, int nthreads, task_fn fn, void *ctx)
{
    par_loop p = {.fn = fn, .ctx = ctx, .ntasks = ntasks};
    atomic_init(&p.next, 0);
    int nt = threads_for(nthreads);
    if (nt > ntasks)
        nt = ntasks > 0 ? (int)ntasks : 1;
    pthread_t th[64];
    int started = 0;
    while (started < nt - 1 &&
           pthread_create(&th[started], NULL, par_worker, &p) == 0)
        started++;
    par_worker(&p);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
}

static void run_blocks(const void *src, st_dtype dt, int64_t n, int bs,
                       uint8_t *packed, float *absmax, int nthreads);

void nf4_block_absmax(const void *src, st_dtype dtype, int64_t n, int blocksize,
                      float *absmax, int nthreads)
{
    run_blocks(src, dtype, n, blocksize, NULL, absmax, nthreads);
}

/* ---- torch's CUDA mean ---------------------------------------------- */

static int last_pow2(int64_t n)
{
    int64_t p = 1;
    while (p * 2 <= n)
        p *= 2;
    return (int)p;
}

/* What lane 0 holds after the block_x_reduce of torch's Reduce.cuh over
 * v[0..width): a shared-memory halving down to 32 lanes, then warp shuffles
 * down by 16, 8, 4, 2, 1 (each a halving too). v is clobbered. */
static float block_x_reduce(float *v, int width)
{
    int dim = width;
    if (dim > 32) {
        for (int off = dim / 2; off >= 32; off >>= 1)
            for (int t = 0; t < off; t++)
                v[t] += v[t + off];
        dim = 32;
    }
    for (int off = dim / 2; off > 0; off >>= 1)
        for (int t = 0; t < off; t++)
            v[t] += v[t + off];
    return v[0];
}

/* torch.mean of a contiguous float32 CUDA tensor (Reduce.cuh, MeanOps):
 * n <= 128: one block of last_pow2(n) threads, each with 4 accumulators
 * over a stride of the block width; larger: vectorized loads of 4 (one
 * accumulator per vector lane), a block of min(last_pow2(n / 4), 512)
 * threads, and, once a thread would see 256 values or more, several
 * blocks (ceil(values per thread / 16), as on any GPU with at least that
 * many block slots) combined by the last one. Then sum * (1.0f / n). */
float nf4_torch_mean(const float *x, int64_t n)
{
    if (n <= 0)
        return NAN;
    float sum;
    if (n <= 128) {
        int bw = last_pow2(n);
        float *lane = xcalloc((size_t)bw, sizeof *lane);
        for (int t = 0; t < bw; t++) {
            float acc[4] = {0, 0, 0, 0};
            int64_t idx = t;
            while (idx + 3 * (int64_t)bw < n) {
                for (int i = 0; i < 4; i++)
                    acc[i] += x[idx + i * bw];
                idx += 4 * bw;
            }
            for (int i = 0; i < 4 && idx < n; i++, idx += bw)
                acc[i] += x[idx];
            lane[t] = ((acc[0] + acc[1]) + acc[2]) + acc[3];
        }
        sum = block_x_reduce(lane, bw);
        free(lane);
    } else {
        int bw = last_pow2(n / 4);
        if (bw > 512)
            bw = 512;
        int64_t vpt = (n + bw - 1) / bw;
        int64_t ctas = 1;
        if (vpt >= 256) {
            int64_t c2 = (vpt + 15) / 16, c3 = (vpt + 255) / 256;
            ctas = c2 > c3 ? c2 : c3;
        }
        int64_t stride = (int64_t)bw * ctas;
        int64_t tail_start = n - n % 4;
        float *lane = xmalloc((size_t)bw * sizeof *lane);
        float *cta = xmalloc((size_t)ctas * sizeof *cta);
        for (int64_t c = 0; c < ctas; c++) {
            for (int t = 0; t < bw; t++) {
                float acc[4] = {0, 0, 0, 0};
                for (int64_t idx = t + c * bw; idx * 4 + 3 < n; idx += stride)
                    for (int i = 0; i < 4; i++)
                        acc[i] += x[idx * 4 + i];
                if (c == 0 && tail_start + t < n)
                    acc[0] += x[tail_start + t];
                lane[t] = ((acc[0] + acc[1]) + acc[2]) + acc[3];
            }
            cta[c] = block_x_reduce(lane, bw);
        }
        if (ctas == 1) {
            sum = cta[0];
        } else {
            for (int t = 0; t < bw; t++) {
                float acc = 0.0f;
                for (int64_t c = t; c < ctas; c += bw)
                    acc += cta[c];
                lane[t] = acc;
            }
            sum = block_x_reduce(lane, bw);
        }
        free(lane);
        free(cta);
    }
    float factor = 1.0f / (float)n;
    return sum * factor;
}

/* ---- quantization --------------------------------------------------- */

/* NF4 codes of v[0..n) scaled by inv, packed two per byte (first element
 * high). An odd n gets the code of a zero pad in the last low nibble, as
 * the kernel quantizes its zero-filled padding. */
static void quantize_block(const float *v, int n, float inv, uint8_t *out)
{
    uint8_t c[4096 + 1];
    for (int j = 0; j < n; j++) {
        float u = v[j] * inv;
        int k = 0;
        for (int t = 0; t < 15; t++)
            k += u > nf4_threshold[t];
        c[j] = (uint8_t)k;
    }
    if (n & 1) {
        float u = 0.0f * inv;
        int k = 0;
        for (int t = 0; t < 15; t++)
            k += u > nf4_threshold[t];
        c[n] = (uint8_t)k;
    }
    for (int j = 0; j < (n + 1) / 2; j++)
        out[j] = (uint8_t)(c[2 * j] << 4 | c[2 * j + 1]);
}

/* ---- block kernels -------------------------------------------------- */

/* A kernel handles blocks [b0, b1) of an n-element source: the absmax of
 * each block, and, when packed is non-NULL, its packed NF4 codes. buf has
 * room for one block of floats. Four versions compute the same bits: the
 * plain C one (any machine; also every partial last block), SSE2 (4 lanes,
 * the x86-64 baseline), AVX2 (8 lanes) and AVX-512 (16 lanes), the best the
 * processor has chosen at run time. The SIMD
 * ones rely on max_ps(a, m) being "a > m ? a : m" (NaN ignored, as fmaxf)
 * and on ordered compares giving false for NaN, as the scalar code does. */
typedef void (*chunk_fn)(const void *src, st_dtype dt, int64_t n, int bs,
                         int64_t b0, int64_t b1, uint8_t *packed, float *absmax,
                         float *buf);

static void chunk_block_scalar(const void *src, st_dtype dt, int64_t n, int bs,
                               int64_t b, uint8_t *packed, float *absmax,
                               float *buf)
{
    int64_t i0 = b * bs;
    int len = (int)(n - i0 < bs ? n - i0 : bs);
    load_f32(src, dt, i0, len, buf);
    float m = block_absmax(buf, len, len < bs);
    absmax[b] = m;
    if (packed)
        quantize_block(buf, len, reciprocal(m), packed + i0 / 2);
}

static void chunk_scalar(const void *src, st_dtype dt, int64_t n, int bs,
                         int64_t b0, int64_t b1, uint8_t *packed, float *absmax,
                         float *buf)
{
    for (int64_t b = b0; b < b1; b++)
        chunk_block_scalar(src, dt, n, bs, b, packed, absmax, buf);
}

#if defined(__x86_64__)
#include <immintrin.h>
#define NF4_X86 1

static void chunk_sse2(const void *src, st_dtype dt, int64_t n, int bs,
                       int64_t b0, int64_t b1, uint8_t *packed, float *absmax,
                       float *buf)
{
    const __m128 sign = _mm_set1_ps(-0.0f);
    __m128 thr[15];
    for (int t = 0; t < 15; t++)
        thr[t] = _mm_set1_ps(nf4_threshold[t]);
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * bs;
        if (n - i0 < bs || dt == ST_F16) {
            chunk_block_scalar(src, dt, n, bs, b, packed, absmax, buf);
            continue;
        }
        const float *v = buf;
        if (dt == ST_F32) {
            v = (const float *)src + i0;
        } else {
            const uint16_t *h = (const uint16_t *)src + i0;
            const __m128i zero = _mm_setzero_si128();
            for (int j = 0; j < bs; j += 8) {
                __m128i x = _mm_loadu_si128((const __m128i *)(h + j));
                _mm_storeu_si128((__m128i *)(buf + j),
                                 _mm_unpacklo_epi16(zero, x));
                _mm_storeu_si128((__m128i *)(buf + j + 4),
                                 _mm_unpackhi_epi16(zero, x));
            }
        }
        __m128 mv = _mm_set1_ps(-FLT_MAX);
        for (int j = 0; j < bs; j += 4)
            mv = _mm_max_ps(_mm_andnot_ps(sign, _mm_loadu_ps(v + j)), mv);
        float lane[4], m = -FLT_MAX;
        _mm_storeu_ps(lane, mv);
        for (int k = 0; k < 4; k++)
            m = lane[k] > m ? lane[k] : m;
        absmax[b] = m;
        if (!packed)
            continue;
        __m128 inv = _mm_set1_ps(reciprocal(m));
        uint8_t *out = packed + i0 / 2;
        for (int j = 0; j < bs; j += 8) {
            __m128 x0 = _mm_loadu_ps(v + j), x1 = _mm_loadu_ps(v + j + 4);
            __m128 ue = _mm_mul_ps(_mm_shuffle_ps(x0, x1, 0x88), inv);
            __m128 uo = _mm_mul_ps(_mm_shuffle_ps(x0, x1, 0xDD), inv);
            __m128i ce = _mm_setzero_si128(), co = _mm_setzero_si128();
            for (int t = 0; t < 15; t++) {
                ce = _mm_sub_epi32(ce,
                                   _mm_castps_si128(_mm_cmpgt_ps(ue, thr[t])));
                co = _mm_sub_epi32(co,
                                   _mm_castps_si128(_mm_cmpgt_ps(uo, thr[t])));
            }
            __m128i by = _mm_or_si128(_mm_slli_epi32(ce, 4), co);
            by = _mm_packs_epi32(by, by);
            by = _mm_packus_epi16(by, by);
            int32_t w = _mm_cvtsi128_si32(by);
            memcpy(out + j / 2, &w, 4);
        }
    }
}

__attribute__((target("avx2,f16c"))) static void
chunk_avx2(const void *src, st_dtype dt, int64_t n, int bs, int64_t b0,
           int64_t b1, uint8_t *packed, float *absmax, float *buf)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    __m256 thr[15];
    for (int t = 0; t < 15; t++)
        thr[t] = _mm256_set1_ps(nf4_threshold[t]);
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * bs;
        if (n - i0 < bs) {
            chunk_block_scalar(src, dt, n, bs, b, packed, absmax, buf);
            continue;
        }
        const float *v = buf;
        if (dt == ST_F32) {
            v = (const float *)src + i0;
        } else if (dt == ST_BF16) {
            const uint16_t *h = (const uint16_t *)src + i0;
            for (int j = 0; j < bs; j += 8) {
                __m256i x = _mm256_cvtepu16_epi32(
                    _mm_loadu_si128((const __m128i *)(h + j)));
                _mm256_storeu_si256((__m256i *)(buf + j),
                                    _mm256_slli_epi32(x, 16));
            }
        } else {
            const uint16_t *h = (const uint16_t *)src + i0;
            for (int j = 0; j < bs; j += 8)
                _mm256_storeu_ps(buf + j, _mm256_cvtph_ps(_mm_loadu_si128(
                                              (const __m128i *)(h + j))));
        }
        __m256 mv = _mm256_set1_ps(-FLT_MAX);
        for (int j = 0; j < bs; j += 8)
            mv = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)),
                               mv);
        float lane[8], m = -FLT_MAX;
        _mm256_storeu_ps(lane, mv);
        for (int k = 0; k < 8; k++)
            m = lane[k] > m ? lane[k] : m;
        absmax[b] = m;
        if (!packed)
            continue;
        __m256 inv = _mm256_set1_ps(reciprocal(m));
        uint8_t *out = packed + i0 / 2;
        for (int j = 0; j < bs; j += 16) {
            __m256 x0 = _mm256_loadu_ps(v + j), x1 = _mm256_loadu_ps(v + j + 8);
            /* in-lane shuffles: evens [0 2 8 10 | 4 6 12 14], odds alike */
            __m256 ue = _mm256_mul_ps(_mm256_shuffle_ps(x0, x1, 0x88), inv);
            __m256 uo = _mm256_mul_ps(_mm256_shuffle_ps(x0, x1, 0xDD), inv);
            __m256i ce = _mm256_setzero_si256(), co = _mm256_setzero_si256();
            for (int t = 0; t < 15; t++) {
                ce = _mm256_sub_epi32(ce, _mm256_castps_si256(_mm256_cmp_ps(
                                              ue, thr[t], _CMP_GT_OQ)));
                co = _mm256_sub_epi32(co, _mm256_castps_si256(_mm256_cmp_ps(
                                              uo, thr[t], _CMP_GT_OQ)));
            }
            __m256i by = _mm256_or_si256(_mm256_slli_epi32(ce, 4), co);
            by = _mm256_permutevar8x32_epi32(by, order); /* pairs in order */
            __m128i lo = _mm256_castsi256_si128(by),
                    hi = _mm256_extracti128_si256(by, 1);
            __m128i p = _mm_packs_epi32(lo, hi);
            p = _mm_packus_epi16(p, p);
            _mm_storel_epi64((__m128i *)(out + j / 2), p);
        }
    }
}

/* AVX-512: 16 lanes, and the code found by a 4-step binary search over the
 * thresholds (a 16-entry table lookup per step) instead of 15 compares;
 * the same answer: #{k : u > t_k} for sorted thresholds, 0 for NaN. */
__attribute__((target("avx512f"))) static void
chunk_avx512(const void *src, st_dtype dt, int64_t n, int bs, int64_t b0,
             int64_t b1, uint8_t *packed, float *absmax, float *buf)
{
    float t16[16];
    memcpy(t16, nf4_threshold, sizeof nf4_threshold);
    t16[15] = INFINITY;
    const __m512 thr = _mm512_loadu_ps(t16),
                 mid = _mm512_set1_ps(nf4_threshold[7]);
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20,
                                         22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    const __m512i k1 = _mm512_set1_epi32(1), k2 = _mm512_set1_epi32(2),
                  k3 = _mm512_set1_epi32(3), k4 = _mm512_set1_epi32(4),
                  k8 = _mm512_set1_epi32(8);
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * bs;
        if (n - i0 < bs || bs < 32) {
            chunk_block_scalar(src, dt, n, bs, b, packed, absmax, buf);
            continue;
        }
        const float *v = buf;
        if (dt == ST_F32) {
            v = (const float *)src + i0;
        } else if (dt == ST_BF16) {
            const uint16_t *h = (const uint16_t *)src + i0;
            for (int j = 0; j < bs; j += 16) {
                __m512i x = _mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(h + j)));
                _mm512_storeu_si512((void *)(buf + j),
                                    _mm512_slli_epi32(x, 16));
            }
        } else {
            const uint16_t *h = (const uint16_t *)src + i0;
            for (int j = 0; j < bs; j += 16)
                _mm512_storeu_ps(buf + j, _mm512_cvtph_ps(_mm256_loadu_si256(
                                              (const __m256i *)(h + j))));
        }
        __m512 mv = _mm512_set1_ps(-FLT_MAX);
        for (int j = 0; j < bs; j += 16)
            mv = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v + j)), mv);
        float lane[16], m = -FLT_MAX;
        _mm512_storeu_ps(lane, mv);
        for (int k = 0; k < 16; k++)
            m = lane[k] > m ? lane[k] : m;
        absmax[b] = m;
        if (!packed)
            continue;
        __m512 inv = _mm512_set1_ps(reciprocal(m));
        uint8_t *out = packed + i0 / 2;
        for (int j = 0; j < bs; j += 32) {
            __m512 x0 = _mm512_loadu_ps(v + j),
                   x1 = _mm512_loadu_ps(v + j + 16);
            __m512 u[2] = {
                _mm512_mul_ps(_mm512_permutex2var_ps(x0, ev, x1), inv),
                _mm512_mul_ps(_mm512_permutex2var_ps(x0, od, x1), inv)};
            __m512i c[2];
            for (int h = 0; h < 2; h++) {
                __m512i cc = _mm512_setzero_si512();
                cc = _mm512_mask_add_epi32(
                    cc, _mm512_cmp_ps_mask(u[h], mid, _CMP_GT_OQ), cc, k8);
                __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(cc, k3), thr);
                cc = _mm512_mask_add_epi32(
                    cc, _mm512_cmp_ps_mask(u[h], t, _CMP_GT_OQ), cc, k4);
                t = _mm512_permutexvar_ps(_mm512_add_epi32(cc, k1), thr);
                cc = _mm512_mask_add_epi32(
                    cc, _mm512_cmp_ps_mask(u[h], t, _CMP_GT_OQ), cc, k2);
                t = _mm512_permutexvar_ps(cc, thr);
                c[h] = _mm512_mask_add_epi32(
                    cc, _mm512_cmp_ps_mask(u[h], t, _CMP_GT_OQ), cc, k1);
            }
            __m512i by = _mm512_or_si512(_mm512_slli_epi32(c[0], 4), c[1]);
            _mm_storeu_si128((__m128i *)(out + j / 2),
                             _mm512_cvtepi32_epi8(by));
        }
    }
}
#endif

static int simd_level = -1;

int nf4_simd_level(int want)
{
    int best = 0;
#ifdef NF4_X86
    __builtin_cpu_init();
    best = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") ? 2
                                                                            : 1;
    if (best == 2 && __builtin_cpu_supports("avx512f"))
        best = 3;
#endif
    if (want >= 0)
        simd_level = want < best ? want : best;
    else if (simd_level < 0)
        simd_level = best;
    return simd_level;
}

static chunk_fn pick_kernel(void)
{
    int level = simd_level >= 0 ? simd_level : nf4_simd_level(-1);
#ifdef NF4_X86
    if (level >= 3)
        return chunk_avx512;
    if (level == 2)
        return chunk_avx2;
    if (level == 1)
        return chunk_sse2;
#endif
    (void)level;
    return chunk_scalar;
}

/* Runs the kernel over all blocks, in tasks of 64K elements. */
typedef struct blocks_job {
    chunk_fn fn;
    const void *src;
    st_dtype dt;
    int64_t n, nb, per_task;
    int bs;
    uint8_t *packed;
    float *absmax;
} blocks_job;

static void blocks_task(void *ctx, int64_t t)
{
    const blocks_job *j = ctx;
    float buf[4096];
    int64_t b0 = t * j->per_task;
    int64_t b1 = b0 + j->per_task < j->nb ? b0 + j->per_task : j->nb;
    j->fn(j->src, j->dt, j->n, j->bs, b0, b1, j->packed, j->absmax, buf);
}

static void run_blocks(const void *src, st_dtype dt, int64_t n, int bs,
                       uint8_t *packed, float *absmax, int nthreads)
{
    blocks_job j = {.fn = pick_kernel(),
                    .src = src,
                    .dt = dt,
                    .n = n,
                    .nb = nblocks_of(n, bs),
                    .per_task = (1 << 16) / bs,
                    .bs = bs,
                    .packed = packed,
                    .absmax = absmax};
    par_for(nblocks_of(j.nb, (int)j.per_task), nthreads, blocks_task, &j);
}

/* Double quantization of absmax[0..nb): offset, 8-bit codes, nested absmax. */
/* The 8-bit codes of u[0..n) (already scaled). The AVX2 version is the
 * same search in closed form, 8 values at a time: the 7 steps over the
 * 127 odd entries find j = #{odd k : u > map[k]}; the search then stands
 * at pivot 2j between 2j - 1 (or 0) and 2j + 1, and the final midpoint
 * test is the scalar one. Checked equal to dquantize_dynamic on every
 * entry, every midpoint and their neighbours (tests/unit/test_nf4.c). */
static void dq_codes_scalar(const float *u, int n, uint8_t *out)
{
    for (int i = 0; i < n; i++)
        out[i] = dquantize_dynamic(dynamic_map, u[i]);
}

#ifdef NF4_X86
__attribute__((target("avx2"))) static void dq_codes_avx2(const float *u, int n,
                                                          uint8_t *out)
{
    const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
    const __m256 half = _mm256_set1_ps(0.5f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(u + i);
        __m256i pos = zero;
        for (int step = 64; step > 0; step >>= 1) {
            __m256i cand = _mm256_add_epi32(pos, _mm256_set1_epi32(step));
            __m256 o = _mm256_i32gather_ps(dynamic_odd,
                                           _mm256_sub_epi32(cand, one), 4);
            __m256 gt = _mm256_cmp_ps(v, o, _CMP_GT_OQ);
            pos = _mm256_blendv_epi8(pos, cand, _mm256_castps_si256(gt));
        }
        __m256i p = _mm256_add_epi32(pos, pos);
        __m256i up = _mm256_add_epi32(p, one);
        __m256i lp = _mm256_max_epi32(_mm256_sub_epi32(p, one), zero);
        __m256 val = _mm256_i32gather_ps(dynamic_map, p, 4);
        __m256 upper = _mm256_i32gather_ps(dynamic_map, up, 4);
        __m256 lower = _mm256_i32gather_ps(dynamic_map, lp, 4);
        __m256 midu = _mm256_mul_ps(_mm256_add_ps(upper, val), half);
        __m256 midl = _mm256_mul_ps(_mm256_add_ps(lower, val), half);
        __m256i ru = _mm256_blendv_epi8(
            p, up, _mm256_castps_si256(_mm256_cmp_ps(v, midu, _CMP_GT_OQ)));
        __m256i rl = _mm256_blendv_epi8(
            p, lp, _mm256_castps_si256(_mm256_cmp_ps(v, midl, _CMP_LT_OQ)));
        __m256i r = _mm256_blendv_epi8(
            rl, ru, _mm256_castps_si256(_mm256_cmp_ps(v, val, _CMP_GT_OQ)));
        __m128i r16 = _mm_packs_epi32(_mm256_castsi256_si128(r),
                                      _mm256_extracti128_si256(r, 1));
        _mm_storel_epi64((__m128i *)(out + i), _mm_packus_epi16(r16, r16));
    }
    dq_codes_scalar(u + i, n - i, out + i);
}
#endif

void nf4_dynamic_quantize(const float *u, int64_t n, uint8_t *out)
{
    nf4_dynamic_map();
    while (n > 0) {
        int k = n > 4096 ? 4096 : (int)n;
#ifdef NF4_X86
        if (nf4_simd_level(-1) >= 2)
            dq_codes_avx2(u, k, out);
        else
#endif
            dq_codes_scalar(u, k, out);
        u += k;
        out += k;
        n -= k;
    }
}

typedef struct dq_job {
    const float *absmax;
    int64_t nb;
    float offset;
    uint8_t *codes; /* NULL: nested absmax only */
    float *nested_absmax;
    int level;
} dq_job;

static void dq_task(void *ctx, int64_t k)
{
    const dq_job *j = ctx;
    float x[NF4_NESTED_BLOCKSIZE];
    int64_t b0 = k * NF4_NESTED_BLOCKSIZE;
    int len = (int)(j->nb - b0 < NF4_NESTED_BLOCKSIZE ? j->nb - b0
                                                      : NF4_NESTED_BLOCKSIZE);
    for (int i = 0; i < len; i++)
        x[i] = j->absmax[b0 + i] - j->offset;
    float m = block_absmax(x, len, len < NF4_NESTED_BLOCKSIZE);
    j->nested_absmax[k] = m;
    if (!j->codes)
        return;
    float inv = reciprocal(m);
    for (int i = 0; i < len; i++)
        x[i] *= inv;
#ifdef NF4_X86
    if (j->level >= 2) {
        dq_codes_avx2(x, len, j->codes + b0);
        return;
    }
#endif
    dq_codes_scalar(x, len, j->codes + b0);
}

/* Double quantization of absmax[0..nb): the offset, the nested absmax of
 * each 256 blocks and (codes non-NULL) the 8-bit codes. */
static void double_quant(const float *absmax, int64_t nb, float *offset,
                         uint8_t *codes, float *nested_absmax, int nthreads)
{
    nf4_dynamic_map();
    dq_job j = {.absmax = absmax,
                .nb = nb,
                .offset = nf4_torch_mean(absmax, nb),
                .codes = codes,
                .nested_absmax = nested_absmax,
                .level = nf4_simd_level(-1)};
    *offset = j.offset;
    int64_t nnb = nblocks_of(nb, NF4_NESTED_BLOCKSIZE);
    if (nnb < 64 || nthreads == 1) {
        for (int64_t k = 0; k < nnb; k++)
            dq_task(&j, k);
        return;
    }
    par_for(nnb, nthreads, dq_task, &j);
}

static int check_dtype(st_dtype dtype)
{
    if (dtype != ST_F32 && dtype != ST_F16 && dtype != ST_BF16)
        return msg_error("cannot quantize dtype %s (F32, F16 or BF16 only)",
                         st_dtype_name(dtype));
    return 0;
}

int nf4_quantize(const void *src, st_dtype dtype, int ndim,
                 const int64_t *shape, int blocksize, int nested, int nthreads,
                 nf4_weight *out)
{
    memset(out, 0, sizeof *out);
    if (check_dtype(dtype) != 0)
        return -1;
    if (!nf4_blocksize_ok(blocksize))
        return msg_error("invalid NF4 block size %d", blocksize);
    if (ndim < 0 || ndim > ST_MAX_DIMS)
        return msg_error("invalid rank %d", ndim);
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return msg_error("invalid shape");
        out->shape[d] = shape[d];
        n *= shape[d];
    }
    out->ndim = ndim;
    out->numel = n;
    out->dtype = dtype;
    out->blocksize = blocksize;
    out->nblocks = nblocks_of(n, blocksize);
    out->nested_blocksize = NF4_NESTED_BLOCKSIZE;
    memcpy(out->quant_map, nf4_code, sizeof out->quant_map);
    memcpy(out->nested_map, nf4_dynamic_map(), sizeof out->nested_map);

    int64_t nb = out->nblocks;
    uint8_t *packed = xmalloc((size_t)((n + 1) / 2) + 1);
    float *absmax = xmalloc((size_t)(nb ? nb : 1) * sizeof *absmax);
    run_blocks(src, dtype, n, blocksize, packed, absmax, nthreads);
    out->packed = packed;
    out->owned_[0] = packed;
    if (nested) {
        int64_t nnb = nblocks_of(nb, NF4_NESTED_BLOCKSIZE);
        uint8_t *codes = xmalloc((size_t)(nb ? nb : 1));
        float *na = xmalloc((size_t)(nnb ? nnb : 1) * sizeof *na);
        double_quant(absmax, nb, &out->nested_offset, codes, na, nthreads);
        free(absmax);
        out->nested = 1;
        out->absmax_code = codes;
        out->nested_absmax = na;
        out->nested_nblocks = nnb;
        out->owned_[1] = codes;
        out->owned_[2] = na;
    } else {
        out->absmax = absmax;
        out->owned_[1] = absmax;
    }
    return 0;
}

void nf4_weight_free(nf4_weight *w)
{
    if (!w)
        return;
    for (int i = 0; i < 4; i++)
        free(w->owned_[i]);
    memset(w, 0, sizeof *w);
}

/* ---- dequantization ------------------------------------------------- */

float nf4_absmax_of(const nf4_weight *w, int64_t b)
{
    if (!w->nested)
        return w->absmax[b];
    /* two roundings, as bitsandbytes: the 8-bit dequantization kernel, then
     * torch's "absmax += offset" */
    float a = w->nested_map[w->absmax_code[b]] *
              w->nested_absmax[b / w->nested_blocksize];
    return a + w->nested_offset;
}

int nf4_dequantize(const nf4_weight *w, int64_t first, int64_t n, float *dst)
{
    if (first < 0 || n < 0 || first > w->numel || n > w->numel - first)
        return msg_error("NF4 dequantization range %lld+%lld outside %lld "
                         "elements",
                         (long long)first, (long long)n, (long long)w->numel);
    int64_t i = first, end = first + n;
    while (i < end) {
        int64_t b = i / w->blocksize;
        int64_t bend = (b + 1) * w->blocksize;
        if (bend > end)
            bend = end;
        float a = nf4_absmax_of(w, b);
        for (; i < bend; i++) {
            uint8_t byte = w->packed[i >> 1];
            int code = (i & 1) ? (byte & 15) : (byte >> 4);
            *dst++ = w->quant_map[code] * a;
        }
    }
    return 0;
}

int nf4_dequantize_rows(const nf4_weight *w, int64_t row0, int64_t nrows,
                        float *dst)
{
    if (w->ndim != 2)
        return msg_error("NF4 weight is not 2-D");
    return nf4_dequantize(w, row0 * w->shape[1], nrows * w->shape[1], dst);
}

/* ---- quant_state JSON ----------------------------------------------- */

void nf4_append_py_float(strbuf *sb, double v)
{
    if (isnan(v)) {
        sb_puts(sb, "NaN");
        return;
    }
    if (isinf(v)) {
        sb_puts(sb, v < 0 ? "-Infinity" : "Infinity");
        return;
    }
    if (v == 0) {
        sb_puts(sb, signbit(v) ? "-0.0" : "0.0");
        return;
    }
    /* shortest round-tripping digits, as repr() (David Gay's mode 0) */
    char buf[40];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(buf, sizeof buf, "%.*e", p - 1, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    /* buf is [-]d[.ddd]e[+-]XX: split into digits and exponent */
    const char *s = buf;
    int neg = *s == '-';
    if (neg)
        s++;
    char digits[20];
    int nd = 0;
    for (; *s && *s != 'e'; s++)
        if (*s != '.')
            digits[nd++] = *s;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    int e10 = atoi(s + 1); /* value = d.ddd * 10^e10 */
    int decpt = e10 + 1;   /* value = 0.dddd * 10^decpt */
    if (neg)
        sb_putc(sb, '-');
    if (decpt <= -4 || decpt > 16) {
        sb_putc(sb, digits[0]);
        if (nd > 1) {
            sb_putc(sb, '.');
            sb_append(sb, digits + 1, (size_t)nd - 1);
        }
        sb_printf(sb, "e%c%02d", e10 < 0 ? '-' : '+', e10 < 0 ? -e10 : e10);
    } else if (decpt <= 0) {
        sb_puts(sb, "0.");
        for (int k = 0; k < -decpt; k++)
            sb_putc(sb, '0');
        sb_append(sb, digits, (size_t)nd);
    } else if (decpt >= nd) {
        sb_append(sb, digits, (size_t)nd);
        for (int k = nd; k < decpt; k++)
            sb_putc(sb, '0');
        sb_puts(sb, ".0");
    } else {
        sb_append(sb, digits, (size_t)decpt);
        sb_putc(sb, '.');
        sb_append(sb, digits + decpt, (size_t)(nd - decpt));
    }
}

static const char *torch_dtype_name(st_dtype t)
{
    switch (t) {
    case ST_F32:
        return "float32";
    case ST_F16:
        return "float16";
    case ST_BF16:
        return "bfloat16";
    default:
        return "?";
    }
}

static void quant_state_json(strbuf *sb, int ndim, const int64_t *shape,
                             st_dtype dtype, int blocksize, int nested,
                             float offset)
{
    sb_printf(sb,
              "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": "
              "\"%s\", \"shape\": [",
              blocksize, torch_dtype_name(dtype));
    for (int d = 0; d < ndim; d++)
        sb_printf(sb, "%s%lld", d ? ", " : "", (long long)shape[d]);
    sb_putc(sb, ']');
    if (nested) {
        sb_printf(sb,
                  ", \"nested_blocksize\": %d, \"nested_dtype\": "
                  "\"float32\", \"nested_offset\": ",
                  NF4_NESTED_BLOCKSIZE);
        nf4_append_py_float(sb, (double)offset);
    }
    sb_putc(sb, '}');
}

void nf4_quant_state_json(const nf4_weight *w, strbuf *sb)
{
    quant_state_json(sb, w->ndim, w->shape, w->dtype, w->blocksize, w->nested,
                     w->nested_offset);
}

size_t nf4_quant_state_len(int ndim, const int64_t *shape, st_dtype dtype,
                           int blocksize, int nested, float offset)
{
    strbuf sb = STRBUF_INIT;
    quant_state_json(&sb, ndim, shape, dtype, blocksize, nested, offset);
    size_t n = sb.len;
    sb_free(&sb);
    return n;
}

/* ---- loading from a checkpoint -------------------------------------- */

static char *suffixed(const char *name, const char *suffix)
{
    size_t a = strlen(name), b = strlen(suffix);
    char *s = xmalloc(a + b + 1);
    memcpy(s, name, a);
    memcpy(s + a, suffix, b + 1);
    return s;
}

int nf4_weight_present(const st_model *m, const char *name)
{
    char *qs = suffixed(name, NF4_SUFFIX_QUANT_STATE);
    int found = st_model_find(m, qs) != NULL;
    free(qs);
    return found;
}

/* The tensor name+suffix, which must have the given dtype and element
 * count (count < 0: any). NULL with a message otherwise. */
static const st_tensor *need(const st_model *m, const char *name,
                             const char *suffix, st_dtype dtype, int64_t count)
{
    char *full = suffixed(name, suffix);
    const st_tensor *t = st_model_find(m, full);
    if (!t)
        msg_error("%s: NF4 tensor '%s' is missing", m->dir, full);
    else if (t->dtype != dtype)
        msg_error("%s: NF4 tensor '%s' is %s, expected %s", m->dir, full,
                  st_dtype_name(t->dtype), st_dtype_name(dtype));
    else if (count >= 0 && t->numel != count)
        msg_error("%s: NF4 tensor '%s' has %lld elements, expected %lld",
                  m->dir, full, (long long)t->numel, (long long)count);
    else {
        free(full);
        return t;
    }
    free(full);
    return NULL;
}

/* The file of the checkpoint that holds t (for messages). */
static const char *file_of(const st_model *m, const st_tensor *t)
{
    const char *p = t->data;
    for (size_t i = 0; i < m->nfiles; i++) {
        const char *b = m->files[i]->map;
        if (p >= b && p <= b + m->files[i]->map_len)
            return m->files[i]->path;
    }
    return m->dir;
}

/* A NaN or infinity in a weight's quantization state would only come out
 * as NaN weights, and from lora-train as a NaN adapter (issue 11): the
 * state is refused at load, naming the file and the tensor. 0 when the
 * F32 tensor t is finite. */
static int need_finite(const st_model *m, const st_tensor *t)
{
    int64_t i = st_find_nonfinite(t->data, ST_F32, t->numel);
    if (i < 0)
        return 0;
    float v;
    memcpy(&v, (const char *)t->data + 4 * i, sizeof v);
    return msg_error("%s: NF4 tensor '%s' holds a non-finite value (%g at element %lld)",
                     file_of(m, t), t->name, v, (long long)i);
}

static float max_abs(const float *x, int64_t n)
{
    float a = 0;
    for (int64_t i = 0; i < n; i++)
        a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
    return a;
}

/* Finite parts can still multiply out to infinity: every block's absmax
 * (nested: nested_map[c] * nested_absmax + offset) and every
 * quant_map[code] * absmax must be finite. A bound in double settles it
 * for any sane state; only past it are the blocks computed one by one. */
static int check_overflow(const st_model *m, const st_tensor *am, const nf4_weight *w)
{
    double q = max_abs(w->quant_map, 16), bound;
    if (w->nested)
        bound = (double)max_abs(w->nested_map, 256) *
                    max_abs(w->nested_absmax, w->nested_nblocks) +
                fabs((double)w->nested_offset);
    else
        bound = max_abs(w->absmax, w->nblocks);
    if (q * bound < FLT_MAX / 2)
        return 0;
    for (int64_t b = 0; b < w->nblocks; b++) {
        float a = nf4_absmax_of(w, b);
        if (!isfinite(a) || !isfinite((float)q * a))
            return msg_error("%s: NF4 tensor '%s' dequantizes to a non-finite value (block "
                             "%lld: absmax %g, largest code %g)",
                             file_of(m, am), am->name, (long long)b, a, q);
    }
    return 0;
}

/* Python's json writes a non-finite float as NaN, Infinity or -Infinity,
 * which are not JSON: say so rather than "invalid literal". */
static int has_py_nonfinite(const char *s, size_t n)
{
    for (size_t i = 0; i + 3 <= n; i++)
        if (!memcmp(s + i, "NaN", 3) || (i + 8 <= n && !memcmp(s + i, "Infinity", 8)))
            return 1;
    return 0;
}

static float *copy_f32(const st_tensor *t)
{
    float *p = xmalloc((size_t)(t->numel ? t->numel : 1) * sizeof *p);
    memcpy(p, t->data, (size_t)t->numel * sizeof *p);
    return p;
}

int nf4_weight_load(const st_model *m, const char *name, nf4_weight *out)
{
    memset(out, 0, sizeof *out);
    const st_tensor *qs = need(m, name, NF4_SUFFIX_QUANT_STATE, ST_U8, -1);
    if (!qs)
        return -1;
    json_value *j = NULL;
    strbuf err = STRBUF_INIT;
    int rc = json_parse_quiet((const char *)qs->data, (size_t)qs->nbytes, qs->name, 1, &j,
                              &err);
    if (rc != 0) {
        if (has_py_nonfinite((const char *)qs->data, (size_t)qs->nbytes))
            msg_error("%s: NF4 tensor '%s' holds a non-finite value (NaN or Infinity in "
                      "its JSON)", file_of(m, qs), qs->name);
        else
            msg_error("%s: %s", file_of(m, qs), sb_str(&err));
        sb_free(&err);
        return -1;
    }
    sb_free(&err);
    rc = -1;
    const char *qt = json_get_string(j, "quant_type", NULL);
    const char *dt = json_get_string(j, "dtype", NULL);
    const json_value *shape = json_get(j, "shape");
    int64_t bs = json_get_int(j, "blocksize", -1);
    if (!qt || strcmp(qt, "nf4") != 0) {
        msg_error("%s: weight '%s' is not NF4 (quant_type '%s')", m->dir, name,
                  qt ? qt : "?");
        goto done;
    }
    if (!dt || !shape || shape->type != JSON_ARRAY ||
        !nf4_blocksize_ok((int)bs) || shape->u.array.n > ST_MAX_DIMS) {
        msg_error("%s: bad quant_state of NF4 weight '%s'", m->dir, name);
        goto done;
    }
    if (strcmp(dt, "float32") == 0)
        out->dtype = ST_F32;
    else if (strcmp(dt, "bfloat16") == 0)
        out->dtype = ST_BF16;
    else if (strcmp(dt, "float16") == 0)
        out->dtype = ST_F16;
    else {
        msg_error("%s: NF4 weight '%s' has unsupported dtype '%s'", m->dir,
                  name, dt);
        goto done;
    }
    out->ndim = (int)shape->u.array.n;
    out->numel = 1;
    for (int d = 0; d < out->ndim; d++) {
        const json_value *v = shape->u.array.items[d];
        if (v->type != JSON_NUMBER || !v->u.number.is_integer ||
            v->u.number.integer < 0 || v->u.number.integer > (1LL << 40)) {
            msg_error("%s: bad shape in quant_state of '%s'", m->dir, name);
            goto done;
        }
        out->shape[d] = v->u.number.integer;
        out->numel *= out->shape[d];
    }
    out->blocksize = (int)bs;
    out->nblocks = nblocks_of(out->numel, out->blocksize);
    out->nested_blocksize = NF4_NESTED_BLOCKSIZE;
    const st_tensor *packed = need(m, name, "", ST_U8, (out->numel + 1) / 2);
    const st_tensor *qmap = need(m, name, NF4_SUFFIX_QUANT_MAP, ST_F32, 16);
    if (!packed || !qmap || need_finite(m, qmap) != 0)
        goto done;
    out->packed = packed->data;
    memcpy(out->quant_map, qmap->data, sizeof out->quant_map);
    out->nested = json_get(j, "nested_offset") != NULL;
    if (out->nested) {
        int64_t nbs = json_get_int(j, "nested_blocksize", -1);
        const char *ndt = json_get_string(j, "nested_dtype", NULL);
        const json_value *off = json_get(j, "nested_offset");
        if (nbs != NF4_NESTED_BLOCKSIZE || !ndt || strcmp(ndt, "float32") ||
            off->type != JSON_NUMBER) {
            msg_error("%s: unsupported nested quantization of '%s'", m->dir,
                      name);
            goto done;
        }
        out->nested_offset = (float)off->u.number.value;
        if (!isfinite(out->nested_offset)) {
            msg_error("%s: NF4 tensor '%s' holds a non-finite value (nested_offset %g is "
                      "past float32)", file_of(m, qs), qs->name, off->u.number.value);
            goto done;
        }
        out->nested_nblocks = nblocks_of(out->nblocks, NF4_NESTED_BLOCKSIZE);
        const st_tensor *codes =
            need(m, name, NF4_SUFFIX_ABSMAX, ST_U8, out->nblocks);
        const st_tensor *na = need(m, name, NF4_SUFFIX_NESTED_ABSMAX, ST_F32,
                                   out->nested_nblocks);
        const st_tensor *nmap =
            need(m, name, NF4_SUFFIX_NESTED_QUANT_MAP, ST_F32, 256);
        if (!codes || !na || !nmap || need_finite(m, na) != 0 || need_finite(m, nmap) != 0)
            goto done;
        out->absmax_code = codes->data;
        float *p = copy_f32(na);
        out->nested_absmax = p;
        out->owned_[0] = p;
        memcpy(out->nested_map, nmap->data, sizeof out->nested_map);
        if (check_overflow(m, codes, out) != 0)
            goto done;
    } else {
        const st_tensor *am =
            need(m, name, NF4_SUFFIX_ABSMAX, ST_F32, out->nblocks);
        if (!am || need_finite(m, am) != 0)
            goto done;
        float *p = copy_f32(am);
        out->absmax = p;
        out->owned_[0] = p;
        if (check_overflow(m, am, out) != 0)
            goto done;
    }
    rc = 0;
done:
    json_free(j);
    if (rc != 0)
        nf4_weight_free(out);
    return rc;
}

/* ---- statistics ----------------------------------------------------- */

typedef struct stats_part {
    double ss, es, emax;
    float amin, amax;
} stats_part;

typedef struct stats_job {
    const void *src;
    st_dtype dt;
    const nf4_weight *w;
    int64_t per_task;
    stats_part *part;
} stats_job;

static void stats_task(void *ctx, int64_t t)
{
    const stats_job *j = ctx;
    const nf4_weight *w = j->w;
    float x[4096], y[4096];
    stats_part p = {0, 0, 0, INFINITY, -INFINITY};
    int64_t b1 = (t + 1) * j->per_task;
    if (b1 > w->nblocks)
        b1 = w->nblocks;
    for (int64_t b = t * j->per_task; b < b1; b++) {
        int64_t i0 = b * w->blocksize;
        int len =
            (int)(w->numel - i0 < w->blocksize ? w->numel - i0 : w->blocksize);
        load_f32(j->src, j->dt, i0, len, x);
        nf4_dequantize(w, i0, len, y);
        float a = block_absmax(x, len, len < w->blocksize);
        p.amin = a < p.amin ? a : p.amin;
        p.amax = a > p.amax ? a : p.amax;
        for (int k = 0; k < len; k++) {
            double e = (double)y[k] - (double)x[k];
            p.ss += (double)x[k] * x[k];
            p.es += e * e;
            if (fabs(e) > p.emax)
                p.emax = fabs(e);
        }
    }
    j->part[t] = p;
}

int nf4_error_stats(const void *src, st_dtype dtype, const nf4_weight *w,
                    int nthreads, nf4_stats *st)
{
    memset(st, 0, sizeof *st);
    if (check_dtype(dtype) != 0)
        return -1;
    stats_job j = {
        .src = src, .dt = dtype, .w = w, .per_task = (1 << 16) / w->blocksize};
    int64_t ntasks = nblocks_of(w->nblocks, (int)j.per_task);
    j.part = xmalloc((size_t)(ntasks ? ntasks : 1) * sizeof *j.part);
    par_for(ntasks, nthreads, stats_task, &j);
    /* summed in task order: the same result for any thread count */
    double ss = 0, es = 0, emax = 0;
    float amin = INFINITY, amax = -INFINITY;
    for (int64_t t = 0; t < ntasks; t++) {
        ss += j.part[t].ss;
        es += j.part[t].es;
        emax = j.part[t].emax > emax ? j.part[t].emax : emax;
        amin = j.part[t].amin < amin ? j.part[t].amin : amin;
        amax = j.part[t].amax > amax ? j.part[t].amax : amax;
    }
    free(j.part);
    int64_t n = w->numel;
    st->absmax_min = w->nblocks ? amin : 0;
    st->absmax_max = w->nblocks ? amax : 0;
    st->rms = n ? sqrt(ss / (double)n) : 0;
    st->err_rms = n ? sqrt(es / (double)n) : 0;
    st->rel_err = st->rms > 0 ? st->err_rms / st->rms : 0;
    st->max_abs_err = emax;
    return 0;
}

/* ---- whole checkpoints ---------------------------------------------- */

int nf4_is_block_linear(const char *name, int ndim)
{
    static const char pre[] = "model.layers.", suf[] = "_proj.weight";
    size_t n = strlen(name), ls = sizeof suf - 1;
    if (ndim != 2 || strncmp(name, pre, sizeof pre - 1) != 0 || n < ls ||
        strcmp(name + n - ls, suf) != 0)
        return 0;
    const char *p = name + sizeof pre - 1;
    if (*p < '0' || *p > '9')
        return 0;
    while (*p >= '0' && *p <= '9')
        p++;
    return strncmp(p, ".self_attn.", 11) == 0 || strncmp(p, ".mlp.", 5) == 0;
}

/* Reads and checks config.json: a Llama causal LM, not yet quantized
 * (want_quantized 0) or quantized (1). */
static int read_config(const char *dir, int want_quantized, json_value **out)
{
    char *path = io_path_join(dir, "config.json");
    char *text = NULL;
    size_t len;
    int rc = -1;
    *out = NULL;
    if (io_read_file(path, &text, &len) != 0 ||
        json_parse(text, len, path, 1, out) != 0)
        goto done;
    if ((*out)->type != JSON_OBJECT) {
        msg_error("%s: not a JSON object", path);
        goto done;
    }
    const char *mt = json_get_string(*out, "model_type", NULL);
    const json_value *arch = json_get(*out, "architectures");
    int llama = mt && strcmp(mt, "llama") == 0;
    if (!mt && arch && arch->type == JSON_ARRAY)
        for (size_t i = 0; i < arch->u.array.n; i++)
            if (arch->u.array.items[i]->type == JSON_STRING &&
                strcmp(arch->u.array.items[i]->u.string.s,
                       "LlamaForCausalLM") == 0)
                llama = 1;
    if (!llama) {
        msg_error("%s: unsupported architecture '%s' (Llama only)", path,
                  mt ? mt : "unknown");
        goto done;
    }
    int quantized = json_get(*out, "quantization_config") != NULL;
    if (quantized != want_quantized) {
        msg_error(quantized ? "%s: the checkpoint is already quantized"
                            : "%s: the checkpoint is not quantized (no "
                              "quantization_config)",
                  path);
        goto done;
    }
    rc = 0;
done:
    if (rc != 0) {
        json_free(*out);
        *out = NULL;
    }
    free(text);
    free(path);
    return rc;
}

static void indent(strbuf *sb, int depth)
{
    sb_putc(sb, '\n');
    for (int i = 0; i < depth; i++)
        sb_puts(sb, "  ");
}

static int cmp_cstr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* JSON as Python's json.dumps(indent=2, sort_keys=True) writes it. */
static void pretty_value(strbuf *sb, const json_value *v, int depth)
{
    switch (v->type) {
    case JSON_NULL:
        sb_puts(sb, "null");
        break;
    case JSON_TRUE:
        sb_puts(sb, "true");
        break;
    case JSON_FALSE:
        sb_puts(sb, "false");
        break;
    case JSON_NUMBER:
        if (v->u.number.is_integer)
            sb_printf(sb, "%lld", (long long)v->u.number.integer);
        else
            nf4_append_py_float(sb, v->u.number.value);
        break;
    case JSON_STRING:
        json_append_string(sb, v->u.string.s, v->u.string.len);
        break;
    case JSON_ARRAY:
        if (v->u.array.n == 0) {
            sb_puts(sb, "[]");
            break;
        }
        sb_putc(sb, '[');
        for (size_t i = 0; i < v->u.array.n; i++) {
            indent(sb, depth + 1);
            pretty_value(sb, v->u.array.items[i], depth + 1);
            if (i + 1 < v->u.array.n)
                sb_putc(sb, ',');
        }
        indent(sb, depth);
        sb_putc(sb, ']');
        break;
    case JSON_OBJECT: {
        if (v->u.object.n == 0) {
            sb_puts(sb, "{}");
            break;
        }
        const char **keys = xmalloc(v->u.object.n * sizeof *keys);
        for (size_t i = 0; i < v->u.object.n; i++)
            keys[i] = v->u.object.keys[i];
        qsort(keys, v->u.object.n, sizeof *keys, cmp_cstr);
        sb_putc(sb, '{');
        for (size_t i = 0; i < v->u.object.n; i++) {
            if (i && strcmp(keys[i], keys[i - 1]) == 0)
                continue; /* duplicate key: json_get gives the last */
            if (i)
                sb_putc(sb, ',');
            indent(sb, depth + 1);
            json_append_string(sb, keys[i], strlen(keys[i]));
            sb_puts(sb, ": ");
            pretty_value(sb, json_get(v, keys[i]), depth + 1);
        }
        free(keys);
        indent(sb, depth);
        sb_putc(sb, '}');
        break;
    }
    }
}

/* Writes config.json: the input's keys sorted, "torch_dtype"/"dtype" set
 * to dtype_name, quantization_config replaced by qconfig (NULL: dropped). */
static int write_config(const char *dir, const json_value *cfg,
                        const char *dtype_name, const char *qconfig)
{
    size_t n = cfg->u.object.n;
    const char **keys = xmalloc((n + 2) * sizeof *keys);
    size_t k = 0;
    int has_dtype = 0;
    for (size_t i = 0; i < n; i++) {
        const char *key = cfg->u.object.keys[i];
        if (strcmp(key, "quantization_config") == 0)
            continue;
        if (strcmp(key, "torch_dtype") == 0 || strcmp(key, "dtype") == 0)
            has_dtype = 1;
        keys[k++] = key;
    }
    if (!has_dtype && dtype_name)
        keys[k++] = "torch_dtype";
    if (qconfig)
        keys[k++] = "quantization_config";
    qsort(keys, k, sizeof *keys, cmp_cstr);
    strbuf sb = STRBUF_INIT;
    sb_putc(&sb, '{');
    int first = 1;
    for (size_t i = 0; i < k; i++) {
        if (i && strcmp(keys[i], keys[i - 1]) == 0)
            continue;
        if (!first)
            sb_putc(&sb, ',');
        first = 0;
        indent(&sb, 1);
        json_append_string(&sb, keys[i], strlen(keys[i]));
        sb_puts(&sb, ": ");
        if (strcmp(keys[i], "quantization_config") == 0)
            sb_puts(&sb, qconfig);
        else if (dtype_name && (strcmp(keys[i], "torch_dtype") == 0 ||
                                strcmp(keys[i], "dtype") == 0))
            sb_printf(&sb, "\"%s\"", dtype_name);
        else
            pretty_value(&sb, json_get(cfg, keys[i]), 1);
    }
    sb_puts(&sb, "\n}\n");
    free(keys);
    char *path = io_path_join(dir, "config.json");
    io_writer *w = io_writer_open(path, IO_TEXT);
    free(path);
    int rc = -1;
    if (w) {
        io_write(w, sb.buf, sb.len);
        rc = io_writer_commit(w);
    }
    sb_free(&sb);
    return rc;
}

/* Tokenizer and generation files travel with the weights. */
static int copy_side_files(const char *from, const char *to)
{
    static const char *const files[] = {
        "tokenizer.model",       "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json",
        "added_tokens.json",     "generation_config.json",
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char *a = io_path_join(from, files[i]);
        char *b = io_path_join(to, files[i]);
        int rc = io_exists(a) ? io_copy_file(a, b) : 0;
        free(a);
        free(b);
        if (rc != 0)
            return -1;
    }
    return 0;
}

enum {
    E_KEEP,       /* a tensor copied as it is */
    E_PACKED,     /* X.weight: packed codes */
    E_ABSMAX_U8,  /* X.weight.absmax, nested */
    E_ABSMAX_F32, /* X.weight.absmax, not nested */
    E_QMAP,       /* X.weight.quant_map */
    E_NABSMAX,    /* X.weight.nested_absmax */
    E_NMAP,       /* X.weight.nested_quant_map */
    E_QSTATE,     /* X.weight.quant_state.bitsandbytes__nf4 */
    E_DEQ,        /* a dequantized weight */
};

typedef struct entry {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int kind;
    const st_tensor *src; /* E_KEEP */
    size_t w;             /* weight index for the others */
} entry;

typedef struct qweight {
    const st_tensor *t;
    float offset; /* nested: from the first pass */
    float *nested_absmax;
    int64_t nnb;
    size_t json_len;
} qweight;

/* The shard limit to give the writer: 0 (one model.safetensors, no index,
 * as save_pretrained writes a checkpoint that fits one shard) when
 * everything fits. */
static uint64_t shard_limit(const entry *e, size_t n, uint64_t limit)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t k = st_dtype_size(e[i].dtype);
        for (int d = 0; d < e[i].ndim; d++)
            k *= (uint64_t)e[i].shape[d];
        total += k;
    }
    return total <= limit ? 0 : limit;
}

static int cmp_entry(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    return st_serialize_cmp(x->dtype, x->name, y->dtype, y->name);
}

static void add_entry(entry **v, size_t *n, size_t *cap, const char *name,
                      const char *suffix, st_dtype dtype, int ndim,
                      const int64_t *shape, int kind, const st_tensor *src,
                      size_t w)
{
    if (*n == *cap) {
        *cap = *cap ? 2 * *cap : 64;
        *v = xrealloc(*v, *cap * sizeof **v);
    }
    entry *e = &(*v)[(*n)++];
    memset(e, 0, sizeof *e);
    e->name = suffixed(name, suffix);
    e->dtype = dtype;
    e->ndim = ndim;
    for (int d = 0; d < ndim; d++)
        e->shape[d] = shape[d];
    e->kind = kind;
    e->src = src;
    e->w = w;
}

static const char *kept_dtype_name(const st_model *m,
                                   int (*skip)(const st_tensor *))
{
    const char *name = NULL;
    for (size_t i = 0; i < m->n; i++) {
        const st_tensor *t = m->tensors[i];
        if (skip && skip(t))
            continue;
        const char *d = torch_dtype_name(t->dtype);
        if (strcmp(d, "?") == 0)
            continue;
        if (name && strcmp(name, d) != 0)
            return NULL; /* mixed: leave the config's own */
        name = d;
    }
    return name;
}

static int is_quantized_source(const st_tensor *t)
{
    return nf4_is_block_linear(t->name, t->ndim);
}

static double seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int is_rotary_buffer(const char *name)
{
    const char *s = strstr(name, "rotary_emb.inv_freq");
    return s && s[strlen("rotary_emb.inv_freq")] == '\0';
}

/* Pass 1 of one weight: block absmax, offset, nested absmax. */
typedef struct pass1_job {
    const nf4_ckpt_opts *o;
    qweight *ws;
} pass1_job;

static void pass1_task(void *ctx, int64_t i)
{
    const pass1_job *j = ctx;
    qweight *q = &j->ws[i];
    int64_t nb = nblocks_of(q->t->numel, j->o->blocksize);
    float *a = xmalloc((size_t)(nb ? nb : 1) * sizeof *a);
    q->nested_absmax = xmalloc((size_t)(q->nnb ? q->nnb : 1) * sizeof(float));
    nf4_block_absmax(q->t->data, q->t->dtype, q->t->numel, j->o->blocksize, a,
                     1);
    double_quant(a, nb, &q->offset, NULL, q->nested_absmax, 1);
    free(a);
    st_tensor_release(q->t);
}

/* Pass 2's quantization runs ahead of the writer: worker threads take whole
 * weights in file order (each weight on one thread, so there is no barrier
 * per weight to wait at when the machine is busy), at most `window` weights
 * past the one being written, so memory stays near a few weights. */
typedef struct qslot {
    nf4_weight w;
    nf4_stats st;
    int state; /* 0 waiting, 1 taken, 2 done, 3 failed */
} qslot;

typedef struct qpool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    const nf4_ckpt_opts *o;
    const qweight *ws;
    const size_t *order; /* weight index at each position */
    size_t n, next, limit;
    qslot *slot;
    int stop;
} qpool;

static void *qpool_worker(void *arg)
{
    qpool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && !(p->next < p->n && p->next < p->limit))
            pthread_cond_wait(&p->cv, &p->mu);
        if (p->stop)
            break;
        size_t pos = p->next++;
        p->slot[pos].state = 1;
        pthread_mutex_unlock(&p->mu);
        const st_tensor *t = p->ws[p->order[pos]].t;
        qslot *s = &p->slot[pos];
        /* NaN or infinity has no NF4 code (bitsandbytes would quietly
         * quantize the rest of the block): refused (issue 11) */
        int64_t bad = st_find_nonfinite(t->data, t->dtype, t->numel);
        int rc = bad >= 0
                     ? msg_error("tensor '%s' holds a non-finite value (NaN or "
                                 "infinity) at element %lld",
                                 t->name, (long long)bad)
                     : nf4_quantize(t->data, t->dtype, t->ndim, t->shape,
                                    p->o->blocksize, p->o->nested, 1, &s->w);
        if (rc == 0 && p->o->on_stats)
            nf4_error_stats(t->data, t->dtype, &s->w, 1, &s->st);
        st_tensor_release(t);
        pthread_mutex_lock(&p->mu);
        s->state = rc == 0 ? 2 : 3;
        pthread_cond_broadcast(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Waits for the weight at position pos (letting workers run `window`
 * ahead); NULL when its quantization failed. */
static qslot *qpool_get(qpool *p, size_t pos, size_t window)
{
    pthread_mutex_lock(&p->mu);
    if (pos + window > p->limit) {
        p->limit = pos + window;
        pthread_cond_broadcast(&p->cv);
    }
    while (p->slot[pos].state < 2)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    return p->slot[pos].state == 2 ? &p->slot[pos] : NULL;
}

static void qpool_stop(qpool *p, pthread_t *th, int nth)
{
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < nth; i++)
        pthread_join(th[i], NULL);
    for (size_t i = 0; i < p->n; i++)
        nf4_weight_free(&p->slot[i].w);
    free(p->slot);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
}

static int qpool_start(qpool *p, const nf4_ckpt_opts *o, const qweight *ws,
                       const size_t *order, size_t n, pthread_t *th, int nth)
{
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->o = o;
    p->ws = ws;
    p->order = order;
    p->n = n;
    p->slot = xcalloc(n ? n : 1, sizeof *p->slot);
    int started = 0;
    while (started < nth &&
           pthread_create(&th[started], NULL, qpool_worker, p) == 0)
        started++;
    if (started == 0) {
        msg_error("cannot start worker threads");
        qpool_stop(p, th, 0);
        return -1;
    }
    return started;
}

int nf4_quantize_checkpoint(const nf4_ckpt_opts *o)
{
    st_model *m = NULL;
    json_value *cfg = NULL;
    entry *ents = NULL;
    size_t ne = 0, cap = 0;
    qweight *ws = NULL;
    size_t nw = 0;
    char *tmp = NULL;
    st_writer *sw = NULL;
    size_t *order = NULL, *pos_of = NULL;
    qpool pool;
    pthread_t th[64];
    int nth = 0;
    int rc = -1;

    if (!nf4_blocksize_ok(o->blocksize))
        return msg_error("invalid block size %d (32, 64, ..., 4096)",
                         o->blocksize);
    if (read_config(o->in_dir, 0, &cfg) != 0 ||
        st_model_open(o->in_dir, &m) != 0)
        goto done;

    /* Plan: which tensors become what. */
    ws = xcalloc(m->n ? m->n : 1, sizeof *ws);
    for (size_t i = 0; i < m->n; i++) {
        const st_tensor *t = m->tensors[i];
        if (is_rotary_buffer(t->name))
            continue;
        if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16) {
            msg_error("%s: tensor '%s' has unsupported dtype %s (F32, F16 or "
                      "BF16)",
                      o->in_dir, t->name, st_dtype_name(t->dtype));
            goto done;
        }
        if (!nf4_is_block_linear(t->name, t->ndim)) {
            add_entry(&ents, &ne, &cap, t->name, "", t->dtype, t->ndim,
                      t->shape, E_KEEP, t, 0);
            continue;
        }
        qweight *q = &ws[nw];
        q->t = t;
        int64_t nb = nblocks_of(t->numel, o->blocksize);
        int64_t one = 1, packed[2] = {(t->numel + 1) / 2, 1}, n16 = 16,
                n256 = 256;
        add_entry(&ents, &ne, &cap, t->name, "", ST_U8, 2, packed, E_PACKED,
                  NULL, nw);
        add_entry(&ents, &ne, &cap, t->name, NF4_SUFFIX_QUANT_MAP, ST_F32, 1,
                  &n16, E_QMAP, NULL, nw);
        if (o->nested) {
            q->nnb = nblocks_of(nb, NF4_NESTED_BLOCKSIZE);
            add_entry(&ents, &ne, &cap, t->name, NF4_SUFFIX_ABSMAX, ST_U8, 1,
                      &nb, E_ABSMAX_U8, NULL, nw);
            add_entry(&ents, &ne, &cap, t->name, NF4_SUFFIX_NESTED_ABSMAX,
                      ST_F32, 1, &q->nnb, E_NABSMAX, NULL, nw);
            add_entry(&ents, &ne, &cap, t->name, NF4_SUFFIX_NESTED_QUANT_MAP,
                      ST_F32, 1, &n256, E_NMAP, NULL, nw);
        } else {
            add_entry(&ents, &ne, &cap, t->name, NF4_SUFFIX_ABSMAX, ST_F32, 1,
                      &nb, E_ABSMAX_F32, NULL, nw);
        }
        (void)one;
        nw++;
    }
    if (nw == 0) {
        msg_error("%s: no decoder-block linear weights to quantize", o->in_dir);
        goto done;
    }

    double t0 = seconds();
    /* Pass 1 (nested): the offsets, which the JSON sizes depend on, and the
     * small nested absmax arrays, which come early in the file. */
    if (o->nested) {
        pass1_job pj = {.o = o, .ws = ws};
        par_for((int64_t)nw, o->nthreads, pass1_task, &pj);
    }
    for (size_t i = 0; i < nw; i++) {
        qweight *q = &ws[i];
        q->json_len = nf4_quant_state_len(q->t->ndim, q->t->shape, q->t->dtype,
                                          o->blocksize, o->nested, q->offset);
        add_entry(&ents, &ne, &cap, q->t->name, NF4_SUFFIX_QUANT_STATE, ST_U8,
                  1, (int64_t[]){(int64_t)q->json_len}, E_QSTATE, NULL, i);
    }
    double t1 = seconds();
    msg_info("first pass (block absmax, offsets): %.2f s", t1 - t0);

    /* Pass 2 order: the weights as their packed codes come in the file. */
    qsort(ents, ne, sizeof *ents, cmp_entry);
    order = xmalloc(nw * sizeof *order);
    pos_of = xmalloc(nw * sizeof *pos_of);
    size_t np = 0;
    for (size_t i = 0; i < ne; i++)
        if (ents[i].kind == E_PACKED) {
            pos_of[ents[i].w] = np;
            order[np++] = ents[i].w;
        }
    int nt = threads_for(o->nthreads);
    size_t window = (size_t)nt + 1;
    nth = qpool_start(&pool, o, ws, order, nw, th, nt);
    if (nth < 0) {
        nth = 0;
        goto done;
    }

    if (!o->out_dir) {
        /* statistics only */
        for (size_t k = 0; k < nw; k++) {
            qslot *sl = qpool_get(&pool, k, window);
            if (!sl)
                goto done;
            if (o->on_stats)
                o->on_stats(o->ctx, ws[order[k]].t->name, &sl->w, &sl->st);
            nf4_weight_free(&sl->w);
        }
        rc = 0;
        goto done;
    }

    tmp = io_dir_begin(o->out_dir);
    if (!tmp)
        goto done;
    strbuf qc = STRBUF_INIT;
    sb_printf(&qc,
              "{\n    \"_load_in_4bit\": true,\n    \"_load_in_8bit\": "
              "false,\n    \"bnb_4bit_compute_dtype\": \"%s\",\n    "
              "\"bnb_4bit_quant_storage\": \"uint8\",\n    "
              "\"bnb_4bit_quant_type\": \"nf4\",\n    "
              "\"bnb_4bit_use_double_quant\": %s,\n    "
              "\"llm_int8_enable_fp32_cpu_offload\": false,\n    "
              "\"llm_int8_has_fp16_weight\": false,\n    "
              "\"llm_int8_skip_modules\": null,\n    "
              "\"llm_int8_threshold\": 6.0,\n    \"load_in_4bit\": "
              "true,\n    \"load_in_8bit\": false,\n    \"quant_method\": "
              "\"bitsandbytes\"\n  }",
              o->compute_dtype ? o->compute_dtype : "bfloat16",
              o->nested ? "true" : "false");
    int crc = write_config(tmp, cfg, kept_dtype_name(m, is_quantized_source),
                           sb_str(&qc));
    sb_free(&qc);
    if (crc != 0 || copy_side_files(o->in_dir, tmp) != 0)
        goto done;

    sw = st_writer_new(tmp, "model", shard_limit(ents, ne, o->shard_bytes));
    for (size_t i = 0; i < ne; i++)
        st_writer_declare(sw, ents[i].name, ents[i].dtype, ents[i].ndim,
                          ents[i].shape);
    st_writer_metadata(sw, "format", "pt");
    if (st_writer_begin(sw) != 0)
        goto done;
    const float *dmap = nf4_dynamic_map();
    for (size_t i = 0; i < ne; i++) {
        const entry *e = &ents[i];
        const qweight *q = &ws[e->w];
        int wr = 0;
        qslot *sl = NULL;
        if (e->kind == E_PACKED || e->kind == E_ABSMAX_U8 ||
            e->kind == E_QSTATE) {
            size_t pos = pos_of[e->w];
            if (!(sl = qpool_get(&pool, pos, window)))
                goto done;
            if (e->kind == E_PACKED) {
                if (o->nested && (sl->w.nested_offset != q->offset ||
                                  memcmp(sl->w.nested_absmax, q->nested_absmax,
                                         (size_t)q->nnb * sizeof(float)))) {
                    msg_error("internal error: passes disagree on '%s'",
                              q->t->name);
                    goto done;
                }
                if (o->on_stats)
                    o->on_stats(o->ctx, q->t->name, &sl->w, &sl->st);
            }
        }
        const nf4_weight *cur = sl ? &sl->w : NULL;
        switch (e->kind) {
        case E_KEEP:
            wr = st_writer_write(sw, e->src->data, e->src->nbytes);
            st_tensor_release(e->src);
            break;
        case E_PACKED:
            wr = st_writer_write(sw, cur->packed,
                                 (uint64_t)(cur->numel + 1) / 2);
            break;
        case E_ABSMAX_U8:
            wr = st_writer_write(sw, cur->absmax_code, (uint64_t)cur->nblocks);
            break;
        case E_QSTATE: {
            strbuf js = STRBUF_INIT;
            nf4_quant_state_json(cur, &js);
            wr = js.len == q->json_len
                     ? st_writer_write(sw, js.buf, js.len)
                     : msg_error("internal error: quant_state "
                                 "size of '%s'",
                                 q->t->name);
            sb_free(&js);
            nf4_weight_free(&sl->w); /* its last tensor: done with it */
            break;
        }
        case E_QMAP:
            wr = st_writer_write(sw, nf4_code, sizeof nf4_code);
            break;
        case E_NMAP:
            wr = st_writer_write(sw, dmap, 256 * sizeof(float));
            break;
        case E_NABSMAX:
            wr = st_writer_write(sw, q->nested_absmax,
                                 (uint64_t)q->nnb * sizeof(float));
            break;
        case E_ABSMAX_F32: {
            int64_t nb = nblocks_of(q->t->numel, o->blocksize);
            float *a = xmalloc((size_t)nb * sizeof *a);
            nf4_block_absmax(q->t->data, q->t->dtype, q->t->numel, o->blocksize,
                             a, o->nthreads);
            wr = st_writer_write(sw, a, (uint64_t)nb * sizeof *a);
            free(a);
            break;
        }
        }
        if (wr != 0)
            goto done;
    }
    double t2 = seconds();
    int frc = st_writer_finish(sw);
    sw = NULL;
    if (frc != 0)
        goto done;
    msg_info("second pass (quantize, write): %.2f s, flush to disk: %.2f s",
             t2 - t1, seconds() - t2);
    if (io_dir_commit(tmp, o->out_dir) != 0) {
        free(tmp);
        tmp = NULL;
        goto done;
    }
    free(tmp);
    tmp = NULL;
    rc = 0;
done:
    if (sw)
        st_writer_abort(sw);
    if (tmp) {
        io_dir_abort(tmp);
        free(tmp);
    }
    if (nth > 0)
        qpool_stop(&pool, th, nth);
    free(order);
    free(pos_of);
    for (size_t i = 0; i < ne; i++)
        free(ents[i].name);
    free(ents);
    for (size_t i = 0; i < nw; i++)
        free(ws[i].nested_absmax);
    free(ws);
    json_free(cfg);
    st_model_close(m);
    return rc;
}

static const char *const nf4_aux_suffix[] = {
    NF4_SUFFIX_ABSMAX,        NF4_SUFFIX_QUANT_MAP,
    NF4_SUFFIX_NESTED_ABSMAX, NF4_SUFFIX_NESTED_QUANT_MAP,
    NF4_SUFFIX_QUANT_STATE,
};

/* 1 when name is one of the auxiliary tensors of an NF4 weight in m. */
static int is_nf4_aux(const st_model *m, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof nf4_aux_suffix / sizeof *nf4_aux_suffix;
         i++) {
        size_t k = strlen(nf4_aux_suffix[i]);
        if (n > k && strcmp(name + n - k, nf4_aux_suffix[i]) == 0) {
            char *base = xstrndup(name, n - k);
            int yes = nf4_weight_present(m, base);
            free(base);
            if (yes)
                return 1;
        }
    }
    return 0;
}

typedef struct deq_job {
    const nf4_weight *w;
    int64_t first, len;
    float *dst;
} deq_job;

static void deq_task(void *ctx, int64_t t)
{
    const deq_job *j = ctx;
    int64_t s = t * 4096, l = j->len - s < 4096 ? j->len - s : 4096;
    nf4_dequantize(j->w, j->first + s, l, j->dst + s);
}

int nf4_dequantize_checkpoint(const char *in_dir, const char *out_dir,
                              st_dtype out_dtype, int nthreads,
                              uint64_t shard_bytes)
{
    st_model *m = NULL;
    json_value *cfg = NULL;
    entry *ents = NULL;
    size_t ne = 0, cap = 0;
    nf4_weight *ws = NULL;
    size_t nw = 0;
    char *tmp = NULL;
    st_writer *sw = NULL;
    float *fbuf = NULL;
    void *obuf = NULL;
    int rc = -1;

    if (out_dtype != ST_NDTYPES && out_dtype != ST_F32 &&
        out_dtype != ST_BF16 && out_dtype != ST_F16)
        return msg_error("cannot dequantize to %s", st_dtype_name(out_dtype));
    if (read_config(in_dir, 1, &cfg) != 0 || st_model_open(in_dir, &m) != 0)
        goto done;
    ws = xcalloc(m->n ? m->n : 1, sizeof *ws);
    const char *kept = NULL;
    int mixed = 0;
    for (size_t i = 0; i < m->n; i++) {
        const st_tensor *t = m->tensors[i];
        if (is_nf4_aux(m, t->name))
            continue;
        if (nf4_weight_present(m, t->name)) {
            nf4_weight *w = &ws[nw];
            if (nf4_weight_load(m, t->name, w) != 0)
                goto done;
            st_dtype d = out_dtype == ST_NDTYPES ? w->dtype : out_dtype;
            add_entry(&ents, &ne, &cap, t->name, "", d, w->ndim, w->shape,
                      E_DEQ, NULL, nw);
            nw++;
            continue;
        }
        add_entry(&ents, &ne, &cap, t->name, "", t->dtype, t->ndim, t->shape,
                  E_KEEP, t, 0);
        const char *d = torch_dtype_name(t->dtype);
        if (strcmp(d, "?") != 0) {
            if (kept && strcmp(kept, d) != 0)
                mixed = 1;
            kept = d;
        }
    }
    if (nw == 0) {
        msg_error("%s: no NF4 weights found", in_dir);
        goto done;
    }
    if (mixed)
        kept = NULL;
    if (!kept) /* no plain float tensors: name the weights' dtype */
        kept = torch_dtype_name(ents[0].kind == E_DEQ ? ents[0].dtype : ST_F32);

    tmp = io_dir_begin(out_dir);
    if (!tmp)
        goto done;
    if (write_config(tmp, cfg, kept, NULL) != 0 ||
        copy_side_files(in_dir, tmp) != 0)
        goto done;
    qsort(ents, ne, sizeof *ents, cmp_entry);
    sw = st_writer_new(tmp, "model", shard_limit(ents, ne, shard_bytes));
    for (size_t i = 0; i < ne; i++)
        st_writer_declare(sw, ents[i].name, ents[i].dtype, ents[i].ndim,
                          ents[i].shape);
    st_writer_metadata(sw, "format", "pt");
    if (st_writer_begin(sw) != 0)
        goto done;
    const int64_t chunk = 1 << 20;
    fbuf = xmalloc((size_t)chunk * sizeof *fbuf);
    obuf = xmalloc((size_t)chunk * sizeof(float));
    for (size_t i = 0; i < ne; i++) {
        const entry *e = &ents[i];
        if (e->kind == E_KEEP) {
            if (st_writer_write(sw, e->src->data, e->src->nbytes) != 0)
                goto done;
            st_tensor_release(e->src);
            continue;
        }
        const nf4_weight *w = &ws[e->w];
        for (int64_t i0 = 0; i0 < w->numel; i0 += chunk) {
            int64_t len = w->numel - i0 < chunk ? w->numel - i0 : chunk;
            deq_job dj = {.w = w, .first = i0, .len = len, .dst = fbuf};
            par_for((len + 4095) / 4096, nthreads, deq_task, &dj);
            size_t esz = st_dtype_size(e->dtype);
            if (e->dtype == ST_F32) {
                memcpy(obuf, fbuf, (size_t)len * 4);
            } else {
                uint16_t *h = obuf;
                for (int64_t k = 0; k < len; k++)
                    h[k] = e->dtype == ST_BF16 ? st_f32_to_bf16(fbuf[k])
                                               : st_f32_to_f16(fbuf[k]);
            }
            if (st_writer_write(sw, obuf, (uint64_t)len * esz) != 0)
                goto done;
        }
    }
    int frc = st_writer_finish(sw);
    sw = NULL;
    if (frc != 0)
        goto done;
    int crc = io_dir_commit(tmp, out_dir);
    free(tmp);
    tmp = NULL;
    if (crc != 0)
        goto done;
    rc = 0;
done:
    if (sw)
        st_writer_abort(sw);
    if (tmp) {
        io_dir_abort(tmp);
        free(tmp);
    }
    free(fbuf);
    free(obuf);
    for (size_t i = 0; i < nw; i++)
        nf4_weight_free(&ws[i]);
    free(ws);
    for (size_t i = 0; i < ne; i++)
        free(ents[i].name);
    free(ents);
    json_free(cfg);
    st_model_close(m);
    return rc;
}
