/* kernels.h: the CUDA kernels as plain C functions, for lora-train,
 * lora-gen and the kernel tests (tests/gpu).
 *
 * Every kernel has a CPU reference in lib/ computing the same function
 * (llama_cpu.c, lora.c, adamw.c, or ops_ref.c for the pieces those do not
 * expose one by one) and a test under tests/gpu comparing the two.
 *
 * Conventions, once for all:
 *   - Matrices are row-major. A token batch is a flat list of n tokens
 *     (packed rows laid end to end), as in llama.h: token t has the RoPE
 *     position pos[t] and attends to tokens start[t] .. t, start[t] being
 *     start[t-1] or t.
 *   - kn_bf16 is a bfloat16 stored as its 16 bits. Activations that feed
 *     matrix products are bf16; reductions, norms, losses, gradients that
 *     are accumulated, and the optimizer state are fp32.
 *   - All pointers are device pointers unless a comment says host. Every
 *     launcher takes the stream last, asserts its shapes (exit 2 on a
 *     violated contract: a programming error) and checks the launch.
 *   - A failing CUDA or cuBLAS call prints "call: error (file:line, device
 *     N name)" on stderr and exits 2, as xmalloc does on the host: there is
 *     nothing sensible to return to mid-step.
 */
#ifndef KERNELS_H
#define KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t kn_bf16;

/* --- device (device.cu) ------------------------------------------------- */

/* Number of usable CUDA devices; 0 when there is no driver or no device
 * (never fails, never prints): the tools then take the CPU path. */
int kn_device_count(void);
/* Selects device dev for this thread and reads its properties. Prints the
 * error and returns -1 when it cannot be used. */
int kn_init(int dev);
/* Properties of the current device (after kn_init). */
int kn_sm_count(void);
size_t kn_smem_optin(void);      /* largest dynamic shared memory per block */
const char *kn_device_name(void);
/* Device memory through one counter: every allocation of the kernels and
 * of the training path goes through these, so peak use is known. */
void *kn_malloc(size_t bytes);   /* exits 2 when the device is out of memory */
void kn_free(void *p);
size_t kn_mem_current(void);     /* bytes allocated now through kn_malloc */
size_t kn_mem_peak(void);        /* the most ever allocated at once */
void kn_mem_reset_peak(void);
/* Bytes the device has in use by anyone (cudaMemGetInfo), and its total. */
void kn_mem_device(size_t *used, size_t *total);
void kn_memcpy_h2d(void *dst, const void *src, size_t bytes, cudaStream_t s);
/* Waits for the copy (and so for everything queued before it on s). */
void kn_memcpy_d2h(void *dst, const void *src, size_t bytes, cudaStream_t s);
void kn_memset(void *p, int byte, size_t bytes, cudaStream_t s);
void kn_stream_sync(cudaStream_t s);

/* --- matrix products (gemm.cu): the one cuBLASLt wrapper ----------------
 * Row-major, as everything here:
 *     C (m, n) = alpha * op(A) (m, k) . op(B) (k, n) + beta * C
 * op(A) = A when ta == 0, A stored (m, k) with leading dimension lda
 *         (elements between rows); A^T when ta == 1, A stored (k, m).
 * op(B) likewise with tb: B stored (k, n), or (n, k) when tb == 1.
 * So a linear layer y = x W^T with W (out, in) is
 *     kn_gemm(0, 1, n, out, in, 1, x, in, W, in, 0, y, KN_BF16, out, s).
 * A and B are bf16; C is bf16 or fp32 (KN_F32); the products accumulate in
 * fp32. D = C unless kn_gemm_ex gives a separate output D (same type and
 * leading dimension as C): D = alpha op(A) op(B) + beta C. */
typedef enum { KN_BF16, KN_F32 } kn_dtype;

void kn_gemm(int ta, int tb, int m, int n, int k, float alpha,
             const kn_bf16 *A, int lda, const kn_bf16 *B, int ldb,
             float beta, void *C, kn_dtype ct, int ldc, cudaStream_t s);
void kn_gemm_ex(int ta, int tb, int m, int n, int k, float alpha,
                const kn_bf16 *A, int lda, const kn_bf16 *B, int ldb,
                float beta, const void *C, void *D, kn_dtype ct, int ldc,
                cudaStream_t s);

/* --- NF4 (nf4.cu) ------------------------------------------------------- */

/* One NF4 weight on the device, in bitsandbytes' layout (REFERENCE.md §3).
 * Element e of the row-major weight is code (e even: high nibble of
 * codes[e/2], odd: low nibble); its block b = e / blocksize has the scale
 *     absmax[b]                                            (no double quant)
 *     nested_map[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset
 * and the value quant_map[code] * scale, rounded to bf16. */
typedef struct kn_nf4 {
    int64_t numel;
    int32_t blocksize;             /* 64 */
    int32_t nested_blocksize;      /* 256 */
    const uint8_t *codes;          /* (numel/2) */
    const float *absmax;           /* (nblocks) fp32 scales, or NULL */
    const uint8_t *absmax_q;       /* (nblocks) 8-bit scale codes, or NULL */
    const float *nested_absmax;    /* (ceil(nblocks/nested_blocksize)) */
    const float *nested_map;       /* (256) */
    const float *quant_map;        /* (16) */
    float offset;                  /* nested_offset */
} kn_nf4;

/* out (numel) = the weight as bf16. numel must be even. */
void kn_nf4_dequant(kn_bf16 *out, const kn_nf4 *w, cudaStream_t s);

/* --- element-wise helpers (cast.cu) -------------------------------------- */

void kn_cast_f32_bf16(kn_bf16 *out, const float *x, int64_t n, cudaStream_t s);
void kn_cast_bf16_f32(float *out, const kn_bf16 *x, int64_t n, cudaStream_t s);

/* --- embedding (embedding.cu) ------------------------------------------- */

/* out (n, d) = table[ids[t]] for t < n; table (vocab, d) bf16. Ids are
 * trusted (checked on the host: llama_batch_check). */
void kn_embedding_forward(kn_bf16 *out, const kn_bf16 *table,
                          const int32_t *ids, int64_t n, int d,
                          cudaStream_t s);

/* --- RMSNorm (rmsnorm.cu) ------------------------------------------------
 * Forward: rstd[t] = 1 / sqrt(mean_i x[t,i]^2 + eps) in fp32,
 * y[t,i] = bf16(x[t,i] * rstd[t] * w[i]). rstd may be NULL.
 * Backward (w frozen: no weight gradient), with xh = x * rstd:
 *     dx[t,i] (+)= rstd[t] * (w[i] dy[t,i] - xh[t,i] * mean_j(w[j] dy[t,j] xh[t,j]))
 * accumulating into dx when accumulate is set; dx may be dy (in place).
 * dx_bf16 (may be NULL) also receives the resulting dx rounded to bf16,
 * the operand of the next product. */
void kn_rmsnorm_forward(kn_bf16 *y, float *rstd, const kn_bf16 *x,
                        const float *w, int64_t n, int d, float eps,
                        cudaStream_t s);
void kn_rmsnorm_backward(float *dx, kn_bf16 *dx_bf16, const float *dy,
                         const kn_bf16 *x, const float *w, const float *rstd,
                         int64_t n, int d, int accumulate, cudaStream_t s);

/* --- RoPE (rope.cu) ------------------------------------------------------
 * In place on x (n, nh * hd): rotate_half RoPE of every head vector of
 * token t at position pos[t], inv_freq[i] = theta^(-2i/hd) as llama_rope
 * computes it. The backward is the inverse rotation (the transpose). */
void kn_rope_forward(kn_bf16 *x, const int32_t *pos, int64_t n, int nh,
                     int hd, float theta, cudaStream_t s);
void kn_rope_backward(kn_bf16 *dx, const int32_t *pos, int64_t n, int nh,
                      int hd, float theta, cudaStream_t s);
/* The (cos, sin) pairs of every token's positions, (n, hd / 2) fp32, as
 * kn_rope_forward computes them (for kn_attention_backward_rope). */
void kn_rope_table(float *tab, const int32_t *pos, int64_t n, int hd, float theta,
                   cudaStream_t s);

/* --- SwiGLU (swiglu.cu) --------------------------------------------------
 * h = silu(g) * u element-wise over n; the backward gives
 * dg = dh * u * silu'(g) and du = dh * silu(g). */
void kn_swiglu_forward(kn_bf16 *h, const kn_bf16 *g, const kn_bf16 *u,
                       int64_t n, cudaStream_t s);
void kn_swiglu_backward(kn_bf16 *dg, kn_bf16 *du, const kn_bf16 *dh,
                        const kn_bf16 *g, const kn_bf16 *u, int64_t n,
                        cudaStream_t s);

/* --- attention (attention.cu) --------------------------------------------
 * Flash attention over a flat batch of n tokens: q (n, nh*hd), k and v
 * (n, nkv*hd) (grouped-query: q head h reads kv head h / (nh / nkv)),
 * token t attending to start[t] .. t, scale 1 / sqrt(hd). Tiled: memory is
 * linear in n; bf16 tensor cores, fp32 softmax. hd <= 128, even.
 * Forward writes o (n, nh*hd) and lse (nh, n), the log-sum-exp of each
 * row's scaled scores, which the backward needs. The backward writes dq,
 * dk, dv (overwriting) and uses delta (nh, n floats) as scratch.
 * KN_ATTN_FWD_V1=1 in the environment selects the first forward kernel
 * (64 queries a block), kept for timing comparisons.
 * kn_attention_backward_ws takes a workspace (ws_bytes its size; contents
 * need not be kept) for the one-pass backward, which runs when it holds
 * kn_attention_backward_ws_bytes(n, nh, hd) bytes (an fp32 dq and
 * counters) and KN_ATTN_BWD_1PASS=1 (opt-in: slower on an H100; dq added
 * in a fixed order, deterministic); otherwise, or with
 * KN_ATTN_BWD_2PASS=1, the two-pass one, as kn_attention_backward. */
void kn_attention_forward(kn_bf16 *o, float *lse, const kn_bf16 *q,
                          const kn_bf16 *k, const kn_bf16 *v,
                          const int32_t *start, int64_t n, int nh, int nkv,
                          int hd, cudaStream_t s);
void kn_attention_backward(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv,
                           float *delta, const kn_bf16 *dout,
                           const kn_bf16 *q, const kn_bf16 *k,
                           const kn_bf16 *v, const kn_bf16 *o,
                           const float *lse, const int32_t *start, int64_t n,
                           int nh, int nkv, int hd, cudaStream_t s);
size_t kn_attention_backward_ws_bytes(int64_t n, int nh, int hd);
void kn_attention_backward_ws(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv,
                              float *delta, const kn_bf16 *dout,
                              const kn_bf16 *q, const kn_bf16 *k,
                              const kn_bf16 *v, const kn_bf16 *o,
                              const float *lse, const int32_t *start,
                              int64_t n, int nh, int nkv, int hd, void *ws,
                              size_t ws_bytes, cudaStream_t s);
/* As kn_attention_backward_ws, then dq and dk rotated back (RoPE's
 * backward, rope = kn_rope_table of pos) as they are stored: the same bits
 * as kn_attention_backward_ws followed by kn_rope_backward on dq and dk. */
void kn_attention_backward_rope(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv, float *delta,
                                const kn_bf16 *dout, const kn_bf16 *q, const kn_bf16 *k,
                                const kn_bf16 *v, const kn_bf16 *o, const float *lse,
                                const int32_t *start, int64_t n, int nh, int nkv, int hd,
                                void *ws, size_t ws_bytes, const float *rope,
                                const int32_t *pos, float theta, cudaStream_t s);

/* --- cross-entropy fused with the output projection (xent.cu) ------------
 * For the n rows of x (n, d) and the head w (vocab, d): logits = x w^T,
 * computed `chunk` rows at a time into the caller's scratch (at least
 * kn_xent_scratch_bytes(chunk, vocab) bytes), so the (n, vocab) fp32
 * logits never exist at once. For rows with targets[t] >= 0:
 *     ce[t] = logsumexp(logits[t]) - logits[t][targets[t]]
 *     *loss_sum += sum_t weights[t] * ce[t]        (device fp32, added to)
 * When dx is non-NULL, dx (n, d) (fp32) receives the gradient of
 * grad_scale * sum_t weights[t] * ce[t], overwriting. weights NULL means 1. */
size_t kn_xent_scratch_bytes(int chunk, int vocab);
void kn_xent_forward_backward(float *loss_sum, float *dx, const kn_bf16 *x,
                              const kn_bf16 *w, const int32_t *targets,
                              const float *weights, int64_t n, int d,
                              int vocab, float grad_scale, int chunk,
                              void *scratch, cudaStream_t s);

/* --- LoRA dropout (dropout.cu) -------------------------------------------
 * PEFT applies dropout to the LoRA input: xd = x * keep / (1 - p), where
 * keep(i) is lora_rand_uniform(key, i) >= p of lib/lora.h, key being the
 * stream lora_dropout_stream(batch key, layer, linear) (counter-based, so
 * the backward regenerates the same mask and the CPU reference the same
 * numbers). Element i of x (n, d) is i = t * d + j; the arrays given may
 * be a slice of it starting at element `first` (rows processed in chunks),
 * whose element k then uses keep(first + k). */
void kn_dropout_forward(kn_bf16 *xd, const kn_bf16 *x, int64_t numel,
                        float p, uint64_t key, uint64_t first, cudaStream_t s);
/* dx[k] += keep(first + k) / (1 - p) * g[k]; dx fp32 or bf16 (dt). */
void kn_dropout_backward_add(void *dx, kn_dtype dt, const kn_bf16 *g,
                             int64_t numel, float p, uint64_t key,
                             uint64_t first, cudaStream_t s);

/* --- LoRA products with the dropout fused (lora.cu) ----------------------
 * For a targeted linear with input x (n, in), A (r, in) and the dropout of
 * stream `key` (kn_dropout_forward's: element (t, j) is i = t * in + j,
 * keep(i), inv = 1 / (1 - p)), xd = bf16(keep * x * inv) as there:
 *     kn_lora_down:    lh (n, r) = xd A^T                    (bf16, written)
 *     kn_lora_grad_a:  ga (r, in) += dlh^T xd                (fp32, added)
 *     kn_lora_dx:      dx (n, in) += keep * inv * (dlh A)    (fp32 or bf16,
 *                      the product in fp32, added once)
 * each in one pass over x or dx, with no masked copy in memory (what the
 * unfused path, kn_dropout_* and kn_gemm over row chunks, writes and reads
 * back). Shapes kn_lora_fusable accepts: r in {16, 32, 64, 128}, in a
 * multiple of 64; every pointer 16-byte aligned; arrays whole (the rows
 * 0 .. n-1 of the batch). Long sums are split over blocks and their parts
 * added in a fixed order through `scratch` (kn_lora_scratch_bytes(n, r,
 * in) bytes, shared by down and grad_a; NULL when that is 0), so results
 * are deterministic.
 * bits (kn_lora_bits_bytes(n, in) bytes; may be NULL): kn_lora_down writes
 * the keep bits there (element i: bit i % 8 of byte i / 8), and grad_a and
 * dx given them read the mask instead of computing it (same key, same
 * shapes: the caller's promise). */
int kn_lora_fusable(int r, int64_t in);
size_t kn_lora_scratch_bytes(int64_t n, int r, int64_t in);
size_t kn_lora_bits_bytes(int64_t n, int64_t in);
void kn_lora_down(kn_bf16 *lh, uint8_t *bits, const kn_bf16 *x, const kn_bf16 *A,
                  int64_t n, int in, int r, float p, uint64_t key, void *scratch,
                  cudaStream_t s);
void kn_lora_grad_a(float *ga, const uint8_t *bits, const kn_bf16 *dlh,
                    const kn_bf16 *x, int64_t n, int in, int r, float p,
                    uint64_t key, void *scratch, cudaStream_t s);
void kn_lora_dx(void *dx, kn_dtype dt, const uint8_t *bits, const kn_bf16 *dlh,
                const kn_bf16 *A, int64_t n, int in, int r, float p, uint64_t key,
                cudaStream_t s);
/* kn_lora_grad_a and kn_lora_dx (fp32 dx, added) in one pass over the
 * mask: the same bits as the two calls. */
void kn_lora_grad_a_dx(float *ga, float *dx, const uint8_t *bits, const kn_bf16 *dlh,
                       const kn_bf16 *x, const kn_bf16 *A, int64_t n, int in, int r, float p,
                       uint64_t key, void *scratch, cudaStream_t s);

/* --- optimizer (adamw.cu) ------------------------------------------------ */

/* *out += sum_i x[i]^2 (device fp32; the caller zeroes it per step).
 * Deterministic: the same n and x give the same bits on every device and
 * run (data-parallel ranks clip by it). Calls must not overlap on
 * concurrent streams of one device (one global partial-sum buffer). */
void kn_sumsq(float *out, const float *x, int64_t n, cudaStream_t s);

typedef struct kn_adamw {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;           /* 1 at the first update (bias correction) */
    double max_grad_norm;   /* > 0: clip by the global norm; 0: no clipping */
} kn_adamw;

/* One AdamW update as lib/adamw.c (torch.optim.AdamW) does it, of n fp32
 * parameters p
 * with their fp32 moments m, v, from gradient g scaled by the clipping
 * factor min(1, max_norm / (sqrt(*norm_sq) + 1e-6)) (norm_sq: device fp32,
 * the sum of squares of every gradient in the global norm; ignored when
 * max_grad_norm is 0). p_bf16 (may be NULL) receives p rounded to bf16,
 * the copy the matrix products use. */
void kn_adamw_step(float *p, kn_bf16 *p_bf16, float *m, float *v,
                   const float *g, int64_t n, const kn_adamw *h,
                   const float *norm_sq, cudaStream_t s);

#ifdef __cplusplus
}
#endif

#endif
