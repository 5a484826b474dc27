/* merge.c: lora-merge's logic, folding an adapter into a checkpoint.
 *
 * Built as a stream: the output is declared tensor by tensor up front
 * (st_writer needs every header before the first byte), then each tensor
 * flows through a chunk of rows: source bytes (pread from the base's files,
 * the next chunk read ahead by the kernel) -> fp32 (converted, or
 * NF4-dequantized) -> + scale * B A for those rows -> rounded to the output
 * dtype -> written. Tensors that need no change are copied as bytes. Memory
 * stays near the chunk buffers whatever the model's size, and reading,
 * merging and the kernel's write-back overlap, so on a large model the
 * merge runs at the speed of the disk.
 *
 * Everything that can be wrong with the inputs is checked before the
 * output directory exists. --requantize merges into a temporary plain
 * checkpoint and hands it to nf4_quantize_checkpoint, so its NF4 output is
 * exactly what nf4-quant writes for the merged model.
 */
#define _DEFAULT_SOURCE
#define _FILE_OFFSET_BITS 64
#include "merge.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapter.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"
#include "nf4.h"
#include "strbuf.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements per chunk: 4 Mi floats (16 MiB of fp32), read through a buffer
 * of RAW_BYTES (8 bytes an element at most, F64). */
#define CHUNK_ELEMS (1 << 22)
#define RAW_BYTES ((uint64_t)CHUNK_ELEMS * 8)

/* nf4-quant's defaults, used for --from-nf4 on a float base and for
 * --requantize unless the base says otherwise. */
#define NF4_DEFAULT_BLOCKSIZE 64

/* Files carried from the base (or, when the base lacks them, from the
 * adapter directory) into the output. */
static const char *const carried_files[] = {
    "tokenizer.model",         "tokenizer.json",     "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json",  "generation_config.json",
    "chat_template.jinja",     "chat_template.json",
};

static int threads_for(int requested)
{
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

void merge_opts_init(merge_opts *o)
{
    memset(o, 0, sizeof *o);
    o->dtype = ST_BF16;
    o->shard_bytes = MERGE_DEFAULT_SHARD_BYTES;
}

int merge_parse_dtype(const char *s, st_dtype *out)
{
    static const struct {
        const char *name;
        st_dtype t;
    } names[] = {
        {"bf16", ST_BF16}, {"bfloat16", ST_BF16}, {"f16", ST_F16},
        {"fp16", ST_F16},  {"float16", ST_F16},   {"f32", ST_F32},
        {"fp32", ST_F32},  {"float32", ST_F32},
    };
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].t;
            return 0;
        }
    return -1;
}

int merge_parse_size(const char *s, uint64_t *out)
{
    static const struct {
        const char *unit;
        uint64_t mult;
    } units[] = {
        {"", 1},
        {"b", 1},
        {"kb", 1000ULL},
        {"mb", 1000000ULL},
        {"gb", 1000000000ULL},
        {"tb", 1000000000000ULL},
        {"kib", 1ULL << 10},
        {"mib", 1ULL << 20},
        {"gib", 1ULL << 30},
        {"tib", 1ULL << 40},
    };
    const char *p = s;
    if (!isdigit((unsigned char)*p))
        return -1;
    uint64_t v = 0;
    while (isdigit((unsigned char)*p)) {
        unsigned d = (unsigned)(*p++ - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    for (size_t i = 0; i < sizeof units / sizeof *units; i++)
        if (strcasecmp(p, units[i].unit) == 0) {
            if (v && units[i].mult > UINT64_MAX / v)
                return -1;
            *out = v * units[i].mult;
            return 0;
        }
    return -1;
}

/* ---- the arithmetic ------------------------------------------------- */

/* One element the plain way: the order every path must reproduce. */
static inline void delta_one(float *w, const float *A, const float *Bo,
                             int64_t in, int32_t r, float scale, int64_t c)
{
    float acc = 0;
    for (int32_t k = 0; k < r; k++)
        acc += Bo[k] * A[(int64_t)k * in + c];
    *w += scale * acc;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
/* AVX2 where the processor has it, chosen at load time; the result is the
 * same either way: C11 mode never contracts a * b + c into an FMA, so
 * every lane does the scalar code's multiply then add. */
#define MERGE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MERGE_CLONES
#endif

#if defined(__GNUC__)
typedef float merge_v8 __attribute__((vector_size(32)));
#define LD8(v, p) memcpy(&(v), (p), sizeof(merge_v8))
#define ST8(p, v) memcpy((p), &(v), sizeof(merge_v8))

/* Four rows by eight columns of sums stay in registers while k runs, so
 * each A vector loaded serves four rows. */
MERGE_CLONES
static void delta_block4(float *w, const float *A, const float *Bo, int64_t in,
                         int32_t r, float scale)
{
    int64_t c = 0;
    for (; c + 8 <= in; c += 8) {
        merge_v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, av, wv;
        const float *a = A + c;
        for (int32_t k = 0; k < r; k++, a += in) {
            LD8(av, a);
            s0 += Bo[k] * av;
            s1 += Bo[r + k] * av;
            s2 += Bo[2 * r + k] * av;
            s3 += Bo[3 * r + k] * av;
        }
        float *w0 = w + c;
        LD8(wv, w0);
        wv += scale * s0;
        ST8(w0, wv);
        LD8(wv, w0 + in);
        wv += scale * s1;
        ST8(w0 + in, wv);
        LD8(wv, w0 + 2 * in);
        wv += scale * s2;
        ST8(w0 + 2 * in, wv);
        LD8(wv, w0 + 3 * in);
        wv += scale * s3;
        ST8(w0 + 3 * in, wv);
    }
    for (int i = 0; i < 4; i++)
        for (int64_t cc = c; cc < in; cc++)
            delta_one(w + i * in + cc, A, Bo + i * r, in, r, scale, cc);
}
#else
static void delta_block4(float *w, const float *A, const float *Bo, int64_t in,
                         int32_t r, float scale)
{
    for (int i = 0; i < 4; i++)
        for (int64_t c = 0; c < in; c++)
            delta_one(w + i * in + c, A, Bo + i * r, in, r, scale, c);
}
#endif

void merge_add_delta(float *w, const float *A, const float *B, int64_t row0,
                     int64_t nrows, int64_t in, int32_t r, float scale,
                     int nthreads)
{
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads))
    for (int64_t o0 = 0; o0 < nrows; o0 += 4) {
        const float *Bo = B + (row0 + o0) * r;
        if (o0 + 4 <= nrows) {
            delta_block4(w + o0 * in, A, Bo, in, r, scale);
            continue;
        }
        for (int64_t o = o0; o < nrows; o++)
            for (int64_t c = 0; c < in; c++)
                delta_one(w + o * in + c, A, Bo + (o - o0) * r, in, r, scale,
                          c);
    }
}

/* ---- the plan ------------------------------------------------------- */

enum src_kind {
    SRC_FLOAT,   /* F32/F16/BF16/F64 tensor, converted */
    SRC_NF4,     /* NF4 weight of the base, dequantized */
    SRC_SIM_NF4, /* float weight quantized then dequantized (--from-nf4) */
    SRC_COPY,    /* any other dtype, bytes copied */
};

typedef struct item {
    const char *name;   /* points into the base's tensors */
    const st_tensor *t; /* the source tensor (the packed codes for NF4) */
    enum src_kind kind;
    nf4_weight *q; /* SRC_NF4: loaded at planning time */
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    st_dtype dtype; /* of the output */
    int32_t layer;  /* LoRA delta of (layer, lin), or -1 */
    int lin;
} item;

typedef struct plan {
    item *v;
    size_t n;
    st_dtype out_dtype;
} plan;

static void plan_free(plan *p)
{
    for (size_t i = 0; i < p->n; i++)
        if (p->v[i].q) {
            nf4_weight_free(p->v[i].q);
            free(p->v[i].q);
        }
    free(p->v);
    p->v = NULL;
    p->n = 0;
}

static int is_float(st_dtype t)
{
    return t == ST_F32 || t == ST_F16 || t == ST_BF16 || t == ST_F64;
}

static int ends_with(const char *s, const char *suffix, size_t *stem)
{
    size_t a = strlen(s), b = strlen(suffix);
    if (a < b || strcmp(s + a - b, suffix) != 0)
        return 0;
    *stem = a - b;
    return 1;
}

/* 1 when name is one of the auxiliary tensors of an NF4 weight of m. */
static int is_nf4_aux(const st_model *m, const char *name)
{
    static const char *const sfx[] = {
        NF4_SUFFIX_ABSMAX,        NF4_SUFFIX_QUANT_MAP,
        NF4_SUFFIX_NESTED_ABSMAX, NF4_SUFFIX_NESTED_QUANT_MAP,
        NF4_SUFFIX_QUANT_STATE,
    };
    for (size_t i = 0; i < sizeof sfx / sizeof *sfx; i++) {
        size_t stem;
        if (!ends_with(name, sfx[i], &stem))
            continue;
        char *w = xstrndup(name, stem);
        int yes = nf4_weight_present(m, w);
        free(w);
        if (yes)
            return 1;
    }
    return 0;
}

/* "model.layers.N.<parent>.<linear>.weight" -> layer and linear. */
static int parse_linear_name(const char *s, int32_t *layer, int *lin)
{
    const char *pre = "model.layers.";
    size_t pl = strlen(pre);
    if (strncmp(s, pre, pl) != 0)
        return 0;
    s += pl;
    char *end;
    long i = strtol(s, &end, 10);
    if (end == s || *end != '.' || i < 0 || i > INT32_MAX)
        return 0;
    for (int l = 0; l < LLAMA_NLINEAR; l++) {
        char want[64];
        snprintf(want, sizeof want, ".%s.%s.weight",
                 llama_linear_parent((llama_linear)l),
                 llama_linear_name((llama_linear)l));
        if (strcmp(end, want) == 0) {
            *layer = (int32_t)i;
            *lin = l;
            return 1;
        }
    }
    return 0;
}

static int cmp_item(const void *x, const void *y)
{
    const item *a = x, *b = y;
    return st_serialize_cmp(a->dtype, a->name, b->dtype, b->name);
}

static void shape_str(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t k = 0;
    k += (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && k < size; d++)
        k += (size_t)snprintf(buf + k, size - k, "%s%lld", d ? ", " : "",
                              (long long)shape[d]);
    if (k < size)
        snprintf(buf + k, size - k, "]");
}

/* Lists the output tensors and checks every targeted weight. */
static int plan_build(const st_model *m, const llama_config *mc,
                      const lora_adapter *a, int from_nf4, st_dtype out_dtype,
                      plan *p)
{
    p->v = xcalloc(m->n ? m->n : 1, sizeof *p->v);
    p->n = 0;
    p->out_dtype = out_dtype;
    for (size_t i = 0; i < m->n; i++) {
        const st_tensor *t = m->tensors[i];
        size_t stem;
        if (ends_with(t->name, "rotary_emb.inv_freq", &stem))
            continue; /* a buffer transformers recomputes */
        if (mc->quantized && is_nf4_aux(m, t->name))
            continue;
        item *it = &p->v[p->n];
        memset(it, 0, sizeof *it);
        it->name = t->name;
        it->t = t;
        it->layer = -1;
        if (mc->quantized && nf4_weight_present(m, t->name)) {
            it->kind = SRC_NF4;
            it->q = xcalloc(1, sizeof *it->q);
            if (nf4_weight_load(m, t->name, it->q) != 0) {
                free(it->q);
                it->q = NULL;
                return -1;
            }
            p->n++;
            it->ndim = it->q->ndim;
            memcpy(it->shape, it->q->shape, sizeof it->shape);
            it->numel = it->q->numel;
        } else {
            p->n++;
            it->ndim = t->ndim;
            memcpy(it->shape, t->shape, sizeof it->shape);
            it->numel = t->numel;
            if (!is_float(t->dtype))
                it->kind = SRC_COPY;
            else if (from_nf4 && !mc->quantized &&
                     nf4_is_block_linear(t->name, t->ndim))
                it->kind = SRC_SIM_NF4;
            else
                it->kind = SRC_FLOAT;
        }
        it->dtype = it->kind == SRC_COPY ? t->dtype : out_dtype;
        int32_t layer;
        int lin;
        if (parse_linear_name(it->name, &layer, &lin) && layer < a->n_layers &&
            lora_slot_of(a, layer, (llama_linear)lin)->a >= 0) {
            it->layer = layer;
            it->lin = lin;
        }
    }
    /* every adapted weight present, of the adapter's shape, in a float
     * or NF4 form */
    for (int32_t layer = 0; layer < a->n_layers; layer++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            const lora_slot *s = lora_slot_of(a, layer, (llama_linear)l);
            if (s->a < 0)
                continue;
            const item *it = NULL;
            for (size_t k = 0; k < p->n && !it; k++)
                if (p->v[k].layer == layer && p->v[k].lin == l)
                    it = &p->v[k];
            char nm[128];
            snprintf(nm, sizeof nm, "model.layers.%d.%s.%s.weight", layer,
                     llama_linear_parent((llama_linear)l),
                     llama_linear_name((llama_linear)l));
            if (!it)
                return msg_error("%s: tensor '%s' the adapter targets is "
                                 "missing",
                                 m->dir, nm);
            if (it->kind == SRC_COPY)
                return msg_error("%s: tensor '%s' has dtype %s, not a float "
                                 "type",
                                 m->dir, nm, st_dtype_name(it->t->dtype));
            if (it->ndim != 2 || it->shape[0] != s->out ||
                it->shape[1] != s->in) {
                char have[96];
                shape_str(have, sizeof have, it->ndim, it->shape);
                return msg_error("%s: tensor '%s' is %s but the adapter's "
                                 "B A is [%lld, %lld]",
                                 m->dir, nm, have, (long long)s->out,
                                 (long long)s->in);
            }
        }
    qsort(p->v, p->n, sizeof *p->v, cmp_item);
    return 0;
}

/* ---- streaming ------------------------------------------------------ */

/* Rounds x[0..n) in place as the dtype would store them (NF4 weights are
 * dequantized in fp32 then rounded to their own dtype, as bitsandbytes
 * does). */
static void round_to(float *x, int64_t n, st_dtype t, int nthreads)
{
    if (t == ST_BF16) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t i = 0; i < n; i++)
            x[i] = st_bf16_to_f32(st_f32_to_bf16(x[i]));
    } else if (t == ST_F16) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t i = 0; i < n; i++)
            x[i] = st_f16_to_f32(st_f32_to_f16(x[i]));
    }
}

static void convert_out(const float *x, int64_t n, st_dtype t, void *out,
                        int nthreads)
{
    if (t == ST_F32) {
        memcpy(out, x, (size_t)n * sizeof(float));
    } else if (t == ST_BF16) {
        uint16_t *o = out;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t i = 0; i < n; i++)
            o[i] = st_f32_to_bf16(x[i]);
    } else {
        uint16_t *o = out;
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t i = 0; i < n; i++)
            o[i] = st_f32_to_f16(x[i]);
    }
}

/* Source elements [e0, e0 + n) of a float tensor into dst, threads
 * splitting the range. */
static int load_float(const st_tensor *t, int64_t e0, int64_t n, float *dst,
                      int nthreads)
{
    int bad = 0;
    int64_t piece = 1 << 16;
    int64_t np = (n + piece - 1) / piece;
#pragma omp parallel for schedule(static) num_threads(nthreads)                \
    reduction(|                                                                \
              : bad)
    for (int64_t k = 0; k < np; k++) {
        int64_t s = k * piece, len = n - s < piece ? n - s : piece;
        bad |= st_to_f32(t, dst + s, e0 + s, len) != 0;
    }
    return bad ? -1 : 0;
}

static int dequant(const nf4_weight *q, int64_t e0, int64_t n, float *dst,
                   int nthreads)
{
    int bad = 0;
    int64_t piece = 1 << 16;
    int64_t np = (n + piece - 1) / piece;
#pragma omp parallel for schedule(static) num_threads(nthreads)                \
    reduction(|                                                                \
              : bad)
    for (int64_t k = 0; k < np; k++) {
        int64_t s = k * piece, len = n - s < piece ? n - s : piece;
        bad |= nf4_dequantize(q, e0 + s, len, dst + s) != 0;
    }
    if (bad)
        return msg_error("NF4 dequantization out of range");
    round_to(dst, n, q->dtype, nthreads);
    return 0;
}

/* Where float tensors' bytes come from: the base's files through pread
 * into one buffer, with the kernel reading the next chunk ahead
 * (POSIX_FADV_WILLNEED). Copying through read costs less than faulting
 * the mapping in page by page, and leaves nothing resident. */
typedef struct src_files {
    const st_model *m;
    int *fd; /* per file of m, -1 until opened */
    size_t nfd;
} src_files;

/* The descriptor and file offset of byte off of t. */
static int src_locate(src_files *s, const st_tensor *t, uint64_t off, int *fd,
                      off_t *pos)
{
    for (size_t j = 0; j < s->m->nfiles; j++) {
        const st_file *f = s->m->files[j];
        const char *b = f->map;
        if ((const char *)t->data < b ||
            (const char *)t->data >= b + f->map_len)
            continue;
        if (s->fd[j] < 0 && (s->fd[j] = open(f->path, O_RDONLY)) < 0)
            return msg_error("cannot open '%s': %s", f->path, strerror(errno));
        *fd = s->fd[j];
        *pos = (off_t)((const char *)t->data - b) + (off_t)off;
        return 0;
    }
    return msg_error("tensor '%s' is in no file of '%s'", t->name, s->m->dir);
}

static int src_read(src_files *s, const st_tensor *t, uint64_t off, uint64_t n,
                    void *dst)
{
    int fd;
    off_t pos;
    if (src_locate(s, t, off, &fd, &pos) != 0)
        return -1;
    char *p = dst;
    while (n > 0) {
        ssize_t k = pread(fd, p, n > (1u << 30) ? (1u << 30) : (size_t)n, pos);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return msg_error("cannot read tensor '%s' of '%s': %s", t->name,
                             s->m->dir, k < 0 ? strerror(errno) : "short file");
        p += k;
        pos += k;
        n -= (uint64_t)k;
    }
    return 0;
}

static void src_ahead(src_files *s, const st_tensor *t, uint64_t off,
                      uint64_t n)
{
    int fd;
    off_t pos;
    if (n && src_locate(s, t, off, &fd, &pos) == 0)
        posix_fadvise(fd, pos, (off_t)n, POSIX_FADV_WILLNEED);
}

/* Streams one tensor into the writer. raw holds RAW_BYTES (or one row). */
static int write_item(st_writer *w, src_files *sf, const item *it,
                      const lora_adapter *a, float *buf, void *obuf, void *raw,
                      int nthreads, uint64_t *bytes_in)
{
    const st_tensor *t = it->t;
    if (it->kind == SRC_COPY) {
        *bytes_in += t->nbytes;
        uint64_t step = RAW_BYTES;
        for (uint64_t off = 0; off < t->nbytes; off += step) {
            uint64_t k = t->nbytes - off < step ? t->nbytes - off : step;
            if (src_read(sf, t, off, k, raw) != 0 ||
                st_writer_write(w, raw, k) != 0)
                return -1;
        }
        return 0;
    }
    int64_t rows = it->ndim >= 1 ? it->shape[0] : 1;
    int64_t cols = rows ? it->numel / rows : 0;
    if (rows == 0 || cols == 0)
        return 0;
    int64_t chunk = cols >= CHUNK_ELEMS ? 1 : CHUNK_ELEMS / cols;
    const float *A = NULL, *B = NULL;
    if (it->layer >= 0) {
        A = lora_A(a, it->layer, (llama_linear)it->lin);
        B = lora_B(a, it->layer, (llama_linear)it->lin);
    }
    nf4_weight sim;
    const nf4_weight *q = it->q;
    if (it->kind == SRC_SIM_NF4) {
        /* the whole weight, as nf4-quant quantizes it */
        if (nf4_quantize(t->data, t->dtype, t->ndim, t->shape,
                         NF4_DEFAULT_BLOCKSIZE, 1, nthreads, &sim) != 0)
            return -1;
        q = &sim;
        st_tensor_release(t);
    }
    size_t esz = st_dtype_size(t->dtype);
    size_t osz = st_dtype_size(it->dtype);
    int direct = it->kind == SRC_FLOAT && !A && t->dtype == it->dtype;
    int rc = 0;
    *bytes_in +=
        it->kind == SRC_NF4 ? (uint64_t)(it->numel + 1) / 2 : t->nbytes;
    for (int64_t r0 = 0; r0 < rows && rc == 0; r0 += chunk) {
        int64_t nr = rows - r0 < chunk ? rows - r0 : chunk;
        int64_t e0 = r0 * cols, n = nr * cols;
        if (it->kind == SRC_FLOAT) {
            uint64_t off = (uint64_t)e0 * esz, len = (uint64_t)n * esz;
            int64_t nn = rows - r0 - nr < chunk ? rows - r0 - nr : chunk;
            src_ahead(sf, t, off + len, (uint64_t)(nn * cols) * esz);
            rc = src_read(sf, t, off, len, raw);
            /* a NaN or infinity in the base is refused (issue 11) */
            int64_t bad = rc == 0 ? st_find_nonfinite(raw, t->dtype, n) : -1;
            if (bad >= 0)
                rc = msg_error("base tensor '%s' holds a non-finite value (NaN "
                               "or infinity) at element %lld",
                               t->name, (long long)(e0 + bad));
            if (rc == 0 && direct) {
                rc = st_writer_write(w, raw, len);
                continue;
            }
            st_tensor view = *t; /* the chunk, as a tensor */
            view.data = raw;
            view.numel = n;
            if (rc == 0)
                rc = load_float(&view, 0, n, buf, nthreads);
        } else {
            rc = dequant(q, e0, n, buf, nthreads);
        }
        if (rc == 0 && A)
            merge_add_delta(buf, A, B, r0, nr, cols, a->cfg.r, a->scale,
                            nthreads);
        if (rc == 0) {
            convert_out(buf, n, it->dtype, obuf, nthreads);
            rc = st_writer_write(w, obuf, (uint64_t)n * osz);
        }
    }
    if (it->kind == SRC_SIM_NF4)
        nf4_weight_free(&sim);
    return rc;
}

/* ---- config.json ---------------------------------------------------- */

static void indent(strbuf *sb, int depth)
{
    for (int i = 0; i < depth; i++)
        sb_puts(sb, "  ");
}

/* As Python's json.dumps(indent=2), keys in their order: floats as repr()
 * writes them ("10000.0", "1e-05"). */
static void pretty(strbuf *sb, const json_value *v, int depth)
{
    switch (v->type) {
    case JSON_OBJECT:
        if (!v->u.object.n) {
            sb_puts(sb, "{}");
            break;
        }
        sb_puts(sb, "{\n");
        for (size_t i = 0; i < v->u.object.n; i++) {
            indent(sb, depth + 1);
            json_append_string(sb, v->u.object.keys[i],
                               v->u.object.key_lens[i]);
            sb_puts(sb, ": ");
            pretty(sb, v->u.object.values[i], depth + 1);
            sb_puts(sb, i + 1 < v->u.object.n ? ",\n" : "\n");
        }
        indent(sb, depth);
        sb_putc(sb, '}');
        break;
    case JSON_ARRAY:
        if (!v->u.array.n) {
            sb_puts(sb, "[]");
            break;
        }
        sb_puts(sb, "[\n");
        for (size_t i = 0; i < v->u.array.n; i++) {
            indent(sb, depth + 1);
            pretty(sb, v->u.array.items[i], depth + 1);
            sb_puts(sb, i + 1 < v->u.array.n ? ",\n" : "\n");
        }
        indent(sb, depth);
        sb_putc(sb, ']');
        break;
    case JSON_NUMBER:
        if (v->u.number.is_integer)
            sb_printf(sb, "%lld", (long long)v->u.number.integer);
        else
            nf4_append_py_float(sb, v->u.number.value);
        break;
    default:
        json_append_value(sb, v);
        break;
    }
}

static const char *torch_dtype_name(st_dtype t)
{
    return t == ST_F32 ? "float32" : t == ST_F16 ? "float16" : "bfloat16";
}

/* The base's config.json without quantization_config, its dtype keys
 * ("torch_dtype", and "dtype" that transformers 5 writes) set to the
 * output dtype; "torch_dtype" added when neither is there. */
static int write_config(const char *base_dir, const char *out_dir,
                        st_dtype dtype)
{
    char *path = io_path_join(base_dir, "config.json");
    json_value *root = NULL;
    int rc = json_parse_file(path, &root);
    free(path);
    if (rc != 0)
        return -1;
    const char *dn = torch_dtype_name(dtype);
    int has_dtype = json_get(root, "torch_dtype") || json_get(root, "dtype");
    strbuf sb = STRBUF_INIT;
    sb_puts(&sb, "{\n");
    size_t n = root->u.object.n, written = 0;
    for (size_t i = 0; i < n; i++) {
        const char *k = root->u.object.keys[i];
        if (strcmp(k, "quantization_config") == 0)
            continue;
        if (written++)
            sb_puts(&sb, ",\n");
        indent(&sb, 1);
        json_append_string(&sb, k, root->u.object.key_lens[i]);
        sb_puts(&sb, ": ");
        if (strcmp(k, "torch_dtype") == 0 || strcmp(k, "dtype") == 0)
            json_append_string(&sb, dn, strlen(dn));
        else
            pretty(&sb, root->u.object.values[i], 1);
    }
    if (!has_dtype) {
        sb_puts(&sb, written ? ",\n" : "");
        indent(&sb, 1);
        sb_printf(&sb, "\"torch_dtype\": \"%s\"", dn);
    }
    sb_puts(&sb, "\n}\n");
    json_free(root);
    path = io_path_join(out_dir, "config.json");
    io_writer *w = io_writer_open(path, IO_TEXT);
    free(path);
    if (!w) {
        sb_free(&sb);
        return -1;
    }
    io_write(w, sb.buf, sb.len);
    sb_free(&sb);
    return io_writer_commit(w);
}

static int copy_carried(const char *base_dir, const char *adapter_dir,
                        const char *out_dir)
{
    for (size_t i = 0; i < sizeof carried_files / sizeof *carried_files; i++) {
        const char *f = carried_files[i];
        char *from = io_path_join(base_dir, f);
        if (!io_exists(from)) {
            free(from);
            from = io_path_join(adapter_dir, f);
        }
        int rc = 0;
        if (io_exists(from)) {
            char *to = io_path_join(out_dir, f);
            rc = io_copy_file(from, to);
            free(to);
        }
        free(from);
        if (rc != 0)
            return -1;
    }
    return 0;
}

/* ---- the whole merge ------------------------------------------------ */

/* Reads what merge needs from adapter_config.json before adapter_read:
 * the base it names, and the refusals worth a clear message. */
static int adapter_precheck(const char *dir, char **base_model)
{
    *base_model = NULL;
    char *path = io_path_join(dir, "adapter_config.json");
    json_value *cfg = NULL;
    int rc = -1;
    if (!io_exists(path)) {
        msg_error("'%s' is not a PEFT adapter: no adapter_config.json", dir);
        goto out;
    }
    if (json_parse_file(path, &cfg) != 0)
        goto out;
    if (cfg->type != JSON_OBJECT) {
        msg_error("%s: expected a JSON object", path);
        goto out;
    }
    const char *pt = json_get_string(cfg, "peft_type", NULL);
    if (!pt || strcmp(pt, "LORA") != 0) {
        msg_error("%s: adapter type '%s' is not supported (LORA only)", path,
                  pt ? pt : "(none)");
        goto out;
    }
    const json_value *v = json_get(cfg, "use_dora");
    if (v && v->type == JSON_TRUE) {
        msg_error("%s: DoRA adapters (use_dora) are not supported", path);
        goto out;
    }
    v = json_get(cfg, "fan_in_fan_out");
    if (v && v->type == JSON_TRUE) {
        msg_error("%s: fan_in_fan_out adapters are not supported (Llama "
                  "linears are [out, in])",
                  path);
        goto out;
    }
    v = json_get(cfg, "lora_bias");
    if (v && v->type == JSON_TRUE) {
        msg_error("%s: lora_bias adapters are not supported", path);
        goto out;
    }
    const char *bm = json_get_string(cfg, "base_model_name_or_path", NULL);
    *base_model = bm ? xstrdup(bm) : NULL;
    rc = 0;
out:
    json_free(cfg);
    free(path);
    return rc;
}

/* The base directory: the one given, or the adapter's recorded one when it
 * is a local checkpoint. */
static char *resolve_base(const merge_opts *o, const char *recorded)
{
    if (o->base_dir)
        return xstrdup(o->base_dir);
    if (recorded && *recorded) {
        char *cfg = io_path_join(recorded, "config.json");
        int ok = io_exists(cfg);
        free(cfg);
        if (ok)
            return xstrdup(recorded);
        msg_error("no base checkpoint: the adapter names '%s', which is not "
                  "a local checkpoint directory",
                  recorded);
        return NULL;
    }
    msg_error("no base checkpoint: the adapter in '%s' names none",
              o->adapter_dir);
    return NULL;
}

/* The NF4 settings of --requantize: the base's, else nf4-quant's. */
static void requant_settings(const plan *p, const char *base_dir,
                             int *blocksize, int *nested, char *compute,
                             size_t compute_size)
{
    *blocksize = NF4_DEFAULT_BLOCKSIZE;
    *nested = 1;
    snprintf(compute, compute_size, "bfloat16");
    for (size_t i = 0; i < p->n; i++)
        if (p->v[i].q) {
            *blocksize = p->v[i].q->blocksize;
            *nested = p->v[i].q->nested;
            break;
        }
    char *path = io_path_join(base_dir, "config.json");
    json_value *root = NULL;
    char *text = NULL;
    size_t len;
    if (io_read_file(path, &text, &len) == 0 &&
        json_parse_quiet(text, len, path, 1, &root, NULL) == 0) {
        const char *cd = json_get_string(json_get(root, "quantization_config"),
                                         "bnb_4bit_compute_dtype", NULL);
        if (cd)
            snprintf(compute, compute_size, "%s", cd);
    }
    json_free(root);
    free(text);
    free(path);
}

/* An existing output is replaced only when it is an empty directory or a
 * checkpoint (it has a config.json): never a file or someone's home. */
static int replaceable(const char *dir)
{
    struct stat sb;
    if (lstat(dir, &sb) != 0)
        return 0;
    if (!S_ISDIR(sb.st_mode))
        return msg_error("output '%s' exists and is not a directory", dir);
    char *cfg = io_path_join(dir, "config.json");
    int ok = io_exists(cfg);
    free(cfg);
    if (!ok) {
        DIR *d = opendir(dir);
        struct dirent *e;
        ok = d != NULL;
        while (ok && (e = readdir(d)))
            ok = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
        if (d)
            closedir(d);
    }
    return ok ? 0
              : msg_error("output '%s' exists and is not a checkpoint "
                          "directory (no config.json); not replacing it",
                          dir);
}

static int same_dir(const char *a, const char *b)
{
    char *ra = realpath(a, NULL), *rb = realpath(b, NULL);
    int same = ra && rb && strcmp(ra, rb) == 0;
    free(ra);
    free(rb);
    return same;
}

int merge_checkpoint(const merge_opts *o, merge_stats *stats)
{
    merge_stats st = {0};
    char *recorded = NULL, *base = NULL, *tmp = NULL;
    lora_adapter *a = NULL;
    st_model *m = NULL;
    st_writer *w = NULL;
    plan p = {0};
    float *buf = NULL;
    void *obuf = NULL, *raw = NULL;
    src_files sf = {NULL, NULL, 0};
    int rc = -1, nthreads = threads_for(o->nthreads);
    llama_config mc;

    if (stats)
        memset(stats, 0, sizeof *stats);
    if (o->dtype != ST_BF16 && o->dtype != ST_F16 && o->dtype != ST_F32)
        return msg_error("output dtype %s is not supported (BF16, F16 or "
                         "F32)",
                         st_dtype_name(o->dtype));
    if (adapter_precheck(o->adapter_dir, &recorded) != 0)
        goto out;
    if (!(base = resolve_base(o, recorded)))
        goto out;
    if (same_dir(o->out_dir, base) || same_dir(o->out_dir, o->adapter_dir)) {
        msg_error("output '%s' would replace an input", o->out_dir);
        goto out;
    }
    if (replaceable(o->out_dir) != 0)
        goto out;
    if (llama_config_load(base, &mc) != 0)
        goto out;
    if (mc.quantized && !o->from_nf4) {
        msg_error("base '%s' is an NF4 checkpoint: merge into its dequantized "
                  "weights (--from-nf4) or give the high-precision base",
                  base);
        goto out;
    }
    if (adapter_read(o->adapter_dir, &mc, &a, NULL) != 0)
        goto out;
    if (st_model_open(base, &m) != 0)
        goto out;
    if (plan_build(m, &mc, a, o->from_nf4, o->dtype, &p) != 0)
        goto out;

    /* the output: with --requantize a plain checkpoint in a scratch
     * directory first, never committed */
    char *scratch_final = NULL;
    if (o->requantize) {
        strbuf sb = STRBUF_INIT;
        sb_printf(&sb, "%s.merged", o->out_dir);
        scratch_final = xstrdup(sb_str(&sb));
        sb_free(&sb);
    }
    tmp = io_dir_begin(scratch_final ? scratch_final : o->out_dir);
    free(scratch_final);
    if (!tmp)
        goto out;
    /* shards only when one file would exceed the size, as save_pretrained
     * writes a lone model.safetensors then */
    uint64_t total = 0, shard_bytes = o->requantize ? 0 : o->shard_bytes;
    for (size_t i = 0; i < p.n; i++)
        total += (uint64_t)p.v[i].numel * st_dtype_size(p.v[i].dtype);
    if (total <= shard_bytes)
        shard_bytes = 0;
    w = st_writer_new(tmp, "model", shard_bytes);
    st_writer_metadata(w, "format", "pt");
    for (size_t i = 0; i < p.n; i++)
        st_writer_declare(w, p.v[i].name, p.v[i].dtype, p.v[i].ndim,
                          p.v[i].shape);
    if (st_writer_begin(w) != 0)
        goto out;
    buf = xmalloc((size_t)CHUNK_ELEMS * sizeof(float));
    obuf = xmalloc((size_t)CHUNK_ELEMS * sizeof(float));
    raw = xmalloc((size_t)RAW_BYTES);
    sf.m = m;
    sf.nfd = m->nfiles;
    sf.fd = xmalloc(sf.nfd * sizeof *sf.fd);
    for (size_t j = 0; j < sf.nfd; j++)
        sf.fd[j] = -1;
    for (size_t i = 0; i < p.n; i++) {
        /* a row longer than a chunk: the buffers grow to one row */
        int64_t rows = p.v[i].ndim >= 1 ? p.v[i].shape[0] : 1;
        int64_t cols = rows ? p.v[i].numel / rows : 0;
        if (cols > CHUNK_ELEMS) {
            buf = xrealloc(buf, (size_t)cols * sizeof(float));
            obuf = xrealloc(obuf, (size_t)cols * sizeof(float));
            raw = xrealloc(raw, (size_t)cols * 8);
        }
        if (o->on_tensor)
            o->on_tensor(o->ctx, i, p.n, p.v[i].name);
        if (i + 1 < p.n && p.v[i + 1].kind == SRC_FLOAT) /* read ahead */
            src_ahead(&sf, p.v[i + 1].t, 0,
                      p.v[i + 1].t->nbytes < RAW_BYTES ? p.v[i + 1].t->nbytes
                                                       : RAW_BYTES);
        if (write_item(w, &sf, &p.v[i], a, buf, obuf, raw, nthreads,
                       &st.bytes_in) != 0)
            goto out;
        st.tensors++;
        st.merged += p.v[i].layer >= 0;
        st.bytes_out += (uint64_t)p.v[i].numel * st_dtype_size(p.v[i].dtype);
    }
    /* the shard count, as st_writer_begin assigns them */
    uint64_t size = 0;
    st.shards = 1;
    for (size_t i = 0; i < p.n; i++) {
        uint64_t nb = (uint64_t)p.v[i].numel * st_dtype_size(p.v[i].dtype);
        if (shard_bytes && size > 0 && size + nb > shard_bytes) {
            st.shards++;
            size = 0;
        }
        size += nb;
    }
    int wr = st_writer_finish(w);
    w = NULL;
    if (wr != 0 || write_config(base, tmp, o->dtype) != 0 ||
        copy_carried(base, o->adapter_dir, tmp) != 0)
        goto out;
    if (o->requantize) {
        /* the code path of nf4-quant, on the merged checkpoint */
        int bs, nested;
        char compute[32];
        requant_settings(&p, base, &bs, &nested, compute, sizeof compute);
        st_model_close(m);
        m = NULL;
        plan_free(&p);
        nf4_ckpt_opts qo = {0};
        qo.in_dir = tmp;
        qo.out_dir = o->out_dir;
        qo.blocksize = bs;
        qo.nested = nested;
        qo.nthreads = o->nthreads;
        qo.compute_dtype = compute;
        qo.shard_bytes = o->shard_bytes;
        if (nf4_quantize_checkpoint(&qo) != 0)
            goto out;
        io_dir_abort(tmp);
        free(tmp);
        tmp = NULL;
        st.shards = 0; /* nf4-quant's business */
    } else {
        int cr = io_dir_commit(tmp, o->out_dir);
        free(tmp);
        tmp = NULL;
        if (cr != 0)
            goto out;
    }
    if (stats)
        *stats = st;
    rc = 0;
out:
    if (w)
        st_writer_abort(w);
    if (tmp) {
        io_dir_abort(tmp);
        free(tmp);
    }
    free(buf);
    free(obuf);
    free(raw);
    for (size_t j = 0; j < sf.nfd; j++)
        if (sf.fd[j] >= 0)
            close(sf.fd[j]);
    free(sf.fd);
    plan_free(&p);
    st_model_close(m);
    lora_free(a);
    free(base);
    free(recorded);
    return rc;
}
