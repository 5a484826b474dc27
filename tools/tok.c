/* tok: JSON Lines text <-> the binary token stream, with a SentencePiece
 * model (Llama's tokenizer).
 *
 * Argument parsing and orchestration only; the model reader, the encoder
 * and the decoder live in lib/sentencepiece.c, the stream format in
 * lib/tokstream.c. Output goes through io_writer, so with -o a failure
 * leaves no file behind, and the binary stream refuses a terminal.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "msg.h"
#include "sentencepiece.h"
#include "strbuf.h"
#include "tokstream.h"

static const char usage_text[] =
    "usage: tok [-hqVv] [-j n] [-o file] [--no-bos] [--no-eos] -m model "
    "[file ...]\n"
    "       tok -d [-qv] [-o file] -m model [file]\n"
    "       tok --dump [-o file] [file]\n";

static void usage(FILE *f)
{
    fputs(usage_text, f);
}

static void help(void)
{
    usage(stdout);
    fputs("\n"
          "Tokenizes JSON Lines records ({\"prompt\", \"completion\"} or "
          "{\"text\"})\n"
          "into a token stream with a SentencePiece model, exactly as\n"
          "SentencePiece does; -d turns a stream back into JSON Lines text.\n"
          "\n"
          "  -d, --decode        token stream -> JSON Lines text\n"
          "      --dump          token stream -> JSON Lines {\"ids\", "
          "\"completion_start\"}\n"
          "  -h, --help          this help\n"
          "  -j, --threads n     encode with n threads (output order kept)\n"
          "  -m, --model model   the SentencePiece tokenizer.model\n"
          "      --no-bos        do not start records with BOS\n"
          "      --no-eos        do not end records with EOS\n"
          "  -o, --output file   write to file (atomically) instead of stdout\n"
          "  -q, --quiet         no warnings\n"
          "  -V, --version       print the version\n"
          "  -v, --verbose       say more\n",
          stdout);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

/* Encodes every file (stdin when none) into one token stream. */
static int encode_all(const char *model_path, const char *output,
                      const sp_jsonl_options *o, char **files, int nfiles)
{
    sp_model *m = sp_model_load(model_path);
    if (!m)
        return 2;
    io_writer *w = io_writer_open(output, IO_BINARY);
    if (!w) {
        sp_model_free(m);
        return 2;
    }
    toks_header h = {0};
    h.version = TOKS_VERSION;
    h.vocab_size = sp_model_vocab_size(m);
    h.bos_id = sp_model_bos_id(m);
    h.eos_id = sp_model_eos_id(m);
    snprintf(h.tokenizer, sizeof h.tokenizer, "%s", sp_model_fingerprint(m));
    snprintf(h.producer, sizeof h.producer, "tok %s", QLORA_VERSION);
    toks_writer *tw = toks_writer_new(w, &h);
    uint64_t total = 0;
    int rc = 0;
    for (int i = 0; i < (nfiles ? nfiles : 1) && rc == 0; i++) {
        io_reader *r = io_reader_open(nfiles ? files[i] : NULL);
        if (!r) {
            rc = -1;
            break;
        }
        uint64_t n = 0;
        rc = sp_encode_jsonl(m, r, tw, o, &n);
        total += n;
        io_reader_close(r);
    }
    toks_writer_finish(tw);
    sp_model_free(m);
    if (rc) {
        io_writer_abort(w);
        return 2;
    }
    if (io_writer_commit(w))
        return 2;
    msg_info("wrote %" PRIu64 " record%s", total, total == 1 ? "" : "s");
    return 0;
}

/* A stream must come from the model that decodes it. */
static int check_vocabulary(const toks_header *h, const sp_model *m,
                            const char *stream, const char *model_path)
{
    const char *fp = sp_model_fingerprint(m);
    if (h->vocab_size == sp_model_vocab_size(m) &&
        (!h->tokenizer[0] || strcmp(h->tokenizer, fp) == 0))
        return 0;
    msg_error("token stream '%s' was made with another tokenizer "
              "(vocab_size %" PRIu32 ", tokenizer %s) than '%s' "
              "(vocab_size %" PRIu32 ", tokenizer %s)",
              stream, h->vocab_size, h->tokenizer[0] ? h->tokenizer : "unknown",
              model_path, sp_model_vocab_size(m), fp);
    msg_hint("decode with the model that encoded it, or re-encode the text "
             "with 'tok -m %s'",
             model_path);
    return -1;
}

/* Appends [","]v in decimal (sb_printf is slow for millions of ids). */
static void put_u32(strbuf *sb, uint32_t v, int comma)
{
    char buf[12];
    int i = sizeof buf;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (comma)
        buf[--i] = ',';
    sb_append(sb, buf + i, sizeof buf - (size_t)i);
}

/* -d (model != NULL) or --dump: one token stream to JSON Lines. */
static int read_stream(const char *model_path, const char *output,
                       const char *file)
{
    sp_model *m = NULL;
    if (model_path && !(m = sp_model_load(model_path)))
        return 2;
    io_reader *r = io_reader_open(file);
    if (!r) {
        sp_model_free(m);
        return 2;
    }
    toks_header h;
    toks_reader *tr = toks_reader_new(r, &h);
    io_writer *w = NULL;
    int rc = -1;
    if (!tr ||
        (m && check_vocabulary(&h, m, io_reader_name(r), model_path) < 0) ||
        !(w = io_writer_open(output, IO_TEXT)))
        goto done;
    if (m) {
        rc = sp_decode_stream(m, tr, w);
    } else {
        toks_record rec = {0};
        strbuf sb = STRBUF_INIT;
        while ((rc = toks_read_record(tr, &rec)) > 0) {
            sb_reset(&sb);
            sb_puts(&sb, "{\"ids\":[");
            for (uint32_t i = 0; i < rec.n; i++)
                put_u32(&sb, rec.ids[i], i > 0);
            if (rec.completion_start == TOKS_NO_COMPLETION)
                sb_puts(&sb, "],\"completion_start\":null}\n");
            else
                sb_printf(&sb, "],\"completion_start\":%" PRIu32 "}\n",
                          rec.completion_start);
            io_write(w, sb.buf, sb.len);
        }
        toks_record_free(&rec);
        sb_free(&sb);
    }
done:
    if (tr)
        toks_reader_free(tr);
    io_reader_close(r);
    sp_model_free(m);
    if (rc < 0) {
        if (w)
            io_writer_abort(w);
        return 2;
    }
    return io_writer_commit(w) ? 2 : 0;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *output = NULL;
    int decode = 0, dump = 0;
    sp_jsonl_options o = {1, 1, 1};

    msg_init(argv[0]);
    enum { OPT_DUMP = 256, OPT_NO_BOS, OPT_NO_EOS };
    static const struct option longopts[] = {
        {"decode", no_argument, NULL, 'd'},
        {"dump", no_argument, NULL, OPT_DUMP},
        {"help", no_argument, NULL, 'h'},
        {"model", required_argument, NULL, 'm'},
        {"no-bos", no_argument, NULL, OPT_NO_BOS},
        {"no-eos", no_argument, NULL, OPT_NO_EOS},
        {"output", required_argument, NULL, 'o'},
        {"quiet", no_argument, NULL, 'q'},
        {"threads", required_argument, NULL, 'j'},
        {"version", no_argument, NULL, 'V'},
        {"verbose", no_argument, NULL, 'v'},
        {NULL, 0, NULL, 0},
    };
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":dhj:m:o:qVv", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'd':
            decode = 1;
            break;
        case 'h':
            help();
            return 0;
        case 'j': {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (*end || end == optarg || n < 1 || n > 256)
                bad_usage("bad thread count '%s' (want 1 to 256)", optarg);
            o.threads = (int)n;
            break;
        }
        case 'm':
            model = optarg;
            break;
        case 'o':
            output = optarg;
            break;
        case 'q':
            msg_verbosity = 0;
            break;
        case 'V':
            printf("tok %s\n", QLORA_VERSION);
            return 0;
        case 'v':
            msg_verbosity++;
            break;
        case OPT_DUMP:
            dump = 1;
            break;
        case OPT_NO_BOS:
            o.add_bos = 0;
            break;
        case OPT_NO_EOS:
            o.add_eos = 0;
            break;
        case ':':
            bad_usage("option '%s' needs a value", argv[optind - 1]);
        default:
            bad_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    char **files = argv + optind;
    int nfiles = argc - optind;

    if (decode && dump)
        bad_usage("-d and --dump exclude each other%s", "");
    if (dump) {
        if (model)
            bad_usage("--dump needs no model ('%s')", model);
        if (nfiles > 1)
            bad_usage("--dump reads one stream ('%s' is extra)", files[1]);
        return read_stream(NULL, output, nfiles ? files[0] : NULL);
    }
    if (!model)
        bad_usage("a model is required (-m tokenizer.model)%s", "");
    if (decode) {
        if (nfiles > 1)
            bad_usage("-d reads one stream ('%s' is extra)", files[1]);
        return read_stream(model, output, nfiles ? files[0] : NULL);
    }
    return encode_all(model, output, &o, files, nfiles);
}
