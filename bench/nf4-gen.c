/* nf4-gen: writes a seeded synthetic Llama checkpoint (random BF16 or F32
 * weights of real Llama shapes) for bench/nf4.sh, with the toolkit's own
 * safetensors writer, streaming tensor by tensor.
 *
 *   nf4-gen DIR [hidden intermediate layers heads kv_heads vocab [dtype
 * [seed]]]
 *
 * Defaults: TinyLlama-1.1B's shapes (2048 5632 22 32 4 32000), bf16, seed 1.
 * Values: a sum of four uniforms (roughly normal), std 0.02, per-row scale
 * between 0.5 and 1.5 so block absmax values vary as in trained weights.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "msg.h"
#include "safetensors.h"

static uint64_t rng_state;

static inline uint64_t next_u64(void)
{
    uint64_t x = rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void write_tensor(st_writer *w, int64_t rows, int64_t cols, st_dtype dt,
                         int ones)
{
    size_t esz = st_dtype_size(dt);
    unsigned char *row = xmalloc((size_t)cols * esz);
    for (int64_t r = 0; r < rows; r++) {
        float scale =
            0.02f * (0.5f + (float)(next_u64() >> 40) / (float)(1 << 24));
        for (int64_t c = 0; c < cols; c++) {
            float v = 1.0f;
            if (!ones) {
                uint64_t u = next_u64();
                float s = (float)(u & 0xffff) + (float)((u >> 16) & 0xffff) +
                          (float)((u >> 32) & 0xffff) + (float)(u >> 48);
                v = (s / 65536.0f - 2.0f) * 1.7320508f * scale;
            }
            if (dt == ST_BF16) {
                uint16_t h = st_f32_to_bf16(v);
                memcpy(row + 2 * c, &h, 2);
            } else {
                memcpy(row + 4 * c, &v, 4);
            }
        }
        if (st_writer_write(w, row, (uint64_t)cols * esz) != 0)
            exit(2);
    }
    free(row);
}

int main(int argc, char **argv)
{
    msg_init(argv[0]);
    if (argc < 2)
        msg_die(
            "usage: nf4-gen dir [hidden inter layers heads kv vocab [bf16|f32 "
            "[seed]]]");
    const char *dir = argv[1];
    int64_t hid = 2048, inter = 5632, layers = 22, heads = 32, kv = 4,
            vocab = 32000;
    if (argc >= 8) {
        hid = atoll(argv[2]);
        inter = atoll(argv[3]);
        layers = atoll(argv[4]);
        heads = atoll(argv[5]);
        kv = atoll(argv[6]);
        vocab = atoll(argv[7]);
    }
    st_dtype dt = argc >= 9 && strcmp(argv[8], "f32") == 0 ? ST_F32 : ST_BF16;
    rng_state = argc >= 10 ? strtoull(argv[9], NULL, 10) * 2654435761ull + 1
                           : 88172645463325252ull;
    int64_t hd = hid / heads;

    char *cfgp = io_path_join(dir, "config.json");
    io_writer *cw = io_writer_open(cfgp, IO_TEXT);
    if (!cw)
        return 2;
    io_printf(
        cw,
        "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n"
        "  \"model_type\": \"llama\",\n  \"hidden_size\": %lld,\n"
        "  \"intermediate_size\": %lld,\n  \"num_hidden_layers\": %lld,\n"
        "  \"num_attention_heads\": %lld,\n  \"num_key_value_heads\": %lld,\n"
        "  \"vocab_size\": %lld,\n  \"max_position_embeddings\": 2048,\n"
        "  \"rms_norm_eps\": 1e-05,\n  \"rope_theta\": 10000.0,\n"
        "  \"tie_word_embeddings\": false,\n  \"torch_dtype\": \"%s\"\n}\n",
        (long long)hid, (long long)inter, (long long)layers, (long long)heads,
        (long long)kv, (long long)vocab,
        dt == ST_BF16 ? "bfloat16" : "float32");
    if (io_writer_commit(cw) != 0)
        return 2;
    free(cfgp);

    st_writer *w = st_writer_new(dir, "model", 0);
    struct {
        const char *fmt;
        int64_t r, c;
        int ones;
    } per_layer[] = {
        {"model.layers.%lld.input_layernorm.weight", 1, hid, 1},
        {"model.layers.%lld.mlp.down_proj.weight", hid, inter, 0},
        {"model.layers.%lld.mlp.gate_proj.weight", inter, hid, 0},
        {"model.layers.%lld.mlp.up_proj.weight", inter, hid, 0},
        {"model.layers.%lld.post_attention_layernorm.weight", 1, hid, 1},
        {"model.layers.%lld.self_attn.k_proj.weight", kv * hd, hid, 0},
        {"model.layers.%lld.self_attn.o_proj.weight", hid, hid, 0},
        {"model.layers.%lld.self_attn.q_proj.weight", hid, hid, 0},
        {"model.layers.%lld.self_attn.v_proj.weight", kv * hd, hid, 0},
    };
    int np = (int)(sizeof per_layer / sizeof *per_layer);
    char name[128];
    int64_t total = 0;
    /* declare: the order of the writes below */
    int64_t s2[2] = {vocab, hid}, s1[1] = {hid};
    st_writer_declare(w, "lm_head.weight", dt, 2, s2);
    st_writer_declare(w, "model.embed_tokens.weight", dt, 2, s2);
    total += 2 * vocab * hid;
    for (int64_t l = 0; l < layers; l++)
        for (int k = 0; k < np; k++) {
            snprintf(name, sizeof name, per_layer[k].fmt, (long long)l);
            int64_t sh[2] = {per_layer[k].r, per_layer[k].c};
            if (per_layer[k].r == 1)
                st_writer_declare(w, name, dt, 1, s1);
            else
                st_writer_declare(w, name, dt, 2, sh);
            total += per_layer[k].r * per_layer[k].c;
        }
    st_writer_declare(w, "model.norm.weight", dt, 1, s1);
    total += hid;
    st_writer_metadata(w, "format", "pt");
    if (st_writer_begin(w) != 0)
        return 2;
    write_tensor(w, vocab, hid, dt, 0);
    write_tensor(w, vocab, hid, dt, 0);
    for (int64_t l = 0; l < layers; l++)
        for (int k = 0; k < np; k++)
            write_tensor(w, per_layer[k].r, per_layer[k].c, dt,
                         per_layer[k].ones);
    write_tensor(w, 1, hid, dt, 1);
    if (st_writer_finish(w) != 0)
        return 2;
    printf("%lld\n", (long long)total);
    return 0;
}
