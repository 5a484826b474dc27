/* lora.cu: the three LoRA products that read the dropout input, with the
 * dropout fused into them (see kernels.h).
 *
 * Why: unfused, each of them is a dropout pass that writes a masked copy
 * of x (or of the update to dx) and a cuBLAS product that reads it again,
 * in chunks of rows to bound the copy: three passes over an (n, in) array
 * where one does, and a dozen launches. Here the mask (drop_keep, the same
 * counter-based bits as dropout.cu and the CPU) is applied while a tile of
 * x is staged into shared memory, or to the accumulators before they are
 * added to dx, so x and dx are each read (and dx written) once.
 *
 * The products are skinny (r <= 128), so they are bound by memory and by
 * the mask's integer arithmetic; blocks of 4 warps on 64-row tiles with
 * mma.sync m16n8k16 (bf16 in, fp32 accumulate; fragment layouts in
 * common.cuh), double-buffered shared memory (one barrier per tile), the
 * next tile of x loaded into registers while the current one is used.
 * Long reductions (over in for lh, over the tokens for dA) are split over
 * blocks for parallelism; the partial sums go to scratch and are added in
 * a fixed order, so results are deterministic.
 *
 * The mask itself costs as much as the memory traffic (SplitMix64 is some
 * 25 integer instructions an element as keep8 computes it; 50 M elements
 * take ~100 us of an H100's integer pipes), so kn_lora_down can leave the
 * keep bits behind (1 bit an element) for kn_lora_grad_a and kn_lora_dx of
 * the same micro-batch, which then hash nothing, and kn_lora_grad_a_dx
 * takes dA and an fp32 dx in one pass that hashes each element once. */
#include "common.cuh"

#include <stdlib.h>
#include <string.h>

#define LT 64           /* rows (tokens) of a tile */
#define LK 64           /* columns of a tile */
#define LLD (LK + 8)    /* its padded shared-memory row (elements) */
#define KSPLIT 1024     /* input columns per block of kn_lora_down */
#define TSPLIT 1024     /* tokens per block of kn_lora_grad_a */
#define DXCOLS 256      /* columns per block of kn_lora_dx */

/* x rows t0 .. t0+63 (zeros at and past `lim`), columns c0 .. c0+63 into
 * registers: 512 16-byte chunks, 4 a thread. */
__device__ __forceinline__ void xtile_load(uint4 *r, const bf16 *x, int64_t t0,
                                           int64_t lim, int in, int c0)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int c = threadIdx.x + 128 * i;
        int row = c >> 3, col = (c & 7) * 8;
        int64_t t = t0 + row;
        r[i] = t < lim ? *(const uint4 *)(x + t * in + c0 + col) : make_uint4(0, 0, 0, 0);
    }
}

/* drop_keep's threshold as an integer: element i is kept when the top 24
 * bits u of its hash satisfy (float)u / 2^24 >= p, i.e. (both sides exact)
 * u >= ceil(p 2^24), i.e. the hash's high word >= ceil(p 2^24) << 8. */
__device__ __forceinline__ uint32_t keep_threshold(float p)
{
    return (uint32_t)ceilf(p * 16777216.0f) << 8;
}

/* The keep bits of elements e .. e+7 (e a multiple of 8): bit j of the
 * result is element e + j's, drop_keep(stream, e + j, p) bit for bit, in
 * 25 instructions an element instead of 28 and without the int-to-float
 * conversion (a quarter-rate instruction): consecutive elements' first
 * terms differ by the constant (one 64-bit add instead of a multiply);
 * only the high word of the last product is formed, since the final
 * xor-shift leaves bits 40.. alone (z ^ z >> 31 has the same bits from 33
 * up); and the float comparison is the integer one above. The forward's
 * lora_down, bound by the mask, went from ~172 to ~137 us at Llama 2 7B's
 * q_proj (bench/RESULTS.md, "train, (a) last percent").
 * thr = keep_threshold(p). */
__device__ __forceinline__ unsigned keep8(uint64_t stream, uint64_t e, uint32_t thr)
{
    unsigned b = 0;
    uint64_t z0 = stream + (e + 1) * 0x9e3779b97f4a7c15ull;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        uint64_t z = z0;
        z0 += 0x9e3779b97f4a7c15ull;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z ^= z >> 27;
        uint32_t hi = (uint32_t)((z * 0x94d049bb133111ebull) >> 32);
        b |= (unsigned)(hi >= thr) << j;
    }
    return b;
}

/* The dropout of those registers (element t * in + column of the stream),
 * rounded to bf16 as kn_dropout_forward does, into the shared tile. The
 * keep bits come from bits_in when given (one byte per 8 elements,
 * element i at bit i % 8 of byte i / 8), else from the stream; bits_out
 * (may be NULL) receives them, and so does sK (shared, may be NULL) as
 * (LT, 8) bytes: row, 8-column group. Rows at and past lim are zeros. */
__device__ __forceinline__ void xtile_store(bf16 *sX, const uint4 *r, int64_t t0, int64_t lim,
                                            int in, int c0, uint32_t thr, float inv,
                                            uint64_t stream, const uint8_t *bits_in,
                                            uint8_t *bits_out, uint8_t *sK = NULL)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int c = threadIdx.x + 128 * i;
        int row = c >> 3, col = (c & 7) * 8;
        uint64_t e = (uint64_t)(t0 + row) * (uint64_t)in + (uint64_t)(c0 + col);
        bool live = t0 + row < lim;
        unsigned kb = !live ? 0u : bits_in ? (unsigned)bits_in[e >> 3] : keep8(stream, e, thr);
        if (bits_out && live)
            bits_out[e >> 3] = (uint8_t)kb;
        if (sK)
            sK[c] = (uint8_t)kb; /* c = row * 8 + col / 8 */
        const bf16 *v = (const bf16 *)&r[i];
        uint4 o;
        bf16 *ov = (bf16 *)&o;
#pragma unroll
        for (int j = 0; j < 8; j++)
            ov[j] = (kb >> j) & 1 ? __float2bfloat16(__bfloat162float(v[j]) * inv)
                                  : __float2bfloat16(0.0f);
        *(uint4 *)(sX + row * LLD + col) = o;
    }
}

/* ---- lh = dropout(x) A^T ---------------------------------------------------
 * Block (row tile, column split): its 64 rows against columns
 * [KSPLIT y, KSPLIT (y+1)); warp w rows 16w.., all R outputs. One split:
 * lh directly; several: fp32 partials part[split][t][R]. */
template <int R>
__global__ void __launch_bounds__(128)
lora_down_kernel(bf16 *lh, float *part, uint8_t *bits, const bf16 *x, const bf16 *A,
                 int64_t n, int in, float p, float inv, uint64_t stream)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sX = (bf16 *)smem_raw;     /* 2 x (LT, LLD) */
    bf16 *sA = sX + 2 * LT * LLD;    /* 2 x (R, LLD) */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int64_t t0 = (int64_t)blockIdx.x * LT;
    const int cb = blockIdx.y * KSPLIT;
    const int ce = cb + KSPLIT < in ? cb + KSPLIT : in;
    const int ntile = (ce - cb) / LK;
    float acc[R / 8][4];
#pragma unroll
    for (int i = 0; i < R / 8; i++)
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    uint4 xr[4];
    xtile_load(xr, x, t0, n, in, cb);
    for (int it = 0; it < ntile; it++) {
        const int c0 = cb + it * LK;
        bf16 *bX = sX + (it & 1) * LT * LLD, *bA = sA + (it & 1) * R * LLD;
        for (int i = threadIdx.x; i < R * 8; i += 128) {
            int row = i >> 3, col = (i & 7) * 8;
            cp_async16(bA + row * LLD + col, A + (int64_t)row * in + c0 + col, 16);
        }
        cp_async_commit();
        xtile_store(bX, xr, t0, n, in, c0, keep_threshold(p), inv, stream, NULL, bits);
        if (it + 1 < ntile)
            xtile_load(xr, x, t0, n, in, c0 + LK);
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < LK / 16; kk++) {
            uint32_t a[4];
            frag_a<LLD>(a, bX, warp * 16, kk * 16, lane);
#pragma unroll
            for (int j = 0; j < R / 16; j++) {
                uint32_t b[4];
                frag_b_nk<LLD>(b, bA, 16 * j, kk * 16, lane);
                mma_bf16_16816(acc[2 * j], a, b);
                mma_bf16_16816(acc[2 * j + 1], a, b + 2);
            }
        }
    }
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        int64_t t = t0 + warp * 16 + g + 8 * hf;
        if (t >= n)
            continue;
#pragma unroll
        for (int i = 0; i < R / 8; i++) {
            int col = i * 8 + 2 * t4;
            if (part)
                *(float2 *)(part + ((int64_t)blockIdx.y * n + t) * R + col) =
                    make_float2(acc[i][2 * hf], acc[i][2 * hf + 1]);
            else
                *(uint32_t *)(lh + t * R + col) = pack_bf16x2(acc[i][2 * hf], acc[i][2 * hf + 1]);
        }
    }
}

/* lh (pairs) = bf16(sum over the S splits of part), in split order. */
__global__ void lora_down_reduce_kernel(bf16 *lh, const float *part, int64_t npairs, int S)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < npairs;
         i += (int64_t)gridDim.x * blockDim.x) {
        float2 a = ((const float2 *)part)[i];
        for (int k = 1; k < S; k++) {
            float2 b = ((const float2 *)part)[(int64_t)k * npairs + i];
            a.x += b.x;
            a.y += b.y;
        }
        ((uint32_t *)lh)[i] = pack_bf16x2(a.x, a.y);
    }
}

#define CLD (LK + 4) /* the staged product's row (floats) */

template <typename T> struct dx8;
template <> struct dx8<float> {
    float4 a, b;
    __device__ __forceinline__ void load(const float *p)
    {
        a = *(const float4 *)p;
        b = *(const float4 *)(p + 4);
    }
    __device__ __forceinline__ void add_store(float *p, const float *u)
    {
        float4 o = make_float4(a.x + u[0], a.y + u[1], a.z + u[2], a.w + u[3]);
        float4 q = make_float4(b.x + u[4], b.y + u[5], b.z + u[6], b.w + u[7]);
        *(float4 *)p = o;
        *(float4 *)(p + 4) = q;
    }
};
template <> struct dx8<bf16> {
    uint4 a;
    __device__ __forceinline__ void load(const bf16 *p) { a = *(const uint4 *)p; }
    __device__ __forceinline__ void add_store(bf16 *p, const float *u)
    {
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&a;
        uint4 o;
        __nv_bfloat162 *oh = (__nv_bfloat162 *)&o;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(h[j]);
            oh[j] = __floats2bfloat162_rn(f.x + u[2 * j], f.y + u[2 * j + 1]);
        }
        *(uint4 *)p = o;
    }
};

/* ---- dA += dlh^T dropout(x) ------------------------------------------------
 * Block (column tile, token split): the (R, 64) slice of dA over tokens
 * [TSPLIT y, TSPLIT (y+1)); warp w the r rows 16w.. (and 16(w+4).. when
 * R = 128). One split: added to ga directly; several: fp32 partials
 * part[split][R][in]. MINB: blocks an SM must hold (1: the compiler's
 * choice; capping dA alone at 80 registers, 6 blocks an SM, one wave at
 * Llama 2 7B's 768 blocks, measured no faster on an H100).
 *
 * DX (R <= 64): the block also adds its tiles' share of the input
 * gradient, dx += mask (dlh A) / (1 - p) (fp32), as lora_dx_kernel does:
 * the same product of the staged dlh rows and A's columns, the same order,
 * and the mask bits of the x tile it has just computed, kept in shared
 * memory, so that each element is hashed once instead of twice and the
 * two passes are one launch. dx must not be x (it is read later). With
 * its 64.5 KB of shared memory it runs 3 blocks an SM (capped at 168
 * registers). */
template <int R, int MINB, bool DX>
__global__ void __launch_bounds__(128, MINB)
lora_grad_a_kernel(float *ga, float *part, const uint8_t *bits, const bf16 *dlh,
                   const bf16 *x, int64_t n, int in, float p, float inv, uint64_t stream,
                   float *dx, const bf16 *A)
{
    constexpr int DLD = R + 8, MT = R / 16, MTW = (MT + 3) / 4, KS = R / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sX = (bf16 *)smem_raw;     /* 2 x (LT, LLD): tokens x columns */
    bf16 *sD = sX + 2 * LT * LLD;    /* 2 x (LT, DLD): tokens x r */
    /* DX: A's column tile (R, LLD), this warp's staged product (16, CLD),
     * the keep bytes of the x tiles 2 x (LT, 8) */
    bf16 *sA = sD + 2 * LT * DLD;
    float *sC = (float *)(sA + R * LLD) + (threadIdx.x >> 5) * 16 * CLD;
    uint8_t *sKb = (uint8_t *)((float *)(sA + R * LLD) + 4 * 16 * CLD);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int c0 = blockIdx.x * LK;
    const int64_t tb = (int64_t)blockIdx.y * TSPLIT;
    const int64_t te = tb + TSPLIT < n ? tb + TSPLIT : n;
    const int ntile = (int)((te - tb + LT - 1) / LT);
    float acc[MTW][8][4];
#pragma unroll
    for (int mi = 0; mi < MTW; mi++)
#pragma unroll
        for (int i = 0; i < 8; i++)
            acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.0f;
    uint4 xr[4];
    xtile_load(xr, x, tb, te, in, c0);
    if constexpr (DX) {
        for (int i = threadIdx.x; i < R * 8; i += 128) {
            int row = i >> 3, col = (i & 7) * 8;
            cp_async16(sA + row * LLD + col, A + (int64_t)row * in + c0 + col, 16);
        }
    }
    for (int it = 0; it < ntile; it++) {
        const int64_t t0 = tb + (int64_t)it * LT;
        bf16 *bX = sX + (it & 1) * LT * LLD, *bD = sD + (it & 1) * LT * DLD;
        uint8_t *bK = DX ? sKb + (it & 1) * LT * 8 : NULL;
        for (int i = threadIdx.x; i < LT * (R / 8); i += 128) {
            int row = i / (R / 8), col = (i % (R / 8)) * 8;
            int64_t t = t0 + row;
            cp_async16(bD + row * DLD + col, t < te ? dlh + t * R + col : dlh, t < te ? 16 : 0);
        }
        cp_async_commit();
        xtile_store(bX, xr, t0, te, in, c0, keep_threshold(p), inv, stream, bits, NULL, bK);
        if (it + 1 < ntile)
            xtile_load(xr, x, t0 + LT, te, in, c0);
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < LT / 16; kk++) {
            uint32_t b[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++)
                frag_b_kn<LLD>(b[j], bX, kk * 16, 16 * j, lane);
#pragma unroll
            for (int mi = 0; mi < MTW; mi++) {
                int mt = warp + 4 * mi;
                if (mt >= MT)
                    continue;
                uint32_t a[4];
                frag_a_t<DLD>(a, bD, kk * 16, mt * 16, lane);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    mma_bf16_16816(acc[mi][2 * j], a, b[j]);
                    mma_bf16_16816(acc[mi][2 * j + 1], a, b[j] + 2);
                }
            }
        }
        if constexpr (DX) {
            /* lora_dx_kernel's steps for this warp's 16 rows of the tile:
             * dx loads first, then the product, staged, masked, added */
            const int col8 = (lane & 7) * 8;
            dx8<float> d[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int64_t t = t0 + warp * 16 + (lane >> 3) + 4 * q;
                if (t < te)
                    d[q].load(dx + t * in + c0 + col8);
            }
            uint32_t af[KS][4];
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
                frag_a<DLD>(af[kk], bD, warp * 16, kk * 16, lane);
            float pc[8][4];
#pragma unroll
            for (int i = 0; i < 8; i++)
                pc[i][0] = pc[i][1] = pc[i][2] = pc[i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    uint32_t b[4];
                    frag_b_kn<LLD>(b, sA, kk * 16, 16 * j, lane);
                    mma_bf16_16816(pc[2 * j], af[kk], b);
                    mma_bf16_16816(pc[2 * j + 1], af[kk], b + 2);
                }
#pragma unroll
            for (int i = 0; i < 8; i++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++)
                    *(float2 *)(sC + (g + 8 * hf) * CLD + i * 8 + 2 * t4) =
                        make_float2(pc[i][2 * hf], pc[i][2 * hf + 1]);
            __syncwarp();
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int row = (lane >> 3) + 4 * q;
                int64_t t = t0 + warp * 16 + row;
                if (t >= te)
                    continue;
                unsigned kb = bK[(warp * 16 + row) * 8 + (lane & 7)];
                float u[8];
                *(float4 *)u = *(const float4 *)(sC + row * CLD + col8);
                *(float4 *)(u + 4) = *(const float4 *)(sC + row * CLD + col8 + 4);
#pragma unroll
                for (int j = 0; j < 8; j++)
                    u[j] = (kb >> j) & 1 ? u[j] * inv : 0.0f;
                d[q].add_store(dx + t * in + c0 + col8, u);
            }
            __syncwarp();
        }
    }
#pragma unroll
    for (int mi = 0; mi < MTW; mi++) {
        int mt = warp + 4 * mi;
        if (mt >= MT)
            continue;
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            int row = mt * 16 + g + 8 * hf;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int col = c0 + i * 8 + 2 * t4;
                float2 v = make_float2(acc[mi][i][2 * hf], acc[mi][i][2 * hf + 1]);
                if (part) {
                    *(float2 *)(part + ((int64_t)blockIdx.y * R + row) * in + col) = v;
                } else {
                    float2 *d = (float2 *)(ga + (int64_t)row * in + col);
                    float2 o = *d;
                    o.x += v.x;
                    o.y += v.y;
                    *d = o;
                }
            }
        }
    }
}

/* ga (pairs) += the S splits of part, in split order. */
__global__ void lora_grad_a_reduce_kernel(float *ga, const float *part, int64_t npairs, int S)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < npairs;
         i += (int64_t)gridDim.x * blockDim.x) {
        float2 a = ((const float2 *)part)[i];
        for (int k = 1; k < S; k++) {
            float2 b = ((const float2 *)part)[(int64_t)k * npairs + i];
            a.x += b.x;
            a.y += b.y;
        }
        float2 o = ((float2 *)ga)[i];
        o.x += a.x;
        o.y += a.y;
        ((float2 *)ga)[i] = o;
    }
}

/* ---- dx += mask (dlh A) / (1 - p) -----------------------------------------
 * Block (row tile, DXCOLS columns): the dlh rows staged once, A's column
 * tiles double-buffered. Each warp's 16 x 64 product goes through shared
 * memory so that dx is read and written row-contiguously, 8 elements a
 * lane, every load of a tile issued before the first use (the fragment
 * layout would make each lane wait on 16 scattered 8-byte accesses). */
template <int R, typename T>
__global__ void __launch_bounds__(128)
lora_dx_kernel(T *dx, const uint8_t *bits, const bf16 *dlh, const bf16 *A, int64_t n, int in,
               float p, float inv, uint64_t stream)
{
    constexpr int DLD = R + 8, KS = R / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sD = (bf16 *)smem_raw;     /* (LT, DLD) */
    bf16 *sA = sD + LT * DLD;        /* 2 x (R, LLD) */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    float *sC = (float *)(sA + 2 * R * LLD) + warp * 16 * CLD; /* (16, CLD) */
    const int64_t t0 = (int64_t)blockIdx.x * LT;
    const int cb = blockIdx.y * DXCOLS;
    const int ntile = ((cb + DXCOLS < in ? cb + DXCOLS : in) - cb) / LK;
    for (int i = threadIdx.x; i < LT * (R / 8); i += 128) {
        int row = i / (R / 8), col = (i % (R / 8)) * 8;
        int64_t t = t0 + row;
        cp_async16(sD + row * DLD + col, t < n ? dlh + t * R + col : dlh, t < n ? 16 : 0);
    }
    for (int i = threadIdx.x; i < R * 8; i += 128) {
        int row = i >> 3, col = (i & 7) * 8;
        cp_async16(sA + row * LLD + col, A + (int64_t)row * in + cb + col, 16);
    }
    cp_async_commit();
    uint32_t af[KS][4];
    for (int it = 0; it < ntile; it++) {
        const int c0 = cb + it * LK;
        bf16 *bA = sA + (it & 1) * R * LLD;
        if (it + 1 < ntile) {
            bf16 *nA = sA + ((it + 1) & 1) * R * LLD;
            for (int i = threadIdx.x; i < R * 8; i += 128) {
                int row = i >> 3, col = (i & 7) * 8;
                cp_async16(nA + row * LLD + col, A + (int64_t)row * in + c0 + LK + col, 16);
            }
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++)
                frag_a<DLD>(af[kk], sD, warp * 16, kk * 16, lane);
        }
        /* this lane's 4 groups of 8: row (lane / 8) + 4 q, columns 8 (lane % 8) .. */
        const int col8 = (lane & 7) * 8;
        dx8<T> d[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            int64_t t = t0 + warp * 16 + (lane >> 3) + 4 * q;
            if (t < n)
                d[q].load(dx + t * in + c0 + col8);
        }
        float acc[8][4];
#pragma unroll
        for (int i = 0; i < 8; i++)
            acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                uint32_t b[4];
                frag_b_kn<LLD>(b, bA, kk * 16, 16 * j, lane);
                mma_bf16_16816(acc[2 * j], af[kk], b);
                mma_bf16_16816(acc[2 * j + 1], af[kk], b + 2);
            }
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++)
                *(float2 *)(sC + (g + 8 * hf) * CLD + i * 8 + 2 * t4) =
                    make_float2(acc[i][2 * hf], acc[i][2 * hf + 1]);
        __syncwarp();
#pragma unroll
        for (int q = 0; q < 4; q++) {
            int row = (lane >> 3) + 4 * q;
            int64_t t = t0 + warp * 16 + row;
            if (t >= n)
                continue;
            uint64_t e = (uint64_t)t * (uint64_t)in + (uint64_t)(c0 + col8);
            unsigned kb = bits ? (unsigned)bits[e >> 3] : keep8(stream, e, keep_threshold(p));
            float u[8];
            *(float4 *)u = *(const float4 *)(sC + row * CLD + col8);
            *(float4 *)(u + 4) = *(const float4 *)(sC + row * CLD + col8 + 4);
#pragma unroll
            for (int j = 0; j < 8; j++)
                u[j] = (kb >> j) & 1 ? u[j] * inv : 0.0f;
            d[q].add_store(dx + t * in + c0 + col8, u);
        }
        __syncthreads();
    }
}

/* ---- launchers ------------------------------------------------------------- */

extern "C" int kn_lora_fusable(int r, int64_t in)
{
    return (r == 16 || r == 32 || r == 64 || r == 128) && in > 0 && in % LK == 0 &&
           in <= INT32_MAX / 2;
}

static int down_splits(int in) { return (in + KSPLIT - 1) / KSPLIT; }
static int64_t grad_splits(int64_t n) { return (n + TSPLIT - 1) / TSPLIT; }

extern "C" size_t kn_lora_scratch_bytes(int64_t n, int r, int64_t in)
{
    if (!kn_lora_fusable(r, in) || n < 1)
        return 0;
    int S = down_splits((int)in);
    int64_t S2 = grad_splits(n);
    size_t a = S > 1 ? (size_t)S * n * r * sizeof(float) : 0;
    size_t b = S2 > 1 ? (size_t)S2 * r * in * sizeof(float) : 0;
    return a > b ? a : b;
}

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

static size_t down_smem(int r) { return (size_t)2 * (LT + r) * LLD * sizeof(bf16); }
static size_t grad_smem(int r) { return (size_t)2 * LT * (LLD + r + 8) * sizeof(bf16); }
static size_t grad_dx_smem(int r)
{
    return grad_smem(r) + (size_t)r * LLD * sizeof(bf16) + (size_t)4 * 16 * CLD * 4 + 2 * LT * 8;
}
static size_t dx_smem(int r)
{
    return (size_t)(LT * (r + 8) + 2 * r * LLD) * sizeof(bf16) + (size_t)4 * 16 * CLD * 4;
}

/* Raises a kernel's dynamic shared-memory limit once. */
static void smem_attr(const void *fn, size_t bytes, int *done)
{
    KN_REQUIRE(bytes <= kn_smem_optin());
    if (*done)
        return;
    CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    *done = 1;
}

template <int R>
static void down_launch(kn_bf16 *lh, uint8_t *bits, const kn_bf16 *x, const kn_bf16 *A,
                        int64_t n, int in, float p, uint64_t key, void *scratch, cudaStream_t s)
{
    static int attr;
    size_t sm = down_smem(R);
    smem_attr((const void *)lora_down_kernel<R>, sm, &attr);
    int S = down_splits(in);
    float *part = S > 1 ? (float *)scratch : NULL;
    dim3 grid(kn_cdiv(n, LT), S);
    lora_down_kernel<R><<<grid, 128, sm, s>>>((bf16 *)lh, part, bits, (const bf16 *)x,
                                              (const bf16 *)A, n, in, p, 1.0f / (1.0f - p), key);
    KN_CHECK_LAUNCH("lora_down");
    if (part) {
        int64_t np2 = n * R / 2;
        lora_down_reduce_kernel<<<kn_grid_1d(np2, 256), 256, 0, s>>>((bf16 *)lh, part, np2, S);
        KN_CHECK_LAUNCH("lora_down_reduce");
    }
}


/* dx NULL: dA only; else (R <= 64) dA and dx += mask (dlh A) in one pass */
template <int R>
static void grad_a_launch(float *ga, const uint8_t *bits, const kn_bf16 *dlh, const kn_bf16 *x,
                          int64_t n, int in, float p, uint64_t key, void *scratch,
                          float *dx, const kn_bf16 *A, cudaStream_t s)
{
    static int attr, attrx;
    int64_t S2 = grad_splits(n);
    KN_REQUIRE(S2 <= 65535);
    float *part = S2 > 1 ? (float *)scratch : NULL;
    dim3 grid(in / LK, (unsigned)S2);
    const float inv = 1.0f / (1.0f - p);
    if constexpr (R <= 64) {
        if (dx) {
            size_t sm = grad_dx_smem(R);
            smem_attr((const void *)lora_grad_a_kernel<R, 3, true>, sm, &attrx);
            lora_grad_a_kernel<R, 3, true><<<grid, 128, sm, s>>>(
                ga, part, bits, (const bf16 *)dlh, (const bf16 *)x, n, in, p, inv, key, dx,
                (const bf16 *)A);
        }
    }
    if (!(R <= 64 && dx)) {
        KN_REQUIRE(!dx);
        size_t sm = grad_smem(R);
        smem_attr((const void *)lora_grad_a_kernel<R, 1, false>, sm, &attr);
        lora_grad_a_kernel<R, 1, false><<<grid, 128, sm, s>>>(
            ga, part, bits, (const bf16 *)dlh, (const bf16 *)x, n, in, p, inv, key, NULL, NULL);
    }
    KN_CHECK_LAUNCH("lora_grad_a");
    if (part) {
        int64_t np2 = (int64_t)R * in / 2;
        lora_grad_a_reduce_kernel<<<kn_grid_1d(np2, 256), 256, 0, s>>>(ga, part, np2, (int)S2);
        KN_CHECK_LAUNCH("lora_grad_a_reduce");
    }
}

template <int R, typename T>
static void dx_launch(T *dx, const uint8_t *bits, const kn_bf16 *dlh, const kn_bf16 *A,
                      int64_t n, int in, float p, uint64_t key, cudaStream_t s)
{
    static int attr;
    size_t sm = dx_smem(R);
    smem_attr((const void *)lora_dx_kernel<R, T>, sm, &attr);
    dim3 grid(kn_cdiv(n, LT), kn_cdiv(in, DXCOLS));
    lora_dx_kernel<R, T><<<grid, 128, sm, s>>>(dx, bits, (const bf16 *)dlh, (const bf16 *)A, n,
                                               in, p, 1.0f / (1.0f - p), key);
    KN_CHECK_LAUNCH("lora_dx");
}

static void check(int64_t n, int in, int r, float p, const void *a, const void *b,
                  const void *c)
{
    KN_REQUIRE(n >= 1 && n <= (int64_t)INT32_MAX * LT && kn_lora_fusable(r, in));
    KN_REQUIRE(p >= 0.0f && p < 1.0f);
    KN_REQUIRE(aligned16(a) && aligned16(b) && aligned16(c));
}

extern "C" void kn_lora_down(kn_bf16 *lh, uint8_t *bits, const kn_bf16 *x, const kn_bf16 *A,
                             int64_t n, int in, int r, float p, uint64_t key, void *scratch,
                             cudaStream_t s)
{
    check(n, in, r, p, lh, x, A);
    KN_REQUIRE(down_splits(in) == 1 || scratch);
    switch (r) {
    case 16: down_launch<16>(lh, bits, x, A, n, in, p, key, scratch, s); break;
    case 32: down_launch<32>(lh, bits, x, A, n, in, p, key, scratch, s); break;
    case 64: down_launch<64>(lh, bits, x, A, n, in, p, key, scratch, s); break;
    default: down_launch<128>(lh, bits, x, A, n, in, p, key, scratch, s); break;
    }
}

extern "C" void kn_lora_grad_a(float *ga, const uint8_t *bits, const kn_bf16 *dlh,
                               const kn_bf16 *x, int64_t n, int in, int r, float p,
                               uint64_t key, void *scratch, cudaStream_t s)
{
    check(n, in, r, p, ga, dlh, x);
    KN_REQUIRE(grad_splits(n) == 1 || scratch);
    switch (r) {
    case 16: grad_a_launch<16>(ga, bits, dlh, x, n, in, p, key, scratch, NULL, NULL, s); break;
    case 32: grad_a_launch<32>(ga, bits, dlh, x, n, in, p, key, scratch, NULL, NULL, s); break;
    case 64: grad_a_launch<64>(ga, bits, dlh, x, n, in, p, key, scratch, NULL, NULL, s); break;
    default: grad_a_launch<128>(ga, bits, dlh, x, n, in, p, key, scratch, NULL, NULL, s); break;
    }
}

/* KN_LORA_GRAD_DX=0 in the environment: kn_lora_grad_a_dx as the two
 * passes (comparisons) */
static int grad_dx_on(void)
{
    const char *e = getenv("KN_LORA_GRAD_DX");
    return !(e && !strcmp(e, "0"));
}

/* kn_lora_grad_a and then kn_lora_dx (fp32 dx), one pass where r <= 64:
 * the same bits. dx must not alias x. */
extern "C" void kn_lora_grad_a_dx(float *ga, float *dx, const uint8_t *bits,
                                  const kn_bf16 *dlh, const kn_bf16 *x, const kn_bf16 *A,
                                  int64_t n, int in, int r, float p, uint64_t key,
                                  void *scratch, cudaStream_t s)
{
    check(n, in, r, p, ga, dlh, x);
    KN_REQUIRE(aligned16(dx) && aligned16(A) && (void *)dx != (const void *)x);
    KN_REQUIRE(grad_splits(n) == 1 || scratch);
    if (r > 64 || !grad_dx_on()) {
        kn_lora_grad_a(ga, bits, dlh, x, n, in, r, p, key, scratch, s);
        kn_lora_dx(dx, KN_F32, bits, dlh, A, n, in, r, p, key, s);
        return;
    }
    switch (r) {
    case 16: grad_a_launch<16>(ga, bits, dlh, x, n, in, p, key, scratch, dx, A, s); break;
    case 32: grad_a_launch<32>(ga, bits, dlh, x, n, in, p, key, scratch, dx, A, s); break;
    default: grad_a_launch<64>(ga, bits, dlh, x, n, in, p, key, scratch, dx, A, s); break;
    }
}

template <typename T>
static void dx_dispatch(T *dx, const uint8_t *bits, const kn_bf16 *dlh, const kn_bf16 *A,
                        int64_t n, int in, int r, float p, uint64_t key, cudaStream_t s)
{
    switch (r) {
    case 16: dx_launch<16, T>(dx, bits, dlh, A, n, in, p, key, s); break;
    case 32: dx_launch<32, T>(dx, bits, dlh, A, n, in, p, key, s); break;
    case 64: dx_launch<64, T>(dx, bits, dlh, A, n, in, p, key, s); break;
    default: dx_launch<128, T>(dx, bits, dlh, A, n, in, p, key, s); break;
    }
}

extern "C" void kn_lora_dx(void *dx, kn_dtype dt, const uint8_t *bits, const kn_bf16 *dlh,
                           const kn_bf16 *A, int64_t n, int in, int r, float p, uint64_t key,
                           cudaStream_t s)
{
    check(n, in, r, p, dx, dlh, A);
    if (dt == KN_F32)
        dx_dispatch<float>((float *)dx, bits, dlh, A, n, in, r, p, key, s);
    else
        dx_dispatch<bf16>((bf16 *)dx, bits, dlh, A, n, in, r, p, key, s);
}

extern "C" size_t kn_lora_bits_bytes(int64_t n, int64_t in) { return (size_t)(n * in / 8); }
