/* packfile.h: the packed file between pack and lora-train.
 *
 * A packed file is one epoch of fixed-length training rows: token ids, a
 * loss weight per token and the document spans inside each row. pack writes
 * the rows once, in an order shuffled by its --seed; EPOCHS ARE NOT REPEATED
 * HERE: lora-train reads the file once and visits the rows in a fresh order
 * each epoch (its own seed).
 *
 * Layout (little-endian; specified in qlora-formats(5)). Every section
 * starts at a multiple of 8 bytes, so the file can be mapped and indexed:
 *
 *   header     one line of JSON text, padded with spaces so that the line
 *              with its final '\n' is a multiple of 8 bytes, beginning with
 *              {"format":"qlora-packed","version":1,... (the magic); members
 *              listed at pack_header. `head -1 FILE | jq .` shows it.
 *   ids        rows * seq_len u32 token ids, row-major. Padding ids are 0.
 *   weights    rows * seq_len u8 loss weights, 0 or 1, row-major, then zero
 *              bytes up to a multiple of 8.
 *   row_spans  rows + 1 u64: the spans of row r are
 *              spans[row_spans[r] .. row_spans[r+1]); row_spans[0] = 0 and
 *              row_spans[rows] = n_spans.
 *   spans      n_spans pairs u32 start, u32 len: the documents of the row,
 *              in increasing order, not overlapping, inside [0, seq_len).
 *   trailer    u32 0xffffffff, u32 0x444e4550 ("PEND"), u64 rows,
 *              u64 n_spans, u64 FNV-1a 64 of every byte from the end of the
 *              header to the start of the trailer.
 *
 * Meaning, for the trainer:
 *   - A span is an attention scope: a token attends to the earlier tokens of
 *     its own span only, and positions (RoPE) count from 0 at the span's
 *     start. Tokens outside every span are padding: never attended to, never
 *     targets. In mode "concat" (the seed's packing) each row is a single
 *     span covering the whole row, so attention crosses documents.
 *   - weights[t] is the weight of token t AS A TARGET, i.e. of predicting
 *     ids[t] from the tokens before it in its span. The first token of every
 *     span and all padding have weight 0, so the loss of a row is
 *     sum_t w[t] * -log p(ids[t] | span prefix) and sum(w) counts the
 *     targets. With loss "all" every other token weighs 1 (the seed's
 *     labels = inputs); with loss "completion" only the tokens from the
 *     record's completion_start on (the completion and its final EOS).
 */
#ifndef PACKFILE_H
#define PACKFILE_H

#include "io.h"
#include "strbuf.h"
#include "tokstream.h"
#include <stddef.h>
#include <stdint.h>

#define PACK_FORMAT "qlora-packed"
#define PACK_VERSION 1
/* The largest seq_len the format allows. */
#define PACK_MAX_SEQ_LEN (1u << 20)
#define PACK_TRAILER_MARK 0xffffffffu
#define PACK_TRAILER_MAGIC 0x444e4550u /* "PEND" */

typedef enum {
    PACK_MODE_BFD,    /* best-fit-decreasing; rows list their documents */
    PACK_MODE_CONCAT, /* the seed's: concatenate, cut, drop the last partial */
} pack_mode;

typedef enum {
    PACK_LOSS_COMPLETION, /* completion tokens (and the final EOS) only */
    PACK_LOSS_ALL,        /* every token (the seed) */
} pack_loss;

typedef enum {
    PACK_OVERLONG_TRUNCATE, /* keep the first seq_len tokens of a record */
    PACK_OVERLONG_SPLIT,    /* cut it into pieces of seq_len, each a span */
} pack_overlong;

/* The header, as JSON members (name: meaning). */
typedef struct pack_header {
    int version;         /* version: 1 */
    uint32_t seq_len;    /* seq_len: tokens per row, 1..PACK_MAX_SEQ_LEN */
    uint32_t vocab_size; /* vocab_size: every id is below it */
    int32_t bos_id;      /* bos_id, eos_id: from the token stream, -1 none */
    int32_t eos_id;
    char tokenizer[32];     /* tokenizer: fingerprint from the token stream */
    pack_mode mode;         /* mode: "bfd" | "concat" */
    pack_loss loss;         /* loss: "completion" | "all" */
    pack_overlong overlong; /* overlong: "truncate" | "split" */
    uint64_t seed;          /* seed: of the row shuffle and the eval split */
    int shuffled;           /* shuffled: true when rows were shuffled */
    int is_eval;            /* split: "train" | "eval" */
    double eval_fraction;   /* eval_fraction: share of records held out */
    uint64_t n_rows;        /* rows */
    uint64_t n_spans;       /* spans */
    uint64_t n_docs;        /* documents: input records placed in rows */
    uint64_t n_tokens;      /* tokens: non-padding tokens in rows */
    uint64_t n_loss_tokens; /* loss_tokens: tokens with weight 1 */
    uint64_t n_truncated;   /* truncated: records longer than seq_len, cut */
    uint64_t n_split;       /* split_records: records split into pieces */
    uint64_t n_dropped;     /* dropped_tokens: input tokens not in any row
                               (truncation, concat's last partial row) */
    char producer[64];      /* producer: "pack 0.1.0" */
} pack_header;

typedef struct pack_span {
    uint32_t start;
    uint32_t len;
} pack_span;

/* A whole packed file in memory. */
typedef struct pack_data {
    pack_header h;
    uint32_t *ids;       /* (n_rows, seq_len) */
    uint8_t *weights;    /* (n_rows, seq_len), 0 or 1 */
    uint64_t *row_spans; /* (n_rows + 1) */
    pack_span *spans;    /* (n_spans) */
} pack_data;

static inline const uint32_t *pack_row_ids(const pack_data *d, uint64_t r)
{
    return d->ids + r * d->h.seq_len;
}
static inline const uint8_t *pack_row_weights(const pack_data *d, uint64_t r)
{
    return d->weights + r * d->h.seq_len;
}
/* The spans of row r; *n set to their count. */
static inline const pack_span *pack_row_spans(const pack_data *d, uint64_t r,
                                              uint32_t *n)
{
    *n = (uint32_t)(d->row_spans[r + 1] - d->row_spans[r]);
    return d->spans + d->row_spans[r];
}

/* Reads and checks a whole packed file (path NULL or "-" = stdin; zstd
 * read transparently): header, sizes, every id below vocab_size, weights
 * 0/1 and 0 at span starts and on padding, spans ordered inside the row,
 * trailer counts and checksum. 0 ok (*d filled, free with pack_data_free),
 * -1 error (one message naming the file; a foreign or future-version file
 * adds a hint to regenerate with pack). */
int pack_read(const char *path, pack_data *d);
/* Writes d (header counts taken from d->h) to w, which the caller owns and
 * commits. d->h.n_rows, n_spans, seq_len must match the arrays. */
void pack_write(io_writer *w, const pack_data *d);
void pack_data_free(pack_data *d);

/* Appends row r as one JSON object (no newline):
 *   {"row":r,"ids":[...],"weights":[...],"spans":[[start,len],...]} */
void pack_dump_row(const pack_data *d, uint64_t r, strbuf *sb);
/* Appends the header as one JSON object (no padding, no newline). */
void pack_header_json(const pack_header *h, strbuf *sb);
/* Appends a summary: the header's counts plus padding share and efficiency
 * (non-padding tokens / (rows * seq_len)). */
void pack_stats_json(const pack_header *h, strbuf *sb);

const char *pack_mode_name(pack_mode m);
const char *pack_loss_name(pack_loss l);
const char *pack_overlong_name(pack_overlong o);

/* --- packing ------------------------------------------------------------ */

/* All records of one or more token streams, concatenated in input order. */
typedef struct pack_input {
    toks_header h;     /* of the first stream; the others must agree */
    uint32_t *ids;     /* (n_tokens) */
    uint64_t *offsets; /* (n_records + 1): record i is ids[off[i]..off[i+1]) */
    uint32_t
        *completion; /* (n_records): completion_start or TOKS_NO_COMPLETION */
    uint64_t n_records;
    uint64_t n_tokens;
    uint64_t cap_tokens, cap_records;
} pack_input;

/* Appends every record of the token stream at path (NULL or "-" = stdin).
 * A stream whose vocab_size or tokenizer differs from the ones already
 * read, or from want_vocab when it is nonzero, is refused. 0 ok, -1 error
 * (message printed). */
int pack_input_read(pack_input *in, const char *path, uint32_t want_vocab);
void pack_input_free(pack_input *in);

typedef struct pack_opts {
    uint32_t seq_len;
    pack_mode mode;
    pack_loss loss;
    pack_overlong overlong;
    uint64_t seed;
    int shuffle;          /* shuffle rows with seed (1) or keep packing order */
    double eval_fraction; /* 0 <= f < 1: records held out into *eval */
} pack_opts;

/* Packs in into train (and eval, when eval_fraction > 0; eval may then not
 * be NULL). Deterministic: the same input and options give the same rows.
 *   - The eval records are chosen by a seeded shuffle of the record
 *     indices: round(eval_fraction * n_records) of them, kept in input
 *     order, and packed the same way as the rest.
 *   - concat: the records' tokens concatenated in input order and cut into
 *     rows of seq_len; the last partial row is dropped; a row is one span.
 *   - bfd: records sorted by length, longest first (ties in input order),
 *     each placed in the row with the least room that still fits it (a new
 *     row when none does); a record is never split across rows except by
 *     PACK_OVERLONG_SPLIT; within a row documents keep placement order.
 *   - Finally, when shuffle is set, the rows are shuffled with seed.
 * 0 ok (possibly with no rows), -1 error: bad options (message printed). */
int pack_build(const pack_input *in, const pack_opts *o, pack_data *train,
               pack_data *eval);

#endif
