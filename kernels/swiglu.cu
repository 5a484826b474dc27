/* swiglu.cu: the SwiGLU gate of the MLP, h = silu(g) * u, and its
 * backward. Element-wise, memory-bound: 8 elements a thread (16-byte
 * accesses) over the 16-byte-aligned bulk, pairs or singles for the rest. */
#include "common.cuh"

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + __expf(-g)); }

__global__ void swiglu_forward_kernel(bf16 *h, const bf16 *g, const bf16 *u,
                                      int64_t n)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t n2 = n / 2;
    const __nv_bfloat162 *g2 = (const __nv_bfloat162 *)g;
    const __nv_bfloat162 *u2 = (const __nv_bfloat162 *)u;
    __nv_bfloat162 *h2 = (__nv_bfloat162 *)h;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2; i += stride) {
        float2 gv = __bfloat1622float2(g2[i]), uv = __bfloat1622float2(u2[i]);
        h2[i] = __floats2bfloat162_rn(silu_f(gv.x) * uv.x, silu_f(gv.y) * uv.y);
    }
    if ((n & 1) && blockIdx.x == 0 && threadIdx.x == 0) {
        float gv = __bfloat162float(g[n - 1]), uv = __bfloat162float(u[n - 1]);
        h[n - 1] = __float2bfloat16(silu_f(gv) * uv);
    }
}

/* n8 groups of 8 elements, every pointer 16-byte aligned */
__global__ void swiglu_forward8_kernel(bf16 *h, const bf16 *g, const bf16 *u,
                                       int64_t n8)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint4 gu = ((const uint4 *)g)[i], uu = ((const uint4 *)u)[i], ho;
        const __nv_bfloat162 *g2 = (const __nv_bfloat162 *)&gu, *u2 = (const __nv_bfloat162 *)&uu;
        __nv_bfloat162 *h2 = (__nv_bfloat162 *)&ho;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 gv = __bfloat1622float2(g2[j]), uv = __bfloat1622float2(u2[j]);
            h2[j] = __floats2bfloat162_rn(silu_f(gv.x) * uv.x, silu_f(gv.y) * uv.y);
        }
        ((uint4 *)h)[i] = ho;
    }
}

__device__ __forceinline__ void swiglu_grad(float dh, float g, float u,
                                            float *dg, float *du)
{
    float sg = 1.0f / (1.0f + __expf(-g));
    *du = dh * g * sg;
    *dg = dh * u * sg * (1.0f + g * (1.0f - sg));
}

__global__ void swiglu_backward_kernel(bf16 *dg, bf16 *du, const bf16 *dh,
                                       const bf16 *g, const bf16 *u, int64_t n)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t n2 = n / 2;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2; i += stride) {
        float2 d = __bfloat1622float2(((const __nv_bfloat162 *)dh)[i]);
        float2 gv = __bfloat1622float2(((const __nv_bfloat162 *)g)[i]);
        float2 uv = __bfloat1622float2(((const __nv_bfloat162 *)u)[i]);
        float a0, b0, a1, b1;
        swiglu_grad(d.x, gv.x, uv.x, &a0, &b0);
        swiglu_grad(d.y, gv.y, uv.y, &a1, &b1);
        ((__nv_bfloat162 *)dg)[i] = __floats2bfloat162_rn(a0, a1);
        ((__nv_bfloat162 *)du)[i] = __floats2bfloat162_rn(b0, b1);
    }
    if ((n & 1) && blockIdx.x == 0 && threadIdx.x == 0) {
        float a, b;
        swiglu_grad(__bfloat162float(dh[n - 1]), __bfloat162float(g[n - 1]),
                    __bfloat162float(u[n - 1]), &a, &b);
        dg[n - 1] = __float2bfloat16(a);
        du[n - 1] = __float2bfloat16(b);
    }
}

__global__ void swiglu_backward8_kernel(bf16 *dg, bf16 *du, const bf16 *dh,
                                        const bf16 *g, const bf16 *u, int64_t n8)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint4 dd = ((const uint4 *)dh)[i], gg = ((const uint4 *)g)[i], uu = ((const uint4 *)u)[i];
        uint4 og, ou;
        const __nv_bfloat162 *d2 = (const __nv_bfloat162 *)&dd;
        const __nv_bfloat162 *g2 = (const __nv_bfloat162 *)&gg, *u2 = (const __nv_bfloat162 *)&uu;
        __nv_bfloat162 *og2 = (__nv_bfloat162 *)&og, *ou2 = (__nv_bfloat162 *)&ou;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 d = __bfloat1622float2(d2[j]), gv = __bfloat1622float2(g2[j]);
            float2 uv = __bfloat1622float2(u2[j]);
            float a0, b0, a1, b1;
            swiglu_grad(d.x, gv.x, uv.x, &a0, &b0);
            swiglu_grad(d.y, gv.y, uv.y, &a1, &b1);
            og2[j] = __floats2bfloat162_rn(a0, a1);
            ou2[j] = __floats2bfloat162_rn(b0, b1);
        }
        ((uint4 *)dg)[i] = og;
        ((uint4 *)du)[i] = ou;
    }
}

static int aligned4(const void *p) { return ((uintptr_t)p & 3) == 0; }
static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

extern "C" void kn_swiglu_forward(kn_bf16 *h, const kn_bf16 *g,
                                  const kn_bf16 *u, int64_t n, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && aligned4(h) && aligned4(g) && aligned4(u));
    if (!n)
        return;
    int64_t n8 = aligned16(h) && aligned16(g) && aligned16(u) ? n / 8 : 0;
    if (n8) {
        swiglu_forward8_kernel<<<kn_grid_1d(n8, 256), 256, 0, s>>>((bf16 *)h, (const bf16 *)g,
                                                                   (const bf16 *)u, n8);
        KN_CHECK_LAUNCH("swiglu_forward8");
    }
    int64_t d = n8 * 8;
    if (d == n)
        return;
    swiglu_forward_kernel<<<kn_grid_1d((n - d) / 2 + 1, 256), 256, 0, s>>>(
        (bf16 *)h + d, (const bf16 *)g + d, (const bf16 *)u + d, n - d);
    KN_CHECK_LAUNCH("swiglu_forward");
}

extern "C" void kn_swiglu_backward(kn_bf16 *dg, kn_bf16 *du, const kn_bf16 *dh,
                                   const kn_bf16 *g, const kn_bf16 *u,
                                   int64_t n, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && aligned4(dg) && aligned4(du) && aligned4(dh) &&
               aligned4(g) && aligned4(u));
    if (!n)
        return;
    int64_t n8 = aligned16(dg) && aligned16(du) && aligned16(dh) && aligned16(g) &&
                         aligned16(u) ? n / 8 : 0;
    if (n8) {
        swiglu_backward8_kernel<<<kn_grid_1d(n8, 256), 256, 0, s>>>(
            (bf16 *)dg, (bf16 *)du, (const bf16 *)dh, (const bf16 *)g, (const bf16 *)u, n8);
        KN_CHECK_LAUNCH("swiglu_backward8");
    }
    int64_t d = n8 * 8;
    if (d == n)
        return;
    swiglu_backward_kernel<<<kn_grid_1d((n - d) / 2 + 1, 256), 256, 0, s>>>(
        (bf16 *)dg + d, (bf16 *)du + d, (const bf16 *)dh + d, (const bf16 *)g + d,
        (const bf16 *)u + d, n - d);
    KN_CHECK_LAUNCH("swiglu_backward");
}
