/* test_llama_hf.c: loading and running a Llama checkpoint that is unlike
 * stories260K: multi-head attention, head_dim given and different from
 * hidden_size / heads, an untied head, BF16 weights, two shards with an
 * index, rope_theta 500000 and eps 1e-6.
 *
 * The checkpoint is random and written by this program (seeded, so the
 * same bytes every time): `test_llama_hf --write DIR` writes it for
 * tests/torch/make-inputs.sh, whose torch run records transformers'
 * logits in tests/golden/llama-random-hf.json. Without arguments the test
 * writes it to a temporary directory, loads it with llama_load and compares
 * our forward with those logits. Also checked here: F16 and F32 copies of
 * the same weights give the same model, and a bad checkpoint is refused.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "safetensors.h"

#define REL_TOL_HF 1e-4 /* max |diff| / max |logit| per row, F32 */

enum { DIM = 48, HID = 80, LAYERS = 2, HEADS = 6, HDIM = 12, VOCAB = 100 };

static const char config_json[] =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\","
    "\"hidden_size\":48,\"intermediate_size\":80,\"num_hidden_layers\":2,"
    "\"num_attention_heads\":6,\"num_key_value_heads\":6,\"head_dim\":12,"
    "\"vocab_size\":100,\"max_position_embeddings\":128,"
    "\"rms_norm_eps\":1e-06,\"rope_theta\":500000.0,"
    "\"tie_word_embeddings\":false,\"hidden_act\":\"silu\","
    "\"bos_token_id\":1,\"eos_token_id\":2,\"torch_dtype\":\"%s\"}\n";

typedef struct wt {
    char name[96];
    int ndim;
    int64_t shape[2];
    float scale, offset;
} wt;

static int weights(wt *w)
{
    int n = 0;
#define ADD(nm, d, a, b, sc, of)                                               \
    (snprintf(w[n].name, sizeof w[n].name, "%s", nm), w[n].ndim = d,           \
     w[n].shape[0] = a, w[n].shape[1] = b, w[n].scale = sc, w[n].offset = of,  \
     n++)
    ADD("model.embed_tokens.weight", 2, VOCAB, DIM, 1.0f, 0);
    ADD("lm_head.weight", 2, VOCAB, DIM, 0.3f, 0);
    ADD("model.norm.weight", 1, DIM, 0, 0.2f, 1.0f);
    for (int i = 0; i < LAYERS; i++) {
        char nm[96];
        static const char *lin[7] = {"self_attn.q_proj", "self_attn.k_proj",
                                     "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj",    "mlp.up_proj",
                                     "mlp.down_proj"};
        int64_t out[7] = {HEADS * HDIM, HEADS * HDIM, HEADS * HDIM, DIM,
                          HID,          HID,          DIM};
        int64_t in[7] = {DIM, DIM, DIM, HEADS * HDIM, DIM, DIM, HID};
        snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", i);
        ADD(nm, 1, DIM, 0, 0.2f, 1.0f);
        snprintf(nm, sizeof nm,
                 "model.layers.%d.post_attention_layernorm.weight", i);
        ADD(nm, 1, DIM, 0, 0.2f, 1.0f);
        for (int l = 0; l < 7; l++) {
            snprintf(nm, sizeof nm, "model.layers.%d.%s.weight", i, lin[l]);
            ADD(nm, 2, out[l], in[l], 1.7f / sqrtf((float)in[l]), 0);
        }
    }
#undef ADD
    return n;
}

/* Element j of weight k: uniform, as BF16 (so every dtype holds it exactly). */
static float value(const wt *w, int k, int64_t j)
{
    float u = lora_rand_uniform(0xabcdef00ull + (uint64_t)k, (uint64_t)j);
    float v = (2 * u - 1) * w->scale + w->offset;
    return st_bf16_to_f32(st_f32_to_bf16(v));
}

/* Writes the checkpoint in dtype dt, sharded when shards is set. */
static int write_model(const char *dir, st_dtype dt, int shards)
{
    mkdir(dir, 0777);
    char *p = io_path_join(dir, "config.json");
    FILE *f = fopen(p, "w");
    free(p);
    if (!f)
        return -1;
    fprintf(f, config_json,
            dt == ST_BF16  ? "bfloat16"
            : dt == ST_F16 ? "float16"
                           : "float32");
    fclose(f);
    wt w[64];
    int n = weights(w);
    st_writer *sw = st_writer_new(dir, "model", shards ? 40000 : 0);
    for (int k = 0; k < n; k++)
        st_writer_declare(sw, w[k].name, dt, w[k].ndim, w[k].shape);
    st_writer_metadata(sw, "format", "pt");
    if (st_writer_begin(sw) != 0)
        return -1;
    for (int k = 0; k < n; k++) {
        int64_t ne = w[k].shape[0] * (w[k].ndim == 2 ? w[k].shape[1] : 1);
        size_t es = st_dtype_size(dt);
        unsigned char *buf = malloc((size_t)ne * es);
        for (int64_t j = 0; j < ne; j++) {
            float v = value(&w[k], k, j);
            if (dt == ST_BF16) {
                uint16_t h = st_f32_to_bf16(v);
                memcpy(buf + j * 2, &h, 2);
            } else if (dt == ST_F16) {
                uint16_t h = st_f32_to_f16(v);
                memcpy(buf + j * 2, &h, 2);
            } else {
                memcpy(buf + j * 4, &v, 4);
            }
        }
        int rc = st_writer_write(sw, buf, (uint64_t)ne * es);
        free(buf);
        if (rc != 0)
            return -1;
    }
    return st_writer_finish(sw);
}

static const int32_t input[40] = {
    1,  17, 55, 3,  99, 42, 42, 7,  63, 18, 2,  31, 77, 5,
    90, 64, 12, 33, 8,  71, 45, 26, 3,  59, 88, 14, 67, 20,
    9,  38, 81, 50, 11, 95, 4,  73, 29, 61, 36, 1,
};

static float *forward(const llama_model *m, double *loss)
{
    int32_t pos[40], st[40], tg[40];
    for (int t = 0; t < 40; t++) {
        pos[t] = t;
        st[t] = 0;
        tg[t] = t + 1 < 40 ? input[t + 1] : -1;
    }
    llama_batch b = {40, input, pos, st, tg, NULL};
    float *lg = malloc(40 * VOCAB * sizeof(float));
    double ls, ws;
    if (llama_forward(m, NULL, &b, lg, &ls, &ws) != 0) {
        free(lg);
        return NULL;
    }
    *loss = ls / ws;
    return lg;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--write") == 0) {
        if (write_model(argv[2], ST_BF16, 1) != 0)
            return 2;
        char *p = io_path_join(argv[2], "input_ids.json");
        FILE *f = fopen(p, "w");
        free(p);
        for (int t = 0; f && t < 40; t++)
            fprintf(f, "%s%d", t ? "," : "[", input[t]);
        return f && fputs("]\n", f) >= 0 && fclose(f) == 0 ? 0 : 2;
    }
    char tmp[] = "/tmp/test_llama_hf.XXXXXX";
    if (!mkdtemp(tmp))
        return 2;
    char *d16 = io_path_join(tmp, "bf16"), *dh = io_path_join(tmp, "f16");
    char *d32 = io_path_join(tmp, "f32");
    CHECK(write_model(d16, ST_BF16, 1) == 0, "write a sharded BF16 checkpoint");
    char *idx = io_path_join(d16, "model.safetensors.index.json");
    CHECK(io_exists(idx), "it has an index of shards");
    free(idx);
    write_model(dh, ST_F16, 0);
    write_model(d32, ST_F32, 0);
    llama_model *m, *mh, *m32;
    CHECK(llama_load(d16, &m) == 0, "load it");
    if (!m)
        return 1;
    CHECK(!m->cfg.tied && m->cfg.head_dim == HDIM &&
              m->cfg.n_kv_heads == HEADS && m->head.f32 != m->embed &&
              fabsf(m->cfg.norm_eps - 1e-6f) < 1e-12f &&
              m->cfg.rope_theta == 500000.0f,
          "config: untied head, head_dim 12, MHA, eps 1e-6, theta 5e5");
    double loss, lh, l32;
    float *lg = forward(m, &loss);
    llama_load(dh, &mh);
    llama_load(d32, &m32);
    float *lgh = forward(mh, &lh), *lg32 = forward(m32, &l32);
    CHECK(lg32 && memcmp(lg, lg32, 40 * VOCAB * 4) == 0,
          "BF16 and F32 files of the same values give the same logits");
    /* F16 holds them too, except near zero where F16 is subnormal */
    double dh16 = 0;
    for (int e = 0; lgh && e < 40 * VOCAB; e++)
        dh16 = fmax(dh16, fabs(lgh[e] - lg[e]));
    CHECK(lgh && dh16 < 1e-3, "an F16 file loads too (max diff %.1e)", dh16);
    /* transformers on the same checkpoint */
    char path[4096];
    const char *top = getenv("TOP");
    snprintf(path, sizeof path, "%s/tests/golden/llama-random-hf.json",
             top ? top : ".");
    char *text;
    size_t len;
    json_value *g;
    if (io_read_file(path, &text, &len) == 0 &&
        json_parse(text, len, path, 1, &g) == 0) {
        const json_value *rows = json_get(g, "rows");
        const json_value *lgs = json_get(g, "logits");
        double worst = 0;
        for (size_t i = 0; i < rows->u.array.n; i++) {
            int64_t r = rows->u.array.items[i]->u.number.integer;
            const json_value *row = lgs->u.array.items[i];
            double mx = 0, e = 0;
            for (int v = 0; v < VOCAB; v++) {
                double want = row->u.array.items[v]->u.number.value;
                mx = fmax(mx, fabs(want));
                e = fmax(e, fabs(lg[r * VOCAB + v] - want));
            }
            worst = fmax(worst, e / mx);
        }
        double want = json_get_number(g, "loss", 0);
        CHECK(worst <= REL_TOL_HF,
              "logits match transformers (max rel err %.2e)", worst);
        CHECK(fabs(loss - want) / want <= REL_TOL_HF,
              "loss %.7f matches transformers %.7f", loss, want);
        json_free(g);
        free(text);
    } else {
        CHECK(0, "read %s", path);
    }
    /* damaged checkpoints */
    fprintf(stderr, "(expected errors follow)\n");
    char *cfgp = io_path_join(d32, "config.json");
    FILE *f = fopen(cfgp, "w");
    fputs("{\"model_type\":\"llama\",\"hidden_size\":48}", f);
    fclose(f);
    llama_model *bad;
    CHECK(llama_load(d32, &bad) != 0, "a config without sizes is refused");
    f = fopen(cfgp, "w");
    fprintf(f, config_json, "float32");
    fclose(f);
    char *st = io_path_join(d32, "model.safetensors");
    truncate(st, 1000);
    CHECK(llama_load(d32, &bad) != 0, "a truncated checkpoint is refused");
    free(st);
    free(cfgp);
    free(lg);
    free(lgh);
    free(lg32);
    llama_free(m);
    llama_free(mh);
    llama_free(m32);
    io_remove_tree(tmp);
    free(d16);
    free(dh);
    free(d32);
    return CHECK_DONE();
}
