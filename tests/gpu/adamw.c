/* adamw.c: the optimizer step and the global gradient norm on the GPU
 * against lib/adamw.c (adamw_step, grad_norm, grad_clip): several steps,
 * with and without clipping and weight decay. */
#include "gpu_test.h"
#include "adamw.h"

static void one(int64_t n, double wd, double max_norm, float gscale)
{
    float *p = gt_rand(n, 1.0f);
    adamw ref;
    adamw_init(&ref, (size_t)n, 0.9, 0.999, 1e-8, wd);
    float *dp = gt_up_f32(p, n), *dm = gt_dev((size_t)n * 4), *dv = gt_dev((size_t)n * 4);
    kn_memset(dm, 0, (size_t)n * 4, 0);
    kn_memset(dv, 0, (size_t)n * 4, 0);
    kn_bf16 *dpb = gt_dev((size_t)n * 2);
    float *dnorm = gt_dev(4);
    double lr = 2e-4;
    char what[128];
    int ok_norm = 1;
    for (int step = 1; step <= 3; step++) {
        float *g = gt_rand(n, gscale);
        float *dg = gt_up_f32(g, n);
        kn_memset(dnorm, 0, 4, 0);
        kn_sumsq(dnorm, dg, n, 0);
        float *gn = gt_down_f32(dnorm, 1);
        double norm = grad_norm(g, (size_t)n);
        if (fabs(sqrt(*gn) - norm) > 1e-5 * norm)
            ok_norm = 0;
        grad_clip(g, (size_t)n, norm, max_norm);
        adamw_step(&ref, p, g, lr);
        kn_adamw h = {lr, 0.9, 0.999, 1e-8, wd, step, max_norm};
        kn_adamw_step(dp, dpb, dm, dv, dg, n, &h, dnorm, 0);
        free(g); free(gn);
        kn_free(dg);
    }
    snprintf(what, sizeof what, "global norm n=%lld", (long long)n);
    gt_check(ok_norm, what);
    float *gp = gt_down_f32(dp, n), *gm = gt_down_f32(dm, n), *gv = gt_down_f32(dv, n);
    float *gpb = gt_down_bf16(dpb, n);
    snprintf(what, sizeof what, "adamw params n=%lld wd=%g clip=%g", (long long)n, wd, max_norm);
    gt_compare(what, gp, p, n, TOL_F32, "TOL_F32");
    snprintf(what, sizeof what, "adamw m n=%lld", (long long)n);
    gt_compare(what, gm, ref.m, n, TOL_F32, "TOL_F32");
    snprintf(what, sizeof what, "adamw v n=%lld", (long long)n);
    gt_compare(what, gv, ref.v, n, TOL_F32, "TOL_F32");
    snprintf(what, sizeof what, "adamw bf16 copy n=%lld", (long long)n);
    gt_compare(what, gpb, p, n, TOL_BF16_OUT, "TOL_BF16_OUT");
    free(p); free(gp); free(gm); free(gv); free(gpb);
    adamw_free(&ref);
    kn_free(dp); kn_free(dm); kn_free(dv); kn_free(dpb); kn_free(dnorm);
}

int main(int argc, char **argv)
{
    gt_init("adamw", argc, argv);
    gt_seed(9);
    one(1, 0.0, 0.0, 1.0f);
    one(1000, 0.0, 0.3, 1.0f);       /* clipped: norm ~ 18 */
    one(100003, 0.01, 1000.0, 0.1f); /* not clipped, weight decay */
    return gt_done();
}
