/* attention.c: flash attention forward and backward against
 * ops_attention_* (double precision on the same bf16 inputs): multi-head
 * and grouped-query, head sizes 8 (stories260K), 30 (not a multiple of 8),
 * 64, 96 (padded) and 128, ragged documents, a single token, and lengths
 * that are not multiples of the 64-token tile or the 128-query block; the
 * backward must give the same bits twice. The first forward kernel
 * (KN_ATTN_FWD_V1) runs on two shapes; on an H100 the wgmma kernels
 * (KN_ATTN_WGMMA, head sizes 66..128) run on every shape, and their
 * one-warpgroup blocks (KN_ATTN_*_WG=1) and unswizzled tiles
 * (KN_ATTN_WG_NOSWIZZLE) on some. The backward runs as two passes (the
 * default) and as one (KN_ATTN_BWD_1PASS=1, both KN_ATTN_BWD1_MODE orders)
 * on every shape; passes() compares them on grids larger than the GPU
 * holds. fusions() checks that the backward with RoPE's inverse applied
 * by the kernels (kn_attention_backward_rope) gives the bits of the
 * separate passes, with the dk/dv kernel after the dq kernel (the
 * default) or beside it on a second stream (KN_ATTN_BWD_STREAMS=1).
 * --bench times them all. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "gpu_test.h"

#define TOL_LSE 1e-4  /* fp32 softmax statistics of exact bf16 inputs */

typedef struct {
    kn_bf16 *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse, *delta;
    void *ws; /* the one-pass backward's workspace */
    size_t wsb;
    int32_t *start;
    int64_t n;
    int nh, nkv, hd;
} att_ctx;

static void run_fwd(void *p)
{
    att_ctx *c = p;
    kn_attention_forward(c->o, c->lse, c->q, c->k, c->v, c->start, c->n, c->nh, c->nkv, c->hd, 0);
}
static void run_bwd(void *p)
{
    att_ctx *c = p;
    kn_attention_backward_ws(c->dq, c->dk, c->dv, c->delta, c->dout, c->q, c->k, c->v, c->o,
                             c->lse, c->start, c->n, c->nh, c->nkv, c->hd, c->ws, c->wsb, 0);
}

static void setup(att_ctx *c, float **hq, float **hk, float **hv, float **hdo,
                  int32_t **hstart, int64_t n, int nh, int nkv, int hd, int maxdoc)
{
    int64_t nq = n * nh * hd, nk = n * nkv * hd;
    *hq = gt_rand(nq, 1.0f);
    *hk = gt_rand(nk, 1.0f);
    *hv = gt_rand(nk, 1.0f);
    *hdo = gt_rand(nq, 1.0f);
    gt_round_bf16(*hq, nq);
    gt_round_bf16(*hk, nk);
    gt_round_bf16(*hv, nk);
    gt_round_bf16(*hdo, nq);
    *hstart = malloc((size_t)n * 4);
    gt_docs(*hstart, NULL, n, maxdoc);
    c->n = n; c->nh = nh; c->nkv = nkv; c->hd = hd;
    c->q = gt_up_bf16(*hq, nq);
    c->k = gt_up_bf16(*hk, nk);
    c->v = gt_up_bf16(*hv, nk);
    c->dout = gt_up_bf16(*hdo, nq);
    c->start = gt_up(*hstart, (size_t)n * 4);
    c->o = gt_dev((size_t)nq * 2);
    c->dq = gt_dev((size_t)nq * 2);
    c->dk = gt_dev((size_t)nk * 2);
    c->dv = gt_dev((size_t)nk * 2);
    c->lse = gt_dev((size_t)(n * nh) * 4);
    c->delta = gt_dev((size_t)(n * nh) * 4);
    c->wsb = kn_attention_backward_ws_bytes(n, nh, hd);
    c->ws = gt_dev(c->wsb); /* poisoned: nothing may be read before written */
}

static void teardown(att_ctx *c)
{
    kn_free(c->q); kn_free(c->k); kn_free(c->v); kn_free(c->dout);
    kn_free(c->start); kn_free(c->o); kn_free(c->dq); kn_free(c->dk);
    kn_free(c->dv); kn_free(c->lse); kn_free(c->delta); kn_free(c->ws);
}

static void one(int64_t n, int nh, int nkv, int hd, int maxdoc)
{
    att_ctx c;
    float *q, *k, *v, *dout;
    int32_t *start;
    setup(&c, &q, &k, &v, &dout, &start, n, nh, nkv, hd, maxdoc);
    int64_t nq = n * nh * hd, nk = n * nkv * hd;
    float *o = malloc((size_t)nq * 4), *lse = malloc((size_t)(n * nh) * 4);
    ops_attention_forward(o, lse, q, k, v, start, n, nh, nkv, hd);
    run_fwd(&c);
    float *go = gt_down_bf16(c.o, nq), *glse = gt_down_f32(c.lse, n * nh);
    char what[128], tag[80];
    snprintf(tag, sizeof tag, "n=%lld nh=%d nkv=%d hd=%d docs<=%d%s", (long long)n, nh, nkv, hd,
             maxdoc, getenv("KN_ATTN_BWD_1PASS") ? getenv("KN_ATTN_BWD1_MODE") : "");
    snprintf(what, sizeof what, "attention forward o %s", tag);
    gt_compare(what, go, o, nq, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");
    snprintf(what, sizeof what, "attention forward lse %s", tag);
    gt_compare(what, glse, lse, n * nh, TOL_LSE, "TOL_LSE");

    float *dq = malloc((size_t)nq * 4), *dk = malloc((size_t)nk * 4), *dv = malloc((size_t)nk * 4);
    ops_attention_backward(dq, dk, dv, dout, q, k, v, start, n, nh, nkv, hd);
    run_bwd(&c);
    float *gdq = gt_down_bf16(c.dq, nq), *gdk = gt_down_bf16(c.dk, nk), *gdv = gt_down_bf16(c.dv, nk);
    snprintf(what, sizeof what, "attention backward dq %s", tag);
    gt_compare(what, gdq, dq, nq, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");
    snprintf(what, sizeof what, "attention backward dk %s", tag);
    gt_compare(what, gdk, dk, nk, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");
    snprintf(what, sizeof what, "attention backward dv %s", tag);
    gt_compare(what, gdv, dv, nk, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");

    /* no atomics (the one-pass dq is added in a fixed order): a second
     * backward, with the workspace as the first left it, gives the same
     * bits */
    kn_bf16 *dq1 = gt_dev((size_t)nq * 2), *dk1 = gt_dev((size_t)nk * 2), *dv1 = gt_dev((size_t)nk * 2);
    kn_attention_backward_ws(dq1, dk1, dv1, c.delta, c.dout, c.q, c.k, c.v, c.o, c.lse, c.start,
                             n, nh, nkv, hd, c.ws, c.wsb, 0);
    float *gdq1 = gt_down_bf16(dq1, nq), *gdk1 = gt_down_bf16(dk1, nk), *gdv1 = gt_down_bf16(dv1, nk);
    snprintf(what, sizeof what, "attention backward deterministic %s", tag);
    gt_check(memcmp(gdq, gdq1, (size_t)nq * 4) == 0 && memcmp(gdk, gdk1, (size_t)nk * 4) == 0 &&
                 memcmp(gdv, gdv1, (size_t)nk * 4) == 0,
             what);
    kn_free(dq1); kn_free(dk1); kn_free(dv1);
    free(gdq1); free(gdk1); free(gdv1);

    free(o); free(lse); free(go); free(glse); free(dq); free(dk); free(dv);
    free(gdq); free(gdk); free(gdv);
    free(q); free(k); free(v); free(dout); free(start);
    teardown(&c);
}

/* one environment setting for the calls in between */
static void env_set(const char *name, const char *val)
{
    if (val)
        setenv(name, val, 1);
    else
        unsetenv(name);
}

/* sets a and b to 1 (either may be NULL), clearing the other choices */
static void env_pair(const char *a, const char *b)
{
    static const char *const all[] = {"KN_ATTN_FWD_V1", "KN_ATTN_WGMMA", "KN_ATTN_FWD_WG",
                                      "KN_ATTN_DQ_WG", "KN_ATTN_DKDV_WG",
                                      "KN_ATTN_WG_NOSWIZZLE", "KN_ATTN_BWD_2PASS",
                                      "KN_ATTN_BWD_1PASS", "KN_ATTN_BWD1_MODE"};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        env_set(all[i], NULL);
    if (a)
        env_set(a, "1");
    if (b)
        env_set(b, "1");
}

/* Timing only: rows of `row` tokens, each one document (the seed's
 * packing), causal FLOP count (the backward counted as 2.5 forwards). */
static void bench(int rows, int row, int nh, int nkv, int hd)
{
    /* env: NULL (defaults), KN_ATTN_FWD_V1, or KN_ATTN_WGMMA plus env2 */
    static const struct {
        const char *name, *env, *env2, *mode; /* mode: KN_ATTN_BWD1_MODE */
    } fwd[] = {
        {"default (mma.sync, 128-query blocks)", NULL, NULL, NULL},
        {"v1 (mma.sync, 64-query blocks)", "KN_ATTN_FWD_V1", NULL, NULL},
        {"wgmma, 2 warpgroups", "KN_ATTN_WGMMA", NULL, NULL},
        {"wgmma, 1 warpgroup", "KN_ATTN_WGMMA", "KN_ATTN_FWD_WG", NULL},
        {"wgmma, 2 warpgroups, no swizzle", "KN_ATTN_WGMMA", "KN_ATTN_WG_NOSWIZZLE", NULL},
    }, bwd[] = {
        {"default (mma.sync, two passes)", NULL, NULL, NULL},
        {"mma.sync, one pass, warp turns", "KN_ATTN_BWD_1PASS", NULL, "0"},
        {"mma.sync, one pass, block turns", "KN_ATTN_BWD_1PASS", NULL, "1"},
        {"wgmma, dq 2 / dkdv 2 warpgroups", "KN_ATTN_WGMMA", NULL, NULL},
        {"wgmma, dq 1 / dkdv 2 warpgroups", "KN_ATTN_WGMMA", "KN_ATTN_DQ_WG", NULL},
        {"wgmma, dq 2 / dkdv 1 warpgroups", "KN_ATTN_WGMMA", "KN_ATTN_DKDV_WG", NULL},
        {"wgmma, 2 / 2 warpgroups, no swizzle", "KN_ATTN_WGMMA", "KN_ATTN_WG_NOSWIZZLE", NULL},
    };
    att_ctx c;
    float *q, *k, *v, *dout;
    int32_t *start;
    int64_t n = (int64_t)rows * row;
    setup(&c, &q, &k, &v, &dout, &start, n, nh, nkv, hd, 1);
    for (int64_t t = 0; t < n; t++)
        start[t] = (int32_t)(t / row * row);
    kn_memcpy_h2d(c.start, start, (size_t)n * 4, 0);
    double pairs = (double)rows * row * (row + 1) / 2.0;
    double flops = 4.0 * pairs * hd * nh;
    char what[128];
    for (size_t i = 0; i < sizeof fwd / sizeof fwd[0]; i++) {
        env_pair(fwd[i].env, fwd[i].env2);
        snprintf(what, sizeof what, "attention forward %s %dx%d nh=%d hd=%d", fwd[i].name, rows,
                 row, nh, hd);
        gt_time(what, run_fwd, &c, flops, 0);
        env_pair(NULL, NULL);
    }
    run_fwd(&c);
    for (size_t i = 0; i < sizeof bwd / sizeof bwd[0]; i++) {
        env_pair(bwd[i].env, bwd[i].env2);
        env_set("KN_ATTN_BWD1_MODE", bwd[i].mode);
        snprintf(what, sizeof what, "attention backward %s %dx%d nh=%d hd=%d", bwd[i].name, rows,
                 row, nh, hd);
        gt_time(what, run_bwd, &c, 2.5 * flops, 0);
        env_pair(NULL, NULL);
    }
    free(q); free(k); free(v); free(dout); free(start);
    teardown(&c);
}

/* One pass against two: a workspace too small, or none, selects the
 * two-pass backward (same bits as KN_ATTN_BWD_2PASS=1); on a grid of more
 * blocks than an H100 holds at once (the ordered dq accumulation must not
 * wait for a block that is not resident), ragged documents and GQA, the
 * one-pass results match the two-pass ones and repeat bit for bit. */
static void passes(int64_t n, int nh, int nkv, int hd, int maxdoc)
{
    att_ctx c;
    float *q, *k, *v, *dout;
    int32_t *start;
    setup(&c, &q, &k, &v, &dout, &start, n, nh, nkv, hd, maxdoc);
    int64_t nq = n * nh * hd, nk = n * nkv * hd;
    char what[160], tag[80];
    snprintf(tag, sizeof tag, "n=%lld nh=%d nkv=%d hd=%d docs<=%d", (long long)n, nh, nkv, hd, maxdoc);
    run_fwd(&c);
    float *r[4][3]; /* two-pass, no workspace, too small, one pass */
    for (int m = 0; m < 4; m++) {
        env_set("KN_ATTN_BWD_2PASS", m == 0 ? "1" : NULL);
        if (m == 1)
            kn_attention_backward(c.dq, c.dk, c.dv, c.delta, c.dout, c.q, c.k, c.v, c.o, c.lse,
                                  c.start, n, nh, nkv, hd, 0);
        else
            kn_attention_backward_ws(c.dq, c.dk, c.dv, c.delta, c.dout, c.q, c.k, c.v, c.o,
                                     c.lse, c.start, n, nh, nkv, hd, c.ws,
                                     m == 2 ? c.wsb - 1 : c.wsb, 0);
        r[m][0] = gt_down_bf16(c.dq, nq);
        r[m][1] = gt_down_bf16(c.dk, nk);
        r[m][2] = gt_down_bf16(c.dv, nk);
    }
    env_set("KN_ATTN_BWD_2PASS", NULL);
    int same = 1;
    for (int m = 1; m < 3; m++)
        same &= !memcmp(r[m][0], r[0][0], (size_t)nq * 4) &&
                !memcmp(r[m][1], r[0][1], (size_t)nk * 4) &&
                !memcmp(r[m][2], r[0][2], (size_t)nk * 4);
    snprintf(what, sizeof what, "attention backward without workspace is two-pass %s", tag);
    gt_check(same, what);
    static const char *const nm[] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        snprintf(what, sizeof what, "attention backward one pass vs two %s %s", nm[i], tag);
        gt_compare(what, r[3][i], r[0][i], i ? nk : nq, TOL_BF16_CHAIN, "TOL_BF16_CHAIN");
    }
    run_bwd(&c);
    float *d2 = gt_down_bf16(c.dq, nq), *k2 = gt_down_bf16(c.dk, nk);
    snprintf(what, sizeof what, "attention backward one pass deterministic %s", tag);
    gt_check(!memcmp(d2, r[3][0], (size_t)nq * 4) && !memcmp(k2, r[3][1], (size_t)nk * 4), what);
    free(d2); free(k2);
    for (int m = 0; m < 4; m++)
        for (int i = 0; i < 3; i++)
            free(r[m][i]);
    free(q); free(k); free(v); free(dout); free(start);
    teardown(&c);
}

/* The backward as lora-train runs it (kn_attention_backward_rope: dq and
 * dk rotated back by RoPE's inverse as they are stored, where the path
 * allows) against the separate passes (kn_attention_backward_ws, then
 * kn_rope_backward on dq and dk), with the two kernels on two streams
 * (KN_ATTN_BWD_STREAMS=1) and on one: the same bits, delta included. Head
 * sizes 16..128 take the fused path, others (8, 30, 96) the fallback;
 * documents restart the positions. */
static void fusions(int64_t n, int nh, int nkv, int hd, int maxdoc)
{
    att_ctx c;
    float *q, *k, *v, *dout;
    int32_t *start;
    setup(&c, &q, &k, &v, &dout, &start, n, nh, nkv, hd, maxdoc);
    int64_t nq = n * nh * hd, nk = n * nkv * hd;
    int32_t *pos = malloc((size_t)n * 4);
    for (int64_t t = 0; t < n; t++)
        pos[t] = (int32_t)(t - start[t] + (t % 3 == 0 ? 1000 : 0));
    int32_t *dpos = gt_up(pos, (size_t)n * 4);
    float *tab = gt_dev((size_t)(n * hd) * 4);
    const float theta = 10000.0f;
    kn_rope_table(tab, dpos, n, hd, theta, 0);
    run_fwd(&c);
    float *r[3][4]; /* separate, fused (two streams), fused (one): dq dk dv delta */
    for (int m = 0; m < 3; m++) {
        setenv("KN_ATTN_BWD_STREAMS", m == 2 ? "0" : "1", 1);
        if (m < 1) {
            kn_attention_backward_ws(c.dq, c.dk, c.dv, c.delta, c.dout, c.q, c.k, c.v, c.o,
                                     c.lse, c.start, n, nh, nkv, hd, NULL, 0, 0);
            kn_rope_backward(c.dq, dpos, n, nh, hd, theta, 0);
            kn_rope_backward(c.dk, dpos, n, nkv, hd, theta, 0);
        } else {
            kn_attention_backward_rope(c.dq, c.dk, c.dv, c.delta, c.dout, c.q, c.k, c.v, c.o,
                                       c.lse, c.start, n, nh, nkv, hd, NULL, 0, tab, dpos,
                                       theta, 0);
        }
        r[m][0] = gt_down_bf16(c.dq, nq);
        r[m][1] = gt_down_bf16(c.dk, nk);
        r[m][2] = gt_down_bf16(c.dv, nk);
        r[m][3] = gt_down_f32(c.delta, n * nh);
    }
    unsetenv("KN_ATTN_BWD_STREAMS");
    char what[160];
    static const char *const nm[] = {"rope fused, two streams", "rope fused, one stream"};
    int64_t sz[4] = {nq, nk, nk, n * nh};
    for (int m = 1; m < 3; m++) {
        int same = 1;
        for (int i = 0; i < 4; i++)
            same &= !memcmp(r[m][i], r[0][i], (size_t)sz[i] * 4);
        snprintf(what, sizeof what,
                 "attention backward %s = separate passes, bit for bit n=%lld nh=%d nkv=%d "
                 "hd=%d docs<=%d%s", nm[m - 1], (long long)n, nh, nkv, hd, maxdoc,
                 getenv("KN_ATTN_WGMMA") ? " (wgmma: separate passes)" : "");
        gt_check(same, what);
    }
    for (int m = 0; m < 3; m++)
        for (int i = 0; i < 4; i++)
            free(r[m][i]);
    free(q); free(k); free(v); free(dout); free(start); free(pos);
    kn_free(dpos); kn_free(tab);
    teardown(&c);
}

static void shapes(void);

/* the shapes of main(), or with `few` three that reach the wgmma
 * kernels, under KN_ATTN_WGMMA=1 and name=1 */
static void variant(const char *name, int few)
{
    env_pair("KN_ATTN_WGMMA", name);
    if (few) {
        one(130, 2, 1, 96, 70);
        one(700, 2, 1, 128, 300);
        one(1500, 4, 2, 128, 700);
    } else {
        shapes();
    }
    env_pair(NULL, NULL);
}

static void shapes(void)
{
    one(1, 1, 1, 8, 1);
    one(100, 8, 4, 8, 30);      /* stories260K: GQA, hd 8 */
    one(256, 8, 4, 8, 256);     /* one causal document per row of 256 */
    one(300, 4, 4, 64, 200);
    one(130, 2, 1, 96, 70);
    one(257, 4, 2, 128, 257);
    one(77, 3, 1, 30, 20);
    one(500, 2, 2, 64, 3);      /* many tiny documents */
    one(700, 2, 1, 128, 300);   /* several 128-query blocks, documents across them */
    one(384, 3, 3, 128, 384);   /* one causal document, whole blocks */
    one(1500, 4, 2, 128, 700);  /* many key blocks, GQA */
    one(1100, 2, 2, 64, 1100);  /* one long document, head size 64 */
    one(90, 2, 1, 66, 40);      /* padded head, rows not 16-byte vectors */
}

int main(int argc, char **argv)
{
    gt_init("attention", argc, argv);
    gt_seed(6);
    shapes();
    fusions(257, 4, 2, 128, 257);
    fusions(700, 2, 1, 128, 300);
    fusions(300, 4, 4, 64, 200);
    fusions(65, 2, 2, 16, 40);
    fusions(100, 8, 4, 8, 30);    /* hd 8: padded, the fallback */
    fusions(130, 2, 1, 96, 70);   /* padded */
    fusions(77, 3, 1, 30, 20);    /* rows not 16-byte vectors */
    if (getenv("KN_ATTN_BWD_1PASS") == NULL) { /* the one-pass backward, both orders */
        static const char *const modes[] = {"0", "1"};
        for (int m = 0; m < 2; m++) {
            setenv("KN_ATTN_BWD_1PASS", "1", 1);
            setenv("KN_ATTN_BWD1_MODE", modes[m], 1);
            shapes();
            passes(6000, 16, 8, 128, 3000);
            passes(5000, 8, 8, 64, 5000);
            passes(3000, 8, 2, 96, 40);
            unsetenv("KN_ATTN_BWD_1PASS");
            unsetenv("KN_ATTN_BWD1_MODE");
        }
    }
    if (getenv("KN_ATTN_FWD_V1") == NULL) { /* the first forward kernel too */
        setenv("KN_ATTN_FWD_V1", "1", 1);
        one(300, 4, 4, 64, 200);
        one(257, 4, 2, 128, 257);
        unsetenv("KN_ATTN_FWD_V1");
    }
    if (getenv("KN_ATTN_WGMMA") == NULL) { /* opt-in wgmma kernels */
        variant(NULL, 0);
        variant("KN_ATTN_FWD_WG", 1);
        variant("KN_ATTN_DQ_WG", 1);
        variant("KN_ATTN_DKDV_WG", 1);
        variant("KN_ATTN_WG_NOSWIZZLE", 1);
        env_pair("KN_ATTN_WGMMA", NULL);
        fusions(257, 4, 2, 128, 257);
        env_pair(NULL, NULL);
    }
    if (gt_bench) {
        bench(6, 2048, 32, 32, 128);   /* Llama 2 7B, micro-batch 6 */
        bench(4, 2048, 8, 8, 64);
    }
    return gt_done();
}
