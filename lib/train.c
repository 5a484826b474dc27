/* train.c: the training loop of lora-train: configuration table, data
 * order, schedules, steps, evaluation, checkpoints and resumption.
 *
 * Resumption is exact because nothing here keeps hidden state: the row
 * order of an epoch, the dropout masks of a micro-batch and the learning
 * rate of a step are functions of (seed, epoch, step, micro-batch), and the
 * math below is independent of the thread count. A checkpoint therefore
 * needs only the adapter, AdamW's moments, the step and the logging
 * accumulators; the RNG "state" it records is the seed and the generator's
 * name.
 */
#define _POSIX_C_SOURCE 200809L
#include "train.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "adapter.h"
#include "dist.h"
#include "io.h"
#include "json.h"
#include "msg.h"
#include "safetensors.h"

#define F(key, type, member, def, help) \
    {key, type, offsetof(train_config, member), def, help}

const cfg_field train_fields[] = {
    F("r", CFG_INT, r, "8", "LoRA rank"),
    F("lora_alpha", CFG_FLOAT, lora_alpha, "8", "LoRA scaling numerator: scale = lora_alpha / r"),
    F("lora_dropout", CFG_FLOAT, lora_dropout, "0", "dropout on the LoRA input, in [0, 1)"),
    F("target_modules", CFG_STRLIST, target_modules, "q_proj,v_proj",
      "linears to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear"),
    F("use_rslora", CFG_BOOL, use_rslora, "false", "scale = lora_alpha / sqrt(r)"),
    F("model_name_or_path", CFG_STRING, model_name_or_path, NULL, "base model directory (-m)"),
    F("output_dir", CFG_STRING, output_dir, "trainer_output", "adapter and checkpoints (-o)"),
    F("num_train_epochs", CFG_FLOAT, num_train_epochs, "3", "passes over the packed file"),
    F("max_steps", CFG_INT, max_steps, "-1", "total optimizer steps when > 0 (overrides epochs)"),
    F("per_device_train_batch_size", CFG_INT, per_device_train_batch_size, "8", "rows per micro-batch"),
    F("per_device_eval_batch_size", CFG_INT, per_device_eval_batch_size, "8", "rows per evaluation batch"),
    F("gradient_accumulation_steps", CFG_INT, gradient_accumulation_steps, "1", "micro-batches per optimizer step"),
    F("learning_rate", CFG_FLOAT, learning_rate, "5e-5", "peak learning rate"),
    F("weight_decay", CFG_FLOAT, weight_decay, "0", "AdamW decoupled weight decay"),
    F("adam_beta1", CFG_FLOAT, adam_beta1, "0.9", "AdamW beta1"),
    F("adam_beta2", CFG_FLOAT, adam_beta2, "0.999", "AdamW beta2"),
    F("adam_epsilon", CFG_FLOAT, adam_epsilon, "1e-8", "AdamW epsilon"),
    F("optim", CFG_STRING, optim, "adamw_torch",
      "adamw_torch, adamw_torch_fused, adamw_hf, paged_adamw_32bit (all the same 32-bit AdamW)"),
    F("lr_scheduler_type", CFG_STRING, lr_scheduler_type, "linear",
      "constant, constant_with_warmup, linear or cosine"),
    F("warmup_ratio", CFG_FLOAT, warmup_ratio, "0", "warmup as a share of the total steps"),
    F("warmup_steps", CFG_INT, warmup_steps, "0", "warmup steps (overrides warmup_ratio when > 0)"),
    F("max_grad_norm", CFG_FLOAT, max_grad_norm, "1", "clip the global gradient norm (0 = off)"),
    F("logging_steps", CFG_INT, logging_steps, "500", "steps between metrics lines"),
    F("save_steps", CFG_INT, save_steps, "500", "steps between checkpoints (0 = none)"),
    F("save_total_limit", CFG_INT, save_total_limit, "0", "keep only the newest N checkpoints (0 = all)"),
    F("eval_steps", CFG_INT, eval_steps, "0", "steps between evaluations (0 = at each epoch's end)"),
    F("seed", CFG_INT, seed, "42", "seed of the adapter init, data order and dropout"),
    F("gradient_checkpointing", CFG_BOOL, gradient_checkpointing, "false",
      "recompute activations in the backward pass (less memory, same results)"),
    F("offload_activations", CFG_BOOL, offload_activations, "true",
      "with gradient_checkpointing on a GPU: keep each layer's attention activations in "
      "pinned host memory rather than recompute them (faster, same results)"),
    F("device", CFG_STRING, device, "auto", "cpu, cuda, or auto (cuda when a GPU is present)"),
    F("on_nonfinite", CFG_STRING, on_nonfinite, "stop",
      "a step with a non-finite loss or gradient: stop, or skip it and count it"),
};
const size_t train_nfields = sizeof train_fields / sizeof train_fields[0];

/* The keys a resumed run must share with its checkpoint. */
static const char *const result_keys[] = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
    "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
    "warmup_ratio", "warmup_steps", "max_grad_norm", "seed",
};

static const char *const schedulers[] = {
    "constant", "constant_with_warmup", "linear", "cosine",
};
static const char *const optimizers[] = {
    "adamw_torch", "adamw_torch_fused", "adamw_hf", "paged_adamw_32bit",
    "adamw_32bit",
};

static int in_list(const char *s, const char *const *l, size_t n)
{
    for (size_t i = 0; s && i < n; i++)
        if (strcmp(s, l[i]) == 0)
            return 1;
    return 0;
}

int train_lora_config(const train_config *c, lora_config *out)
{
    memset(out, 0, sizeof *out);
    out->r = (int32_t)c->r;
    out->alpha = c->lora_alpha;
    out->dropout = c->lora_dropout;
    out->use_rslora = c->use_rslora;
    return lora_targets_parse((const char *const *)c->target_modules.items,
                              c->target_modules.n, &out->targets);
}

int train_config_check(const train_config *c)
{
#define NEED(cond, ...) \
    do { if (!(cond)) return msg_error(__VA_ARGS__); } while (0)
    NEED(c->r >= 1 && c->r <= 65536, "'r' must be in 1..65536, got %lld", (long long)c->r);
    NEED(c->lora_alpha > 0, "'lora_alpha' must be positive");
    NEED(c->lora_dropout >= 0 && c->lora_dropout < 1, "'lora_dropout' must be in [0, 1)");
    NEED(c->num_train_epochs > 0 || c->max_steps > 0,
         "'num_train_epochs' must be positive (or set 'max_steps')");
    NEED(c->per_device_train_batch_size >= 1, "'per_device_train_batch_size' must be at least 1");
    NEED(c->per_device_eval_batch_size >= 1, "'per_device_eval_batch_size' must be at least 1");
    NEED(c->gradient_accumulation_steps >= 1, "'gradient_accumulation_steps' must be at least 1");
    NEED(c->learning_rate >= 0, "'learning_rate' must not be negative");
    NEED(c->weight_decay >= 0, "'weight_decay' must not be negative");
    NEED(c->adam_beta1 >= 0 && c->adam_beta1 < 1, "'adam_beta1' must be in [0, 1)");
    NEED(c->adam_beta2 >= 0 && c->adam_beta2 < 1, "'adam_beta2' must be in [0, 1)");
    NEED(c->adam_epsilon >= 0, "'adam_epsilon' must not be negative");
    NEED(in_list(c->lr_scheduler_type, schedulers, 4),
         "'lr_scheduler_type': unknown scheduler '%s' (constant, "
         "constant_with_warmup, linear, cosine)",
         c->lr_scheduler_type ? c->lr_scheduler_type : "");
    NEED(in_list(c->optim, optimizers, 5),
         "'optim': unsupported optimizer '%s' (32-bit AdamW only: adamw_torch, "
         "adamw_torch_fused, adamw_hf, paged_adamw_32bit)", c->optim ? c->optim : "");
    NEED(c->warmup_ratio >= 0 && c->warmup_ratio <= 1, "'warmup_ratio' must be in [0, 1]");
    NEED(c->warmup_steps >= 0, "'warmup_steps' must not be negative");
    NEED(c->max_grad_norm >= 0, "'max_grad_norm' must not be negative");
    NEED(c->logging_steps >= 1, "'logging_steps' must be at least 1");
    NEED(c->save_steps >= 0 && c->save_total_limit >= 0 && c->eval_steps >= 0,
         "'save_steps', 'save_total_limit' and 'eval_steps' must not be negative");
    NEED(c->output_dir, "'output_dir' must be set");
    NEED(c->device && (strcmp(c->device, "cpu") == 0 || strcmp(c->device, "cuda") == 0 ||
                       strcmp(c->device, "auto") == 0),
         "'device' must be cpu, cuda or auto");
    NEED(c->on_nonfinite && (strcmp(c->on_nonfinite, "stop") == 0 ||
                             strcmp(c->on_nonfinite, "skip") == 0),
         "'on_nonfinite' must be stop or skip");
#undef NEED
    lora_config lc;
    return train_lora_config(c, &lc);
}

int64_t train_warmup_steps(const train_config *c, int64_t total)
{
    if (c->warmup_steps > 0)
        return c->warmup_steps;
    return (int64_t)ceil((double)total * c->warmup_ratio);
}

double train_lr(const train_config *c, int64_t step, int64_t total)
{
    const char *s = c->lr_scheduler_type;
    double f = 1.0;
    int64_t w = train_warmup_steps(c, total);
    if (strcmp(s, "constant") == 0) {
        f = 1.0;
    } else if (step < w) {
        f = (double)step / (double)(w > 1 ? w : 1);
    } else if (strcmp(s, "constant_with_warmup") == 0) {
        f = 1.0;
    } else if (strcmp(s, "linear") == 0) {
        int64_t d = total - w > 1 ? total - w : 1;
        f = fmax(0.0, (double)(total - step) / (double)d);
    } else { /* cosine, half a cycle */
        int64_t d = total - w > 1 ? total - w : 1;
        double progress = (double)(step - w) / (double)d;
        f = fmax(0.0, 0.5 * (1.0 + cos(3.14159265358979323846 * 0.5 * 2.0 * progress)));
    }
    return c->learning_rate * f;
}

uint64_t train_shuffle_key(uint64_t seed, int64_t epoch)
{
    return lora_splitmix64(lora_splitmix64(seed ^ 0x5348554646ull /* SHUFF */) +
                           (uint64_t)epoch);
}

uint64_t train_dropout_key(uint64_t seed, int64_t step, int64_t micro)
{
    return lora_rand_u64(lora_splitmix64(seed ^ 0x44524f50ull /* DROP */),
                         (uint64_t)step * 65536u + (uint64_t)micro);
}

void train_shuffle(uint64_t *perm, uint64_t n, uint64_t seed, int64_t epoch)
{
    uint64_t key = train_shuffle_key(seed, epoch);
    for (uint64_t i = 0; i < n; i++)
        perm[i] = i;
    for (uint64_t i = n; i > 1; i--) {
        /* j uniform in [0, i): the high half of a 64x64 product */
        uint64_t j = (uint64_t)(((unsigned __int128)lora_rand_u64(key, n - i) * i) >> 64);
        uint64_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}

/* ---- batches ------------------------------------------------------------- */

void train_batch_build(train_batch *tb, const pack_data *d,
                       const uint64_t *rows, size_t n)
{
    int64_t need = 0;
    for (size_t k = 0; k < n; k++) {
        uint32_t ns;
        const pack_span *sp = pack_row_spans(d, rows[k], &ns);
        for (uint32_t s = 0; s < ns; s++)
            need += sp[s].len;
    }
    if (need > tb->cap) {
        tb->cap = need;
        tb->ids = xrealloc(tb->ids, (size_t)need * sizeof(int32_t));
        tb->pos = xrealloc(tb->pos, (size_t)need * sizeof(int32_t));
        tb->start = xrealloc(tb->start, (size_t)need * sizeof(int32_t));
        tb->targets = xrealloc(tb->targets, (size_t)need * sizeof(int32_t));
        tb->weights = xrealloc(tb->weights, (size_t)need * sizeof(float));
    }
    int64_t t = 0;
    double ws = 0;
    for (size_t k = 0; k < n; k++) {
        uint32_t ns;
        const pack_span *sp = pack_row_spans(d, rows[k], &ns);
        const uint32_t *ids = pack_row_ids(d, rows[k]);
        const uint8_t *w = pack_row_weights(d, rows[k]);
        for (uint32_t s = 0; s < ns; s++) {
            int64_t first = t;
            for (uint32_t p = 0; p < sp[s].len; p++, t++) {
                uint32_t i = sp[s].start + p;
                tb->ids[t] = (int32_t)ids[i];
                tb->pos[t] = (int32_t)p;
                tb->start[t] = (int32_t)first;
                float wt = p + 1 < sp[s].len ? (float)w[i + 1] : 0.0f;
                tb->targets[t] = wt > 0 ? (int32_t)ids[i + 1] : -1;
                tb->weights[t] = wt > 0 ? wt : 0.0f;
                ws += wt;
            }
        }
    }
    tb->weight_sum = ws;
    tb->b.n = t;
    tb->b.ids = tb->ids;
    tb->b.pos = tb->pos;
    tb->b.start = tb->start;
    tb->b.targets = tb->targets;
    tb->b.weights = tb->weights;
}

/* What train_batch_build counts for these rows, without building: adds
 * their tokens to *tokens and returns their weight sum (the same double,
 * summed in the same order). */
static double rows_weight(const pack_data *d, const uint64_t *rows, size_t n,
                          int64_t *tokens)
{
    double ws = 0;
    for (size_t k = 0; k < n; k++) {
        uint32_t ns;
        const pack_span *sp = pack_row_spans(d, rows[k], &ns);
        const uint8_t *w = pack_row_weights(d, rows[k]);
        for (uint32_t s = 0; s < ns; s++) {
            *tokens += sp[s].len;
            for (uint32_t p = 0; p < sp[s].len; p++) {
                float wt = p + 1 < sp[s].len ? (float)w[sp[s].start + p + 1] : 0.0f;
                ws += wt;
            }
        }
    }
    return ws;
}

void train_batch_free(train_batch *tb)
{
    free(tb->ids);
    free(tb->pos);
    free(tb->start);
    free(tb->targets);
    free(tb->weights);
    memset(tb, 0, sizeof *tb);
}

static void json_i32s(strbuf *sb, const char *key, const int32_t *v, int64_t n)
{
    sb_printf(sb, ",\"%s\":[", key);
    for (int64_t i = 0; i < n; i++)
        sb_printf(sb, i ? ",%d" : "%d", v[i]);
    sb_putc(sb, ']');
}

void train_batch_json(const train_batch *tb, strbuf *sb)
{
    int64_t n = tb->b.n;
    sb_printf(sb, "{\"n\":%lld", (long long)n);
    json_i32s(sb, "ids", tb->ids, n);
    json_i32s(sb, "pos", tb->pos, n);
    json_i32s(sb, "start", tb->start, n);
    json_i32s(sb, "targets", tb->targets, n);
    sb_puts(sb, ",\"weights\":[");
    for (int64_t i = 0; i < n; i++) {
        if (i)
            sb_putc(sb, ',');
        json_append_number(sb, tb->weights[i]);
    }
    sb_puts(sb, "]}");
}

/* ---- a step and an evaluation -------------------------------------------- */

int train_step(const llama_model *m, lora_adapter *a, adamw *opt, float *grad,
               const train_batch *micro, size_t n, double lr, double max_norm,
               int checkpointing, uint64_t seed, int64_t step, double *loss,
               double *norm)
{
    double wsum = 0, lsum = 0;
    for (size_t k = 0; k < n; k++)
        wsum += micro[k].weight_sum;
    float scale = wsum > 0 ? (float)(1.0 / wsum) : 0.0f;
    memset(grad, 0, a->n_params * sizeof(float));
    for (size_t k = 0; k < n; k++) {
        if (micro[k].b.n == 0)
            continue;
        llama_train_opts o = {checkpointing, train_dropout_key(seed, step, (int64_t)k)};
        double ls = 0;
        if (llama_forward_backward(m, a, &micro[k].b, &o, scale, grad, &ls) != 0)
            return -1;
        lsum += ls;
    }
    *loss = wsum > 0 ? lsum / wsum : NAN;
    *norm = grad_norm(grad, a->n_params);
    if (!isfinite(*norm) || (wsum > 0 && !isfinite(*loss))) {
        /* never apply it: the caller stops or skips (on_nonfinite); the
         * step still counts, so opt->step == global step as resume wants */
        opt->step++;
        return 0;
    }
    grad_clip(grad, a->n_params, *norm, max_norm);
    adamw_step(opt, a->params, grad, lr);
    return 0;
}

int train_eval(const llama_model *m, const lora_adapter *a,
               const pack_data *d, int64_t batch_rows, double *loss)
{
    train_batch tb = {0};
    double ls = 0, ws = 0;
    uint64_t *rows = xmalloc((size_t)batch_rows * sizeof(uint64_t));
    int rc = 0;
    for (uint64_t r0 = 0; r0 < d->h.n_rows && rc == 0; r0 += (uint64_t)batch_rows) {
        size_t n = 0;
        for (uint64_t r = r0; r < d->h.n_rows && n < (size_t)batch_rows; r++)
            rows[n++] = r;
        train_batch_build(&tb, d, rows, n);
        if (tb.b.n == 0)
            continue;
        double l = 0, w = 0;
        rc = llama_forward(m, a, &tb.b, NULL, &l, &w);
        ls += l;
        ws += w;
    }
    free(rows);
    train_batch_free(&tb);
    *loss = ws > 0 ? ls / ws : NAN;
    return rc;
}

/* ---- checkpoints --------------------------------------------------------- */

typedef struct run_state {
    int64_t step;
    double log_loss;      /* sum of step losses since the last log */
    int64_t log_steps;
    int64_t log_tokens;
    int64_t skipped;      /* non-finite steps skipped (on_nonfinite: skip) */
} run_state;

static void data_fingerprint(const pack_data *d, char out[17])
{
    uint64_t h = 0xcbf29ce484222325ull;
    const unsigned char *p = (const unsigned char *)d->ids;
    size_t n = (size_t)(d->h.n_rows * d->h.seq_len);
    for (size_t i = 0; i < n * 4; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ d->weights[i]) * 0x100000001b3ull;
    for (size_t i = 0; i < d->h.n_spans; i++) {
        uint32_t v[2] = {d->spans[i].start, d->spans[i].len};
        for (int k = 0; k < 8; k++)
            h = (h ^ (uint8_t)(v[k / 4] >> (8 * (k % 4)))) * 0x100000001b3ull;
    }
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

static void state_json(strbuf *sb, const train_config *c, const pack_data *d,
                       const run_state *st, int64_t total, int64_t spe, int world)
{
    char fp[17];
    data_fingerprint(d, fp);
    sb_printf(sb, "{\n  \"format\": \"qlora-trainer-state\",\n  \"version\": 1,\n"
              "  \"global_step\": %lld,\n  \"total_steps\": %lld,\n  \"epoch\": ",
              (long long)st->step, (long long)total);
    json_append_number(sb, (double)st->step / (double)spe);
    sb_printf(sb, ",\n  \"rng\": {\"generator\": \"splitmix64-counter\", "
              "\"seed\": %lld},\n  \"log\": {\"loss_sum\": ", (long long)c->seed);
    json_append_number(sb, st->log_loss);
    sb_printf(sb, ", \"steps\": %lld, \"tokens\": %lld},\n  \"skipped_steps\": %lld,"
              "\n  \"data\": {\"rows\": %llu, \"fingerprint\": \"%s\"},\n  ",
              (long long)st->log_steps, (long long)st->log_tokens,
              (long long)st->skipped, (unsigned long long)d->h.n_rows, fp);
    if (world > 1) /* absent: 1 */
        sb_printf(sb, "\"world_size\": %d,\n  ", world);
    sb_puts(sb, "\"config\": ");
    cfg_to_json(train_fields, train_nfields, c, sb);
    sb_puts(sb, "\n}\n");
}

/* Checksums (hardening, issue 11): checksums.json holds the FNV-1a 64 of
 * each other file of a checkpoint, computed from the bytes written, and a
 * resume checks them first, so a checkpoint damaged after it was written
 * (a bad disk, a careless edit) is refused instead of silently continued
 * from. FNV-1a detects any change of a single byte. */
static const char *const ckpt_files[] = {
    "adapter_config.json", "adapter_model.safetensors",
    "optimizer.safetensors", "trainer_state.json",
};
#define N_CKPT_FILES (sizeof ckpt_files / sizeof *ckpt_files)

static int file_checksum(const char *dir, const char *name, char out[17])
{
    char *path = io_path_join(dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        msg_error("cannot open '%s': %s", path, strerror(errno));
        free(path);
        return -1;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        for (size_t i = 0; i < n; i++)
            h = (h ^ buf[i]) * 0x100000001b3ull;
    int bad = ferror(f);
    fclose(f);
    if (bad)
        msg_error("cannot read '%s'", path);
    free(path);
    snprintf(out, 17, "%016llx", (unsigned long long)h);
    return bad ? -1 : 0;
}

static int write_checksums(const char *dir)
{
    strbuf sb = STRBUF_INIT;
    sb_puts(&sb, "{\n  \"format\": \"qlora-checksums\",\n  \"version\": 1,\n"
                 "  \"algorithm\": \"fnv1a64\",\n  \"files\": {");
    int rc = 0;
    for (size_t k = 0; k < N_CKPT_FILES && rc == 0; k++) {
        char sum[17];
        rc = file_checksum(dir, ckpt_files[k], sum);
        sb_printf(&sb, "%s\n    \"%s\": \"%s\"", k ? "," : "", ckpt_files[k], sum);
    }
    sb_puts(&sb, "\n  }\n}\n");
    if (rc == 0) {
        char *p = io_path_join(dir, "checksums.json");
        io_writer *w = io_writer_open(p, IO_TEXT);
        free(p);
        if (w) {
            io_write(w, sb.buf, sb.len);
            rc = io_writer_commit(w);
        } else {
            rc = -1;
        }
    }
    sb_free(&sb);
    return rc;
}

static int verify_checksums(const char *dir)
{
    char *path = io_path_join(dir, "checksums.json");
    json_value *js = NULL;
    int rc = -1;
    if (!io_exists(path)) {
        msg_error("checkpoint '%s' has no checksums.json (damaged, or not "
                  "written by lora-train)", dir);
        goto out;
    }
    if (json_parse_file(path, &js) != 0)
        goto out;
    const char *alg = json_get_string(js, "algorithm", NULL);
    const json_value *files = json_get(js, "files");
    if (!alg || strcmp(alg, "fnv1a64") != 0 || !files ||
        files->type != JSON_OBJECT) {
        msg_error("%s: not a lora-train checksum file", path);
        goto out;
    }
    for (size_t k = 0; k < N_CKPT_FILES; k++) {
        const char *want = json_get_string(files, ckpt_files[k], NULL);
        char sum[17];
        if (!want) {
            msg_error("%s: no checksum for '%s'", path, ckpt_files[k]);
            goto out;
        }
        if (file_checksum(dir, ckpt_files[k], sum) != 0)
            goto out;
        if (strcmp(sum, want) != 0) {
            msg_error("checkpoint '%s' is damaged: '%s' does not match its "
                      "checksum", dir, ckpt_files[k]);
            goto out;
        }
    }
    rc = 0;
out:
    json_free(js);
    free(path);
    return rc;
}

static int save_checkpoint(const train_inputs *in, const lora_adapter *a,
                           const adamw *opt, const run_state *st,
                           int64_t total, int64_t spe, char **path_out)
{
    const train_config *c = in->cfg;
    char name[64];
    snprintf(name, sizeof name, "checkpoint-%lld", (long long)st->step);
    char *final = io_path_join(c->output_dir, name);
    char *tmp = io_dir_begin(final);
    if (!tmp) {
        free(final);
        return -1;
    }
    int rc = adapter_write(tmp, a, in->model->dir);
    if (rc == 0) {
        st_tensor t[2];
        memset(t, 0, sizeof t);
        const char *names[2] = {"exp_avg", "exp_avg_sq"};
        for (int k = 0; k < 2; k++) {
            t[k].name = (char *)names[k];
            t[k].dtype = ST_F32;
            t[k].ndim = 1;
            t[k].shape[0] = (int64_t)opt->n;
            t[k].numel = (int64_t)opt->n;
            t[k].nbytes = opt->n * 4;
            t[k].data = k ? opt->v : opt->m;
        }
        char stepbuf[32];
        snprintf(stepbuf, sizeof stepbuf, "%lld", (long long)opt->step);
        const char *meta[] = {"step", stepbuf};
        char *p = io_path_join(tmp, "optimizer.safetensors");
        rc = st_write_file(p, t, 2, meta, 1);
        free(p);
    }
    if (rc == 0) {
        strbuf sb = STRBUF_INIT;
        state_json(&sb, c, in->train, st, total, spe, in->world > 1 ? in->world : 1);
        char *p = io_path_join(tmp, "trainer_state.json");
        io_writer *w = io_writer_open(p, IO_TEXT);
        free(p);
        if (w) {
            io_write(w, sb.buf, sb.len);
            rc = io_writer_commit(w);
        } else {
            rc = -1;
        }
        sb_free(&sb);
    }
    if (rc == 0)
        rc = write_checksums(tmp);
    if (rc == 0)
        rc = io_dir_commit(tmp, final);
    else
        io_dir_abort(tmp);
    free(tmp);
    if (rc == 0)
        *path_out = final;
    else
        free(final);
    return rc;
}

/* checkpoint-<N> entries of dir, sorted by N; returns the count. */
static size_t list_checkpoints(const char *dir, int64_t **steps)
{
    *steps = NULL;
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *s = e->d_name;
        if (strncmp(s, "checkpoint-", 11) != 0)
            continue;
        char *end;
        long long v = strtoll(s + 11, &end, 10);
        if (end == s + 11 || *end || v < 0)
            continue;
        *steps = xrealloc(*steps, (n + 1) * sizeof **steps);
        size_t i = n++;
        while (i > 0 && (*steps)[i - 1] > v) {
            (*steps)[i] = (*steps)[i - 1];
            i--;
        }
        (*steps)[i] = v;
    }
    closedir(d);
    return n;
}

char *train_latest_checkpoint(const char *output_dir)
{
    int64_t *steps;
    size_t n = list_checkpoints(output_dir, &steps);
    char *found = NULL;
    for (size_t i = n; i-- > 0 && !found;) {
        char name[64];
        snprintf(name, sizeof name, "checkpoint-%lld", (long long)steps[i]);
        char *p = io_path_join(output_dir, name);
        char *s = io_path_join(p, "trainer_state.json");
        if (io_exists(s))
            found = p;
        else
            free(p);
        free(s);
    }
    free(steps);
    return found;
}

static void prune_checkpoints(const char *dir, int64_t keep)
{
    if (keep <= 0)
        return;
    int64_t *steps;
    size_t n = list_checkpoints(dir, &steps);
    for (size_t i = 0; i + (size_t)keep < n; i++) {
        char name[64];
        snprintf(name, sizeof name, "checkpoint-%lld", (long long)steps[i]);
        char *p = io_path_join(dir, name);
        io_remove_tree(p);
        free(p);
    }
    free(steps);
}

/* Member key of a JSON object as compact text, for comparisons. */
static void member_text(const json_value *o, const char *key, strbuf *sb)
{
    const json_value *v = json_get(o, key);
    if (v)
        json_append_value(sb, v);
    else
        sb_puts(sb, "(absent)");
}

static int load_checkpoint(const train_inputs *in, lora_adapter *a,
                           adamw *opt, run_state *st)
{
    const train_config *c = in->cfg;
    const char *dir = in->resume;
    char *path = io_path_join(dir, "trainer_state.json");
    char *text = NULL;
    size_t len;
    json_value *js = NULL, *now = NULL;
    lora_adapter *la = NULL;
    st_file *f = NULL;
    int rc = -1;
    if (verify_checksums(dir) != 0 || io_read_file(path, &text, &len) != 0 ||
        json_parse(text, len, path, 1, &js) != 0)
        goto out;
    const char *fmt = json_get_string(js, "format", NULL);
    if (!fmt || strcmp(fmt, "qlora-trainer-state") != 0 ||
        json_get_int(js, "version", 0) != 1) {
        msg_error("%s: not a lora-train checkpoint state (version 1)", path);
        goto out;
    }
    /* same data */
    const json_value *data = json_get(js, "data");
    char fp[17];
    data_fingerprint(in->train, fp);
    const char *ofp = json_get_string(data, "fingerprint", NULL);
    if (!ofp || strcmp(ofp, fp) != 0 ||
        (uint64_t)json_get_int(data, "rows", -1) != in->train->h.n_rows) {
        msg_error("%s: the checkpoint was made with other training data", dir);
        goto out;
    }
    /* same configuration where it changes results */
    strbuf sb = STRBUF_INIT;
    cfg_to_json(train_fields, train_nfields, c, &sb);
    int prc = json_parse(sb.buf, sb.len, "configuration", 1, &now);
    sb_free(&sb);
    if (prc != 0)
        goto out;
    const json_value *old = json_get(js, "config");
    for (size_t k = 0; k < sizeof result_keys / sizeof *result_keys; k++) {
        strbuf x = STRBUF_INIT, y = STRBUF_INIT;
        member_text(old, result_keys[k], &x);
        member_text(now, result_keys[k], &y);
        int same = strcmp(sb_str(&x), sb_str(&y)) == 0;
        if (!same)
            msg_error("%s: the checkpoint was made with %s=%s, now %s", dir,
                      result_keys[k], sb_str(&x), sb_str(&y));
        sb_free(&x);
        sb_free(&y);
        if (!same)
            goto out;
    }
    /* the world size changes which micro-batches make a step */
    int64_t ow = json_get_int(js, "world_size", 1), nw = in->world > 1 ? in->world : 1;
    if (ow != nw) {
        msg_error("%s: the checkpoint was made by %lld ranks, now %lld (resume with "
                  "as many)", dir, (long long)ow, (long long)nw);
        goto out;
    }
    st->step = json_get_int(js, "global_step", -1);
    const json_value *log = json_get(js, "log");
    st->log_loss = json_get_number(log, "loss_sum", 0);
    st->log_steps = json_get_int(log, "steps", 0);
    st->log_tokens = json_get_int(log, "tokens", 0);
    st->skipped = json_get_int(js, "skipped_steps", 0);
    if (st->step < 0) {
        msg_error("%s: bad global_step", path);
        goto out;
    }
    /* the adapter */
    if (adapter_read(dir, &in->model->cfg, &la, NULL) != 0)
        goto out;
    if (la->n_params != a->n_params || la->cfg.r != a->cfg.r ||
        la->cfg.targets != a->cfg.targets) {
        msg_error("%s: the checkpoint's adapter has another shape", dir);
        goto out;
    }
    memcpy(a->params, la->params, a->n_params * sizeof(float));
    /* the optimizer */
    free(path);
    path = io_path_join(dir, "optimizer.safetensors");
    if (st_open(path, &f) != 0)
        goto out;
    const st_tensor *tm = st_find(f, "exp_avg"), *tv = st_find(f, "exp_avg_sq");
    if (!tm || !tv || tm->dtype != ST_F32 || tv->dtype != ST_F32 ||
        (size_t)tm->numel != opt->n || (size_t)tv->numel != opt->n) {
        msg_error("%s: exp_avg and exp_avg_sq must be F32 [%zu]", path, opt->n);
        goto out;
    }
    if (st_to_f32(tm, opt->m, 0, tm->numel) || st_to_f32(tv, opt->v, 0, tv->numel))
        goto out;
    opt->step = st->step;
    rc = 0;
out:
    st_close(f);
    lora_free(la);
    json_free(now);
    json_free(js);
    free(text);
    free(path);
    return rc;
}

/* ---- the loop ------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void emit(const train_inputs *in, train_event *ev)
{
    if (in->cb && (in->world <= 1 || in->rank == 0))
        in->cb(ev, in->cb_ctx);
}

int train_run(const train_inputs *in)
{
    const train_config *c = in->cfg;
    const llama_model *m = in->model;
    const pack_data *d = in->train;
    uint64_t nrows = d->h.n_rows;
    if (nrows == 0)
        return msg_error("the packed file has no rows");
    if (d->h.vocab_size > (uint32_t)m->cfg.vocab) {
        msg_error("the packed file's vocabulary (%u) is larger than the "
                  "model's (%d)", d->h.vocab_size, m->cfg.vocab);
        msg_hint("tokenize with the model's own tokenizer.model");
        return -1;
    }
    if (in->eval && in->eval->h.vocab_size > (uint32_t)m->cfg.vocab)
        return msg_error("the evaluation file's vocabulary (%u) is larger "
                         "than the model's (%d)", in->eval->h.vocab_size,
                         m->cfg.vocab);
    if (d->h.seq_len > (uint32_t)m->cfg.max_pos)
        msg_warn("rows of %u tokens exceed max_position_embeddings (%d)",
                 d->h.seq_len, m->cfg.max_pos);
    const train_backend *be = in->backend;
    int world = in->world > 1 ? in->world : 1, rank = world > 1 ? in->rank : 0;
    if (world > 1 && (!be || !be->step_shard))
        return msg_error("data-parallel training (%d ranks) runs on CUDA devices only",
                         world);
    int64_t bs = c->per_device_train_batch_size, acc = c->gradient_accumulation_steps;
    int64_t gacc = acc * world; /* micro-batches of a step, all ranks together */
    int64_t nmicro = (int64_t)((nrows + (uint64_t)bs - 1) / (uint64_t)bs);
    int64_t spe = (nmicro + gacc - 1) / gacc;
    int64_t total = c->max_steps > 0 ? c->max_steps
                                     : (int64_t)ceil(c->num_train_epochs * (double)spe);
    if (total < 1)
        total = 1;
    lora_config lc;
    if (train_lora_config(c, &lc) != 0)
        return -1;
    lora_adapter *a;
    if (lora_new(&m->cfg, &lc, &a) != 0)
        return -1;
    lora_init(a, (uint64_t)c->seed);
    adamw opt;
    adamw_init(&opt, a->n_params, c->adam_beta1, c->adam_beta2, c->adam_epsilon,
               c->weight_decay);
    float *grad = xcalloc(a->n_params ? a->n_params : 1, sizeof(float));
    uint64_t *perm = xmalloc((size_t)nrows * sizeof(uint64_t));
    train_batch *micro = xcalloc((size_t)acc, sizeof *micro), dump = {0};
    int64_t *index = xcalloc((size_t)acc, sizeof *index);
    run_state st = {0};
    int rc = -1;
    if (rank == 0 && mkdir(c->output_dir, 0777) != 0 && !io_exists(c->output_dir)) {
        msg_error("cannot create directory '%s'", c->output_dir);
        goto out;
    }
    if (in->resume && load_checkpoint(in, a, &opt, &st) != 0)
        goto out;
    if (be)
        be->load(be->ctx, a, &opt);
    if (st.step > total) {
        msg_error("the checkpoint is at step %lld, past the last step %lld",
                  (long long)st.step, (long long)total);
        goto out;
    }
    int64_t cur_epoch = -1, last_eval_step = -1;
    double t_log = now_s();
    train_event ev;
    for (int64_t s = st.step; s < total; s++) {
        int64_t e = s / spe, j = s % spe;
        if (e != cur_epoch) {
            train_shuffle(perm, nrows, (uint64_t)c->seed, e);
            cur_epoch = e;
        }
        /* the step's micro-batches k0 .. k1-1; this rank builds its own,
         * and counts every rank's tokens and weight */
        int64_t k0 = j * gacc, k1 = k0 + gacc < nmicro ? k0 + gacc : nmicro;
        size_t nm = (size_t)(k1 - k0), mine = dist_shard((int64_t)nm, world, rank, index);
        int64_t tokens = 0;
        double wsum = 0;
        for (size_t k = 0; k < nm; k++) {
            uint64_t r0 = (uint64_t)(k0 + (int64_t)k) * (uint64_t)bs;
            uint64_t r1 = r0 + (uint64_t)bs < nrows ? r0 + (uint64_t)bs : nrows;
            wsum += rows_weight(d, perm + r0, (size_t)(r1 - r0), &tokens);
        }
        for (size_t i = 0; i < mine; i++) {
            uint64_t r0 = (uint64_t)(k0 + index[i]) * (uint64_t)bs;
            uint64_t r1 = r0 + (uint64_t)bs < nrows ? r0 + (uint64_t)bs : nrows;
            train_batch_build(&micro[i], d, perm + r0, (size_t)(r1 - r0));
        }
        if (in->want_batches && rank == 0)
            for (size_t k = 0; k < nm; k++) {
                uint64_t r0 = (uint64_t)(k0 + (int64_t)k) * (uint64_t)bs;
                uint64_t r1 = r0 + (uint64_t)bs < nrows ? r0 + (uint64_t)bs : nrows;
                const train_batch *tb = &micro[k / (size_t)world];
                if (k % (size_t)world != 0) { /* another rank's */
                    train_batch_build(&dump, d, perm + r0, (size_t)(r1 - r0));
                    tb = &dump;
                }
                memset(&ev, 0, sizeof ev);
                ev.rows = perm + r0;
                ev.n_rows = (size_t)(r1 - r0);
                ev.kind = TRAIN_EV_BATCH;
                ev.step = s + 1;
                ev.total_steps = total;
                ev.batch = tb;
                ev.micro = (int64_t)k;
                ev.learning_rate = train_lr(c, s, total);
                emit(in, &ev);
            }
        double lr = train_lr(c, s, total), loss, norm;
        int src;
        if (world > 1)
            src = be->step_shard(be->ctx, micro, index, mine, wsum, lr, c->max_grad_norm,
                                 (uint64_t)c->seed, s, &loss, &norm);
        else if (be)
            src = be->step(be->ctx, micro, nm, lr, c->max_grad_norm, (uint64_t)c->seed, s,
                           &loss, &norm);
        else
            src = train_step(m, a, &opt, grad, micro, nm, lr, c->max_grad_norm,
                             c->gradient_checkpointing, (uint64_t)c->seed, s, &loss, &norm);
        if (src != 0)
            goto out;
        if (!isfinite(norm) || (wsum > 0 && !isfinite(loss))) {
            /* the step changed nothing but the step count (train_step and
             * the backends' steps alike; data parallel, every rank saw the
             * same reduced sums and decides the same) */
            int bad_loss = wsum > 0 && !isfinite(loss);
            if (!c->on_nonfinite || strcmp(c->on_nonfinite, "skip") != 0) {
                msg_error("step %lld: the %s is not finite (%g); stopping, nothing "
                          "more written (on_nonfinite=skip skips such steps)",
                          (long long)(s + 1), bad_loss ? "loss" : "gradient norm",
                          bad_loss ? loss : norm);
                goto out;
            }
            st.skipped++;
            loss = NAN; /* left out of the logged mean */
        }
        st.step = s + 1;
        st.log_loss += isnan(loss) ? 0 : loss;
        st.log_steps++;
        st.log_tokens += tokens;
        memset(&ev, 0, sizeof ev);
        ev.kind = TRAIN_EV_STEP;
        ev.step = st.step;
        ev.total_steps = total;
        ev.epoch = (double)st.step / (double)spe;
        ev.loss = loss;
        ev.learning_rate = lr;
        ev.grad_norm = norm;
        ev.skipped_steps = st.skipped;
        emit(in, &ev);
        if (st.step % c->logging_steps == 0 || st.step == total) {
            double t = now_s();
            ev.kind = TRAIN_EV_LOG;
            ev.loss = st.log_loss / (double)st.log_steps;
            ev.tokens_per_s = t > t_log ? (double)st.log_tokens / (t - t_log) : 0;
            ev.peak_memory = be && be->peak_bytes ? be->peak_bytes(be->ctx) : 0;
            emit(in, &ev);
            st.log_loss = 0;
            st.log_steps = 0;
            st.log_tokens = 0;
            t_log = t;
        }
        int epoch_end = st.step % spe == 0 || st.step == total;
        if (in->eval && ((c->eval_steps > 0 && st.step % c->eval_steps == 0) ||
                         (c->eval_steps == 0 && epoch_end) || st.step == total)) {
            memset(&ev, 0, sizeof ev);
            ev.kind = TRAIN_EV_EVAL;
            ev.step = st.step;
            ev.total_steps = total;
            ev.epoch = (double)st.step / (double)spe;
            if ((be ? be->eval(be->ctx, in->eval, c->per_device_eval_batch_size,
                               &ev.eval_loss)
                    : train_eval(m, a, in->eval, c->per_device_eval_batch_size,
                                 &ev.eval_loss)) != 0)
                goto out;
            emit(in, &ev);
            last_eval_step = st.step;
            t_log = now_s(); /* evaluation time is not training time */
        }
        if (c->save_steps > 0 && st.step % c->save_steps == 0 && st.step < total &&
            rank == 0) {
            char *p;
            if (be)
                be->store(be->ctx, a, &opt);
            if (save_checkpoint(in, a, &opt, &st, total, spe, &p) != 0)
                goto out;
            prune_checkpoints(c->output_dir, c->save_total_limit);
            memset(&ev, 0, sizeof ev);
            ev.kind = TRAIN_EV_SAVE;
            ev.step = st.step;
            ev.total_steps = total;
            ev.path = p;
            emit(in, &ev);
            free(p);
        }
    }
    (void)last_eval_step;
    if (be)
        be->store(be->ctx, a, &opt);
    if (be && be->finish && be->finish(be->ctx, a, &opt) != 0)
        goto out;
    if (rank == 0 && adapter_write(c->output_dir, a, m->dir) != 0)
        goto out;
    rc = 0;
out:
    for (int64_t k = 0; k < acc; k++)
        train_batch_free(&micro[k]);
    train_batch_free(&dump);
    free(index);
    free(micro);
    free(perm);
    free(grad);
    adamw_free(&opt);
    lora_free(a);
    return rc;
}

void train_event_json(const train_event *ev, strbuf *sb)
{
    sb_printf(sb, "{\"step\":%lld,\"epoch\":", (long long)ev->step);
    json_append_number(sb, round(ev->epoch * 1e4) / 1e4);
    if (ev->kind == TRAIN_EV_EVAL) {
        sb_puts(sb, ",\"eval_loss\":");
        json_append_number(sb, ev->eval_loss);
    } else {
        sb_puts(sb, ",\"loss\":");
        json_append_number(sb, ev->loss);
        sb_puts(sb, ",\"learning_rate\":");
        json_append_number(sb, ev->learning_rate);
        sb_puts(sb, ",\"grad_norm\":");
        json_append_number(sb, ev->grad_norm);
        sb_puts(sb, ",\"tokens_per_s\":");
        json_append_number(sb, round(ev->tokens_per_s * 10) / 10);
        if (ev->skipped_steps > 0)
            sb_printf(sb, ",\"skipped_steps\":%lld", (long long)ev->skipped_steps);
        if (ev->peak_memory > 0) {
            sb_puts(sb, ",\"peak_memory_gib\":");
            json_append_number(sb, round(ev->peak_memory / 1073741824.0 * 1000) / 1000);
        }
    }
    sb_putc(sb, '}');
}
