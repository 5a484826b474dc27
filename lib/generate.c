/* generate.c: the sampler, the scheduler and the CPU backend of lora-gen
 * (see generate.h for the contracts).
 *
 * The scheduler is a loop of two kinds of backend calls: a prefill for the
 * prompts admitted into free slots (all at once, up to max_prefill tokens),
 * then one decode step for every running sequence. A sequence that stops
 * frees its slot at once; the next loop admits new prompts into free slots
 * (once be->refill of them are free, so that prefills come in groups).
 * Finished completions wait in a reorder buffer until every record before
 * them has been emitted.
 *
 * The sampler keeps a binary heap over the vocabulary when top-k or top-p
 * is on: building it is linear and only the tokens that survive the
 * filters are ever popped, so sampling costs about one pass over the
 * logits instead of a sort.
 */
#define _POSIX_C_SOURCE 200809L
#include "generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "io.h"
#include "msg.h"
#include "strbuf.h"

const char *gen_finish_name(gen_finish f)
{
    switch (f) {
    case GEN_FINISH_LENGTH:
        return "length";
    case GEN_FINISH_EOS:
        return "eos";
    case GEN_FINISH_STOP:
        return "stop";
    case GEN_FINISH_CONTEXT:
        return "context";
    }
    return "?";
}

void gen_params_default(gen_params *p)
{
    memset(p, 0, sizeof *p);
    p->max_new = 256;
    p->temperature = 0.0;
    p->top_k = 0;
    p->top_p = 1.0;
    p->repetition_penalty = 1.0;
    p->eos_id = -1;
}

int gen_params_check(const gen_params *p)
{
    if (p->max_new < 1)
        return msg_error("max new tokens must be at least 1, got %d",
                         p->max_new);
    if (!(p->temperature >= 0.0) || !isfinite(p->temperature))
        return msg_error("temperature must be a number >= 0, got %g",
                         p->temperature);
    if (p->top_k < 0)
        return msg_error("top-k must be >= 0, got %d", p->top_k);
    if (!(p->top_p > 0.0 && p->top_p <= 1.0))
        return msg_error("top-p must be in (0, 1], got %g", p->top_p);
    if (!(p->repetition_penalty > 0.0) || !isfinite(p->repetition_penalty))
        return msg_error("repetition penalty must be > 0, got %g",
                         p->repetition_penalty);
    if (p->n_stop_texts && !p->sp)
        return msg_error("stop texts need a tokenizer to decode with");
    for (size_t i = 0; i < p->n_stop_texts; i++)
        if (!p->stop_texts[i][0])
            return msg_error("empty stop text");
    return 0;
}

int gen_params_plain_greedy(const gen_params *p)
{
    return p->temperature <= 0.0 && p->repetition_penalty == 1.0;
}

/* ---- the sampler ----------------------------------------------------------
 */

int32_t gen_argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    float bv = -INFINITY;
    int found = 0;
    for (int32_t i = 0; i < n; i++)
        if (x[i] > bv || (!found && x[i] == bv)) {
            bv = x[i];
            best = i;
            found = 1;
        }
    return best;
}

uint64_t gen_record_key(uint64_t seed, uint64_t index)
{
    return lora_rand_u64(lora_splitmix64(seed ^ 0x67656e6572617465ull), index);
}

double gen_uniform(uint64_t key, uint64_t i)
{
    return (double)(lora_rand_u64(key, i) >> 11) * (1.0 / 9007199254740992.0);
}

struct gen_sampler {
    int32_t cap;
    int32_t *heap; /* (cap) ids, max-heap by logit, ties: lower id first */
    int32_t *kept; /* (cap) ids in decreasing order */
};

gen_sampler *gen_sampler_new(int32_t vocab)
{
    gen_sampler *s = xcalloc(1, sizeof *s);
    s->cap = vocab > 0 ? vocab : 1;
    s->heap = xmalloc((size_t)s->cap * sizeof *s->heap);
    s->kept = xmalloc((size_t)s->cap * sizeof *s->kept);
    return s;
}

void gen_sampler_free(gen_sampler *s)
{
    if (!s)
        return;
    free(s->heap);
    free(s->kept);
    free(s);
}

/* a ranks before b: larger logit, or equal and lower id. NaN ranks last. */
static int ranks_before(const float *l, int32_t a, int32_t b)
{
    float x = l[a], y = l[b];
    if (isnan(x))
        return 0;
    if (isnan(y))
        return 1;
    return x > y || (x == y && a < b);
}

static void sift_down(int32_t *h, int32_t n, int32_t i, const float *l)
{
    for (;;) {
        int32_t c = 2 * i + 1, best = i;
        if (c < n && ranks_before(l, h[c], h[best]))
            best = c;
        if (c + 1 < n && ranks_before(l, h[c + 1], h[best]))
            best = c + 1;
        if (best == i)
            return;
        int32_t t = h[i];
        h[i] = h[best];
        h[best] = t;
        i = best;
    }
}

int32_t gen_sample(gen_sampler *s, const gen_params *p, float *l, int32_t n,
                   const uint8_t *seen, uint64_t key, uint64_t draw)
{
    if (n < 1)
        return 0;
    if (p->repetition_penalty != 1.0 && seen) {
        float r = (float)p->repetition_penalty;
        for (int32_t i = 0; i < n; i++)
            if (seen[i])
                l[i] = l[i] < 0 ? l[i] * r : l[i] / r;
    }
    if (p->temperature <= 0.0)
        return gen_argmax(l, n);
    float inv_t = (float)p->temperature;
    for (int32_t i = 0; i < n; i++)
        l[i] = l[i] / inv_t;
    int32_t top = gen_argmax(l, n);
    double mx = l[top];
    double u = gen_uniform(key, draw);
    int filtered = (p->top_k > 0 && p->top_k < n) || p->top_p < 1.0;
    if (!filtered) {
        /* every id, in id order */
        double z = 0.0;
        for (int32_t i = 0; i < n; i++)
            if (!isnan(l[i]))
                z += exp((double)l[i] - mx);
        double target = u * z, acc = 0.0;
        int32_t last = top;
        for (int32_t i = 0; i < n; i++) {
            if (isnan(l[i]))
                continue;
            double e = exp((double)l[i] - mx);
            if (e <= 0.0)
                continue;
            acc += e;
            last = i;
            if (acc > target)
                return i;
        }
        return last;
    }
    if (n > s->cap)
        n = s->cap;
    /* Ids leave the heap in decreasing order of probability. With top-k
     * the kept set is the top k (and ties with the k-th) and the mass is
     * theirs (transformers masks the rest, then normalizes); without it,
     * the mass is the whole vocabulary's and ids are popped only as far
     * as top-p needs. */
    int32_t *h = s->heap;
    int32_t hn = 0;
    for (int32_t i = 0; i < n; i++)
        if (!isnan(l[i]))
            h[hn++] = i;
    for (int32_t i = hn / 2 - 1; i >= 0; i--)
        sift_down(h, hn, i, l);
    int32_t nk = 0;
    double z = 0.0;
    int topk = p->top_k > 0 && p->top_k < hn;
    if (topk) {
        float kth = 0.0f;
        while (hn > 0 && (nk < p->top_k || l[h[0]] == kth)) {
            int32_t id = h[0];
            s->kept[nk++] = id;
            kth = l[id];
            z += exp((double)l[id] - mx);
            h[0] = h[--hn];
            sift_down(h, hn, 0, l);
        }
    } else {
        for (int32_t i = 0; i < hn; i++)
            z += exp((double)l[h[i]] - mx);
    }
    /* top-p: an id is kept while the mass of the ids before it is below
     * top_p (the first always) */
    double before = 0.0, limit = p->top_p < 1.0 ? p->top_p * z : INFINITY;
    int32_t nkeep = 0;
    for (;;) {
        if (nkeep > 0 && !(before < limit))
            break;
        if (nkeep == nk) {
            if (topk || hn == 0)
                break;
            s->kept[nk++] = h[0];
            h[0] = h[--hn];
            sift_down(h, hn, 0, l);
        }
        before += exp((double)l[s->kept[nkeep]] - mx);
        nkeep++;
    }
    if (nkeep == 0)
        return top;
    double target = u * before, acc = 0.0;
    for (int32_t i = 0; i < nkeep; i++) {
        acc += exp((double)l[s->kept[i]] - mx);
        if (acc > target)
            return s->kept[i];
    }
    return s->kept[nkeep - 1];
}

/* ---- the CPU backend ---------------------------------------------------- */

typedef struct cpu_be {
    const llama_model *m;
    const lora_adapter *a;
    llama_kv_cache **kc; /* (slots) */
    int32_t slots;
    float *scratch; /* (slots, vocab) logits when only argmax is wanted */
} cpu_be;

static int cpu_run(cpu_be *c, int32_t n, const int32_t *slot,
                   const int32_t *const *ids, const int32_t *len, int fresh,
                   int32_t vocab_limit, float *logits, int32_t *argmax)
{
    int32_t vocab = c->m->cfg.vocab;
    int rc = 0;
    int many = n > 1;
#pragma omp parallel for schedule(dynamic) if (many) reduction(| : rc)
    for (int32_t i = 0; i < n; i++) {
        llama_kv_cache *kc = c->kc[slot[i]];
        if (fresh)
            kc->len = 0;
        float *out = logits ? logits + (int64_t)i * vocab
                            : c->scratch + (int64_t)i * vocab;
        if (llama_decode(c->m, c->a, kc, ids[i], len[i], out) != 0) {
            rc |= 1;
            continue;
        }
        if (argmax)
            argmax[i] = gen_argmax(out, vocab_limit);
    }
    return rc ? -1 : 0;
}

static int cpu_prefill(void *ctx, int32_t n, const int32_t *slot,
                       const int32_t *ids, const int32_t *len,
                       int32_t vocab_limit, float *logits, int32_t *argmax)
{
    const int32_t **starts = xmalloc((size_t)(n ? n : 1) * sizeof *starts);
    int64_t off = 0;
    for (int32_t i = 0; i < n; i++) {
        starts[i] = ids + off;
        off += len[i];
    }
    int rc = cpu_run(ctx, n, slot, starts, len, 1, vocab_limit, logits, argmax);
    free(starts);
    return rc;
}

static int cpu_decode(void *ctx, int32_t n, const int32_t *slot,
                      const int32_t *ids, int32_t vocab_limit, float *logits,
                      int32_t *argmax)
{
    const int32_t **starts = xmalloc((size_t)(n ? n : 1) * sizeof *starts);
    int32_t *ones = xmalloc((size_t)(n ? n : 1) * sizeof *ones);
    for (int32_t i = 0; i < n; i++) {
        starts[i] = ids + i;
        ones[i] = 1;
    }
    int rc =
        cpu_run(ctx, n, slot, starts, ones, 0, vocab_limit, logits, argmax);
    free(ones);
    free(starts);
    return rc;
}

static void cpu_free(void *ctx)
{
    cpu_be *c = ctx;
    if (!c)
        return;
    for (int32_t i = 0; i < c->slots; i++)
        llama_kv_cache_free(c->kc[i]);
    free(c->kc);
    free(c->scratch);
    free(c);
}

int gen_cpu_backend(const llama_model *m, const lora_adapter *a, int32_t slots,
                    int32_t cap, gen_backend *be)
{
    if (slots < 1 || cap < 1)
        return msg_error("bad backend size: %d slots of %d positions", slots,
                         cap);
    cpu_be *c = xcalloc(1, sizeof *c);
    c->m = m;
    c->a = a;
    c->slots = slots;
    c->kc = xcalloc((size_t)slots, sizeof *c->kc);
    for (int32_t i = 0; i < slots; i++)
        c->kc[i] = llama_kv_cache_new(m, cap);
    c->scratch = xmalloc((size_t)slots * (size_t)m->cfg.vocab * sizeof(float));
    memset(be, 0, sizeof *be);
    be->ctx = c;
    be->name = "cpu";
    be->slots = slots;
    be->cap = cap;
    be->vocab = m->cfg.vocab;
    be->max_prefill = (int64_t)cap * slots;
    be->refill = 1;
    be->prefill = cpu_prefill;
    be->decode = cpu_decode;
    be->free = cpu_free;
    return 0;
}

/* ---- inputs ----------------------------------------------------------------
 */

int gen_inputs_read(const char *path, gen_inputs *in)
{
    memset(in, 0, sizeof *in);
    io_reader *r = io_reader_open(path);
    if (!r)
        return -1;
    toks_reader *tr = toks_reader_new(r, &in->h);
    if (!tr) {
        io_reader_close(r);
        return -1;
    }
    toks_record rec = {0};
    size_t cap_p = 0, cap_s = 0, ns = 0;
    size_t *offs = NULL;
    int rc;
    while ((rc = toks_read_record(tr, &rec)) == 1) {
        uint32_t n = rec.completion_start == TOKS_NO_COMPLETION
                         ? rec.n
                         : rec.completion_start;
        if (n == 0) {
            rc = msg_error("%s: record %zu: empty prompt", io_reader_name(r),
                           in->n + 1);
            break;
        }
        if (n > (uint32_t)INT32_MAX / 2) {
            rc = msg_error("%s: record %zu: prompt of %u tokens is too long",
                           io_reader_name(r), in->n + 1, n);
            break;
        }
        if (in->n == cap_p) {
            cap_p = cap_p ? 2 * cap_p : 256;
            offs = xrealloc(offs, cap_p * sizeof *offs);
            in->p = xrealloc(in->p, cap_p * sizeof *in->p);
        }
        while (ns + n > cap_s) {
            cap_s = cap_s ? 2 * cap_s : 65536;
            in->store_ = xrealloc(in->store_, cap_s * sizeof *in->store_);
        }
        for (uint32_t i = 0; i < n; i++)
            in->store_[ns + i] = (int32_t)rec.ids[i];
        offs[in->n] = ns;
        in->p[in->n].n = (int32_t)n;
        if ((int32_t)n > in->max_len)
            in->max_len = (int32_t)n;
        ns += n;
        in->n++;
    }
    toks_record_free(&rec);
    toks_reader_free(tr);
    io_reader_close(r);
    if (rc != 0) {
        free(offs);
        gen_inputs_free(in);
        return -1;
    }
    for (size_t i = 0; i < in->n; i++)
        in->p[i].ids = in->store_ + offs[i];
    free(offs);
    return 0;
}

void gen_inputs_free(gen_inputs *in)
{
    free(in->p);
    free(in->store_);
    memset(in, 0, sizeof *in);
}

size_t gen_inputs_fit(gen_inputs *in, int32_t max_pos, int32_t max_new,
                      int32_t bos_id, size_t *first, int32_t *kept)
{
    if (max_pos < 2)
        return 0;
    int32_t keep = max_pos - (max_new < max_pos / 2 ? max_new : max_pos / 2);
    if (kept)
        *kept = keep;
    size_t cut = 0;
    in->max_len = 0;
    for (size_t i = 0; i < in->n; i++) {
        gen_prompt *q = &in->p[i];
        if (q->n > max_pos) {
            if (cut++ == 0 && first)
                *first = i;
            /* the prompts are views of the private store: shift in place */
            int32_t *ids = (int32_t *)q->ids;
            int32_t head = ids[0] == bos_id ? 1 : 0;
            memmove(ids + head, ids + q->n - (keep - head),
                    (size_t)(keep - head) * sizeof *ids);
            q->n = keep;
        }
        if (q->n > in->max_len)
            in->max_len = q->n;
    }
    return cut;
}

int32_t gen_cache_cap(const gen_inputs *in, int32_t max_new, int32_t max_pos)
{
    int64_t cap = (int64_t)in->max_len + max_new;
    if (max_pos > 0 && cap > max_pos)
        cap = max_pos;
    if (cap < 1)
        cap = 1;
    return (int32_t)cap;
}

int32_t gen_cache_main(const gen_inputs *in, int32_t max_new, int32_t max_pos)
{
    int32_t cap = gen_cache_cap(in, max_new, max_pos);
    size_t k = in->n - in->n / 100; /* the prompts that must fit: 99% */
    int32_t c = 256;
    for (; c < cap; c += 256) {
        size_t fit = 0;
        for (size_t i = 0; i < in->n; i++)
            fit += (int64_t)in->p[i].n + max_new <= c;
        if (fit >= k)
            break;
    }
    return 2 * c <= cap ? c : cap;
}

/* ---- the scheduler --------------------------------------------------------
 */

typedef struct seq {
    int64_t rec;  /* record index, -1 when the slot is free */
    int32_t *out; /* (max_new) the completion */
    int32_t n;
    uint8_t *seen; /* (vocab) for the repetition penalty, or NULL */
    double t_start, t_first;
} seq;

typedef struct done_rec {
    int32_t *ids;
    int32_t n;
    gen_finish finish;
    double t_start, t_first, t_end;
    int ready;
} done_rec;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct run {
    gen_backend *be;
    const gen_params *p;
    const gen_prompt *pr;
    const size_t *index; /* (n) the records' places in the input, or NULL */
    size_t n;
    int32_t max_pos;
    int32_t vocab_limit;
    gen_sampler **sampler;  /* one per thread (nsamplers), or NULL */
    int nsamplers;
    int32_t *tok;           /* (slots) the tokens of one step: the decode's
                               inputs, then the sampled ones */
    seq *s;         /* (slots) */
    done_rec *done; /* (n) */
    size_t next_emit;
    gen_emit_fn emit;
    void *ctx;
    strbuf text;
    double t0;
    gen_stats *st;
} run;

/* Appends token t to the sequence in slot k; returns 1 when it stops. */
static int seq_push(run *R, int32_t k, int32_t t)
{
    seq *s = &R->s[k];
    const gen_params *p = R->p;
    s->out[s->n++] = t;
    if (s->seen)
        s->seen[t] = 1;
    if (s->n == 1)
        s->t_first = now_s() - R->t0;
    gen_finish f = GEN_FINISH_LENGTH;
    int stop = 0;
    for (size_t i = 0; i < p->n_stop_ids && !stop; i++)
        if (p->stop_ids[i] == t) {
            stop = 1;
            f = GEN_FINISH_STOP;
        }
    if (!stop && !p->ignore_eos && p->eos_id >= 0 && t == p->eos_id) {
        stop = 1;
        f = GEN_FINISH_EOS;
    }
    if (!stop && p->n_stop_texts) {
        sb_reset(&R->text);
        sp_decode(p->sp, (const uint32_t *)s->out, (size_t)s->n, &R->text);
        for (size_t i = 0; i < p->n_stop_texts && !stop; i++) {
            size_t ln = strlen(p->stop_texts[i]);
            const char *b = sb_str(&R->text);
            for (size_t j = 0; ln <= R->text.len && j + ln <= R->text.len; j++)
                if (memcmp(b + j, p->stop_texts[i], ln) == 0) {
                    stop = 1;
                    f = GEN_FINISH_STOP;
                    break;
                }
        }
    }
    if (!stop && s->n >= p->max_new) {
        stop = 1;
        f = GEN_FINISH_LENGTH;
    }
    if (!stop && (int64_t)R->pr[s->rec].n + s->n >= R->max_pos) {
        stop = 1;
        f = GEN_FINISH_CONTEXT;
    }
    if (!stop)
        return 0;
    done_rec *d = &R->done[s->rec];
    d->ids = xmalloc((size_t)s->n * sizeof *d->ids);
    memcpy(d->ids, s->out, (size_t)s->n * sizeof *d->ids);
    d->n = s->n;
    d->finish = f;
    d->t_start = s->t_start;
    d->t_first = s->t_first;
    d->t_end = now_s() - R->t0;
    d->ready = 1;
    R->st->new_tokens += (uint64_t)s->n;
    s->rec = -1;
    return 1;
}

static int flush_done(run *R)
{
    while (R->next_emit < R->n && R->done[R->next_emit].ready) {
        size_t i = R->next_emit;
        done_rec *d = &R->done[i];
        gen_result res = {
            .index = R->index ? R->index[i] : i,
            .prompt = R->pr[i].ids,
            .n_prompt = R->pr[i].n,
            .ids = d->ids,
            .n = d->n,
            .finish = d->finish,
            .t_start = d->t_start,
            .t_first = d->t_first,
            .t_end = d->t_end,
        };
        int rc = R->emit ? R->emit(R->ctx, &res) : 0;
        free(d->ids);
        d->ids = NULL;
        R->next_emit++;
        R->st->records++;
        if (rc != 0)
            return -1;
    }
    return 0;
}

/* Samples one token per sequence from the backend's output and pushes it.
 * Sequences are sampled on several threads (each with its own sampler):
 * a draw depends only on its record's key and position, so the tokens are
 * the same whatever the thread count; only the pushes, which end
 * sequences, go in order. */
static void take_tokens(run *R, int32_t n, const int32_t *slot, float *logits,
                        const int32_t *argmax)
{
    int32_t vocab = R->be->vocab;
    if (!argmax) {
#pragma omp parallel for schedule(dynamic) num_threads(R->nsamplers) if (n > 1)
        for (int32_t i = 0; i < n; i++) {
            int th = 0;
#ifdef _OPENMP
            th = omp_get_thread_num();
#endif
            seq *s = &R->s[slot[i]];
            R->tok[i] = gen_sample(R->sampler[th], R->p, logits + (int64_t)i * vocab,
                                   R->vocab_limit, s->seen,
                                   gen_record_key(R->p->seed,
                                                  R->index ? R->index[s->rec]
                                                           : (uint64_t)s->rec),
                                   (uint64_t)s->n);
        }
    }
    for (int32_t i = 0; i < n; i++)
        seq_push(R, slot[i], argmax ? argmax[i] : R->tok[i]);
}

int gen_run(gen_backend *be, const gen_params *p, const gen_prompt *prompts,
            size_t n, int32_t max_pos, gen_emit_fn emit, void *ctx,
            gen_stats *st)
{
    return gen_run_indexed(be, p, prompts, NULL, n, max_pos, emit, ctx, st);
}

int gen_run_indexed(gen_backend *be, const gen_params *p,
                    const gen_prompt *prompts, const size_t *index, size_t n,
                    int32_t max_pos, gen_emit_fn emit, void *ctx, gen_stats *st)
{
    gen_stats dummy;
    if (!st)
        st = &dummy;
    memset(st, 0, sizeof *st);
    if (gen_params_check(p) != 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        size_t rn = (index ? index[i] : i) + 1;
        if (prompts[i].n < 1)
            return msg_error("record %zu: empty prompt", rn);
        if (max_pos > 0 && prompts[i].n > max_pos)
            return msg_error("record %zu: prompt of %d tokens is longer than "
                             "the model's context (%d)",
                             rn, prompts[i].n, max_pos);
        if (prompts[i].n > be->cap)
            return msg_error("record %zu: prompt of %d tokens does not fit "
                             "the cache (%d positions)",
                             rn, prompts[i].n, be->cap);
    }
    run R;
    memset(&R, 0, sizeof R);
    R.be = be;
    R.p = p;
    R.pr = prompts;
    R.index = index;
    R.n = n;
    /* a sequence ends once prompt + completion reach the context or the
     * cache (the last token is never fed back, so that is safe) */
    R.max_pos = max_pos > 0 && max_pos < be->cap ? max_pos : be->cap;
    R.vocab_limit = p->vocab_limit > 0 && p->vocab_limit < be->vocab
                        ? p->vocab_limit
                        : be->vocab;
    R.emit = emit;
    R.ctx = ctx;
    R.st = st;
    int32_t S = be->slots, V = be->vocab;
    int greedy = gen_params_plain_greedy(p);
    if (!greedy) {
        R.nsamplers = 1;
#ifdef _OPENMP
        R.nsamplers = omp_get_max_threads();
        if (R.nsamplers > S)
            R.nsamplers = S;
#endif
        R.sampler = xcalloc((size_t)R.nsamplers, sizeof *R.sampler);
        for (int k = 0; k < R.nsamplers; k++)
            R.sampler[k] = gen_sampler_new(V);
    }
    R.tok = xcalloc((size_t)S, sizeof *R.tok);
    R.s = xcalloc((size_t)S, sizeof *R.s);
    for (int32_t k = 0; k < S; k++) {
        R.s[k].rec = -1;
        R.s[k].out = xmalloc((size_t)p->max_new * sizeof(int32_t));
        if (p->repetition_penalty != 1.0)
            R.s[k].seen = xcalloc((size_t)V, 1);
    }
    R.done = xcalloc(n ? n : 1, sizeof *R.done);
    int32_t *slot = xmalloc((size_t)S * sizeof *slot);
    int32_t *len = xmalloc((size_t)S * sizeof *len);
    int32_t *tok = R.tok;
    int32_t *amax = xmalloc((size_t)S * sizeof *amax);
    float *logits =
        greedy ? NULL : xmalloc((size_t)S * (size_t)V * sizeof(float));
    int32_t *pids = NULL;
    size_t pcap = 0;
    size_t next = 0;
    int rc = 0;
    R.t0 = now_s();
    while (rc == 0 && (next < n || R.next_emit < n)) {
        /* admit prompts into free slots: a round starts once be->refill
         * slots are free (or nothing runs) and goes on, one prefill call
         * per max_prefill tokens, until the slots or the prompts run out */
        int32_t nfree = 0;
        for (int32_t k = 0; k < S; k++)
            if (R.s[k].rec < 0)
                nfree++;
        int32_t want = be->refill > 1 ? be->refill : 1;
        if ((size_t)want > n - next)
            want = (int32_t)(n - next);
        int round = next < n && nfree > 0 && (nfree >= want || nfree == S);
        while (rc == 0 && round && next < n && nfree > 0) {
            int32_t na = 0;
            int64_t ntok = 0;
            for (int32_t k = 0; k < S && next < n; k++) {
                if (R.s[k].rec >= 0)
                    continue;
                if (na > 0 && ntok + prompts[next].n > be->max_prefill)
                    break;
                seq *s = &R.s[k];
                s->rec = (int64_t)next;
                s->n = 0;
                s->t_start = now_s() - R.t0;
                if (s->seen) {
                    memset(s->seen, 0, (size_t)V);
                    for (int32_t j = 0; j < prompts[next].n; j++)
                        if (prompts[next].ids[j] < V)
                            s->seen[prompts[next].ids[j]] = 1;
                }
                if ((size_t)(ntok + prompts[next].n) > pcap) {
                    pcap = (size_t)(ntok + prompts[next].n) * 2;
                    pids = xrealloc(pids, pcap * sizeof *pids);
                }
                memcpy(pids + ntok, prompts[next].ids,
                       (size_t)prompts[next].n * sizeof *pids);
                ntok += prompts[next].n;
                slot[na] = k;
                len[na] = prompts[next].n;
                na++;
                st->prompt_tokens += (uint64_t)prompts[next].n;
                next++;
            }
            double t = now_s();
            rc = be->prefill(be->ctx, na, slot, pids, len, R.vocab_limit,
                             greedy ? NULL : logits, greedy ? amax : NULL);
            st->prefill_seconds += now_s() - t;
            st->prefill_calls++;
            if (rc != 0)
                break;
            take_tokens(&R, na, slot, logits, greedy ? amax : NULL);
            rc = flush_done(&R);
            nfree = 0;
            for (int32_t k = 0; k < S; k++)
                if (R.s[k].rec < 0)
                    nfree++;
        }
        if (rc != 0)
            break;
        /* one step for every running sequence */
        int32_t nd = 0;
        for (int32_t k = 0; k < S; k++)
            if (R.s[k].rec >= 0) {
                slot[nd] = k;
                tok[nd] = R.s[k].out[R.s[k].n - 1];
                nd++;
            }
        if (nd == 0)
            continue;
        double t = now_s();
        rc = be->decode(be->ctx, nd, slot, tok, R.vocab_limit,
                        greedy ? NULL : logits, greedy ? amax : NULL);
        st->decode_seconds += now_s() - t;
        st->decode_steps++;
        if (rc != 0)
            break;
        take_tokens(&R, nd, slot, logits, greedy ? amax : NULL);
        rc = flush_done(&R);
    }
    st->seconds = now_s() - R.t0;
    for (size_t i = 0; i < n; i++)
        free(R.done[i].ids);
    for (int32_t k = 0; k < S; k++) {
        free(R.s[k].out);
        free(R.s[k].seen);
    }
    free(R.s);
    free(R.done);
    free(slot);
    free(len);
    free(amax);
    free(logits);
    free(pids);
    sb_free(&R.text);
    for (int k = 0; k < R.nsamplers; k++)
        gen_sampler_free(R.sampler[k]);
    free(R.sampler);
    free(R.tok);
    return rc ? -1 : 0;
}
