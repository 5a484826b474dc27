/* rope.c: rotate_half RoPE forward and inverse against llama_rope
 * (lib/llama_cpu.c), positions restarting per document, and the inverse
 * undoing the forward. */
#include "gpu_test.h"
#include "llama.h"

static void one(int64_t n, int nh, int hd, int maxdoc, float theta)
{
    int64_t ne = n * nh * hd;
    float *x = gt_rand(ne, 1.0f);
    gt_round_bf16(x, ne);
    int32_t *start = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4);
    gt_docs(start, pos, n, maxdoc);
    for (int inverse = 0; inverse < 2; inverse++) {
        float *ref = malloc((size_t)ne * 4);
        memcpy(ref, x, (size_t)ne * 4);
        for (int64_t t = 0; t < n; t++)
            for (int h = 0; h < nh; h++)
                llama_rope(ref + (t * nh + h) * hd, hd, pos[t], theta, inverse);
        kn_bf16 *d = gt_up_bf16(x, ne);
        int32_t *dpos = gt_up(pos, (size_t)n * 4);
        if (inverse)
            kn_rope_backward(d, dpos, n, nh, hd, theta, 0);
        else
            kn_rope_forward(d, dpos, n, nh, hd, theta, 0);
        float *got = gt_down_bf16(d, ne);
        char what[128];
        snprintf(what, sizeof what, "rope %s n=%lld nh=%d hd=%d docs<=%d",
                 inverse ? "backward" : "forward", (long long)n, nh, hd, maxdoc);
        gt_compare(what, got, ref, ne, TOL_BF16_OUT, "TOL_BF16_OUT");
        if (!inverse) {
            kn_rope_backward(d, dpos, n, nh, hd, theta, 0);
            float *back = gt_down_bf16(d, ne);
            snprintf(what, sizeof what, "rope backward(forward(x)) = x hd=%d", hd);
            gt_compare(what, back, x, ne, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");
            free(back);
        }
        free(ref); free(got);
        kn_free(d); kn_free(dpos);
    }
    free(x); free(start); free(pos);
}

int main(int argc, char **argv)
{
    gt_init("rope", argc, argv);
    gt_seed(4);
    one(1, 1, 8, 1, 10000.0f);
    one(300, 8, 8, 60, 10000.0f);     /* stories260K heads */
    one(129, 4, 64, 129, 10000.0f);
    one(2048, 2, 128, 2048, 10000.0f); /* positions up to 2047 */
    one(77, 3, 6, 20, 500000.0f);
    return gt_done();
}
