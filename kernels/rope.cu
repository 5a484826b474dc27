/* rope.cu: rotate_half rotary embeddings in place, forward and inverse.
 * Element i of a head vector pairs with i + hd/2. The angle is computed
 * as transformers does, in fp32: pos * inv_freq, inv_freq = 1 / theta^(2i/hd),
 * with accurate sincosf (the fast intrinsic drifts at large angles). One
 * thread per pair; the hd/2 frequencies are shared by every head. */
#include "common.cuh"

__global__ void rope_kernel(bf16 *x, const int32_t *pos, int64_t n, int nh,
                            int hd, float theta, int inverse)
{
    int half = hd / 2;
    int64_t total = n * nh * half;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        int i = (int)(e % half);
        int64_t th = e / half;          /* token * nh + head */
        int64_t t = th / nh;
        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        float s, c;
        sincosf((float)pos[t] * inv, &s, &c);
        bf16 *v = x + th * hd;
        float a = __bfloat162float(v[i]), b = __bfloat162float(v[i + half]);
        if (inverse) {
            v[i] = __float2bfloat16(a * c + b * s);
            v[i + half] = __float2bfloat16(b * c - a * s);
        } else {
            v[i] = __float2bfloat16(a * c - b * s);
            v[i + half] = __float2bfloat16(b * c + a * s);
        }
    }
}

static void rope_launch(kn_bf16 *x, const int32_t *pos, int64_t n, int nh,
                        int hd, float theta, int inverse, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && nh > 0 && hd > 0 && hd % 2 == 0 && theta > 0.0f);
    if (!n)
        return;
    int64_t total = n * nh * (hd / 2);
    rope_kernel<<<kn_grid_1d(total, 256), 256, 0, s>>>((bf16 *)x, pos, n, nh, hd, theta, inverse);
    KN_CHECK_LAUNCH("rope");
}

extern "C" void kn_rope_forward(kn_bf16 *x, const int32_t *pos, int64_t n,
                                int nh, int hd, float theta, cudaStream_t s)
{
    rope_launch(x, pos, n, nh, hd, theta, 0, s);
}

extern "C" void kn_rope_backward(kn_bf16 *dx, const int32_t *pos, int64_t n,
                                 int nh, int hd, float theta, cudaStream_t s)
{
    rope_launch(dx, pos, n, nh, hd, theta, 1, s);
}
