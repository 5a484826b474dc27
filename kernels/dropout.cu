/* dropout.cu: PEFT's dropout on the LoRA input, with the counter-based
 * SplitMix64 stream of lib/lora.h: element i is kept when
 *     (splitmix64(stream + (i + 1) * 0x9e3779b97f4a7c15) >> 40) * 2^-24 >= p
 * with stream = lora_dropout_stream(key, layer, linear) (computed on the
 * host). Nothing is stored: the backward regenerates the mask, and the
 * numbers are the CPU reference's bit for bit. */
#include "common.cuh"

__device__ __forceinline__ bool drop_keep(uint64_t stream, uint64_t i, float p)
{
    uint64_t z = stream + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) >= p;
}

__global__ void dropout_forward_kernel(bf16 *xd, const bf16 *x, int64_t n,
                                       float p, float inv, uint64_t stream,
                                       uint64_t first)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        xd[i] = drop_keep(stream, first + (uint64_t)i, p)
                    ? __float2bfloat16(__bfloat162float(x[i]) * inv)
                    : __float2bfloat16(0.0f);
}

template <typename T>
__global__ void dropout_backward_add_kernel(T *dx, const bf16 *g, int64_t n,
                                            float p, float inv, uint64_t stream,
                                            uint64_t first)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        if (drop_keep(stream, first + (uint64_t)i, p))
            dx[i] = (T)((float)dx[i] + __bfloat162float(g[i]) * inv);
}

extern "C" void kn_dropout_forward(kn_bf16 *xd, const kn_bf16 *x,
                                   int64_t numel, float p, uint64_t key,
                                   uint64_t first, cudaStream_t s)
{
    KN_REQUIRE(numel >= 0 && p >= 0.0f && p < 1.0f);
    if (!numel)
        return;
    dropout_forward_kernel<<<kn_grid_1d(numel, 256), 256, 0, s>>>(
        (bf16 *)xd, (const bf16 *)x, numel, p, 1.0f / (1.0f - p), key, first);
    KN_CHECK_LAUNCH("dropout_forward");
}

extern "C" void kn_dropout_backward_add(void *dx, kn_dtype dt,
                                        const kn_bf16 *g, int64_t numel,
                                        float p, uint64_t key, uint64_t first,
                                        cudaStream_t s)
{
    KN_REQUIRE(numel >= 0 && p >= 0.0f && p < 1.0f);
    if (!numel)
        return;
    int grid = kn_grid_1d(numel, 256);
    float inv = 1.0f / (1.0f - p);
    if (dt == KN_F32)
        dropout_backward_add_kernel<float><<<grid, 256, 0, s>>>(
            (float *)dx, (const bf16 *)g, numel, p, inv, key, first);
    else
        dropout_backward_add_kernel<bf16><<<grid, 256, 0, s>>>(
            (bf16 *)dx, (const bf16 *)g, numel, p, inv, key, first);
    KN_CHECK_LAUNCH("dropout_backward_add");
}
