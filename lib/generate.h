/* generate.h: text generation (lora-gen) with a Llama model and an optional
 * LoRA adapter: the sampler, the scheduler that keeps many prompts in
 * flight, and the CPU backend.
 *
 * Split in three so the CPU and the GPU share everything but the model math:
 *   - the sampler turns one row of logits into a token, as transformers'
 *     generate() does: repetition penalty, then temperature, top-k, top-p,
 *     then a draw (greedy: the first index of the largest logit);
 *   - the scheduler (gen_run) owns the sequences: it fills free slots of a
 *     backend with the next prompts (prefill), advances every running
 *     sequence by one token per step (decode), retires a sequence when it
 *     stops and hands its slot to the next prompt, and emits the results
 *     in input order whatever order they finish in;
 *   - a backend (gen_backend) holds the model and one key/value cache per
 *     slot and computes logits: gen_cpu_backend here (llama_decode, the
 *     reference), gen_gpu_backend in kernels/gen_gpu.h.
 *
 * Reproducibility: the draws of record i come from their own counter-based
 * stream, key gen_record_key(seed, i), draw number = the token's index in
 * the completion, so a record's output does not depend on how many other
 * records are in flight or in which slot it runs. On the CPU the logits do
 * not depend on that either (llama_decode per sequence); see
 * kernels/gen_gpu.h for the GPU.
 *
 * Stopping, checked after each new token, in this order: a token of
 * stop_ids ("stop"), EOS unless ignore_eos ("eos"), a stop text found in the
 * decoded completion ("stop"), max_new tokens ("length"), the model's
 * context full ("context"). The token that stops a sequence is kept in the
 * completion (as transformers keeps EOS and the tokens of a stop string).
 * Stop texts are matched on text, not tokens: after each token the whole
 * completion is decoded with the tokenizer and searched, so a stop text
 * that spans several tokens, or only part of one, is still found.
 */
#ifndef GENERATE_H
#define GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "llama.h"
#include "lora.h"
#include "sentencepiece.h"
#include "tokstream.h"

typedef enum gen_finish {
    GEN_FINISH_LENGTH,  /* max_new tokens generated */
    GEN_FINISH_EOS,     /* the EOS token */
    GEN_FINISH_STOP,    /* a stop id or a stop text */
    GEN_FINISH_CONTEXT, /* the model's context (max_position_embeddings) */
} gen_finish;

/* "length", "eos", "stop", "context". */
const char *gen_finish_name(gen_finish f);

typedef struct gen_params {
    int32_t max_new;           /* new tokens at most, >= 1 */
    double temperature;        /* <= 0: greedy */
    int32_t top_k;             /* keep the k most likely (ties kept); 0 off */
    double top_p;              /* nucleus mass in (0, 1]; 1 off */
    double repetition_penalty; /* > 0; 1 off (CTRL's, as transformers) */
    uint64_t seed;
    int32_t eos_id;          /* -1: none */
    int ignore_eos;          /* do not stop at EOS */
    const int32_t *stop_ids; /* (n_stop_ids) tokens that end a sequence */
    size_t n_stop_ids;
    const char *const *stop_texts; /* (n_stop_texts), need sp */
    size_t n_stop_texts;
    const sp_model *sp;  /* decodes completions for stop_texts */
    int32_t vocab_limit; /* only ids < vocab_limit are ever produced
                            (the tokenizer's vocabulary); 0: all */
} gen_params;

/* Defaults: max_new 256, greedy, top_k 0, top_p 1, penalty 1, seed 0,
 * eos_id -1, no stops. */
void gen_params_default(gen_params *p);
/* Checks ranges; -1 with a message naming the option. */
int gen_params_check(const gen_params *p);
/* 1 when sampling reduces to an argmax of the raw logits (greedy, no
 * repetition penalty): a backend may then return the argmax alone. */
int gen_params_plain_greedy(const gen_params *p);

/* ---- the sampler ------------------------------------------------------- */

/* The first index of the largest of x[0..n) (NaN never wins); 0 when n < 1. */
int32_t gen_argmax(const float *x, int32_t n);
/* The key of record `index`'s random stream. */
uint64_t gen_record_key(uint64_t seed, uint64_t index);
/* Draw `i` of stream `key` as a double in [0, 1) (53 bits). */
double gen_uniform(uint64_t key, uint64_t i);

typedef struct gen_sampler gen_sampler;
/* Scratch for vocabularies of up to vocab entries. */
gen_sampler *gen_sampler_new(int32_t vocab);
void gen_sampler_free(gen_sampler *s);
/* One token from logits[0..n) (n already limited to the vocabulary; the
 * array is modified: penalty and temperature are applied in place).
 * seen (may be NULL) marks with 1 the ids already in the sequence (prompt
 * and completion) for the repetition penalty. draw is the token's index in
 * the completion. Steps, as transformers:
 *   penalty   l = l < 0 ? l * r : l / r for every seen id;
 *   greedy    the first index of the largest l (temperature <= 0);
 *   otherwise l /= temperature; top-k keeps the ids whose l is at least
 *             the k-th largest; top-p keeps, in decreasing order of
 *             probability, every id while the mass of those before it is
 *             below top_p (at least one); then u = gen_uniform(key, draw)
 *             picks from the kept ids by cumulative probability, in
 *             decreasing order of probability when top-k or top-p is on,
 *             else in id order. */
int32_t gen_sample(gen_sampler *s, const gen_params *p, float *logits,
                   int32_t n, const uint8_t *seen, uint64_t key, uint64_t draw);

/* ---- backends ----------------------------------------------------------- */

/* A backend holds the model, the adapter and `slots` key/value caches of
 * `cap` positions. For each sequence it returns either the logits of its
 * last token (vocab floats, into logits + i * vocab) or, when argmax is
 * non-NULL (logits then NULL), gen_argmax of its first vocab_limit logits.
 * 0 ok, -1 error (message printed). */
typedef struct gen_backend {
    void *ctx;
    const char *name; /* "cpu", "cuda" */
    int32_t slots;    /* sequences in flight at most */
    int32_t cap;      /* positions per sequence */
    int32_t vocab;
    int64_t max_prefill; /* tokens one prefill call takes at most (>= cap) */
    int32_t refill;      /* admit new prompts once this many slots are free
                            (or nothing runs): batches prefills */
    /* Starts n sequences: slot[i] gets the prompt of len[i] tokens that
     * follows the previous ones in ids, replacing what the slot held. */
    int (*prefill)(void *ctx, int32_t n, const int32_t *slot,
                   const int32_t *ids, const int32_t *len, int32_t vocab_limit,
                   float *logits, int32_t *argmax);
    /* Appends ids[i] to the sequence in slot[i], for n running slots. */
    int (*decode)(void *ctx, int32_t n, const int32_t *slot, const int32_t *ids,
                  int32_t vocab_limit, float *logits, int32_t *argmax);
    void (*free)(void *ctx);
} gen_backend;

/* The CPU backend: llama_decode per sequence (sequences in parallel with
 * OpenMP when several run). 0 ok, -1 error. The model and adapter must
 * outlive it; release with be->free(be->ctx). */
int gen_cpu_backend(const llama_model *m, const lora_adapter *a, int32_t slots,
                    int32_t cap, gen_backend *be);

/* ---- prompts and the run ------------------------------------------------ */

typedef struct gen_prompt {
    const int32_t *ids;
    int32_t n;
} gen_prompt;

typedef struct gen_inputs {
    toks_header h;
    gen_prompt *p; /* (n) */
    size_t n;
    int32_t max_len; /* longest prompt */
    int32_t *store_; /* private */
} gen_inputs;

/* Reads every record of a token stream (path NULL or "-": stdin). A record
 * with a completion (completion_start set) is cut there: its prompt is
 * what comes before. 0 ok, -1 error (empty prompt, corrupt stream). */
int gen_inputs_read(const char *path, gen_inputs *in);
void gen_inputs_free(gen_inputs *in);

/* Makes every prompt longer than max_pos tokens (the model's context) fit:
 * keeps its last max_pos - min(max_new, max_pos / 2) tokens, after its
 * first token when that is bos_id (the template's end, which the
 * completion continues, survives; so does the BOS). Returns how many
 * prompts were cut; *first is the index of the first and *kept the
 * length they were cut to (either may be NULL). */
size_t gen_inputs_fit(gen_inputs *in, int32_t max_pos, int32_t max_new,
                      int32_t bos_id, size_t *first, int32_t *kept);

/* Positions a cache needs for these prompts: the longest prompt plus
 * max_new, at most max_pos. */
int32_t gen_cache_cap(const gen_inputs *in, int32_t max_new, int32_t max_pos);

/* The cache positions for a main pass that leaves the longest prompts to
 * a pass of their own: what 99% of the prompts need (prompt + max_new),
 * rounded up to 256; gen_cache_cap's when that is not under half of it
 * (then one pass serves all). */
int32_t gen_cache_main(const gen_inputs *in, int32_t max_new, int32_t max_pos);

typedef struct gen_result {
    uint64_t index;        /* the record's place in the input, from 0 */
    const int32_t *prompt; /* (n_prompt) */
    int32_t n_prompt;
    const int32_t *ids; /* (n) the completion */
    int32_t n;
    gen_finish finish;
    double t_start; /* seconds from the run's start: prefill begins */
    double t_first; /* the first new token is known */
    double t_end;   /* the last */
} gen_result;

/* Receives each result, in input order; non-zero stops the run (error). */
typedef int (*gen_emit_fn)(void *ctx, const gen_result *r);

typedef struct gen_stats {
    uint64_t records;
    uint64_t prompt_tokens;
    uint64_t new_tokens;
    int64_t prefill_calls, decode_steps;
    double seconds;         /* the whole run */
    double prefill_seconds; /* inside prefill calls */
    double decode_seconds;  /* inside decode calls */
} gen_stats;

/* Generates a completion for each prompt with backend be. max_pos is the
 * model's context: a sequence stops ("context") when prompt + completion
 * reach it; a prompt longer than it, or than be->cap, is an error.
 * 0 ok, -1 error (message printed; results already emitted stay). */
int gen_run(gen_backend *be, const gen_params *p, const gen_prompt *prompts,
            size_t n, int32_t max_pos, gen_emit_fn emit, void *ctx,
            gen_stats *st);

/* gen_run over a subset of an input: prompt i is the input's record
 * index[i] (ascending), which names it in results and errors and keys its
 * random draws, so a record's completion is the same whichever subsets
 * the input is run in. index NULL: prompt i is record i. */
int gen_run_indexed(gen_backend *be, const gen_params *p,
                    const gen_prompt *prompts, const size_t *index, size_t n,
                    int32_t max_pos, gen_emit_fn emit, void *ctx, gen_stats *st);

#endif
