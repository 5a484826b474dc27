/* llama.c: config.json parsing and loading a checkpoint into memory.
 *
 * High-precision checkpoints (F32, F16, BF16; sharded or not) become f32
 * arrays owned by the model. An NF4 checkpoint (nf4-quant's or
 * bitsandbytes' layout) keeps its linear weights 4-bit through lib/nf4.h;
 * everything else in it (embeddings, norms, head) is stored f32 already.
 */
#include "llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "json.h"
#include "msg.h"
#include "safetensors.h"

#include "nf4.h"

static const char *const linear_names[LLAMA_NLINEAR] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
};

const char *llama_linear_name(llama_linear l)
{
    return (unsigned)l < LLAMA_NLINEAR ? linear_names[l] : "?";
}

const char *llama_linear_parent(llama_linear l)
{
    return l <= LLAMA_O ? "self_attn" : "mlp";
}

int llama_linear_parse(const char *s)
{
    for (int l = 0; l < LLAMA_NLINEAR; l++)
        if (strcmp(s, linear_names[l]) == 0)
            return l;
    return -1;
}

void llama_linear_shape(const llama_config *c, llama_linear l, int64_t *out,
                        int64_t *in)
{
    int64_t qd = (int64_t)c->n_heads * c->head_dim;
    int64_t kvd = (int64_t)c->n_kv_heads * c->head_dim;
    switch (l) {
    case LLAMA_Q:
        *out = qd;
        *in = c->dim;
        break;
    case LLAMA_K:
    case LLAMA_V:
        *out = kvd;
        *in = c->dim;
        break;
    case LLAMA_O:
        *out = c->dim;
        *in = qd;
        break;
    case LLAMA_GATE:
    case LLAMA_UP:
        *out = c->hidden;
        *in = c->dim;
        break;
    default:
        *out = c->dim;
        *in = c->hidden;
        break;
    }
}

/* An integer member that must be present and positive. */
static int get_pos_int(const json_value *o, const char *key, const char *src,
                       int32_t *out)
{
    const json_value *v = json_get(o, key);
    if (!v || v->type != JSON_NUMBER || !v->u.number.is_integer ||
        v->u.number.integer < 1 || v->u.number.integer > INT32_MAX)
        return msg_error("%s: '%s' must be a positive integer", src, key);
    *out = (int32_t)v->u.number.integer;
    return 0;
}

static int get_bool(const json_value *o, const char *key, int def)
{
    const json_value *v = json_get(o, key);
    if (v && v->type == JSON_TRUE)
        return 1;
    if (v && v->type == JSON_FALSE)
        return 0;
    return def;
}

static int is_true_member(const json_value *o, const char *key)
{
    const json_value *v = json_get(o, key);
    return v && v->type == JSON_TRUE;
}

int llama_config_load(const char *dir, llama_config *c)
{
    char *path = io_path_join(dir, "config.json");
    char *text = NULL;
    size_t len = 0;
    json_value *root = NULL;
    int rc = -1;
    memset(c, 0, sizeof *c);
    if (io_read_file(path, &text, &len) != 0)
        goto out;
    if (json_parse(text, len, path, 1, &root) != 0)
        goto out;
    if (root->type != JSON_OBJECT) {
        msg_error("%s: expected a JSON object", path);
        goto out;
    }
    const char *mt = json_get_string(root, "model_type", NULL);
    if (mt && strcmp(mt, "llama") != 0) {
        msg_error("%s: model_type '%s' is not supported (llama only)", path,
                  mt);
        goto out;
    }
    if (get_pos_int(root, "hidden_size", path, &c->dim) ||
        get_pos_int(root, "intermediate_size", path, &c->hidden) ||
        get_pos_int(root, "num_hidden_layers", path, &c->n_layers) ||
        get_pos_int(root, "num_attention_heads", path, &c->n_heads) ||
        get_pos_int(root, "vocab_size", path, &c->vocab))
        goto out;
    c->n_kv_heads = c->n_heads;
    if (json_get(root, "num_key_value_heads") &&
        json_get(root, "num_key_value_heads")->type != JSON_NULL &&
        get_pos_int(root, "num_key_value_heads", path, &c->n_kv_heads))
        goto out;
    c->head_dim = c->dim / c->n_heads;
    if (json_get(root, "head_dim") &&
        json_get(root, "head_dim")->type != JSON_NULL &&
        get_pos_int(root, "head_dim", path, &c->head_dim))
        goto out;
    c->max_pos = 2048;
    if (json_get(root, "max_position_embeddings") &&
        get_pos_int(root, "max_position_embeddings", path, &c->max_pos))
        goto out;
    if (c->n_heads % c->n_kv_heads != 0 || c->head_dim % 2 != 0) {
        msg_error("%s: num_attention_heads must be a multiple of "
                  "num_key_value_heads and head_dim even",
                  path);
        goto out;
    }
    c->norm_eps = (float)json_get_number(root, "rms_norm_eps", 1e-6);
    const json_value *rp = json_get(root, "rope_parameters");
    double theta = json_get_number(root, "rope_theta", 10000.0);
    if (rp && rp->type == JSON_OBJECT) {
        theta = json_get_number(rp, "rope_theta", theta);
        const char *rt = json_get_string(rp, "rope_type", NULL);
        if (rt && strcmp(rt, "default") != 0) {
            msg_error("%s: rope_type '%s' is not supported", path, rt);
            goto out;
        }
    }
    const json_value *rs = json_get(root, "rope_scaling");
    if (rs && rs->type == JSON_OBJECT) {
        const char *rt = json_get_string(rs, "rope_type", NULL);
        if (!rt)
            rt = json_get_string(rs, "type", NULL);
        if (!rt || strcmp(rt, "default") != 0) {
            msg_error("%s: rope_scaling '%s' is not supported", path,
                      rt ? rt : "?");
            goto out;
        }
    }
    c->rope_theta = (float)theta;
    const char *act = json_get_string(root, "hidden_act", NULL);
    if (act && strcmp(act, "silu") != 0) {
        msg_error("%s: hidden_act '%s' is not supported (silu only)", path,
                  act);
        goto out;
    }
    if (is_true_member(root, "attention_bias") ||
        is_true_member(root, "mlp_bias")) {
        msg_error("%s: attention_bias and mlp_bias are not supported", path);
        goto out;
    }
    c->tied = get_bool(root, "tie_word_embeddings", 0);
    c->bos_id = (int32_t)json_get_int(root, "bos_token_id", -1);
    c->eos_id = (int32_t)json_get_int(root, "eos_token_id", -1);
    const json_value *qc = json_get(root, "quantization_config");
    if (qc && qc->type == JSON_OBJECT) {
        const char *qm = json_get_string(qc, "quant_method", NULL);
        const char *qt = json_get_string(qc, "bnb_4bit_quant_type", NULL);
        if (!qm || strcmp(qm, "bitsandbytes") != 0 ||
            !get_bool(qc, "load_in_4bit", 0) || !qt || strcmp(qt, "nf4") != 0) {
            msg_error("%s: quantization_config is not bitsandbytes NF4 "
                      "4-bit",
                      path);
            goto out;
        }
        c->quantized = 1;
    }
    rc = 0;
out:
    json_free(root);
    free(text);
    free(path);
    return rc;
}

const float *llama_weight_f32(const llama_weight *w, float *scratch)
{
    if (w->f32)
        return w->f32;
    /* as bitsandbytes: fp32 codes times absmax, rounded to the original
     * dtype of the weight (the dtype the product then runs in upcast) */
    const nf4_weight *q = w->nf4;
    int64_t rows = w->rows, cols = w->cols, step = 16;
    st_dtype dt = q->dtype;
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 16))
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
        int64_t nr = rows - r0 < step ? rows - r0 : step;
        float *dst = scratch + r0 * cols;
        nf4_dequantize_rows(q, r0, nr, dst);
        if (dt == ST_BF16)
            for (int64_t e = 0; e < nr * cols; e++)
                dst[e] = st_bf16_to_f32(st_f32_to_bf16(dst[e]));
        else if (dt == ST_F16)
            for (int64_t e = 0; e < nr * cols; e++)
                dst[e] = st_f16_to_f32(st_f32_to_f16(dst[e]));
    }
    return scratch;
}

/* Reads a float tensor of exactly the given shape into a new f32 array. */
static int load_f32(const st_model *st, const char *name, int ndim, int64_t d0,
                    int64_t d1, float **out)
{
    const st_tensor *t = st_model_find(st, name);
    *out = NULL;
    if (!t)
        return msg_error("%s: tensor '%s' is missing", st->dir, name);
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16 &&
        t->dtype != ST_F64)
        return msg_error("%s: tensor '%s' has dtype %s, expected a float "
                         "type",
                         st->dir, name, st_dtype_name(t->dtype));
    int ok = t->ndim == ndim && t->shape[0] == d0 &&
             (ndim == 1 || t->shape[1] == d1);
    if (!ok)
        return msg_error("%s: tensor '%s' has the wrong shape (expected "
                         "[%lld%s%.0lld])",
                         st->dir, name, (long long)d0, ndim == 2 ? ", " : "",
                         ndim == 2 ? (long long)d1 : 0LL);
    float *p = xmalloc((size_t)t->numel * sizeof(float));
    if (st_to_f32(t, p, 0, t->numel) != 0) {
        free(p);
        return -1;
    }
    /* a NaN or infinity would only come out as a NaN adapter (issue 11) */
    for (int64_t i = 0; i < t->numel; i++)
        if (!isfinite(p[i])) {
            msg_error("%s: tensor '%s' holds a non-finite value (%g at "
                      "element %lld)",
                      st->dir, name, p[i], (long long)i);
            free(p);
            return -1;
        }
    *out = p;
    return 0;
}

static int load_linear(const st_model *st, const char *name, int64_t rows,
                       int64_t cols, int quantized, llama_weight *w)
{
    w->rows = rows;
    w->cols = cols;
    if (!quantized)
        return load_f32(st, name, 2, rows, cols, &w->f32);
    const st_tensor *t = st_model_find(st, name);
    if (t && t->dtype != ST_U8) /* a module kept in high precision */
        return load_f32(st, name, 2, rows, cols, &w->f32);
    w->nf4 = xcalloc(1, sizeof *w->nf4);
    if (nf4_weight_load(st, name, w->nf4) != 0) {
        free(w->nf4);
        w->nf4 = NULL;
        return -1;
    }
    if (w->nf4->ndim != 2 || w->nf4->shape[0] != rows ||
        w->nf4->shape[1] != cols) {
        nf4_weight_free(w->nf4);
        free(w->nf4);
        w->nf4 = NULL;
        return msg_error("%s: tensor '%s' has the wrong shape (expected "
                         "[%lld, %lld])",
                         st->dir, name, (long long)rows, (long long)cols);
    }
    return 0;
}

int llama_load(const char *dir, llama_model **out)
{
    *out = NULL;
    llama_model *m = xcalloc(1, sizeof *m);
    st_model *st = NULL;
    char name[256];
    if (llama_config_load(dir, &m->cfg) != 0)
        goto fail;
    const llama_config *c = &m->cfg;
    m->dir = xstrdup(dir);
    if (st_model_open(dir, &st) != 0)
        goto fail;
    if (load_f32(st, "model.embed_tokens.weight", 2, c->vocab, c->dim,
                 &m->embed) ||
        load_f32(st, "model.norm.weight", 1, c->dim, 0, &m->norm))
        goto fail;
    m->layers = xcalloc((size_t)c->n_layers, sizeof *m->layers);
    for (int32_t i = 0; i < c->n_layers; i++) {
        llama_layer *L = &m->layers[i];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight",
                 i);
        if (load_f32(st, name, 1, c->dim, 0, &L->attn_norm))
            goto fail;
        snprintf(name, sizeof name,
                 "model.layers.%d.post_attention_layernorm.weight", i);
        if (load_f32(st, name, 1, c->dim, 0, &L->ffn_norm))
            goto fail;
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            int64_t o, in;
            llama_linear_shape(c, (llama_linear)l, &o, &in);
            snprintf(name, sizeof name, "model.layers.%d.%s.%s.weight", i,
                     llama_linear_parent((llama_linear)l),
                     llama_linear_name((llama_linear)l));
            if (load_linear(st, name, o, in, c->quantized, &L->lin[l]))
                goto fail;
            if (o * in > m->max_lin_elems)
                m->max_lin_elems = o * in;
        }
    }
    m->head.rows = c->vocab;
    m->head.cols = c->dim;
    if (st_model_find(st, "lm_head.weight") && !c->tied) {
        if (load_f32(st, "lm_head.weight", 2, c->vocab, c->dim, &m->head.f32))
            goto fail;
    } else if (c->tied) {
        m->head.f32 = m->embed;
    } else {
        msg_error("%s: tensor 'lm_head.weight' is missing and "
                  "tie_word_embeddings is false",
                  dir);
        goto fail;
    }
    if (c->quantized)
        m->st = st; /* the NF4 codes point into its mapping */
    else
        st_model_close(st);
    *out = m;
    return 0;
fail:
    if (m->st != st)
        st_model_close(st);
    llama_free(m);
    return -1;
}

static void weight_free(llama_weight *w)
{
    free(w->f32);
    if (w->nf4) {
        nf4_weight_free(w->nf4);
        free(w->nf4);
    }
    w->f32 = NULL;
    w->nf4 = NULL;
}

void llama_free(llama_model *m)
{
    if (!m)
        return;
    if (m->layers)
        for (int32_t i = 0; i < m->cfg.n_layers; i++) {
            free(m->layers[i].attn_norm);
            free(m->layers[i].ffn_norm);
            for (int l = 0; l < LLAMA_NLINEAR; l++)
                weight_free(&m->layers[i].lin[l]);
        }
    if (m->head.f32 != m->embed)
        weight_free(&m->head);
    free(m->layers);
    free(m->embed);
    free(m->norm);
    free(m->dir);
    st_model_close(m->st);
    free(m);
}

static uint64_t weight_bytes(const llama_weight *w)
{
    if (w->f32)
        return (uint64_t)(w->rows * w->cols) * 4;
    if (!w->nf4)
        return 0;
    const nf4_weight *q = w->nf4;
    return (uint64_t)(q->numel + 1) / 2 +
           (uint64_t)q->nblocks * (q->nested ? 1 : 4) +
           (uint64_t)q->nested_nblocks * 4;
}

uint64_t llama_weight_bytes(const llama_model *m)
{
    const llama_config *c = &m->cfg;
    uint64_t n = (uint64_t)c->vocab * c->dim * 4 + (uint64_t)c->dim * 4;
    for (int32_t i = 0; i < c->n_layers; i++) {
        n += (uint64_t)c->dim * 8;
        for (int l = 0; l < LLAMA_NLINEAR; l++)
            n += weight_bytes(&m->layers[i].lin[l]);
    }
    if (m->head.f32 != m->embed)
        n += weight_bytes(&m->head);
    return n;
}

int llama_batch_check(const llama_model *m, const llama_batch *b)
{
    for (int64_t t = 0; t < b->n; t++) {
        if (b->ids[t] < 0 || b->ids[t] >= m->cfg.vocab)
            return msg_error("token id %d out of range (vocabulary %d)",
                             b->ids[t], m->cfg.vocab);
        if (b->targets && (b->targets[t] < -1 || b->targets[t] >= m->cfg.vocab))
            return msg_error("target id %d out of range (vocabulary %d)",
                             b->targets[t], m->cfg.vocab);
        int32_t s = b->start[t];
        if (s > t || s < 0 || (t > 0 && s != t && s != b->start[t - 1]) ||
            (t == 0 && s != 0))
            return msg_error("batch token %lld: bad attention start %d",
                             (long long)t, s);
        if (b->pos[t] < 0)
            return msg_error("batch token %lld: negative position",
                             (long long)t);
    }
    return 0;
}
