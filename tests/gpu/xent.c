/* xent.c: cross-entropy fused with the output projection against ops_xent
 * (double precision): loss sum and the gradient of x, with ignored targets,
 * fractional and zero weights, several chunks and a partial last one. */
#include "gpu_test.h"

#define TOL_LOSS 1e-4  /* fp32 log-sum-exp over fp32 logits of bf16 inputs */

typedef struct {
    float *loss, *dx;
    kn_bf16 *x, *w;
    int32_t *tg;
    float *wt;
    void *scratch;
    int64_t n;
    int d, vocab, chunk;
} xent_ctx;

static void run(void *p)
{
    xent_ctx *c = p;
    kn_xent_forward_backward(c->loss, c->dx, c->x, c->w, c->tg, c->wt, c->n, c->d,
                             c->vocab, 0.5f, c->chunk, c->scratch, 0);
}

static void one(int64_t n, int d, int vocab, int chunk, int with_weights, int bench)
{
    float *x = gt_rand(n * d, 1.0f), *w = gt_rand((int64_t)vocab * d, 0.5f);
    gt_round_bf16(x, n * d);
    gt_round_bf16(w, (int64_t)vocab * d);
    int32_t *tg = malloc((size_t)n * 4);
    float *wt = malloc((size_t)n * 4);
    for (int64_t t = 0; t < n; t++) {
        tg[t] = gt_u64() % 7 == 0 ? -1 : (int32_t)(gt_u64() % (uint64_t)vocab);
        uint64_t r = gt_u64() % 4;
        wt[t] = r == 0 ? 0.0f : r == 1 ? 0.5f : 1.0f;
    }
    xent_ctx c = {0};
    c.n = n; c.d = d; c.vocab = vocab; c.chunk = chunk;
    c.x = gt_up_bf16(x, n * d);
    c.w = gt_up_bf16(w, (int64_t)vocab * d);
    c.tg = gt_up(tg, (size_t)n * 4);
    c.wt = with_weights ? gt_up_f32(wt, n) : NULL;
    c.dx = gt_dev((size_t)(n * d) * 4);
    c.loss = gt_dev(4);
    c.scratch = gt_dev(kn_xent_scratch_bytes(chunk, vocab));
    char what[128], tag[96];
    snprintf(tag, sizeof tag, "n=%lld d=%d vocab=%d chunk=%d%s", (long long)n, d, vocab,
             chunk, with_weights ? " weighted" : "");
    if (bench) {
        kn_memset(c.loss, 0, 4, 0);
        snprintf(what, sizeof what, "xent %s", tag);
        gt_time(what, run, &c, 4.0 * n * d * vocab, 0);
    } else {
        float *ref = malloc((size_t)(n * d) * 4);
        double loss = ops_xent(ref, x, w, tg, with_weights ? wt : NULL, n, d, vocab, 0.5f);
        kn_memset(c.loss, 0, 4, 0);
        run(&c);
        float *gl = gt_down_f32(c.loss, 1), *gdx = gt_down_f32(c.dx, n * d);
        float lref = (float)loss;
        snprintf(what, sizeof what, "xent loss sum %s", tag);
        gt_compare(what, gl, &lref, 1, TOL_LOSS, "TOL_LOSS");
        snprintf(what, sizeof what, "xent dx %s", tag);
        gt_compare(what, gdx, ref, n * d, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");
        free(ref); free(gl); free(gdx);
    }
    free(x); free(w); free(tg); free(wt);
    kn_free(c.x); kn_free(c.w); kn_free(c.tg); kn_free(c.wt);
    kn_free(c.dx); kn_free(c.loss); kn_free(c.scratch);
}

int main(int argc, char **argv)
{
    gt_init("xent", argc, argv);
    gt_seed(7);
    one(1, 64, 512, 8, 0, 0);
    one(37, 64, 512, 16, 1, 0);    /* stories260K head, 3 chunks */
    one(100, 96, 1000, 64, 1, 0);
    one(64, 128, 4099, 64, 0, 0);  /* odd vocabulary */
    if (gt_bench)
        one(12288, 4096, 32000, 2048, 1, 1);
    return gt_done();
}
