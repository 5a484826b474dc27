/* merge.h: folding a LoRA adapter into a Llama checkpoint (lora-merge).
 *
 * Every targeted linear weight becomes
 *     W' = W + scale * B A,   scale = alpha / r  (alpha / sqrt(r), rsLoRA)
 * computed in fp32 (B A accumulated in fp32 over k = 0 .. r-1, in that
 * order, then scaled and added to W in fp32) and rounded once, to nearest
 * even, to the output dtype. Every other tensor is converted to the output
 * dtype (float tensors) or copied (others). The result is a plain Hugging
 * Face checkpoint: config.json without quantization_config and with its
 * torch_dtype / dtype set to the output dtype, safetensors in the order
 * save_pretrained writes them, sharded at a size limit with
 * model.safetensors.index.json, tokenizer and generation files copied.
 *
 * The base is a float checkpoint (F32, F16, BF16) or an NF4 checkpoint
 * written by nf4-quant or bitsandbytes. W is either the high-precision
 * weight or, with from_nf4, the NF4 weight the adapter was trained against,
 * dequantized as bitsandbytes does (fp32 code times absmax, rounded to the
 * weight's own dtype). An NF4 base without from_nf4 is refused: its
 * high-precision weights are gone. A float base with from_nf4 is first
 * quantized as nf4-quant does (block size 64, double quantization) and
 * dequantized, which reproduces the NF4 weights bit for bit.
 *
 * The checkpoint streams through row chunks of a few MiB: memory stays
 * near one chunk plus the adapter, whatever the model size. Everything is
 * validated (adapter against config, every targeted weight present with
 * its shape) before the output directory is created; a failure later
 * removes it, so a failure never leaves a partial output.
 */
#ifndef MERGE_H
#define MERGE_H

#include "safetensors.h"
#include <stddef.h>
#include <stdint.h>

/* Hugging Face's default max_shard_size, "5GB". */
#define MERGE_DEFAULT_SHARD_BYTES 5000000000ULL

typedef struct merge_opts {
    const char *adapter_dir; /* PEFT LoRA adapter directory */
    const char *base_dir;    /* NULL: the adapter's base_model_name_or_path,
                                when that is a local directory */
    const char *out_dir;     /* written via io_dir_begin / io_dir_commit */
    st_dtype dtype;          /* ST_BF16 (default), ST_F16 or ST_F32 */
    int from_nf4;            /* merge into the dequantized NF4 weights */
    int requantize;          /* write NF4 (nf4_quantize_checkpoint) */
    uint64_t shard_bytes;    /* 0: one file */
    int nthreads;            /* <= 0: all (OpenMP) */
    /* Called before each output tensor when non-NULL (progress). */
    void (*on_tensor)(void *ctx, size_t i, size_t n, const char *name);
    void *ctx;
} merge_opts;

/* What a merge did. */
typedef struct merge_stats {
    size_t tensors;     /* tensors written */
    size_t merged;      /* of them, weights with a LoRA delta */
    uint64_t bytes_in;  /* tensor bytes read from the base */
    uint64_t bytes_out; /* tensor bytes written */
    size_t shards;      /* safetensors files written */
} merge_stats;

/* Defaults: BF16, MERGE_DEFAULT_SHARD_BYTES, everything else 0 / NULL. */
void merge_opts_init(merge_opts *o);

/* Merges o->adapter_dir into the base and writes o->out_dir. st (may be
 * NULL) receives what was done. 0 ok; -1 with one message (bad adapter,
 * adapter not fitting the base, missing tensors, I/O error) and no output
 * directory left behind. */
int merge_checkpoint(const merge_opts *o, merge_stats *st);

/* w (nrows, in) += scale * (B A)[row0 .. row0 + nrows): B is (out, r) and
 * A is (r, in), both whole; w holds the rows row0.. only. Each element's
 * product is summed over k in order 0 .. r-1 in fp32, then scaled and
 * added. Threads split the rows (nthreads <= 0: all); the result does not
 * depend on their number. */
void merge_add_delta(float *w, const float *A, const float *B, int64_t row0,
                     int64_t nrows, int64_t in, int32_t r, float scale,
                     int nthreads);

/* "bf16"/"bfloat16", "f16"/"fp16"/"float16", "f32"/"fp32"/"float32" (case
 * insensitive). 0 ok, -1 unknown (nothing printed). */
int merge_parse_dtype(const char *s, st_dtype *out);
/* Sizes as Hugging Face's max_shard_size writes them: a number of bytes
 * with an optional unit, B, KB, MB, GB, TB (powers of 1000) or KiB, MiB,
 * GiB, TiB (powers of 1024), case insensitive: "5GB", "500MiB", "0".
 * 0 ok, -1 malformed (nothing printed). */
int merge_parse_size(const char *s, uint64_t *out);

#endif
