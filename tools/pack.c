/* pack: token streams -> a packed file of fixed-length training rows.
 *
 * Argument parsing and orchestration only; the packed format and the
 * packers live in lib/packfile.c. All input is read before anything is
 * written, and outputs go through io_writer, so an error leaves no file.
 * --dump and --stats read packed files back as JSON.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "msg.h"
#include "packfile.h"

static const char usage_text[] =
    "usage: pack [-hqVv] [-l loss] [-m mode] [-n length] [-o file] [-s seed] "
    "[--eval-fraction f] [--eval-out file] [--no-shuffle] [--overlong how] "
    "[--vocab size] [file ...]\n"
    "       pack --dump | --stats [-o file] [file ...]\n";

static void usage(FILE *f)
{
    fputs(usage_text, f);
}

static void help(void)
{
    usage(stdout);
    fputs("\n"
          "Packs the records of token streams (from tok) into rows of a fixed\n"
          "length for lora-train: one epoch, rows shuffled by the seed.\n"
          "\n"
          "  -h, --help               this help\n"
          "  -l, --loss scope         completion (default: completion tokens "
          "and\n"
          "                           the final EOS) or all (every token, the "
          "seed)\n"
          "  -m, --mode mode          bfd (default: best-fit-decreasing, "
          "records\n"
          "                           kept whole, attention per document) or "
          "concat\n"
          "                           (the seed: concatenate, cut, drop the "
          "rest)\n"
          "  -n, --seq-len length     tokens per row (default 2048)\n"
          "  -o, --output file        write to file (atomically) instead of "
          "stdout\n"
          "  -q, --quiet              no warnings\n"
          "  -s, --seed seed          seed of the row shuffle and the eval "
          "split\n"
          "                           (default 0)\n"
          "  -V, --version            print the version\n"
          "  -v, --verbose            print a summary on stderr\n"
          "      --dump               print packed files as JSON Lines, a row "
          "a line\n"
          "      --eval-fraction f    hold out this share of the records (0 <= "
          "f < 1)\n"
          "      --eval-out file      where the held-out rows go\n"
          "      --no-shuffle         keep rows in packing order\n"
          "      --overlong how       bfd records longer than a row: truncate\n"
          "                           (default) or split\n"
          "      --stats              print a JSON summary of packed files\n"
          "      --vocab size         refuse streams of another vocabulary "
          "size\n",
          stdout);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

/* A whole decimal number in [0, max], or bad usage naming the option. */
static uint64_t parse_uint(const char *s, uint64_t max, const char *opt)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (!*s || *end || s[0] == '-' || s[0] == '+' || errno == ERANGE ||
        v > max) {
        fprintf(stderr, "%s: bad %s '%s'\n", msg_prog(), opt, s);
        usage(stderr);
        exit(2);
    }
    return v;
}

/* --dump / --stats: each packed file as JSON. Returns the exit status. */
static int show(int dump, const char *output, char **files, int nfiles)
{
    io_writer *w = io_writer_open(output, IO_TEXT);
    if (!w)
        return 2;
    strbuf sb = STRBUF_INIT;
    for (int i = 0; i < (nfiles ? nfiles : 1); i++) {
        pack_data d;
        if (pack_read(nfiles ? files[i] : NULL, &d) < 0) {
            sb_free(&sb);
            io_writer_abort(w);
            return 2;
        }
        if (dump) {
            for (uint64_t r = 0; r < d.h.n_rows; r++) {
                sb_reset(&sb);
                pack_dump_row(&d, r, &sb);
                sb_putc(&sb, '\n');
                io_write(w, sb.buf, sb.len);
            }
        } else {
            sb_reset(&sb);
            pack_stats_json(&d.h, &sb);
            sb_putc(&sb, '\n');
            io_write(w, sb.buf, sb.len);
        }
        pack_data_free(&d);
    }
    sb_free(&sb);
    return io_writer_commit(w) < 0 ? 2 : 0;
}

static void summary(const char *what, const pack_header *h)
{
    uint64_t slots = h->n_rows * h->seq_len;
    msg_info("%s: %" PRIu64 " documents in %" PRIu64 " rows of %" PRIu32
             ", %.2f%% tokens (%" PRIu64 " padding), %" PRIu64
             " truncated, %" PRIu64 " split, %" PRIu64 " tokens dropped",
             what, h->n_docs, h->n_rows, h->seq_len,
             slots ? 100.0 * (double)h->n_tokens / (double)slots : 0.0,
             slots - h->n_tokens, h->n_truncated, h->n_split, h->n_dropped);
}

static int run_pack(const pack_opts *o, uint32_t want_vocab, const char *output,
                    const char *eval_out, char **files, int nfiles)
{
    /* Open the outputs first: a terminal or an unwritable path fails
     * before any work; an error later aborts them, leaving nothing. */
    io_writer *w = io_writer_open(output, IO_BINARY), *we = NULL;
    if (!w)
        return 2;
    if (eval_out && !(we = io_writer_open(eval_out, IO_BINARY))) {
        io_writer_abort(w);
        return 2;
    }
    pack_input in = {0};
    pack_data train, eval;
    int rc = 0;
    for (int i = 0; i < (nfiles ? nfiles : 1) && rc == 0; i++)
        rc = pack_input_read(&in, nfiles ? files[i] : NULL, want_vocab);
    if (rc == 0)
        rc = pack_build(&in, o, &train, we ? &eval : NULL);
    if (rc < 0) {
        pack_input_free(&in);
        io_writer_abort(w);
        if (we)
            io_writer_abort(we);
        return 2;
    }
    if (train.h.n_rows == 0)
        msg_warn("no rows: %" PRIu64 " records of %" PRIu64
                 " tokens fill no row of %" PRIu32,
                 in.n_records, in.n_tokens, o->seq_len);
    else if (train.h.n_loss_tokens == 0)
        msg_warn("no token carries loss (no record has a completion); see "
                 "--loss all");
    if (we && eval.h.n_docs == 0)
        msg_warn("the eval split is empty");
    summary("train", &train.h);
    if (we)
        summary("eval", &eval.h);
    pack_write(w, &train);
    if (we)
        pack_write(we, &eval);
    rc = io_writer_commit(w);
    if (we) {
        if (rc == 0)
            rc = io_writer_commit(we);
        else
            io_writer_abort(we);
    }
    pack_data_free(&train);
    if (we)
        pack_data_free(&eval);
    pack_input_free(&in);
    return rc < 0 ? 2 : 0;
}

int main(int argc, char **argv)
{
    pack_opts o = {
        .seq_len = 2048,
        .mode = PACK_MODE_BFD,
        .loss = PACK_LOSS_COMPLETION,
        .overlong = PACK_OVERLONG_TRUNCATE,
        .seed = 0,
        .shuffle = 1,
        .eval_fraction = 0,
    };
    const char *output = NULL, *eval_out = NULL;
    uint64_t seq_len = o.seq_len;
    uint32_t want_vocab = 0;
    int dump = 0, stats = 0, packing_opts = 0, have_fraction = 0;

    msg_init(argv[0]);
    enum {
        OPT_DUMP = 256,
        OPT_EVAL_FRACTION,
        OPT_EVAL_OUT,
        OPT_NO_SHUFFLE,
        OPT_OVERLONG,
        OPT_STATS,
        OPT_VOCAB,
    };
    static const struct option longopts[] = {
        {"dump", no_argument, NULL, OPT_DUMP},
        {"eval-fraction", required_argument, NULL, OPT_EVAL_FRACTION},
        {"eval-out", required_argument, NULL, OPT_EVAL_OUT},
        {"help", no_argument, NULL, 'h'},
        {"loss", required_argument, NULL, 'l'},
        {"mode", required_argument, NULL, 'm'},
        {"no-shuffle", no_argument, NULL, OPT_NO_SHUFFLE},
        {"output", required_argument, NULL, 'o'},
        {"overlong", required_argument, NULL, OPT_OVERLONG},
        {"quiet", no_argument, NULL, 'q'},
        {"seed", required_argument, NULL, 's'},
        {"seq-len", required_argument, NULL, 'n'},
        {"stats", no_argument, NULL, OPT_STATS},
        {"verbose", no_argument, NULL, 'v'},
        {"version", no_argument, NULL, 'V'},
        {"vocab", required_argument, NULL, OPT_VOCAB},
        {NULL, 0, NULL, 0},
    };
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":hl:m:n:o:qs:Vv", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'h':
            help();
            return 0;
        case 'l':
            packing_opts = 1;
            if (strcmp(optarg, "completion") == 0)
                o.loss = PACK_LOSS_COMPLETION;
            else if (strcmp(optarg, "all") == 0)
                o.loss = PACK_LOSS_ALL;
            else
                bad_usage("bad loss scope '%s' (completion or all)", optarg);
            break;
        case 'm':
            packing_opts = 1;
            if (strcmp(optarg, "bfd") == 0)
                o.mode = PACK_MODE_BFD;
            else if (strcmp(optarg, "concat") == 0)
                o.mode = PACK_MODE_CONCAT;
            else
                bad_usage("bad mode '%s' (bfd or concat)", optarg);
            break;
        case 'n':
            packing_opts = 1;
            seq_len = parse_uint(optarg, UINT64_MAX, "sequence length");
            break;
        case 'o':
            output = optarg;
            break;
        case 'q':
            msg_verbosity = 0;
            break;
        case 's':
            packing_opts = 1;
            o.seed = parse_uint(optarg, INT64_MAX, "seed");
            break;
        case 'V':
            printf("pack %s\n", QLORA_VERSION);
            return 0;
        case 'v':
            msg_verbosity++;
            break;
        case OPT_DUMP:
            dump = 1;
            break;
        case OPT_EVAL_FRACTION: {
            packing_opts = 1;
            char *end;
            errno = 0;
            double f = strtod(optarg, &end);
            if (!*optarg || *end || errno || !(f >= 0 && f < 1))
                bad_usage("bad eval fraction '%s' (want 0 <= f < 1)", optarg);
            o.eval_fraction = f;
            have_fraction = 1;
            break;
        }
        case OPT_EVAL_OUT:
            packing_opts = 1;
            eval_out = optarg;
            break;
        case OPT_NO_SHUFFLE:
            packing_opts = 1;
            o.shuffle = 0;
            break;
        case OPT_OVERLONG:
            packing_opts = 1;
            if (strcmp(optarg, "truncate") == 0)
                o.overlong = PACK_OVERLONG_TRUNCATE;
            else if (strcmp(optarg, "split") == 0)
                o.overlong = PACK_OVERLONG_SPLIT;
            else
                bad_usage("bad overlong policy '%s' (truncate or split)",
                          optarg);
            break;
        case OPT_STATS:
            stats = 1;
            break;
        case OPT_VOCAB:
            packing_opts = 1;
            want_vocab =
                (uint32_t)parse_uint(optarg, UINT32_MAX - 1, "vocabulary size");
            if (!want_vocab)
                bad_usage("bad vocabulary size '%s'", optarg);
            break;
        case ':':
            bad_usage("option '%s' needs an argument", argv[optind - 1]);
        default: {
            char opt[3] = {'-', (char)optopt, '\0'};
            bad_usage("unknown option '%s'", optopt ? opt : argv[optind - 1]);
        }
        }
    }
    char **files = argv + optind;
    int nfiles = argc - optind;

    if (dump && stats)
        bad_usage("--dump and --stats exclude each other%s", "");
    if ((dump || stats) && packing_opts)
        bad_usage("%s reads packed files and takes no packing options",
                  dump ? "--dump" : "--stats");
    if (dump || stats)
        return show(dump, output, files, nfiles);

    if (have_fraction && o.eval_fraction > 0 && !eval_out)
        bad_usage("--eval-fraction needs --eval-out%s", "");
    if (eval_out && !(o.eval_fraction > 0))
        bad_usage("--eval-out needs --eval-fraction above 0%s", "");
    if (seq_len < 2)
        msg_die("sequence length %" PRIu64 " too short (at least 2)", seq_len);
    if (seq_len > PACK_MAX_SEQ_LEN)
        msg_die("sequence length %" PRIu64
                " over the packed format's maximum %u",
                seq_len, PACK_MAX_SEQ_LEN);
    o.seq_len = (uint32_t)seq_len;
    return run_pack(&o, want_vocab, output, eval_out, files, nfiles);
}
