/* fuzz_sentencepiece.c: libFuzzer harness for SentencePiece model files
 * (sp_model_parse, lib/sentencepiece.h).
 *
 * Input: the bytes of a serialized ModelProto (a tokenizer.model). When it
 * loads, a fixed text (ASCII, CJK, invalid UTF-8, literal "<s>", runs of
 * spaces) is encoded with a prompt/completion boundary and decoded again,
 * so the tables built at load time are exercised too. Promises checked:
 * every id is below the vocabulary size, the boundary index is at most the
 * number of ids, the special ids are control pieces, and piece lookups
 * agree with piece texts.
 */
#include "fuzz.h"
#include "sentencepiece.h"
#include "strbuf.h"

static const char text[] = "Hello  world!\n### Response:\n\xe7\x94\x9f\xe6\xb4"
                           "\xbb <s>\xff\xc0\xaf x\t\xe2\x96\x81 end";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    (void)fuzz_tmpdir(); /* msg_init */
    sp_model *m = sp_model_parse(data, size, "fuzz.model");
    if (!m)
        return 0;
    uint32_t V = sp_model_vocab_size(m);
    FUZZ_ASSERT(V > 0);
    int32_t sp[4] = {sp_model_bos_id(m), sp_model_eos_id(m), sp_model_pad_id(m),
                     sp_model_unk_id(m)};
    for (int k = 0; k < 4; k++)
        FUZZ_ASSERT(sp[k] >= -1 && sp[k] < (int64_t)V);
    for (int k = 0; k < 3; k++)
        if (sp[k] >= 0)
            FUZZ_ASSERT(sp_model_type(m, (uint32_t)sp[k]) == SP_PIECE_CONTROL);
    FUZZ_ASSERT(sp[3] >= 0 &&
                sp_model_type(m, (uint32_t)sp[3]) == SP_PIECE_UNKNOWN);
    for (uint32_t id = 0; id < V && id < 64; id++) {
        size_t len;
        const char *p = sp_model_piece(m, id, &len);
        FUZZ_ASSERT(p && len > 0);
        int32_t back = sp_model_piece_to_id(m, p, len);
        FUZZ_ASSERT(back >= 0 && (uint32_t)back < V);
        size_t blen;
        const char *bp = sp_model_piece(m, (uint32_t)back, &blen);
        FUZZ_ASSERT(blen == len && memcmp(bp, p, len) == 0);
    }

    sp_encoder *e = sp_encoder_new(m);
    sp_ids ids = {0};
    size_t len = sizeof text - 1, bi = (size_t)-1;
    FUZZ_ASSERT(sp_encode(e, text, len, 28, &ids, &bi) == 0);
    FUZZ_ASSERT(bi <= ids.n);
    size_t n1 = ids.n;
    FUZZ_ASSERT(sp_encode(e, "", 0, 0, &ids, &bi) == 0);
    FUZZ_ASSERT(bi == ids.n - n1);
    for (size_t i = 0; i < ids.n; i++)
        FUZZ_ASSERT(ids.ids[i] < V);
    strbuf out = STRBUF_INIT;
    sp_decode(m, ids.ids, ids.n, &out);
    /* Every id decodes, including control and byte pieces. */
    uint32_t all[8];
    for (int k = 0; k < 8; k++)
        all[k] = (uint32_t)(k * 7919u) % V;
    sp_decode(m, all, 8, &out);
    sb_free(&out);
    sp_ids_free(&ids);
    sp_encoder_free(e);
    sp_model_free(m);
    return 0;
}
