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
 *     transposes, no atomics, deterministic results. A one-pass backward
 *     (the dk/dv kernel also adding dS K to an fp32 dq in a fixed order,
 *     FlashAttention-3's deterministic scheme) is opt-in,
 *     KN_ATTN_BWD_1PASS=1: slower here (bench/RESULTS.md, "train,
 *     one-pass attention backward (issue 7)").
 * Shared-memory rows are padded by 16 bytes so ldmatrix hits 8 distinct
 * bank groups. Scores are kept in the log2 domain (exp2f) with the scale
 * folded in. */
#include "common.cuh"
#include "wgmma.cuh"

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

__device__ __forceinline__ float bf16_round(float x)
{
    return __bfloat162float(__float2bfloat16(x));
}

/* The dq and dk outputs of a row with the inverse rotary embedding applied
 * (kernels/rope.cu, kn_rope_backward): the gradient is rounded to bf16 as
 * it would be stored, then rotated with rope8_kernel's arithmetic (pinned
 * there and here with intrinsics: fma(a, c, -(b sn)), fma(b, c, a sn),
 * sn = -sin), so the bits are those of the separate pass. This lane's
 * pair col, col + 1 of group i pairs with col + hd/2, group i + HDP/16 of
 * the same lane, as hd == HDP. acc[i][2hf], acc[i][2hf + 1] are the row's
 * values before the scale; tab its (cos, sin) pairs (kn_rope_table). */
template <int HDP>
__device__ __forceinline__ void store_rope_row(bf16 *dst, const float (*acc)[4], int hf,
                                               float scale, const float *tab, int t4)
{
    constexpr int PH = HDP / 16, HALF = HDP / 2;
#pragma unroll
    for (int i = 0; i < PH; i++) {
        const int col = i * 8 + 2 * t4;
        float4 cs = *(const float4 *)(tab + 2 * col); /* cos, sin of col, col + 1 */
        float a0 = bf16_round(acc[i][2 * hf] * scale);
        float a1 = bf16_round(acc[i][2 * hf + 1] * scale);
        float b0 = bf16_round(acc[i + PH][2 * hf] * scale);
        float b1 = bf16_round(acc[i + PH][2 * hf + 1] * scale);
        float s0 = -cs.y, s1 = -cs.w;
        *(uint32_t *)(dst + col) = pack_bf16x2(__fmaf_rn(a0, cs.x, -__fmul_rn(b0, s0)),
                                               __fmaf_rn(a1, cs.z, -__fmul_rn(b1, s1)));
        *(uint32_t *)(dst + col + HALF) = pack_bf16x2(__fmaf_rn(b0, cs.x, __fmul_rn(a0, s0)),
                                                      __fmaf_rn(b1, cs.z, __fmul_rn(a1, s1)));
    }
}

/* rope non-NULL (hd == HDP): dq leaves with the inverse rotary embedding
 * applied (store_rope_row). (Computing delta here too, each warp for its
 * 16 rows, instead of in attn_delta_kernel was tried: the row loads at the
 * start of every block cost ~0.3 ms more than the separate pass at
 * Llama 2 7B's shape.) */
template <int HDP>
__global__ void __launch_bounds__(ATT_THREADS, 2)
attn_bwd_dq_kernel(bf16 *dq, const bf16 *dout, const bf16 *q, const bf16 *k,
                   const bf16 *v, const float *lse, const float *delta,
                   const int32_t *start, int64_t n, int nh, int nkv, int hd,
                   float scale_log2, float scale, const float *rope)
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
    if (rope) {
        if (r0 < n)
            store_rope_row<HDP>(dq + r0 * qs + h * hd, acc, 0, scale, rope + r0 * hd, t4);
        if (r1 < n)
            store_rope_row<HDP>(dq + r1 * qs + h * hd, acc, 1, scale, rope + r1 * hd, t4);
        return;
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
#define LDS_DS (BQ_KV + 8) /* row of the one-pass kernel's dS^T tile in shared memory */

/* The one-pass backward's ordered dQ accumulation (see attn_bwd_dkdv_kernel
 * with DQ): a (row tile, head) counter, polled with relaxed loads (issued
 * early, they do not stall the warp until used), then an acquire fence
 * before the dQ sums are read; released by a fence and an increment. */
__device__ __forceinline__ unsigned ld_relaxed_u32(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned ld_acquire_u32(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void dq_release(unsigned *cnt, int lane)
{
    __threadfence();
    __syncwarp();
    if (lane == 0) {
        __threadfence();
        atomicAdd(cnt, 1u);
    }
}

/* One pass: query tile qb's (head h) share of dQ from this block's 64 keys
 * (k0..), dS (BQ_KV x 64, sdS holds dS^T) times K (64 x HDP), added to
 * dqacc in descending key-block order (attn_bwd_dkdv_kernel below) once
 * the counter cnt reaches `target` (c: its value polled earlier). Warp w
 * takes all 32 queries and a quarter of the columns (HDP >= 64), or 16
 * queries and 16 columns (smaller heads; some warps idle). first: write,
 * do not add; last: write dq in bf16. The caller releases cnt later (after
 * its next tile's products), so that the fence finds the stores done. */
template <int HDP>
__device__ __forceinline__ void dq_tile(bf16 *dq, float *dqacc, const unsigned *cnt,
                                        unsigned c, unsigned target, bool first, bool last,
                                        int mode,
                                        const bf16 *sdS, const bf16 *sK, int64_t qb, int h,
                                        int64_t n, int nh, int hd, float scale, int warp,
                                        int lane)
{
    constexpr int LD = HDP + 8, NP = HDP / 16;
    constexpr int MTW = NP >= 4 ? 2 : 1, NPW = NP >= 4 ? NP / 4 : 1;
    const int mt0 = NP >= 4 ? 0 : (warp & 1), p0 = NP >= 4 ? warp * NPW : (warp >> 1);
    const int g = lane >> 2, t4 = lane & 3;
    const bool act = p0 < NP;
    float acc[MTW][2 * NPW][4];
#pragma unroll
    for (int mt = 0; mt < MTW; mt++)
#pragma unroll
        for (int cc = 0; cc < 2 * NPW; cc++)
            acc[mt][cc][0] = acc[mt][cc][1] = acc[mt][cc][2] = acc[mt][cc][3] = 0.0f;
    if (act) {
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[MTW][4];
#pragma unroll
            for (int mt = 0; mt < MTW; mt++)
                frag_a_t<LDS_DS>(a[mt], sdS, 16 * kk, 16 * (mt0 + mt), lane);
#pragma unroll
            for (int p = 0; p < NPW; p++) {
                uint32_t b[4];
                frag_b_kn<LD>(b, sK, 16 * kk, 16 * (p0 + p), lane);
#pragma unroll
                for (int mt = 0; mt < MTW; mt++) {
                    mma_bf16_16816(acc[mt][2 * p], a[mt], b);
                    mma_bf16_16816(acc[mt][2 * p + 1], a[mt], b + 2);
                }
            }
        }
    }
    /* an idle warp waits too: its release counts only after its turn */
    if (!first && mode == 0) {
        while (c < target) {
            __nanosleep(32);
            c = ld_relaxed_u32(cnt);
        }
        asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
    } else if (!first && mode == 1) {
        while (ld_acquire_u32(cnt) < target)
            __nanosleep(32);
    }
    if (!act)
        return;
    const int64_t qs = (int64_t)nh * hd;
    float *base = dqacc + (int64_t)h * hd;
    if (!first) {
#pragma unroll
        for (int mt = 0; mt < MTW; mt++)
#pragma unroll
            for (int cc = 0; cc < 2 * NPW; cc++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    int64_t r = qb + 16 * (mt0 + mt) + 8 * hf + g;
                    int col = 16 * p0 + 8 * cc + 2 * t4;
                    if (r < n && col < hd) {
                        float2 o = __ldcg((const float2 *)(base + r * qs + col));
                        acc[mt][cc][2 * hf] += o.x;
                        acc[mt][cc][2 * hf + 1] += o.y;
                    }
                }
    }
#pragma unroll
    for (int mt = 0; mt < MTW; mt++)
#pragma unroll
        for (int cc = 0; cc < 2 * NPW; cc++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                int64_t r = qb + 16 * (mt0 + mt) + 8 * hf + g;
                int col = 16 * p0 + 8 * cc + 2 * t4;
                if (r >= n || col >= hd)
                    continue;
                if (last) {
                    *(uint32_t *)(dq + r * qs + h * hd + col) = pack_bf16x2(
                            acc[mt][cc][2 * hf] * scale, acc[mt][cc][2 * hf + 1] * scale);
                } else {
                    __stcg((float2 *)(base + r * qs + col),
                           make_float2(acc[mt][cc][2 * hf], acc[mt][cc][2 * hf + 1]));
                }
            }
}

/* DQ false: the dk/dv kernel of the two-pass backward. DQ true: the
 * one-pass backward (FlashAttention-3's deterministic scheme): the same
 * walk over the query tiles that see this block's 64 keys also computes
 * the tile's dQ share, dS K (dS^T goes through shared memory, so that each
 * warp takes a band of dQ's columns over all 64 keys), and adds it to an
 * fp32 dQ in global memory (dqacc, laid out as dq) without atomics, in a
 * fixed order: the key blocks that see query tile i are the contiguous
 * range jlo = start[qb] / 64 .. jhi = qb / 64 (qb its first query), and
 * they add in descending order, block j's warps waiting until the
 * (tile, head) counter reaches 4 (jhi - j), i.e. until all four warps of
 * every block above j have added theirs and released. The first (jhi)
 * writes instead of adding, so dqacc needs no clearing (the counters do:
 * the caller zeroes them); the last (jlo) writes dq in bf16, scaled,
 * instead of the fp32 sum. Blocks run from the last key block down
 * (blockIdx.x reversed), so block j + 1, whose tiles start 64 queries
 * later, is always dispatched before j and is about two tiles ahead of it:
 * the wait is short and no block waits for one that is not resident. Every
 * tile of the range is visited (fully masked ones included), so the count
 * is exact. The sum's order is fixed: bit-identical runs.
 * mode (KN_ATTN_BWD1_MODE): 1 (default) block turns: the counter counts
 * blocks, thread 0 releases after a barrier, warps poll with ld.acquire;
 * 0 warp turns: each warp polls (relaxed, then an acquire fence) and
 * releases its own share (4 per block). (Two timing diagnostics, since
 * removed, gave the costs below: adding without turns, and leaving out
 * the fp32 traffic.) A warp releases its tile's count only at its next tile's
 * dq step (or at the end), so the fence finds the stores long done.
 * Status (H100, bench/RESULTS.md): slower than the two kernels, 4.42 vs
 * 3.68 ms at the 7B shape; even without any dq traffic (mode 3) it takes
 * 3.35 ms, so the fifth product and its barrier cost more than the dq
 * kernel's three products saved would suggest; opt-in. */
template <int HDP, bool DQ>
__global__ void __launch_bounds__(ATT_THREADS)
attn_bwd_dkdv_kernel(bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q,
                     const bf16 *k, const bf16 *v, const float *lse,
                     const float *delta, const int32_t *start, int64_t n,
                     int nh, int nkv, int hd, float scale_log2, float scale,
                     bf16 *dq, float *dqacc, unsigned *dqcnt, int mode,
                     const float *rope)
{
    constexpr int LD = HDP + 8, KS = HDP / 16, DN = HDP / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sK = (bf16 *)smem_raw, *sV = sK + 64 * LD;
    bf16 *sQ0 = sV + 64 * LD;  /* buffer b: Q at sQ0 + 2b BQ_KV LD, dO after it */
    float *sLb = (float *)(sV + 64 * LD + 4 * BQ_KV * LD);  /* (2, BQ_KV) */
    float *sDb = sLb + 2 * BQ_KV;
    int64_t *sSb = (int64_t *)(sDb + 2 * BQ_KV);
    bf16 *sdS = (bf16 *)(sSb + 2 * BQ_KV); /* DQ: dS^T, (64 keys, LDS_DS) */
    const int kh = blockIdx.y, grp = nh / nkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int64_t k0 = (int64_t)(DQ ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * 64;
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
    unsigned *pend = NULL; /* DQ: the counter this block's warps release next */
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
            /* DQ: this tile's turn (dq_tile); the counter polled now, used
             * after the products */
            const int h = kh * grp + (it - 1) / nq;
            const int jb = (int)(k0 / 64), jhi = (int)(qb / 64), jlo = (int)(sS[0] / 64);
            unsigned *cnt = DQ ? dqcnt + (int64_t)h * ((n + BQ_KV - 1) / BQ_KV) + qb / BQ_KV
                               : NULL;
            const unsigned target = (mode == 1 ? 1u : 4u) * (unsigned)(jhi - jb);
            const unsigned c = DQ && jb < jhi && mode == 0 ? ld_relaxed_u32(cnt) : 0u;
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
                if constexpr (DQ) { /* dS^T (keys, queries) for dQ = dS K */
                    bf16 *r0 = sdS + (warp * 16 + g) * LDS_DS + 16 * j + 2 * t4;
                    *(uint32_t *)r0 = da[0];
                    *(uint32_t *)(r0 + 8 * LDS_DS) = da[1];
                    *(uint32_t *)(r0 + 8) = da[2];
                    *(uint32_t *)(r0 + 8 * LDS_DS + 8) = da[3];
                }
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
            if constexpr (DQ) {
                __syncthreads();
                if (pend && mode == 0) {
                    dq_release(pend, lane);
                } else if (pend && mode == 1 && threadIdx.x == 0) {
                    __threadfence(); /* the block's sums, ordered by the barrier */
                    atomicAdd(pend, 1u);
                }
                dq_tile<HDP>(dq, dqacc, cnt, c, target, jb == jhi, jb == jlo, mode, sdS, sK,
                             qb, h, n, nh, hd, scale, warp, lane);
                pend = jb > jlo ? cnt : NULL;
            }
        }
        __syncthreads();
    }
    if (DQ && pend && mode == 0) {
        dq_release(pend, lane);
    } else if (DQ && pend && mode == 1) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(pend, 1u);
        }
    }
    /* rope non-NULL (hd == HDP): dk with the inverse rotary embedding */
    if (rope) {
        if (kr0 < n)
            store_rope_row<HDP>(dk + kr0 * ks + kh * hd, adk, 0, scale, rope + kr0 * hd, t4);
        if (kr1 < n)
            store_rope_row<HDP>(dk + kr1 * ks + kh * hd, adk, 1, scale, rope + kr1 * hd, t4);
    }
#pragma unroll
    for (int i = 0; i < DN; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (kr0 < n) {
            if (!rope)
                *(uint32_t *)(dk + kr0 * ks + kh * hd + col) =
                    pack_bf16x2(adk[i][0] * scale, adk[i][1] * scale);
            *(uint32_t *)(dv + kr0 * ks + kh * hd + col) =
                pack_bf16x2(adv[i][0], adv[i][1]);
        }
        if (kr1 < n) {
            if (!rope)
                *(uint32_t *)(dk + kr1 * ks + kh * hd + col) =
                    pack_bf16x2(adk[i][2] * scale, adk[i][3] * scale);
            *(uint32_t *)(dv + kr1 * ks + kh * hd + col) =
                pack_bf16x2(adv[i][2], adv[i][3]);
        }
    }
}

/* --- Hopper path: wgmma (sm_90a) ------------------------------------------
 * The mma.sync kernels above are bound by ldmatrix: every warp fetches its
 * own copy of each B fragment, two shared-memory bytes for every ~2 FLOPs
 * of tensor work. wgmma lets a warpgroup (4 warps, 64 rows) read B straight
 * from shared memory once, so the products below run on it: A comes from
 * registers (Q, dO, P, dS) or shared memory (K, V in the dk/dv kernel),
 * accumulators stay in registers in the same C layout as mma.sync (warp w
 * of the group owns rows 16w..16w+15), so softmax and masking code is the
 * same as above, and P and dS turn into the next product's A operand
 * without leaving registers.
 * Tiles live in shared memory in the "core matrix" layout that wgmma reads
 * without swizzling: 8 rows x 16 bytes contiguous (128 B), the 8-column
 * chunks of a row group next to each other (128 B apart), row groups
 * 16 HDP bytes apart. One tile serves both as a K-major operand (K^T in
 * Q K^T: leading byte offset 128, stride 16 HDP) and as an MN-major one
 * (K in dS K, transposed by the instruction: leading 16 HDP, stride 128).
 * Same function and the same no-atomics structure as the kernels above:
 * a dq kernel per query block and a dk/dv kernel per key block.
 * Status: correct and deterministic, but slower than the mma.sync kernels
 * on an H100 (bench/RESULTS.md, "train, attention kernels (issue 7)"):
 * each warpgroup waits for its products before the softmax and the two
 * warpgroups of a block meet at a barrier every tile, so the tensor cores
 * idle during the elementwise work; the fix is warp specialization (a
 * producer warp, two consumer warpgroups taking turns) as in
 * FlashAttention-3. Hence opt-in: KN_ATTN_WGMMA=1, head sizes padded to
 * 128 on compute capability 9.x only; KN_ATTN_WG_NOSWIZZLE=1 the
 * unswizzled tiles. */

/* element offset of (r, c) in a core-matrix tile of HDP columns */
template <int HDP> __device__ __forceinline__ int cm_off(int r, int c)
{
    return (r >> 3) * (8 * HDP) + (c >> 3) * 64 + (r & 7) * 8 + (c & 7);
}

/* element offset of (r, c) in a ROWS x HDP tile: SW false, core matrices
 * (above); SW true, the 128-byte swizzle: HDP / 64 column blocks of ROWS
 * rows of 128 bytes, 16-byte chunk j of row r stored at j ^ (r & 7), so
 * that the eight rows of a core matrix fall in distinct banks (the
 * unswizzled layout puts the same row of adjacent core matrices, 16 HDP
 * bytes apart, in one bank group). Blocks start 1024-byte aligned. */
template <int HDP, int ROWS, bool SW> __device__ __forceinline__ int t_off(int r, int c)
{
    if (SW)
        return (c >> 6) * (ROWS * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
    return cm_off<HDP>(r, c);
}

/* ROWS x HDP tile from global rows row0.. (as load_tile); eight
 * consecutive threads fill one 128-byte core matrix (or swizzled row) */
template <int HDP, int ROWS, int NT, bool SW>
__device__ __forceinline__ void load_cm(bf16 *s, const bf16 *g, int row0, int n,
                                        int64_t stride, int hd, bool vec)
{
    constexpr int CH = HDP / 8;
    for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
        int r = SW ? i / CH : (i / (8 * CH)) * 8 + (i & 7);
        int c = SW ? (i % CH) * 8 : ((i >> 3) % CH) * 8;
        bf16 *dst = s + t_off<HDP, ROWS, SW>(r, c);
        int row = row0 + r;
        bool in = row < n && c < hd;
        if (vec) {
            cp_async16(dst, in ? g + (int64_t)row * stride + c : g, in ? 16 : 0);
            continue;
        }
        uint4 val = make_uint4(0, 0, 0, 0);
        if (in) {
            const bf16 *src = g + (int64_t)row * stride + c;
            bf16 *vb = (bf16 *)&val;
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (c + j < hd)
                    vb[j] = src[j];
        }
        *(uint4 *)dst = val;
    }
}

/* A fragment (16 x 16 from (row, col)) of such a tile */
template <int HDP, int ROWS, bool SW>
__device__ __forceinline__ void frag_a_cm(uint32_t *a, const bf16 *s, int row, int col,
                                          int lane)
{
    ldmatrix_x4(a, s + t_off<HDP, ROWS, SW>(row + (lane & 15), col + ((lane >> 4) << 3)));
}


/* the tile as a K-major operand (rows: M or N, columns: K) from row r0,
 * columns 16 kk.. (inside a swizzled block the start moves by 32 bytes a
 * step, the hardware applying the swizzle to the address) */
template <int HDP, int ROWS, bool SW>
__device__ __forceinline__ uint64_t desc_k(const bf16 *t, int r0, int kk)
{
    if (SW)
        return wg_desc(t + (kk >> 2) * (ROWS * 64) + r0 * 64 + (kk & 3) * 16, 16, 1024) |
               (1ull << 62);
    return wg_desc(t + cm_off<HDP>(r0, 16 * kk), 128, 16 * HDP);
}

/* the tile as an MN-major operand (rows: K, columns: N), rows 16 kk.. */
template <int HDP, int ROWS, bool SW>
__device__ __forceinline__ uint64_t desc_mn(const bf16 *t, int kk)
{
    if (SW)
        return wg_desc(t + kk * 16 * 64, ROWS * 128, 1024) | (1ull << 62);
    return wg_desc(t + kk * 16 * HDP, 16 * HDP, 128);
}

/* D (64 x N) += A (64 x 16, registers) B (16 x N, shared, TB: MN-major) */
template <int N, int TB>
__device__ __forceinline__ void wg_rs(float *d, const uint32_t *a, uint64_t b)
{
    if (N == 64)
        wg_rs64<TB>(d, a, b);
    else
        wg_rs128<TB>(d, a, b);
}

/* A fragments of a 64 x 64 accumulator's column block kk (16 columns),
 * packed to bf16: the layouts line up as with mma.sync */
__device__ __forceinline__ void acc_to_a(uint32_t *a, const float *d, int kk)
{
    a[0] = pack_bf16x2(d[8 * kk + 0], d[8 * kk + 1]);
    a[1] = pack_bf16x2(d[8 * kk + 2], d[8 * kk + 3]);
    a[2] = pack_bf16x2(d[8 * kk + 4], d[8 * kk + 5]);
    a[3] = pack_bf16x2(d[8 * kk + 6], d[8 * kk + 7]);
}

/* Forward: NWG warpgroups of 64 queries each, key tiles of 64 (double
 * buffered); Q fragments in registers, S = Q K^T and O += P V on wgmma,
 * the online softmax as in attn_fwd2_kernel. */
template <int HDP, int NWG, bool SW>
__global__ void __launch_bounds__(128 * NWG, 3 - NWG)
attn_fwd_wg_kernel(bf16 *o, float *lse, const bf16 *q, const bf16 *k,
                   const bf16 *v, const int32_t *start, int n, int nh, int nkv,
                   int hd, float scale_log2)
{
#if WG_ARCH
    constexpr int NT = 128 * NWG, BQ = 64 * NWG, KS = HDP / 16, TS = 64 * HDP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *sm = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    /* sQ, then buffer b: K at sK0 + 2b TS, V after it */
    bf16 *sQ = (bf16 *)sm, *sK0 = sQ + BQ * HDP;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;

    const int w0 = q0 + 64 * wg;
    const bool wact = w0 < n;
    const int wl = w0 + 63 < n ? w0 + 63 : n - 1;
    const int wsmin = wact ? start[w0] : 0, wsmax = wact ? start[wl] : 0;
    const int r0 = w0 + 16 * warp + g, r1 = r0 + 8;
    const int st0 = r0 < n ? start[r0] : INT_MAX, st1 = r1 < n ? start[r1] : INT_MAX;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    float oacc[HDP / 2];
#pragma unroll
    for (int i = 0; i < HDP / 2; i++)
        oacc[i] = 0.0f;
    uint32_t qf[KS][4];

    const int kbeg = start[q0], kend = q0 + BQ < n ? q0 + BQ : n;
    const int ntiles = (kend - kbeg + 63) / 64;
    load_cm<HDP, BQ, NT, SW>(sQ, q + h * hd, q0, n, qs, hd, vec);
    load_cm<HDP, 64, NT, SW>(sK0, k + kh * hd, kbeg, n, ks, hd, vec);
    load_cm<HDP, 64, NT, SW>(sK0 + TS, v + kh * hd, kbeg, n, ks, hd, vec);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int kb = kbeg + it * 64;
        const bf16 *sK = sK0 + (it & 1) * 2 * TS, *sV = sK + TS;
        if (it + 1 < ntiles) {
            bf16 *nK = sK0 + ((it + 1) & 1) * 2 * TS;
            load_cm<HDP, 64, NT, SW>(nK, k + kh * hd, kb + 64, n, ks, hd, vec);
            load_cm<HDP, 64, NT, SW>(nK + TS, v + kh * hd, kb + 64, n, ks, hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
                frag_a_cm<HDP, BQ, SW>(qf[kk], sQ, 64 * wg + 16 * warp, kk * 16, lane);
        }
        if (wact && kb <= wl && kb + 63 >= wsmin) {
            const bool full = kb + 63 <= w0 && kb >= wsmax;
            float sc[32];
#pragma unroll
            for (int i = 0; i < 32; i++)
                sc[i] = 0.0f;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
                wg_rs64<0>(sc, qf[kk], desc_k<HDP, 64, SW>(sK, 0, kk));
            wg_commit();
            wg_wait0();
            wg_pin<32>(sc);
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int i = 0; i < 32; i++) {
                float s = sc[i] * scale_log2;
                if (!full) {
                    int key = kb + (i >> 2) * 8 + 2 * t4 + (i & 1);
                    bool ok = (i & 2) ? (key <= r1 && key >= st1) : (key <= r0 && key >= st0);
                    s = ok ? s : -INFINITY;
                }
                sc[i] = s;
                if (i & 2)
                    mx1 = fmaxf(mx1, s);
                else
                    mx0 = fmaxf(mx0, s);
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
            for (int i = 0; i < 32; i++) {
                sc[i] = exp2f(sc[i] - ((i & 2) ? mu1 : mu0));
                if (i & 2)
                    ps1 += sc[i];
                else
                    ps0 += sc[i];
            }
            l0 = l0 * a0 + ps0;
            l1 = l1 * a1 + ps1;
#pragma unroll
            for (int i = 0; i < HDP / 2; i++)
                oacc[i] *= (i & 2) ? a1 : a0;
            uint32_t pa[4][4];
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                acc_to_a(pa[kk], sc, kk);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs<HDP, 1>(oacc, pa[kk], desc_mn<HDP, 64, SW>(sV, kk));
            wg_commit();
            wg_wait0();
            wg_pin<HDP / 2>(oacc);
        }
        __syncthreads();
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int i = 0; i < HDP / 8; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (r0 < n)
            *(uint32_t *)(o + r0 * qs + h * hd + col) =
                pack_bf16x2(oacc[4 * i] * inv0, oacc[4 * i + 1] * inv0);
        if (r1 < n)
            *(uint32_t *)(o + r1 * qs + h * hd + col) =
                pack_bf16x2(oacc[4 * i + 2] * inv1, oacc[4 * i + 3] * inv1);
    }
    if (t4 == 0) {
        if (r0 < n)
            lse[(int64_t)h * n + r0] = m0 * LN2 + logf(l0);
        if (r1 < n)
            lse[(int64_t)h * n + r1] = m1 * LN2 + logf(l1);
    }
#else
    __trap();
#endif
}

/* dq: NWG warpgroups of 64 queries, key tiles of 64; Q and dO fragments in
 * registers: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K. */
template <int HDP, int NWG, bool SW>
__global__ void __launch_bounds__(128 * NWG, 3 - NWG)
attn_bwd_dq_wg_kernel(bf16 *dq, const bf16 *dout, const bf16 *q, const bf16 *k,
                      const bf16 *v, const float *lse, const float *delta,
                      const int32_t *start, int n, int nh, int nkv, int hd,
                      float scale_log2, float scale)
{
#if WG_ARCH
    constexpr int NT = 128 * NWG, BQ = 64 * NWG, KS = HDP / 16, TS = 64 * HDP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *sm = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    bf16 *sQ = (bf16 *)sm, *sO = sQ + BQ * HDP, *sK0 = sO + BQ * HDP;
    const int h = blockIdx.y, kh = h / (nh / nkv);
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ; /* heaviest first */
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;

    const int w0 = q0 + 64 * wg;
    const bool wact = w0 < n;
    const int wl = w0 + 63 < n ? w0 + 63 : n - 1;
    const int wsmin = wact ? start[w0] : 0, wsmax = wact ? start[wl] : 0;
    const int r0 = w0 + 16 * warp + g, r1 = r0 + 8;
    const int st0 = r0 < n ? start[r0] : INT_MAX, st1 = r1 < n ? start[r1] : INT_MAX;
    const float L0 = r0 < n ? lse[(int64_t)h * n + r0] * LOG2E : 0.0f;
    const float L1 = r1 < n ? lse[(int64_t)h * n + r1] * LOG2E : 0.0f;
    const float D0 = r0 < n ? delta[(int64_t)h * n + r0] : 0.0f;
    const float D1 = r1 < n ? delta[(int64_t)h * n + r1] : 0.0f;
    float acc[HDP / 2];
#pragma unroll
    for (int i = 0; i < HDP / 2; i++)
        acc[i] = 0.0f;
    uint32_t qf[KS][4], of[KS][4];

    const int kbeg = start[q0], kend = q0 + BQ < n ? q0 + BQ : n;
    const int ntiles = (kend - kbeg + 63) / 64;
    load_cm<HDP, BQ, NT, SW>(sQ, q + h * hd, q0, n, qs, hd, vec);
    load_cm<HDP, BQ, NT, SW>(sO, dout + h * hd, q0, n, qs, hd, vec);
    load_cm<HDP, 64, NT, SW>(sK0, k + kh * hd, kbeg, n, ks, hd, vec);
    load_cm<HDP, 64, NT, SW>(sK0 + TS, v + kh * hd, kbeg, n, ks, hd, vec);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int kb = kbeg + it * 64;
        const bf16 *sK = sK0 + (it & 1) * 2 * TS, *sV = sK + TS;
        if (it + 1 < ntiles) {
            bf16 *nK = sK0 + ((it + 1) & 1) * 2 * TS;
            load_cm<HDP, 64, NT, SW>(nK, k + kh * hd, kb + 64, n, ks, hd, vec);
            load_cm<HDP, 64, NT, SW>(nK + TS, v + kh * hd, kb + 64, n, ks, hd, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        fence_proxy_async();
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                frag_a_cm<HDP, BQ, SW>(qf[kk], sQ, 64 * wg + 16 * warp, kk * 16, lane);
                frag_a_cm<HDP, BQ, SW>(of[kk], sO, 64 * wg + 16 * warp, kk * 16, lane);
            }
        }
        if (wact && kb <= wl && kb + 63 >= wsmin) {
            const bool full = kb + 63 <= w0 && kb >= wsmax;
            float sc[32], dp[32];
#pragma unroll
            for (int i = 0; i < 32; i++)
                sc[i] = dp[i] = 0.0f;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                wg_rs64<0>(sc, qf[kk], desc_k<HDP, 64, SW>(sK, 0, kk));
                wg_rs64<0>(dp, of[kk], desc_k<HDP, 64, SW>(sV, 0, kk));
            }
            wg_commit();
            wg_wait0();
            wg_pin<32>(sc);
            wg_pin<32>(dp);
#pragma unroll
            for (int i = 0; i < 32; i++) {
                int key = kb + (i >> 2) * 8 + 2 * t4 + (i & 1);
                bool hi = (i & 2) != 0;
                bool ok = full || (hi ? (key <= r1 && key >= st1) : (key <= r0 && key >= st0));
                float p = ok ? exp2f(sc[i] * scale_log2 - (hi ? L1 : L0)) : 0.0f;
                sc[i] = p * (dp[i] - (hi ? D1 : D0));
            }
            uint32_t da[4][4];
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                acc_to_a(da[kk], sc, kk);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs<HDP, 1>(acc, da[kk], desc_mn<HDP, 64, SW>(sK, kk));
            wg_commit();
            wg_wait0();
            wg_pin<HDP / 2>(acc);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < HDP / 8; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (r0 < n)
            *(uint32_t *)(dq + r0 * qs + h * hd + col) =
                pack_bf16x2(acc[4 * i] * scale, acc[4 * i + 1] * scale);
        if (r1 < n)
            *(uint32_t *)(dq + r1 * qs + h * hd + col) =
                pack_bf16x2(acc[4 * i + 2] * scale, acc[4 * i + 3] * scale);
    }
#else
    __trap();
#endif
}

/* dk/dv: NWG warpgroups of 64 keys (K and V stay in shared memory as the
 * A operand), query tiles of 64 (Q, dO and their row statistics double
 * buffered), looping over the q heads of the group: S^T = K Q^T,
 * dP^T = V dO^T, P^T and dS^T in registers, dV += P^T dO, dK += dS^T Q. */
#define WQ 64 /* queries per step of the wgmma dk/dv kernel */

template <int HDP, int NWG, bool SW>
__global__ void __launch_bounds__(128 * NWG, 3 - NWG)
attn_bwd_dkdv_wg_kernel(bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q,
                        const bf16 *k, const bf16 *v, const float *lse,
                        const float *delta, const int32_t *start, int n, int nh,
                        int nkv, int hd, float scale_log2, float scale)
{
#if WG_ARCH
    constexpr int NT = 128 * NWG, BK = 64 * NWG, KS = HDP / 16, TS = WQ * HDP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    /* sK, sV; buffer b: Q at sQ0 + 2b TS, dO after it; then the statistics */
    unsigned char *sm = (unsigned char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    bf16 *sK = (bf16 *)sm, *sV = sK + BK * HDP, *sQ0 = sV + BK * HDP;
    float *sL0 = (float *)(sQ0 + 4 * TS), *sD0 = sL0 + 2 * WQ;
    int *sS0 = (int *)(sD0 + 2 * WQ);
    const int kh = blockIdx.y, grp = nh / nkv;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int k0 = blockIdx.x * BK;
    const int64_t qs = (int64_t)nh * hd, ks = (int64_t)nkv * hd;
    const bool vec = (hd & 7) == 0;
    const int klast = k0 + BK - 1 < n ? k0 + BK - 1 : n - 1;
    const int wk0 = k0 + 64 * wg, wlast = wk0 + 63; /* this warpgroup's keys */
    const int kr0 = wk0 + 16 * warp + g, kr1 = kr0 + 8;
    float adk[HDP / 2], adv[HDP / 2];
#pragma unroll
    for (int i = 0; i < HDP / 2; i++)
        adk[i] = adv[i] = 0.0f;

    /* query tiles from k0 while the tile's first query's document starts
     * at or before the last key; iteration it: head it / nq, tile it % nq */
    int nq = 0;
    for (int qb = k0; qb < n && start[qb] <= klast; qb += WQ)
        nq++;
    const int iters = nq * grp;
    load_cm<HDP, BK, NT, SW>(sK, k + kh * hd, k0, n, ks, hd, vec);
    load_cm<HDP, BK, NT, SW>(sV, v + kh * hd, k0, n, ks, hd, vec);
    for (int it = 0; it <= iters; it++) {
        /* stage iteration it's query tile while computing it - 1's */
        if (it < iters) {
            const int h = kh * grp + it / nq, buf = it & 1;
            const int qb = k0 + (it % nq) * WQ;
            load_cm<HDP, WQ, NT, SW>(sQ0 + 2 * buf * TS, q + h * hd, qb, n, qs, hd, vec);
            load_cm<HDP, WQ, NT, SW>(sQ0 + (2 * buf + 1) * TS, dout + h * hd, qb, n, qs, hd, vec);
            cp_async_commit();
            if (threadIdx.x < WQ) {
                int qi = qb + threadIdx.x;
                bool in = qi < n;
                sL0[buf * WQ + threadIdx.x] = in ? lse[(int64_t)h * n + qi] * LOG2E : 0.0f;
                sD0[buf * WQ + threadIdx.x] = in ? delta[(int64_t)h * n + qi] : 0.0f;
                sS0[buf * WQ + threadIdx.x] = in ? start[qi] : INT_MAX;
            }
        }
        if (it == 0)
            continue;
        if (it < iters)
            cp_async_wait<1>();
        else
            cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        const int buf = (it - 1) & 1;
        const int qb = k0 + ((it - 1) % nq) * WQ;
        const bf16 *sQ = sQ0 + 2 * buf * TS, *sO = sQ + TS;
        const float *sL = sL0 + buf * WQ, *sD = sD0 + buf * WQ;
        const int *sS = sS0 + buf * WQ;
        /* nothing to add: every key after the tile's last query, or before
         * its first query's document (starts only grow) */
        if (wk0 < n && wk0 <= qb + WQ - 1 && sS[0] <= wlast) {
            const bool full = qb >= wlast && qb + WQ <= n && sS[WQ - 1] <= wk0;
            float st[32], dpt[32];
#pragma unroll
            for (int i = 0; i < 32; i++)
                st[i] = dpt[i] = 0.0f;
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                wg_ss64(st, desc_k<HDP, BK, SW>(sK, 64 * wg, kk), desc_k<HDP, WQ, SW>(sQ, 0, kk));
                wg_ss64(dpt, desc_k<HDP, BK, SW>(sV, 64 * wg, kk), desc_k<HDP, WQ, SW>(sO, 0, kk));
            }
            wg_commit();
            wg_wait0();
            wg_pin<32>(st);
            wg_pin<32>(dpt);
            /* P^T first: dV's products run while dS^T is formed */
#pragma unroll
            for (int i = 0; i < 32; i += 2) {
                int qi = (i >> 2) * 8 + 2 * t4;
                float2 Lq = *(const float2 *)(sL + qi);
                int2 Sq = *(const int2 *)(sS + qi);
                int key = (i & 2) ? kr1 : kr0;
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int query = qb + qi + e;
                    bool ok = full || (key <= query && key >= (e ? Sq.y : Sq.x));
                    st[i + e] = ok ? exp2f(st[i + e] * scale_log2 - (e ? Lq.y : Lq.x)) : 0.0f;
                }
            }
            uint32_t pa[4][4], da[4][4];
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                acc_to_a(pa[kk], st, kk);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs<HDP, 1>(adv, pa[kk], desc_mn<HDP, WQ, SW>(sO, kk));
            wg_commit();
#pragma unroll
            for (int i = 0; i < 32; i += 2) {
                int qi = (i >> 2) * 8 + 2 * t4;
                float2 Dq = *(const float2 *)(sD + qi);
                dpt[i] = st[i] * (dpt[i] - Dq.x);
                dpt[i + 1] = st[i + 1] * (dpt[i + 1] - Dq.y);
            }
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                acc_to_a(da[kk], dpt, kk);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_rs<HDP, 1>(adk, da[kk], desc_mn<HDP, WQ, SW>(sQ, kk));
            wg_commit();
            wg_wait0();
            wg_pin<HDP / 2>(adv);
            wg_pin<HDP / 2>(adk);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < HDP / 8; i++) {
        int col = i * 8 + 2 * t4;
        if (col >= hd)
            continue;
        if (kr0 < n) {
            *(uint32_t *)(dk + kr0 * ks + kh * hd + col) =
                pack_bf16x2(adk[4 * i] * scale, adk[4 * i + 1] * scale);
            *(uint32_t *)(dv + kr0 * ks + kh * hd + col) = pack_bf16x2(adv[4 * i], adv[4 * i + 1]);
        }
        if (kr1 < n) {
            *(uint32_t *)(dk + kr1 * ks + kh * hd + col) =
                pack_bf16x2(adk[4 * i + 2] * scale, adk[4 * i + 3] * scale);
            *(uint32_t *)(dv + kr1 * ks + kh * hd + col) =
                pack_bf16x2(adv[4 * i + 2], adv[4 * i + 3]);
        }
    }
#else
    __trap();
#endif
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
/* the one-pass kernel: dS^T besides */
static size_t bwd1_smem(int hdp) { return dkdv_smem(hdp) + (size_t)64 * LDS_DS * sizeof(bf16); }

/* The one-pass backward's workspace: fp32 dQ (n, nh*hd), then a counter
 * per (head, query tile of BQ_KV). */
static size_t ws_dq_bytes(int64_t n, int nh, int hd)
{
    return ((size_t)n * nh * hd * sizeof(float) + 255) / 256 * 256;
}
static size_t ws_cnt_bytes(int64_t n, int nh)
{
    return (size_t)nh * kn_cdiv(n, BQ_KV) * sizeof(unsigned);
}

/* the wgmma kernels: 1024 bytes more, to align the swizzled blocks */
static size_t fwd_wg_smem(int hdp, int nwg)
{
    return (size_t)(64 * nwg + 4 * 64) * hdp * sizeof(bf16) + 1024;
}
static size_t dq_wg_smem(int hdp, int nwg)
{
    return (size_t)(128 * nwg + 4 * 64) * hdp * sizeof(bf16) + 1024;
}
static size_t dkdv_wg_smem(int hdp, int nwg)
{
    return (size_t)(128 * nwg + 4 * WQ) * hdp * sizeof(bf16) +
           2 * WQ * (2 * sizeof(float) + sizeof(int)) + 1024;
}

static int pad_hd(int hd) { return hd <= 16 ? 16 : hd <= 32 ? 32 : hd <= 64 ? 64 : 128; }

static void check_shapes(int64_t n, int nh, int nkv, int hd)
{
    KN_REQUIRE(n > 0 && n < ((int64_t)1 << 31) / 64 * 64);
    KN_REQUIRE(nh > 0 && nkv > 0 && nh % nkv == 0 && nh <= 65535);
    KN_REQUIRE(hd > 0 && hd <= 128 && hd % 2 == 0);
}

/* Kernel choice, read at every launch so that a benchmark can time each
 * in one process: KN_ATTN_FWD_V1=1 the first forward kernel;
 * KN_ATTN_WGMMA=1 the wgmma forward and backward (head sizes padded to
 * 128, compute capability 9.x), with KN_ATTN_FWD_WG, KN_ATTN_DQ_WG and
 * KN_ATTN_DKDV_WG (1 or 2) setting their warpgroups per block. */
static int env_flag(const char *name)
{
    const char *e = getenv(name);
    return e && *e && strcmp(e, "0") != 0;
}

static int env_wg(const char *name, int def)
{
    const char *e = getenv(name);
    return e && (e[0] == '1' || e[0] == '2') && e[1] == 0 ? e[0] - '0' : def;
}

static int fwd_v1(void) { return env_flag("KN_ATTN_FWD_V1"); }

/* sm_90a code exists for compute capability 9.x only */
static int hopper(void)
{
    int dev, major;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    return major == 9;
}

/* raises a kernel's dynamic shared-memory limit once per kernel */
#define ATT_SMEM_ATTR(kernel, bytes, bit)                                                  \
    do {                                                                                   \
        KN_REQUIRE((bytes) <= kn_smem_optin());                                            \
        if (!(attr_set & (bit))) {                                                         \
            CUDA_CHECK(cudaFuncSetAttribute(kernel,                                        \
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,   \
                                            (int)(bytes)));                                \
            attr_set |= (bit);                                                             \
        }                                                                                  \
    } while (0)

template <int HDP, int NWG, bool SW>
static void fwd_wg_launch(kn_bf16 *o, float *lse, const kn_bf16 *q, const kn_bf16 *k,
                          const kn_bf16 *v, const int32_t *start, int64_t n, int nh,
                          int nkv, int hd, float sl, cudaStream_t s)
{
    static int attr_set;
    size_t sm = fwd_wg_smem(HDP, NWG);
    ATT_SMEM_ATTR((attn_fwd_wg_kernel<HDP, NWG, SW>), sm, 1);
    dim3 grid(kn_cdiv(n, 64 * NWG), nh);
    attn_fwd_wg_kernel<HDP, NWG, SW><<<grid, 128 * NWG, sm, s>>>(
        (bf16 *)o, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, start, (int)n, nh,
        nkv, hd, sl);
    KN_CHECK_LAUNCH("attn_fwd_wg");
}

template <int HDP>
static void fwd_launch(kn_bf16 *o, float *lse, const kn_bf16 *q,
                       const kn_bf16 *k, const kn_bf16 *v, const int32_t *start,
                       int64_t n, int nh, int nkv, int hd, cudaStream_t s)
{
    static int attr_set;
    float sl = LOG2E / sqrtf((float)hd);
    if constexpr (HDP == 128) {
        if (!fwd_v1() && env_flag("KN_ATTN_WGMMA") && hopper()) {
            int w = env_wg("KN_ATTN_FWD_WG", 2);
            if (env_flag("KN_ATTN_WG_NOSWIZZLE"))
                fwd_wg_launch<HDP, 2, false>(o, lse, q, k, v, start, n, nh, nkv, hd, sl, s);
            else if (w == 1)
                fwd_wg_launch<HDP, 1, true>(o, lse, q, k, v, start, n, nh, nkv, hd, sl, s);
            else
                fwd_wg_launch<HDP, 2, true>(o, lse, q, k, v, start, n, nh, nkv, hd, sl, s);
            return;
        }
    }
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

template <int HDP, int NWG, bool SW>
static void dq_wg_launch(kn_bf16 *dq, const float *delta, const kn_bf16 *dout,
                         const kn_bf16 *q, const kn_bf16 *k, const kn_bf16 *v,
                         const float *lse, const int32_t *start, int64_t n, int nh,
                         int nkv, int hd, cudaStream_t s)
{
    static int attr_set;
    size_t sm = dq_wg_smem(HDP, NWG);
    ATT_SMEM_ATTR((attn_bwd_dq_wg_kernel<HDP, NWG, SW>), sm, 1);
    float scale = 1.0f / sqrtf((float)hd), sl = LOG2E * scale;
    dim3 grid(kn_cdiv(n, 64 * NWG), nh);
    attn_bwd_dq_wg_kernel<HDP, NWG, SW><<<grid, 128 * NWG, sm, s>>>(
        (bf16 *)dq, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
        lse, delta, start, (int)n, nh, nkv, hd, sl, scale);
    KN_CHECK_LAUNCH("attn_bwd_dq_wg");
}

template <int HDP, int NWG, bool SW>
static void dkdv_wg_launch(kn_bf16 *dk, kn_bf16 *dv, const float *delta,
                           const kn_bf16 *dout, const kn_bf16 *q, const kn_bf16 *k,
                           const kn_bf16 *v, const float *lse, const int32_t *start,
                           int64_t n, int nh, int nkv, int hd, cudaStream_t s)
{
    static int attr_set;
    size_t sm = dkdv_wg_smem(HDP, NWG);
    ATT_SMEM_ATTR((attn_bwd_dkdv_wg_kernel<HDP, NWG, SW>), sm, 1);
    float scale = 1.0f / sqrtf((float)hd), sl = LOG2E * scale;
    dim3 grid(kn_cdiv(n, 64 * NWG), nkv);
    attn_bwd_dkdv_wg_kernel<HDP, NWG, SW><<<grid, 128 * NWG, sm, s>>>(
        (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
        (const bf16 *)v, lse, delta, start, (int)n, nh, nkv, hd, sl, scale);
    KN_CHECK_LAUNCH("attn_bwd_dkdv_wg");
}

/* One pass (attn_bwd_dkdv_kernel with DQ): the counters zeroed, one
 * launch. */
template <int HDP>
static void bwd1_launch(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv, const float *delta,
                        const kn_bf16 *dout, const kn_bf16 *q, const kn_bf16 *k,
                        const kn_bf16 *v, const float *lse, const int32_t *start,
                        int64_t n, int nh, int nkv, int hd, void *ws, cudaStream_t s)
{
    static int attr_set;
    size_t sm = bwd1_smem(HDP);
    ATT_SMEM_ATTR((attn_bwd_dkdv_kernel<HDP, true>), sm, 1);
    float *dqacc = (float *)ws;
    unsigned *cnt = (unsigned *)((char *)ws + ws_dq_bytes(n, nh, hd));
    CUDA_CHECK(cudaMemsetAsync(cnt, 0, ws_cnt_bytes(n, nh), s));
    float scale = 1.0f / sqrtf((float)hd), sl = LOG2E * scale;
    dim3 grid(kn_cdiv(n, 64), nkv);
    const char *e = getenv("KN_ATTN_BWD1_MODE");
    int mode = e && e[0] == '0' && !e[1] ? 0 : 1;
    attn_bwd_dkdv_kernel<HDP, true><<<grid, ATT_THREADS, sm, s>>>(
        (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
        (const bf16 *)v, lse, delta, start, n, nh, nkv, hd, sl, scale, (bf16 *)dq, dqacc, cnt,
        mode, NULL);
    KN_CHECK_LAUNCH("attn_bwd_1pass");
}

/* "0" in the environment: a choice off, for comparisons */
static int env_off(const char *name)
{
    const char *e = getenv(name);
    return e && !strcmp(e, "0");
}

/* The dq and the dk/dv kernels read the same inputs and write different
 * outputs, so KN_ATTN_BWD_STREAMS=1 runs the dk/dv kernel on a second
 * stream beside the dq kernel, each one's last, partly filled wave
 * overlapping the other's blocks. Opt-in: on an H100 at Llama 2 7B's shape
 * it made no difference that the benchmark could see (bench/RESULTS.md,
 * "train, (a) last percent"). Events fork from and join back into the
 * caller's stream, so to the caller it is one step of its stream. Created
 * once per process, for the device current then (each process here drives
 * one device). */
static cudaStream_t bwd_side(cudaStream_t s, cudaEvent_t *join)
{
    static cudaStream_t side;
    static cudaEvent_t fork, done;
    static int dev = -1;
    int d;
    CUDA_CHECK(cudaGetDevice(&d));
    if (dev < 0) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
        CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        dev = d;
    }
    KN_REQUIRE(d == dev);
    CUDA_CHECK(cudaEventRecord(fork, s));
    CUDA_CHECK(cudaStreamWaitEvent(side, fork, 0));
    *join = done;
    return side;
}

template <int HDP>
static void bwd_launch(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv, const float *delta,
                       const kn_bf16 *dout, const kn_bf16 *q, const kn_bf16 *k,
                       const kn_bf16 *v, const float *lse, const int32_t *start,
                       int64_t n, int nh, int nkv, int hd, void *ws, const float *rope,
                       cudaStream_t s)
{
    static int attr_set;
    if constexpr (HDP == 128) {
        if (env_flag("KN_ATTN_WGMMA") && hopper()) {
            if (env_flag("KN_ATTN_WG_NOSWIZZLE")) {
                dq_wg_launch<HDP, 2, false>(dq, delta, dout, q, k, v, lse, start, n, nh, nkv, hd,
                                            s);
                dkdv_wg_launch<HDP, 2, false>(dk, dv, delta, dout, q, k, v, lse, start, n, nh,
                                              nkv, hd, s);
                return;
            }
            if (env_wg("KN_ATTN_DQ_WG", 2) == 1)
                dq_wg_launch<HDP, 1, true>(dq, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, s);
            else
                dq_wg_launch<HDP, 2, true>(dq, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, s);
            if (env_wg("KN_ATTN_DKDV_WG", 2) == 1)
                dkdv_wg_launch<HDP, 1, true>(dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv,
                                             hd, s);
            else
                dkdv_wg_launch<HDP, 2, true>(dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv,
                                             hd, s);
            return;
        }
    }
    if (ws) {
        bwd1_launch<HDP>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, ws, s);
        return;
    }
    size_t sm1 = dq_smem(HDP), sm2 = dkdv_smem(HDP);
    KN_REQUIRE(sm1 <= kn_smem_optin() && sm2 <= kn_smem_optin());
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dq_kernel<HDP>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm1));
        CUDA_CHECK(cudaFuncSetAttribute(attn_bwd_dkdv_kernel<HDP, false>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm2));
        attr_set = 1;
    }
    float scale = 1.0f / sqrtf((float)hd), sl = LOG2E * scale;
    /* dk/dv first: on two streams (opt-in) it takes the SMs first */
    cudaEvent_t join = NULL;
    cudaStream_t s2 = env_flag("KN_ATTN_BWD_STREAMS") ? bwd_side(s, &join) : s;
    dim3 g2(kn_cdiv(n, 64), nkv);
    attn_bwd_dkdv_kernel<HDP, false><<<g2, ATT_THREADS, sm2, s2>>>(
        (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
        (const bf16 *)k, (const bf16 *)v, lse, delta, start, n, nh, nkv, hd,
        sl, scale, NULL, NULL, NULL, 0, rope);
    KN_CHECK_LAUNCH("attn_bwd_dkdv");
    dim3 g1(kn_cdiv(n, 64), nh);
    attn_bwd_dq_kernel<HDP><<<g1, ATT_THREADS, sm1, s>>>(
        (bf16 *)dq, (const bf16 *)dout, (const bf16 *)q, (const bf16 *)k,
        (const bf16 *)v, lse, delta, start, n, nh, nkv, hd, sl, scale, rope);
    KN_CHECK_LAUNCH("attn_bwd_dq");
    if (join) {
        CUDA_CHECK(cudaEventRecord(join, s2));
        CUDA_CHECK(cudaStreamWaitEvent(s, join, 0));
    }
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

extern "C" size_t kn_attention_backward_ws_bytes(int64_t n, int nh, int hd)
{
    return ws_dq_bytes(n, nh, hd) + ws_cnt_bytes(n, nh);
}

/* The one-pass backward only where the caller gives its workspace and
 * KN_ATTN_BWD_1PASS=1 (opt-in: slower than two passes on an H100, see the
 * kernel); KN_ATTN_BWD_2PASS=1 or KN_ATTN_WGMMA=1 (two-pass only) win.
 * With rope given, dq and dk leave with RoPE's inverse applied: on the
 * default path (two passes, mma.sync) and head sizes 16, 32, 64 or 128 by
 * the kernels as they store them, otherwise (or KN_ATTN_ROPE_FUSED=0) by
 * kn_rope_backward after; the same bits either way. */
extern "C" void kn_attention_backward_rope(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv,
                                           float *delta, const kn_bf16 *dout,
                                           const kn_bf16 *q, const kn_bf16 *k,
                                           const kn_bf16 *v, const kn_bf16 *o,
                                           const float *lse, const int32_t *start,
                                           int64_t n, int nh, int nkv, int hd, void *ws,
                                           size_t ws_bytes, const float *rope,
                                           const int32_t *pos, float theta, cudaStream_t s)
{
    check_shapes(n, nh, nkv, hd);
    if (ws_bytes < kn_attention_backward_ws_bytes(n, nh, hd) || env_flag("KN_ATTN_BWD_2PASS") ||
        !env_flag("KN_ATTN_BWD_1PASS"))
        ws = NULL;
    const bool dflt = !ws && !(pad_hd(hd) == 128 && env_flag("KN_ATTN_WGMMA") && hopper());
    const float *frope = dflt && rope && pad_hd(hd) == hd && !env_off("KN_ATTN_ROPE_FUSED")
                             ? rope
                             : NULL;
    KN_REQUIRE(!rope || pos);
    attn_delta_kernel<<<kn_cdiv(n * nh, 8), 256, 0, s>>>(
        delta, (const bf16 *)dout, (const bf16 *)o, n, nh, hd);
    KN_CHECK_LAUNCH("attn_delta");
    switch (pad_hd(hd)) {
    case 16: bwd_launch<16>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, ws, frope, s); break;
    case 32: bwd_launch<32>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, ws, frope, s); break;
    case 64: bwd_launch<64>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, ws, frope, s); break;
    default: bwd_launch<128>(dq, dk, dv, delta, dout, q, k, v, lse, start, n, nh, nkv, hd, ws, frope, s); break;
    }
    if (rope && !frope) {
        kn_rope_backward(dq, pos, n, nh, hd, theta, s);
        kn_rope_backward(dk, pos, n, nkv, hd, theta, s);
    }
}

extern "C" void kn_attention_backward_ws(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv,
                                         float *delta, const kn_bf16 *dout,
                                         const kn_bf16 *q, const kn_bf16 *k,
                                         const kn_bf16 *v, const kn_bf16 *o,
                                         const float *lse, const int32_t *start,
                                         int64_t n, int nh, int nkv, int hd, void *ws,
                                         size_t ws_bytes, cudaStream_t s)
{
    kn_attention_backward_rope(dq, dk, dv, delta, dout, q, k, v, o, lse, start, n, nh, nkv, hd,
                               ws, ws_bytes, NULL, NULL, 0.0f, s);
}

extern "C" void kn_attention_backward(kn_bf16 *dq, kn_bf16 *dk, kn_bf16 *dv,
                                      float *delta, const kn_bf16 *dout,
                                      const kn_bf16 *q, const kn_bf16 *k,
                                      const kn_bf16 *v, const kn_bf16 *o,
                                      const float *lse, const int32_t *start,
                                      int64_t n, int nh, int nkv, int hd,
                                      cudaStream_t s)
{
    kn_attention_backward_ws(dq, dk, dv, delta, dout, q, k, v, o, lse, start, n, nh, nkv, hd,
                             NULL, 0, s);
}
