/* train_gpu.h: lora-train's GPU path, the same steps as lib/train.c's
 * train_step and train_eval computed on the device.
 *
 * What lives on the device for the whole run: the frozen model (linear
 * weights stay NF4 when the checkpoint is quantized and are dequantized
 * one matrix at a time just before their product; unquantized weights are
 * held in bf16), the adapter (fp32; the bf16 operand of its products is
 * cast one layer at a time), its gradient, AdamW's moments (or, with
 * GPU_TRAINER_PAGED_OPTIM, pinned host memory that the update reads and
 * writes over the bus, as bitsandbytes' paged optimizers may page them
 * out), and the activations of one micro-batch.
 * The host keeps its own lora_adapter and adamw as the authoritative copy
 * for checkpoints: gpu_trainer_store brings the device state back,
 * gpu_trainer_load sends it (after initialisation or a resume).
 *
 * Numerics: bf16 activations and matrix operands, fp32 accumulation,
 * fp32 norms, softmax, loss, gradients of the residual stream and of the
 * adapter, and optimizer; the CPU path (llama_cpu.c, fp32 throughout) is
 * the reference it is tested against (tests/gpu/train.c).
 *
 * Per step the host waits once, for the step's loss and gradient norm (8
 * bytes), which the metrics need; nothing else is synchronous.
 */
#ifndef TRAIN_GPU_H
#define TRAIN_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "adamw.h"
#include "llama.h"
#include "lora.h"
#include "packfile.h"
#include "train.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_trainer gpu_trainer;

/* gpu_trainer_new's flags. CHECKPOINT keeps only each layer's input and
 * recomputes the layer in the backward (1, so that a boolean
 * gradient_checkpointing setting can be passed as is). PAGED_OPTIM keeps
 * AdamW's two moments in pinned host memory (8 bytes per parameter off
 * the device; the update then streams them over PCIe once a step): what
 * optim=paged_adamw_32bit asks for. OFFLOAD (with CHECKPOINT) sends each
 * layer's attention half (q, k, v, the attention output and its LSE, the
 * output of o_proj, the LoRA inputs of q, k, v, o; ~500 MB a layer at
 * 12288 tokens of Llama 2 7B) to pinned host memory during the forward,
 * overlapped with the compute, and brings it back ahead of the layer's
 * backward, whose recomputation then starts at the second RMSNorm; no
 * device memory is added and no result changes by a bit. Where the pinned
 * memory (n_layers - 1 layers' worth) cannot be had, or would exceed half
 * of the host's available memory, training goes on without it (a note at
 * -v). KN_OFFLOAD in the environment overrides the flag, for comparisons:
 * 0 off, 1 without o_proj's output (recomputed), 2 the default. */
#define GPU_TRAINER_CHECKPOINT 1
#define GPU_TRAINER_PAGED_OPTIM 2
#define GPU_TRAINER_OFFLOAD 4

/* Uploads the model and allocates for micro-batches of up to max_tokens
 * tokens, with the adapter shape of lc. Returns NULL with a message when
 * there is no usable device. The LoRA dropout runs through the fused
 * products of kernels/lora.cu where their shapes allow; KN_LORA_FUSED=0 in
 * the environment turns them off (for comparisons). */
gpu_trainer *gpu_trainer_new(const llama_model *m, const lora_config *lc,
                             int64_t max_tokens, int flags);
void gpu_trainer_free(gpu_trainer *g);

/* Host -> device: the adapter parameters and the optimizer state (its
 * moments and step count). a must have the layout of lc. */
void gpu_trainer_load(gpu_trainer *g, const lora_adapter *a, const adamw *opt);
/* Device -> host, into a and opt. */
void gpu_trainer_store(gpu_trainer *g, lora_adapter *a, adamw *opt);

/* train_step's contract (train.h): one optimizer step over n micro-batches
 * (each at most max_tokens tokens), the loss normalised by the step's total
 * weight, dropout keys train_dropout_key(seed, step, k), the gradient norm
 * before clipping to max_norm, AdamW at lr. 0 ok, -1 error. */
int gpu_trainer_step(gpu_trainer *g, const train_batch *micro, size_t n,
                     double lr, double max_norm, uint64_t seed, int64_t step,
                     double *loss, double *norm);

/* Forward only, no dropout: *loss_sum = sum w*CE, *weight_sum = sum w
 * over the batch (llama_forward's loss part). 0 ok, -1 error. */
int gpu_trainer_forward(gpu_trainer *g, const llama_batch *b,
                        double *loss_sum, double *weight_sum);

/* llama_forward_backward's contract for one batch, for tests: the
 * gradient of loss_scale * sum w*CE with the LoRA dropout masks of `key`,
 * written (not added) to grad (host, n_params floats in the adapter's
 * layout), and the unscaled loss sum. 0 ok, -1 error. */
int gpu_trainer_gradient(gpu_trainer *g, const llama_batch *b, uint64_t key,
                         float loss_scale, float *grad, double *loss_sum);

/* train_eval's contract: mean loss over a packed file, batch_rows rows at
 * a time (batch_rows * seq_len must not exceed max_tokens). */
int gpu_trainer_eval(gpu_trainer *g, const pack_data *d, int64_t batch_rows,
                     double *loss);

/* Device memory: the most allocated at once through kn_malloc since the
 * trainer was created (weights, state, activations, scratch). */
size_t gpu_trainer_peak_bytes(const gpu_trainer *g);

/* What gpu_trainer_new allocated on the device, by category (bytes), and
 * the pinned host memory of paged moments and offloaded activations. Peak
 * use adds what the first products allocate (cuBLAS's workspace). */
enum {
    GPU_MEM_WEIGHTS,      /* frozen model: NF4 or bf16 linears, embedding, head, norms */
    GPU_MEM_ADAPTER,      /* adapter fp32, its gradient, moments, a layer's bf16 slice */
    GPU_MEM_CHECKPOINTS,  /* the layer inputs kept for the backward */
    GPU_MEM_ACTIVATIONS,  /* one layer's activations (every layer's without checkpointing) */
    GPU_MEM_SCRATCH,      /* residual gradient, dequantized weight, head chunks, LoRA scratch */
    GPU_MEM_NCAT
};
void gpu_trainer_mem(const gpu_trainer *g, size_t bytes[GPU_MEM_NCAT], size_t *host_bytes);

/* The LoRA dropout path runs over the rows of a micro-batch in chunks (2048
 * rows: its scratch is chunk x widest input). For tests: a smaller chunk
 * (1 <= rows <= the current one). */
void gpu_trainer_set_dropout_chunk(gpu_trainer *g, int64_t rows);

/* Fills b so that train_run (train.h) runs its steps and evaluations on g. */
void gpu_trainer_backend(gpu_trainer *g, train_backend *b);

/* ---- data parallel (kernels/dist_gpu.cu) ----------------------------------
 * Hooks through which one rank's step reduces its gradient over the ranks
 * while the backward still runs. stream is the trainer's cudaStream_t, on
 * which the gradient is computed; grad its device gradient (n_params
 * floats, the adapter's layout: layer by layer). */
typedef struct gpu_step_hooks {
    void *ctx;
    /* Layer `layer`'s gradient is final for the step: called once its
     * backward of the rank's last micro-batch is queued, layers in
     * decreasing order. */
    void (*layer_done)(void *ctx, int32_t layer, float *grad, void *stream);
    /* After the last backward, before the gradient norm: grad and
     * *loss_sum (device, one float) must become their sums over the
     * ranks, ordered on stream. Also called by a rank with nothing to do. */
    void (*grads_done)(void *ctx, float *grad, float *loss_sum, void *stream);
} gpu_step_hooks;

/* gpu_trainer_step over a share of a step: micro[i] is micro-batch
 * index[i] of the step (index NULL: i), whose dropout key it gets;
 * weight_sum is the whole step's total weight (the loss is normalised by
 * it); hooks (may be NULL) as above. n may be 0. The loss and norm are of
 * the whole step once grads_done has summed. 0 ok, -1 error. */
int gpu_trainer_step_shard(gpu_trainer *g, const train_batch *micro,
                           const int64_t *index, size_t n, double weight_sum,
                           const gpu_step_hooks *hooks, double lr,
                           double max_norm, uint64_t seed, int64_t step,
                           double *loss, double *norm);

#ifdef __cplusplus
}
#endif

#endif
