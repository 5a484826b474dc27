/* fuzz_sp_encode.c: libFuzzer harness for the tokenizer's text path
 * (sp_encode / sp_decode, lib/sentencepiece.h) with a real model.
 *
 * The model is $FUZZ_SP_MODEL, else $SHARED/models/stories260K/
 * tokenizer.model (run.sh sets one). Input: two bytes giving the
 * prompt/completion boundary, then the text (any bytes: invalid UTF-8,
 * NULs, whitespace runs). Promises checked: ids below the vocabulary size,
 * the boundary index at most the number of ids, the decoded text valid
 * UTF-8 (the model's pieces are), and encoding the same text twice with
 * one encoder gives the same ids (the second time through its cache).
 */
#include "fuzz.h"
#include "json.h"
#include "sentencepiece.h"
#include "strbuf.h"

static sp_model *model;
/* One encoder for the process, as tok keeps one per thread: a fresh one
 * clears a 4 MB segment cache, which would dominate each execution. The
 * second encoding of an input then comes from the cache, and must agree
 * with the first. */
static sp_encoder *enc;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    (void)fuzz_tmpdir();
    char path[1024];
    const char *p = getenv("FUZZ_SP_MODEL");
    if (!p) {
        const char *shared = getenv("SHARED") ? getenv("SHARED") : "../shared";
        snprintf(path, sizeof path, "%s/models/stories260K/tokenizer.model",
                 shared);
        p = path;
    }
    model = sp_model_load(p);
    if (!model) {
        fprintf(stderr, "fuzz_sp_encode: set FUZZ_SP_MODEL or SHARED\n");
        exit(2);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t len = size - 2;
    size_t boundary = ((size_t)data[0] | (size_t)data[1] << 8) % (len + 1);
    const char *text = (const char *)data + 2;
    uint32_t V = sp_model_vocab_size(model);

    sp_encoder *e = enc ? enc : (enc = sp_encoder_new(model));
    sp_ids a = {0}, b = {0};
    size_t bi = (size_t)-1, bi2 = (size_t)-1;
    FUZZ_ASSERT(sp_encode(e, text, len, boundary, &a, &bi) == 0);
    FUZZ_ASSERT(bi <= a.n);
    for (size_t i = 0; i < a.n; i++)
        FUZZ_ASSERT(a.ids[i] < V);
    FUZZ_ASSERT(sp_encode(e, text, len, boundary, &b, &bi2) == 0);
    FUZZ_ASSERT(a.n == b.n && bi == bi2 &&
                (a.n == 0 || memcmp(a.ids, b.ids, a.n * sizeof *a.ids) == 0));
    strbuf out = STRBUF_INIT;
    sp_decode(model, a.ids, a.n, &out);
    FUZZ_ASSERT(utf8_valid(sb_str(&out), out.len, NULL));
    sb_free(&out);
    sp_ids_free(&a);
    sp_ids_free(&b);
    return 0;
}
