/* nf4.h: NF4 4-bit block quantization with double quantization, the CPU
 * reference that reproduces bitsandbytes bit for bit.
 *
 * A weight of n elements (flattened row-major) is cut into blocks of
 * `blocksize` (64) elements. Each block keeps its absmax (fp32); each value
 * is multiplied by 1/absmax and mapped to the nearest of the 16 NF4 codes,
 * the midpoints as thresholds (a value on a threshold takes the lower
 * code). Two codes per byte, element 2i in the high nibble of byte i.
 *
 * Double quantization ("nested"): the absmax values, minus their mean (the
 * offset), are quantized again in blocks of 256 to 8-bit codes of the signed
 * dynamic map, keeping one fp32 absmax per 256 blocks.
 *
 * Dequantization: absmax[b] = nested_map[absmax_code[b]] * nested_absmax[b /
 * 256] + offset (fp32, in that order), then w[i] = quant_map[code[i]] *
 * absmax[i / blocksize] in fp32, rounded to the weight's dtype by the caller
 * (st_f32_to_bf16 ...), exactly as bitsandbytes' kernels do.
 *
 * How the result is stored in a checkpoint (bitsandbytes' serialization, see
 * qlora-formats(5)): for a weight "X.weight", the tensors "X.weight" (U8
 * [(n+1)/2, 1], packed codes), "X.weight.absmax" (U8 [nblocks] when nested,
 * else F32), "X.weight.quant_map" (F32 [16]), "X.weight.nested_absmax" (F32),
 * "X.weight.nested_quant_map" (F32 [256]) and
 * "X.weight.quant_state.bitsandbytes__nf4" (U8: JSON text).
 */
#ifndef NF4_H
#define NF4_H

#include "safetensors.h"
#include "strbuf.h"
#include <stddef.h>
#include <stdint.h>

#define NF4_NESTED_BLOCKSIZE 256

/* The 16 NF4 code values, index 0..15 (-1 ... 0 ... 1). */
extern const float nf4_code[16];

/* The 256-entry signed dynamic map of bitsandbytes (create_dynamic_map()),
 * used for the absmax codes of double quantization. */
const float *nf4_dynamic_map(void);

/* The kernel in use: 0 plain C, 1 SSE2, 2 AVX2, 3 AVX-512 (all give the
 * same bits).
 * want >= 0 forces a level (capped at what the CPU has; for tests);
 * want < 0 just reports it. */
int nf4_simd_level(int want);

/* bitsandbytes' 8-bit quantization of already scaled values u (in
 * [-1, 1]) to the dynamic map: its dQuantize binary search, bit for bit
 * (NaN gives 0). Used for the absmax codes of double quantization. */
void nf4_dynamic_quantize(const float *u, int64_t n, uint8_t *out);

/* 1 when bitsandbytes accepts this block size (32, 64, ..., 4096). */
int nf4_blocksize_ok(int blocksize);

/* A quantized weight. Filled either by nf4_quantize (owns its arrays) or by
 * nf4_weight_load (packed and absmax_code point into the checkpoint's map;
 * the small float arrays are copied); release with nf4_weight_free. */
typedef struct nf4_weight {
    int ndim;
    int64_t shape[ST_MAX_DIMS]; /* shape of the original weight, [out, in] */
    int64_t numel;
    st_dtype dtype;             /* the original dtype: F32, F16 or BF16 */
    int blocksize;              /* elements per absmax block */
    int64_t nblocks;            /* ceil(numel / blocksize) */
    const uint8_t *packed;      /* (numel + 1) / 2 bytes */
    int nested;                 /* 1: double quantization */
    const float *absmax;        /* nblocks fp32 when !nested, else NULL */
    const uint8_t *absmax_code; /* nblocks 8-bit codes when nested */
    int nested_blocksize;       /* 256 */
    int64_t nested_nblocks;     /* ceil(nblocks / 256) */
    const float *nested_absmax; /* nested_nblocks fp32 */
    float nested_offset;        /* the mean that was subtracted */
    float quant_map[16];
    float nested_map[256];
    void *owned_[4]; /* private: what nf4_weight_free frees */
} nf4_weight;

/* Per-block absmax of n elements of src (F32, F16 or BF16) as bitsandbytes'
 * kernel computes it: max |x| over the block, NaNs ignored. absmax must hold
 * ceil(n / blocksize) floats. nthreads <= 0 means all (OpenMP). */
void nf4_block_absmax(const void *src, st_dtype dtype, int64_t n, int blocksize,
                      float *absmax, int nthreads);

/* The mean of x[0..n) exactly as torch's CUDA float32 mean computes it
 * (same summation tree, then sum * (1.0f / n)): the double-quantization
 * offset. */
float nf4_torch_mean(const float *x, int64_t n);

/* Quantizes one weight (src: numel elements of dtype F32, F16 or BF16, of
 * the given shape). nested selects double quantization. 0 ok, -1 on a bad
 * argument (message printed). Free with nf4_weight_free. */
int nf4_quantize(const void *src, st_dtype dtype, int ndim,
                 const int64_t *shape, int blocksize, int nested, int nthreads,
                 nf4_weight *out);
void nf4_weight_free(nf4_weight *w);

/* The fp32 absmax of block b (dequantized when nested). */
float nf4_absmax_of(const nf4_weight *w, int64_t b);

/* Dequantizes elements [first, first + n) into dst as fp32. Round each to
 * BF16/F16 with st_f32_to_bf16/st_f32_to_f16 to get bitsandbytes' result in
 * those dtypes. 0 ok, -1 when out of range. */
int nf4_dequantize(const nf4_weight *w, int64_t first, int64_t n, float *dst);
/* The same for whole rows of a 2-D weight: rows [row0, row0 + nrows) of
 * shape[1] elements each. */
int nf4_dequantize_rows(const nf4_weight *w, int64_t row0, int64_t nrows,
                        float *dst);

/* The quant_state JSON exactly as bitsandbytes writes it (Python's
 * json.dumps): {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
 * "shape": [64, 172], "nested_blocksize": 256, "nested_dtype": "float32",
 * "nested_offset": 0.32861053943634033}. Appended to sb. */
void nf4_quant_state_json(const nf4_weight *w, strbuf *sb);
/* Its length in bytes, known before quantizing: the offset is all that
 * varies. */
size_t nf4_quant_state_len(int ndim, const int64_t *shape, st_dtype dtype,
                           int blocksize, int nested, float offset);

/* The names of the serialized tensors of weight `name` ("X.weight"):
 * suffixes appended to the name. */
#define NF4_SUFFIX_ABSMAX ".absmax"
#define NF4_SUFFIX_QUANT_MAP ".quant_map"
#define NF4_SUFFIX_NESTED_ABSMAX ".nested_absmax"
#define NF4_SUFFIX_NESTED_QUANT_MAP ".nested_quant_map"
#define NF4_SUFFIX_QUANT_STATE ".quant_state.bitsandbytes__nf4"

/* 1 when the checkpoint holds `name` as an NF4 weight (its quant_state
 * tensor exists), else 0. */
int nf4_weight_present(const st_model *m, const char *name);
/* Loads weight `name` of an NF4 checkpoint (every tensor and field checked
 * against the quant_state). 0 ok, -1 with a message. The weight points
 * into m: keep m open while using it. */
int nf4_weight_load(const st_model *m, const char *name, nf4_weight *out);

/* Error statistics of a quantized weight against its source. */
typedef struct nf4_stats {
    float absmax_min, absmax_max; /* over blocks (exact fp32 absmax) */
    double rms;                   /* of the source */
    double err_rms;               /* of (dequantized - source) */
    double rel_err;               /* err_rms / rms (0 when rms is 0) */
    double max_abs_err;
} nf4_stats;
int nf4_error_stats(const void *src, st_dtype dtype, const nf4_weight *w,
                    int nthreads, nf4_stats *st);

/* Python's repr() of a float32 widened to double: the shortest decimal
 * that reads back as the same double ("0.1", "1e-05", "0.32861053943634033",
 * "1.0"). Appended to sb. */
void nf4_append_py_float(strbuf *sb, double v);

/* ---- whole checkpoints ---------------------------------------------- */

/* Options of nf4_quantize_checkpoint. */
typedef struct nf4_ckpt_opts {
    const char *in_dir;        /* Hugging Face Llama checkpoint */
    const char *out_dir;       /* written via io_dir_begin/commit; NULL:
                                  nothing written (statistics only) */
    int blocksize;             /* 64 */
    int nested;                /* double quantization (1) */
    int nthreads;              /* <= 0: all */
    const char *compute_dtype; /* for quantization_config: "bfloat16" ... */
    uint64_t shard_bytes;      /* 0: one file */
    /* Called for each quantized weight when non-NULL, in name order, with
     * its error statistics (computed only then). */
    void (*on_stats)(void *ctx, const char *name, const nf4_weight *w,
                     const nf4_stats *st);
    void *ctx;
} nf4_ckpt_opts;

/* 1 when a tensor of a Llama checkpoint is a decoder-block linear weight
 * (model.layers.N.<self_attn|mlp>.<x>_proj.weight, 2-D): what NF4 quantizes
 * and what transformers replaces by a 4-bit linear layer. */
int nf4_is_block_linear(const char *name, int ndim);

/* Quantizes a checkpoint directory into out_dir: every decoder-block
 * linear weight as NF4 (bitsandbytes' tensor set), every other tensor kept
 * as it is (same dtype, same bytes), tensors in the order save_pretrained
 * writes them, config.json with a quantization_config, tokenizer and
 * generation files copied. Streams weight by weight (two passes when
 * nested: the offsets first, since the header must hold the JSON sizes).
 * 0 ok; -1 with one message and no out_dir left behind. */
int nf4_quantize_checkpoint(const nf4_ckpt_opts *o);

/* The inverse: an NF4 checkpoint to plain tensors, each weight dequantized
 * as bitsandbytes does and rounded to out_dtype (ST_NDTYPES: the weight's
 * own dtype from its quant_state), other tensors copied, the
 * quantization_config dropped from config.json. */
int nf4_dequantize_checkpoint(const char *in_dir, const char *out_dir,
                              st_dtype out_dtype, int nthreads,
                              uint64_t shard_bytes);

#endif
