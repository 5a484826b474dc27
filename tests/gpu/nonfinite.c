/* nonfinite.c (gpu_nonfinite): a GPU step whose loss or gradient is not
 * finite changes nothing, as train_step does on the CPU (train.h), so that
 * train_run can skip it (on_nonfinite: skip) on the device too.
 *
 * On ../shared's stories260K (all seven linears adapted, LoRA dropout on),
 * one finite step first (so that the moments are not zero), then a step
 * over the same rows with one target's loss weight poisoned (NaN, then
 * +infinity, which makes the loss and the gradient non-finite):
 *   - the step returns 0 and reports the non-finite loss;
 *   - the adapter and both AdamW moments are bit for bit as before, and the
 *     step count advanced by one, exactly as the CPU's train_step on the
 *     same poisoned step (checked side by side);
 *   - a following finite step proceeds (finite loss, the adapter moves) and
 *     gives bit for bit what a fresh trainer loaded with the state after
 *     the skip computes: the skip left nothing behind on the device.
 * Once with plain settings, once with gradient checkpointing and the
 * moments in pinned host memory (GPU_TRAINER_PAGED_OPTIM); and once
 * through the data-parallel backend (kernels/dist_gpu.cu) as one rank of
 * one, when NCCL loads (a skip line otherwise): the shard step decides
 * after the reduction, as every rank of a larger job does.
 * Last, the run-to-run reproducibility of a step's gradient (repro_test). */
#define _POSIX_C_SOURCE 200809L
#include "gpu_test.h"

#include "../../kernels/dist_gpu.h"
#include "../../kernels/train_gpu.h"
#include "adamw.h"
#include "dist.h"
#include "llama.h"
#include "lora.h"
#include "packfile.h"
#include "train.h"
#include "../tiny_pack.h"

#define SEQ 128
#define ROWS 8

/* Random documents packed into rows (tests/tiny_pack.h). */
static void make_data(pack_data *d, int vocab)
{
    const tiny_pack_spec s = {ROWS, SEQ, 60, 0, TP_ALL};
    tiny_pack(d, vocab, &s, gt_u64);
}

/* A step's two micro-batches of two rows each (rows r0 .. r0+3). */
static void build_step(train_batch tb[2], const pack_data *d, uint64_t r0)
{
    for (int k = 0; k < 2; k++) {
        uint64_t rows[2] = {(r0 + 2 * (uint64_t)k) % ROWS, (r0 + 2 * (uint64_t)k + 1) % ROWS};
        train_batch_build(&tb[k], d, rows, 2);
    }
}

/* Poisons the loss weight of the second micro-batch's first target. */
static void poison(train_batch *tb, float v)
{
    for (int64_t t = 0; t < tb->b.n; t++)
        if (tb->targets[t] >= 0 && tb->weights[t] > 0) {
            tb->weights[t] = v;
            return;
        }
}

typedef struct snap {
    lora_adapter *a;
    adamw o;
} snap;

static void snap_new(snap *s, const llama_model *m, const lora_config *lc)
{
    lora_new(&m->cfg, lc, &s->a);
    adamw_init(&s->o, s->a->n_params, 0.9, 0.999, 1e-8, 0.01);
}

static void snap_free(snap *s)
{
    adamw_free(&s->o);
    lora_free(s->a);
}

static void snap_copy(snap *dst, const snap *src)
{
    memcpy(dst->a->params, src->a->params, src->a->n_params * sizeof(float));
    memcpy(dst->o.m, src->o.m, src->o.n * sizeof(float));
    memcpy(dst->o.v, src->o.v, src->o.n * sizeof(float));
    dst->o.step = src->o.step;
}

/* Bit-identical adapter and moments. */
static int snap_same(const snap *x, const snap *y)
{
    size_t n = x->a->n_params * sizeof(float);
    return !memcmp(x->a->params, y->a->params, n) && !memcmp(x->o.m, y->o.m, n) &&
           !memcmp(x->o.v, y->o.v, n);
}

/* The step through the single-GPU entry point, or (be non-NULL) through a
 * data-parallel backend's shard step with every micro-batch. */
static int step(gpu_trainer *G, const train_backend *be, const train_batch *tb, int64_t s,
                double *loss, double *norm)
{
    if (!be)
        return gpu_trainer_step(G, tb, 2, 2e-3, 1.0, 42, s, loss, norm);
    int64_t index[2] = {0, 1};
    return be->step_shard(be->ctx, tb, index, 2, tb[0].weight_sum + tb[1].weight_sum, 2e-3,
                          1.0, 42, s, loss, norm);
}

static void guard_test(const llama_model *m, const pack_data *d, const char *tag, int flags,
                       const dist_nccl *nc)
{
    lora_config lc;
    memset(&lc, 0, sizeof lc);
    lc.r = 8;
    lc.alpha = 16;
    lc.dropout = 0.1;
    lc.targets = LORA_ALL_LINEAR;
    snap s0, s1, cpu, ref;
    snap_new(&s0, m, &lc);
    snap_new(&s1, m, &lc);
    snap_new(&cpu, m, &lc);
    snap_new(&ref, m, &lc);
    lora_init(s0.a, 42);
    gpu_trainer *G = gpu_trainer_new(m, &lc, (int64_t)2 * SEQ, flags);
    if (!G) {
        gt_check(0, "gpu_trainer_new");
        return;
    }
    dist_gpu *dg = NULL;
    train_backend be;
    if (nc) {
        dist_env e;
        memset(&e, 0, sizeof e);
        e.world = 1;
        dist_nccl_id nid;
        unsigned char id[DIST_ID_BYTES];
        if (nc->get_unique_id(&nid) != DIST_NCCL_SUCCESS) {
            gt_check(0, "ncclGetUniqueId");
            gpu_trainer_free(G);
            return;
        }
        memcpy(id, nid.internal, DIST_ID_BYTES);
        dg = dist_gpu_new(nc, &e, id, G, &m->cfg, &lc);
        if (!dg) {
            gt_check(0, "dist_gpu_new (one rank)");
            gpu_trainer_free(G);
            return;
        }
        dist_gpu_backend(dg, &be);
    }
    const train_backend *bp = dg ? &be : NULL;
    gpu_trainer_load(G, s0.a, &s0.o);
    train_batch tb[2], bad[2], nx[2];
    memset(tb, 0, sizeof tb);
    memset(bad, 0, sizeof bad);
    memset(nx, 0, sizeof nx);
    build_step(tb, d, 0);
    build_step(nx, d, 4);
    float *grad = xcalloc(s0.a->n_params, sizeof *grad);
    char what[256];
    double loss, norm;
    int64_t s = 0;
    int rc = step(G, bp, tb, s++, &loss, &norm);
    snprintf(what, sizeof what, "%s: a finite step (loss %.4f, grad norm %.4f)", tag, loss, norm);
    gt_check(rc == 0 && isfinite(loss) && isfinite(norm), what);
    gpu_trainer_store(G, s0.a, &s0.o);
    const float vals[2] = {NAN, INFINITY};
    for (int v = 0; v < 2; v++) {
        const char *vn = v ? "+inf" : "NaN";
        build_step(bad, d, 0);
        poison(&bad[1], vals[v]);
        rc = step(G, bp, bad, s, &loss, &norm);
        snprintf(what, sizeof what, "%s: a %s loss weight: the step reports it (loss %g, "
                 "grad norm %g)", tag, vn, loss, norm);
        gt_check(rc == 0 && !isfinite(loss), what);
        gpu_trainer_store(G, s1.a, &s1.o);
        snprintf(what, sizeof what, "%s: %s step skipped: adapter and moments unchanged (bits)",
                 tag, vn);
        gt_check(snap_same(&s1, &s0), what);
        snprintf(what, sizeof what, "%s: %s step skipped: step count %lld -> %lld", tag, vn,
                 (long long)s0.o.step, (long long)s1.o.step);
        gt_check(s1.o.step == s0.o.step + 1, what);
        /* the CPU's train_step on the same step, from the same state */
        snap_copy(&cpu, &s0);
        double lcpu, ncpu;
        rc = train_step(m, cpu.a, &cpu.o, grad, bad, 2, 2e-3, 1.0, 0, 42, s, &lcpu, &ncpu);
        snprintf(what, sizeof what, "%s: %s step: the CPU skips it alike (loss %g, step "
                 "count %lld on both)", tag, vn, lcpu, (long long)cpu.o.step);
        gt_check(rc == 0 && !isfinite(lcpu) && snap_same(&cpu, &s0) &&
                     cpu.o.step == s1.o.step, what);
        s0.o.step = s1.o.step;
        s++;
    }
    /* a finite step after the skips, against a fresh trainer given the
     * state the skips left */
    rc = step(G, bp, nx, s, &loss, &norm);
    snprintf(what, sizeof what, "%s: the next finite step proceeds (loss %.4f, grad norm %.4f)",
             tag, loss, norm);
    gt_check(rc == 0 && isfinite(loss) && isfinite(norm), what);
    gpu_trainer_store(G, s1.a, &s1.o);
    snprintf(what, sizeof what, "%s: the next step moved the adapter and counted (step %lld)",
             tag, (long long)s1.o.step);
    gt_check(!snap_same(&s1, &s0) && s1.o.step == s0.o.step + 1, what);
    gpu_trainer *G2 = gpu_trainer_new(m, &lc, (int64_t)2 * SEQ, flags);
    double l2 = NAN, n2 = NAN;
    if (G2) {
        gpu_trainer_load(G2, s0.a, &s0.o);
        rc = gpu_trainer_step(G2, nx, 2, 2e-3, 1.0, 42, s, &l2, &n2);
        gpu_trainer_store(G2, ref.a, &ref.o);
        gpu_trainer_free(G2);
    }
    snprintf(what, sizeof what, "%s: after the skips, a fresh trainer from the skipped state: "
             "loss %.6f vs %.6f", tag, loss, l2);
    gt_check(G2 && rc == 0, what);
    snprintf(what, sizeof what, "%s: ... gives the same adapter", tag);
    gt_compare(what, s1.a->params, ref.a->params, (int64_t)s1.a->n_params,
               dg ? TOL_F32 : TOL_EXACT, dg ? "TOL_F32" : "TOL_EXACT");
    snprintf(what, sizeof what, "%s: ... the same second moments", tag);
    gt_compare(what, s1.o.v, ref.o.v, (int64_t)s1.o.n, dg ? TOL_F32 : TOL_EXACT,
               dg ? "TOL_F32" : "TOL_EXACT");
    for (int k = 0; k < 2; k++) {
        train_batch_free(&tb[k]);
        train_batch_free(&bad[k]);
        train_batch_free(&nx[k]);
    }
    free(grad);
    if (dg)
        dist_gpu_free(dg, 0);
    gpu_trainer_free(G);
    snap_free(&s0);
    snap_free(&s1);
    snap_free(&cpu);
    snap_free(&ref);
}

/* Run to run: one batch's adapter gradient from two fresh trainers must
 * agree bit for bit (what a resumed run relies on: crash-resume-gpu.sh).
 * Once as lora-train runs, once with the fused LoRA products off
 * (KN_LORA_FUSED=0) and once with the first attention forward
 * (KN_ATTN_FWD_V1=1), so that a difference points at a kernel. The loss
 * sum too (kernels/xent.cu used to add the rows' terms with atomicAdd, in
 * no fixed order: the logged loss varied in its last bits, the adapter
 * did not). */
static void repro_test(const llama_model *m, const pack_data *d)
{
    lora_config lc;
    memset(&lc, 0, sizeof lc);
    lc.r = 16; /* the fused products take the 64-wide inputs at r = 16 */
    lc.alpha = 16;
    lc.dropout = 0.1;
    lc.targets = LORA_ALL_LINEAR;
    lora_adapter *a;
    lora_new(&m->cfg, &lc, &a);
    lora_init(a, 7);
    for (int32_t i = 0; i < m->cfg.n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const lora_slot *sl = lora_slot_of(a, i, (llama_linear)l);
            float *B = lora_B(a, i, (llama_linear)l);
            for (int64_t j = 0; j < sl->out * lc.r; j++)
                B[j] = gt_uniform(0.05f);
        }
    adamw opt;
    adamw_init(&opt, a->n_params, 0.9, 0.999, 1e-8, 0.0);
    uint64_t rows[4] = {1, 6, 3, 0};
    train_batch tb;
    memset(&tb, 0, sizeof tb);
    train_batch_build(&tb, d, rows, 4);
    float *g[2] = {xcalloc(a->n_params, 4), xcalloc(a->n_params, 4)};
    const char *envs[3][2] = {{NULL, NULL}, {"KN_LORA_FUSED", "0"}, {"KN_ATTN_FWD_V1", "1"}};
    for (int e = 0; e < 3; e++) {
        if (envs[e][0])
            setenv(envs[e][0], envs[e][1], 1);
        double ls[2] = {0, 0};
        int rc = 0;
        for (int k = 0; k < 2; k++) {
            gpu_trainer *G = gpu_trainer_new(m, &lc, (int64_t)4 * SEQ, 0);
            if (!G) {
                rc = -1;
                break;
            }
            gpu_trainer_load(G, a, &opt);
            rc |= gpu_trainer_gradient(G, &tb.b, train_dropout_key(42, 5, 1),
                                       (float)(1.0 / tb.weight_sum), g[k], &ls[k]);
            gpu_trainer_free(G);
        }
        char what[160];
        snprintf(what, sizeof what, "run to run%s%s%s%s: the same adapter gradient",
                 envs[e][0] ? " with " : "", envs[e][0] ? envs[e][0] : "",
                 envs[e][0] ? "=" : "", envs[e][0] ? envs[e][1] : "");
        if (rc != 0)
            gt_check(0, what);
        else
            gt_compare(what, g[1], g[0], (int64_t)a->n_params, TOL_EXACT, "TOL_EXACT");
        snprintf(what, sizeof what, "run to run%s%s%s%s: the same loss sum (%.9g, %.9g)",
                 envs[e][0] ? " with " : "", envs[e][0] ? envs[e][0] : "",
                 envs[e][0] ? "=" : "", envs[e][0] ? envs[e][1] : "", ls[0], ls[1]);
        gt_check(rc == 0 && ls[0] == ls[1], what);
        if (envs[e][0])
            unsetenv(envs[e][0]);
    }
    free(g[0]);
    free(g[1]);
    train_batch_free(&tb);
    adamw_free(&opt);
    lora_free(a);
}

int main(int argc, char **argv)
{
    gt_init("nonfinite", argc, argv);
    gt_seed(13);
    const char *sh = getenv("SHARED") && *getenv("SHARED") ? getenv("SHARED") : "../shared";
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/models/stories260K", sh);
    llama_model *m = NULL;
    if (llama_load(dir, &m) != 0) {
        printf("skip nonfinite: %s not loadable (SHARED unset or absent)\n", dir);
        return 0;
    }
    pack_data d;
    make_data(&d, m->cfg.vocab);
    guard_test(m, &d, "stories260K", 0, NULL);
    guard_test(m, &d, "stories260K checkpointed paged moments",
               GPU_TRAINER_CHECKPOINT | GPU_TRAINER_PAGED_OPTIM, NULL);
    dist_nccl nc;
    if (dist_nccl_load(&nc) == 0) {
        guard_test(m, &d, "stories260K data parallel (1 rank)", 0, &nc);
        dist_nccl_unload(&nc);
    } else {
        printf("skip nonfinite data parallel: no NCCL (set QLORA_NCCL)\n");
    }
    repro_test(m, &d);
    pack_data_free(&d);
    llama_free(m);
    return gt_done();
}
