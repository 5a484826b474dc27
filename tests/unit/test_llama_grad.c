/* test_llama_grad.c: every LoRA gradient against finite differences.
 *
 * Small random models (GQA and multi-head attention, tied and untied head)
 * carry an adapter on all seven linears with random A and B, and see a
 * batch of two rows holding three documents with fractional and zero loss
 * weights. For every A and B of every layer the analytic gradient of
 * L = sum_t w_t CE_t is compared with central differences of the float
 * forward: along the gradient itself, along a random direction, and at the
 * largest entries. Dropout uses a fixed key, which makes it a fixed
 * function that finite differences can check too. Then: gradient
 * checkpointing and the thread count change nothing, bit for bit.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "llama.h"
#include "lora.h"

/* Central differences of a float forward, Richardson-extrapolated from
 * steps eps and eps/2 so that truncation is O(eps^4) while rounding noise
 * (~1e-7 L / eps) stays small. */
#define FD_EPS 2e-2
#define REL_TOL_FD 2e-3      /* along the gradient and at single entries */
#define REL_TOL_FD_RAND 1e-3 /* along a random direction, relative to |g| */

static uint64_t rng = 0x1234567;
static float frand(void) /* uniform in [-1, 1) */
{
    return lora_rand_uniform(rng++, 0) * 2.0f - 1.0f;
}

static float *rand_array(int64_t n, float scale)
{
    float *p = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        p[i] = frand() * scale;
    return p;
}

static llama_model *random_model(int dim, int nh, int nkv, int hd, int hidden,
                                 int vocab, int layers, int tied)
{
    llama_model *m = calloc(1, sizeof *m);
    llama_config *c = &m->cfg;
    c->dim = dim;
    c->hidden = hidden;
    c->n_layers = layers;
    c->n_heads = nh;
    c->n_kv_heads = nkv;
    c->head_dim = hd;
    c->vocab = vocab;
    c->max_pos = 64;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->tied = tied;
    m->embed = rand_array((int64_t)vocab * dim, 1.0f);
    m->norm = rand_array(dim, 0.3f);
    for (int i = 0; i < dim; i++)
        m->norm[i] += 1.0f;
    m->head.rows = vocab;
    m->head.cols = dim;
    m->head.f32 = tied ? m->embed : rand_array((int64_t)vocab * dim, 0.5f);
    m->layers = calloc(layers, sizeof *m->layers);
    for (int i = 0; i < layers; i++) {
        llama_layer *L = &m->layers[i];
        L->attn_norm = rand_array(dim, 0.3f);
        L->ffn_norm = rand_array(dim, 0.3f);
        for (int k = 0; k < dim; k++) {
            L->attn_norm[k] += 1.0f;
            L->ffn_norm[k] += 1.0f;
        }
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            int64_t o, in;
            llama_linear_shape(c, (llama_linear)l, &o, &in);
            L->lin[l].rows = o;
            L->lin[l].cols = in;
            L->lin[l].f32 = rand_array(o * in, 1.5f / sqrtf((float)in));
            if (o * in > m->max_lin_elems)
                m->max_lin_elems = o * in;
        }
    }
    return m;
}

/* Two rows of 12: [doc of 5 | doc of 7], [doc of 12]. */
enum { NTOK = 24 };
static int32_t ids[NTOK], pos[NTOK], start[NTOK], tgt[NTOK];
static float wts[NTOK];

static void make_batch(int vocab)
{
    int lens[3] = {5, 7, 12}, t = 0;
    for (int d = 0; d < 3; d++) {
        int s = t;
        for (int k = 0; k < lens[d]; k++, t++) {
            ids[t] = (int32_t)(lora_rand_u64(99, t) % vocab);
            pos[t] = k;
            start[t] = s;
        }
    }
    for (t = 0; t < NTOK; t++) {
        int last = t + 1 == NTOK || start[t + 1] != start[t];
        tgt[t] = last ? -1 : ids[t + 1];
        wts[t] = (t % 5 == 2) ? 0.0f : (t % 3 == 0 ? 0.5f : 1.0f);
    }
}

static double loss_at(const llama_model *m, const lora_adapter *a,
                      const llama_batch *b, const llama_train_opts *o)
{
    /* the training forward (dropout on) into a scratch gradient */
    float *g = calloc(a->n_params, sizeof(float));
    double ls = 0;
    llama_forward_backward(m, a, b, o, 1.0f, g, &ls);
    free(g);
    return ls;
}

/* The derivative of the loss along dir (cnt floats at p). */
static double fd_dir(const llama_model *m, const lora_adapter *a,
                     const llama_batch *b, const llama_train_opts *o, float *p,
                     const float *dir, int64_t cnt)
{
    float *save = malloc(cnt * sizeof(float));
    memcpy(save, p, cnt * sizeof(float));
    double d[2];
    for (int h = 0; h < 2; h++) {
        double e = h ? FD_EPS / 2 : FD_EPS;
        for (int64_t k = 0; k < cnt; k++)
            p[k] = save[k] + (float)e * dir[k];
        double lp = loss_at(m, a, b, o);
        for (int64_t k = 0; k < cnt; k++)
            p[k] = save[k] - (float)e * dir[k];
        double lm = loss_at(m, a, b, o);
        d[h] = (lp - lm) / (2 * e);
    }
    memcpy(p, save, cnt * sizeof(float));
    free(save);
    return (4 * d[1] - d[0]) / 3;
}

static void grad_check(const char *name, llama_model *m, double dropout)
{
    lora_config lc = {.r = 3,
                      .alpha = 6,
                      .dropout = dropout,
                      .use_rslora = 0,
                      .targets = LORA_ALL_LINEAR};
    lora_adapter *a;
    lora_new(&m->cfg, &lc, &a);
    for (size_t i = 0; i < a->n_params; i++)
        a->params[i] = frand() * 0.4f;
    make_batch(m->cfg.vocab);
    llama_batch b = {NTOK, ids, pos, start, tgt, wts};
    llama_train_opts o = {0, 0xfeedbeefull};
    float *g = calloc(a->n_params, sizeof(float));
    double l0;
    CHECK(llama_forward_backward(m, a, &b, &o, 1.0f, g, &l0) == 0,
          "%s: forward+backward", name);
    /* the inference forward gives the same loss when dropout is off */
    if (dropout == 0) {
        double lf = 0;
        llama_forward(m, a, &b, NULL, &lf, NULL);
        CHECK(fabs(lf - l0) <= 1e-6 * fabs(l0),
              "%s: inference loss equals "
              "training loss (%.9g %.9g)",
              name, lf, l0);
    }
    double worst_g = 0, worst_r = 0, worst_e = 0;
    int ntensors = 0, nzero = 0;
    float *dir = malloc(a->n_params * sizeof(float));
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            for (int ab = 0; ab < 2; ab++) {
                const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
                int64_t off = ab ? s->b : s->a;
                int64_t cnt = ab ? s->out * lc.r : lc.r * s->in;
                float *p = a->params + off, *gg = g + off;
                double gn = 0;
                for (int64_t k = 0; k < cnt; k++)
                    gn += (double)gg[k] * gg[k];
                gn = sqrt(gn);
                ntensors++;
                if (gn == 0) {
                    nzero++;
                    continue;
                }
                /* along the gradient and along a random direction */
                for (int kind = 0; kind < 2; kind++) {
                    double vn = 0, gv = 0;
                    for (int64_t k = 0; k < cnt; k++) {
                        dir[k] = kind == 0 ? gg[k] : frand();
                        vn += (double)dir[k] * dir[k];
                    }
                    vn = sqrt(vn);
                    for (int64_t k = 0; k < cnt; k++) {
                        dir[k] /= (float)vn;
                        gv += (double)gg[k] * dir[k];
                    }
                    double fd = fd_dir(m, a, &b, &o, p, dir, cnt);
                    double err = fabs(fd - gv) / gn;
                    if (kind == 0)
                        worst_g = fmax(worst_g, err);
                    else
                        worst_r = fmax(worst_r, err);
                }
                /* the largest entry */
                int64_t kmax = 0;
                for (int64_t k = 1; k < cnt; k++)
                    if (fabsf(gg[k]) > fabsf(gg[kmax]))
                        kmax = k;
                float one = 1.0f;
                double fd = fd_dir(m, a, &b, &o, p + kmax, &one, 1);
                worst_e = fmax(worst_e, fabs(fd - gg[kmax]) / fabs(gg[kmax]));
            }
    CHECK(nzero == 0, "%s: all %d LoRA tensors have a gradient", name,
          ntensors);
    CHECK(worst_g <= REL_TOL_FD, "%s: along the gradient, max rel err %.2e",
          name, worst_g);
    CHECK(worst_r <= REL_TOL_FD_RAND,
          "%s: along random directions, max err "
          "%.2e of |g|",
          name, worst_r);
    CHECK(worst_e <= REL_TOL_FD, "%s: largest entries, max rel err %.2e", name,
          worst_e);

    /* checkpointing and threads change nothing */
    float *g2 = calloc(a->n_params, sizeof(float));
    llama_train_opts o2 = {1, o.dropout_key};
    double l2;
    llama_forward_backward(m, a, &b, &o2, 1.0f, g2, &l2);
    CHECK(l2 == l0 && memcmp(g, g2, a->n_params * sizeof(float)) == 0,
          "%s: gradient checkpointing gives identical gradients", name);
    int nt = omp_get_max_threads();
    omp_set_num_threads(nt > 1 ? 1 : 3);
    memset(g2, 0, a->n_params * sizeof(float));
    llama_forward_backward(m, a, &b, &o, 1.0f, g2, &l2);
    omp_set_num_threads(nt);
    CHECK(l2 == l0 && memcmp(g, g2, a->n_params * sizeof(float)) == 0,
          "%s: another thread count gives identical gradients", name);
    /* the loss scale scales the gradient; gradients accumulate */
    memset(g2, 0, a->n_params * sizeof(float));
    llama_forward_backward(m, a, &b, &o, 0.5f, g2, &l2);
    llama_forward_backward(m, a, &b, &o, 0.5f, g2, &l2);
    double dd = 0, gmax = 0;
    for (size_t k = 0; k < a->n_params; k++) {
        dd = fmax(dd, fabs(g2[k] - g[k]));
        gmax = fmax(gmax, fabs(g[k]));
    }
    dd /= gmax;
    CHECK(dd < 1e-6, "%s: gradients accumulate and scale (%.1e)", name, dd);
    free(g2);
    free(dir);
    free(g);
    lora_free(a);
}

/* Dropout as PEFT: the kept share and the 1/(1-p) scale. */
static void dropout_stats(void)
{
    uint64_t s = lora_dropout_stream(42, 3, LLAMA_V);
    int64_t kept = 0, n = 200000;
    for (int64_t i = 0; i < n; i++)
        kept += lora_rand_uniform(s, (uint64_t)i) >= 0.1f;
    double share = (double)kept / n;
    CHECK(fabs(share - 0.9) < 0.005, "dropout 0.1 keeps %.4f of the inputs",
          share);
    CHECK(lora_dropout_stream(42, 3, LLAMA_V) !=
                  lora_dropout_stream(42, 3, LLAMA_Q) &&
              lora_dropout_stream(43, 3, LLAMA_V) != s,
          "each linear and micro-batch has its own dropout stream");
}

int main(void)
{
    llama_model *m1 = random_model(16, 4, 2, 4, 24, 32, 2, 1);
    grad_check("gqa-tied", m1, 0);
    grad_check("gqa-tied-dropout", m1, 0.25);
    llama_free(m1);
    llama_model *m2 = random_model(12, 2, 2, 6, 20, 29, 2, 0);
    grad_check("mha-untied", m2, 0);
    llama_free(m2);
    dropout_stats();
    return CHECK_DONE();
}
