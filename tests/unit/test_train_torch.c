/* test_train_torch.c: our training against torch + transformers + peft.
 *
 * tests/golden/torch-train-s260.json was made by tests/torch/train_ref.py
 * (see tests/torch/make-inputs.sh): peft trained stories260K from our
 * initial adapter (lora_init with the config's seed) on the packed rows of
 * each step, in float32 on a GPU and in float64 on the CPU, with
 * torch.optim.AdamW, clip_grad_norm_ and transformers' cosine schedule; and
 * it loaded our final adapter and recorded its logits on a fixed input.
 *
 * Here the same rows go through train_batch_build and train_step from the
 * same initial adapter, and:
 *   - each step's loss, gradient norm and learning rate agree with torch's;
 *   - the final adapter agrees with peft's (a sample of the values and the
 *     norm of every tensor);
 *   - our final adapter, written with adapter_write and read back, gives
 *     the logits peft gave for it (check 4).
 * Tolerances are named below with the measured values they bound.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter.h"
#include "check.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "train.h"

/* Measured when the fixture was made (H100, torch 2.11, transformers
 * 5.17, peft 0.21): losses 2.7e-7 (f64) and 2.8e-7 (f32), gradient norms
 * 1.8e-6, adapter values 9.2e-5 (f64) and 2.3e-4 (f32) of the largest,
 * tensor norms 4.2e-6, peft logits 7.4e-7. The bounds leave room for
 * other compilers and CPUs, and are far below what a wrong term gives.
 *
 * Per-step loss against torch float64 (the math itself) and float32 on a
 * GPU (another summation order): relative. */
#define REL_TOL_LOSS_F64 1e-5
#define REL_TOL_LOSS_F32 1e-5
#define REL_TOL_GRAD_NORM 2e-5
/* Final adapter values, relative to the largest |value|; Adam turns tiny
 * gradient differences into sign-sized steps where a gradient is near 0. */
#define REL_TOL_ADAPTER 1e-3
#define REL_TOL_TENSOR_NORM 1e-4
/* Logits of our adapter through peft vs our forward: max |diff| / max |logit|.
 */
#define REL_TOL_PEFT_LOGITS 1e-5

static const json_value *get(const json_value *o, const char *k)
{
    const json_value *v = json_get(o, k);
    if (!v) {
        fprintf(stderr, "fixture lacks '%s'\n", k);
        exit(2);
    }
    return v;
}

static double num(const json_value *v)
{
    return v->u.number.value;
}
static const json_value *item(const json_value *a, size_t i)
{
    return a->u.array.items[i];
}

/* The fixture's rows as an in-memory packed file (row r of the fixture is
 * row index r here; fixture rows keep their original indices in `map`). */
static void build_pack(const json_value *rows, pack_data *d, int64_t **map,
                       size_t *nmap)
{
    size_t n = rows->u.array.n;
    uint32_t seq = (uint32_t)get(item(rows, 0), "ids")->u.array.n;
    memset(d, 0, sizeof *d);
    d->h.seq_len = seq;
    d->h.n_rows = n;
    d->ids = calloc(n * seq, sizeof *d->ids);
    d->weights = calloc(n * seq, 1);
    d->row_spans = calloc(n + 1, sizeof *d->row_spans);
    size_t nsp = 0;
    for (size_t r = 0; r < n; r++)
        nsp += get(item(rows, r), "spans")->u.array.n;
    d->spans = calloc(nsp, sizeof *d->spans);
    d->h.n_spans = nsp;
    *map = calloc(n, sizeof **map);
    *nmap = n;
    nsp = 0;
    for (size_t r = 0; r < n; r++) {
        const json_value *o = item(rows, r);
        (*map)[r] = get(o, "row")->u.number.integer;
        const json_value *ids = get(o, "ids"), *w = get(o, "weights");
        for (uint32_t t = 0; t < seq; t++) {
            d->ids[r * seq + t] = (uint32_t)item(ids, t)->u.number.integer;
            d->weights[r * seq + t] = (uint8_t)item(w, t)->u.number.integer;
        }
        const json_value *sp = get(o, "spans");
        d->row_spans[r] = nsp;
        for (size_t s = 0; s < sp->u.array.n; s++) {
            d->spans[nsp].start =
                (uint32_t)item(item(sp, s), 0)->u.number.integer;
            d->spans[nsp].len =
                (uint32_t)item(item(sp, s), 1)->u.number.integer;
            nsp++;
        }
    }
    d->row_spans[n] = nsp;
}

static uint64_t local_row(const int64_t *map, size_t n, int64_t orig)
{
    for (size_t i = 0; i < n; i++)
        if (map[i] == orig)
            return i;
    fprintf(stderr, "row %lld not in the fixture\n", (long long)orig);
    exit(2);
}

int main(void)
{
    const char *shared = check_shared();
    const char *top = getenv("TOP");
    char path[4096], mdir[4096];
    snprintf(mdir, sizeof mdir, "%s/models/stories260K", shared);
    if (!io_exists(mdir)) {
        SKIP("torch comparison: %s absent", mdir);
        return 77;
    }
    snprintf(path, sizeof path, "%s/tests/golden/torch-train-s260.json",
             top ? top : ".");
    char *text;
    size_t len;
    json_value *g;
    if (io_read_file(path, &text, &len) != 0 ||
        json_parse(text, len, path, 1, &g) != 0)
        return 2;
    llama_model *m;
    if (llama_load(mdir, &m) != 0)
        return 2;
    CHECK(json_get_int(g, "batch_mismatches", -1) == 0,
          "torch rebuilt lora-train's micro-batches from the packed rows "
          "identically");

    /* the configuration, through the same table lora-train uses */
    train_config cfg;
    cfg_defaults(train_fields, train_nfields, &cfg);
    const json_value *jc = get(g, "config");
    for (size_t i = 0; i < jc->u.object.n; i++) {
        const json_value *v = jc->u.object.values[i];
        strbuf sb = STRBUF_INIT;
        if (v->type == JSON_STRING)
            sb_puts(&sb, v->u.string.s);
        else if (v->type == JSON_ARRAY)
            for (size_t k = 0; k < v->u.array.n; k++) {
                if (k)
                    sb_putc(&sb, ',');
                sb_puts(&sb, item(v, k)->u.string.s);
            }
        else if (v->type != JSON_NULL)
            json_append_value(&sb, v);
        if (v->type != JSON_NULL)
            cfg_set(train_fields, train_nfields, &cfg, jc->u.object.keys[i],
                    sb_str(&sb), "fixture");
        sb_free(&sb);
    }
    CHECK(train_config_check(&cfg) == 0, "fixture configuration is valid");
    lora_config lc;
    train_lora_config(&cfg, &lc);
    lora_adapter *a;
    lora_new(&m->cfg, &lc, &a);
    lora_init(a, (uint64_t)cfg.seed);
    adamw opt;
    adamw_init(&opt, a->n_params, cfg.adam_beta1, cfg.adam_beta2,
               cfg.adam_epsilon, cfg.weight_decay);
    float *grad = calloc(a->n_params, sizeof(float));

    pack_data d;
    int64_t *map;
    size_t nmap;
    build_pack(get(g, "rows"), &d, &map, &nmap);
    const json_value *steps = get(g, "steps");
    const json_value *r32 = get(get(g, "runs"), "f32");
    const json_value *r64 = get(get(g, "runs"), "f64");
    int64_t total = cfg.max_steps;
    double e64 = 0, e32 = 0, en = 0, elr = 0;
    const json_value *ours = json_get(g, "ours_loss");
    double eours = 0;
    for (size_t s = 0; s < steps->u.array.n; s++) {
        const json_value *st = item(steps, s);
        train_batch mb[8];
        memset(mb, 0, sizeof mb);
        size_t nm = st->u.array.n;
        for (size_t k = 0; k < nm && k < 8; k++) {
            const json_value *rs = item(st, k);
            uint64_t rows[64];
            for (size_t i = 0; i < rs->u.array.n && i < 64; i++)
                rows[i] = local_row(map, nmap, item(rs, i)->u.number.integer);
            train_batch_build(&mb[k], &d, rows, rs->u.array.n);
        }
        double lr = train_lr(&cfg, (int64_t)s, total), loss, norm;
        train_step(m, a, &opt, grad, mb, nm, lr, cfg.max_grad_norm,
                   cfg.gradient_checkpointing, (uint64_t)cfg.seed, (int64_t)s,
                   &loss, &norm);
        double l64 = num(item(get(r64, "loss"), s));
        double l32 = num(item(get(r32, "loss"), s));
        double n64 = num(item(get(r64, "grad_norm"), s));
        double lrt = num(item(get(r64, "learning_rate"), s));
        e64 = fmax(e64, fabs(loss - l64) / l64);
        e32 = fmax(e32, fabs(loss - l32) / l32);
        en = fmax(en, fabs(norm - n64) / n64);
        elr = fmax(elr, fabs(lr - lrt) / fmax(lrt, 1e-12));
        if (ours && s < ours->u.array.n)
            eours = fmax(eours, fabs(loss - num(item(ours, s))));
        printf("# step %zu: loss %.8f torch-f64 %.8f torch-f32 %.8f; grad norm "
               "%.6f torch %.6f; lr %.6g torch %.6g\n",
               s + 1, loss, l64, l32, norm, n64, lr, lrt);
        for (size_t k = 0; k < nm && k < 8; k++)
            train_batch_free(&mb[k]);
    }
    CHECK(elr <= 1e-12,
          "learning rates equal transformers' cosine schedule "
          "with warmup (max rel diff %.1e)",
          elr);
    CHECK(e64 <= REL_TOL_LOSS_F64,
          "per-step losses vs torch float64: max rel "
          "err %.2e",
          e64);
    CHECK(e32 <= REL_TOL_LOSS_F32,
          "per-step losses vs torch float32 (GPU): "
          "max rel err %.2e",
          e32);
    CHECK(en <= REL_TOL_GRAD_NORM,
          "gradient norms before clipping vs torch: "
          "max rel err %.2e",
          en);
    CHECK(eours == 0, "lora-train's own run logged these very losses");

    /* the final adapter, in peft's sorted key order */
    for (int run = 0; run < 2; run++) {
        const json_value *ad = get(run ? r32 : r64, "adapter");
        const json_value *keys = get(ad, "keys"), *norms = get(ad, "norms");
        const json_value *vals = get(ad, "values");
        int64_t stride = get(ad, "stride")->u.number.integer;
        int64_t flat = 0, vi = 0;
        double emax = 0, vmax = 0, enorm = 0;
        for (size_t k = 0; k < keys->u.array.n; k++) {
            const char *name = item(keys, k)->u.string.s;
            int32_t layer = -1;
            int lin = -1, ab = -1;
            for (int32_t i = 0; i < a->n_layers && lin < 0; i++)
                for (int l = 0; l < LLAMA_NLINEAR && lin < 0; l++)
                    for (int x = 0; x < 2; x++) {
                        char nm[160];
                        adapter_tensor_name(nm, sizeof nm, i, (llama_linear)l,
                                            x);
                        if (strcmp(nm, name) == 0) {
                            layer = i;
                            lin = l;
                            ab = x;
                        }
                    }
            if (lin < 0) {
                CHECK(0, "peft tensor '%s' has a counterpart", name);
                continue;
            }
            const float *p = ab ? lora_B(a, layer, (llama_linear)lin)
                                : lora_A(a, layer, (llama_linear)lin);
            const lora_slot *sl = lora_slot_of(a, layer, (llama_linear)lin);
            int64_t cnt = ab ? sl->out * a->cfg.r : a->cfg.r * sl->in;
            double nn = 0;
            for (int64_t j = 0; j < cnt; j++, flat++) {
                nn += (double)p[j] * p[j];
                if (flat % stride == 0) {
                    double want = num(item(vals, (size_t)vi++));
                    emax = fmax(emax, fabs(p[j] - want));
                    vmax = fmax(vmax, fabs(want));
                }
            }
            double wn = num(item(norms, k));
            enorm = fmax(enorm, fabs(sqrt(nn) - wn) / fmax(wn, 1e-12));
        }
        CHECK(vi == (int64_t)vals->u.array.n &&
                  keys->u.array.n == (size_t)a->n_layers * 7 * 2,
              "torch-%s: the adapters have the same %zu tensors",
              run ? "f32" : "f64", keys->u.array.n);
        CHECK(emax / vmax <= REL_TOL_ADAPTER,
              "torch-%s: final adapter values, "
              "max |diff| %.2e (%.2e of max |value|)",
              run ? "f32" : "f64", emax, emax / vmax);
        CHECK(enorm <= REL_TOL_TENSOR_NORM,
              "torch-%s: final adapter tensor "
              "norms, max rel err %.2e",
              run ? "f32" : "f64", enorm);
    }

    /* check 4: our adapter, written and read back, vs peft's logits of it */
    char tmp[] = "/tmp/test_train_torch.XXXXXX";
    if (!mkdtemp(tmp))
        return 2;
    CHECK(adapter_write(tmp, a, mdir) == 0, "write our final adapter");
    lora_adapter *back;
    CHECK(adapter_read(tmp, &m->cfg, &back, NULL) == 0 &&
              back->n_params == a->n_params &&
              memcmp(back->params, a->params, a->n_params * 4) == 0 &&
              back->scale == a->scale && back->cfg.targets == a->cfg.targets,
          "read it back: identical values, scale and targets");
    const json_value *pl = get(g, "peft_logits");
    CHECK(get(pl, "key_mismatches")->u.array.n == 0 &&
              num(get(pl, "load_max_abs_diff")) == 0,
          "peft loaded every tensor of our adapter file unchanged");
    const json_value *ids = get(g, "input_ids");
    int64_t n = (int64_t)ids->u.array.n, V = m->cfg.vocab;
    int32_t *id = malloc(n * 4), *pos = malloc(n * 4), *st0 = calloc(n, 4);
    int32_t *tg = malloc(n * 4);
    for (int64_t t = 0; t < n; t++) {
        id[t] = (int32_t)item(ids, t)->u.number.integer;
        pos[t] = (int32_t)t;
    }
    for (int64_t t = 0; t < n; t++)
        tg[t] = t + 1 < n ? id[t + 1] : -1;
    llama_batch b = {n, id, pos, st0, tg, NULL};
    float *lg = malloc(n * V * sizeof(float));
    double ls, ws;
    llama_forward(m, back, &b, lg, &ls, &ws);
    const json_value *rows = get(pl, "rows"), *lgs = get(pl, "logits");
    double worst = 0;
    for (size_t i = 0; i < rows->u.array.n; i++) {
        int64_t r = item(rows, i)->u.number.integer;
        double mx = 0, e = 0;
        for (int64_t v = 0; v < V; v++) {
            double want = num(item(item(lgs, i), v));
            mx = fmax(mx, fabs(want));
            e = fmax(e, fabs(lg[r * V + v] - want));
        }
        worst = fmax(worst, e / mx);
    }
    double pls = num(get(pl, "loss"));
    CHECK(worst <= REL_TOL_PEFT_LOGITS,
          "our adapter through peft: logits "
          "max rel err %.2e",
          worst);
    CHECK(fabs(ls / ws - pls) / pls <= REL_TOL_PEFT_LOGITS,
          "our adapter through peft: loss %.7f vs %.7f", ls / ws, pls);
    const json_value *am = get(pl, "argmax");
    int same = 1;
    for (int64_t t = 0; t < n; t++) {
        int64_t best = 0;
        for (int64_t v = 1; v < V; v++)
            if (lg[t * V + v] > lg[t * V + best])
                best = v;
        same &= best == item(am, t)->u.number.integer;
    }
    CHECK(same,
          "our adapter through peft: the same argmax at all %lld "
          "positions",
          (long long)n);
    /* the adapter makes a difference: without it the logits differ */
    float *lg0 = malloc(n * V * sizeof(float));
    llama_forward(m, NULL, &b, lg0, NULL, NULL);
    double dd = 0;
    for (int64_t e = 0; e < n * V; e++)
        dd = fmax(dd, fabs(lg0[e] - lg[e]));
    CHECK(dd > 1e-2, "the trained adapter changes the logits (by %.3f)", dd);
    io_remove_tree(tmp);
    free(lg0);
    free(lg);
    free(id);
    free(pos);
    free(st0);
    free(tg);
    lora_free(back);
    lora_free(a);
    adamw_free(&opt);
    free(grad);
    free(map);
    pack_data_free(&d);
    cfg_free(train_fields, train_nfields, &cfg);
    llama_free(m);
    json_free(g);
    free(text);
    return CHECK_DONE();
}
