/* train.h: the LoRA training loop over a packed file.
 *
 * Configuration keys carry Hugging Face's names (transformers'
 * TrainingArguments, peft's LoraConfig) and defaults; train_fields is the
 * table config.h loads YAML and --set overrides with, and lora-train(1)
 * lists. The loop (train_run):
 *
 *   micro-batches per epoch  ceil(rows / per_device_train_batch_size)
 *   steps per epoch          ceil(micro-batches / gradient_accumulation_steps)
 *                            (an epoch's last step may have fewer)
 *   total steps              max_steps when > 0, else
 *                            ceil(num_train_epochs * steps per epoch)
 *
 * Data parallel over `world` ranks (train_inputs.world > 1), a step takes
 * gradient_accumulation_steps * world micro-batches, those that one
 * process would take with that accumulation, in the same row order, and
 * micro-batch k of a step goes to rank k % world (dist_shard): the result
 * is a single-process run's with the same global batch.
 *
 * Each epoch visits the rows in a fresh order: a Fisher-Yates shuffle
 * drawing lora_rand_u64(train_shuffle_key(seed, epoch), i) for its i-th
 * swap. A step's loss is sum w*CE over its micro-batches divided by the
 * step's total weight (the number of target tokens), as transformers does
 * with num_items_in_batch; its gradient is clipped to max_grad_norm and
 * AdamW (adamw.h) applies it at the step's scheduled learning rate.
 * Everything random is counter-based, so a run resumed from a checkpoint
 * continues bit for bit.
 */
#ifndef TRAIN_H
#define TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "adamw.h"
#include "config.h"
#include "llama.h"
#include "lora.h"
#include "packfile.h"
#include "strbuf.h"

typedef struct train_config {
    /* LoRA (peft LoraConfig) */
    int64_t r;
    double lora_alpha;
    double lora_dropout;
    cfg_strlist target_modules;
    int use_rslora;
    /* training (transformers TrainingArguments) */
    char *model_name_or_path;
    char *output_dir;
    double num_train_epochs;
    int64_t max_steps;
    int64_t per_device_train_batch_size;
    int64_t per_device_eval_batch_size;
    int64_t gradient_accumulation_steps;
    double learning_rate;
    double weight_decay;
    double adam_beta1;
    double adam_beta2;
    double adam_epsilon;
    char *optim;
    char *lr_scheduler_type;
    double warmup_ratio;
    int64_t warmup_steps;
    double max_grad_norm;
    int64_t logging_steps;
    int64_t save_steps;
    int64_t save_total_limit;
    int64_t eval_steps;
    int64_t seed;
    int gradient_checkpointing;
    int offload_activations;   /* GPU, with gradient_checkpointing */
    char *device;
    /* hardening (issue 11): a step whose loss or gradient is not finite */
    char *on_nonfinite;   /* "stop" (exit 2, nothing written) or "skip" */
} train_config;

extern const cfg_field train_fields[];
extern const size_t train_nfields;

/* Validates a loaded configuration (ranges, scheduler and optimizer
 * names, targets). 0 ok, -1 error naming the key. */
int train_config_check(const train_config *c);
/* The LoRA part as lora.h wants it. -1 on unknown target names. */
int train_lora_config(const train_config *c, lora_config *out);

/* The learning rate of step (0-based) out of total, warmup steps included,
 * as transformers' schedulers give it (LambdaLR at that step). */
double train_lr(const train_config *c, int64_t step, int64_t total);
/* Warmup steps: warmup_steps when > 0, else ceil(total * warmup_ratio). */
int64_t train_warmup_steps(const train_config *c, int64_t total);

/* Keys of the counter-based streams (lora.h). */
uint64_t train_shuffle_key(uint64_t seed, int64_t epoch);
uint64_t train_dropout_key(uint64_t seed, int64_t step, int64_t micro);
/* perm (n) = the row order of an epoch. */
void train_shuffle(uint64_t *perm, uint64_t n, uint64_t seed, int64_t epoch);

/* A micro-batch: packed rows laid end to end, padding dropped. Token t of
 * a span predicts the span's next token with that token's pack weight;
 * weight-0 and span-final tokens have no target. */
typedef struct train_batch {
    llama_batch b;
    int32_t *ids, *pos, *start, *targets;
    float *weights;
    int64_t cap;
    double weight_sum;     /* sum of weights over targets */
} train_batch;

void train_batch_build(train_batch *tb, const pack_data *d,
                       const uint64_t *rows, size_t n);
void train_batch_free(train_batch *tb);
/* Appends the batch as one JSON object: {"n":..,"ids":[..],"pos":[..],
 * "start":[..],"targets":[..],"weights":[..]} (the --dump-batches form). */
void train_batch_json(const train_batch *tb, strbuf *sb);

/* One optimizer step over n micro-batches: gradients of the step's mean
 * loss accumulated, norm taken, clipped, AdamW at lr. *loss is the step's
 * mean loss (NaN when it has no targets), *norm the gradient norm before
 * clipping. When the norm, or the loss of a step with targets, is not
 * finite, nothing is updated (the adapter and the moments stay as they
 * were; only opt->step advances) and the caller decides (on_nonfinite).
 * 0 ok, -1 error. */
int train_step(const llama_model *m, lora_adapter *a, adamw *opt, float *grad,
               const train_batch *micro, size_t n, double lr, double max_norm,
               int checkpointing, uint64_t seed, int64_t step, double *loss,
               double *norm);

/* Mean eval loss over a packed file (sum w*CE / sum w), no dropout. */
int train_eval(const llama_model *m, const lora_adapter *a,
               const pack_data *d, int64_t batch_rows, double *loss);

/* What the loop reports, through callbacks (the tool prints). */
typedef struct train_event {
    enum { TRAIN_EV_STEP, TRAIN_EV_LOG, TRAIN_EV_EVAL, TRAIN_EV_SAVE,
           TRAIN_EV_BATCH } kind;
    int64_t step;            /* steps done (1-based after the step) */
    int64_t total_steps;
    double epoch;            /* steps done / steps per epoch */
    double loss;             /* LOG: mean step loss since the last log */
    double learning_rate;    /* LOG: of the last step */
    double grad_norm;        /* LOG: of the last step, before clipping */
    double tokens_per_s;     /* LOG: tokens since the last log / seconds */
    double eval_loss;        /* EVAL */
    double peak_memory;      /* LOG: peak device bytes (GPU backend), else 0 */
    int64_t skipped_steps;   /* LOG: non-finite steps skipped so far */
    const char *path;        /* SAVE: the checkpoint directory */
    const train_batch *batch; /* BATCH: micro-batch `micro` of step `step` */
    int64_t micro;
    const uint64_t *rows;    /* BATCH: its rows' indices in the packed file */
    size_t n_rows;
} train_event;

typedef void (*train_callback)(const train_event *ev, void *ctx);

/* Where steps and evaluations run when not on the CPU: lora-train's GPU
 * path (kernels/train_gpu.h) fills one. train_run then calls step and eval
 * instead of train_step and train_eval, with the same contracts, and keeps
 * its host adapter and optimizer state current: load after the
 * initialisation or resume, store before each checkpoint and before the
 * final adapter. peak_bytes (may be NULL) goes into the LOG metrics. */
typedef struct train_backend {
    void *ctx;
    int (*step)(void *ctx, const train_batch *micro, size_t n, double lr,
                double max_norm, uint64_t seed, int64_t step, double *loss,
                double *norm);
    int (*eval)(void *ctx, const pack_data *d, int64_t batch_rows,
                double *loss);
    void (*load)(void *ctx, const lora_adapter *a, const adamw *opt);
    void (*store)(void *ctx, lora_adapter *a, adamw *opt);
    double (*peak_bytes)(void *ctx);
    /* Data parallel (dist.h; needed when train_inputs.world > 1): one
     * rank's share of a step, micro[i] being micro-batch index[i] of the
     * step (dropout key train_dropout_key(seed, step, index[i])) and
     * weight_sum the whole step's total weight; *loss and *norm are the
     * whole step's, the same on every rank. n may be 0. */
    int (*step_shard)(void *ctx, const train_batch *micro, const int64_t *index,
                      size_t n, double weight_sum, double lr, double max_norm,
                      uint64_t seed, int64_t step, double *loss, double *norm);
    /* May be NULL. Called on every rank after the last step with the
     * state just stored, before the adapter is written: data parallel
     * checks that every rank holds the same. */
    int (*finish)(void *ctx, const lora_adapter *a, const adamw *opt);
} train_backend;

typedef struct train_inputs {
    const train_config *cfg;
    const llama_model *model;
    const pack_data *train;
    const pack_data *eval;     /* or NULL */
    const char *resume;        /* checkpoint directory, or NULL */
    train_callback cb;
    void *cb_ctx;
    int want_batches;          /* emit TRAIN_EV_BATCH events */
    const train_backend *backend; /* NULL: the CPU */
    int world;                 /* data-parallel ranks (dist.h); 0 or 1: none */
    int rank;                  /* this one: only rank 0 emits events and
                                  writes files */
} train_inputs;

/* Runs the whole training: initial adapter (or the checkpoint's state),
 * steps, logs, evaluations, checkpoints output_dir/checkpoint-<step>
 * (adapter, optimizer.safetensors, trainer_state.json, and checksums.json
 * holding the FNV-1a 64 of the other four files, which a resume checks;
 * each directory written atomically) every save_steps, and finally the
 * adapter in output_dir. A non-finite step stops the run (-1, nothing more
 * written) or, with on_nonfinite "skip", is skipped and counted (on the
 * CPU, the GPU and data parallel alike).
 * Data parallel, every rank calls it (the backend's steps, evaluations and
 * finish are collective) and only rank 0 creates output_dir and writes.
 * 0 ok, -1 error. */
int train_run(const train_inputs *in);

/* The newest output_dir/checkpoint-<N> holding a trainer_state.json, as a
 * malloc'ed path, or NULL when there is none. */
char *train_latest_checkpoint(const char *output_dir);

/* Appends an event as one JSON Lines record (no newline): LOG
 * {"step","epoch","loss","learning_rate","grad_norm","tokens_per_s"},
 * EVAL {"step","epoch","eval_loss"}. */
void train_event_json(const train_event *ev, strbuf *sb);

#endif
