/* decode_attn.cu: RoPE with the key/value cache append, and attention of a
 * few new tokens over their sequences' caches.
 *
 * Attention: one block of 4 warps per (token, head). Scores go to shared
 * memory (one float per cached position): each warp takes groups of 4
 * consecutive keys, a lane holding 4 of the head's dimensions, so one key
 * row is one coalesced load across the warp and 4 are in flight; a warp
 * reduction gives each score. Softmax in fp32 over the block, then the
 * same walk over the values, the 4 warps' partial outputs added in warp
 * order. Memory-bound: each cached key and value row of the head is read
 * once per step. The shared memory is sized by the cache (not the
 * sequence), so a step's launch shape is the same every time and can be
 * replayed as a CUDA graph; positions and slots are read from the device.
 */
#include "common.cuh"
#include "gen_kernels.h"

__device__ __forceinline__ void ld4(const float *p, float *v)
{
    float4 r = *(const float4 *)p;
    v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
}
__device__ __forceinline__ void ld4(const bf16 *p, float *v)
{
    uint2 r = *(const uint2 *)p;
    v[0] = __uint_as_float(r.x << 16);
    v[1] = __uint_as_float(r.x & 0xffff0000u);
    v[2] = __uint_as_float(r.y << 16);
    v[3] = __uint_as_float(r.y & 0xffff0000u);
}
__device__ __forceinline__ void st1(float *p, float v) { *p = v; }
__device__ __forceinline__ void st1(bf16 *p, float v) { *p = __float2bfloat16(v); }

/* ---- RoPE + append ------------------------------------------------------- */

template <typename TC>
__global__ void rope_append_kernel(float *q, int64_t ldq, float *k, int64_t ldk,
                                   const float *v, int64_t ldv, TC *kc, TC *vc,
                                   const int32_t *slot, const int32_t *pos, int nh,
                                   int nkv, int hd, int cap, const float *cos_t,
                                   const float *sin_t, bf16 *q16, bf16 *k16, bf16 *v16)
{
    const int t = blockIdx.x;
    const int half = hd / 2, kvd = nkv * hd;
    const int32_t s = slot[t], p = pos[t];
    const int64_t cbase = ((int64_t)s * cap + p) * kvd;
    for (int idx = threadIdx.x; idx < (nh + nkv) * half; idx += blockDim.x) {
        const int hh = idx / half, i = idx % half;
        float *vec = hh < nh ? q + (int64_t)t * ldq + (int64_t)hh * hd
                             : k + (int64_t)t * ldk + (int64_t)(hh - nh) * hd;
        const float c = cos_t[(int64_t)p * half + i], sn = sin_t[(int64_t)p * half + i];
        const float a = vec[i], b = vec[i + half];
        /* as llama_rope: products rounded before the sum */
        const float x0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
        const float x1 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
        vec[i] = x0;
        vec[i + half] = x1;
        if (hh < nh) {
            if (q16) {
                bf16 *d = q16 + (int64_t)t * nh * hd + (int64_t)hh * hd;
                d[i] = __float2bfloat16(x0);
                d[i + half] = __float2bfloat16(x1);
            }
        } else {
            const int kh = hh - nh;
            st1(kc + cbase + (int64_t)kh * hd + i, x0);
            st1(kc + cbase + (int64_t)kh * hd + i + half, x1);
            if (k16) {
                bf16 *d = k16 + (int64_t)t * kvd + (int64_t)kh * hd;
                d[i] = __float2bfloat16(x0);
                d[i + half] = __float2bfloat16(x1);
            }
        }
    }
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        const float x = v[(int64_t)t * ldv + i];
        st1(vc + cbase + i, x);
        if (v16)
            v16[(int64_t)t * kvd + i] = __float2bfloat16(x);
    }
}

extern "C" void kn_gen_rope_append(float *q, int64_t ldq, float *k, int64_t ldk,
                                   const float *v, int64_t ldv, void *kc, void *vc,
                                   int cache_bf16, const int32_t *slot, const int32_t *pos,
                                   int n, int nh, int nkv, int hd, int cap,
                                   const float *cos_t, const float *sin_t, kn_bf16 *q16,
                                   kn_bf16 *k16, kn_bf16 *v16, cudaStream_t s)
{
    KN_REQUIRE(n >= 1 && nh >= 1 && nkv >= 1 && nh % nkv == 0 && hd % 2 == 0 && cap >= 1);
    KN_REQUIRE(q && k && v && kc && vc && slot && pos && cos_t && sin_t);
    if (cache_bf16)
        rope_append_kernel<bf16><<<n, 128, 0, s>>>(q, ldq, k, ldk, v, ldv, (bf16 *)kc,
                                                   (bf16 *)vc, slot, pos, nh, nkv, hd, cap,
                                                   cos_t, sin_t, (bf16 *)q16, (bf16 *)k16,
                                                   (bf16 *)v16);
    else
        rope_append_kernel<float><<<n, 128, 0, s>>>(q, ldq, k, ldk, v, ldv, (float *)kc,
                                                    (float *)vc, slot, pos, nh, nkv, hd, cap,
                                                    cos_t, sin_t, (bf16 *)q16, (bf16 *)k16,
                                                    (bf16 *)v16);
    KN_CHECK_LAUNCH("rope_append");
}

/* ---- attention ------------------------------------------------------------- */

#define ATT_WARPS 4

template <typename TC>
__global__ void __launch_bounds__(128) attn_kernel(float *o32, bf16 *o16, const float *q,
                                                   int64_t ldq, const TC *__restrict__ kc,
                                                   const TC *__restrict__ vc,
                                                   const int32_t *slot, const int32_t *pos,
                                                   int nh, int nkv, int hd, int cap, float scale)
{
    extern __shared__ float sc[]; /* (cap) */
    __shared__ float part[ATT_WARPS][128];
    __shared__ float tmp[32];
    const int t = blockIdx.x, h = blockIdx.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int s = slot[t], P = pos[t];
    const int kvd = nkv * hd, kvh = h / (nh / nkv);
    const TC *kb = kc + (int64_t)s * cap * kvd + (int64_t)kvh * hd + lane * 4;
    const TC *vb = vc + (int64_t)s * cap * kvd + (int64_t)kvh * hd + lane * 4;
    const bool act = lane * 4 < hd;
    float qv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (act) {
        const float *qp = q + (int64_t)t * ldq + (int64_t)h * hd + lane * 4;
        qv[0] = qp[0]; qv[1] = qp[1]; qv[2] = qp[2]; qv[3] = qp[3];
    }
    for (int j0 = warp * 4; j0 <= P; j0 += 4 * ATT_WARPS) {
        float kv[4][4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (act && j0 + u <= P)
                ld4(kb + (int64_t)(j0 + u) * kvd, kv[u]);
            else
                kv[u][0] = kv[u][1] = kv[u][2] = kv[u][3] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            float d = qv[0] * kv[u][0];
            d = fmaf(qv[1], kv[u][1], d);
            d = fmaf(qv[2], kv[u][2], d);
            d = fmaf(qv[3], kv[u][3], d);
            d = warp_sum(d);
            if (lane == 0 && j0 + u <= P)
                sc[j0 + u] = d * scale;
        }
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = tid; j <= P; j += blockDim.x)
        m = fmaxf(m, sc[j]);
    m = block_max(m, tmp);
    float sum = 0.0f;
    for (int j = tid; j <= P; j += blockDim.x) {
        const float e = expf(sc[j] - m);
        sc[j] = e;
        sum += e;
    }
    sum = block_sum(sum, tmp);
    __syncthreads();
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j0 = warp * 4; j0 <= P; j0 += 4 * ATT_WARPS) {
        float vv[4][4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (act && j0 + u <= P)
                ld4(vb + (int64_t)(j0 + u) * kvd, vv[u]);
            else
                vv[u][0] = vv[u][1] = vv[u][2] = vv[u][3] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const float p = j0 + u <= P ? sc[j0 + u] : 0.0f;
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[i] = fmaf(p, vv[u][i], acc[i]);
        }
    }
    if (act) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            part[warp][lane * 4 + i] = acc[i];
    }
    __syncthreads();
    const float inv = 1.0f / sum;
    for (int d = tid; d < hd; d += blockDim.x) {
        float r = part[0][d];
#pragma unroll
        for (int w = 1; w < ATT_WARPS; w++)
            r += part[w][d];
        r *= inv;
        const int64_t oi = (int64_t)t * nh * hd + (int64_t)h * hd + d;
        if (o32)
            o32[oi] = r;
        if (o16)
            o16[oi] = __float2bfloat16(r);
    }
}

extern "C" void kn_gen_attention_setup(int cap)
{
    size_t bytes = (size_t)cap * sizeof(float);
    KN_REQUIRE(bytes + 4 * 128 * 4 + 32 * 4 <= kn_smem_optin());
    if (bytes > 48 * 1024) {
        CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<float>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)bytes));
        CUDA_CHECK(cudaFuncSetAttribute(attn_kernel<bf16>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)bytes));
    }
}

extern "C" void kn_gen_attention(float *o32, kn_bf16 *o16, const float *q, int64_t ldq,
                                 const void *kc, const void *vc, int cache_bf16,
                                 const int32_t *slot, const int32_t *pos, int n, int nh,
                                 int nkv, int hd, int cap, cudaStream_t s)
{
    KN_REQUIRE(n >= 1 && nh >= 1 && nkv >= 1 && nh % nkv == 0 && hd % 4 == 0 && hd <= 128);
    KN_REQUIRE(q && kc && vc && slot && pos && (o32 || o16) && ldq % 4 == 0);
    dim3 grid((unsigned)n, (unsigned)nh);
    size_t smem = (size_t)cap * sizeof(float);
    float scale = 1.0f / sqrtf((float)hd);
    if (cache_bf16)
        attn_kernel<bf16><<<grid, 32 * ATT_WARPS, smem, s>>>(
            o32, (bf16 *)o16, q, ldq, (const bf16 *)kc, (const bf16 *)vc, slot, pos, nh, nkv,
            hd, cap, scale);
    else
        attn_kernel<float><<<grid, 32 * ATT_WARPS, smem, s>>>(
            o32, (bf16 *)o16, q, ldq, (const float *)kc, (const float *)vc, slot, pos, nh, nkv,
            hd, cap, scale);
    KN_CHECK_LAUNCH("gen_attention");
}
