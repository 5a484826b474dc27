/* sentencepiece.h: the SentencePiece BPE tokenizer (Llama's), exact and fast.
 *
 * A .model file is a serialized sentencepiece ModelProto; it is parsed here
 * by hand (no protobuf library). Encoding reproduces SentencePiece's
 * `encode` id for id: its normalizer (dummy prefix, whitespace escaping and,
 * when the model asks for it, removal of extra whitespace), user-defined
 * pieces matched greedily and never merged, BPE merges by descending piece
 * score with ties going to the leftmost pair, byte fallback (<0xNN> pieces
 * for the UTF-8 bytes of characters outside the vocabulary), and the
 * resegmentation of UNUSED pieces. Decoding reproduces its `decode`.
 *
 * Supported: BPE models with an empty (identity) precompiled_charsmap and
 * whitespace treated as a prefix. Unigram/word/char models, non-empty
 * charsmaps and treat_whitespace_as_suffix are refused with one message at
 * load time rather than tokenized differently from SentencePiece.
 *
 * Literal text such as "<s>" is never a control token: control, unknown and
 * byte pieces are only produced by the caller (BOS/EOS) or by fallback.
 */
#ifndef SENTENCEPIECE_H
#define SENTENCEPIECE_H

#include <stddef.h>
#include <stdint.h>

#include "io.h"
#include "strbuf.h"
#include "tokstream.h"

/* ModelProto.SentencePiece.Type, with the proto's numbers. */
typedef enum {
    SP_PIECE_NORMAL = 1,
    SP_PIECE_UNKNOWN = 2,
    SP_PIECE_CONTROL = 3,
    SP_PIECE_USER_DEFINED = 4,
    SP_PIECE_UNUSED = 5,
    SP_PIECE_BYTE = 6,
} sp_piece_type;

typedef struct sp_model sp_model;

/* Parses a serialized ModelProto data[0..len). name is the file named in
 * messages. Returns the model, or NULL after one message (a foreign or
 * corrupt file, an invalid vocabulary, or an unsupported model kind). */
sp_model *sp_model_parse(const void *data, size_t len, const char *name);
/* Reads path (zstd-compressed files too) and parses it; the fingerprint is
 * toks_fingerprint() of the file's bytes. NULL after one message. */
sp_model *sp_model_load(const char *path);
void sp_model_free(sp_model *m);

uint32_t sp_model_vocab_size(const sp_model *m);
/* The ids SentencePiece reports (bos_id() etc.: the control piece named by
 * trainer_spec, default "<s>", "</s>", "<pad>"), -1 when absent. */
int32_t sp_model_bos_id(const sp_model *m);
int32_t sp_model_eos_id(const sp_model *m);
int32_t sp_model_pad_id(const sp_model *m);
int32_t sp_model_unk_id(const sp_model *m);
/* 16 lower-case hex digits: FNV-1a 64 of the model file ("" when parsed
 * from memory). */
const char *sp_model_fingerprint(const sp_model *m);
/* Piece id (< vocab size): its text (not NUL-terminated in general; *len
 * gets the length), score and type. */
const char *sp_model_piece(const sp_model *m, uint32_t id, size_t *len);
float sp_model_score(const sp_model *m, uint32_t id);
sp_piece_type sp_model_type(const sp_model *m, uint32_t id);
/* The id of the piece whose text is s[0..n) (any type), or -1. */
int32_t sp_model_piece_to_id(const sp_model *m, const char *s, size_t n);

/* A growable id array; the caller owns ids (free()). */
typedef struct sp_ids {
    uint32_t *ids;
    size_t n;
    size_t cap;
} sp_ids;

void sp_ids_push(sp_ids *v, uint32_t id);
void sp_ids_free(sp_ids *v);

/* Per-thread scratch space for encoding; one model may be shared by many
 * encoders in many threads (the model is read-only after loading). */
typedef struct sp_encoder sp_encoder;

sp_encoder *sp_encoder_new(const sp_model *m);
void sp_encoder_free(sp_encoder *e);

/* Encodes text[0..len) exactly as SentencePiece's encode does (no BOS or
 * EOS) and appends the ids to out. Invalid UTF-8 is handled as SentencePiece
 * does (each bad byte becomes U+FFFD).
 *
 * boundary splits the text into a prompt text[0..boundary) and a
 * completion text[boundary..len); when boundary_index is not NULL it
 * receives the index, counted from the first id appended by this call, of
 * the first token that encodes at least one character of the completion (a
 * token merged from characters on both sides belongs to the completion; so
 * does the dummy-prefix space when the prompt is empty), or the number of
 * ids appended when no token does (an empty or whitespace-only completion).
 * Returns 0, or -1 after a message when the text is over 1 GiB. */
int sp_encode(sp_encoder *e, const char *text, size_t len, size_t boundary,
              sp_ids *out, size_t *boundary_index);

/* Appends SentencePiece's decode of ids[0..n) (each < vocab size) to out:
 * control pieces vanish, byte pieces are reassembled into UTF-8 (each byte
 * that does not form a valid character becomes U+FFFD), the unknown piece
 * becomes trainer_spec's unk_surface, U+2581 becomes a space, and the
 * leading dummy-prefix space is removed. The result is valid UTF-8 whenever
 * the pieces are. */
void sp_decode(const sp_model *m, const uint32_t *ids, size_t n, strbuf *out);

/* JSON Lines records to a token stream (what `tok -m MODEL` does). */
typedef struct sp_jsonl_options {
    int add_bos; /* BOS first (when the model has one) */
    int add_eos; /* EOS last, except for prompt-only records */
    int threads; /* >= 1; records are encoded in parallel, written in order */
} sp_jsonl_options;

/* Reads every JSON Lines record of r and writes one token stream record
 * each to tw. A record is an object with either "prompt" (and optionally
 * "completion") or "text", all strings; other members are ignored, blank
 * lines are skipped. prompt+completion is encoded as one text and the
 * record's completion_start is sp_encode's boundary_index (plus one for
 * BOS); a prompt without completion gets no EOS and TOKS_NO_COMPLETION; a
 * text record gets EOS and TOKS_NO_COMPLETION. Memory stays bounded by the
 * batch size whatever the input size. *n_records (may be NULL) gets the
 * count. Returns 0, or -1 after one message "file:line[:col]: problem" (the
 * first bad record in input order). */
int sp_encode_jsonl(const sp_model *m, io_reader *r, toks_writer *tw,
                    const sp_jsonl_options *o, uint64_t *n_records);

/* Decodes every record of tr to one JSON line on w: {"text": ...} for a
 * record without completion_start, else {"prompt": decode(ids[0..cs)),
 * "completion": decode(ids[cs..n))}. Returns 0 or -1 (message printed). */
int sp_decode_stream(const sp_model *m, toks_reader *tr, io_writer *w);

#endif
