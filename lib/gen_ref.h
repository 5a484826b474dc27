/* gen_ref.h: CPU references for lora-gen's decoding kernels
 * (kernels/gen_kernels.h), written for clarity and accumulated in double:
 * what tests/gpu/gen.c compares the kernels against. The rest of a step
 * (RMSNorm, RoPE, SwiGLU) is llama_cpu.c's own functions.
 */
#ifndef GEN_REF_H
#define GEN_REF_H

#include <stdint.h>

/* y (n, out) = res + alpha * x (n, in) w (out, in)^T; res may be NULL or
 * y; rows of x, y and res have strides ldx, ldy. */
void gen_ref_linear(float *y, const float *res, int64_t ldy, const float *x,
                    int64_t ldx, const float *w, int64_t out, int64_t in,
                    int64_t n, float alpha);

/* One token's attention over a cache: q (nh*hd), positions 0..p of k and v
 * (rows of nkv*hd), scale 1/sqrt(hd), grouped-query heads; o (nh*hd). */
void gen_ref_attention(float *o, const float *q, const float *k, const float *v,
                       int32_t p, int nh, int nkv, int hd);

#endif
