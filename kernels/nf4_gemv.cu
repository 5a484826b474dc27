/* nf4_gemv.cu: the products of a decoding step, y = res + x W^T for a few
 * rows of x (one per sequence in flight), reading each weight once in its
 * stored form.
 *
 * The sum order. Every output element is summed the same way whatever the
 * number of rows n and whichever kernel runs, so that a sequence's result
 * never depends on what else is in the batch: the input dimension is cut
 * into chunks of 64 (one NF4 block), chunk c belongs to class (c / 4) % 8;
 * a class is summed on tensor cores (mma.sync m16n8k16, fp32 accumulation)
 * chunk after chunk in increasing order, starting from zero, and the eight
 * class sums are added to zero in class order (then res is added). Inside
 * a chunk the k index is permuted (lane t of a quad takes elements
 * 16t .. 16t+15) identically for W and x, which keeps every load
 * contiguous and leaves the dot products unchanged. Per chunk a lane
 * loads 16 consecutive weights of two rows (8 bytes of NF4 codes each) and
 * dequantizes them in registers (quant_map[code] * scale, the scale from
 * the 8-bit nested code with bitsandbytes' two roundings; block sizes are
 * powers of two, so no divisions).
 *
 * Three kernels follow that order. What bounds them on an H100 is the
 * instruction stream, not the bytes: a weight costs about four
 * instructions (a table offset, the lookup, the fp32 multiply, half a
 * bf16 pack) and a warp-chunk (16 rows x 64 weights) about 175 all told,
 * so the two fast kernels are built to issue few instructions and keep
 * many warps resident:
 *   - the code book sits in shared memory at a 256-byte-aligned address,
 *     so that one LOP3, PRMT or LEA.HI turns a byte of nibble offsets into
 *     a lookup's address (nf4_words); the nested code book likewise;
 *   - G4 (blocksize 64, nested, in % 256 == 0: every 7B matrix): the four
 *     chunks of a class group share one 4-byte load of 8-bit scale codes
 *     and one nested absmax a row, instead of two loads a chunk;
 *   - the lanes' row offsets are pinned in registers (pin), which the
 *     compiler otherwise recomputes from the thread index at every load;
 *   - x's columns past n are not read as such: lin_row reads column n-1
 *     (through L1), lin_tile and lin_wg zero-fill them (cp.async with no
 *     source bytes); a column of the mma's B reaches only the same
 *     column of its result, never stored.
 *
 *   - lin_row (n <= 16, the default): a block of 8 warps owns 16 output
 *     rows, warp w sums class w; its chunks stream through a ring of 4
 *     register slots (80 registers: 3 blocks, 24 warps an SM), x's
 *     fragments one chunk ahead from L1; the warps' sums are added in
 *     shared memory.
 *   - lin_vec (n <= 16, QLORA_GEN_VEC=1; slower on an H100 so far): a
 *     block of 8 warps takes tiles of 16 output rows in turn, and warp w
 *     sums class w; the warps' sums are added in shared memory. Each warp
 *     keeps D chunks of weights in flight (a register ring that runs on
 *     into the next tile), the next tile's rows are prefetched into L2
 *     with bulk prefetches, and the first loads are issued before the
 *     kernel waits for its predecessor (programmatic dependent launch,
 *     see gen_launch.cuh). When it fits (n in <= 20 K), x sits in shared
 *     memory.
 *   - lin_tile (n > 16): a block of W warps (4, 4 blocks an SM;
 *     QLORA_GEN_TILE_W=8) owns 16 W rows, warp i the rows 16i .. 16i+15,
 *     every warp all classes in order (the class sums kept in shared
 *     memory); the x chunks, shared by the W warps, stream through shared
 *     memory with cp.async, 4 stages deep; weights stream through
 *     registers 4 chunks ahead, the loop unrolled over one G4 group (4
 *     chunks; 8 measured 5% slower, TILE_G4_U). Products of fewer than
 *     150 row tiles (QLORA_GEN_SPLIT) are also split over the classes:
 *     block z sums class z alone into a workspace, and the last block of
 *     a row tile to finish adds the eight in class order.
 *     QLORA_GEN_TILE_S=2|4 splits over 2 or 4 class groups instead
 *     (measured slower, also after the finish below was made faster: the
 *     extra warps do not pay for the class sums' traffic). The last block
 *     issues a group of 8 elements' loads of the class sums before adding
 *     any (one memory latency a group, not one an element): o and down at
 *     n = 64 10-12% faster. Launched with PDL on sm_90 (its
 *     prologue overlaps the kernel before; QLORA_GEN_TILE_PDL=0 turns it
 *     off): a batch-64 step 12.24 against 12.33 ms.
 *   - lin_wg (32 < n <= 64, opt-in QLORA_GEN_WG=1, Hopper): lin_tile's
 *     sums on wgmma, warp-specialized (a loader warp, a dequantizing and
 *     a multiplying warpgroup) for 64 rows; the same bits as mma.sync
 *     (tested), but 1.26x slower than lin_tile on an H100 so far (see
 *     its comment).
 *
 * Measured on an H100 80GB HBM3 (bench/RESULTS.md, "gen, product kernels
 * (issue 8)"), the products of one 7B layer: 87.6 us at n = 1 (was
 * 125.7) and 228.5 us at n = 64 (was 316.6); a decoding step 3.39 ms at
 * batch 1 (was 4.61) and 12.57 ms at 64 (was 15.69). ncu at n = 1: half
 * the issue slots used, the stalls mostly fixed-latency dependencies and
 * weights in flight. Later ("gen, wgmma products and lin_tile tuning"):
 * 216-224 us at n = 64 (one group unrolled, PDL), a step 11.92 ms at 64
 * (with a faster cache attention); ncu on q/k/v at n = 64: 30% of the
 * issue slots at 6 warps an SM (192 blocks), stalls mostly fixed-latency
 * dependencies and shared-memory lookups. Then ("gen, warp-specialized
 * lin_wg and the split finish"): 214 us at n = 64, a step 11.79 ms.
 *
 * kn_gen_linear_f32: CUDA cores, one warp per output row, fp32 weights
 * (f32 checkpoints, LoRA matrices).
 */
#include "common.cuh"
#include "gen_kernels.h"
#include "gen_launch.cuh"
#include "wgmma.cuh"

#define LIN_WARPS 8
#define LIN_GROUP 4
#define LIN_CLASSES 8
#define TILE_STAGES 4
#define TILE_DT 4 /* NF4 chunks in flight a warp in lin_tile with G4 (8 spills) */
#define TILE_MAXCH 1024 /* chunks: in <= 65536 */
#ifndef TILE_G4_U
#define TILE_G4_U 4 /* lin_tile's unrolling with G4: 4 or 8 chunks */
#endif
#define SEQ_LAST 0x40000000
#define SEQ_CHUNK 0x3fffffff
#define VEC_XS_MAX (40 << 10) /* bytes of x kept in shared memory */
#define SPLIT_COUNTERS 4096   /* ints at the start of the split workspace */

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
    int pf;        /* rows may be prefetched into L2 (16-byte aligned) */
    const bf16 *w16;
    float *y;
    const float *res;
    int64_t ldy;
};

struct lin_pack {
    lin_desc d[3];
};

/* ---- configuration (env, read once; bench/gen compares variants) -------- */

struct lin_cfg {
    int vec_max;   /* largest n for lin_vec */
    int vec_d;     /* chunks in flight per warp in lin_vec (4 or 8) */
    int vec_grid;  /* lin_vec blocks: resident ones times this (0: a tile each) */
    int vec;       /* n <= 16: lin_vec (1) or lin_row (0) */
    int pf;        /* bytes of each row prefetched into L2 (0: none) */
    int split_min; /* split over the classes below this many blocks */
    int tile_w;    /* warps of an NF4 lin_tile block: 4 (4 blocks an SM) or 8 */
    int xs;        /* lin_vec may keep x in shared memory */
    int tile;      /* lin_tile for n > vec_max (else lin_vec, 16 rows at a time) */
    int g4;        /* lin_row and lin_tile load a group's scales at once where they can */
    int tile_pdl;  /* lin_tile launched with PDL like the step's other kernels (0: off) */
};

static int env_int(const char *name, int def)
{
    const char *s = getenv(name);
    return s && *s ? atoi(s) : def;
}

static const lin_cfg &cfg()
{
    static lin_cfg c;
    static int done;
    if (!done) {
        c.vec_max = env_int("QLORA_GEN_VEC_MAX", 16);
        c.vec_max = c.vec_max < 1 ? 1 : c.vec_max > 16 ? 16 : c.vec_max;
        c.vec_d = env_int("QLORA_GEN_VEC_D", 8) >= 8 ? 8 : 4;
        c.vec_grid = env_int("QLORA_GEN_VEC_GRID", 0);
        c.vec = env_int("QLORA_GEN_VEC", 0);
        c.pf = env_int("QLORA_GEN_PF", 1 << 20);
        c.split_min = env_int("QLORA_GEN_SPLIT", 150);
        c.tile_w = env_int("QLORA_GEN_TILE_W", 4) == 8 ? 8 : 4;
        c.xs = env_int("QLORA_GEN_XS", 1);
        c.tile = env_int("QLORA_GEN_TILE", 1);
        c.g4 = env_int("QLORA_GEN_G4", 1);
        c.tile_pdl = env_int("QLORA_GEN_TILE_PDL", 1);
        done = 1;
    }
    return c;
}

int gen_pdl_use(int n)
{
    static int on = -1;
    if (on < 0) {
        int dev = 0, major = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        /* opt-in: on an H100 a batch-1 step ran slower with it (4.86
         * against 4.60 ms, bench/RESULTS.md "gen, tuning") */
        const char *e = getenv("QLORA_GEN_PDL");
        on = major >= 9 && e && *e == '1';
    }
    return on && n <= 16;
}

/* ---- weights ------------------------------------------------------------------ */

/* 16 weights of one row for one chunk, as loaded: NF4 codes with the raw
 * scale (the nested code and nested absmax, or the absmax), or 16 bf16. */
template <int WK> struct wraw;
template <> struct wraw<KN_GW_NF4> {
    uint2 c;
    uint32_t sb;
    float sv;
};
template <> struct wraw<KN_GW_BF16> {
    uint4 a, b;
};

__device__ __forceinline__ void load_raw(wraw<KN_GW_NF4> &r, const lin_desc &D, int64_t row, int c,
                                         int t)
{
    const int64_t e0 = row * D.in + (int64_t)c * 64;
    r.c = __ldg((const uint2 *)(D.codes + (e0 >> 1)) + t);
    const int64_t b = e0 >> D.lbs;
    if (D.absmax_q) {
        r.sb = __ldg(D.absmax_q + b);
        r.sv = __ldg(D.nested_absmax + (b >> D.lnbs));
    } else {
        r.sb = 0;
        r.sv = __ldg(D.absmax + b);
    }
}

__device__ __forceinline__ void load_raw(wraw<KN_GW_BF16> &r, const lin_desc &D, int64_t row, int c,
                                         int t)
{
    const uint4 *p = (const uint4 *)(D.w16 + row * D.ld + (int64_t)c * 64 + 16 * t);
    r.a = __ldg(p);
    r.b = __ldg(p + 1);
}

/* The block scale, as nf4_absmax_of: two roundings, as bitsandbytes. Used
 * only once the raw loads have arrived, so that issuing them never waits. */
__device__ __forceinline__ float raw_scale(const wraw<KN_GW_NF4> &r, const lin_desc &D,
                                           const float *nmap)
{
    return D.absmax_q ? __fadd_rn(__fmul_rn(nmap[r.sb], r.sv), D.offset) : r.sv;
}

__device__ __forceinline__ float raw_scale(const wraw<KN_GW_BF16> &, const lin_desc &,
                                           const float *)
{
    return 0.0f;
}

/* Two bf16 pairs (k-tile kk) of a row's 16 weights. */
__device__ __forceinline__ void pair_words(const wraw<KN_GW_NF4> &r, const float *qmap, float sc,
                                           int kk, uint32_t &w0, uint32_t &w1)
{
    const uint32_t word = kk < 2 ? r.c.x : r.c.y;
    const uint32_t b0 = (word >> (16 * (kk & 1))) & 255u, b1 = (word >> (16 * (kk & 1) + 8)) & 255u;
    w0 = pack_bf16x2(qmap[b0 >> 4] * sc, qmap[b0 & 15] * sc);
    w1 = pack_bf16x2(qmap[b1 >> 4] * sc, qmap[b1 & 15] * sc);
}

__device__ __forceinline__ void pair_words(const wraw<KN_GW_BF16> &r, const float *, float, int kk,
                                           uint32_t &w0, uint32_t &w1)
{
    const uint4 &v = kk < 2 ? r.a : r.b;
    w0 = (kk & 1) ? v.z : v.x;
    w1 = (kk & 1) ? v.w : v.y;
}

/* The i-th chunk of class w. */
__device__ __forceinline__ int class_chunk(int i, int w)
{
    return ((i / LIN_GROUP) * LIN_CLASSES + w) * LIN_GROUP + i % LIN_GROUP;
}

/* How many of nch chunks class w has. */
__host__ __device__ __forceinline__ int class_count(int nch, int w)
{
    const int ng = (nch + LIN_GROUP - 1) / LIN_GROUP, rem = nch % LIN_GROUP;
    int c = ng > w ? ((ng - 1 - w) / LIN_CLASSES + 1) * LIN_GROUP : 0;
    if (rem && (ng - 1) % LIN_CLASSES == w)
        c -= LIN_GROUP - rem;
    return c;
}

/* One chunk's products for one warp: rows g and g+8 of its 16-row tile
 * (raw r[0], r[1]) times NT n-tiles of x, whose fragments xf(nt, k2)
 * returns (8 consecutive bf16 of k: k-tiles 2 k2 and 2 k2 + 1). */
template <int WK, int NT, typename XF>
__device__ __forceinline__ void chunk_mma(float (&acc)[NT][4], const wraw<WK> (&r)[2],
                                          const lin_desc &D, const float *qmap, const float *nmap,
                                          XF xf)
{
    const float sc0 = raw_scale(r[0], D, nmap), sc1 = raw_scale(r[1], D, nmap);
#pragma unroll
    for (int k2 = 0; k2 < 2; k2++) {
        uint4 xb[NT];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            xb[nt] = xf(nt, k2);
#pragma unroll
        for (int kh = 0; kh < 2; kh++) {
            const int kk = 2 * k2 + kh;
            uint32_t af[4];
            pair_words(r[0], qmap, sc0, kk, af[0], af[2]);
            pair_words(r[1], qmap, sc1, kk, af[1], af[3]);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                uint32_t bf[2] = {kh ? xb[nt].z : xb[nt].x, kh ? xb[nt].w : xb[nt].y};
                mma_bf16_16816(acc[nt], af, bf);
            }
        }
    }
}

__device__ __forceinline__ void l2_prefetch(const void *p, uint32_t bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (bytes >= 16)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes & ~15u)
                     : "memory");
#endif
}

/* x fragment of column col for k .. k+7 from global memory, zero past n
 * and K. */
__device__ __forceinline__ uint4 x_frag_global(const bf16 *x, int64_t ldx, int n, int K, int col,
                                               int k)
{
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (col < n) {
        const bf16 *xp = x + (int64_t)col * ldx + k;
        if (k + 8 <= K && (((uintptr_t)xp) & 15) == 0) {
            v = __ldg((const uint4 *)xp);
        } else {
            if (k < K) {
                uint2 lo = __ldg((const uint2 *)xp);
                v.x = lo.x;
                v.y = lo.y;
            }
            if (k + 4 < K) {
                uint2 hi = __ldg((const uint2 *)(xp + 4));
                v.z = hi.x;
                v.w = hi.y;
            }
        }
    }
    return v;
}

/* ---- the fast path's pieces (lin_row and lin_tile) ---------------------------- */

/* The two tables a product looks up, in shared memory at file scope: the
 * NF4 code book (16 entries 4 bytes apart: a warp's 32 lookups never
 * conflict) and the nested code book. The code book is 256-byte aligned,
 * so that an entry's address is the table's with its low byte replaced by
 * the entry's byte offset: one instruction (LOP3, PRMT or LEA.HI) makes
 * the address of each lookup from a byte of offsets (nf4_words). */
__shared__ __align__(256) float s_qmap[16];
__shared__ float s_nmap[256];

/* The address of the entry whose byte offset is byte J of v (qb: the
 * table's shared address, low byte zero). */
template <int J> __device__ __forceinline__ uint32_t qaddr(uint32_t v, uint32_t qb)
{
    if (J == 0)
        return (v & 0xffu) | qb;
    if (J == 3)
        return qb + (v >> 24);
    return __byte_perm(v, qb, 0x7650u + J);
}

/* volatile: the table is filled before a barrier, and a load that looks
 * pure could be hoisted above it */
__device__ __forceinline__ float lds_f32(uint32_t a)
{
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
    return v;
}

__device__ __forceinline__ uint32_t qmap_base()
{
    return (uint32_t)__cvta_generic_to_shared(s_qmap);
}

/* mma.sync m16n8k16 without `volatile`, so that the compiler may schedule
 * it among the dequantization (the same instruction, the same sums). */
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Keeps a value in a register: without it the compiler recomputes the
 * lanes' row pointers from the thread index at every load (dozens of
 * instructions a chunk) to save registers it does not need. */
template <typename T> __device__ __forceinline__ void pin(T *&p)
{
    asm volatile("" : "+l"(p));
}
__device__ __forceinline__ void pin(int32_t &v) { asm volatile("" : "+r"(v)); }
__device__ __forceinline__ void pin(uint32_t &v) { asm volatile("" : "+r"(v)); }

/* One operand of a launch, read into uniform registers once: a branch on
 * blockIdx.y rather than an indexed parameter load (which the compiler
 * repeats wherever it runs short of registers). */
__device__ __forceinline__ lin_desc pick_desc(const lin_pack &P)
{
    return blockIdx.y == 0 ? P.d[0] : blockIdx.y == 1 ? P.d[1] : P.d[2];
}

/* Lane t's part of one weight row: 16 weights of each chunk. */
template <int WK> struct wsrc;
template <> struct wsrc<KN_GW_NF4> {
    const uint8_t *p; /* codes of the row + 8 t */
    int32_t e;        /* the row's first element (numel < 2^31) */
};
template <> struct wsrc<KN_GW_BF16> {
    const uint8_t *p; /* the row (bytes) + 32 t */
    int32_t e;
};

template <int WK>
__device__ __forceinline__ wsrc<WK> row_src(const lin_desc &D, int64_t row, int t)
{
    wsrc<WK> s;
    if (WK == KN_GW_NF4) {
        s.p = D.codes + row * (D.in >> 1) + 8 * t;
        s.e = (int32_t)(row * D.in);
    } else {
        s.p = (const uint8_t *)(D.w16 + row * D.ld) + 32 * t;
        s.e = 0;
    }
    return s;
}

/* Issue the loads of the chunk whose first element is `off` (a multiple of
 * 64) into r; nothing waits for them here. */
__device__ __forceinline__ void load_chunk(wraw<KN_GW_NF4> &r, const wsrc<KN_GW_NF4> &s,
                                           const lin_desc &D, int32_t off)
{
    r.c = __ldg((const uint2 *)(s.p + (off >> 1)));
    const int32_t b = (s.e + off) >> D.lbs;
    if (D.absmax_q) {
        r.sb = __ldg(D.absmax_q + b);
        r.sv = __ldg(D.nested_absmax + (b >> D.lnbs));
    } else {
        r.sb = 0;
        r.sv = __ldg(D.absmax + b);
    }
}

__device__ __forceinline__ void load_chunk(wraw<KN_GW_BF16> &r, const wsrc<KN_GW_BF16> &s,
                                           const lin_desc &, int32_t off)
{
    const uint4 *p = (const uint4 *)(s.p + 2 * off);
    r.a = __ldg(p);
    r.b = __ldg(p + 1);
}

/* The block scale from the loaded raw scale (nf4_absmax_of's two roundings). */
__device__ __forceinline__ float chunk_scale(const wraw<KN_GW_NF4> &r, const lin_desc &D)
{
    return D.absmax_q ? __fadd_rn(__fmul_rn(s_nmap[r.sb], r.sv), D.offset) : r.sv;
}

__device__ __forceinline__ float chunk_scale(const wraw<KN_GW_BF16> &, const lin_desc &)
{
    return 0.0f;
}

/* The A fragment words of k-tile kk = 2 H + KH for one row: lo (k 2t, 2t+1
 * of the mma, the lane's weights 4kk, 4kk+1) and hi (2t+8, 2t+9: weights
 * 4kk+2, 4kk+3), each weight bf16(quant_map[code] * scale) with the first
 * (high-nibble) weight in the low half, as pair_words. The code word's
 * nibbles become table offsets two masks at a time: o holds 4 * the high
 * nibble of each byte, e 4 * the low nibble. */
struct nibs {
    uint32_t o, e;
};

__device__ __forceinline__ nibs nibs_of(uint32_t w)
{
    nibs v;
    v.o = (w >> 2) & 0x3c3c3c3cu;
    v.e = (w << 2) & 0x3c3c3c3cu;
    return v;
}

template <int KH>
__device__ __forceinline__ void nf4_words(const nibs &v, float s, uint32_t qb, uint32_t &lo,
                                          uint32_t &hi)
{
    lo = pack_bf16x2(__fmul_rn(lds_f32(qaddr<2 * KH>(v.o, qb)), s),
                     __fmul_rn(lds_f32(qaddr<2 * KH>(v.e, qb)), s));
    hi = pack_bf16x2(__fmul_rn(lds_f32(qaddr<2 * KH + 1>(v.o, qb)), s),
                     __fmul_rn(lds_f32(qaddr<2 * KH + 1>(v.e, qb)), s));
}

/* One chunk of one 16-row tile (rows g and g+8: raw r0, r1, scales s0, s1)
 * times NT n-tiles: k-tiles 0..3 in order. xb[nt][h]: x's 8 values of the
 * lane's column at k 16t + 8h .. +7 of the chunk. */
template <int WK, int NT>
__device__ __forceinline__ void chunk_rows(float (&acc)[NT][4], const wraw<WK> &r0,
                                           const wraw<WK> &r1, float s0, float s1, uint32_t qb,
                                           const uint4 (&xb)[NT][2])
{
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if constexpr (WK == KN_GW_NF4) {
            const nibs v0 = nibs_of(h ? r0.c.y : r0.c.x), v1 = nibs_of(h ? r1.c.y : r1.c.x);
            uint32_t a[4];
            nf4_words<0>(v0, s0, qb, a[0], a[2]);
            nf4_words<0>(v1, s1, qb, a[1], a[3]);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                mma_16816(acc[nt], a[0], a[1], a[2], a[3], xb[nt][h].x, xb[nt][h].y);
            nf4_words<1>(v0, s0, qb, a[0], a[2]);
            nf4_words<1>(v1, s1, qb, a[1], a[3]);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                mma_16816(acc[nt], a[0], a[1], a[2], a[3], xb[nt][h].z, xb[nt][h].w);
        } else {
            const uint4 &u0 = h ? r0.b : r0.a, &u1 = h ? r1.b : r1.a;
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                mma_16816(acc[nt], u0.x, u1.x, u0.y, u1.y, xb[nt][h].x, xb[nt][h].y);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                mma_16816(acc[nt], u0.z, u1.z, u0.w, u1.w, xb[nt][h].z, xb[nt][h].w);
        }
    }
}

/* The tables into shared memory (every thread of the block takes part). */
template <int WK>
__device__ __forceinline__ void load_tables(const lin_desc &D, int tid, int nthreads)
{
    if (WK != KN_GW_NF4)
        return;
    if (tid < 16)
        s_qmap[tid] = __ldg(D.quant_map + tid);
    if (D.absmax_q)
        for (int i = tid; i < 256; i += nthreads)
            s_nmap[i] = __ldg(D.nested_map + i);
}

/* ---- lin_row: n <= 16, the default ----------------------------------------------- */

/* A block of 8 warps owns 16 output rows; warp w sums class w. Its chunks
 * stream through a ring of DR register slots: the first DR are requested
 * before anything else happens, and each slot is refilled with the chunk
 * DR further on as soon as it has been used. x's fragments come from
 * global memory (L1 after the first warp) one chunk ahead. The warps'
 * sums are added in shared memory in class order. Chunk i of class w
 * starts at element 2048 (i / 4) + 256 w + 64 (i % 4) of the row
 * (class_chunk). MINB: the blocks an SM the launch bounds ask for. */
template <int WK, int NT, int DR, bool X16, bool G4, int MINB>
__global__ void __launch_bounds__(256, MINB) lin_row_kernel(lin_pack P, const bf16 *__restrict__ x,
                                                         int64_t ldx, int n)
{
    __shared__ float red[LIN_WARPS][NT * 4][32];
    const lin_desc D = pick_desc(P);
    const int64_t out = D.out;
    const int64_t row0 = (int64_t)blockIdx.x * 16;
    if (row0 >= out)
        return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int K = (int)D.in;
    const int cnt = class_count((K + 63) >> 6, warp);
    wsrc<WK> w0 = row_src<WK>(D, row0 + g < out ? row0 + g : out - 1, t);
    wsrc<WK> w1 = row_src<WK>(D, row0 + g + 8 < out ? row0 + g + 8 : out - 1, t);
    pin(w0.p), pin(w1.p), pin(w0.e), pin(w1.e);
    /* Chunk i0 + d of the class starts at element rb + coff(d) of the row,
     * rb = 256 w + 512 i0 the round's base (i0 a multiple of 4): the
     * offsets inside a round are immediates. */
    auto coff = [](int d) { return 2048 * (d >> 2) + 64 * (d & 3); };
    auto at = [](const wsrc<WK> &s, int32_t rb) {
        wsrc<WK> r;
        r.p = s.p + (WK == KN_GW_NF4 ? rb >> 1 : 2 * rb);
        r.e = s.e + rb;
        return r;
    };
    int32_t rb = 256 * warp;
    wraw<WK> raw[DR][2];
    /* G4: blocksize 64, nested, K % 256 == 0: the 8-bit scale codes of a
     * group of 4 chunks are 4 aligned bytes and share one nested absmax,
     * so a group's scales are two loads a row, not eight */
    uint32_t gsb[G4 ? DR / 4 : 1][2];
    float gsv[G4 ? DR / 4 : 1][2];
    auto load_c = [&](wraw<WK> &r, const wsrc<WK> &a, int32_t off) {
        if constexpr (G4 && WK == KN_GW_NF4)
            r.c = __ldg((const uint2 *)(a.p + (off >> 1)));
        else
            load_chunk(r, a, D, off);
    };
    auto load_gs = [&](int q, int32_t off) {
        if (G4) {
            const int32_t b0 = (w0.e + off) >> 6, b1 = (w1.e + off) >> 6;
            gsb[q][0] = __ldg((const uint32_t *)(D.absmax_q + b0));
            gsb[q][1] = __ldg((const uint32_t *)(D.absmax_q + b1));
            gsv[q][0] = __ldg(D.nested_absmax + (b0 >> D.lnbs));
            gsv[q][1] = __ldg(D.nested_absmax + (b1 >> D.lnbs));
        }
    };
    auto scale = [&](const wraw<WK> &r, int d, int hr) {
        if constexpr (G4) {
            const uint32_t sb = (gsb[d >> 2][hr] >> (8 * (d & 3))) & 0xffu;
            return __fadd_rn(__fmul_rn(s_nmap[sb], gsv[d >> 2][hr]), D.offset);
        } else {
            return chunk_scale(r, D);
        }
    };
    {
        const wsrc<WK> a0 = at(w0, rb), a1 = at(w1, rb);
#pragma unroll
        for (int d = 0; d < DR; d++)
            if (d < cnt) {
                if (d % 4 == 0)
                    load_gs(d / 4, rb + coff(d));
                load_c(raw[d][0], a0, coff(d));
                load_c(raw[d][1], a1, coff(d));
            }
    }
    load_tables<WK>(D, tid, 256);
    /* x is the predecessor's output */
    gen_pdl_wait();
    gen_pdl_trigger();
    /* Columns past n read column n-1 instead of zeros: a column of the
     * mma's B only reaches the same column of its result, which is not
     * stored. */
    const bf16 *xp[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        xp[nt] = x + (int64_t)(nt * 8 + g < n ? nt * 8 + g : n - 1) * ldx + 16 * t;
        pin(xp[nt]);
    }
    auto load_x = [&](uint4 (&v)[NT][2], int32_t k) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            if (X16) {
                v[nt][0] = __ldg((const uint4 *)(xp[nt] + k));
                v[nt][1] = __ldg((const uint4 *)(xp[nt] + k + 8));
            } else {
#pragma unroll
                for (int h = 0; h < 2; h++)
                    v[nt][h] = x_frag_global(x, ldx, n, K, nt * 8 + g, k + 16 * t + 8 * h);
            }
        }
    };
    const uint32_t qb = qmap_base();
    /* chunk i+1's x is requested before chunk i is computed (requesting
     * it at chunk i, from L1, frees the registers for 4 blocks an SM: it
     * ran slower, bench/RESULTS.md "gen, product kernels") */
    uint4 xb[2][NT][2];
    if (cnt > 0)
        load_x(xb[0], rb);
    __syncthreads(); /* the tables */
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            acc[nt][j] = 0.0f;
    for (int i0 = 0; i0 < cnt; i0 += DR, rb += 512 * DR) {
        const wsrc<WK> a0 = at(w0, rb), a1 = at(w1, rb);
#pragma unroll
        for (int d = 0; d < DR; d++) {
            const int i = i0 + d;
            if (i < cnt) {
                if (i + 1 < cnt)
                    load_x(xb[(d + 1) & 1], rb + coff(d + 1));
                const float s0 = scale(raw[d][0], d, 0), s1 = scale(raw[d][1], d, 1);
                chunk_rows<WK, NT>(acc, raw[d][0], raw[d][1], s0, s1, qb, xb[d & 1]);
                if (i + DR < cnt) {
                    load_c(raw[d][0], a0, coff(d + DR));
                    load_c(raw[d][1], a1, coff(d + DR));
                    /* the group's scales once its last chunk is done */
                    if (d % 4 == 3)
                        load_gs(d / 4, rb + coff(d + DR - 3));
                }
            }
        }
    }
    /* the class sums, added to zero in class (warp) order */
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            red[warp][nt * 4 + j][lane] = acc[nt][j];
    __syncthreads();
    for (int e = tid; e < NT * 4 * 32; e += 256) {
        const int q = e >> 5, ln = e & 31;
        const int nt = q >> 2, j = q & 3, gg = ln >> 2, tt = ln & 3;
        const int64_t row = row0 + gg + ((j & 2) ? 8 : 0);
        const int col = nt * 8 + 2 * tt + (j & 1);
        if (row < out && col < n) {
            float s = 0.0f;
#pragma unroll
            for (int wi = 0; wi < LIN_WARPS; wi++)
                s += red[wi][q][ln];
            const int64_t i = (int64_t)col * D.ldy + row;
            D.y[i] = (D.res ? D.res[i] : 0.0f) + s;
        }
    }
}

/* ---- lin_vec: n <= 16 ----------------------------------------------------------- */

/* The block's rows of tile `tile` into L2: every byte requested at once. */
template <int WK>
__device__ __forceinline__ void prefetch_tile(const lin_desc &D, int64_t tile, int tid,
                                              int pf_bytes)
{
    const int64_t row = tile * 16 + tid;
    if (pf_bytes <= 0 || !D.pf || tid >= 16 || row >= D.out)
        return;
    const int64_t rb = WK == KN_GW_NF4 ? D.in >> 1 : D.ld * 2;
    const void *p = WK == KN_GW_NF4 ? (const void *)(D.codes + row * rb)
                                    : (const void *)(D.w16 + row * D.ld);
    l2_prefetch(p, (uint32_t)(rb < pf_bytes ? rb : pf_bytes));
}

/* Block (b, op) takes the 16-row tiles b, b + gridDim.x, ... of product
 * op. Warp w sums class w of each; its chunks stream through a ring of D
 * register slots that runs on into the next tile (each tile's chunk count
 * padded to a multiple of D, so that chunk i always lands in slot i % D),
 * while the next tile's rows are prefetched into L2. */
template <int WK, int NT, int D, bool XS>
__global__ void __launch_bounds__(256) lin_vec_kernel(lin_pack P, const bf16 *__restrict__ x,
                                                      int64_t ldx, int n, int pf_bytes)
{
    extern __shared__ __align__(16) unsigned char vsm[]; /* XS: x (n, K) bf16 */
    __shared__ float qmap[16];
    __shared__ float nmap[256];
    __shared__ float red[LIN_WARPS][NT * 4][32];
    const lin_desc &D_ = P.d[blockIdx.y];
    const int64_t out = D_.out;
    const int64_t ntiles = (out + 15) / 16;
    if ((int64_t)blockIdx.x >= ntiles)
        return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int K = (int)D_.in;
    const int nch = (K + 63) >> 6;
    const int cnt = class_count(nch, warp);
    const int cntpad = (cnt + D - 1) / D * D;
    prefetch_tile<WK>(D_, blockIdx.x, tid, pf_bytes);
    auto rows_of = [&](int64_t tile, int64_t &ra, int64_t &rb) {
        const int64_t r = tile * 16 + g;
        ra = r < out ? r : out - 1;
        rb = r + 8 < out ? r + 8 : out - 1;
    };
    int64_t r0, r1;
    rows_of(blockIdx.x, r0, r1);
    wraw<WK> raw[D][2];
#pragma unroll
    for (int d = 0; d < D; d++)
        if (d < cnt) {
            const int c = class_chunk(d, warp);
            load_raw(raw[d][0], D_, r0, c, t);
            load_raw(raw[d][1], D_, r1, c, t);
        }
    if (WK == KN_GW_NF4) {
        if (tid < 16)
            qmap[tid] = D_.quant_map[tid];
        if (D_.absmax_q)
            nmap[tid] = D_.nested_map[tid]; /* 256 threads, 256 entries */
    }
    /* x is the predecessor's output */
    gen_pdl_wait();
    gen_pdl_trigger();
    const bf16 *xs = (const bf16 *)vsm;
    uint4 xr[XS ? 1 : D][NT][2];
    auto load_xr = [&](uint4 (&v)[NT][2], int c) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int k2 = 0; k2 < 2; k2++)
                v[nt][k2] = x_frag_global(x, ldx, n, K, nt * 8 + g, c * 64 + 16 * t + 8 * k2);
    };
    if (XS) {
        const int per = K >> 3;
        for (int i = tid; i < n * per; i += 256) {
            const int col = i / per, u = i - col * per;
            ((uint4 *)vsm)[i] = __ldg((const uint4 *)(x + (int64_t)col * ldx) + u);
        }
    } else {
#pragma unroll
        for (int d = 0; d < D; d++)
            if (d < cnt)
                load_xr(xr[XS ? 0 : d], class_chunk(d, warp));
    }
    __syncthreads();
    for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int64_t next = tile + gridDim.x;
        if (next < ntiles)
            prefetch_tile<WK>(D_, next, tid, pf_bytes);
        int64_t n0, n1;
        rows_of(next < ntiles ? next : tile, n0, n1);
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                acc[nt][j] = 0.0f;
        for (int i0 = 0; i0 < cntpad; i0 += D) {
#pragma unroll
            for (int d = 0; d < D; d++) {
                const int i = i0 + d;
                if (i < cnt) {
                    const int kb = class_chunk(i, warp) * 64 + 16 * t;
                    if (XS)
                        chunk_mma<WK, NT>(acc, raw[d], D_, qmap, nmap, [&](int nt, int k2) {
                            const int col = nt * 8 + g;
                            return col < n ? *(const uint4 *)(xs + (int64_t)col * K + kb + 8 * k2)
                                           : make_uint4(0u, 0u, 0u, 0u);
                        });
                    else
                        chunk_mma<WK, NT>(acc, raw[d], D_, qmap, nmap,
                                          [&](int nt, int k2) { return xr[XS ? 0 : d][nt][k2]; });
                }
                /* slot d's next chunk: i + D of this tile, or of the next */
                const int j = i + D;
                int c = -1;
                int64_t ra = r0, rb = r1;
                if (j < cnt) {
                    c = class_chunk(j, warp);
                } else if (j >= cntpad && j - cntpad < cnt && next < ntiles) {
                    c = class_chunk(j - cntpad, warp);
                    ra = n0;
                    rb = n1;
                }
                if (c >= 0) {
                    load_raw(raw[d][0], D_, ra, c, t);
                    load_raw(raw[d][1], D_, rb, c, t);
                    if (!XS)
                        load_xr(xr[XS ? 0 : d], c);
                }
            }
        }
        /* the class sums, added to zero in class (warp) order */
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                red[warp][nt * 4 + j][lane] = acc[nt][j];
        __syncthreads();
        const int64_t row0 = tile * 16;
        for (int e = tid; e < NT * 4 * 32; e += 256) {
            const int q = e >> 5, ln = e & 31;
            float s = 0.0f;
#pragma unroll
            for (int wi = 0; wi < LIN_WARPS; wi++)
                s += red[wi][q][ln];
            const int nt = q >> 2, j = q & 3, gg = ln >> 2, tt = ln & 3;
            const int64_t row = row0 + gg + ((j & 2) ? 8 : 0);
            const int col = nt * 8 + 2 * tt + (j & 1);
            if (row < out && col < n) {
                const int64_t i = (int64_t)col * D_.ldy + row;
                D_.y[i] = (D_.res ? D_.res[i] : 0.0f) + s;
            }
        }
        __syncthreads();
        r0 = n0;
        r1 = n1;
    }
}

/* ---- pieces shared by lin_tile and lin_wg -------------------------------------- */

/* named barriers: bar_sync waits for n threads (its own among them),
 * bar_arrive counts itself and goes on */
__device__ __forceinline__ void bar_sync(int id, int n)
{
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

__device__ __forceinline__ void bar_arrive(int id, int n)
{
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

/* The order of a block's chunks into seq: classes c0 .. c0+cpb-1, class
 * by class, increasing inside a class; SEQ_LAST marks the last chunk of a
 * class. Returns how many. Split (cpb < 8): a class with no chunks (K <
 * 2048) sums to zero, written to the workspace here for the block's rows
 * row0 .. row0+rows-1. */
__device__ __forceinline__ int tile_order(int *seq, int nch, int c0, int cpb, float *ws,
                                          int64_t wsld, int64_t row0, int rows, int64_t out,
                                          int n, int tid, int T)
{
    int total = 0;
    for (int v = c0; v < c0 + cpb; v++)
        total += class_count(nch, v);
    for (int c = tid; c < nch; c += T) {
        const int w = (c / LIN_GROUP) % LIN_CLASSES;
        if (w < c0 || w >= c0 + cpb)
            continue;
        const int i = (c / (LIN_GROUP * LIN_CLASSES)) * LIN_GROUP + c % LIN_GROUP;
        int o = 0;
        for (int v = c0; v < w; v++)
            o += class_count(nch, v);
        seq[o + i] = c | (i == class_count(nch, w) - 1 ? SEQ_LAST : 0);
    }
    if (cpb < LIN_CLASSES)
        for (int v = c0; v < c0 + cpb; v++)
            if (class_count(nch, v) == 0)
                for (int q = tid; q < rows * 64; q += T) {
                    const int64_t row = row0 + q % rows;
                    const int col = q / rows;
                    if (row < out && col < n)
                        ws[SPLIT_COUNTERS +
                           (((int64_t)blockIdx.y * LIN_CLASSES + v) * 64 + col) * wsld + row] = 0.0f;
                }
    return total;
}

/* Element q of a warp's accumulators (MT row tiles x NT n-tiles x 4, in
 * mma.sync's C layout; wgmma's m64nN is the same with MT = 1): its row
 * in the block (rbase: the warp's first row) and its column. */
template <int NT>
__device__ __forceinline__ void acc_pos(int q, int rbase, int g, int t, int &r, int &col)
{
    r = rbase + (q / (NT * 4)) * 16 + g + ((q & 2) ? 8 : 0);
    col = ((q / 4) % NT) * 8 + 2 * t + (q & 1);
}

/* A class's sums (acc, MT*NT*4 a lane) into the split workspace. */
template <int MT, int NT>
__device__ __forceinline__ void tile_put_class(float *part, const float *acc, int cls,
                                               int64_t row0, int rbase, int g, int t,
                                               int64_t out, int n, int64_t wsld)
{
#pragma unroll
    for (int q = 0; q < MT * NT * 4; q++) {
        int r, col;
        acc_pos<NT>(q, rbase, g, t, r, col);
        if (row0 + r < out && col < n)
            part[((int64_t)cls * 64 + col) * wsld + row0 + r] = acc[q];
    }
}

/* The threads that finish a tile meet: all of the block (BT = 0), or the
 * first BT threads at named barrier 1. */
template <int BT> __device__ __forceinline__ void block_sync()
{
    if (BT)
        bar_sync(1, BT);
    else
        __syncthreads();
}

/* The results: res + the class sums, from the warp's running total in
 * shared memory (mytot, element q at mytot[32 q]; S = 1), or (split) once
 * every block of the row tile has written its classes, by the last of
 * them, adding the eight in class order. */
template <int MT, int NT, int S, int BT = 0>
__device__ __forceinline__ void tile_finish(const lin_desc &D, const float *mytot, float *ws,
                                            int64_t wsld, int ntiles, int64_t row0, int rbase,
                                            int g, int t, int n, int tid, int *s_last)
{
    const int64_t out = D.out;
    if (S == 1) {
#pragma unroll
        for (int q = 0; q < MT * NT * 4; q++) {
            int r, col;
            acc_pos<NT>(q, rbase, g, t, r, col);
            if (row0 + r < out && col < n) {
                const int64_t i = (int64_t)col * D.ldy + row0 + r;
                D.y[i] = (D.res ? D.res[i] : 0.0f) + mytot[q * 32];
            }
        }
        return;
    }
    const float *part = ws + SPLIT_COUNTERS + ((int64_t)blockIdx.y * LIN_CLASSES * 64) * wsld;
    __threadfence();
    block_sync<BT>();
    int *counter = (int *)ws + blockIdx.y * ntiles + blockIdx.x;
    if (tid == 0)
        *s_last = atomicAdd(counter, 1) == S - 1;
    block_sync<BT>();
    if (!*s_last)
        return;
    __threadfence();
    /* QG elements at a time, their loads all issued before the first sum
     * (clamped to rows and columns that exist; what they read for the
     * others is never stored): one memory latency a group, not one an
     * element */
    constexpr int QN = MT * NT * 4, QG = QN < 8 ? QN : 8;
#pragma unroll
    for (int q0 = 0; q0 < QN; q0 += QG) {
        float v[QG][LIN_CLASSES], rv[QG];
        int64_t yi[QG];
        bool ok[QG];
#pragma unroll
        for (int qq = 0; qq < QG; qq++) {
            int r, col;
            acc_pos<NT>(q0 + qq, rbase, g, t, r, col);
            ok[qq] = row0 + r < out && col < n;
            const int64_t rr = row0 + r < out ? row0 + r : out - 1;
            const int cc = col < n ? col : n - 1;
#pragma unroll
            for (int z = 0; z < LIN_CLASSES; z++)
                v[qq][z] = __ldcg(part + ((int64_t)z * 64 + cc) * wsld + rr);
            yi[qq] = (int64_t)cc * D.ldy + rr;
            rv[qq] = D.res ? D.res[yi[qq]] : 0.0f;
        }
#pragma unroll
        for (int qq = 0; qq < QG; qq++) {
            float s = 0.0f;
#pragma unroll
            for (int z = 0; z < LIN_CLASSES; z++)
                s += v[qq][z];
            if (ok[qq])
                D.y[yi[qq]] = rv[qq] + s;
        }
    }
    if (tid == 0)
        *counter = 0;
}

/* ---- lin_tile: 16 < n <= 64 -------------------------------------------------------- */

template <int NT> __host__ __device__ constexpr size_t tile_xs_bytes()
{
    return (size_t)TILE_STAGES * NT * 8 * 64 * 2;
}

template <int NT, int W, int MT, int S> __host__ __device__ constexpr size_t tile_tot_bytes()
{
    return S > 1 ? 0 : (size_t)W * MT * NT * 4 * 32 * 4;
}

template <int NT, int W, int MT, int S> __host__ __device__ constexpr size_t tile_smem_max()
{
    return tile_xs_bytes<NT>() + tile_tot_bytes<NT, W, MT, S>() + TILE_MAXCH * 4;
}

/* Blocks resident per SM the launch bounds ask for: MT = 2 keeps 64
 * accumulators a lane. */
template <int W, int MT> __host__ __device__ constexpr int tile_min_blocks()
{
    return MT == 2 ? (W == 4 ? 3 : 1) : 16 / W;
}

/* A block of W warps owns 16 MT W rows, warp i the MT 16-row tiles from
 * row 16 MT i, and sums every class in order (the class sums added into
 * `tot` in shared memory), or, split, class blockIdx.z alone. The x
 * chunks, shared by the W warps, stream through shared memory with
 * cp.async, TILE_STAGES deep, 16-byte units swizzled by the column; each
 * x fragment read from there serves the MT row tiles. Weights stream
 * through registers DT chunks ahead.
 *
 * ws (split): SPLIT_COUNTERS ints, a counter per (op, row tile), zero
 * between launches (at a fixed place: launches of other shapes write
 * their partial sums after it), then the partial sums (nops, 8, 64, wsld)
 * fp32. */
template <int WK, int NT, int W, int MT, int S, bool G4>
__global__ void __launch_bounds__(W * 32, tile_min_blocks<W, MT>())
    lin_tile_kernel(lin_pack P, const bf16 *__restrict__ x, int64_t ldx, int n, float *ws,
                    int64_t wsld, int ntiles)
{
    extern __shared__ __align__(16) unsigned char tsm[];
    __shared__ int s_last;
    constexpr int T = W * 32;
    /* chunks of weights in flight */
    constexpr int DT = WK == KN_GW_NF4 ? (MT == 1 ? (G4 ? TILE_DT : 4) : 2) : 2;
    /* the main loop's unrolling: with G4, one group (TILE_G4_U = 4: group
     * k+1's scales move from slot 1 to slot 0 when group k ends) or two
     * (8: slot k % 2) */
    constexpr int U = G4 ? TILE_G4_U : DT;
    constexpr int XU = NT * 8 * 8 / T; /* 16-byte x units a thread copies per chunk */
    static_assert(XU >= 1 && NT * 8 * 8 % T == 0, "x units");
    const lin_desc D = pick_desc(P);
    const int64_t out = D.out;
    const int64_t row0 = (int64_t)blockIdx.x * (16 * MT * W);
    if (row0 >= out)
        return;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int K = (int)D.in;
    const int nch = (K + 63) >> 6;
    constexpr int CPB = LIN_CLASSES / S; /* classes a block sums */
    const int c0 = (int)blockIdx.z * CPB;
    const bf16 *xs = (const bf16 *)tsm;
    float *tot = (float *)(tsm + tile_xs_bytes<NT>());
    int *seq = (int *)(tsm + tile_xs_bytes<NT>() + tile_tot_bytes<NT, W, MT, S>());
    const int total =
        tile_order(seq, nch, c0, CPB, ws, wsld, row0, 16 * MT * W, out, n, tid, T);
    load_tables<WK>(D, tid, T);
    __syncthreads();
    const uint32_t qb = qmap_base();
    /* the lane's rows (g, g+8 of each row tile) as 32-bit offsets from one
     * base: fewer registers than a pointer each */
    const wsrc<WK> base = row_src<WK>(D, 0, t);
    int32_t roff[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const int64_t r = row0 + (warp * MT + m) * 16 + g + 8 * hr;
            roff[m][hr] = (int32_t)(row_src<WK>(D, r < out ? r : out - 1, t).p - base.p);
            pin(roff[m][hr]);
        }
    auto load_rows = [&](wraw<WK>(&r)[MT][2], int32_t off) {
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int hr = 0; hr < 2; hr++) {
                wsrc<WK> sr;
                sr.p = base.p + roff[m][hr];
                sr.e = 2 * roff[m][hr]; /* NF4: two weights a byte */
                load_chunk(r[m][hr], sr, D, off);
            }
    };
    /* G4 (as lin_row's): a group of 4 chunks (positions 4k .. 4k+3: class
     * counts are multiples of 4) shares one 4-byte load of scale codes and
     * one nested absmax a row; group k's sit in slot k % 2, and group k+1's
     * are requested when group k starts */
    uint32_t gsb[G4 ? 2 : 1][MT][2];
    float gsv[G4 ? 2 : 1][MT][2];
    auto load_gs = [&](int slot, int32_t off) {
        if constexpr (G4) {
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    const int32_t b = (2 * roff[m][hr] + off) >> 6;
                    gsb[slot][m][hr] = __ldg((const uint32_t *)(D.absmax_q + b));
                    gsv[slot][m][hr] = __ldg(D.nested_absmax + (b >> D.lnbs));
                }
        }
    };
    auto load_w = [&](wraw<WK>(&r)[MT][2], int32_t off) {
        if constexpr (G4 && WK == KN_GW_NF4) {
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++)
                    r[m][hr].c = __ldg((const uint2 *)(base.p + roff[m][hr] + (off >> 1)));
        } else {
            load_rows(r, off);
        }
    };
    wraw<WK> raw[DT][MT][2];
    if (G4 && total > 0)
        load_gs(0, (seq[0] & SEQ_CHUNK) * 64);
#pragma unroll
    for (int d = 0; d < DT; d++)
        if (d < total)
            load_w(raw[d], (seq[d] & SEQ_CHUNK) * 64);
    gen_pdl_wait();
    gen_pdl_trigger();
    /* x chunk of position p into stage p % TILE_STAGES: (NT*8 cols, 64 k),
     * 16-byte units swizzled by the column; 8-byte copies when x's rows
     * are not 16-byte aligned. Thread tid copies units tid + T j. */
    const bool x16 = (ldx & 7) == 0 && (((uintptr_t)x) & 15) == 0;
    const bool xfast = x16 && K % 64 == 0 && n * ldx < (1 << 30);
    /* unit j: column tid/8 + (T/8) j, k 8 (tid % 8): from the first unit's
     * offsets (col % 8 is the same for every j) */
    const int xcol = tid >> 3, xu = (tid & 7) * 8;
    int32_t xoff = (int32_t)(xcol * ldx + xu);
    uint32_t xdst = (uint32_t)(xcol * 128 + (((tid & 7) ^ (xcol & 7)) << 4));
    pin(xoff), pin(xdst);
    const uint32_t xs_sh = (uint32_t)__cvta_generic_to_shared(xs);
    auto load_x = [&](int p) {
        if (p < total) {
            const uint32_t st = xs_sh + (uint32_t)((p % TILE_STAGES) * (NT * 8 * 64 * 2)) + xdst;
            const int k0 = (seq[p] & SEQ_CHUNK) * 64, k = k0 + xu;
            if (xfast) {
                /* columns past n are zero-filled without a read (they
                 * reach only output columns that are not stored): copying
                 * column n-1 into them instead, as lin_row does from L1,
                 * sent up to 31 requests for the same 16 bytes to one L2
                 * slice and made n = 33 .. 63 slower than 64 (a layer
                 * 2,522 us at n = 33 against 1,730 at 64) */
#pragma unroll
                for (int j = 0; j < XU; j++) {
                    const int col = xcol + (T / 8) * j;
                    const bool ok = col < n;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                     st + (uint32_t)((T / 8) * j * 128)),
                                 "l"(x + ((ok ? col : 0) * (int32_t)ldx + k)), "r"(ok ? 16 : 0));
                }
            } else {
#pragma unroll
            for (int j = 0; j < XU; j++) {
                const bool ok = xcol + (T / 8) * j < n && k < K;
                const bf16 *s = ok ? x + xoff + (int64_t)(T / 8) * j * ldx + k0 : x;
                const uint32_t dst = st + (uint32_t)((T / 8) * j * 128);
                if (x16) {
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                                 "l"(s), "r"(ok ? (K - k >= 8 ? 16 : 2 * (K - k)) : 0));
                } else {
#pragma unroll
                    for (int hh = 0; hh < 2; hh++) {
                        const bool ok2 = ok && k + 4 * hh < K;
                        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(
                                         dst + 8 * hh),
                                     "l"(ok2 ? s + 4 * hh : x), "r"(ok2 ? 8 : 0));
                    }
                }
            }
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < TILE_STAGES - 1; s++)
        load_x(s);
    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                acc[m][nt][j] = 0.0f;
    float *mytot = tot + (size_t)warp * MT * NT * 4 * 32 + lane;
    float *part = ws + SPLIT_COUNTERS + ((int64_t)blockIdx.y * LIN_CLASSES * 64) * wsld;
    if (S == 1)
#pragma unroll
        for (int q = 0; q < MT * NT * 4; q++)
            mytot[q * 32] = 0.0f;
    for (int p0 = 0; p0 < total; p0 += U) {
#pragma unroll
        for (int du = 0; du < U; du++) {
            const int p = p0 + du, d = du % DT;
            if (p >= total)
                break;
            if (G4 && du % 4 == 0 && p + 4 < total)
                load_gs(U == 4 ? 1 : ((du >> 2) + 1) & 1, (seq[p + 4] & SEQ_CHUNK) * 64);
            cp_async_wait<TILE_STAGES - 2>();
            __syncthreads();
            load_x(p + TILE_STAGES - 1);
            const int e = seq[p];
            const unsigned char *st =
                tsm + (p % TILE_STAGES) * (NT * 8 * 64 * 2) + g * 128; /* column g */
            float sc[MT][2];
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    if constexpr (G4) {
                        const int gs = U == 4 ? 0 : (du >> 2) & 1;
                        const uint32_t sb = (gsb[gs][m][hr] >> (8 * (du & 3))) & 0xffu;
                        sc[m][hr] = __fadd_rn(__fmul_rn(s_nmap[sb], gsv[gs][m][hr]), D.offset);
                    } else {
                        sc[m][hr] = chunk_scale(raw[d][m][hr], D);
                    }
                }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                /* the A fragments of k-tiles 2h and 2h+1 of every row tile,
                 * then each x fragment (one LDS.128, conflict-free by the
                 * swizzle) into all of them */
                uint32_t a[MT][2][4];
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    if constexpr (WK == KN_GW_NF4) {
                        const wraw<WK> &q0 = raw[d][m][0], &q1 = raw[d][m][1];
                        const nibs v0 = nibs_of(h ? q0.c.y : q0.c.x);
                        const nibs v1 = nibs_of(h ? q1.c.y : q1.c.x);
                        nf4_words<0>(v0, sc[m][0], qb, a[m][0][0], a[m][0][2]);
                        nf4_words<0>(v1, sc[m][1], qb, a[m][0][1], a[m][0][3]);
                        nf4_words<1>(v0, sc[m][0], qb, a[m][1][0], a[m][1][2]);
                        nf4_words<1>(v1, sc[m][1], qb, a[m][1][1], a[m][1][3]);
                    } else {
                        const uint4 &u0 = h ? raw[d][m][0].b : raw[d][m][0].a;
                        const uint4 &u1 = h ? raw[d][m][1].b : raw[d][m][1].a;
                        a[m][0][0] = u0.x, a[m][0][1] = u1.x, a[m][0][2] = u0.y, a[m][0][3] = u1.y;
                        a[m][1][0] = u0.z, a[m][1][1] = u1.z, a[m][1][2] = u0.w, a[m][1][3] = u1.w;
                    }
                }
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const uint4 xb =
                        *(const uint4 *)(st + nt * (8 * 128) + (((2 * t + h) ^ g) << 4));
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        mma_16816(acc[m][nt], a[m][0][0], a[m][0][1], a[m][0][2], a[m][0][3],
                                  xb.x, xb.y);
                        mma_16816(acc[m][nt], a[m][1][0], a[m][1][1], a[m][1][2], a[m][1][3],
                                  xb.z, xb.w);
                    }
                }
            }
            if (p + DT < total)
                load_w(raw[d], (seq[p + DT] & SEQ_CHUNK) * 64);
            if (e & SEQ_LAST) {
                /* the class's sums: into tot, or (split) the workspace */
                float *af = &acc[0][0][0];
                if (S == 1) {
#pragma unroll
                    for (int q = 0; q < MT * NT * 4; q++)
                        mytot[q * 32] += af[q];
                } else {
                    tile_put_class<MT, NT>(part, af,
                                           ((e & SEQ_CHUNK) / LIN_GROUP) % LIN_CLASSES, row0,
                                           warp * MT * 16, g, t, out, n, wsld);
                }
#pragma unroll
                for (int q = 0; q < MT * NT * 4; q++)
                    af[q] = 0.0f;
            }
            if (G4 && U == 4 && du == 3)
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int hr = 0; hr < 2; hr++) {
                        gsb[0][m][hr] = gsb[1][m][hr];
                        gsv[0][m][hr] = gsv[1][m][hr];
                    }
        }
    }
    cp_async_wait<0>();
    tile_finish<MT, NT, S>(D, mytot, ws, wsld, ntiles, row0, warp * MT * 16, g, t, n, tid, &s_last);
}

/* ---- lin_wg: 32 < n <= 64 on Hopper (wgmma) --------------------------------------- */

/* lin_tile's products on wgmma, for NF4 weights with G4 scales (K a
 * multiple of 256) on compute capability 9.0. A block owns 64 W rows and
 * its warps have separate jobs, in the manner of CUTLASS's warp-
 * specialized mixed-input kernels:
 *   - the loader (warps 8 .. 8+WG_LW-1) brings each chunk's NF4 codes,
 *     scale codes, nested absmax and x from global into a staging ring
 *     of WG_RS slots with cp.async, running ahead;
 *   - the dequantizer (warps 4..7) turns a staged chunk of the 64 rows
 *     (64 x 64 weights) into bf16 in shared memory and copies the chunk
 *     of x beside it, both in wgmma's K-major layout without swizzle
 *     (one of WG_STAGES stages);
 *   - the consumer (warps 0..3) multiplies them, one m64n64k16 product
 *     per k-tile, both operands read from shared memory.
 * They meet only at named barriers, a pair per slot or stage: "loaded"
 * and "freed" between loader and dequantizer, "full" (the stage written
 * and fenced for the async proxy) and "empty" (its products done)
 * between dequantizer and consumer. So no warp waits on the latency of
 * anything but its own job: the loads are in flight while the lookups
 * run, and those while the tensor cores run. (The loads are the
 * loader's alone because a proxy fence waits for every load its thread
 * has in flight, and register loads issued ahead share one scoreboard:
 * a dequantizer that loaded for itself would wait a full memory latency
 * at every chunk, as the first version of this kernel did.)
 *
 * The sums keep the order of the top: classes in order, chunks in
 * increasing order inside a class, k-tiles 0..3 inside a chunk, each
 * k-tile one m64n64k16 product accumulated in fp32; on an H100 that gives
 * mma.sync's bits exactly (tests/gpu/gen.c checks every row against
 * lin_row's for n = 1 .. 64).
 *
 * A stage (16 KB): the chunk's weights (64 rows) then its x (64 columns),
 * each 64 rows by the chunk's 64 k in the products' order, in core
 * matrices of 8 rows x 8 k (16 bytes a row); the two halves of a k-tile
 * 128 bytes apart, k-tiles 256 bytes apart, groups of 8 rows 1024 bytes
 * apart. The order permutes k inside a chunk as lin_tile does: position
 * q (0..15) of k-tile kk holds element 16 ((q / 2) % 4) + 4 kk + 2 (q / 8)
 * + q % 2. Dequantizer thread i takes row i / 2 and the codes of lanes
 * 2 (i % 2) and 2 (i % 2) + 1 of lin_tile (16 bytes: elements 32 (i % 2)
 * .. +31), and writes 8 bytes of each of the 8 core rows they touch; it
 * also copies x's column i % 64 for k-tiles 2 (i / 64) and 2 (i / 64) + 1
 * (four 16-byte pieces whose words regroup into four 16-byte stores).
 *
 * A staging slot: x's 64 columns as loaded (rows of 144 bytes, so that
 * the copies' 16-byte reads of 8 columns hit distinct banks), then the
 * codes (64 rows x 32 bytes), the 4-byte words holding each row's scale
 * code, and each row's nested absmax.
 *
 * Measured on an H100 (bench/RESULTS.md, "gen, warp-specialized lin_wg
 * and the split finish"): a 7B layer's products at n = 64 in 269 us
 * against lin_tile's 214 (the first version of this kernel, which
 * loaded for itself in the dequantizer, 415 us). ncu on q/k/v: the
 * multiplying warps wait at "full" and the dequantizers at "loaded" or
 * on their lookups, at 29% of the issue slots; the shared-memory traffic
 * a weight costs (lookups, staging, the stage's stores and the products'
 * reads of both operands) is higher than lin_tile's (lookups and x
 * fragments), which is the bound both kernels approach. Kept opt-in as
 * the base for that work.
 *
 * S (1, 2, 4 or 8): the class groups a product is split over, so that
 * small products still fill the GPU. Block z sums classes 8z/S ..
 * 8(z+1)/S - 1; with S = 1 the consumer keeps the running total of the
 * class sums in registers, else each class sum is written to the
 * workspace (lin_tile's split layout) and the last block of a row tile
 * adds the eight in class order. */
#ifndef WG_STAGES
#define WG_STAGES 3
#endif
#define WG_STAGE_BYTES 16384
#ifndef WG_RS
#define WG_RS 4 /* staging slots */
#endif
#ifndef WG_LW
#define WG_LW 1 /* loader warps */
#endif
#define WG_XROW 144
#define WG_SLOT_CODES (64 * WG_XROW)
#define WG_SLOT_SB (WG_SLOT_CODES + 64 * 32)
#define WG_SLOT_SV (WG_SLOT_SB + 64 * 4)
#define WG_SLOT_BYTES (WG_SLOT_SV + 64 * 4)
#define WG_THREADS (256 + 32 * WG_LW)
#define WG_MIN_BLOCKS 2
#define WG_BAR_FULL 2
#define WG_BAR_EMPTY (WG_BAR_FULL + WG_STAGES)
#define WG_BAR_LOADED (WG_BAR_EMPTY + WG_STAGES)
#define WG_BAR_FREED (WG_BAR_LOADED + WG_RS)
#define WG_BAR_STAGING (128 + 32 * WG_LW) /* threads at loaded / freed */
static_assert(WG_BAR_FREED + WG_RS <= 16, "named barriers");

template <int S> __host__ __device__ constexpr size_t wg_smem_fixed()
{
    return (size_t)WG_STAGES * WG_STAGE_BYTES + (size_t)WG_RS * WG_SLOT_BYTES;
}

__device__ __forceinline__ void sts128(uint32_t a, uint32_t x, uint32_t y, uint32_t z, uint32_t w)
{
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(x), "r"(y), "r"(z),
                 "r"(w)
                 : "memory");
}

__device__ __forceinline__ void sts64(uint32_t a, uint32_t x, uint32_t y)
{
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(a), "r"(x), "r"(y) : "memory");
}

__device__ __forceinline__ uint4 lds128(uint32_t a)
{
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(a));
    return v;
}

__device__ __forceinline__ uint32_t lds32(uint32_t a)
{
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(a));
    return v;
}

__device__ __forceinline__ void cpa16(uint32_t s, const void *g)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g) : "memory");
}

/* zero-filled without a read unless ok */
__device__ __forceinline__ void cpa16z(uint32_t s, const void *g, uint32_t ok)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(g), "r"(ok ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cpa4(uint32_t s, const void *g)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(g) : "memory");
}

template <int S>
__global__ void __launch_bounds__(WG_THREADS, WG_MIN_BLOCKS)
    lin_wg_kernel(lin_pack P, const bf16 *__restrict__ x, int64_t ldx, int n, float *ws,
                  int64_t wsld, int ntiles)
{
#if WG_ARCH
    extern __shared__ __align__(16) unsigned char tsm[];
    __shared__ int s_last;
    constexpr int CPB = LIN_CLASSES / S;
    const lin_desc D = pick_desc(P);
    const int64_t out = D.out;
    const int64_t row0 = (int64_t)blockIdx.x * 64;
    if (row0 >= out)
        return;
    const int tid = threadIdx.x;
    const int nch = (int)(D.in >> 6);
    const int c0 = (int)blockIdx.z * CPB;
    int *seq = (int *)(tsm + wg_smem_fixed<S>());
    const int total = tile_order(seq, nch, c0, CPB, ws, wsld, row0, 64, out, n, tid, WG_THREADS);
    load_tables<KN_GW_NF4>(D, tid, WG_THREADS);
    __syncthreads();
    const uint32_t sm0 = (uint32_t)__cvta_generic_to_shared(tsm);
    const uint32_t stg = sm0 + WG_STAGES * WG_STAGE_BYTES;
    /* the role through a shuffle, so that the compiler knows it uniform
     * in the warp (else it serializes the wgmma of a "divergent" path) */
    const int role = __shfl_sync(0xffffffffu, tid >> 7, 0);
    if (role == 2) {
        /* ---- loader ---- */
        /* lane l's sources, chunk 0: codes of rows (i / 2), scale words
         * and nested absmax of rows i, x's 16-byte pieces (i % 8) of
         * columns i / 8 (columns past n zero-filled, as lin_tile's: they
         * reach only output columns that are not stored) */
        constexpr int LT = 32 * WG_LW, NC = 128 / LT, NS = 64 / LT, NX = 512 / LT;
        const int l = tid - 256;
        const int64_t kb = D.in >> 6; /* scale blocks a row */
        const uint8_t *cs[NC];
        const uint8_t *ss[NS];
        int64_t sbi[NS];
        const bf16 *xs[NX];
#pragma unroll
        for (int j = 0; j < NC; j++) {
            const int i = l + LT * j;
            const int64_t r = row0 + (i >> 1) < out ? row0 + (i >> 1) : out - 1;
            cs[j] = D.codes + r * (D.in >> 1) + 16 * (i & 1);
        }
#pragma unroll
        for (int j = 0; j < NS; j++) {
            const int i = l + LT * j;
            const int64_t r = row0 + i < out ? row0 + i : out - 1;
            sbi[j] = r * kb;
            ss[j] = D.absmax_q + sbi[j]; /* kb % 4 == 0: words stay aligned */
        }
        uint32_t xok = 0; /* bit j: lane l's piece j is a column below n */
#pragma unroll
        for (int j = 0; j < NX; j++) {
            const int col = (l >> 3) + (LT / 8) * j;
            xs[j] = x + (int64_t)(col < n ? col : 0) * ldx + 8 * (l & 7);
            xok |= col < n ? 1u << j : 0u;
            pin(xs[j]);
        }
#pragma unroll
        for (int j = 0; j < NC; j++)
            pin(cs[j]);
        /* the destinations: lane l's first, then constant steps */
        const uint32_t dx = (uint32_t)((l >> 3) * WG_XROW + 16 * (l & 7));
        gen_pdl_wait();
        gen_pdl_trigger();
        for (int p = 0; p < total + WG_RS - 1; p++) {
            if (p < total) {
                const int slot = p % WG_RS;
                if (p >= WG_RS)
                    bar_sync(WG_BAR_FREED + slot, WG_BAR_STAGING);
                const int c = seq[p] & SEQ_CHUNK;
                const uint32_t b = stg + (uint32_t)(slot * WG_SLOT_BYTES);
#pragma unroll
                for (int j = 0; j < NC; j++)
                    cpa16(b + WG_SLOT_CODES + 16 * l + 16 * LT * j, cs[j] + 32 * c);
#pragma unroll
                for (int j = 0; j < NS; j++) {
                    cpa4(b + WG_SLOT_SB + 4 * l + 4 * LT * j, ss[j] + (c & ~3));
                    cpa4(b + WG_SLOT_SV + 4 * l + 4 * LT * j,
                         D.nested_absmax + ((sbi[j] + c) >> D.lnbs));
                }
#pragma unroll
                for (int j = 0; j < NX; j++)
                    cpa16z(b + dx + (LT / 8) * WG_XROW * j, xs[j] + 64 * c, (xok >> j) & 1);
            }
            cp_async_commit();
            cp_async_wait<WG_RS - 1>();
            const int q = p - (WG_RS - 1);
            if (q >= 0)
                bar_arrive(WG_BAR_LOADED + q % WG_RS, WG_BAR_STAGING);
        }
        __threadfence();
        return;
    }
    if (role == 1) {
        /* ---- dequantizer ---- */
        const int pt = tid - 128, prow = pt >> 1, pj = pt & 1;
        const uint32_t qb = qmap_base();
        const int64_t rr = row0 + prow < out ? row0 + prow : out - 1;
        int32_t bbase = (int32_t)(rr * (D.in >> 6)); /* the row's first scale block */
        pin(bbase);
        gen_pdl_trigger();
        const int xc = pt & 63, xh = pt >> 6;
        const uint32_t xsrc = (uint32_t)(xc * WG_XROW + 16 * xh);
        const uint32_t xdst = (uint32_t)(8192 + (xc >> 3) * 1024 + (xc & 7) * 16 + xh * 512);
        const uint32_t adst = (uint32_t)((prow >> 3) * 1024 + (prow & 7) * 16 + 8 * pj);
        for (int p = 0; p < total; p++) {
            const int slot = p % WG_RS, st = p % WG_STAGES;
            const uint32_t b = stg + (uint32_t)(slot * WG_SLOT_BYTES);
            bar_sync(WG_BAR_LOADED + slot, WG_BAR_STAGING);
            const int c = seq[p] & SEQ_CHUNK;
            const uint4 cw = lds128(b + WG_SLOT_CODES + 16 * pt);
            const uint32_t sbw = lds32(b + WG_SLOT_SB + 4 * prow);
            const float sv = __uint_as_float(lds32(b + WG_SLOT_SV + 4 * prow));
            uint4 xb[4];
#pragma unroll
            for (int q = 0; q < 4; q++)
                xb[q] = lds128(b + xsrc + 32 * q);
            const uint32_t sb = (sbw >> (8 * ((bbase + c) & 3))) & 0xffu;
            const float sc = __fadd_rn(__fmul_rn(s_nmap[sb], sv), D.offset);
            const uint32_t w[4] = {cw.x, cw.y, cw.z, cw.w};
            nibs v[4];
#pragma unroll
            for (int i = 0; i < 4; i++)
                v[i] = nibs_of(w[i]);
            uint32_t lo[4][2], hi[4][2];
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int tp = 0; tp < 2; tp++) {
                    if (kk & 1)
                        nf4_words<1>(v[2 * tp + kk / 2], sc, qb, lo[kk][tp], hi[kk][tp]);
                    else
                        nf4_words<0>(v[2 * tp + kk / 2], sc, qb, lo[kk][tp], hi[kk][tp]);
                }
            if (p >= WG_STAGES)
                bar_sync(WG_BAR_EMPTY + st, 256);
            const uint32_t sa = sm0 + (uint32_t)(st * WG_STAGE_BYTES);
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                sts64(sa + adst + kk * 256, lo[kk][0], lo[kk][1]);
                sts64(sa + adst + kk * 256 + 128, hi[kk][0], hi[kk][1]);
            }
            const uint32_t a = sa + xdst;
            sts128(a, xb[0].x, xb[1].x, xb[2].x, xb[3].x);
            sts128(a + 128, xb[0].y, xb[1].y, xb[2].y, xb[3].y);
            sts128(a + 256, xb[0].z, xb[1].z, xb[2].z, xb[3].z);
            sts128(a + 384, xb[0].w, xb[1].w, xb[2].w, xb[3].w);
            fence_proxy_async();
            bar_arrive(WG_BAR_FULL + st, 256);
            if (p + WG_RS < total)
                bar_arrive(WG_BAR_FREED + slot, WG_BAR_STAGING);
        }
        return;
    }
    /* ---- consumer ---- */
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    gen_pdl_wait();
    gen_pdl_trigger();
    float acc[32], tot[32];
#pragma unroll
    for (int q = 0; q < 32; q++) {
        acc[q] = 0.0f;
        tot[q] = 0.0f;
    }
    float *part = ws + SPLIT_COUNTERS + ((int64_t)blockIdx.y * LIN_CLASSES * 64) * wsld;
    /* class by class (a class's chunks are consecutive in seq): inside
     * one, each chunk's products wait only for the previous chunk's, so
     * two are in flight; at its end all are waited for and the sums
     * taken (a loop of this shape lets the compiler see that no
     * accumulator is read while a product runs) */
    int p = 0;
    for (int v = c0; v < c0 + CPB; v++) {
        const int cnt = class_count(nch, v);
        if (cnt == 0)
            continue;
        for (int i = 0; i < cnt; i++, p++) {
            const int st = p % WG_STAGES;
            bar_sync(WG_BAR_FULL + st, 256);
            const uint64_t da = wg_desc(tsm + st * WG_STAGE_BYTES, 128, 1024);
            const uint64_t db = wg_desc(tsm + st * WG_STAGE_BYTES + 8192, 128, 1024);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
                wg_ss64(acc, da + (uint64_t)(16 * kk), db + (uint64_t)(16 * kk));
            wg_commit();
            wg_wait<1>();
            /* chunk p-1's products are done: its stage may be written
             * again */
            if (p >= 1 && p - 1 + WG_STAGES < total)
                bar_arrive(WG_BAR_EMPTY + (p - 1) % WG_STAGES, 256);
        }
        wg_wait<0>();
        wg_pin<32>(acc);
        if (S == 1) {
#pragma unroll
            for (int q = 0; q < 32; q++)
                tot[q] += acc[q];
        } else {
            tile_put_class<1, 8>(part, acc, v, row0, warp * 16, g, t, out, n, wsld);
        }
#pragma unroll
        for (int q = 0; q < 32; q++)
            acc[q] = 0.0f;
    }
    if (S == 1) {
#pragma unroll
        for (int q = 0; q < 32; q++) {
            int r, col;
            acc_pos<8>(q, warp * 16, g, t, r, col);
            if (row0 + r < out && col < n) {
                const int64_t i = (int64_t)col * D.ldy + row0 + r;
                D.y[i] = (D.res ? D.res[i] : 0.0f) + tot[q];
            }
        }
        return;
    }
    tile_finish<1, 8, S, 128>(D, NULL, ws, wsld, ntiles, row0, warp * 16, g, t, n, tid, &s_last);
#endif
}

/* ---- launching ------------------------------------------------------------------------- */

/* The lin_tile shape for n rows of x: NT n-tiles of 8, W warps of MT
 * 16-row tiles. MT = 2 (x fragments serving two row tiles, 4 warps) ran
 * slower on an H100 than MT = 1 with 8 warps (bench/RESULTS.md, "gen,
 * product kernels"): it spills at 3 blocks an SM. */
static void tile_shape(int n, int kind, int *nt, int *w, int *mt)
{
    (void)kind;
    *nt = n <= 32 ? 4 : 8;
    *mt = 1;
    *w = kind == KN_GW_NF4 ? cfg().tile_w : 8;
}

/* The class groups S a lin_tile launch over nops products of up to maxout
 * rows is split over (1: none), and the workspace bytes that needs.
 * QLORA_GEN_TILE_S=1|2|4|8 forces S (2 and 4 for NF4 with G4 scales
 * only; the others take 8 for them). */
static size_t tile_split_ws(int nops, int64_t maxout, int n, int kind, int *split)
{
    int nt, w, mt;
    tile_shape(n, kind, &nt, &w, &mt);
    int64_t tiles = (maxout + 16 * w * mt - 1) / (16 * w * mt);
    *split = 1;
    if (cfg().tile && n > cfg().vec_max && tiles * nops <= SPLIT_COUNTERS) {
        const int forced = env_int("QLORA_GEN_TILE_S", 0);
        if (forced == 1 || forced == 2 || forced == 4 || forced == 8)
            *split = forced;
        else
            *split = tiles * nops < cfg().split_min ? LIN_CLASSES : 1;
    }
    if (*split == 1)
        return 0;
    return SPLIT_COUNTERS * sizeof(int) + (size_t)nops * LIN_CLASSES * 64 * maxout * sizeof(float);
}

static size_t wg_ws(int nops, int64_t maxout);

extern "C" size_t kn_gen_linear_mma_ws(const kn_gen_lin *ops, int nops, int n)
{
    int64_t maxout = 0;
    for (int i = 0; i < nops; i++)
        if (ops[i].w.out > maxout)
            maxout = ops[i].w.out;
    /* either kind's launches may use it (gen_gpu sizes one workspace) */
    int split;
    size_t a = tile_split_ws(nops, maxout, n, KN_GW_NF4, &split);
    size_t b = tile_split_ws(nops, maxout, n, KN_GW_BF16, &split);
    size_t c = n > 32 && ops[0].w.kind == KN_GW_NF4 ? wg_ws(nops, maxout) : 0;
    a = a > b ? a : b;
    return a > c ? a : c;
}

template <int WK, int NT, int W, int MT, int S, bool G4>
static void launch_tile(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                        int n, int nch, void *ws, cudaStream_t s)
{
    static int attr_set;
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(lin_tile_kernel<WK, NT, W, MT, S, G4>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)tile_smem_max<NT, W, MT, S>()));
        attr_set = 1;
    }
    int ntiles = (int)((maxout + 16 * W * MT - 1) / (16 * W * MT));
    size_t smem = tile_xs_bytes<NT>() + tile_tot_bytes<NT, W, MT, S>() + (size_t)nch * 4;
    dim3 grid((unsigned)ntiles, (unsigned)nops, (unsigned)S);
    gen_launch(lin_tile_kernel<WK, NT, W, MT, S, G4>, grid, dim3(W * 32), smem, s,
               cfg().tile_pdl && gen_ops_pdl(n, s), P, x, ldx, n, (float *)ws, maxout, ntiles);
}

template <int WK, int NT, int W, int MT>
static void launch_tile_split(const lin_pack &P, int nops, int64_t maxout, const bf16 *x,
                              int64_t ldx, int n, int nch, void *ws, int split, cudaStream_t s)
{
    bool g4 = WK == KN_GW_NF4 && P.d[0].in % 256 == 0 && cfg().g4;
    for (int i = 0; i < nops; i++)
        g4 = g4 && P.d[i].absmax_q && P.d[i].lbs == 6 && P.d[i].lnbs >= 2 &&
             ((uintptr_t)P.d[i].absmax_q & 3) == 0;
    if constexpr (WK == KN_GW_NF4) {
        if (g4) {
            switch (split) {
            case 1: launch_tile<WK, NT, W, MT, 1, true>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
            case 2: launch_tile<WK, NT, W, MT, 2, true>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
            case 4: launch_tile<WK, NT, W, MT, 4, true>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
            default: launch_tile<WK, NT, W, MT, 8, true>(P, nops, maxout, x, ldx, n, nch, ws, s);
            }
            return;
        }
    }
    if (split > 1)
        launch_tile<WK, NT, W, MT, 8, false>(P, nops, maxout, x, ldx, n, nch, ws, s);
    else
        launch_tile<WK, NT, W, MT, 1, false>(P, nops, maxout, x, ldx, n, nch, ws, s);
}

template <int WK>
static void dispatch_tile(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                          int n, int nch, void *ws, size_t ws_bytes, cudaStream_t s)
{
    int split, nt, w, mt;
    size_t need = tile_split_ws(nops, maxout, n, WK, &split);
    if (split > 1 && (!ws || ws_bytes < need))
        split = 1; /* same sums, fewer blocks */
    tile_shape(n, WK, &nt, &w, &mt);
    if constexpr (WK == KN_GW_NF4) {
        if (w == 4) {
            if (nt == 4)
                launch_tile_split<WK, 4, 4, 1>(P, nops, maxout, x, ldx, n, nch, ws, split, s);
            else
                launch_tile_split<WK, 8, 4, 1>(P, nops, maxout, x, ldx, n, nch, ws, split, s);
            return;
        }
    }
    if (nt == 4)
        launch_tile_split<WK, 4, 8, 1>(P, nops, maxout, x, ldx, n, nch, ws, split, s);
    else
        launch_tile_split<WK, 8, 8, 1>(P, nops, maxout, x, ldx, n, nch, ws, split, s);
}

/* lin_wg: whether it may run (compute capability 9.0, opt-in with
 * QLORA_GEN_WG=1: slower than lin_tile so far) and for which launches
 * (NF4 with G4 scales, x in 16-byte rows, 32 < n <= 64). */
static int wg_on()
{
    static int on = -1;
    if (on < 0) {
        int dev = 0, major = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        on = major == 9 && env_int("QLORA_GEN_WG", 0) != 0;
    }
    return on;
}

static bool wg_fits(const lin_pack &P, int nops, const bf16 *x, int64_t ldx, int n, int nch)
{
    if (!wg_on() || n <= 32 || n > 64 || nch > TILE_MAXCH || !cfg().g4)
        return false;
    if (ldx % 8 != 0 || ((uintptr_t)x & 15) != 0 || (int64_t)n * ldx >= (1 << 30))
        return false;
    for (int i = 0; i < nops; i++) {
        const lin_desc &d = P.d[i];
        if (!d.codes || !d.absmax_q || d.lbs != 6 || d.lnbs < 2 || d.in % 256 != 0 ||
            ((uintptr_t)d.absmax_q & 3) != 0)
            return false;
    }
    return true;
}

/* Class groups S of a lin_wg launch over nops products of up to maxout
 * rows: the smallest that gives every resident block slot of the GPU a
 * block (QLORA_GEN_WG_S=1|2|4|8 forces one). */
static int wg_split(int nops, int64_t maxout)
{
    const int forced = env_int("QLORA_GEN_WG_S", 0);
    if (forced == 1 || forced == 2 || forced == 4 || forced == 8)
        return forced;
    static int occ;
    if (!occ) {
        CUDA_CHECK(cudaFuncSetAttribute(lin_wg_kernel<2>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)(wg_smem_fixed<2>() + TILE_MAXCH * 4)));
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &occ, lin_wg_kernel<2>, WG_THREADS, wg_smem_fixed<2>() + 1024));
        if (occ < 1)
            occ = 1;
    }
    const int64_t tiles = (maxout + 63) / 64, slots = (int64_t)occ * kn_sm_count();
    int S = 1;
    while (S < LIN_CLASSES && tiles * nops * S < slots)
        S *= 2;
    return tiles * nops <= SPLIT_COUNTERS ? S : 1;
}

static size_t wg_ws(int nops, int64_t maxout)
{
    if (!wg_on() || wg_split(nops, maxout) == 1)
        return 0;
    return SPLIT_COUNTERS * sizeof(int) + (size_t)nops * LIN_CLASSES * 64 * maxout * sizeof(float);
}

template <int S>
static void launch_wg(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                      int n, int nch, void *ws, cudaStream_t s)
{
    static int attr_set;
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(lin_wg_kernel<S>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)(wg_smem_fixed<S>() + TILE_MAXCH * 4)));
        attr_set = 1;
    }
    const int ntiles = (int)((maxout + 63) / 64);
    const size_t smem = wg_smem_fixed<S>() + (size_t)nch * 4;
    dim3 grid((unsigned)ntiles, (unsigned)nops, (unsigned)S);
    gen_launch(lin_wg_kernel<S>, grid, dim3(WG_THREADS), smem, s, cfg().tile_pdl && gen_ops_pdl(n, s), P,
               x, ldx, n, (float *)ws, maxout, ntiles);
}

static void dispatch_wg(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                        int n, int nch, void *ws, size_t ws_bytes, cudaStream_t s)
{
    int S = wg_split(nops, maxout);
    const size_t need =
        SPLIT_COUNTERS * sizeof(int) + (size_t)nops * LIN_CLASSES * 64 * maxout * sizeof(float);
    if (S > 1 && (!ws || ws_bytes < need))
        S = 1; /* same sums, fewer blocks */
    switch (S) {
    case 1: launch_wg<1>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
    case 2: launch_wg<2>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
    case 4: launch_wg<4>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
    default: launch_wg<8>(P, nops, maxout, x, ldx, n, nch, ws, s); break;
    }
}

/* lin_vec's grid: as many blocks per product as are resident at once
 * (all products of the launch together), at most one per tile; with
 * QLORA_GEN_VEC_GRID=0, one block per tile. */
template <int WK, int NT, int D, bool XS>
static void launch_vec(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                       int n, cudaStream_t s)
{
    static int occ;
    size_t smem = XS ? (size_t)n * P.d[0].in * 2 : 0;
    if (!occ) {
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &occ, lin_vec_kernel<WK, NT, D, XS>, 256, XS ? VEC_XS_MAX : 0));
        if (occ < 1)
            occ = 1;
    }
    int64_t tiles = (maxout + 15) / 16, gx = tiles;
    int mult = cfg().vec_grid;
    if (mult > 0) {
        gx = ((int64_t)occ * mult * kn_sm_count() + nops - 1) / nops;
        if (gx > tiles)
            gx = tiles;
    }
    dim3 grid((unsigned)gx, (unsigned)nops);
    gen_launch(lin_vec_kernel<WK, NT, D, XS>, grid, dim3(256), smem, s, gen_pdl_use(n), P, x, ldx,
               n, cfg().pf);
}

/* x in shared memory when it fits (and is aligned): then NF4 weights keep
 * vec_d chunks in flight, else 4 (x's fragments take registers too). */
template <int WK>
static void dispatch_vec(const lin_pack &P, int nops, int64_t maxout, const bf16 *x, int64_t ldx,
                         int n, cudaStream_t s)
{
    if (!cfg().vec) {
        dim3 grid((unsigned)((maxout + 15) / 16), (unsigned)nops);
        /* 16-byte x fragments with no bounds to check */
        const bool x16 = P.d[0].in % 64 == 0 && ldx % 8 == 0 && ((uintptr_t)x & 15) == 0;
        /* a group's scales in two loads (lin_row_kernel's G4) */
        bool g4 = WK == KN_GW_NF4 && P.d[0].in % 256 == 0 && cfg().g4;
        for (int i = 0; i < nops; i++)
            g4 = g4 && P.d[i].absmax_q && P.d[i].lbs == 6 && P.d[i].lnbs >= 2 &&
                 ((uintptr_t)P.d[i].absmax_q & 3) == 0;
        const int pdl = gen_pdl_use(n);
        if constexpr (WK == KN_GW_NF4) {
            if (x16 && g4) {
                /* one n-tile: 4 chunks in flight a warp at 80 registers, 3
                 * blocks (24 warps) an SM; 8 chunks (a whole class of K =
                 * 4096) at 2 blocks, or 4 blocks with 64 registers, ran
                 * slower on an H100 (bench/RESULTS.md, "gen, product
                 * kernels") */
                if (n <= 8)
                    gen_launch(lin_row_kernel<WK, 1, 4, true, true, 3>, grid, dim3(256), 0, s, pdl,
                               P, x, ldx, n);
                else
                    gen_launch(lin_row_kernel<WK, 2, 4, true, true, 2>, grid, dim3(256), 0, s, pdl,
                               P, x, ldx, n);
                return;
            }
        }
        constexpr int DR1 = WK == KN_GW_NF4 ? 8 : 4;
        if (n <= 8 && x16)
            gen_launch(lin_row_kernel<WK, 1, DR1, true, false, 2>, grid, dim3(256), 0, s, pdl, P,
                       x, ldx, n);
        else if (n <= 8)
            gen_launch(lin_row_kernel<WK, 1, DR1, false, false, 2>, grid, dim3(256), 0, s, pdl, P,
                       x, ldx, n);
        else if (x16)
            gen_launch(lin_row_kernel<WK, 2, 4, true, false, 2>, grid, dim3(256), 0, s, pdl, P, x,
                       ldx, n);
        else
            gen_launch(lin_row_kernel<WK, 2, 4, false, false, 2>, grid, dim3(256), 0, s, pdl, P,
                       x, ldx, n);
        return;
    }
    const int64_t K = P.d[0].in;
    int xs = cfg().xs && K % 64 == 0 && ldx % 8 == 0 && ((uintptr_t)x & 15) == 0 &&
             (int64_t)n * K * 2 <= VEC_XS_MAX;
    if (xs && WK == KN_GW_NF4 && cfg().vec_d == 8) {
        if (n <= 8)
            launch_vec<WK, 1, 8, true>(P, nops, maxout, x, ldx, n, s);
        else
            launch_vec<WK, 2, 8, true>(P, nops, maxout, x, ldx, n, s);
    } else if (xs) {
        if (n <= 8)
            launch_vec<WK, 1, 4, true>(P, nops, maxout, x, ldx, n, s);
        else
            launch_vec<WK, 2, 4, true>(P, nops, maxout, x, ldx, n, s);
    } else {
        if (n <= 8)
            launch_vec<WK, 1, 4, false>(P, nops, maxout, x, ldx, n, s);
        else
            launch_vec<WK, 2, 4, false>(P, nops, maxout, x, ldx, n, s);
    }
}

extern "C" void kn_gen_linear_mma(const kn_gen_lin *ops, int nops, const kn_bf16 *x,
                                  int64_t ldx, int n, void *ws, size_t ws_bytes,
                                  cudaStream_t s)
{
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
            KN_REQUIRE(w.out * w.in < ((int64_t)1 << 31)); /* 32-bit element offsets */
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
            d.pf = ((uintptr_t)w.q.codes & 15) == 0;
        } else {
            KN_REQUIRE(w.out * w.ld < ((int64_t)1 << 30)); /* 32-bit byte offsets */
            KN_REQUIRE(w.bf16 && w.ld % 64 == 0 && w.ld >= w.in &&
                       ((uintptr_t)w.bf16 & 15) == 0);
            d.w16 = (const bf16 *)w.bf16;
            d.ld = w.ld;
            d.pf = 1;
        }
        if (w.out > maxout)
            maxout = w.out;
    }
    const int nch = (int)((ops[0].w.in + 63) / 64);
    if (n <= cfg().vec_max || nch > TILE_MAXCH || !cfg().tile) {
        if (n > 16) { /* more than lin_vec's 16: rows 16 at a time */
            for (int n0 = 0; n0 < n; n0 += 16) {
                kn_gen_lin sub[3];
                for (int i = 0; i < nops; i++) {
                    sub[i] = ops[i];
                    sub[i].y = ops[i].y + (int64_t)n0 * ops[i].ldy;
                    sub[i].res = ops[i].res ? ops[i].res + (int64_t)n0 * ops[i].ldy : NULL;
                }
                kn_gen_linear_mma(sub, nops, x + (int64_t)n0 * ldx, ldx,
                                  n - n0 < 16 ? n - n0 : 16, NULL, 0, s);
            }
            return;
        }
        if (kind == KN_GW_NF4)
            dispatch_vec<KN_GW_NF4>(P, nops, maxout, (const bf16 *)x, ldx, n, s);
        else
            dispatch_vec<KN_GW_BF16>(P, nops, maxout, (const bf16 *)x, ldx, n, s);
        return;
    }
    if (kind == KN_GW_NF4 && wg_fits(P, nops, (const bf16 *)x, ldx, n, nch))
        dispatch_wg(P, nops, maxout, (const bf16 *)x, ldx, n, nch, ws, ws_bytes, s);
    else if (kind == KN_GW_NF4)
        dispatch_tile<KN_GW_NF4>(P, nops, maxout, (const bf16 *)x, ldx, n, nch, ws, ws_bytes, s);
    else
        dispatch_tile<KN_GW_BF16>(P, nops, maxout, (const bf16 *)x, ldx, n, nch, ws, ws_bytes, s);
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
