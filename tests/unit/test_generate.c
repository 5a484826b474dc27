/* test_generate.c: lib/generate.c — the sampler, the scheduler (with a
 * scripted backend), and the CPU backend on ../shared's stories260K:
 * greedy from BOS reproduces greedy-from-bos.txt, results do not depend on
 * how many prompts are in flight, and with a seeded adapter greedy
 * completions equal transformers + peft's (tests/golden/gen-s260-peft.json,
 * made by tests/torch/gen_ref.py from what --make-fixtures writes).
 *
 *   test_generate                      run the tests
 *   test_generate --make-fixtures DIR  write DIR/adapter and DIR/prompts.json
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter.h"
#include "check.h"
#include "generate.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "sentencepiece.h"
#include "strbuf.h"

/* ---- the sampler ------------------------------------------------------------
 */

static void test_sampler(void)
{
    float a[6] = {1.0f, 3.0f, NAN, 3.0f, -INFINITY, 2.0f};
    CHECK(gen_argmax(a, 6) == 1, "argmax: first of ties, NaN never wins");
    float b[3] = {NAN, NAN, NAN};
    CHECK(gen_argmax(b, 3) == 0, "argmax of NaNs is 0");

    gen_params p;
    gen_params_default(&p);
    gen_sampler *s = gen_sampler_new(16);
    /* repetition penalty in greedy mode: 3.0/2 < 2.5 */
    float l1[3] = {3.0f, 2.5f, -1.0f};
    uint8_t seen[3] = {1, 0, 0};
    p.repetition_penalty = 2.0;
    CHECK(gen_sample(s, &p, l1, 3, seen, 1, 0) == 1,
          "repetition penalty divides a positive logit");
    float l2[3] = {-1.0f, -1.5f, -3.0f};
    CHECK(gen_sample(s, &p, l2, 3, seen, 1, 0) == 1,
          "repetition penalty multiplies a negative one");
    p.repetition_penalty = 1.0;

    /* sampling frequencies follow softmax(l / T) */
    float base[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    p.temperature = 1.0;
    int cnt[4] = {0, 0, 0, 0};
    enum { N = 20000 };
    for (int i = 0; i < N; i++) {
        float l[4];
        memcpy(l, base, sizeof l);
        cnt[gen_sample(s, &p, l, 4, NULL, gen_record_key(1, 0), (uint64_t)i)]++;
    }
    CHECK(
        fabs(cnt[0] / (double)N - 0.5) < 0.02 &&
            fabs(cnt[1] / (double)N - 0.3) < 0.02 &&
            fabs(cnt[3] / (double)N - 0.05) < 0.01,
        "temperature 1: frequencies %d %d %d %d of %d match 0.5 0.3 0.15 0.05",
        cnt[0], cnt[1], cnt[2], cnt[3], N);
    /* top-k 2: only the two most likely, renormalized (0.5 : 0.3) */
    p.top_k = 2;
    memset(cnt, 0, sizeof cnt);
    for (int i = 0; i < N; i++) {
        float l[4];
        memcpy(l, base, sizeof l);
        cnt[gen_sample(s, &p, l, 4, NULL, 5, (uint64_t)i)]++;
    }
    CHECK(cnt[2] == 0 && cnt[3] == 0 && fabs(cnt[0] / (double)N - 0.625) < 0.02,
          "top-k 2 keeps the two most likely (%d %d %d %d)", cnt[0], cnt[1],
          cnt[2], cnt[3]);
    /* top-p 0.75: 0.5 (before: 0) and 0.3 (before: 0.5 < 0.75) kept, 0.15 not
     */
    p.top_k = 0;
    p.top_p = 0.75;
    memset(cnt, 0, sizeof cnt);
    for (int i = 0; i < N; i++) {
        float l[4];
        memcpy(l, base, sizeof l);
        cnt[gen_sample(s, &p, l, 4, NULL, 9, (uint64_t)i)]++;
    }
    CHECK(cnt[2] == 0 && cnt[3] == 0 && cnt[1] > 0,
          "top-p 0.75 keeps 0.5 and 0.3 (%d %d %d %d)", cnt[0], cnt[1], cnt[2],
          cnt[3]);
    p.top_p = 0.4;
    int only0 = 1;
    for (int i = 0; i < 200; i++) {
        float l[4];
        memcpy(l, base, sizeof l);
        only0 &= gen_sample(s, &p, l, 4, NULL, 9, (uint64_t)i) == 0;
    }
    CHECK(only0, "top-p below the top probability keeps the top token only");
    /* ties at the k-th value are kept, as transformers' top-k */
    p.top_p = 1.0;
    p.top_k = 1;
    float tie[3] = {1.0f, 1.0f, 0.0f};
    int saw1 = 0;
    for (int i = 0; i < 200; i++) {
        float l[3];
        memcpy(l, tie, sizeof l);
        saw1 |= gen_sample(s, &p, l, 3, NULL, 2, (uint64_t)i) == 1;
    }
    CHECK(saw1, "top-k keeps ties with the k-th value");
    /* determinism */
    p.top_k = 0;
    p.temperature = 0.7;
    float l3[4], l4[4];
    memcpy(l3, base, sizeof l3);
    memcpy(l4, base, sizeof l4);
    CHECK(gen_sample(s, &p, l3, 4, NULL, 77, 3) ==
              gen_sample(s, &p, l4, 4, NULL, 77, 3),
          "a draw depends on (key, index) only");
    CHECK(gen_record_key(1, 0) != gen_record_key(1, 1) &&
              gen_record_key(1, 0) != gen_record_key(2, 0),
          "record keys differ by seed and index");
    gen_sampler_free(s);

    gen_params q;
    gen_params_default(&q);
    q.top_p = 0.0;
    CHECK(gen_params_check(&q) != 0, "top-p 0 is refused");
    gen_params_default(&q);
    q.max_new = 0;
    CHECK(gen_params_check(&q) != 0, "max new 0 is refused");
}

/* ---- the scheduler with a scripted backend
 * ------------------------------------- */

/* The next token is (last + 1) % V, logit 10 against 0 elsewhere: a
 * sequence counts up from its last prompt token. */
typedef struct fake {
    int32_t V, slots;
    int32_t *last; /* (slots) */
    int32_t *len;  /* (slots) */
    int calls, max_in_flight;
} fake;

static void fake_out(fake *f, int32_t i, int32_t t, float *logits,
                     int32_t *amax, int32_t limit)
{
    int32_t next = (t + 1) % f->V;
    if (amax) {
        amax[i] = next < limit ? next : 0;
        return;
    }
    for (int32_t j = 0; j < f->V; j++)
        logits[(int64_t)i * f->V + j] = j == next ? 10.0f : 0.0f;
}

static int fake_prefill(void *ctx, int32_t n, const int32_t *slot,
                        const int32_t *ids, const int32_t *len, int32_t limit,
                        float *logits, int32_t *amax)
{
    fake *f = ctx;
    int64_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        off += len[i];
        f->last[slot[i]] = ids[off - 1];
        f->len[slot[i]] = len[i];
        fake_out(f, i, ids[off - 1], logits, amax, limit);
    }
    f->calls++;
    return 0;
}

static int fake_decode(void *ctx, int32_t n, const int32_t *slot,
                       const int32_t *ids, int32_t limit, float *logits,
                       int32_t *amax)
{
    fake *f = ctx;
    if (n > f->max_in_flight)
        f->max_in_flight = n;
    for (int32_t i = 0; i < n; i++) {
        f->len[slot[i]]++;
        fake_out(f, i, ids[i], logits, amax, limit);
    }
    f->calls++;
    return 0;
}

typedef struct got {
    int n;
    uint64_t index[16];
    int32_t len[16], first[16], lastid[16];
    gen_finish fin[16];
} got;

static int got_emit(void *ctx, const gen_result *r)
{
    got *g = ctx;
    g->index[g->n] = r->index;
    g->len[g->n] = r->n;
    g->first[g->n] = r->n ? r->ids[0] : -1;
    g->lastid[g->n] = r->n ? r->ids[r->n - 1] : -1;
    g->fin[g->n] = r->finish;
    g->n++;
    return 0;
}

static void test_scheduler(void)
{
    fake f = {0};
    f.V = 50;
    f.slots = 2;
    int32_t last[2], len[2];
    f.last = last;
    f.len = len;
    gen_backend be = {0};
    be.ctx = &f;
    be.name = "fake";
    be.slots = 2;
    be.cap = 64;
    be.vocab = 50;
    be.max_prefill = 128;
    be.refill = 1;
    be.prefill = fake_prefill;
    be.decode = fake_decode;
    /* prompts ending in 10, 40, 3, 45, 20 */
    int32_t p0[] = {1, 10}, p1[] = {1, 2, 40}, p2[] = {3}, p3[] = {1, 45},
            p4[] = {1, 5, 20};
    gen_prompt pr[5] = {{p0, 2}, {p1, 3}, {p2, 1}, {p3, 2}, {p4, 3}};
    gen_params p;
    gen_params_default(&p);
    p.max_new = 6;
    p.eos_id = 44;    /* reached by prompt 1 (41 42 43 44) */
    int32_t stop = 5; /* reached by prompt 2 (4 5) */
    p.stop_ids = &stop;
    p.n_stop_ids = 1;
    got g = {0};
    gen_stats st;
    int rc = gen_run(&be, &p, pr, 5, 60, got_emit, &g, &st);
    CHECK(rc == 0 && g.n == 5, "scheduler: every record emitted");
    int order = 1;
    for (int i = 0; i < g.n; i++)
        order &= g.index[i] == (uint64_t)i;
    CHECK(order, "scheduler: results in input order");
    CHECK(g.len[0] == 6 && g.first[0] == 11 && g.lastid[0] == 16 &&
              g.fin[0] == GEN_FINISH_LENGTH,
          "max new tokens ends a sequence ('length')");
    CHECK(g.len[1] == 4 && g.lastid[1] == 44 && g.fin[1] == GEN_FINISH_EOS,
          "EOS ends a sequence and is kept ('eos')");
    CHECK(g.len[2] == 2 && g.lastid[2] == 5 && g.fin[2] == GEN_FINISH_STOP,
          "a stop id ends a sequence ('stop')");
    CHECK(g.len[3] == 6 && g.lastid[3] == 1 && g.fin[3] == GEN_FINISH_LENGTH,
          "ids wrap past the vocabulary (46 .. 1)");
    CHECK(f.max_in_flight == 2 && st.records == 5 && st.prompt_tokens == 11,
          "two in flight at most; stats count records and prompt tokens");
    /* the context: a prompt of 58 with max_pos 60 stops after 2 */
    int32_t longp[58];
    for (int i = 0; i < 58; i++)
        longp[i] = 1;
    gen_prompt lp = {longp, 58};
    memset(&g, 0, sizeof g);
    p.eos_id = -1;
    p.n_stop_ids = 0;
    rc = gen_run(&be, &p, &lp, 1, 60, got_emit, &g, NULL);
    CHECK(rc == 0 && g.len[0] == 2 && g.fin[0] == GEN_FINISH_CONTEXT,
          "the model's context ends a sequence ('context')");
    gen_prompt big = {longp, 58};
    rc = gen_run(&be, &p, &big, 1, 40, got_emit, &g, NULL);
    CHECK(rc != 0, "a prompt longer than the context is an error");
    gen_prompt empty = {longp, 0};
    CHECK(gen_run(&be, &p, &empty, 1, 60, NULL, NULL, NULL) != 0,
          "an empty prompt is an error");
    /* sampled path (logits) gives the same as greedy here */
    memset(&g, 0, sizeof g);
    p.temperature = 0.5;
    p.top_k = 3;
    rc = gen_run(&be, &p, pr, 2, 60, got_emit, &g, NULL);
    CHECK(rc == 0 && g.first[0] == 11 && g.first[1] == 41,
          "sampling path: a certain token is drawn");
}

/* ---- the CPU backend on stories260K
 * ---------------------------------------------- */

typedef struct col {
    int32_t *ids[16];
    int32_t n[16];
    gen_finish fin[16];
} col;

static int col_emit(void *ctx, const gen_result *r)
{
    col *c = ctx;
    c->ids[r->index] = malloc((size_t)(r->n ? r->n : 1) * 4);
    memcpy(c->ids[r->index], r->ids, (size_t)r->n * 4);
    c->n[r->index] = r->n;
    c->fin[r->index] = r->finish;
    return 0;
}

static void col_free(col *c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(c->ids[i]);
}

static int run_cpu(const llama_model *m, const lora_adapter *a, int slots,
                   const gen_params *p, const gen_prompt *pr, size_t n,
                   col *out)
{
    int32_t maxlen = 0;
    for (size_t i = 0; i < n; i++)
        if (pr[i].n > maxlen)
            maxlen = pr[i].n;
    gen_backend be;
    int32_t cap = maxlen + p->max_new;
    if (cap > m->cfg.max_pos)
        cap = m->cfg.max_pos;
    if (gen_cpu_backend(m, a, slots, cap, &be) != 0)
        return -1;
    memset(out, 0, sizeof *out);
    int rc = gen_run(&be, p, pr, n, m->cfg.max_pos, col_emit, out, NULL);
    be.free(be.ctx);
    return rc;
}

static int same(const col *a, const col *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a->n[i] != b->n[i] ||
            memcmp(a->ids[i], b->ids[i], (size_t)a->n[i] * 4))
            return 0;
    return 1;
}

/* The adapter of the peft fixture: seeded A (PEFT's init), B and the zero
 * entries random, so the adapter changes the model. */
static lora_adapter *fixture_adapter(const llama_model *m)
{
    lora_config lc = {8, 16.0, 0.0, 0, LORA_ALL_LINEAR};
    lora_adapter *a;
    if (lora_new(&m->cfg, &lc, &a) != 0)
        return NULL;
    lora_init(a, 7);
    for (size_t i = 0; i < a->n_params; i++)
        if (a->params[i] == 0.0f)
            a->params[i] = (lora_rand_uniform(0x5eed, i) - 0.5f) * 0.2f;
    return a;
}

static const char *fixture_texts[] = {
    "Once upon a time",
    "The little dog",
    "Lily and Tom went to the park. They",
    "One day, a big bird",
    "Sam had a red ball.",
};
#define N_FIXTURE (sizeof fixture_texts / sizeof *fixture_texts)

static int fixture_prompts(const char *shared, gen_prompt *pr,
                           int32_t store[][64])
{
    char path[1024];
    snprintf(path, sizeof path, "%s/models/stories260K/tokenizer.model",
             shared);
    sp_model *sp = sp_model_load(path);
    if (!sp)
        return -1;
    sp_encoder *e = sp_encoder_new(sp);
    for (size_t i = 0; i < N_FIXTURE; i++) {
        sp_ids ids = {0};
        sp_encode(e, fixture_texts[i], strlen(fixture_texts[i]),
                  strlen(fixture_texts[i]), &ids, NULL);
        store[i][0] = sp_model_bos_id(sp);
        for (size_t j = 0; j < ids.n && j < 63; j++)
            store[i][j + 1] = (int32_t)ids.ids[j];
        pr[i].ids = store[i];
        pr[i].n = (int32_t)(ids.n < 63 ? ids.n : 63) + 1;
        sp_ids_free(&ids);
    }
    sp_encoder_free(e);
    sp_model_free(sp);
    return 0;
}

static int make_fixtures(const char *dir)
{
    const char *shared = check_shared();
    char mdir[1024], adir[1024];
    snprintf(mdir, sizeof mdir, "%s/models/stories260K", shared);
    llama_model *m;
    if (llama_load(mdir, &m) != 0)
        return 2;
    lora_adapter *a = fixture_adapter(m);
    snprintf(adir, sizeof adir, "%s/adapter", dir);
    if (!a || adapter_write(adir, a, "stories260K") != 0)
        return 2;
    gen_prompt pr[N_FIXTURE];
    int32_t store[N_FIXTURE][64];
    if (fixture_prompts(shared, pr, store) != 0)
        return 2;
    char *pp = io_path_join(dir, "prompts.json");
    io_writer *w = io_writer_open(pp, IO_TEXT);
    io_printf(w,
              "{\"max_new_tokens\": 40, \"eos_token_id\": 2, \"prompts\": [");
    for (size_t i = 0; i < N_FIXTURE; i++) {
        io_printf(w, i ? ", [" : "[");
        for (int32_t j = 0; j < pr[i].n; j++)
            io_printf(w, j ? ", %d" : "%d", pr[i].ids[j]);
        io_printf(w, "]");
    }
    io_printf(w, "]}\n");
    int rc = io_writer_commit(w);
    free(pp);
    lora_free(a);
    llama_free(m);
    return rc ? 2 : 0;
}

/* The main pass's cache: 99% of the needs, rounded to 256, unless the
 * longest need is under twice that. */
static void test_cache_main(void)
{
    enum { N = 300 };
    gen_prompt pr[N];
    gen_inputs in;
    memset(&in, 0, sizeof in);
    in.p = pr;
    in.n = N;
    for (int i = 0; i < N; i++)
        pr[i].n = 10 + i % 50; /* needs with -n 100: 110 .. 159 */
    pr[7].n = pr[100].n = 3000; /* two long ones: under 1% */
    in.max_len = 3000;
    CHECK(gen_cache_cap(&in, 100, 4096) == 3100, "cache for all: longest + max_new");
    CHECK(gen_cache_main(&in, 100, 4096) == 256, "main cache: 99%% fit in 256");
    pr[8].n = pr[9].n = 600; /* four over 256 now: over 1% of 300 */
    CHECK(gen_cache_main(&in, 100, 4096) == 768, "main cache: the 99th percentile, rounded up");
    pr[7].n = pr[100].n = 1000;
    in.max_len = 1000;
    CHECK(gen_cache_main(&in, 100, 4096) == 1100, "main cache: one pass when the longest need "
                                                  "is under twice the percentile's");
}

static void test_stories(void)
{
    const char *shared = check_shared();
    char dir[1024], path[1200];
    snprintf(dir, sizeof dir, "%s/models/stories260K", shared);
    if (!io_exists(dir)) {
        SKIP("stories260K tests: %s absent", dir);
        return;
    }
    llama_model *m;
    if (llama_load(dir, &m) != 0) {
        CHECK(0, "load stories260K");
        return;
    }
    snprintf(path, sizeof path, "%s/tokenizer.model", dir);
    sp_model *sp = sp_model_load(path);

    /* greedy from a lone BOS: the reference text (256 new tokens, to the
     * first BOS) */
    char *want = NULL;
    size_t wlen = 0;
    snprintf(path, sizeof path, "%s/greedy-from-bos.txt", dir);
    if (io_read_file(path, &want, &wlen) == 0) {
        gen_params p;
        gen_params_default(&p);
        p.max_new = 256;
        int32_t bos = 1, stop = 1;
        p.stop_ids = &stop;
        p.n_stop_ids = 1;
        gen_prompt pr = {&bos, 1};
        col c;
        int rc = run_cpu(m, NULL, 1, &p, &pr, 1, &c);
        strbuf sb = STRBUF_INIT;
        if (rc == 0)
            sp_decode(sp, (const uint32_t *)c.ids[0], (size_t)c.n[0], &sb);
        sb_putc(&sb, '\n');
        CHECK(rc == 0 && sb.len == wlen && !memcmp(sb.buf, want, wlen),
              "CPU greedy from BOS reproduces greedy-from-bos.txt (%d tokens)",
              c.n[0]);
        sb_free(&sb);
        col_free(&c, 1);
        free(want);
    }

    gen_prompt pr[N_FIXTURE];
    int32_t store[N_FIXTURE][64];
    fixture_prompts(shared, pr, store);
    lora_adapter *a = fixture_adapter(m);
    gen_params p;
    gen_params_default(&p);
    p.max_new = 20;
    p.eos_id = 2;
    col one, three, base;
    int rc = run_cpu(m, a, 1, &p, pr, N_FIXTURE, &one);
    rc |= run_cpu(m, a, 3, &p, pr, N_FIXTURE, &three);
    rc |= run_cpu(m, NULL, 2, &p, pr, N_FIXTURE, &base);
    CHECK(rc == 0 && same(&one, &three, N_FIXTURE),
          "greedy: 3 prompts in flight give what 1 at a time gives");
    CHECK(rc == 0 && !same(&one, &base, N_FIXTURE),
          "the adapter changes the completions");
    col_free(&one, N_FIXTURE);
    col_free(&three, N_FIXTURE);
    col_free(&base, N_FIXTURE);

    /* sampling: reproducible, independent of the slots */
    p.temperature = 0.9;
    p.top_p = 0.9;
    p.top_k = 40;
    p.repetition_penalty = 1.1;
    p.seed = 42;
    col s1, s3, s4;
    rc = run_cpu(m, a, 1, &p, pr, N_FIXTURE, &s1);
    rc |= run_cpu(m, a, 3, &p, pr, N_FIXTURE, &s3);
    p.seed = 43;
    rc |= run_cpu(m, a, 3, &p, pr, N_FIXTURE, &s4);
    CHECK(rc == 0 && same(&s1, &s3, N_FIXTURE),
          "sampling with a seed: same with 1 or 3 in flight");
    CHECK(rc == 0 && !same(&s1, &s4, N_FIXTURE),
          "another seed, other completions");
    col_free(&s1, N_FIXTURE);
    col_free(&s3, N_FIXTURE);
    col_free(&s4, N_FIXTURE);

    /* a stop text ends the completion once its decoded text contains it */
    gen_params_default(&p);
    p.max_new = 200;
    const char *stops[1] = {"Lily"};
    p.stop_texts = stops;
    p.n_stop_texts = 1;
    p.sp = sp;
    int32_t bos = 1;
    gen_prompt bp = {&bos, 1};
    col st;
    rc = run_cpu(m, NULL, 1, &p, &bp, 1, &st);
    strbuf sb = STRBUF_INIT;
    if (rc == 0)
        sp_decode(sp, (const uint32_t *)st.ids[0], (size_t)st.n[0], &sb);
    const char *hit = strstr(sb_str(&sb), "Lily");
    CHECK(rc == 0 && st.fin[0] == GEN_FINISH_STOP && hit &&
              hit + 4 == sb_str(&sb) + sb.len,
          "stop text: the completion ends with it ('%s')", sb_str(&sb));
    sb_free(&sb);
    col_free(&st, 1);

    /* transformers + peft's greedy completions with the fixture adapter */
    const char *top = getenv("TOP");
    snprintf(path, sizeof path, "%s/tests/golden/gen-s260-peft.json",
             top && *top ? top : ".");
    json_value *g;
    if (!io_exists(path)) {
        SKIP("peft golden: %s absent", path);
    } else if (json_parse_file(path, &g) == 0) {
        const json_value *ps = json_get(g, "prompts"),
                         *cs = json_get(g, "completions");
        size_t n = ps && ps->type == JSON_ARRAY ? ps->u.array.n : 0;
        int prompts_same = n == N_FIXTURE;
        for (size_t i = 0; prompts_same && i < n; i++) {
            const json_value *pa = ps->u.array.items[i];
            prompts_same = pa->u.array.n == (size_t)pr[i].n;
            for (size_t j = 0; prompts_same && j < pa->u.array.n; j++)
                prompts_same =
                    pa->u.array.items[j]->u.number.integer == pr[i].ids[j];
        }
        CHECK(prompts_same, "peft golden: the fixture's prompts");
        gen_params_default(&p);
        p.max_new = (int32_t)json_get_int(g, "max_new_tokens", 40);
        p.eos_id = (int32_t)json_get_int(g, "eos_token_id", 2);
        col c;
        rc = run_cpu(m, a, 2, &p, pr, N_FIXTURE, &c);
        int agree = 0;
        for (size_t i = 0; rc == 0 && prompts_same && i < n; i++) {
            const json_value *ca = cs->u.array.items[i];
            int eq = (size_t)c.n[i] == ca->u.array.n;
            for (size_t j = 0; eq && j < ca->u.array.n; j++)
                eq = c.ids[i][j] ==
                     (int32_t)ca->u.array.items[j]->u.number.integer;
            agree += eq;
        }
        CHECK(rc == 0 && agree == (int)N_FIXTURE,
              "CPU greedy with the adapter == transformers+peft greedy (%d of "
              "%zu prompts)",
              agree, N_FIXTURE);
        col_free(&c, N_FIXTURE);
        json_free(g);
    }
    lora_free(a);
    sp_model_free(sp);
    llama_free(m);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--make-fixtures") == 0)
        return make_fixtures(argv[2]);
    test_sampler();
    test_scheduler();
    test_cache_main();
    test_stories();
    return CHECK_DONE();
}
