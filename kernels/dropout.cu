/* dropout.cu: PEFT's dropout on the LoRA input, with the counter-based
 * SplitMix64 stream of lib/lora.h: element i is kept when
 *     (splitmix64(stream + (i + 1) * 0x9e3779b97f4a7c15) >> 40) * 2^-24 >= p
 * with stream = lora_dropout_stream(key, layer, linear) (computed on the
 * host; drop_keep in common.cuh). Nothing is stored: the backward
 * regenerates the mask, and the numbers are the CPU reference's bit for
 * bit. Memory-bound: 8 elements a thread (16-byte bf16 accesses) when the
 * pointers allow, one at a time otherwise. The training path uses these
 * only where the fused products of lora.cu do not apply. */
#include "common.cuh"

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

/* n8 groups of 8 elements, 16-byte aligned */
__global__ void dropout_forward8_kernel(bf16 *xd, const bf16 *x, int64_t n8,
                                        float p, float inv, uint64_t stream,
                                        uint64_t first)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint4 u = ((const uint4 *)x)[i], o;
        const bf16 *xv = (const bf16 *)&u;
        bf16 *ov = (bf16 *)&o;
        uint64_t e = first + (uint64_t)i * 8;
#pragma unroll
        for (int j = 0; j < 8; j++)
            ov[j] = drop_keep(stream, e + j, p) ? __float2bfloat16(__bfloat162float(xv[j]) * inv)
                                                : __float2bfloat16(0.0f);
        ((uint4 *)xd)[i] = o;
    }
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

/* n8 groups of 8: g 16-byte aligned, dx 32-byte (fp32) or 16-byte (bf16) */
__global__ void dropout_backward_add8_f32_kernel(float *dx, const bf16 *g, int64_t n8,
                                                 float p, float inv, uint64_t stream,
                                                 uint64_t first)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint4 u = ((const uint4 *)g)[i];
        const bf16 *gv = (const bf16 *)&u;
        float4 d0 = ((const float4 *)dx)[2 * i], d1 = ((const float4 *)dx)[2 * i + 1];
        float *d = (float *)&d0, *e1 = (float *)&d1;
        uint64_t e = first + (uint64_t)i * 8;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float *t = j < 4 ? d + j : e1 + (j - 4);
            if (drop_keep(stream, e + j, p))
                *t = *t + __bfloat162float(gv[j]) * inv;
        }
        ((float4 *)dx)[2 * i] = d0;
        ((float4 *)dx)[2 * i + 1] = d1;
    }
}

__global__ void dropout_backward_add8_bf16_kernel(bf16 *dx, const bf16 *g, int64_t n8,
                                                  float p, float inv, uint64_t stream,
                                                  uint64_t first)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint4 u = ((const uint4 *)g)[i], du = ((const uint4 *)dx)[i];
        const bf16 *gv = (const bf16 *)&u;
        bf16 *dv = (bf16 *)&du;
        uint64_t e = first + (uint64_t)i * 8;
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (drop_keep(stream, e + j, p))
                dv[j] = (bf16)((float)dv[j] + __bfloat162float(gv[j]) * inv);
        ((uint4 *)dx)[i] = du;
    }
}

static int aligned(const void *p, unsigned a) { return ((uintptr_t)p & (a - 1)) == 0; }

extern "C" void kn_dropout_forward(kn_bf16 *xd, const kn_bf16 *x,
                                   int64_t numel, float p, uint64_t key,
                                   uint64_t first, cudaStream_t s)
{
    KN_REQUIRE(numel >= 0 && p >= 0.0f && p < 1.0f);
    if (!numel)
        return;
    float inv = 1.0f / (1.0f - p);
    int64_t n8 = aligned(xd, 16) && aligned(x, 16) ? numel / 8 : 0;
    if (n8) {
        dropout_forward8_kernel<<<kn_grid_1d(n8, 256), 256, 0, s>>>(
            (bf16 *)xd, (const bf16 *)x, n8, p, inv, key, first);
        KN_CHECK_LAUNCH("dropout_forward8");
    }
    int64_t done = n8 * 8;
    if (done < numel) {
        dropout_forward_kernel<<<kn_grid_1d(numel - done, 256), 256, 0, s>>>(
            (bf16 *)xd + done, (const bf16 *)x + done, numel - done, p, inv, key,
            first + (uint64_t)done);
        KN_CHECK_LAUNCH("dropout_forward");
    }
}

extern "C" void kn_dropout_backward_add(void *dx, kn_dtype dt,
                                        const kn_bf16 *g, int64_t numel,
                                        float p, uint64_t key, uint64_t first,
                                        cudaStream_t s)
{
    KN_REQUIRE(numel >= 0 && p >= 0.0f && p < 1.0f);
    if (!numel)
        return;
    float inv = 1.0f / (1.0f - p);
    int64_t n8 = aligned(g, 16) && aligned(dx, dt == KN_F32 ? 32 : 16) ? numel / 8 : 0;
    if (n8) {
        if (dt == KN_F32)
            dropout_backward_add8_f32_kernel<<<kn_grid_1d(n8, 256), 256, 0, s>>>(
                (float *)dx, (const bf16 *)g, n8, p, inv, key, first);
        else
            dropout_backward_add8_bf16_kernel<<<kn_grid_1d(n8, 256), 256, 0, s>>>(
                (bf16 *)dx, (const bf16 *)g, n8, p, inv, key, first);
        KN_CHECK_LAUNCH("dropout_backward_add8");
    }
    int64_t done = n8 * 8;
    if (done == numel)
        return;
    int grid = kn_grid_1d(numel - done, 256);
    if (dt == KN_F32)
        dropout_backward_add_kernel<float><<<grid, 256, 0, s>>>(
            (float *)dx + done, (const bf16 *)g + done, numel - done, p, inv, key,
            first + (uint64_t)done);
    else
        dropout_backward_add_kernel<bf16><<<grid, 256, 0, s>>>(
            (bf16 *)dx + done, (const bf16 *)g + done, numel - done, p, inv, key,
            first + (uint64_t)done);
    KN_CHECK_LAUNCH("dropout_backward_add");
}
