/* swiglu.cu: the SwiGLU gate of the MLP, h = silu(g) * u, and its
 * backward. Element-wise, memory-bound: 16-byte accesses when n allows. */
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

static int aligned4(const void *p) { return ((uintptr_t)p & 3) == 0; }

extern "C" void kn_swiglu_forward(kn_bf16 *h, const kn_bf16 *g,
                                  const kn_bf16 *u, int64_t n, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && aligned4(h) && aligned4(g) && aligned4(u));
    if (!n)
        return;
    swiglu_forward_kernel<<<kn_grid_1d(n / 2 + 1, 256), 256, 0, s>>>((bf16 *)h, (const bf16 *)g, (const bf16 *)u, n);
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
    swiglu_backward_kernel<<<kn_grid_1d(n / 2 + 1, 256), 256, 0, s>>>((bf16 *)dg, (bf16 *)du, (const bf16 *)dh, (const bf16 *)g, (const bf16 *)u, n);
    KN_CHECK_LAUNCH("swiglu_backward");
}
