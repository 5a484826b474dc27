/* decode_attn.cu: RoPE with the key/value cache append, and attention of a
 * few new tokens over their sequences' caches.
 *
 * Decoding with bf16 caches (the NF4 models) uses one kernel for all of it,
 * rope_attn_kernel (kn_gen_rope_attention): RoPE of q and of the new key,
 * the append, and attention split over the keys as flash-decoding, one
 * block per (head, 64 cached positions, token), the cached rows copied
 * into shared memory with cp.async, the splits combined by the last block
 * of each (token, head) to finish. It replaced three launches a layer
 * (RoPE + append, the splits, their combination): on an H100 a batch-1
 * step went from 4.59 to 4.39 ms, and at batch 64 the attention reads the
 * caches at 2.46-2.62 TB/s against 2.37 (bench/RESULTS.md, "gen, attention
 * and step kernels"). It is launched with PDL (gen_ops_pdl): its cached rows
 * are loaded while the q/k/v product before it still runs.
 *
 * The other kernels serve the prefill and the fp32 models:
 * rope_append (one block per token when rows allow float4, else per
 * head), and attention split over the keys (attn_split_kernel: a lane
 * holds 4 of the head's dimensions, so one key row is one coalesced load
 * across the warp; each block leaves its split's max score, sum of
 * exponentials and unnormalized output; attn_combine_kernel combines the
 * splits in order). Memory-bound: each cached key and value row is read
 * once per step, by many blocks at once even for one token. Every grid
 * depends on the cache size, not the sequence (splits past the position
 * end at once), so a step's launches are the same every time and replay
 * as a CUDA graph; positions and slots are read from the device. For bf16
 * caches with head size 128 a second split kernel issues all of a block's
 * key and value loads at once (attn_split128_kernel, opt-in: see
 * fast_attn). */
#include "common.cuh"
#include "gen_kernels.h"
#include "gen_launch.cuh"

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

/* Block (t, y): y < nh rotates q head y; y < nh + nkv rotates k head
 * y - nh and appends it; else appends v head y - nh - nkv. One thread
 * per rotated pair: no loop, so every load of the block is in flight at
 * once. */
template <typename TC>
__global__ void rope_append_kernel(float *__restrict__ q, int64_t ldq, float *__restrict__ k,
                                   int64_t ldk, const float *__restrict__ v, int64_t ldv,
                                   TC *__restrict__ kc, TC *__restrict__ vc,
                                   const int32_t *__restrict__ slot,
                                   const int32_t *__restrict__ pos, int nh, int nkv, int hd,
                                   int cap, const float *__restrict__ cos_t,
                                   const float *__restrict__ sin_t, bf16 *__restrict__ q16,
                                   bf16 *__restrict__ k16, bf16 *__restrict__ v16)
{
    const int t = blockIdx.x, hh = blockIdx.y;
    const int half = hd / 2, kvd = nkv * hd;
    gen_pdl_wait();
    gen_pdl_trigger();
    const int32_t s = slot[t], p = pos[t];
    const int64_t cbase = ((int64_t)s * cap + p) * kvd;
    if (hh >= nh + nkv) {
        const int kh = hh - nh - nkv;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) {
            const float x = v[(int64_t)t * ldv + (int64_t)kh * hd + i];
            st1(vc + cbase + (int64_t)kh * hd + i, x);
            if (v16)
                v16[(int64_t)t * kvd + (int64_t)kh * hd + i] = __float2bfloat16(x);
        }
        return;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float *vec = hh < nh ? q + (int64_t)t * ldq + (int64_t)hh * hd
                             : k + (int64_t)t * ldk + (int64_t)(hh - nh) * hd;
        const float c = cos_t[(int64_t)p * half + i], sn = sin_t[(int64_t)p * half + i];
        const float a = vec[i], b = vec[i + half];
        /* as llama_rope: products rounded before the sum */
        const float x0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
        const float x1 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
        if (hh < nh ? !q16 : !k16) {
            vec[i] = x0;
            vec[i + half] = x1;
        }
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
}

/* The same for hd % 8 == 0 and 16-byte aligned rows: one block of 256
 * threads per token, 4 rotated pairs (float4) a thread. A prefill runs
 * ~16,000 tokens at once: one block per (token, head) of hd / 2 threads was
 * 1.5 M blocks of 64 threads with 4-byte accesses, 1.9 ms a layer where
 * the bytes take ~0.7. The same operations, so the same bits. (A prefill
 * asks for the bf16 copies and never reads the rotated fp32 q and k:
 * writing them back was 0.5 GB a layer of ~2 GB.) */
__device__ __forceinline__ void st4(float *p, float4 v) { *(float4 *)p = v; }
__device__ __forceinline__ void st4(bf16 *p, float4 v)
{
    *(uint2 *)p = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
}

template <typename TC>
__global__ void __launch_bounds__(256)
    rope_append4_kernel(float *__restrict__ q, int64_t ldq, float *__restrict__ k, int64_t ldk,
                        const float *__restrict__ v, int64_t ldv, TC *__restrict__ kc,
                        TC *__restrict__ vc, const int32_t *__restrict__ slot,
                        const int32_t *__restrict__ pos, int nh, int nkv, int hd, int cap,
                        const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                        bf16 *__restrict__ q16, bf16 *__restrict__ k16, bf16 *__restrict__ v16)
{
    const int t = blockIdx.x;
    const int half = hd / 2, hq = half / 4, kvd = nkv * hd;
    gen_pdl_wait();
    gen_pdl_trigger();
    const int32_t s = slot[t], p = pos[t];
    const int64_t cbase = ((int64_t)s * cap + p) * kvd;
    const float4 *c4 = (const float4 *)(cos_t + (int64_t)p * half);
    const float4 *s4 = (const float4 *)(sin_t + (int64_t)p * half);
    for (int u = threadIdx.x; u < (nh + nkv) * hq; u += blockDim.x) {
        const int hh = u / hq, i = (u % hq) * 4;
        float *vec = hh < nh ? q + (int64_t)t * ldq + (int64_t)hh * hd
                             : k + (int64_t)t * ldk + (int64_t)(hh - nh) * hd;
        const float4 a = *(const float4 *)(vec + i), b = *(const float4 *)(vec + i + half);
        const float4 c = c4[i / 4], sn = s4[i / 4];
        /* as llama_rope: products rounded before the sum */
        const float4 x0 = make_float4(__fsub_rn(__fmul_rn(a.x, c.x), __fmul_rn(b.x, sn.x)),
                                      __fsub_rn(__fmul_rn(a.y, c.y), __fmul_rn(b.y, sn.y)),
                                      __fsub_rn(__fmul_rn(a.z, c.z), __fmul_rn(b.z, sn.z)),
                                      __fsub_rn(__fmul_rn(a.w, c.w), __fmul_rn(b.w, sn.w)));
        const float4 x1 = make_float4(__fadd_rn(__fmul_rn(b.x, c.x), __fmul_rn(a.x, sn.x)),
                                      __fadd_rn(__fmul_rn(b.y, c.y), __fmul_rn(a.y, sn.y)),
                                      __fadd_rn(__fmul_rn(b.z, c.z), __fmul_rn(a.z, sn.z)),
                                      __fadd_rn(__fmul_rn(b.w, c.w), __fmul_rn(a.w, sn.w)));
        if (hh < nh ? !q16 : !k16) {
            *(float4 *)(vec + i) = x0;
            *(float4 *)(vec + i + half) = x1;
        }
        if (hh < nh) {
            if (q16) {
                bf16 *d = q16 + (int64_t)t * nh * hd + (int64_t)hh * hd;
                st4(d + i, x0);
                st4(d + i + half, x1);
            }
        } else {
            const int kh = hh - nh;
            st4(kc + cbase + (int64_t)kh * hd + i, x0);
            st4(kc + cbase + (int64_t)kh * hd + i + half, x1);
            if (k16) {
                bf16 *d = k16 + (int64_t)t * kvd + (int64_t)kh * hd;
                st4(d + i, x0);
                st4(d + i + half, x1);
            }
        }
    }
    for (int u = threadIdx.x; u < kvd / 4; u += blockDim.x) {
        const float4 x = *(const float4 *)(v + (int64_t)t * ldv + 4 * u);
        st4(vc + cbase + 4 * u, x);
        if (v16)
            st4(v16 + (int64_t)t * kvd + 4 * u, x);
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
    const int pdl = gen_pdl_use(n);
    const int vec = hd % 8 == 0 && ldq % 4 == 0 && ldk % 4 == 0 && ldv % 4 == 0 &&
                    (((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)cos_t |
                      (uintptr_t)sin_t | (uintptr_t)kc | (uintptr_t)vc) & 15) == 0 &&
                    (((uintptr_t)q16 | (uintptr_t)k16 | (uintptr_t)v16) & 7) == 0;
    if (vec) {
        if (cache_bf16)
            gen_launch(rope_append4_kernel<bf16>, dim3((unsigned)n), dim3(256), 0, s, pdl, q, ldq,
                       k, ldk, v, ldv, (bf16 *)kc, (bf16 *)vc, slot, pos, nh, nkv, hd, cap, cos_t,
                       sin_t, (bf16 *)q16, (bf16 *)k16, (bf16 *)v16);
        else
            gen_launch(rope_append4_kernel<float>, dim3((unsigned)n), dim3(256), 0, s, pdl, q,
                       ldq, k, ldk, v, ldv, (float *)kc, (float *)vc, slot, pos, nh, nkv, hd, cap,
                       cos_t, sin_t, (bf16 *)q16, (bf16 *)k16, (bf16 *)v16);
        KN_CHECK_LAUNCH("rope_append");
        return;
    }
    dim3 grid((unsigned)n, (unsigned)(nh + 2 * nkv));
    int threads = hd / 2 < 32 ? 32 : (hd / 2 + 31) / 32 * 32;
    if (cache_bf16)
        gen_launch(rope_append_kernel<bf16>, grid, dim3(threads), 0, s, pdl, q, ldq, k, ldk, v,
                   ldv, (bf16 *)kc, (bf16 *)vc, slot, pos, nh, nkv, hd, cap, cos_t, sin_t,
                   (bf16 *)q16, (bf16 *)k16, (bf16 *)v16);
    else
        gen_launch(rope_append_kernel<float>, grid, dim3(threads), 0, s, pdl, q, ldq, k, ldk, v,
                   ldv, (float *)kc, (float *)vc, slot, pos, nh, nkv, hd, cap, cos_t, sin_t,
                   (bf16 *)q16, (bf16 *)k16, (bf16 *)v16);
    KN_CHECK_LAUNCH("rope_append");
}

/* ---- attention ------------------------------------------------------------- */

#define ATT_WARPS 4
#define ATT_SPLIT 64 /* keys per block */

static int att_splits(int cap) { return (cap + ATT_SPLIT - 1) / ATT_SPLIT; }

/* Block (t, h, sp): keys sp*64 .. of token t's sequence, up to pos[t];
 * leaves the split's max score, sum of exponentials and unnormalized
 * output in part (n, nh, S, hd + 2). */
template <typename TC, int AHEAD>
__global__ void __launch_bounds__(128) attn_split_kernel(float *part, const float *q,
                                                         int64_t ldq, const TC *__restrict__ kc,
                                                         const TC *__restrict__ vc,
                                                         const int32_t *slot, const int32_t *pos,
                                                         int nh, int nkv, int hd, int cap,
                                                         float scale)
{
    __shared__ float sc[ATT_SPLIT];
    __shared__ float pv[ATT_WARPS][128];
    __shared__ float tmp[32];
    const int t = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, S = gridDim.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    gen_pdl_wait();
    gen_pdl_trigger();
    const int s = slot[t], P = pos[t];
    const int j_lo = sp * ATT_SPLIT;
    float *pp = part + (((int64_t)t * nh + h) * S + sp) * (hd + 2);
    if (j_lo > P) {
        if (tid == 0) {
            pp[hd] = -INFINITY;
            pp[hd + 1] = 0.0f;
        }
        return;
    }
    const int j_hi = j_lo + ATT_SPLIT - 1 < P ? j_lo + ATT_SPLIT - 1 : P;
    const int kvd = nkv * hd, kvh = h / (nh / nkv);
    const TC *kb = kc + (int64_t)s * cap * kvd + (int64_t)kvh * hd + lane * 4;
    const TC *vb = vc + (int64_t)s * cap * kvd + (int64_t)kvh * hd + lane * 4;
    const bool act = lane * 4 < hd;
    float qv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (act) {
        const float *qp = q + (int64_t)t * ldq + (int64_t)h * hd + lane * 4;
        qv[0] = qp[0]; qv[1] = qp[1]; qv[2] = qp[2]; qv[3] = qp[3];
    }
    /* warp w: keys j_lo + 16w .. + 15, AHEAD rows loaded before use (16
     * when few tokens run: latency; 4 when many: occupancy) */
    const int jw = j_lo + warp * 16;
    for (int j0 = jw; j0 < jw + 16 && j0 <= j_hi; j0 += AHEAD) {
        float kv[AHEAD][4];
#pragma unroll
        for (int u = 0; u < AHEAD; u++) {
            if (act && j0 + u <= j_hi)
                ld4(kb + (int64_t)(j0 + u) * kvd, kv[u]);
            else
                kv[u][0] = kv[u][1] = kv[u][2] = kv[u][3] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < AHEAD; u++) {
            float d = qv[0] * kv[u][0];
            d = fmaf(qv[1], kv[u][1], d);
            d = fmaf(qv[2], kv[u][2], d);
            d = fmaf(qv[3], kv[u][3], d);
            d = warp_sum(d);
            if (lane == 0 && j0 + u <= j_hi)
                sc[j0 + u - j_lo] = d * scale;
        }
    }
    __syncthreads();
    const int nk = j_hi - j_lo + 1;
    float m = tid < nk ? sc[tid] : -INFINITY;
    m = block_max(m, tmp);
    float e = 0.0f;
    if (tid < nk) {
        e = expf(sc[tid] - m);
        sc[tid] = e;
    }
    const float l = block_sum(e, tmp);
    __syncthreads();
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j0 = jw; j0 < jw + 16 && j0 <= j_hi; j0 += AHEAD) {
        float vv[AHEAD][4];
#pragma unroll
        for (int u = 0; u < AHEAD; u++) {
            if (act && j0 + u <= j_hi)
                ld4(vb + (int64_t)(j0 + u) * kvd, vv[u]);
            else
                vv[u][0] = vv[u][1] = vv[u][2] = vv[u][3] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < AHEAD; u++) {
            const float p = j0 + u <= j_hi ? sc[j0 + u - j_lo] : 0.0f;
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[i] = fmaf(p, vv[u][i], acc[i]);
        }
    }
    if (act) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            pv[warp][lane * 4 + i] = acc[i];
    }
    __syncthreads();
    for (int d = tid; d < hd; d += blockDim.x) {
        float r = pv[0][d];
#pragma unroll
        for (int w = 1; w < ATT_WARPS; w++)
            r += pv[w][d];
        pp[d] = r;
    }
    if (tid == 0) {
        pp[hd] = m;
        pp[hd + 1] = l;
    }
}

/* The same split for bf16 caches and head size 128 (the NF4 models), all
 * of a block's loads issued at once: a half-warp holds one key row (8
 * dimensions a lane, one 16-byte load), so a warp's 16 keys and their 16
 * value rows are 16 loads a lane, all in flight before the first is used.
 * Each warp keeps its own max, sum and output (a softmax over its 16
 * keys), and the block merges its 4 warps in warp order. Used for every
 * n, so the sums' order still depends on cap only. */
__global__ void __launch_bounds__(128) attn_split128_kernel(float *part, const float *q,
                                                            int64_t ldq,
                                                            const bf16 *__restrict__ kc,
                                                            const bf16 *__restrict__ vc,
                                                            const int32_t *slot,
                                                            const int32_t *pos, int nh, int nkv,
                                                            int cap, float scale)
{
    __shared__ float wo[ATT_WARPS][128];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    const int hd = 128;
    const int t = blockIdx.x, h = blockIdx.y, sp = blockIdx.z, S = gridDim.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int half = lane >> 4, l16 = lane & 15;
    gen_pdl_wait();
    gen_pdl_trigger();
    const int s = slot[t], P = pos[t];
    const int j_lo = sp * ATT_SPLIT;
    float *pp = part + (((int64_t)t * nh + h) * S + sp) * (hd + 2);
    if (j_lo > P) {
        if (tid == 0) {
            pp[hd] = -INFINITY;
            pp[hd + 1] = 0.0f;
        }
        return;
    }
    const int j_hi = j_lo + ATT_SPLIT - 1 < P ? j_lo + ATT_SPLIT - 1 : P;
    const int kvd = nkv * hd, kvh = h / (nh / nkv);
    const int64_t base = (int64_t)s * cap * kvd + (int64_t)kvh * hd + l16 * 8;
    const int jw = j_lo + warp * 16;
    /* key jw + 2u + half for u = 0..7 */
    uint4 kr[8], vr[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
        const int j = jw + 2 * u + half;
        if (j <= j_hi) {
            kr[u] = __ldg((const uint4 *)(kc + base + (int64_t)j * kvd));
            vr[u] = __ldg((const uint4 *)(vc + base + (int64_t)j * kvd));
        } else {
            kr[u] = make_uint4(0u, 0u, 0u, 0u);
            vr[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    float qv[8];
    {
        const float4 *qp = (const float4 *)(q + (int64_t)t * ldq + (int64_t)h * hd + l16 * 8);
        const float4 a = qp[0], b = qp[1];
        qv[0] = a.x; qv[1] = a.y; qv[2] = a.z; qv[3] = a.w;
        qv[4] = b.x; qv[5] = b.y; qv[6] = b.z; qv[7] = b.w;
    }
    float sc[8];
    float m = -INFINITY;
#pragma unroll
    for (int u = 0; u < 8; u++) {
        const uint32_t w[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            d = fmaf(qv[2 * i], __uint_as_float(w[i] << 16), d);
            d = fmaf(qv[2 * i + 1], __uint_as_float(w[i] & 0xffff0000u), d);
        }
        /* the half-warp's 16 lanes hold the key's 128 dimensions */
        d += __shfl_xor_sync(0xffffffffu, d, 8);
        d += __shfl_xor_sync(0xffffffffu, d, 4);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        sc[u] = jw + 2 * u + half <= j_hi ? d * scale : -INFINITY;
        m = fmaxf(m, sc[u]);
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
    float l = 0.0f, o[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (m != -INFINITY) {
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const float p = sc[u] == -INFINITY ? 0.0f : expf(sc[u] - m);
            l += p;
            const uint32_t w[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                o[2 * i] = fmaf(p, __uint_as_float(w[i] << 16), o[2 * i]);
                o[2 * i + 1] = fmaf(p, __uint_as_float(w[i] & 0xffff0000u), o[2 * i + 1]);
            }
        }
    }
    /* the two halves (even and odd keys) */
    l += __shfl_xor_sync(0xffffffffu, l, 16);
#pragma unroll
    for (int i = 0; i < 8; i++)
        o[i] += __shfl_xor_sync(0xffffffffu, o[i], 16);
    if (half == 0) {
        *(float4 *)&wo[warp][l16 * 8] = make_float4(o[0], o[1], o[2], o[3]);
        *(float4 *)&wo[warp][l16 * 8 + 4] = make_float4(o[4], o[5], o[6], o[7]);
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    __syncthreads();
    /* the block's 4 warps, merged in warp order */
    float M = wm[0];
#pragma unroll
    for (int w = 1; w < ATT_WARPS; w++)
        M = fmaxf(M, wm[w]);
    float f[ATT_WARPS];
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++)
        f[w] = wm[w] == -INFINITY ? 0.0f : expf(wm[w] - M);
    const int d = tid; /* 128 threads, 128 dimensions */
    float r = 0.0f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++)
        r = fmaf(wo[w][d], f[w], r);
    pp[d] = r;
    if (tid == 0) {
        float L = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++)
            L = fmaf(wl[w], f[w], L);
        pp[hd] = M;
        pp[hd + 1] = L;
    }
}

/* The splits of (t, h) combined in split order (S <= 1024). */
__global__ void attn_combine_kernel(float *__restrict__ o32, bf16 *__restrict__ o16,
                                    const float *__restrict__ part, int nh, int hd, int S)
{
    extern __shared__ float wts[]; /* (S) weight of each split */
    __shared__ float tot;
    const int t = blockIdx.x, h = blockIdx.y;
    gen_pdl_wait();
    gen_pdl_trigger();
    const float *pp = part + ((int64_t)t * nh + h) * S * (hd + 2);
    for (int sp = threadIdx.x; sp < S; sp += blockDim.x)
        wts[sp] = pp[(int64_t)sp * (hd + 2) + hd];
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY;
        for (int sp = 0; sp < S; sp++)
            M = fmaxf(M, wts[sp]);
        float L = 0.0f;
        for (int sp = 0; sp < S; sp++) {
            const float w = wts[sp] == -INFINITY ? 0.0f : expf(wts[sp] - M);
            wts[sp] = w;
            L += pp[(int64_t)sp * (hd + 2) + hd + 1] * w;
        }
        tot = L;
    }
    __syncthreads();
    const float inv = 1.0f / tot;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float r = 0.0f;
#pragma unroll 8
        for (int sp = 0; sp < S; sp++)
            r += pp[(int64_t)sp * (hd + 2) + d] * wts[sp];
        r *= inv;
        const int64_t oi = (int64_t)t * nh * hd + (int64_t)h * hd + d;
        if (o32)
            o32[oi] = r;
        if (o16)
            o16[oi] = __float2bfloat16(r);
    }
}

/* ---- RoPE, append and attention in one launch (decoding) ------------------
 *
 * A decoding step used three launches a layer for this (RoPE + append,
 * the splits, their combination); at batch 1 each costs a few
 * microseconds of drain and refill between kernels, more than the work.
 * Here one block per (head, 64 cached positions, token):
 *   - copies its split's key and value rows (bf16) into shared memory with
 *     cp.async, the whole tile at once and without registers, keys and
 *     values in two groups so that the scores start before the values
 *     land (bytes in flight is what the step's bandwidth needs);
 *   - rotates its q head itself, and the split holding the new position
 *     rotates the token's new key, rounds key and value to bf16 as the
 *     cache holds them and uses them from shared memory; the block of the
 *     kv head's first q head also writes them into the caches. No block
 *     reads position pos[t] from the cache, so nothing races: a token's
 *     slot must not appear twice in one call (decoding);
 *   - lanes: HD / 8 lanes hold a key row (8 dimensions, one 16-byte
 *     shared load each); a warp takes 16 keys with its own softmax, and
 *     the block merges its 4 warps in warp order;
 *   - the last block of (token, head) to finish (a counter in the
 *     workspace, left at zero) combines the splits in split order.
 * Every sum's order depends on pos[t] alone, never on n or on the grid:
 * a row's bits are the same whatever else is in the batch. The grid puts
 * the heads innermost, so blocks running together read whole 8 KB cache
 * rows of a few sequences (tokens innermost measured slower: 170 against
 * 150 us a layer at batch 64 on an H100; so did the rows by bulk copies
 * on an mbarrier, 167 us, DRAM 68% against 76%: bench/RESULTS.md, "gen,
 * attention and step kernels"). The key and value tiles start the
 * shared memory: with the bulk copies' 16-byte barriers before them the
 * kernel took 150 us a layer at batch 64, without 140 (2.46 against 2.62
 * TB/s; "gen, wgmma products and lin_tile tuning"), likely because the
 * 16-byte cp.async copies now land 128-byte aligned. */


#define RA_WARPS 4
#define RA_KEYS 64 /* keys per split */

template <int HD> struct ra_smem {
    bf16 k[RA_KEYS][HD];
    bf16 v[RA_KEYS][HD];
    float q[HD];
    float wo[RA_WARPS][HD];
    float wm[RA_WARPS], wl[RA_WARPS];
    int last;
};

/* floats of one split's partial result: output, max, sum, padding */
#define RA_PART(hd) ((hd) + 4)
static __host__ __device__ __forceinline__ int64_t ra_record(int hd, int S)
{
    return (int64_t)S * RA_PART(hd) + 4; /* the splits, then the counter */
}

__device__ __forceinline__ void bf8(uint4 r, float *f)
{
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <int HD>
__global__ void __launch_bounds__(32 * RA_WARPS)
    rope_attn_kernel(float *__restrict__ o32, bf16 *__restrict__ o16, const float *__restrict__ q,
                     int64_t ldq, const float *__restrict__ k, int64_t ldk,
                     const float *__restrict__ v, int64_t ldv, bf16 *__restrict__ kc,
                     bf16 *__restrict__ vc, const int32_t *__restrict__ slot,
                     const int32_t *__restrict__ pos, int nh, int nkv, int cap,
                     const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                     float *__restrict__ ws, float scale)
{
    constexpr int G = HD / 8;       /* lanes a key row */
    constexpr int KPI = 32 / G;     /* keys a warp instruction */
    constexpr int KW = RA_KEYS / RA_WARPS;
    constexpr int IT = KW / KPI > 0 ? KW / KPI : 1;
    constexpr int HALF = HD / 2;
    constexpr int NT = 32 * RA_WARPS;
    __shared__ __align__(16) ra_smem<HD> sm;
    /* grid (nh, S, n) */
    const int h = blockIdx.x, sp = blockIdx.y, t = blockIdx.z, S = gridDim.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    /* slots, positions and the cached rows before pos[t] are no earlier
     * kernel's output: loaded before the wait for the q/k/v product (PDL) */
    const int s = slot[t], P = pos[t];
    const int j_lo = sp * RA_KEYS;
    if (j_lo > P)
        return;
    const int nk = P - j_lo + 1 < RA_KEYS ? P - j_lo + 1 : RA_KEYS;
    const bool has_new = P < j_lo + RA_KEYS; /* row nk - 1 is position P */
    const int nc = has_new ? nk - 1 : nk;   /* rows from the cache */
    const int kvd = nkv * HD, kvh = h / (nh / nkv);
    const int64_t cb = (int64_t)s * cap * kvd + (int64_t)kvh * HD;
    for (int c = tid; c < nc * G; c += NT) {
        const int r = c / G, ch = c % G;
        cp_async16(&sm.k[r][ch * 8], kc + cb + (int64_t)(j_lo + r) * kvd + ch * 8, 16);
    }
    cp_async_commit();
    for (int c = tid; c < nc * G; c += NT) {
        const int r = c / G, ch = c % G;
        cp_async16(&sm.v[r][ch * 8], vc + cb + (int64_t)(j_lo + r) * kvd + ch * 8, 16);
    }
    cp_async_commit();
    gen_pdl_wait();
    gen_pdl_trigger();
    /* q, and the new key and value, while the copies fly (as
     * rope_append_kernel: products rounded before the sum) */
    const float *cr = cos_t + (int64_t)P * HALF, *sr = sin_t + (int64_t)P * HALF;
    for (int i = tid; i < HALF; i += NT) {
        const float *qr = q + (int64_t)t * ldq + (int64_t)h * HD;
        const float c = cr[i], sn = sr[i], a = qr[i], b = qr[i + HALF];
        sm.q[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
        sm.q[i + HALF] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
    }
    if (has_new) {
        const bool writer = h % (nh / nkv) == 0;
        const int64_t cp = cb + (int64_t)P * kvd;
        const float *kr = k + (int64_t)t * ldk + (int64_t)kvh * HD;
        const float *vr = v + (int64_t)t * ldv + (int64_t)kvh * HD;
        for (int i = tid; i < HALF; i += NT) {
            const float c = cr[i], sn = sr[i], a = kr[i], b = kr[i + HALF];
            const bf16 x0 = __float2bfloat16(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn)));
            const bf16 x1 = __float2bfloat16(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn)));
            sm.k[nk - 1][i] = x0;
            sm.k[nk - 1][i + HALF] = x1;
            if (writer) {
                kc[cp + i] = x0;
                kc[cp + i + HALF] = x1;
            }
        }
        for (int i = tid; i < HD; i += NT) {
            const bf16 x = __float2bfloat16(vr[i]);
            sm.v[nk - 1][i] = x;
            if (writer)
                vc[cp + i] = x;
        }
    }
    cp_async_wait<1>();
    __syncthreads();
    /* scores: lane group grp holds key warp*16 + it*KPI + grp */
    const int grp = lane / G, l8 = (lane % G) * 8;
    float qv[8];
    {
        const float4 a = *(const float4 *)&sm.q[l8], b = *(const float4 *)&sm.q[l8 + 4];
        qv[0] = a.x; qv[1] = a.y; qv[2] = a.z; qv[3] = a.w;
        qv[4] = b.x; qv[5] = b.y; qv[6] = b.z; qv[7] = b.w;
    }
    float sc[IT];
    float m = -INFINITY;
#pragma unroll
    for (int it = 0; it < IT; it++) {
        const int jj = it * KPI + grp, j = warp * KW + jj;
        float d = 0.0f;
        if (jj < KW) {
            float kf[8];
            bf8(*(const uint4 *)&sm.k[j][l8], kf);
#pragma unroll
            for (int i = 0; i < 8; i++)
                d = fmaf(qv[i], kf[i], d);
        }
#pragma unroll
        for (int o = G / 2; o >= 1; o >>= 1)
            d += __shfl_xor_sync(0xffffffffu, d, o);
        sc[it] = jj < KW && j < nk ? d * scale : -INFINITY;
        m = fmaxf(m, sc[it]);
    }
    m = warp_max(m);
    float p[IT], l = 0.0f;
#pragma unroll
    for (int it = 0; it < IT; it++) {
        p[it] = sc[it] == -INFINITY ? 0.0f : expf(sc[it] - m);
        l += p[it];
    }
#pragma unroll
    for (int o = G; o < 32; o <<= 1)
        l += __shfl_xor_sync(0xffffffffu, l, o);
    cp_async_wait<0>();
    __syncthreads();
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int it = 0; it < IT; it++) {
        const int jj = it * KPI + grp, j = warp * KW + jj;
        if (jj < KW && j < nk) {
            float vf[8];
            bf8(*(const uint4 *)&sm.v[j][l8], vf);
#pragma unroll
            for (int i = 0; i < 8; i++)
                acc[i] = fmaf(p[it], vf[i], acc[i]);
        }
    }
#pragma unroll
    for (int o = G; o < 32; o <<= 1)
#pragma unroll
        for (int i = 0; i < 8; i++)
            acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    if (grp == 0) {
        *(float4 *)&sm.wo[warp][l8] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        *(float4 *)&sm.wo[warp][l8 + 4] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    if (lane == 0) {
        sm.wm[warp] = m;
        sm.wl[warp] = l;
    }
    __syncthreads();
    /* the split: the 4 warps merged in warp order */
    float M = sm.wm[0];
#pragma unroll
    for (int w = 1; w < RA_WARPS; w++)
        M = fmaxf(M, sm.wm[w]);
    float f[RA_WARPS];
#pragma unroll
    for (int w = 0; w < RA_WARPS; w++)
        f[w] = sm.wm[w] == -INFINITY ? 0.0f : expf(sm.wm[w] - M);
    float *rec = ws + ((int64_t)t * nh + h) * ra_record(HD, S);
    float *pp = rec + (int64_t)sp * RA_PART(HD);
    for (int d = tid; d < HD; d += NT) {
        float r = 0.0f;
#pragma unroll
        for (int w = 0; w < RA_WARPS; w++)
            r = fmaf(sm.wo[w][d], f[w], r);
        pp[d] = r;
    }
    if (tid == 0) {
        float L = 0.0f;
#pragma unroll
        for (int w = 0; w < RA_WARPS; w++)
            L = fmaf(sm.wl[w], f[w], L);
        pp[HD] = M;
        pp[HD + 1] = L;
    }
    /* the last split of (t, h) to finish combines them all */
    const int Sa = P / RA_KEYS + 1;
    if (Sa > 1) {
        __threadfence();
        __syncthreads();
        if (tid == 0) {
            unsigned *cnt = (unsigned *)(rec + (int64_t)S * RA_PART(HD));
            const unsigned prev = atomicAdd(cnt, 1u);
            sm.last = prev == (unsigned)Sa - 1;
            if (sm.last)
                *cnt = 0u;
        }
        __syncthreads();
        if (!sm.last)
            return;
        __threadfence();
    } else {
        __syncthreads();
    }
    float Mx = -INFINITY;
    for (int q2 = 0; q2 < Sa; q2++)
        Mx = fmaxf(Mx, __ldcg(rec + (int64_t)q2 * RA_PART(HD) + HD));
    for (int d = tid; d < HD; d += NT) {
        float L = 0.0f, r = 0.0f;
        for (int q2 = 0; q2 < Sa; q2++) {
            const float *pq = rec + (int64_t)q2 * RA_PART(HD);
            const float w = expf(__ldcg(pq + HD) - Mx);
            L = fmaf(__ldcg(pq + HD + 1), w, L);
            r = fmaf(__ldcg(pq + d), w, r);
        }
        r *= 1.0f / L;
        const int64_t oi = (int64_t)t * nh * HD + (int64_t)h * HD + d;
        if (o32)
            o32[oi] = r;
        if (o16)
            o16[oi] = __float2bfloat16(r);
    }
}

extern "C" int kn_gen_rope_attention_ok(int hd)
{
    return hd == 8 || hd == 16 || hd == 32 || hd == 64 || hd == 128;
}

extern "C" size_t kn_gen_rope_attention_ws(int n, int nh, int hd, int cap)
{
    const int S = (cap + RA_KEYS - 1) / RA_KEYS;
    return (size_t)n * nh * ra_record(hd, S) * sizeof(float);
}

extern "C" void kn_gen_rope_attention(float *o32, kn_bf16 *o16, const float *q, int64_t ldq,
                                      const float *k, int64_t ldk, const float *v, int64_t ldv,
                                      void *kc, void *vc, const int32_t *slot,
                                      const int32_t *pos, int n, int nh, int nkv, int hd,
                                      int cap, const float *cos_t, const float *sin_t, float *ws,
                                      cudaStream_t s)
{
    KN_REQUIRE(n >= 1 && nh >= 1 && nkv >= 1 && nh % nkv == 0 && kn_gen_rope_attention_ok(hd));
    KN_REQUIRE(q && k && v && kc && vc && slot && pos && cos_t && sin_t && ws && (o32 || o16));
    KN_REQUIRE(cap >= 1 && n <= 65535);
    const int S = (cap + RA_KEYS - 1) / RA_KEYS;
    KN_REQUIRE(S <= 65535);
    const dim3 grid((unsigned)nh, (unsigned)S, (unsigned)n);
    const float scale = 1.0f / sqrtf((float)hd);
    const int pdl = gen_ops_pdl(n, s);
    /* 35 KB of shared memory a block at hd 128: ask for the largest
     * carveout so that 6 blocks fit an SM (the copies need no L1) */
    static int carve[5];
#define RA_LAUNCH(H)                                                                               \
    if (!carve[__builtin_ctz(H) - 3]) {                                                            \
        CUDA_CHECK(cudaFuncSetAttribute(rope_attn_kernel<H>,                                       \
                                        cudaFuncAttributePreferredSharedMemoryCarveout,            \
                                        (int)cudaSharedmemCarveoutMaxShared));                     \
        carve[__builtin_ctz(H) - 3] = 1;                                                           \
    }                                                                                              \
    gen_launch(rope_attn_kernel<H>, grid, dim3(32 * RA_WARPS), 0, s, pdl, o32, (bf16 *)o16, q,     \
               ldq, k, ldk, v, ldv, (bf16 *)kc, (bf16 *)vc, slot, pos, nh, nkv, cap, cos_t, sin_t, \
               ws, scale)
    switch (hd) {
    case 8: RA_LAUNCH(8); break;
    case 16: RA_LAUNCH(16); break;
    case 32: RA_LAUNCH(32); break;
    case 64: RA_LAUNCH(64); break;
    default: RA_LAUNCH(128); break;
    }
#undef RA_LAUNCH
    KN_CHECK_LAUNCH("gen_rope_attention");
}

/* The head-size-128 kernel only with QLORA_GEN_ATTN128=1: on an H100 it
 * is faster at batch 1 (11.1 against 12.7 us a layer at 350 positions)
 * but slower at batch 64 (2.09 against 2.41 TB/s), and one kernel must
 * serve every batch size (the sums' order may not depend on n). */
static int fast_attn(void)
{
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("QLORA_GEN_ATTN128");
        on = e && *e == '1';
    }
    return on;
}

extern "C" size_t kn_gen_attention_ws(int n, int nh, int hd, int cap)
{
    return (size_t)n * nh * att_splits(cap) * (hd + 2) * sizeof(float);
}

extern "C" void kn_gen_attention_setup(int cap) { (void)cap; }

extern "C" void kn_gen_attention(float *o32, kn_bf16 *o16, const float *q, int64_t ldq,
                                 const void *kc, const void *vc, int cache_bf16,
                                 const int32_t *slot, const int32_t *pos, int n, int nh,
                                 int nkv, int hd, int cap, float *ws, cudaStream_t s)
{
    KN_REQUIRE(n >= 1 && nh >= 1 && nkv >= 1 && nh % nkv == 0 && hd % 4 == 0 && hd <= 128);
    KN_REQUIRE(q && kc && vc && slot && pos && (o32 || o16) && ldq % 4 == 0 && ws);
    const int S = att_splits(cap);
    dim3 grid((unsigned)n, (unsigned)nh, (unsigned)S);
    float scale = 1.0f / sqrtf((float)hd);
    KN_REQUIRE(S <= 1024);
    const int pdl = gen_pdl_use(n);
    if (cache_bf16 && hd == 128 && ldq % 4 == 0 && ((uintptr_t)q & 15) == 0 && fast_attn())
        gen_launch(attn_split128_kernel, grid, dim3(32 * ATT_WARPS), 0, s, pdl, ws, q, ldq,
                   (const bf16 *)kc, (const bf16 *)vc, slot, pos, nh, nkv, cap, scale);
    else if (cache_bf16 && n <= 8)
        attn_split_kernel<bf16, 16><<<grid, 32 * ATT_WARPS, 0, s>>>(
            ws, q, ldq, (const bf16 *)kc, (const bf16 *)vc, slot, pos, nh, nkv, hd, cap, scale);
    else if (cache_bf16)
        attn_split_kernel<bf16, 4><<<grid, 32 * ATT_WARPS, 0, s>>>(
            ws, q, ldq, (const bf16 *)kc, (const bf16 *)vc, slot, pos, nh, nkv, hd, cap, scale);
    else if (n <= 8)
        attn_split_kernel<float, 16><<<grid, 32 * ATT_WARPS, 0, s>>>(
            ws, q, ldq, (const float *)kc, (const float *)vc, slot, pos, nh, nkv, hd, cap, scale);
    else
        attn_split_kernel<float, 4><<<grid, 32 * ATT_WARPS, 0, s>>>(
            ws, q, ldq, (const float *)kc, (const float *)vc, slot, pos, nh, nkv, hd, cap, scale);
    KN_CHECK_LAUNCH("gen_attention");
    gen_launch(attn_combine_kernel, dim3((unsigned)n, (unsigned)nh), dim3(128),
               (size_t)S * sizeof(float), s, pdl, o32, (bf16 *)o16, (const float *)ws, nh, hd, S);
    KN_CHECK_LAUNCH("gen_attention_combine");
}
