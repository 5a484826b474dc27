/* gen_gpu.h: lora-gen's GPU backend (kernels/gen_gpu.cu), the gen_backend
 * of lib/generate.h computed on the device.
 *
 * What lives on the device: the frozen model, the adapter (fp32, and bf16
 * copies for prefill products), one key/value cache per slot, and the
 * activations of one prefill call or one decoding step.
 *
 * Two numeric modes, chosen by the checkpoint:
 *   - NF4 checkpoints (nf4-quant, bitsandbytes): bf16 compute as
 *     bitsandbytes' bnb_4bit_compute_dtype=bfloat16. Linear weights stay
 *     4-bit; a decoding step multiplies them with fused dequantize-and-
 *     multiply kernels on tensor cores that read each 4-bit weight once
 *     (kernels/nf4_gemv.cu); a prefill dequantizes one matrix at a time to
 *     bf16 and calls cuBLAS. Keys and values are cached in bf16, the head
 *     is held in bf16, the residual stream, norms and softmax are fp32.
 *   - f32 checkpoints: fp32 throughout on CUDA cores (the CPU reference's
 *     arithmetic in another order), for small models and for checking.
 * In both, a decoding step's result for one sequence does not depend on
 * the other sequences in the step (each output element is summed in a
 * fixed order whatever the batch), and a step is replayed as a CUDA graph.
 */
#ifndef GEN_GPU_H
#define GEN_GPU_H

#include <stdint.h>

#include "generate.h"
#include "llama.h"
#include "lora.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A GPU backend for up to `slots` sequences of `cap` positions (fewer
 * slots when the device memory cannot hold their caches: be->slots says).
 * The model and adapter must outlive it. 0 ok, -1 error (message). */
int gen_gpu_backend(const llama_model *m, const lora_adapter *a, int32_t slots,
                    int32_t cap, gen_backend *be);

/* Bytes the backend has allocated on the device at most, so far. */
size_t gen_gpu_peak_bytes(const gen_backend *be);

#ifdef __cplusplus
}
#endif

#endif
