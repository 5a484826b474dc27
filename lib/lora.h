/* lora.h: LoRA adapters on the linear layers of a Llama model.
 *
 * A targeted linear computes, as PEFT does,
 *     y = W x + scale * B (A dropout(x)),   scale = alpha / r
 * (alpha / sqrt(r) with rsLoRA), A (r, in), B (out, r). Every A and B lives
 * in one flat f32 array, params, so the optimizer, clipping and checkpoints
 * treat the adapter as one vector: layer by layer, and inside a layer the
 * targeted linears in llama_linear order, each A (r*in floats) then B
 * (out*r floats). A gradient buffer has the same layout.
 *
 * Randomness is counter-based (SplitMix64, Steele et al. 2014, as in
 * java.util.SplittableRandom): lora_rand_u64(key, i) = splitmix64 output
 * for state key + (i+1) * 0x9e3779b97f4a7c15, i.e. the i-th draw of a
 * SplitMix64 generator seeded with key. Any draw can be computed in any
 * order, so recomputation (gradient checkpointing), threads and GPU kernels
 * see the same numbers. A uniform in [0, 1) is the top 24 bits times 2^-24.
 */
#ifndef LORA_H
#define LORA_H

#include "llama.h"
#include <stddef.h>
#include <stdint.h>

typedef struct lora_config {
    int32_t r;
    double alpha;   /* lora_alpha */
    double dropout; /* lora_dropout, in [0, 1) */
    int use_rslora;
    uint32_t targets; /* bit (1u << llama_linear) per targeted linear */
} lora_config;

#define LORA_ALL_LINEAR ((1u << LLAMA_NLINEAR) - 1)
#define LORA_DEFAULT_TARGETS ((1u << LLAMA_Q) | (1u << LLAMA_V))

/* Where one linear's A and B sit in params (-1 when not targeted). */
typedef struct lora_slot {
    int64_t a, b; /* offsets of A (r, in) and B (out, r) */
    int64_t in, out;
} lora_slot;

typedef struct lora_adapter {
    lora_config cfg;
    int32_t n_layers;
    float scale;
    size_t n_params;
    float *params;    /* (n_params) */
    lora_slot *slots; /* (n_layers * LLAMA_NLINEAR) */
} lora_adapter;

/* Target names to a mask: module names ("q_proj", ...), or the single name
 * "all-linear" (every linear of the decoder layers; the head is never a
 * target). An empty list gives the Llama default, q_proj and v_proj.
 * 0 ok, -1 error naming the unknown module. */
int lora_targets_parse(const char *const *names, size_t n, uint32_t *out);
/* Appends the target names in llama_linear order, comma-separated. */
void lora_targets_format(uint32_t targets, char *buf, size_t size);

/* A zeroed adapter for a model. -1 on a bad configuration (r < 1, no
 * target, dropout outside [0, 1)), with a message. */
int lora_new(const llama_config *mc, const lora_config *c, lora_adapter **out);
void lora_free(lora_adapter *a);
/* PEFT's initialisation: every A uniform in [-1/sqrt(in), 1/sqrt(in)]
 * (Kaiming-uniform with a = sqrt(5)), every B zero. A's element j of the
 * linear l in layer i is draw j of key lora_init_key(seed, i, l). */
void lora_init(lora_adapter *a, uint64_t seed);
uint64_t lora_init_key(uint64_t seed, int32_t layer, llama_linear l);

/* Pointers into params, or NULL when the linear is not targeted. */
float *lora_A(const lora_adapter *a, int32_t layer, llama_linear l);
float *lora_B(const lora_adapter *a, int32_t layer, llama_linear l);
const lora_slot *lora_slot_of(const lora_adapter *a, int32_t layer,
                              llama_linear l);

/* W (out, in) += scale * B A: the adapter merged into a weight. */
void lora_merge_into(const lora_adapter *a, int32_t layer, llama_linear l,
                     float *w);

/* Counter-based random numbers (see above). */
uint64_t lora_splitmix64(uint64_t x);
uint64_t lora_rand_u64(uint64_t key, uint64_t i);
float lora_rand_uniform(uint64_t key, uint64_t i);

/* Dropout: element (t, j) of the input of linear l in layer `layer` is kept
 * when lora_rand_uniform(lora_dropout_stream(key, layer, l), t * in + j)
 * >= p, and then multiplied by 1 / (1 - p). key identifies the micro-batch
 * (see lora-train(1)); t is the token's index in the batch. */
uint64_t lora_dropout_stream(uint64_t key, int32_t layer, llama_linear l);

#endif
