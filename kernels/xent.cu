/* xent.cu: cross-entropy fused with the output projection.
 *
 * The (n, vocab) logits of a 7B batch are 12288 x 32000 fp32 = 1.5 GiB;
 * they are never held at once. Rows are taken `chunk` at a time: one
 * product writes that chunk's fp32 logits into scratch, one kernel turns
 * each row into its loss term and, in a bf16 buffer beside it, the
 * gradient of the logits (softmax - onehot) * weight * grad_scale, and one
 * more product maps that back to the gradient of x. The loss sum is
 * deterministic: each row's term goes to scratch and one block adds a
 * chunk's terms in a fixed order (an atomicAdd per row made the last bits
 * of the logged loss vary from run to run). */
#include "common.cuh"

#define XENT_THREADS 256

__device__ __forceinline__ void online_merge(float &m, float &s, float m2, float s2)
{
    float mx = fmaxf(m, m2);
    if (mx == -INFINITY)
        return;
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

__global__ void xent_rows_kernel(float *row_loss, bf16 *dlogits,
                                 const float *logits, const int32_t *targets,
                                 const float *weights, int vocab,
                                 float grad_scale, int want_grad)
{
    __shared__ float shm[32], shs[32];
    int row = blockIdx.x;
    const float *lr = logits + (int64_t)row * vocab;
    bf16 *gr = dlogits + (int64_t)row * vocab;
    int tgt = targets[row];
    float wt = tgt >= 0 ? (weights ? weights[row] : 1.0f) : 0.0f;
    if (wt == 0.0f) {
        if (threadIdx.x == 0)
            row_loss[row] = 0.0f;
        if (want_grad)
            for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                gr[i] = __float2bfloat16(0.0f);
        return;
    }
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = lr[i];
        if (v > m) {
            s = s * __expf(m - v) + 1.0f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        shm[warp] = m;
        shs[warp] = s;
    }
    __syncthreads();
    int nw = blockDim.x >> 5;
    m = lane < nw ? shm[lane] : -INFINITY;
    s = lane < nw ? shs[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
    float lse = m + logf(s);
    if (threadIdx.x == 0)
        row_loss[row] = wt * (lse - lr[tgt]);
    if (!want_grad)
        return;
    float gs = wt * grad_scale;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float p = __expf(lr[i] - lse);
        gr[i] = __float2bfloat16((p - (i == tgt ? 1.0f : 0.0f)) * gs);
    }
}

/* *loss_sum += the rows' terms, one block, always in the same order. */
__global__ void xent_sum_kernel(float *loss_sum, const float *row_loss, int rows)
{
    __shared__ float sh[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < rows; i += blockDim.x)
        acc += row_loss[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        *loss_sum += acc;
}

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

extern "C" size_t kn_xent_scratch_bytes(int chunk, int vocab)
{
    return align256((size_t)chunk * vocab * sizeof(float)) +
           align256((size_t)chunk * vocab * sizeof(bf16)) +
           align256((size_t)chunk * sizeof(float));
}

extern "C" void kn_xent_forward_backward(float *loss_sum, float *dx,
                                         const kn_bf16 *x, const kn_bf16 *w,
                                         const int32_t *targets,
                                         const float *weights, int64_t n,
                                         int d, int vocab, float grad_scale,
                                         int chunk, void *scratch,
                                         cudaStream_t s)
{
    KN_REQUIRE(n >= 0 && d > 0 && vocab > 0 && chunk > 0 && scratch && loss_sum);
    float *logits = (float *)scratch;
    bf16 *dlog = (bf16 *)((char *)scratch +
                          align256((size_t)chunk * vocab * sizeof(float)));
    float *row_loss = (float *)((char *)dlog + align256((size_t)chunk * vocab * sizeof(bf16)));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int rows = (int)(n - c0 < chunk ? n - c0 : chunk);
        kn_gemm(0, 1, rows, vocab, d, 1.0f, x + c0 * d, d, w, d, 0.0f, logits,
                KN_F32, vocab, s);
        xent_rows_kernel<<<rows, XENT_THREADS, 0, s>>>(
            row_loss, dlog, logits, targets + c0, weights ? weights + c0 : NULL,
            vocab, grad_scale, dx != NULL);
        KN_CHECK_LAUNCH("xent_rows");
        xent_sum_kernel<<<1, 1024, 0, s>>>(loss_sum, row_loss, rows);
        KN_CHECK_LAUNCH("xent_sum");
        if (dx)
            kn_gemm(0, 0, rows, d, vocab, 1.0f, (const kn_bf16 *)dlog, vocab,
                    w, d, 0.0f, dx + c0 * d, KN_F32, d, s);
    }
}
