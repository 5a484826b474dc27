/* model7b.h: the Llama 2 7B-shaped model that the GPU benchmarks build in
 * memory (tests/gpu/train.c for bench/train, dist.c for bench/multi-gpu,
 * gen.c for bench/gen): 32 layers of 4096/11008, 32 heads of 128, vocab
 * 32000, an untied head, NF4 weights with double quantization.
 *
 * The weights are random 4-bit codes and 8-bit scale codes (a random
 * weight's codes are close to uniform) from one pool shared by every
 * matrix on the host; each matrix gets its own copy on the device, as a
 * checkpoint's would. Timing does not depend on the values, and no 13 GB
 * checkpoint has to exist on disk. The draws come from gt_u64, so a
 * benchmark that seeds first gets the same model every run. */
#ifndef MODEL7B_H
#define MODEL7B_H

#include "gpu_test.h"

#include "llama.h"
#include "msg.h"
#include "nf4.h"

#include <time.h>

enum { GT7B_LAYERS = 32, GT7B_DIM = 4096, GT7B_HIDDEN = 11008, GT7B_VOCAB = 32000 };

typedef struct gt_model7b {
    llama_model m;
    nf4_weight *q;            /* (layers * LLAMA_NLINEAR), m's linears */
    uint8_t *codes, *scodes;  /* the pool every matrix points into */
    float *nested, *ones;
    double nf4_bytes;         /* codes and scales of every linear */
} gt_model7b;

/* One matrix's quantization state over the shared pool. */
static inline void gt_fake_nf4(nf4_weight *w, int64_t rows, int64_t cols,
                               const uint8_t *codes, const uint8_t *scodes,
                               const float *nested)
{
    memset(w, 0, sizeof *w);
    w->ndim = 2;
    w->shape[0] = rows;
    w->shape[1] = cols;
    w->numel = rows * cols;
    w->dtype = ST_BF16;
    w->blocksize = 64;
    w->nblocks = w->numel / 64;
    w->packed = codes;
    w->nested = 1;
    w->absmax_code = scodes;
    w->nested_blocksize = NF4_NESTED_BLOCKSIZE;
    w->nested_nblocks = (w->nblocks + 255) / 256;
    w->nested_absmax = nested;
    w->nested_offset = 0.03f;
    memcpy(w->quant_map, nf4_code, sizeof w->quant_map);
    memcpy(w->nested_map, nf4_dynamic_map(), sizeof w->nested_map);
}

static inline void gt_model7b_init(gt_model7b *b)
{
    enum { L = GT7B_LAYERS, DIM = GT7B_DIM, HID = GT7B_HIDDEN, VOCAB = GT7B_VOCAB };
    memset(b, 0, sizeof *b);
    llama_model *M = &b->m;
    llama_config *c = &M->cfg;
    c->dim = DIM;
    c->hidden = HID;
    c->n_layers = L;
    c->n_heads = 32;
    c->n_kv_heads = 32;
    c->head_dim = 128;
    c->vocab = VOCAB;
    c->max_pos = 4096;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->tied = 0;
    c->bos_id = 1;
    c->eos_id = 2;
    c->quantized = 1;
    M->dir = (char *)"random-llama2-7b";
    size_t maxn = (size_t)HID * DIM, nnest = maxn / 64 / 256 + 1;
    b->codes = xmalloc(maxn / 2);
    b->scodes = xmalloc(maxn / 64);
    for (size_t i = 0; i < maxn / 2; i += 8) {
        uint64_t r = gt_u64();
        memcpy(b->codes + i, &r, 8);
    }
    for (size_t i = 0; i < maxn / 64; i++)
        b->scodes[i] = (uint8_t)(128 + gt_u64() % 128); /* positive scales */
    b->nested = xmalloc(nnest * sizeof *b->nested);
    for (size_t i = 0; i < nnest; i++)
        b->nested[i] = 0.02f;
    b->ones = xmalloc(DIM * sizeof *b->ones);
    for (int i = 0; i < DIM; i++)
        b->ones[i] = 1.0f;
    M->embed = gt_rand((int64_t)VOCAB * DIM, 0.02f);
    M->norm = b->ones;
    M->head.rows = VOCAB;
    M->head.cols = DIM;
    M->head.f32 = gt_rand((int64_t)VOCAB * DIM, 0.02f);
    M->layers = xcalloc(L, sizeof *M->layers);
    b->q = xcalloc((size_t)L * LLAMA_NLINEAR, sizeof *b->q);
    for (int i = 0; i < L; i++) {
        M->layers[i].attn_norm = b->ones;
        M->layers[i].ffn_norm = b->ones;
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            int64_t o, in;
            llama_linear_shape(c, (llama_linear)l, &o, &in);
            nf4_weight *w = &b->q[i * LLAMA_NLINEAR + l];
            gt_fake_nf4(w, o, in, b->codes, b->scodes, b->nested);
            M->layers[i].lin[l].rows = o;
            M->layers[i].lin[l].cols = in;
            M->layers[i].lin[l].nf4 = w;
            b->nf4_bytes += o * in / 2.0 + o * in / 64.0 + o * in / 64.0 / 256.0 * 4;
        }
    }
    M->max_lin_elems = (int64_t)maxn;
}

static inline void gt_model7b_free(gt_model7b *b)
{
    free(b->m.embed);
    free((void *)b->m.head.f32);
    free(b->m.layers);
    free(b->q);
    free(b->codes);
    free(b->scodes);
    free(b->nested);
    free(b->ones);
    memset(b, 0, sizeof *b);
}

static inline double gt_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
