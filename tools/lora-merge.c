/* lora-merge: fold a PEFT LoRA adapter into its base checkpoint.
 *
 * Argument parsing and orchestration only; the merge lives in lib/merge.c.
 * The output directory appears only when everything succeeded.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "merge.h"
#include "msg.h"

static const char usage_text[] =
    "usage: lora-merge [-hqVv] [-b dir] [-s size] [-t dtype] [--from-nf4] "
    "[--progress] [--requantize] -o dir adapter\n";

static void usage(FILE *f)
{
    fputs(usage_text, f);
}

static void help(void)
{
    usage(stdout);
    fputs("\n"
          "Merges the LoRA adapter in directory adapter into its base model\n"
          "(W + scale * B A, in fp32) and writes a plain Hugging Face\n"
          "checkpoint directory.\n"
          "\n"
          "  -b, --base dir       base checkpoint (default: the adapter's\n"
          "                       base_model_name_or_path)\n"
          "  -h, --help           this help\n"
          "  -o, --output dir     the merged checkpoint (required)\n"
          "  -q, --quiet          no warnings\n"
          "  -s, --shard-size size  largest safetensors file, e.g. 5GB (the\n"
          "                       default), 500MiB; 0: one file\n"
          "  -t, --dtype dtype    bf16 (default), f16 or f32\n"
          "  -V, --version        print the version\n"
          "  -v, --verbose        say what was done\n"
          "      --from-nf4       merge into the dequantized NF4 weights the\n"
          "                       adapter was trained against\n"
          "      --progress       show progress (default: when stderr is a\n"
          "                       terminal)\n"
          "      --requantize     write the merged model as NF4, as nf4-quant\n"
          "                       does\n",
          stdout);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

static void progress(void *ctx, size_t i, size_t n, const char *name)
{
    (void)ctx;
    fprintf(stderr, "\r%s: %zu/%zu %-60.60s", msg_prog(), i + 1, n, name);
    if (i + 1 == n)
        fputc('\n', stderr);
}

int main(int argc, char **argv)
{
    merge_opts o;
    int show_progress = -1;

    msg_init(argv[0]);
    merge_opts_init(&o);
    enum { OPT_FROM_NF4 = 256, OPT_PROGRESS, OPT_REQUANTIZE };
    static const struct option longopts[] = {
        {"base", required_argument, NULL, 'b'},
        {"dtype", required_argument, NULL, 't'},
        {"from-nf4", no_argument, NULL, OPT_FROM_NF4},
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'o'},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"quiet", no_argument, NULL, 'q'},
        {"requantize", no_argument, NULL, OPT_REQUANTIZE},
        {"shard-size", required_argument, NULL, 's'},
        {"verbose", no_argument, NULL, 'v'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":b:ho:qs:t:Vv", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'b':
            o.base_dir = optarg;
            break;
        case 'h':
            help();
            return fflush(stdout) || ferror(stdout) ? 2 : 0;
        case 'o':
            o.out_dir = optarg;
            break;
        case 'q':
            msg_verbosity = 0;
            break;
        case 's':
            if (merge_parse_size(optarg, &o.shard_bytes) != 0)
                bad_usage("bad shard size '%s' (e.g. 5GB, 500MiB, 0)", optarg);
            break;
        case 't':
            if (merge_parse_dtype(optarg, &o.dtype) != 0)
                bad_usage("unknown dtype '%s' (bf16, f16 or f32)", optarg);
            break;
        case 'V':
            printf("lora-merge " QLORA_VERSION "\n");
            return fflush(stdout) || ferror(stdout) ? 2 : 0;
        case 'v':
            msg_verbosity++;
            break;
        case OPT_FROM_NF4:
            o.from_nf4 = 1;
            break;
        case OPT_PROGRESS:
            show_progress = 1;
            break;
        case OPT_REQUANTIZE:
            o.requantize = 1;
            break;
        case ':':
            bad_usage("option '%s' needs an argument", argv[optind - 1]);
        default: {
            char opt[3] = {'-', (char)optopt, '\0'};
            bad_usage("unknown option '%s'", optopt ? opt : argv[optind - 1]);
        }
        }
    }
    if (argc - optind != 1)
        bad_usage("expected one adapter directory%s", "");
    if (!o.out_dir)
        bad_usage("the output directory (-o) is required%s", "");
    o.adapter_dir = argv[optind];
    if (show_progress < 0)
        show_progress = msg_verbosity > 0 && isatty(STDERR_FILENO);
    if (show_progress)
        o.on_tensor = progress;

    merge_stats st;
    if (merge_checkpoint(&o, &st) != 0)
        return 2;
    if (o.requantize)
        msg_info("wrote '%s': %zu tensors, %zu merged, requantized to NF4",
                 o.out_dir, st.tensors, st.merged);
    else
        msg_info("wrote '%s': %zu tensors, %zu merged, %.3f GB in %zu "
                 "file%s",
                 o.out_dir, st.tensors, st.merged, (double)st.bytes_out / 1e9,
                 st.shards, st.shards == 1 ? "" : "s");
    return 0;
}
