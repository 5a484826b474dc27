/* test_train.c: the pieces of the training loop that need no model file:
 * learning-rate schedules against transformers' formulas, the epoch
 * shuffle, micro-batches from packed rows, AdamW against a double-precision
 * transcription of torch's update, clipping, LoRA initialisation and
 * scaling, target names, adapter files (PEFT names, config, round trip,
 * refusals), merging, and configuration checks.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adamw.h"
#include "adapter.h"
#include "check.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "safetensors.h"
#include "train.h"

static train_config base_config(void)
{
    train_config c;
    cfg_defaults(train_fields, train_nfields, &c);
    return c;
}

static void set(train_config *c, const char *k, const char *v)
{
    if (cfg_set(train_fields, train_nfields, c, k, v, "test") != 0)
        exit(2);
}

/* transformers' schedule lambdas, transcribed (optimization.py). */
static double hf_lambda(const char *name, int64_t s, int64_t w, int64_t total)
{
    if (strcmp(name, "constant") == 0)
        return 1;
    if (s < w)
        return (double)s / (double)(w > 1 ? w : 1);
    if (strcmp(name, "constant_with_warmup") == 0)
        return 1;
    double rest = (double)(total - w > 1 ? total - w : 1);
    if (strcmp(name, "linear") == 0)
        return fmax(0.0, (double)(total - s) / rest);
    double p = (double)(s - w) / rest;
    return fmax(0.0, 0.5 * (1.0 + cos(3.14159265358979323846 * 0.5 * 2.0 * p)));
}

static void schedules(void)
{
    const char *names[] = {"constant", "constant_with_warmup", "linear",
                           "cosine"};
    for (int k = 0; k < 4; k++) {
        train_config c = base_config();
        set(&c, "lr_scheduler_type", names[k]);
        set(&c, "learning_rate", "2e-4");
        set(&c, "warmup_ratio", "0.03");
        int64_t total = 100, w = train_warmup_steps(&c, total);
        double worst = 0;
        for (int64_t s = 0; s <= total; s++)
            worst = fmax(worst, fabs(train_lr(&c, s, total) -
                                     2e-4 * hf_lambda(names[k], s, w, total)));
        CHECK(w == 3 && worst < 1e-18,
              "%s schedule, warmup_ratio 0.03 of 100 "
              "= 3 steps",
              names[k]);
        cfg_free(train_fields, train_nfields, &c);
    }
    train_config c = base_config();
    set(&c, "lr_scheduler_type", "constant");
    set(&c, "warmup_ratio", "0.03");
    CHECK(train_lr(&c, 0, 10) == c.learning_rate,
          "constant ignores warmup (the seed's 0.03 has no effect)");
    set(&c, "warmup_steps", "7");
    CHECK(train_warmup_steps(&c, 1000) == 7,
          "warmup_steps overrides the ratio");
    set(&c, "lr_scheduler_type", "linear");
    CHECK(train_lr(&c, 0, 1000) == 0 &&
              fabs(train_lr(&c, 7, 1000) - c.learning_rate) < 1e-20,
          "linear warmup starts at 0 and peaks at the warmup's end");
    cfg_free(train_fields, train_nfields, &c);
}

static void shuffles(void)
{
    enum { N = 1000 };
    uint64_t p[N], q[N];
    int seen[N] = {0}, ok = 1;
    train_shuffle(p, N, 42, 0);
    for (int i = 0; i < N; i++)
        ok &= p[i] < N && !seen[p[i]]++;
    CHECK(ok, "an epoch's order is a permutation");
    train_shuffle(q, N, 42, 0);
    CHECK(memcmp(p, q, sizeof p) == 0,
          "the same seed and epoch, the same order");
    train_shuffle(q, N, 42, 1);
    CHECK(memcmp(p, q, sizeof p) != 0, "each epoch is shuffled afresh");
    train_shuffle(q, N, 43, 0);
    CHECK(memcmp(p, q, sizeof p) != 0, "another seed, another order");
    /* position of row 0 roughly uniform */
    int first_half = 0;
    for (int e = 0; e < 400; e++) {
        train_shuffle(q, N, 9, e);
        for (int i = 0; i < N; i++)
            if (q[i] == 0)
                first_half += i < N / 2;
    }
    CHECK(first_half > 160 && first_half < 240,
          "row 0 lands in the first "
          "half %d times of 400",
          first_half);
    CHECK(train_dropout_key(1, 2, 0) != train_dropout_key(1, 2, 1) &&
              train_dropout_key(1, 2, 0) != train_dropout_key(1, 3, 0) &&
              train_dropout_key(1, 2, 0) == train_dropout_key(1, 2, 0),
          "a dropout key per (seed, step, micro-batch)");
}

static void batches(void)
{
    /* two rows of 8: [span 0..3 | span 3..7, padding at 7], [span 0..8] */
    uint32_t ids[16] = {1, 10, 11, 1,  20, 21, 22, 0,
                        1, 30, 31, 32, 33, 34, 35, 36};
    uint8_t w[16] = {0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1};
    uint64_t rs[3] = {0, 2, 3};
    pack_span sp[3] = {{0, 3}, {3, 4}, {0, 8}};
    pack_data d = {0};
    d.h.seq_len = 8;
    d.h.n_rows = 2;
    d.h.n_spans = 3;
    d.ids = ids;
    d.weights = w;
    d.row_spans = rs;
    d.spans = sp;
    train_batch tb = {0};
    uint64_t rows[2] = {1, 0};
    train_batch_build(&tb, &d, rows, 2);
    static const int32_t want_ids[15] = {1, 30, 31, 32, 33, 34, 35, 36,
                                         1, 10, 11, 1,  20, 21, 22};
    static const int32_t want_pos[15] = {0, 1, 2, 3, 4, 5, 6, 7,
                                         0, 1, 2, 0, 1, 2, 3};
    static const int32_t want_st[15] = {0, 0, 0, 0,  0,  0,  0, 0,
                                        8, 8, 8, 11, 11, 11, 11};
    static const int32_t want_tg[15] = {-1, -1, 32, 33, 34, 35, 36, -1,
                                        10, 11, -1, -1, 21, 22, -1};
    CHECK(tb.b.n == 15 && memcmp(tb.ids, want_ids, sizeof want_ids) == 0 &&
              memcmp(tb.pos, want_pos, sizeof want_pos) == 0 &&
              memcmp(tb.start, want_st, sizeof want_st) == 0,
          "rows laid end to end, padding dropped, positions per span");
    CHECK(memcmp(tb.targets, want_tg, sizeof want_tg) == 0 &&
              tb.weight_sum == 9,
          "token t targets the next token with that token's weight; "
          "completion-only weights respected");
    strbuf sb = STRBUF_INIT;
    train_batch_json(&tb, &sb);
    json_value *v;
    CHECK(json_parse(sb.buf, sb.len, "batch", 1, &v) == 0 &&
              json_get_int(v, "n", 0) == 15,
          "a batch dumps as JSON");
    json_free(v);
    sb_free(&sb);
    train_batch_free(&tb);
}

static void adamw_and_clip(void)
{
    enum { N = 5 };
    float p[N] = {0.5f, -1.0f, 0.25f, 2.0f, 0.75f};
    double pd[N], md[N] = {0}, vd[N] = {0};
    for (int i = 0; i < N; i++)
        pd[i] = p[i];
    adamw o;
    adamw_init(&o, N, 0.9, 0.999, 1e-8, 0.01);
    double worst = 0;
    for (int s = 1; s <= 20; s++) {
        float g[N];
        for (int i = 0; i < N; i++)
            g[i] = (float)sin(s * 0.7 + i) * (i == 4 ? 0.0f : 1.0f);
        double lr = 1e-2 * (s % 3 + 1);
        adamw_step(&o, p, g, lr);
        for (int i = 0; i < N; i++) {
            pd[i] *= 1 - lr * 0.01;
            md[i] = 0.9 * md[i] + 0.1 * g[i];
            vd[i] = 0.999 * vd[i] + 0.001 * (double)g[i] * g[i];
            double mh = md[i] / (1 - pow(0.9, s)),
                   vh = vd[i] / (1 - pow(0.999, s));
            pd[i] -= lr * mh / (sqrt(vh) + 1e-8);
            worst = fmax(worst, fabs(p[i] - pd[i]));
        }
    }
    CHECK(worst < 1e-6 && o.step == 20,
          "AdamW follows torch's update "
          "(max diff %.1e after 20 steps)",
          worst);
    CHECK(p[4] < 0.749f && fabs(p[4] - pd[4]) < 1e-6,
          "a zero gradient still decays the weight");
    float g[4] = {3, 4, 0, 0};
    double n = grad_norm(g, 4);
    float f = grad_clip(g, 4, n, 1.0);
    CHECK(n == 5 && fabsf(f - 0.2f) < 1e-6f && fabsf(g[0] - 0.6f) < 1e-6f,
          "clipping to max_norm 1 scales a norm-5 gradient by 1/(5+1e-6)");
    CHECK(grad_clip(g, 4, 0.5, 1.0) == 1.0f && grad_clip(g, 4, 9, 0) == 1.0f,
          "no clipping below the limit or with max_grad_norm 0");
    adamw_free(&o);
}

static llama_config small_config(void)
{
    llama_config c = {0};
    c.dim = 16;
    c.hidden = 24;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 4;
    c.vocab = 32;
    return c;
}

static void lora_basics(void)
{
    const char *names[] = {"q_proj", "down_proj"};
    uint32_t t;
    CHECK(lora_targets_parse(names, 2, &t) == 0 &&
              t == ((1u << LLAMA_Q) | (1u << LLAMA_DOWN)),
          "target names");
    const char *all[] = {"all-linear"};
    CHECK(lora_targets_parse(all, 1, &t) == 0 && t == LORA_ALL_LINEAR,
          "all-linear is every linear of the layers");
    CHECK(lora_targets_parse(NULL, 0, &t) == 0 && t == LORA_DEFAULT_TARGETS,
          "no names: q_proj and v_proj");
    const char *bad[] = {"lm_head"};
    fprintf(stderr, "(expected errors follow)\n");
    CHECK(lora_targets_parse(bad, 1, &t) != 0, "lm_head is not a target");
    char buf[128];
    lora_targets_format(LORA_ALL_LINEAR, buf, sizeof buf);
    CHECK(strcmp(buf,
                 "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj") ==
              0,
          "targets print in layer order");

    llama_config mc = small_config();
    lora_config lc = {.r = 4, .alpha = 16, .targets = LORA_DEFAULT_TARGETS};
    lora_adapter *a;
    lora_new(&mc, &lc, &a);
    CHECK(a->scale == 4.0f, "scale alpha/r = 4");
    /* layout: per layer q (A 4x16, B 16x4) then v (A 4x16, B 8x4) */
    CHECK(a->n_params == 2 * (64 + 64 + 64 + 32) &&
              lora_A(a, 1, LLAMA_Q) == a->params + 224 &&
              !lora_A(a, 0, LLAMA_K),
          "parameters laid out layer by layer, A then B");
    lora_init(a, 42);
    double mx = 0, mean = 0;
    int bzero = 1;
    const lora_slot *s = lora_slot_of(a, 0, LLAMA_Q);
    for (int64_t j = 0; j < 64; j++) {
        mx = fmax(mx, fabs(a->params[s->a + j]));
        mean += a->params[s->a + j] / 64.0;
    }
    for (int64_t j = 0; j < 64; j++)
        bzero &= a->params[s->b + j] == 0;
    CHECK(mx <= 0.25 && mx > 0.2 && fabs(mean) < 0.06 && bzero,
          "A uniform in +-1/sqrt(in) = +-0.25 (max %.3f), B zero", mx);
    lora_adapter *b;
    lora_new(&mc, &lc, &b);
    lora_init(b, 42);
    CHECK(memcmp(a->params, b->params, a->n_params * 4) == 0,
          "the same seed, the same adapter");
    lora_init(b, 43);
    CHECK(memcmp(a->params, b->params, a->n_params * 4) != 0,
          "another seed, another adapter");
    lora_free(b);
    lora_config rs = lc;
    rs.use_rslora = 1;
    lora_new(&mc, &rs, &b);
    CHECK(b->scale == 8.0f, "rsLoRA: scale alpha/sqrt(r) = 8");
    lora_free(b);
    lora_config bad_r = lc;
    bad_r.r = 0;
    CHECK(lora_new(&mc, &bad_r, &b) != 0, "r = 0 is refused");
    bad_r = lc;
    bad_r.dropout = 1.0;
    CHECK(lora_new(&mc, &bad_r, &b) != 0, "dropout 1 is refused");
    lora_free(a);
}

static void adapters(void)
{
    char dir[] = "/tmp/test_train.XXXXXX";
    if (!mkdtemp(dir))
        exit(2);
    llama_config mc = small_config();
    lora_config lc = {.r = 2,
                      .alpha = 16,
                      .dropout = 0.1,
                      .use_rslora = 1,
                      .targets = (1u << LLAMA_Q) | (1u << LLAMA_V) |
                                 (1u << LLAMA_DOWN)};
    lora_adapter *a;
    lora_new(&mc, &lc, &a);
    for (size_t k = 0; k < a->n_params; k++)
        a->params[k] = lora_rand_uniform(1, k) - 0.5f;
    char *ad = io_path_join(dir, "adapter");
    CHECK(adapter_write(ad, a, "/models/base") == 0,
          "write an adapter directory");
    st_file *f;
    char *stp = io_path_join(ad, "adapter_model.safetensors");
    CHECK(st_open(stp, &f) == 0, "adapter_model.safetensors opens");
    const st_tensor *ta = st_find(
        f, "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight");
    const st_tensor *tb = st_find(
        f, "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
    CHECK(f->n == 12 && ta && tb && ta->shape[0] == 2 && ta->shape[1] == 16 &&
              tb->shape[0] == 16 && tb->shape[1] == 2 && ta->dtype == ST_F32 &&
              memcmp(ta->data, lora_A(a, 1, LLAMA_Q), 2 * 16 * 4) == 0,
          "PEFT tensor names, [r, in] and [out, r], F32");
    CHECK(f->metadata &&
              strcmp(json_get_string(f->metadata, "format", NULL), "pt") == 0,
          "metadata format pt");
    /* sorted by name, as safetensors.torch.save_file orders them */
    int sorted = 1;
    for (size_t i = 1; i < f->n; i++)
        sorted &= f->tensors[i - 1].offset < f->tensors[i].offset &&
                  strcmp(f->tensors[i - 1].name, f->tensors[i].name) < 0;
    CHECK(sorted, "tensors stored in name order");
    st_close(f);
    char *cp = io_path_join(ad, "adapter_config.json");
    char *text;
    size_t len;
    json_value *cfg;
    io_read_file(cp, &text, &len);
    CHECK(json_parse(text, len, cp, 1, &cfg) == 0,
          "adapter_config.json parses");
    const json_value *tm = json_get(cfg, "target_modules");
    CHECK(strcmp(json_get_string(cfg, "peft_type", NULL), "LORA") == 0 &&
              strcmp(json_get_string(cfg, "task_type", NULL), "CAUSAL_LM") ==
                  0 &&
              json_get_int(cfg, "r", 0) == 2 &&
              json_get_number(cfg, "lora_alpha", 0) == 16 &&
              json_get_number(cfg, "lora_dropout", 0) == 0.1 &&
              json_get(cfg, "use_rslora")->type == JSON_TRUE &&
              tm->u.array.n == 3 &&
              strcmp(json_get_string(cfg, "base_model_name_or_path", NULL),
                     "/models/base") == 0 &&
              strcmp(json_get_string(cfg, "bias", NULL), "none") == 0,
          "adapter_config.json: LORA, CAUSAL_LM, r, alpha, dropout, rsLoRA, "
          "targets, base");
    json_free(cfg);
    free(text);
    lora_adapter *b;
    char *base = NULL;
    CHECK(adapter_read(ad, &mc, &b, &base) == 0 && b->n_params == a->n_params &&
              memcmp(a->params, b->params, a->n_params * 4) == 0 &&
              b->cfg.targets == a->cfg.targets && b->scale == a->scale &&
              b->cfg.dropout == 0.1 && base &&
              strcmp(base, "/models/base") == 0,
          "read back: values, targets, scale, dropout, base model");
    free(base);
    lora_free(b);
    /* refusals */
    fprintf(stderr, "(expected errors follow)\n");
    llama_config other = mc;
    other.dim = 20;
    CHECK(adapter_read(ad, &other, &b, NULL) != 0,
          "an adapter for another model "
          "is refused");
    other = mc;
    other.n_layers = 1;
    CHECK(adapter_read(ad, &other, &b, NULL) != 0,
          "a layer the model lacks is refused");
    FILE *fp = fopen(cp, "w");
    fputs(
        "{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":16,\"use_dora\":true}",
        fp);
    fclose(fp);
    CHECK(adapter_read(ad, &mc, &b, NULL) != 0, "DoRA is refused");
    fp = fopen(cp, "w");
    fputs("{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":16,\"rank_pattern\":{"
          "\"q_proj\":4}}",
          fp);
    fclose(fp);
    CHECK(adapter_read(ad, &mc, &b, NULL) != 0, "rank_pattern is refused");
    fp = fopen(cp, "w");
    fputs("{\"peft_type\":\"LORA\",\"r\":2,\"lora_alpha\":16}", fp);
    fclose(fp);
    CHECK(adapter_read(ad, &mc, &b, NULL) == 0 && b->scale == 8.0f,
          "a minimal PEFT config reads (scale alpha/r)");
    lora_free(b);
    truncate(stp, 100);
    CHECK(adapter_read(ad, &mc, &b, NULL) != 0,
          "a truncated tensor file is refused");
    free(stp);
    free(cp);
    free(ad);
    io_remove_tree(dir);
    lora_free(a);
}

/* Merging the adapter into the weights gives the adapter's logits. */
static void merge(void)
{
    llama_config mc = small_config();
    llama_model m = {0};
    m.cfg = mc;
    m.cfg.norm_eps = 1e-5f;
    m.cfg.rope_theta = 10000;
    m.cfg.tied = 1;
    m.embed = malloc(mc.vocab * mc.dim * sizeof(float));
    m.norm = malloc(mc.dim * sizeof(float));
    for (int i = 0; i < mc.vocab * mc.dim; i++)
        m.embed[i] = lora_rand_uniform(2, i) - 0.5f;
    for (int i = 0; i < mc.dim; i++)
        m.norm[i] = 1;
    m.head = (llama_weight){mc.vocab, mc.dim, m.embed, NULL};
    llama_layer L[2];
    m.layers = L;
    for (int i = 0; i < 2; i++) {
        L[i].attn_norm = m.norm;
        L[i].ffn_norm = m.norm;
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            int64_t o, in;
            llama_linear_shape(&mc, (llama_linear)l, &o, &in);
            L[i].lin[l] =
                (llama_weight){o, in, malloc(o * in * sizeof(float)), NULL};
            for (int64_t k = 0; k < o * in; k++)
                L[i].lin[l].f32[k] =
                    (lora_rand_uniform(3 + i * 7 + l, k) - 0.5f) * 0.5f;
        }
    }
    lora_config lc = {.r = 3, .alpha = 6, .targets = LORA_ALL_LINEAR};
    lora_adapter *a;
    lora_new(&mc, &lc, &a);
    for (size_t k = 0; k < a->n_params; k++)
        a->params[k] = (lora_rand_uniform(4, k) - 0.5f) * 0.3f;
    int32_t ids[12], pos[12], st[12];
    for (int t = 0; t < 12; t++) {
        ids[t] = (t * 7) % mc.vocab;
        pos[t] = t;
        st[t] = 0;
    }
    llama_batch b = {12, ids, pos, st, NULL, NULL};
    float l1[12 * 32], l2[12 * 32];
    llama_forward(&m, a, &b, l1, NULL, NULL);
    for (int i = 0; i < 2; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            lora_merge_into(a, i, (llama_linear)l, L[i].lin[l].f32);
    llama_forward(&m, NULL, &b, l2, NULL, NULL);
    double d = 0, mx = 0;
    for (int e = 0; e < 12 * 32; e++) {
        d = fmax(d, fabs(l1[e] - l2[e]));
        mx = fmax(mx, fabs(l1[e]));
    }
    CHECK(d / mx < 1e-5, "merged weights give the adapter's logits (rel %.1e)",
          d / mx);
    for (int i = 0; i < 2; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            free(L[i].lin[l].f32);
    free(m.embed);
    free(m.norm);
    lora_free(a);
}

static void config_checks(void)
{
    train_config c = base_config();
    CHECK(train_config_check(&c) == 0, "the defaults are valid");
    CHECK(c.r == 8 && c.lora_alpha == 8 && c.learning_rate == 5e-5 &&
              c.max_grad_norm == 1 && c.seed == 42 && c.adam_beta2 == 0.999 &&
              strcmp(c.lr_scheduler_type, "linear") == 0,
          "defaults are peft's and transformers'");
    fprintf(stderr, "(expected errors follow)\n");
    static const char *bad[][2] = {
        {"lr_scheduler_type", "polynomial"},
        {"optim", "adamw_8bit"},
        {"lora_dropout", "1"},
        {"r", "0"},
        {"target_modules", "q_proj,lm_head"},
        {"gradient_accumulation_steps", "0"},
        {"device", "tpu"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        train_config x = base_config();
        set(&x, bad[i][0], bad[i][1]);
        CHECK(train_config_check(&x) != 0, "%s=%s is refused", bad[i][0],
              bad[i][1]);
        cfg_free(train_fields, train_nfields, &x);
    }
    cfg_free(train_fields, train_nfields, &c);
}

int main(void)
{
    schedules();
    shuffles();
    batches();
    adamw_and_clip();
    lora_basics();
    adapters();
    merge();
    config_checks();
    return CHECK_DONE();
}
