/* tokstream.c: the binary token stream between tok, pack and lora-gen.
 *
 * The header is a JSON line whose length (with its '\n') is a multiple of 8,
 * so the u32 records after it stay naturally aligned and `head -1 | jq`
 * works. The reader takes the header 8 bytes at a time rather than with
 * io_read_line, so a foreign binary file is refused after its first bytes
 * instead of being slurped as one endless "line". Records carry their own
 * length; the trailer (a length of 0xffffffff, "TEND", the counts) is what
 * tells a complete stream from a truncated one, so every short read before
 * it is an error.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokstream.h"

#include <assert.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "strbuf.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "tokstream.c assumes a little-endian host"
#endif

#define TOKS_MAGIC_PREFIX "{\"format\":\"qlora-tokens\""
#define TOKS_MAX_HEADER 4096

struct toks_writer {
    io_writer *w;
    uint64_t n_records;
    uint64_t n_tokens;
};

toks_writer *toks_writer_new(io_writer *w, const toks_header *h)
{
    strbuf sb = STRBUF_INIT;
    sb_printf(&sb,
              "{\"format\":\"%s\",\"version\":%d,\"vocab_size\":%" PRIu32
              ",\"bos_id\":%" PRId32 ",\"eos_id\":%" PRId32 ",\"tokenizer\":",
              TOKS_FORMAT, TOKS_VERSION, h->vocab_size, h->bos_id, h->eos_id);
    json_append_string(&sb, h->tokenizer,
                       strnlen(h->tokenizer, sizeof h->tokenizer));
    sb_puts(&sb, ",\"producer\":");
    json_append_string(&sb, h->producer,
                       strnlen(h->producer, sizeof h->producer));
    sb_putc(&sb, '}');
    while ((sb.len + 1) % 8 != 0)
        sb_putc(&sb, ' ');
    sb_putc(&sb, '\n');
    io_write(w, sb.buf, sb.len);
    sb_free(&sb);

    toks_writer *tw = xcalloc(1, sizeof *tw);
    tw->w = w;
    return tw;
}

void toks_write_record(toks_writer *tw, const uint32_t *ids, uint32_t n,
                       uint32_t completion_start)
{
    assert(n <= TOKS_MAX_RECORD);
    assert(completion_start == TOKS_NO_COMPLETION || completion_start <= n);
    uint32_t head[2] = {n, completion_start};
    io_write(tw->w, head, sizeof head);
    io_write(tw->w, ids, (size_t)n * sizeof *ids);
    tw->n_records++;
    tw->n_tokens += n;
}

void toks_writer_finish(toks_writer *tw)
{
    uint32_t mark[2] = {TOKS_TRAILER_MARK, TOKS_TRAILER_MAGIC};
    uint64_t counts[2] = {tw->n_records, tw->n_tokens};
    io_write(tw->w, mark, sizeof mark);
    io_write(tw->w, counts, sizeof counts);
    free(tw);
}

struct toks_reader {
    io_reader *r;
    toks_header h;
    uint64_t n_records;
    uint64_t n_tokens;
    int done;
};

static int header_error(const char *name, const char *what)
{
    msg_error("bad token stream header in '%s': %s", name, what);
    msg_hint("regenerate it with tok");
    return -1;
}

static int read_header_line(io_reader *r, strbuf *sb)
{
    return io_read_header_line(r, TOKS_MAGIC_PREFIX, "token stream", "tok", TOKS_MAX_HEADER, sb);
}

static int header_int(const json_value *v, const char *key, int64_t lo,
                      int64_t hi, int64_t *out, const char *name)
{
    const json_value *m = json_get(v, key);
    if (!m || m->type != JSON_NUMBER || !m->u.number.is_integer ||
        m->u.number.integer < lo || m->u.number.integer > hi) {
        char what[96];
        snprintf(what, sizeof what, "'%s' missing or out of range", key);
        return header_error(name, what);
    }
    *out = m->u.number.integer;
    return 0;
}

static int parse_header(const char *text, size_t len, const char *name,
                        toks_header *h)
{
    json_value *v = NULL;
    strbuf err = STRBUF_INIT;
    if (json_parse_quiet(text, len, name, 1, &v, &err) < 0) {
        header_error(name, sb_str(&err));
        sb_free(&err);
        return -1;
    }
    sb_free(&err);
    int rc = -1;
    int64_t version, vocab, bos, eos;
    size_t slen = 0;
    const char *fmt = json_get_string(v, "format", &slen);
    if (!fmt || strcmp(fmt, TOKS_FORMAT) != 0) {
        msg_error("not a token stream '%s' (bad magic)", name);
        msg_hint("token streams are written by tok");
        goto out;
    }
    if (header_int(v, "version", 0, INT32_MAX, &version, name) < 0)
        goto out;
    if (version != TOKS_VERSION) {
        msg_error("unsupported token stream version %" PRId64 " in '%s' "
                  "(this program reads version %d)",
                  version, name, TOKS_VERSION);
        msg_hint("regenerate with tok");
        goto out;
    }
    if (header_int(v, "vocab_size", 1, UINT32_MAX - 1, &vocab, name) < 0 ||
        header_int(v, "bos_id", -1, vocab - 1, &bos, name) < 0 ||
        header_int(v, "eos_id", -1, vocab - 1, &eos, name) < 0)
        goto out;
    memset(h, 0, sizeof *h);
    h->version = (int)version;
    h->vocab_size = (uint32_t)vocab;
    h->bos_id = (int32_t)bos;
    h->eos_id = (int32_t)eos;
    const char *s = json_get_string(v, "tokenizer", &slen);
    if (s) {
        if (slen >= sizeof h->tokenizer || memchr(s, 0, slen)) {
            header_error(name, "'tokenizer' too long");
            goto out;
        }
        memcpy(h->tokenizer, s, slen);
    }
    s = json_get_string(v, "producer", &slen);
    if (s) {
        /* Informational only: keep what fits. */
        size_t k = strnlen(
            s, slen < sizeof h->producer - 1 ? slen : sizeof h->producer - 1);
        memcpy(h->producer, s, k);
    }
    rc = 0;
out:
    json_free(v);
    return rc;
}

toks_reader *toks_reader_new(io_reader *r, toks_header *h)
{
    strbuf sb = STRBUF_INIT;
    toks_header tmp;
    if (read_header_line(r, &sb) < 0 ||
        parse_header(sb_str(&sb), sb.len, io_reader_name(r), &tmp) < 0) {
        sb_free(&sb);
        return NULL;
    }
    sb_free(&sb);
    toks_reader *tr = xcalloc(1, sizeof *tr);
    tr->r = r;
    tr->h = tmp;
    if (h)
        *h = tmp;
    return tr;
}

static int truncated(toks_reader *tr, const char *where)
{
    return msg_error("truncated token stream '%s' (%s of record %" PRIu64 ")",
                     io_reader_name(tr->r), where, tr->n_records + 1);
}

/* Reads exactly n bytes; a short read (even of zero bytes) is truncation. */
static int read_all(toks_reader *tr, void *buf, size_t n, const char *where)
{
    ptrdiff_t got = io_read(tr->r, buf, n);
    if (got < 0)
        return -1;
    if ((size_t)got < n)
        return truncated(tr, where);
    return 0;
}

/* The trailer after its 0xffffffff mark: the magic, then the counts, then
 * nothing more. */
static int read_trailer(toks_reader *tr, uint32_t magic)
{
    const char *name = io_reader_name(tr->r);
    uint64_t counts[2];
    if (magic != TOKS_TRAILER_MAGIC)
        return msg_error("corrupt token stream '%s': bad trailer mark after "
                         "record %" PRIu64,
                         name, tr->n_records);
    ptrdiff_t got = io_read(tr->r, counts, sizeof counts);
    if (got < 0)
        return -1;
    if ((size_t)got < sizeof counts)
        return msg_error("truncated token stream '%s' (in the trailer)", name);
    if (counts[0] != tr->n_records || counts[1] != tr->n_tokens)
        return msg_error("corrupt token stream '%s': trailer says %" PRIu64
                         " records, %" PRIu64 " tokens; read %" PRIu64
                         " records, %" PRIu64 " tokens",
                         name, counts[0], counts[1], tr->n_records,
                         tr->n_tokens);
    char extra;
    got = io_read(tr->r, &extra, 1);
    if (got < 0)
        return -1;
    if (got > 0)
        return msg_error("corrupt token stream '%s': data after the trailer",
                         name);
    tr->done = 1;
    return 0;
}

int toks_read_record(toks_reader *tr, toks_record *rec)
{
    const char *name = io_reader_name(tr->r);
    if (tr->done)
        return 0;
    uint32_t head[2];
    ptrdiff_t got = io_read(tr->r, head, sizeof head);
    if (got < 0)
        return -1;
    if (got == 0)
        return msg_error("truncated token stream '%s' (no trailer after "
                         "record %" PRIu64 ")",
                         name, tr->n_records);
    if ((size_t)got < sizeof head) {
        if ((size_t)got >= sizeof head[0] && head[0] == TOKS_TRAILER_MARK)
            return msg_error("truncated token stream '%s' (in the trailer)",
                             name);
        return truncated(tr, "in the length");
    }
    if (head[0] == TOKS_TRAILER_MARK)
        return read_trailer(tr, head[1]);
    uint32_t n = head[0], cs = head[1];
    if (n > TOKS_MAX_RECORD)
        return msg_error("corrupt token stream '%s': record %" PRIu64
                         " claims %" PRIu32 " tokens",
                         name, tr->n_records + 1, n);
    if (cs != TOKS_NO_COMPLETION && cs > n)
        return msg_error("corrupt token stream '%s': record %" PRIu64
                         " has completion_start %" PRIu32 " > %" PRIu32
                         " tokens",
                         name, tr->n_records + 1, cs, n);
    /* The buffer grows as the ids arrive (at most 1 Mi ids a read), so a
     * record that claims more tokens than the stream holds cannot make us
     * allocate them (found by tests/fuzz/fuzz_tokstream). */
    for (uint32_t have = 0; have < n;) {
        uint32_t want = n - have < (1u << 20) ? n - have : (1u << 20);
        if (have + want > rec->cap) {
            uint32_t cap = rec->cap ? rec->cap : 256;
            while (cap < have + want)
                cap = cap > TOKS_MAX_RECORD / 2 ? TOKS_MAX_RECORD : cap * 2;
            rec->ids = xrealloc(rec->ids, (size_t)cap * sizeof *rec->ids);
            rec->cap = cap;
        }
        if (read_all(tr, rec->ids + have, (size_t)want * sizeof *rec->ids,
                     "in the ids") < 0)
            return -1;
        have += want;
    }
    uint32_t vocab = tr->h.vocab_size;
    for (uint32_t i = 0; i < n; i++)
        if (rec->ids[i] >= vocab)
            return msg_error("corrupt token stream '%s': record %" PRIu64
                             " token %" PRIu32 " is id %" PRIu32
                             ", not below vocab_size %" PRIu32,
                             name, tr->n_records + 1, i, rec->ids[i], vocab);
    rec->n = n;
    rec->completion_start = cs;
    tr->n_records++;
    tr->n_tokens += n;
    return 1;
}

uint64_t toks_reader_records(const toks_reader *tr)
{
    return tr->n_records;
}

void toks_reader_free(toks_reader *tr)
{
    free(tr);
}

void toks_record_free(toks_record *rec)
{
    free(rec->ids);
    rec->ids = NULL;
    rec->n = rec->cap = 0;
}

void toks_fingerprint(const void *data, size_t n, char out[17])
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    snprintf(out, 17, "%016" PRIx64, h);
}
