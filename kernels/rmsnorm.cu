/* rmsnorm.cu: RMSNorm forward and backward (frozen weight). One warp per
 * row: rows are a few thousand elements at most, so a warp's 32 lanes
 * with 16-byte loads cover a row in a few steps, and the second pass over
 * the row hits L1. Statistics in fp32, as transformers computes them. */
#include "common.cuh"

__device__ __forceinline__ void load8(float *f, const bf16 *p)
{
    uint4 u = *(const uint4 *)p;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__global__ void rmsnorm_forward_kernel(bf16 *y, float *rstd, const bf16 *x,
                                       const float *w, int64_t n, int d,
                                       float eps)
{
    int64_t t = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (t >= n)
        return;
    const bf16 *xr = x + t * d;
    bf16 *yr = y + t * d;
    float ss = 0.0f;
    bool vec = (d & 7) == 0;
    if (vec) {
        for (int i = lane * 8; i < d; i += 256) {
            float f[8];
            load8(f, xr + i);
#pragma unroll
            for (int j = 0; j < 8; j++)
                ss += f[j] * f[j];
        }
    } else {
        for (int i = lane; i < d; i += 32) {
            float f = __bfloat162float(xr[i]);
            ss += f * f;
        }
    }
    ss = warp_sum(ss);
    float r = rsqrtf(ss / d + eps);
    if (lane == 0 && rstd)
        rstd[t] = r;
    if (vec) {
        for (int i = lane * 8; i < d; i += 256) {
            float f[8];
            load8(f, xr + i);
            uint4 o;
            uint32_t *op = (uint32_t *)&o;
#pragma unroll
            for (int j = 0; j < 4; j++)
                op[j] = pack_bf16x2(f[2 * j] * r * w[i + 2 * j],
                                    f[2 * j + 1] * r * w[i + 2 * j + 1]);
            *(uint4 *)(yr + i) = o;
        }
    } else {
        for (int i = lane; i < d; i += 32)
            yr[i] = __float2bfloat16(__bfloat162float(xr[i]) * r * w[i]);
    }
}

__global__ void rmsnorm_backward_kernel(float *dx, bf16 *dxb, const float *dy,
                                        const bf16 *x, const float *w,
                                        const float *rstd, int64_t n, int d,
                                        int accumulate, int vec)
{
    int64_t t = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (t >= n)
        return;
    const bf16 *xr = x + t * d;
    const float *gr = dy + t * d;
    float *dr = dx + t * d;
    bf16 *db = dxb ? dxb + t * d : NULL;
    float r = rstd[t];
    float dot = 0.0f;
    if (vec) { /* 8 elements a lane: 16-byte bf16, 32-byte fp32 accesses */
        for (int i = lane * 8; i < d; i += 256) {
            float f[8];
            load8(f, xr + i);
            float4 g0 = *(const float4 *)(gr + i), g1 = *(const float4 *)(gr + i + 4);
            float4 w0 = *(const float4 *)(w + i), w1 = *(const float4 *)(w + i + 4);
            dot += w0.x * g0.x * f[0] + w0.y * g0.y * f[1] + w0.z * g0.z * f[2] +
                   w0.w * g0.w * f[3] + w1.x * g1.x * f[4] + w1.y * g1.y * f[5] +
                   w1.z * g1.z * f[6] + w1.w * g1.w * f[7];
        }
        dot = warp_sum(dot) * r / d;
        for (int i = lane * 8; i < d; i += 256) {
            float f[8], gv[8], wv[8], o[8];
            load8(f, xr + i);
            *(float4 *)gv = *(const float4 *)(gr + i);
            *(float4 *)(gv + 4) = *(const float4 *)(gr + i + 4);
            *(float4 *)wv = *(const float4 *)(w + i);
            *(float4 *)(wv + 4) = *(const float4 *)(w + i + 4);
            if (accumulate) {
                *(float4 *)o = *(const float4 *)(dr + i);
                *(float4 *)(o + 4) = *(const float4 *)(dr + i + 4);
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float g = r * (wv[j] * gv[j] - f[j] * r * dot);
                o[j] = accumulate ? o[j] + g : g;
            }
            *(float4 *)(dr + i) = *(float4 *)o;
            *(float4 *)(dr + i + 4) = *(float4 *)(o + 4);
            if (db) {
                uint4 u;
                uint32_t *up = (uint32_t *)&u;
#pragma unroll
                for (int j = 0; j < 4; j++)
                    up[j] = pack_bf16x2(o[2 * j], o[2 * j + 1]);
                *(uint4 *)(db + i) = u;
            }
        }
        return;
    }
    for (int i = lane; i < d; i += 32)
        dot += w[i] * gr[i] * __bfloat162float(xr[i]);
    dot = warp_sum(dot) * r / d;   /* mean(w dy xh) */
    for (int i = lane; i < d; i += 32) {
        float xh = __bfloat162float(xr[i]) * r;
        float g = r * (w[i] * gr[i] - xh * dot);
        g = accumulate ? dr[i] + g : g;
        dr[i] = g;
        if (db)
            db[i] = __float2bfloat16(g);
    }
}

extern "C" void kn_rmsnorm_forward(kn_bf16 *y, float *rstd, const kn_bf16 *x,
                                   const float *w, int64_t n, int d,
                                   float eps, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && d > 0 && eps >= 0.0f);
    if (!n)
        return;
    rmsnorm_forward_kernel<<<kn_cdiv(n, 8), 256, 0, s>>>((bf16 *)y, rstd, (const bf16 *)x, w, n, d, eps);
    KN_CHECK_LAUNCH("rmsnorm_forward");
}

extern "C" void kn_rmsnorm_backward(float *dx, kn_bf16 *dx_bf16,
                                    const float *dy, const kn_bf16 *x,
                                    const float *w, const float *rstd,
                                    int64_t n, int d, int accumulate,
                                    cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && d > 0 && rstd);
    if (!n)
        return;
    /* vectorised when rows are whole 16-byte bf16 / 32-byte fp32 groups */
    int vec = d % 8 == 0 && ((uintptr_t)dx & 31) == 0 && ((uintptr_t)dy & 31) == 0 &&
              ((uintptr_t)w & 31) == 0 && ((uintptr_t)x & 15) == 0 &&
              ((uintptr_t)dx_bf16 & 15) == 0;
    rmsnorm_backward_kernel<<<kn_cdiv(n, 8), 256, 0, s>>>(dx, (bf16 *)dx_bf16, dy, (const bf16 *)x, w, rstd, n, d, accumulate, vec);
    KN_CHECK_LAUNCH("rmsnorm_backward");
}
