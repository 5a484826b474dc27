/* tiny_pack.h: random packed rows for the tiny-model training tests
 * (tests/unit and tests/gpu): each row holds documents of random lengths
 * back to back, may end early (padding), and leaves some tokens without a
 * loss. The random numbers come from the caller's generator, drawn in a
 * fixed order (a document's length, then its prompt length when the rule
 * needs one, then per token its id and, for TP_DROP4, its loss draw), so a
 * test's data depends only on its seed. */
#ifndef TINY_PACK_H
#define TINY_PACK_H

#include <stdint.h>
#include <string.h>

#include "msg.h"
#include "packfile.h"

/* Which tokens carry a loss. The first token of a document never does. */
enum tiny_pack_loss {
    TP_ALL,        /* every other token */
    TP_PROMPT,     /* those at or after a random prompt length */
    TP_PROMPT_ODD, /* as TP_PROMPT in odd rows, every one in even rows */
    TP_DROP4       /* each with probability 3/4 */
};

typedef struct tiny_pack_spec {
    int rows, seq;
    uint32_t max_len; /* a document has 2 .. max_len + 1 tokens */
    uint32_t cut;     /* row r ends cut * (r % 3) tokens early */
    enum tiny_pack_loss loss;
} tiny_pack_spec;

/* d: filled, its arrays from xcalloc (pack_data_free releases them). */
static void tiny_pack(pack_data *d, int vocab, const tiny_pack_spec *s, uint64_t (*rnd)(void))
{
    const size_t cells = (size_t)s->rows * (size_t)s->seq;
    memset(d, 0, sizeof *d);
    d->h.version = PACK_VERSION;
    d->h.seq_len = (uint32_t)s->seq;
    d->h.vocab_size = (uint32_t)vocab;
    d->h.n_rows = (uint64_t)s->rows;
    d->ids = xcalloc(cells, sizeof *d->ids);
    d->weights = xcalloc(cells, 1);
    d->row_spans = xcalloc((size_t)s->rows + 1, sizeof *d->row_spans);
    d->spans = xcalloc(cells, sizeof *d->spans);
    uint64_t ns = 0;
    for (int r = 0; r < s->rows; r++) {
        d->row_spans[r] = ns;
        const uint32_t end = (uint32_t)s->seq - (uint32_t)(r % 3) * s->cut;
        uint32_t pos = 0;
        while (pos + 2 <= end) {
            uint32_t len = 2 + (uint32_t)(rnd() % s->max_len);
            len = len > end - pos ? end - pos : len;
            d->spans[ns].start = pos;
            d->spans[ns].len = len;
            ns++;
            uint32_t prompt = 0;
            if (s->loss == TP_PROMPT || s->loss == TP_PROMPT_ODD)
                prompt = (uint32_t)(rnd() % (len / 2 + 1));
            if (s->loss == TP_PROMPT_ODD && r % 2 == 0)
                prompt = 0;
            for (uint32_t p = 0; p < len; p++) {
                const size_t i = (size_t)r * (size_t)s->seq + pos + p;
                d->ids[i] = 3 + (uint32_t)(rnd() % (uint64_t)(vocab - 3));
                d->weights[i] = p > 0 && p >= prompt;
                if (s->loss == TP_DROP4)
                    d->weights[i] = d->weights[i] && rnd() % 4 != 0;
            }
            pos += len;
        }
    }
    d->row_spans[s->rows] = ns;
    d->h.n_spans = ns;
}

#endif
