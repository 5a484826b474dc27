/* swiglu.c: SwiGLU forward and backward against ops_swiglu_*, even and odd
 * element counts. */
#include "gpu_test.h"

typedef struct { kn_bf16 *h, *g, *u, *dg, *du; int64_t n; } bench_ctx;
static void bench_fwd(void *p)
{
    bench_ctx *c = p;
    kn_swiglu_forward(c->h, c->g, c->u, c->n, 0);
}
static void bench_bwd(void *p)
{
    bench_ctx *c = p;
    kn_swiglu_backward(c->dg, c->du, c->h, c->g, c->u, c->n, 0);
}

static void one(int64_t n)
{
    float *g = gt_rand(n, 4.0f), *u = gt_rand(n, 2.0f), *dh = gt_rand(n, 1.0f);
    gt_round_bf16(g, n);
    gt_round_bf16(u, n);
    gt_round_bf16(dh, n);
    float *h = malloc((size_t)n * 4), *dg = malloc((size_t)n * 4), *du = malloc((size_t)n * 4);
    ops_swiglu_forward(h, g, u, n);
    ops_swiglu_backward(dg, du, dh, g, u, n);
    kn_bf16 *d_g = gt_up_bf16(g, n), *d_u = gt_up_bf16(u, n), *d_dh = gt_up_bf16(dh, n);
    kn_bf16 *d_h = gt_dev((size_t)n * 2), *d_dg = gt_dev((size_t)n * 2), *d_du = gt_dev((size_t)n * 2);
    kn_swiglu_forward(d_h, d_g, d_u, n, 0);
    kn_swiglu_backward(d_dg, d_du, d_dh, d_g, d_u, n, 0);
    float *gh = gt_down_bf16(d_h, n), *gdg = gt_down_bf16(d_dg, n), *gdu = gt_down_bf16(d_du, n);
    char what[64];
    snprintf(what, sizeof what, "swiglu forward n=%lld", (long long)n);
    gt_compare(what, gh, h, n, TOL_BF16_OUT, "TOL_BF16_OUT");
    snprintf(what, sizeof what, "swiglu backward dg n=%lld", (long long)n);
    gt_compare(what, gdg, dg, n, TOL_BF16_OUT, "TOL_BF16_OUT");
    snprintf(what, sizeof what, "swiglu backward du n=%lld", (long long)n);
    gt_compare(what, gdu, du, n, TOL_BF16_OUT, "TOL_BF16_OUT");
    if (gt_bench && n >= 1 << 24) {
        bench_ctx c = {d_h, d_g, d_u, d_dg, d_du, n};
        gt_time("swiglu forward", bench_fwd, &c, n * 6.0, 1);
        gt_time("swiglu backward", bench_bwd, &c, n * 10.0, 1);
    }
    free(g); free(u); free(dh); free(h); free(dg); free(du);
    free(gh); free(gdg); free(gdu);
    kn_free(d_g); kn_free(d_u); kn_free(d_dh); kn_free(d_h); kn_free(d_dg); kn_free(d_du);
}

int main(int argc, char **argv)
{
    gt_init("swiglu", argc, argv);
    gt_seed(5);
    one(1);
    one(2);
    one(301 * 172);
    one(1000001);
    if (gt_bench)
        one((int64_t)12288 * 11008);
    return gt_done();
}
