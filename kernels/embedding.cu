/* embedding.cu: the token embedding gather. The table is frozen, so there
 * is no backward (no scatter-add). One warp per token row, 16-byte moves
 * when the row allows them. */
#include "common.cuh"

__global__ void embedding_kernel(bf16 *out, const bf16 *table,
                                 const int32_t *ids, int64_t n, int d)
{
    int64_t t = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (t >= n)
        return;
    const bf16 *src = table + (int64_t)ids[t] * d;
    bf16 *dst = out + t * d;
    if ((d & 7) == 0) {
        const uint4 *s4 = (const uint4 *)src;
        uint4 *d4 = (uint4 *)dst;
        for (int i = lane; i < d / 8; i += 32)
            d4[i] = s4[i];
    } else {
        for (int i = lane; i < d; i += 32)
            dst[i] = src[i];
    }
}

extern "C" void kn_embedding_forward(kn_bf16 *out, const kn_bf16 *table,
                                     const int32_t *ids, int64_t n, int d,
                                     cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && d > 0);
    if (!n)
        return;
    embedding_kernel<<<kn_cdiv(n, 8), 256, 0, s>>>((bf16 *)out, (const bf16 *)table, ids, n, d);
    KN_CHECK_LAUNCH("embedding");
}
