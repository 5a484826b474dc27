/* fuzz_nf4_state.c: libFuzzer harness for an NF4 weight's quantization
 * state as nf4-quant directories and bitsandbytes checkpoints hold it
 * (nf4_weight_load, lib/nf4.h): the quant_state JSON tensor
 * "X.quant_state.bitsandbytes__nf4" and the state tensors beside it.
 *
 * Input: the quant_state JSON, then optionally the line "\n--- state ---\n"
 * and bytes that overwrite, from the start, the state tensors' data laid
 * end to end: quant_map (16 f32), then absmax (nested: one u8 code a block,
 * then nested_absmax f32 and nested_quant_map, 256 f32; not nested: one f32
 * a block). The weight itself is fixed: a random 4 x 96 matrix quantized
 * once at start (blocks of 64), nested when the JSON mentions
 * "nested_offset", so JSON that describes it (seeds.sh: real quant_state
 * JSON from nf4-quant and bitsandbytes checkpoints, reshaped to 4 x 96)
 * loads, and the rest is refused. Everything goes through a real
 * model.safetensors (st_write_file, st_model_open).
 * Promises checked: a weight loaded has its JSON's shape and a valid
 * block size, and dequantizes to finite values only (a NaN, an infinity
 * or an overflow anywhere in the state is refused at load, issue 11); its
 * quant_state JSON written back parses; a weight refused is left empty.
 */
#include <math.h>

#include "fuzz.h"
#include "json.h"
#include "nf4.h"
#include "safetensors.h"

#define ROWS 4
#define COLS 96
#define NUMEL (ROWS * COLS)

static const char sep[] = "\n--- state ---\n";
static nf4_weight q[2]; /* [0] plain, [1] nested */

static const uint8_t *find(const uint8_t *h, size_t n, const char *s, size_t k)
{
    for (size_t i = 0; i + k <= n; i++)
        if (h[i] == (uint8_t)s[0] && memcmp(h + i, s, k) == 0)
            return h + i;
    return NULL;
}

static void setup(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    float x[NUMEL];
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < NUMEL; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = ((float)(s >> 40) / 16777216.0f - 0.5f) * (i % 64 == 0 ? 8.0f : 1.0f);
    }
    const int64_t shape[2] = {ROWS, COLS};
    for (int n = 0; n < 2; n++)
        FUZZ_ASSERT(nf4_quantize(x, ST_F32, 2, shape, 64, n, 1, &q[n]) == 0);
}

/* overwrites dst[0..n) with the next input bytes, while they last */
static void overlay(uint8_t *dst, size_t n, const uint8_t **in, size_t *left)
{
    size_t k = *left < n ? *left : n;
    if (!k)
        return;
    memcpy(dst, *in, k);
    *in += k;
    *left -= k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    const uint8_t *cut = find(data, size, sep, sizeof sep - 1);
    size_t jlen = cut ? (size_t)(cut - data) : size;
    const uint8_t *in = cut ? cut + sizeof sep - 1 : NULL;
    size_t left = cut ? size - (size_t)(in - data) : 0;
    int nested = find(data, jlen, "nested_offset", 13) != NULL;
    const nf4_weight *w = &q[nested];

    /* the state, overwritten with the input's bytes */
    float qmap[16], nabs[1], nmap[256], absf[NUMEL / 64];
    uint8_t codes[NUMEL / 64];
    memcpy(qmap, w->quant_map, sizeof qmap);
    overlay((uint8_t *)qmap, sizeof qmap, &in, &left);
    if (nested) {
        FUZZ_ASSERT(w->nblocks == NUMEL / 64 && w->nested_nblocks == 1);
        memcpy(codes, w->absmax_code, sizeof codes);
        memcpy(nabs, w->nested_absmax, sizeof nabs);
        memcpy(nmap, w->nested_map, sizeof nmap);
        overlay(codes, sizeof codes, &in, &left);
        overlay((uint8_t *)nabs, sizeof nabs, &in, &left);
        overlay((uint8_t *)nmap, sizeof nmap, &in, &left);
    } else {
        memcpy(absf, w->absmax, sizeof absf);
        overlay((uint8_t *)absf, sizeof absf, &in, &left);
    }
    st_tensor t[6];
    memset(t, 0, sizeof t);
    size_t n = 0;
#define TENSOR(nm, dt, len, ptr)                                               \
    do {                                                                       \
        t[n].name = (char *)(nm);                                              \
        t[n].dtype = (dt);                                                     \
        t[n].ndim = 1;                                                         \
        t[n].shape[0] = (len);                                                 \
        t[n].numel = (len);                                                    \
        t[n].data = (ptr);                                                     \
        n++;                                                                   \
    } while (0)
    TENSOR("w.weight", ST_U8, (NUMEL + 1) / 2, w->packed);
    TENSOR("w.weight.quant_map", ST_F32, 16, qmap);
    TENSOR("w.weight.quant_state.bitsandbytes__nf4", ST_U8, (int64_t)jlen,
           jlen ? (const void *)data : (const void *)"");
    if (nested) {
        TENSOR("w.weight.absmax", ST_U8, NUMEL / 64, codes);
        TENSOR("w.weight.nested_absmax", ST_F32, 1, nabs);
        TENSOR("w.weight.nested_quant_map", ST_F32, 256, nmap);
    } else {
        TENSOR("w.weight.absmax", ST_F32, NUMEL / 64, absf);
    }
    char dir[300], path[320];
    snprintf(dir, sizeof dir, "%s/nf4", fuzz_tmpdir());
    mkdir(dir, 0700);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FUZZ_ASSERT(st_write_file(path, t, n, NULL, 0) == 0);
    st_model *m = NULL;
    FUZZ_ASSERT(st_model_open(dir, &m) == 0);

    nf4_weight out;
    if (nf4_weight_load(m, "w.weight", &out) != 0) {
        FUZZ_ASSERT(!out.packed && !out.absmax && !out.nested_absmax && out.numel == 0);
        st_model_close(m);
        return 0;
    }
    FUZZ_ASSERT(out.ndim >= 0 && out.ndim <= ST_MAX_DIMS);
    int64_t numel = 1;
    for (int d = 0; d < out.ndim; d++)
        numel *= out.shape[d];
    FUZZ_ASSERT(numel == out.numel && numel == NUMEL);
    FUZZ_ASSERT(nf4_blocksize_ok(out.blocksize));
    FUZZ_ASSERT(out.nblocks == (out.numel + out.blocksize - 1) / out.blocksize);
    FUZZ_ASSERT(out.nested == nested);
    float y[NUMEL];
    FUZZ_ASSERT(nf4_dequantize(&out, 0, out.numel, y) == 0);
    for (int64_t i = 0; i < out.numel; i++)
        FUZZ_ASSERT(isfinite(y[i]));
    strbuf sb = STRBUF_INIT;
    nf4_quant_state_json(&out, &sb);
    json_value *j = NULL;
    FUZZ_ASSERT(json_parse_quiet(sb.buf, sb.len, "quant_state", 1, &j, NULL) == 0);
    json_free(j);
    sb_free(&sb);
    nf4_weight_free(&out);
    st_model_close(m);
    return 0;
}
