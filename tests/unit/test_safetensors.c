/* test_safetensors.c: round trips (single file, streamed, sharded with an
 * index; every dtype), the reference header bytes, the bf16/f16
 * conversions, and corrupt files: each must be refused with a message. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "io.h"
#include "msg.h"
#include "safetensors.h"

static char tmpdir[256];

static char *tpath(const char *name)
{
    return io_path_join(tmpdir, name);
}

static void write_raw(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
}

/* A file from a header text and n data bytes (0x5a each). */
static void write_st(const char *path, const char *header, size_t ndata)
{
    size_t hl = strlen(header);
    unsigned char *b = calloc(1, 8 + hl + ndata);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    memset(b + 8 + hl, 0x5a, ndata);
    write_raw(path, b, 8 + hl + ndata);
    free(b);
}

static int opens(const char *header, size_t ndata)
{
    char *p = tpath("bad.safetensors");
    write_st(p, header, ndata);
    st_file *f;
    int rc = st_open(p, &f);
    if (rc == 0)
        st_close(f);
    free(p);
    return rc == 0;
}

static void test_conversions(void)
{
    CHECK(st_f32_to_bf16(1.0f) == 0x3f80, "bf16 of 1");
    CHECK(st_bf16_to_f32(0x3f80) == 1.0f, "bf16 1 back");
    /* ties to even: 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7 */
    CHECK(st_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80, "bf16 tie to even down");
    CHECK(st_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82, "bf16 tie to even up");
    CHECK(st_f32_to_bf16(NAN) == 0x7fc0, "bf16 NaN canonical");
    CHECK(st_f32_to_bf16(INFINITY) == 0x7f80, "bf16 inf");
    CHECK(st_f32_to_bf16(3.4e38f) == 0x7f80, "bf16 overflow rounds to inf");
    CHECK(st_f32_to_f16(1.0f) == 0x3c00, "f16 of 1");
    CHECK(st_f32_to_f16(65504.0f) == 0x7bff, "f16 max");
    CHECK(st_f32_to_f16(65520.0f) == 0x7c00, "f16 65520 rounds to inf");
    CHECK(st_f32_to_f16(65519.0f) == 0x7bff, "f16 65519 rounds to max");
    CHECK(st_f32_to_f16(0x1p-24f) == 0x0001, "f16 smallest subnormal");
    CHECK(st_f32_to_f16(0x1p-25f) == 0x0000, "f16 half of smallest: even");
    CHECK(st_f32_to_f16(3 * 0x1p-25f) == 0x0002, "f16 1.5 subnormal: even");
    CHECK(st_f32_to_f16(-0.0f) == 0x8000, "f16 negative zero");
    CHECK(st_f16_to_f32(0x0001) == 0x1p-24f, "f16 subnormal back");
    CHECK(st_f16_to_f32(0xfc00) == -INFINITY, "f16 -inf back");
    CHECK(isnan(st_f16_to_f32(0x7e00)), "f16 NaN back");
    /* Every f16 and bf16 survives f32 and back. */
    int bad16 = 0, badb = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        int nan16 = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (!nan16 && st_f32_to_f16(st_f16_to_f32((uint16_t)h)) != h)
            bad16++;
        int nanb = (h & 0x7f80) == 0x7f80 && (h & 0x7f);
        if (!nanb && st_f32_to_bf16(st_bf16_to_f32((uint16_t)h)) != h)
            badb++;
    }
    CHECK(bad16 == 0, "every f16 round trips (%d bad)", bad16);
    CHECK(badb == 0, "every bf16 round trips (%d bad)", badb);
#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
    /* Against the compiler's own conversion on many floats. */
    uint32_t x = 12345;
    int bad = 0;
    for (int i = 0; i < 2000000; i++) {
        x = x * 1664525u + 1013904223u;
        uint32_t u = x ^ (x >> 7);
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f))
            continue;
        _Float16 g = (_Float16)f;
        uint16_t gb;
        memcpy(&gb, &g, 2);
        if (st_f32_to_f16(f) != gb)
            bad++;
    }
    CHECK(bad == 0, "f16 rounding matches _Float16 (%d bad)", bad);
#endif
}

static void fill(void *p, size_t n, unsigned seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        b[i] = (unsigned char)(seed >> 16);
    }
}

static void test_round_trip_all_dtypes(void)
{
    st_tensor t[ST_NDTYPES + 1];
    void *bufs[ST_NDTYPES + 1];
    char names[ST_NDTYPES + 1][32];
    memset(t, 0, sizeof t);
    for (int d = 0; d < ST_NDTYPES; d++) {
        snprintf(names[d], sizeof names[d], "t.%s", st_dtype_name((st_dtype)d));
        t[d].name = names[d];
        t[d].dtype = (st_dtype)d;
        t[d].ndim = 2;
        t[d].shape[0] = 3;
        t[d].shape[1] = d + 1;
        size_t nb = (size_t)(3 * (d + 1)) * st_dtype_size((st_dtype)d);
        bufs[d] = malloc(nb);
        fill(bufs[d], nb, (unsigned)d);
        t[d].data = bufs[d];
    }
    /* plus a scalar-like empty tensor: shape [0] */
    strcpy(names[ST_NDTYPES], "empty");
    t[ST_NDTYPES].name = names[ST_NDTYPES];
    t[ST_NDTYPES].dtype = ST_F32;
    t[ST_NDTYPES].ndim = 1;
    t[ST_NDTYPES].shape[0] = 0;
    bufs[ST_NDTYPES] = NULL;
    const char *meta[] = {"format", "pt", "who", "q\"l"};
    char *p = tpath("all.safetensors");
    CHECK(st_write_file(p, t, ST_NDTYPES + 1, meta, 2) == 0,
          "write all dtypes");
    st_file *f = NULL;
    CHECK(st_open(p, &f) == 0, "read back all dtypes");
    if (f) {
        CHECK(f->n == ST_NDTYPES + 1, "tensor count");
        int same = 1;
        for (int d = 0; d < ST_NDTYPES; d++) {
            const st_tensor *r = st_find(f, names[d]);
            size_t nb = (size_t)(3 * (d + 1)) * st_dtype_size((st_dtype)d);
            if (!r || r->dtype != (st_dtype)d || r->ndim != 2 ||
                r->shape[0] != 3 || r->shape[1] != d + 1 || r->nbytes != nb ||
                memcmp(r->data, bufs[d], nb) != 0)
                same = 0;
        }
        CHECK(same, "every dtype's shape and bytes round trip");
        const st_tensor *r0 = st_find(f, names[ST_F32]);
        st_tensor_release(r0);
        CHECK(memcmp(r0->data, bufs[ST_F32], 3 * (ST_F32 + 1) * 4) == 0,
              "data readable again after st_tensor_release");
        const st_tensor *e = st_find(f, "empty");
        CHECK(e && e->numel == 0 && e->nbytes == 0, "empty tensor round trips");
        CHECK(st_find(f, "nope") == NULL, "st_find of a missing name");
        CHECK(f->metadata && strcmp(json_get_string(f->metadata, "who", NULL),
                                    "q\"l") == 0,
              "metadata round trips");
        /* the header is padded to 8 bytes so data starts aligned */
        uint64_t hl;
        memcpy(&hl, f->map, 8);
        CHECK(hl % 8 == 0, "header padded to a multiple of 8");
        st_close(f);
    }
    for (int d = 0; d <= ST_NDTYPES; d++)
        free(bufs[d]);
    free(p);
}

static void test_to_f32(void)
{
    float src[5] = {1.5f, -2.25f, 0.0f, 65504.0f, 1e-3f};
    uint16_t bf[5], hf[5];
    double dd[5];
    for (int i = 0; i < 5; i++) {
        bf[i] = st_f32_to_bf16(src[i]);
        hf[i] = st_f32_to_f16(src[i]);
        dd[i] = src[i];
    }
    int64_t shape[1] = {5};
    st_tensor t[4] = {
        {.name = "f32", .dtype = ST_F32, .ndim = 1, .data = src},
        {.name = "bf16", .dtype = ST_BF16, .ndim = 1, .data = bf},
        {.name = "f16", .dtype = ST_F16, .ndim = 1, .data = hf},
        {.name = "f64", .dtype = ST_F64, .ndim = 1, .data = dd},
    };
    for (int i = 0; i < 4; i++)
        t[i].shape[0] = shape[0];
    char *p = tpath("f.safetensors");
    CHECK(st_write_file(p, t, 4, NULL, 0) == 0, "write float tensors");
    st_file *f = NULL;
    CHECK(st_open(p, &f) == 0 && f->metadata == NULL, "open, no metadata");
    if (f) {
        float out[5];
        const st_tensor *a = st_find(f, "f32");
        CHECK(st_to_f32(a, out, 0, 5) == 0 && memcmp(out, src, 20) == 0,
              "st_to_f32 F32");
        a = st_find(f, "bf16");
        CHECK(st_to_f32(a, out, 1, 2) == 0 && out[0] == -2.25f && out[1] == 0,
              "st_to_f32 BF16 with offset");
        a = st_find(f, "f16");
        CHECK(st_to_f32(a, out, 0, 5) == 0 && out[3] == 65504.0f &&
                  out[4] == st_f16_to_f32(st_f32_to_f16(1e-3f)),
              "st_to_f32 F16");
        a = st_find(f, "f64");
        CHECK(st_to_f32(a, out, 0, 5) == 0 && out[4] == 1e-3f, "st_to_f32 F64");
        fprintf(stderr, "expected error follows:\n");
        CHECK(st_to_f32(a, out, 3, 3) != 0, "st_to_f32 out of range refused");
        st_close(f);
    }
    free(p);
}

/* Byte-identical headers: the reference implementation writes exactly this
 * for {"a": F32 [2]} with metadata format=pt. */
static void test_reference_header(void)
{
    float v[2] = {1, 2};
    st_tensor t = {.name = "a", .dtype = ST_F32, .ndim = 1, .data = v};
    t.shape[0] = 2;
    const char *meta[] = {"format", "pt"};
    char *p = tpath("ref.safetensors");
    st_write_file(p, &t, 1, meta, 1);
    char *data;
    size_t len;
    const char want[] =
        "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":"
        "\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    size_t wl = strlen(want), pad = (8 - wl % 8) % 8;
    int ok = io_read_file(p, &data, &len) == 0 && len == 8 + wl + pad + 8 &&
             (unsigned char)data[0] == wl + pad &&
             memcmp(data + 8, want, wl) == 0;
    for (size_t i = 0; ok && i < pad; i++)
        ok = data[8 + wl + i] == ' ';
    CHECK(ok, "header bytes as the reference implementation writes them");
    free(data);
    free(p);
    CHECK(st_serialize_cmp(ST_F32, "z", ST_U8, "a") < 0 &&
              st_serialize_cmp(ST_U8, "a", ST_U8, "b") < 0 &&
              st_serialize_cmp(ST_BF16, "a", ST_F32, "b") > 0 &&
              st_serialize_cmp(ST_I64, "a", ST_F64, "a") < 0,
          "serialization order: larger dtypes first, then names");
}

static void test_sharded(void)
{
    char *dir = tpath("ckpt");
    mkdir(dir, 0777);
    /* 10 tensors of 1000 bytes, shards of at most 2500: 5 shards of 2 */
    st_writer *w = st_writer_new(dir, "model", 2500);
    char name[32];
    for (int i = 0; i < 10; i++) {
        snprintf(name, sizeof name, "w.%d", i);
        int64_t shape[2] = {10, 25};
        st_writer_declare(w, name, ST_F32, 2, shape);
    }
    int64_t big[1] = {3000};
    st_writer_declare(w, "w.big", ST_U8, 1, big); /* larger than a shard */
    st_writer_metadata(w, "format", "pt");
    int ok = st_writer_begin(w) == 0;
    unsigned char buf[3000];
    for (int i = 0; i < 10 && ok; i++) {
        fill(buf, 1000, (unsigned)i);
        /* in pieces, to exercise partial writes */
        ok = st_writer_write(w, buf, 300) == 0 &&
             st_writer_write(w, buf + 300, 700) == 0;
    }
    fill(buf, 3000, 99);
    ok = ok && st_writer_write(w, buf, 3000) == 0;
    CHECK(ok, "streamed writes");
    CHECK(st_writer_finish(w) == 0, "sharded writer finishes");
    char *idx = io_path_join(dir, "model.safetensors.index.json");
    char *s1 = io_path_join(dir, "model-00001-of-00006.safetensors");
    char *s6 = io_path_join(dir, "model-00006-of-00006.safetensors");
    CHECK(io_exists(idx) && io_exists(s1) && io_exists(s6),
          "index and 6 shards written");
    st_model *m = NULL;
    CHECK(st_model_open(dir, &m) == 0, "sharded model opens");
    if (m) {
        CHECK(m->nfiles == 6 && m->n == 11, "6 files, 11 tensors");
        int same = 1;
        for (int i = 0; i < 10; i++) {
            snprintf(name, sizeof name, "w.%d", i);
            const st_tensor *t = st_model_find(m, name);
            fill(buf, 1000, (unsigned)i);
            if (!t || t->nbytes != 1000 || memcmp(t->data, buf, 1000))
                same = 0;
        }
        const st_tensor *t = st_model_find(m, "w.big");
        fill(buf, 3000, 99);
        CHECK(same && t && memcmp(t->data, buf, 3000) == 0,
              "sharded data round trips");
        int sorted = 1;
        for (size_t i = 1; i < m->n; i++)
            if (strcmp(m->tensors[i - 1]->name, m->tensors[i]->name) >= 0)
                sorted = 0;
        CHECK(sorted, "model tensors sorted by name");
        st_model_close(m);
    }
    /* a missing shard */
    char *s3 = io_path_join(dir, "model-00003-of-00006.safetensors");
    char *s3x = io_path_join(dir, "moved");
    rename(s3, s3x);
    fprintf(stderr, "expected error follows:\n");
    CHECK(st_model_open(dir, &m) != 0, "missing shard refused");
    rename(s3x, s3);
    /* an index that places a tensor in the wrong shard */
    char *text;
    size_t len;
    io_read_file(idx, &text, &len);
    char *at = strstr(text, "\"w.0\": \"model-00001");
    if (at)
        at[strlen("\"w.0\": \"model-0000")] = '2';
    char *idx2 = io_path_join(dir, "saved-index");
    rename(idx, idx2);
    write_raw(idx, text, len);
    fprintf(stderr, "expected error follows:\n");
    CHECK(at && st_model_open(dir, &m) != 0,
          "tensor in the wrong shard refused");
    rename(idx2, idx);
    free(text);
    CHECK(st_model_open(dir, &m) == 0, "restored model opens");
    st_model_close(m);

    /* shard_bytes larger than everything: one shard, with its index */
    char *dir2 = tpath("one");
    mkdir(dir2, 0777);
    w = st_writer_new(dir2, "model", 1 << 30);
    int64_t shape[1] = {4};
    st_writer_declare(w, "x", ST_F32, 1, shape);
    float four[4] = {1, 2, 3, 4};
    st_writer_begin(w);
    st_writer_write(w, four, 16);
    CHECK(st_writer_finish(w) == 0, "single-shard writer finishes");
    char *one = io_path_join(dir2, "model-00001-of-00001.safetensors");
    char *oneidx = io_path_join(dir2, "model.safetensors.index.json");
    CHECK(io_exists(one) && io_exists(oneidx), "one shard and its index");
    m = NULL;
    CHECK(st_model_open(dir2, &m) == 0 && m->nfiles == 1 &&
              memcmp(st_model_find(m, "x")->data, four, 16) == 0,
          "single-shard model opens");
    st_model_close(m);
    io_remove_tree(one);
    io_remove_tree(oneidx);
    free(one);
    free(oneidx);
    /* shard_bytes 0: one plain file, no index */
    w = st_writer_new(dir2, "model", 0);
    st_writer_declare(w, "x", ST_F32, 1, shape);
    st_writer_begin(w);
    st_writer_write(w, four, 16);
    CHECK(st_writer_finish(w) == 0, "unsharded writer finishes");
    m = NULL;
    CHECK(st_model_open(dir2, &m) == 0 && m->nfiles == 1 &&
              memcmp(st_model_find(m, "x")->data, four, 16) == 0,
          "single file model opens");
    st_model_close(m);
    /* incomplete and excess writes */
    w = st_writer_new(dir2, "short", 0);
    st_writer_declare(w, "x", ST_F32, 1, shape);
    st_writer_begin(w);
    st_writer_write(w, four, 8);
    fprintf(stderr, "expected error follows:\n");
    CHECK(st_writer_finish(w) != 0, "incomplete tensor refused");
    char *sp = io_path_join(dir2, "short.safetensors");
    CHECK(!io_exists(sp), "no file left after a failed write");
    w = st_writer_new(dir2, "long", 0);
    st_writer_declare(w, "x", ST_F32, 1, shape);
    st_writer_begin(w);
    fprintf(stderr, "expected error follows:\n");
    CHECK(st_writer_write(w, buf, 20) != 0, "excess data refused");
    st_writer_abort(w);
    /* no checkpoint at all */
    char *empty = tpath("empty");
    mkdir(empty, 0777);
    fprintf(stderr, "expected error follows:\n");
    CHECK(st_model_open(empty, &m) != 0, "directory without a model refused");
    free(empty);
    free(sp);
    free(dir2);
    free(s3);
    free(s3x);
    free(idx);
    free(idx2);
    free(s1);
    free(s6);
    free(dir);
}

static void test_corrupt(void)
{
    const char *good =
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
        "\"b\":{\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[8,12]}}";
    CHECK(opens(good, 12), "a good file opens");
    fprintf(stderr, "expected errors follow:\n");
    CHECK(!opens(good, 11), "data one byte short refused");
    CHECK(!opens(good, 13), "trailing bytes refused");
    CHECK(
        !opens(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
            12),
        "overlapping offsets refused");
    CHECK(!opens(
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
              8),
          "two tensors at one offset refused");
    CHECK(
        !opens(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,80]}}",
            8),
        "offsets past the end refused");
    CHECK(
        !opens(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}",
            8),
        "shape and size mismatch refused");
    CHECK(
        !opens(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}",
            8),
        "reversed offsets refused");
    CHECK(!opens(
              "{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}",
              8),
          "unknown dtype refused");
    CHECK(
        !opens(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}",
            8),
        "negative dimension refused");
    CHECK(!opens("{\"a\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":["
                 "0,8]}}",
                 8),
          "fractional dimension refused");
    CHECK(!opens("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,"
                 "4294967296],\"data_offsets\":[0,8]}}",
                 8),
          "overflowing shape refused");
    CHECK(
        !opens("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],"
               "\"extra\":1}}",
               8),
        "unknown field refused");
    CHECK(!opens("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8),
          "missing offsets refused");
    CHECK(
        !opens(
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
            16),
        "duplicate name refused");
    CHECK(
        !opens("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]",
               8),
        "bad JSON refused");
    CHECK(!opens("[1,2]", 0), "header not an object refused");
    CHECK(!opens("{\"__metadata__\":{\"k\":1}}", 0),
          "non-string metadata refused");
    CHECK(opens("{\"__metadata__\":{\"k\":\"v\"}}     ", 0),
          "space-padded header with metadata only opens");
    CHECK(opens("{}", 0), "empty file of tensors opens");

    char *p = tpath("short.safetensors");
    write_raw(p, "\x10\0\0", 3);
    st_file *f;
    CHECK(st_open(p, &f) != 0, "file shorter than 8 bytes refused");
    unsigned char b[16] = {200, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_raw(p, b, 10);
    CHECK(st_open(p, &f) != 0, "header length past the end refused");
    unsigned char huge[16] = {0, 0, 0, 0, 0, 0, 0, 0x80, '{', '}'};
    write_raw(p, huge, 10);
    CHECK(st_open(p, &f) != 0, "huge header length refused");
    /* a truncated copy of a real file */
    float v[64] = {0};
    st_tensor t = {.name = "v", .dtype = ST_F32, .ndim = 1, .data = v};
    t.shape[0] = 64;
    st_write_file(p, &t, 1, NULL, 0);
    CHECK(truncate(p, 100) == 0 && st_open(p, &f) != 0,
          "truncated file refused");
    CHECK(st_open("/nonexistent/x.safetensors", &f) != 0,
          "missing file refused");
    free(p);
}

static void test_shared_model(void)
{
    char *dir = io_path_join(check_shared(), "models/stories260K");
    if (!io_exists(dir)) {
        SKIP("stories260K: shared directory absent");
        free(dir);
        return;
    }
    st_model *m = NULL;
    CHECK(st_model_open(dir, &m) == 0, "stories260K opens");
    if (m) {
        const st_tensor *t =
            st_model_find(m, "model.layers.0.self_attn.k_proj.weight");
        CHECK(t && t->dtype == ST_F32 && t->ndim == 2 && t->shape[0] == 32 &&
                  t->shape[1] == 64,
              "stories260K k_proj shape");
        CHECK(m->n == 47, "stories260K has 47 tensors (%zu)", m->n);
        st_model_close(m);
    }
    free(dir);
}

int main(void)
{
    msg_init("test_safetensors");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_safetensors.%ld",
             (long)getpid());
    mkdir(tmpdir, 0777);
    test_conversions();
    test_round_trip_all_dtypes();
    test_to_f32();
    test_reference_header();
    test_sharded();
    test_corrupt();
    test_shared_model();
    io_remove_tree(tmpdir);
    return CHECK_DONE();
}
