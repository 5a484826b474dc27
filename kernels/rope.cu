/* rope.cu: rotate_half rotary embeddings in place, forward and inverse.
 * Element i of a head vector pairs with i + hd/2. The angle is computed
 * as transformers does, in fp32: pos * inv_freq, inv_freq = 1 / theta^(2i/hd),
 * with accurate sincosf (the fast intrinsic drifts at large angles). When
 * hd/2 is a multiple of 8 (16-byte rows) a thread takes 8 consecutive
 * pairs of one token and applies their angles to every head, so the
 * sines and cosines are computed once per token instead of once per head
 * and the accesses are 16 bytes wide; otherwise one thread per pair. The
 * arithmetic per element is the same either way.
 *
 * kn_rope_table writes those cosines and sines, (n, hd/2) pairs, for the
 * attention backward (kernels/attention.cu), which rotates dq and dk back
 * as it stores them instead of leaving a pass over both to
 * kn_rope_backward. Its rotation repeats rope8_kernel's, which is why that
 * one is written with intrinsics: the order of rounding is pinned in both
 * places (fma(a, c, -(b s)), fma(b, c, a s): what nvcc chose for the plain
 * expressions), so the two give the same bits. */
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

/* One thread per (token, group of 8 pairs): half % 8 == 0, x 16-byte
 * aligned. */
__global__ void rope8_kernel(bf16 *x, const int32_t *pos, int64_t n, int nh,
                             int hd, float theta, int inverse)
{
    int half = hd / 2, groups = half / 8;
    int64_t total = n * groups;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        int i0 = (int)(e % groups) * 8;
        int64_t t = e / groups;
        float sn[8], cs[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float inv = 1.0f / powf(theta, (float)(2 * (i0 + j)) / (float)hd);
            sincosf((float)pos[t] * inv, &sn[j], &cs[j]);
            if (inverse)
                sn[j] = -sn[j];
        }
        bf16 *row = x + t * nh * hd + i0;
        for (int h = 0; h < nh; h++) {
            uint4 ua = *(const uint4 *)(row + h * hd), ub = *(const uint4 *)(row + h * hd + half);
            const bf16 *va = (const bf16 *)&ua, *vb = (const bf16 *)&ub;
            uint4 oa, ob;
            bf16 *pa = (bf16 *)&oa, *pb = (bf16 *)&ob;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float a = __bfloat162float(va[j]), b = __bfloat162float(vb[j]);
                pa[j] = __float2bfloat16(__fmaf_rn(a, cs[j], -__fmul_rn(b, sn[j])));
                pb[j] = __float2bfloat16(__fmaf_rn(b, cs[j], __fmul_rn(a, sn[j])));
            }
            *(uint4 *)(row + h * hd) = oa;
            *(uint4 *)(row + h * hd + half) = ob;
        }
    }
}

/* tab (n, hd/2, 2): the cosine and sine of token t's pair i, as the kernels
 * above compute them. */
__global__ void rope_table_kernel(float *tab, const int32_t *pos, int64_t n, int hd,
                                  float theta)
{
    int half = hd / 2;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * half;
         e += (int64_t)gridDim.x * blockDim.x) {
        int i = (int)(e % half);
        int64_t t = e / half;
        float inv = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        float s, c;
        sincosf((float)pos[t] * inv, &s, &c);
        *(float2 *)(tab + 2 * e) = make_float2(c, s);
    }
}

extern "C" void kn_rope_table(float *tab, const int32_t *pos, int64_t n, int hd, float theta,
                              cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && hd > 0 && hd % 2 == 0 && theta > 0.0f && ((uintptr_t)tab & 15) == 0);
    if (!n)
        return;
    rope_table_kernel<<<kn_grid_1d(n * (hd / 2), 256), 256, 0, s>>>(tab, pos, n, hd, theta);
    KN_CHECK_LAUNCH("rope_table");
}

static void rope_launch(kn_bf16 *x, const int32_t *pos, int64_t n, int nh,
                        int hd, float theta, int inverse, cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && nh > 0 && hd > 0 && hd % 2 == 0 && theta > 0.0f);
    if (!n)
        return;
    if ((hd / 2) % 8 == 0 && ((uintptr_t)x & 15) == 0) {
        int64_t total = n * (hd / 16);
        rope8_kernel<<<kn_grid_1d(total, 128), 128, 0, s>>>((bf16 *)x, pos, n, nh, hd, theta,
                                                            inverse);
        KN_CHECK_LAUNCH("rope8");
        return;
    }
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
