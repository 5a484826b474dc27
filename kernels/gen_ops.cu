/* gen_ops.cu: the element-wise steps of lora-gen's GPU path on the fp32
 * residual stream: embedding lookup, RMSNorm (into fp32 and/or the bf16
 * operand of the next product), SwiGLU, and the argmax that greedy
 * decoding needs (so a step returns n ids, not n rows of logits).
 * RMSNorm sums squares in double as llama_rmsnorm does.
 *
 * At batch 1 each of these is one latency: a load, a reduction, a store,
 * 1.5 to 5 us in a step's graph on an H100. So every thread's loads are
 * issued before any is used (the row in registers, 4 elements a thread,
 * 8 loads a thread in the argmax), RMSNorm loads its weights before it
 * waits for x, and every kernel but the embedding (the first of a step)
 * is launched with PDL (gen_ops_pdl, gen_launch.cuh): its launch overlaps
 * the product before it.
 */
#include "common.cuh"
#include "gen_kernels.h"
#include "gen_launch.cuh"

/* Whether this file's kernels and the decoding attention (decode_attn.cu)
 * are launched with PDL: on sm_90 devices unless QLORA_GEN_OPS_PDL=0, at
 * every n, on streams other than the legacy one. They follow a product,
 * so their launch and what they may load early (RMSNorm's weights, the
 * attention's cached keys and values) overlap the product's last wave.
 * Measured on an H100: a batch-1 step 4.32 against 4.39 ms, batch 64
 * 14.97 against 15.11. The products after them are launched the usual
 * way at n <= 16 (see gen_pdl_use); lin_tile's (n > 16) with PDL too
 * (nf4_gemv.cu, QLORA_GEN_TILE_PDL). */
int gen_ops_pdl(int n, cudaStream_t s)
{
    static int on = -1;
    if (on < 0) {
        int dev = 0, major = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        const char *e = getenv("QLORA_GEN_OPS_PDL");
        on = major >= 9 && !(e && *e == '0');
    }
    (void)n;
    return on && s != 0; /* not on the legacy stream (the kernel tests) */
}

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
    gen_pdl_wait();
    gen_pdl_trigger();
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

/* The same for d % 4 == 0, d <= 1024 V: 256 threads, each holding V
 * float4 of the row in registers between the two passes (one read of x
 * instead of two, no loop: a single block per token is latency-bound). */
template <int V>
__global__ void __launch_bounds__(256) gen_rmsnorm4_kernel(float *__restrict__ y32,
                                                           bf16 *__restrict__ y16,
                                                           const float *__restrict__ x,
                                                           const int32_t *__restrict__ rows,
                                                           const float *__restrict__ w, int d,
                                                           float eps)
{
    __shared__ double part[8];
    const int r = blockIdx.x, tid = threadIdx.x;
    const int d4 = d >> 2;
    float4 v[V], wv[V];
    double ss = 0.0;
    /* the weights first, before the wait for the kernel that writes x
     * (PDL) and before the reduction: at batch 1 they come from DRAM (a
     * step's weights stream through L2) */
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int j = tid + 256 * i;
        wv[i] = j < d4 ? ((const float4 *)w)[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    gen_pdl_wait();
    gen_pdl_trigger();
    const int64_t src = rows ? rows[r] : r;
    const float4 *xr = (const float4 *)(x + src * d);
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int j = tid + 256 * i;
        v[i] = j < d4 ? xr[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += (double)v[i].x * v[i].x + (double)v[i].y * v[i].y + (double)v[i].z * v[i].z +
              (double)v[i].w * v[i].w;
    }
    ss = warp_sum_d(ss);
    if ((tid & 31) == 0)
        part[tid >> 5] = ss;
    __syncthreads();
    double tot = 0.0;
#pragma unroll
    for (int i = 0; i < 8; i++)
        tot += part[i];
    const float rs = 1.0f / sqrtf((float)(tot / d) + eps);
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int j = tid + 256 * i;
        if (j >= d4)
            break;
        const float4 o = make_float4(__fmul_rn(wv[i].x, __fmul_rn(v[i].x, rs)),
                                     __fmul_rn(wv[i].y, __fmul_rn(v[i].y, rs)),
                                     __fmul_rn(wv[i].z, __fmul_rn(v[i].z, rs)),
                                     __fmul_rn(wv[i].w, __fmul_rn(v[i].w, rs)));
        if (y32)
            ((float4 *)(y32 + (int64_t)r * d))[j] = o;
        if (y16) {
            uint2 pk = make_uint2(pack_bf16x2(o.x, o.y), pack_bf16x2(o.z, o.w));
            ((uint2 *)(y16 + (int64_t)r * d))[j] = pk;
        }
    }
}

extern "C" void kn_gen_rmsnorm(float *y32, kn_bf16 *y16, const float *x, const int32_t *rows,
                               const float *w, int n, int d, float eps, cudaStream_t s)
{
    KN_REQUIRE(x && w && (y32 || y16) && n >= 1 && d >= 1);
    const int pdl = gen_ops_pdl(n, s);
    const int aligned = d % 4 == 0 && (((uintptr_t)x | (uintptr_t)w | (uintptr_t)y32) & 15) == 0 &&
                        ((uintptr_t)y16 & 7) == 0;
    static int reg = -1; /* QLORA_GEN_RMSNORM=0: the loop kernel only */
    if (reg < 0) {
        const char *e = getenv("QLORA_GEN_RMSNORM");
        reg = !(e && *e == '0');
    }
    const int v = reg ? (d / 4 + 255) / 256 : 1 << 20;
    if (aligned && v <= 1)
        gen_launch(gen_rmsnorm4_kernel<1>, dim3(n), dim3(256), 0, s, pdl, y32, (bf16 *)y16, x,
                   rows, w, d, eps);
    else if (aligned && v <= 2)
        gen_launch(gen_rmsnorm4_kernel<2>, dim3(n), dim3(256), 0, s, pdl, y32, (bf16 *)y16, x,
                   rows, w, d, eps);
    else if (aligned && v <= 4)
        gen_launch(gen_rmsnorm4_kernel<4>, dim3(n), dim3(256), 0, s, pdl, y32, (bf16 *)y16, x,
                   rows, w, d, eps);
    else if (aligned && v <= 8)
        gen_launch(gen_rmsnorm4_kernel<8>, dim3(n), dim3(256), 0, s, pdl, y32, (bf16 *)y16, x,
                   rows, w, d, eps);
    else
        gen_launch(gen_rmsnorm_kernel, dim3(n), dim3(d >= 2048 ? 1024 : 256), 0, s, pdl, y32,
                   (bf16 *)y16, x, rows, w, d, eps);
}

__global__ void gen_swiglu_kernel(float *__restrict__ h32, bf16 *__restrict__ h16,
                                  const float *__restrict__ g, const float *__restrict__ u,
                                  int64_t ldgu, int d)
{
    const int t = blockIdx.y;
    gen_pdl_wait();
    gen_pdl_trigger();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x) {
        const float gv = g[(int64_t)t * ldgu + i];
        const float v = gv / (1.0f + expf(-gv)) * u[(int64_t)t * ldgu + i];
        if (h32)
            h32[(int64_t)t * d + i] = v;
        if (h16)
            h16[(int64_t)t * d + i] = __float2bfloat16(v);
    }
}

/* The same, 4 elements a thread (d, ldgu multiples of 4, aligned rows):
 * a quarter of the threads, each with its 8 loads in flight at once. */
__global__ void gen_swiglu4_kernel(float *__restrict__ h32, bf16 *__restrict__ h16,
                                   const float *__restrict__ g, const float *__restrict__ u,
                                   int64_t ldgu, int d)
{
    const int t = blockIdx.y, d4 = d >> 2;
    gen_pdl_wait();
    gen_pdl_trigger();
    const float4 *gr = (const float4 *)(g + (int64_t)t * ldgu);
    const float4 *ur = (const float4 *)(u + (int64_t)t * ldgu);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d4; i += gridDim.x * blockDim.x) {
        const float4 a = gr[i], b = ur[i];
        const float4 o = make_float4(a.x / (1.0f + expf(-a.x)) * b.x,
                                     a.y / (1.0f + expf(-a.y)) * b.y,
                                     a.z / (1.0f + expf(-a.z)) * b.z,
                                     a.w / (1.0f + expf(-a.w)) * b.w);
        if (h32)
            ((float4 *)(h32 + (int64_t)t * d))[i] = o;
        if (h16)
            ((uint2 *)(h16 + (int64_t)t * d))[i] =
                make_uint2(pack_bf16x2(o.x, o.y), pack_bf16x2(o.z, o.w));
    }
}

extern "C" void kn_gen_swiglu(float *h32, kn_bf16 *h16, const float *g, const float *u,
                              int64_t ldgu, int n, int d, cudaStream_t s)
{
    KN_REQUIRE(g && u && (h32 || h16) && n >= 1 && d >= 1 && ldgu >= d);
    if (d % 4 == 0 && ldgu % 4 == 0 &&
        (((uintptr_t)g | (uintptr_t)u | (uintptr_t)h32) & 15) == 0 && ((uintptr_t)h16 & 7) == 0) {
        const int d4 = d / 4;
        dim3 grid((unsigned)((d4 + 255) / 256 < 64 ? (d4 + 255) / 256 : 64), (unsigned)n);
        gen_launch(gen_swiglu4_kernel, grid, dim3(256), 0, s, gen_ops_pdl(n, s), h32, (bf16 *)h16,
                   g, u, ldgu, d);
        KN_CHECK_LAUNCH("gen_swiglu");
        return;
    }
    dim3 grid((unsigned)((d + 255) / 256 < 64 ? (d + 255) / 256 : 64), (unsigned)n);
    gen_launch(gen_swiglu_kernel, grid, dim3(256), 0, s, gen_ops_pdl(n, s), h32, (bf16 *)h16, g, u,
               ldgu, d);
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
    gen_pdl_wait();
    gen_pdl_trigger();
    const int r = blockIdx.x;
    const float *xr = x + (int64_t)r * ld;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    /* 8 loads in flight before the comparisons (the winner does not depend
     * on the order of the visits: beats is a total order) */
    for (int i0 = threadIdx.x; i0 < limit; i0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * blockDim.x;
            v[u] = i < limit ? xr[i] : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * blockDim.x;
            if (i < limit && beats(v[u], i, bv, bi))
                bv = v[u], bi = i;
        }
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
    gen_launch(gen_argmax_kernel, dim3(n), dim3(1024), 0, s, gen_ops_pdl(n, s), out, x, ld, limit);
    KN_CHECK_LAUNCH("gen_argmax");
}
