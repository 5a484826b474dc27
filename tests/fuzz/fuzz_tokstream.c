/* fuzz_tokstream.c: libFuzzer harness for token streams (lib/tokstream.h),
 * read as tok -d, pack and lora-gen read them: through an io_reader on a
 * file (so zstd-compressed inputs take the decompressing path too).
 *
 * Input: the bytes of a token stream. Promises checked: every record read
 * has ids below vocab_size and a completion_start within the record (or
 * none); bos/eos are -1 or below vocab_size; a stream accepted to its
 * trailer is also accepted by pack_input_read with the same record and
 * token counts, and one refused by the reader is refused there too.
 */
#include "fuzz.h"
#include "packfile.h"
#include "tokstream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write_file("in.tokens", data, size);
    io_reader *r = io_reader_open(path);
    FUZZ_ASSERT(r);
    toks_header h;
    toks_reader *tr = toks_reader_new(r, &h);
    int rc = -1;
    uint64_t n_records = 0, n_tokens = 0;
    if (tr) {
        FUZZ_ASSERT(h.vocab_size > 0);
        FUZZ_ASSERT(h.bos_id >= -1 && h.bos_id < (int64_t)h.vocab_size);
        FUZZ_ASSERT(h.eos_id >= -1 && h.eos_id < (int64_t)h.vocab_size);
        FUZZ_ASSERT(memchr(h.tokenizer, 0, sizeof h.tokenizer));
        FUZZ_ASSERT(memchr(h.producer, 0, sizeof h.producer));
        toks_record rec = {0};
        while ((rc = toks_read_record(tr, &rec)) == 1) {
            FUZZ_ASSERT(rec.n <= TOKS_MAX_RECORD);
            FUZZ_ASSERT(rec.completion_start == TOKS_NO_COMPLETION ||
                        rec.completion_start <= rec.n);
            for (uint32_t i = 0; i < rec.n; i++)
                FUZZ_ASSERT(rec.ids[i] < h.vocab_size);
            n_records++;
            n_tokens += rec.n;
        }
        FUZZ_ASSERT(toks_reader_records(tr) == n_records);
        /* after the end, the reader stays at the end */
        if (rc == 0)
            FUZZ_ASSERT(toks_read_record(tr, &rec) == 0);
        toks_record_free(&rec);
        toks_reader_free(tr);
    }
    io_reader_close(r);

    pack_input in = {0};
    int prc = pack_input_read(&in, path, 0);
    FUZZ_ASSERT((prc == 0) == (rc == 0));
    if (prc == 0)
        FUZZ_ASSERT(in.n_records == n_records && in.n_tokens == n_tokens);
    pack_input_free(&in);
    return 0;
}
