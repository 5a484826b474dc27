/* test_sentencepiece.c: the SentencePiece model reader, encoder and decoder.
 *
 * Expected ids come from REFERENCE.md section 5 or, where marked "spm", from
 * the sentencepiece Python package 0.2 (sp.encode / sp.decode with the same
 * model file), generated once by hand; tests/cli/tok.sh compares whole data
 * sets against the package directly when it is installed.
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "io.h"
#include "msg.h"
#include "sentencepiece.h"
#include "strbuf.h"

#define NO_BOUNDARY ((size_t)-1)

static sp_encoder *enc;

/* Encodes text[0..len) and compares with want[0..n). */
static int encodes_to(const char *text, size_t len, const uint32_t *want,
                      size_t n)
{
    sp_ids ids = {0};
    size_t bi;
    if (sp_encode(enc, text, len, NO_BOUNDARY, &ids, &bi) < 0)
        return 0;
    int ok =
        ids.n == n && (n == 0 || memcmp(ids.ids, want, n * sizeof *want) == 0);
    if (!ok) {
        fprintf(stderr, "    got");
        for (size_t i = 0; i < ids.n; i++)
            fprintf(stderr, " %u", ids.ids[i]);
        fprintf(stderr, "\n");
    }
    sp_ids_free(&ids);
    return ok;
}

#define ENC(text, ...)                                                         \
    do {                                                                       \
        static const uint32_t want_[] = {__VA_ARGS__};                         \
        CHECK(encodes_to(text, sizeof text - 1, want_,                         \
                         sizeof want_ / sizeof *want_),                        \
              "encode %s", #text);                                             \
    } while (0)

static void enc_empty(void)
{
    sp_ids ids = {0};
    size_t bi = 99;
    CHECK(sp_encode(enc, "", 0, 0, &ids, &bi) == 0 && ids.n == 0 && bi == 0,
          "encode \"\" gives no ids");
    sp_ids_free(&ids);
}

/* The boundary index of prompt+completion. */
static size_t boundary_of(const char *prompt, const char *completion,
                          size_t *n_ids)
{
    strbuf sb = STRBUF_INIT;
    sb_puts(&sb, prompt);
    sb_puts(&sb, completion);
    sp_ids ids = {0};
    size_t bi = 12345;
    sp_encode(enc, sb_str(&sb), sb.len, strlen(prompt), &ids, &bi);
    *n_ids = ids.n;
    sp_ids_free(&ids);
    sb_free(&sb);
    return bi;
}

static int decodes_to(const sp_model *m, const uint32_t *ids, size_t n,
                      const char *want, size_t want_len)
{
    strbuf sb = STRBUF_INIT;
    sb_puts(&sb, "keep:"); /* decode appends */
    sp_decode(m, ids, n, &sb);
    int ok = sb.len == 5 + want_len && memcmp(sb.buf + 5, want, want_len) == 0;
    if (!ok)
        fprintf(stderr, "    got '%s'\n", sb_str(&sb) + 5);
    sb_free(&sb);
    return ok;
}

#define DEC(m, want, ...)                                                      \
    do {                                                                       \
        static const uint32_t ids_[] = {__VA_ARGS__};                          \
        CHECK(decodes_to(m, ids_, sizeof ids_ / sizeof *ids_, want,            \
                         sizeof want - 1),                                     \
              "decode to %s", #want);                                          \
    } while (0)

static int round_trips(const sp_model *m, const char *text, size_t len)
{
    sp_ids ids = {0};
    sp_encode(enc, text, len, NO_BOUNDARY, &ids, NULL);
    strbuf sb = STRBUF_INIT;
    sp_decode(m, ids.ids, ids.n, &sb);
    int ok = sb.len == len && (len == 0 || memcmp(sb.buf, text, len) == 0);
    sb_free(&sb);
    sp_ids_free(&ids);
    return ok;
}

static void test_llama(const char *path)
{
    sp_model *m = sp_model_load(path);
    CHECK(m != NULL, "llama2 tokenizer.model loads");
    if (!m)
        return;
    CHECK(sp_model_vocab_size(m) == 32000, "llama2 has 32000 pieces");
    CHECK(sp_model_bos_id(m) == 1 && sp_model_eos_id(m) == 2 &&
              sp_model_unk_id(m) == 0 && sp_model_pad_id(m) == -1,
          "llama2 unk=0 bos=1 eos=2, no pad");
    CHECK(strlen(sp_model_fingerprint(m)) == 16,
          "fingerprint is 16 hex digits");
    CHECK(sp_model_piece_to_id(m, "<0x0A>", 6) == 13 &&
              sp_model_piece_to_id(m, "<0x00>", 6) == 3 &&
              sp_model_piece_to_id(m, "<0xFF>", 6) == 258,
          "byte pieces are ids 3..258, newline 13");
    CHECK(sp_model_type(m, 1) == SP_PIECE_CONTROL &&
              sp_model_type(m, 0) == SP_PIECE_UNKNOWN &&
              sp_model_type(m, 13) == SP_PIECE_BYTE &&
              sp_model_type(m, 910) == SP_PIECE_NORMAL,
          "piece types");
    size_t len;
    const char *p = sp_model_piece(m, 259, &len);
    CHECK(len == 6 && memcmp(p, "\xe2\x96\x81\xe2\x96\x81", 6) == 0 &&
              sp_model_score(m, 259) == -1e9f,
          "piece 259 is U+2581 U+2581 with score -1e9 (spm)");

    enc = sp_encoder_new(m);
    /* REFERENCE.md section 5 */
    ENC("This is a test", 910, 338, 263, 1243);
    ENC("The quick brown fox jumps over the lazy dog.", 450, 4996, 17354, 1701,
        29916, 432, 17204, 975, 278, 17366, 11203, 29889);
    ENC("\xe7\x94\x9f\xe6\xb4\xbb\xe7\x9a\x84\xe7\x9c\x9f\xe8\xb0\x9b\xe6\x98"
        "\xaf",
        29871, 30486, 31704, 30210, 30848, 235, 179, 158, 30392);
    ENC("### Instruction:\nUse the Input below", 835, 2799, 4080, 29901, 13,
        11403, 278, 10567, 2400);
    /* spm */
    enc_empty();
    ENC(" ", 259);
    ENC("  ", 1678);
    ENC("\t", 29871, 12);
    ENC("<s>", 529, 29879, 29958);
    ENC("\xf0\x9f\x98\x80", 29871, 243, 162, 155, 131);
    ENC("Hello world <s> \n\n  x", 15043, 3186, 529, 29879, 29958, 29871, 13,
        13, 29871, 921);
    ENC("\0", 29871, 3);
    ENC("x  ", 921, 259);
    ENC(" leading", 29871, 8236);
    ENC("trailing ", 25053, 29871);
    ENC("a\xcc\x81", 263, 30103);
    ENC("\xe2\x96\x81", 259);
    /* spm, invalid UTF-8 (each bad byte is U+FFFD) */
    ENC("a\xff"
        "b",
        263, 30140, 29890);
    ENC("\xe7\x94", 29871, 26308);
    ENC("\xed\xa0\x80x", 29871, 26308, 30140, 29916);
    ENC("\xf4\x90\x80\x80", 29871, 26308, 26308);

    /* The completion's first token: tokens are ▁This ▁is ▁a ▁test. */
    size_t n;
    CHECK(boundary_of("This is", " a test", &n) == 2 && n == 4,
          "boundary between tokens");
    CHECK(boundary_of("", "This is", &n) == 0, "empty prompt: the first token");
    CHECK(boundary_of("This is", "", &n) == n,
          "empty completion: past the last token");
    CHECK(boundary_of("This i", "s a test", &n) == 1,
          "a token merged across the boundary belongs to the completion");
    CHECK(boundary_of("\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80", &n) == 5 &&
              n == 9,
          "byte-fallback characters stay on their side");
    CHECK(boundary_of("### Response:\n", "When did", &n) == 4,
          "after the newline of the seed template's prompt");

    /* Decoding (spm) */
    DEC(m, "This is a test", 1, 910, 338, 263, 1243, 2);
    DEC(m, " \xe2\x81\x87 ", 0);
    DEC(m, "\xef\xbf\xbd\xef\xbf\xbd>", 3 + 0xf0, 3 + 0x9f, 65);
    DEC(m, "\xef\xbf\xbd\xef\xbf\xbd", 3 + 0xe7, 3 + 0x94);
    DEC(m, " \n", 29871, 29871, 13);
    DEC(m, " The", 1, 29871, 450);
    DEC(m, "\n ", 13, 29871);
    DEC(m, "\xf0\x9f\x98\x80", 29871, 243, 162, 155, 131);
    DEC(m, "", 1, 2);

    static const char *const texts[] = {
        "",
        " ",
        "   leading and trailing   ",
        "a\tb\n\nc\r\n",
        "\x01\x02\x1f\x7f",
        "\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd \xe7\x94\x9f\xe6\xb4\xbb",
        "<s> </s> <unk>",
        "\xef\xbf\xbd",
        "\xf4\x8f\xbf\xbf\xef\xbf\xbf",
    };
    int all = 1;
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++)
        all &= round_trips(m, texts[i], strlen(texts[i]));
    all &= round_trips(m, "nul\0inside", 10);
    CHECK(all, "decode(encode(x)) == x for valid UTF-8 without U+2581");
    /* U+2581 is SentencePiece's space: it decodes as ' ' (spm) */
    DEC(m, " ", 259);

    /* A long word and a long run of spaces (past the segment cache). */
    char big[3001];
    memset(big, 'a', 3000);
    big[3000] = '\0';
    CHECK(round_trips(m, big, 3000), "3000 a's round-trip");
    memset(big, ' ', 3000);
    CHECK(round_trips(m, big, 3000), "3000 spaces round-trip");
    sp_encoder_free(enc);
    sp_model_free(m);
}

static void test_stories(const char *path)
{
    sp_model *m = sp_model_load(path);
    CHECK(m != NULL, "stories260K tokenizer.model loads");
    if (!m)
        return;
    CHECK(sp_model_vocab_size(m) == 512, "stories260K has 512 pieces");
    enc = sp_encoder_new(m);
    /* spm; this model removes extra whitespace */
    enc_empty();
    ENC("   ");
    ENC("  Hello   world  ", 346, 306, 414, 263, 304, 341);
    ENC("Once upon a time", 403, 407, 261, 378);
    ENC("\t x \t", 410, 12, 410, 444, 410, 12);
    ENC("\xe7\x94\x9f", 410, 234, 151, 162);
    DEC(m, "Hello world", 346, 306, 414, 263, 304, 341);
    DEC(m, "t t", 259, 259);
    /* its unk_surface is the literal text " \342\201\207 " */
    DEC(m, " \\342\\201\\207 ", 0);
    sp_encoder_free(enc);
    sp_model_free(m);
}

/* Foreign, corrupt and unsupported model files: NULL, never a crash. */
static void test_bad_models(const char *path)
{
    char *data;
    size_t len;
    if (io_read_file(path, &data, &len) < 0)
        return;
    msg_verbosity = 0;
    /* stderr would be noisy: the messages are checked by tests/cli/tok.sh */
    fflush(stderr);
    int saved = dup(2), null = open("/dev/null", O_WRONLY);
    dup2(null, 2);
    close(null);

    int all_null = 1;
    static const size_t cuts[] = {0, 1, 2, 7, 100, 1000, 250000};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        sp_model *m =
            sp_model_parse(data, cuts[i] < len ? cuts[i] : len - 1, "cut");
        all_null &= m == NULL;
        sp_model_free(m);
    }
    sp_model *ok = sp_model_parse(data, len, "whole");
    int whole = ok != NULL;
    sp_model_free(ok);

    const char *json = "{\"format\":\"not a model\"}";
    sp_model *mj = sp_model_parse(json, strlen(json), "json");

    char *noise = xmalloc(4096);
    uint32_t x = 12345;
    for (int i = 0; i < 4096; i++) {
        x = x * 1664525u + 1013904223u;
        noise[i] = (char)(x >> 24);
    }
    sp_model *mn = sp_model_parse(noise, 4096, "noise");

    /* A later trainer_spec/normalizer_spec occurrence merges into the
     * first, as protobuf specifies: this is how the variants are made. */
    static const struct {
        const char *bytes;
        size_t n;
        const char *what;
    } tails[] = {
        {"\x12\x02\x18\x01", 4, "unigram model refused"},
        {"\x12\x02\x18\x03", 4, "word model refused"},
        {"\x1a\x03\x12\x01x", 5, "non-empty precompiled_charsmap refused"},
        {"\x2a\x03\x12\x01x", 5, "non-empty denormalizer charsmap refused"},
        {"\x12\x03\xc0\x01\x01", 5, "treat_whitespace_as_suffix refused"},
        {"\x12\x03\x98\x02\x00", 5,
         "byte pieces without byte_fallback refused"},
        {"\x0a\x06\x0a\x04\xe2\x96\x81t", 8, "a duplicate piece refused"},
        {"\x0a\x04\x0a\x02\x61\x61\x0a", 7, "a truncated field refused"},
    };
    char *buf = xmalloc(len + 16);
    memcpy(buf, data, len);
    int refused[sizeof tails / sizeof *tails];
    for (size_t i = 0; i < sizeof tails / sizeof *tails; i++) {
        memcpy(buf + len, tails[i].bytes, tails[i].n);
        sp_model *mv = sp_model_parse(buf, len + tails[i].n, "variant");
        refused[i] = mv == NULL;
        sp_model_free(mv);
    }
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    msg_verbosity = 1;

    CHECK(whole, "the whole model parses");
    CHECK(all_null, "truncated model files are refused");
    CHECK(mj == NULL, "a JSON file is refused");
    CHECK(mn == NULL, "random bytes are refused");
    for (size_t i = 0; i < sizeof tails / sizeof *tails; i++)
        CHECK(refused[i], "%s", tails[i].what);
    sp_model_free(mj);
    sp_model_free(mn);
    free(noise);
    free(buf);
    free(data);
}

int main(void)
{
    msg_init("test_sentencepiece");
    const char *shared = check_shared();
    char llama[4096], stories[4096];
    snprintf(llama, sizeof llama, "%s/models/llama2-tokenizer/tokenizer.model",
             shared);
    snprintf(stories, sizeof stories, "%s/models/stories260K/tokenizer.model",
             shared);
    if (access(llama, R_OK) != 0 || access(stories, R_OK) != 0) {
        SKIP("sentencepiece: no tokenizer models under '%s'", shared);
        return 77;
    }
    test_llama(llama);
    test_stories(stories);
    test_bad_models(llama);
    return CHECK_DONE();
}
