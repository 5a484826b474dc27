/* ops_ref.h: per-operation CPU references for the GPU kernels (kernels/),
 * for the operations the model code (llama_cpu.c, lora.c, adamw.c) does
 * not expose one by one. fp32 in and out, accumulating in double, written
 * for clarity, not speed: they are what tests/gpu compares against.
 *
 * Each function computes exactly the function its kernel's contract in
 * kernels/kernels.h states; shapes and conventions are the same (row-major,
 * a flat batch of n tokens, token t attending to start[t] .. t).
 */
#ifndef OPS_REF_H
#define OPS_REF_H

#include <stdint.h>

/* bfloat16 <-> float, round to nearest even (NaN kept quiet). */
static inline uint16_t ops_bf16_from_f32(float f)
{
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((v.u >> 16) | 0x40);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}
static inline float ops_f32_from_bf16(uint16_t h)
{
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}
/* Rounds x through bf16 and back: what a bf16 tensor would hold. */
static inline float ops_round_bf16(float x)
{
    return ops_f32_from_bf16(ops_bf16_from_f32(x));
}

/* dx (n, d) = the RMSNorm input gradient with a frozen weight:
 * rstd[t] * (w*dy - xh * mean(w*dy*xh)), xh = x * rstd[t]. */
void ops_rmsnorm_backward(float *dx, const float *dy, const float *x,
                          const float *w, const float *rstd, int64_t n,
                          int d);

/* h = silu(g) * u; dg = dh * u * silu'(g), du = dh * silu(g). */
void ops_swiglu_forward(float *h, const float *g, const float *u, int64_t n);
void ops_swiglu_backward(float *dg, float *du, const float *dh,
                         const float *g, const float *u, int64_t n);

/* Attention over a flat batch: q (n, nh*hd), k, v (n, nkv*hd), token t
 * attending to start[t] .. t, scale 1/sqrt(hd). o (n, nh*hd); lse (nh, n)
 * may be NULL. The backward recomputes the probabilities and writes dq, dk,
 * dv (overwriting). */
void ops_attention_forward(float *o, float *lse, const float *q,
                           const float *k, const float *v,
                           const int32_t *start, int64_t n, int nh, int nkv,
                           int hd);
void ops_attention_backward(float *dq, float *dk, float *dv,
                            const float *dout, const float *q, const float *k,
                            const float *v, const int32_t *start, int64_t n,
                            int nh, int nkv, int hd);

/* Cross-entropy over logits = x (n, d) . w (vocab, d)^T, for rows with
 * targets[t] >= 0: returns sum_t weights[t] * (lse_t - logit[t][target]),
 * weights NULL = 1. dx (n, d), when non-NULL, receives the gradient of
 * grad_scale times that sum (overwriting). */
double ops_xent(float *dx, const float *x, const float *w,
                const int32_t *targets, const float *weights, int64_t n,
                int d, int vocab, float grad_scale);

/* out (n, d) = table[ids[t]]. */
void ops_embedding(float *out, const float *table, const int32_t *ids,
                   int64_t n, int d);

/* Sum of squares of x (n), in double. */
double ops_sumsq(const float *x, int64_t n);
#endif
