/* gen_launch.cuh: how lora-gen's decoding kernels (nf4_gemv.cu,
 * decode_attn.cu, gen_ops.cu) are launched: with programmatic dependent
 * launch (PDL, Hopper) when few tokens run.
 *
 * A decoding step at batch 1 is ~300 small dependent kernels; between two
 * of them the GPU drains and refills (a few microseconds each, even inside
 * a CUDA graph), and a product cannot start fetching its weights, which
 * depend on nothing, until the kernel before it has ended. With PDL a
 * kernel is launched while its predecessor still runs: it may issue loads
 * of data no earlier kernel writes (weights, caches of earlier steps) and
 * must call gen_pdl_wait() before it touches anything the predecessor
 * writes or reads. Each kernel calls gen_pdl_wait() then
 * gen_pdl_trigger(): the trigger comes after the wait, so at most the
 * running kernel and the next one are resident at once (a trigger before
 * the wait would let the whole chain of a step in at once).
 *
 * gen_pdl_wait() returns at once in a kernel launched the usual way, so
 * the kernels stay correct under either launch; the launchers use PDL
 * only on sm_90 devices, for few tokens (gen_pdl_use), and only when
 * QLORA_GEN_PDL=1: measured on an H100 it made a batch-1 step slower.
 */
#ifndef GEN_LAUNCH_CUH
#define GEN_LAUNCH_CUH

#include <string.h>

#include "common.cuh"

__device__ __forceinline__ void gen_pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void gen_pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* Whether launches of a step with n tokens use PDL (nf4_gemv.cu). */
int gen_pdl_use(int n);

/* Whether a step's other kernels (and lin_tile's products, unless
 * QLORA_GEN_TILE_PDL=0) use PDL on stream s (gen_ops.cu). */
int gen_ops_pdl(int n, cudaStream_t s);

/* kernel<<<grid, block, smem, s>>>(args...), with PDL when pdl. */
template <typename... KArgs, typename... Args>
static inline void gen_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                              cudaStream_t s, int pdl, Args... args)
{
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, ((KArgs)args)...));
}

#endif
