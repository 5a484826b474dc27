/* test_llama_nf4.c: training on an NF4 checkpoint (nf4-quant's or
 * bitsandbytes' layout): $SHARED/golden/s260-nf4-f32 is what transformers
 * + bitsandbytes saved for stories260K in NF4 with double quantization.
 *
 * The linear weights must stay 4-bit in memory (no f32 copy kept), the
 * dequantized weights must be close to the f32 originals, the forward
 * close to the f32 model's, and LoRA gradients through the dequantized
 * weights must match finite differences like the f32 path's do.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "io.h"
#include "llama.h"
#include "lora.h"

/* NF4 with 16 levels per block of 64: about 10% RMS error per weight. */
#define REL_RMS_NF4 0.15
/* The loss of stories260K moves little under NF4 (measured 0.3%). */
#define REL_LOSS_NF4 0.05
#define FD_EPS 2e-2
#define REL_TOL_FD 2e-3

static double loss_of(const llama_model *m, const lora_adapter *a,
                      const llama_batch *b, float *grad)
{
    llama_train_opts o = {0, 0};
    double ls = 0;
    llama_forward_backward(m, a, b, &o, 1.0f, grad, &ls);
    return ls;
}

int main(void)
{
    const char *shared = check_shared();
    char qdir[4096], fdir[4096];
    snprintf(qdir, sizeof qdir, "%s/golden/s260-nf4-f32", shared);
    snprintf(fdir, sizeof fdir, "%s/models/stories260K", shared);
    if (!io_exists(qdir) || !io_exists(fdir)) {
        SKIP("nf4: %s absent", qdir);
        return 77;
    }
    llama_model *q, *f;
    CHECK(llama_load(qdir, &q) == 0, "load the NF4 checkpoint");
    CHECK(llama_load(fdir, &f) == 0, "load the f32 checkpoint");
    if (!q || !f)
        return 1;
    int all4 = q->cfg.quantized;
    for (int32_t i = 0; i < q->cfg.n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            all4 &= q->layers[i].lin[l].f32 == NULL &&
                    q->layers[i].lin[l].nf4 != NULL;
    CHECK(all4, "every linear weight stays NF4 in memory");
    uint64_t bq = llama_weight_bytes(q), bf = llama_weight_bytes(f);
    /* the embedding (shared with the head) and the norms stay f32 */
    uint64_t lin_f32 = bf - (uint64_t)f->cfg.vocab * f->cfg.dim * 4 -
                       (uint64_t)f->cfg.dim * 4 * (1 + 2 * f->cfg.n_layers);
    uint64_t lin_q = bq - (bf - lin_f32);
    CHECK(lin_q * 6 < lin_f32, "linear weights take %.1f%% of their f32 size",
          100.0 * (double)lin_q / (double)lin_f32);

    /* dequantized weights near the originals */
    float *buf = malloc(q->max_lin_elems * sizeof(float));
    double worst = 0;
    for (int32_t i = 0; i < q->cfg.n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const llama_weight *wq = &q->layers[i].lin[l],
                               *wf = &f->layers[i].lin[l];
            const float *d = llama_weight_f32(wq, buf);
            double e = 0, s = 0;
            for (int64_t k = 0; k < wq->rows * wq->cols; k++) {
                e += (d[k] - wf->f32[k]) * (double)(d[k] - wf->f32[k]);
                s += (double)wf->f32[k] * wf->f32[k];
            }
            worst = fmax(worst, sqrt(e / s));
        }
    CHECK(worst < REL_RMS_NF4,
          "dequantized weights: max relative RMS error "
          "%.3f",
          worst);
    free(buf);

    /* forward: a packed row of two documents */
    enum { N = 96 };
    int32_t ids[N], pos[N], st[N], tg[N];
    for (int t = 0; t < N; t++) {
        ids[t] = (int32_t)(lora_rand_u64(5, t) % 400) + 10;
        st[t] = t < 40 ? 0 : 40;
        pos[t] = t - st[t];
    }
    ids[0] = ids[40] = 1;
    for (int t = 0; t < N; t++)
        tg[t] = (t + 1 < N && st[t + 1] == st[t]) ? ids[t + 1] : -1;
    llama_batch b = {N, ids, pos, st, tg, NULL};
    double lq, lf, w;
    llama_forward(q, NULL, &b, NULL, &lq, &w);
    llama_forward(f, NULL, &b, NULL, &lf, NULL);
    CHECK(fabs(lq - lf) / lf < REL_LOSS_NF4, "NF4 loss %.4f vs f32 %.4f",
          lq / w, lf / w);

    /* LoRA gradients through dequantized weights */
    lora_config lc = {.r = 4, .alpha = 8, .targets = LORA_ALL_LINEAR};
    lora_adapter *a;
    lora_new(&q->cfg, &lc, &a);
    lora_init(a, 3);
    for (size_t k = 0; k < a->n_params; k++)
        if (a->params[k] == 0)
            a->params[k] = 0.05f * (lora_rand_uniform(77, k) - 0.5f);
    float *g = calloc(a->n_params, sizeof(float));
    float *scratch = calloc(a->n_params, sizeof(float));
    loss_of(q, a, &b, g);
    double gn = 0;
    for (size_t k = 0; k < a->n_params; k++)
        gn += (double)g[k] * g[k];
    gn = sqrt(gn);
    double d[2];
    float *save = malloc(a->n_params * sizeof(float));
    memcpy(save, a->params, a->n_params * sizeof(float));
    for (int h = 0; h < 2; h++) {
        double e = h ? FD_EPS / 2 : FD_EPS;
        for (size_t k = 0; k < a->n_params; k++)
            a->params[k] = save[k] + (float)(e * g[k] / gn);
        double lp = loss_of(q, a, &b, scratch);
        for (size_t k = 0; k < a->n_params; k++)
            a->params[k] = save[k] - (float)(e * g[k] / gn);
        double lm = loss_of(q, a, &b, scratch);
        d[h] = (lp - lm) / (2 * e);
    }
    memcpy(a->params, save, a->n_params * sizeof(float));
    double fd = (4 * d[1] - d[0]) / 3;
    CHECK(fabs(fd - gn) / gn < REL_TOL_FD,
          "NF4 base: directional derivative "
          "%.6f vs |g| %.6f",
          fd, gn);
    float *g2 = calloc(a->n_params, sizeof(float));
    llama_train_opts o2 = {1, 0};
    double l2;
    llama_forward_backward(q, a, &b, &o2, 1.0f, g2, &l2);
    CHECK(memcmp(g, g2, a->n_params * sizeof(float)) == 0,
          "NF4 base: checkpointing gives identical gradients");
    free(g2);
    free(save);
    free(scratch);
    free(g);
    lora_free(a);
    llama_free(q);
    llama_free(f);
    return CHECK_DONE();
}
