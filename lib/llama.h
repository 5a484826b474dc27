/* llama.h: a Llama-architecture model in memory and its CPU reference math.
 *
 * The model is whatever Hugging Face's LlamaForCausalLM loads: config.json
 * plus safetensors (one file or shards), F32/F16/BF16 weights (converted to
 * f32 on load), or the NF4 form nf4-quant and bitsandbytes write, whose
 * linear weights stay 4-bit in memory and are dequantized on the fly, one
 * matrix at a time, when a product needs them. Embeddings, norms and the
 * head are always f32.
 *
 * The CPU math (llama_cpu.c) is the numerical reference for the GPU kernels:
 * fp32 throughout, RMSNorm as transformers computes it, rotate_half RoPE,
 * SwiGLU, causal attention restricted to the document each token belongs
 * to, and cross-entropy with per-token weights. Results do not depend on the
 * number of threads: every output element is summed by one thread in a fixed
 * order, so training is reproducible bit for bit (resume relies on it).
 *
 * A batch is a flat list of n tokens (rows of a packed file laid end to
 * end). Token t has a RoPE position pos[t] and attends to the tokens
 * start[t] .. t, so documents (and rows) never see each other. Token t's
 * loss term is weights[t] * CE(logits[t], targets[t]) when targets[t] >= 0.
 */
#ifndef LLAMA_H
#define LLAMA_H

#include <stddef.h>
#include <stdint.h>

/* The seven linear layers of a decoder layer, in the order used for every
 * per-layer table (LoRA parameters, adapters, checkpoints). */
typedef enum llama_linear {
    LLAMA_Q,    /* self_attn.q_proj (n_heads*head_dim, dim) */
    LLAMA_K,    /* self_attn.k_proj (n_kv_heads*head_dim, dim) */
    LLAMA_V,    /* self_attn.v_proj (n_kv_heads*head_dim, dim) */
    LLAMA_O,    /* self_attn.o_proj (dim, n_heads*head_dim) */
    LLAMA_GATE, /* mlp.gate_proj (hidden, dim) */
    LLAMA_UP,   /* mlp.up_proj (hidden, dim) */
    LLAMA_DOWN, /* mlp.down_proj (dim, hidden) */
    LLAMA_NLINEAR
} llama_linear;

/* "q_proj", ... and the module holding it, "self_attn" or "mlp". */
const char *llama_linear_name(llama_linear l);
const char *llama_linear_parent(llama_linear l);
/* The linear whose name is s ("q_proj"), or -1. */
int llama_linear_parse(const char *s);

typedef struct llama_config {
    int32_t dim;            /* hidden_size */
    int32_t hidden;         /* intermediate_size */
    int32_t n_layers;       /* num_hidden_layers */
    int32_t n_heads;        /* num_attention_heads */
    int32_t n_kv_heads;     /* num_key_value_heads (= n_heads when absent) */
    int32_t head_dim;       /* head_dim, or dim / n_heads */
    int32_t vocab;          /* vocab_size */
    int32_t max_pos;        /* max_position_embeddings */
    float norm_eps;         /* rms_norm_eps */
    float rope_theta;       /* rope_theta or rope_parameters.rope_theta */
    int tied;               /* tie_word_embeddings (false when absent, as
                               in transformers' LlamaConfig) */
    int32_t bos_id, eos_id; /* -1 when absent */
    int quantized;          /* quantization_config says bitsandbytes nf4 */
} llama_config;

/* Parses dir/config.json. Unsupported architectures (model_type other than
 * llama), rope_scaling, attention or mlp biases, and hidden_act other than
 * silu are refused. 0 ok, -1 error (message printed). */
int llama_config_load(const char *dir, llama_config *c);
/* The (out, in) shape of linear l. */
void llama_linear_shape(const llama_config *c, llama_linear l, int64_t *out,
                        int64_t *in);

/* A frozen weight matrix (out rows, in columns, row-major), either f32 or
 * NF4 (struct defined by lib/nf4.h). */
struct nf4_weight;
typedef struct llama_weight {
    int64_t rows, cols;
    float *f32;             /* (rows, cols), or NULL when quantized */
    struct nf4_weight *nf4; /* owned; NULL for f32 */
} llama_weight;

/* The weight as f32: w->f32 itself, or w dequantized into scratch (room for
 * rows*cols floats) which is then returned. */
const float *llama_weight_f32(const llama_weight *w, float *scratch);

typedef struct llama_layer {
    float *attn_norm;                /* (dim) input_layernorm */
    float *ffn_norm;                 /* (dim) post_attention_layernorm */
    llama_weight lin[LLAMA_NLINEAR]; /* shapes: see llama_linear */
} llama_layer;

typedef struct llama_model {
    llama_config cfg;
    char *dir;
    float *embed;          /* (vocab, dim) */
    float *norm;           /* (dim) */
    llama_weight head;     /* (vocab, dim); head.f32 == embed when tied */
    llama_layer *layers;   /* (n_layers) */
    int64_t max_lin_elems; /* largest linear weight, for dequant scratch */
    struct st_model *st;   /* kept open for NF4 weights, which point into it */
} llama_model;

/* Loads a checkpoint directory (config.json + safetensors). 0 ok, -1 error
 * (message names the directory or tensor). Free with llama_free. */
int llama_load(const char *dir, llama_model **out);
void llama_free(llama_model *m);
/* Bytes the frozen weights take in memory. */
uint64_t llama_weight_bytes(const llama_model *m);

typedef struct llama_batch {
    int64_t n;              /* tokens */
    const int32_t *ids;     /* (n) */
    const int32_t *pos;     /* (n) RoPE position (0 at a document start) */
    const int32_t *start;   /* (n) first token t attends to; start[t] <= t
                               and start[t] is start[t-1] or t */
    const int32_t *targets; /* (n) label of token t, -1 for none; NULL
                               when no loss is wanted */
    const float *weights;   /* (n) loss weights; NULL = 1 per target */
} llama_batch;

/* Checks a batch against the model: ids and targets in range, the start and
 * pos layout described above. 0 ok, -1 error (message). */
int llama_batch_check(const llama_model *m, const llama_batch *b);

struct lora_adapter;

typedef struct llama_train_opts {
    int checkpointing;    /* keep only each layer's input; recompute the
                             layer in backward (same results, less memory) */
    uint64_t dropout_key; /* key of this micro-batch's LoRA dropout masks
                             (lora_dropout_keep); unused when dropout = 0 */
} llama_train_opts;

/* Forward pass (inference: no dropout). a may be NULL (no adapter). When
 * logits is non-NULL it receives (n, vocab) floats. When b->targets is set,
 * *loss_sum (if non-NULL) receives sum_t weights[t] * CE_t and *weight_sum
 * (if non-NULL) sum_t weights[t] over tokens with a target. 0 ok, -1 error. */
int llama_forward(const llama_model *m, const struct lora_adapter *a,
                  const llama_batch *b, float *logits, double *loss_sum,
                  double *weight_sum);

/* Forward and backward for training the adapter: adds to grad (a->n_params
 * floats, in a->params' layout) the gradient of
 *     loss_scale * sum_t weights[t] * CE_t
 * with LoRA dropout applied as PEFT does. The frozen weights get no
 * gradient. *loss_sum receives the unscaled sum. 0 ok, -1 error. */
int llama_forward_backward(const llama_model *m, const struct lora_adapter *a,
                           const llama_batch *b, const llama_train_opts *o,
                           float loss_scale, float *grad, double *loss_sum);

/* Bytes of activations llama_forward_backward keeps for n tokens. */
uint64_t llama_train_activation_bytes(const llama_model *m,
                                      const struct lora_adapter *a, int64_t n,
                                      int checkpointing);

/* Incremental decoding with a key/value cache, for generation: one
 * sequence per cache. llama_decode runs n new tokens at positions
 * c->len .. c->len+n-1 (attending to everything cached before them),
 * appends their keys and values, and writes the logits of the last token
 * (vocab floats) when logits is non-NULL. */
typedef struct llama_kv_cache {
    int32_t cap; /* positions */
    int32_t len; /* positions filled */
    float *k;    /* (n_layers, cap, n_kv_heads*head_dim) */
    float *v;    /* (n_layers, cap, n_kv_heads*head_dim) */
} llama_kv_cache;

llama_kv_cache *llama_kv_cache_new(const llama_model *m, int32_t cap);
void llama_kv_cache_free(llama_kv_cache *c);
int llama_decode(const llama_model *m, const struct lora_adapter *a,
                 llama_kv_cache *c, const int32_t *ids, int32_t n,
                 float *logits);

/* Building blocks shared with the tests and the GPU tests' references. */

/* y = rmsnorm(x) * w for n rows of d; rstd (n, may be NULL) receives
 * 1/sqrt(mean(x^2) + eps) per row. */
void llama_rmsnorm(float *y, float *rstd, const float *x, const float *w,
                   int64_t n, int d, float eps);
/* Rotates one head vector (d even) in place: rotate_half RoPE at position
 * pos; inverse (the transpose, for backward) when inverse is set. */
void llama_rope(float *x, int d, int32_t pos, float theta, int inverse);
/* out (n, o) = x (n, i) @ w (o, i)^T. Each output element one dot product. */
void llama_matmul(float *out, const float *x, const float *w, int64_t n,
                  int64_t o, int64_t i);

#endif
