/* dropout.c: LoRA dropout on the GPU against lib/lora.h's counter-based
 * stream (lora_rand_uniform): the same mask bit for bit, forward and the
 * backward accumulation, and a keep rate near 1 - p. */
#include "gpu_test.h"
#include "lora.h"

static void one(int64_t n, int in, float p, uint64_t key)
{
    int64_t ne = n * in;
    float *x = gt_rand(ne, 2.0f), *g = gt_rand(ne, 1.0f), *dx0 = gt_rand(ne, 1.0f);
    gt_round_bf16(x, ne);
    gt_round_bf16(g, ne);
    float inv = 1.0f / (1.0f - p);
    float *ref = malloc((size_t)ne * 4), *refb = malloc((size_t)ne * 4);
    int64_t kept = 0;
    for (int64_t i = 0; i < ne; i++) {
        int keep = lora_rand_uniform(key, (uint64_t)i) >= p;
        kept += keep;
        ref[i] = keep ? ops_round_bf16(x[i] * inv) : 0.0f;
        refb[i] = keep ? dx0[i] + g[i] * inv : dx0[i];
    }
    kn_bf16 *dxin = gt_up_bf16(x, ne), *dxd = gt_dev((size_t)ne * 2), *dg = gt_up_bf16(g, ne);
    float *ddx = gt_up_f32(dx0, ne);
    kn_dropout_forward(dxd, dxin, ne, p, key, 0, 0);
    kn_dropout_backward_add(ddx, KN_F32, dg, ne, p, key, 0, 0);
    kn_bf16 *ddxb = gt_up_bf16(dx0, ne);
    /* the bf16 accumulation in two slices: rows [0, n/2) and the rest */
    int64_t half = (n / 2) * in;
    kn_dropout_backward_add(ddxb, KN_BF16, dg, half, p, key, 0, 0);
    kn_dropout_backward_add(ddxb + half, KN_BF16, dg + half, ne - half, p, key,
                            (uint64_t)half, 0);
    float *gotc = gt_down_bf16(ddxb, ne);
    float *got = gt_down_bf16(dxd, ne), *gotb = gt_down_f32(ddx, ne);
    char what[96];
    snprintf(what, sizeof what, "dropout forward n=%lld in=%d p=%g", (long long)n, in, p);
    gt_compare(what, got, ref, ne, TOL_EXACT, "TOL_EXACT");
    snprintf(what, sizeof what, "dropout backward add n=%lld in=%d p=%g", (long long)n, in, p);
    gt_compare(what, gotb, refb, ne, TOL_F32, "TOL_F32");
    snprintf(what, sizeof what, "dropout backward add bf16, two slices n=%lld in=%d p=%g",
             (long long)n, in, p);
    gt_compare(what, gotc, refb, ne, TOL_BF16_OUT, "TOL_BF16_OUT");
    free(gotc);
    kn_free(ddxb);
    /* a slice of rows [n/3, n) with first = its element offset */
    int64_t off = (n / 3) * in;
    kn_dropout_forward(dxd, dxin + off, ne - off, p, key, (uint64_t)off, 0);
    float *gs = gt_down_bf16(dxd, ne - off);
    snprintf(what, sizeof what, "dropout forward of a row slice n=%lld in=%d p=%g",
             (long long)n, in, p);
    gt_compare(what, gs, ref + off, ne - off, TOL_EXACT, "TOL_EXACT");
    free(gs);
    if (ne >= 10000) {
        double rate = (double)kept / ne;
        snprintf(what, sizeof what, "dropout keep rate %.4f near %.4f", rate, 1.0 - p);
        gt_check(fabs(rate - (1.0 - p)) < 0.01, what);
    }
    free(x); free(g); free(dx0); free(ref); free(refb); free(got); free(gotb);
    kn_free(dxin); kn_free(dxd); kn_free(dg); kn_free(ddx);
}

int main(int argc, char **argv)
{
    gt_init("dropout", argc, argv);
    gt_seed(8);
    one(1, 1, 0.1f, 1);
    one(37, 64, 0.1f, lora_dropout_stream(12345, 3, LLAMA_V));
    one(300, 172, 0.5f, lora_dropout_stream(7, 0, LLAMA_DOWN));
    one(100, 333, 0.0f, 99);
    return gt_done();
}
