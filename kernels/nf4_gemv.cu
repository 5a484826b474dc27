/* nf4_gemv.cu: the products of a decoding step, y = res + x W^T for a few
 * rows of x (one per sequence in flight), reading each weight once in its
 * stored form.
 *
 * kn_gen_linear_mma: tensor cores on NF4 (or bf16) weights. A block of 8
 * warps owns 128 output rows, 16 per warp, and one contiguous range of the
 * input dimension (split k: the grid's z), cut into chunks of 64 (one NF4
 * block). The 8 warps read the same chunk of x at the same time (L1 hits).
 * With several splits, each block leaves partial sums in a workspace and
 * the last block of a row range to finish (an atomic counter, reset after
 * use) adds them in split order, so the order of every sum depends on the
 * weight's shape only, never on n. Per chunk a lane loads 16 consecutive
 * weights of two rows (8 bytes of NF4 codes each, one 8-byte load),
 * dequantizes them in registers (quant_map[code] * scale, scale from the
 * 8-bit nested code, as bitsandbytes) and feeds mma.sync m16n8k16 with x
 * as the n side. The k index inside a chunk is permuted (lane t of a
 * quad takes elements 16t .. 16t+15) identically for W and x, which keeps
 * every load contiguous and leaves the dot products unchanged. The next
 * chunk's codes are loaded before the current one is multiplied.
 *
 * kn_gen_linear_f32: CUDA cores, one warp per output row, fp32 weights
 * (f32 checkpoints, LoRA matrices).
 */
#include "common.cuh"
#include "gen_kernels.h"

#define LIN_WARPS 8

struct lin_desc {
    int64_t out, in, ld;
    const uint8_t *codes;
    const float *absmax;
    const uint8_t *absmax_q;
    const float *nested_absmax;
    const float *nested_map;
    const float *quant_map;
    float offset;
    int blocksize, nested_blocksize;
    const bf16 *w16;
    float *y;
    const float *res;
    int64_t ldy;
    int ks_n;   /* splits of the input dimension */
    float *part; /* (ks_n, n, out) partial sums when ks_n > 1 */
};

struct lin_pack {
    lin_desc d[3];
};

/* 16 weights of one row for one chunk, as 8 bf16 pairs. */
template <int WK> struct wraw;
template <> struct wraw<KN_GW_NF4> {
    uint2 c;
    float sc;
};
template <> struct wraw<KN_GW_BF16> {
    uint4 a, b;
};

__device__ __forceinline__ void load_raw(wraw<KN_GW_NF4> &r, const lin_desc &D,
                                         const float *nmap, int64_t row, int c,
                                         int t)
{
    int64_t e0 = row * D.in + (int64_t)c * 64;
    r.c = __ldg((const uint2 *)(D.codes + (e0 >> 1)) + t);
    int64_t b = e0 / D.blocksize;
    if (D.absmax_q)
        r.sc = nmap[__ldg(D.absmax_q + b)] * __ldg(D.nested_absmax + b / D.nested_blocksize) +
               D.offset;
    else
        r.sc = __ldg(D.absmax + b);
}

__device__ __forceinline__ void load_raw(wraw<KN_GW_BF16> &r, const lin_desc &D,
                                         const float *, int64_t row, int c, int t)
{
    const uint4 *p = (const uint4 *)(D.w16 + row * D.ld + (int64_t)c * 64 + 16 * t);
    r.a = __ldg(p);
    r.b = __ldg(p + 1);
}

__device__ __forceinline__ void unpack_raw(const wraw<KN_GW_NF4> &r, const float *qmap,
                                           uint32_t *w)
{
    uint32_t lo = r.c.x, hi = r.c.y;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t b0 = (lo >> (8 * j)) & 255u, b1 = (hi >> (8 * j)) & 255u;
        w[j] = pack_bf16x2(qmap[b0 >> 4] * r.sc, qmap[b0 & 15] * r.sc);
        w[4 + j] = pack_bf16x2(qmap[b1 >> 4] * r.sc, qmap[b1 & 15] * r.sc);
    }
}

__device__ __forceinline__ void unpack_raw(const wraw<KN_GW_BF16> &r, const float *,
                                           uint32_t *w)
{
    w[0] = r.a.x; w[1] = r.a.y; w[2] = r.a.z; w[3] = r.a.w;
    w[4] = r.b.x; w[5] = r.b.y; w[6] = r.b.z; w[7] = r.b.w;
}

/* Rows of W per block: 8 warps of 16. */
#define LIN_ROWS (16 * LIN_WARPS)

template <int WK, int NT>
__global__ void __launch_bounds__(256) lin_mma_kernel(lin_pack P, const bf16 *__restrict__ x,
                                                      int64_t ldx, int n, int *counters)
{
    const int op = blockIdx.y, ks = blockIdx.z;
    const lin_desc &D = P.d[op];
    const int ks_n = D.ks_n;
    if (ks >= ks_n)
        return;
    __shared__ float qmap[16];
    __shared__ float nmap[256];
    __shared__ int last;
    const int64_t out = D.out;
    const int64_t blk0 = (int64_t)blockIdx.x * LIN_ROWS;
    if (blk0 >= out)
        return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    if (WK == KN_GW_NF4) {
        if (tid < 16)
            qmap[tid] = D.quant_map[tid];
        if (D.absmax_q)
            nmap[tid] = D.nested_map[tid]; /* 256 threads, 256 entries */
        __syncthreads();
    }
    const int K = (int)D.in;
    const int nch = (K + 63) >> 6;
    const int c0 = (int)((int64_t)nch * ks / ks_n), c1 = (int)((int64_t)nch * (ks + 1) / ks_n);
    const int64_t row0 = blk0 + warp * 16;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            acc[nt][j] = 0.0f;
    if (row0 < out) {
        int64_t rows[2];
        rows[0] = row0 + g < out ? row0 + g : out - 1;
        rows[1] = row0 + g + 8 < out ? row0 + g + 8 : out - 1;
        wraw<WK> cur[2], nxt[2];
        if (c0 < c1) {
            load_raw(cur[0], D, nmap, rows[0], c0, t);
            load_raw(cur[1], D, nmap, rows[1], c0, t);
        }
        for (int c = c0; c < c1; c++) {
            if (c + 1 < c1) {
                load_raw(nxt[0], D, nmap, rows[0], c + 1, t);
                load_raw(nxt[1], D, nmap, rows[1], c + 1, t);
            }
            uint32_t w[2][8];
            unpack_raw(cur[0], qmap, w[0]);
            unpack_raw(cur[1], qmap, w[1]);
            const int kbase = c * 64 + 16 * t;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const int kx = kbase + 4 * kk;
                uint32_t af[4] = {w[0][2 * kk], w[1][2 * kk], w[0][2 * kk + 1],
                                  w[1][2 * kk + 1]};
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int col = nt * 8 + g;
                    uint2 bv = make_uint2(0u, 0u);
                    if (col < n && kx < K)
                        bv = __ldg((const uint2 *)(x + (int64_t)col * ldx + kx));
                    uint32_t bf[2] = {bv.x, bv.y};
                    mma_bf16_16816(acc[nt], af, bf);
                }
            }
            cur[0] = nxt[0];
            cur[1] = nxt[1];
        }
    }
    if (ks_n == 1) {
        if (row0 < out) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int64_t row = row0 + g + ((j & 2) ? 8 : 0);
                    const int col = nt * 8 + 2 * t + (j & 1);
                    if (row < out && col < n) {
                        const int64_t i = (int64_t)col * D.ldy + row;
                        D.y[i] = (D.res ? D.res[i] : 0.0f) + acc[nt][j];
                    }
                }
        }
        return;
    }
    /* split k: every block leaves its partial sums; the last of a row block
     * to finish adds them in split order (deterministic) */
    float *mine = D.part + (int64_t)ks * n * out;
    if (row0 < out) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int64_t row = row0 + g + ((j & 2) ? 8 : 0);
                const int col = nt * 8 + 2 * t + (j & 1);
                if (row < out && col < n)
                    mine[(int64_t)col * out + row] = acc[nt][j];
            }
    }
    __threadfence();
    __syncthreads();
    int *cnt = counters + (int64_t)op * gridDim.x + blockIdx.x;
    if (tid == 0)
        last = atomicAdd(cnt, 1) == ks_n - 1;
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    const float *base = D.part;
    const int64_t rows_here = out - blk0 < LIN_ROWS ? out - blk0 : LIN_ROWS;
    for (int64_t e = tid; e < rows_here * n; e += blockDim.x) {
        const int64_t row = blk0 + e % rows_here;
        const int col = (int)(e / rows_here);
        float s = 0.0f;
        for (int k2 = 0; k2 < ks_n; k2++)
            s += __ldcg(base + ((int64_t)k2 * n + col) * out + row);
        const int64_t i = (int64_t)col * D.ldy + row;
        D.y[i] = (D.res ? D.res[i] : 0.0f) + s;
    }
    if (tid == 0)
        *cnt = 0;
}

/* The split of the input dimension: enough blocks to keep every SM busy
 * with several, at least 4 chunks of 64 per split. Depends on the shape
 * only (never on n), so a sum's order does not either. */
static int lin_splits(int64_t out, int64_t in)
{
    int64_t rb = (out + LIN_ROWS - 1) / LIN_ROWS, nch = (in + 63) / 64;
    int64_t want = (4 * (int64_t)kn_sm_count() + rb - 1) / rb;
    int64_t cap = nch / 4 > 1 ? nch / 4 : 1;
    if (want > cap)
        want = cap;
    if (want > 64)
        want = 64;
    return (int)(want < 1 ? 1 : want);
}

static size_t counter_bytes(const kn_gen_lin *ops, int nops)
{
    int64_t maxout = 0;
    for (int i = 0; i < nops; i++)
        if (ops[i].w.out > maxout)
            maxout = ops[i].w.out;
    int64_t rb = (maxout + LIN_ROWS - 1) / LIN_ROWS;
    return ((size_t)(nops * rb) * sizeof(int) + 255) / 256 * 256;
}

extern "C" size_t kn_gen_linear_mma_ws(const kn_gen_lin *ops, int nops, int n)
{
    size_t bytes = counter_bytes(ops, nops);
    for (int i = 0; i < nops; i++) {
        int ks = lin_splits(ops[i].w.out, ops[i].w.in);
        if (ks > 1)
            bytes += (size_t)ks * (size_t)n * (size_t)ops[i].w.out * sizeof(float);
    }
    return bytes;
}

template <int WK>
static void dispatch_mma(const lin_pack &P, int nops, int64_t maxout, int ks, const bf16 *x,
                         int64_t ldx, int n, int *cnt, cudaStream_t s)
{
    dim3 grid((unsigned)((maxout + LIN_ROWS - 1) / LIN_ROWS), (unsigned)nops, (unsigned)ks);
    if (n <= 8)
        lin_mma_kernel<WK, 1><<<grid, 256, 0, s>>>(P, x, ldx, n, cnt);
    else if (n <= 16)
        lin_mma_kernel<WK, 2><<<grid, 256, 0, s>>>(P, x, ldx, n, cnt);
    else if (n <= 32)
        lin_mma_kernel<WK, 4><<<grid, 256, 0, s>>>(P, x, ldx, n, cnt);
    else
        lin_mma_kernel<WK, 8><<<grid, 256, 0, s>>>(P, x, ldx, n, cnt);
    KN_CHECK_LAUNCH("lin_mma");
}

extern "C" void kn_gen_linear_mma(const kn_gen_lin *ops, int nops, const kn_bf16 *x,
                                  int64_t ldx, int n, void *ws, size_t ws_bytes,
                                  cudaStream_t s)
{
    KN_REQUIRE(ops && nops >= 1 && nops <= 3 && x && n >= 1 && n <= 64);
    KN_REQUIRE(ldx % 4 == 0 && ((uintptr_t)x & 7) == 0);
    KN_REQUIRE(ws && ws_bytes >= kn_gen_linear_mma_ws(ops, nops, n));
    lin_pack P;
    memset(&P, 0, sizeof P);
    int kind = ops[0].w.kind, ksmax = 1;
    int64_t maxout = 0;
    int *cnt = (int *)ws;
    char *part = (char *)ws + counter_bytes(ops, nops);
    for (int i = 0; i < nops; i++) {
        const kn_gw &w = ops[i].w;
        KN_REQUIRE(w.kind == kind && (kind == KN_GW_NF4 || kind == KN_GW_BF16));
        KN_REQUIRE(w.in == ops[0].w.in && w.in % 4 == 0 && w.in <= ldx && w.out >= 1);
        KN_REQUIRE(ops[i].y && ops[i].ldy >= w.out);
        lin_desc &d = P.d[i];
        d.out = w.out;
        d.in = w.in;
        d.y = ops[i].y;
        d.res = ops[i].res;
        d.ldy = ops[i].ldy;
        d.ks_n = lin_splits(w.out, w.in);
        d.part = (float *)part;
        if (d.ks_n > 1)
            part += (size_t)d.ks_n * (size_t)n * (size_t)w.out * sizeof(float);
        if (d.ks_n > ksmax)
            ksmax = d.ks_n;
        if (kind == KN_GW_NF4) {
            KN_REQUIRE(w.in % 64 == 0 && w.q.blocksize % 64 == 0 && w.q.codes && w.q.quant_map);
            KN_REQUIRE(((uintptr_t)w.q.codes & 7) == 0);
            KN_REQUIRE(w.q.absmax || (w.q.absmax_q && w.q.nested_absmax && w.q.nested_map));
            d.codes = w.q.codes;
            d.absmax = w.q.absmax;
            d.absmax_q = w.q.absmax_q;
            d.nested_absmax = w.q.nested_absmax;
            d.nested_map = w.q.nested_map;
            d.quant_map = w.q.quant_map;
            d.offset = w.q.offset;
            d.blocksize = w.q.blocksize;
            d.nested_blocksize = w.q.nested_blocksize > 0 ? w.q.nested_blocksize : 256;
        } else {
            KN_REQUIRE(w.bf16 && w.ld % 64 == 0 && w.ld >= w.in &&
                       ((uintptr_t)w.bf16 & 15) == 0);
            d.w16 = (const bf16 *)w.bf16;
            d.ld = w.ld;
        }
        if (w.out > maxout)
            maxout = w.out;
    }
    if (kind == KN_GW_NF4)
        dispatch_mma<KN_GW_NF4>(P, nops, maxout, ksmax, (const bf16 *)x, ldx, n, cnt, s);
    else
        dispatch_mma<KN_GW_BF16>(P, nops, maxout, ksmax, (const bf16 *)x, ldx, n, cnt, s);
}

/* ---- fp32 on CUDA cores ----------------------------------------------------- */

__device__ __forceinline__ float4 load4f(const float *p) { return *(const float4 *)p; }
__device__ __forceinline__ float4 load4f(const bf16 *p)
{
    uint2 v = *(const uint2 *)p;
    float4 r;
    r.x = __uint_as_float(v.x << 16);
    r.y = __uint_as_float(v.x & 0xffff0000u);
    r.z = __uint_as_float(v.y << 16);
    r.w = __uint_as_float(v.y & 0xffff0000u);
    return r;
}

template <typename TX>
__global__ void __launch_bounds__(256) lin_f32_kernel(float *y, const float *res, int64_t ldy,
                                                      const TX *__restrict__ x, int64_t ldx,
                                                      const float *__restrict__ w,
                                                      int64_t out, int64_t K, int n,
                                                      float alpha)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t o = (int64_t)blockIdx.x * 8 + warp;
    if (o >= out)
        return;
    const float *wr = w + o * K;
    for (int n0 = 0; n0 < n; n0 += 8) {
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; j++)
            acc[j] = 0.0f;
        for (int64_t k = lane * 4; k < K; k += 128) {
            float4 wv = __ldg((const float4 *)(wr + k));
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (n0 + j < n) {
                    float4 xv = load4f(x + (int64_t)(n0 + j) * ldx + k);
                    acc[j] = fmaf(wv.x, xv.x, acc[j]);
                    acc[j] = fmaf(wv.y, xv.y, acc[j]);
                    acc[j] = fmaf(wv.z, xv.z, acc[j]);
                    acc[j] = fmaf(wv.w, xv.w, acc[j]);
                }
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float sum = warp_sum(acc[j]);
            if (lane == 0 && n0 + j < n) {
                const int64_t i = (int64_t)(n0 + j) * ldy + o;
                y[i] = (res ? res[i] : 0.0f) + alpha * sum;
            }
        }
    }
}

extern "C" void kn_gen_linear_f32(float *y, const float *res, int64_t ldy, const float *x32,
                                  const kn_bf16 *x16, int64_t ldx, const float *w,
                                  int64_t out, int64_t in, int n, float alpha, cudaStream_t s)
{
    KN_REQUIRE(y && w && (x32 != NULL) != (x16 != NULL) && n >= 1 && out >= 1);
    KN_REQUIRE(in % 4 == 0 && ldx % 4 == 0 && ldx >= in && ldy >= out);
    unsigned grid = (unsigned)((out + 7) / 8);
    if (x32)
        lin_f32_kernel<float><<<grid, 256, 0, s>>>(y, res, ldy, x32, ldx, w, out, in, n, alpha);
    else
        lin_f32_kernel<bf16><<<grid, 256, 0, s>>>(y, res, ldy, (const bf16 *)x16, ldx, w, out,
                                                  in, n, alpha);
    KN_CHECK_LAUNCH("lin_f32");
}
