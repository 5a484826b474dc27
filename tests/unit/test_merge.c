/* test_merge.c: lora-merge's library against its definition and peft.
 *
 * 1. The arithmetic: merge_add_delta equals W + scale * B A summed in fp32
 *    (bit for bit against lora_merge_into, whatever the threads), sizes
 *    and dtypes parse.
 * 2. On stories260K with seeded adapters whose B is random (not PEFT's zero
 *    init, so the merge changes something): our forward on the merged
 *    model equals the base plus the unmerged adapter (F32 output within
 *    ABS_TOL_MERGED_F32, BF16 within REL_TOL_MERGED_BF16), merged bytes are
 *    exactly round(W + scale B A), sharding, F16, rsLoRA, the NF4 base with
 *    --from-nf4 (and the float base quantized on the fly gives the same
 *    bytes), --requantize equals nf4-quant of the merged model.
 * 3. Bad inputs fail with -1 and leave no output directory.
 * 4. tests/golden/merge-s260-peft.json: logits transformers computed on
 *    peft's merge_and_unload of the same adapters (tests/torch/merge_ref.py
 *    made it); our merged model must agree within ABS_TOL_PEFT.
 *
 * `test_merge --make-fixtures DIR` writes the adapters (and our merged
 * models) that tests/torch/merge_ref.py and tests/cli/lora-merge.sh use.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapter.h"
#include "check.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "merge.h"
#include "nf4.h"
#include "safetensors.h"

/* Tolerances on logits; those of stories260K lie within about +-15.
 * ABS_TOL_MERGED_F32: (W + s B A) x against W x + s B (A x), both fp32.
 * REL_TOL_MERGED_BF16: every weight rounded to bf16, relative to the
 * largest logit. ABS_TOL_PEFT: against transformers on peft's merge. */
#define ABS_TOL_MERGED_F32 2e-4
#define REL_TOL_MERGED_BF16 2e-2
#define ABS_TOL_PEFT 2e-4

#define NTOK 48

/* The adapters of the tests and of the golden file. */
typedef struct adapter_case {
    const char *name;
    int32_t r;
    double alpha;
    uint32_t targets;
    int rslora;
    uint64_t seed;
    float b_range; /* B uniform in [-b_range, b_range) */
} adapter_case;

static const adapter_case cases[] = {
    {"qv", 4, 8.0, LORA_DEFAULT_TARGETS, 0, 1234, 0.2f},
    {"all-rslora", 8, 16.0, LORA_ALL_LINEAR, 1, 99, 0.05f},
};

static char base_dir[4096], nf4_dir[4096];

/* PEFT's init for A, then B uniform from another stream. */
static lora_adapter *make_adapter(const llama_config *mc, const adapter_case *c)
{
    lora_config lc = {c->r, c->alpha, 0.05, c->rslora, c->targets};
    lora_adapter *a;
    if (lora_new(mc, &lc, &a) != 0)
        return NULL;
    lora_init(a, c->seed);
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            float *B = lora_B(a, i, (llama_linear)l);
            if (!B)
                continue;
            const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
            uint64_t key = lora_init_key(c->seed + 1, i, (llama_linear)l);
            for (int64_t j = 0; j < s->out * c->r; j++)
                B[j] = (2.0f * lora_rand_uniform(key, (uint64_t)j) - 1.0f) *
                       c->b_range;
        }
    return a;
}

static double adapter_sum(const lora_adapter *a, int squares)
{
    double s = 0;
    for (size_t i = 0; i < a->n_params; i++)
        s += squares ? (double)a->params[i] * a->params[i] : a->params[i];
    return s;
}

static void input_ids(int32_t *ids, int n)
{
    ids[0] = 1;
    for (int t = 1; t < n; t++)
        ids[t] = (int32_t)((t * 37 + 11) % 509 + 3);
}

/* logits (n, vocab) of a model with an optional adapter. */
static float *forward(const char *dir, const lora_adapter *a,
                      const int32_t *ids, int n)
{
    llama_model *m;
    if (llama_load(dir, &m) != 0)
        return NULL;
    int32_t pos[512], start[512] = {0};
    for (int t = 0; t < n; t++)
        pos[t] = t;
    llama_batch b = {n, ids, pos, start, NULL, NULL};
    float *logits = malloc((size_t)n * m->cfg.vocab * sizeof(float));
    if (llama_forward(m, a, &b, logits, NULL, NULL) != 0) {
        free(logits);
        logits = NULL;
    }
    llama_free(m);
    return logits;
}

/* max |x - y| and the largest |y|. */
static double max_diff(const float *x, const float *y, int64_t n, double *ymax)
{
    double d = 0, m = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)x[i] - y[i]));
        m = fmax(m, fabs((double)y[i]));
    }
    if (ymax)
        *ymax = m;
    return d;
}

static char *path2(const char *a, const char *b)
{
    return io_path_join(a, b);
}

static int merge_into(const char *adapter, const char *base, const char *out,
                      st_dtype dtype, int from_nf4, int requantize,
                      uint64_t shard)
{
    merge_opts o;
    merge_opts_init(&o);
    o.adapter_dir = adapter;
    o.base_dir = base;
    o.out_dir = out;
    o.dtype = dtype;
    o.from_nf4 = from_nf4;
    o.requantize = requantize;
    o.shard_bytes = shard;
    return merge_checkpoint(&o, NULL);
}

/* 1 when both checkpoints hold the same tensors with the same bytes. */
static int same_tensors(const char *d1, const char *d2)
{
    st_model *a = NULL, *b = NULL;
    int same = st_model_open(d1, &a) == 0 && st_model_open(d2, &b) == 0 &&
               a->n == b->n;
    for (size_t i = 0; same && i < a->n; i++) {
        const st_tensor *x = a->tensors[i], *y = b->tensors[i];
        same = strcmp(x->name, y->name) == 0 && x->dtype == y->dtype &&
               x->nbytes == y->nbytes &&
               memcmp(x->data, y->data, x->nbytes) == 0;
        if (!same)
            printf("# differs: %s\n", x->name);
    }
    st_model_close(a);
    st_model_close(b);
    return same;
}

/* ---- 1. arithmetic -------------------------------------------------- */

static void test_arithmetic(void)
{
    llama_config mc = {0};
    mc.dim = 40;
    mc.hidden = 1031; /* ragged against the column tiles */
    mc.n_layers = 1;
    mc.n_heads = 4;
    mc.n_kv_heads = 2;
    mc.head_dim = 10;
    lora_config lc = {5, 3.0, 0, 0, 1u << LLAMA_DOWN | 1u << LLAMA_UP};
    lora_adapter *a;
    lora_new(&mc, &lc, &a);
    for (size_t i = 0; i < a->n_params; i++)
        a->params[i] = lora_rand_uniform(7, i) - 0.5f;
    for (int l = LLAMA_UP; l <= LLAMA_DOWN; l++) {
        const lora_slot *s = lora_slot_of(a, 0, (llama_linear)l);
        int64_t n = s->out * s->in;
        float *w = malloc(n * sizeof *w), *ref = malloc(n * sizeof *ref);
        float *w2 = malloc(n * sizeof *w2);
        for (int64_t i = 0; i < n; i++)
            w[i] = ref[i] = w2[i] = lora_rand_uniform(8, i) - 0.5f;
        lora_merge_into(a, 0, (llama_linear)l, ref);
        /* in two row ranges, as the chunks do */
        int64_t half = s->out / 2 + 1;
        merge_add_delta(w, lora_A(a, 0, l), lora_B(a, 0, l), 0, half, s->in,
                        lc.r, a->scale, 0);
        merge_add_delta(w + half * s->in, lora_A(a, 0, l), lora_B(a, 0, l),
                        half, s->out - half, s->in, lc.r, a->scale, 0);
        merge_add_delta(w2, lora_A(a, 0, l), lora_B(a, 0, l), 0, s->out, s->in,
                        lc.r, a->scale, 1);
        double d = max_diff(w, ref, n, NULL), worst = 0;
        CHECK(d == 0 && memcmp(w, w2, n * sizeof *w) == 0,
              "merge_add_delta (%lld x %lld, r %d) equals lora_merge_into bit "
              "for bit, any threads (max diff %g)",
              (long long)s->out, (long long)s->in, lc.r, d);
        /* and the definition, in double */
        const float *A = lora_A(a, 0, l), *B = lora_B(a, 0, l);
        for (int64_t o = 0; o < s->out; o++)
            for (int64_t c = 0; c < s->in; c++) {
                double acc = 0;
                for (int k = 0; k < lc.r; k++)
                    acc += (double)B[o * lc.r + k] * A[k * s->in + c];
                double want =
                    (double)(lora_rand_uniform(8, o * s->in + c) - 0.5f) +
                    a->scale * acc;
                worst = fmax(worst, fabs(want - w[o * s->in + c]));
            }
        CHECK(worst < 1e-6, "W + scale B A within 1e-6 of double (%.2g)",
              worst);
        free(w);
        free(w2);
        free(ref);
    }
    lora_free(a);

    uint64_t v = 1;
    CHECK(merge_parse_size("5GB", &v) == 0 && v == 5000000000ULL, "5GB");
    CHECK(merge_parse_size("500MiB", &v) == 0 && v == 500ULL << 20, "500MiB");
    CHECK(merge_parse_size("0", &v) == 0 && v == 0, "0");
    CHECK(merge_parse_size("123", &v) == 0 && v == 123, "bytes");
    CHECK(merge_parse_size("2gib", &v) == 0 && v == 2ULL << 30, "2gib");
    CHECK(merge_parse_size("GB", &v) && merge_parse_size("5 GB", &v) &&
              merge_parse_size("-1", &v) && merge_parse_size("5XB", &v) &&
              merge_parse_size("99999999999999999999", &v) &&
              merge_parse_size("99999999999TB", &v),
          "bad sizes refused");
    st_dtype t;
    CHECK(merge_parse_dtype("bf16", &t) == 0 && t == ST_BF16 &&
              merge_parse_dtype("float16", &t) == 0 && t == ST_F16 &&
              merge_parse_dtype("F32", &t) == 0 && t == ST_F32 &&
              merge_parse_dtype("int8", &t) != 0,
          "dtypes parse");
}

/* ---- 2. on stories260K ---------------------------------------------- */

/* Merged bytes of one weight are exactly round(W + scale B A). */
static void check_weight_bytes(const char *merged, const lora_adapter *a,
                               int32_t layer, llama_linear l, st_dtype dt)
{
    char name[128];
    snprintf(name, sizeof name, "model.layers.%d.%s.%s.weight", layer,
             llama_linear_parent(l), llama_linear_name(l));
    st_model *bm = NULL, *mm = NULL;
    if (st_model_open(base_dir, &bm) || st_model_open(merged, &mm)) {
        CHECK(0, "open checkpoints");
        return;
    }
    const st_tensor *w = st_model_find(bm, name), *g = st_model_find(mm, name);
    int ok = w && g && g->dtype == dt && g->numel == w->numel;
    if (ok) {
        float *x = malloc(w->numel * sizeof *x);
        st_to_f32(w, x, 0, w->numel);
        lora_merge_into(a, layer, l, x);
        const uint16_t *h = g->data;
        for (int64_t i = 0; i < w->numel && ok; i++) {
            if (dt == ST_F32)
                ok = memcmp(&x[i], (const float *)g->data + i, 4) == 0;
            else if (dt == ST_BF16)
                ok = h[i] == st_f32_to_bf16(x[i]);
            else
                ok = h[i] == st_f32_to_f16(x[i]);
        }
        free(x);
    }
    CHECK(ok, "%s of the %s merge is round(W + scale B A)", name,
          st_dtype_name(dt));
    st_model_close(bm);
    st_model_close(mm);
}

static int count_files(const char *dir, const char *suffix)
{
    int n = 0;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "ls '%s' | grep -c '%s$'", dir, suffix);
    FILE *p = popen(cmd, "r");
    if (p) {
        if (fscanf(p, "%d", &n) != 1)
            n = -1;
        pclose(p);
    }
    return n;
}

static int json_has(const char *dir, const char *file, const char *key,
                    const char *want)
{
    char *p = path2(dir, file);
    json_value *v = NULL;
    int ok = json_parse_file(p, &v) == 0;
    free(p);
    if (!ok)
        return -1;
    const json_value *k = json_get(v, key);
    if (want)
        ok = k && k->type == JSON_STRING && strcmp(k->u.string.s, want) == 0;
    else
        ok = k != NULL;
    json_free(v);
    return ok;
}

static void test_stories(const char *tmp)
{
    llama_config mc;
    if (llama_config_load(base_dir, &mc) != 0) {
        CHECK(0, "load config");
        return;
    }
    int32_t ids[NTOK];
    input_ids(ids, NTOK);
    int64_t nl = (int64_t)NTOK * mc.vocab;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const adapter_case *c = &cases[ci];
        char ad[4200], m32[4200], m16[4200], mbf[4200], msh[4200];
        snprintf(ad, sizeof ad, "%s/adapter-%s", tmp, c->name);
        snprintf(m32, sizeof m32, "%s/merged-%s-f32", tmp, c->name);
        snprintf(m16, sizeof m16, "%s/merged-%s-f16", tmp, c->name);
        snprintf(mbf, sizeof mbf, "%s/merged-%s-bf16", tmp, c->name);
        snprintf(msh, sizeof msh, "%s/merged-%s-sharded", tmp, c->name);
        lora_adapter *a = make_adapter(&mc, c);
        CHECK(a && adapter_write(ad, a, base_dir) == 0, "[%s] adapter written",
              c->name);
        /* the adapter read back is the adapter */
        lora_adapter *back = NULL;
        CHECK(adapter_read(ad, &mc, &back, NULL) == 0 &&
                  back->n_params == a->n_params && back->scale == a->scale &&
                  memcmp(back->params, a->params,
                         a->n_params * sizeof(float)) == 0,
              "[%s] adapter reads back", c->name);
        lora_free(back);

        float *ref = forward(base_dir, a, ids, NTOK);
        float *plain = forward(base_dir, NULL, ids, NTOK);
        CHECK(merge_into(ad, NULL, m32, ST_F32, 0, 0, 0) == 0,
              "[%s] merge to F32 (base from the adapter config)", c->name);
        float *got = forward(m32, NULL, ids, NTOK);
        double ymax, d = got && ref ? max_diff(got, ref, nl, &ymax) : INFINITY;
        double moved = ref && plain ? max_diff(plain, ref, nl, NULL) : 0;
        CHECK(d <= ABS_TOL_MERGED_F32,
              "[%s] F32 merged forward = base + adapter: max |diff| %.3g <= %g "
              "(the adapter moves logits by up to %.3g)",
              c->name, d, ABS_TOL_MERGED_F32, moved);
        CHECK(moved > 0.1, "[%s] the adapter changes the logits (%.3g)",
              c->name, moved);
        free(got);

        CHECK(merge_into(ad, base_dir, mbf, ST_BF16, 0, 0, 0) == 0,
              "[%s] merge to BF16", c->name);
        got = forward(mbf, NULL, ids, NTOK);
        d = got && ref ? max_diff(got, ref, nl, &ymax) : INFINITY;
        CHECK(d <= REL_TOL_MERGED_BF16 * ymax,
              "[%s] BF16 merged forward = base + adapter: max |diff| %.3g <= "
              "%g * %.3g",
              c->name, d, REL_TOL_MERGED_BF16, ymax);
        free(got);
        CHECK(json_has(mbf, "config.json", "torch_dtype", "bfloat16") == 1 &&
                  json_has(mbf, "config.json", "quantization_config", NULL) ==
                      0,
              "[%s] config.json: torch_dtype bfloat16, no quantization_config",
              c->name);
        char *tk = path2(mbf, "tokenizer.model");
        CHECK(io_exists(tk), "[%s] tokenizer.model copied", c->name);
        free(tk);
        CHECK(count_files(mbf, ".safetensors") == 1 &&
                  count_files(mbf, ".index.json") == 0,
              "[%s] one model.safetensors when it fits", c->name);

        CHECK(merge_into(ad, base_dir, m16, ST_F16, 0, 0, 0) == 0,
              "[%s] merge to F16", c->name);
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            if (c->targets & (1u << l)) {
                check_weight_bytes(m32, a, 3, (llama_linear)l, ST_F32);
                check_weight_bytes(mbf, a, 3, (llama_linear)l, ST_BF16);
                check_weight_bytes(m16, a, 3, (llama_linear)l, ST_F16);
                break;
            }

        CHECK(merge_into(ad, base_dir, msh, ST_BF16, 0, 0, 150000) == 0,
              "[%s] merge sharded at 150000 bytes", c->name);
        int ns = count_files(msh, ".safetensors");
        char *ix = path2(msh, "model.safetensors.index.json");
        CHECK(ns >= 3 && io_exists(ix) && same_tensors(msh, mbf),
              "[%s] %d shards + index, same tensors as one file", c->name, ns);
        free(ix);
        got = forward(msh, NULL, ids, NTOK);
        float *one = forward(mbf, NULL, ids, NTOK);
        CHECK(got && one && memcmp(got, one, nl * sizeof(float)) == 0,
              "[%s] the sharded checkpoint loads and gives the same logits",
              c->name);
        free(got);
        free(one);
        free(ref);
        free(plain);
        lora_free(a);
    }
}

static void test_nf4(const char *tmp)
{
    char ad[4200], o1[4200], o2[4200], o3[4200], q1[4200], q2[4200];
    snprintf(ad, sizeof ad, "%s/adapter-qv", tmp);
    snprintf(o1, sizeof o1, "%s/nf4-no-flag", tmp);
    snprintf(o2, sizeof o2, "%s/nf4-merged", tmp);
    snprintf(o3, sizeof o3, "%s/nf4-sim-merged", tmp);
    snprintf(q1, sizeof q1, "%s/requant", tmp);
    snprintf(q2, sizeof q2, "%s/requant-ref", tmp);
    if (!io_exists(nf4_dir)) {
        SKIP("no %s", nf4_dir);
        return;
    }
    printf("# expect an error line:\n");
    fflush(stdout);
    CHECK(merge_into(ad, nf4_dir, o1, ST_F32, 0, 0, 0) == -1 && !io_exists(o1),
          "an NF4 base without --from-nf4 is refused");
    CHECK(merge_into(ad, nf4_dir, o2, ST_F32, 1, 0, 0) == 0,
          "merge into the NF4 base with --from-nf4");
    llama_config mc;
    llama_config_load(nf4_dir, &mc);
    lora_adapter *a = NULL;
    adapter_read(ad, &mc, &a, NULL);
    int32_t ids[NTOK];
    input_ids(ids, NTOK);
    int64_t nl = (int64_t)NTOK * mc.vocab;
    float *ref = forward(nf4_dir, a, ids, NTOK),
          *got = forward(o2, NULL, ids, NTOK);
    double d = ref && got ? max_diff(got, ref, nl, NULL) : INFINITY;
    CHECK(d <= ABS_TOL_MERGED_F32,
          "--from-nf4 merged forward = NF4 base + adapter: max |diff| %.3g", d);
    free(ref);
    free(got);
    lora_free(a);
    CHECK(json_has(o2, "config.json", "quantization_config", NULL) == 0 &&
              json_has(o2, "config.json", "dtype", "float32") == 1,
          "config.json of the NF4 merge: no quantization_config, dtype set");
    CHECK(merge_into(ad, base_dir, o3, ST_F32, 1, 0, 0) == 0 &&
              same_tensors(o2, o3),
          "--from-nf4 on the float base (quantized on the fly) gives the "
          "same bytes as on bitsandbytes' NF4 checkpoint");

    /* --requantize: nf4-quant's output for the merged model */
    char bf[4200];
    snprintf(bf, sizeof bf, "%s/merged-qv-bf16", tmp);
    CHECK(merge_into(ad, base_dir, q1, ST_BF16, 0, 1, 0) == 0,
          "merge with --requantize");
    nf4_ckpt_opts qo = {0};
    qo.in_dir = bf;
    qo.out_dir = q2;
    qo.blocksize = 64;
    qo.nested = 1;
    qo.compute_dtype = "bfloat16";
    CHECK(nf4_quantize_checkpoint(&qo) == 0 && same_tensors(q1, q2),
          "--requantize = nf4_quantize_checkpoint of the BF16 merge, byte for "
          "byte");
    char *t1 = path2(q1, "config.json"), *t2 = path2(q2, "config.json");
    char *x1 = NULL, *x2 = NULL;
    size_t n1 = 0, n2 = 0;
    CHECK(io_read_file(t1, &x1, &n1) == 0 && io_read_file(t2, &x2, &n2) == 0 &&
              n1 == n2 && memcmp(x1, x2, n1) == 0 &&
              json_has(q1, "config.json", "quantization_config", NULL) == 1,
          "--requantize config.json has nf4-quant's quantization_config");
    free(t1);
    free(t2);
    free(x1);
    free(x2);
    char scratch[4300];
    snprintf(scratch, sizeof scratch, "%s.merged", q1);
    CHECK(count_files(tmp, "tmp-[0-9]*") == 0 && !io_exists(scratch),
          "no scratch directory left behind");
}

/* ---- 3. bad inputs -------------------------------------------------- */

static int write_text(const char *dir, const char *file, const char *text)
{
    char *p = path2(dir, file);
    FILE *f = fopen(p, "w");
    free(p);
    if (!f)
        return -1;
    fputs(text, f);
    return fclose(f);
}

/* Copies the adapter config with one key's value replaced. */
static int edit_config(const char *from, const char *to, const char *key,
                       const char *value)
{
    char cmd[9000];
    mkdir(to, 0777);
    snprintf(
        cmd, sizeof cmd,
        "cp '%s/adapter_model.safetensors' '%s/' && "
        "jq '.%s = %s' '%s/adapter_config.json' > '%s/adapter_config.json'",
        from, to, key, value, from, to);
    return system(cmd);
}

/* Bad adapters and bases for the unit test and the CLI test. */
static int make_bad_fixtures(const char *dir)
{
    llama_config mc;
    if (llama_config_load(base_dir, &mc) != 0)
        return -1;
    char good[4200], p[4200];
    snprintf(good, sizeof good, "%s/adapter-qv", dir);
    int rc = 0;
    /* shapes of another model */
    llama_config other = mc;
    other.dim = 48;
    other.head_dim = 6;
    lora_adapter *a = make_adapter(&other, &cases[0]);
    snprintf(p, sizeof p, "%s/bad-shape", dir);
    rc |= adapter_write(p, a, base_dir);
    lora_free(a);
    /* more layers than the base */
    other = mc;
    other.n_layers = mc.n_layers + 1;
    a = make_adapter(&other, &cases[0]);
    snprintf(p, sizeof p, "%s/bad-layers", dir);
    rc |= adapter_write(p, a, base_dir);
    lora_free(a);
    /* a tensor for a module Llama has not */
    snprintf(p, sizeof p, "%s/bad-target", dir);
    mkdir(p, 0777);
    {
        float z[4 * 64] = {0};
        st_tensor t[2] = {0};
        t[0].name =
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight";
        t[1].name =
            "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight";
        for (int k = 0; k < 2; k++) {
            t[k].dtype = ST_F32;
            t[k].ndim = 2;
            t[k].shape[0] = k ? 64 : 4;
            t[k].shape[1] = k ? 4 : 64;
            t[k].numel = 256;
            t[k].data = z;
        }
        char *f = path2(p, "adapter_model.safetensors");
        rc |= st_write_file(f, t, 2, NULL, 0);
        free(f);
        char cmd[9000];
        snprintf(cmd, sizeof cmd,
                 "jq '.target_modules = [\"qkv_proj\"]' "
                 "'%s/adapter_config.json' > '%s/adapter_config.json'",
                 good, p);
        rc |= system(cmd);
    }
    /* no adapter_config.json */
    snprintf(p, sizeof p, "%s/bad-noconfig", dir);
    mkdir(p, 0777);
    {
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "cp '%s/adapter_model.safetensors' '%s/'",
                 good, p);
        rc |= system(cmd);
    }
    snprintf(p, sizeof p, "%s/bad-dora", dir);
    rc |= edit_config(good, p, "use_dora", "true");
    snprintf(p, sizeof p, "%s/bad-loha", dir);
    rc |= edit_config(good, p, "peft_type", "\"LOHA\"");
    snprintf(p, sizeof p, "%s/bad-nobase", dir);
    rc |= edit_config(good, p, "base_model_name_or_path", "\"meta-llama/x\"");
    /* a base without one of the targeted weights */
    snprintf(p, sizeof p, "%s/base-missing", dir);
    mkdir(p, 0777);
    {
        st_model *m = NULL;
        if (st_model_open(base_dir, &m) != 0)
            return -1;
        st_tensor *t = calloc(m->n, sizeof *t);
        size_t n = 0;
        for (size_t i = 0; i < m->n; i++)
            if (strcmp(m->tensors[i]->name,
                       "model.layers.2.self_attn.v_proj.weight") != 0)
                t[n++] = *m->tensors[i];
        char *f = path2(p, "model.safetensors");
        static const char *const meta[] = {"format", "pt"};
        rc |= st_write_file(f, t, n, meta, 1);
        free(f);
        free(t);
        st_model_close(m);
        char cmd[9000];
        snprintf(cmd, sizeof cmd, "cp '%s/config.json' '%s/'", base_dir, p);
        rc |= system(cmd);
    }
    /* a truncated adapter file */
    snprintf(p, sizeof p, "%s/bad-truncated", dir);
    mkdir(p, 0777);
    {
        char cmd[20000];
        snprintf(cmd, sizeof cmd,
                 "cp '%s/adapter_config.json' '%s/' && "
                 "head -c 3000 '%s/adapter_model.safetensors' > "
                 "'%s/adapter_model.safetensors'",
                 good, p, good, p);
        rc |= system(cmd);
    }
    (void)write_text;
    return rc ? -1 : 0;
}

static void test_bad(const char *tmp)
{
    if (make_bad_fixtures(tmp) != 0) {
        CHECK(0, "bad fixtures written");
        return;
    }
    static const char *const bad[] = {
        "bad-shape", "bad-layers", "bad-target", "bad-noconfig",
        "bad-dora",  "bad-loha",   "bad-nobase", "bad-truncated",
    };
    char out[4200];
    snprintf(out, sizeof out, "%s/out-bad", tmp);
    printf("# expect error lines:\n");
    fflush(stdout);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char ad[4200];
        snprintf(ad, sizeof ad, "%s/%s", tmp, bad[i]);
        int rc = merge_into(ad, strcmp(bad[i], "bad-nobase") ? base_dir : NULL,
                            out, ST_BF16, 0, 0, 0);
        fflush(stderr);
        CHECK(rc == -1 && !io_exists(out), "%s refused, no output", bad[i]);
    }
    char ad[4200], base[4200];
    snprintf(ad, sizeof ad, "%s/adapter-qv", tmp);
    snprintf(base, sizeof base, "%s/base-missing", tmp);
    CHECK(merge_into(ad, base, out, ST_BF16, 0, 0, 0) == -1 && !io_exists(out),
          "a base missing a targeted weight is refused, no output");
    CHECK(merge_into(ad, base_dir, base_dir, ST_BF16, 0, 0, 0) == -1,
          "the output may not replace the base");
    CHECK(count_files(tmp, "tmp-[0-9]*") == 0, "no temporary directory left");
}

/* ---- 4. against peft ------------------------------------------------ */

static void test_golden(const char *tmp)
{
    char path[4200];
    const char *top = getenv("TOP");
    snprintf(path, sizeof path, "%s/tests/golden/merge-s260-peft.json",
             top ? top : ".");
    if (!io_exists(path)) {
        SKIP("no %s", path);
        return;
    }
    json_value *g;
    if (json_parse_file(path, &g) != 0) {
        CHECK(0, "read %s", path);
        return;
    }
    llama_config mc;
    llama_config_load(base_dir, &mc);
    const json_value *jids = json_get(g, "input_ids");
    const json_value *rows = json_get(g, "rows");
    const json_value *jc = json_get(g, "cases");
    int n = (int)jids->u.array.n;
    int32_t *ids = malloc(n * sizeof *ids);
    for (int t = 0; t < n; t++)
        ids[t] = (int32_t)jids->u.array.items[t]->u.number.integer;
    for (size_t k = 0; k < jc->u.array.n; k++) {
        const json_value *c = jc->u.array.items[k];
        const char *name = json_get_string(c, "name", NULL);
        const adapter_case *ac = NULL;
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
            if (name && strcmp(cases[i].name, name) == 0)
                ac = &cases[i];
        if (!ac) {
            CHECK(0, "golden case '%s' is one of ours", name ? name : "?");
            continue;
        }
        lora_adapter *a = make_adapter(&mc, ac);
        double s = adapter_sum(a, 0), s2 = adapter_sum(a, 1);
        double ws = json_get_number(c, "adapter_sum", NAN);
        double ws2 = json_get_number(c, "adapter_sumsq", NAN);
        CHECK(fabs(s - ws) <= 1e-9 * fmax(1, fabs(ws)) &&
                  fabs(s2 - ws2) <= 1e-9 * fmax(1, ws2),
              "[%s] the adapter is the one the golden file was made with",
              name);
        char ad[4200], out[4200];
        snprintf(ad, sizeof ad, "%s/golden-adapter-%s", tmp, name);
        snprintf(out, sizeof out, "%s/golden-merged-%s", tmp, name);
        adapter_write(ad, a, base_dir);
        lora_free(a);
        CHECK(merge_into(ad, NULL, out, ST_F32, 0, 0, 0) == 0, "[%s] merged",
              name);
        float *got = forward(out, NULL, ids, n);
        const json_value *want = json_get(c, "logits");
        double worst = 0;
        int argmax_ok = 1;
        for (size_t r = 0; got && r < rows->u.array.n; r++) {
            int64_t row = rows->u.array.items[r]->u.number.integer;
            const json_value *wr = want->u.array.items[r];
            int best = 0;
            for (int v = 0; v < mc.vocab; v++) {
                worst = fmax(worst, fabs(got[row * mc.vocab + v] -
                                         wr->u.array.items[v]->u.number.value));
                if (got[row * mc.vocab + v] > got[row * mc.vocab + best])
                    best = v;
            }
            const json_value *am = json_get(c, "argmax");
            if (am && am->u.array.items[row]->u.number.integer != best)
                argmax_ok = 0;
        }
        CHECK(
            got && worst <= ABS_TOL_PEFT,
            "[%s] our merge's logits = peft merge_and_unload in transformers: "
            "max |diff| %.3g <= %g",
            name, worst, ABS_TOL_PEFT);
        CHECK(got && argmax_ok, "[%s] same argmax on the golden rows", name);
        free(got);
    }
    free(ids);
    json_free(g);
}

/* ---- fixtures for the torch script and the CLI test ----------------- */

static int make_fixtures(const char *dir)
{
    llama_config mc;
    if (mkdir(dir, 0777) != 0 && !io_exists(dir))
        return fprintf(stderr, "cannot create '%s'\n", dir), 2;
    if (llama_config_load(base_dir, &mc) != 0)
        return 2;
    FILE *sums = NULL;
    char p[4200];
    snprintf(p, sizeof p, "%s/adapter-sums.json", dir);
    sums = fopen(p, "w");
    fprintf(sums, "{");
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const adapter_case *c = &cases[ci];
        lora_adapter *a = make_adapter(&mc, c);
        char ad[4200], out[4200];
        snprintf(ad, sizeof ad, "%s/adapter-%s", dir, c->name);
        if (adapter_write(ad, a, base_dir) != 0)
            return 2;
        fprintf(sums, "%s\"%s\": {\"sum\": %.17g, \"sumsq\": %.17g}",
                ci ? ", " : "", c->name, adapter_sum(a, 0), adapter_sum(a, 1));
        lora_free(a);
        snprintf(out, sizeof out, "%s/merged-%s-f32", dir, c->name);
        if (merge_into(ad, NULL, out, ST_F32, 0, 0, 0) != 0)
            return 2;
        snprintf(out, sizeof out, "%s/merged-%s-bf16", dir, c->name);
        if (merge_into(ad, NULL, out, ST_BF16, 0, 0, 300000) != 0)
            return 2;
    }
    fprintf(sums, "}\n");
    fclose(sums);
    return make_bad_fixtures(dir) ? 2 : 0;
}

int main(int argc, char **argv)
{
    const char *shared = check_shared();
    snprintf(base_dir, sizeof base_dir, "%s/models/stories260K", shared);
    snprintf(nf4_dir, sizeof nf4_dir, "%s/golden/s260-nf4-f32", shared);
    int have = io_exists(base_dir);
    if (argc == 3 && strcmp(argv[1], "--make-fixtures") == 0) {
        if (!have)
            return fprintf(stderr, "no %s\n", base_dir), 77;
        return make_fixtures(argv[2]);
    }
    test_arithmetic();
    if (!have) {
        SKIP("no %s (set SHARED)", base_dir);
        return CHECK_DONE();
    }
    char tmp[] = "/tmp/test_merge.XXXXXX";
    if (!mkdtemp(tmp)) {
        CHECK(0, "mkdtemp");
        return CHECK_DONE();
    }
    test_stories(tmp);
    test_nf4(tmp);
    test_bad(tmp);
    test_golden(tmp);
    io_remove_tree(tmp);
    return CHECK_DONE();
}
