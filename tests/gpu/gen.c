/* gen.c: lora-gen's GPU path against its CPU references.
 *
 * Kernels (random inputs, several shapes, ragged ones included): the fused
 * NF4 and bf16 products against gen_ref_linear on the same bf16-rounded
 * operands (TOL_MMA), the fp32 products (TOL_F32), the cache attention
 * against gen_ref_attention, RoPE + append against llama_rope, RMSNorm,
 * SwiGLU, argmax; and batch independence: a row's result is bit-identical
 * whatever else is in the batch.
 *
 * The whole backend, on ../shared's stories260K:
 *   - f32: greedy from BOS reproduces greedy-from-bos.txt (256 new tokens,
 *     stopping at BOS), with and without CUDA graphs; logits of a prompt and
 *     of ten decoding steps with a random all-linear adapter match
 *     llama_decode within TOL_LOGITS_F32; prompts in flight together give
 *     what they give alone;
 *   - NF4 (golden/s260-nf4-f32: bf16 compute): logits match llama_decode on
 *     the same checkpoint within TOL_LOGITS_BF16; greedy agreement is
 *     reported;
 *   - with tests/golden/gen-s260-peft.json: greedy completions with its
 *     adapter equal transformers + peft's.
 *
 * --bench (after the tests; --bench-only: alone): a Llama 2 7B-shaped NF4 model with random weights built in
 * memory (double quantization, bf16 head), 300-token prompts, 100 new
 * tokens, greedy, batch 1 and 64; prints "#json {...}" lines for
 * bench/gen, and before them the fused product's bandwidth on the 7B
 * shapes, the cache attention, a step's other kernels in a CUDA graph
 * and one prefill layer piece by piece. GEN_BENCH_MICRO=0 skips those,
 * =2 keeps only the step kernels and the prefill pieces, =3 only the
 * step kernels at n = 64 (for ncu); GEN_BENCH_NS=1,64 picks the n of
 * the products and the cache attention, GEN_BENCH_BATCHES=1,64 the
 * whole runs (0: none).
 *
 * RoPE + append + attention in one launch (decoding) is checked against
 * the two launches it replaces, and the prefill's own path (more than 64
 * tokens: dequantized weights, cuBLAS, flash attention) by the logits of
 * a 128-token prompt.
 */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "gpu_test.h"
#include "model7b.h"

#include "../../kernels/gen_gpu.h"
#include "../../kernels/gen_kernels.h"
#include "adapter.h"
#include "gen_ref.h"
#include "generate.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "nf4.h"
#include "sentencepiece.h"
#include "strbuf.h"

#define TOL_MMA 1e-4          /* bf16 operands, fp32 sums in another order */
#define TOL_LOGITS_F32 1e-4   /* fp32 model, sums in another order */
#define TOL_LOGITS_BF16 3e-2  /* bf16 activations and weights vs fp32 */

/* The benches' own CUDA calls (streams, graphs) */
#define CUDA_OK(call)                                                                    \
    do {                                                                                 \
        cudaError_t e_ = (call);                                                         \
        if (e_ != cudaSuccess) {                                                         \
            fprintf(stderr, "gen: %s: %s (%s:%d)\n", #call, cudaGetErrorString(e_),       \
                    __FILE__, __LINE__);                                                 \
            exit(2);                                                                     \
        }                                                                                \
    } while (0)

static const char *shared_dir(void)
{
    const char *s = getenv("SHARED");
    return s && *s ? s : "../shared";
}

/* ---- kernels ---------------------------------------------------------------- */

static void *ws_for(const kn_gen_lin *ops, int nops, int n, size_t *bytes)
{
    *bytes = kn_gen_linear_mma_ws(ops, nops, n);
    void *ws = kn_malloc(*bytes);
    kn_memset(ws, 0, *bytes, 0);
    return ws;
}

static void nf4_to_device(const nf4_weight *w, kn_nf4 *d)
{
    memset(d, 0, sizeof *d);
    d->numel = w->numel;
    d->blocksize = w->blocksize;
    d->nested_blocksize = w->nested_blocksize;
    d->codes = gt_up(w->packed, (size_t)(w->numel + 1) / 2);
    d->quant_map = gt_up(w->quant_map, sizeof w->quant_map);
    if (w->nested) {
        d->absmax_q = gt_up(w->absmax_code, (size_t)w->nblocks);
        d->nested_absmax = gt_up(w->nested_absmax, (size_t)w->nested_nblocks * 4);
        d->nested_map = gt_up(w->nested_map, sizeof w->nested_map);
        d->offset = w->nested_offset;
    } else {
        d->absmax = gt_up(w->absmax, (size_t)w->nblocks * 4);
    }
}

/* A random weight as NF4 (kind NF4) or padded bf16 (kind BF16); *ref gets
 * the values the kernel multiplies with (bf16-rounded). */
static kn_gw make_weight(int kind, int64_t out, int64_t in, int nested, float **ref)
{
    kn_gw g;
    memset(&g, 0, sizeof g);
    g.kind = kind;
    g.out = out;
    g.in = in;
    float *w = gt_rand(out * in, 0.05f);
    *ref = malloc((size_t)(out * in) * sizeof **ref);
    if (kind == KN_GW_NF4) {
        int64_t shape[2] = {out, in};
        nf4_weight q;
        nf4_quantize(w, ST_F32, 2, shape, 64, nested, 1, &q);
        nf4_dequantize(&q, 0, out * in, *ref);
        gt_round_bf16(*ref, out * in);
        nf4_to_device(&q, &g.q);
        nf4_weight_free(&q);
    } else {
        int64_t ld = (in + 63) / 64 * 64;
        float *pad = calloc((size_t)(out * ld), sizeof *pad);
        for (int64_t r = 0; r < out; r++)
            for (int64_t c = 0; c < in; c++) {
                float v = ops_round_bf16(w[r * in + c]);
                pad[r * ld + c] = v;
                (*ref)[r * in + c] = v;
            }
        g.ld = ld;
        g.bf16 = gt_up_bf16(pad, out * ld);
        free(pad);
    }
    free(w);
    return g;
}

static void test_mma(int kind, int nested, int64_t out, int64_t in, int n)
{
    char name[160];
    snprintf(name, sizeof name, "linear_mma %s%s out=%lld in=%lld n=%d",
             kind == KN_GW_NF4 ? "nf4" : "bf16", nested ? " nested" : "", (long long)out,
             (long long)in, n);
    float *wref;
    kn_gw w = make_weight(kind, out, in, nested, &wref);
    float *x = gt_rand((int64_t)n * in, 1.0f);
    gt_round_bf16(x, (int64_t)n * in);
    float *res = gt_rand((int64_t)n * out, 1.0f);
    kn_bf16 *dx = gt_up_bf16(x, (int64_t)n * in);
    float *dy = gt_up_f32(res, (int64_t)n * out);
    kn_gen_lin op = {w, dy, dy, out};
    size_t wsb;
    void *ws = ws_for(&op, 1, n, &wsb);
    kn_gen_linear_mma(&op, 1, dx, in, n, ws, wsb, 0);
    float *got = gt_down_f32(dy, (int64_t)n * out);
    float *ref = malloc((size_t)(n * out) * sizeof *ref);
    gen_ref_linear(ref, res, out, x, in, wref, out, in, n, 1.0f);
    gt_compare(name, got, ref, (int64_t)n * out, TOL_MMA, "TOL_MMA");
    /* batch independence: row 0 alone gives the same bits */
    if (n > 1) {
        float *y1 = gt_up_f32(res, out);
        kn_gen_lin op1 = {w, y1, y1, out};
        kn_gen_linear_mma(&op1, 1, dx, in, 1, ws, wsb, 0);
        float *g1 = gt_down_f32(y1, out);
        snprintf(name, sizeof name, "linear_mma %s out=%lld in=%lld: row 0 alone == in a batch of %d",
                 kind == KN_GW_NF4 ? "nf4" : "bf16", (long long)out, (long long)in, n);
        gt_check(memcmp(g1, got, (size_t)out * 4) == 0, name);
        free(g1);
        kn_free(y1);
    }
    free(wref); free(x); free(res); free(got); free(ref);
    kn_free(dx); kn_free(dy); kn_free(ws);
}

/* Whether the product of w with the first n rows of x (dx, residual res)
 * gives the bits of `all` (the n = 64 launch); ws: with a workspace. */
static int rows_same(kn_gw w, const float *res, const kn_bf16 *dx, int64_t in, int64_t out, int n,
                     int ws, const float *all)
{
    float *y = gt_up_f32(res, (int64_t)n * out);
    kn_gen_lin o1 = {w, y, y, out};
    size_t b1 = 0;
    void *w1 = ws ? ws_for(&o1, 1, n, &b1) : NULL;
    kn_gen_linear_mma(&o1, 1, dx, in, n, w1, b1, 0);
    float *got = gt_down_f32(y, (int64_t)n * out);
    int same = memcmp(got, all, (size_t)(n * out) * 4) == 0;
    free(got);
    kn_free(y);
    kn_free(w1);
    return same;
}

/* One weight, n = 64 rows of x, then the first n' rows alone for n' over
 * every kernel variant (lin_vec with x in shared memory or in registers,
 * one or two n-tiles; lin_tile with 4 or 8 n-tiles, split over 1, 2, 4
 * or 8 class groups; lin_wg for n > 32, split likewise, when run with
 * QLORA_GEN_WG=1 on an H100): each row's bits must not change. The n = 64 result is
 * checked against the CPU too. */
static void test_mma_batches(int kind, int nested, int64_t out, int64_t in)
{
    enum { N = 64 };
    float *wref;
    kn_gw w = make_weight(kind, out, in, nested, &wref);
    float *x = gt_rand((int64_t)N * in, 1.0f);
    gt_round_bf16(x, (int64_t)N * in);
    float *res = gt_rand((int64_t)N * out, 1.0f);
    kn_bf16 *dx = gt_up_bf16(x, (int64_t)N * in);
    float *dy = gt_up_f32(res, (int64_t)N * out);
    kn_gen_lin op = {w, dy, dy, out};
    size_t wsb;
    void *ws = ws_for(&op, 1, N, &wsb);
    kn_gen_linear_mma(&op, 1, dx, in, N, ws, wsb, 0);
    float *all = gt_down_f32(dy, (int64_t)N * out);
    float *ref = malloc((size_t)(N * out) * sizeof *ref);
    gen_ref_linear(ref, res, out, x, in, wref, out, in, N, 1.0f);
    char name[200];
    snprintf(name, sizeof name, "linear_mma %s%s out=%lld in=%lld n=64", kind == KN_GW_NF4 ? "nf4" : "bf16",
             nested ? " nested" : "", (long long)out, (long long)in);
    gt_compare(name, all, ref, (int64_t)N * out, TOL_MMA, "TOL_MMA");
    static const int ns[] = {1, 2, 3, 8, 9, 16, 17, 31, 33, 63};
    int same = 1;
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++)
        if (!rows_same(w, res, dx, in, out, ns[k], 1, all)) {
            same = 0;
            printf("#   n=%d: rows differ from the n=64 launch\n", ns[k]);
        }
    /* without a workspace: lin_tile does not split */
    if (!rows_same(w, res, dx, in, out, N, 0, all)) {
        same = 0;
        printf("#   n=64 without workspace (no split) differs\n");
    }
    /* lin_tile and lin_wg (QLORA_GEN_WG=1 on compute capability 9.0)
     * split over 1, 2, 4 and 8 class groups: the same bits */
    for (int S = 1; S <= 8; S *= 2) {
        char sv[4];
        snprintf(sv, sizeof sv, "%d", S);
        setenv("QLORA_GEN_WG_S", sv, 1);
        setenv("QLORA_GEN_TILE_S", sv, 1);
        for (int n = 17; n <= N; n += N - 17)
            if (!rows_same(w, res, dx, in, out, n, 1, all)) {
                same = 0;
                printf("#   n=%d split over %d class groups differs\n", n, S);
            }
    }
    unsetenv("QLORA_GEN_WG_S");
    unsetenv("QLORA_GEN_TILE_S");
    snprintf(name, sizeof name, "linear_mma %s out=%lld in=%lld: rows bit-identical for n = 1 .. 64 "
             "(every kernel)", kind == KN_GW_NF4 ? "nf4" : "bf16", (long long)out, (long long)in);
    gt_check(same, name);
    free(wref); free(x); free(res); free(all); free(ref);
    kn_free(dx); kn_free(dy); kn_free(ws);
}

/* Split products of two shapes sharing one workspace, as a step's do: the
 * first again gives the same bits (the counters of one launch must
 * survive the partial sums of the other). */
static void test_mma_shared_ws(void)
{
    int n = 40;
    int64_t in = 512, outs[2] = {300, 1000};
    float *wref[2];
    kn_gen_lin op[2];
    float *x = gt_rand((int64_t)n * in, 1.0f);
    gt_round_bf16(x, (int64_t)n * in);
    kn_bf16 *dx = gt_up_bf16(x, (int64_t)n * in);
    size_t wsb = 0;
    for (int i = 0; i < 2; i++) {
        op[i].w = make_weight(KN_GW_NF4, outs[i], in, 1, &wref[i]);
        op[i].y = gt_dev((size_t)n * outs[i] * 4);
        op[i].res = NULL;
        op[i].ldy = outs[i];
        size_t b = kn_gen_linear_mma_ws(&op[i], 1, n);
        wsb = b > wsb ? b : wsb;
    }
    void *ws = kn_malloc(wsb ? wsb : 16);
    kn_memset(ws, 0, wsb ? wsb : 16, 0);
    kn_gen_linear_mma(&op[0], 1, dx, in, n, ws, wsb, 0);
    float *first = gt_down_f32(op[0].y, (int64_t)n * outs[0]);
    kn_gen_linear_mma(&op[1], 1, dx, in, n, ws, wsb, 0);
    kn_gen_linear_mma(&op[0], 1, dx, in, n, ws, wsb, 0);
    float *again = gt_down_f32(op[0].y, (int64_t)n * outs[0]);
    float *ref = malloc((size_t)n * outs[1] * 4), *got = gt_down_f32(op[1].y, (int64_t)n * outs[1]);
    gen_ref_linear(ref, NULL, outs[1], x, in, wref[1], outs[1], in, n, 1.0f);
    gt_compare("linear_mma split, second shape in a shared workspace", got, ref, (int64_t)n * outs[1],
               TOL_MMA, "TOL_MMA");
    gt_check(memcmp(first, again, (size_t)n * outs[0] * 4) == 0,
             "linear_mma split: same bits after another shape used the workspace");
    free(first); free(again); free(ref); free(got); free(x);
    for (int i = 0; i < 2; i++) {
        free(wref[i]);
        kn_free(op[i].y);
    }
    kn_free(dx);
    kn_free(ws);
}

/* q/k/v in one launch (different outs), no residual */
static void test_mma_group(int n)
{
    int64_t in = 256, outs[3] = {256, 64, 64};
    float *wref[3];
    kn_gen_lin ops[3];
    float *x = gt_rand(n * in, 1.0f);
    gt_round_bf16(x, n * in);
    kn_bf16 *dx = gt_up_bf16(x, n * in);
    for (int i = 0; i < 3; i++) {
        ops[i].w = make_weight(KN_GW_NF4, outs[i], in, 1, &wref[i]);
        ops[i].y = gt_dev((size_t)(n * outs[i]) * 4);
        ops[i].res = NULL;
        ops[i].ldy = outs[i];
    }
    size_t wsb;
    void *ws = ws_for(ops, 3, n, &wsb);
    kn_gen_linear_mma(ops, 3, dx, in, n, ws, wsb, 0);
    for (int i = 0; i < 3; i++) {
        float *got = gt_down_f32(ops[i].y, n * outs[i]);
        float *ref = malloc((size_t)(n * outs[i]) * 4);
        gen_ref_linear(ref, NULL, outs[i], x, in, wref[i], outs[i], in, n, 1.0f);
        char name[80];
        snprintf(name, sizeof name, "linear_mma grouped op %d (out %lld) n=%d", i, (long long)outs[i],
                 n);
        gt_compare(name, got, ref, n * outs[i], TOL_MMA, "TOL_MMA");
        free(got); free(ref); free(wref[i]);
        kn_free(ops[i].y);
    }
    free(x);
    kn_free(dx);
    kn_free(ws);
}

static void test_f32(int64_t out, int64_t in, int n, int x_bf16)
{
    float *w = gt_rand(out * in, 0.1f), *x = gt_rand(n * in, 1.0f), *res = gt_rand(n * out, 1.0f);
    if (x_bf16)
        gt_round_bf16(x, n * in);
    float *dw = gt_up_f32(w, out * in), *dy = gt_up_f32(res, n * out);
    void *dx = x_bf16 ? (void *)gt_up_bf16(x, n * in) : (void *)gt_up_f32(x, n * in);
    kn_gen_linear_f32(dy, dy, out, x_bf16 ? NULL : dx, x_bf16 ? dx : NULL, in, dw, out, in, n,
                      0.5f, 0);
    float *got = gt_down_f32(dy, n * out), *ref = malloc((size_t)(n * out) * 4);
    gen_ref_linear(ref, res, out, x, in, w, out, in, n, 0.5f);
    char name[120];
    snprintf(name, sizeof name, "linear_f32 out=%lld in=%lld n=%d x %s", (long long)out,
             (long long)in, n, x_bf16 ? "bf16" : "f32");
    gt_compare(name, got, ref, n * out, TOL_F32, "TOL_F32");
    free(w); free(x); free(res); free(got); free(ref);
    kn_free(dw); kn_free(dy); kn_free(dx);
}

static void test_attention(int nh, int nkv, int hd, int cap, int bf)
{
    int slots = 3, n = 5, kvd = nkv * hd;
    int32_t slot[5] = {2, 0, 1, 2, 0}, pos[5] = {0, cap - 1, cap / 2, 7 % cap, 1 % cap};
    int64_t csz = (int64_t)slots * cap * kvd;
    float *kc = gt_rand(csz, 1.0f), *vc = gt_rand(csz, 1.0f), *q = gt_rand(n * nh * hd, 1.0f);
    if (bf) {
        gt_round_bf16(kc, csz);
        gt_round_bf16(vc, csz);
    }
    void *dk = bf ? (void *)gt_up_bf16(kc, csz) : (void *)gt_up_f32(kc, csz);
    void *dv = bf ? (void *)gt_up_bf16(vc, csz) : (void *)gt_up_f32(vc, csz);
    float *dq = gt_up_f32(q, n * nh * hd);
    int32_t *ds = gt_up(slot, sizeof slot), *dp = gt_up(pos, sizeof pos);
    float *o32 = gt_dev((size_t)n * nh * hd * 4);
    kn_bf16 *o16 = gt_dev((size_t)n * nh * hd * 2);
    float *ws = kn_malloc(kn_gen_attention_ws(n, nh, hd, cap));
    kn_gen_attention(o32, o16, dq, nh * hd, dk, dv, bf, ds, dp, n, nh, nkv, hd, cap, ws, 0);
    float *got = gt_down_f32(o32, n * nh * hd), *got16 = gt_down_bf16(o16, n * nh * hd);
    /* token 1 alone: the same bits */
    {
        float *o1 = gt_dev((size_t)nh * hd * 4);
        kn_gen_attention(o1, NULL, dq + nh * hd, nh * hd, dk, dv, bf, ds + 1, dp + 1, 1, nh, nkv,
                         hd, cap, ws, 0);
        float *g1 = gt_down_f32(o1, nh * hd);
        char nm[120];
        snprintf(nm, sizeof nm, "attention nh=%d hd=%d cap=%d: token alone == in a batch of %d", nh,
                 hd, cap, n);
        gt_check(memcmp(g1, got + nh * hd, (size_t)nh * hd * 4) == 0, nm);
        free(g1);
        kn_free(o1);
    }
    kn_free(ws);
    float *ref = malloc((size_t)n * nh * hd * 4);
    for (int t = 0; t < n; t++)
        gen_ref_attention(ref + (int64_t)t * nh * hd, q + (int64_t)t * nh * hd,
                          kc + (int64_t)slot[t] * cap * kvd, vc + (int64_t)slot[t] * cap * kvd,
                          pos[t], nh, nkv, hd);
    char name[120];
    snprintf(name, sizeof name, "attention nh=%d nkv=%d hd=%d cap=%d cache %s", nh, nkv, hd, cap,
             bf ? "bf16" : "f32");
    gt_compare(name, got, ref, n * nh * hd, TOL_F32, "TOL_F32");
    snprintf(name, sizeof name, "attention bf16 output nh=%d hd=%d", nh, hd);
    gt_compare(name, got16, ref, n * nh * hd, TOL_BF16_OUT, "TOL_BF16_OUT");
    free(kc); free(vc); free(q); free(got); free(got16); free(ref);
    kn_free(dk); kn_free(dv); kn_free(dq); kn_free(ds); kn_free(dp); kn_free(o32); kn_free(o16);
}

static void test_rope_append(int nh, int nkv, int hd, int bf)
{
    int slots = 2, cap = 40, n = 3, kvd = nkv * hd, half = hd / 2;
    int32_t slot[3] = {1, 0, 1}, pos[3] = {0, 39, 17};
    float theta = 10000.0f;
    float *q = gt_rand(n * nh * hd, 1.0f), *k = gt_rand(n * kvd, 1.0f), *v = gt_rand(n * kvd, 1.0f);
    float *ct = malloc((size_t)cap * half * 4), *st = malloc((size_t)cap * half * 4);
    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        for (int p = 0; p < cap; p++) {
            ct[p * half + i] = cosf((float)p * inv);
            st[p * half + i] = sinf((float)p * inv);
        }
    }
    float *dq = gt_up_f32(q, n * nh * hd), *dk = gt_up_f32(k, n * kvd), *dv = gt_up_f32(v, n * kvd);
    float *dct = gt_up_f32(ct, cap * half), *dst = gt_up_f32(st, cap * half);
    size_t es = bf ? 2 : 4;
    void *kc = gt_dev((size_t)slots * cap * kvd * es), *vc = gt_dev((size_t)slots * cap * kvd * es);
    int32_t *ds = gt_up(slot, sizeof slot), *dp = gt_up(pos, sizeof pos);
    kn_gen_rope_append(dq, nh * hd, dk, kvd, dv, kvd, kc, vc, bf, ds, dp, n, nh, nkv, hd, cap,
                       dct, dst, NULL, NULL, NULL, 0);
    float *gq = gt_down_f32(dq, n * nh * hd);
    /* again with bf16 copies asked for (a prefill's call), into other
     * caches: q and k stay as they were, the caches get the same bits */
    float *dq2 = gt_up_f32(q, n * nh * hd), *dk2 = gt_up_f32(k, n * kvd);
    void *kc2 = gt_dev((size_t)slots * cap * kvd * es), *vc2 = gt_dev((size_t)slots * cap * kvd * es);
    kn_bf16 *q16 = gt_dev((size_t)n * nh * hd * 2), *k16 = gt_dev((size_t)n * kvd * 2);
    kn_bf16 *v16 = gt_dev((size_t)n * kvd * 2);
    kn_gen_rope_append(dq2, nh * hd, dk2, kvd, dv, kvd, kc2, vc2, bf, ds, dp, n, nh, nkv, hd, cap,
                       dct, dst, q16, k16, v16, 0);
    float *gq2 = gt_down_f32(dq2, n * nh * hd), *gk2 = gt_down_f32(dk2, n * kvd);
    gt_check(memcmp(gq2, q, (size_t)n * nh * hd * 4) == 0 && memcmp(gk2, k, (size_t)n * kvd * 4) == 0,
             "rope_append with bf16 copies leaves q and k as they were");
    const int64_t cbytes = (int64_t)slots * cap * kvd * (int64_t)es;
    void *hk = malloc((size_t)cbytes), *hk2 = malloc((size_t)cbytes), *hv = malloc((size_t)cbytes),
         *hv2 = malloc((size_t)cbytes);
    kn_memcpy_d2h(hk, kc, (size_t)cbytes, 0);
    kn_memcpy_d2h(hk2, kc2, (size_t)cbytes, 0);
    kn_memcpy_d2h(hv, vc, (size_t)cbytes, 0);
    kn_memcpy_d2h(hv2, vc2, (size_t)cbytes, 0);
    gt_check(memcmp(hk, hk2, (size_t)cbytes) == 0 && memcmp(hv, hv2, (size_t)cbytes) == 0,
             "rope_append caches the same with and without bf16 copies");
    for (int t = 0; t < n; t++) {
        for (int h = 0; h < nh; h++)
            llama_rope(q + (t * nh + h) * hd, hd, pos[t], theta, 0);
        for (int h = 0; h < nkv; h++)
            llama_rope(k + (t * kvd + h * hd), hd, pos[t], theta, 0);
    }
    char name[120];
    snprintf(name, sizeof name, "rope_append q nh=%d hd=%d (llama_rope)", nh, hd);
    gt_compare(name, gq, q, n * nh * hd, TOL_F32, "TOL_F32");
    float *gk = malloc((size_t)n * kvd * 4), *gv = malloc((size_t)n * kvd * 4);
    float *kall = bf ? gt_down_bf16(kc, (int64_t)slots * cap * kvd)
                     : gt_down_f32(kc, (int64_t)slots * cap * kvd);
    float *vall = bf ? gt_down_bf16(vc, (int64_t)slots * cap * kvd)
                     : gt_down_f32(vc, (int64_t)slots * cap * kvd);
    for (int t = 0; t < n; t++) {
        memcpy(gk + t * kvd, kall + ((int64_t)slot[t] * cap + pos[t]) * kvd, (size_t)kvd * 4);
        memcpy(gv + t * kvd, vall + ((int64_t)slot[t] * cap + pos[t]) * kvd, (size_t)kvd * 4);
    }
    snprintf(name, sizeof name, "rope_append cache k nkv=%d hd=%d %s", nkv, hd, bf ? "bf16" : "f32");
    gt_compare(name, gk, k, n * kvd, bf ? TOL_BF16_OUT : TOL_F32, bf ? "TOL_BF16_OUT" : "TOL_F32");
    snprintf(name, sizeof name, "rope_append cache v nkv=%d hd=%d %s", nkv, hd, bf ? "bf16" : "f32");
    gt_compare(name, gv, v, n * kvd, bf ? TOL_BF16_OUT : TOL_F32, bf ? "TOL_BF16_OUT" : "TOL_F32");
    float *g16 = gt_down_bf16(q16, n * nh * hd);
    gt_compare("rope_append q bf16 copy", g16, q, n * nh * hd, TOL_BF16_OUT, "TOL_BF16_OUT");
    float *gk16 = gt_down_bf16(k16, n * kvd), *gv16 = gt_down_bf16(v16, n * kvd);
    gt_compare("rope_append k bf16 copy", gk16, k, n * kvd, TOL_BF16_OUT, "TOL_BF16_OUT");
    gt_compare("rope_append v bf16 copy", gv16, v, n * kvd, TOL_BF16_OUT, "TOL_BF16_OUT");
    free(q); free(k); free(v); free(ct); free(st); free(gq); free(gk); free(gv); free(kall);
    free(vall); free(g16); free(gk16); free(gv16); free(gq2); free(gk2);
    free(hk); free(hk2); free(hv); free(hv2);
    kn_free(dq); kn_free(dk); kn_free(dv); kn_free(dct); kn_free(dst); kn_free(kc); kn_free(vc);
    kn_free(ds); kn_free(dp); kn_free(q16); kn_free(k16); kn_free(v16); kn_free(dq2);
    kn_free(dk2); kn_free(kc2); kn_free(vc2);
}

/* RoPE + append + attention in one launch (decoding) against the two
 * launches it replaces: the caches it writes equal rope_append's bit for
 * bit, its output matches gen_ref_attention over those caches (q rotated
 * by rope_append), a token alone gives the bits it gives in the batch, and
 * q, k, v are read through row strides (one q/k/v row, as the backend
 * keeps them). Positions at split edges (0, 63, 64, cap - 1). */
static void test_rope_attention(int nh, int nkv, int hd, int cap, int n)
{
    int slots = n + 2, kvd = nkv * hd, qd = nh * hd, half = hd / 2, ld = qd + 2 * kvd;
    int32_t *slot = malloc((size_t)n * 4), *pos = malloc((size_t)n * 4);
    static const int edge[6] = {0, 63, 64, -1, 1, 127};
    for (int t = 0; t < n; t++) {
        slot[t] = slots - 1 - t; /* distinct, in reverse */
        int e = t < 6 ? edge[t] : (int)(gt_u64() % (uint64_t)cap);
        pos[t] = e < 0 ? cap - 1 : e % cap;
    }
    int64_t csz = (int64_t)slots * cap * kvd;
    float *kc = gt_rand(csz, 1.0f), *vc = gt_rand(csz, 1.0f);
    gt_round_bf16(kc, csz);
    gt_round_bf16(vc, csz);
    float *qkv = gt_rand((int64_t)n * ld, 1.0f);
    float *ct = malloc((size_t)cap * half * 4), *st = malloc((size_t)cap * half * 4);
    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf(10000.0f, (float)(2 * i) / (float)hd);
        for (int p = 0; p < cap; p++) {
            ct[p * half + i] = cosf((float)p * inv);
            st[p * half + i] = sinf((float)p * inv);
        }
    }
    float *dct = gt_up_f32(ct, cap * half), *dst = gt_up_f32(st, cap * half);
    int32_t *ds = gt_up(slot, (size_t)n * 4), *dp = gt_up(pos, (size_t)n * 4);
    /* the fused launch */
    kn_bf16 *k1 = gt_up_bf16(kc, csz), *v1 = gt_up_bf16(vc, csz);
    float *dqkv = gt_up_f32(qkv, (int64_t)n * ld);
    size_t wsb = kn_gen_rope_attention_ws(n, nh, hd, cap);
    float *ws = kn_malloc(wsb);
    kn_memset(ws, 0, wsb, 0);
    float *o32 = gt_dev((size_t)n * qd * 4);
    kn_bf16 *o16 = gt_dev((size_t)n * qd * 2);
    kn_gen_rope_attention(o32, o16, dqkv, ld, dqkv + qd, ld, dqkv + qd + kvd, ld, k1, v1, ds, dp,
                          n, nh, nkv, hd, cap, dct, dst, ws, 0);
    float *got = gt_down_f32(o32, (int64_t)n * qd), *got16 = gt_down_bf16(o16, (int64_t)n * qd);
    float *gk = gt_down_bf16(k1, csz), *gv = gt_down_bf16(v1, csz);
    /* the same token alone, twice (the counters were left at zero) */
    int t1 = n > 1 ? 1 : 0, same = 1;
    for (int rep = 0; rep < 2; rep++) {
        float *a = gt_dev((size_t)qd * 4);
        kn_gen_rope_attention(a, NULL, dqkv + (int64_t)t1 * ld, ld, dqkv + (int64_t)t1 * ld + qd,
                              ld, dqkv + (int64_t)t1 * ld + qd + kvd, ld, k1, v1, ds + t1,
                              dp + t1, 1, nh, nkv, hd, cap, dct, dst, ws, 0);
        float *ga = gt_down_f32(a, qd);
        same &= memcmp(ga, got + (int64_t)t1 * qd, (size_t)qd * 4) == 0;
        free(ga);
        kn_free(a);
    }
    char name[160];
    snprintf(name, sizeof name, "rope_attention nh=%d nkv=%d hd=%d cap=%d: token alone == in a "
             "batch of %d (twice)", nh, nkv, hd, cap, n);
    gt_check(same, name);
    /* the two launches it replaces */
    kn_bf16 *k2 = gt_up_bf16(kc, csz), *v2 = gt_up_bf16(vc, csz);
    float *dq2 = gt_up_f32(qkv, (int64_t)n * ld);
    kn_gen_rope_append(dq2, ld, dq2 + qd, ld, dq2 + qd + kvd, ld, k2, v2, 1, ds, dp, n, nh, nkv,
                       hd, cap, dct, dst, NULL, NULL, NULL, 0);
    float *rk = gt_down_bf16(k2, csz), *rv = gt_down_bf16(v2, csz);
    snprintf(name, sizeof name, "rope_attention hd=%d: caches == rope_append's", hd);
    gt_check(memcmp(gk, rk, (size_t)csz * 4) == 0 && memcmp(gv, rv, (size_t)csz * 4) == 0, name);
    float *qr = gt_down_f32(dq2, (int64_t)n * ld);
    float *ref = malloc((size_t)n * qd * 4);
    for (int t = 0; t < n; t++)
        gen_ref_attention(ref + (int64_t)t * qd, qr + (int64_t)t * ld,
                          rk + (int64_t)slot[t] * cap * kvd, rv + (int64_t)slot[t] * cap * kvd,
                          pos[t], nh, nkv, hd);
    snprintf(name, sizeof name, "rope_attention nh=%d nkv=%d hd=%d cap=%d n=%d vs "
             "gen_ref_attention", nh, nkv, hd, cap, n);
    gt_compare(name, got, ref, (int64_t)n * qd, TOL_F32, "TOL_F32");
    snprintf(name, sizeof name, "rope_attention hd=%d bf16 output", hd);
    gt_compare(name, got16, ref, (int64_t)n * qd, TOL_BF16_OUT, "TOL_BF16_OUT");
    free(slot); free(pos); free(kc); free(vc); free(qkv); free(ct); free(st); free(got);
    free(got16); free(gk); free(gv); free(rk); free(rv); free(qr); free(ref);
    kn_free(dct); kn_free(dst); kn_free(ds); kn_free(dp); kn_free(k1); kn_free(v1);
    kn_free(dqkv); kn_free(ws); kn_free(o32); kn_free(o16); kn_free(k2); kn_free(v2);
    kn_free(dq2);
}

/* RMSNorm at the sizes of each kernel variant (d % 4 == 0 up to 8192 in
 * registers, others in the loop kernel), rows picked. */
static void test_rmsnorm(int n, int d, int bf)
{
    float *x = gt_rand((int64_t)n * d, 2.0f), *w = gt_rand(d, 1.0f);
    float *dx = gt_up_f32(x, (int64_t)n * d), *dw = gt_up_f32(w, d);
    int32_t *rows = malloc((size_t)n * 4);
    for (int r = 0; r < n; r++)
        rows[r] = n - 1 - r;
    int32_t *dr = gt_up(rows, (size_t)n * 4);
    float *y = gt_dev((size_t)n * d * 4);
    kn_bf16 *y16 = bf ? gt_dev((size_t)n * d * 2) : NULL;
    kn_gen_rmsnorm(y, y16, dx, dr, dw, n, d, 1e-5f, 0);
    float *got = gt_down_f32(y, (int64_t)n * d), *ref = malloc((size_t)n * d * 4);
    for (int r = 0; r < n; r++)
        llama_rmsnorm(ref + (int64_t)r * d, NULL, x + (int64_t)rows[r] * d, w, 1, d, 1e-5f);
    char name[120];
    snprintf(name, sizeof name, "rmsnorm n=%d d=%d vs llama_rmsnorm", n, d);
    gt_compare(name, got, ref, (int64_t)n * d, TOL_F32, "TOL_F32");
    if (bf) {
        float *g16 = gt_down_bf16(y16, (int64_t)n * d);
        snprintf(name, sizeof name, "rmsnorm n=%d d=%d bf16 output", n, d);
        gt_compare(name, g16, ref, (int64_t)n * d, TOL_BF16_OUT, "TOL_BF16_OUT");
        free(g16);
        kn_free(y16);
    }
    free(x); free(w); free(rows); free(got); free(ref);
    kn_free(dx); kn_free(dw); kn_free(dr); kn_free(y);
}

static void test_elementwise(void)
{
    int n = 7, d = 172;
    float *x = gt_rand(n * d, 2.0f), *w = gt_rand(d, 1.0f);
    float *dx = gt_up_f32(x, n * d), *dw = gt_up_f32(w, d);
    int32_t rows[3] = {6, 0, 3};
    int32_t *dr = gt_up(rows, sizeof rows);
    float *y = gt_dev((size_t)3 * d * 4);
    kn_gen_rmsnorm(y, NULL, dx, dr, dw, 3, d, 1e-5f, 0);
    float *got = gt_down_f32(y, 3 * d), *ref = malloc((size_t)3 * d * 4);
    for (int r = 0; r < 3; r++)
        llama_rmsnorm(ref + r * d, NULL, x + rows[r] * d, w, 1, d, 1e-5f);
    gt_compare("rmsnorm (rows picked) vs llama_rmsnorm", got, ref, 3 * d, TOL_F32, "TOL_F32");
    free(got); free(ref);
    float *u = gt_rand(n * d, 2.0f);
    float *du = gt_up_f32(u, n * d), *h = gt_dev((size_t)n * d * 4);
    kn_gen_swiglu(h, NULL, dx, du, d, n, d, 0);
    got = gt_down_f32(h, n * d);
    ref = malloc((size_t)n * d * 4);
    for (int i = 0; i < n * d; i++)
        ref[i] = x[i] / (1.0f + expf(-x[i])) * u[i];
    gt_compare("swiglu", got, ref, n * d, TOL_F32, "TOL_F32");
    free(got); free(ref);
    /* argmax with ties and a limit */
    int V = 5000, m = 3;
    float *lg = gt_rand(V * m, 1.0f);
    lg[1 * V + 10] = 9.0f;
    lg[1 * V + 20] = 9.0f;
    lg[2 * V + 4999] = 50.0f; /* beyond the limit */
    lg[2 * V + 3] = 8.0f;
    float *dl = gt_up_f32(lg, V * m);
    int32_t *da = gt_dev(m * 4), ga[3];
    kn_gen_argmax(da, dl, V, V - 1, m, 0);
    kn_memcpy_d2h(ga, da, sizeof ga, 0);
    int okk = 1;
    for (int r = 0; r < m; r++)
        okk &= ga[r] == gen_argmax(lg + r * V, V - 1);
    gt_check(okk && ga[1] == 10 && ga[2] == 3, "argmax: first of ties, limit respected");
    free(x); free(w); free(u); free(lg);
    kn_free(dx); kn_free(dw); kn_free(dr); kn_free(y); kn_free(du); kn_free(h); kn_free(dl);
    kn_free(da);
}

/* ---- the backend on stories260K ------------------------------------------------ */

typedef struct collect {
    int32_t **ids;
    int32_t *n;
} collect;

static int collect_emit(void *ctx, const gen_result *r)
{
    collect *c = ctx;
    c->ids[r->index] = malloc((size_t)(r->n ? r->n : 1) * 4);
    memcpy(c->ids[r->index], r->ids, (size_t)r->n * 4);
    c->n[r->index] = r->n;
    return 0;
}

static void collect_free(collect *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(c->ids[i]);
    free(c->ids);
    free(c->n);
}

/* Runs gen_run on a fresh backend (GPU when gpu, else CPU). */
static int run_gen(const llama_model *m, const lora_adapter *a, int gpu, int slots,
                   const gen_params *p, const gen_prompt *pr, size_t n, collect *out)
{
    int32_t maxlen = 0;
    for (size_t i = 0; i < n; i++)
        if (pr[i].n > maxlen)
            maxlen = pr[i].n;
    int32_t cap = maxlen + p->max_new;
    if (cap > m->cfg.max_pos)
        cap = m->cfg.max_pos;
    gen_backend be;
    int rc = gpu ? gen_gpu_backend(m, a, slots, cap, &be) : gen_cpu_backend(m, a, slots, cap, &be);
    if (rc != 0)
        return -1;
    out->ids = calloc(n, sizeof *out->ids);
    out->n = calloc(n, sizeof *out->n);
    rc = gen_run(&be, p, pr, n, m->cfg.max_pos, collect_emit, out, NULL);
    be.free(be.ctx);
    return rc;
}

static int same_outputs(const collect *a, const collect *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a->n[i] != b->n[i] || memcmp(a->ids[i], b->ids[i], (size_t)a->n[i] * 4))
            return 0;
    return 1;
}

static void test_greedy_bos(const llama_model *m, const char *label)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K/greedy-from-bos.txt", shared_dir());
    char *want;
    size_t wlen;
    if (io_read_file(path, &want, &wlen) != 0) {
        printf("skip greedy from BOS: %s\n", path);
        return;
    }
    snprintf(path, sizeof path, "%s/models/stories260K/tokenizer.model", shared_dir());
    sp_model *sp = sp_model_load(path);
    gen_params p;
    gen_params_default(&p);
    p.max_new = 256;
    int32_t bos = 1, stop = 1;
    p.stop_ids = &stop;
    p.n_stop_ids = 1;
    gen_prompt pr = {&bos, 1};
    for (int graphs = 1; graphs >= 0; graphs--) {
        if (!graphs)
            setenv("QLORA_GEN_NO_GRAPHS", "1", 1);
        collect c;
        int rc = run_gen(m, NULL, 1, 4, &p, &pr, 1, &c);
        strbuf sb = STRBUF_INIT;
        if (rc == 0 && sp)
            sp_decode(sp, (const uint32_t *)c.ids[0], (size_t)c.n[0], &sb);
        sb_putc(&sb, '\n');
        char name[160];
        snprintf(name, sizeof name, "%s GPU greedy from BOS == greedy-from-bos.txt (%s graphs)",
                 label, graphs ? "with" : "without");
        gt_check(rc == 0 && sb.len == wlen && memcmp(sb.buf, want, wlen) == 0, name);
        if (!(sb.len == wlen && memcmp(sb.buf, want, wlen) == 0))
            printf("#   got: %.200s\n", sb_str(&sb));
        sb_free(&sb);
        if (rc == 0)
            collect_free(&c, 1);
    }
    unsetenv("QLORA_GEN_NO_GRAPHS");
    sp_model_free(sp);
    free(want);
}

/* Logits of a prompt and of `steps` greedy steps on GPU and CPU; the CPU's
 * choices are fed to both. */
static void test_logits_len(const llama_model *m, const lora_adapter *a, double tol,
                            const char *tol_name, const char *label, int plen)
{
    int32_t prompt[128];
    for (int i = 0; i < plen; i++)
        prompt[i] = i == 0 ? 1 : 3 + (int32_t)(gt_u64() % (uint64_t)(m->cfg.vocab - 3));
    int V = m->cfg.vocab, steps = 10, cap = plen + 44;
    gen_backend be;
    if (gen_gpu_backend(m, a, 2, cap, &be) != 0) {
        gt_check(0, "gen_gpu_backend");
        return;
    }
    llama_kv_cache *kc = llama_kv_cache_new(m, cap);
    float *lc = malloc((size_t)V * 4), *lg = malloc((size_t)V * 2 * 4);
    int32_t slot = 1, len = plen;
    int ok = be.prefill(be.ctx, 1, &slot, prompt, &len, V, lg, NULL) == 0 &&
             llama_decode(m, a, kc, prompt, plen, lc) == 0;
    double worst = gt_rel_err(lg, lc, V);
    for (int s = 0; ok && s < steps; s++) {
        int32_t t = gen_argmax(lc, V);
        ok = be.decode(be.ctx, 1, &slot, &t, V, lg, NULL) == 0 &&
             llama_decode(m, a, kc, &t, 1, lc) == 0;
        double e = gt_rel_err(lg, lc, V);
        if (e > worst)
            worst = e;
    }
    char name[200];
    snprintf(name, sizeof name, "%s: GPU logits of prefill (%d tokens) + %d steps vs llama_decode "
             "(worst rel err %.2e <= %s %.0e)", label, plen, steps, worst, tol_name, tol);
    gt_check(ok && worst <= tol, name);
    free(lc);
    free(lg);
    llama_kv_cache_free(kc);
    be.free(be.ctx);
}

/* 20 tokens: a prefill through the decoding kernels (n <= 64) */
static void test_logits(const llama_model *m, const lora_adapter *a, double tol,
                        const char *tol_name, const char *label)
{
    test_logits_len(m, a, tol, tol_name, label, 20);
}

static void test_batching(const llama_model *m, const lora_adapter *a, int exact,
                          const char *label)
{
    enum { NP = 6 };
    int32_t store[NP][24];
    gen_prompt pr[NP];
    for (int i = 0; i < NP; i++) {
        int len = 3 + 3 * i;
        store[i][0] = 1;
        for (int j = 1; j < len; j++)
            store[i][j] = 3 + (int32_t)(gt_u64() % 400);
        pr[i].ids = store[i];
        pr[i].n = len;
    }
    gen_params p;
    gen_params_default(&p);
    p.max_new = 12 + 0;
    p.eos_id = 2;
    collect one, many, cpu;
    int rc = run_gen(m, a, 1, 1, &p, pr, NP, &one);
    rc |= run_gen(m, a, 1, 4, &p, pr, NP, &many);
    rc |= run_gen(m, a, 0, 2, &p, pr, NP, &cpu);
    char name[160];
    if (rc != 0) {
        gt_check(0, "batching runs");
        return;
    }
    int same = same_outputs(&one, &many, NP), agree = 0;
    for (int i = 0; i < NP; i++)
        agree += many.n[i] == cpu.n[i] && !memcmp(many.ids[i], cpu.ids[i], (size_t)cpu.n[i] * 4);
    if (exact) {
        snprintf(name, sizeof name, "%s: %d prompts 4 at a time == one at a time", label, NP);
        gt_check(same, name);
        snprintf(name, sizeof name, "%s: GPU greedy == CPU greedy on %d prompts", label, NP);
        gt_check(agree == NP, name);
    } else {
        printf("# %s: 4 at a time %s one at a time; %d of %d prompts equal the CPU's\n", label,
               same ? "==" : "!=", agree, NP);
    }
    collect_free(&one, NP);
    collect_free(&many, NP);
    collect_free(&cpu, NP);
}

/* transformers + peft's greedy completions (tests/golden/gen-s260-peft.json). */
static void test_peft_golden(const llama_model *m)
{
    const char *top = getenv("TOP");
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/golden/gen-s260-peft.json", top && *top ? top : ".");
    json_value *g;
    if (!io_exists(path) || json_parse_file(path, &g) != 0) {
        printf("skip peft golden: %s absent\n", path);
        return;
    }
    /* the adapter: the same seeded one tests/unit/test_generate.c makes */
    lora_config lc = {8, 16.0, 0.0, 0, LORA_ALL_LINEAR};
    lora_adapter *a;
    lora_new(&m->cfg, &lc, &a);
    lora_init(a, 7);
    for (size_t i = 0; i < a->n_params; i++)
        if (a->params[i] == 0.0f)
            a->params[i] = (lora_rand_uniform(0x5eed, i) - 0.5f) * 0.2f;
    const json_value *ps = json_get(g, "prompts"), *cs = json_get(g, "completions");
    size_t n = ps ? ps->u.array.n : 0;
    gen_prompt *pr = calloc(n ? n : 1, sizeof *pr);
    for (size_t i = 0; i < n; i++) {
        const json_value *pa = ps->u.array.items[i];
        int32_t *ids = malloc(pa->u.array.n * 4);
        for (size_t j = 0; j < pa->u.array.n; j++)
            ids[j] = (int32_t)pa->u.array.items[j]->u.number.integer;
        pr[i].ids = ids;
        pr[i].n = (int32_t)pa->u.array.n;
    }
    gen_params p;
    gen_params_default(&p);
    p.max_new = (int32_t)json_get_int(g, "max_new_tokens", 40);
    p.eos_id = (int32_t)json_get_int(g, "eos_token_id", 2);
    collect c;
    int rc = run_gen(m, a, 1, 3, &p, pr, n, &c);
    int agree = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const json_value *ca = cs->u.array.items[i];
        int eq = (size_t)c.n[i] == ca->u.array.n;
        for (size_t j = 0; eq && j < ca->u.array.n; j++)
            eq = c.ids[i][j] == (int32_t)ca->u.array.items[j]->u.number.integer;
        agree += eq;
    }
    char name[160];
    snprintf(name, sizeof name, "GPU greedy with the adapter == transformers+peft on %zu prompts "
             "(%d equal)", n, agree);
    gt_check(rc == 0 && (size_t)agree == n && n > 0, name);
    if (rc == 0)
        collect_free(&c, n);
    for (size_t i = 0; i < n; i++)
        free((void *)pr[i].ids);
    free(pr);
    lora_free(a);
    json_free(g);
}

static lora_adapter *random_adapter(const llama_model *m)
{
    lora_config lc = {8, 16.0, 0.0, 0, LORA_ALL_LINEAR};
    lora_adapter *a;
    if (lora_new(&m->cfg, &lc, &a) != 0)
        return NULL;
    lora_init(a, 3);
    for (size_t i = 0; i < a->n_params; i++)
        if (a->params[i] == 0.0f)
            a->params[i] = gt_uniform(0.1f);
    return a;
}

static void test_stories(void)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/stories260K", shared_dir());
    llama_model *m;
    if (llama_load(dir, &m) != 0) {
        printf("skip backend tests: %s not loadable (SHARED unset or absent)\n", dir);
        return;
    }
    test_greedy_bos(m, "stories260K f32");
    lora_adapter *a = random_adapter(m);
    test_logits(m, NULL, TOL_LOGITS_F32, "TOL_LOGITS_F32", "stories260K f32");
    test_logits(m, a, TOL_LOGITS_F32, "TOL_LOGITS_F32", "stories260K f32 + adapter");
    test_logits_len(m, a, TOL_LOGITS_F32, "TOL_LOGITS_F32", "stories260K f32 + adapter", 128);
    test_batching(m, a, 1, "stories260K f32 + adapter");
    test_peft_golden(m);
    lora_free(a);
    llama_free(m);

    snprintf(dir, sizeof dir, "%s/golden/s260-nf4-f32", shared_dir());
    if (llama_load(dir, &m) != 0) {
        printf("skip NF4 backend tests: %s not loadable\n", dir);
        return;
    }
    a = random_adapter(m);
    test_logits(m, NULL, TOL_LOGITS_BF16, "TOL_LOGITS_BF16", "stories260K NF4 (bf16 compute)");
    test_logits(m, a, TOL_LOGITS_BF16, "TOL_LOGITS_BF16", "stories260K NF4 + adapter");
    /* 128 tokens: the prefill's own path (dequantized weights, cuBLAS with
     * q/k/v and gate/up as one product each, flash attention) */
    test_logits_len(m, a, TOL_LOGITS_BF16, "TOL_LOGITS_BF16", "stories260K NF4 + adapter", 128);
    test_logits_len(m, NULL, TOL_LOGITS_BF16, "TOL_LOGITS_BF16", "stories260K NF4", 128);
    test_batching(m, a, 0, "stories260K NF4 + adapter");
    /* greedy from BOS: agreement with the CPU's NF4 greedy, reported */
    {
        gen_params p;
        gen_params_default(&p);
        p.max_new = 256;
        int32_t bos = 1, stop = 1;
        p.stop_ids = &stop;
        p.n_stop_ids = 1;
        gen_prompt pr = {&bos, 1};
        collect g, c;
        if (run_gen(m, NULL, 1, 1, &p, &pr, 1, &g) == 0 && run_gen(m, NULL, 0, 1, &p, &pr, 1, &c) == 0) {
            int k = 0;
            while (k < g.n[0] && k < c.n[0] && g.ids[0][k] == c.ids[0][k])
                k++;
            printf("# stories260K NF4 greedy from BOS: GPU (bf16) and CPU (fp32) agree on the "
                   "first %d of %d tokens\n", k, c.n[0]);
            collect_free(&g, 1);
            collect_free(&c, 1);
        }
    }
    lora_free(a);
    llama_free(m);
}

/* ---- --bench: Llama 2 7B shape ---------------------------------------------------- */

/* A layer's four product launches (q/k/v, o, gate/up, down) over BL
 * layers of weights in turn, so that the weights come from DRAM, not L2. */
enum { BL = 8 };
typedef struct layer_bench {
    kn_gw w[BL][LLAMA_NLINEAR];
    kn_bf16 *x;
    float *y[LLAMA_NLINEAR];
    void *ws;
    size_t wsb;
    int n, only; /* only >= 0: that group alone */
} layer_bench;

static void layer_bench_fn(void *p)
{
    layer_bench *b = p;
    static const int groups[4][4] = {{3, LLAMA_Q, LLAMA_K, LLAMA_V},
                                     {1, LLAMA_O, 0, 0},
                                     {2, LLAMA_GATE, LLAMA_UP, 0},
                                     {1, LLAMA_DOWN, 0, 0}};
    for (int l = 0; l < BL; l++)
        for (int gi = 0; gi < 4; gi++) {
            if (b->only >= 0 && gi != b->only)
                continue;
            kn_gen_lin ops[3];
            int nl = groups[gi][0];
            for (int i = 0; i < nl; i++) {
                int li = groups[gi][1 + i];
                ops[i].w = b->w[l][li];
                ops[i].y = b->y[li];
                ops[i].res = (li == LLAMA_O || li == LLAMA_DOWN) ? b->y[li] : NULL;
                ops[i].ldy = b->w[l][li].out;
            }
            kn_gen_linear_mma(ops, nl, b->x, b->w[l][groups[gi][1]].in, b->n, b->ws, b->wsb, 0);
        }
}

typedef struct att_bench {
    void *kc[16], *vc[16], *o;
    float *q, *ws;
    int32_t *slot, *pos;
    int n, cap, nl;
} att_bench;
static void att_bench_fn(void *p)
{
    att_bench *b = p;
    for (int l = 0; l < b->nl; l++)
        kn_gen_attention(NULL, b->o, b->q, 4096, b->kc[l], b->vc[l], 1, b->slot, b->pos, b->n, 32,
                         32, 128, b->cap, b->ws, 0);
}

/* A decoding step's kernels other than the products, on the 7B shapes
 * with 350 cached positions, as a step runs them: captured in a CUDA
 * graph (launch gaps included), nl layers' buffers in turn (at n = 1 the
 * caches of 16 layers, so that they come from DRAM). Per layer. */
typedef struct step_bench {
    cudaStream_t s;
    int n, nl, cap, which;
    float *x, *w[16], *qkv, *ct, *st, *ws_old, *ws_new, *gu, *logits;
    kn_bf16 *xn16, *att16, *h16;
    void *kc[16], *vc[16];
    int32_t *slot, *pos, *amax;
    cudaGraphExec_t g;
} step_bench;

enum { SB_NORM, SB_ROPE_ATT, SB_FUSED, SB_SWIGLU, SB_ARGMAX, SB_N };

static void step_bench_launch(step_bench *b)
{
    const int D = 4096, H = 11008, QKV = 3 * 4096;
    for (int l = 0; l < b->nl; l++)
        switch (b->which) {
        case SB_NORM:
            kn_gen_rmsnorm(NULL, b->xn16, b->x, NULL, b->w[l], b->n, D, 1e-5f, b->s);
            break;
        case SB_ROPE_ATT:
            kn_gen_rope_append(b->qkv, QKV, b->qkv + D, QKV, b->qkv + 2 * D, QKV, b->kc[l],
                               b->vc[l], 1, b->slot, b->pos, b->n, 32, 32, 128, b->cap, b->ct,
                               b->st, NULL, NULL, NULL, b->s);
            kn_gen_attention(NULL, b->att16, b->qkv, QKV, b->kc[l], b->vc[l], 1, b->slot, b->pos,
                             b->n, 32, 32, 128, b->cap, b->ws_old, b->s);
            break;
        case SB_FUSED:
            kn_gen_rope_attention(NULL, b->att16, b->qkv, QKV, b->qkv + D, QKV, b->qkv + 2 * D,
                                  QKV, b->kc[l], b->vc[l], b->slot, b->pos, b->n, 32, 32, 128,
                                  b->cap, b->ct, b->st, b->ws_new, b->s);
            break;
        case SB_SWIGLU:
            kn_gen_swiglu(NULL, b->h16, b->gu, b->gu + H, 2 * H, b->n, H, b->s);
            break;
        case SB_ARGMAX:
            kn_gen_argmax(b->amax, b->logits, 32000, 32000, b->n, b->s);
            break;
        }
}

static void step_bench_fn(void *p)
{
    step_bench *b = p;
    CUDA_OK(cudaGraphLaunch(b->g, b->s));
}

static void bench_step_kernels(int n)
{
    const int D = 4096, H = 11008, P = 350;
    step_bench b;
    memset(&b, 0, sizeof b);
    b.n = n;
    b.nl = n == 1 ? 16 : 2;
    b.cap = 400;
    CUDA_OK(cudaStreamCreate(&b.s));
    size_t csz = (size_t)n * b.cap * D;
    for (int l = 0; l < b.nl; l++) {
        b.kc[l] = gt_dev(csz * 2);
        b.vc[l] = gt_dev(csz * 2);
        kn_memset(b.kc[l], 0x3c, csz * 2, 0);
        kn_memset(b.vc[l], 0x3c, csz * 2, 0);
        float *wh = gt_rand(D, 1.0f);
        b.w[l] = gt_up_f32(wh, D);
        free(wh);
    }
    float *xh = gt_rand((int64_t)n * 2 * H, 1.0f);
    b.x = gt_up_f32(xh, (int64_t)n * D);
    b.qkv = gt_up_f32(xh, (int64_t)n * 3 * D);
    b.gu = gt_up_f32(xh, (int64_t)n * 2 * H);
    free(xh);
    float *lh = gt_rand((int64_t)n * 32000, 1.0f);
    b.logits = gt_up_f32(lh, (int64_t)n * 32000);
    free(lh);
    float *th = gt_rand((int64_t)b.cap * 64, 1.0f);
    b.ct = gt_up_f32(th, (int64_t)b.cap * 64);
    b.st = gt_up_f32(th, (int64_t)b.cap * 64);
    free(th);
    b.xn16 = gt_dev((size_t)n * D * 2);
    b.att16 = gt_dev((size_t)n * D * 2);
    b.h16 = gt_dev((size_t)n * H * 2);
    b.amax = gt_dev((size_t)n * 4);
    b.ws_old = kn_malloc(kn_gen_attention_ws(n, 32, 128, b.cap));
    size_t wn = kn_gen_rope_attention_ws(n, 32, 128, b.cap);
    b.ws_new = kn_malloc(wn);
    kn_memset(b.ws_new, 0, wn, 0);
    int32_t *sl = malloc((size_t)n * 4), *ps = malloc((size_t)n * 4);
    for (int i = 0; i < n; i++) {
        sl[i] = i;
        ps[i] = P;
    }
    b.slot = gt_up(sl, (size_t)n * 4);
    b.pos = gt_up(ps, (size_t)n * 4);
    free(sl);
    free(ps);
    static const char *what[SB_N] = {"rmsnorm d=4096", "rope_append + attention (3 launches)",
                                     "rope_attention (fused)", "swiglu d=11008",
                                     "argmax vocab 32000"};
    for (int wi = 0; wi < SB_N; wi++) {
        b.which = wi;
        cudaGraph_t gr;
        CUDA_OK(cudaStreamBeginCapture(b.s, cudaStreamCaptureModeThreadLocal));
        step_bench_launch(&b);
        CUDA_OK(cudaStreamEndCapture(b.s, &gr));
        CUDA_OK(cudaGraphInstantiate(&b.g, gr, 0));
        CUDA_OK(cudaGraphDestroy(gr));
        char name[120];
        snprintf(name, sizeof name, "step n=%d %s, graph of %d (per launch group: /%d)", n,
                 what[wi], b.nl, b.nl);
        double bytes = wi == SB_ROPE_ATT || wi == SB_FUSED
                           ? (double)b.nl * n * (P + 1) * D * 2 * 2
                           : 0.0;
        gt_time(name, step_bench_fn, &b, bytes, 1);
        CUDA_OK(cudaGraphExecDestroy(b.g));
    }
    for (int l = 0; l < b.nl; l++) {
        kn_free(b.kc[l]);
        kn_free(b.vc[l]);
        kn_free(b.w[l]);
    }
    kn_free(b.x); kn_free(b.qkv); kn_free(b.gu); kn_free(b.logits); kn_free(b.ct);
    kn_free(b.st); kn_free(b.xn16); kn_free(b.att16); kn_free(b.h16); kn_free(b.amax);
    kn_free(b.ws_old); kn_free(b.ws_new); kn_free(b.slot); kn_free(b.pos);
    cudaStreamDestroy(b.s);
}

/* One layer of a prefill of M tokens (300-token prompts), piece by piece,
 * plain launches (each piece is large): where the prefill's time goes, and
 * whether q/k/v and gate/up as one product each (over a concatenated
 * dequantized weight) beat three and two. */
typedef struct pre_bench {
    int M, which;
    kn_nf4 w[LLAMA_NLINEAR];
    int64_t out[LLAMA_NLINEAR], in[LLAMA_NLINEAR];
    kn_bf16 *wb, *x16, *q16, *k16, *v16, *att16, *h16;
    float *y, *x, *nw, *ct, *st, *lse;
    int32_t *slot, *pos, *start;
    void *kc, *vc;
} pre_bench;

enum { PB_DEQUANT, PB_QKV3, PB_QKV1, PB_O, PB_GU2, PB_GU1, PB_DOWN, PB_NORM, PB_ROPE, PB_FLASH,
       PB_SWIGLU, PB_N };

static void pre_bench_fn(void *p)
{
    pre_bench *b = p;
    const int M = b->M, D = 4096, H = 11008;
    switch (b->which) {
    case PB_DEQUANT: {
        int64_t off = 0;
        for (int i = 0; i < LLAMA_NLINEAR; i++) {
            kn_nf4_dequant(b->wb + off, &b->w[i], 0);
            off += b->out[i] * b->in[i];
        }
        break;
    }
    case PB_QKV3:
        for (int i = 0; i < 3; i++)
            kn_gemm(0, 1, M, D, D, 1.0f, b->x16, D, b->wb + (int64_t)i * D * D, D, 0.0f,
                    b->y + (int64_t)i * D, KN_F32, 3 * D, 0);
        break;
    case PB_QKV1:
        kn_gemm(0, 1, M, 3 * D, D, 1.0f, b->x16, D, b->wb, D, 0.0f, b->y, KN_F32, 3 * D, 0);
        break;
    case PB_O:
        kn_gemm(0, 1, M, D, D, 1.0f, b->x16, D, b->wb, D, 1.0f, b->x, KN_F32, D, 0);
        break;
    case PB_GU2:
        for (int i = 0; i < 2; i++)
            kn_gemm(0, 1, M, H, D, 1.0f, b->x16, D, b->wb + (int64_t)i * H * D, D, 0.0f,
                    b->y + (int64_t)i * H, KN_F32, 2 * H, 0);
        break;
    case PB_GU1:
        kn_gemm(0, 1, M, 2 * H, D, 1.0f, b->x16, D, b->wb, D, 0.0f, b->y, KN_F32, 2 * H, 0);
        break;
    case PB_DOWN:
        kn_gemm(0, 1, M, D, H, 1.0f, b->h16, H, b->wb, H, 1.0f, b->x, KN_F32, D, 0);
        break;
    case PB_NORM:
        kn_gen_rmsnorm(NULL, b->x16, b->x, NULL, b->nw, M, D, 1e-5f, 0);
        break;
    case PB_ROPE:
        kn_gen_rope_append(b->y, 3 * D, b->y + D, 3 * D, b->y + 2 * D, 3 * D, b->kc, b->vc, 1,
                           b->slot, b->pos, M, 32, 32, 128, 300, b->ct, b->st, b->q16, b->k16,
                           b->v16, 0);
        break;
    case PB_FLASH:
        kn_attention_forward(b->att16, b->lse, b->q16, b->k16, b->v16, b->start, M, 32, 32, 128,
                             0);
        break;
    case PB_SWIGLU:
        kn_gen_swiglu(NULL, b->h16, b->y, b->y + H, 2 * H, M, H, 0);
        break;
    }
}

static void bench_prefill_pieces(const llama_config *c, const uint8_t *codes,
                                 const uint8_t *scodes, const float *nested)
{
    enum { PROMPT = 300 };
    const int D = 4096, H = 11008, M = 54 * PROMPT; /* a 16,384-token call: 54 prompts */
    pre_bench b;
    memset(&b, 0, sizeof b);
    b.M = M;
    int64_t tot = 0;
    nf4_weight fw;
    for (int i = 0; i < LLAMA_NLINEAR; i++) {
        llama_linear_shape(c, (llama_linear)i, &b.out[i], &b.in[i]);
        gt_fake_nf4(&fw, b.out[i], b.in[i], codes, scodes, nested);
        nf4_to_device(&fw, &b.w[i]);
        tot += b.out[i] * b.in[i];
    }
    b.wb = gt_dev((size_t)tot * 2);
    b.x = gt_dev((size_t)M * D * 4);
    b.y = gt_dev((size_t)M * 2 * H * 4);
    b.x16 = gt_dev((size_t)M * D * 2);
    b.h16 = gt_dev((size_t)M * H * 2);
    b.q16 = gt_dev((size_t)M * D * 2);
    b.k16 = gt_dev((size_t)M * D * 2);
    b.v16 = gt_dev((size_t)M * D * 2);
    b.att16 = gt_dev((size_t)M * D * 2);
    b.lse = gt_dev((size_t)M * 32 * 4);
    /* operands: 0x3c3c (0.0115 in bf16; 0.0115 in fp32 as 0x3c3c3c3c):
     * no zeros, no NaN; the weights are the random codes dequantized */
    kn_memset(b.x16, 0x3c, (size_t)M * D * 2, 0);
    kn_memset(b.h16, 0x3c, (size_t)M * H * 2, 0);
    kn_memset(b.x, 0x3c, (size_t)M * D * 4, 0);
    kn_memset(b.y, 0x3c, (size_t)M * 2 * H * 4, 0);
    float *nh = gt_rand(D, 1.0f);
    b.nw = gt_up_f32(nh, D);
    free(nh);
    float *th = gt_rand((int64_t)PROMPT * 64, 1.0f);
    b.ct = gt_up_f32(th, (int64_t)PROMPT * 64);
    b.st = gt_up_f32(th, (int64_t)PROMPT * 64);
    free(th);
    int np = M / PROMPT;
    b.kc = gt_dev((size_t)np * PROMPT * D * 2);
    b.vc = gt_dev((size_t)np * PROMPT * D * 2);
    int32_t *sl = malloc((size_t)M * 4), *ps = malloc((size_t)M * 4), *st = malloc((size_t)M * 4);
    for (int t = 0; t < M; t++) {
        sl[t] = t / PROMPT;
        ps[t] = t % PROMPT;
        st[t] = t / PROMPT * PROMPT;
    }
    b.slot = gt_up(sl, (size_t)M * 4);
    b.pos = gt_up(ps, (size_t)M * 4);
    b.start = gt_up(st, (size_t)M * 4);
    free(sl); free(ps); free(st);
    static const char *what[PB_N] = {
        "dequantize the 7 weights", "q, k, v: 3 products", "q/k/v: 1 product (N 12288)",
        "o (+ residual)", "gate, up: 2 products", "gate/up: 1 product (N 22016)",
        "down (+ residual)", "rmsnorm", "rope_append (+ bf16 copies)", "flash attention",
        "swiglu"};
    const double flop[PB_N] = {0, 2.0 * M * 3 * D * D, 2.0 * M * 3 * D * D, 2.0 * M * D * D,
                               4.0 * M * H * D, 4.0 * M * H * D, 2.0 * M * H * D, 0, 0,
                               4.0 * M * (PROMPT + 1) / 2 * D, 0};
    for (int wi = 0; wi < PB_N; wi++) {
        b.which = wi;
        char name[120];
        snprintf(name, sizeof name, "prefill layer, %d tokens: %s", M, what[wi]);
        gt_time(name, pre_bench_fn, &b, wi == PB_DEQUANT ? (double)tot * 2.5 : flop[wi],
                wi == PB_DEQUANT);
    }
    for (int i = 0; i < LLAMA_NLINEAR; i++) {
        kn_nf4 *q = &b.w[i];
        kn_free((void *)q->codes); kn_free((void *)q->absmax_q);
        kn_free((void *)q->nested_absmax); kn_free((void *)q->nested_map);
        kn_free((void *)q->quant_map);
    }
    kn_free(b.wb); kn_free(b.x); kn_free(b.y); kn_free(b.x16); kn_free(b.h16); kn_free(b.q16);
    kn_free(b.k16); kn_free(b.v16); kn_free(b.att16); kn_free(b.lse); kn_free(b.nw);
    kn_free(b.ct); kn_free(b.st); kn_free(b.kc); kn_free(b.vc); kn_free(b.slot); kn_free(b.pos);
    kn_free(b.start);
}

/* A comma-separated list of n in 1..64 from the environment variable
 * `name` into v (at most 8); def when unset. Returns the count. */
static int env_ns(const char *name, const char *def, int *v)
{
    const char *q = getenv(name);
    int k = 0;
    if (!q)
        q = def;
    while (*q && k < 8) {
        int x = atoi(q);
        if (x >= 1 && x <= 64)
            v[k++] = x;
        q = strchr(q, ',');
        if (!q)
            break;
        q++;
    }
    return k;
}

static void bench_7b(void)
{
    enum { L = 32, DIM = 4096, HID = 11008, VOCAB = 32000, PROMPT = 300, NEW = 100 };
    gt_model7b m7;
    gt_model7b_init(&m7);
    llama_model M = m7.m;
    llama_config *c = &M.cfg;
    const uint8_t *codes = m7.codes, *scodes = m7.scodes;
    const float *nested = m7.nested;
    double wbytes = m7.nf4_bytes;
    double head_bytes = (double)VOCAB * DIM * 2;

    /* the products of a layer, on the 7B shapes (GEN_BENCH_MICRO=0: skip;
     * =2: only the step kernels and the prefill's pieces below; =3: only
     * the step kernels at n = 64, for a profiler) */
    const char *micro = getenv("GEN_BENCH_MICRO");
    const int mm = micro ? atoi(micro) : 1;
    const int micro_all = mm == 1, micro_step = mm >= 1;
    /* GEN_BENCH_NS: the n of these (default 1,64) */
    int pns[8];
    const int npn = micro_all ? env_ns("GEN_BENCH_NS", "1,64", pns) : 0;
    for (int pi = 0; pi < npn; pi++) {
        const int n = pns[pi];
        layer_bench b;
        memset(&b, 0, sizeof b);
        nf4_weight fw;
        for (int l = 0; l < BL; l++)
            for (int li = 0; li < LLAMA_NLINEAR; li++) {
                int64_t o, in;
                llama_linear_shape(c, (llama_linear)li, &o, &in);
                gt_fake_nf4(&fw, o, in, codes, scodes, nested);
                b.w[l][li].kind = KN_GW_NF4;
                b.w[l][li].out = o;
                b.w[l][li].in = in;
                nf4_to_device(&fw, &b.w[l][li].q);
            }
        float *xh = gt_rand((int64_t)n * HID, 1.0f);
        b.x = gt_up_bf16(xh, (int64_t)n * HID);
        free(xh);
        for (int li = 0; li < LLAMA_NLINEAR; li++) {
            b.y[li] = gt_dev((size_t)n * b.w[0][li].out * 4);
            kn_memset(b.y[li], 0, (size_t)n * b.w[0][li].out * 4, 0);
        }
        kn_gen_lin big[2] = {{b.w[0][LLAMA_GATE], b.y[LLAMA_GATE], NULL, HID},
                             {b.w[0][LLAMA_UP], b.y[LLAMA_UP], NULL, HID}};
        kn_gen_lin qkv[3] = {{b.w[0][LLAMA_Q], b.y[LLAMA_Q], NULL, DIM},
                             {b.w[0][LLAMA_K], b.y[LLAMA_K], NULL, DIM},
                             {b.w[0][LLAMA_V], b.y[LLAMA_V], NULL, DIM}};
        size_t w1 = kn_gen_linear_mma_ws(big, 2, n), w2 = kn_gen_linear_mma_ws(qkv, 3, n);
        kn_gen_lin dn = {b.w[0][LLAMA_DOWN], b.y[LLAMA_DOWN], NULL, DIM};
        size_t w3 = kn_gen_linear_mma_ws(&dn, 1, n);
        b.wsb = w1 > w2 ? w1 : w2;
        b.wsb = w3 > b.wsb ? w3 : b.wsb;
        b.ws = kn_malloc(b.wsb ? b.wsb : 16);
        kn_memset(b.ws, 0, b.wsb ? b.wsb : 16, 0);
        b.n = n;
        static const char *gname[4] = {"q/k/v", "o", "gate/up", "down"};
        static const double gunits[4] = {3, 1, 2 * 11008 / 4096.0, 11008 / 4096.0};
        double unit = 4096.0 * 4096 * (0.5 + 1 / 64.0 + 1 / 64.0 / 256 * 4);
        for (int gi = -1; gi < 4; gi++) {
            b.only = gi;
            double units = gi < 0 ? 3 + 1 + 3 * 11008 / 4096.0 : gunits[gi];
            char name[120];
            snprintf(name, sizeof name, "nf4 products, %s n=%d, %d layers in turn (weight bytes)",
                     gi < 0 ? "a layer's four launches" : gname[gi], n, BL);
            gt_time(name, layer_bench_fn, &b, unit * units * BL, 1);
        }
        for (int l = 0; l < BL; l++)
            for (int li = 0; li < LLAMA_NLINEAR; li++) {
                kn_nf4 *q = &b.w[l][li].q;
                kn_free((void *)q->codes); kn_free((void *)q->absmax_q);
                kn_free((void *)q->nested_absmax); kn_free((void *)q->nested_map);
                kn_free((void *)q->quant_map);
            }
        for (int li = 0; li < LLAMA_NLINEAR; li++)
            kn_free(b.y[li]);
        kn_free(b.x);
        kn_free(b.ws);
    }

    /* the cache attention alone: 350 cached positions, 32 heads of 128 */
    for (int pi = 0; pi < npn; pi++) {
        const int n = pns[pi];
        int cap = PROMPT + NEW, P = 350;
        size_t csz = (size_t)n * cap * DIM;
        att_bench b;
        memset(&b, 0, sizeof b);
        b.nl = n == 1 ? 16 : 1; /* at n = 1 the caches of 16 layers in turn */
        for (int l = 0; l < b.nl; l++) {
            b.kc[l] = gt_dev(csz * 2);
            b.vc[l] = gt_dev(csz * 2);
            kn_memset(b.kc[l], 0x3c, csz * 2, 0); /* 0x3c3c: 0.0115 in bf16 */
            kn_memset(b.vc[l], 0x3c, csz * 2, 0);
        }
        float *qh = gt_rand((int64_t)n * DIM, 1.0f);
        b.q = gt_up_f32(qh, (int64_t)n * DIM);
        int32_t *sl = malloc((size_t)n * 4), *ps = malloc((size_t)n * 4);
        for (int i = 0; i < n; i++) {
            sl[i] = i;
            ps[i] = P;
        }
        b.slot = gt_up(sl, (size_t)n * 4);
        b.pos = gt_up(ps, (size_t)n * 4);
        b.o = gt_dev((size_t)n * DIM * 2);
        b.ws = kn_malloc(kn_gen_attention_ws(n, 32, 128, cap));
        b.n = n;
        b.cap = cap;
        char name[80];
        snprintf(name, sizeof name, "cache attention n=%d P=%d, %d layers (cache bytes)", n, P, b.nl);
        gt_time(name, att_bench_fn, &b, (double)b.nl * n * (P + 1) * DIM * 2 * 2, 1);
        free(qh); free(sl); free(ps);
        for (int l = 0; l < b.nl; l++) {
            kn_free(b.kc[l]);
            kn_free(b.vc[l]);
        }
        kn_free(b.q); kn_free(b.slot); kn_free(b.pos);
        kn_free(b.o); kn_free(b.ws);
    }

    for (int n = mm == 3 ? 64 : 1; micro_step && n <= 64; n *= 64)
        bench_step_kernels(n);
    if (micro_step && mm != 3)
        bench_prefill_pieces(c, codes, scodes, nested);

    /* GEN_BENCH_BATCHES: the batch sizes of the whole runs (default 1,64;
     * 0: none) */
    int batches[8];
    const int nb = env_ns("GEN_BENCH_BATCHES", "1,64", batches);
    for (int bi = 0; bi < nb; bi++) {
        int B = batches[bi];
        gen_backend be;
        double t0 = gt_now_s();
        if (gen_gpu_backend(&M, NULL, B, PROMPT + NEW, &be) != 0) {
            gt_check(0, "7B backend");
            return;
        }
        double t_load = gt_now_s() - t0;
        int32_t *ids = malloc((size_t)B * PROMPT * 4);
        gen_prompt *pr = malloc((size_t)B * sizeof *pr);
        for (int i = 0; i < B; i++) {
            for (int j = 0; j < PROMPT; j++)
                ids[i * PROMPT + j] = j == 0 ? 1 : 3 + (int32_t)(gt_u64() % (VOCAB - 3));
            pr[i].ids = ids + i * PROMPT;
            pr[i].n = PROMPT;
        }
        gen_params p;
        gen_params_default(&p);
        p.ignore_eos = 1;
        p.eos_id = 2;
        /* warm-up: cuBLAS plans, the graph of this batch size */
        p.max_new = 4;
        gen_run(&be, &p, pr, (size_t)B, 4096, NULL, NULL, NULL);
        p.max_new = NEW;
        gen_stats st;
        int rc = gen_run(&be, &p, pr, (size_t)B, 4096, NULL, NULL, &st);
        double tps = st.new_tokens / st.seconds;
        double step = st.decode_seconds / (double)st.decode_steps;
        double dec_tps = (double)(st.new_tokens - (uint64_t)B) / st.decode_seconds;
        /* bytes a step must read: the 4-bit weights, the bf16 head, the
         * caches at the mean length */
        double kv = (double)B * L * (PROMPT + NEW / 2.0) * 4096 * 2 * 2;
        double bytes = wbytes + head_bytes + kv;
        double bw = bytes / step / 1e9;
        printf("# bench 7B batch %d: %.1f new tokens/s (%llu tokens in %.3f s; prefill %.3f s, "
               "%lld steps of %.3f ms: %.1f tokens/s decoding), %.0f GB/s = %.0f%% of 3350 GB/s, "
               "peak %.2f GiB, setup %.1f s\n",
               B, tps, (unsigned long long)st.new_tokens, st.seconds, st.prefill_seconds,
               (long long)st.decode_steps, step * 1e3, dec_tps, bw, bw / 3350 * 100,
               (double)gen_gpu_peak_bytes(&be) / 1073741824.0, t_load);
        printf("#json {\"stack\":\"ours\",\"batch\":%d,\"tokens_per_s\":%.1f,\"decode_tokens_per_s\""
               ":%.1f,\"seconds\":%.4f,\"prefill_s\":%.4f,\"step_ms\":%.4f,\"gb_per_s\":%.1f,"
               "\"bw_share\":%.3f,\"peak_gib\":%.3f,\"device\":\"%s\"}\n",
               B, tps, dec_tps, st.seconds, st.prefill_seconds, step * 1e3, bw, bw / 3350,
               (double)gen_gpu_peak_bytes(&be) / 1073741824.0, kn_device_name());
        fflush(stdout);
        gt_check(rc == 0 && st.new_tokens == (uint64_t)B * NEW, "7B bench runs");
        be.free(be.ctx);
        free(ids);
        free(pr);
    }
    gt_model7b_free(&m7);
}

int main(int argc, char **argv)
{
    int bench_only = 0;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--bench-only")) {
            bench_only = 1;
            argv[i] = "--bench";
        }
    gt_init("gen", argc, argv);
    gt_seed(8);
    if (bench_only) {
        bench_7b();
        return gt_done();
    }
    test_mma(KN_GW_NF4, 1, 64, 64, 1);
    test_mma(KN_GW_NF4, 1, 200, 128, 3);
    test_mma(KN_GW_NF4, 0, 130, 4096, 9);
    test_mma(KN_GW_NF4, 1, 1000, 256, 17);
    test_mma(KN_GW_NF4, 1, 300, 1024, 64);
    test_mma(KN_GW_NF4, 1, 4096, 512, 33);
    test_mma(KN_GW_BF16, 0, 64, 172, 5);
    test_mma(KN_GW_BF16, 0, 512, 64, 40);
    test_mma(KN_GW_BF16, 0, 1000, 320, 1);
    test_mma_batches(KN_GW_NF4, 1, 300, 1024);   /* split lin_tile, x in smem for lin_vec */
    test_mma_batches(KN_GW_NF4, 0, 5000, 512);   /* lin_vec blocks take several tiles */
    test_mma_batches(KN_GW_NF4, 1, 130, 4096);   /* x in registers for n > 5 */
    test_mma_batches(KN_GW_BF16, 0, 200, 172);   /* ragged in: 8-byte x copies */
    test_mma_batches(KN_GW_NF4, 1, 17000, 128);  /* lin_tile without split */
    test_mma_batches(KN_GW_NF4, 1, 1100, 2816);  /* lin_wg: 44 chunks, classes of 8 and 4 */
    test_mma_group(5);
    test_mma_group(40);
    test_mma_shared_ws();
    test_f32(77, 172, 9, 0);
    test_f32(64, 64, 1, 1);
    test_f32(300, 8, 20, 0);
    test_attention(8, 4, 8, 50, 0);
    test_attention(4, 2, 128, 300, 1);
    test_attention(32, 32, 128, 20, 0);
    test_rope_append(8, 4, 8, 0);
    test_rope_append(4, 4, 128, 1);
    test_rope_append(4, 2, 12, 1); /* hd % 8 != 0: one block per head */
    test_elementwise();
    test_rmsnorm(1, 4096, 1);
    test_rmsnorm(5, 4100, 0);
    test_rmsnorm(3, 170, 1);
    test_rmsnorm(64, 1024, 1);
    test_attention(32, 32, 128, 400, 1);
    test_attention(8, 8, 128, 65, 1);
    test_rope_attention(4, 2, 128, 300, 7);
    test_rope_attention(32, 32, 128, 400, 64);
    test_rope_attention(8, 4, 8, 50, 5);
    test_rope_attention(4, 4, 64, 130, 3);
    test_rope_attention(2, 1, 32, 200, 1);
    test_stories();
    if (gt_bench)
        bench_7b();
    return gt_done();
}
