/* cast.cu: fp32 <-> bf16 conversions, between the fp32 gradients that
 * products accumulate and the bf16 operands the next product reads. */
#include "common.cuh"

__global__ void cast_f32_bf16_kernel(bf16 *out, const float *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(x[i]);
}

__global__ void cast_bf16_f32_kernel(float *out, const bf16 *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(x[i]);
}

extern "C" void kn_cast_f32_bf16(kn_bf16 *out, const float *x, int64_t n,
                                 cudaStream_t s)
{
    KN_REQUIRE(n >= 0);
    if (!n)
        return;
    cast_f32_bf16_kernel<<<kn_grid_1d(n, 256), 256, 0, s>>>((bf16 *)out, x, n);
    KN_CHECK_LAUNCH("cast_f32_bf16");
}

extern "C" void kn_cast_bf16_f32(float *out, const kn_bf16 *x, int64_t n,
                                 cudaStream_t s)
{
    KN_REQUIRE(n >= 0);
    if (!n)
        return;
    cast_bf16_f32_kernel<<<kn_grid_1d(n, 256), 256, 0, s>>>(out, (const bf16 *)x, n);
    KN_CHECK_LAUNCH("cast_bf16_f32");
}
