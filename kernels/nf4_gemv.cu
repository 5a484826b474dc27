/* nf4_gemv.cu: the products of a decoding step, y = res + x W^T for a few
 * rows of x (one per sequence in flight), reading each weight once in its
 * stored form.
 *
 * kn_gen_linear_mma: tensor cores on NF4 (or bf16) weights. A block of 8
 * warps owns 16*MT output rows (MT = 1 for up to 16 rows of x, 2 or 4
 * beyond, so that each x fragment feeds more products). The input
 * dimension is cut into chunks of 64 (one NF4 block), dealt to the 8 warps
 * in groups of 4 (chunk c to warp (c / 4) % 8); each warp walks its chunks
 * in order, D of them loaded before any is used, and the warps' partial
 * sums are added in warp order in shared memory. That assignment is the
 * same for every launch shape, so the order of every sum depends on the
 * weight's shape only, never on n: a sequence's result does not depend on
 * what else is in the batch. Per chunk a lane loads 16 consecutive weights
 * of two rows (8 bytes of NF4 codes each, one 8-byte load), dequantizes
 * them in registers (quant_map[code] * scale, the scale from the 8-bit
 * nested code, as bitsandbytes; block sizes are powers of two, so no
 * divisions) and feeds mma.sync m16n8k16 with x as the n side. The k
 * index inside a chunk is permuted (lane t of a quad takes elements
 * 16t .. 16t+15) identically for W and x, which keeps every load
 * contiguous and leaves the dot products unchanged.
 *
 * Measured on an H100 (bench/RESULTS.md): 0.6 to 1.0 TB/s on the 7B shapes
 * at one row of x, about a third of the memory's bandwidth; ncu shows it
 * latency-bound (too few bytes in flight per SM), which is where the next
 * gains are.
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
    int lbs, lnbs; /* log2 of blocksize and nested_blocksize (no divisions) */
    const bf16 *w16;
    float *y;
    const float *res;
    int64_t ldy;
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
    int64_t b = e0 >> D.lbs;
    if (D.absmax_q)
        r.sc = nmap[__ldg(D.absmax_q + b)] * __ldg(D.nested_absmax + (b >> D.lnbs)) + D.offset;
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

/* Chunks of 64 are dealt to the 8 warps of a block in groups of 4:
 * chunk c goes to warp (c / 4) % 8, and each warp takes its chunks in
 * increasing order. The assignment, hence the order of every sum, is the
 * same for every launch shape (MT, NT, prefetch depth D). */
#define LIN_GROUP 4

__device__ __forceinline__ int warp_chunk(int i, int warp)
{
    return ((i / LIN_GROUP) * LIN_WARPS + warp) * LIN_GROUP + i % LIN_GROUP;
}

/* Two bf16 pairs (k-tile kk) of a row's 16 weights. */
__device__ __forceinline__ void pair_words(const wraw<KN_GW_NF4> &r, const float *qmap, int kk,
                                           uint32_t &w0, uint32_t &w1)
{
    const uint32_t word = kk < 2 ? r.c.x : r.c.y;
    const uint32_t b0 = (word >> (16 * (kk & 1))) & 255u, b1 = (word >> (16 * (kk & 1) + 8)) & 255u;
    w0 = pack_bf16x2(qmap[b0 >> 4] * r.sc, qmap[b0 & 15] * r.sc);
    w1 = pack_bf16x2(qmap[b1 >> 4] * r.sc, qmap[b1 & 15] * r.sc);
}

__device__ __forceinline__ void pair_words(const wraw<KN_GW_BF16> &r, const float *, int kk,
                                           uint32_t &w0, uint32_t &w1)
{
    const uint4 &v = kk < 2 ? r.a : r.b;
    w0 = (kk & 1) ? v.z : v.x;
    w1 = (kk & 1) ? v.w : v.y;
}

template <int WK, int MT, int NT, int D>
__global__ void __launch_bounds__(256) lin_mma_kernel(lin_pack P, const bf16 *__restrict__ x,
                                                      int64_t ldx, int n)
{
    const lin_desc &D_ = P.d[blockIdx.y];
    __shared__ float qmap[16];
    __shared__ float nmap[256];
    __shared__ float red[LIN_WARPS][NT * 4][32];
    const int64_t out = D_.out;
    const int64_t row0 = (int64_t)blockIdx.x * (16 * MT);
    if (row0 >= out)
        return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    if (WK == KN_GW_NF4) {
        if (tid < 16)
            qmap[tid] = D_.quant_map[tid];
        if (D_.absmax_q)
            nmap[tid] = D_.nested_map[tid]; /* 256 threads, 256 entries */
        __syncthreads();
    }
    const int K = (int)D_.in;
    const int nch = (K + 63) >> 6;
    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                acc[m][nt][j] = 0.0f;
    int64_t rows[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++) {
        const int64_t r = row0 + m * 16 + g;
        rows[m][0] = r < out ? r : out - 1;
        rows[m][1] = r + 8 < out ? r + 8 : out - 1;
    }
    for (int i0 = 0; warp_chunk(i0, warp) < nch; i0 += D) {
        /* D chunks' weights in flight at once */
        wraw<WK> raw[D][MT][2];
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int c = warp_chunk(i0 + d, warp);
            if (c < nch) {
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        load_raw(raw[d][m][h], D_, nmap, rows[m][h], c, t);
            }
        }
#pragma unroll
        for (int d = 0; d < D; d++) {
            const int c = warp_chunk(i0 + d, warp);
            if (c >= nch)
                break;
            const int kbase = c * 64 + 16 * t;
#pragma unroll
            for (int k2 = 0; k2 < 2; k2++) {
                /* x fragments of two k-tiles: 8 consecutive bf16, one load */
                const int kx = kbase + 8 * k2;
                uint4 xb[NT];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int col = nt * 8 + g;
                    xb[nt] = make_uint4(0u, 0u, 0u, 0u);
                    if (col < n) {
                        const bf16 *xp = x + (int64_t)col * ldx + kx;
                        if (kx + 8 <= K && (((uintptr_t)xp) & 15) == 0) {
                            xb[nt] = __ldg((const uint4 *)xp);
                        } else {
                            if (kx < K) {
                                uint2 lo = __ldg((const uint2 *)xp);
                                xb[nt].x = lo.x;
                                xb[nt].y = lo.y;
                            }
                            if (kx + 4 < K) {
                                uint2 hi = __ldg((const uint2 *)(xp + 4));
                                xb[nt].z = hi.x;
                                xb[nt].w = hi.y;
                            }
                        }
                    }
                }
#pragma unroll
                for (int kh = 0; kh < 2; kh++) {
                    const int kk = 2 * k2 + kh;
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        uint32_t af[4];
                        pair_words(raw[d][m][0], qmap, kk, af[0], af[2]);
                        pair_words(raw[d][m][1], qmap, kk, af[1], af[3]);
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            uint32_t bf[2] = {kh ? xb[nt].z : xb[nt].x, kh ? xb[nt].w : xb[nt].y};
                            mma_bf16_16816(acc[m][nt], af, bf);
                        }
                    }
                }
            }
        }
    }
    /* the warps' partial sums, added in warp order, one m-tile at a time */
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                red[warp][nt * 4 + j][lane] = acc[m][nt][j];
        __syncthreads();
        for (int e = tid; e < NT * 4 * 32; e += 256) {
            const int q = e >> 5, ln = e & 31;
            float s = red[0][q][ln];
#pragma unroll
            for (int wi = 1; wi < LIN_WARPS; wi++)
                s += red[wi][q][ln];
            const int nt = q >> 2, j = q & 3, gg = ln >> 2, tt = ln & 3;
            const int64_t row = row0 + m * 16 + gg + ((j & 2) ? 8 : 0);
            const int col = nt * 8 + 2 * tt + (j & 1);
            if (row < out && col < n) {
                const int64_t i = (int64_t)col * D_.ldy + row;
                D_.y[i] = (D_.res ? D_.res[i] : 0.0f) + s;
            }
        }
        __syncthreads();
    }
}

extern "C" size_t kn_gen_linear_mma_ws(const kn_gen_lin *ops, int nops, int n)
{
    (void)ops;
    (void)nops;
    (void)n;
    return 0;
}

template <int WK, int MT, int NT, int D>
static void launch_mma(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                       int n, cudaStream_t s)
{
    dim3 grid((unsigned)((maxout + 16 * MT - 1) / (16 * MT)), (unsigned)nops);
    lin_mma_kernel<WK, MT, NT, D><<<grid, 256, 0, s>>>(P, x, ldx, n);
    KN_CHECK_LAUNCH("lin_mma");
}

/* Larger n: more rows per warp, so that each x fragment loaded feeds more
 * products; but enough blocks for every SM. */
template <int WK>
static void dispatch_mma(const lin_pack &P, int nops, int64_t maxout, const bf16 *x,
                         int64_t ldx, int n, cudaStream_t s)
{
    int wide = WK == KN_GW_NF4 && maxout * nops >= 64 * (int64_t)kn_sm_count();
    if (n <= 8)
        launch_mma<WK, 1, 1, 4>(P, nops, maxout, x, ldx, n, s);
    else if (n <= 16)
        launch_mma<WK, 1, 2, 4>(P, nops, maxout, x, ldx, n, s);
    else if (n <= 32)
        launch_mma<WK, 2, 4, 2>(P, nops, maxout, x, ldx, n, s);
    else if (wide)
        launch_mma<KN_GW_NF4, 4, 8, 2>(P, nops, maxout, x, ldx, n, s);
    else
        launch_mma<WK, 2, 8, (WK == KN_GW_NF4 ? 2 : 1)>(P, nops, maxout, x, ldx, n, s);
}

extern "C" void kn_gen_linear_mma(const kn_gen_lin *ops, int nops, const kn_bf16 *x,
                                  int64_t ldx, int n, void *ws, size_t ws_bytes,
                                  cudaStream_t s)
{
    (void)ws;
    (void)ws_bytes;
    KN_REQUIRE(ops && nops >= 1 && nops <= 3 && x && n >= 1 && n <= 64);
    KN_REQUIRE(ldx % 4 == 0 && ((uintptr_t)x & 7) == 0);
    lin_pack P;
    memset(&P, 0, sizeof P);
    int kind = ops[0].w.kind;
    int64_t maxout = 0;
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
            int nbs = w.q.nested_blocksize > 0 ? w.q.nested_blocksize : 256;
            KN_REQUIRE((w.q.blocksize & (w.q.blocksize - 1)) == 0 && (nbs & (nbs - 1)) == 0);
            d.lbs = __builtin_ctz((unsigned)w.q.blocksize);
            d.lnbs = __builtin_ctz((unsigned)nbs);
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
        dispatch_mma<KN_GW_NF4>(P, nops, maxout, (const bf16 *)x, ldx, n, s);
    else
        dispatch_mma<KN_GW_BF16>(P, nops, maxout, (const bf16 *)x, ldx, n, s);
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
