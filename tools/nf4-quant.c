/* nf4-quant: a Hugging Face Llama checkpoint -> the NF4 checkpoint that
 * transformers + bitsandbytes load with a plain from_pretrained(dir), byte
 * for byte what bitsandbytes itself would save; and back (--dequant).
 *
 * Argument parsing and orchestration only; quantization and the checkpoint
 * layout live in lib/nf4.c.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "json.h"
#include "msg.h"
#include "nf4.h"

static const char usage_text[] =
    "usage: nf4-quant [-hqVv] [-b size] [-j threads] [-o dir] "
    "[--compute-dtype type] [--no-double-quant] [--stats] dir\n"
    "       nf4-quant --dequant [-qv] [-j threads] [--dtype type] -o dir dir\n";

static void usage(FILE *f)
{
    fputs(usage_text, f);
}

static void help(void)
{
    usage(stdout);
    fputs("\n"
          "Quantizes every decoder-block linear weight of a Llama checkpoint\n"
          "directory to NF4 with double quantization, exactly as\n"
          "bitsandbytes does, and writes a checkpoint directory that\n"
          "transformers loads as a 4-bit model.\n"
          "\n"
          "  -b, --blocksize size     elements per absmax block (64)\n"
          "  -h, --help               this help\n"
          "  -j, --threads threads    worker threads (all cores)\n"
          "  -o, --output dir         the output checkpoint directory\n"
          "  -q, --quiet              no warnings\n"
          "  -V, --version            print the version\n"
          "  -v, --verbose            say what is being done\n"
          "      --compute-dtype type bnb_4bit_compute_dtype of the config:\n"
          "                           bf16 (default), f16 or f32\n"
          "      --dequant            NF4 checkpoint back to plain tensors\n"
          "      --dtype type         with --dequant: bf16, f16 or f32\n"
          "                           (default: each weight's own)\n"
          "      --no-double-quant    keep the block absmax in fp32\n"
          "      --stats              one JSON line per weight on stdout:\n"
          "                           absmax range, RMS, quantization error\n",
          stdout);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

/* "bf16" / "bfloat16" ... -> dtype; -1 if unknown. */
static int parse_dtype(const char *s, st_dtype *out)
{
    if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16") || !strcmp(s, "BF16"))
        *out = ST_BF16;
    else if (!strcmp(s, "f16") || !strcmp(s, "float16") || !strcmp(s, "F16"))
        *out = ST_F16;
    else if (!strcmp(s, "f32") || !strcmp(s, "float32") || !strcmp(s, "F32"))
        *out = ST_F32;
    else
        return -1;
    return 0;
}

static const char *torch_name(st_dtype t)
{
    return t == ST_BF16 ? "bfloat16" : t == ST_F16 ? "float16" : "float32";
}

static void print_stats(void *ctx, const char *name, const nf4_weight *w,
                        const nf4_stats *st)
{
    io_writer *out = ctx;
    strbuf sb = STRBUF_INIT;
    sb_puts(&sb, "{\"name\": ");
    json_append_string(&sb, name, strlen(name));
    sb_puts(&sb, ", \"shape\": [");
    for (int d = 0; d < w->ndim; d++)
        sb_printf(&sb, "%s%lld", d ? ", " : "", (long long)w->shape[d]);
    sb_printf(&sb, "], \"dtype\": \"%s\", \"blocks\": %lld, \"absmax_min\": ",
              st_dtype_name(w->dtype), (long long)w->nblocks);
    json_append_number(&sb, st->absmax_min);
    sb_puts(&sb, ", \"absmax_max\": ");
    json_append_number(&sb, st->absmax_max);
    sb_puts(&sb, ", \"rms\": ");
    json_append_number(&sb, st->rms);
    sb_puts(&sb, ", \"err_rms\": ");
    json_append_number(&sb, st->err_rms);
    sb_puts(&sb, ", \"rel_err\": ");
    json_append_number(&sb, st->rel_err);
    sb_puts(&sb, ", \"max_abs_err\": ");
    json_append_number(&sb, st->max_abs_err);
    sb_puts(&sb, "}\n");
    io_write(out, sb.buf, sb.len);
    sb_free(&sb);
}

int main(int argc, char **argv)
{
    int blocksize = 64, nthreads = 0, nested = 1, stats = 0, dequant = 0;
    const char *output = NULL, *compute = "bfloat16";
    st_dtype out_dtype = ST_NDTYPES;

    msg_init(argv[0]);
    enum { OPT_COMPUTE = 256, OPT_DEQUANT, OPT_DTYPE, OPT_NO_DQ, OPT_STATS };
    static const struct option longopts[] = {
        {"blocksize", required_argument, NULL, 'b'},
        {"compute-dtype", required_argument, NULL, OPT_COMPUTE},
        {"dequant", no_argument, NULL, OPT_DEQUANT},
        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"help", no_argument, NULL, 'h'},
        {"no-double-quant", no_argument, NULL, OPT_NO_DQ},
        {"output", required_argument, NULL, 'o'},
        {"quiet", no_argument, NULL, 'q'},
        {"stats", no_argument, NULL, OPT_STATS},
        {"threads", required_argument, NULL, 'j'},
        {"version", no_argument, NULL, 'V'},
        {"verbose", no_argument, NULL, 'v'},
        {NULL, 0, NULL, 0},
    };
    opterr = 0;
    int c;
    char *end;
    st_dtype t;
    while ((c = getopt_long(argc, argv, ":b:hj:o:qVv", longopts, NULL)) != -1) {
        switch (c) {
        case 'b':
            blocksize = (int)strtol(optarg, &end, 10);
            if (*end || !nf4_blocksize_ok(blocksize))
                bad_usage("bad block size '%s' (32, 64, 128, ..., 4096)",
                          optarg);
            break;
        case 'h':
            help();
            return 0;
        case 'j':
            nthreads = (int)strtol(optarg, &end, 10);
            if (*end || nthreads < 1 || nthreads > 1024)
                bad_usage("bad thread count '%s'", optarg);
            break;
        case 'o':
            output = optarg;
            break;
        case 'q':
            msg_verbosity = 0;
            break;
        case 'V':
            printf("nf4-quant %s\n", QLORA_VERSION);
            return 0;
        case 'v':
            msg_verbosity++;
            break;
        case OPT_COMPUTE:
            if (parse_dtype(optarg, &t) != 0)
                bad_usage("bad compute dtype '%s' (bf16, f16 or f32)", optarg);
            compute = torch_name(t);
            break;
        case OPT_DEQUANT:
            dequant = 1;
            break;
        case OPT_DTYPE:
            if (parse_dtype(optarg, &out_dtype) != 0)
                bad_usage("bad dtype '%s' (bf16, f16 or f32)", optarg);
            break;
        case OPT_NO_DQ:
            nested = 0;
            break;
        case OPT_STATS:
            stats = 1;
            break;
        case ':':
            bad_usage("option '%s' needs an argument", argv[optind - 1]);
        default:
            bad_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (argc - optind != 1)
        bad_usage("expected one checkpoint directory%s", "");
    const char *input = argv[optind];
    if (dequant) {
        if (!output)
            bad_usage("--dequant needs -o dir%s", "");
        if (stats)
            bad_usage("--stats does not go with --dequant%s", "");
        msg_info("dequantizing '%s' into '%s'", input, output);
        return nf4_dequantize_checkpoint(input, output, out_dtype, nthreads,
                                         5000000000ull)
                   ? 2
                   : 0;
    }
    if (out_dtype != ST_NDTYPES)
        bad_usage("--dtype goes with --dequant%s", "");
    if (!output && !stats)
        bad_usage("nothing to do: give -o dir or --stats%s", "");

    io_writer *so = NULL;
    if (stats && !(so = io_writer_open(NULL, IO_TEXT)))
        return 2;
    nf4_ckpt_opts o = {
        .in_dir = input,
        .out_dir = output,
        .blocksize = blocksize,
        .nested = nested,
        .nthreads = nthreads,
        .compute_dtype = compute,
        .shard_bytes = 5000000000ull,
        .on_stats = stats ? print_stats : NULL,
        .ctx = so,
    };
    msg_info("quantizing '%s'%s%s", input, output ? " into " : "",
             output ? output : "");
    int rc = nf4_quantize_checkpoint(&o);
    if (so) {
        if (rc != 0)
            io_writer_abort(so);
        else if (io_writer_commit(so) != 0)
            rc = -1;
    }
    return rc ? 2 : 0;
}
