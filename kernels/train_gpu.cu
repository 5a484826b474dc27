/* train_gpu.cu: lora-train's GPU path (see train_gpu.h): the forward and
 * backward of a Llama model with LoRA adapters, step by step the same
 * computation as lib/llama_cpu.c's llama_forward_backward, on the kernels
 * of this directory and the one GEMM wrapper.
 *
 * Layout of the work, per micro-batch of n tokens:
 *   forward   embedding -> per layer: RMSNorm, q/k/v (+LoRA), RoPE, flash
 *             attention, o (+LoRA) added to the residual by the product
 *             itself (D = C + A B), RMSNorm, gate/up (+LoRA), SwiGLU, down
 *             (+LoRA) added to the residual -> final RMSNorm -> chunked
 *             head + cross-entropy, which also yields the gradient.
 *   backward  the layers in reverse; the residual gradient is fp32, the
 *             operands of products bf16. With gradient checkpointing only
 *             the layer inputs are kept and each layer but the last is
 *             recomputed (same dropout masks: they are counter-based)
 *             just before its backward; with activation offload, its
 *             attention half is not recomputed but comes back from host
 *             memory. Each NF4 weight is dequantized on a side stream
 *             while the product before it runs ("frozen weights").
 * Buffers are sized once for the largest micro-batch; activations that are
 * dead by the time a gradient of the same shape appears are overwritten by
 * it (dh over h, dgate/dup over gate/up), which the operation order below
 * makes safe: a LoRA product's gradients are taken before its input
 * gradient overwrites anything.
 */
#define _Noreturn [[noreturn]]
extern "C" {
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "nf4.h"
#include "ops_ref.h"
#include "train.h"
}
#include "common.cuh"
#include "train_gpu.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

enum { OP_MAX = 96 };

typedef struct gpu_lin {
    int64_t out, in;
    kn_nf4 q;          /* when the checkpoint is NF4 */
    bf16 *dense;       /* otherwise: (out, in) bf16 */
} gpu_lin;

typedef struct gpu_layer {
    float *attn_norm, *ffn_norm;   /* (dim) */
    gpu_lin lin[LLAMA_NLINEAR];
} gpu_layer;

/* One layer's activations for n tokens (bf16 unless noted). */
typedef struct gpu_acts {
    bf16 *x;                  /* (n, dim) input: points into xin */
    bf16 *xn1, *q, *k, *v;    /* (n, dim), (n, qd), (n, kvd) x2 */
    bf16 *att;                /* (n, qd) */
    bf16 *x2, *xn2;           /* (n, dim) */
    bf16 *g, *u, *hm;         /* (n, hidden) */
    float *rstd1, *rstd2;     /* (n) */
    float *lse;               /* (nh, n) */
    bf16 *lh[LLAMA_NLINEAR];  /* (n, r) A xd per targeted linear */
} gpu_acts;

/* Activation offload: what one layer sends to host memory and brings
 * back. A group is copied as one after the compute stream has written it
 * (put: the forward) or after the layer that used the device buffers last
 * has let them go (get: the backward). */
enum { OFF_ATTN = 1, OFF_ATTN_X2 = 2 };           /* gpu_trainer.off */
enum { OFF_PUT = 1, OFF_GOT = 2 };                /* gpu_trainer.off_now */
enum { OFF_Q, OFF_K, OFF_V, OFF_ATT, OFF_X2, OFF_LH, OFF_NGROUP };
enum { OFF_NENT = 10 };
typedef struct off_ent {
    void *dev;                /* the buffer of the one activation set */
    size_t row;               /* bytes per token */
    size_t hoff;              /* where it starts in a layer's host slot */
    int put, get;             /* its groups in the forward, the backward */
} off_ent;

struct gpu_trainer {
    const llama_model *m;
    llama_config c;
    lora_adapter *a;          /* host: the parameter layout (slots) */
    int32_t r;
    float scale, p;
    cudaStream_t s;
    gpu_layer *L;
    bf16 *embed, *head;       /* (vocab, dim); head == embed when tied */
    float *norm;              /* (dim) */
    /* adapter and optimizer */
    size_t np;
    float *params, *grad;     /* (np) */
    float *mom1, *mom2;       /* (np): device memory, or with paged pinned
                                 host memory that the update reads and
                                 writes over the bus (dmom1, dmom2) */
    float *dmom1, *dmom2;
    int paged;
    bf16 *lpb;                /* one layer's adapter slice in bf16, the
                                 operand of its products: layer pb_layer,
                                 cast when first needed after an update */
    int64_t *loff;            /* (n_layers + 1) where each layer's slice
                                 starts in params */
    int32_t pb_layer;
    double beta1, beta2, eps, wd;
    int64_t adam_step;
    /* activations */
    int64_t cap;
    int ckpt;
    bf16 *xin;                /* (max(1, n_layers - 1), cap, dim) the
                                 inputs of layers 1.. (layer 0's is the
                                 embedding, redone into xl when needed) */
    gpu_acts *sets;           /* n_layers, or 1 with checkpointing */
    int nsets;
    bf16 *xl;                 /* (cap, dim) final hidden state */
    float *rstdf;             /* (cap) */
    /* backward and scratch */
    float *dres;              /* (cap, dim) fp32 residual gradient */
    float *dxn;               /* (cap, dim) fp32, unless it fits in hm */
    float *delta;             /* (nh, cap) */
    bf16 *dyb;                /* (cap, dim) dres in bf16; also the normed
                                 final hidden state before the backward */
    bf16 *datt, *dq, *dk, *dv; /* only when no dead activation fits them */
    bf16 *wbuf;               /* the largest linear, dequantized */
    bf16 *xd, *tmp;           /* (dch, widest LoRA input): dropout input,
                                 LoRA dx, a chunk of rows at a time (only
                                 for linears the fused products cannot
                                 take) */
    int64_t dch;
    int fuse;                 /* LoRA dropout through kernels/lora.cu */
    void *lscratch;           /* kn_lora_scratch_bytes for the widest */
    uint8_t *mbits;           /* with checkpointing: the dropout keep bits
                                 of one layer's fused linears, left by its
                                 recomputation for its backward (boff[l]:
                                 linear l's, -1 when none) */
    int64_t boff[LLAMA_NLINEAR];
    int32_t bits_layer;       /* the layer whose bits mbits holds, or -1 */
    uint32_t bits_mask;       /* the linears of bits_layer whose bits are
                                 there (an offloaded layer's q, k, v and x2
                                 are not recomputed and leave none) */
    int recomp;               /* layer_fwd is recomputing for the backward:
                                 every fused linear leaves its bits */
    bf16 *dlh;                /* (cap, r) */
    void *xent_scratch;       /* with checkpointing: the gate buffer of the
                                 one activation set, dead while the head
                                 runs (xent_own 0) */
    int xent_own;
    int chunk;
    float *stats;             /* [0] loss sum, [1] gradient sum of squares */
    int32_t *ids, *pos, *start, *tg;
    float *wt;
    float *rope;              /* (cap, head_dim / 2) cosine, sine pairs of
                                 the micro-batch's positions, for the
                                 attention backward */
    size_t peak0;
    size_t mem[GPU_MEM_NCAT]; /* bytes allocated per category (setup) */
    const gpu_step_hooks *hooks; /* data parallel: set for the backward of
                                    a step's last micro-batch */
    /* activation offload (with checkpointing; see "activation offload"
     * below): each layer's attention half goes to pinned host memory in
     * the forward and comes back for the layer's backward */
    int off;                  /* 0 none, OFF_ATTN, OFF_ATTN_X2 */
    int x2skip;               /* KN_OFFLOAD_X2_SKIP=m: with OFF_ATTN_X2,
                                 every m-th layer keeps x2 out (off_x2) */
    int off_now;              /* OFF_PUT in a training forward, OFF_GOT in
                                 the backward, 0 otherwise */
    char *host;               /* pinned: (n_layers - 1) slots of hstride */
    size_t hstride, hbytes;
    off_ent ent[OFF_NENT];
    int nent;
    cudaStream_t d2h, h2d;    /* the copies, beside the compute stream s */
    cudaEvent_t ev_rdy, ev_free, ev_out[OFF_NGROUP], ev_in[OFF_NGROUP];
    /* NF4 prefetch (see "frozen weights" below): the next weight is
     * dequantized on stream ws while the current product runs */
    int wpf;                  /* on (KN_WPREFETCH, default 1) */
    cudaStream_t ws;
    cudaEvent_t ev_wuse, ev_wrdy;
    int32_t *wsucc;           /* (n_layers * LLAMA_NLINEAR * 3) the use
                                 that followed each use last time, or -1 */
    int32_t wlast, wpend;     /* the last use; the use being prefetched
                                 into wpbuf (-1: none) */
    bf16 *wpbuf;
    int wpass;                /* WP_FWD, WP_RECOMP or WP_BWD */
    int keep_last;            /* with checkpointing: the last layer's
                                 activations stay for its backward (the
                                 head's scratch is wbuf), not recomputed */
    int ptime;                /* KN_PHASE_TIMES=1: forward, head, backward
                                 times on stderr at gpu_trainer_free */
    cudaEvent_t pev[4];
    double pms[3];
    int64_t pcount;
    /* KN_OP_TIMES=layer (diagnostics): events between the operations of
     * that layer's forward, recomputation and backward (see op_mark) */
    int32_t opl, olayer;
    int on, onmax;
    cudaEvent_t oev[OP_MAX];
    const char *olab[OP_MAX];
    int olin[OP_MAX];         /* the linear an operation belongs to, or -1 */
    double oms[OP_MAX];
    int64_t ocount;
};

/* activation offload (below) */
static int off_mode(int def);
static void off_init(gpu_trainer *G, int mode);
static void off_free(gpu_trainer *G);
/* NF4 prefetch (below) */
static void wprefetch_init(gpu_trainer *G);
static void wprefetch_free(gpu_trainer *G);

/* ---- setup ---------------------------------------------------------------- */

static void *dalloc(size_t bytes) { return kn_malloc(bytes ? bytes : 16); }

static bf16 *upload_bf16(const float *x, int64_t n, cudaStream_t s)
{
    uint16_t *h = (uint16_t *)xmalloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++)
        h[i] = ops_bf16_from_f32(x[i]);
    bf16 *d = (bf16 *)dalloc((size_t)n * 2);
    kn_memcpy_h2d(d, h, (size_t)n * 2, s);
    kn_stream_sync(s);
    free(h);
    return d;
}

static void *upload(const void *x, size_t bytes, cudaStream_t s)
{
    void *d = dalloc(bytes);
    kn_memcpy_h2d(d, x, bytes, s);
    kn_stream_sync(s);
    return d;
}

static void upload_linear(gpu_lin *g, const llama_weight *w, cudaStream_t s)
{
    memset(g, 0, sizeof *g);
    g->out = w->rows;
    g->in = w->cols;
    if (w->f32) {
        g->dense = upload_bf16(w->f32, w->rows * w->cols, s);
        return;
    }
    const nf4_weight *q = w->nf4;
    g->q.numel = q->numel;
    g->q.blocksize = q->blocksize;
    g->q.nested_blocksize = q->nested_blocksize;
    g->q.codes = (const uint8_t *)upload(q->packed, (size_t)(q->numel + 1) / 2, s);
    g->q.quant_map = (const float *)upload(q->quant_map, sizeof q->quant_map, s);
    if (q->nested) {
        g->q.absmax_q = (const uint8_t *)upload(q->absmax_code, (size_t)q->nblocks, s);
        g->q.nested_absmax = (const float *)upload(
            q->nested_absmax, (size_t)q->nested_nblocks * sizeof(float), s);
        g->q.nested_map = (const float *)upload(q->nested_map, sizeof q->nested_map, s);
        g->q.offset = q->nested_offset;
    } else {
        g->q.absmax = (const float *)upload(q->absmax, (size_t)q->nblocks * sizeof(float), s);
    }
}

static void free_linear(gpu_lin *g)
{
    kn_free(g->dense);
    kn_free((void *)g->q.codes);
    kn_free((void *)g->q.quant_map);
    kn_free((void *)g->q.absmax_q);
    kn_free((void *)g->q.nested_absmax);
    kn_free((void *)g->q.nested_map);
    kn_free((void *)g->q.absmax);
}

static void acts_alloc(gpu_trainer *G, gpu_acts *s)
{
    const llama_config *c = &G->c;
    int64_t n = G->cap, dim = c->dim;
    int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    memset(s, 0, sizeof *s);
    s->xn1 = (bf16 *)dalloc((size_t)(n * dim) * 2);
    s->q = (bf16 *)dalloc((size_t)(n * qd) * 2);
    s->k = (bf16 *)dalloc((size_t)(n * kvd) * 2);
    s->v = (bf16 *)dalloc((size_t)(n * kvd) * 2);
    s->att = (bf16 *)dalloc((size_t)(n * qd) * 2);
    s->x2 = (bf16 *)dalloc((size_t)(n * dim) * 2);
    s->xn2 = (bf16 *)dalloc((size_t)(n * dim) * 2);
    s->g = (bf16 *)dalloc((size_t)(n * c->hidden) * 2);
    s->u = (bf16 *)dalloc((size_t)(n * c->hidden) * 2);
    s->hm = (bf16 *)dalloc((size_t)(n * c->hidden) * 2);
    s->rstd1 = (float *)dalloc((size_t)n * 4);
    s->rstd2 = (float *)dalloc((size_t)n * 4);
    s->lse = (float *)dalloc((size_t)(n * c->n_heads) * 4);
    for (int l = 0; l < LLAMA_NLINEAR; l++)
        if (G->a->cfg.targets & (1u << l))
            s->lh[l] = (bf16 *)dalloc((size_t)(n * G->r) * 2);
}

static void acts_free(gpu_acts *s)
{
    void *p[] = {s->xn1, s->q, s->k, s->v, s->att, s->x2, s->xn2, s->g, s->u,
                 s->hm, s->rstd1, s->rstd2, s->lse};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++)
        kn_free(p[i]);
    for (int l = 0; l < LLAMA_NLINEAR; l++)
        kn_free(s->lh[l]);
}

/* KN_LORA_FUSED=0 in the environment: the unfused LoRA dropout path
 * everywhere (dropout pass + cuBLAS over row chunks), for comparisons. */
static int fuse_from_env(void)
{
    const char *e = getenv("KN_LORA_FUSED");
    return !(e && !strcmp(e, "0"));
}

/* An on/off switch from the environment ("0" off, another number on),
 * for comparisons; `def` when unset. */
static int env_flag(const char *name, int def)
{
    const char *e = getenv(name);
    return e && *e ? atoi(e) : def;
}

extern "C" gpu_trainer *gpu_trainer_new(const llama_model *m,
                                        const lora_config *lc,
                                        int64_t max_tokens, int flags)
{
    if (kn_device_count() < 1) {
        msg_error("no CUDA device");
        return NULL;
    }
    if (kn_init(0) != 0)
        return NULL;
    const llama_config *c = &m->cfg;
    if (c->head_dim > 128 || c->head_dim % 2) {
        msg_error("head_dim %d: the GPU attention takes even sizes up to 128",
                  c->head_dim);
        return NULL;
    }
    if (max_tokens < 1)
        max_tokens = 1;
    gpu_trainer *G = (gpu_trainer *)xcalloc(1, sizeof *G);
    G->peak0 = kn_mem_current();
    kn_mem_reset_peak();
    G->m = m;
    G->c = *c;
    if (lora_new(c, lc, &G->a) != 0) {
        free(G);
        return NULL;
    }
    G->r = lc->r;
    G->scale = G->a->scale;
    G->p = (float)lc->dropout;
    G->cap = max_tokens;
    G->ckpt = (flags & GPU_TRAINER_CHECKPOINT) != 0;
    G->paged = (flags & GPU_TRAINER_PAGED_OPTIM) != 0;
    G->fuse = fuse_from_env();
    CUDA_CHECK(cudaStreamCreateWithFlags(&G->s, cudaStreamNonBlocking));
    cudaStream_t s = G->s;
    size_t mark = kn_mem_current();
#define MEM_CAT(cat)                                                         \
    do {                                                                     \
        G->mem[cat] += kn_mem_current() - mark;                              \
        mark = kn_mem_current();                                             \
    } while (0)

    /* the frozen model */
    G->embed = upload_bf16(m->embed, (int64_t)c->vocab * c->dim, s);
    G->head = m->head.f32 == m->embed
                  ? G->embed
                  : upload_bf16(m->head.f32, (int64_t)c->vocab * c->dim, s);
    G->norm = (float *)upload(m->norm, (size_t)c->dim * 4, s);
    G->L = (gpu_layer *)xcalloc((size_t)c->n_layers, sizeof *G->L);
    int64_t maxw = 0;
    for (int32_t i = 0; i < c->n_layers; i++) {
        const llama_layer *L = &m->layers[i];
        G->L[i].attn_norm = (float *)upload(L->attn_norm, (size_t)c->dim * 4, s);
        G->L[i].ffn_norm = (float *)upload(L->ffn_norm, (size_t)c->dim * 4, s);
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            upload_linear(&G->L[i].lin[l], &L->lin[l], s);
            int64_t e = L->lin[l].rows * L->lin[l].cols;
            maxw = e > maxw ? e : maxw;
        }
    }
    MEM_CAT(GPU_MEM_WEIGHTS);

    /* adapter, gradient, moments; the bf16 operand one layer at a time */
    G->np = G->a->n_params;
    G->params = (float *)dalloc(G->np * 4);
    G->grad = (float *)dalloc(G->np * 4);
    if (G->paged) {
        CUDA_CHECK(cudaHostAlloc((void **)&G->mom1, G->np * 4 + 16, cudaHostAllocMapped));
        CUDA_CHECK(cudaHostAlloc((void **)&G->mom2, G->np * 4 + 16, cudaHostAllocMapped));
        CUDA_CHECK(cudaHostGetDevicePointer((void **)&G->dmom1, G->mom1, 0));
        CUDA_CHECK(cudaHostGetDevicePointer((void **)&G->dmom2, G->mom2, 0));
    } else {
        G->mom1 = G->dmom1 = (float *)dalloc(G->np * 4);
        G->mom2 = G->dmom2 = (float *)dalloc(G->np * 4);
    }
    G->loff = (int64_t *)xcalloc((size_t)c->n_layers + 1, sizeof *G->loff);
    int64_t maxl = 0;
    for (int32_t i = 0; i < c->n_layers; i++) {
        G->loff[i] = -1;
        for (int l = 0; l < LLAMA_NLINEAR && G->loff[i] < 0; l++)
            G->loff[i] = lora_slot_of(G->a, i, (llama_linear)l)->a;
    }
    G->loff[c->n_layers] = (int64_t)G->np;
    for (int32_t i = 0; i < c->n_layers; i++) {
        KN_REQUIRE(G->loff[i] >= 0 && G->loff[i + 1] >= G->loff[i]);
        maxl = G->loff[i + 1] - G->loff[i] > maxl ? G->loff[i + 1] - G->loff[i] : maxl;
    }
    G->lpb = (bf16 *)dalloc((size_t)maxl * 2);
    G->pb_layer = -1;
    MEM_CAT(GPU_MEM_ADAPTER);

    /* activations */
    int64_t n = G->cap, dim = c->dim;
    int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    int64_t nin = c->n_layers > 1 ? c->n_layers - 1 : 1;
    G->xin = (bf16 *)dalloc((size_t)(nin * n * dim) * 2);
    MEM_CAT(GPU_MEM_CHECKPOINTS);
    G->nsets = G->ckpt ? 1 : c->n_layers;
    G->sets = (gpu_acts *)xcalloc((size_t)G->nsets, sizeof *G->sets);
    for (int i = 0; i < G->nsets; i++)
        acts_alloc(G, &G->sets[i]);
    MEM_CAT(GPU_MEM_ACTIVATIONS);
    G->wbuf = (bf16 *)dalloc((size_t)maxw * 2);
    G->xl = (bf16 *)dalloc((size_t)(n * dim) * 2);
    G->rstdf = (float *)dalloc((size_t)n * 4);
    G->dres = (float *)dalloc((size_t)(n * dim) * 4);
    G->delta = (float *)dalloc((size_t)(n * c->n_heads) * 4);
    G->dyb = (bf16 *)dalloc((size_t)(n * dim) * 2);
    /* Gradients that a dead activation of the same layer can hold (see
     * layer_bwd): dxn in hm, dq and datt in xn2 and x2, dk and dv in gate
     * and up. Separate buffers only where the shapes do not allow it. */
    if (c->hidden * 2 < dim * 4)
        G->dxn = (float *)dalloc((size_t)(n * dim) * 4);
    if (qd > dim) {
        G->datt = (bf16 *)dalloc((size_t)(n * qd) * 2);
        G->dq = (bf16 *)dalloc((size_t)(n * qd) * 2);
    }
    if (kvd > c->hidden) {
        G->dk = (bf16 *)dalloc((size_t)(n * kvd) * 2);
        G->dv = (bf16 *)dalloc((size_t)(n * kvd) * 2);
    }
    /* LoRA dropout: the fused products' scratch, and the unfused path's
     * chunk buffers as wide as the widest input they serve */
    int64_t dropin = 0, nbits = 0;
    size_t lsb = 0;
    for (int l = 0; l < LLAMA_NLINEAR; l++) {
        int64_t o, in;
        llama_linear_shape(c, (llama_linear)l, &o, &in);
        G->boff[l] = -1;
        if (!(lc->targets & (1u << l)) || G->p <= 0)
            continue;
        if (G->fuse && kn_lora_fusable(G->r, in)) {
            size_t b = kn_lora_scratch_bytes(n, G->r, in);
            lsb = b > lsb ? b : lsb;
            if (G->ckpt) {
                G->boff[l] = nbits;
                nbits += (int64_t)kn_lora_bits_bytes(n, in);
            }
        } else if (in > dropin) {
            dropin = in;
        }
    }
    G->mbits = nbits ? (uint8_t *)dalloc((size_t)nbits) : NULL;
    G->bits_layer = -1;
    G->dch = n < 2048 ? n : 2048;
    G->lscratch = lsb ? dalloc(lsb) : NULL;
    G->xd = dropin ? (bf16 *)dalloc((size_t)(G->dch * dropin) * 2) : NULL;
    G->tmp = dropin ? (bf16 *)dalloc((size_t)(G->dch * dropin) * 2) : NULL;
    G->dlh = (bf16 *)dalloc((size_t)(n * G->r) * 2);
    /* head chunks of at most ~64 MiB of logits and their gradient
     * (KN_XENT_CHUNK=rows instead, for comparisons) */
    int64_t chunk = ((int64_t)64 << 20) / ((int64_t)c->vocab * 6);
    chunk = chunk < 64 ? 64 : chunk;
    chunk = env_flag("KN_XENT_CHUNK", 0) > 0 ? env_flag("KN_XENT_CHUNK", 0) : chunk;
    G->chunk = (int)(chunk < n ? chunk : n);
    /* With checkpointing the head's scratch lives in a buffer that is dead
     * while the head runs: wbuf (the head is never NF4), in fewer rows if
     * need be, so that the last layer's activations survive until its
     * backward and it is not recomputed (keep_last); a model whose largest
     * linear is too small for 64 rows of logits (a toy) gets its own.
     * KN_KEEP_LAST=0 (comparisons): the gate buffer, as the recomputation
     * rewrites it anyway. */
    size_t wbb = (size_t)maxw * 2, xsb;
    G->keep_last = G->ckpt && env_flag("KN_KEEP_LAST", 1);
    /* When down carries no adapter, h (hm) is dead from the last layer's
     * down product to its backward, which writes dh over it: a larger
     * buffer than wbuf, so larger chunks (up to ~256 MiB: the head's
     * products run faster at ~1400 rows than at ~350). */
    void *xbuf = G->wbuf;
    if (G->keep_last && !(G->a->cfg.targets & (1u << LLAMA_DOWN)) &&
        kn_xent_scratch_bytes(G->chunk, c->vocab) <= (size_t)(n * c->hidden) * 2 &&
        (size_t)(n * c->hidden) * 2 > wbb) {
        xbuf = G->sets[0].hm;
        wbb = (size_t)(n * c->hidden) * 2;
        if (env_flag("KN_XENT_CHUNK", 0) <= 0) {
            int64_t big = ((int64_t)256 << 20) / ((int64_t)c->vocab * 6);
            G->chunk = (int)(big < n ? big : n);
        }
    }
    if (G->keep_last) {
        int64_t ch = G->chunk;
        while (ch > 64 && kn_xent_scratch_bytes((int)ch, c->vocab) > wbb)
            ch = ch * 7 / 8 > 64 ? ch * 7 / 8 : 64;
        if (kn_xent_scratch_bytes((int)ch, c->vocab) <= wbb)
            G->chunk = (int)ch;
    }
    xsb = kn_xent_scratch_bytes(G->chunk, c->vocab);
    if (G->keep_last && xsb <= wbb) {
        G->xent_own = 0;
        G->xent_scratch = xbuf;
    } else {
        G->xent_own = !(G->ckpt && !G->keep_last && xsb <= (size_t)(n * c->hidden) * 2);
        G->xent_scratch = G->xent_own ? dalloc(xsb) : (void *)G->sets[0].g;
    }
    G->stats = (float *)dalloc(2 * sizeof(float));
    G->ids = (int32_t *)dalloc((size_t)n * 4);
    G->pos = (int32_t *)dalloc((size_t)n * 4);
    G->start = (int32_t *)dalloc((size_t)n * 4);
    G->tg = (int32_t *)dalloc((size_t)n * 4);
    G->wt = (float *)dalloc((size_t)n * 4);
    G->rope = (float *)dalloc((size_t)(n * c->head_dim) * 4);
    MEM_CAT(GPU_MEM_SCRATCH);
#undef MEM_CAT
    int mode = off_mode(flags & GPU_TRAINER_OFFLOAD ? OFF_ATTN_X2 : 0);
    if (mode && G->ckpt && c->n_layers > 1)
        off_init(G, mode);
    wprefetch_init(G);
    G->ptime = env_flag("KN_PHASE_TIMES", 0);
    for (int k = 0; G->ptime && k < 4; k++)
        CUDA_CHECK(cudaEventCreate(&G->pev[k]));
    G->opl = env_flag("KN_OP_TIMES", -1);
    for (int k = 0; G->opl >= 0 && k < OP_MAX; k++)
        CUDA_CHECK(cudaEventCreate(&G->oev[k]));
    return G;
}

extern "C" void gpu_trainer_free(gpu_trainer *G)
{
    if (!G)
        return;
    kn_stream_sync(G->s);
    off_free(G);
    wprefetch_free(G);
    if (G->ptime && G->pcount)
        fprintf(stderr, "train_gpu: %lld micro-batches, ms each: forward %.2f, head %.2f, "
                "backward %.2f\n", (long long)G->pcount, G->pms[0] / G->pcount,
                G->pms[1] / G->pcount, G->pms[2] / G->pcount);
    for (int k = 0; G->ptime && k < 4; k++)
        CUDA_CHECK(cudaEventDestroy(G->pev[k]));
    for (int k = 1; G->opl >= 0 && G->ocount && k < G->onmax; k++)
        fprintf(stderr, "train_gpu: layer %d op %2d %-5s %-16s %8.1f us\n", G->opl, k,
                G->olin[k] >= 0 ? llama_linear_name((llama_linear)G->olin[k]) : "",
                G->olab[k], 1000.0 * G->oms[k] / G->ocount);
    for (int k = 0; G->opl >= 0 && k < OP_MAX; k++)
        CUDA_CHECK(cudaEventDestroy(G->oev[k]));
    for (int32_t i = 0; i < G->c.n_layers; i++) {
        kn_free(G->L[i].attn_norm);
        kn_free(G->L[i].ffn_norm);
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            free_linear(&G->L[i].lin[l]);
    }
    free(G->L);
    if (G->head != G->embed)
        kn_free(G->head);
    kn_free(G->embed);
    kn_free(G->norm);
    for (int i = 0; i < G->nsets; i++)
        acts_free(&G->sets[i]);
    free(G->sets);
    if (G->paged) {
        CUDA_CHECK(cudaFreeHost(G->mom1));
        CUDA_CHECK(cudaFreeHost(G->mom2));
    } else {
        kn_free(G->mom1);
        kn_free(G->mom2);
    }
    void *p[] = {G->wbuf, G->params, G->grad, G->lpb, G->xin,
                 G->xl, G->rstdf, G->dres, G->dxn, G->delta,
                 G->dyb, G->datt, G->dq, G->dk, G->dv, G->xd, G->tmp, G->dlh,
                 G->lscratch, G->mbits, G->xent_own ? G->xent_scratch : NULL, G->stats,
                 G->ids, G->pos, G->start, G->tg, G->wt, G->rope};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++)
        kn_free(p[i]);
    free(G->loff);
    CUDA_CHECK(cudaStreamDestroy(G->s));
    lora_free(G->a);
    free(G);
}

extern "C" void gpu_trainer_load(gpu_trainer *G, const lora_adapter *a,
                                 const adamw *opt)
{
    KN_REQUIRE(a->n_params == G->np && opt->n == G->np);
    kn_stream_sync(G->s); /* nothing queued may still use the state */
    kn_memcpy_h2d(G->params, a->params, G->np * 4, G->s);
    if (G->paged) {
        memcpy(G->mom1, opt->m, G->np * 4);
        memcpy(G->mom2, opt->v, G->np * 4);
    } else {
        kn_memcpy_h2d(G->mom1, opt->m, G->np * 4, G->s);
        kn_memcpy_h2d(G->mom2, opt->v, G->np * 4, G->s);
    }
    G->pb_layer = -1;
    G->beta1 = opt->beta1;
    G->beta2 = opt->beta2;
    G->eps = opt->eps;
    G->wd = opt->weight_decay;
    G->adam_step = opt->step;
    kn_stream_sync(G->s);
}

extern "C" void gpu_trainer_store(gpu_trainer *G, lora_adapter *a, adamw *opt)
{
    KN_REQUIRE(a->n_params == G->np && opt->n == G->np);
    kn_memcpy_d2h(a->params, G->params, G->np * 4, G->s); /* waits for the step */
    if (G->paged) {
        memcpy(opt->m, G->mom1, G->np * 4);
        memcpy(opt->v, G->mom2, G->np * 4);
    } else {
        kn_memcpy_d2h(opt->m, G->mom1, G->np * 4, G->s);
        kn_memcpy_d2h(opt->v, G->mom2, G->np * 4, G->s);
    }
    opt->step = G->adam_step;
}

extern "C" void gpu_trainer_set_dropout_chunk(gpu_trainer *G, int64_t rows)
{
    KN_REQUIRE(rows >= 1 && rows <= G->dch);
    G->dch = rows;
}

extern "C" size_t gpu_trainer_peak_bytes(const gpu_trainer *G)
{
    (void)G;
    return kn_mem_peak();
}

extern "C" void gpu_trainer_mem(const gpu_trainer *G, size_t bytes[GPU_MEM_NCAT],
                                size_t *host_bytes)
{
    memcpy(bytes, G->mem, sizeof G->mem);
    *host_bytes = (G->paged ? 2 * G->np * 4 : 0) + G->hbytes;
}

/* ---- one linear ----------------------------------------------------------- */

/* ---- frozen weights ---------------------------------------------------------
 *
 * An NF4 linear is dequantized into a bf16 buffer just before its product.
 * Serially that is ~17 memory-bound passes a layer in front of the products
 * (~2% of a step for Llama 2 7B), so instead, when a product's weight is
 * taken, the weight the next product will need is dequantized on a side
 * stream (ws) into a second buffer while this product runs. Which weight
 * comes next is learnt: the order of the products is the same in every
 * micro-batch, so each use (layer, linear, pass) remembers the use that
 * followed it last time (wsucc); a wrong guess only costs the serial
 * dequantization. No device memory is added: the second buffer is an
 * activation that is dead for the whole of the pass the two uses belong to,
 * the fp32 residual gradient dres in the forward (written first by the
 * head), and in the backward of layers 1.. the final hidden state xl (read
 * last by the head, rewritten by layer 0's embedding), in layer 0's the
 * output of layer 0 (read last by layer 1's backward). A prefetch never
 * crosses those bounds; wflush makes the compute stream wait for one in
 * flight before the head and the embedding write their buffers. Events
 * order the rest: a prefetch starts once every product queued before it
 * (the last reader of its buffer among them) is done, and the product that
 * reads it waits for it. The values are the same as the serial path's. */
enum { WP_FWD, WP_RECOMP, WP_BWD };

static int32_t wkey(const gpu_trainer *G, int32_t layer, int l)
{
    return ((int32_t)layer * LLAMA_NLINEAR + l) * 3 + G->wpass;
}

/* The buffer a prefetch for use `to`, issued at use `at`, may write besides
 * wbuf, or NULL when it may not (see above). */
static bf16 *wspare(const gpu_trainer *G, int32_t at, int32_t to)
{
    int32_t la = at / 3 / LLAMA_NLINEAR, lt = to / 3 / LLAMA_NLINEAR;
    int fa = at % 3 == WP_FWD, ft = to % 3 == WP_FWD;
    const gpu_lin *w = &G->L[lt].lin[to / 3 % LLAMA_NLINEAR];
    size_t need = (size_t)(w->out * w->in) * 2, row = (size_t)G->cap * G->c.dim;
    if (fa != ft)
        return NULL;
    if (ft)
        return need <= row * 4 ? (bf16 *)G->dres : NULL;
    if (lt >= 1)
        return need <= row * 2 ? G->xl : NULL;
    if (la == 0 && G->c.n_layers > 1)
        return need <= row * 2 ? G->xin : NULL;
    return NULL;
}

/* The compute stream waits for the prefetch in flight, if any, and
 * forgets it: its buffer is about to be written. */
static void wflush(gpu_trainer *G)
{
    if (G->wpend >= 0)
        CUDA_CHECK(cudaStreamWaitEvent(G->s, G->ev_wrdy, 0));
    G->wpend = -1;
}

static void wprefetch_init(gpu_trainer *G)
{
    int v = env_flag("KN_WPREFETCH", 1);
    G->wpend = G->wlast = -1;
    G->wpf = v != 0 && G->c.n_layers > 0;
    if (!G->wpf)
        return;
    int lo = 0, hi = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    /* KN_WPREFETCH=2: the side stream at the highest priority, so that its
     * blocks take the SMs the product frees first */
    CUDA_CHECK(cudaStreamCreateWithPriority(&G->ws, cudaStreamNonBlocking, v == 2 ? hi : lo));
    CUDA_CHECK(cudaEventCreateWithFlags(&G->ev_wuse, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&G->ev_wrdy, cudaEventDisableTiming));
    size_t nk = (size_t)G->c.n_layers * LLAMA_NLINEAR * 3;
    G->wsucc = (int32_t *)xmalloc(nk * sizeof *G->wsucc);
    for (size_t k = 0; k < nk; k++)
        G->wsucc[k] = -1;
}

static void wprefetch_free(gpu_trainer *G)
{
    if (!G->wpf)
        return;
    CUDA_CHECK(cudaStreamSynchronize(G->ws));
    CUDA_CHECK(cudaStreamDestroy(G->ws));
    CUDA_CHECK(cudaEventDestroy(G->ev_wuse));
    CUDA_CHECK(cudaEventDestroy(G->ev_wrdy));
    free(G->wsucc);
    G->wpf = 0;
}

/* Linear l of `layer` in bf16 for the product about to be queued on the
 * compute stream, in the pass G->wpass. */
static const bf16 *weight(gpu_trainer *G, int32_t layer, int l)
{
    const gpu_lin *w = &G->L[layer].lin[l];
    if (w->dense)
        return w->dense;
    int32_t key = wkey(G, layer, l);
    bf16 *buf = G->wbuf;
    if (G->wpend == key) {
        CUDA_CHECK(cudaStreamWaitEvent(G->s, G->ev_wrdy, 0));
        buf = G->wpbuf;
        G->wpend = -1;
    } else {
        wflush(G);
        kn_nf4_dequant((kn_bf16 *)buf, &w->q, G->s);
    }
    if (!G->wpf)
        return buf;
    if (G->wlast >= 0)
        G->wsucc[G->wlast] = key;
    G->wlast = key;
    int32_t nx = G->wsucc[key];
    bf16 *spare = nx >= 0 ? wspare(G, key, nx) : NULL;
    if (spare) {
        const gpu_lin *wn = &G->L[nx / 3 / LLAMA_NLINEAR].lin[nx / 3 % LLAMA_NLINEAR];
        G->wpbuf = buf == G->wbuf ? spare : G->wbuf;
        CUDA_CHECK(cudaEventRecord(G->ev_wuse, G->s));
        CUDA_CHECK(cudaStreamWaitEvent(G->ws, G->ev_wuse, 0));
        kn_nf4_dequant((kn_bf16 *)G->wpbuf, &wn->q, G->ws);
        CUDA_CHECK(cudaEventRecord(G->ev_wrdy, G->ws));
        G->wpend = nx;
    }
    return buf;
}

#define KB(p) ((kn_bf16 *)(p))
#define CKB(p) ((const kn_bf16 *)(p))

/* KN_OP_TIMES=layer: an event on the compute stream after each operation
 * of that layer (G->olayer is the layer being queued); the time between
 * two marks is the operation's, waits for copies and prefetches included.
 * The same sequence repeats every micro-batch, so the times are summed by
 * position and printed at gpu_trainer_free. */
static void op_mark_lin(gpu_trainer *G, int l, const char *label)
{
    if (G->opl < 0 || G->olayer != G->opl || G->on >= OP_MAX)
        return;
    CUDA_CHECK(cudaEventRecord(G->oev[G->on], G->s));
    G->olin[G->on] = l;
    G->olab[G->on++] = label;
}

static void op_mark(gpu_trainer *G, const char *label) { op_mark_lin(G, -1, label); }

static void op_collect(gpu_trainer *G)
{
    if (G->opl < 0 || !G->on)
        return;
    CUDA_CHECK(cudaEventSynchronize(G->oev[G->on - 1]));
    for (int k = 1; k < G->on; k++) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, G->oev[k - 1], G->oev[k]));
        G->oms[k] += ms;
    }
    G->onmax = G->on;
    G->ocount++;
    G->on = 0;
}

/* Where the bf16 copy of the adapter value at params[off] (layer `layer`)
 * is: the layer's slice is cast into lpb when another layer's is there
 * (the forward, its recomputation and the backward of a layer follow one
 * another, so once or twice per layer and pass). */
static const bf16 *lora_w(gpu_trainer *G, int32_t layer, int64_t off)
{
    if (G->pb_layer != layer) {
        int64_t b = G->loff[layer], e = G->loff[layer + 1];
        kn_cast_f32_bf16(KB(G->lpb), G->params + b, e - b, G->s);
        G->pb_layer = layer;
    }
    return G->lpb + (off - G->loff[layer]);
}

/* The fused LoRA products (kernels/lora.cu) take this linear's dropout. */
static int fused(const gpu_trainer *G, int in)
{
    return G->fuse && kn_lora_fusable(G->r, in);
}

/* y (n, out) = res + x W^T + scale * (A xd)^T B^T, lh = A xd kept for the
 * backward. y NULL: only lh (a recomputation whose output is not needed).
 * res may be NULL (no residual). The adapter's term goes first (with the
 * residual), so the large product adds itself to it in its epilogue
 * rather than a skinny product reading and rewriting y after it. */
static void lin_fwd(gpu_trainer *G, int32_t layer, int l, bf16 *y,
                    const bf16 *res, const bf16 *x, int64_t n, bf16 *lh,
                    int drop, uint64_t key)
{
    const gpu_lin *w = &G->L[layer].lin[l];
    const lora_slot *sl = lora_slot_of(G->a, layer, (llama_linear)l);
    int in = (int)w->in, out = (int)w->out, r = G->r;
    if (sl->a >= 0) {
        const bf16 *A = lora_w(G, layer, sl->a);
        if (drop && G->p > 0 && fused(G, in)) {
            /* a recomputation leaves the mask for the backward that follows,
             * of every fused linear it runs (not only down's, the one linear
             * whose y is NULL in a recomputation); lin_bwd reads those that
             * bits_mask names */
            uint8_t *bits =
                G->recomp && G->mbits && G->boff[l] >= 0 ? G->mbits + G->boff[l] : NULL;
            kn_lora_down(KB(lh), bits, CKB(x), CKB(A), n, in, r, G->p,
                         lora_dropout_stream(key, layer, (llama_linear)l), G->lscratch, G->s);
            if (bits) {
                if (G->bits_layer != layer)
                    G->bits_mask = 0;
                G->bits_layer = layer;
                G->bits_mask |= 1u << l;
            }
        } else if (drop && G->p > 0) {
            /* lh = A dropout(x), dch rows at a time through the xd scratch */
            uint64_t stream = lora_dropout_stream(key, layer, (llama_linear)l);
            for (int64_t t0 = 0; t0 < n; t0 += G->dch) {
                int rows = (int)(n - t0 < G->dch ? n - t0 : G->dch);
                kn_dropout_forward(KB(G->xd), CKB(x + t0 * in), (int64_t)rows * in, G->p,
                                   stream, (uint64_t)(t0 * in), G->s);
                kn_gemm(0, 1, rows, r, in, 1.0f, CKB(G->xd), in, CKB(A), in, 0.0f,
                        lh + t0 * r, KN_BF16, r, G->s);
            }
        } else {
            kn_gemm(0, 1, (int)n, r, in, 1.0f, CKB(x), in, CKB(A), in, 0.0f, lh, KN_BF16, r,
                    G->s);
        }
        op_mark_lin(G, l, "lora down");
        if (!y)
            return;
        kn_gemm_ex(0, 1, (int)n, out, r, G->scale, CKB(lh), r,
                   CKB(lora_w(G, layer, sl->b)), r, res ? 1.0f : 0.0f, res, y, KN_BF16, out,
                   G->s);
        op_mark_lin(G, l, "lora up");
        const bf16 *W = weight(G, layer, l);
        op_mark_lin(G, l, "weight");
        kn_gemm(0, 1, (int)n, out, in, 1.0f, CKB(x), in, CKB(W), in, 1.0f, y,
                KN_BF16, out, G->s);
        op_mark_lin(G, l, "product");
        return;
    }
    if (y) {
        const bf16 *W = weight(G, layer, l);
        op_mark_lin(G, l, "weight");
        kn_gemm_ex(0, 1, (int)n, out, in, 1.0f, CKB(x), in, CKB(W), in,
                   res ? 1.0f : 0.0f, res, y, KN_BF16, out, G->s);
        op_mark_lin(G, l, "product");
    }
}

/* The backward of lin_fwd: LoRA gradients added to grad, then (dx non-NULL)
 * dx (n, in) = [dx +] dy W + the LoRA path through the dropout mask. dx may
 * be x itself: x is read only before dx is written. */
static void lin_bwd(gpu_trainer *G, int32_t layer, int l, void *dx,
                    kn_dtype dxt, int accumulate, const bf16 *dy,
                    const bf16 *x, int64_t n, const bf16 *lh, int drop,
                    uint64_t key)
{
    const gpu_lin *w = &G->L[layer].lin[l];
    const lora_slot *sl = lora_slot_of(G->a, layer, (llama_linear)l);
    int in = (int)w->in, out = (int)w->out, r = G->r, ni = (int)n;
    int lora = sl->a >= 0, dropping = lora && drop && G->p > 0;
    int fuse = dropping && fused(G, in);
    /* dA and the LoRA part of an fp32 dx in one pass, after the frozen
     * product (one mask computation instead of two); not when dx
     * overwrites x (down's dh over h), which dA must read first */
    int fuse_dx = fuse && dx && dxt == KN_F32 && dx != (const void *)x;
    uint64_t stream = dropping ? lora_dropout_stream(key, layer, (llama_linear)l) : 0;
    const uint8_t *bits =
        fuse && G->bits_layer == layer && (G->bits_mask >> l & 1) && G->boff[l] >= 0
            ? G->mbits + G->boff[l]
            : NULL;
    const bf16 *A = lora ? lora_w(G, layer, sl->a) : NULL;
    if (lora) {
        /* dB (out, r) += scale dy^T lh; dlh (n, r) = scale dy B */
        kn_gemm(1, 0, out, r, ni, G->scale, CKB(dy), out, CKB(lh), r, 1.0f,
                G->grad + sl->b, KN_F32, r, G->s);
        op_mark_lin(G, l, "dB");
        kn_gemm(0, 0, ni, r, out, G->scale, CKB(dy), out, CKB(lora_w(G, layer, sl->b)), r,
                0.0f, G->dlh, KN_BF16, r, G->s);
        op_mark_lin(G, l, "dlh");
        /* dA (r, in) += dlh^T xd */
        if (fuse_dx) {
            /* below, with dx */
        } else if (fuse) {
            kn_lora_grad_a(G->grad + sl->a, bits, CKB(G->dlh), CKB(x), n, in, r, G->p, stream,
                           G->lscratch, G->s);
        } else if (dropping) {
            /* xd regenerated dch rows at a time */
            for (int64_t t0 = 0; t0 < n; t0 += G->dch) {
                int rows = (int)(n - t0 < G->dch ? n - t0 : G->dch);
                kn_dropout_forward(KB(G->xd), CKB(x + t0 * in), (int64_t)rows * in, G->p,
                                   stream, (uint64_t)(t0 * in), G->s);
                kn_gemm(1, 0, r, in, rows, 1.0f, CKB(G->dlh + t0 * r), r, CKB(G->xd), in,
                        1.0f, G->grad + sl->a, KN_F32, in, G->s);
            }
        } else {
            kn_gemm(1, 0, r, in, ni, 1.0f, CKB(G->dlh), r, CKB(x), in, 1.0f,
                    G->grad + sl->a, KN_F32, in, G->s);
        }
        op_mark_lin(G, l, "dA");
    }
    if (!dx)
        return;
    const bf16 *W = weight(G, layer, l);
    op_mark_lin(G, l, "weight");
    kn_gemm(0, 0, ni, in, out, 1.0f, CKB(dy), out, CKB(W), in,
            accumulate ? 1.0f : 0.0f, dx, dxt, in, G->s);
    op_mark_lin(G, l, "dx product");
    if (!lora)
        return;
    if (fuse_dx) {
        kn_lora_grad_a_dx(G->grad + sl->a, (float *)dx, bits, CKB(G->dlh), CKB(x), CKB(A), n,
                          in, r, G->p, stream, G->lscratch, G->s);
    } else if (fuse) {
        kn_lora_dx(dx, dxt, bits, CKB(G->dlh), CKB(A), n, in, r, G->p, stream, G->s);
    } else if (!dropping) {
        kn_gemm(0, 0, ni, in, r, 1.0f, CKB(G->dlh), r, CKB(A), in, 1.0f, dx, dxt, in, G->s);
    } else {
        size_t es = dxt == KN_F32 ? 4 : 2;
        for (int64_t t0 = 0; t0 < n; t0 += G->dch) {
            int rows = (int)(n - t0 < G->dch ? n - t0 : G->dch);
            kn_gemm(0, 0, rows, in, r, 1.0f, CKB(G->dlh + t0 * r), r, CKB(A), in, 0.0f,
                    G->tmp, KN_BF16, in, G->s);
            kn_dropout_backward_add((char *)dx + (size_t)(t0 * in) * es, dxt, CKB(G->tmp),
                                    (int64_t)rows * in, G->p, stream, (uint64_t)(t0 * in),
                                    G->s);
        }
    }
    op_mark_lin(G, l, "lora dx");
}

/* ---- activation offload ---------------------------------------------------
 *
 * With checkpointing, each layer's backward first recomputes the layer from
 * its input, and most of that is the attention half: the q, k and v
 * products with their LoRA terms, RoPE and the attention forward (about a
 * third of the layer's forward). With offload the training forward copies
 * what that half produced (q and k after RoPE, v, the attention output
 * and its log-sum-exp, the LoRA inputs A dropout(xn1) of q, k and v) and
 * o's output x2 (with o's LoRA input) to pinned host memory on a copy
 * stream while the next layers compute, and the backward brings it back on
 * a second copy stream while the layer above finishes; the recomputation
 * then starts at RMSNorm2 (RMSNorm1 is redone too: the LoRA gradients of
 * q, k, v and the norm's backward need xn1 and rstd1, and it is cheap).
 * That is ~500 MB a layer for Llama 2 7B at 12288 tokens, about what PCIe
 * (~55 GB/s a direction on an H100) carries while a layer's forward
 * computes (~9 ms), so more would slow the forward; the backward, longer,
 * has room. OFF_ATTN (KN_OFFLOAD=1, for comparisons) leaves x2 out and
 * recomputes o, at 20% less traffic: 1-2% slower there (bench/RESULTS.md,
 * "train, activation offload"). The bytes that come back are those the
 * recomputation would write (the same kernels on the same data), so no
 * result changes by a bit; the masks of the linears not recomputed are
 * regenerated from their counters in the backward instead of read as keep
 * bits (bits_mask), which gives the same masks.
 *
 * There is still one set of device buffers: events order the copies
 * instead of double buffers, so no device memory is added. A forward copy
 * must end before the next layer writes the same buffer, about a layer's
 * compute later (off_fence makes it wait if not); layer i's copy back
 * starts once layer i+1's attention backward is done with the buffers, and
 * must arrive before layer i's recomputation and attention backward read
 * them (off_wait). The last layer's activations stay on the device.
 */

/* KN_OFFLOAD in the environment, for comparisons: 0 off, 1 the attention
 * half only, 2 and x2 (the default); otherwise `def`. */
static int off_mode(int def)
{
    const char *e = getenv("KN_OFFLOAD");
    if (e && (!strcmp(e, "0") || !strcmp(e, "1") || !strcmp(e, "2")))
        return e[0] - '0';
    return def;
}

/* What the host may pin: MemAvailable of /proc/meminfo where there is one,
 * else the physical memory. */
static size_t host_available(void)
{
    size_t kib = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long v;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemAvailable: %llu kB", &v) == 1)
                kib = (size_t)v;
        fclose(f);
    }
    if (kib)
        return kib * 1024;
    return (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGE_SIZE);
}

static void off_add(gpu_trainer *G, void *dev, size_t row, int put, int get)
{
    KN_REQUIRE(G->nent < OFF_NENT && dev);
    off_ent *e = &G->ent[G->nent++];
    e->dev = dev;
    e->row = row;
    e->hoff = G->hstride;
    e->put = put;
    e->get = get;
    G->hstride += ((size_t)G->cap * row + 255) & ~(size_t)255;
}

/* Sets up offload in `mode` (OFF_ATTN or OFF_ATTN_X2): the host slots of
 * layers 0 .. n_layers - 2, the copy streams and events. Where the host
 * memory cannot be pinned (or would be more than half of what is
 * available) training goes on without offload, with a note at -v. */
static void off_init(gpu_trainer *G, int mode)
{
    const llama_config *c = &G->c;
    gpu_acts *s = &G->sets[0];
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t lhr = (size_t)G->r * 2;
    uint32_t t = G->a->cfg.targets;
    G->nent = 0;
    G->hstride = 0;
    off_add(G, s->q, qd * 2, OFF_Q, OFF_Q);
    if (t & (1u << LLAMA_Q))
        off_add(G, s->lh[LLAMA_Q], lhr, OFF_Q, OFF_LH);
    off_add(G, s->k, kvd * 2, OFF_K, OFF_K);
    if (t & (1u << LLAMA_K))
        off_add(G, s->lh[LLAMA_K], lhr, OFF_K, OFF_LH);
    off_add(G, s->v, kvd * 2, OFF_V, OFF_V);
    if (t & (1u << LLAMA_V))
        off_add(G, s->lh[LLAMA_V], lhr, OFF_V, OFF_LH);
    off_add(G, s->att, qd * 2, OFF_ATT, OFF_ATT);
    off_add(G, s->lse, (size_t)c->n_heads * 4, OFF_ATT, OFF_ATT);
    if (mode == OFF_ATTN_X2) {
        off_add(G, s->x2, (size_t)c->dim * 2, OFF_X2, OFF_X2);
        if (t & (1u << LLAMA_O))
            off_add(G, s->lh[LLAMA_O], lhr, OFF_X2, OFF_X2);
    }
    G->hbytes = (size_t)(c->n_layers - 1) * G->hstride;
    size_t avail = host_available();
    cudaError_t e = cudaSuccess;
    if (G->hbytes > avail / 2) {
        msg_info("activation offload off: %.1f GiB of pinned host memory would be more "
                 "than half of the %.1f GiB available", G->hbytes / 1073741824.0,
                 avail / 1073741824.0);
    } else if ((e = cudaHostAlloc((void **)&G->host, G->hbytes, cudaHostAllocDefault)) !=
               cudaSuccess) {
        cudaGetLastError();
        msg_info("activation offload off: cannot pin %.1f GiB of host memory: %s",
                 G->hbytes / 1073741824.0, cudaGetErrorString(e));
    }
    if (!G->host) {
        G->host = NULL;
        G->nent = 0;
        G->hstride = G->hbytes = 0;
        return;
    }
    CUDA_CHECK(cudaStreamCreateWithFlags(&G->d2h, cudaStreamNonBlocking));
    CUDA_CHECK(cudaStreamCreateWithFlags(&G->h2d, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&G->ev_rdy, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&G->ev_free, cudaEventDisableTiming));
    for (int g = 0; g < OFF_NGROUP; g++) {
        CUDA_CHECK(cudaEventCreateWithFlags(&G->ev_out[g], cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&G->ev_in[g], cudaEventDisableTiming));
    }
    G->off = mode;
    /* o's output of every second layer stays out when o carries no adapter
     * (see off_x2) */
    G->x2skip = env_flag("KN_OFFLOAD_X2_SKIP", t & (1u << LLAMA_O) ? 0 : 2);
    msg_info("activation offload: %.1f MiB a layer, %.1f GiB of pinned host memory",
             G->hstride / 1048576.0, G->hbytes / 1073741824.0);
}

static void off_free(gpu_trainer *G)
{
    if (!G->off)
        return;
    CUDA_CHECK(cudaStreamSynchronize(G->d2h));
    CUDA_CHECK(cudaStreamSynchronize(G->h2d));
    CUDA_CHECK(cudaFreeHost(G->host));
    CUDA_CHECK(cudaStreamDestroy(G->d2h));
    CUDA_CHECK(cudaStreamDestroy(G->h2d));
    CUDA_CHECK(cudaEventDestroy(G->ev_rdy));
    CUDA_CHECK(cudaEventDestroy(G->ev_free));
    for (int g = 0; g < OFF_NGROUP; g++) {
        CUDA_CHECK(cudaEventDestroy(G->ev_out[g]));
        CUDA_CHECK(cudaEventDestroy(G->ev_in[g]));
    }
    G->off = 0;
}

/* Whether layer i's o_proj output (x2) goes to host memory and back (else
 * the recomputation redoes o from the attention output). With x2, a layer
 * sends ~506 MB for Llama 2 7B at 12288 tokens, ~10.4 ms of PCIe at the
 * ~49 GB/s measured, and with LoRA on q and v only the forward's compute
 * is shorter than that: the bus bounds the forward (leaving out half the
 * layers' x2 took it from 334 to 308 ms a micro-batch, for 10 ms more of
 * recomputation in the backward). With LoRA on o (and, in practice, on
 * more linears) the forward computes longer than it sends, and the o
 * recomputation costs more, so every layer's x2 goes. So: every second
 * layer's (1, 3, ...) x2 stays out when o carries no adapter, else none;
 * KN_OFFLOAD_X2_SKIP=m (comparisons) leaves out every m-th layer's (m - 1,
 * 2m - 1, ...), 0 none. bench/RESULTS.md, "train, last mile". */
static int off_x2(const gpu_trainer *G, int32_t i)
{
    return G->off == OFF_ATTN_X2 && !(G->x2skip > 0 && i % G->x2skip == G->x2skip - 1);
}

/* The forward: the compute stream waits until the previous layer's group
 * g has left before it overwrites the buffers. */
static void off_fence(gpu_trainer *G, int g)
{
    if (G->off_now == OFF_PUT)
        CUDA_CHECK(cudaStreamWaitEvent(G->s, G->ev_out[g], 0));
}

/* The forward: group g of layer `layer`, just written, to its host slot. */
static void off_put(gpu_trainer *G, int32_t layer, int g, int64_t n)
{
    char *slot = G->host + (size_t)layer * G->hstride;
    CUDA_CHECK(cudaEventRecord(G->ev_rdy, G->s));
    CUDA_CHECK(cudaStreamWaitEvent(G->d2h, G->ev_rdy, 0));
    for (int k = 0; k < G->nent; k++) {
        const off_ent *e = &G->ent[k];
        if (e->put == g)
            CUDA_CHECK(cudaMemcpyAsync(slot + e->hoff, e->dev, (size_t)n * e->row,
                                       cudaMemcpyDeviceToHost, G->d2h));
    }
    CUDA_CHECK(cudaEventRecord(G->ev_out[g], G->d2h));
}

/* The backward: layer `layer`'s groups back into the device buffers, which
 * the compute stream has let go of so far: all but the LoRA inputs of q,
 * k, v (the layer above's attention backward is done), or those (its
 * whole backward is). In the order they are needed: x2 (or the attention
 * output, for o in the recomputation) first. */
static void off_get(gpu_trainer *G, int32_t layer, int64_t n, int late)
{
    static const int order[] = {OFF_X2, OFF_ATT, OFF_Q, OFF_K, OFF_V};
    const char *slot = G->host + (size_t)layer * G->hstride;
    CUDA_CHECK(cudaEventRecord(G->ev_free, G->s));
    CUDA_CHECK(cudaStreamWaitEvent(G->h2d, G->ev_free, 0));
    /* and the forward's copies must have arrived (they have, in practice:
     * the last layer and the head ran in between) */
    for (int g = OFF_Q; g <= OFF_X2; g++)
        CUDA_CHECK(cudaStreamWaitEvent(G->h2d, G->ev_out[g], 0));
    for (int j = 0; j < (late ? 1 : 5); j++) {
        int g = late ? OFF_LH : order[j];
        for (int k = 0; k < G->nent && (g != OFF_X2 || off_x2(G, layer)); k++) {
            const off_ent *e = &G->ent[k];
            if (e->get == g)
                CUDA_CHECK(cudaMemcpyAsync(e->dev, slot + e->hoff, (size_t)n * e->row,
                                           cudaMemcpyHostToDevice, G->h2d));
        }
        CUDA_CHECK(cudaEventRecord(G->ev_in[g], G->h2d));
    }
}

/* The backward: the compute stream waits for group g of the layer. */
static void off_wait(gpu_trainer *G, int g)
{
    CUDA_CHECK(cudaStreamWaitEvent(G->s, G->ev_in[g], 0));
}

/* ---- one layer ------------------------------------------------------------ */

/* out NULL: recomputation for the backward (the layer output is not
 * needed again). With offload (off_now), the training forward sends the
 * attention half to host memory (put) and the recomputation starts after
 * it (got), once it is back. */
static void layer_fwd(gpu_trainer *G, int32_t i, gpu_acts *s, bf16 *out,
                      int64_t n, int drop, uint64_t key)
{
    const llama_config *c = &G->c;
    const gpu_layer *L = &G->L[i];
    cudaStream_t st = G->s;
    int dim = c->dim, hd = c->head_dim;
    /* the last layer's activations stay on the device until its backward */
    int put = G->off_now == OFF_PUT && i + 1 < c->n_layers;
    int got = G->off_now == OFF_GOT, wait = got && i + 1 < c->n_layers;
    /* a recomputation leaves the keep bits for the backward; so does the
     * training forward of a last layer that is not recomputed */
    G->recomp = drop && (out == NULL || (G->keep_last && i + 1 == c->n_layers));
    G->wpass = out ? WP_FWD : WP_RECOMP;
    G->olayer = i;
    op_mark(G, out ? "(forward)" : "(recomputation)");
    kn_rmsnorm_forward(KB(s->xn1), s->rstd1, CKB(s->x), L->attn_norm, n, dim, c->norm_eps, st);
    op_mark(G, "norm1");
    if (!got) {
        /* each group as soon as it is final, so its copy starts early */
        off_fence(G, OFF_Q);
        lin_fwd(G, i, LLAMA_Q, s->q, NULL, s->xn1, n, s->lh[LLAMA_Q], drop, key);
        kn_rope_forward(KB(s->q), G->pos, n, c->n_heads, hd, c->rope_theta, st);
        op_mark(G, "rope q");
        if (put)
            off_put(G, i, OFF_Q, n);
        off_fence(G, OFF_K);
        lin_fwd(G, i, LLAMA_K, s->k, NULL, s->xn1, n, s->lh[LLAMA_K], drop, key);
        kn_rope_forward(KB(s->k), G->pos, n, c->n_kv_heads, hd, c->rope_theta, st);
        op_mark(G, "rope k");
        if (put)
            off_put(G, i, OFF_K, n);
        off_fence(G, OFF_V);
        lin_fwd(G, i, LLAMA_V, s->v, NULL, s->xn1, n, s->lh[LLAMA_V], drop, key);
        if (put)
            off_put(G, i, OFF_V, n);
        off_fence(G, OFF_ATT);
        kn_attention_forward(KB(s->att), s->lse, CKB(s->q), CKB(s->k), CKB(s->v), G->start,
                             n, c->n_heads, c->n_kv_heads, hd, st);
        op_mark(G, "attention");
        if (put)
            off_put(G, i, OFF_ATT, n);
    }
    if (!got || !off_x2(G, i)) {
        if (wait)
            off_wait(G, OFF_ATT);
        off_fence(G, OFF_X2);
        op_mark(G, "wait att/fence x2");
        lin_fwd(G, i, LLAMA_O, s->x2, s->x, s->att, n, s->lh[LLAMA_O], drop, key);
        if (put && off_x2(G, i))
            off_put(G, i, OFF_X2, n);
    } else if (wait) {
        off_wait(G, OFF_X2);
        op_mark(G, "wait x2");
    }
    kn_rmsnorm_forward(KB(s->xn2), s->rstd2, CKB(s->x2), L->ffn_norm, n, dim, c->norm_eps, st);
    op_mark(G, "norm2");
    lin_fwd(G, i, LLAMA_GATE, s->g, NULL, s->xn2, n, s->lh[LLAMA_GATE], drop, key);
    lin_fwd(G, i, LLAMA_UP, s->u, NULL, s->xn2, n, s->lh[LLAMA_UP], drop, key);
    /* a recomputation needs h only as the LoRA input of down */
    if (out || (G->a->cfg.targets & (1u << LLAMA_DOWN)))
        kn_swiglu_forward(KB(s->hm), CKB(s->g), CKB(s->u), n * c->hidden, st);
    op_mark(G, "swiglu");
    lin_fwd(G, i, LLAMA_DOWN, out, s->x2, s->hm, n, s->lh[LLAMA_DOWN], drop, key);
    G->recomp = 0;
}

/* G->dres holds dL/d(layer output) on entry and dL/d(layer input) on exit
 * (when need_dx; the first layer's input gradient is not needed). */
static void layer_bwd(gpu_trainer *G, int32_t i, gpu_acts *s, int64_t n,
                      int drop, uint64_t key, int need_dx)
{
    const llama_config *c = &G->c;
    const gpu_layer *L = &G->L[i];
    cudaStream_t st = G->s;
    int dim = c->dim, hd = c->head_dim;
    /* Where the gradients go: activations of this layer that are dead by
     * the time each gradient is written (hm after SwiGLU's backward; xn2,
     * x2, gate and up once the MLP's backward is done). */
    float *dxn = G->dxn ? G->dxn : (float *)s->hm;
    bf16 *dq = G->dq ? G->dq : s->xn2, *datt = G->datt ? G->datt : s->x2;
    G->wpass = WP_BWD;
    bf16 *dk = G->dk ? G->dk : s->g, *dv = G->dv ? G->dv : s->u;
    G->olayer = i;
    op_mark(G, "(backward)");
    /* MLP: dh over h, then dgate/dup over gate/up */
    lin_bwd(G, i, LLAMA_DOWN, s->hm, KN_BF16, 0, G->dyb, s->hm, n,
            s->lh[LLAMA_DOWN], drop, key);
    kn_swiglu_backward(KB(s->g), KB(s->u), CKB(s->hm), CKB(s->g), CKB(s->u),
                       n * c->hidden, st);
    op_mark(G, "swiglu bwd");
    lin_bwd(G, i, LLAMA_GATE, dxn, KN_F32, 0, s->g, s->xn2, n,
            s->lh[LLAMA_GATE], drop, key);
    lin_bwd(G, i, LLAMA_UP, dxn, KN_F32, 1, s->u, s->xn2, n,
            s->lh[LLAMA_UP], drop, key);
    kn_rmsnorm_backward(G->dres, KB(G->dyb), dxn, CKB(s->x2), L->ffn_norm, s->rstd2, n,
                        dim, 1, st);
    op_mark(G, "norm2 bwd");
    /* attention; with offload, the layer's attention half arrives from
     * host memory (not the last layer's: it never left) and, once this
     * layer is done with its buffers, the layer below's is sent for */
    int got = G->off_now == OFF_GOT, wait = got && i + 1 < c->n_layers;
    if (wait && off_x2(G, i))
        off_wait(G, OFF_ATT);
    op_mark(G, "wait att");
    lin_bwd(G, i, LLAMA_O, datt, KN_BF16, 0, G->dyb, s->att, n,
            s->lh[LLAMA_O], drop, key);
    if (wait) {
        off_wait(G, OFF_Q);
        off_wait(G, OFF_K);
        off_wait(G, OFF_V);
    }
    op_mark(G, "wait q k v");
    /* the one-pass attention backward's workspace (fp32 dq, counters;
     * opt-in, KN_ATTN_BWD_1PASS=1) is dxn, dead here: last read by the
     * MLP's norm backward above, written next by q's lin_bwd; too small,
     * the two-pass backward runs */
    size_t dxnb = G->dxn ? (size_t)(G->cap * dim) * 4 : (size_t)(G->cap * c->hidden) * 2;
    /* dq and dk come back with RoPE's inverse applied */
    kn_attention_backward_rope(KB(dq), KB(dk), KB(dv), G->delta, CKB(datt), CKB(s->q),
                               CKB(s->k), CKB(s->v), CKB(s->att), s->lse, G->start, n,
                               c->n_heads, c->n_kv_heads, hd, dxn, dxnb, G->rope, G->pos,
                               c->rope_theta, st);
    op_mark(G, "attention bwd");
    if (got && i > 0)
        off_get(G, i - 1, n, 0);
    if (wait)
        off_wait(G, OFF_LH);
    op_mark(G, "wait lh");
    float *dx = need_dx ? dxn : NULL;
    lin_bwd(G, i, LLAMA_Q, dx, KN_F32, 0, dq, s->xn1, n, s->lh[LLAMA_Q], drop, key);
    lin_bwd(G, i, LLAMA_K, dx, KN_F32, 1, dk, s->xn1, n, s->lh[LLAMA_K], drop, key);
    lin_bwd(G, i, LLAMA_V, dx, KN_F32, 1, dv, s->xn1, n, s->lh[LLAMA_V], drop, key);
    if (got && i > 0)
        off_get(G, i - 1, n, 1);
    if (need_dx)
        kn_rmsnorm_backward(G->dres, KB(G->dyb), dxn, CKB(s->x), L->attn_norm, s->rstd1,
                            n, dim, 1, st);
    op_mark(G, "norm1 bwd");
    G->olayer = -1;
}

/* ---- whole passes --------------------------------------------------------- */

static int upload_batch(gpu_trainer *G, const llama_batch *b)
{
    if (b->n > G->cap)
        return msg_error("a micro-batch of %lld tokens exceeds the %lld the "
                         "GPU buffers were sized for", (long long)b->n,
                         (long long)G->cap);
    if (llama_batch_check(G->m, b) != 0)
        return -1;
    size_t n = (size_t)b->n;
    kn_memcpy_h2d(G->ids, b->ids, n * 4, G->s);
    kn_memcpy_h2d(G->pos, b->pos, n * 4, G->s);
    kn_memcpy_h2d(G->start, b->start, n * 4, G->s);
    if (b->targets) {
        kn_memcpy_h2d(G->tg, b->targets, n * 4, G->s);
        if (b->weights) {
            kn_memcpy_h2d(G->wt, b->weights, n * 4, G->s);
        } else {
            float *ones = (float *)xmalloc(n * 4);
            for (size_t t = 0; t < n; t++)
                ones[t] = 1.0f;
            kn_memcpy_h2d(G->wt, ones, n * 4, G->s);
            kn_stream_sync(G->s);
            free(ones);
        }
    }
    return 0;
}

/* Layer i's input: xl for layer 0 (the embedding, written again before
 * layer 0's backward: xl holds the final state in between), xin for the
 * others. The last layer writes xl, or xin[0] when it is also the first. */
static bf16 *layer_in(gpu_trainer *G, int32_t i)
{
    return i == 0 ? G->xl : G->xin + (int64_t)(i - 1) * G->cap * G->c.dim;
}

static bf16 *layer_out(gpu_trainer *G, int32_t i)
{
    int32_t nl = G->c.n_layers;
    return i + 1 < nl ? layer_in(G, i + 1) : nl == 1 ? G->xin : G->xl;
}

static gpu_acts *acts_of(gpu_trainer *G, int32_t i)
{
    gpu_acts *s = &G->sets[G->ckpt ? 0 : i];
    s->x = layer_in(G, i);
    return s;
}

/* KN_PHASE_TIMES=1 (diagnostics): events at the start of a micro-batch
 * (0), after the layers' forward (1), after the head (2) and at the end (3);
 * the end waits for the micro-batch, which costs the host's lead. */
static void ptime_mark(gpu_trainer *G, int k)
{
    if (!G->ptime)
        return;
    CUDA_CHECK(cudaEventRecord(G->pev[k], G->s));
    if (k < 3)
        return;
    CUDA_CHECK(cudaEventSynchronize(G->pev[3]));
    for (int j = 0; j < 3; j++) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, G->pev[j], G->pev[j + 1]));
        G->pms[j] += ms;
    }
    G->pcount++;
}

/* Forward and backward of one micro-batch already uploaded: adds to grad
 * the gradient of scale * sum w CE and to stats[0] the loss sum. */
static void forward_backward(gpu_trainer *G, int64_t n, uint64_t key, float scale)
{
    const llama_config *c = &G->c;
    cudaStream_t st = G->s;
    int32_t nl = c->n_layers;
    G->bits_layer = -1; /* another micro-batch: another mask */
    int off = G->off && nl > 1;
    ptime_mark(G, 0);
    kn_rope_table(G->rope, G->pos, n, c->head_dim, c->rope_theta, st);
    kn_embedding_forward(KB(layer_in(G, 0)), CKB(G->embed), G->ids, n, c->dim, st);
    G->off_now = off ? OFF_PUT : 0;
    for (int32_t i = 0; i < nl; i++)
        layer_fwd(G, i, acts_of(G, i), layer_out(G, i), n, 1, key);
    G->off_now = 0;
    wflush(G); /* the head's scratch may be wbuf */
    ptime_mark(G, 1);
    /* the head: normed state in dyb (free until the backward), gradient
     * into dres, then through the final norm in place; dyb = bf16(dres) */
    const bf16 *xf = layer_out(G, nl - 1);
    kn_rmsnorm_forward(KB(G->dyb), G->rstdf, CKB(xf), G->norm, n, c->dim, c->norm_eps, st);
    kn_xent_forward_backward(G->stats, G->dres, CKB(G->dyb), CKB(G->head), G->tg, G->wt, n,
                             c->dim, c->vocab, scale, G->chunk, G->xent_scratch, st);
    kn_rmsnorm_backward(G->dres, KB(G->dyb), G->dres, CKB(xf), G->norm, G->rstdf, n,
                        c->dim, 0, st);
    ptime_mark(G, 2);
    G->off_now = off ? OFF_GOT : 0;
    for (int32_t i = nl - 1; i >= 0; i--) {
        gpu_acts *s = acts_of(G, i);
        if (i == 0 && nl > 1) {
            wflush(G);
            kn_embedding_forward(KB(layer_in(G, 0)), CKB(G->embed), G->ids, n, c->dim, st);
        }
        /* the last layer's activations are all there with keep_last */
        if (G->ckpt && !(G->keep_last && i + 1 == nl))
            layer_fwd(G, i, s, NULL, n, 1, key);
        layer_bwd(G, i, s, n, 1, key, i > 0);
        if (G->hooks)
            G->hooks->layer_done(G->hooks->ctx, i, G->grad, G->s);
    }
    G->off_now = 0;
    wflush(G);
    ptime_mark(G, 3);
    op_collect(G);
}

extern "C" int gpu_trainer_step(gpu_trainer *G, const train_batch *micro,
                                size_t nm, double lr, double max_norm,
                                uint64_t seed, int64_t step, double *loss,
                                double *norm)
{
    double wsum = 0;
    for (size_t k = 0; k < nm; k++)
        wsum += micro[k].weight_sum;
    return gpu_trainer_step_shard(G, micro, NULL, nm, wsum, NULL, lr, max_norm, seed,
                                  step, loss, norm);
}

extern "C" int gpu_trainer_step_shard(gpu_trainer *G, const train_batch *micro,
                                      const int64_t *index, size_t nm, double wsum,
                                      const gpu_step_hooks *hooks, double lr,
                                      double max_norm, uint64_t seed, int64_t step,
                                      double *loss, double *norm)
{
    float scale = wsum > 0 ? (float)(1.0 / wsum) : 0.0f;
    kn_memset(G->grad, 0, G->np * 4, G->s);
    kn_memset(G->stats, 0, 2 * sizeof(float), G->s);
    size_t last = nm; /* its backward finishes each layer's gradient */
    for (size_t k = 0; k < nm; k++)
        if (micro[k].b.n > 0)
            last = k;
    for (size_t k = 0; k < nm; k++) {
        if (micro[k].b.n == 0)
            continue;
        if (!micro[k].b.targets)
            return msg_error("training batch without targets");
        if (upload_batch(G, &micro[k].b) != 0)
            return -1;
        G->hooks = k == last ? hooks : NULL;
        forward_backward(G, micro[k].b.n,
                         train_dropout_key(seed, step, index ? index[k] : (int64_t)k), scale);
        G->hooks = NULL;
    }
    if (hooks)
        hooks->grads_done(hooks->ctx, G->grad, G->stats, G->s);
    kn_sumsq(G->stats + 1, G->grad, (int64_t)G->np, G->s);
    /* The host reads the loss and the norm (8 bytes, what the metrics need
     * anyway) before the update, not after it: a step whose loss or
     * gradient is not finite must change nothing (train_step's contract),
     * so that train_run can skip it. Under data parallelism every rank
     * holds the same all-reduced sums here (a rank's NaN or infinity
     * reaches every sum) and the same deterministic sumsq of them, so the
     * ranks agree. */
    float st[2];
    kn_memcpy_d2h(st, G->stats, sizeof st, G->s);
    *loss = wsum > 0 ? st[0] / wsum : NAN;
    *norm = sqrt((double)st[1]);
    G->adam_step++; /* counted either way, as train_step counts it */
    if (!isfinite(*norm) || (wsum > 0 && !isfinite(*loss)))
        return 0;
    kn_adamw h;
    h.lr = lr;
    h.beta1 = G->beta1;
    h.beta2 = G->beta2;
    h.eps = G->eps;
    h.weight_decay = G->wd;
    h.step = G->adam_step;
    h.max_grad_norm = max_norm;
    kn_adamw_step(G->params, NULL, G->dmom1, G->dmom2, G->grad, (int64_t)G->np,
                  &h, G->stats + 1, G->s);
    G->pb_layer = -1; /* the bf16 slices are cast again from the new values */
    return 0;
}

extern "C" int gpu_trainer_gradient(gpu_trainer *G, const llama_batch *b,
                                    uint64_t key, float loss_scale,
                                    float *grad, double *loss_sum)
{
    if (!b->targets)
        return msg_error("training batch without targets");
    if (upload_batch(G, b) != 0)
        return -1;
    kn_memset(G->grad, 0, G->np * 4, G->s);
    kn_memset(G->stats, 0, 2 * sizeof(float), G->s);
    forward_backward(G, b->n, key, loss_scale);
    kn_memcpy_d2h(grad, G->grad, G->np * 4, G->s);
    float ls;
    kn_memcpy_d2h(&ls, G->stats, sizeof ls, G->s);
    *loss_sum = ls;
    return 0;
}

extern "C" int gpu_trainer_forward(gpu_trainer *G, const llama_batch *b,
                                   double *loss_sum, double *weight_sum)
{
    const llama_config *c = &G->c;
    cudaStream_t st = G->s;
    if (!b->targets)
        return msg_error("evaluation batch without targets");
    if (upload_batch(G, b) != 0)
        return -1;
    int64_t n = b->n;
    kn_memset(G->stats, 0, 2 * sizeof(float), st);
    bf16 *cur = G->xin, *nxt = G->xl;
    kn_embedding_forward(KB(cur), CKB(G->embed), G->ids, n, c->dim, st);
    gpu_acts *s = &G->sets[0];
    for (int32_t i = 0; i < c->n_layers; i++) {
        s->x = cur;
        layer_fwd(G, i, s, nxt, n, 0, 0);
        bf16 *t = cur;
        cur = nxt;
        nxt = t;
    }
    wflush(G);
    kn_rmsnorm_forward(KB(G->dyb), G->rstdf, CKB(cur), G->norm, n, c->dim, c->norm_eps, st);
    kn_xent_forward_backward(G->stats, NULL, CKB(G->dyb), CKB(G->head), G->tg, G->wt, n,
                             c->dim, c->vocab, 0.0f, G->chunk, G->xent_scratch, st);
    G->on = 0; /* KN_OP_TIMES counts training micro-batches only */
    float ls;
    kn_memcpy_d2h(&ls, G->stats, sizeof ls, st);
    double ws = 0;
    for (int64_t t = 0; t < n; t++)
        if (b->targets[t] >= 0)
            ws += b->weights ? b->weights[t] : 1.0;
    *loss_sum = ls;
    *weight_sum = ws;
    return 0;
}

extern "C" int gpu_trainer_eval(gpu_trainer *G, const pack_data *d,
                                int64_t batch_rows, double *loss)
{
    train_batch tb;
    memset(&tb, 0, sizeof tb);
    double ls = 0, ws = 0;
    uint64_t *rows = (uint64_t *)xmalloc((size_t)batch_rows * sizeof(uint64_t));
    int rc = 0;
    for (uint64_t r0 = 0; r0 < d->h.n_rows && rc == 0; r0 += (uint64_t)batch_rows) {
        size_t n = 0;
        for (uint64_t r = r0; r < d->h.n_rows && n < (size_t)batch_rows; r++)
            rows[n++] = r;
        train_batch_build(&tb, d, rows, n);
        if (tb.b.n == 0)
            continue;
        double l = 0, w = 0;
        rc = gpu_trainer_forward(G, &tb.b, &l, &w);
        ls += l;
        ws += w;
    }
    free(rows);
    train_batch_free(&tb);
    *loss = ws > 0 ? ls / ws : NAN;
    return rc;
}

/* ---- train_run's backend --------------------------------------------------- */

static int be_step(void *ctx, const train_batch *micro, size_t n, double lr,
                   double max_norm, uint64_t seed, int64_t step, double *loss,
                   double *norm)
{
    return gpu_trainer_step((gpu_trainer *)ctx, micro, n, lr, max_norm, seed,
                            step, loss, norm);
}

static int be_eval(void *ctx, const pack_data *d, int64_t batch_rows, double *loss)
{
    return gpu_trainer_eval((gpu_trainer *)ctx, d, batch_rows, loss);
}

static void be_load(void *ctx, const lora_adapter *a, const adamw *opt)
{
    gpu_trainer_load((gpu_trainer *)ctx, a, opt);
}

static void be_store(void *ctx, lora_adapter *a, adamw *opt)
{
    gpu_trainer_store((gpu_trainer *)ctx, a, opt);
}

static double be_peak(void *ctx)
{
    return (double)gpu_trainer_peak_bytes((const gpu_trainer *)ctx);
}

extern "C" void gpu_trainer_backend(gpu_trainer *g, train_backend *b)
{
    memset(b, 0, sizeof *b);
    b->ctx = g;
    b->step = be_step;
    b->eval = be_eval;
    b->load = be_load;
    b->store = be_store;
    b->peak_bytes = be_peak;
}
