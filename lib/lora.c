/* lora.c: LoRA adapter layout, PEFT's initialisation, counter-based RNG.
 *
 * One flat parameter array keeps the optimizer and checkpoints trivial; the
 * slots table says where each linear's A and B are. The generator is
 * SplitMix64 used as a counter-based hash so that any draw is addressable.
 */
#include "lora.h"

#include "msg.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN_GAMMA 0x9e3779b97f4a7c15ull

uint64_t lora_splitmix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t lora_rand_u64(uint64_t key, uint64_t i)
{
    return lora_splitmix64(key + (i + 1) * GOLDEN_GAMMA);
}

float lora_rand_uniform(uint64_t key, uint64_t i)
{
    return (float)(lora_rand_u64(key, i) >> 40) * (1.0f / 16777216.0f);
}

/* Sub-keys: a fresh SplitMix64 output per (parent, tag), so streams of
 * different layers and linears never overlap in practice. */
static uint64_t subkey(uint64_t key, uint64_t tag)
{
    return lora_splitmix64(key ^ lora_splitmix64(tag + GOLDEN_GAMMA));
}

uint64_t lora_init_key(uint64_t seed, int32_t layer, llama_linear l)
{
    return subkey(subkey(seed, 0x4c6f5241ull /* "LoRA" */),
                  (uint64_t)layer * LLAMA_NLINEAR + (uint64_t)l);
}

uint64_t lora_dropout_stream(uint64_t key, int32_t layer, llama_linear l)
{
    return subkey(key, (uint64_t)layer * LLAMA_NLINEAR + (uint64_t)l);
}

int lora_targets_parse(const char *const *names, size_t n, uint32_t *out)
{
    uint32_t mask = 0;
    if (n == 0) {
        *out = LORA_DEFAULT_TARGETS;
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        if (strcmp(names[i], "all-linear") == 0) {
            mask |= LORA_ALL_LINEAR;
            continue;
        }
        int l = llama_linear_parse(names[i]);
        if (l < 0)
            return msg_error("unknown target module '%s' (expected q_proj, "
                             "k_proj, v_proj, o_proj, gate_proj, up_proj, "
                             "down_proj or all-linear)",
                             names[i]);
        mask |= 1u << l;
    }
    *out = mask;
    return 0;
}

void lora_targets_format(uint32_t targets, char *buf, size_t size)
{
    size_t len = 0;
    if (size)
        buf[0] = 0;
    for (int l = 0; l < LLAMA_NLINEAR; l++) {
        if (!(targets & (1u << l)))
            continue;
        int k = snprintf(buf + len, size > len ? size - len : 0, "%s%s",
                         len ? "," : "", llama_linear_name((llama_linear)l));
        if (k > 0)
            len += (size_t)k;
    }
}

int lora_new(const llama_config *mc, const lora_config *c, lora_adapter **out)
{
    *out = NULL;
    if (c->r < 1)
        return msg_error("LoRA rank r must be at least 1, got %d", c->r);
    if (!(c->targets & LORA_ALL_LINEAR))
        return msg_error("LoRA needs at least one target module");
    if (!(c->dropout >= 0 && c->dropout < 1))
        return msg_error("lora_dropout must be in [0, 1), got %g", c->dropout);
    if (!(c->alpha > 0) || !isfinite(c->alpha))
        return msg_error("lora_alpha must be positive, got %g", c->alpha);
    lora_adapter *a = xcalloc(1, sizeof *a);
    a->cfg = *c;
    a->cfg.targets &= LORA_ALL_LINEAR;
    a->n_layers = mc->n_layers;
    a->scale = (float)(c->use_rslora ? c->alpha / sqrt((double)c->r)
                                     : c->alpha / c->r);
    a->slots = xmalloc((size_t)mc->n_layers * LLAMA_NLINEAR * sizeof *a->slots);
    int64_t off = 0;
    for (int32_t i = 0; i < mc->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            lora_slot *s = &a->slots[(size_t)i * LLAMA_NLINEAR + l];
            llama_linear_shape(mc, (llama_linear)l, &s->out, &s->in);
            if (a->cfg.targets & (1u << l)) {
                s->a = off;
                off += (int64_t)c->r * s->in;
                s->b = off;
                off += s->out * c->r;
            } else {
                s->a = s->b = -1;
            }
        }
    a->n_params = (size_t)off;
    a->params = xcalloc(a->n_params ? a->n_params : 1, sizeof(float));
    *out = a;
    return 0;
}

void lora_free(lora_adapter *a)
{
    if (!a)
        return;
    free(a->params);
    free(a->slots);
    free(a);
}

const lora_slot *lora_slot_of(const lora_adapter *a, int32_t layer,
                              llama_linear l)
{
    return &a->slots[(size_t)layer * LLAMA_NLINEAR + l];
}

float *lora_A(const lora_adapter *a, int32_t layer, llama_linear l)
{
    const lora_slot *s = lora_slot_of(a, layer, l);
    return s->a < 0 ? NULL : a->params + s->a;
}

float *lora_B(const lora_adapter *a, int32_t layer, llama_linear l)
{
    const lora_slot *s = lora_slot_of(a, layer, l);
    return s->b < 0 ? NULL : a->params + s->b;
}

void lora_init(lora_adapter *a, uint64_t seed)
{
    int32_t r = a->cfg.r;
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
            if (s->a < 0)
                continue;
            uint64_t key = lora_init_key(seed, i, (llama_linear)l);
            float bound = (float)(1.0 / sqrt((double)s->in));
            float *A = a->params + s->a;
            for (int64_t j = 0; j < r * s->in; j++)
                A[j] =
                    (2.0f * lora_rand_uniform(key, (uint64_t)j) - 1.0f) * bound;
            memset(a->params + s->b, 0, (size_t)(s->out * r) * sizeof(float));
        }
}

void lora_merge_into(const lora_adapter *a, int32_t layer, llama_linear l,
                     float *w)
{
    const lora_slot *s = lora_slot_of(a, layer, l);
    if (s->a < 0)
        return;
    const float *A = a->params + s->a, *B = a->params + s->b;
    int32_t r = a->cfg.r;
    int64_t in = s->in, out = s->out;
    float scale = a->scale;
#pragma omp parallel for schedule(static) if (out * in * r >= (1 << 18))
    for (int64_t o = 0; o < out; o++) {
        float *row = w + o * in;
        for (int64_t c = 0; c < in; c++) {
            float acc = 0;
            for (int32_t k = 0; k < r; k++)
                acc += B[o * r + k] * A[k * in + c];
            row[c] += scale * acc;
        }
    }
}
