/* adamw.cu: the optimizer step and the global gradient norm. The norm is
 * reduced on the device and read by the update on the device, so clipping
 * needs no host synchronisation; the host reads it only to log it. */
#include "common.cuh"

/* The sum of squares is deterministic: each block writes its partial sum,
 * and the last block to finish (a ticket taken after a fence) adds the
 * partials in block order. atomicAdd of the partials into *out, as before,
 * made the order, and so the last bits, vary from run to run; the norm
 * sets the clipping factor of every parameter's update, so under data
 * parallelism each rank clipped its (identical, all-reduced) gradient
 * by a slightly different factor and the ranks' adapters drifted apart
 * (lora-train --gpus: "the ranks ended with different adapters"). The
 * grid depends on n alone (not on the device's SM count), so every rank
 * and run sums in the same order. The partials and the ticket are global
 * per device: calls must not overlap on concurrent streams (the trainer
 * makes one per step, on its stream). */
#define SUMSQ_MAX_BLOCKS 1024
__device__ float sumsq_part[SUMSQ_MAX_BLOCKS];
__device__ unsigned int sumsq_ticket;

__global__ void sumsq_kernel(float *out, const float *x, int64_t n)
{
    __shared__ float sh[32];
    __shared__ int last;
    float acc = 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) {
        sumsq_part[blockIdx.x] = acc;
        __threadfence();
        /* wraps to 0 after the last block: ready for the next launch */
        last = atomicInc(&sumsq_ticket, gridDim.x - 1) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    const volatile float *part = sumsq_part;
    float t = 0.0f;
    for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
        t += part[b];
    t = block_sum(t, sh);
    if (threadIdx.x == 0)
        *out += t;
}

extern "C" void kn_sumsq(float *out, const float *x, int64_t n, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && out && x);
    if (!n)
        return;
    int64_t g = (n + 255) / 256;
    sumsq_kernel<<<(int)(g < SUMSQ_MAX_BLOCKS ? g : SUMSQ_MAX_BLOCKS), 256, 0, s>>>(out, x, n);
    KN_CHECK_LAUNCH("sumsq");
}

/* The per-element arithmetic of lib/adamw.c (fp32, same order); the bias
 * corrections in double on the host, as there. */
typedef struct adamw_coef {
    float decay, w1, b2, w2, step_size, bc2_sqrt, eps, max_norm;
    int decay_on;
} adamw_coef;

__global__ void adamw_kernel(float *p, bf16 *pb, float *m, float *v,
                             const float *g, int64_t n, adamw_coef c,
                             const float *norm_sq)
{
    float clip = 1.0f;
    if (c.max_norm > 0.0f) {
        float coef = c.max_norm / (sqrtf(*norm_sq) + 1e-6f);
        clip = coef < 1.0f ? coef : 1.0f;
    }
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float gi = clip < 1.0f ? g[i] * clip : g[i];
        float pi = c.decay_on ? p[i] * c.decay : p[i];
        float mi = m[i] + c.w1 * (gi - m[i]);
        float vi = v[i] * c.b2 + c.w2 * gi * gi;
        float denom = sqrtf(vi) / c.bc2_sqrt + c.eps;
        pi -= c.step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (pb)
            pb[i] = __float2bfloat16(pi);
    }
}

extern "C" void kn_adamw_step(float *p, kn_bf16 *p_bf16, float *m, float *v,
                              const float *g, int64_t n, const kn_adamw *h,
                              const float *norm_sq, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && h && h->step >= 1 && p && m && v && g);
    KN_REQUIRE(h->max_grad_norm <= 0.0 || norm_sq);
    if (!n)
        return;
    double bc1 = 1.0 - pow(h->beta1, (double)h->step);
    double bc2 = 1.0 - pow(h->beta2, (double)h->step);
    adamw_coef c;
    c.decay = (float)(1.0 - h->lr * h->weight_decay);
    c.decay_on = h->weight_decay != 0.0;
    c.w1 = (float)(1.0 - h->beta1);
    c.b2 = (float)h->beta2;
    c.w2 = (float)(1.0 - h->beta2);
    c.step_size = (float)(h->lr / bc1);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.eps = (float)h->eps;
    c.max_norm = (float)h->max_grad_norm;
    adamw_kernel<<<kn_grid_1d(n, 256), 256, 0, s>>>(p, (bf16 *)p_bf16, m, v, g, n, c, norm_sq);
    KN_CHECK_LAUNCH("adamw");
}
