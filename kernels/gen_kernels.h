/* gen_kernels.h: the kernels of lora-gen's GPU path (kernels/nf4_gemv.cu,
 * kernels/decode_attn.cu, kernels/gen_ops.cu), as plain C functions for
 * kernels/gen_gpu.cu and the kernel test tests/gpu/gen.c. Conventions as
 * in kernels.h (row-major, device pointers, the stream last, launchers
 * assert their shapes and check the launch). CPU references: lib/gen_ref.h
 * and lib/llama_cpu.c.
 *
 * Decoding works on a handful of tokens at a time (one per sequence in
 * flight), which makes every product a matrix-vector product in disguise:
 * memory-bound, so weights are read once, in their stored form, by
 * kernels that dequantize in registers.
 */
#ifndef GEN_KERNELS_H
#define GEN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* --- products for decoding (nf4_gemv.cu) ---------------------------------
 * A frozen weight W (out, in) in one of three forms. */
enum { KN_GW_F32 = 0, KN_GW_BF16 = 1, KN_GW_NF4 = 2 };

typedef struct kn_gw {
    int kind;
    int64_t out, in;
    int64_t ld;           /* BF16: elements between rows, in rounded up to
                             a multiple of 64, the padding zero */
    const float *f32;     /* F32: (out, in) */
    const kn_bf16 *bf16;  /* BF16: (out, ld) */
    kn_nf4 q;             /* NF4: in % 64 == 0, blocksize a multiple of 64 */
} kn_gw;

/* Up to three products that share one input x (q/k/v, gate/up), in one
 * launch: y_i (n, out_i) = res_i + x (n, in) W_i^T, y_i and res_i fp32
 * with row stride ldy_i (res_i may be NULL, or y_i itself: accumulate).
 * Tensor cores (mma.sync bf16, fp32 accumulation): x is bf16 (row stride
 * ldx), W_i BF16 or NF4 with in % 4 == 0 (NF4: out * in < 2^31; BF16:
 * out * ld < 2^30, offsets are 32-bit); n <= 64 (larger n: call again
 * with x and y advanced). Each output element is summed in an order that
 * depends only on the weight's shape, never on n or on the other rows of
 * x. ws: a device workspace of kn_gen_linear_mma_ws bytes, zeroed once
 * before its first use (the kernels leave it zeroed), shared by every
 * launch of at most those sizes; small products with n > 16 split their
 * sums across blocks through it (NULL: no split, the same bits). */
typedef struct kn_gen_lin {
    kn_gw w;
    float *y;
    const float *res;
    int64_t ldy;
} kn_gen_lin;

void kn_gen_linear_mma(const kn_gen_lin *ops, int nops, const kn_bf16 *x,
                       int64_t ldx, int n, void *ws, size_t ws_bytes,
                       cudaStream_t s);
size_t kn_gen_linear_mma_ws(const kn_gen_lin *ops, int nops, int n);

/* y (n, out) = res + alpha * x (n, in) W^T on CUDA cores in fp32, W F32
 * (out, in), x fp32 (x16 NULL) or bf16 (x32 NULL), in % 4 == 0; res may be
 * NULL or y. Any n; each element's order depends only on in. */
void kn_gen_linear_f32(float *y, const float *res, int64_t ldy,
                       const float *x32, const kn_bf16 *x16, int64_t ldx,
                       const float *w, int64_t out, int64_t in, int n,
                       float alpha, cudaStream_t s);

/* --- attention over the key/value caches (decode_attn.cu) ----------------
 * Caches: K and V of one layer, (slots, cap, nkv * hd), fp32 or bf16
 * (cache_bf16). Token t belongs to slot[t] and sits at position pos[t]. */

/* RoPE and the cache append, for n tokens: q (n, ldq; heads nh*hd from
 * column 0) and k (n, ldk), v (n, ldv) rows; q and k are rotated with the
 * tables cos/sin (cap, hd/2) (llama_rope's values, computed on the host),
 * then k and v are written into the caches at (slot[t], pos[t]). q16, k16,
 * v16 (may be NULL) receive bf16 copies of the rotated q, k and of v, rows
 * of nh*hd, nkv*hd, nkv*hd (the flash attention's inputs for a prefill);
 * q and k are rotated in place only where their copy is NULL (otherwise
 * left as they were). */
void kn_gen_rope_append(float *q, int64_t ldq, float *k, int64_t ldk,
                        const float *v, int64_t ldv, void *kc, void *vc,
                        int cache_bf16, const int32_t *slot,
                        const int32_t *pos, int n, int nh, int nkv, int hd,
                        int cap, const float *cos_t, const float *sin_t,
                        kn_bf16 *q16, kn_bf16 *k16, kn_bf16 *v16,
                        cudaStream_t s);

/* o (n, nh*hd) = softmax(q k^T / sqrt(hd)) v over cache positions
 * 0 .. pos[t] of slot[t], per head (grouped-query: head h reads kv head
 * h / (nh / nkv)). Writes o32 (fp32) and/or o16 (bf16) (either may be
 * NULL). hd % 4 == 0, hd <= 128; pos[t] < cap. ws: device scratch of
 * kn_gen_attention_ws(n, nh, hd, cap) bytes (the splits' partial results;
 * the order of the sums depends on cap, never on n). */
void kn_gen_attention(float *o32, kn_bf16 *o16, const float *q, int64_t ldq,
                      const void *kc, const void *vc, int cache_bf16,
                      const int32_t *slot, const int32_t *pos, int n, int nh,
                      int nkv, int hd, int cap, float *ws, cudaStream_t s);
size_t kn_gen_attention_ws(int n, int nh, int hd, int cap);
/* Kept for callers: nothing to set up any more. */
void kn_gen_attention_setup(int cap);

/* RoPE, the cache append and attention in one launch, for decoding (each
 * token's slot at most once in a call; bf16 caches; hd 8, 16, 32, 64 or
 * 128: kn_gen_rope_attention_ok): q (rows of ldq, heads from column 0) and
 * the new k and v rows (ldk, ldv; unrotated, fp32) of n tokens; k is
 * rotated and k, v rounded to bf16 and written into the caches at
 * (slot[t], pos[t]) as kn_gen_rope_append does; q is rotated in registers
 * (q itself is left as it was). o as kn_gen_attention (o32 and/or o16).
 * ws: kn_gen_rope_attention_ws(n, nh, hd, cap) bytes, zeroed once before
 * its first use (the kernel leaves its counters at zero), serving calls of
 * one (nh, hd, cap) and up to that n. The order of every sum depends on
 * pos[t] only, never on n. */
int kn_gen_rope_attention_ok(int hd);
void kn_gen_rope_attention(float *o32, kn_bf16 *o16, const float *q, int64_t ldq,
                           const float *k, int64_t ldk, const float *v, int64_t ldv, void *kc,
                           void *vc, const int32_t *slot, const int32_t *pos, int n, int nh,
                           int nkv, int hd, int cap, const float *cos_t, const float *sin_t,
                           float *ws, cudaStream_t s);
size_t kn_gen_rope_attention_ws(int n, int nh, int hd, int cap);

/* --- element-wise (gen_ops.cu) --------------------------------------------- */

/* x (n, d) = table[ids[t]] (fp32 table (vocab, d)). */
void kn_gen_embed(float *x, const float *table, const int32_t *ids, int n,
                  int d, cudaStream_t s);
/* Row r of the output = RMSNorm of row rows[r] of x (rows NULL: row r), as
 * llama_rmsnorm: w * (x * rsqrt(mean(x^2) + eps)), into y32 (fp32) and/or
 * y16 (bf16), row stride d. */
void kn_gen_rmsnorm(float *y32, kn_bf16 *y16, const float *x,
                    const int32_t *rows, const float *w, int n, int d,
                    float eps, cudaStream_t s);
/* h = silu(g) * u over n rows of d (g, u with row stride ldgu), into h32
 * and/or h16 (row stride d). */
void kn_gen_swiglu(float *h32, kn_bf16 *h16, const float *g, const float *u,
                   int64_t ldgu, int n, int d, cudaStream_t s);
/* out[r] = the first index of the largest of x[r][0 .. limit) (row stride
 * ld), NaN never winning, for n rows. */
void kn_gen_argmax(int32_t *out, const float *x, int64_t ld, int limit, int n,
                   cudaStream_t s);

#ifdef __cplusplus
}
#endif

#endif
