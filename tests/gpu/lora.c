/* lora.c: the LoRA products with the dropout fused (kernels/lora.cu)
 * against a double-precision reference on the same bf16 inputs and the
 * same counter-based mask as lib/lora.h (lora_rand_uniform): lh = xd A^T,
 * dA += dlh^T xd, dx += mask (dlh A) / (1 - p) into fp32 and bf16, for
 * every supported r, rows that are not a multiple of the 64-row tile, and
 * inputs wide or long enough that the sums are split over blocks; the keep
 * bits kn_lora_down leaves behind (the CPU's mask bit for bit) and grad_a
 * and dx reading them (the same bits as hashing); dA and dx in one pass
 * (kn_lora_grad_a_dx) against the separate kernels, bit for bit. --bench
 * times them against the unfused path (a dropout pass and cuBLAS). */
#include "gpu_test.h"
#include "lora.h"

#define TOL_MMA 1e-4 /* fp32 tensor-core sums of exact bf16 products */

static void one(int64_t n, int in, int r, float p, uint64_t key)
{
    int64_t nx = n * in, na = (int64_t)r * in, nd = n * r;
    float *x = gt_rand(nx, 2.0f), *A = gt_rand(na, 0.5f), *dlh = gt_rand(nd, 1.0f);
    float *ga0 = gt_rand(na, 0.1f), *dx0 = gt_rand(nx, 1.0f);
    gt_round_bf16(x, nx);
    gt_round_bf16(A, na);
    gt_round_bf16(dlh, nd);
    float inv = 1.0f / (1.0f - p);
    float *xd = malloc((size_t)nx * 4);
    unsigned char *keep = malloc((size_t)nx);
    for (int64_t i = 0; i < nx; i++) {
        keep[i] = lora_rand_uniform(key, (uint64_t)i) >= p;
        xd[i] = keep[i] ? ops_round_bf16(x[i] * inv) : 0.0f;
    }
    float *lh = malloc((size_t)nd * 4), *ga = malloc((size_t)na * 4);
    float *dx = malloc((size_t)nx * 4), *dxb0 = malloc((size_t)nx * 4);
    float *dxb = malloc((size_t)nx * 4);
    memcpy(dxb0, dx0, (size_t)nx * 4);
    gt_round_bf16(dxb0, nx);
    for (int64_t t = 0; t < n; t++)
        for (int k = 0; k < r; k++) {
            double s = 0;
            for (int j = 0; j < in; j++)
                s += (double)xd[t * in + j] * A[(int64_t)k * in + j];
            lh[t * r + k] = (float)s;
        }
    for (int k = 0; k < r; k++)
        for (int j = 0; j < in; j++) {
            double s = ga0[(int64_t)k * in + j];
            for (int64_t t = 0; t < n; t++)
                s += (double)dlh[t * r + k] * xd[t * in + j];
            ga[(int64_t)k * in + j] = (float)s;
        }
    for (int64_t t = 0; t < n; t++)
        for (int j = 0; j < in; j++) {
            double s = 0;
            for (int k = 0; k < r; k++)
                s += (double)dlh[t * r + k] * A[(int64_t)k * in + j];
            double u = keep[t * in + j] ? s * inv : 0.0;
            dx[t * in + j] = (float)(dx0[t * in + j] + u);
            dxb[t * in + j] = (float)(dxb0[t * in + j] + u);
        }

    kn_bf16 *d_x = gt_up_bf16(x, nx), *d_A = gt_up_bf16(A, na), *d_dlh = gt_up_bf16(dlh, nd);
    kn_bf16 *d_lh = gt_dev((size_t)nd * 2), *d_dxb = gt_up_bf16(dxb0, nx);
    float *d_ga = gt_up_f32(ga0, na), *d_dx = gt_up_f32(dx0, nx);
    size_t sb = kn_lora_scratch_bytes(n, r, in), nb = kn_lora_bits_bytes(n, in);
    void *scratch = sb ? gt_dev(sb) : NULL;
    uint8_t *d_bits = gt_dev(nb);
    kn_memset(d_lh, 0xff, (size_t)nd * 2, 0); /* NaN: every element must be written */
    kn_memset(d_bits, 0x5a, nb, 0);
    kn_lora_down(d_lh, d_bits, d_x, d_A, n, in, r, p, key, scratch, 0);
    kn_lora_grad_a(d_ga, NULL, d_dlh, d_x, n, in, r, p, key, scratch, 0);
    kn_lora_dx(d_dx, KN_F32, NULL, d_dlh, d_A, n, in, r, p, key, 0);
    kn_lora_dx(d_dxb, KN_BF16, d_bits, d_dlh, d_A, n, in, r, p, key, 0);
    float *g_lh = gt_down_bf16(d_lh, nd), *g_ga = gt_down_f32(d_ga, na);
    float *g_dx = gt_down_f32(d_dx, nx), *g_dxb = gt_down_bf16(d_dxb, nx);
    char what[192], tag[80];
    snprintf(tag, sizeof tag, "n=%lld in=%d r=%d p=%g", (long long)n, in, r, p);
    snprintf(what, sizeof what, "lora down lh = dropout(x) A^T %s", tag);
    gt_compare(what, g_lh, lh, nd, TOL_BF16_OUT, "TOL_BF16_OUT");
    snprintf(what, sizeof what, "lora grad A += dlh^T dropout(x) %s", tag);
    gt_compare(what, g_ga, ga, na, TOL_MMA, "TOL_MMA");
    snprintf(what, sizeof what, "lora dx += mask (dlh A) fp32 %s", tag);
    gt_compare(what, g_dx, dx, nx, TOL_MMA, "TOL_MMA");
    snprintf(what, sizeof what, "lora dx += mask (dlh A) bf16 %s", tag);
    gt_compare(what, g_dxb, dxb, nx, TOL_BF16_OUT, "TOL_BF16_OUT");
    /* the keep bits: the CPU's mask */
    uint8_t *hb = calloc(nb ? nb : 1, 1), *gb = malloc(nb ? nb : 1);
    for (int64_t i = 0; i < nx; i++)
        hb[i >> 3] |= (uint8_t)(keep[i] << (i & 7));
    kn_memcpy_d2h(gb, d_bits, nb, 0);
    snprintf(what, sizeof what, "lora down keep bits are the CPU's mask %s", tag);
    gt_check(memcmp(gb, hb, nb) == 0, what);
    free(hb);
    free(gb);
    /* grad_a and dx from the bits: the same numbers as hashing, twice */
    float *again = malloc((size_t)na * 4);
    kn_memcpy_h2d(d_ga, ga0, (size_t)na * 4, 0);
    kn_lora_grad_a(d_ga, d_bits, d_dlh, d_x, n, in, r, p, key, scratch, 0);
    kn_memcpy_d2h(again, d_ga, (size_t)na * 4, 0);
    snprintf(what, sizeof what, "lora grad A from the keep bits, deterministic %s", tag);
    gt_compare(what, again, g_ga, na, TOL_EXACT, "TOL_EXACT");
    free(again);
    again = malloc((size_t)nx * 4);
    kn_memcpy_h2d(d_dx, dx0, (size_t)nx * 4, 0);
    kn_lora_dx(d_dx, KN_F32, d_bits, d_dlh, d_A, n, in, r, p, key, 0);
    kn_memcpy_d2h(again, d_dx, (size_t)nx * 4, 0);
    snprintf(what, sizeof what, "lora dx from the keep bits, deterministic %s", tag);
    gt_compare(what, again, g_dx, nx, TOL_EXACT, "TOL_EXACT");
    free(again);
    /* dA and dx in one pass: the two passes' bits, hashing and from the
     * keep bits */
    for (int b = 0; b < 2; b++) {
        const uint8_t *bb = b ? d_bits : NULL;
        float *sep[2], *one_pass[2];
        kn_memcpy_h2d(d_ga, ga0, (size_t)na * 4, 0);
        kn_memcpy_h2d(d_dx, dx0, (size_t)nx * 4, 0);
        kn_lora_grad_a(d_ga, bb, d_dlh, d_x, n, in, r, p, key, scratch, 0);
        kn_lora_dx(d_dx, KN_F32, bb, d_dlh, d_A, n, in, r, p, key, 0);
        sep[0] = gt_down_f32(d_ga, na);
        sep[1] = gt_down_f32(d_dx, nx);
        kn_memcpy_h2d(d_ga, ga0, (size_t)na * 4, 0);
        kn_memcpy_h2d(d_dx, dx0, (size_t)nx * 4, 0);
        kn_lora_grad_a_dx(d_ga, d_dx, bb, d_dlh, d_x, d_A, n, in, r, p, key, scratch, 0);
        one_pass[0] = gt_down_f32(d_ga, na);
        one_pass[1] = gt_down_f32(d_dx, nx);
        snprintf(what, sizeof what, "lora dA and dx in one pass = two passes%s %s",
                 b ? " (keep bits)" : "", tag);
        gt_check(!memcmp(sep[0], one_pass[0], (size_t)na * 4) &&
                     !memcmp(sep[1], one_pass[1], (size_t)nx * 4),
                 what);
        free(sep[0]); free(sep[1]); free(one_pass[0]); free(one_pass[1]);
    }
    kn_free(d_bits);
    free(x); free(A); free(dlh); free(ga0); free(dx0); free(xd); free(keep);
    free(lh); free(ga); free(dx); free(dxb0); free(dxb);
    free(g_lh); free(g_ga); free(g_dx); free(g_dxb);
    kn_free(d_x); kn_free(d_A); kn_free(d_dlh); kn_free(d_lh); kn_free(d_dxb);
    kn_free(d_ga); kn_free(d_dx); kn_free(scratch);
}

/* --bench: the fused products against the unfused path at a 7B shape */
typedef struct {
    kn_bf16 *x, *A, *dlh, *lh, *xd, *tmp;
    float *ga, *dx;
    void *scratch;
    uint8_t *bits;
    int64_t n;
    int in, r;
} bench_ctx;

static const float BP = 0.1f;
static const uint64_t BKEY = 0x1234;

static void b_down(void *p)
{
    bench_ctx *c = p;
    kn_lora_down(c->lh, c->bits, c->x, c->A, c->n, c->in, c->r, BP, BKEY, c->scratch, 0);
}
static void b_down_ref(void *p)
{
    bench_ctx *c = p;
    kn_dropout_forward(c->xd, c->x, c->n * c->in, BP, BKEY, 0, 0);
    kn_gemm(0, 1, (int)c->n, c->r, c->in, 1.0f, c->xd, c->in, c->A, c->in, 0.0f, c->lh, KN_BF16,
            c->r, 0);
}
static void b_grad(void *p)
{
    bench_ctx *c = p;
    kn_lora_grad_a(c->ga, NULL, c->dlh, c->x, c->n, c->in, c->r, BP, BKEY, c->scratch, 0);
}
static void b_grad_bits(void *p)
{
    bench_ctx *c = p;
    kn_lora_grad_a(c->ga, c->bits, c->dlh, c->x, c->n, c->in, c->r, BP, BKEY, c->scratch, 0);
}
static void b_grad_ref(void *p)
{
    bench_ctx *c = p;
    kn_dropout_forward(c->xd, c->x, c->n * c->in, BP, BKEY, 0, 0);
    kn_gemm(1, 0, c->r, c->in, (int)c->n, 1.0f, c->dlh, c->r, c->xd, c->in, 1.0f, c->ga, KN_F32,
            c->in, 0);
}
static void b_dx(void *p)
{
    bench_ctx *c = p;
    kn_lora_dx(c->dx, KN_F32, NULL, c->dlh, c->A, c->n, c->in, c->r, BP, BKEY, 0);
}
static void b_dx_bits(void *p)
{
    bench_ctx *c = p;
    kn_lora_dx(c->dx, KN_F32, c->bits, c->dlh, c->A, c->n, c->in, c->r, BP, BKEY, 0);
}
static void b_dx_ref(void *p)
{
    bench_ctx *c = p;
    kn_gemm(0, 0, (int)c->n, c->in, c->r, 1.0f, c->dlh, c->r, c->A, c->in, 0.0f, c->tmp, KN_BF16,
            c->in, 0);
    kn_dropout_backward_add(c->dx, KN_F32, c->tmp, c->n * c->in, BP, BKEY, 0, 0);
}

static void b_grad_dx(void *p)
{
    bench_ctx *c = p;
    kn_lora_grad_a_dx(c->ga, c->dx, NULL, c->dlh, c->x, c->A, c->n, c->in, c->r, BP, BKEY,
                      c->scratch, 0);
}

static void bench(int64_t n, int in, int r)
{
    int64_t nx = n * in;
    float *h = gt_rand(nx, 1.0f);
    bench_ctx c = {0};
    c.n = n;
    c.in = in;
    c.r = r;
    c.x = gt_up_bf16(h, nx);
    c.A = gt_up_bf16(h, (int64_t)r * in);
    c.dlh = gt_up_bf16(h, n * r);
    c.lh = gt_dev((size_t)(n * r) * 2);
    c.xd = gt_dev((size_t)nx * 2);
    c.tmp = gt_dev((size_t)nx * 2);
    c.ga = gt_up_f32(h, (int64_t)r * in);
    c.dx = gt_up_f32(h, nx);
    size_t sb = kn_lora_scratch_bytes(n, r, in);
    c.scratch = sb ? gt_dev(sb) : NULL;
    c.bits = gt_dev(kn_lora_bits_bytes(n, in));
    char what[96];
    double xb = (double)nx * 2;
    snprintf(what, sizeof what, "lora down fused n=%lld in=%d r=%d", (long long)n, in, r);
    gt_time(what, b_down, &c, xb, 1);
    snprintf(what, sizeof what, "lora down unfused n=%lld in=%d r=%d", (long long)n, in, r);
    gt_time(what, b_down_ref, &c, xb, 1);
    snprintf(what, sizeof what, "lora grad A fused n=%lld in=%d r=%d", (long long)n, in, r);
    gt_time(what, b_grad, &c, xb, 1);
    snprintf(what, sizeof what, "lora grad A fused, keep bits n=%lld in=%d r=%d", (long long)n,
             in, r);
    gt_time(what, b_grad_bits, &c, xb, 1);
    snprintf(what, sizeof what, "lora grad A unfused n=%lld in=%d r=%d", (long long)n, in, r);
    gt_time(what, b_grad_ref, &c, xb, 1);
    snprintf(what, sizeof what, "lora dx fp32 fused n=%lld in=%d r=%d", (long long)n, in, r);
    gt_time(what, b_dx, &c, xb * 4, 1);
    snprintf(what, sizeof what, "lora dx fp32 fused, keep bits n=%lld in=%d r=%d", (long long)n,
             in, r);
    gt_time(what, b_dx_bits, &c, xb * 4, 1);
    snprintf(what, sizeof what, "lora dx fp32 unfused n=%lld in=%d r=%d", (long long)n, in, r);
    gt_time(what, b_dx_ref, &c, xb * 4, 1);
    snprintf(what, sizeof what, "lora grad A and dx fp32 in one pass n=%lld in=%d r=%d",
             (long long)n, in, r);
    gt_time(what, b_grad_dx, &c, xb * 5, 1);

    free(h);
    kn_free(c.x); kn_free(c.A); kn_free(c.dlh); kn_free(c.lh); kn_free(c.xd);
    kn_free(c.tmp); kn_free(c.ga); kn_free(c.dx); kn_free(c.scratch); kn_free(c.bits);
}

int main(int argc, char **argv)
{
    gt_init("lora", argc, argv);
    gt_seed(12);
    gt_check(!kn_lora_fusable(8, 64) && !kn_lora_fusable(64, 172) && kn_lora_fusable(64, 11008),
             "lora fusable shapes: r in {16, 32, 64, 128}, in a multiple of 64");
    one(1, 64, 16, 0.1f, lora_dropout_stream(5, 0, LLAMA_Q));
    one(300, 128, 64, 0.1f, lora_dropout_stream(77, 3, LLAMA_V));
    one(77, 1088, 32, 0.5f, lora_dropout_stream(9, 1, LLAMA_DOWN));   /* split over in */
    one(2100, 192, 128, 0.1f, lora_dropout_stream(3, 2, LLAMA_GATE)); /* split over tokens */
    one(130, 64, 16, 0.0f, 42);
    one(3000, 256, 64, 0.1f, lora_dropout_stream(11, 4, LLAMA_Q));   /* 3 token splits */
    one(1100, 4096, 64, 0.1f, lora_dropout_stream(2, 31, LLAMA_V));  /* 7B width */
    if (gt_bench) {
        bench(12288, 4096, 64);
        bench(12288, 11008, 64);
    }
    return gt_done();
}
