/* rmsnorm.cu: RMSNorm forward and backward (frozen weight). One warp per
 * row: rows are a few thousand elements at most, so a warp's 32 lanes
 * with 16-byte loads cover a row in a few steps. Statistics in fp32, as
 * transformers computes them.
 *
 * Rows of up to 4096 elements (16-byte groups) are held in registers
 * between the reduction and the output pass: the general kernels read the
 * row twice, and with tens of warps an SM the second read misses L1 and
 * goes back to device memory (the backward moved ~1.1 GB where 0.8 GB is
 * the least, at Llama 2 7B's 12288 x 4096). The backward row needs
 * 96 bytes a lane per group (fp32 dy and bf16 x), so two warps share a row
 * there, the second continuing the first's running sum: every sum is taken
 * in the general kernels' order, so the results are the same bits.
 * KN_RMSNORM_REG=0 in the environment: the general kernels only (for
 * comparisons). */
#include "common.cuh"

#include <stdlib.h>
#include <string.h>

#define RN_MAXG 16 /* 16-byte groups a lane holds: rows up to 32 x 8 x 16 */

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

/* Eight elements i .. i+7 of a row's input gradient from x (f), dy (gv)
 * and the weight (wv): dx = r (w dy - x r dot), added to dr's values when
 * accumulating, and its bf16 copy into db when there is one. */
__device__ __forceinline__ void store_dx8(float *dr, bf16 *db, int i, const float *f,
                                          const float *gv, const float *wv, float r, float dot,
                                          int accumulate)
{
    float o[8];
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
            float f[8], gv[8], wv[8];
            load8(f, xr + i);
            *(float4 *)gv = *(const float4 *)(gr + i);
            *(float4 *)(gv + 4) = *(const float4 *)(gr + i + 4);
            *(float4 *)wv = *(const float4 *)(w + i);
            *(float4 *)(wv + 4) = *(const float4 *)(w + i + 4);
            store_dx8(dr, db, i, f, gv, wv, r, dot, accumulate);
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

/* The forward with the row in registers: lane l holds groups l*8 + 256 k,
 * summed in k order as rmsnorm_forward_kernel does. d % 8 == 0,
 * d <= 256 RN_MAXG. */
__global__ void __launch_bounds__(128)
rmsnorm_forward_reg_kernel(bf16 *y, float *rstd, const bf16 *x, const float *w, int64_t n,
                           int d, float eps)
{
    int64_t t = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (t >= n)
        return;
    const bf16 *xr = x + t * d;
    bf16 *yr = y + t * d;
    uint4 xv[RN_MAXG];
#pragma unroll
    for (int k = 0; k < RN_MAXG; k++)
        if (lane * 8 + 256 * k < d)
            xv[k] = *(const uint4 *)(xr + lane * 8 + 256 * k);
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < RN_MAXG; k++)
        if (lane * 8 + 256 * k < d) {
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&xv[k];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 v = __bfloat1622float2(h[j]);
                ss += v.x * v.x;
                ss += v.y * v.y;
            }
        }
    ss = warp_sum(ss);
    float r = rsqrtf(ss / d + eps);
    if (lane == 0 && rstd)
        rstd[t] = r;
#pragma unroll
    for (int k = 0; k < RN_MAXG; k++) {
        int i = lane * 8 + 256 * k;
        if (i < d) {
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&xv[k];
            float4 w0 = *(const float4 *)(w + i), w1 = *(const float4 *)(w + i + 4);
            float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
            uint4 o;
            uint32_t *op = (uint32_t *)&o;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 v = __bfloat1622float2(h[j]);
                op[j] = pack_bf16x2(v.x * r * wv[2 * j], v.y * r * wv[2 * j + 1]);
            }
            *(uint4 *)(yr + i) = o;
        }
    }
}

/* The backward with the row in registers, two warps a row: the first holds
 * groups k < RN_MAXG / 2 (lane l: elements l*8 + 256 k), the second the
 * rest. Each group's term is the general kernel's expression; the second
 * warp adds its terms to the first's running sum in k order, so the dot is
 * the general kernel's to the bit. 2 rows a block of 128 threads (~170
 * registers a thread: 8 warps an SM, each with 12 KB of loads in flight,
 * enough to keep device memory busy). */
__global__ void __launch_bounds__(128)
rmsnorm_backward_reg_kernel(float *dx, bf16 *dxb, const float *dy, const bf16 *x,
                            const float *w, const float *rstd, int64_t n, int d,
                            int accumulate)
{
    constexpr int HG = RN_MAXG / 2;
    __shared__ float part[2][32], sdot[2];
    const int pair = threadIdx.x >> 6, half = (threadIdx.x >> 5) & 1, lane = threadIdx.x & 31;
    const int64_t t = blockIdx.x * (int64_t)2 + pair;
    const bool live = t < n;
    const int64_t tt = live ? t : 0;
    const bf16 *xr = x + tt * d;
    const float *gr = dy + tt * d;
    float *dr = dx + tt * d;
    bf16 *db = dxb ? dxb + tt * d : NULL;
    uint4 xv[HG];
    float4 g0[HG], g1[HG];
#pragma unroll
    for (int k = 0; k < HG; k++) {
        int i = lane * 8 + 256 * (k + HG * half);
        if (live && i < d) {
            xv[k] = *(const uint4 *)(xr + i);
            g0[k] = *(const float4 *)(gr + i);
            g1[k] = *(const float4 *)(gr + i + 4);
        }
    }
    float r = live ? rstd[tt] : 0.0f;
    float term[HG];
#pragma unroll
    for (int k = 0; k < HG; k++) {
        int i = lane * 8 + 256 * (k + HG * half);
        term[k] = 0.0f;
        if (live && i < d) {
            float f[8];
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&xv[k];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 v = __bfloat1622float2(h[j]);
                f[2 * j] = v.x;
                f[2 * j + 1] = v.y;
            }
            float4 w0 = *(const float4 *)(w + i), w1 = *(const float4 *)(w + i + 4);
            term[k] = w0.x * g0[k].x * f[0] + w0.y * g0[k].y * f[1] + w0.z * g0[k].z * f[2] +
                      w0.w * g0[k].w * f[3] + w1.x * g1[k].x * f[4] + w1.y * g1[k].y * f[5] +
                      w1.z * g1[k].z * f[6] + w1.w * g1[k].w * f[7];
        }
    }
    float dot = 0.0f;
    if (half == 0) {
#pragma unroll
        for (int k = 0; k < HG; k++)
            if (lane * 8 + 256 * k < d)
                dot += term[k];
        part[pair][lane] = dot;
    }
    __syncthreads();
    if (half == 1) {
        dot = part[pair][lane];
#pragma unroll
        for (int k = 0; k < HG; k++)
            if (lane * 8 + 256 * (k + HG) < d)
                dot += term[k];
        dot = warp_sum(dot) * r / d;
        if (lane == 0)
            sdot[pair] = dot;
    }
    __syncthreads();
    dot = sdot[pair];
    if (!live)
        return;
#pragma unroll
    for (int k = 0; k < HG; k++) {
        int i = lane * 8 + 256 * (k + HG * half);
        if (i >= d)
            continue;
        float f[8], gv[8], wv[8];
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&xv[k];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 v = __bfloat1622float2(h[j]);
            f[2 * j] = v.x;
            f[2 * j + 1] = v.y;
        }
        *(float4 *)gv = g0[k];
        *(float4 *)(gv + 4) = g1[k];
        *(float4 *)wv = *(const float4 *)(w + i);
        *(float4 *)(wv + 4) = *(const float4 *)(w + i + 4);
        store_dx8(dr, db, i, f, gv, wv, r, dot, accumulate);
    }
}

/* The register kernels, unless KN_RMSNORM_REG=0 (read at every call, so
 * that a test can compare both in one process). */
static int reg_ok(int d)
{
    const char *e = getenv("KN_RMSNORM_REG");
    return !(e && !strcmp(e, "0")) && d % 8 == 0 && d <= 256 * RN_MAXG;
}

extern "C" void kn_rmsnorm_forward(kn_bf16 *y, float *rstd, const kn_bf16 *x,
                                   const float *w, int64_t n, int d,
                                   float eps, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && d > 0 && eps >= 0.0f);
    if (!n)
        return;
    if (reg_ok(d) && ((uintptr_t)x & 15) == 0 && ((uintptr_t)y & 15) == 0 &&
        ((uintptr_t)w & 15) == 0) {
        rmsnorm_forward_reg_kernel<<<kn_cdiv(n, 4), 128, 0, s>>>((bf16 *)y, rstd,
                                                                 (const bf16 *)x, w, n, d, eps);
        KN_CHECK_LAUNCH("rmsnorm_forward_reg");
        return;
    }
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
    if (vec && reg_ok(d)) {
        rmsnorm_backward_reg_kernel<<<kn_cdiv(n, 2), 128, 0, s>>>(
            dx, (bf16 *)dx_bf16, dy, (const bf16 *)x, w, rstd, n, d, accumulate);
        KN_CHECK_LAUNCH("rmsnorm_backward_reg");
        return;
    }
    rmsnorm_backward_kernel<<<kn_cdiv(n, 8), 256, 0, s>>>(dx, (bf16 *)dx_bf16, dy, (const bf16 *)x, w, rstd, n, d, accumulate, vec);
    KN_CHECK_LAUNCH("rmsnorm_backward");
}
