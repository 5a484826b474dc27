/* nf4.cu: NF4 dequantization to bf16, bitsandbytes' layout and arithmetic
 * (scale = nested_map[q] * nested_absmax + offset in fp32, value =
 * quant_map[code] * scale, then rounded), so the GPU sees the same weights
 * as the CPU reference up to that final rounding.
 *
 * Memory-bound: 0.5 byte in, 2 bytes out per element. Each thread takes 8
 * code bytes (16 elements, a quarter of a 64-block) with one 8-byte load
 * and writes two 16-byte stores; the block scale is computed per thread
 * (an L1 hit). The frozen weights stay 4-bit on the device; a product
 * dequantizes one matrix into a scratch buffer just before cuBLAS reads
 * it, which costs far less than the product itself. */
#include "common.cuh"

__global__ void nf4_dequant_kernel(bf16 *out, kn_nf4 w)
{
    __shared__ float qmap[16];
    if (threadIdx.x < 16)
        qmap[threadIdx.x] = w.quant_map[threadIdx.x];
    __syncthreads();
    int64_t groups = w.numel / 16;  /* 16 elements per thread */
    for (int64_t gi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; gi < groups;
         gi += (int64_t)gridDim.x * blockDim.x) {
        int64_t e0 = gi * 16;
        int64_t b = e0 / w.blocksize;
        float scale;
        if (w.absmax_q)
            scale = w.nested_map[w.absmax_q[b]] *
                        w.nested_absmax[b / w.nested_blocksize] + w.offset;
        else
            scale = w.absmax[b];
        uint2 c = *(const uint2 *)(w.codes + e0 / 2);
        const uint8_t *cb = (const uint8_t *)&c;
        uint4 o[2];
        uint32_t *op = (uint32_t *)o;
#pragma unroll
        for (int j = 0; j < 8; j++)
            op[j] = pack_bf16x2(qmap[cb[j] >> 4] * scale, qmap[cb[j] & 15] * scale);
        uint4 *dst = (uint4 *)(out + e0);
        dst[0] = o[0];
        dst[1] = o[1];
    }
}

/* The tail (numel not a multiple of 16, or blocks not a multiple of 16),
 * element by element. */
__global__ void nf4_dequant_tail_kernel(bf16 *out, kn_nf4 w, int64_t from)
{
    int64_t e = from + blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (e >= w.numel)
        return;
    int64_t b = e / w.blocksize;
    float scale = w.absmax_q ? w.nested_map[w.absmax_q[b]] *
                                       w.nested_absmax[b / w.nested_blocksize] + w.offset
                             : w.absmax[b];
    uint8_t byte = w.codes[e / 2];
    int code = (e & 1) ? (byte & 15) : (byte >> 4);
    out[e] = __float2bfloat16(w.quant_map[code] * scale);
}

extern "C" void kn_nf4_dequant(kn_bf16 *out, const kn_nf4 *w, cudaStream_t s)
{
    KN_REQUIRE(w && w->numel > 0 && w->numel % 2 == 0 && w->blocksize > 0);
    KN_REQUIRE(w->codes && w->quant_map);
    KN_REQUIRE(w->absmax || (w->absmax_q && w->nested_absmax && w->nested_map &&
                             w->nested_blocksize > 0));
    /* 16-element groups must not straddle blocks, and loads be aligned. */
    int fast = w->blocksize % 16 == 0 && ((uintptr_t)w->codes & 7) == 0 &&
               ((uintptr_t)out & 15) == 0;
    int64_t done = 0;
    if (fast) {
        int64_t groups = w->numel / 16;
        if (groups) {
            nf4_dequant_kernel<<<kn_grid_1d(groups, 256), 256, 0, s>>>((bf16 *)out, *w);
            KN_CHECK_LAUNCH("nf4_dequant");
        }
        done = groups * 16;
    }
    if (done < w->numel) {
        nf4_dequant_tail_kernel<<<kn_cdiv(w->numel - done, 256), 256, 0, s>>>((bf16 *)out, *w, done);
        KN_CHECK_LAUNCH("nf4_dequant_tail");
    }
}
