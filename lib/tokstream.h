/* tokstream.h: the binary token stream between tok, pack and lora-gen.
 *
 * Layout (little-endian; specified in qlora-formats(5)):
 *
 *   header   one line of JSON text, padded with spaces so that the line
 *            including its final '\n' is a multiple of 8 bytes:
 *            {"format":"qlora-tokens","version":1,"vocab_size":32000,
 *             "bos_id":1,"eos_id":2,"tokenizer":"<fnv1a64 hex of model>",
 *             "producer":"tok 0.1"}
 *            so `head -1 FILE | jq .` shows it.
 *   records  u32 n_tokens, u32 completion_start (TOKS_NO_COMPLETION when
 *            the record is a prompt only), then n_tokens u32 token ids.
 *   trailer  u32 0xffffffff, u32 0x444e4554 ("TEND"), u64 n_records,
 *            u64 n_tokens (sum over records).
 *
 * A stream that ends before its trailer, or whose trailer counts disagree
 * with what was read, is truncated or corrupt and is refused.
 */
#ifndef TOKSTREAM_H
#define TOKSTREAM_H

#include "io.h"
#include <stdint.h>

#define TOKS_FORMAT "qlora-tokens"
#define TOKS_VERSION 1
#define TOKS_NO_COMPLETION 0xffffffffu
#define TOKS_TRAILER_MARK 0xffffffffu
#define TOKS_TRAILER_MAGIC 0x444e4554u
#define TOKS_MAX_RECORD (1u << 30)

typedef struct toks_header {
    int version;
    uint32_t vocab_size;
    int32_t bos_id; /* -1 when the vocabulary has none */
    int32_t eos_id;
    char tokenizer[32]; /* hex fingerprint of the tokenizer model, or "" */
    char producer[64];  /* "tok 0.1" */
} toks_header;

typedef struct toks_record {
    uint32_t *ids;
    uint32_t n;
    uint32_t cap;
    uint32_t completion_start; /* index of the first completion token */
} toks_record;

typedef struct toks_writer toks_writer;
/* Writes the header to w (which the caller owns and commits). */
toks_writer *toks_writer_new(io_writer *w, const toks_header *h);
void toks_write_record(toks_writer *tw, const uint32_t *ids, uint32_t n,
                       uint32_t completion_start);
/* Writes the trailer and frees tw (not w). */
void toks_writer_finish(toks_writer *tw);

typedef struct toks_reader toks_reader;
/* Reads and checks the header from r (which the caller owns). NULL on a
 * foreign file, unknown version or malformed header (message names the
 * input, and a hint says how to regenerate). */
toks_reader *toks_reader_new(io_reader *r, toks_header *h);
/* 1 a record was read into rec (rec->ids grown as needed), 0 the trailer
 * was read and checked, -1 error (truncation, id >= vocab_size, bad
 * completion index, trailer mismatch). */
int toks_read_record(toks_reader *tr, toks_record *rec);
uint64_t toks_reader_records(const toks_reader *tr);
void toks_reader_free(toks_reader *tr);
void toks_record_free(toks_record *rec);

/* 64-bit FNV-1a over bytes, as 16 lower-case hex digits (the tokenizer
 * fingerprint). */
void toks_fingerprint(const void *data, size_t n, char out[17]);

#endif
