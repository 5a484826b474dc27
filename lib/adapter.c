/* adapter.c: PEFT adapter directories (adapter_config.json and
 * adapter_model.safetensors), the interchange format of lora-train,
 * lora-gen and lora-merge with peft.
 *
 * The safetensors file is written in the order safetensors.torch.save_file
 * uses (by name, all F32) with PEFT's metadata, so its bytes are what peft
 * itself would save for the same values.
 */
#define _POSIX_C_SOURCE 200809L
#include "adapter.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "io.h"
#include "json.h"
#include "msg.h"
#include "safetensors.h"
#include "strbuf.h"

#define PREFIX "base_model.model.model.layers."

void adapter_tensor_name(char *buf, size_t size, int32_t layer, llama_linear l,
                         int ab)
{
    snprintf(buf, size, PREFIX "%d.%s.%s.lora_%c.weight", layer,
             llama_linear_parent(l), llama_linear_name(l), ab ? 'B' : 'A');
}

static void put_key(strbuf *sb, const char *key, int *first)
{
    sb_puts(sb, *first ? "{\n  " : ",\n  ");
    *first = 0;
    json_append_string(sb, key, strlen(key));
    sb_puts(sb, ": ");
}

/* adapter_config.json as PEFT writes it: json.dumps(indent=2,
 * sort_keys=True); the keys below are in sorted order. */
static void config_json(strbuf *sb, const lora_adapter *a,
                        const char *base_model)
{
    int first = 1;
    put_key(sb, "alpha_pattern", &first);
    sb_puts(sb, "{}");
    put_key(sb, "auto_mapping", &first);
    sb_puts(sb, "null");
    put_key(sb, "base_model_name_or_path", &first);
    if (base_model)
        json_append_string(sb, base_model, strlen(base_model));
    else
        sb_puts(sb, "null");
    put_key(sb, "bias", &first);
    sb_puts(sb, "\"none\"");
    put_key(sb, "fan_in_fan_out", &first);
    sb_puts(sb, "false");
    put_key(sb, "inference_mode", &first);
    sb_puts(sb, "true");
    put_key(sb, "init_lora_weights", &first);
    sb_puts(sb, "true");
    put_key(sb, "layers_pattern", &first);
    sb_puts(sb, "null");
    put_key(sb, "layers_to_transform", &first);
    sb_puts(sb, "null");
    put_key(sb, "lora_alpha", &first);
    json_append_number(sb, a->cfg.alpha);
    put_key(sb, "lora_dropout", &first);
    json_append_number(sb, a->cfg.dropout);
    put_key(sb, "modules_to_save", &first);
    sb_puts(sb, "null");
    put_key(sb, "peft_type", &first);
    sb_puts(sb, "\"LORA\"");
    put_key(sb, "r", &first);
    json_append_number(sb, a->cfg.r);
    put_key(sb, "rank_pattern", &first);
    sb_puts(sb, "{}");
    put_key(sb, "revision", &first);
    sb_puts(sb, "null");
    put_key(sb, "target_modules", &first);
    sb_puts(sb, "[");
    int n = 0;
    for (int l = 0; l < LLAMA_NLINEAR; l++)
        if (a->cfg.targets & (1u << l)) {
            sb_puts(sb, n++ ? ",\n    " : "\n    ");
            const char *nm = llama_linear_name((llama_linear)l);
            json_append_string(sb, nm, strlen(nm));
        }
    sb_puts(sb, "\n  ]");
    put_key(sb, "task_type", &first);
    sb_puts(sb, "\"CAUSAL_LM\"");
    put_key(sb, "use_dora", &first);
    sb_puts(sb, "false");
    put_key(sb, "use_rslora", &first);
    sb_puts(sb, a->cfg.use_rslora ? "true" : "false");
    sb_puts(sb, "\n}");
}

typedef struct named {
    char name[160];
    st_tensor t;
} named;

static int cmp_named(const void *x, const void *y)
{
    return strcmp(((const named *)x)->name, ((const named *)y)->name);
}

int adapter_write(const char *dir, const lora_adapter *a,
                  const char *base_model)
{
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return msg_error("cannot create directory '%s': %s", dir,
                         strerror(errno));
    size_t cap = (size_t)a->n_layers * LLAMA_NLINEAR * 2, n = 0;
    named *ts = xcalloc(cap ? cap : 1, sizeof *ts);
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
            if (s->a < 0)
                continue;
            for (int ab = 0; ab < 2; ab++) {
                named *x = &ts[n++];
                adapter_tensor_name(x->name, sizeof x->name, i, (llama_linear)l,
                                    ab);
                x->t.dtype = ST_F32;
                x->t.ndim = 2;
                x->t.shape[0] = ab ? s->out : a->cfg.r;
                x->t.shape[1] = ab ? a->cfg.r : s->in;
                x->t.numel = x->t.shape[0] * x->t.shape[1];
                x->t.nbytes = (uint64_t)x->t.numel * 4;
                x->t.data = a->params + (ab ? s->b : s->a);
            }
        }
    qsort(ts, n, sizeof *ts, cmp_named);
    st_tensor *flat = xcalloc(n ? n : 1, sizeof *flat);
    for (size_t k = 0; k < n; k++) {
        flat[k] = ts[k].t;
        flat[k].name = ts[k].name;
    }
    static const char *const meta[] = {"format", "pt"};
    char *path = io_path_join(dir, "adapter_model.safetensors");
    int rc = st_write_file(path, flat, n, meta, 1);
    free(path);
    free(flat);
    free(ts);
    if (rc != 0)
        return -1;
    strbuf sb = STRBUF_INIT;
    config_json(&sb, a, base_model);
    sb_putc(&sb, '\n');
    path = io_path_join(dir, "adapter_config.json");
    io_writer *w = io_writer_open(path, IO_TEXT);
    free(path);
    if (!w) {
        sb_free(&sb);
        return -1;
    }
    io_write(w, sb.buf, sb.len);
    sb_free(&sb);
    return io_writer_commit(w);
}

/* Parses "base_model.model.model.layers.{i}.{parent}.{name}.lora_{A|B}.weight".
 */
static int parse_name(const char *s, int32_t *layer, int *lin, int *ab)
{
    size_t pl = strlen(PREFIX);
    if (strncmp(s, PREFIX, pl) != 0)
        return -1;
    s += pl;
    char *end;
    long i = strtol(s, &end, 10);
    if (end == s || *end != '.' || i < 0 || i > INT32_MAX)
        return -1;
    s = end + 1;
    for (int l = 0; l < LLAMA_NLINEAR; l++) {
        char want[96];
        snprintf(want, sizeof want, "%s.%s.lora_",
                 llama_linear_parent((llama_linear)l),
                 llama_linear_name((llama_linear)l));
        size_t wl = strlen(want);
        if (strncmp(s, want, wl) != 0)
            continue;
        if (strcmp(s + wl, "A.weight") == 0)
            *ab = 0;
        else if (strcmp(s + wl, "B.weight") == 0)
            *ab = 1;
        else
            return -1;
        *layer = (int32_t)i;
        *lin = l;
        return 0;
    }
    return -1;
}

static int empty_or_null(const json_value *v)
{
    return !v || v->type == JSON_NULL ||
           (v->type == JSON_OBJECT && v->u.object.n == 0) ||
           (v->type == JSON_ARRAY && v->u.array.n == 0);
}

int adapter_read(const char *dir, const llama_config *mc, lora_adapter **out,
                 char **base_model)
{
    *out = NULL;
    if (base_model)
        *base_model = NULL;
    char *path = io_path_join(dir, "adapter_config.json");
    char *text = NULL;
    size_t len;
    json_value *cfg = NULL;
    st_file *f = NULL;
    lora_adapter *a = NULL;
    int rc = -1;
    if (io_read_file(path, &text, &len) != 0 ||
        json_parse(text, len, path, 1, &cfg) != 0)
        goto out;
    const char *pt = json_get_string(cfg, "peft_type", NULL);
    if (!pt || strcmp(pt, "LORA") != 0) {
        msg_error("%s: peft_type is not \"LORA\"", path);
        goto out;
    }
    lora_config lc = {0};
    lc.r = (int32_t)json_get_int(cfg, "r", 0);
    lc.alpha = json_get_number(cfg, "lora_alpha", NAN);
    lc.dropout = json_get_number(cfg, "lora_dropout", 0);
    const json_value *rs = json_get(cfg, "use_rslora");
    lc.use_rslora = rs && rs->type == JSON_TRUE;
    if (lc.r < 1 || isnan(lc.alpha)) {
        msg_error("%s: 'r' and 'lora_alpha' must be positive numbers", path);
        goto out;
    }
    static const char *const unsupported[] = {
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "modules_to_save",
    };
    for (size_t k = 0; k < sizeof unsupported / sizeof *unsupported; k++)
        if (!empty_or_null(json_get(cfg, unsupported[k]))) {
            msg_error("%s: '%s' is not supported", path, unsupported[k]);
            goto out;
        }
    const json_value *dora = json_get(cfg, "use_dora");
    const char *bias = json_get_string(cfg, "bias", NULL);
    if ((dora && dora->type == JSON_TRUE) ||
        (bias && strcmp(bias, "none") != 0)) {
        msg_error("%s: DoRA and LoRA biases are not supported", path);
        goto out;
    }
    if (base_model) {
        const char *bm = json_get_string(cfg, "base_model_name_or_path", NULL);
        *base_model = bm ? xstrdup(bm) : NULL;
    }
    free(path);
    path = io_path_join(dir, "adapter_model.safetensors");
    if (!io_exists(path)) {
        msg_error("cannot open '%s': No such file or directory", path);
        char *bin = io_path_join(dir, "adapter_model.bin");
        if (io_exists(bin))
            msg_hint("adapter_model.bin (pickle) is not read; save the "
                     "adapter with safe_serialization=True");
        free(bin);
        goto out;
    }
    if (st_open(path, &f) != 0)
        goto out;
    /* the targets are the linears that have tensors */
    uint32_t targets = 0;
    for (size_t k = 0; k < f->n; k++) {
        int32_t layer;
        int lin, ab;
        if (parse_name(f->tensors[k].name, &layer, &lin, &ab) != 0) {
            msg_error("%s: unexpected tensor '%s'", path, f->tensors[k].name);
            goto out;
        }
        if (layer >= mc->n_layers) {
            msg_error("%s: tensor '%s' is for layer %d but the model has %d",
                      path, f->tensors[k].name, layer, mc->n_layers);
            goto out;
        }
        targets |= 1u << lin;
    }
    if (!targets) {
        msg_error("%s: no LoRA tensors", path);
        goto out;
    }
    lc.targets = targets;
    if (lora_new(mc, &lc, &a) != 0)
        goto out;
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
            if (s->a < 0)
                continue;
            for (int ab = 0; ab < 2; ab++) {
                char nm[160];
                adapter_tensor_name(nm, sizeof nm, i, (llama_linear)l, ab);
                const st_tensor *t = st_find(f, nm);
                int64_t d0 = ab ? s->out : lc.r, d1 = ab ? lc.r : s->in;
                if (!t) {
                    msg_error("%s: tensor '%s' is missing", path, nm);
                    goto out;
                }
                if (t->ndim != 2 || t->shape[0] != d0 || t->shape[1] != d1) {
                    msg_error("%s: tensor '%s' has the wrong shape (expected "
                              "[%lld, %lld])",
                              path, nm, (long long)d0, (long long)d1);
                    goto out;
                }
                float *dst = a->params + (ab ? s->b : s->a);
                if (st_to_f32(t, dst, 0, t->numel) != 0)
                    goto out;
                /* refused rather than merged or trained on (issue 11) */
                for (int64_t e = 0; e < t->numel; e++)
                    if (!isfinite(dst[e])) {
                        msg_error("%s: tensor '%s' holds a non-finite value "
                                  "(%g at element %lld)",
                                  path, nm, dst[e], (long long)e);
                        goto out;
                    }
            }
        }
    *out = a;
    a = NULL;
    rc = 0;
out:
    if (rc != 0 && base_model) {
        free(*base_model);
        *base_model = NULL;
    }
    lora_free(a);
    st_close(f);
    json_free(cfg);
    free(text);
    free(path);
    return rc;
}
