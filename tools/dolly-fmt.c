/* dolly-fmt: JSON Lines records -> {"prompt", "completion"} training text.
 *
 * Argument parsing and orchestration only; templates and formatting live
 * in lib/dollyfmt.c. Output goes through io_writer, so with -o a failure
 * leaves no file behind.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dollyfmt.h"
#include "io.h"
#include "msg.h"

static const char usage_text[] =
    "usage: dolly-fmt [-hpqsVv] [-c list] [-f name=key] [-o file] "
    "[-t template] [file ...]\n"
    "       dolly-fmt --print-template [-t template]\n";

static void usage(FILE *f) { fputs(usage_text, f); }

static void help(void)
{
    usage(stdout);
    fputs("\n"
          "Formats JSON Lines records (Dolly's instruction, context,\n"
          "response, category) as {\"prompt\", \"completion\"} text.\n"
          "\n"
          "  -c, --category list     keep only records of these categories\n"
          "                          (comma-separated; repeatable)\n"
          "  -f, --field name=key    read template field name from record key\n"
          "                          (repeatable)\n"
          "  -h, --help              this help\n"
          "  -o, --output file       write to file (atomically), not stdout\n"
          "  -p, --prompt-only       write {\"prompt\"} only, for generation\n"
          "  -q, --quiet             no warnings or summaries\n"
          "  -s, --skip-bad          skip malformed records and count them\n"
          "  -t, --template template seed (default), alpaca or a template file\n"
          "  -V, --version           print the version\n"
          "  -v, --verbose           say more (each skipped record)\n"
          "      --print-template    print the template's text and exit\n",
          stdout);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

/* --print-template: the text of a built-in template, or of a template file
 * once it compiles. Returns the exit status. */
static int print_template_text(const char *name, int n_operands)
{
    if (n_operands > 0)
        bad_usage("--print-template takes no file operands%s", "");
    const char *text = dollyfmt_builtin_text(name);
    if (text) {
        fputs(text, stdout);
    } else {
        char *data;
        size_t len;
        dollyfmt_template *t;
        if (io_read_file(name, &data, &len))
            return 2;
        int bad = dollyfmt_template_parse(data, len, name, &t);
        dollyfmt_template_free(t);
        if (!bad)
            fwrite(data, 1, len, stdout);
        free(data);
        if (bad)
            return 2;
    }
    if (fflush(stdout) || ferror(stdout) || fclose(stdout)) {
        msg_error("cannot write '<stdout>'");
        return 2;
    }
    return 0;
}

/* Formats every file (stdin when none) into output. Returns the exit
 * status; with an error, output is not written. */
static int format_all(const char *template_name, const char *output,
                      dollyfmt_options *o, char **files, int nfiles)
{
    dollyfmt_template *tpl;
    if (dollyfmt_template_load(template_name, &tpl))
        return 2;
    o->tpl = tpl;
    io_writer *w = io_writer_open(output, IO_TEXT);
    if (!w) {
        dollyfmt_template_free(tpl);
        return 2;
    }
    long written = 0, skipped = 0;
    int rc = 0;
    for (int i = 0; i < (nfiles ? nfiles : 1) && rc == 0; i++) {
        io_reader *r = io_reader_open(nfiles ? files[i] : NULL);
        if (!r) {
            rc = -1;
            break;
        }
        rc = dollyfmt_run(o, r, w, &written, &skipped);
        io_reader_close(r);
    }
    dollyfmt_template_free(tpl);
    if (rc) {
        io_writer_abort(w);
        return 2;
    }
    if (io_writer_commit(w))
        return 2;
    if (skipped && msg_verbosity >= 1)
        fprintf(stderr, "%s: skipped %ld malformed line%s\n", msg_prog(),
                skipped, skipped == 1 ? "" : "s");
    msg_info("wrote %ld record%s", written, written == 1 ? "" : "s");
    return 0;
}

int main(int argc, char **argv)
{
    const char *template_name = "seed";
    const char *output = NULL;
    int prompt_only = 0, skip_bad = 0, print_template = 0;
    const char **categories = NULL;
    size_t n_categories = 0;
    const char **rename_from = NULL, **rename_to = NULL;
    size_t n_rename = 0;

    msg_init(argv[0]);
    enum { OPT_PRINT_TEMPLATE = 256 };
    static const struct option longopts[] = {
        {"category", required_argument, NULL, 'c'},
        {"field", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'o'},
        {"prompt-only", no_argument, NULL, 'p'},
        {"print-template", no_argument, NULL, OPT_PRINT_TEMPLATE},
        {"quiet", no_argument, NULL, 'q'},
        {"skip-bad", no_argument, NULL, 's'},
        {"template", required_argument, NULL, 't'},
        {"version", no_argument, NULL, 'V'},
        {"verbose", no_argument, NULL, 'v'},
        {NULL, 0, NULL, 0},
    };
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":c:f:ho:pqst:Vv", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'c': {
            /* Comma-separated; the strings live in argv. */
            char *s = optarg;
            for (;;) {
                char *comma = strchr(s, ',');
                if (comma)
                    *comma = '\0';
                if (!*s)
                    bad_usage("empty category in '--category %s'", optarg);
                categories = xrealloc(categories,
                                      (n_categories + 1) * sizeof *categories);
                categories[n_categories++] = s;
                if (!comma)
                    break;
                s = comma + 1;
            }
            break;
        }
        case 'f': {
            char *eq = strchr(optarg, '=');
            if (!eq || eq == optarg || !eq[1])
                bad_usage("bad field renaming '%s' (want name=key)", optarg);
            *eq = '\0';
            rename_from =
                xrealloc(rename_from, (n_rename + 1) * sizeof *rename_from);
            rename_to = xrealloc(rename_to, (n_rename + 1) * sizeof *rename_to);
            rename_from[n_rename] = optarg;
            rename_to[n_rename++] = eq + 1;
            break;
        }
        case 'h':
            help();
            return 0;
        case 'o':
            output = optarg;
            break;
        case 'p':
            prompt_only = 1;
            break;
        case 'q':
            msg_verbosity = 0;
            break;
        case 's':
            skip_bad = 1;
            break;
        case 't':
            template_name = optarg;
            break;
        case 'V':
            printf("dolly-fmt %s\n", QLORA_VERSION);
            return 0;
        case 'v':
            msg_verbosity++;
            break;
        case OPT_PRINT_TEMPLATE:
            print_template = 1;
            break;
        case ':':
            bad_usage("option '%s' needs an argument", argv[optind - 1]);
        default: {
            char opt[3] = {'-', (char)optopt, '\0'};
            bad_usage("unknown option '%s'", optopt ? opt : argv[optind - 1]);
        }
        }
    }

    int status = print_template
                     ? print_template_text(template_name, argc - optind)
                     : format_all(template_name, output, &(dollyfmt_options){
                                      .prompt_only = prompt_only,
                                      .skip_bad = skip_bad,
                                      .categories = categories,
                                      .n_categories = n_categories,
                                      .rename_from = rename_from,
                                      .rename_to = rename_to,
                                      .n_rename = n_rename,
                                  },
                                  argv + optind, argc - optind);
    free(categories);
    free(rename_from);
    free(rename_to);
    return status;
}
