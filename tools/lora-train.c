/* lora-train: trains a LoRA adapter on a packed file; writes a PEFT
 * adapter directory and prints metrics as JSON Lines.
 *
 * Argument parsing and orchestration only: the configuration table, the
 * loop and checkpoints live in lib/train.c, the model math in
 * lib/llama_cpu.c. Configuration comes from defaults (Hugging Face's), then
 * the YAML file (-c), then the command line (-m, -o, -s key=value) in that
 * order.
 */
#define _POSIX_C_SOURCE 200809L
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapter.h"
#include "config.h"
#include "dist.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "msg.h"
#include "packfile.h"
#include "strbuf.h"
#include "train.h"
#ifdef QLORA_CUDA /* ---- GPU path (kernels/), built when nvcc is present ---- */
#include "../kernels/kernels.h"
#include "../kernels/train_gpu.h"
#include "../kernels/dist_gpu.h"
#endif

static const char usage_text[] =
    "usage: lora-train [-hqVv] [-c config] [-e file] [-m model] [-o dir] "
    "[-s key=value] [--device cpu|cuda] [--dump-batches file] [--gpus n] [--init-only] "
    "[--print-config] [--progress] [--resume[=checkpoint]] [file]\n";

static void usage(FILE *f) { fputs(usage_text, f); }

static void help(void)
{
    usage(stdout);
    fputs("\n"
          "Trains a LoRA adapter of a Llama model on a packed file (from pack)\n"
          "and writes it as a PEFT adapter directory. Metrics go to stdout as\n"
          "JSON Lines.\n"
          "\n"
          "  -c, --config file        YAML configuration (Hugging Face key names)\n"
          "  -e, --eval file          packed file to compute eval_loss on\n"
          "  -h, --help               this help\n"
          "  -m, --model dir          base model directory (model_name_or_path)\n"
          "  -o, --output-dir dir     where the adapter and checkpoints go\n"
          "  -q, --quiet              no warnings\n"
          "  -s, --set key=value      set a configuration key (repeatable)\n"
          "  -V, --version            print the version\n"
          "  -v, --verbose            more messages on stderr\n"
          "      --device dev         cpu (default) or cuda\n"
          "      --dump-batches file  write every micro-batch as JSON Lines\n"
          "      --gpus n             data parallel: one process per GPU, n GPUs\n"
          "                           (or RANK, WORLD_SIZE, ... from a launcher)\n"
          "      --init-only          write the initial adapter and stop\n"
          "      --print-config       print the resolved configuration as JSON\n"
          "      --progress           a progress bar on stderr even when it is\n"
          "                           not a terminal\n"
          "      --resume[=dir]       continue from a checkpoint (default: the\n"
          "                           newest in the output directory)\n"
          "\n"
          "Configuration keys (see lora-train(1)):\n",
          stdout);
    for (size_t i = 0; i < train_nfields; i++)
        printf("  %-28s %s\n", train_fields[i].key, train_fields[i].help);
}

#define bad_usage(...) msg_usage_die(usage, __VA_ARGS__)

typedef struct ui {
    io_writer *metrics;
    io_writer *batches;
    int progress;
    strbuf sb;
} ui;

static void progress_bar(const train_event *ev)
{
    int width = 30, done = (int)(width * ev->step / (ev->total_steps ? ev->total_steps : 1));
    fprintf(stderr, "\r%s: [", msg_prog());
    for (int i = 0; i < width; i++)
        fputc(i < done ? '#' : '.', stderr);
    fprintf(stderr, "] %lld/%lld loss %.4f", (long long)ev->step,
            (long long)ev->total_steps, ev->loss);
    if (ev->step == ev->total_steps)
        fputc('\n', stderr);
    fflush(stderr);
}

static void on_event(const train_event *ev, void *ctx)
{
    ui *u = ctx;
    sb_reset(&u->sb);
    switch (ev->kind) {
    case TRAIN_EV_STEP:
        if (u->progress)
            progress_bar(ev);
        break;
    case TRAIN_EV_LOG:
    case TRAIN_EV_EVAL:
        if (!u->metrics)
            break;
        train_event_json(ev, &u->sb);
        sb_putc(&u->sb, '\n');
        io_write(u->metrics, u->sb.buf, u->sb.len);
        break;
    case TRAIN_EV_SAVE:
        msg_info("saved '%s'", ev->path);
        break;
    case TRAIN_EV_BATCH:
        if (!u->batches)
            break;
        sb_printf(&u->sb, "{\"step\":%lld,\"micro\":%lld,\"rows\":[",
                  (long long)ev->step, (long long)ev->micro);
        for (size_t i = 0; i < ev->n_rows; i++)
            sb_printf(&u->sb, i ? ",%llu" : "%llu", (unsigned long long)ev->rows[i]);
        sb_puts(&u->sb, "],\"learning_rate\":");
        json_append_number(&u->sb, ev->learning_rate);
        sb_printf(&u->sb, ",\"weight_sum\":");
        json_append_number(&u->sb, ev->batch->weight_sum);
        sb_puts(&u->sb, ",\"batch\":");
        train_batch_json(ev->batch, &u->sb);
        sb_puts(&u->sb, "}\n");
        io_write(u->batches, u->sb.buf, u->sb.len);
        break;
    }
}

/* OpenMP threads that spin at barriers waste the machine when it has more
 * runnable threads than cores (measured: 4x slower on a loaded 2-core
 * box). libgomp reads OMP_WAIT_POLICY once, before main, so the default
 * "passive" is set by running the program again with it. */
static void passive_omp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
    /* no /proc: carry on as we are */
}

#ifdef QLORA_CUDA /* ---- data parallel (lib/dist.h, kernels/dist_gpu.h) ---- */
/* --gpus n: checks what each rank would find missing, once, then starts
 * them and waits. Returns the exit status. */
static int launch(int gpus, const dist_env *de, const train_config *cfg,
                  const char *train_path, char **argv)
{
    if (de->world > 1)
        return msg_error("--gpus %d, and WORLD_SIZE=%d from a launcher: use one or the "
                         "other", gpus, de->world), 2;
    if (strcmp(cfg->device, "cpu") == 0)
        return msg_error("--gpus %d: data-parallel training runs on CUDA devices, "
                         "not device 'cpu'", gpus), 2;
    if (!train_path || strcmp(train_path, "-") == 0)
        return msg_error("--gpus %d: every rank reads the packed file: name it "
                         "(not stdin)", gpus), 2;
    dist_nccl nccl;
    if (dist_nccl_load(&nccl) != 0)
        return 2;
    dist_nccl_unload(&nccl);
    /* no context is made here: the ranks are new processes (exec) */
    int have = kn_device_count();
    if (have < gpus)
        return msg_error("--gpus %d: %d CUDA device%s visible", gpus, have,
                         have == 1 ? "" : "s"), 2;
    msg_info("starting %d ranks", gpus);
    return dist_launch(gpus, argv);
}

/* One rank of a job: its GPU, NCCL, the unique id from rank 0. */
static int join(dist_env *de, const train_config *cfg, const char *train_path,
                dist_nccl *nccl, unsigned char id[DIST_ID_BYTES])
{
    if (strcmp(cfg->device, "cpu") == 0)
        return msg_error("WORLD_SIZE=%d: data-parallel training runs on CUDA devices, "
                         "not device 'cpu'", de->world);
    if (!train_path || strcmp(train_path, "-") == 0)
        return msg_error("WORLD_SIZE=%d: every rank reads the packed file: name it "
                         "(not stdin)", de->world);
    if (dist_select_device(de->local_rank) != 0 || dist_nccl_load(nccl) != 0)
        return -1;
    msg_info("NCCL %d from '%s'", nccl->version, nccl->path);
    if (de->rank == 0) {
        dist_nccl_id nid;
        int r = nccl->get_unique_id(&nid);
        if (r != DIST_NCCL_SUCCESS)
            return dist_nccl_error(nccl, "ncclGetUniqueId", r);
        memcpy(id, nid.internal, DIST_ID_BYTES);
    }
    return dist_share_id(de, id);
}
#endif

int main(int argc, char **argv)
{
    passive_omp(argv);
    const char *config = NULL, *eval_path = NULL, *dump_path = NULL;
    const char *resume = NULL;
    int print_config = 0, init_only = 0, progress = isatty(2), do_resume = 0;
    char **sets = xcalloc((size_t)argc + 1, sizeof *sets);
    size_t nsets = 0;

    msg_init(argv[0]);
    enum { OPT_DEVICE = 256, OPT_DUMP, OPT_GPUS, OPT_INIT, OPT_PRINT, OPT_PROGRESS,
           OPT_RESUME };
    int gpus = 1;
    static const struct option longs[] = {
        {"config", required_argument, NULL, 'c'},
        {"eval", required_argument, NULL, 'e'},
        {"help", no_argument, NULL, 'h'},
        {"model", required_argument, NULL, 'm'},
        {"output-dir", required_argument, NULL, 'o'},
        {"quiet", no_argument, NULL, 'q'},
        {"set", required_argument, NULL, 's'},
        {"version", no_argument, NULL, 'V'},
        {"verbose", no_argument, NULL, 'v'},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"dump-batches", required_argument, NULL, OPT_DUMP},
        {"gpus", required_argument, NULL, OPT_GPUS},
        {"init-only", no_argument, NULL, OPT_INIT},
        {"print-config", no_argument, NULL, OPT_PRINT},
        {"progress", no_argument, NULL, OPT_PROGRESS},
        {"resume", optional_argument, NULL, OPT_RESUME},
        {NULL, 0, NULL, 0},
    };
    /* -m, -o and --device are --set in disguise, applied in order */
    int c;
    while ((c = getopt_long(argc, argv, "c:e:hm:o:qs:Vv", longs, NULL)) != -1) {
        strbuf kv = STRBUF_INIT;
        switch (c) {
        case 'c': config = optarg; break;
        case 'e': eval_path = optarg; break;
        case 'h': help(); free(sets); return 0;
        case 'm': sb_printf(&kv, "model_name_or_path=%s", optarg); break;
        case 'o': sb_printf(&kv, "output_dir=%s", optarg); break;
        case 'q': msg_verbosity = 0; break;
        case 's':
            if (!strchr(optarg, '='))
                bad_usage("--set needs key=value, got '%s'", optarg);
            sets[nsets++] = xstrdup(optarg);
            break;
        case 'V':
            printf("lora-train %s\n", QLORA_VERSION);
            free(sets);
            return 0;
        case 'v': msg_verbosity++; break;
        case OPT_DEVICE: sb_printf(&kv, "device=%s", optarg); break;
        case OPT_DUMP: dump_path = optarg; break;
        case OPT_GPUS: {
            char *end;
            long n = strtol(optarg, &end, 10);
            if (end == optarg || *end || n < 1 || n > 4096)
                bad_usage("--gpus needs a number of GPUs, got '%s'", optarg);
            gpus = (int)n;
            break;
        }
        case OPT_INIT: init_only = 1; break;
        case OPT_PRINT: print_config = 1; break;
        case OPT_PROGRESS: progress = 1; break;
        case OPT_RESUME: do_resume = 1; resume = optarg; break;
        default: usage(stderr); exit(2);
        }
        if (kv.len)
            sets[nsets++] = kv.buf;
    }
    if (argc - optind > 1) {
        for (size_t i = 0; i < nsets; i++) /* LeakSanitizer: exit 2, not 1 */
            free(sets[i]);
        free(sets);
        bad_usage("too many operands, starting with '%s'", argv[optind + 1]);
    }
    const char *train_path = optind < argc ? argv[optind] : NULL;

    train_config cfg;
    int rc = cfg_defaults(train_fields, train_nfields, &cfg);
    if (rc == 0 && config)
        rc = cfg_load_yaml(config, train_fields, train_nfields, &cfg);
    for (size_t i = 0; i < nsets; i++) {
        char *eq = strchr(sets[i], '=');
        *eq = 0;
        if (rc == 0)
            rc = cfg_set(train_fields, train_nfields, &cfg, sets[i], eq + 1,
                         "command line");
        free(sets[i]);
    }
    free(sets);
    if (rc == 0)
        rc = train_config_check(&cfg);
    if (rc != 0) {
        cfg_free(train_fields, train_nfields, &cfg);
        return 2;
    }
    if (print_config) {
        strbuf sb = STRBUF_INIT;
        cfg_to_json(train_fields, train_nfields, &cfg, &sb);
        sb_putc(&sb, '\n');
        cfg_free(train_fields, train_nfields, &cfg);
        io_writer *w = io_writer_open(NULL, IO_TEXT);
        io_write(w, sb.buf, sb.len);
        sb_free(&sb);
        return io_writer_commit(w) < 0 ? 2 : 0;
    }
#ifndef QLORA_CUDA
    if (strcmp(cfg.device, "cuda") == 0)
        msg_die("device 'cuda': not built with CUDA");
#endif
    if (!cfg.model_name_or_path)
        bad_usage("no model: give -m dir or model_name_or_path%s", "");
    if (!init_only && !train_path && isatty(0))
        bad_usage("no packed file (and stdin is a terminal)%s", "");

    /* data parallel (lib/dist.h): start the ranks, or be one */
    dist_env de;
    if (dist_env_read(&de) != 0) {
        cfg_free(train_fields, train_nfields, &cfg);
        return 2;
    }
    if (init_only) /* one process writes the initial adapter */
        de.world = 1, de.rank = 0, gpus = 1;
    if (de.world > 1 && de.rank > 0 && !init_only) {
        static char name[64];
        snprintf(name, sizeof name, "lora-train[rank %d]", de.rank);
        msg_init(name);
        if (msg_verbosity > 0) /* rank 0 warns for everyone */
            msg_verbosity--;
    }
#ifdef QLORA_CUDA /* ---- GPU path: auto takes the GPU when one is present ---- */
    if (gpus > 1 && !de.launched) {
        rc = launch(gpus, &de, &cfg, train_path, argv);
        cfg_free(train_fields, train_nfields, &cfg);
        return rc;
    }
    dist_nccl nccl;
    unsigned char nccl_id[DIST_ID_BYTES];
    memset(&nccl, 0, sizeof nccl);
    memset(nccl_id, 0, sizeof nccl_id);
    if (de.world > 1 && join(&de, &cfg, train_path, &nccl, nccl_id) != 0) {
        dist_nccl_unload(&nccl);
        cfg_free(train_fields, train_nfields, &cfg);
        return 2;
    }
    int use_cuda = de.world > 1 || strcmp(cfg.device, "cuda") == 0 ||
                   (strcmp(cfg.device, "auto") == 0 && kn_device_count() > 0);
#else
    if (gpus > 1 || de.world > 1)
        msg_die("data-parallel training (--gpus, WORLD_SIZE): not built with CUDA");
#endif

    /* from here on, every exit goes through done: */
    llama_model *model = NULL;
    pack_data train = {0}, eval = {0};
    int have_train = 0, have_eval = 0;
    char *ckpt = NULL;
    ui u = {0};
    rc = 2;
    if (llama_load(cfg.model_name_or_path, &model) != 0)
        goto done;
    msg_info("model '%s': %d layers, dim %d, %s weights %.1f MiB",
             cfg.model_name_or_path, model->cfg.n_layers, model->cfg.dim,
             model->cfg.quantized ? "NF4" : "f32",
             (double)llama_weight_bytes(model) / 1048576.0);
    if (init_only) {
        lora_config lc;
        lora_adapter *a;
        if (train_lora_config(&cfg, &lc) != 0 || lora_new(&model->cfg, &lc, &a) != 0)
            goto done;
        lora_init(a, (uint64_t)cfg.seed);
        rc = adapter_write(cfg.output_dir, a, cfg.model_name_or_path) ? 2 : 0;
        lora_free(a);
        goto done;
    }
    if (pack_read(train_path, &train) != 0)
        goto done;
    have_train = 1;
    if (eval_path) {
        if (pack_read(eval_path, &eval) != 0)
            goto done;
        have_eval = 1;
    }
    if (do_resume) {
        ckpt = resume ? xstrdup(resume) : train_latest_checkpoint(cfg.output_dir);
        if (!ckpt) {
            msg_error("no checkpoint to resume from in '%s'", cfg.output_dir);
            goto done;
        }
        msg_info("resuming from '%s'", ckpt);
    }
    u.progress = progress && msg_verbosity > 0;
    /* data parallel, rank 0 alone writes */
    if (de.rank == 0 && dump_path && !(u.batches = io_writer_open(dump_path, IO_TEXT)))
        goto done;
    if (de.rank == 0)
        u.metrics = io_writer_open(NULL, IO_TEXT);
    train_inputs in = {
        .cfg = &cfg,
        .model = model,
        .train = &train,
        .eval = eval_path ? &eval : NULL,
        .resume = ckpt,
        .cb = on_event,
        .cb_ctx = &u,
        .want_batches = dump_path != NULL,
    };
    msg_info("%llu rows of %u tokens; activations %.1f MiB per row",
             (unsigned long long)train.h.n_rows, train.h.seq_len,
             (double)llama_train_activation_bytes(model, NULL, train.h.seq_len,
                                                  cfg.gradient_checkpointing) /
                 1048576.0);
#ifdef QLORA_CUDA /* ---- GPU path: steps and evaluations on the device ---- */
    gpu_trainer *gpu = NULL;
    dist_gpu *dg = NULL;
    train_backend gpu_be;
    if (use_cuda) {
        lora_config lc;
        int64_t cap = cfg.per_device_train_batch_size * (int64_t)train.h.seq_len;
        if (eval_path && cfg.per_device_eval_batch_size * (int64_t)eval.h.seq_len > cap)
            cap = cfg.per_device_eval_batch_size * (int64_t)eval.h.seq_len;
        /* paged_adamw_32bit: the moments may live off the device */
        int flags = (cfg.gradient_checkpointing ? GPU_TRAINER_CHECKPOINT : 0) |
                    (cfg.offload_activations ? GPU_TRAINER_OFFLOAD : 0) |
                    (cfg.optim && !strcmp(cfg.optim, "paged_adamw_32bit")
                         ? GPU_TRAINER_PAGED_OPTIM
                         : 0);
        if (train_lora_config(&cfg, &lc) != 0 ||
            !(gpu = gpu_trainer_new(model, &lc, cap, flags)) ||
            (de.world > 1 &&
             !(dg = dist_gpu_new(&nccl, &de, nccl_id, gpu, &model->cfg, &lc)))) {
            gpu_trainer_free(gpu);
            if (u.metrics)
                io_writer_abort(u.metrics);
            u.metrics = NULL;
            goto done;
        }
        gpu_trainer_backend(gpu, &gpu_be);
        if (dg) {
            dist_gpu_backend(dg, &gpu_be);
            in.world = de.world;
            in.rank = de.rank;
            msg_info("rank %d of %d, CUDA device '%s' (CUDA_VISIBLE_DEVICES=%s), %d "
                     "gradient buckets", de.rank, de.world, kn_device_name(),
                     getenv("CUDA_VISIBLE_DEVICES"), dist_gpu_buckets(dg));
        }
        in.backend = &gpu_be;
        msg_info("training on CUDA device '%s'", kn_device_name());
    }
#endif
    rc = train_run(&in);
#ifdef QLORA_CUDA
    dist_gpu_free(dg, rc != 0);
    gpu_trainer_free(gpu);
#endif
    if (u.batches) {
        if (rc == 0)
            rc = io_writer_commit(u.batches);
        else
            io_writer_abort(u.batches);
        u.batches = NULL;
    }
    if (u.metrics && io_writer_commit(u.metrics) != 0)
        rc = -1;
    u.metrics = NULL;
    rc = rc ? 2 : 0;
done:
    if (u.batches)
        io_writer_abort(u.batches);
    sb_free(&u.sb);
    free(ckpt);
    if (have_train)
        pack_data_free(&train);
    if (have_eval)
        pack_data_free(&eval);
    llama_free(model);
#ifdef QLORA_CUDA
    dist_nccl_unload(&nccl);
#endif
    cfg_free(train_fields, train_nfields, &cfg);
    return rc;
}
