/* gen_ops.cu: the element-wise steps of lora-gen's GPU path on the fp32
 * residual stream: embedding lookup, RMSNorm (into fp32 and/or the bf16
 * operand of the next product), SwiGLU, and the argmax that greedy
 * decoding needs (so a step returns n ids, not n rows of logits).
 * RMSNorm sums squares in double as llama_rmsnorm does.
 */
#include "common.cuh"
#include "gen_kernels.h"

__global__ void gen_embed_kernel(float *__restrict__ x, const float *__restrict__ table,
                                 const int32_t *__restrict__ ids, int d)
{
    const int t = blockIdx.x;
    const float *src = table + (int64_t)ids[t] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        x[(int64_t)t * d + i] = src[i];
}

extern "C" void kn_gen_embed(float *x, const float *table, const int32_t *ids, int n, int d,
                             cudaStream_t s)
{
    KN_REQUIRE(x && table && ids && n >= 1 && d >= 1);
    gen_embed_kernel<<<n, d >= 2048 ? 1024 : 256, 0, s>>>(x, table, ids, d);
    KN_CHECK_LAUNCH("gen_embed");
}

__device__ __forceinline__ double warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void gen_rmsnorm_kernel(float *__restrict__ y32, bf16 *__restrict__ y16,
                                   const float *__restrict__ x, const int32_t *__restrict__ rows,
                                   const float *__restrict__ w, int d, float eps)
{
    __shared__ double part[32];
    const int r = blockIdx.x;
    const int64_t src = rows ? rows[r] : r;
    const float *xr = x + src * d;
    double ss = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        ss += (double)xr[i] * xr[i];
    ss = warp_sum_d(ss);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0)
        part[warp] = ss;
    __syncthreads();
    double tot = 0.0;
    for (int i = 0; i < nw; i++)
        tot += part[i];
    const float rs = 1.0f / sqrtf((float)(tot / d) + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = __fmul_rn(w[i], __fmul_rn(xr[i], rs));
        if (y32)
            y32[(int64_t)r * d + i] = v;
        if (y16)
            y16[(int64_t)r * d + i] = __float2bfloat16(v);
    }
}

extern "C" void kn_gen_rmsnorm(float *y32, kn_bf16 *y16, const float *x, const int32_t *rows,
                               const float *w, int n, int d, float eps, cudaStream_t s)
{
    KN_REQUIRE(x && w && (y32 || y16) && n >= 1 && d >= 1);
    gen_rmsnorm_kernel<<<n, d >= 2048 ? 1024 : 256, 0, s>>>(y32, (bf16 *)y16, x, rows, w, d, eps);
    KN_CHECK_LAUNCH("gen_rmsnorm");
}

__global__ void gen_swiglu_kernel(float *__restrict__ h32, bf16 *__restrict__ h16,
                                  const float *__restrict__ g, const float *__restrict__ u,
                                  int64_t ldgu, int d)
{
    const int t = blockIdx.y;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) {
        const float gv = g[(int64_t)t * ldgu + i];
        const float v = gv / (1.0f + expf(-gv)) * u[(int64_t)t * ldgu + i];
        if (h32)
            h32[(int64_t)t * d + i] = v;
        if (h16)
            h16[(int64_t)t * d + i] = __float2bfloat16(v);
    }
}

extern "C" void kn_gen_swiglu(float *h32, kn_bf16 *h16, const float *g, const float *u,
                              int64_t ldgu, int n, int d, cudaStream_t s)
{
    KN_REQUIRE(g && u && (h32 || h16) && n >= 1 && d >= 1 && ldgu >= d);
    dim3 grid((unsigned)((d + 255) / 256 < 64 ? (d + 255) / 256 : 64), (unsigned)n);
    gen_swiglu_kernel<<<grid, 256, 0, s>>>(h32, (bf16 *)h16, g, u, ldgu, d);
    KN_CHECK_LAUNCH("gen_swiglu");
}

/* (v, i) beats (w, j): larger value, or equal and lower index; NaN never. */
__device__ __forceinline__ bool beats(float v, int i, float w, int j)
{
    return v > w || (v == w && i < j);
}

__global__ void gen_argmax_kernel(int32_t *out, const float *x, int64_t ld, int limit)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    const float *xr = x + (int64_t)r * ld;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < limit; i += blockDim.x) {
        const float v = xr[i];
        if (beats(v, i, bv, bi))
            bv = v, bi = i;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (beats(v, i, bv, bi))
            bv = v, bi = i;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; w++)
            if (beats(sv[w], si[w], bv, bi))
                bv = sv[w], bi = si[w];
        out[r] = bi == 0x7fffffff ? 0 : bi;
    }
}

extern "C" void kn_gen_argmax(int32_t *out, const float *x, int64_t ld, int limit, int n,
                              cudaStream_t s)
{
    KN_REQUIRE(out && x && limit >= 1 && ld >= limit && n >= 1);
    gen_argmax_kernel<<<n, 1024, 0, s>>>(out, x, ld, limit);
    KN_CHECK_LAUNCH("gen_argmax");
}
