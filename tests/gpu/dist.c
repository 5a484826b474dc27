/* dist.c (gpu_dist): data-parallel training over several GPUs
 * (kernels/dist_gpu.cu, lib/dist.c) against one GPU.
 *
 *   gpu_dist [--gpus n] [--bench]
 *
 * Starts n ranks (default 2) of itself with dist_launch, one per GPU,
 * which join through NCCL; skips without a GPU (77), with fewer GPUs or
 * without NCCL (a skip line, exit 0).
 *
 * The check (default): a small random Llama (4 layers, grouped-query
 * attention, every linear adapted, LoRA dropout on) and random packed
 * rows. Each rank runs a global step of 5 micro-batches twice: on one
 * trainer the single-GPU way (gpu_trainer_step over all 5), on another,
 * with gradient checkpointing, its share through the data-parallel
 * backend (the gradient reduced in buckets while the backward runs). Over
 * 5 steps (buckets of one layer, then one bucket for all; the last step
 * has a single micro-batch, so some rank has none; from the third step
 * the gradient is clipped), the losses, gradient
 * norms, trained adapters and moments must agree within TOL_DP (the same
 * sums in another order), the ranks must hold identical adapters
 * (finish), and the sharded evaluation must give the single-GPU loss.
 * Rank 0 prints the results, summed over the ranks. Since the data-parallel
 * trainer checkpoints and the reference does not, a third trainer runs
 * the single-GPU step with checkpointing too: it must give the plain
 * one's steps (the recomputation reuses the dropout masks), which tells
 * a fault of the checkpointed step from one of the reduction. Every
 * measured difference is printed (# lines).
 *
 * --bench: the 7B seed configuration of bench/train (Llama 2 7B shapes,
 * random NF4 with double quantization, sequence 2048, micro-batch 6 and
 * accumulation 2 per GPU, r=64, dropout 0.1, gradient checkpointing,
 * paged moments unless GPU_TRAIN_PAGED=0), for q_proj,v_proj and
 * all-linear: rank 0 prints the step time and the tokens per second of all
 * ranks together (#json lines, which bench/multi-gpu tabulates). With
 * --gpus 1 it runs the single-GPU path without NCCL, the baseline.
 */
#define _POSIX_C_SOURCE 200809L
#include "gpu_test.h"
#include "model7b.h"

#include "../../kernels/dist_gpu.h"
#include "../../kernels/train_gpu.h"
#include "adamw.h"
#include "dist.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "nf4.h"
#include "packfile.h"
#include "safetensors.h"
#include "train.h"
#include "../tiny_pack.h"

#include <time.h>
#include <unistd.h>

#define TOL_DP                                                                 \
    1e-4 /* data parallel against one GPU: the same fp32 sums,                 \
            added in another order */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double rel(double a, double b)
{
    return fabs(a - b) / (fabs(b) > 0 ? fabs(b) : 1);
}

/* ---- joining the job ------------------------------------------------------
 */

typedef struct job {
    dist_env e;
    dist_nccl nc;
    unsigned char id[DIST_ID_BYTES];
} job;

static int join(job *j)
{
    if (dist_env_read(&j->e) != 0 || dist_select_device(j->e.local_rank) != 0 ||
        kn_init(0) != 0)
        return -1;
    if (j->e.world == 1)
        return 0;
    if (dist_nccl_load(&j->nc) != 0)
        return -1;
    memset(j->id, 0, sizeof j->id);
    if (j->e.rank == 0) {
        dist_nccl_id nid;
        int r = j->nc.get_unique_id(&nid);
        if (r != DIST_NCCL_SUCCESS)
            return dist_nccl_error(&j->nc, "ncclGetUniqueId", r);
        memcpy(j->id, nid.internal, DIST_ID_BYTES);
    }
    return dist_share_id(&j->e, j->id);
}

/* ---- the check --------------------------------------------------------------
 */

#define SEQ 64
#define ROWS 10
#define MICRO 5 /* micro-batches of a step, 2 rows each */

static float *ones(int n)
{
    float *x = xmalloc((size_t)n * sizeof *x);
    for (int i = 0; i < n; i++)
        x[i] = 1.0f;
    return x;
}

static llama_model *tiny_model(void)
{
    llama_model *M = xcalloc(1, sizeof *M);
    llama_config *c = &M->cfg;
    c->dim = 128;
    c->hidden = 384;
    c->n_layers = 4;
    c->n_heads = 4;
    c->n_kv_heads = 2;
    c->head_dim = 32;
    c->vocab = 300;
    c->max_pos = 512;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->bos_id = 1;
    c->eos_id = 2;
    M->dir = (char *)"random-tiny";
    M->embed = gt_rand((int64_t)c->vocab * c->dim, 1.0f);
    M->norm = ones(c->dim);
    M->head.rows = c->vocab;
    M->head.cols = c->dim;
    M->head.f32 = gt_rand((int64_t)c->vocab * c->dim, 0.1f);
    M->layers = xcalloc((size_t)c->n_layers, sizeof *M->layers);
    for (int i = 0; i < c->n_layers; i++) {
        M->layers[i].attn_norm = ones(c->dim);
        M->layers[i].ffn_norm = ones(c->dim);
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            int64_t o, in;
            llama_linear_shape(c, (llama_linear)l, &o, &in);
            M->layers[i].lin[l].rows = o;
            M->layers[i].lin[l].cols = in;
            M->layers[i].lin[l].f32 =
                gt_rand(o * in, (float)(1.7 / sqrt((double)in)));
            M->max_lin_elems =
                o * in > M->max_lin_elems ? o * in : M->max_lin_elems;
        }
    }
    return M;
}

static void tiny_free(llama_model *M)
{
    for (int i = 0; i < M->cfg.n_layers; i++) {
        free(M->layers[i].attn_norm);
        free(M->layers[i].ffn_norm);
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            free(M->layers[i].lin[l].f32);
    }
    free(M->layers);
    free(M->embed);
    free(M->norm);
    free(M->head.f32);
    free(M);
}

/* Random documents packed into rows (tests/tiny_pack.h). */
static void make_data(pack_data *d, int vocab)
{
    const tiny_pack_spec s = {ROWS, SEQ, 40, 7, TP_PROMPT};
    tiny_pack(d, vocab, &s, gt_u64);
}

enum { C_CKPT, C_LOSS, C_NORM, C_PARAMS, C_MOMENTS, C_FINISH, C_EVAL, C_SUM, C_N };

static int check_rank(job *j)
{
    int world = j->e.world, rank = j->e.rank;
    gt_seed(7); /* every rank builds the same model and data */
    llama_model *M = tiny_model();
    pack_data d;
    make_data(&d, M->cfg.vocab);
    lora_config lc;
    memset(&lc, 0, sizeof lc);
    lc.r = 16;
    lc.alpha = 32;
    lc.dropout = 0.1;
    lc.targets = LORA_ALL_LINEAR;
    gpu_trainer *R = gpu_trainer_new(M, &lc, 3 * SEQ, 0);
    gpu_trainer *K = gpu_trainer_new(M, &lc, 3 * SEQ, GPU_TRAINER_CHECKPOINT);
    gpu_trainer *D = gpu_trainer_new(M, &lc, 3 * SEQ, GPU_TRAINER_CHECKPOINT);
    dist_gpu *dg = R && K && D
                       ? dist_gpu_new(&j->nc, &j->e, j->id, D, &M->cfg, &lc)
                       : NULL;
    if (!dg)
        return -1;
    train_backend be;
    dist_gpu_backend(dg, &be);
    /* a trained-looking start: A and B random, so every gradient counts */
    lora_adapter *a, *a1, *a2, *a3;
    lora_new(&M->cfg, &lc, &a);
    lora_new(&M->cfg, &lc, &a1);
    lora_new(&M->cfg, &lc, &a2);
    lora_new(&M->cfg, &lc, &a3);
    for (size_t i = 0; i < a->n_params; i++)
        a->params[i] = gt_uniform(0.05f);
    adamw opt, o1, o2, o3;
    adamw_init(&opt, a->n_params, 0.9, 0.999, 1e-8, 0.01);
    adamw_init(&o1, a->n_params, 0.9, 0.999, 1e-8, 0.01);
    adamw_init(&o2, a->n_params, 0.9, 0.999, 1e-8, 0.01);
    adamw_init(&o3, a->n_params, 0.9, 0.999, 1e-8, 0.01);
    gpu_trainer_load(R, a, &opt);
    gpu_trainer_load(K, a, &opt);
    be.load(be.ctx, a, &opt);
    train_batch tb[MICRO], sub[MICRO];
    memset(tb, 0, sizeof tb);
    for (int k = 0; k < MICRO; k++) {
        uint64_t rows[2] = {(uint64_t)(2 * k), (uint64_t)(2 * k + 1)};
        train_batch_build(&tb[k], &d, rows, 2);
    }
    double c[C_N] = {0}, worst_loss = 0, worst_norm = 0, worst_ckpt = 0;
    for (int s = 0; s < 5; s++) {
        dist_gpu_set_buckets(dg, s < 2 ? 0 : (size_t)1 << 30);
        int nm = s == 4 ? 1 : MICRO;
        /* from step 3 the norm (about 0.44) is clipped: every rank must
         * compute the same clipping factor, bit for bit (finish) */
        double clip = s >= 2 ? 0.25 : 1.0;
        double wsum = 0, l1, n1, l2, n2, l3, n3;
        for (int k = 0; k < nm; k++)
            wsum += tb[k].weight_sum;
        int64_t idx[MICRO];
        size_t mine = dist_shard(nm, world, rank, idx);
        for (size_t i = 0; i < mine; i++)
            sub[i] = tb[idx[i]];
        gpu_trainer_step(R, tb, (size_t)nm, 1e-3, clip, 42, s, &l1, &n1);
        gpu_trainer_step(K, tb, (size_t)nm, 1e-3, clip, 42, s, &l3, &n3);
        be.step_shard(be.ctx, sub, idx, mine, wsum, 1e-3, clip, 42, s, &l2, &n2);
        if (rank == 0)
            printf("# step %d: loss %.7f (1 GPU) %.7f (checkpointed) %.7f "
                   "(%d ranks); gradient norm %.7f %.7f %.7f\n",
                   s + 1, l1, l3, l2, world, n1, n3, n2);
        worst_loss = fmax(worst_loss, rel(l2, l1));
        worst_norm = fmax(worst_norm, rel(n2, n1));
        worst_ckpt = fmax(worst_ckpt, fmax(rel(l3, l1), rel(n3, n1)));
    }
    c[C_LOSS] = !(worst_loss <= TOL_DP);
    c[C_NORM] = !(worst_norm <= TOL_DP);
    gpu_trainer_store(R, a1, &o1);
    gpu_trainer_store(K, a3, &o3);
    be.store(be.ctx, a2, &o2);
    int64_t np = (int64_t)a->n_params;
    double e_ck = gt_rel_err(a3->params, a1->params, np);
    double e_par = gt_rel_err(a2->params, a1->params, np);
    double e_m = gt_rel_err(o2.m, o1.m, (int64_t)o1.n);
    double e_v = gt_rel_err(o2.v, o1.v, (int64_t)o1.n);
    worst_ckpt = fmax(worst_ckpt, e_ck);
    c[C_CKPT] = !(worst_ckpt <= TOL_DP);
    c[C_PARAMS] = !(e_par <= TOL_DP);
    c[C_MOMENTS] = !(e_m <= TOL_DP && e_v <= TOL_DP);
    c[C_FINISH] = be.finish(be.ctx, a2, &o2) != 0;
    double e1, e2;
    gpu_trainer_eval(R, &d, 3, &e1);
    be.eval(be.ctx, &d, 3, &e2);
    c[C_EVAL] = !(rel(e2, e1) <= TOL_DP);
    double x = rank + 1;
    dist_gpu_sum(dg, &x, 1);
    c[C_SUM] = x != world * (world + 1) / 2.0;
    if (rank == 0)
        printf("# rank 0: %d ranks against 1 GPU: worst step loss %.2e, "
               "gradient norm %.2e, adapter %.2e, moments %.2e / %.2e, eval "
               "%.7f vs %.7f (%.2e); 1 GPU checkpointed against plain: worst "
               "%.2e; TOL_DP %.0e\n",
               world, worst_loss, worst_norm, e_par, e_m, e_v, e2, e1,
               rel(e2, e1), worst_ckpt, TOL_DP);
    dist_gpu_sum(dg, c, C_N); /* failures over the ranks */
    if (rank == 0) {
        char w[32];
        snprintf(w, sizeof w, "%d ranks", world);
        const char *what[C_N] = {
            "1 GPU, checkpointed: steps and adapter equal the plain "
            "trainer's (TOL_DP)",
            "per-step loss equals one GPU's (TOL_DP)",
            "per-step gradient norm equals one GPU's (TOL_DP)",
            "trained adapter equals one GPU's (TOL_DP)",
            "AdamW moments equal one GPU's (TOL_DP)",
            "every rank holds the same adapter and moments",
            "sharded evaluation loss equals one GPU's (TOL_DP)",
            "dist_gpu_sum adds over the ranks",
        };
        for (int k = 0; k < C_N; k++) {
            char line[200];
            snprintf(line, sizeof line,
                     "dist %s: %s (buckets of 1 layer and of all; a "
                     "rank with no micro-batch)",
                     w, what[k]);
            gt_check(c[k] == 0, line);
        }
    }
    for (int k = 0; k < MICRO; k++)
        train_batch_free(&tb[k]);
    dist_gpu_free(dg, 0);
    gpu_trainer_free(R);
    gpu_trainer_free(K);
    gpu_trainer_free(D);
    lora_free(a);
    lora_free(a1);
    lora_free(a2);
    lora_free(a3);
    adamw_free(&opt);
    adamw_free(&o1);
    adamw_free(&o2);
    adamw_free(&o3);
    pack_data_free(&d);
    tiny_free(M);
    return gt_failures ? 1 : 0;
}

/* ---- --bench: the 7B seed configuration (as tests/gpu/train.c's) -----------
 */

/* A communicator serves one trainer: the next one's id, from rank 0
 * through this one (a byte per double: the sum is exact). */
static void next_id(job *j, dist_gpu *dg)
{
    double x[DIST_ID_BYTES] = {0};
    dist_nccl_id nid;
    if (j->e.rank == 0) {
        int r = j->nc.get_unique_id(&nid);
        if (r != DIST_NCCL_SUCCESS) {
            dist_nccl_error(&j->nc, "ncclGetUniqueId", r);
            exit(2);
        }
        for (int i = 0; i < DIST_ID_BYTES; i++)
            x[i] = (unsigned char)nid.internal[i];
    }
    dist_gpu_sum(dg, x, DIST_ID_BYTES);
    for (int i = 0; i < DIST_ID_BYTES; i++)
        j->id[i] = (unsigned char)x[i];
}

static int bench_rank(job *j)
{
    enum { L = GT7B_LAYERS, DIM = GT7B_DIM, HID = GT7B_HIDDEN, VOCAB = GT7B_VOCAB, T = 2048,
           BS = 6, ACC = 2 };
    int world = j->e.world, rank = j->e.rank;
    gt_seed(11);
    gt_model7b B;
    gt_model7b_init(&B);
    llama_model M = B.m;
    llama_config *c = &M.cfg;
    /* the global step: world * ACC micro-batches of BS one-span rows */
    int nmicro = world * ACC, nrows = nmicro * BS;
    pack_data d;
    memset(&d, 0, sizeof d);
    d.h.seq_len = T;
    d.h.vocab_size = VOCAB;
    d.h.n_rows = (uint64_t)nrows;
    d.ids = xmalloc((size_t)nrows * T * 4);
    d.weights = xmalloc((size_t)nrows * T);
    d.row_spans = xmalloc(((size_t)nrows + 1) * sizeof *d.row_spans);
    d.spans = xmalloc((size_t)nrows * sizeof *d.spans);
    for (int r = 0; r < nrows; r++) {
        for (int t = 0; t < T; t++) {
            d.ids[(size_t)r * T + t] = 3 + (uint32_t)(gt_u64() % (VOCAB - 3));
            d.weights[(size_t)r * T + t] = t > 0;
        }
        d.row_spans[r] = (uint64_t)r;
        d.spans[r].start = 0;
        d.spans[r].len = T;
    }
    d.row_spans[nrows] = (uint64_t)nrows;
    d.h.n_spans = (uint64_t)nrows;
    int64_t idx[64];
    size_t mine = dist_shard(nmicro, world, rank, idx);
    train_batch tb[64];
    memset(tb, 0, sizeof tb);
    double wsum = 0;
    for (int k = 0; k < nmicro; k++) {
        uint64_t rows[BS];
        for (int r = 0; r < BS; r++)
            rows[r] = (uint64_t)(k * BS + r);
        train_batch tmp;
        memset(&tmp, 0, sizeof tmp);
        train_batch_build(&tmp, &d, rows, BS);
        wsum += tmp.weight_sum;
        train_batch_free(&tmp);
    }
    for (size_t i = 0; i < mine; i++) {
        uint64_t rows[BS];
        for (int r = 0; r < BS; r++)
            rows[r] = (uint64_t)(idx[i] * BS + r);
        train_batch_build(&tb[i], &d, rows, BS);
    }
    double tokens = (double)nrows * T;
    const char *names[2] = {"q_proj,v_proj", "all-linear"};
    uint32_t masks[2] = {LORA_DEFAULT_TARGETS, LORA_ALL_LINEAR};
    const char *pe = getenv("GPU_TRAIN_PAGED");
    int paged = !(pe && !strcmp(pe, "0"));
    int flags = GPU_TRAINER_CHECKPOINT | (paged ? GPU_TRAINER_PAGED_OPTIM : 0);
    if (rank == 0)
        printf("# bench 7B data parallel: %d x %s, seq %d, micro-batch %d, "
               "accumulation %d "
               "per GPU (global batch %d rows), NF4 double quant, LoRA r=64 "
               "dropout 0.1, "
               "gradient checkpointing, moments %s, NCCL %d\n",
               world, kn_device_name(), T, BS, ACC, nrows,
               paged ? "paged" : "on the device", j->nc.version);
    int rc = 0;
    for (int v = 0; v < 2 && rc == 0; v++) {
        lora_config lc;
        memset(&lc, 0, sizeof lc);
        lc.r = 64;
        lc.alpha = 16;
        lc.dropout = 0.1;
        lc.targets = masks[v];
        lora_adapter *a;
        lora_new(c, &lc, &a);
        lora_init(a, 42);
        adamw opt;
        adamw_init(&opt, a->n_params, 0.9, 0.999, 1e-8, 0.0);
        gpu_trainer *G = gpu_trainer_new(&M, &lc, (int64_t)BS * T, flags);
        dist_gpu *dg = NULL;
        train_backend be;
        if (!G)
            return -1;
        gpu_trainer_backend(G, &be);
        if (world > 1) {
            if (!(dg = dist_gpu_new(&j->nc, &j->e, j->id, G, c, &lc)))
                return -1;
            dist_gpu_backend(dg, &be);
        }
        be.load(be.ctx, a, &opt);
        double loss, norm, best = 1e30, sum = 0;
        enum { WARM = 1, STEPS = 3 };
        for (int s = 0; s < WARM + STEPS && rc == 0; s++) {
            double ts = now_s();
            rc = world > 1 ? be.step_shard(be.ctx, tb, idx, mine, wsum, 2e-4,
                                           0.3, 42, s, &loss, &norm)
                           : gpu_trainer_step(G, tb, mine, 2e-4, 0.3, 42, s,
                                              &loss, &norm);
            double dt = now_s() - ts;
            if (rank == 0)
                printf("#   %s step %d: %.3f s, loss %.4f, grad norm %.4f\n",
                       names[v], s + 1, dt, loss, norm);
            if (s >= WARM) {
                sum += dt;
                best = dt < best ? dt : best;
            }
        }
        double step = sum / STEPS;
        if (rank == 0) {
            printf("# bench 7B %-13s on %d GPU%s: %.0f tokens/s, step %.3f s "
                   "(best %.3f), "
                   "peak %.2f GiB, %d gradient buckets\n",
                   names[v], world, world > 1 ? "s" : "", tokens / step, step,
                   best, gpu_trainer_peak_bytes(G) / 1073741824.0,
                   dg ? dist_gpu_buckets(dg) : 0);
            printf("#json "
                   "{\"stack\":\"lora-train\",\"gpus\":%d,\"targets\":\"%s\","
                   "\"tokens_per_s\":%.1f,\"step_s\":%.4f,\"peak_gib\":%.3f,"
                   "\"device\":\"%s\"}\n",
                   world, names[v], tokens / step, step,
                   gpu_trainer_peak_bytes(G) / 1073741824.0, kn_device_name());
            fflush(stdout);
        }
        if (dg && v == 0 && rc == 0)
            next_id(j, dg);
        dist_gpu_free(dg, rc != 0);
        gpu_trainer_free(G);
        adamw_free(&opt);
        lora_free(a);
    }
    for (size_t i = 0; i < mine; i++)
        train_batch_free(&tb[i]);
    pack_data_free(&d);
    gt_model7b_free(&B);
    return rc ? 1 : 0;
}

int main(int argc, char **argv)
{
    int gpus = 2, bench = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bench"))
            bench = 1;
        else if (!strcmp(argv[i], "--gpus") && i + 1 < argc)
            gpus = atoi(argv[++i]);
    }
    const char *launched = getenv("QLORA_DIST_LAUNCHED");
    if (launched && !strcmp(launched, "1")) { /* a rank */
        static char name[48];
        snprintf(name, sizeof name, "gpu_dist[rank %s]", getenv("RANK"));
        msg_init(name);
        job j;
        memset(&j, 0, sizeof j);
        if (join(&j) != 0)
            return 2;
        int rc = bench ? bench_rank(&j) : check_rank(&j);
        dist_nccl_unload(&j.nc);
        return rc < 0 ? 2 : rc;
    }
    msg_init("gpu_dist");
    /* the launcher: no CUDA context here, the ranks make theirs. No GPU:
     * 77, as every kernel test; too few, or no NCCL: a skip line, exit 0
     * (on a GPU machine 77 reads as a failure) */
    int have = kn_device_count();
    if (gpus < 1 || have < gpus || (!bench && gpus < 2)) {
        printf("skip dist: %d GPU%s for %d ranks\n", have, have == 1 ? "" : "s",
               gpus);
        return have ? 0 : 77;
    }
    if (gpus > 1) {
        dist_nccl nc;
        if (dist_nccl_load(&nc) != 0) {
            printf("skip dist: no NCCL (set QLORA_NCCL)\n");
            return 0;
        }
        dist_nccl_unload(&nc);
    }
    fflush(stdout);
    return dist_launch(gpus, argv);
}
