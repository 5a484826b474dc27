/* attention.cu: flash attention, forward and backward, over a flat batch
 * of packed rows with causal masking restricted to each document.
 *
 * Why this shape:
 *   - Documents are contiguous (start[t] is start[t-1] or t), so a tile of
 *     64 consecutive queries q0.. needs only the keys start[q0] .. q0+63:
 *     tiles outside a document are never visited, and memory is linear in
 *     n (only o, lse and per-row scalars are written).
 *   - Products run on the tensor cores through mma.sync m16n8k16 (bf16 in,
 *     fp32 accumulate) with operands fetched by ldmatrix; the fragment
 *     layouts are documented in common.cuh. The head dimension is padded
 *     with zeros to HDP in {16, 32, 64, 128} in shared memory, so the tiny
 *     heads of test models (hd 8) take the same path as hd 64 and 128.
 *   - Forward (FlashAttention-2): a block of 4 warps owns 128 queries,
 *     each warp 32 (two 16-row tiles, so every K and V fragment read from
 *     shared memory feeds two products: ldmatrix, not the tensor cores,
 *     bounds a one-tile warp); scores S = Q K^T stay in registers, the
 *     online softmax rescales the O accumulator, and P feeds P V straight
 *     from registers. A warp skips a key tile that its rows cannot see
 *     (past its last row, or before its first row's document), and the
 *     blocks start with the last query tiles, which have the most keys.
 *     The first version (64 queries, a 16-row tile per warp) stays for
 *     comparison: KN_ATTN_FWD_V1=1 in the environment selects it.
 *   - Backward: two kernels instead of one with atomics. dq: per query tile
 *     (like the forward) recompute P and dP = dO V^T, dS = P (dP - delta),
 *     dq = dS K. dk/dv: per key tile, each warp 16 keys, looping over the
 *     query tiles that can see them and over the q heads sharing the kv
 *     head (GQA): P^T, dV += P^T dO, dS^T, dK += dS^T Q. Every operand
 *     comes out of registers or plain/transposed ldmatrix: no shared-memory
 *     transposes, no atomics, deterministic results.
 * Shared-memory rows are padded by 16 bytes so ldmatrix hits 8 distinct
 * bank groups. Scores are kept in the log2 domain (exp2f) with the scale
 * folded in. */
#include "common.cuh"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define ATT_THREADS 128

/* rows x HDP tile from global rows row0.. (stride elements apart; columns
 * 0..hd-1 of each), zero-filled past n and past hd. With 16-byte rows
 * (vec) the copies are asynchronous (cp.async, zero-filling through a
 * source size of 0): the caller commits and waits; otherwise they are
 * plain stores, visible after the next barrier. */
template <int HDP, int ROWS>
__device__ __forceinline__ void load_tile(bf16 *s, const bf16 *g, int64_t row0,
                                          int64_t n, int64_t stride, int hd,
                                          bool vec)
{
    constexpr int LD = HDP + 8;
    constexpr int CH = HDP / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += blockDim.x) {
        int r = i / CH, c = (i % CH) * 8;
        int64_t row = row0 + r;
        bool in = row < n && c < hd;
        if (vec) {
            cp_async16(s + r * LD + c, in ? g + row * stride + c : g, in ? 16 : 0);
            continue;
        }
        uint4 val = make_uint4(0, 0, 0, 0);
        if (in) {
            const bf16 *src = g + row * stride + c;
            bf16 *vb = (bf16 *)&val;
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (c + j < hd)
                    vb[j] = src[j];
        }
        *(uint4 *)(s + r * LD + c) = val;
    }
}

__device__ __forceinline__ int kn_cdiv_dev(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

__device__ __forceinline__ float quad_max(float v)
{
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v)
{
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <int HDP>
__global__ void __launch_bounds__(ATT_THREADS)
attn_fwd_kernel(bf16 *o, float *lse, const bf16 *q, const bf16 *k,
                const bf16 *v, const int32_t *start, int64_t n, int nh,
                int nkv, int hd, float scale_log2)
{
    constexpr int LD = HDP + 8, KS = HDP / 16, DN = HDP / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    /* sQ, then K buffers 0 and 1, then V buffers 0 and 1 (no arrays of
     * pointers: a run-time index would put them in local memory) */
    bf16 *sQ = (bf16 *)smem_raw, *sK0 = sQ + 64 * LD, *sV0 = sQ + 3 * 64 * LD;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int64_t q0 = (int64_t)blockIdx.x * 64;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;

    const int64_t r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const int64_t lim0 = r0 < n ? r0 : -1, lim1 = r1 < n ? r1 : -1;
    const int64_t st0 = r0 < n ? start[r0] : 0, st1 = r1 < n ? start[r1] : 0;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    float oacc[DN][4];
#pragma unroll
    for (int i = 0; i < DN; i++)
        oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.0f;
    uint32_t qf[KS][4];

    /* keys start[q0] .. min(q0 + 63, n - 1); a tile needs no mask when
     * every key precedes every query and follows every row's start
     * (starts only grow, so the last row's is the largest) */
    const int64_t kbeg = start[q0], kend = q0 + 64 < n ? q0 + 64 : n;
    const int64_t smax = start[q0 + 63 < n ? q0 + 63 : n - 1];
    const int ntiles = kn_cdiv_dev(kend - kbeg, 64);
    load_tile<HDP, 64>(sQ, q + h * hd, q0, n, qs, hd, vec);
    load_tile<HDP, 64>(sK0, k + kh * hd, kbeg, n, ks, hd, vec);
    load_tile<HDP, 64>(sV0, v + kh * hd, kbeg, n, ks, hd, vec);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int64_t kb = kbeg + (int64_t)it * 64;
        bf16 *sK = sK0 + (it & 1) * 64 * LD, *sV = sV0 + (it & 1) * 64 * LD;
        if (it + 1 < ntiles) {
            load_tile<HDP, 64>(sK0 + ((it + 1) & 1) * 64 * LD, k + kh * hd, kb + 64, n, ks,
                               hd, vec);
            load_tile<HDP, 64>(sV0 + ((it + 1) & 1) * 64 * LD, v + kh * hd, kb + 64, n, ks,
                               hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
                frag_a<LD>(qf[kk], sQ, warp * 16, kk * 16, lane);
        }
        const bool full = kb + 63 <= q0 && kb >= smax;
        float sc[8][4];
#pragma unroll
        for (int i = 0; i < 8; i++)
            sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                uint32_t b[4];
                frag_b_nk<LD>(b, sK, 16 * j, kk * 16, lane);
                mma_bf16_16816(sc[2 * j], qf[kk], b);
                mma_bf16_16816(sc[2 * j + 1], qf[kk], b + 2);
            }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float s = sc[nt][e] * scale_log2;
                if (!full) {
                    int64_t key = kb + nt * 8 + 2 * t4 + (e & 1);
                    bool ok = e < 2 ? (key <= lim0 && key >= st0) : (key <= lim1 && key >= st1);
                    s = ok ? s : -INFINITY;
                }
                sc[nt][e] = s;
                if (e < 2)
                    mx0 = fmaxf(mx0, s);
                else
                    mx1 = fmaxf(mx1, s);
            }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        float mu0 = mn0 == -INFINITY ? 0.0f : mn0;
        float mu1 = mn1 == -INFINITY ? 0.0f : mn1;
        float a0 = exp2f(m0 - mu0), a1 = exp2f(m1 - mu1);
        m0 = mn0;
        m1 = mn1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            sc[nt][0] = exp2f(sc[nt][0] - mu0);
            sc[nt][1] = exp2f(sc[nt][1] - mu0);
            sc[nt][2] = exp2f(sc[nt][2] - mu1);
            sc[nt][3] = exp2f(sc[nt][3] - mu1);
            ps0 += sc[nt][0] + sc[nt][1];
            ps1 += sc[nt][2] + sc[nt][3];
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int i = 0; i < DN; i++) {
            oacc[i][0] *= a0;
            oacc[i][1] *= a0;
            oacc[i][2] *= a1;
            oacc[i][3] *= a1;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint32_t pa[4] = {pack_bf16x2(sc[2 * j][0], sc[2 * j][1]),
                              pack_bf16x2(sc[2 * j][2], sc[2 * j][3]),
                              pack_bf16x2(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                              pack_bf16x2(sc[2 * j + 1][2], sc[2 * j + 1][3])};
#pragma unroll
            for (int i = 0; i < DN / 2; i++) {
                uint32_t b[4];
                frag_b_kn<LD>(b, sV, 16 * j, 16 * i, lane);
                mma_bf16_16816(oacc[2 * i], pa, b);
                mma_bf16_16816(oacc[2 * i + 1], pa, b + 2);
            }
        }
        __syncthreads();
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int i = 0; i < DN; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (r0 < n)
            *(uint32_t *)(o + r0 * qs + h * hd + col) =
                pack_bf16x2(oacc[i][0] * inv0, oacc[i][1] * inv0);
        if (r1 < n)
            *(uint32_t *)(o + r1 * qs + h * hd + col) =
                pack_bf16x2(oacc[i][2] * inv1, oacc[i][3] * inv1);
    }
    if (t4 == 0) {
        if (r0 < n)
            lse[(int64_t)h * n + r0] = m0 * LN2 + logf(l0);
        if (r1 < n)
            lse[(int64_t)h * n + r1] = m1 * LN2 + logf(l1);
    }
}

#define FQ 128 /* queries per block of the forward (4 warps of 32 rows) */

template <int HDP>
__global__ void __launch_bounds__(ATT_THREADS, 2)
attn_fwd2_kernel(bf16 *o, float *lse, const bf16 *q, const bf16 *k,
                 const bf16 *v, const int32_t *start, int n, int nh, int nkv,
                 int hd, float scale_log2)
{
    constexpr int LD = HDP + 8, KS = HDP / 16, DN = HDP / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    /* sQ (FQ rows), then K buffers 0 and 1, then V buffers 0 and 1 */
    bf16 *sQ = (bf16 *)smem_raw, *sK0 = sQ + FQ * LD, *sV0 = sK0 + 2 * 64 * LD;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FQ;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;

    /* this warp's rows w0 .. wl; row (mt, hf) of this thread is
     * w0 + 16 mt + 8 hf + g */
    const int w0 = q0 + warp * 32;
    const bool wact = w0 < n;
    const int wl = w0 + 31 < n ? w0 + 31 : n - 1;
    const int wsmin = wact ? start[w0] : 0, wsmax = wact ? start[wl] : 0;
    /* start of each row's document; INT_MAX past n masks every key */
    int st[2][2];
    float m[2][2], l[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            int r = w0 + 16 * mt + 8 * hf + g;
            st[mt][hf] = r < n ? start[r] : INT_MAX;
            m[mt][hf] = -INFINITY;
            l[mt][hf] = 0.0f;
        }
    float oacc[2][DN][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int i = 0; i < DN; i++)
            oacc[mt][i][0] = oacc[mt][i][1] = oacc[mt][i][2] = oacc[mt][i][3] = 0.0f;

    /* keys start[q0] .. min(q0 + FQ, n) - 1 */
    const int kbeg = start[q0], kend = q0 + FQ < n ? q0 + FQ : n;
    const int ntiles = (kend - kbeg + 63) / 64;
    load_tile<HDP, FQ>(sQ, q + h * hd, q0, n, qs, hd, vec);
    load_tile<HDP, 64>(sK0, k + kh * hd, kbeg, n, ks, hd, vec);
    load_tile<HDP, 64>(sV0, v + kh * hd, kbeg, n, ks, hd, vec);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int kb = kbeg + it * 64;
        bf16 *sK = sK0 + (it & 1) * 64 * LD, *sV = sV0 + (it & 1) * 64 * LD;
        if (it + 1 < ntiles) {
            load_tile<HDP, 64>(sK0 + ((it + 1) & 1) * 64 * LD, k + kh * hd, kb + 64, n, ks,
                               hd, vec);
            load_tile<HDP, 64>(sV0 + ((it + 1) & 1) * 64 * LD, v + kh * hd, kb + 64, n, ks,
                               hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        /* every key of the tile after this warp's last row, or before its
         * first row's document (starts only grow): nothing to add */
        if (wact && kb <= wl && kb + 63 >= wsmin) {
            /* no mask: every key precedes every row and follows every
             * row's start (the last row's is the largest) */
            const bool full = kb + 63 <= w0 && kb >= wsmax;
            float sc[2][8][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int i = 0; i < 8; i++)
                    sc[mt][i][0] = sc[mt][i][1] = sc[mt][i][2] = sc[mt][i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t a0[4], a1[4];
                frag_a<LD>(a0, sQ, warp * 32, kk * 16, lane);
                frag_a<LD>(a1, sQ, warp * 32 + 16, kk * 16, lane);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    uint32_t b[4];
                    frag_b_nk<LD>(b, sK, 16 * j, kk * 16, lane);
                    mma_bf16_16816(sc[0][2 * j], a0, b);
                    mma_bf16_16816(sc[0][2 * j + 1], a0, b + 2);
                    mma_bf16_16816(sc[1][2 * j], a1, b);
                    mma_bf16_16816(sc[1][2 * j + 1], a1, b + 2);
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float s = sc[mt][nt][e] * scale_log2;
                        if (!full) {
                            int key = kb + nt * 8 + 2 * t4 + (e & 1);
                            int hf = e >> 1;
                            bool ok = key <= w0 + 16 * mt + 8 * hf + g && key >= st[mt][hf];
                            s = ok ? s : -INFINITY;
                        }
                        sc[mt][nt][e] = s;
                        if (e < 2)
                            mx0 = fmaxf(mx0, s);
                        else
                            mx1 = fmaxf(mx1, s);
                    }
                mx0 = quad_max(mx0);
                mx1 = quad_max(mx1);
                float mn0 = fmaxf(m[mt][0], mx0), mn1 = fmaxf(m[mt][1], mx1);
                float mu0 = mn0 == -INFINITY ? 0.0f : mn0;
                float mu1 = mn1 == -INFINITY ? 0.0f : mn1;
                float a0 = exp2f(m[mt][0] - mu0), a1 = exp2f(m[mt][1] - mu1);
                m[mt][0] = mn0;
                m[mt][1] = mn1;
                float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    sc[mt][nt][0] = exp2f(sc[mt][nt][0] - mu0);
                    sc[mt][nt][1] = exp2f(sc[mt][nt][1] - mu0);
                    sc[mt][nt][2] = exp2f(sc[mt][nt][2] - mu1);
                    sc[mt][nt][3] = exp2f(sc[mt][nt][3] - mu1);
                    ps0 += sc[mt][nt][0] + sc[mt][nt][1];
                    ps1 += sc[mt][nt][2] + sc[mt][nt][3];
                }
                l[mt][0] = l[mt][0] * a0 + ps0;
                l[mt][1] = l[mt][1] * a1 + ps1;
#pragma unroll
                for (int i = 0; i < DN; i++) {
                    oacc[mt][i][0] *= a0;
                    oacc[mt][i][1] *= a0;
                    oacc[mt][i][2] *= a1;
                    oacc[mt][i][3] *= a1;
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                uint32_t pa[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    pa[mt][0] = pack_bf16x2(sc[mt][2 * j][0], sc[mt][2 * j][1]);
                    pa[mt][1] = pack_bf16x2(sc[mt][2 * j][2], sc[mt][2 * j][3]);
                    pa[mt][2] = pack_bf16x2(sc[mt][2 * j + 1][0], sc[mt][2 * j + 1][1]);
                    pa[mt][3] = pack_bf16x2(sc[mt][2 * j + 1][2], sc[mt][2 * j + 1][3]);
                }
#pragma unroll
                for (int i = 0; i < DN / 2; i++) {
                    uint32_t b[4];
                    frag_b_kn<LD>(b, sV, 16 * j, 16 * i, lane);
                    mma_bf16_16816(oacc[0][2 * i], pa[0], b);
                    mma_bf16_16816(oacc[0][2 * i + 1], pa[0], b + 2);
                    mma_bf16_16816(oacc[1][2 * i], pa[1], b);
                    mma_bf16_16816(oacc[1][2 * i + 1], pa[1], b + 2);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            int r = w0 + 16 * mt + 8 * hf + g;
            float ls = quad_sum(l[mt][hf]);
            float inv = ls > 0.0f ? 1.0f / ls : 0.0f;
            if (r >= n)
                continue;
#pragma unroll
            for (int i = 0; i < DN; i++) {
                int col = i * 8 + 2 * t4;
                if (col < hd)
                    *(uint32_t *)(o + r * qs + h * hd + col) =
                        pack_bf16x2(oacc[mt][i][2 * hf] * inv, oacc[mt][i][2 * hf + 1] * inv);
            }
            if (t4 == 0)
                lse[(int64_t)h * n + r] = m[mt][hf] * LN2 + logf(ls);
        }
}

/* delta[h][t] = sum_i dout[t][h][i] * o[t][h][i]: one warp per (t, h). */
__global__ void attn_delta_kernel(float *delta, const bf16 *dout, const bf16 *o,
                                  int64_t n, int nh, int hd)
{
    int64_t w = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (w >= n * nh)
        return;
    int64_t t = w / nh;
    int h = (int)(w % nh);
    const bf16 *a = dout + w * hd, *b = o + w * hd;
    float s = 0.0f;
    if ((hd & 3) == 0) { /* 8-byte loads, 4 elements a lane */
        for (int i = lane * 4; i < hd; i += 128) {
            uint2 ua = *(const uint2 *)(a + i), ub = *(const uint2 *)(b + i);
            const __nv_bfloat162 *ha = (const __nv_bfloat162 *)&ua;
            const __nv_bfloat162 *hb = (const __nv_bfloat162 *)&ub;
            float2 a0 = __bfloat1622float2(ha[0]), a1 = __bfloat1622float2(ha[1]);
            float2 b0 = __bfloat1622float2(hb[0]), b1 = __bfloat1622float2(hb[1]);
            s += a0.x * b0.x + a0.y * b0.y + a1.x * b1.x + a1.y * b1.y;
        }
    } else {
        for (int i = lane; i < hd; i += 32)
            s += __bfloat162float(a[i]) * __bfloat162float(b[i]);
    }
    s = warp_sum(s);
    if (lane == 0)
        delta[(int64_t)h * n + t] = s;
}

template <int HDP>
__global__ void __launch_bounds__(ATT_THREADS, 2)
attn_bwd_dq_kernel(bf16 *dq, const bf16 *dout, const bf16 *q, const bf16 *k,
                   const bf16 *v, const float *lse, const float *delta,
                   const int32_t *start, int64_t n, int nh, int nkv, int hd,
                   float scale_log2, float scale)
{
    constexpr int LD = HDP + 8, KS = HDP / 16, DN = HDP / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sQ = (bf16 *)smem_raw, *sO = sQ + 64 * LD;
    bf16 *sK0 = sQ + 2 * 64 * LD, *sV0 = sQ + 4 * 64 * LD;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int64_t q0 = (int64_t)(gridDim.x - 1 - blockIdx.x) * 64; /* heaviest first */
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;

    const int64_t r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const int64_t lim0 = r0 < n ? r0 : -1, lim1 = r1 < n ? r1 : -1;
    const int64_t st0 = r0 < n ? start[r0] : 0, st1 = r1 < n ? start[r1] : 0;
    const float L0 = r0 < n ? lse[(int64_t)h * n + r0] * LOG2E : 0.0f;
    const float L1 = r1 < n ? lse[(int64_t)h * n + r1] * LOG2E : 0.0f;
    const float D0 = r0 < n ? delta[(int64_t)h * n + r0] : 0.0f;
    const float D1 = r1 < n ? delta[(int64_t)h * n + r1] : 0.0f;
    float acc[DN][4];
#pragma unroll
    for (int i = 0; i < DN; i++)
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    uint32_t qf[KS][4], of[KS][4]; /* this warp's Q and dO rows, loaded once */

    const int64_t kbeg = start[q0], kend = q0 + 64 < n ? q0 + 64 : n;
    const int64_t smax = start[q0 + 63 < n ? q0 + 63 : n - 1];
    const int ntiles = kn_cdiv_dev(kend - kbeg, 64);
    load_tile<HDP, 64>(sQ, q + h * hd, q0, n, qs, hd, vec);
    load_tile<HDP, 64>(sO, dout + h * hd, q0, n, qs, hd, vec);
    load_tile<HDP, 64>(sK0, k + kh * hd, kbeg, n, ks, hd, vec);
    load_tile<HDP, 64>(sV0, v + kh * hd, kbeg, n, ks, hd, vec);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int64_t kb = kbeg + (int64_t)it * 64;
        bf16 *sK = sK0 + (it & 1) * 64 * LD, *sV = sV0 + (it & 1) * 64 * LD;
        if (it + 1 < ntiles) {
            load_tile<HDP, 64>(sK0 + ((it + 1) & 1) * 64 * LD, k + kh * hd, kb + 64, n, ks,
                               hd, vec);
            load_tile<HDP, 64>(sV0 + ((it + 1) & 1) * 64 * LD, v + kh * hd, kb + 64, n, ks,
                               hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                frag_a<LD>(qf[kk], sQ, warp * 16, kk * 16, lane);
                frag_a<LD>(of[kk], sO, warp * 16, kk * 16, lane);
            }
        }
        const bool full = kb + 63 <= q0 && kb >= smax;
        float sc[8][4], dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                sc[i][e] = dp[i][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                uint32_t b[4];
                frag_b_nk<LD>(b, sK, 16 * j, kk * 16, lane);
                mma_bf16_16816(sc[2 * j], qf[kk], b);
                mma_bf16_16816(sc[2 * j + 1], qf[kk], b + 2);
                frag_b_nk<LD>(b, sV, 16 * j, kk * 16, lane);
                mma_bf16_16816(dp[2 * j], of[kk], b);
                mma_bf16_16816(dp[2 * j + 1], of[kk], b + 2);
            }
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int64_t key = kb + nt * 8 + 2 * t4 + (e & 1);
                bool ok = full || (e < 2 ? (key <= lim0 && key >= st0)
                                         : (key <= lim1 && key >= st1));
                float p = ok ? exp2f(sc[nt][e] * scale_log2 - (e < 2 ? L0 : L1)) : 0.0f;
                sc[nt][e] = p * (dp[nt][e] - (e < 2 ? D0 : D1));
            }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint32_t pa[4] = {pack_bf16x2(sc[2 * j][0], sc[2 * j][1]),
                              pack_bf16x2(sc[2 * j][2], sc[2 * j][3]),
                              pack_bf16x2(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                              pack_bf16x2(sc[2 * j + 1][2], sc[2 * j + 1][3])};
#pragma unroll
            for (int i = 0; i < DN / 2; i++) {
                uint32_t b[4];
                frag_b_kn<LD>(b, sK, 16 * j, 16 * i, lane);
                mma_bf16_16816(acc[2 * i], pa, b);
                mma_bf16_16816(acc[2 * i + 1], pa, b + 2);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < DN; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (r0 < n)
            *(uint32_t *)(dq + r0 * qs + h * hd + col) =
                pack_bf16x2(acc[i][0] * scale, acc[i][1] * scale);
        if (r1 < n)
            *(uint32_t *)(dq + r1 * qs + h * hd + col) =
                pack_bf16x2(acc[i][2] * scale, acc[i][3] * scale);
    }
}

#define BQ_KV 32 /* queries per step of the dk/dv kernel */

template <int HDP>
__global__ void __launch_bounds__(ATT_THREADS)
attn_bwd_dkdv_kernel(bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q,
                     const bf16 *k, const bf16 *v, const float *lse,
                     const float *delta, const int32_t *start, int64_t n,
                     int nh, int nkv, int hd, float scale_log2, float scale)
{
    constexpr int LD = HDP + 8, KS = HDP / 16, DN = HDP / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sK = (bf16 *)smem_raw, *sV = sK + 64 * LD;
    bf16 *sQ0 = sV + 64 * LD;  /* buffer b: Q at sQ0 + 2b BQ_KV LD, dO after it */
    float *sLb = (float *)(sV + 64 * LD + 4 * BQ_KV * LD);  /* (2, BQ_KV) */
    float *sDb = sLb + 2 * BQ_KV;
    int64_t *sSb = (int64_t *)(sDb + 2 * BQ_KV);
    const int kh = blockIdx.y, grp = nh / nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int64_t k0 = (int64_t)blockIdx.x * 64;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;
    const int64_t klast = k0 + 63 < n ? k0 + 63 : n - 1;

    const int64_t kr0 = k0 + warp * 16 + g, kr1 = kr0 + 8;
    float adk[DN][4], adv[DN][4];
#pragma unroll
    for (int i = 0; i < DN; i++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            adk[i][e] = adv[i][e] = 0.0f;

    /* the query tiles that see these keys: from k0 while the tile's first
     * query's document starts at or before the last key; the same for
     * every q head of the group. Iteration it: head it / nq, tile it % nq. */
    int nq = 0;
    for (int64_t qb = k0; qb < n && start[qb] <= klast; qb += BQ_KV)
        nq++;
    const int iters = nq * grp;
    load_tile<HDP, 64>(sK, k + kh * hd, k0, n, ks, hd, vec);
    load_tile<HDP, 64>(sV, v + kh * hd, k0, n, ks, hd, vec);
    for (int it = 0; it <= iters; it++) {
        /* stage iteration it's query tile (it < iters) while computing
         * it - 1's */
        if (it < iters) {
            const int h = kh * grp + it / nq, buf = it & 1;
            const int64_t qb = k0 + (int64_t)(it % nq) * BQ_KV;
            load_tile<HDP, BQ_KV>(sQ0 + 2 * buf * BQ_KV * LD, q + h * hd, qb, n, qs, hd, vec);
            load_tile<HDP, BQ_KV>(sQ0 + (2 * buf + 1) * BQ_KV * LD, dout + h * hd, qb, n, qs,
                                  hd, vec);
            cp_async_commit();
            if (threadIdx.x < BQ_KV) {
                int64_t qi = qb + threadIdx.x;
                bool in = qi < n;
                sLb[buf * BQ_KV + threadIdx.x] = in ? lse[(int64_t)h * n + qi] * LOG2E : 0.0f;
                sDb[buf * BQ_KV + threadIdx.x] = in ? delta[(int64_t)h * n + qi] : 0.0f;
                sSb[buf * BQ_KV + threadIdx.x] = in ? (int64_t)start[qi] : INT64_MAX;
            }
        }
        if (it == 0)
            continue;
        if (it < iters)
            cp_async_wait<1>();
        else
            cp_async_wait<0>();
        __syncthreads();
        {
            const int buf = (it - 1) & 1;
            const int64_t qb = k0 + (int64_t)((it - 1) % nq) * BQ_KV;
            const bf16 *sQ = sQ0 + 2 * buf * BQ_KV * LD, *sO = sQ + BQ_KV * LD;
            const float *sL = sLb + buf * BQ_KV, *sD = sDb + buf * BQ_KV;
            const int64_t *sS = sSb + buf * BQ_KV;
            const bool full = k0 + 63 <= qb && qb + BQ_KV <= n &&
                              k0 >= start[qb + BQ_KV - 1];
            float st[4][4], dpt[4][4];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    st[i][e] = dpt[i][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t ka[4], va[4];
                frag_a<LD>(ka, sK, warp * 16, kk * 16, lane);
                frag_a<LD>(va, sV, warp * 16, kk * 16, lane);
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    uint32_t b[4];
                    frag_b_nk<LD>(b, sQ, 16 * j, kk * 16, lane);
                    mma_bf16_16816(st[2 * j], ka, b);
                    mma_bf16_16816(st[2 * j + 1], ka, b + 2);
                    frag_b_nk<LD>(b, sO, 16 * j, kk * 16, lane);
                    mma_bf16_16816(dpt[2 * j], va, b);
                    mma_bf16_16816(dpt[2 * j + 1], va, b + 2);
                }
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qi = nt * 8 + 2 * t4 + (e & 1);
                    int64_t query = qb + qi;
                    int64_t key = e < 2 ? kr0 : kr1;
                    bool ok = full || (key <= query && key >= sS[qi]);
                    float p = ok ? exp2f(st[nt][e] * scale_log2 - sL[qi]) : 0.0f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - sD[qi]);
                }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                uint32_t pa[4] = {pack_bf16x2(st[2 * j][0], st[2 * j][1]),
                                  pack_bf16x2(st[2 * j][2], st[2 * j][3]),
                                  pack_bf16x2(st[2 * j + 1][0], st[2 * j + 1][1]),
                                  pack_bf16x2(st[2 * j + 1][2], st[2 * j + 1][3])};
                uint32_t da[4] = {pack_bf16x2(dpt[2 * j][0], dpt[2 * j][1]),
                                  pack_bf16x2(dpt[2 * j][2], dpt[2 * j][3]),
                                  pack_bf16x2(dpt[2 * j + 1][0], dpt[2 * j + 1][1]),
                                  pack_bf16x2(dpt[2 * j + 1][2], dpt[2 * j + 1][3])};
#pragma unroll
                for (int i = 0; i < DN / 2; i++) {
                    uint32_t b[4];
                    frag_b_kn<LD>(b, sO, 16 * j, 16 * i, lane);
                    mma_bf16_16816(adv[2 * i], pa, b);
                    mma_bf16_16816(adv[2 * i + 1], pa, b + 2);
                    frag_b_kn<LD>(b, sQ, 16 * j, 16 * i, lane);
                    mma_bf16_16816(adk[2 * i], da, b);
                    mma_bf16_16816(adk[2 * i + 1], da, b + 2);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < DN; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (kr0 < n) {
            *(uint32_t *)(dk + kr0 * ks + kh * hd + col) =
                pack_bf16x2(adk[i][0] * scale, adk[i][1] * scale);
            *(uint32_t *)(dv + kr0 * ks + kh * hd + col) =
                pack_bf16x2(adv[i][0], adv[i][1]);
        }
        if (kr1 < n) {
            *(uint32_t *)(dk + kr1 * ks + kh * hd + col) =
                pack_bf16x2(adk[i][2] * scale, adk[i][3] * scale);
            *(uint32_t *)(dv + kr1 * ks + kh * hd + col) =
                pack_bf16x2(adv[i][2], adv[i][3]);
        }
    }
}

/* Shared memory: the fixed tiles plus two buffers of the streamed ones. */
static size_t fwd_smem(int hdp) { return (size_t)5 * 64 * (hdp + 8) * sizeof(bf16); }
static size_t fwd2_smem(int hdp) { return (size_t)(FQ + 4 * 64) * (hdp + 8) * sizeof(bf16); }
static size_t dq_smem(int hdp) { return (size_t)6 * 64 * (hdp + 8) * sizeof(bf16); }
static size_t dkdv_smem(int hdp)
{
    return (size_t)(2 * 64 + 4 * BQ_KV) * (hdp + 8) * sizeof(bf16) +
           2 * BQ_KV * (2 * sizeof(float) + sizeof(int64_t));
}

static int pad_hd(int hd) { return hd <= 16 ? 16 : hd <= 32 ? 32 : hd <= 64 ? 64 : 128; }

static void check_shapes(int64_t n, int nh, int nkv, int hd)
{
    KN_REQUIRE(n > 0 && n < ((int64_t)1 << 31) / 64 * 64);
    KN_REQUIRE(nh > 0 && nkv > 0 && nh % nkv == 0 && nh <= 65535);
    KN_REQUIRE(hd > 0 && hd <= 128 && hd % 2 == 0);
}

/* KN_ATTN_FWD_V1=1: the first forward kernel, for comparisons (read at
 * every launch, so a benchmark can time both in one process). */
static int fwd_v1(void)
{
    const char *e = getenv("KN_ATTN_FWD_V1");
    return e && *e && strcmp(e, "0") != 0;
}

template <int HDP>
static void fwd_launch(kn_bf16 *o, float *lse, const kn_bf16 *q,
                       const kn_bf16 *k, const kn_bf16 *v, const int32_t *start,
                       int64_t n, int nh, int nkv, int hd, cudaStream_t s)
{
    static int attr_set;
    float sl = LOG2E / sqrtf((float)hd);
    if (fwd_v1()) {
        size_t sm = fwd_smem(HDP);
        KN_REQUIRE(sm <= kn_smem_optin());
        if (!(attr_set & 1)) {
            CUDA_CHECK(cudaFuncSetAttribute(attn_fwd_kernel<HDP>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
            attr_set |= 1;
        }
        dim3 grid(kn_cdiv(n, 64), nh);
        attn_fwd_kernel<HDP><<<grid, ATT_THREADS, sm, s>>>(
            (bf16 *)o, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
            start, n, nh, nkv, hd, sl);
        KN_CHECK_LAUNCH("attn_fwd");
        return;
    }
    size_t sm = fwd2_smem(HDP);
    KN_REQUIRE(sm <= kn_smem_optin());
    if (!(attr_set & 2)) {
        CUDA_CHECK(cudaFuncSetAttribute(attn_fwd2_kernel<HDP>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
        attr_set |= 2;
    }
    dim3 grid(kn_cdiv(n, FQ), nh);
    attn_fwd2_kernel<HDP><<<grid, ATT_THREADS, sm, s>>>(
        (bf16 *)o, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
        start, (int)n, nh, nkv, hd, sl);
    KN_CHECK_LAUNCH("attn_fwd2");
}

template <int HDP>
static void bwd_launch(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv, const float *delta,
                       const kn_bf16 *dout, const kn_bf16 *q, const kn_bf16 *k,
                       const kn_bf16 *v, const float *lse, const int32_t *start,
                       int64_t n, int nh, int nkv, int hd, cudaStream_t s)
{
    static int attr_set;
    size_t sm1 = dq_smem(HDP), sm2 = dkdv_smem(HDP);
    KN_REQUIRE(sm1 <= kn_smem_optin() && sm2 <= kn_smem_optin());
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dq_kernel<HDP>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm1));
        CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dkdv_kernel<HDP>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm2));
        attr_set = 1;
    }
    float scale = 1.0f / sqrtf((float)hd), sl = LOG2E * scale;
    dim3 g1(kn_cdiv(n, 64), nh);
    attn_bwd_dq_kernel<HDP><<<g1, ATT_THREADS, sm1, s>>>(
        (bf16 *)dq, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
        (const bf16 *)v, lse, delta, start, n, nh, nkv, hd, sl, scale);
    KN_CHECK_LAUNCH("attn_bwd_dq");
    dim3 g2(kn_cdiv(n, 64), nkv);
    attn_bwd_dkdv_kernel<HDP><<<g2, ATT_THREADS, sm2, s>>>(
        (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
        (const bf16 *)k, (const bf16 *)v, lse, delta, start, n, nh, nkv, hd,
        sl, scale);
    KN_CHECK_LAUNCH("attn_bwd_dkdv");
}

extern "C" void kn_attention_forward(kn_bf16 *o, float *lse, const kn_bf16 *q,
                                     const kn_bf16 *k, const kn_bf16 *v,
                                     const int32_t *start, int64_t n, int nh,
                                     int nkv, int hd, cudaStream_t s)
{
    check_shapes(n, nh, nkv, hd);
    switch (pad_hd(hd)) {
    case 16: fwd_launch<16>(o, lse, q, k, v, start, n, nh, nkv, hd, s); break;
    case 32: fwd_launch<32>(o, lse, q, k, v, start, n, nh, nkv, hd, s); break;
    case 64: fwd_launch<64>(o, lse, q, k, v, start, n, nh, nkv, hd, s); break;
    default: fwd_launch<128>(o, lse, q, k, v, start, n, nh, nkv, hd, s); break;
    }
}

extern "C" void kn_attention_backward(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv,
                                      float *delta, const kn_bf16 *dout,
                                      const kn_bf16 *q, const kn_bf16 *k,
                                      const kn_bf16 *v, const kn_bf16 *o,
                                      const float *lse, const int32_t *start,
                                      int64_t n, int nh, int nkv, int hd,
                                      cudaStream_t s)
{
    check_shapes(n, nh, nkv, hd);
    attn_delta_kernel<<<kn_cdiv(n * nh, 8), 256, 0, s>>>(
        delta, (const bf16 *)dout, (const bf16 *)o, n, nh, hd);
    KN_CHECK_LAUNCH("attn_delta");
    switch (pad_hd(hd)) {
    case 16: bwd_launch<16>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, s); break;
    case 32: bwd_launch<32>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, s); break;
    case 64: bwd_launch<64>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, s); break;
    default: bwd_launch<128>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, s); break;
    }
}
