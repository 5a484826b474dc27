/* lora-gen: generates a completion for every prompt of a token stream with
 * a Llama model (Hugging Face or nf4-quant directory) and an optional PEFT
 * LoRA adapter, applied without merging; on the GPU when there is one.
 *
 * Argument parsing and orchestration only: the sampler, the scheduler and
 * the CPU backend live in lib/generate.c, the model math in
 * lib/llama_cpu.c, the GPU backend in kernels/gen_gpu.cu. The output holds
 * one record per input record, in input order: the prompt followed by the
 * completion, completion_start at the boundary, so `tok -d` prints
 * {"prompt", "completion"}; or JSON Lines with -J.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "adapter.h"
#include "generate.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "sentencepiece.h"
#include "strbuf.h"
#include "tokstream.h"
#ifdef QLORA_CUDA /* ---- GPU path (kernels/), built when nvcc is present ---- \
                   */
#include "../kernels/gen_gpu.h"
#include "../kernels/kernels.h"
#endif

static const char usage_text[] =
    "usage: lora-gen [-hJqVv] [-a adapter] [-b n] [-j threads] [-k top-k] "
    "[-n max-new] [-o file] [-p top-p] [-r penalty] [-S seed] [-s stop] "
    "[-T tokenizer] [-t temperature] [--cache n] [--device dev] [--ignore-eos] "
    "[--overlong how] [--progress] [--stop-id id] -m model [file]\n";

static void usage(FILE *f)
{
    fputs(usage_text, f);
}

static void help(void)
{
    usage(stdout);
    fputs(
        "\n"
        "Generates a completion for every prompt of a token stream (from\n"
        "`dolly-fmt --prompt-only | tok -m MODEL`) with a Llama model and an\n"
        "optional LoRA adapter. Writes a token stream with one record per\n"
        "prompt, in input order: the prompt, then the completion\n"
        "(`tok -d` shows {\"prompt\", \"completion\"}).\n"
        "\n"
        "  -a, --adapter dir          PEFT LoRA adapter directory\n"
        "  -b, --batch n              prompts in flight at once (CPU: the\n"
        "                             threads; GPU: 64)\n"
        "  -h, --help                 this help\n"
        "  -J, --json                 JSON Lines (ids, text, timing) instead\n"
        "                             of a token stream\n"
        "  -j, --threads n            CPU threads (all cores)\n"
        "  -k, --top-k n              sample among the n most likely (0: off)\n"
        "  -m, --model dir            model directory (Hugging Face or\n"
        "                             nf4-quant)\n"
        "  -n, --max-new-tokens n     new tokens per prompt at most (256)\n"
        "  -o, --output file          write to file (atomically)\n"
        "  -p, --top-p p              nucleus sampling mass (1: off)\n"
        "  -q, --quiet                no warnings\n"
        "  -r, --repetition-penalty r penalize tokens already present (1: "
        "off)\n"
        "  -S, --seed n               random seed (0)\n"
        "  -s, --stop text            stop once the completion contains text\n"
        "                             (repeatable; needs the tokenizer)\n"
        "  -T, --tokenizer file       tokenizer.model (default: the model's)\n"
        "  -t, --temperature t        sampling temperature (0: greedy)\n"
        "  -V, --version              print the version\n"
        "  -v, --verbose              more messages on stderr\n"
        "      --cache n              cache positions a sequence of the main pass\n"
        "                             holds; prompts needing more run first in\n"
        "                             a pass of their own (default: what 99%\n"
        "                             need)\n"
        "      --device dev           auto (default), cpu or cuda\n"
        "      --ignore-eos           do not stop at EOS\n"
        "      --overlong how         a prompt longer than the model's context:\n"
        "                             truncate (default: keep its end) or error\n"
        "      --progress             progress on stderr even when it is not\n"
        "                             a terminal\n"
        "      --stop-id id           stop at token id (repeatable)\n",
        stdout);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

static long long parse_int(const char *s, const char *what, long long lo,
                           long long hi)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > hi)
        bad_usage(what, s);
    return v;
}

static double parse_num(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end || !isfinite(v))
        bad_usage(what, s);
    return v;
}

/* See lora-train.c: passive OpenMP waiting on a shared machine. */
static void passive_omp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
}

typedef struct out_ctx {
    io_writer *w;
    toks_writer *tw;
    int json;
    const sp_model *sp;
    strbuf sb, text;
    uint32_t *buf;
    size_t cap;
    int progress;
    size_t total;
    int hold;          /* keep results in held instead of writing them */
    gen_result *held;  /* (nheld) in input order, ids owned */
    size_t nheld, next_held, cap_held;
} out_ctx;

static int write_result(out_ctx *o, const gen_result *r)
{
    if (o->json) {
        strbuf *sb = &o->sb;
        sb_reset(sb);
        sb_printf(sb, "{\"index\":%" PRIu64 ",\"prompt_tokens\":%d,\"ids\":[",
                  r->index, r->n_prompt);
        for (int32_t i = 0; i < r->n; i++)
            sb_printf(sb, i ? ",%d" : "%d", r->ids[i]);
        sb_printf(sb, "],\"finish\":\"%s\"", gen_finish_name(r->finish));
        if (o->sp) {
            sb_reset(&o->text);
            sp_decode(o->sp, (const uint32_t *)r->ids, (size_t)r->n, &o->text);
            sb_puts(sb, ",\"text\":");
            json_append_string(sb, sb_str(&o->text), o->text.len);
        }
        double dt = r->t_end - r->t_start;
        sb_puts(sb, ",\"start_s\":");
        json_append_number(sb, round(r->t_start * 1e4) / 1e4);
        sb_puts(sb, ",\"first_token_s\":");
        json_append_number(sb, round((r->t_first - r->t_start) * 1e4) / 1e4);
        sb_puts(sb, ",\"seconds\":");
        json_append_number(sb, round(dt * 1e4) / 1e4);
        sb_puts(sb, "}\n");
        io_write(o->w, sb->buf, sb->len);
    } else {
        size_t n = (size_t)r->n_prompt + (size_t)r->n;
        if (n > o->cap) {
            o->cap = 2 * n;
            o->buf = xrealloc(o->buf, o->cap * sizeof *o->buf);
        }
        for (int32_t i = 0; i < r->n_prompt; i++)
            o->buf[i] = (uint32_t)r->prompt[i];
        for (int32_t i = 0; i < r->n; i++)
            o->buf[r->n_prompt + i] = (uint32_t)r->ids[i];
        toks_write_record(o->tw, o->buf, (uint32_t)n, (uint32_t)r->n_prompt);
    }
    if (o->progress) {
        fprintf(stderr, "\r%s: %" PRIu64 "/%zu records", msg_prog(),
                r->index + 1, o->total);
        if (r->index + 1 == o->total)
            fputc('\n', stderr);
        fflush(stderr);
    }
    return 0;
}

/* Writes the held results of records before index limit. */
static int emit_held(out_ctx *o, uint64_t limit)
{
    while (o->next_held < o->nheld && o->held[o->next_held].index < limit) {
        gen_result *h = &o->held[o->next_held++];
        int rc = write_result(o, h);
        free((void *)h->ids);
        h->ids = NULL;
        if (rc != 0)
            return -1;
    }
    return 0;
}

static void held_free(out_ctx *o)
{
    for (size_t i = o->next_held; i < o->nheld; i++)
        free((void *)o->held[i].ids);
    free(o->held);
}

static int emit(void *ctx, const gen_result *r)
{
    out_ctx *o = ctx;
    if (o->hold) {
        if (o->nheld == o->cap_held) {
            o->cap_held = o->cap_held ? 2 * o->cap_held : 64;
            o->held = xrealloc(o->held, o->cap_held * sizeof *o->held);
        }
        gen_result *h = &o->held[o->nheld++];
        *h = *r;
        int32_t *ids = xmalloc((size_t)(r->n ? r->n : 1) * sizeof *ids);
        memcpy(ids, r->ids, (size_t)r->n * sizeof *ids);
        h->ids = ids;
        return 0;
    }
    if (emit_held(o, r->index) != 0)
        return -1;
    return write_result(o, r);
}

static int32_t longest(const gen_prompt *pr, size_t n)
{
    int32_t m = 0;
    for (size_t i = 0; i < n; i++)
        m = pr[i].n > m ? pr[i].n : m;
    return m;
}

/* A backend for n prompts with caches of cap positions. */
static int open_backend(const llama_model *model, const lora_adapter *ad, int use_cuda,
                        int batch, size_t n, int32_t cap, gen_backend *be)
{
    if (use_cuda) {
#ifdef QLORA_CUDA
        int nb = batch > 0 ? batch : 64;
        if ((size_t)nb > n && n > 0)
            nb = (int)n;
        if (gen_gpu_backend(model, ad, nb, cap, be) != 0)
            return -1;
        msg_info("generating on CUDA device '%s'", kn_device_name());
        return 0;
#endif
    }
    int nb = batch;
#ifdef _OPENMP
    if (nb <= 0)
        nb = omp_get_max_threads();
#endif
    if (nb <= 0)
        nb = 1;
    if ((size_t)nb > n && n > 0)
        nb = (int)n;
    return gen_cpu_backend(model, ad, nb, cap, be);
}

int main(int argc, char **argv)
{
    passive_omp(argv);
    const char *model_dir = NULL, *adapter_dir = NULL, *output = NULL;
    const char *tok_path = NULL, *device = "auto";
    int json = 0, progress = isatty(2), batch = 0, threads = 0, truncate = 1;
    int32_t cache_opt = 0;
    gen_params p;
    gen_params_default(&p);
    const char **stops = xcalloc((size_t)argc + 1, sizeof *stops);
    int32_t *stop_ids = xcalloc((size_t)argc + 1, sizeof *stop_ids);
    size_t nstops = 0, nstop_ids = 0;

    msg_init(argv[0]);
    enum { OPT_CACHE = 256, OPT_DEVICE, OPT_IGNORE_EOS, OPT_OVERLONG, OPT_PROGRESS, OPT_STOP_ID };
    static const struct option longs[] = {
        {"adapter", required_argument, NULL, 'a'},
        {"batch", required_argument, NULL, 'b'},
        {"help", no_argument, NULL, 'h'},
        {"json", no_argument, NULL, 'J'},
        {"threads", required_argument, NULL, 'j'},
        {"top-k", required_argument, NULL, 'k'},
        {"model", required_argument, NULL, 'm'},
        {"max-new-tokens", required_argument, NULL, 'n'},
        {"output", required_argument, NULL, 'o'},
        {"top-p", required_argument, NULL, 'p'},
        {"quiet", no_argument, NULL, 'q'},
        {"repetition-penalty", required_argument, NULL, 'r'},
        {"seed", required_argument, NULL, 'S'},
        {"stop", required_argument, NULL, 's'},
        {"tokenizer", required_argument, NULL, 'T'},
        {"temperature", required_argument, NULL, 't'},
        {"version", no_argument, NULL, 'V'},
        {"verbose", no_argument, NULL, 'v'},
        {"cache", required_argument, NULL, OPT_CACHE},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
        {"overlong", required_argument, NULL, OPT_OVERLONG},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"stop-id", required_argument, NULL, OPT_STOP_ID},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "a:b:hJj:k:m:n:o:p:qr:S:s:T:t:Vv",
                            longs, NULL)) != -1) {
        switch (c) {
        case 'a':
            adapter_dir = optarg;
            break;
        case 'b':
            batch = (int)parse_int(optarg, "bad batch size '%s'", 1, 65536);
            break;
        case 'h':
            help();
            free(stops);
            free(stop_ids);
            return 0;
        case 'J':
            json = 1;
            break;
        case 'j':
            threads = (int)parse_int(optarg, "bad thread count '%s'", 1, 1024);
            break;
        case 'k':
            p.top_k =
                (int32_t)parse_int(optarg, "bad top-k '%s'", 0, INT32_MAX);
            break;
        case 'm':
            model_dir = optarg;
            break;
        case 'n':
            p.max_new = (int32_t)parse_int(optarg, "bad max new tokens '%s'", 1,
                                           1 << 24);
            break;
        case 'o':
            output = optarg;
            break;
        case 'p':
            p.top_p = parse_num(optarg, "bad top-p '%s'");
            if (!(p.top_p > 0 && p.top_p <= 1))
                bad_usage("top-p must be in (0, 1], got '%s'", optarg);
            break;
        case 'q':
            msg_verbosity = 0;
            break;
        case 'r':
            p.repetition_penalty =
                parse_num(optarg, "bad repetition penalty '%s'");
            if (!(p.repetition_penalty > 0))
                bad_usage("repetition penalty must be > 0, got '%s'", optarg);
            break;
        case 'S':
            p.seed = (uint64_t)parse_int(optarg, "bad seed '%s'", 0, INT64_MAX);
            break;
        case 's':
            if (!*optarg)
                bad_usage("empty stop text%s", "");
            stops[nstops++] = optarg;
            break;
        case 'T':
            tok_path = optarg;
            break;
        case 't':
            p.temperature = parse_num(optarg, "bad temperature '%s'");
            if (p.temperature < 0)
                bad_usage("temperature must be >= 0, got '%s'", optarg);
            break;
        case 'V':
            printf("lora-gen %s\n", QLORA_VERSION);
            free(stops);
            free(stop_ids);
            return 0;
        case 'v':
            msg_verbosity++;
            break;
        case OPT_CACHE:
            cache_opt = (int32_t)parse_int(optarg, "bad cache size '%s'", 1, 1 << 24);
            break;
        case OPT_DEVICE:
            if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") &&
                strcmp(optarg, "cuda"))
                bad_usage("unknown device '%s' (auto, cpu or cuda)", optarg);
            device = optarg;
            break;
        case OPT_IGNORE_EOS:
            p.ignore_eos = 1;
            break;
        case OPT_OVERLONG:
            if (strcmp(optarg, "truncate") && strcmp(optarg, "error"))
                bad_usage("unknown overlong policy '%s' (truncate or error)", optarg);
            truncate = strcmp(optarg, "truncate") == 0;
            break;
        case OPT_PROGRESS:
            progress = 1;
            break;
        case OPT_STOP_ID:
            stop_ids[nstop_ids++] =
                (int32_t)parse_int(optarg, "bad stop id '%s'", 0, INT32_MAX);
            break;
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (argc - optind > 1)
        bad_usage("too many operands, starting with '%s'", argv[optind + 1]);
    if (!model_dir)
        bad_usage("no model: give -m dir%s", "");
    const char *input = optind < argc ? argv[optind] : NULL;
    if (!input && isatty(0))
        bad_usage("no token stream (and stdin is a terminal)%s", "");
#ifdef QLORA_CUDA
    int use_cuda = strcmp(device, "cuda") == 0 ||
                   (strcmp(device, "auto") == 0 && kn_device_count() > 0);
    if (strcmp(device, "cuda") == 0 && kn_device_count() < 1)
        msg_die("device 'cuda': no CUDA device");
#else
    int use_cuda = 0;
    if (strcmp(device, "cuda") == 0)
        msg_die("device 'cuda': not built with CUDA");
#endif
#ifdef _OPENMP
    if (threads > 0)
        omp_set_num_threads(threads);
#endif

    /* from here on, every exit goes through done: */
    int rc = 2;
    llama_model *model = NULL;
    lora_adapter *ad = NULL;
    sp_model *sp = NULL;
    gen_inputs in = {0};
    gen_backend be = {0};
    out_ctx o = {0};
    char *tpath = NULL;

    if (gen_inputs_read(input, &in) != 0)
        goto done;
    if (llama_load(model_dir, &model) != 0)
        goto done;
    const llama_config *mc = &model->cfg;
    msg_info("model '%s': %d layers, dim %d, %s weights %.1f MiB", model_dir,
             mc->n_layers, mc->dim, mc->quantized ? "NF4" : "f32",
             (double)llama_weight_bytes(model) / 1048576.0);
    if (in.h.vocab_size > (uint32_t)mc->vocab) {
        msg_error("%s: vocabulary of %u tokens is larger than the model's (%d)",
                  input ? input : "<stdin>", in.h.vocab_size, mc->vocab);
        msg_hint("tokenize with the model's own tokenizer.model");
        goto done;
    }
    if (adapter_dir && adapter_read(adapter_dir, mc, &ad, NULL) != 0)
        goto done;
    /* the tokenizer: for stop texts and the JSON text */
    tpath = tok_path ? xstrdup(tok_path)
                     : io_path_join(model_dir, "tokenizer.model");
    if (tok_path || io_exists(tpath)) {
        if (!(sp = sp_model_load(tpath)))
            goto done;
        if (in.h.tokenizer[0] &&
            strcmp(in.h.tokenizer, sp_model_fingerprint(sp)))
            msg_warn("'%s' is not the tokenizer the input was made with",
                     tpath);
    } else if (nstops) {
        msg_error("stop texts need a tokenizer: '%s' is missing (give -T)",
                  tpath);
        goto done;
    }
    p.eos_id = in.h.eos_id >= 0 ? in.h.eos_id : mc->eos_id;
    p.stop_ids = stop_ids;
    p.n_stop_ids = nstop_ids;
    p.stop_texts = stops;
    p.n_stop_texts = nstops;
    p.sp = sp;
    p.vocab_limit = in.h.vocab_size ? (int32_t)in.h.vocab_size : mc->vocab;
    if (gen_params_check(&p) != 0)
        goto done;

    size_t first_cut = 0;
    int32_t kept = 0;
    size_t ncut = truncate ? gen_inputs_fit(&in, mc->max_pos, p.max_new, mc->bos_id,
                                            &first_cut, &kept)
                           : 0;
    if (ncut)
        msg_warn("%s: %zu prompt%s longer than the model's context (%d tokens) "
                 "cut to their last %d tokens, the first record %zu",
                 input ? input : "<stdin>", ncut, ncut == 1 ? "" : "s", mc->max_pos,
                 kept, first_cut + 1);
    /* Every sequence's cache holds its prompt and completion; one long
     * prompt would size all of them. Prompts needing more than the main
     * pass's cache (--cache, or the 99th percentile) run first in a pass
     * of their own; their results wait and go out in input order. */
    size_t nlong = 0;
    int32_t cap = gen_cache_cap(&in, p.max_new, mc->max_pos),
            main_cap = cache_opt > 0 ? (cache_opt < cap ? cache_opt : cap)
                                     : gen_cache_main(&in, p.max_new, mc->max_pos);
    size_t *idx_long = xmalloc((in.n ? in.n : 1) * sizeof *idx_long);
    size_t *idx_main = xmalloc((in.n ? in.n : 1) * sizeof *idx_main);
    gen_prompt *pl = xmalloc((in.n ? in.n : 1) * sizeof *pl);
    gen_prompt *pm = xmalloc((in.n ? in.n : 1) * sizeof *pm);
    size_t nmain = 0;
    for (size_t i = 0; i < in.n; i++) {
        int64_t need = (int64_t)in.p[i].n + p.max_new;
        if (main_cap < cap && need > main_cap) {
            pl[nlong] = in.p[i];
            idx_long[nlong++] = i;
        } else {
            pm[nmain] = in.p[i];
            idx_main[nmain++] = i;
        }
    }
    if (nlong)
        msg_info("%zu prompt%s more than %d cache positions: a pass of "
                 "their own first", nlong, nlong == 1 ? " needs" : "s need",
                 main_cap);

    o.json = json;
    o.sp = sp;
    o.progress = progress && msg_verbosity > 0;
    o.total = in.n;
    if (!(o.w = io_writer_open(output, json ? IO_TEXT : IO_BINARY)))
        goto fail;
    if (!json) {
        toks_header h = in.h;
        snprintf(h.producer, sizeof h.producer, "lora-gen %s seed %" PRIu64,
                 QLORA_VERSION, p.seed);
        o.tw = toks_writer_new(o.w, &h);
    }
    gen_stats st = {0}, st1;
    for (int pass = 0; pass < 2; pass++) {
        size_t np = pass ? nmain : nlong;
        if (np == 0)
            continue;
        int32_t pcap = pass ? main_cap : cap; /* equal when nothing is long */
        if (open_backend(model, ad, use_cuda, batch, np, pcap, &be) != 0)
            goto fail;
        msg_info("%zu prompts (longest %d tokens), %d in flight, cache of %d "
                 "positions, on %s",
                 np, longest(pass ? pm : pl, np), be.slots, be.cap, be.name);
        o.hold = pass == 0 && nmain > 0;
        int r = gen_run_indexed(&be, &p, pass ? pm : pl, pass ? idx_main : idx_long, np,
                                mc->max_pos, emit, &o, &st1);
        be.free(be.ctx);
        memset(&be, 0, sizeof be);
        if (r != 0 || (pass == 1 && emit_held(&o, UINT64_MAX) != 0))
            goto fail;
        st.records += st1.records;
        st.prompt_tokens += st1.prompt_tokens;
        st.new_tokens += st1.new_tokens;
        st.prefill_calls += st1.prefill_calls;
        st.decode_steps += st1.decode_steps;
        st.seconds += st1.seconds;
        st.prefill_seconds += st1.prefill_seconds;
        st.decode_seconds += st1.decode_seconds;
    }
    if (o.tw)
        toks_writer_finish(o.tw);
    if (io_writer_commit(o.w) != 0) {
        o.w = NULL;
        goto fail;
    }
    o.w = NULL;
    msg_info("%" PRIu64 " records, %" PRIu64 " prompt tokens, %" PRIu64
             " new tokens in %.3f s (prefill %.3f s in %" PRId64
             " calls, %" PRId64 " decode steps in %.3f s): %.1f new tokens/s",
             st.records, st.prompt_tokens, st.new_tokens, st.seconds,
             st.prefill_seconds, st.prefill_calls, st.decode_steps,
             st.decode_seconds,
             st.seconds > 0 ? st.new_tokens / st.seconds : 0.0);
    rc = 0;
fail:
    free(idx_long);
    free(idx_main);
    free(pl);
    free(pm);
done:
    if (o.w) {
        if (o.tw)
            toks_writer_finish(o.tw);
        io_writer_abort(o.w);
    }
    held_free(&o);
    sb_free(&o.sb);
    sb_free(&o.text);
    free(o.buf);
    if (be.free)
        be.free(be.ctx);
    gen_inputs_free(&in);
    sp_model_free(sp);
    lora_free(ad);
    llama_free(model);
    free(tpath);
    free(stops);
    free(stop_ids);
    return rc;
}
