/* common.cuh: what every kernel file shares: the error checks, bf16
 * helpers, the warp-level reductions and the tensor-core (mma.sync) helpers.
 *
 * Error policy (STYLE.md, CUDA): a failing CUDA or cuBLAS call prints one
 * line naming the call, file:line and the device, and exits 2. Kernel
 * launchers assert their shapes with KN_REQUIRE (same exit) because a bad
 * shape is a programming error of the caller, not a data error.
 */
#ifndef KERNELS_COMMON_CUH
#define KERNELS_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"

typedef __nv_bfloat16 bf16;

void kn_fail_cuda(cudaError_t e, const char *call, const char *file, int line);
void kn_fail_require(const char *what, const char *file, int line);

#define CUDA_CHECK(call)                                                     \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess)                                               \
            kn_fail_cuda(e_, #call, __FILE__, __LINE__);                     \
    } while (0)

/* After every launch: a bad configuration shows up here, not later. */
#define KN_CHECK_LAUNCH(name) CUDA_CHECK(cudaGetLastError())

#define KN_REQUIRE(cond)                                                     \
    do {                                                                     \
        if (!(cond))                                                         \
            kn_fail_require(#cond, __FILE__, __LINE__);                      \
    } while (0)

static inline int kn_cdiv(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

/* Grid for a grid-stride elementwise kernel over n items. */
static inline int kn_grid_1d(int64_t n, int block)
{
    int64_t g = (n + block - 1) / block;
    int cap = kn_sm_count() * 32;
    return (int)(g < 1 ? 1 : g > cap ? cap : g);
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over a block of blockDim.x threads (a multiple of 32, at most 1024);
 * every thread gets the result. shared must hold 32 floats. */
__device__ __forceinline__ float block_sum(float v, float *shared)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float *shared)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0)
        shared[warp] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : -INFINITY;
    return warp_max(v);
}

/* --- tensor cores: mma.sync m16n8k16, bf16 in, fp32 accumulate ----------
 * Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
 * g = lane / 4 and t = lane % 4:
 *   A (16x16, row-major): a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
 *                         a[2] = A[g][2t+8..+9],   a[3] = A[g+8][2t+8..+9]
 *   B (16x8,  k by n):    b[0] = B[2t..2t+1][g],   b[1] = B[2t+8..+9][g]
 *   C (16x8, fp32):       c[0] = C[g][2t], c[1] = C[g][2t+1],
 *                         c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
 * Two C tiles side by side (n 0..7 and 8..15), packed to bf16, are exactly
 * the A fragment of a 16x16 operand: that is how P = softmax(S) feeds the
 * next product without leaving registers. */
__device__ __forceinline__ void mma_bf16_16816(float *c, const uint32_t *a,
                                               const uint32_t *b)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* ldmatrix: four 8x8 b16 matrices; lane l supplies the address of row
 * (l % 8) of matrix (l / 8). Register i receives matrix i in the
 * accumulator-like layout (row l/4, columns 2(l%4), 2(l%4)+1); .trans
 * delivers the transpose. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, const void *p)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

/* cp.async: 16 bytes global -> shared, zero-filled past `bytes` (0 or 16);
 * visible after the commit group is waited for and a barrier. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int bytes)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* A fragment (16 rows x 16 columns from column col) of a row-major tile. */
template <int LD>
__device__ __forceinline__ void frag_a(uint32_t *a, const bf16 *s, int row,
                                       int col, int lane)
{
    ldmatrix_x4(a, s + (row + (lane & 15)) * LD + col + ((lane >> 4) << 3));
}

/* B fragments of two adjacent n-tiles, B[k][n] = T[n][k] (T row-major,
 * rows n0..n0+15, columns k0..k0+15): b[0..1] n-tile n0, b[2..3] n0+8. */
template <int LD>
__device__ __forceinline__ void frag_b_nk(uint32_t *b, const bf16 *s, int n0,
                                          int k0, int lane)
{
    int mi = lane >> 3;
    ldmatrix_x4(b, s + (n0 + (lane & 7) + ((mi >> 1) << 3)) * LD + k0 + ((mi & 1) << 3));
}

/* B fragments of two adjacent n-tiles, B[k][n] = T[k][n] (T row-major,
 * rows k0..k0+15, columns n0..n0+15): b[0..1] n-tile n0, b[2..3] n0+8. */
template <int LD>
__device__ __forceinline__ void frag_b_kn(uint32_t *b, const bf16 *s, int k0,
                                          int n0, int lane)
{
    int mi = lane >> 3;
    ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((mi & 1) << 3)) * LD + n0 + ((mi >> 1) << 3));
}

/* A fragment (16 x 16, m by k) of a tile stored k-major: A[m][k] =
 * T[k][m] (T row-major, rows k0..k0+15, columns m0..m0+15). */
template <int LD>
__device__ __forceinline__ void frag_a_t(uint32_t *a, const bf16 *s, int k0, int m0,
                                         int lane)
{
    int mi = lane >> 3;
    ldmatrix_x4_trans(a, s + (k0 + (lane & 7) + ((mi >> 1) << 3)) * LD + m0 + ((mi & 1) << 3));
}

/* LoRA dropout's keep decision for element i of the stream (lib/lora.h's
 * lora_rand_uniform(stream, i) >= p, bit for bit): SplitMix64, top 24 bits.
 * Shared by dropout.cu and the fused LoRA products of lora.cu. */
__device__ __forceinline__ bool drop_keep(uint64_t stream, uint64_t i, float p)
{
    uint64_t z = stream + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) >= p;
}

#endif
