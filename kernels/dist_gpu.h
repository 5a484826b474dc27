/* dist_gpu.h: data-parallel training on the device: one gpu_trainer per
 * rank joined by an NCCL communicator (lib/dist.h loads NCCL and hands out
 * the unique id).
 *
 * The LoRA gradient is reduced (fp32 sum) in buckets of whole layers, each
 * on a stream of its own as soon as the backward of its lowest layer is
 * queued (gpu_step_hooks), so the reductions overlap the rest of the
 * backward; the step's loss sum rides along. The loss is already
 * normalised by the whole step's weight, so the sum is the single-process
 * gradient, and since NCCL leaves every rank the same sum, every rank's
 * AdamW makes the same update: the adapters stay identical, which finish
 * checks at the end (a hash of the adapter and the moments, reduced with
 * min and max). Evaluation is sharded too: each rank takes every
 * world-th batch, and the loss and weight sums are reduced.
 */
#ifndef DIST_GPU_H
#define DIST_GPU_H

#include "dist.h"
#include "llama.h"
#include "lora.h"
#include "train.h"
#include "train_gpu.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dist_gpu dist_gpu;

/* Joins the job (ncclCommInitRank on the trainer's device, with the id
 * every rank holds after dist_share_id; rank 0 then removes an id file).
 * The gradient layout is the adapter's for (mc, lc). Buckets hold about
 * QLORA_DIST_BUCKET_MB MiB (default 25, PyTorch DDP's), at least one
 * layer. NULL with a message on failure. */
dist_gpu *dist_gpu_new(const dist_nccl *nccl, const dist_env *e,
                       const unsigned char id[DIST_ID_BYTES], gpu_trainer *g,
                       const llama_config *mc, const lora_config *lc);
/* failed: abort the communicator instead of waiting for it to drain. */
void dist_gpu_free(dist_gpu *d, int failed);

/* Fills b for train_run with world and rank set in its inputs: step_shard,
 * the sharded eval and finish, and the trainer's load, store and peak. */
void dist_gpu_backend(dist_gpu *d, train_backend *b);

/* x (n doubles, host) = its sum over the ranks (collective). 0 ok. */
int dist_gpu_sum(dist_gpu *d, double *x, size_t n);

/* Buckets made, for messages and tests. */
int dist_gpu_buckets(const dist_gpu *d);
/* Buckets of about `bytes` (at least a layer each; 0: one layer each),
 * as QLORA_DIST_BUCKET_MB sets them. Every rank must use the same. */
void dist_gpu_set_buckets(dist_gpu *d, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif
