/* dist_gpu.cu: the device side of data-parallel training (dist_gpu.h).
 *
 * Nothing here computes: the trainer's stream runs the step as it does on
 * one GPU, and this file only orders NCCL's reductions against it with
 * events. A bucket's reduction waits (cudaStreamWaitEvent) for the point
 * of the trainer's stream where the backward of the bucket's lowest layer
 * was queued, and runs on the reduction stream meanwhile; before the
 * gradient norm, the trainer's stream waits for every reduction. Every
 * rank issues the same reductions in the same order (buckets from the top
 * layer down, then the loss), whatever its share of the step, which is
 * what NCCL requires.
 *
 * A step whose loss or gradient is not finite is skipped (or stops the
 * run, on_nonfinite) by every rank alike: gpu_trainer_step_shard decides
 * before the update from the reduced loss and the sum of squares of the
 * reduced gradient, which NCCL leaves identical on every rank (a NaN or
 * infinity on one rank reaches every sum), so no rank updates while
 * another skips and no extra reduction is needed.
 *
 * Failures of NCCL calls follow the kernels' policy (common.cuh): a
 * message naming the call, exit 2; there is nothing to return to
 * mid-step.
 */
#define _Noreturn [[noreturn]]
extern "C" {
#include "adamw.h"
#include "dist.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "train.h"
}
#include "common.cuh"
#include "dist_gpu.h"

#include <math.h>
#include <string.h>

struct dist_gpu {
    const dist_nccl *nc;
    void *comm;
    int world, rank;
    gpu_trainer *g;
    cudaStream_t cs;           /* the reductions */
    cudaEvent_t ready, done;
    int nl;                    /* layers */
    int64_t per_layer;         /* gradient floats per layer */
    int nb;                    /* buckets, from the top layer down */
    int *lo, *hi;              /* bucket b: layers lo[b] .. hi[b] */
    int next;                  /* buckets launched in this step */
    double *dsum;              /* (dsum_n) device scratch of dist_gpu_sum */
    size_t dsum_n;
    gpu_step_hooks hooks;
    train_backend inner;       /* the trainer's own */
};

static void nccl_check(const dist_gpu *d, int r, const char *call)
{
    if (r == DIST_NCCL_SUCCESS)
        return;
    dist_nccl_error(d->nc, call, r);
    exit(2);
}

/* ---- the reductions ------------------------------------------------------- */

static void launch_bucket(dist_gpu *d, int b, float *grad)
{
    int64_t off = (int64_t)d->lo[b] * d->per_layer;
    size_t count = (size_t)(d->hi[b] - d->lo[b] + 1) * (size_t)d->per_layer;
    nccl_check(d, d->nc->all_reduce(grad + off, grad + off, count, DIST_NCCL_FLOAT32,
                                    DIST_NCCL_SUM, d->comm, d->cs),
               "ncclAllReduce");
}

/* The reduction stream waits for what stream has queued so far. */
static void follow(dist_gpu *d, void *stream)
{
    CUDA_CHECK(cudaEventRecord(d->ready, (cudaStream_t)stream));
    CUDA_CHECK(cudaStreamWaitEvent(d->cs, d->ready, 0));
}

static void on_layer_done(void *ctx, int32_t layer, float *grad, void *stream)
{
    dist_gpu *d = (dist_gpu *)ctx;
    if (d->next < d->nb && layer == d->lo[d->next]) {
        follow(d, stream);
        launch_bucket(d, d->next++, grad);
    }
}

static void on_grads_done(void *ctx, float *grad, float *loss_sum, void *stream)
{
    dist_gpu *d = (dist_gpu *)ctx;
    follow(d, stream);
    /* a rank without micro-batches launched none: all of them, in order */
    while (d->next < d->nb)
        launch_bucket(d, d->next++, grad);
    nccl_check(d, d->nc->all_reduce(loss_sum, loss_sum, 1, DIST_NCCL_FLOAT32, DIST_NCCL_SUM,
                                    d->comm, d->cs),
               "ncclAllReduce");
    d->next = 0;
    CUDA_CHECK(cudaEventRecord(d->done, d->cs));
    CUDA_CHECK(cudaStreamWaitEvent((cudaStream_t)stream, d->done, 0));
}

extern "C" int dist_gpu_sum(dist_gpu *d, double *x, size_t n)
{
    if (n > d->dsum_n) {
        kn_free(d->dsum);
        d->dsum = (double *)kn_malloc(n * sizeof(double));
        d->dsum_n = n;
    }
    kn_memcpy_h2d(d->dsum, x, n * sizeof(double), d->cs);
    nccl_check(d, d->nc->all_reduce(d->dsum, d->dsum, n, DIST_NCCL_FLOAT64, DIST_NCCL_SUM,
                                    d->comm, d->cs),
               "ncclAllReduce");
    kn_memcpy_d2h(x, d->dsum, n * sizeof(double), d->cs);
    return 0;
}

/* ---- setup ------------------------------------------------------------------ */

extern "C" dist_gpu *dist_gpu_new(const dist_nccl *nccl, const dist_env *e,
                                  const unsigned char id[DIST_ID_BYTES], gpu_trainer *g,
                                  const llama_config *mc, const lora_config *lc)
{
    /* lora.h's layout: layer by layer, each targeted linear's A (r, in)
     * then B (out, r), so every layer holds the same number of floats */
    int64_t per_layer = 0;
    for (int l = 0; l < LLAMA_NLINEAR; l++) {
        int64_t out, in;
        llama_linear_shape(mc, (llama_linear)l, &out, &in);
        if (lc->targets & (1u << l))
            per_layer += (int64_t)lc->r * (in + out);
    }
    int nl = mc->n_layers;
    if (nl < 1 || per_layer < 1) {
        msg_error("data parallel: the adapter has no parameters");
        return NULL;
    }
    dist_gpu *d = (dist_gpu *)xcalloc(1, sizeof *d);
    d->nc = nccl;
    d->world = e->world;
    d->rank = e->rank;
    d->g = g;
    d->per_layer = per_layer;
    int mb = 25;
    const char *v = getenv("QLORA_DIST_BUCKET_MB");
    if (v && *v) {
        char *end;
        long x = strtol(v, &end, 10);
        if (*end || x < 0 || x > 1 << 20) {
            msg_error("QLORA_DIST_BUCKET_MB='%s': expected a number of MiB", v);
            free(d);
            return NULL;
        }
        mb = (int)x;
    }
    d->nl = nl;
    d->lo = (int *)xmalloc((size_t)nl * sizeof(int));
    d->hi = (int *)xmalloc((size_t)nl * sizeof(int));
    dist_gpu_set_buckets(d, (size_t)mb << 20);
    dist_nccl_id nid;
    memcpy(nid.internal, id, DIST_ID_BYTES);
    int r = nccl->comm_init_rank(&d->comm, e->world, nid, e->rank);
    if (r != DIST_NCCL_SUCCESS) {
        dist_nccl_error(nccl, "ncclCommInitRank", r);
        free(d->lo);
        free(d->hi);
        free(d);
        return NULL;
    }
    /* every rank has read the id: an id file has served its purpose */
    if (e->rank == 0 && e->id_file)
        dist_file_remove(e->id_file);
    CUDA_CHECK(cudaStreamCreateWithFlags(&d->cs, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&d->ready, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&d->done, cudaEventDisableTiming));
    d->hooks.ctx = d;
    d->hooks.layer_done = on_layer_done;
    d->hooks.grads_done = on_grads_done;
    gpu_trainer_backend(g, &d->inner);
    return d;
}

extern "C" void dist_gpu_free(dist_gpu *d, int failed)
{
    if (!d)
        return;
    if (failed) {
        d->nc->comm_abort(d->comm);
    } else {
        CUDA_CHECK(cudaStreamSynchronize(d->cs));
        d->nc->comm_destroy(d->comm);
    }
    CUDA_CHECK(cudaEventDestroy(d->ready));
    CUDA_CHECK(cudaEventDestroy(d->done));
    CUDA_CHECK(cudaStreamDestroy(d->cs));
    kn_free(d->dsum);
    free(d->lo);
    free(d->hi);
    free(d);
}

extern "C" int dist_gpu_buckets(const dist_gpu *d) { return d->nb; }

extern "C" void dist_gpu_set_buckets(dist_gpu *d, size_t bytes)
{
    int64_t want = (int64_t)(bytes / 4); /* floats a bucket aims for */
    d->nb = 0;
    for (int top = d->nl - 1; top >= 0;) {
        int bottom = top;
        while (bottom > 0 && (int64_t)(top - bottom + 1) * d->per_layer < want)
            bottom--;
        d->hi[d->nb] = top;
        d->lo[d->nb++] = bottom;
        top = bottom - 1;
    }
}

/* ---- train_run's backend ----------------------------------------------------- */

static int be_step_shard(void *ctx, const train_batch *micro, const int64_t *index,
                         size_t n, double weight_sum, double lr, double max_norm,
                         uint64_t seed, int64_t step, double *loss, double *norm)
{
    dist_gpu *d = (dist_gpu *)ctx;
    d->next = 0;
    return gpu_trainer_step_shard(d->g, micro, index, n, weight_sum, &d->hooks, lr,
                                  max_norm, seed, step, loss, norm);
}

/* train_eval's batches (batch_rows consecutive rows each), batch b on rank
 * b % world; the sums reduced, with a failure count, so that a rank whose
 * own batch fails still joins the reduction the others wait in. */
static int be_eval(void *ctx, const pack_data *pd, int64_t batch_rows, double *loss)
{
    dist_gpu *d = (dist_gpu *)ctx;
    train_batch tb;
    memset(&tb, 0, sizeof tb);
    uint64_t *rows = (uint64_t *)xmalloc((size_t)batch_rows * sizeof(uint64_t));
    double s[3] = {0, 0, 0};
    int rc = 0;
    uint64_t b = 0;
    for (uint64_t r0 = 0; r0 < pd->h.n_rows && rc == 0; r0 += (uint64_t)batch_rows, b++) {
        if (b % (uint64_t)d->world != (uint64_t)d->rank)
            continue;
        size_t n = 0;
        for (uint64_t r = r0; r < pd->h.n_rows && n < (size_t)batch_rows; r++)
            rows[n++] = r;
        train_batch_build(&tb, pd, rows, n);
        if (tb.b.n == 0)
            continue;
        double l = 0, w = 0;
        rc = gpu_trainer_forward(d->g, &tb.b, &l, &w);
        s[0] += l;
        s[1] += w;
    }
    free(rows);
    train_batch_free(&tb);
    s[2] = rc != 0;
    dist_gpu_sum(d, s, 3);
    if (s[2] > 0)
        return rc != 0 ? rc : msg_error("evaluation failed on another rank");
    *loss = s[1] > 0 ? s[0] / s[1] : NAN;
    return 0;
}

static uint64_t hash_words(uint64_t h, const float *x, size_t n)
{
    const uint32_t *w = (const uint32_t *)x;
    for (size_t i = 0; i < n; i++)
        h = (h ^ w[i]) * 0x100000001b3ull;
    return h;
}

/* Every rank holds the same adapter and moments: a hash of them, reduced
 * with min and max, must come back equal. */
static int be_finish(void *ctx, const lora_adapter *a, const adamw *opt)
{
    dist_gpu *d = (dist_gpu *)ctx;
    uint64_t h = 0xcbf29ce484222325ull;
    h = hash_words(h, a->params, a->n_params);
    h = hash_words(h, opt->m, opt->n);
    h = hash_words(h, opt->v, opt->n);
    uint64_t x[2] = {h, h};
    if (d->dsum_n < 2) {
        kn_free(d->dsum);
        d->dsum = (double *)kn_malloc(2 * sizeof(double));
        d->dsum_n = 2;
    }
    uint64_t *dx = (uint64_t *)d->dsum;
    kn_memcpy_h2d(dx, x, sizeof x, d->cs);
    nccl_check(d, d->nc->group_start(), "ncclGroupStart");
    nccl_check(d, d->nc->all_reduce(dx, dx, 1, DIST_NCCL_UINT64, DIST_NCCL_MIN, d->comm, d->cs),
               "ncclAllReduce");
    nccl_check(d, d->nc->all_reduce(dx + 1, dx + 1, 1, DIST_NCCL_UINT64, DIST_NCCL_MAX, d->comm,
                                    d->cs),
               "ncclAllReduce");
    nccl_check(d, d->nc->group_end(), "ncclGroupEnd");
    kn_memcpy_d2h(x, dx, sizeof x, d->cs);
    if (x[0] != x[1])
        return msg_error("the %d ranks ended with different adapters (fnv1a64 %016llx .. "
                         "%016llx); nothing written", d->world, (unsigned long long)x[0],
                         (unsigned long long)x[1]);
    if (d->rank == 0)
        msg_info("%d ranks hold the same adapter and optimizer state (fnv1a64 %016llx)",
                 d->world, (unsigned long long)h);
    return 0;
}

static void be_load(void *ctx, const lora_adapter *a, const adamw *opt)
{
    dist_gpu *d = (dist_gpu *)ctx;
    d->inner.load(d->inner.ctx, a, opt);
}

static void be_store(void *ctx, lora_adapter *a, adamw *opt)
{
    dist_gpu *d = (dist_gpu *)ctx;
    d->inner.store(d->inner.ctx, a, opt);
}

static double be_peak(void *ctx)
{
    dist_gpu *d = (dist_gpu *)ctx;
    return d->inner.peak_bytes ? d->inner.peak_bytes(d->inner.ctx) : 0;
}

static int be_step_whole(void *ctx, const train_batch *micro, size_t n, double lr,
                         double max_norm, uint64_t seed, int64_t step, double *loss,
                         double *norm)
{
    /* train_run calls step_shard when world > 1; this is for world 1 */
    dist_gpu *d = (dist_gpu *)ctx;
    return d->inner.step(d->inner.ctx, micro, n, lr, max_norm, seed, step, loss, norm);
}

extern "C" void dist_gpu_backend(dist_gpu *d, train_backend *b)
{
    memset(b, 0, sizeof *b);
    b->ctx = d;
    b->step = be_step_whole;
    b->step_shard = be_step_shard;
    b->eval = be_eval;
    b->load = be_load;
    b->store = be_store;
    b->peak_bytes = be_peak;
    b->finish = be_finish;
}
