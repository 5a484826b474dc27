/* llama_cpu.c: the CPU reference forward and backward of a Llama model with
 * LoRA adapters, in fp32, parallel with OpenMP.
 *
 * Design rules, because GPU kernels and resumed runs are checked against
 * this file bit for bit or within tight tolerances:
 *   - every output element is accumulated by exactly one thread in a fixed
 *     order (no atomics, no cross-thread reductions), so results do not
 *     depend on the number of threads;
 *   - the forward of a layer is one function used by inference, training
 *     and the recomputation of gradient checkpointing, so checkpointing
 *     changes memory and nothing else;
 *   - attention keeps no probability matrix: the forward stores each row's
 *     log-sum-exp and the backward recomputes the probabilities (two passes:
 *     queries, then keys), as flash attention does.
 *
 * Numerics follow transformers' LlamaForCausalLM in fp32: RMSNorm as
 * w * (x * rsqrt(mean(x^2) + eps)), RoPE with float32 inv_freq and angles,
 * scores scaled by 1/sqrt(head_dim), softmax and cross-entropy in fp32.
 */
#include "llama.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lora.h"
#include "msg.h"

/* ---- primitives ---------------------------------------------------------- */

/* Loops smaller than this (in multiply-adds, roughly) run on one thread:
 * forking costs more than it saves, and much more on a loaded machine. */
#define PAR_MIN (1 << 18)

/* Dot product with 8 partial sums combined in a fixed order. */
static float dot(const float *a, const float *b, int64_t n)
{
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += a[i + k] * b[i + k];
    float acc =
        ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++)
        acc += a[i] * b[i];
    return acc;
}

#define TILE_T 8
#define TILE_O 64

void llama_matmul(float *out, const float *x, const float *w, int64_t n,
                  int64_t o, int64_t i)
{
    int64_t nt = (n + TILE_T - 1) / TILE_T, no = (o + TILE_O - 1) / TILE_O;
#pragma omp parallel for collapse(2) schedule(static) if (n * o * i >= PAR_MIN)
    for (int64_t bt = 0; bt < nt; bt++)
        for (int64_t bo = 0; bo < no; bo++) {
            int64_t t1 = bt * TILE_T + TILE_T < n ? bt * TILE_T + TILE_T : n;
            int64_t o1 = bo * TILE_O + TILE_O < o ? bo * TILE_O + TILE_O : o;
            for (int64_t t = bt * TILE_T; t < t1; t++)
                for (int64_t j = bo * TILE_O; j < o1; j++)
                    out[t * o + j] = dot(x + t * i, w + j * i, i);
        }
}

/* dx (n, i) += dy (n, o) @ w (o, i): per element a sum over o in order. */
static void matmul_acc_nn(float *dx, const float *dy, const float *w, int64_t n,
                          int64_t o, int64_t i)
{
    const int64_t CH = 256;
    int64_t nc = (i + CH - 1) / CH;
#pragma omp parallel for collapse(2) schedule(static) if (n * o * i >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        for (int64_t bc = 0; bc < nc; bc++) {
            int64_t c0 = bc * CH, c1 = c0 + CH < i ? c0 + CH : i;
            float *d = dx + t * i;
            for (int64_t j = 0; j < o; j++) {
                float g = dy[t * o + j];
                if (g == 0.0f)
                    continue;
                const float *wr = w + j * i;
                for (int64_t c = c0; c < c1; c++)
                    d[c] += g * wr[c];
            }
        }
}

/* gw (o, i) += dy (n, o)^T @ x (n, i): per element a sum over t in order. */
static void matmul_acc_tn(float *gw, const float *dy, const float *x, int64_t n,
                          int64_t o, int64_t i)
{
#pragma omp parallel for schedule(static) if (n * o * i >= PAR_MIN)
    for (int64_t j = 0; j < o; j++) {
        float *g = gw + j * i;
        for (int64_t t = 0; t < n; t++) {
            float d = dy[t * o + j];
            if (d == 0.0f)
                continue;
            const float *xr = x + t * i;
            for (int64_t c = 0; c < i; c++)
                g[c] += d * xr[c];
        }
    }
}

void llama_rmsnorm(float *y, float *rstd, const float *x, const float *w,
                   int64_t n, int d, float eps)
{
#pragma omp parallel for schedule(static) if (n * d * 4 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + t * d;
        double ss = 0;
        for (int c = 0; c < d; c++)
            ss += (double)xr[c] * xr[c];
        float r = 1.0f / sqrtf((float)(ss / d) + eps);
        if (rstd)
            rstd[t] = r;
        for (int c = 0; c < d; c++)
            y[t * d + c] = w[c] * (xr[c] * r);
    }
}

/* dx (n, d) += gradient of y = w * (x * rstd) given dy. */
static void rmsnorm_backward(float *dx, const float *dy, const float *x,
                             const float *rstd, const float *w, int64_t n,
                             int d)
{
#pragma omp parallel for schedule(static) if (n * d * 4 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        const float *xr = x + t * d, *g = dy + t * d;
        float r = rstd[t];
        double m = 0;
        for (int c = 0; c < d; c++)
            m += (double)(g[c] * w[c]) * (xr[c] * r);
        float mean = (float)(m / d);
        for (int c = 0; c < d; c++)
            dx[t * d + c] += r * (g[c] * w[c] - xr[c] * r * mean);
    }
}

void llama_rope(float *x, int d, int32_t pos, float theta, int inverse)
{
    int h = d / 2;
    for (int i = 0; i < h; i++) {
        /* float32 as transformers computes inv_freq and the angle */
        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)d);
        float ang = (float)pos * inv;
        float c = cosf(ang), s = sinf(ang);
        if (inverse)
            s = -s;
        float a = x[i], b = x[i + h];
        x[i] = a * c - b * s;
        x[i + h] = b * c + a * s;
    }
}

/* ---- LoRA on one linear -------------------------------------------------- */

typedef struct drop_ctx {
    float p; /* 0 = off */
    uint64_t key;
} drop_ctx;

/* xd = dropout(x) for linear l of layer i (n, in). */
static void dropout_apply(float *xd, const float *x, int64_t n, int64_t in,
                          const drop_ctx *d, int32_t layer, llama_linear l)
{
    uint64_t stream = lora_dropout_stream(d->key, layer, l);
    float inv = 1.0f / (1.0f - d->p);
#pragma omp parallel for schedule(static) if (n * in * 8 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        for (int64_t c = 0; c < in; c++) {
            uint64_t idx = (uint64_t)(t * in + c);
            xd[t * in + c] = lora_rand_uniform(stream, idx) >= d->p
                                 ? x[t * in + c] * inv
                                 : 0.0f;
        }
}

typedef struct work {
    float *wbuf; /* dequantized weight (max_lin_elems) */
    float *xd;   /* dropout input (n, max in) */
    float *dlh;  /* (n, r) */
    float *dxd;  /* (n, max in) */
} work;

/* y (n, out) = x W^T (+ scale * (A xd)^T B^T); lh (n, r) keeps A xd. */
static void linear_forward(const llama_model *m, const lora_adapter *a,
                           int32_t layer, llama_linear l, float *y,
                           const float *x, int64_t n, float *lh,
                           const drop_ctx *d, work *w)
{
    const llama_weight *W = &m->layers[layer].lin[l];
    llama_matmul(y, x, llama_weight_f32(W, w->wbuf), n, W->rows, W->cols);
    if (!a || !lora_A(a, layer, l))
        return;
    const float *A = lora_A(a, layer, l), *B = lora_B(a, layer, l);
    int32_t r = a->cfg.r;
    const float *xd = x;
    if (d && d->p > 0) {
        dropout_apply(w->xd, x, n, W->cols, d, layer, l);
        xd = w->xd;
    }
    llama_matmul(lh, xd, A, n, r, W->cols);
    float scale = a->scale;
    int64_t out = W->rows;
#pragma omp parallel for schedule(static) if (n * out * r >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        for (int64_t o = 0; o < out; o++)
            y[t * out + o] += dot(lh + t * r, B + o * r, r) * scale;
}

/* Backward of linear_forward: dx (n, in) += dy W (+ LoRA path, when dx is
 * not NULL); the LoRA gradients go to grad (a->params layout). */
static void linear_backward(const llama_model *m, const lora_adapter *a,
                            int32_t layer, llama_linear l, float *dx,
                            const float *dy, const float *x, int64_t n,
                            const float *lh, const drop_ctx *d, float *grad,
                            work *w)
{
    const llama_weight *W = &m->layers[layer].lin[l];
    int64_t in = W->cols, out = W->rows;
    if (dx)
        matmul_acc_nn(dx, dy, llama_weight_f32(W, w->wbuf), n, out, in);
    if (!a || !lora_A(a, layer, l))
        return;
    const lora_slot *s = lora_slot_of(a, layer, l);
    const float *A = a->params + s->a, *B = a->params + s->b;
    float *gA = grad + s->a, *gB = grad + s->b;
    int32_t r = a->cfg.r;
    float scale = a->scale;
    /* dlh = scale * dy B; gB += scale * dy^T lh */
    float *dlh = w->dlh;
#pragma omp parallel for schedule(static) if (n * r * out >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        for (int32_t k = 0; k < r; k++) {
            float acc = 0;
            for (int64_t o = 0; o < out; o++)
                acc += dy[t * out + o] * B[o * r + k];
            dlh[t * r + k] = acc * scale;
        }
#pragma omp parallel for schedule(static) if (out * r * n >= PAR_MIN)
    for (int64_t o = 0; o < out; o++)
        for (int32_t k = 0; k < r; k++) {
            float acc = 0;
            for (int64_t t = 0; t < n; t++)
                acc += dy[t * out + o] * lh[t * r + k];
            gB[o * r + k] += acc * scale;
        }
    const float *xd = x;
    int drop = d && d->p > 0;
    if (drop) {
        dropout_apply(w->xd, x, n, in, d, layer, l);
        xd = w->xd;
    }
    matmul_acc_tn(gA, dlh, xd, n, r, in);
    if (!dx)
        return;
    if (!drop) {
        matmul_acc_nn(dx, dlh, A, n, r, in);
        return;
    }
    /* through the dropout: the mask, recomputed, times 1/(1-p) */
    memset(w->dxd, 0, (size_t)(n * in) * sizeof(float));
    matmul_acc_nn(w->dxd, dlh, A, n, r, in);
    uint64_t stream = lora_dropout_stream(d->key, layer, l);
    float inv = 1.0f / (1.0f - d->p);
#pragma omp parallel for schedule(static) if (n * in * 8 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        for (int64_t c = 0; c < in; c++)
            if (lora_rand_uniform(stream, (uint64_t)(t * in + c)) >= d->p)
                dx[t * in + c] += w->dxd[t * in + c] * inv;
}

/* ---- attention ----------------------------------------------------------- */

/* att (n, nh*hd) and lse (n, nh) for queries q (n, nh*hd) attending to
 * keys/values kb, vb (rows of n_kv*hd) lo[t] .. hi[t] inclusive. */
static void attention_forward(const llama_config *c, int64_t n, const float *q,
                              const float *kb, const float *vb,
                              const int32_t *lo, const int32_t *hi,
                              int32_t hi_off, float *att, float *lse)
{
    int nh = c->n_heads, hd = c->head_dim, grp = c->n_heads / c->n_kv_heads;
    int64_t qd = (int64_t)nh * hd, kvd = (int64_t)c->n_kv_heads * hd;
    float sc = 1.0f / sqrtf((float)hd);
    int64_t maxspan = 0, pairs = 0;
    for (int64_t t = 0; t < n; t++) {
        int64_t h1 = (hi ? hi[t] : t + hi_off) - lo[t] + 1;
        pairs += h1;
        if (h1 > maxspan)
            maxspan = h1;
    }
#pragma omp parallel if (pairs * nh * hd * 4 >= PAR_MIN)
    {
        float *s = xmalloc((size_t)(maxspan > 0 ? maxspan : 1) * sizeof(float));
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < n; t++)
            for (int h = 0; h < nh; h++) {
                const float *qv = q + t * qd + (int64_t)h * hd;
                int64_t g = h / grp, j0 = lo[t], j1 = hi ? hi[t] : t + hi_off;
                float mx = -INFINITY;
                for (int64_t j = j0; j <= j1; j++) {
                    float v = dot(qv, kb + j * kvd + g * hd, hd) * sc;
                    s[j - j0] = v;
                    if (v > mx)
                        mx = v;
                }
                float sum = 0;
                for (int64_t j = j0; j <= j1; j++) {
                    s[j - j0] = expf(s[j - j0] - mx);
                    sum += s[j - j0];
                }
                float *o = att + t * qd + (int64_t)h * hd;
                for (int e = 0; e < hd; e++)
                    o[e] = 0;
                for (int64_t j = j0; j <= j1; j++) {
                    float p = s[j - j0] / sum;
                    const float *vv = vb + j * kvd + g * hd;
                    for (int e = 0; e < hd; e++)
                        o[e] += p * vv[e];
                }
                lse[t * nh + h] = mx + logf(sum);
            }
        free(s);
    }
}

/* Backward of attention_forward for training (keys are the batch's own
 * tokens, lo = start, hi = t). dq, dk, dv are overwritten. */
static void attention_backward(const llama_config *c, int64_t n,
                               const int32_t *start, const float *q,
                               const float *k, const float *v, const float *att,
                               const float *lse, const float *datt, float *dq,
                               float *dk, float *dv, float *D)
{
    int nh = c->n_heads, hd = c->head_dim, nkv = c->n_kv_heads;
    int grp = nh / nkv;
    int64_t qd = (int64_t)nh * hd, kvd = (int64_t)nkv * hd;
    float sc = 1.0f / sqrtf((float)hd);
    int64_t pairs = 0;
    for (int64_t t = 0; t < n; t++)
        pairs += t - start[t] + 1;
        /* pass 1, per query: D = datt . att, dq */
#pragma omp parallel for collapse(2)                                           \
    schedule(static) if (pairs * nh * hd * 4 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < nh; h++) {
            const float *qv = q + t * qd + (int64_t)h * hd;
            const float *da = datt + t * qd + (int64_t)h * hd;
            float Dt = dot(da, att + t * qd + (int64_t)h * hd, hd);
            D[t * nh + h] = Dt;
            float l = lse[t * nh + h];
            int64_t g = h / grp;
            float *o = dq + t * qd + (int64_t)h * hd;
            for (int e = 0; e < hd; e++)
                o[e] = 0;
            for (int64_t j = start[t]; j <= t; j++) {
                const float *kv = k + j * kvd + g * hd;
                float p = expf(dot(qv, kv, hd) * sc - l);
                float dp = dot(da, v + j * kvd + g * hd, hd);
                float ds = p * (dp - Dt) * sc;
                for (int e = 0; e < hd; e++)
                    o[e] += ds * kv[e];
            }
        }
        /* pass 2, per key: dk, dv summed over the queries that see it */
#pragma omp parallel for collapse(2)                                           \
    schedule(static) if (pairs * nh * hd * 4 >= PAR_MIN)
    for (int64_t j = 0; j < n; j++)
        for (int g = 0; g < nkv; g++) {
            float *ok = dk + j * kvd + (int64_t)g * hd;
            float *ov = dv + j * kvd + (int64_t)g * hd;
            const float *kv = k + j * kvd + (int64_t)g * hd;
            const float *vv = v + j * kvd + (int64_t)g * hd;
            for (int e = 0; e < hd; e++)
                ok[e] = ov[e] = 0;
            for (int64_t t = j; t < n && start[t] <= j; t++)
                for (int h = g * grp; h < (g + 1) * grp; h++) {
                    const float *qv = q + t * qd + (int64_t)h * hd;
                    const float *da = datt + t * qd + (int64_t)h * hd;
                    float p = expf(dot(qv, kv, hd) * sc - lse[t * nh + h]);
                    float dp = dot(da, vv, hd);
                    float ds = p * (dp - D[t * nh + h]) * sc;
                    for (int e = 0; e < hd; e++) {
                        ok[e] += ds * qv[e];
                        ov[e] += p * da[e];
                    }
                }
        }
}

/* ---- one decoder layer --------------------------------------------------- */

typedef struct acts {
    float *x;           /* (n, dim) layer input */
    float *xn1, *rstd1; /* (n, dim), (n) */
    float *q, *k, *v;   /* (n, qd), (n, kvd) x2; q, k after RoPE */
    float *att, *lse;   /* (n, qd), (n, nh) */
    float *x2;          /* (n, dim) after attention's residual */
    float *xn2, *rstd2;
    float *g, *u, *hm;        /* (n, hidden): gate, up, silu(gate) * up */
    float *lh[LLAMA_NLINEAR]; /* (n, r) LoRA hidden per targeted linear */
} acts;

static uint64_t acts_floats(const llama_config *c, const lora_adapter *a,
                            int64_t n)
{
    int64_t qd = (int64_t)c->n_heads * c->head_dim;
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    uint64_t per = (uint64_t)(4 * c->dim + 2 + 2 * qd + 2 * kvd + c->n_heads +
                              3 * c->hidden);
    if (a)
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            if (a->cfg.targets & (1u << l))
                per += (uint64_t)a->cfg.r;
    return per * (uint64_t)n;
}

/* Carves the arrays out of one block; x points into the block too. */
static float *acts_alloc(acts *s, const llama_config *c, const lora_adapter *a,
                         int64_t n)
{
    float *blk = xmalloc((size_t)acts_floats(c, a, n) * sizeof(float) + 16);
    float *p = blk;
    int64_t qd = (int64_t)c->n_heads * c->head_dim;
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
#define TAKE(field, cnt) (s->field = p, p += (cnt))
    TAKE(x, n * c->dim);
    TAKE(xn1, n * c->dim);
    TAKE(rstd1, n);
    TAKE(q, n * qd);
    TAKE(k, n * kvd);
    TAKE(v, n * kvd);
    TAKE(att, n * qd);
    TAKE(lse, n * c->n_heads);
    TAKE(x2, n * c->dim);
    TAKE(xn2, n * c->dim);
    TAKE(rstd2, n);
    TAKE(g, n * c->hidden);
    TAKE(u, n * c->hidden);
    TAKE(hm, n * c->hidden);
#undef TAKE
    for (int l = 0; l < LLAMA_NLINEAR; l++) {
        s->lh[l] = NULL;
        if (a && (a->cfg.targets & (1u << l))) {
            s->lh[l] = p;
            p += n * a->cfg.r;
        }
    }
    return blk;
}

/* Where a layer's attention finds its keys and values: the batch itself
 * (training, prompt processing) or a cache (decoding). */
typedef struct kv_src {
    float *k, *v; /* cache rows for this layer, or NULL */
    int32_t base; /* cache position of batch token 0 */
} kv_src;

static void layer_forward(const llama_model *m, const lora_adapter *a,
                          int32_t li, const llama_batch *b, acts *s, float *out,
                          const drop_ctx *d, const kv_src *kv, work *w)
{
    const llama_config *c = &m->cfg;
    const llama_layer *L = &m->layers[li];
    int64_t n = b->n, dim = c->dim, hd = c->head_dim;
    int64_t qd = (int64_t)c->n_heads * hd, kvd = (int64_t)c->n_kv_heads * hd;
    llama_rmsnorm(s->xn1, s->rstd1, s->x, L->attn_norm, n, c->dim, c->norm_eps);
    linear_forward(m, a, li, LLAMA_Q, s->q, s->xn1, n, s->lh[LLAMA_Q], d, w);
    linear_forward(m, a, li, LLAMA_K, s->k, s->xn1, n, s->lh[LLAMA_K], d, w);
    linear_forward(m, a, li, LLAMA_V, s->v, s->xn1, n, s->lh[LLAMA_V], d, w);
#pragma omp parallel for schedule(                                             \
    static) if (n * (c->n_heads + c->n_kv_heads) * hd * 4 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        for (int h = 0; h < c->n_heads; h++)
            llama_rope(s->q + t * qd + h * hd, (int)hd, b->pos[t],
                       c->rope_theta, 0);
        for (int h = 0; h < c->n_kv_heads; h++)
            llama_rope(s->k + t * kvd + h * hd, (int)hd, b->pos[t],
                       c->rope_theta, 0);
    }
    if (kv && kv->k) {
        memcpy(kv->k + (int64_t)kv->base * kvd, s->k,
               (size_t)(n * kvd) * sizeof(float));
        memcpy(kv->v + (int64_t)kv->base * kvd, s->v,
               (size_t)(n * kvd) * sizeof(float));
        attention_forward(c, n, s->q, kv->k, kv->v, b->start, NULL, kv->base,
                          s->att, s->lse);
    } else {
        attention_forward(c, n, s->q, s->k, s->v, b->start, NULL, 0, s->att,
                          s->lse);
    }
    linear_forward(m, a, li, LLAMA_O, s->x2, s->att, n, s->lh[LLAMA_O], d, w);
    for (int64_t e = 0; e < n * dim; e++)
        s->x2[e] += s->x[e];
    llama_rmsnorm(s->xn2, s->rstd2, s->x2, L->ffn_norm, n, c->dim, c->norm_eps);
    linear_forward(m, a, li, LLAMA_GATE, s->g, s->xn2, n, s->lh[LLAMA_GATE], d,
                   w);
    linear_forward(m, a, li, LLAMA_UP, s->u, s->xn2, n, s->lh[LLAMA_UP], d, w);
    int64_t nh_ = n * c->hidden;
#pragma omp parallel for schedule(static) if (nh_ * 8 >= PAR_MIN)
    for (int64_t e = 0; e < nh_; e++) {
        float gv = s->g[e];
        s->hm[e] = gv / (1.0f + expf(-gv)) * s->u[e];
    }
    linear_forward(m, a, li, LLAMA_DOWN, out, s->hm, n, s->lh[LLAMA_DOWN], d,
                   w);
    for (int64_t e = 0; e < n * dim; e++)
        out[e] += s->x2[e];
}

/* Scratch for one layer's backward. */
typedef struct bwork {
    float *dhm, *dg, *du; /* (n, hidden) */
    float *dxn, *dx2;     /* (n, dim) */
    float *datt, *dq;     /* (n, qd) */
    float *dk, *dv;       /* (n, kvd) */
    float *D;             /* (n, nh) */
} bwork;

/* dx (n, dim) = gradient at the layer input given dy at its output (dx may
 * be NULL for the first layer: only the LoRA gradients are wanted). */
static void layer_backward(const llama_model *m, const lora_adapter *a,
                           int32_t li, const llama_batch *b, const acts *s,
                           const float *dy, float *dx, const drop_ctx *d,
                           float *grad, work *w, bwork *bw)
{
    const llama_config *c = &m->cfg;
    const llama_layer *L = &m->layers[li];
    int64_t n = b->n, dim = c->dim, hd = c->head_dim, hid = c->hidden;
    int64_t qd = (int64_t)c->n_heads * hd, kvd = (int64_t)c->n_kv_heads * hd;
    /* MLP */
    memset(bw->dhm, 0, (size_t)(n * hid) * sizeof(float));
    linear_backward(m, a, li, LLAMA_DOWN, bw->dhm, dy, s->hm, n,
                    s->lh[LLAMA_DOWN], d, grad, w);
#pragma omp parallel for schedule(static) if (n * hid * 8 >= PAR_MIN)
    for (int64_t e = 0; e < n * hid; e++) {
        float gv = s->g[e], sg = 1.0f / (1.0f + expf(-gv));
        float dh = bw->dhm[e];
        bw->dg[e] = dh * s->u[e] * (sg * (1.0f + gv * (1.0f - sg)));
        bw->du[e] = dh * (gv * sg);
    }
    memset(bw->dxn, 0, (size_t)(n * dim) * sizeof(float));
    linear_backward(m, a, li, LLAMA_GATE, bw->dxn, bw->dg, s->xn2, n,
                    s->lh[LLAMA_GATE], d, grad, w);
    linear_backward(m, a, li, LLAMA_UP, bw->dxn, bw->du, s->xn2, n,
                    s->lh[LLAMA_UP], d, grad, w);
    memcpy(bw->dx2, dy, (size_t)(n * dim) * sizeof(float));
    rmsnorm_backward(bw->dx2, bw->dxn, s->x2, s->rstd2, L->ffn_norm, n,
                     (int)dim);
    /* attention */
    memset(bw->datt, 0, (size_t)(n * qd) * sizeof(float));
    linear_backward(m, a, li, LLAMA_O, bw->datt, bw->dx2, s->att, n,
                    s->lh[LLAMA_O], d, grad, w);
    attention_backward(c, n, b->start, s->q, s->k, s->v, s->att, s->lse,
                       bw->datt, bw->dq, bw->dk, bw->dv, bw->D);
#pragma omp parallel for schedule(                                             \
    static) if (n * (c->n_heads + c->n_kv_heads) * hd * 4 >= PAR_MIN)
    for (int64_t t = 0; t < n; t++) {
        for (int h = 0; h < c->n_heads; h++)
            llama_rope(bw->dq + t * qd + h * hd, (int)hd, b->pos[t],
                       c->rope_theta, 1);
        for (int h = 0; h < c->n_kv_heads; h++)
            llama_rope(bw->dk + t * kvd + h * hd, (int)hd, b->pos[t],
                       c->rope_theta, 1);
    }
    float *dxn = dx ? bw->dxn : NULL;
    if (dxn)
        memset(dxn, 0, (size_t)(n * dim) * sizeof(float));
    linear_backward(m, a, li, LLAMA_Q, dxn, bw->dq, s->xn1, n, s->lh[LLAMA_Q],
                    d, grad, w);
    linear_backward(m, a, li, LLAMA_K, dxn, bw->dk, s->xn1, n, s->lh[LLAMA_K],
                    d, grad, w);
    linear_backward(m, a, li, LLAMA_V, dxn, bw->dv, s->xn1, n, s->lh[LLAMA_V],
                    d, grad, w);
    if (!dx)
        return;
    memcpy(dx, bw->dx2, (size_t)(n * dim) * sizeof(float));
    rmsnorm_backward(dx, bw->dxn, s->x, s->rstd1, L->attn_norm, n, (int)dim);
}

/* ---- the whole model ----------------------------------------------------- */

static void work_alloc(work *w, const llama_model *m, const lora_adapter *a,
                       int64_t n)
{
    const llama_config *c = &m->cfg;
    int64_t maxin = c->dim > c->hidden ? c->dim : c->hidden;
    if ((int64_t)c->n_heads * c->head_dim > maxin)
        maxin = (int64_t)c->n_heads * c->head_dim;
    int quant = 0;
    for (int32_t i = 0; i < c->n_layers && !quant; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            quant |= m->layers[i].lin[l].f32 == NULL;
    w->wbuf = quant ? xmalloc((size_t)m->max_lin_elems * sizeof(float)) : NULL;
    int drop = a && a->cfg.dropout > 0;
    w->xd = drop ? xmalloc((size_t)(n * maxin) * sizeof(float)) : NULL;
    w->dxd = drop ? xmalloc((size_t)(n * maxin) * sizeof(float)) : NULL;
    w->dlh = a ? xmalloc((size_t)(n * a->cfg.r) * sizeof(float)) : NULL;
}

static void work_free(work *w)
{
    free(w->wbuf);
    free(w->xd);
    free(w->dxd);
    free(w->dlh);
}

static void embed_rows(const llama_model *m, const llama_batch *b, float *x)
{
    int dim = m->cfg.dim;
    for (int64_t t = 0; t < b->n; t++)
        memcpy(x + t * dim, m->embed + (int64_t)b->ids[t] * dim,
               (size_t)dim * sizeof(float));
}

#define HEAD_CHUNK 64

/* The head and the loss over the final hidden states x (n, dim). With dx,
 * writes the gradient of loss_scale * sum w CE at x. */
static void head_loss(const llama_model *m, const llama_batch *b,
                      const float *x, float *logits_out, double *loss_sum,
                      double *weight_sum, float loss_scale, float *dx)
{
    const llama_config *c = &m->cfg;
    int64_t n = b->n, dim = c->dim, V = c->vocab;
    float *xf = xmalloc((size_t)(n * dim) * sizeof(float));
    float *rstd = xmalloc((size_t)n * sizeof(float));
    llama_rmsnorm(xf, rstd, x, m->norm, n, c->dim, c->norm_eps);
    const float *Wh = m->head.f32;
    float *ce = xmalloc((size_t)n * sizeof(float));
    float *lg =
        logits_out ? NULL : xmalloc((size_t)(HEAD_CHUNK * V) * sizeof(float));
    float *dxf = dx ? xcalloc((size_t)(n * dim), sizeof(float)) : NULL;
    for (int64_t t0 = 0; t0 < n; t0 += HEAD_CHUNK) {
        int64_t cn = n - t0 < HEAD_CHUNK ? n - t0 : HEAD_CHUNK;
        float *L = logits_out ? logits_out + t0 * V : lg;
        llama_matmul(L, xf + t0 * dim, Wh, cn, V, dim);
        if (!b->targets)
            continue;
#pragma omp parallel for schedule(static) if (cn * V * 4 >= PAR_MIN)
        for (int64_t r = 0; r < cn; r++) {
            int64_t t = t0 + r;
            int32_t y = b->targets[t];
            float wt = b->weights ? b->weights[t] : 1.0f;
            ce[t] = 0;
            if (y < 0)
                continue;
            const float *row = L + r * V;
            float mx = -INFINITY;
            for (int64_t v = 0; v < V; v++)
                mx = row[v] > mx ? row[v] : mx;
            double se = 0;
            for (int64_t v = 0; v < V; v++)
                se += exp((double)(row[v] - mx));
            float lse = mx + (float)log(se);
            ce[t] = lse - row[y];
            if (!dx)
                continue;
            /* softmax - onehot, scaled; written back over the logits */
            float *gr = (float *)row;
            float k = loss_scale * wt;
            for (int64_t v = 0; v < V; v++)
                gr[v] = k * expf(row[v] - lse);
            gr[y] -= k;
        }
        if (dx) {
            /* rows without a target carry no gradient */
            for (int64_t r = 0; r < cn; r++)
                if (b->targets[t0 + r] < 0)
                    memset(L + r * V, 0, (size_t)V * sizeof(float));
            matmul_acc_nn(dxf + t0 * dim, L, Wh, cn, V, dim);
        }
    }
    if (b->targets) {
        double ls = 0, ws = 0;
        for (int64_t t = 0; t < n; t++)
            if (b->targets[t] >= 0) {
                float wt = b->weights ? b->weights[t] : 1.0f;
                ls += (double)wt * ce[t];
                ws += wt;
            }
        if (loss_sum)
            *loss_sum = ls;
        if (weight_sum)
            *weight_sum = ws;
    }
    if (dx) {
        memset(dx, 0, (size_t)(n * dim) * sizeof(float));
        rmsnorm_backward(dx, dxf, x, rstd, m->norm, n, c->dim);
    }
    free(dxf);
    free(lg);
    free(ce);
    free(rstd);
    free(xf);
}

int llama_forward(const llama_model *m, const lora_adapter *a,
                  const llama_batch *b, float *logits, double *loss_sum,
                  double *weight_sum)
{
    if (llama_batch_check(m, b) != 0)
        return -1;
    const llama_config *c = &m->cfg;
    int64_t n = b->n;
    acts s;
    float *blk = acts_alloc(&s, c, a, n);
    float *nx = xmalloc((size_t)(n * c->dim) * sizeof(float));
    work w;
    work_alloc(&w, m, NULL, n);
    embed_rows(m, b, s.x);
    for (int32_t i = 0; i < c->n_layers; i++) {
        layer_forward(m, a, i, b, &s, nx, NULL, NULL, &w);
        memcpy(s.x, nx, (size_t)(n * c->dim) * sizeof(float));
    }
    head_loss(m, b, s.x, logits, loss_sum, weight_sum, 0, NULL);
    work_free(&w);
    free(nx);
    free(blk);
    return 0;
}

uint64_t llama_train_activation_bytes(const llama_model *m,
                                      const lora_adapter *a, int64_t n,
                                      int checkpointing)
{
    const llama_config *c = &m->cfg;
    uint64_t layer = acts_floats(c, a, n) * 4;
    uint64_t x = (uint64_t)n * c->dim * 4;
    if (checkpointing)
        return (uint64_t)c->n_layers * x + layer + x;
    return (uint64_t)c->n_layers * layer + x;
}

int llama_forward_backward(const llama_model *m, const lora_adapter *a,
                           const llama_batch *b, const llama_train_opts *o,
                           float loss_scale, float *grad, double *loss_sum)
{
    if (!b->targets)
        return msg_error("training batch without targets");
    if (llama_batch_check(m, b) != 0)
        return -1;
    const llama_config *c = &m->cfg;
    int32_t nl = c->n_layers;
    int64_t n = b->n, dim = c->dim, hid = c->hidden;
    int64_t qd = (int64_t)c->n_heads * c->head_dim;
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    int ckpt = o && o->checkpointing;
    drop_ctx dc = {a ? (float)a->cfg.dropout : 0, o ? o->dropout_key : 0};
    /* activations: every layer's, or only every layer's input plus one */
    int nsets = ckpt ? 1 : nl;
    acts *sets = xcalloc((size_t)nsets, sizeof *sets);
    float **blks = xcalloc((size_t)nsets, sizeof *blks);
    for (int i = 0; i < nsets; i++)
        blks[i] = acts_alloc(&sets[i], c, a, n);
    float *xs =
        ckpt ? xmalloc((size_t)((nl + 1) * n * dim) * sizeof(float)) : NULL;
    float *xl = xmalloc((size_t)(n * dim) * sizeof(float)); /* final hidden */
    work w;
    work_alloc(&w, m, a, n);
    /* forward */
    float *x0 = ckpt ? xs : sets[0].x;
    embed_rows(m, b, x0);
    for (int32_t i = 0; i < nl; i++) {
        acts *s = &sets[ckpt ? 0 : i];
        if (ckpt)
            memcpy(s->x, xs + (int64_t)i * n * dim,
                   (size_t)(n * dim) * sizeof(float));
        float *out = i + 1 < nl ? (ckpt ? xs + (int64_t)(i + 1) * n * dim
                                        : sets[i + 1].x)
                                : xl;
        layer_forward(m, a, i, b, s, out, &dc, NULL, &w);
    }
    /* loss and its gradient at the final hidden state */
    float *dy = xmalloc((size_t)(n * dim) * sizeof(float));
    float *dxb = xmalloc((size_t)(n * dim) * sizeof(float));
    head_loss(m, b, xl, NULL, loss_sum, NULL, loss_scale, dy);
    /* backward */
    bwork bw;
    float *bblk = xmalloc((size_t)(3 * n * hid + 2 * n * dim + 2 * n * qd +
                                   2 * n * kvd + n * c->n_heads) *
                          sizeof(float));
    float *p = bblk;
    bw.dhm = p;
    p += n * hid;
    bw.dg = p;
    p += n * hid;
    bw.du = p;
    p += n * hid;
    bw.dxn = p;
    p += n * dim;
    bw.dx2 = p;
    p += n * dim;
    bw.datt = p;
    p += n * qd;
    bw.dq = p;
    p += n * qd;
    bw.dk = p;
    p += n * kvd;
    bw.dv = p;
    p += n * kvd;
    bw.D = p;
    for (int32_t i = nl - 1; i >= 0; i--) {
        acts *s = &sets[ckpt ? 0 : i];
        if (ckpt) {
            /* recompute this layer exactly as the forward did */
            memcpy(s->x, xs + (int64_t)i * n * dim,
                   (size_t)(n * dim) * sizeof(float));
            layer_forward(m, a, i, b, s, xl, &dc, NULL, &w);
        }
        layer_backward(m, a, i, b, s, dy, i > 0 ? dxb : NULL, &dc, grad, &w,
                       &bw);
        float *t = dy;
        dy = dxb;
        dxb = t;
    }
    free(bblk);
    free(dy);
    free(dxb);
    work_free(&w);
    free(xl);
    free(xs);
    for (int i = 0; i < nsets; i++)
        free(blks[i]);
    free(blks);
    free(sets);
    return 0;
}

/* ---- decoding with a cache ----------------------------------------------- */

llama_kv_cache *llama_kv_cache_new(const llama_model *m, int32_t cap)
{
    const llama_config *c = &m->cfg;
    llama_kv_cache *kc = xcalloc(1, sizeof *kc);
    size_t nf = (size_t)c->n_layers * (size_t)cap * (size_t)c->n_kv_heads *
                (size_t)c->head_dim;
    kc->cap = cap;
    kc->k = xmalloc(nf * sizeof(float));
    kc->v = xmalloc(nf * sizeof(float));
    return kc;
}

void llama_kv_cache_free(llama_kv_cache *c)
{
    if (!c)
        return;
    free(c->k);
    free(c->v);
    free(c);
}

int llama_decode(const llama_model *m, const lora_adapter *a,
                 llama_kv_cache *kc, const int32_t *ids, int32_t n,
                 float *logits)
{
    const llama_config *c = &m->cfg;
    if (n < 1)
        return 0;
    if ((int64_t)kc->len + n > kc->cap)
        return msg_error("context of %d tokens is full", kc->cap);
    int32_t *pos = xmalloc((size_t)n * sizeof(int32_t));
    int32_t *start = xcalloc((size_t)n, sizeof(int32_t));
    for (int32_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= c->vocab) {
            free(pos);
            free(start);
            return msg_error("token id %d out of range (vocabulary %d)", ids[t],
                             c->vocab);
        }
        pos[t] = kc->len + t;
    }
    llama_batch b = {n, ids, pos, start, NULL, NULL};
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    acts s;
    float *blk = acts_alloc(&s, c, a, n);
    float *nx = xmalloc((size_t)((int64_t)n * c->dim) * sizeof(float));
    work w;
    work_alloc(&w, m, NULL, n);
    embed_rows(m, &b, s.x);
    for (int32_t i = 0; i < c->n_layers; i++) {
        kv_src kv = {kc->k + (int64_t)i * kc->cap * kvd,
                     kc->v + (int64_t)i * kc->cap * kvd, kc->len};
        layer_forward(m, a, i, &b, &s, nx, NULL, &kv, &w);
        memcpy(s.x, nx, (size_t)((int64_t)n * c->dim) * sizeof(float));
    }
    if (logits) {
        llama_batch last = {1, ids + n - 1, pos + n - 1, start, NULL, NULL};
        head_loss(m, &last, s.x + (int64_t)(n - 1) * c->dim, logits, NULL, NULL,
                  0, NULL);
    }
    kc->len += n;
    work_free(&w);
    free(nx);
    free(blk);
    free(pos);
    free(start);
    return 0;
}
