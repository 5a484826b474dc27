/* gemm.c: the cuBLASLt wrapper against a double-precision product of the
 * same bf16 inputs: every transpose combination, bf16 and fp32 outputs,
 * beta 0 and 1, a separate output D, odd sizes and leading dimensions. */
#include "gpu_test.h"

/* ref (m, n) = alpha op(A) op(B) + beta C, all row-major. */
static void ref_gemm(float *out, int ta, int tb, int m, int n, int k,
                     float alpha, const float *A, int lda, const float *B,
                     int ldb, float beta, const float *C, int ldc)
{
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int p = 0; p < k; p++) {
                double a = ta ? A[(int64_t)p * lda + i] : A[(int64_t)i * lda + p];
                double b = tb ? B[(int64_t)j * ldb + p] : B[(int64_t)p * ldb + j];
                s += a * b;
            }
            out[(int64_t)i * n + j] =
                (float)(alpha * s + (beta != 0.0f ? beta * C[(int64_t)i * ldc + j] : 0.0));
        }
}

static void one(int ta, int tb, int m, int n, int k, int pad, float beta,
                kn_dtype ct, int separate)
{
    int lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
    int64_t na = (int64_t)(ta ? k : m) * lda, nb = (int64_t)(tb ? n : k) * ldb;
    int64_t nc = (int64_t)m * ldc;
    float *A = gt_rand(na, 1.0f), *B = gt_rand(nb, 1.0f), *C = gt_rand(nc, 1.0f);
    gt_round_bf16(A, na);
    gt_round_bf16(B, nb);
    if (ct == KN_BF16)
        gt_round_bf16(C, nc);
    float *ref = malloc((size_t)m * n * sizeof *ref);
    float alpha = 0.75f;
    ref_gemm(ref, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    kn_bf16 *dA = gt_up_bf16(A, na), *dB = gt_up_bf16(B, nb);
    void *dC = ct == KN_BF16 ? (void *)gt_up_bf16(C, nc) : (void *)gt_up_f32(C, nc);
    void *dD = separate ? gt_dev((size_t)nc * (ct == KN_BF16 ? 2 : 4)) : dC;
    kn_gemm_ex(ta, tb, m, n, k, alpha, dA, lda, dB, ldb, beta, dC, dD, ct, ldc, 0);
    float *got = ct == KN_BF16 ? gt_down_bf16(dD, nc) : gt_down_f32(dD, nc);
    float *packed = malloc((size_t)m * n * sizeof *packed);
    for (int i = 0; i < m; i++)
        memcpy(packed + (int64_t)i * n, got + (int64_t)i * ldc, (size_t)n * sizeof *got);
    char what[160];
    snprintf(what, sizeof what, "gemm ta=%d tb=%d m=%d n=%d k=%d pad=%d beta=%g %s%s",
             ta, tb, m, n, k, pad, beta, ct == KN_BF16 ? "bf16" : "f32",
             separate ? " D!=C" : "");
    gt_compare(what, packed, ref, (int64_t)m * n,
               ct == KN_BF16 ? TOL_BF16_OUT : TOL_F32, ct == KN_BF16 ? "TOL_BF16_OUT" : "TOL_F32");
    free(A); free(B); free(C); free(ref); free(got); free(packed);
    kn_free(dA); kn_free(dB); kn_free(dC);
    if (separate)
        kn_free(dD);
}

typedef struct { int m, n, k; kn_bf16 *a, *b, *c; } bench_ctx;

static void bench_fn(void *p)
{
    bench_ctx *c = p;
    kn_gemm(0, 1, c->m, c->n, c->k, 1.0f, c->a, c->k, c->b, c->k, 0.0f, c->c,
            KN_BF16, c->n, 0);
}

int main(int argc, char **argv)
{
    gt_init("gemm", argc, argv);
    gt_seed(1);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            one(ta, tb, 64, 48, 32, 0, 0.0f, KN_BF16, 0);
            one(ta, tb, 37, 53, 91, 0, 0.0f, KN_F32, 0);
            one(ta, tb, 128, 72, 200, 8, 1.0f, KN_F32, 0);
            one(ta, tb, 16, 64, 8, 0, 1.0f, KN_BF16, 1);
        }
    one(0, 1, 300, 172, 64, 0, 1.0f, KN_BF16, 0);   /* stories260K MLP */
    one(0, 0, 7, 3, 5, 0, 0.0f, KN_F32, 0);         /* tiny, odd */
    if (gt_bench) {
        int shapes[][3] = {{12288, 4096, 4096}, {12288, 11008, 4096},
                           {12288, 4096, 11008}, {8192, 8192, 8192}};
        for (int i = 0; i < 4; i++) {
            bench_ctx c = {shapes[i][0], shapes[i][1], shapes[i][2], 0, 0, 0};
            int64_t na = (int64_t)c.m * c.k, nb = (int64_t)c.n * c.k;
            float *h = gt_rand(na > nb ? na : nb, 1.0f);
            c.a = gt_up_bf16(h, na);
            c.b = gt_up_bf16(h, nb);
            c.c = gt_dev((size_t)c.m * c.n * 2);
            char what[64];
            snprintf(what, sizeof what, "gemm %dx%dx%d bf16", c.m, c.n, c.k);
            gt_time(what, bench_fn, &c, 2.0 * c.m * c.n * c.k, 0);
            kn_free(c.a); kn_free(c.b); kn_free(c.c);
            free(h);
        }
    }
    return gt_done();
}
