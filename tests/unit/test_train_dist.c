/* test_train_dist.c: train_run's data-parallel loop (train_inputs.world >
 * 1) without a GPU or NCCL: two threads run train_run as ranks 0 and 1 of
 * one job, through a backend whose step_shard computes its micro-batches'
 * gradient on the CPU (llama_forward_backward) and sums it with the other
 * rank's through shared memory, as NCCL would. Against one process with
 * twice the accumulation, on a small random model with LoRA dropout:
 *   - every rank gets its micro-batches k % 2 of each step, with their
 *     dropout keys, and the whole step's weight;
 *   - the per-step losses and the trained adapter agree (the same fp32
 *     sums in another order), an evaluation too;
 *   - rank 0 alone emits events and writes (rank 1's output directory is
 *     never created); --dump-batches' events list the same micro-batches
 *     with the same rows as the single process's;
 *   - the checkpoint records world_size 2 and a single process refuses it.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adamw.h"
#include "check.h"
#include "io.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "packfile.h"
#include "strbuf.h"
#include "train.h"
#include "../tiny_pack.h"

#define SEQ 32
#define ROWS 11      /* an odd count: a last step with fewer micro-batches */
#define REL_TOL 1e-5 /* the same fp32 sums in another order */

static uint64_t rng = 0x1234567;
static uint64_t next_u64(void)
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float uniform(float a)
{
    return ((float)(next_u64() >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * a;
}
static float *rnd(int64_t n, float a)
{
    float *x = xmalloc((size_t)n * sizeof *x);
    for (int64_t i = 0; i < n; i++)
        x[i] = uniform(a);
    return x;
}

static llama_model *tiny_model(void)
{
    llama_model *M = xcalloc(1, sizeof *M);
    llama_config *c = &M->cfg;
    c->dim = 16;
    c->hidden = 32;
    c->n_layers = 2;
    c->n_heads = 2;
    c->n_kv_heads = 1;
    c->head_dim = 8;
    c->vocab = 40;
    c->max_pos = 64;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->bos_id = 1;
    c->eos_id = 2;
    M->dir = xstrdup("random-tiny");
    M->embed = rnd((int64_t)c->vocab * c->dim, 1.0f);
    M->norm = rnd(c->dim, 0.1f);
    for (int i = 0; i < c->dim; i++)
        M->norm[i] += 1.0f;
    M->head.rows = c->vocab;
    M->head.cols = c->dim;
    M->head.f32 = rnd((int64_t)c->vocab * c->dim, 0.3f);
    M->layers = xcalloc((size_t)c->n_layers, sizeof *M->layers);
    for (int i = 0; i < c->n_layers; i++) {
        M->layers[i].attn_norm = rnd(c->dim, 0.0f);
        M->layers[i].ffn_norm = rnd(c->dim, 0.0f);
        for (int k = 0; k < c->dim; k++)
            M->layers[i].attn_norm[k] = M->layers[i].ffn_norm[k] = 1.0f;
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            int64_t o, in;
            llama_linear_shape(c, (llama_linear)l, &o, &in);
            M->layers[i].lin[l].rows = o;
            M->layers[i].lin[l].cols = in;
            M->layers[i].lin[l].f32 =
                rnd(o * in, (float)(1.5 / sqrt((double)in)));
            if (o * in > M->max_lin_elems)
                M->max_lin_elems = o * in;
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
    free(M->dir);
    free(M);
}

/* Random documents packed into rows (tests/tiny_pack.h). */
static void make_data(pack_data *d, int vocab)
{
    const tiny_pack_spec s = {ROWS, SEQ, 14, 4, TP_DROP4};
    tiny_pack(d, vocab, &s, next_u64);
}

/* ---- two ranks in one process ------------------------------------------- */

typedef struct shared {
    pthread_barrier_t bar;
    float *part[2]; /* each rank's gradient */
    double loss[2];
    uint64_t hash[2];
} shared;

typedef struct rank_ctx {
    int rank;
    shared *sh;
    const llama_model *m;
    lora_adapter *a; /* the backend's own state */
    adamw opt;
    float *grad;
    int steps, micro_seen, bad_key;
} rank_ctx;

static int fake_step_shard(void *ctx, const train_batch *micro,
                           const int64_t *index, size_t n, double wsum,
                           double lr, double max_norm, uint64_t seed,
                           int64_t step, double *loss, double *norm)
{
    rank_ctx *r = ctx;
    size_t np = r->a->n_params;
    float *mine = r->sh->part[r->rank];
    memset(mine, 0, np * sizeof(float));
    double ls = 0;
    for (size_t i = 0; i < n; i++) {
        if (index[i] % 2 != r->rank)
            r->bad_key++;
        r->micro_seen++;
        if (micro[i].b.n == 0)
            continue;
        llama_train_opts o = {0, train_dropout_key(seed, step, index[i])};
        double l = 0;
        if (llama_forward_backward(r->m, r->a, &micro[i].b, &o,
                                   wsum > 0 ? (float)(1.0 / wsum) : 0.0f, mine,
                                   &l) != 0)
            return -1;
        ls += l;
    }
    r->sh->loss[r->rank] = ls;
    pthread_barrier_wait(&r->sh->bar);
    /* the "all-reduce": both ranks add the parts in the same order */
    for (size_t i = 0; i < np; i++)
        r->grad[i] = r->sh->part[0][i] + r->sh->part[1][i];
    double total = r->sh->loss[0] + r->sh->loss[1];
    pthread_barrier_wait(&r->sh->bar);
    *loss = wsum > 0 ? total / wsum : NAN;
    *norm = grad_norm(r->grad, np);
    grad_clip(r->grad, np, *norm, max_norm);
    adamw_step(&r->opt, r->a->params, r->grad, lr);
    r->steps++;
    return 0;
}

static int fake_step(void *ctx, const train_batch *micro, size_t n, double lr,
                     double max_norm, uint64_t seed, int64_t step, double *loss,
                     double *norm)
{
    (void)ctx, (void)micro, (void)n, (void)lr, (void)max_norm, (void)seed,
        (void)step;
    *loss = *norm = NAN;
    return msg_error("step called in a data-parallel run");
}

static int fake_eval(void *ctx, const pack_data *d, int64_t rows, double *loss)
{
    rank_ctx *r = ctx;
    return train_eval(r->m, r->a, d, rows, loss);
}

static void fake_load(void *ctx, const lora_adapter *a, const adamw *o)
{
    rank_ctx *r = ctx;
    memcpy(r->a->params, a->params, a->n_params * sizeof(float));
    memcpy(r->opt.m, o->m, o->n * sizeof(float));
    memcpy(r->opt.v, o->v, o->n * sizeof(float));
    r->opt.step = o->step;
}

static void fake_store(void *ctx, lora_adapter *a, adamw *o)
{
    rank_ctx *r = ctx;
    memcpy(a->params, r->a->params, a->n_params * sizeof(float));
    memcpy(o->m, r->opt.m, o->n * sizeof(float));
    memcpy(o->v, r->opt.v, o->n * sizeof(float));
    o->step = r->opt.step;
}

static int fake_finish(void *ctx, const lora_adapter *a, const adamw *o)
{
    rank_ctx *r = ctx;
    uint64_t h = 0xcbf29ce484222325ull;
    const unsigned char *p = (const unsigned char *)a->params;
    for (size_t i = 0; i < a->n_params * sizeof(float); i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    p = (const unsigned char *)o->m;
    for (size_t i = 0; i < o->n * sizeof(float); i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    r->sh->hash[r->rank] = h;
    pthread_barrier_wait(&r->sh->bar);
    int same = r->sh->hash[0] == r->sh->hash[1];
    pthread_barrier_wait(&r->sh->bar);
    return same ? 0 : msg_error("ranks differ");
}

/* What the callbacks saw. */
typedef struct seen {
    int logs, evals, saves;
    strbuf batches; /* "step micro rows..." per BATCH event */
    double loss[16];
    double eval_loss;
} seen;

static void on_event(const train_event *ev, void *ctx)
{
    seen *s = ctx;
    switch (ev->kind) {
    case TRAIN_EV_LOG:
        if (ev->step - 1 < 16)
            s->loss[ev->step - 1] = ev->loss;
        s->logs++;
        break;
    case TRAIN_EV_EVAL:
        s->eval_loss = ev->eval_loss;
        s->evals++;
        break;
    case TRAIN_EV_SAVE:
        s->saves++;
        break;
    case TRAIN_EV_BATCH:
        sb_printf(&s->batches, "%lld %lld %.9g:", (long long)ev->step,
                  (long long)ev->micro, ev->batch->weight_sum);
        for (size_t i = 0; i < ev->n_rows; i++)
            sb_printf(&s->batches, " %llu", (unsigned long long)ev->rows[i]);
        sb_printf(&s->batches, " n=%lld\n", (long long)ev->batch->b.n);
        break;
    default:
        break;
    }
}

typedef struct run_args {
    train_inputs in;
    int rc;
} run_args;

static void *run_thread(void *p)
{
    run_args *ra = p;
    ra->rc = train_run(&ra->in);
    return NULL;
}

static int config(train_config *c, const char *out, int acc, int steps)
{
    char v[32];
    int rc = cfg_defaults(train_fields, train_nfields, c);
    const char *kv[][2] = {
        {"r", "4"},
        {"lora_alpha", "8"},
        {"lora_dropout", "0.1"},
        {"target_modules", "all-linear"},
        {"per_device_train_batch_size", "2"},
        {"per_device_eval_batch_size", "3"},
        {"learning_rate", "1e-2"},
        {"logging_steps", "1"},
        {"save_steps", "2"},
        {"max_grad_norm", "0.5"},
        {"seed", "5"},
        {"output_dir", out},
    };
    for (size_t i = 0; rc == 0 && i < sizeof kv / sizeof *kv; i++)
        rc =
            cfg_set(train_fields, train_nfields, c, kv[i][0], kv[i][1], "test");
    snprintf(v, sizeof v, "%d", acc);
    if (rc == 0)
        rc = cfg_set(train_fields, train_nfields, c,
                     "gradient_accumulation_steps", v, "test");
    snprintf(v, sizeof v, "%d", steps);
    if (rc == 0)
        rc = cfg_set(train_fields, train_nfields, c, "max_steps", v, "test");
    return rc;
}

static double rel_err(const float *x, const float *y, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - y[i];
        num += d * d;
        den += (double)y[i] * y[i];
    }
    return den > 0 ? sqrt(num / den) : (num > 0 ? INFINITY : 0);
}

int main(void)
{
    msg_init("test_train_dist");
    msg_verbosity = 0;
    char dir[] = "/tmp/test_train_dist.XXXXXX";
    if (!mkdtemp(dir)) {
        printf("not ok test_train_dist: mkdtemp\n");
        return 1;
    }
    char one_dir[256], r0_dir[256], r1_dir[256];
    snprintf(one_dir, sizeof one_dir, "%s/one", dir);
    snprintf(r0_dir, sizeof r0_dir, "%s/rank0", dir);
    snprintf(r1_dir, sizeof r1_dir, "%s/rank1", dir);
    llama_model *M = tiny_model();
    pack_data d, e;
    make_data(&d, M->cfg.vocab);
    make_data(&e, M->cfg.vocab);
    enum { STEPS = 5 };
    /* 11 rows, 2 a micro-batch: 6 micro-batches, steps of 4 -> the second
     * step of each epoch has 2, and step 5 starts the third epoch */

    /* one process, accumulation 4 */
    train_config c1, c2;
    if (config(&c1, one_dir, 4, STEPS) != 0 ||
        config(&c2, r0_dir, 2, STEPS) != 0) {
        printf("not ok test_train_dist: configuration\n");
        return 1;
    }
    seen s1, s0, sr1;
    memset(&s1, 0, sizeof s1);
    memset(&s0, 0, sizeof s0);
    memset(&sr1, 0, sizeof sr1);
    train_inputs in1 = {.cfg = &c1,
                        .model = M,
                        .train = &d,
                        .eval = &e,
                        .cb = on_event,
                        .cb_ctx = &s1,
                        .want_batches = 1};
    int rc1 = train_run(&in1);

    /* two ranks, accumulation 2 each */
    shared sh;
    memset(&sh, 0, sizeof sh);
    pthread_barrier_init(&sh.bar, NULL, 2);
    lora_config lc;
    train_lora_config(&c2, &lc);
    rank_ctx rk[2];
    train_backend be[2];
    run_args ra[2];
    train_config c3; /* rank 1's: another output directory, never created */
    config(&c3, r1_dir, 2, STEPS);
    for (int r = 0; r < 2; r++) {
        memset(&rk[r], 0, sizeof rk[r]);
        rk[r].rank = r;
        rk[r].sh = &sh;
        rk[r].m = M;
        lora_new(&M->cfg, &lc, &rk[r].a);
        adamw_init(&rk[r].opt, rk[r].a->n_params, c2.adam_beta1, c2.adam_beta2,
                   c2.adam_epsilon, c2.weight_decay);
        rk[r].grad = xcalloc(rk[r].a->n_params, sizeof(float));
        sh.part[r] = xcalloc(rk[r].a->n_params, sizeof(float));
        memset(&be[r], 0, sizeof be[r]);
        be[r].ctx = &rk[r];
        be[r].step = fake_step;
        be[r].step_shard = fake_step_shard;
        be[r].eval = fake_eval;
        be[r].load = fake_load;
        be[r].store = fake_store;
        be[r].finish = fake_finish;
        train_inputs in = {.cfg = r ? &c3 : &c2,
                           .model = M,
                           .train = &d,
                           .eval = &e,
                           .cb = on_event,
                           .cb_ctx = r ? &sr1 : &s0,
                           .want_batches = 1,
                           .backend = &be[r],
                           .world = 2,
                           .rank = r};
        ra[r].in = in;
    }
    pthread_t th[2];
    for (int r = 0; r < 2; r++)
        pthread_create(&th[r], NULL, run_thread, &ra[r]);
    for (int r = 0; r < 2; r++)
        pthread_join(th[r], NULL);
    CHECK(rc1 == 0 && ra[0].rc == 0 && ra[1].rc == 0,
          "train_run: one process, and two ranks of a job, run");
    CHECK(rk[0].steps == STEPS && rk[1].steps == STEPS && rk[0].bad_key == 0 &&
              rk[1].bad_key == 0,
          "world 2: every step on both ranks, micro-batch k on rank k %% 2");
    /* 6 micro-batches an epoch, steps of 4: 4, 2, 4, 2, 4 */
    CHECK(rk[0].micro_seen + rk[1].micro_seen == 16 && rk[0].micro_seen == 8,
          "world 2: 16 micro-batches in 5 steps, 8 on rank 0 (%d, %d)",
          rk[0].micro_seen, rk[1].micro_seen);
    double worst = 0;
    for (int s = 0; s < STEPS; s++)
        worst = fmax(worst, fabs(s0.loss[s] - s1.loss[s]) / fabs(s1.loss[s]));
    CHECK(s0.logs == STEPS && s1.logs == STEPS && worst <= REL_TOL,
          "world 2: per-step losses equal one process's with twice the "
          "accumulation "
          "(worst %.2e)",
          worst);
    CHECK(s0.evals >= 1 &&
              fabs(s0.eval_loss - s1.eval_loss) <= REL_TOL * fabs(s1.eval_loss),
          "world 2: the evaluation too");
    CHECK(sr1.logs == 0 && sr1.evals == 0 && sr1.saves == 0 &&
              sr1.batches.len == 0,
          "world 2: rank 1 emits no events");
    CHECK(s0.batches.len > 0 &&
              strcmp(sb_str(&s0.batches), sb_str(&s1.batches)) == 0,
          "world 2: rank 0's --dump-batches events are one process's "
          "micro-batches "
          "(rows, weights, tokens)");
    struct stat st;
    CHECK(stat(r1_dir, &st) != 0,
          "world 2: rank 1 creates no output directory");
    /* the adapters */
    char *pa = io_path_join(r0_dir, "adapter_model.safetensors");
    CHECK(io_exists(pa), "world 2: rank 0 wrote the adapter");
    free(pa);
    double err = rel_err(rk[0].a->params, rk[1].a->params, rk[0].a->n_params);
    CHECK(err == 0, "world 2: both ranks hold the same adapter");
    {
        /* the single process's adapter file is the reference */
        char *p1 = io_path_join(one_dir, "adapter_model.safetensors");
        char *p0 = io_path_join(r0_dir, "adapter_model.safetensors");
        char *b1 = NULL, *b0 = NULL;
        size_t n1 = 0, n0 = 0;
        int ok = io_read_file(p1, &b1, &n1) == 0 &&
                 io_read_file(p0, &b0, &n0) == 0 && n1 == n0 && n1 > 8;
        double e2 = INFINITY;
        if (ok) {
            /* same header (same tensors, same order): compare the payloads */
            uint64_t hl;
            memcpy(&hl, b1, 8);
            size_t off = 8 + (size_t)hl;
            if (off <= n1 && memcmp(b1, b0, off) == 0 && (n1 - off) % 4 == 0)
                e2 = rel_err((const float *)(void *)(b0 + off),
                             (const float *)(void *)(b1 + off), (n1 - off) / 4);
        }
        CHECK(e2 <= REL_TOL,
              "world 2: the adapter equals one process's (rel err %.2e)", e2);
        free(b1);
        free(b0);
        free(p1);
        free(p0);
    }
    /* the checkpoint says 2 ranks; one process refuses it */
    char ck[300];
    snprintf(ck, sizeof ck, "%s/checkpoint-2/trainer_state.json", r0_dir);
    char *txt = NULL;
    size_t tl = 0;
    CHECK(io_read_file(ck, &txt, &tl) == 0 && strstr(txt, "\"world_size\": 2"),
          "world 2: trainer_state.json records world_size 2");
    free(txt);
    snprintf(ck, sizeof ck, "%s/checkpoint-2", r0_dir);
    train_config c4;
    config(&c4, one_dir, 2, STEPS);
    seen s4;
    memset(&s4, 0, sizeof s4);
    train_inputs in4 = {.cfg = &c4,
                        .model = M,
                        .train = &d,
                        .cb = on_event,
                        .cb_ctx = &s4,
                        .resume = ck};
    CHECK(train_run(&in4) == -1,
          "world 2: one process refuses the 2-rank checkpoint");
    train_inputs in5 = {
        .cfg = &c4, .model = M, .train = &d, .world = 2, .rank = 0};
    CHECK(train_run(&in5) == -1,
          "world 2 without a data-parallel backend is refused");

    for (int r = 0; r < 2; r++) {
        lora_free(rk[r].a);
        adamw_free(&rk[r].opt);
        free(rk[r].grad);
        free(sh.part[r]);
    }
    pthread_barrier_destroy(&sh.bar);
    sb_free(&s0.batches);
    sb_free(&s1.batches);
    sb_free(&sr1.batches);
    sb_free(&s4.batches);
    cfg_free(train_fields, train_nfields, &c1);
    cfg_free(train_fields, train_nfields, &c2);
    cfg_free(train_fields, train_nfields, &c3);
    cfg_free(train_fields, train_nfields, &c4);
    pack_data_free(&d);
    pack_data_free(&e);
    tiny_free(M);
    io_remove_tree(dir);
    return CHECK_DONE();
}
