/* nf4.c: NF4 dequantization on the GPU against lib/nf4.c's
 * nf4_dequantize, rounded to bf16: bit-identical, with and without double
 * quantization, at the stories260K shapes and odd ones. */
#include "gpu_test.h"
#include "nf4.h"

static void to_device(const nf4_weight *w, kn_nf4 *d)
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

static void free_device(kn_nf4 *d)
{
    kn_free((void *)d->codes);
    kn_free((void *)d->quant_map);
    kn_free((void *)d->absmax_q);
    kn_free((void *)d->nested_absmax);
    kn_free((void *)d->nested_map);
    kn_free((void *)d->absmax);
}

typedef struct { kn_bf16 *out; kn_nf4 w; } bench_ctx;
static void bench_fn(void *p)
{
    bench_ctx *c = p;
    kn_nf4_dequant(c->out, &c->w, 0);
}

static void one(int64_t rows, int64_t cols, int blocksize, int nested)
{
    int64_t n = rows * cols;
    float *x = gt_rand(n, 0.1f);
    for (int64_t i = 0; i < n; i += 97)
        x[i] *= 20.0f;  /* outliers: blocks with very different scales */
    int64_t shape[2] = {rows, cols};
    nf4_weight w;
    if (nf4_quantize(x, ST_F32, 2, shape, blocksize, nested, 1, &w) != 0) {
        gt_check(0, "nf4_quantize");
        return;
    }
    float *ref = malloc((size_t)n * sizeof *ref);
    nf4_dequantize(&w, 0, n, ref);
    gt_round_bf16(ref, n);
    kn_nf4 dw;
    to_device(&w, &dw);
    kn_bf16 *out = gt_dev((size_t)n * 2);
    kn_nf4_dequant(out, &dw, 0);
    float *got = gt_down_bf16(out, n);
    char what[128];
    snprintf(what, sizeof what, "nf4 dequant %lldx%lld block %d %s",
             (long long)rows, (long long)cols, blocksize, nested ? "double-quant" : "plain");
    gt_compare(what, got, ref, n, TOL_EXACT, "TOL_EXACT");
    if (gt_bench && n >= 1 << 24) {
        bench_ctx c = {out, dw};
        gt_time(what, bench_fn, &c, n * 2.5, 1);
    }
    free(x); free(ref); free(got);
    kn_free(out);
    free_device(&dw);
    nf4_weight_free(&w);
}

int main(int argc, char **argv)
{
    gt_init("nf4", argc, argv);
    gt_seed(2);
    one(64, 172, 64, 1);     /* stories260K w1 */
    one(172, 64, 64, 1);
    one(64, 64, 64, 0);
    one(37, 70, 64, 1);      /* last block partial, tail path */
    one(300, 256, 128, 1);
    one(513, 34, 32, 0);
    one(1000, 1000, 64, 1);  /* > 256 blocks: several nested blocks */
    if (gt_bench)
        one(11008, 4096, 64, 1);
    return gt_done();
}
