/* adamw.cu: the optimizer step and the global gradient norm. The norm is
 * reduced on the device and read by the update on the device, so clipping
 * needs no host synchronisation; the host reads it only to log it. */
#include "common.cuh"

__global__ void sumsq_kernel(float *out, const float *x, int64_t n)
{
    __shared__ float sh[32];
    float acc = 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        atomicAdd(out, acc);
}

extern "C" void kn_sumsq(float *out, const float *x, int64_t n, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && out && x);
    if (!n)
        return;
    sumsq_kernel<<<kn_grid_1d(n, 256), 256, 0, s>>>(out, x, n);
    KN_CHECK_LAUNCH("sumsq");
}

__global__ void adamw_kernel(float *p, bf16 *pb, float *m, float *v,
                             const float *g, int64_t n, kn_adamw h,
                             const float *norm_sq)
{
    float clip = 1.0f;
    if (h.max_grad_norm > 0.0f && norm_sq) {
        float c = h.max_grad_norm / (sqrtf(*norm_sq) + 1e-6f);
        clip = c < 1.0f ? c : 1.0f;
    }
    float bc1 = 1.0f - powf(h.beta1, (float)h.step);
    float bc2 = 1.0f - powf(h.beta2, (float)h.step);
    float step_size = h.lr / bc1;
    float bc2_sqrt = sqrtf(bc2);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float gi = g[i] * clip;
        float pi = p[i] * (1.0f - h.lr * h.weight_decay);
        float mi = m[i] + (1.0f - h.beta1) * (gi - m[i]);
        float vi = h.beta2 * v[i] + (1.0f - h.beta2) * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + h.eps;
        pi -= step_size * mi / denom;
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
    KN_REQUIRE(h->max_grad_norm <= 0.0f || norm_sq);
    if (!n)
        return;
    adamw_kernel<<<kn_grid_1d(n, 256), 256, 0, s>>>(p, (bf16 *)p_bf16, m, v, g, n, *h, norm_sq);
    KN_CHECK_LAUNCH("adamw");
}
