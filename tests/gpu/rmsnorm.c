/* rmsnorm.c: RMSNorm forward against llama_rmsnorm (lib/llama_cpu.c) and
 * backward against ops_rmsnorm_backward, on bf16-valued inputs; the
 * register kernels (rows up to 4096) against the general ones, bit for
 * bit. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "gpu_test.h"
#include "llama.h"

#include <stdlib.h>
#include <string.h>

typedef struct { kn_bf16 *y, *x; float *rstd, *w, *dx, *dy; int64_t n; int d; kn_bf16 *dxb; } bench_ctx;
static void bench_fwd(void *p)
{
    bench_ctx *c = p;
    kn_rmsnorm_forward(c->y, c->rstd, c->x, c->w, c->n, c->d, 1e-5f, 0);
}
static void bench_bwd(void *p)
{
    bench_ctx *c = p;
    kn_rmsnorm_backward(c->dx, c->dxb, c->dy, c->x, c->w, c->rstd, c->n, c->d, 1, 0);
}

static void one(int64_t n, int d)
{
    float eps = 1e-5f;
    float *x = gt_rand(n * d, 2.0f), *w = gt_rand(d, 0.5f);
    for (int i = 0; i < d; i++)
        w[i] += 1.0f;
    gt_round_bf16(x, n * d);
    float *y = malloc((size_t)(n * d) * 4), *rstd = malloc((size_t)n * 4);
    llama_rmsnorm(y, rstd, x, w, n, d, eps);
    kn_bf16 *dx_in = gt_up_bf16(x, n * d), *dy_out = gt_dev((size_t)(n * d) * 2);
    float *dw = gt_up_f32(w, d), *drstd = gt_dev((size_t)n * 4);
    kn_rmsnorm_forward(dy_out, drstd, dx_in, dw, n, d, eps, 0);
    float *gy = gt_down_bf16(dy_out, n * d), *gr = gt_down_f32(drstd, n);
    char what[96];
    snprintf(what, sizeof what, "rmsnorm forward n=%lld d=%d", (long long)n, d);
    gt_compare(what, gy, y, n * d, TOL_BF16_OUT, "TOL_BF16_OUT");
    snprintf(what, sizeof what, "rmsnorm rstd n=%lld d=%d", (long long)n, d);
    gt_compare(what, gr, rstd, n, TOL_F32, "TOL_F32");

    float *gdy = gt_rand(n * d, 1.0f), *dx0 = gt_rand(n * d, 1.0f);
    float *ref = malloc((size_t)(n * d) * 4);
    ops_rmsnorm_backward(ref, gdy, x, w, rstd, n, d);
    for (int64_t i = 0; i < n * d; i++)
        ref[i] += dx0[i];
    float *ddy = gt_up_f32(gdy, n * d), *ddx = gt_up_f32(dx0, n * d);
    kn_bf16 *ddxb = gt_dev((size_t)(n * d) * 2);
    kn_rmsnorm_backward(ddx, ddxb, ddy, dx_in, dw, drstd, n, d, 1, 0);
    float *gdx = gt_down_f32(ddx, n * d), *gdxb = gt_down_bf16(ddxb, n * d);
    snprintf(what, sizeof what, "rmsnorm backward (accumulate) n=%lld d=%d", (long long)n, d);
    gt_compare(what, gdx, ref, n * d, TOL_F32, "TOL_F32");
    snprintf(what, sizeof what, "rmsnorm backward bf16 copy n=%lld d=%d", (long long)n, d);
    gt_compare(what, gdxb, ref, n * d, TOL_BF16_OUT, "TOL_BF16_OUT");
    /* in place, overwriting: dx = dy */
    float *dcopy = gt_up_f32(gdy, n * d);
    kn_rmsnorm_backward(dcopy, NULL, dcopy, dx_in, dw, drstd, n, d, 0, 0);
    float *gin = gt_down_f32(dcopy, n * d);
    ops_rmsnorm_backward(ref, gdy, x, w, rstd, n, d);
    snprintf(what, sizeof what, "rmsnorm backward in place n=%lld d=%d", (long long)n, d);
    gt_compare(what, gin, ref, n * d, TOL_F32, "TOL_F32");
    free(gin); free(gdxb);
    kn_free(dcopy); kn_free(ddxb);
    if (gt_bench && n * d >= 1 << 24) {
        bench_ctx c = {dy_out, dx_in, drstd, dw, ddx, ddy, n, d, NULL};
        gt_time("rmsnorm forward", bench_fwd, &c, (double)n * d * 4, 1);
        gt_time("rmsnorm backward", bench_bwd, &c, (double)n * d * 14, 1);
        setenv("KN_RMSNORM_REG", "0", 1);
        gt_time("rmsnorm forward, general kernel", bench_fwd, &c, (double)n * d * 4, 1);
        gt_time("rmsnorm backward, general kernel", bench_bwd, &c, (double)n * d * 14, 1);
        unsetenv("KN_RMSNORM_REG");
    }
    free(x); free(w); free(y); free(rstd); free(gy); free(gr);
    free(gdy); free(dx0); free(ref); free(gdx);
    kn_free(dx_in); kn_free(dy_out); kn_free(dw); kn_free(drstd);
    kn_free(ddy); kn_free(ddx);
}

/* The forward and backward (accumulating, and in place) with the register
 * kernels and with the general ones (KN_RMSNORM_REG=0): the same bits. */
static void same_bits(int64_t n, int d)
{
    float *x = gt_rand(n * d, 2.0f), *w = gt_rand(d, 0.5f), *gdy = gt_rand(n * d, 1.0f);
    float *dx0 = gt_rand(n * d, 1.0f);
    kn_bf16 *dxin = gt_up_bf16(x, n * d);
    float *dw = gt_up_f32(w, d);
    size_t nb = (size_t)(n * d);
    void *out[2][5];
    for (int v = 0; v < 2; v++) {
        if (v)
            setenv("KN_RMSNORM_REG", "0", 1);
        kn_bf16 *y = gt_dev(nb * 2), *dxb = gt_dev(nb * 2);
        float *rstd = gt_dev((size_t)n * 4), *ddy = gt_up_f32(gdy, n * d);
        float *ddx = gt_up_f32(dx0, n * d), *dip = gt_up_f32(gdy, n * d);
        kn_rmsnorm_forward(y, rstd, dxin, dw, n, d, 1e-5f, 0);
        kn_rmsnorm_backward(ddx, dxb, ddy, dxin, dw, rstd, n, d, 1, 0);
        kn_rmsnorm_backward(dip, NULL, dip, dxin, dw, rstd, n, d, 0, 0);
        out[v][0] = gt_down_bf16(y, n * d);
        out[v][1] = gt_down_f32(rstd, n);
        out[v][2] = gt_down_f32(ddx, n * d);
        out[v][3] = gt_down_bf16(dxb, n * d);
        out[v][4] = gt_down_f32(dip, n * d);
        kn_free(y); kn_free(dxb); kn_free(rstd); kn_free(ddy); kn_free(ddx); kn_free(dip);
    }
    unsetenv("KN_RMSNORM_REG");
    size_t sz[5] = {nb * 4, (size_t)n * 4, nb * 4, nb * 4, nb * 4};
    const char *nm[5] = {"forward", "rstd", "backward", "backward bf16 copy", "backward in place"};
    for (int k = 0; k < 5; k++) {
        char what[128];
        snprintf(what, sizeof what, "rmsnorm %s n=%lld d=%d: register kernel bit for bit",
                 nm[k], (long long)n, d);
        gt_check(memcmp(out[0][k], out[1][k], sz[k]) == 0, what);
        free(out[0][k]);
        free(out[1][k]);
    }
    free(x); free(w); free(gdy); free(dx0);
    kn_free(dxin); kn_free(dw);
}

int main(int argc, char **argv)
{
    gt_init("rmsnorm", argc, argv);
    gt_seed(3);
    one(1, 64);
    one(37, 64);
    one(5, 100);     /* d not a multiple of 8: scalar path */
    one(129, 4096);
    one(3, 8192);
    one(7, 1000);    /* lanes with fewer groups than others */
    same_bits(129, 4096);
    same_bits(7, 1000);
    same_bits(3, 64);
    if (gt_bench)
        one(12288, 4096);
    return gt_done();
}
