/* test_nf4.c: NF4 against bitsandbytes, bit for bit.
 *
 * Without ../shared: the code book, thresholds and ties, NaN/inf/zero
 * blocks, every SIMD kernel against the plain C one, torch's CUDA mean on
 * sizes measured on an H100, Python float formatting, the loader's checks.
 * With ../shared: stories260K quantized in F32 (the shared golden, whole
 * file), and cast to BF16 and F16 by our own conversion (which must equal
 * torch's cast), each compared tensor by tensor with what bitsandbytes
 * saved (hashes in tests/golden/nf4-refs.json, made by
 * tests/golden/make-nf4-refs.py), plus dequantization and the blocksize /
 * no-double-quant variants.
 */
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
#include "json.h"
#include "msg.h"
#include "nf4.h"
#include "safetensors.h"

static char tmpdir[256];
static json_value *refs; /* tests/golden/nf4-refs.json, or NULL */

/* FNV-1a 64, as make-nf4-refs.py computes it. */
static uint64_t fnv1a(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static int hash_is(const json_value *entry, const void *p, size_t n)
{
    if (!entry || entry->type != JSON_ARRAY || entry->u.array.n != 3)
        return 0;
    const json_value *h = entry->u.array.items[2];
    char want[17];
    snprintf(want, sizeof want, "%016llx", (unsigned long long)fnv1a(p, n));
    return h->type == JSON_STRING && strcmp(h->u.string.s, want) == 0;
}

static void test_code_book(void)
{
    int sorted = 1;
    for (int i = 1; i < 16; i++)
        sorted &= nf4_code[i - 1] < nf4_code[i];
    CHECK(sorted && nf4_code[0] == -1.0f && nf4_code[7] == 0.0f &&
              nf4_code[15] == 1.0f,
          "NF4 code book sorted, -1, 0, 1 in place");
    const float *m = nf4_dynamic_map();
    sorted = 1;
    for (int i = 1; i < 256; i++)
        sorted &= m[i - 1] < m[i];
    CHECK(sorted && m[0] == -0.992968738079071f && m[127] == 0.0f &&
              m[255] == 1.0f && m[128] == 5.500000384017767e-07f,
          "dynamic map sorted, known entries");
    CHECK(nf4_blocksize_ok(64) && nf4_blocksize_ok(4096) &&
              !nf4_blocksize_ok(48) && !nf4_blocksize_ok(8192),
          "block sizes as bitsandbytes");
}

/* Quantizes one block of 64 given values; returns the 64 codes. */
static void codes_of(const float *v, int n, int level, uint8_t *codes,
                     float *absmax)
{
    nf4_simd_level(level);
    int64_t shape[1] = {n};
    nf4_weight w;
    nf4_quantize(v, ST_F32, 1, shape, 64, 0, 1, &w);
    for (int i = 0; i < n; i++)
        codes[i] = (w.packed[i / 2] >> (i & 1 ? 0 : 4)) & 15;
    if (absmax)
        *absmax = w.absmax[0];
    nf4_weight_free(&w);
}

static void test_thresholds(void)
{
    /* With absmax 1 the scale is 1, so the values are compared directly:
     * on a threshold the lower code, just above it the next. */
    static const float thr[15] = {
        -0.8480964004993439f,   -0.6106329262256622f,  -0.4599952697753906f,
        -0.33967943489551544f,  -0.23460740596055984f, -0.13791173323988914f,
        -0.045525018125772476f, 0.03979014977812767f,  0.1202552504837513f,
        0.2035212516784668f,    0.2920137718319893f,   0.3893125355243683f,
        0.5016634166240692f,    0.6427869200706482f,   0.8614784181118011f,
    };
    for (int level = 0; level <= 2; level++) {
        float v[64];
        uint8_t c[64];
        v[0] = 1.0f;
        v[1] = -1.0f;
        for (int k = 0; k < 15; k++) {
            v[2 + 2 * k] = thr[k];
            v[3 + 2 * k] = nextafterf(thr[k], 2.0f);
        }
        for (int i = 32; i < 64; i++)
            v[i] = 0.0f;
        codes_of(v, 64, level, c, NULL);
        int ok = c[0] == 15 && c[1] == 0;
        for (int k = 0; k < 15; k++)
            ok &= c[2 + 2 * k] == k && c[3 + 2 * k] == k + 1;
        for (int i = 32; i < 64; i++)
            ok &= c[i] == 7;
        CHECK(ok, "level %d: a value on a threshold takes the lower code",
              level);
        /* NaN is ignored by the absmax and gets code 0; an infinity makes
         * the scale 0, so everything becomes 0 * 0 = 0 -> 7, inf -> NaN -> 0 */
        for (int i = 0; i < 64; i++)
            v[i] = (float)(i - 32) / 32.0f;
        v[5] = NAN;
        float am;
        codes_of(v, 64, level, c, &am);
        CHECK(am == 1.0f && c[5] == 0 && c[0] == 0 && c[63] == 15,
              "level %d: NaN ignored by absmax, coded 0", level);
        v[9] = INFINITY;
        codes_of(v, 64, level, c, &am);
        CHECK(isinf(am) && c[9] == 0 && c[32] == 7, "level %d: infinity",
              level);
        for (int i = 0; i < 64; i++)
            v[i] = 0.0f;
        codes_of(v, 64, level, c, &am);
        int zero = am == 0.0f;
        for (int i = 0; i < 64; i++)
            zero &= c[i] == 0; /* 0 * (1/0) = NaN -> code 0, as on the GPU */
        CHECK(zero, "level %d: an all-zero block is all code 0", level);
    }
    nf4_simd_level(99);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545f4914f6cdd1dull) >> 32);
}

static int same_weight(const nf4_weight *a, const nf4_weight *b)
{
    if (a->numel != b->numel || a->nblocks != b->nblocks ||
        memcmp(a->packed, b->packed, (size_t)(a->numel + 1) / 2))
        return 0;
    if (a->nested)
        return b->nested && a->nested_offset == b->nested_offset &&
               !memcmp(a->absmax_code, b->absmax_code, (size_t)a->nblocks) &&
               !memcmp(a->nested_absmax, b->nested_absmax,
                       (size_t)a->nested_nblocks * 4);
    return !memcmp(a->absmax, b->absmax, (size_t)a->nblocks * 4);
}

static void test_kernels_agree(void)
{
    int best = nf4_simd_level(99);
    static const int64_t sizes[] = {1, 63, 64, 65, 4097, 100003, 300000};
    static const st_dtype dts[] = {ST_F32, ST_BF16, ST_F16};
    static const int bss[] = {32, 64, 256, 4096};
    int all = 1, n = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int di = 0; di < 3; di++) {
            int64_t len = sizes[si];
            size_t esz = st_dtype_size(dts[di]);
            unsigned char *src = malloc((size_t)len * esz);
            for (int64_t i = 0; i < len; i++) {
                float v = ((float)(rnd() >> 8) / 16777216.0f - 0.5f) *
                          (float)(1 + (i / 64) % 7) * 0.03f;
                uint32_t r = rnd();
                if (r % 5000 == 0)
                    v = NAN;
                else if (r % 7001 == 0)
                    v = 0.0f;
                if (dts[di] == ST_F32)
                    memcpy(src + 4 * i, &v, 4);
                else {
                    uint16_t h = dts[di] == ST_BF16 ? st_f32_to_bf16(v)
                                                    : st_f32_to_f16(v);
                    memcpy(src + 2 * i, &h, 2);
                }
            }
            if (len == 100003) /* a zero block in the middle */
                memset(src + 64 * esz, 0, 64 * esz);
            for (size_t bi = 0; bi < sizeof bss / sizeof *bss; bi++) {
                nf4_weight w[4]; /* one per kernel level, 0..3 */
                for (int level = 0; level <= best; level++) {
                    nf4_simd_level(level);
                    nf4_quantize(src, dts[di], 1, &len, bss[bi], 1, level + 1,
                                 &w[level]);
                }
                for (int level = 1; level <= best; level++)
                    all &= same_weight(&w[0], &w[level]);
                for (int level = 0; level <= best; level++)
                    nf4_weight_free(&w[level]);
                n++;
            }
            free(src);
        }
    nf4_simd_level(99);
    CHECK(all,
          "plain C, SSE2, AVX2 and AVX-512 kernels agree (%d cases, best level "
          "%d)",
          n, best);

    /* the 8-bit search, at every entry and midpoint and their neighbours */
    const float *map = nf4_dynamic_map();
    float u[256 * 12 + 8];
    int k = 0;
    for (int i = 0; i < 256; i++) {
        float mid = i < 255 ? (map[i] + map[i + 1]) * 0.5f : 1.5f;
        u[k++] = map[i];
        u[k++] = nextafterf(map[i], 2);
        u[k++] = nextafterf(map[i], -2);
        u[k++] = mid;
        u[k++] = nextafterf(mid, 2);
        u[k++] = nextafterf(mid, -2);
    }
    u[k++] = NAN;
    u[k++] = INFINITY;
    u[k++] = -INFINITY;
    u[k++] = 1.0000001f;
    uint8_t c0[sizeof u / 4], c2[sizeof u / 4];
    nf4_simd_level(0);
    nf4_dynamic_quantize(u, k, c0);
    nf4_simd_level(99);
    nf4_dynamic_quantize(u, k, c2);
    CHECK(memcmp(c0, c2, (size_t)k) == 0, "8-bit search: vector equals scalar");
    CHECK(c0[0] == 0 && c0[6 * 127] == 127 && c0[6 * 255] == 255 &&
              c0[k - 4] == 0,
          "8-bit search: entries map to themselves, NaN to 0");
}

static void test_torch_mean(void)
{
    /* torch.mean on an H100 (torch 2.11) of x_i = float(((i * 2654435761 +
     * 12345) mod 2^32) / 2^32 * 0.1 + 0.01): the float32 bits */
    static const struct {
        int64_t n;
        uint32_t bits;
    } want[] = {
        {1, 0x3c23d83fu},      {2, 0x3d2788d8u},      {3, 0x3d1d9317u},
        {5, 0x3d5b931au},      {31, 0x3d744098u},     {32, 0x3d6fef74u},
        {33, 0x3d738d18u},     {64, 0x3d757b9fu},     {100, 0x3d72c38cu},
        {127, 0x3d73cb27u},    {128, 0x3d73c728u},    {129, 0x3d728cbdu},
        {172, 0x3d754db3u},    {200, 0x3d758207u},    {299, 0x3d751ec8u},
        {512, 0x3d758c63u},    {1000, 0x3d75c063u},   {4096, 0x3d75c5bbu},
        {65536, 0x3d75c0e2u},  {131072, 0x3d75c1aeu}, {131073, 0x3d75c20au},
        {262144, 0x3d75c27cu}, {704512, 0x3d75c26eu}, {3670016, 0x3d75c283u},
    };
    int bad = 0;
    for (size_t k = 0; k < sizeof want / sizeof *want; k++) {
        int64_t n = want[k].n;
        float *x = malloc((size_t)n * sizeof *x);
        for (int64_t i = 0; i < n; i++) {
            uint64_t h = ((uint64_t)i * 2654435761ull + 12345) % 4294967296ull;
            volatile double d = (double)h / 4294967296.0 * 0.1;
            x[i] = (float)(d + 0.01);
        }
        float m = nf4_torch_mean(x, n);
        uint32_t b;
        memcpy(&b, &m, 4);
        if (b != want[k].bits) {
            bad++;
            printf("# mean of %lld: %08x, torch %08x\n", (long long)n, b,
                   want[k].bits);
        }
        free(x);
    }
    CHECK(bad == 0, "torch's CUDA mean reproduced on 24 sizes (1 to 3.7M)");
}

static void test_py_float(void)
{
    static const struct {
        double v;
        const char *s;
    } cases[] = {
        {0.32861053943634033, "0.32861053943634033"},
        {(double)0.1f, "0.10000000149011612"},
        {0.1, "0.1"},
        {1e-05, "1e-05"},
        {0.0001, "0.0001"},
        {1.0, "1.0"},
        {100.0, "100.0"},
        {-2.5, "-2.5"},
        {1e16, "1e+16"},
        {1234567890123456.0, "1234567890123456.0"},
        {1.5e-7, "1.5e-07"},
        {0.0, "0.0"},
        {-0.0, "-0.0"},
        {123.456, "123.456"},
        {1e22, "1e+22"},
        {6.0, "6.0"},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        strbuf sb = STRBUF_INIT;
        nf4_append_py_float(&sb, cases[i].v);
        if (strcmp(sb_str(&sb), cases[i].s) != 0) {
            printf("# repr %s, want %s\n", sb_str(&sb), cases[i].s);
            bad++;
        }
        sb_free(&sb);
    }
    CHECK(bad == 0, "floats formatted as Python's repr");
    CHECK(
        nf4_is_block_linear("model.layers.0.self_attn.q_proj.weight", 2) &&
            nf4_is_block_linear("model.layers.31.mlp.down_proj.weight", 2) &&
            !nf4_is_block_linear("model.layers.0.mlp.down_proj.weight", 1) &&
            !nf4_is_block_linear("model.layers.0.input_layernorm.weight", 1) &&
            !nf4_is_block_linear("lm_head.weight", 2) &&
            !nf4_is_block_linear("model.embed_tokens.weight", 2) &&
            !nf4_is_block_linear("model.layers.x.mlp.up_proj.weight", 2),
        "which tensors are quantized");
}

static void test_round_trip(void)
{
    /* quantize, serialize with the tensor set, load, dequantize */
    int64_t shape[2] = {48, 80}; /* 3840 elements: 60 blocks */
    float v[3840];
    for (int i = 0; i < 3840; i++)
        v[i] = ((float)(rnd() >> 8) / 16777216.0f - 0.5f) * 0.1f;
    nf4_weight w;
    CHECK(nf4_quantize(v, ST_F32, 2, shape, 64, 1, 0, &w) == 0, "quantize");
    strbuf js = STRBUF_INIT;
    nf4_quant_state_json(&w, &js);
    CHECK(js.len ==
              nf4_quant_state_len(2, shape, ST_F32, 64, 1, w.nested_offset),
          "quant_state length known in advance");
    st_tensor t[6];
    memset(t, 0, sizeof t);
    const char *names[6] = {"x.weight",
                            "x.weight.absmax",
                            "x.weight.quant_map",
                            "x.weight.nested_absmax",
                            "x.weight.nested_quant_map",
                            "x.weight.quant_state.bitsandbytes__nf4"};
    const void *data[6] = {w.packed,        w.absmax_code, w.quant_map,
                           w.nested_absmax, w.nested_map,  js.buf};
    st_dtype dts[6] = {ST_U8, ST_U8, ST_F32, ST_F32, ST_F32, ST_U8};
    int64_t lens[6] = {1920, 60, 16, 1, 256, (int64_t)js.len};
    for (int i = 0; i < 6; i++) {
        t[i].name = (char *)names[i];
        t[i].dtype = dts[i];
        t[i].ndim = 1;
        t[i].shape[0] = lens[i];
        t[i].data = data[i];
    }
    t[0].ndim = 2;
    t[0].shape[1] = 1;
    char *dir = io_path_join(tmpdir, "rt");
    mkdir(dir, 0777);
    char *p = io_path_join(dir, "model.safetensors");
    st_write_file(p, t, 6, NULL, 0);
    st_model *m = NULL;
    nf4_weight l;
    int ok = st_model_open(dir, &m) == 0 && nf4_weight_present(m, "x.weight") &&
             !nf4_weight_present(m, "y.weight") &&
             nf4_weight_load(m, "x.weight", &l) == 0;
    CHECK(ok, "serialized weight loads");
    if (ok) {
        CHECK(same_weight(&w, &l) && l.ndim == 2 && l.shape[0] == 48 &&
                  l.shape[1] == 80 && l.dtype == ST_F32,
              "loaded weight equals the quantized one");
        float a[3840], b[3840];
        nf4_dequantize(&w, 0, 3840, a);
        nf4_dequantize_rows(&l, 0, 48, b);
        double err = 0, ss = 0;
        for (int i = 0; i < 3840; i++) {
            err += (a[i] - v[i]) * (a[i] - v[i]);
            ss += v[i] * v[i];
        }
        CHECK(memcmp(a, b, sizeof a) == 0 && sqrt(err / ss) < 0.15,
              "dequantized values close (relative RMS error %.3f)",
              sqrt(err / ss));
        float r[80];
        nf4_dequantize_rows(&l, 47, 1, r);
        CHECK(memcmp(r, a + 47 * 80, sizeof r) == 0, "one row dequantized");
        fprintf(stderr, "expected error follows:\n");
        CHECK(nf4_dequantize(&l, 3800, 41, a) != 0, "range checked");
        nf4_stats st;
        nf4_error_stats(v, ST_F32, &w, 0, &st);
        CHECK(st.rel_err > 0.01 && st.rel_err < 0.15 &&
                  st.absmax_max <= 0.05f && st.absmax_min > 0 &&
                  st.max_abs_err < 0.01,
              "error statistics plausible (rel %.4f)", st.rel_err);
        nf4_weight_free(&l);
    }
    st_model_close(m);
    /* a quant_state that is not NF4 is refused */
    const char fp4[] =
        "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": "
        "\"float32\", \"shape\": [48, 80]}";
    t[5].data = fp4;
    t[5].shape[0] = (int64_t)strlen(fp4);
    st_write_file(p, t, 6, NULL, 0);
    fprintf(stderr, "expected errors follow:\n");
    CHECK(st_model_open(dir, &m) == 0 &&
              nf4_weight_load(m, "x.weight", &l) != 0,
          "FP4 refused");
    st_model_close(m);
    /* a missing nested tensor is refused */
    t[5].data = js.buf;
    t[5].shape[0] = (int64_t)js.len;
    t[3] = t[5];
    st_write_file(p, t, 5, NULL, 0);
    CHECK(st_model_open(dir, &m) == 0 &&
              nf4_weight_load(m, "x.weight", &l) != 0,
          "missing nested_absmax refused");
    st_model_close(m);
    free(p);
    free(dir);
    sb_free(&js);
    nf4_weight_free(&w);
}

/* Every tensor of file `path` matches refs[key] (names, dtypes, hashes),
 * and so does the whole file. */
static int file_matches(const char *path, const char *key, int *ntensors)
{
    const json_value *want = json_get(refs, key);
    st_file *f;
    if (!want || st_open(path, &f) != 0)
        return 0;
    int ok = 1;
    *ntensors = 0;
    for (size_t i = 0; i < want->u.object.n; i++) {
        const char *name = want->u.object.keys[i];
        const json_value *e = want->u.object.values[i];
        if (strcmp(name, "(file)") == 0) {
            ok &= hash_is(e, f->map, f->map_len);
            continue;
        }
        const st_tensor *t = st_find(f, name);
        if (!t ||
            strcmp(st_dtype_name(t->dtype), e->u.array.items[0]->u.string.s) !=
                0 ||
            !hash_is(e, t->data, t->nbytes)) {
            printf("# %s: tensor '%s' differs\n", key, name);
            ok = 0;
        }
        (*ntensors)++;
    }
    ok &= *ntensors == (int)f->n;
    st_close(f);
    return ok;
}

/* stories260K cast to dtype by our conversion, in dir. */
static int make_cast(const char *src, const char *dir, st_dtype dt)
{
    st_model *m;
    if (st_model_open(src, &m) != 0)
        return -1;
    mkdir(dir, 0777);
    st_tensor *t = calloc(m->n, sizeof *t);
    for (size_t i = 0; i < m->n; i++) {
        t[i] = *m->tensors[i];
        t[i].dtype = dt;
        float *f = malloc((size_t)t[i].numel * 4);
        uint16_t *h = malloc((size_t)t[i].numel * 2);
        st_to_f32(m->tensors[i], f, 0, t[i].numel);
        for (int64_t k = 0; k < t[i].numel; k++)
            h[k] = dt == ST_BF16 ? st_f32_to_bf16(f[k]) : st_f32_to_f16(f[k]);
        free(f);
        t[i].data = h;
    }
    const char *meta[] = {"format", "pt"};
    char *p = io_path_join(dir, "model.safetensors");
    int rc = st_write_file(p, t, m->n, meta, 1);
    free(p);
    for (size_t i = 0; i < m->n; i++)
        free((void *)t[i].data);
    free(t);
    st_model_close(m);
    /* the config, with its dtype */
    char *cs = io_path_join(src, "config.json"),
         *cd = io_path_join(dir, "config.json");
    char *text;
    size_t len;
    if (io_read_file(cs, &text, &len) == 0) {
        FILE *f = fopen(cd, "w");
        char *at = strstr(text, "\"float32\"");
        if (at) {
            fwrite(text, 1, (size_t)(at - text), f);
            fputs(dt == ST_BF16 ? "\"bfloat16\"" : "\"float16\"", f);
            fputs(at + 9, f);
        } else {
            fwrite(text, 1, len, f);
        }
        fclose(f);
        free(text);
    }
    free(cs);
    free(cd);
    return rc;
}

static void test_shared(void)
{
    char *src = io_path_join(check_shared(), "models/stories260K");
    char *gold = io_path_join(check_shared(), "golden/s260-nf4-f32");
    if (!io_exists(src) || !io_exists(gold)) {
        SKIP("stories260K and its NF4 golden: shared directory absent");
        free(src);
        free(gold);
        return;
    }
    /* weight by weight against the shared golden, every kernel */
    st_model *m = NULL, *g = NULL;
    st_model_open(src, &m);
    st_model_open(gold, &g);
    int best = nf4_simd_level(99), nw = 0, bad = 0;
    for (size_t i = 0; m && g && i < m->n; i++) {
        const st_tensor *t = m->tensors[i];
        if (!nf4_is_block_linear(t->name, t->ndim))
            continue;
        nf4_weight ref;
        if (nf4_weight_load(g, t->name, &ref) != 0) {
            bad++;
            continue;
        }
        for (int level = 0; level <= best; level++) {
            nf4_simd_level(level);
            nf4_weight w;
            nf4_quantize(t->data, t->dtype, t->ndim, t->shape, 64, 1, 0, &w);
            strbuf a = STRBUF_INIT;
            nf4_quant_state_json(&w, &a);
            char qs[256];
            snprintf(qs, sizeof qs, "%s" NF4_SUFFIX_QUANT_STATE, t->name);
            const st_tensor *q = st_model_find(g, qs);
            if (!same_weight(&w, &ref) || !q || q->nbytes != a.len ||
                memcmp(q->data, a.buf, a.len) != 0)
                bad++;
            sb_free(&a);
            nf4_weight_free(&w);
        }
        nf4_weight_free(&ref);
        nw++;
    }
    nf4_simd_level(99);
    CHECK(nw == 35 && bad == 0,
          "F32: %d weights equal bitsandbytes' (codes, absmax codes, nested "
          "absmax, offset, quant_state JSON), every kernel",
          nw);

    /* whole checkpoints: F32 against the shared golden file, BF16 and F16
     * against the hashes of bitsandbytes' files */
    static const struct {
        const char *tag;
        st_dtype dt;
    } kinds[] = {{"f32", ST_F32}, {"bf16", ST_BF16}, {"f16", ST_F16}};
    for (int k = 0; k < 3; k++) {
        char name[64];
        snprintf(name, sizeof name, "in-%s", kinds[k].tag);
        char *in =
            kinds[k].dt == ST_F32 ? xstrdup(src) : io_path_join(tmpdir, name);
        int n;
        if (kinds[k].dt != ST_F32) {
            make_cast(src, in, kinds[k].dt);
            char *p = io_path_join(in, "model.safetensors");
            snprintf(name, sizeof name, "input-%s", kinds[k].tag);
            CHECK(!refs || file_matches(p, name, &n),
                  "%s: our cast of stories260K equals torch's, byte for byte",
                  kinds[k].tag);
            free(p);
        }
        snprintf(name, sizeof name, "out-%s", kinds[k].tag);
        char *out = io_path_join(tmpdir, name);
        nf4_ckpt_opts o = {.in_dir = in,
                           .out_dir = out,
                           .blocksize = 64,
                           .nested = 1,
                           .compute_dtype = "bfloat16"};
        CHECK(nf4_quantize_checkpoint(&o) == 0, "%s: checkpoint quantized",
              kinds[k].tag);
        char *p = io_path_join(out, "model.safetensors");
        if (kinds[k].dt == ST_F32) {
            char *a, *b, *gp = io_path_join(gold, "model.safetensors");
            size_t la, lb;
            CHECK(io_read_file(p, &a, &la) == 0 &&
                      io_read_file(gp, &b, &lb) == 0 && la == lb &&
                      memcmp(a, b, la) == 0,
                  "f32: model.safetensors identical to the shared golden");
            free(a);
            free(b);
            free(gp);
        }
        snprintf(name, sizeof name, "nf4-%s", kinds[k].tag);
        if (refs) {
            CHECK(file_matches(p, name, &n),
                  "%s: all %d tensors and the whole file equal bitsandbytes'",
                  kinds[k].tag, n);
        } else {
            SKIP("%s: tests/golden/nf4-refs.json absent", kinds[k].tag);
        }
        /* dequantized as bitsandbytes does */
        snprintf(name, sizeof name, "deq-%s", kinds[k].tag);
        char *dq = io_path_join(tmpdir, name);
        CHECK(nf4_dequantize_checkpoint(out, dq, ST_NDTYPES, 0, 0) == 0,
              "%s: dequantized", kinds[k].tag);
        const json_value *want = refs ? json_get(refs, name) : NULL;
        st_model *d = NULL;
        if (want && st_model_open(dq, &d) == 0) {
            int same = 1;
            for (size_t i = 0; i < want->u.object.n; i++) {
                const st_tensor *t = st_model_find(d, want->u.object.keys[i]);
                same &= t && t->dtype == kinds[k].dt &&
                        hash_is(want->u.object.values[i], t->data, t->nbytes);
            }
            CHECK(same && want->u.object.n == 35,
                  "%s: dequantization equals bitsandbytes' dequantize_4bit",
                  kinds[k].tag);
        }
        st_model_close(d);
        free(dq);
        free(p);
        free(out);
        free(in);
    }

    /* blocksize and no-double-quant variants of quantize_4bit */
    const json_value *fv = refs ? json_get(refs, "func-f32") : NULL;
    if (fv && m) {
        static const struct {
            const char *tag;
            int bs, dq;
        } var[] = {{"bs128", 128, 1}, {"nodq", 64, 0}, {"bs256nodq", 256, 0}};
        int ok = 1, count = 0;
        for (size_t i = 0; i < m->n; i++) {
            const st_tensor *t = m->tensors[i];
            if (!nf4_is_block_linear(t->name, t->ndim))
                continue;
            for (int v = 0; v < 3; v++) {
                nf4_weight w;
                nf4_quantize(t->data, t->dtype, t->ndim, t->shape, var[v].bs,
                             var[v].dq, 0, &w);
                char key[256];
                snprintf(key, sizeof key, "%s.%s.packed", t->name, var[v].tag);
                ok &= hash_is(json_get(fv, key), w.packed,
                              (size_t)(w.numel + 1) / 2);
                snprintf(key, sizeof key, "%s.%s.absmax", t->name, var[v].tag);
                ok &= var[v].dq ? hash_is(json_get(fv, key), w.absmax_code,
                                          (size_t)w.nblocks)
                                : hash_is(json_get(fv, key), w.absmax,
                                          (size_t)w.nblocks * 4);
                if (var[v].dq) {
                    snprintf(key, sizeof key, "%s.%s.nested_absmax", t->name,
                             var[v].tag);
                    ok &= hash_is(json_get(fv, key), w.nested_absmax,
                                  (size_t)w.nested_nblocks * 4);
                    snprintf(key, sizeof key, "%s.%s.offset", t->name,
                             var[v].tag);
                    ok &= hash_is(json_get(fv, key), &w.nested_offset, 4);
                }
                nf4_weight_free(&w);
                count++;
            }
        }
        CHECK(ok && count == 105,
              "blocksize 128, no double quant, blocksize 256: %d weights equal "
              "bitsandbytes' quantize_4bit",
              count);
    }
    st_model_close(m);
    st_model_close(g);
    free(src);
    free(gold);
}

int main(void)
{
    msg_init("test_nf4");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_nf4.%ld", (long)getpid());
    mkdir(tmpdir, 0777);
    const char *top = getenv("TOP");
    char *rp =
        io_path_join(top && *top ? top : ".", "tests/golden/nf4-refs.json");
    char *text;
    size_t len;
    if (io_read_file(rp, &text, &len) == 0) {
        if (json_parse(text, len, rp, 1, &refs) != 0)
            refs = NULL;
        free(text);
    }
    free(rp);
    test_code_book();
    test_thresholds();
    test_kernels_agree();
    test_torch_mean();
    test_py_float();
    test_round_trip();
    test_shared();
    json_free(refs);
    io_remove_tree(tmpdir);
    return CHECK_DONE();
}
