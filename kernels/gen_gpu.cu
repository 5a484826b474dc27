/* gen_gpu.cu: lora-gen's GPU backend (see gen_gpu.h): llama_decode's
 * computation for many sequences at once, on the kernels of this directory.
 *
 * A call is one forward over a flat list of tokens, each with its slot and
 * position (ids, positions, slots and the rows whose logits are wanted sit
 * in one small device buffer, uploaded once per call):
 *   embedding -> per layer: RMSNorm, q/k/v (+LoRA), RoPE + cache append,
 *   attention, o (+LoRA) added to the residual by the product, RMSNorm,
 *   gate/up (+LoRA), SwiGLU, down (+LoRA) added to the residual -> final
 *   RMSNorm of the rows wanted -> head -> logits, or their argmax.
 * Prefill (whole prompts) in NF4 mode: products through one bf16
 * dequantization per matrix and cuBLAS, q/k/v and gate/up as one product
 * each (their outputs side by side in one row, their weights dequantized
 * side by side), attention among the prompt's own tokens with the flash
 * attention of attention.cu; where the device holds it, a round of
 * prompts is one call (T up to 32,768 tokens). Decoding (one token per
 * sequence): the fused products of nf4_gemv.cu and, for bf16 caches, RoPE,
 * append and cache attention in one launch (decode_attn.cu, split over the
 * cached positions), captured once per batch size as a CUDA graph and
 * replayed (a 7B step is ~260 launches: too many to issue one by one at
 * batch 1). f32 mode does everything on CUDA cores in fp32.
 */
#define _Noreturn [[noreturn]]
extern "C" {
#include "generate.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "nf4.h"
#include "ops_ref.h"
}
#include "common.cuh"
#include "gen_gpu.h"
#include "gen_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct glora {
    float *A, *B;     /* (r, in), (out, r) */
    bf16 *A16, *B16;  /* bf16 copies for prefill products (NF4 mode) */
} glora;

typedef struct gen_gpu {
    const llama_model *m;
    int bf; /* NF4 mode: bf16 operands, bf16 cache */
    int32_t slots, cap;
    int64_t T; /* tokens one call takes at most */
    int L, dim, hid, nh, nkv, hd, qd, kvd, vocab, r;
    float lscale;
    cudaStream_t s;
    float *embed, *norm;
    float **anorm, **fnorm; /* (L) device pointers */
    kn_gw head;
    kn_gw *lin;             /* (L * 7) */
    glora *lo;              /* (L * 7), A NULL when not targeted */
    float *cos_t, *sin_t;   /* (cap, hd / 2) */
    void **kc, **vc;        /* (L) caches (slots, cap, kvd) */
    float *x, *xn32, *q, *k, *v, *att32, *g, *u, *h32, *lh32, *lse, *logits;
    int64_t ldqkv, ldgu; /* q, k, v side by side in rows of ldqkv; g, u in rows
                            of ldgu: each group one product in a prefill */
    bf16 *xn16, *q16, *k16, *v16, *att16, *h16, *lh16, *wbuf;
    void *ws;
    size_t ws_bytes;
    float *att_ws;          /* the split attention's partial results */
    float *ra_ws;           /* the fused decoding attention's (NULL: not used) */
    int32_t *d_meta, *h_meta, *d_amax, *h_amax;
    int32_t *len;           /* (slots) positions filled, host */
    int use_graphs;
    cudaGraphExec_t *graphs; /* (slots + 1), by batch size */
    int graph_limit, graph_argmax;
    void **allocs;
    size_t nallocs, cap_allocs;
} gen_gpu;

static void *dalloc(gen_gpu *G, size_t bytes)
{
    void *p = kn_malloc(bytes ? bytes : 16);
    if (G->nallocs == G->cap_allocs) {
        G->cap_allocs = G->cap_allocs ? 2 * G->cap_allocs : 64;
        G->allocs = (void **)xrealloc(G->allocs, G->cap_allocs * sizeof *G->allocs);
    }
    G->allocs[G->nallocs++] = p;
    return p;
}

static void *upload(gen_gpu *G, const void *x, size_t bytes)
{
    void *d = dalloc(G, bytes);
    kn_memcpy_h2d(d, x, bytes, G->s);
    kn_stream_sync(G->s);
    return d;
}

/* (rows, cols) f32 -> bf16 rows of ld = cols rounded up to 64, zero-padded. */
static bf16 *upload_bf16_padded(gen_gpu *G, const float *x, int64_t rows, int64_t cols,
                                int64_t *ld)
{
    int64_t l = (cols + 63) / 64 * 64;
    uint16_t *h = (uint16_t *)xcalloc((size_t)(rows * l), 2);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++)
            h[r * l + c] = ops_bf16_from_f32(x[r * cols + c]);
    bf16 *d = (bf16 *)upload(G, h, (size_t)(rows * l) * 2);
    free(h);
    *ld = l;
    return d;
}

static bf16 *upload_bf16(gen_gpu *G, const float *x, int64_t n)
{
    uint16_t *h = (uint16_t *)xmalloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++)
        h[i] = ops_bf16_from_f32(x[i]);
    bf16 *d = (bf16 *)upload(G, h, (size_t)n * 2);
    free(h);
    return d;
}

static int nf4_fusable(const nf4_weight *q)
{
    return q->ndim == 2 && q->shape[1] % 64 == 0 && q->blocksize % 64 == 0;
}

static void upload_weight(gen_gpu *G, kn_gw *g, const llama_weight *w, float *scratch)
{
    memset(g, 0, sizeof *g);
    g->out = w->rows;
    g->in = w->cols;
    if (G->bf && w->nf4 && nf4_fusable(w->nf4)) {
        const nf4_weight *q = w->nf4;
        g->kind = KN_GW_NF4;
        g->q.numel = q->numel;
        g->q.blocksize = q->blocksize;
        g->q.nested_blocksize = q->nested_blocksize;
        g->q.codes = (const uint8_t *)upload(G, q->packed, (size_t)(q->numel + 1) / 2);
        g->q.quant_map = (const float *)upload(G, q->quant_map, sizeof q->quant_map);
        if (q->nested) {
            g->q.absmax_q = (const uint8_t *)upload(G, q->absmax_code, (size_t)q->nblocks);
            g->q.nested_absmax = (const float *)upload(
                G, q->nested_absmax, (size_t)q->nested_nblocks * sizeof(float));
            g->q.nested_map = (const float *)upload(G, q->nested_map, sizeof q->nested_map);
            g->q.offset = q->nested_offset;
        } else {
            g->q.absmax = (const float *)upload(G, q->absmax, (size_t)q->nblocks * sizeof(float));
        }
        return;
    }
    const float *f = llama_weight_f32(w, scratch);
    if (G->bf) {
        g->kind = KN_GW_BF16;
        g->bf16 = (const kn_bf16 *)upload_bf16_padded(G, f, w->rows, w->cols, &g->ld);
    } else {
        g->kind = KN_GW_F32;
        g->f32 = (const float *)upload(G, f, (size_t)(w->rows * w->cols) * sizeof(float));
    }
}

/* ---- one forward -------------------------------------------------------- */

typedef struct call {
    int n, nseq, prefill;
    const int32_t *ids, *pos, *slot, *start, *rows; /* device */
    int32_t limit;
    int argmax;
} call;

/* y_i (+)= x W_i^T (+ LoRA) for linears ls[0..nl) of layer li. */
static void lin(gen_gpu *G, const call *c, int li, const int *ls, int nl, float *const *y,
                const int64_t *ldy, int resid, const float *x32, const bf16 *x16, int64_t ldx,
                int n)
{
    if (!G->bf) {
        for (int i = 0; i < nl; i++) {
            const kn_gw *w = &G->lin[li * LLAMA_NLINEAR + ls[i]];
            kn_gen_linear_f32(y[i], resid ? y[i] : NULL, ldy[i], x32, NULL, ldx, w->f32, w->out,
                              w->in, n, 1.0f, G->s);
        }
    } else if (!c->prefill || n <= 64) {
        int same = 1;
        for (int i = 1; i < nl; i++)
            same &= G->lin[li * LLAMA_NLINEAR + ls[i]].kind ==
                    G->lin[li * LLAMA_NLINEAR + ls[0]].kind;
        for (int n0 = 0; n0 < n; n0 += 64) {
            int nn = n - n0 < 64 ? n - n0 : 64;
            kn_gen_lin ops[3];
            for (int i = 0; i < nl; i++) {
                ops[i].w = G->lin[li * LLAMA_NLINEAR + ls[i]];
                ops[i].y = y[i] + (int64_t)n0 * ldy[i];
                ops[i].res = resid ? ops[i].y : NULL;
                ops[i].ldy = ldy[i];
            }
            const kn_bf16 *xx = (const kn_bf16 *)(x16 + (int64_t)n0 * ldx);
            if (same)
                kn_gen_linear_mma(ops, nl, xx, ldx, nn, G->ws, G->ws_bytes, G->s);
            else
                for (int i = 0; i < nl; i++)
                    kn_gen_linear_mma(&ops[i], 1, xx, ldx, nn, G->ws, G->ws_bytes, G->s);
        }
    } else {
        /* a group whose outputs sit side by side in one row (q/k/v, gate/up)
         * and whose weights are all NF4: dequantized one after the other
         * into wbuf, one product (one GEMM of N 12,288 instead of three of
         * 4,096 for a 7B: fewer partial waves) */
        int cat = nl > 1 && !resid;
        for (int i = 0; cat && i < nl; i++) {
            const kn_gw *w = &G->lin[li * LLAMA_NLINEAR + ls[i]];
            const kn_gw *w0 = &G->lin[li * LLAMA_NLINEAR + ls[0]];
            cat = w->kind == KN_GW_NF4 && w->in == w0->in && ldy[i] == ldy[0] &&
                  (i == 0 || y[i] == y[i - 1] + G->lin[li * LLAMA_NLINEAR + ls[i - 1]].out);
        }
        if (cat) {
            int64_t off = 0;
            for (int i = 0; i < nl; i++) {
                const kn_gw *w = &G->lin[li * LLAMA_NLINEAR + ls[i]];
                kn_nf4_dequant((kn_bf16 *)(G->wbuf + off * w->in), &w->q, G->s);
                off += w->out;
            }
            const int in = (int)G->lin[li * LLAMA_NLINEAR + ls[0]].in;
            kn_gemm(0, 1, n, (int)off, in, 1.0f, (const kn_bf16 *)x16, (int)ldx,
                    (const kn_bf16 *)G->wbuf, in, 0.0f, y[0], KN_F32, (int)ldy[0], G->s);
        }
        for (int i = 0; !cat && i < nl; i++) {
            const kn_gw *w = &G->lin[li * LLAMA_NLINEAR + ls[i]];
            const kn_bf16 *W;
            int ldw;
            if (w->kind == KN_GW_NF4) {
                kn_nf4_dequant((kn_bf16 *)G->wbuf, &w->q, G->s);
                W = (const kn_bf16 *)G->wbuf;
                ldw = (int)w->in;
            } else {
                W = w->bf16;
                ldw = (int)w->ld;
            }
            kn_gemm(0, 1, n, (int)w->out, (int)w->in, 1.0f, (const kn_bf16 *)x16, (int)ldx, W,
                    ldw, resid ? 1.0f : 0.0f, y[i], KN_F32, (int)ldy[i], G->s);
        }
    }
    /* LoRA: y += scale * (x A^T) B^T */
    for (int i = 0; i < nl; i++) {
        const glora *a = &G->lo[li * LLAMA_NLINEAR + ls[i]];
        if (!a->A)
            continue;
        const kn_gw *w = &G->lin[li * LLAMA_NLINEAR + ls[i]];
        if (G->bf && c->prefill && n > 64) {
            kn_gemm(0, 1, n, G->r, (int)w->in, 1.0f, (const kn_bf16 *)x16, (int)ldx,
                    (const kn_bf16 *)a->A16, (int)w->in, 0.0f, G->lh16, KN_BF16, G->r, G->s);
            kn_gemm(0, 1, n, (int)w->out, G->r, G->lscale, (const kn_bf16 *)G->lh16, G->r,
                    (const kn_bf16 *)a->B16, G->r, 1.0f, y[i], KN_F32, (int)ldy[i], G->s);
        } else {
            kn_gen_linear_f32(G->lh32, NULL, G->r, G->bf ? NULL : x32,
                              G->bf ? (const kn_bf16 *)x16 : NULL, ldx, a->A, G->r, w->in, n,
                              1.0f, G->s);
            kn_gen_linear_f32(y[i], y[i], ldy[i], G->lh32, NULL, G->r, a->B, w->out, G->r, n,
                              G->lscale, G->s);
        }
    }
}

static void forward(gen_gpu *G, const call *c)
{
    const llama_config *mc = &G->m->cfg;
    int n = c->n;
    cudaStream_t s = G->s;
    kn_gen_embed(G->x, G->embed, c->ids, n, G->dim, s);
    for (int li = 0; li < G->L; li++) {
        kn_gen_rmsnorm(G->bf ? NULL : G->xn32, (kn_bf16 *)(G->bf ? G->xn16 : NULL), G->x, NULL,
                       G->anorm[li], n, G->dim, mc->norm_eps, s);
        {
            int ls[3] = {LLAMA_Q, LLAMA_K, LLAMA_V};
            float *y[3] = {G->q, G->k, G->v};
            int64_t ldy[3] = {G->ldqkv, G->ldqkv, G->ldqkv};
            lin(G, c, li, ls, 3, y, ldy, 0, G->xn32, G->xn16, G->dim, n);
        }
        int flash = G->bf && c->prefill;
        if (!c->prefill && G->ra_ws) {
            /* decoding: RoPE, append and attention in one launch */
            kn_gen_rope_attention(NULL, (kn_bf16 *)G->att16, G->q, G->ldqkv, G->k, G->ldqkv,
                                  G->v, G->ldqkv, G->kc[li], G->vc[li], c->slot, c->pos, n, G->nh,
                                  G->nkv, G->hd, G->cap, G->cos_t, G->sin_t, G->ra_ws, s);
        } else {
            kn_gen_rope_append(G->q, G->ldqkv, G->k, G->ldqkv, G->v, G->ldqkv, G->kc[li],
                               G->vc[li], G->bf, c->slot, c->pos, n, G->nh, G->nkv, G->hd,
                               G->cap, G->cos_t, G->sin_t, (kn_bf16 *)(flash ? G->q16 : NULL),
                               (kn_bf16 *)(flash ? G->k16 : NULL),
                               (kn_bf16 *)(flash ? G->v16 : NULL), s);
            if (flash)
                kn_attention_forward((kn_bf16 *)G->att16, G->lse, (const kn_bf16 *)G->q16,
                                     (const kn_bf16 *)G->k16, (const kn_bf16 *)G->v16, c->start,
                                     n, G->nh, G->nkv, G->hd, s);
            else
                kn_gen_attention(G->bf ? NULL : G->att32, (kn_bf16 *)(G->bf ? G->att16 : NULL),
                                 G->q, G->ldqkv, G->kc[li], G->vc[li], G->bf, c->slot, c->pos, n,
                                 G->nh, G->nkv, G->hd, G->cap, G->att_ws, s);
        }
        {
            int ls[1] = {LLAMA_O};
            float *y[1] = {G->x};
            int64_t ldy[1] = {G->dim};
            lin(G, c, li, ls, 1, y, ldy, 1, G->att32, G->att16, G->qd, n);
        }
        kn_gen_rmsnorm(G->bf ? NULL : G->xn32, (kn_bf16 *)(G->bf ? G->xn16 : NULL), G->x, NULL,
                       G->fnorm[li], n, G->dim, mc->norm_eps, s);
        {
            int ls[2] = {LLAMA_GATE, LLAMA_UP};
            float *y[2] = {G->g, G->u};
            int64_t ldy[2] = {G->ldgu, G->ldgu};
            lin(G, c, li, ls, 2, y, ldy, 0, G->xn32, G->xn16, G->dim, n);
        }
        kn_gen_swiglu(G->bf ? NULL : G->h32, (kn_bf16 *)(G->bf ? G->h16 : NULL), G->g, G->u,
                      G->ldgu, n, G->hid, s);
        {
            int ls[1] = {LLAMA_DOWN};
            float *y[1] = {G->x};
            int64_t ldy[1] = {G->dim};
            lin(G, c, li, ls, 1, y, ldy, 1, G->h32, G->h16, G->hid, n);
        }
    }
    /* the head, for the rows wanted */
    int ns = c->nseq;
    kn_gen_rmsnorm(G->bf ? NULL : G->xn32, (kn_bf16 *)(G->bf ? G->xn16 : NULL), G->x, c->rows,
                   G->norm, ns, G->dim, mc->norm_eps, s);
    if (G->bf) {
        for (int n0 = 0; n0 < ns; n0 += 64) {
            kn_gen_lin op;
            op.w = G->head;
            op.y = G->logits + (int64_t)n0 * G->vocab;
            op.res = NULL;
            op.ldy = G->vocab;
            kn_gen_linear_mma(&op, 1, (const kn_bf16 *)(G->xn16 + (int64_t)n0 * G->dim), G->dim,
                              ns - n0 < 64 ? ns - n0 : 64, G->ws, G->ws_bytes, s);
        }
    } else {
        kn_gen_linear_f32(G->logits, NULL, G->vocab, G->xn32, NULL, G->dim, G->head.f32,
                          G->vocab, G->dim, ns, 1.0f, s);
    }
    if (c->argmax)
        kn_gen_argmax(G->d_amax, G->logits, G->vocab, c->limit, ns, s);
}

static void results(gen_gpu *G, int ns, float *logits, int32_t *argmax)
{
    if (argmax) {
        CUDA_CHECK(cudaMemcpyAsync(G->h_amax, G->d_amax, (size_t)ns * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, G->s));
        kn_stream_sync(G->s);
        memcpy(argmax, G->h_amax, (size_t)ns * sizeof(int32_t));
    } else {
        kn_memcpy_d2h(logits, G->logits, (size_t)ns * G->vocab * sizeof(float), G->s);
    }
}

static int be_prefill(void *ctx, int32_t nseq, const int32_t *slot, const int32_t *ids,
                      const int32_t *len, int32_t limit, float *logits, int32_t *argmax)
{
    gen_gpu *G = (gen_gpu *)ctx;
    int64_t n = 0;
    for (int32_t i = 0; i < nseq; i++) {
        if (slot[i] < 0 || slot[i] >= G->slots || len[i] < 1 || len[i] > G->cap)
            return msg_error("prefill: bad slot %d or prompt length %d", slot[i], len[i]);
        n += len[i];
    }
    if (nseq < 1)
        return 0;
    if (n > G->T)
        return msg_error("prefill of %lld tokens: at most %lld at once", (long long)n,
                         (long long)G->T);
    int32_t *h = G->h_meta;
    int32_t *hid = h, *hpos = h + n, *hslot = h + 2 * n, *hstart = h + 3 * n,
            *hrows = h + 4 * n;
    int64_t t = 0;
    for (int32_t i = 0; i < nseq; i++) {
        int64_t t0 = t;
        for (int32_t j = 0; j < len[i]; j++, t++) {
            if (ids[t] < 0 || ids[t] >= G->vocab)
                return msg_error("token id %d out of range (vocabulary %d)", ids[t], G->vocab);
            hid[t] = ids[t];
            hpos[t] = j;
            hslot[t] = slot[i];
            hstart[t] = (int32_t)t0;
        }
        hrows[i] = (int32_t)(t - 1);
    }
    CUDA_CHECK(cudaMemcpyAsync(G->d_meta, h, (size_t)(4 * n + nseq) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, G->s));
    call c = {(int)n, nseq, 1, G->d_meta, G->d_meta + n, G->d_meta + 2 * n, G->d_meta + 3 * n,
              G->d_meta + 4 * n, limit, argmax != NULL};
    forward(G, &c);
    results(G, nseq, logits, argmax);
    for (int32_t i = 0; i < nseq; i++)
        G->len[slot[i]] = len[i];
    return 0;
}

static int be_decode(void *ctx, int32_t n, const int32_t *slot, const int32_t *ids,
                     int32_t limit, float *logits, int32_t *argmax)
{
    gen_gpu *G = (gen_gpu *)ctx;
    if (n < 1)
        return 0;
    if (n > G->slots)
        return msg_error("decode: %d sequences, %d slots", n, G->slots);
    int32_t *h = G->h_meta;
    for (int32_t i = 0; i < n; i++) {
        if (slot[i] < 0 || slot[i] >= G->slots)
            return msg_error("decode: bad slot %d", slot[i]);
        if (G->len[slot[i]] >= G->cap)
            return msg_error("context of %d tokens is full", G->cap);
        if (ids[i] < 0 || ids[i] >= G->vocab)
            return msg_error("token id %d out of range (vocabulary %d)", ids[i], G->vocab);
        h[i] = ids[i];
        h[n + i] = G->len[slot[i]];
        h[2 * n + i] = slot[i];
        h[3 * n + i] = i; /* rows: every token */
    }
    CUDA_CHECK(cudaMemcpyAsync(G->d_meta, h, (size_t)(4 * n) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, G->s));
    call c = {n, n, 0, G->d_meta, G->d_meta + n, G->d_meta + 2 * n, NULL, G->d_meta + 3 * n,
              limit, argmax != NULL};
    if (G->use_graphs) {
        if (G->graph_limit != limit || G->graph_argmax != (argmax != NULL)) {
            for (int i = 0; i <= G->slots; i++)
                if (G->graphs[i]) {
                    cudaGraphExecDestroy(G->graphs[i]);
                    G->graphs[i] = NULL;
                }
            G->graph_limit = limit;
            G->graph_argmax = argmax != NULL;
        }
        if (!G->graphs[n]) {
            cudaGraph_t gr;
            CUDA_CHECK(cudaStreamBeginCapture(G->s, cudaStreamCaptureModeThreadLocal));
            forward(G, &c);
            CUDA_CHECK(cudaStreamEndCapture(G->s, &gr));
            CUDA_CHECK(cudaGraphInstantiate(&G->graphs[n], gr, 0));
            CUDA_CHECK(cudaGraphDestroy(gr));
        }
        CUDA_CHECK(cudaGraphLaunch(G->graphs[n], G->s));
    } else {
        forward(G, &c);
    }
    results(G, n, logits, argmax);
    for (int32_t i = 0; i < n; i++)
        G->len[slot[i]]++;
    return 0;
}

static void be_free(void *ctx)
{
    gen_gpu *G = (gen_gpu *)ctx;
    if (!G)
        return;
    kn_stream_sync(G->s);
    if (G->graphs)
        for (int i = 0; i <= G->slots; i++)
            if (G->graphs[i])
                cudaGraphExecDestroy(G->graphs[i]);
    free(G->graphs);
    for (size_t i = 0; i < G->nallocs; i++)
        kn_free(G->allocs[i]);
    free(G->allocs);
    if (G->h_meta)
        cudaFreeHost(G->h_meta);
    if (G->h_amax)
        cudaFreeHost(G->h_amax);
    free(G->anorm);
    free(G->fnorm);
    free(G->lin);
    free(G->lo);
    free(G->kc);
    free(G->vc);
    free(G->len);
    cudaStreamDestroy(G->s);
    free(G);
}

extern "C" size_t gen_gpu_peak_bytes(const gen_backend *be)
{
    (void)be;
    return kn_mem_peak();
}

/* Bytes of workspace the fused products need for up to 64 tokens. */
static size_t ws_need(gen_gpu *G)
{
    size_t best = 0;
    static const int groups[4][4] = {{3, LLAMA_Q, LLAMA_K, LLAMA_V},
                                     {1, LLAMA_O, 0, 0},
                                     {2, LLAMA_GATE, LLAMA_UP, 0},
                                     {1, LLAMA_DOWN, 0, 0}};
    for (int li = 0; li < G->L; li++)
        for (int gi = 0; gi < 4; gi++) {
            kn_gen_lin ops[3];
            memset(ops, 0, sizeof ops);
            int nl = groups[gi][0];
            for (int i = 0; i < nl; i++)
                ops[i].w = G->lin[li * LLAMA_NLINEAR + groups[gi][1 + i]];
            size_t b = kn_gen_linear_mma_ws(ops, nl, 64);
            if (b > best)
                best = b;
        }
    kn_gen_lin hop;
    memset(&hop, 0, sizeof hop);
    hop.w = G->head;
    size_t b = kn_gen_linear_mma_ws(&hop, 1, 64);
    return b > best ? b : best;
}

extern "C" int gen_gpu_backend(const llama_model *m, const lora_adapter *a, int32_t slots,
                               int32_t cap, gen_backend *be)
{
    const llama_config *mc = &m->cfg;
    if (kn_device_count() < 1)
        return msg_error("no CUDA device");
    if (kn_init(0) != 0)
        return -1;
    if (slots < 1 || cap < 1)
        return msg_error("bad backend size: %d slots of %d positions", slots, cap);
    if (mc->head_dim % 4 || mc->head_dim > 128 || mc->n_heads % mc->n_kv_heads ||
        mc->dim % 4 || mc->hidden % 4)
        return msg_error("model shape not supported on the GPU (head_dim %d, dim %d, hidden "
                         "%d: multiples of 4, head_dim at most 128)",
                         mc->head_dim, mc->dim, mc->hidden);
    if (a && a->cfg.r % 4)
        return msg_error("LoRA rank %d not supported on the GPU (a multiple of 4)", a->cfg.r);
    gen_gpu *G = (gen_gpu *)xcalloc(1, sizeof *G);
    G->m = m;
    G->bf = mc->quantized;
    G->cap = cap;
    G->L = mc->n_layers;
    G->dim = mc->dim;
    G->hid = mc->hidden;
    G->nh = mc->n_heads;
    G->nkv = mc->n_kv_heads;
    G->hd = mc->head_dim;
    G->qd = G->nh * G->hd;
    G->kvd = G->nkv * G->hd;
    G->vocab = mc->vocab;
    G->r = a ? a->cfg.r : 0;
    G->lscale = a ? a->scale : 0.0f;
    G->use_graphs = !getenv("QLORA_GEN_NO_GRAPHS");
    CUDA_CHECK(cudaStreamCreateWithFlags(&G->s, cudaStreamNonBlocking));
    kn_mem_reset_peak();

    /* the model */
    float *scratch = (float *)xmalloc((size_t)(m->max_lin_elems > 0 ? m->max_lin_elems : 1) *
                                      sizeof(float));
    G->embed = (float *)upload(G, m->embed, (size_t)G->vocab * G->dim * sizeof(float));
    G->norm = (float *)upload(G, m->norm, (size_t)G->dim * sizeof(float));
    G->anorm = (float **)xcalloc((size_t)G->L, sizeof(float *));
    G->fnorm = (float **)xcalloc((size_t)G->L, sizeof(float *));
    G->lin = (kn_gw *)xcalloc((size_t)G->L * LLAMA_NLINEAR, sizeof(kn_gw));
    G->lo = (glora *)xcalloc((size_t)G->L * LLAMA_NLINEAR, sizeof(glora));
    for (int li = 0; li < G->L; li++) {
        const llama_layer *ly = &m->layers[li];
        G->anorm[li] = (float *)upload(G, ly->attn_norm, (size_t)G->dim * sizeof(float));
        G->fnorm[li] = (float *)upload(G, ly->ffn_norm, (size_t)G->dim * sizeof(float));
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            upload_weight(G, &G->lin[li * LLAMA_NLINEAR + l], &ly->lin[l], scratch);
            const float *A = a ? lora_A(a, li, (llama_linear)l) : NULL;
            if (!A)
                continue;
            const float *B = lora_B(a, li, (llama_linear)l);
            const lora_slot *sl = lora_slot_of(a, li, (llama_linear)l);
            glora *g = &G->lo[li * LLAMA_NLINEAR + l];
            g->A = (float *)upload(G, A, (size_t)(G->r * sl->in) * sizeof(float));
            g->B = (float *)upload(G, B, (size_t)(sl->out * G->r) * sizeof(float));
            if (G->bf) {
                g->A16 = upload_bf16(G, A, G->r * sl->in);
                g->B16 = upload_bf16(G, B, sl->out * G->r);
            }
        }
    }
    {
        memset(&G->head, 0, sizeof G->head);
        G->head.out = G->vocab;
        G->head.in = G->dim;
        const float *hf = llama_weight_f32(&m->head, scratch);
        if (G->bf) {
            G->head.kind = KN_GW_BF16;
            G->head.bf16 = (const kn_bf16 *)upload_bf16_padded(G, hf, G->vocab, G->dim,
                                                               &G->head.ld);
        } else {
            G->head.kind = KN_GW_F32;
            G->head.f32 = hf == m->embed ? G->embed
                                         : (const float *)upload(G, hf, (size_t)G->vocab *
                                                                           G->dim * sizeof(float));
        }
    }
    free(scratch);
    /* RoPE tables, as llama_rope computes the angles */
    {
        int half = G->hd / 2;
        float *ct = (float *)xmalloc((size_t)cap * half * sizeof(float));
        float *st = (float *)xmalloc((size_t)cap * half * sizeof(float));
        for (int i = 0; i < half; i++) {
            float inv = 1.0f / powf(mc->rope_theta, (float)(2 * i) / (float)G->hd);
            for (int32_t p = 0; p < cap; p++) {
                float ang = (float)p * inv;
                ct[(int64_t)p * half + i] = cosf(ang);
                st[(int64_t)p * half + i] = sinf(ang);
            }
        }
        G->cos_t = (float *)upload(G, ct, (size_t)cap * half * sizeof(float));
        G->sin_t = (float *)upload(G, st, (size_t)cap * half * sizeof(float));
        free(ct);
        free(st);
    }
    /* activations for T tokens: 16,384, or in NF4 mode every slot's whole
     * context (up to 32,768) where the device holds that and the caches of
     * every slot: then a round of prompts is one prefill (the weights
     * dequantized once, no small last call) */
    size_t f4 = sizeof(float), b2 = 2;
    int64_t T = (int64_t)slots * cap;
    if (T > 16384) {
        int64_t Tw = T < 32768 ? T : 32768;
        size_t act = (size_t)(G->dim * (f4 + b2) + (G->qd + 2 * G->kvd) * (f4 + b2) +
                              2 * G->hid * f4 + G->hid * b2 + G->qd * b2 + G->nh * f4 +
                              G->r * (b2 + f4) + 5 * 4);
        size_t caches = (size_t)slots * (2 * (size_t)G->L * cap * G->kvd * 2 + G->vocab * f4);
        size_t used, total;
        kn_mem_device(&used, &total);
        size_t need = (size_t)Tw * act + caches + ((size_t)4 << 30); /* + wbuf, cuBLAS, graphs */
        T = G->bf && total > used + need ? Tw : 16384;
    }
    if (T < cap)
        T = cap;
    G->T = T;
    G->x = (float *)dalloc(G, (size_t)T * G->dim * f4);
    G->ldqkv = G->qd + 2 * G->kvd;
    G->q = (float *)dalloc(G, (size_t)T * G->ldqkv * f4);
    G->k = G->q + G->qd;
    G->v = G->k + G->kvd;
    G->ldgu = 2 * (int64_t)G->hid;
    G->g = (float *)dalloc(G, (size_t)T * G->ldgu * f4);
    G->u = G->g + G->hid;
    if (G->bf) {
        G->xn16 = (bf16 *)dalloc(G, (size_t)T * G->dim * b2);
        G->q16 = (bf16 *)dalloc(G, (size_t)T * G->qd * b2);
        G->k16 = (bf16 *)dalloc(G, (size_t)T * G->kvd * b2);
        G->v16 = (bf16 *)dalloc(G, (size_t)T * G->kvd * b2);
        G->att16 = (bf16 *)dalloc(G, (size_t)T * G->qd * b2);
        G->lse = (float *)dalloc(G, (size_t)T * G->nh * f4);
        G->h16 = (bf16 *)dalloc(G, (size_t)T * G->hid * b2);
        if (G->r)
            G->lh16 = (bf16 *)dalloc(G, (size_t)T * G->r * b2);
        /* the largest group dequantized side by side (see lin) */
        int64_t maxw = 0;
        int nf4 = 0;
        for (int i = 0; i < G->L * LLAMA_NLINEAR; i++)
            nf4 |= G->lin[i].kind == KN_GW_NF4;
        for (int li = 0; nf4 && li < G->L; li++) {
            const kn_gw *w = &G->lin[li * LLAMA_NLINEAR];
            int64_t gs[4] = {w[LLAMA_Q].out * w[LLAMA_Q].in + w[LLAMA_K].out * w[LLAMA_K].in +
                                 w[LLAMA_V].out * w[LLAMA_V].in,
                             w[LLAMA_O].out * w[LLAMA_O].in,
                             w[LLAMA_GATE].out * w[LLAMA_GATE].in +
                                 w[LLAMA_UP].out * w[LLAMA_UP].in,
                             w[LLAMA_DOWN].out * w[LLAMA_DOWN].in};
            for (int i = 0; i < 4; i++)
                maxw = gs[i] > maxw ? gs[i] : maxw;
        }
        if (maxw)
            G->wbuf = (bf16 *)dalloc(G, (size_t)maxw * b2);
    } else {
        G->xn32 = (float *)dalloc(G, (size_t)T * G->dim * f4);
        G->att32 = (float *)dalloc(G, (size_t)T * G->qd * f4);
        G->h32 = (float *)dalloc(G, (size_t)T * G->hid * f4);
    }
    if (G->r)
        G->lh32 = (float *)dalloc(G, (size_t)T * G->r * f4);
    G->ws_bytes = G->bf ? ws_need(G) : 256;
    G->ws = dalloc(G, G->ws_bytes);
    kn_memset(G->ws, 0, G->ws_bytes, G->s);
    /* the caches: as many slots as fit, leaving room for cuBLAS and graphs */
    size_t esz = G->bf ? 2 : 4;
    size_t per_slot = 2 * (size_t)G->L * cap * G->kvd * esz;
    size_t used, total;
    kn_mem_device(&used, &total);
    size_t margin = (size_t)1536 << 20;
    size_t room = total > used + margin ? total - used - margin : 0;
    int64_t fit = (int64_t)(room / (per_slot + (size_t)G->vocab * f4 + 64));
    if (fit < 1) {
        be_free(G);
        return msg_error("device memory too small for one sequence of %d positions (%.1f MiB)",
                         cap, (double)per_slot / 1048576.0);
    }
    if (fit < slots) {
        msg_warn("device memory holds caches for %lld sequences, not %d", (long long)fit,
                 slots);
        slots = (int32_t)fit;
    }
    G->slots = slots;
    G->kc = (void **)xcalloc((size_t)G->L, sizeof(void *));
    G->vc = (void **)xcalloc((size_t)G->L, sizeof(void *));
    for (int li = 0; li < G->L; li++) {
        G->kc[li] = dalloc(G, (size_t)slots * cap * G->kvd * esz);
        G->vc[li] = dalloc(G, (size_t)slots * cap * G->kvd * esz);
    }
    G->logits = (float *)dalloc(G, (size_t)slots * G->vocab * f4);
    G->att_ws = (float *)dalloc(
        G, kn_gen_attention_ws(G->bf ? slots : (int)(T > slots ? T : slots), G->nh, G->hd, cap));
    /* QLORA_GEN_FUSED_ATTN=0: decoding through rope_append + attention */
    const char *fe = getenv("QLORA_GEN_FUSED_ATTN");
    if (G->bf && kn_gen_rope_attention_ok(G->hd) && !(fe && *fe == '0')) {
        size_t b = kn_gen_rope_attention_ws(slots, G->nh, G->hd, cap);
        G->ra_ws = (float *)dalloc(G, b);
        kn_memset(G->ra_ws, 0, b, G->s);
    }
    G->d_amax = (int32_t *)dalloc(G, (size_t)slots * sizeof(int32_t));
    size_t meta = (size_t)(5 * T + slots + 8) * sizeof(int32_t);
    G->d_meta = (int32_t *)dalloc(G, meta);
    CUDA_CHECK(cudaMallocHost((void **)&G->h_meta, meta));
    CUDA_CHECK(cudaMallocHost((void **)&G->h_amax, (size_t)slots * sizeof(int32_t)));
    G->len = (int32_t *)xcalloc((size_t)slots, sizeof(int32_t));
    G->graphs = (cudaGraphExec_t *)xcalloc((size_t)slots + 1, sizeof(cudaGraphExec_t));
    G->graph_limit = -1;
    kn_gen_attention_setup(cap);
    kn_stream_sync(G->s);

    memset(be, 0, sizeof *be);
    be->ctx = G;
    be->name = "cuda";
    be->slots = slots;
    be->cap = cap;
    be->vocab = G->vocab;
    be->max_prefill = T;
    be->refill = slots >= 8 ? slots / 4 : 1;
    be->prefill = be_prefill;
    be->decode = be_decode;
    be->free = be_free;
    return 0;
}
