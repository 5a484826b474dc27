/* fuzz_adapter.c: libFuzzer harness for PEFT adapter directories
 * (adapter_read, lib/adapter.h), read for the stories260K model's shape.
 *
 * Input: adapter_config.json, then the separator line
 * "\n--- adapter_model.safetensors ---\n", then adapter_model.safetensors
 * (seeds.sh writes its seeds this way); without a separator the whole input
 * is the config and the directory has no safetensors file. Both files are
 * written to a scratch directory. Promises checked: an adapter read has
 * the model's layer count, a rank and targets that match its tensors'
 * shapes, and a positive finite scale.
 */
#include <math.h>

#include "adapter.h"
#include "fuzz.h"

static const char sep[] = "\n--- adapter_model.safetensors ---\n";

/* stories260K (../shared/models/stories260K/config.json) */
static const llama_config mc = {
    .dim = 64,
    .hidden = 172,
    .n_layers = 5,
    .n_heads = 8,
    .n_kv_heads = 4,
    .head_dim = 8,
    .vocab = 512,
    .max_pos = 512,
    .norm_eps = 1e-5f,
    .rope_theta = 10000.0f,
    .tied = 1,
    .bos_id = 1,
    .eos_id = 2,
};

static const uint8_t *find(const uint8_t *h, size_t n, const char *s, size_t k)
{
    for (size_t i = 0; i + k <= n; i++)
        if (h[i] == (uint8_t)s[0] && memcmp(h + i, s, k) == 0)
            return h + i;
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *cut = find(data, size, sep, sizeof sep - 1);
    size_t clen = cut ? (size_t)(cut - data) : size;
    char dir[300], path[320];
    snprintf(dir, sizeof dir, "%s/adapter", fuzz_tmpdir());
    mkdir(dir, 0700);
    (void)fuzz_write_file("adapter/adapter_config.json", data, clen);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    if (cut) {
        const uint8_t *st = cut + sizeof sep - 1;
        (void)fuzz_write_file("adapter/adapter_model.safetensors", st,
                              size - (size_t)(st - data));
    } else {
        unlink(path);
    }

    lora_adapter *a = NULL;
    char *base = NULL;
    if (adapter_read(dir, &mc, &a, &base) != 0) {
        FUZZ_ASSERT(a == NULL && base == NULL);
        return 0;
    }
    FUZZ_ASSERT(a && a->n_layers == mc.n_layers);
    FUZZ_ASSERT(a->cfg.r >= 1 && (a->cfg.targets & LORA_ALL_LINEAR));
    FUZZ_ASSERT(a->scale > 0 && isfinite(a->scale));
    size_t total = 0;
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
            if (s->a < 0)
                continue;
            total += (size_t)(a->cfg.r * (s->in + s->out));
            FUZZ_ASSERT((size_t)s->b + (size_t)(s->out * a->cfg.r) <=
                        a->n_params);
        }
    FUZZ_ASSERT(total == a->n_params);
    lora_free(a);
    free(base);
    return 0;
}
