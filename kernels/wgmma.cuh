/* wgmma.cuh: Hopper warpgroup matrix products (wgmma, sm_90a) shared by
 * the kernels that use them: the training attention's opt-in path
 * (attention.cu) and lora-gen's batched NF4 products (nf4_gemv.cu).
 *
 * A warpgroup is 4 consecutive warps (128 threads); wgmma.mma_async
 * computes D (64 x N, fp32, registers: warp w of the group holds rows
 * 16w .. 16w+15 in mma.sync's C layout) += A (64 x 16: registers, in
 * mma.sync's A layout, or shared memory) B (16 x N, shared memory, read
 * through a matrix descriptor). The product runs asynchronously: its
 * registers must not be touched until wg_wait says it is done (wg_pin
 * keeps the compiler from moving them), and shared memory written by
 * ordinary stores or cp.async must be fenced (fence_proxy_async) by the
 * writers before the barrier that precedes the product.
 *
 * On other targets (sm_80) every helper compiles to nothing: callers
 * check WG_ARCH, and the host launches these paths on compute capability
 * 9.0 only.
 */
#ifndef WGMMA_CUH
#define WGMMA_CUH

#include "common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_ARCH 1
#else
#define WG_ARCH 0
#endif

/* shared-memory matrix descriptor, no swizzle; offsets in bytes */
__device__ __forceinline__ uint64_t wg_desc(const void *p, uint32_t lbo, uint32_t sbo)
{
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) |
           ((uint64_t)(sbo >> 4) << 32);
}

__device__ __forceinline__ void wg_fence()
{
#if WG_ARCH
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit()
{
#if WG_ARCH
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
/* waits until at most N of this warpgroup's committed groups are pending */
template <int N> __device__ __forceinline__ void wg_wait()
{
#if WG_ARCH
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void wg_wait0() { wg_wait<0>(); }
/* cp.async wrote the tiles (generic proxy); wgmma reads them through the
 * async proxy: each writer fences before the barrier */
__device__ __forceinline__ void fence_proxy_async()
{
#if WG_ARCH
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/* pins accumulator registers after a wait (CUTLASS's
 * warpgroup_fence_operand): no use of them is moved above it */
template <int R> __device__ __forceinline__ void wg_pin(float *d)
{
#pragma unroll
    for (int i = 0; i < R; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}
/* the same for A fragments held in registers: an asynchronous product
 * reads them until the wait, so they stay live (and unmoved) up to here */
template <int R> __device__ __forceinline__ void wg_pin(uint32_t *a)
{
#pragma unroll
    for (int i = 0; i < R; i++)
        asm volatile("" : "+r"(a[i])::"memory");
}

/* the accumulator operands of one product: 32 (m64n64) or 64 (m64n128)
 * fp32 registers, read and written, and their places in the template */
#define WG_ACC8(d, i)                                                                    \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]),           \
        "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_ACC32(d) WG_ACC8(d, 0), WG_ACC8(d, 8), WG_ACC8(d, 16), WG_ACC8(d, 24)
#define WG_ACC64(d) WG_ACC32(d), WG_ACC8(d, 32), WG_ACC8(d, 40), WG_ACC8(d, 48), WG_ACC8(d, 56)
#define WG_D32                                                                           \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "            \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"

template <int TB> __device__ __forceinline__ void wg_rs64(float *d, const uint32_t *a, uint64_t b)
{
#if WG_ARCH
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        WG_D32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"
        :
          WG_ACC32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TB));
#endif
}

template <int TB> __device__ __forceinline__ void wg_rs128(float *d, const uint32_t *a, uint64_t b)
{
#if WG_ARCH
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        WG_D32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %69;\n}\n"
        :
          WG_ACC64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TB));
#endif
}

__device__ __forceinline__ void wg_ss64(float *d, uint64_t a, uint64_t b)
{
#if WG_ARCH
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        WG_D32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        :
          WG_ACC32(d)
        : "l"(a), "l"(b));
#endif
}


#endif
