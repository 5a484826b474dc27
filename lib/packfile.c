/* packfile.c: the packed file (reader, writer, dump) and the packers.
 *
 * The file is written in sections (all ids, all weights, the span index,
 * the spans) rather than row by row so that a trainer can map it and find
 * row r by arithmetic; a whole epoch of Dolly at 2048 is about 12 MB, so
 * the reader simply loads everything and checks every invariant the
 * trainer relies on before anyone uses it. An FNV-1a checksum in the
 * trailer catches damage the structural checks cannot (a flipped weight).
 *
 * Packing is done in memory on the concatenation of all input records.
 * Best-fit-decreasing finds "the fullest row that still fits" through
 * buckets of rows indexed by their free space plus a two-level bitmap of
 * the non-empty buckets, so each placement costs a few word scans whatever
 * the number of rows. Every choice (eval records, ties, row order) comes
 * from the input order and a splitmix64 generator seeded by --seed, so the
 * same input and options always give the same bytes.
 */
#define _POSIX_C_SOURCE 200809L
#include "packfile.h"

#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "msg.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "packfile.c assumes a little-endian host"
#endif

#define PACK_MAGIC_PREFIX "{\"format\":\"qlora-packed\""
#define PACK_MAX_HEADER 8192
#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

const char *pack_mode_name(pack_mode m)
{
    return m == PACK_MODE_CONCAT ? "concat" : "bfd";
}
const char *pack_loss_name(pack_loss l)
{
    return l == PACK_LOSS_ALL ? "all" : "completion";
}
const char *pack_overlong_name(pack_overlong o)
{
    return o == PACK_OVERLONG_SPLIT ? "split" : "truncate";
}

static uint64_t fnv_update(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

static uint64_t weights_bytes(const pack_header *h)
{
    uint64_t n = h->n_rows * h->seq_len;
    return (n + 7) & ~(uint64_t)7;
}

/* --- JSON ---------------------------------------------------------------- */

void pack_header_json(const pack_header *h, strbuf *sb)
{
    sb_printf(sb,
              "{\"format\":\"%s\",\"version\":%d,\"seq_len\":%" PRIu32
              ",\"vocab_size\":%" PRIu32 ",\"bos_id\":%" PRId32
              ",\"eos_id\":%" PRId32 ",\"tokenizer\":",
              PACK_FORMAT, h->version, h->seq_len, h->vocab_size, h->bos_id,
              h->eos_id);
    json_append_string(sb, h->tokenizer,
                       strnlen(h->tokenizer, sizeof h->tokenizer));
    sb_printf(
        sb,
        ",\"mode\":\"%s\",\"loss\":\"%s\",\"overlong\":\"%s\",\"seed\":%" PRIu64
        ",\"shuffled\":%s,\"split\":\"%s\",\"eval_fraction\":",
        pack_mode_name(h->mode), pack_loss_name(h->loss),
        pack_overlong_name(h->overlong), h->seed,
        h->shuffled ? "true" : "false", h->is_eval ? "eval" : "train");
    json_append_number(sb, h->eval_fraction);
    sb_printf(sb,
              ",\"rows\":%" PRIu64 ",\"spans\":%" PRIu64
              ",\"documents\":%" PRIu64 ",\"tokens\":%" PRIu64
              ",\"loss_tokens\":%" PRIu64 ",\"truncated\":%" PRIu64
              ",\"split_records\":%" PRIu64 ",\"dropped_tokens\":%" PRIu64
              ",\"producer\":",
              h->n_rows, h->n_spans, h->n_docs, h->n_tokens, h->n_loss_tokens,
              h->n_truncated, h->n_split, h->n_dropped);
    json_append_string(sb, h->producer,
                       strnlen(h->producer, sizeof h->producer));
    sb_putc(sb, '}');
}

void pack_stats_json(const pack_header *h, strbuf *sb)
{
    uint64_t slots = h->n_rows * h->seq_len;
    uint64_t pad = slots - h->n_tokens;
    sb_printf(
        sb,
        "{\"split\":\"%s\",\"mode\":\"%s\",\"loss\":\"%s\",\"seq_len\":%" PRIu32
        ",\"rows\":%" PRIu64 ",\"tokens\":%" PRIu64 ",\"padding\":%" PRIu64
        ",\"padding_share\":",
        h->is_eval ? "eval" : "train", pack_mode_name(h->mode),
        pack_loss_name(h->loss), h->seq_len, h->n_rows, h->n_tokens, pad);
    json_append_number(sb, slots ? (double)pad / (double)slots : 0.0);
    sb_puts(sb, ",\"efficiency\":");
    json_append_number(sb, slots ? (double)h->n_tokens / (double)slots : 0.0);
    sb_printf(sb,
              ",\"documents\":%" PRIu64 ",\"spans\":%" PRIu64
              ",\"loss_tokens\":%" PRIu64 ",\"truncated\":%" PRIu64
              ",\"split_records\":%" PRIu64 ",\"dropped_tokens\":%" PRIu64 "}",
              h->n_docs, h->n_spans, h->n_loss_tokens, h->n_truncated,
              h->n_split, h->n_dropped);
}

static void append_u32(strbuf *sb, uint32_t v)
{
    char tmp[11];
    int k = 0;
    do {
        tmp[k++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    sb_grow(sb, (size_t)k);
    while (k)
        sb->buf[sb->len++] = tmp[--k];
    sb->buf[sb->len] = '\0';
}

void pack_dump_row(const pack_data *d, uint64_t r, strbuf *sb)
{
    uint32_t L = d->h.seq_len, ns;
    const uint32_t *ids = pack_row_ids(d, r);
    const uint8_t *w = pack_row_weights(d, r);
    const pack_span *sp = pack_row_spans(d, r, &ns);
    sb_printf(sb, "{\"row\":%" PRIu64 ",\"ids\":[", r);
    sb_grow(sb, (size_t)L * 12);
    for (uint32_t t = 0; t < L; t++) {
        if (t)
            sb->buf[sb->len++] = ',';
        append_u32(sb, ids[t]);
    }
    sb_puts(sb, "],\"weights\":[");
    sb_grow(sb, (size_t)L * 2);
    for (uint32_t t = 0; t < L; t++) {
        if (t)
            sb->buf[sb->len++] = ',';
        sb->buf[sb->len++] = (char)('0' + w[t]);
    }
    sb->buf[sb->len] = '\0';
    sb_puts(sb, "],\"spans\":[");
    for (uint32_t i = 0; i < ns; i++)
        sb_printf(sb, "%s[%" PRIu32 ",%" PRIu32 "]", i ? "," : "", sp[i].start,
                  sp[i].len);
    sb_puts(sb, "]}");
}

/* --- writing ------------------------------------------------------------- */

static void write_hashed(io_writer *w, uint64_t *h, const void *buf, size_t n)
{
    io_write(w, buf, n);
    *h = fnv_update(*h, buf, n);
}

void pack_write(io_writer *w, const pack_data *d)
{
    const pack_header *h = &d->h;
    strbuf sb = STRBUF_INIT;
    pack_header_json(h, &sb);
    while ((sb.len + 1) % 8 != 0)
        sb_putc(&sb, ' ');
    sb_putc(&sb, '\n');
    io_write(w, sb.buf, sb.len);
    sb_free(&sb);

    uint64_t n = h->n_rows * h->seq_len, hash = FNV_OFFSET;
    write_hashed(w, &hash, d->ids, n * sizeof *d->ids);
    write_hashed(w, &hash, d->weights, n);
    static const uint8_t zeros[8];
    write_hashed(w, &hash, zeros, weights_bytes(h) - n);
    write_hashed(w, &hash, d->row_spans,
                 (h->n_rows + 1) * sizeof *d->row_spans);
    write_hashed(w, &hash, d->spans, h->n_spans * sizeof *d->spans);
    uint32_t mark[2] = {PACK_TRAILER_MARK, PACK_TRAILER_MAGIC};
    uint64_t tail[3] = {h->n_rows, h->n_spans, hash};
    io_write(w, mark, sizeof mark);
    io_write(w, tail, sizeof tail);
}

void pack_data_free(pack_data *d)
{
    free(d->ids);
    free(d->weights);
    free(d->row_spans);
    free(d->spans);
    memset(d, 0, sizeof *d);
}

/* --- reading ------------------------------------------------------------- */

static void hint_regen(void)
{
    msg_hint("regenerate it with pack");
}

static int read_header_line(io_reader *r, strbuf *sb)
{
    return io_read_header_line(r, PACK_MAGIC_PREFIX, "packed file", "pack", PACK_MAX_HEADER, sb);
}

static int hdr_uint(const json_value *v, const char *key, uint64_t hi,
                    uint64_t *out, int required, const char *name)
{
    const json_value *m = json_get(v, key);
    if (!m) {
        if (required)
            return msg_error("bad packed file header in '%s': '%s' missing",
                             name, key);
        *out = 0;
        return 0;
    }
    if (m->type != JSON_NUMBER || !m->u.number.is_integer ||
        m->u.number.integer < 0 || (uint64_t)m->u.number.integer > hi)
        return msg_error("bad packed file header in '%s': '%s' out of range",
                         name, key);
    *out = (uint64_t)m->u.number.integer;
    return 0;
}

static int hdr_enum(const json_value *v, const char *key, const char *a,
                    const char *b, int *out, const char *name)
{
    const char *s = json_get_string(v, key, NULL);
    if (!s)
        return msg_error("bad packed file header in '%s': '%s' missing", name,
                         key);
    if (strcmp(s, a) == 0)
        *out = 0;
    else if (strcmp(s, b) == 0)
        *out = 1;
    else
        return msg_error("bad packed file header in '%s': unknown %s '%s'",
                         name, key, s);
    return 0;
}

static int parse_header(const char *text, size_t len, const char *name,
                        pack_header *h)
{
    json_value *v = NULL;
    strbuf err = STRBUF_INIT;
    if (json_parse_quiet(text, len, name, 1, &v, &err) < 0) {
        msg_error("bad packed file header: %s", sb_str(&err));
        sb_free(&err);
        hint_regen();
        return -1;
    }
    sb_free(&err);
    memset(h, 0, sizeof *h);
    int rc = -1;
    uint64_t version, seq, vocab, rows, spans, seed, x;
    int e;
    const json_value *m;
    if (hdr_uint(v, "version", INT32_MAX, &version, 1, name) < 0)
        goto bad;
    if (version != PACK_VERSION) {
        msg_error("unsupported packed file version %" PRIu64
                  " in '%s' (this program "
                  "reads version %d)",
                  version, name, PACK_VERSION);
        hint_regen();
        goto out;
    }
    h->version = (int)version;
    if (hdr_uint(v, "seq_len", PACK_MAX_SEQ_LEN, &seq, 1, name) < 0 ||
        hdr_uint(v, "vocab_size", UINT32_MAX - 1, &vocab, 1, name) < 0 ||
        hdr_uint(v, "rows", UINT64_MAX >> 8, &rows, 1, name) < 0 ||
        hdr_uint(v, "spans", UINT64_MAX >> 8, &spans, 1, name) < 0)
        goto bad;
    if (seq < 1 || vocab < 1) {
        msg_error(
            "bad packed file header in '%s': seq_len and vocab_size must be "
            "positive",
            name);
        goto bad;
    }
    /* Keep every size computation below 2^62 bytes. */
    if (rows > (UINT64_MAX >> 8) / seq) {
        msg_error("bad packed file header in '%s': %" PRIu64
                  " rows is implausible",
                  name, rows);
        goto bad;
    }
    h->seq_len = (uint32_t)seq;
    h->vocab_size = (uint32_t)vocab;
    h->n_rows = rows;
    h->n_spans = spans;
    h->bos_id = (int32_t)json_get_int(v, "bos_id", -1);
    h->eos_id = (int32_t)json_get_int(v, "eos_id", -1);
    size_t slen = 0;
    const char *s = json_get_string(v, "tokenizer", &slen);
    if (s && slen < sizeof h->tokenizer)
        memcpy(h->tokenizer, s, slen);
    if (hdr_enum(v, "mode", "bfd", "concat", &e, name) < 0)
        goto bad;
    h->mode = e ? PACK_MODE_CONCAT : PACK_MODE_BFD;
    if (hdr_enum(v, "loss", "completion", "all", &e, name) < 0)
        goto bad;
    h->loss = e ? PACK_LOSS_ALL : PACK_LOSS_COMPLETION;
    if (hdr_enum(v, "overlong", "truncate", "split", &e, name) < 0)
        goto bad;
    h->overlong = e ? PACK_OVERLONG_SPLIT : PACK_OVERLONG_TRUNCATE;
    if (hdr_enum(v, "split", "train", "eval", &h->is_eval, name) < 0)
        goto bad;
    if (hdr_uint(v, "seed", INT64_MAX, &seed, 0, name) < 0)
        goto bad;
    h->seed = seed;
    m = json_get(v, "shuffled");
    h->shuffled = m && m->type == JSON_TRUE;
    h->eval_fraction = json_get_number(v, "eval_fraction", 0);
    if (hdr_uint(v, "documents", UINT64_MAX >> 1, &x, 0, name) < 0)
        goto bad;
    h->n_docs = x;
    if (hdr_uint(v, "tokens", UINT64_MAX >> 1, &x, 0, name) < 0)
        goto bad;
    h->n_tokens = x;
    if (hdr_uint(v, "loss_tokens", UINT64_MAX >> 1, &x, 0, name) < 0)
        goto bad;
    h->n_loss_tokens = x;
    if (hdr_uint(v, "truncated", UINT64_MAX >> 1, &x, 0, name) < 0)
        goto bad;
    h->n_truncated = x;
    if (hdr_uint(v, "split_records", UINT64_MAX >> 1, &x, 0, name) < 0)
        goto bad;
    h->n_split = x;
    if (hdr_uint(v, "dropped_tokens", UINT64_MAX >> 1, &x, 0, name) < 0)
        goto bad;
    h->n_dropped = x;
    s = json_get_string(v, "producer", &slen);
    if (s) {
        size_t k =
            slen < sizeof h->producer - 1 ? slen : sizeof h->producer - 1;
        memcpy(h->producer, s, strnlen(s, k));
    }
    rc = 0;
    goto out;
bad:
    hint_regen();
out:
    json_free(v);
    return rc;
}

/* Reads n bytes into a buffer grown as the data arrives (so a lying header
 * cannot make us allocate what the file does not hold). */
static void *read_section(io_reader *r, uint64_t n, uint64_t *hash,
                          const char *what)
{
    size_t cap = 0, have = 0;
    unsigned char *buf = NULL;
    while (have < n) {
        size_t want = n - have;
        if (want > ((size_t)16 << 20))
            want = (size_t)16 << 20;
        if (have + want > cap) {
            cap = cap ? cap * 2 : want;
            if (cap > n)
                cap = (size_t)n;
            if (cap < have + want)
                cap = have + want;
            buf = xrealloc(buf, cap);
        }
        ptrdiff_t got = io_read(r, buf + have, want);
        if (got < 0) {
            free(buf);
            return NULL;
        }
        if ((size_t)got < want) {
            msg_error("truncated packed file '%s' (in the %s)",
                      io_reader_name(r), what);
            free(buf);
            return NULL;
        }
        have += want;
    }
    if (!buf)
        buf = xmalloc(1);
    *hash = fnv_update(*hash, buf, (size_t)n);
    return buf;
}

/* Every invariant the trainer relies on. */
static int check_data(const pack_data *d, const char *name)
{
    const pack_header *h = &d->h;
    uint32_t L = h->seq_len;
    if (d->row_spans[0] != 0 || d->row_spans[h->n_rows] != h->n_spans)
        return msg_error(
            "corrupt packed file '%s': span index does not cover the "
            "%" PRIu64 " spans",
            name, h->n_spans);
    uint64_t tokens = 0, loss = 0;
    uint8_t *inside = xmalloc(L);
    int rc = 0;
    for (uint64_t r = 0; r < h->n_rows && rc == 0; r++) {
        if (d->row_spans[r + 1] < d->row_spans[r]) {
            rc = msg_error("corrupt packed file '%s': span index decreases at "
                           "row %" PRIu64,
                           name, r);
            break;
        }
        uint32_t ns;
        const pack_span *sp = pack_row_spans(d, r, &ns);
        const uint32_t *ids = pack_row_ids(d, r);
        const uint8_t *w = pack_row_weights(d, r);
        memset(inside, 0, L);
        uint64_t end = 0;
        for (uint32_t i = 0; i < ns; i++) {
            if (sp[i].len == 0 || sp[i].start < end ||
                (uint64_t)sp[i].start + sp[i].len > L) {
                rc = msg_error("corrupt packed file '%s': row %" PRIu64
                               " span %" PRIu32 " [%" PRIu32 ",+%" PRIu32
                               ") is out of order or out of "
                               "the row",
                               name, r, i, sp[i].start, sp[i].len);
                break;
            }
            end = (uint64_t)sp[i].start + sp[i].len;
            memset(inside + sp[i].start, 1, sp[i].len);
            inside[sp[i].start] = 2;
            tokens += sp[i].len;
        }
        for (uint32_t t = 0; t < L && rc == 0; t++) {
            if (ids[t] >= h->vocab_size)
                rc = msg_error("corrupt packed file '%s': row %" PRIu64
                               " position %" PRIu32 " holds id %" PRIu32
                               ", not below vocab_size %" PRIu32,
                               name, r, t, ids[t], h->vocab_size);
            else if (w[t] > 1 || (w[t] && inside[t] != 1))
                rc = msg_error(
                    "corrupt packed file '%s': row %" PRIu64
                    " position %" PRIu32
                    " has weight %u (weights are 0 or 1, and 0 at span starts "
                    "and on padding)",
                    name, r, t, w[t]);
            loss += w[t];
        }
    }
    free(inside);
    if (rc == 0 && (tokens != h->n_tokens || loss != h->n_loss_tokens))
        rc = msg_error("corrupt packed file '%s': header says %" PRIu64
                       " tokens, %" PRIu64 " with loss; rows hold %" PRIu64
                       ", %" PRIu64,
                       name, h->n_tokens, h->n_loss_tokens, tokens, loss);
    return rc;
}

int pack_read(const char *path, pack_data *d)
{
    memset(d, 0, sizeof *d);
    io_reader *r = io_reader_open(path);
    if (!r)
        return -1;
    const char *name = io_reader_name(r);
    strbuf sb = STRBUF_INIT;
    int rc = -1;
    if (read_header_line(r, &sb) < 0 ||
        parse_header(sb_str(&sb), sb.len, name, &d->h) < 0)
        goto out;
    pack_header *h = &d->h;
    uint64_t n = h->n_rows * h->seq_len, hash = FNV_OFFSET;
    if (!(d->ids = read_section(r, n * 4, &hash, "ids")) ||
        !(d->weights = read_section(r, weights_bytes(h), &hash, "weights")) ||
        !(d->row_spans =
              read_section(r, (h->n_rows + 1) * 8, &hash, "span index")) ||
        !(d->spans = read_section(r, h->n_spans * 8, &hash, "spans")))
        goto out;
    for (uint64_t i = n; i < weights_bytes(h); i++)
        if (d->weights[i]) {
            msg_error(
                "corrupt packed file '%s': nonzero padding after the weights",
                name);
            goto out;
        }
    uint32_t mark[2];
    uint64_t tail[3];
    ptrdiff_t got = io_read(r, mark, sizeof mark);
    if (got < 0)
        goto out;
    if ((size_t)got < sizeof mark) {
        msg_error("truncated packed file '%s' (%s)", name,
                  got == 0 ? "no trailer" : "in the trailer");
        goto out;
    }
    if (mark[0] != PACK_TRAILER_MARK || mark[1] != PACK_TRAILER_MAGIC) {
        msg_error("corrupt packed file '%s': bad trailer mark", name);
        goto out;
    }
    got = io_read(r, tail, sizeof tail);
    if (got < 0)
        goto out;
    if ((size_t)got < sizeof tail) {
        msg_error("truncated packed file '%s' (in the trailer)", name);
        goto out;
    }
    if (tail[0] != h->n_rows || tail[1] != h->n_spans) {
        msg_error("corrupt packed file '%s': trailer says %" PRIu64
                  " rows, %" PRIu64 " spans; header says %" PRIu64 ", %" PRIu64,
                  name, tail[0], tail[1], h->n_rows, h->n_spans);
        goto out;
    }
    if (tail[2] != hash) {
        msg_error("corrupt packed file '%s': checksum mismatch", name);
        goto out;
    }
    char extra;
    got = io_read(r, &extra, 1);
    if (got != 0) {
        if (got > 0)
            msg_error("corrupt packed file '%s': data after the trailer", name);
        goto out;
    }
    rc = check_data(d, name);
out:
    sb_free(&sb);
    io_reader_close(r);
    if (rc < 0)
        pack_data_free(d);
    return rc;
}

/* --- input --------------------------------------------------------------- */

int pack_input_read(pack_input *in, const char *path, uint32_t want_vocab)
{
    io_reader *r = io_reader_open(path);
    if (!r)
        return -1;
    const char *name = io_reader_name(r);
    toks_header h;
    toks_reader *tr = toks_reader_new(r, &h);
    if (!tr) {
        io_reader_close(r);
        return -1;
    }
    int rc = -1;
    int first = in->h.vocab_size == 0;
    if (want_vocab && h.vocab_size != want_vocab) {
        msg_error("token stream '%s' has vocab_size %" PRIu32 ", not %" PRIu32
                  " (--vocab)",
                  name, h.vocab_size, want_vocab);
        goto out;
    }
    if (!first && (h.vocab_size != in->h.vocab_size ||
                   (h.tokenizer[0] && in->h.tokenizer[0] &&
                    strcmp(h.tokenizer, in->h.tokenizer) != 0))) {
        msg_error(
            "token stream '%s' has another vocabulary than the first input "
            "(vocab_size %" PRIu32 ", tokenizer '%s'; first: %" PRIu32
            ", '%s')",
            name, h.vocab_size, h.tokenizer, in->h.vocab_size, in->h.tokenizer);
        goto out;
    }
    if (first) {
        in->h = h;
        in->offsets = xmalloc(sizeof *in->offsets);
        in->offsets[0] = 0;
    }
    toks_record rec = {0};
    int k;
    while ((k = toks_read_record(tr, &rec)) == 1) {
        if (in->n_tokens + rec.n > in->cap_tokens) {
            uint64_t cap = in->cap_tokens ? in->cap_tokens : 1 << 16;
            while (cap < in->n_tokens + rec.n)
                cap *= 2;
            in->ids = xrealloc(in->ids, cap * sizeof *in->ids);
            in->cap_tokens = cap;
        }
        if (in->n_records + 1 > in->cap_records) {
            uint64_t cap = in->cap_records ? in->cap_records * 2 : 1024;
            in->offsets =
                xrealloc(in->offsets, (cap + 1) * sizeof *in->offsets);
            in->completion =
                xrealloc(in->completion, cap * sizeof *in->completion);
            in->cap_records = cap;
        }
        if (rec.n) /* an empty first record: in->ids and rec.ids are NULL */
            memcpy(in->ids + in->n_tokens, rec.ids,
                   (size_t)rec.n * sizeof *rec.ids);
        in->n_tokens += rec.n;
        in->completion[in->n_records] = rec.completion_start;
        in->offsets[++in->n_records] = in->n_tokens;
    }
    toks_record_free(&rec);
    rc = k < 0 ? -1 : 0;
out:
    toks_reader_free(tr);
    io_reader_close(r);
    return rc;
}

void pack_input_free(pack_input *in)
{
    free(in->ids);
    free(in->offsets);
    free(in->completion);
    memset(in, 0, sizeof *in);
}

/* --- packing ------------------------------------------------------------- */

typedef struct rng {
    uint64_t s;
} rng;

static uint64_t rng_next(rng *g)
{
    uint64_t z = (g->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, n), without modulo bias. */
static uint64_t rng_below(rng *g, uint64_t n)
{
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do
        x = rng_next(g);
    while (x >= lim);
    return x % n;
}

static void shuffle_u64(uint64_t *a, uint64_t n, rng *g)
{
    for (uint64_t i = n; i > 1; i--) {
        uint64_t j = rng_below(g, i);
        uint64_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

/* A growing set of rows under construction. */
typedef struct rows_builder {
    uint32_t L;
    uint64_t n_rows, cap_rows;
    uint32_t *ids;
    uint8_t *weights;
    /* spans in placement order, with their row */
    uint64_t n_spans, cap_spans;
    pack_span *spans;
    uint64_t *span_row;
} rows_builder;

static uint64_t rb_new_row(rows_builder *b)
{
    if (b->n_rows == b->cap_rows) {
        b->cap_rows = b->cap_rows ? b->cap_rows * 2 : 64;
        b->ids = xrealloc(b->ids, b->cap_rows * b->L * sizeof *b->ids);
        b->weights = xrealloc(b->weights, b->cap_rows * b->L);
    }
    memset(b->ids + b->n_rows * b->L, 0, (size_t)b->L * sizeof *b->ids);
    memset(b->weights + b->n_rows * b->L, 0, b->L);
    return b->n_rows++;
}

static void rb_add_span(rows_builder *b, uint64_t row, uint32_t start,
                        uint32_t len)
{
    if (b->n_spans == b->cap_spans) {
        b->cap_spans = b->cap_spans ? b->cap_spans * 2 : 256;
        b->spans = xrealloc(b->spans, b->cap_spans * sizeof *b->spans);
        b->span_row = xrealloc(b->span_row, b->cap_spans * sizeof *b->span_row);
    }
    b->spans[b->n_spans] = (pack_span){start, len};
    b->span_row[b->n_spans++] = row;
}

/* Copies tokens [from, from + len) of record i to row/pos with their weights.
 */
static void place(rows_builder *b, const pack_input *in, const pack_opts *o,
                  uint64_t i, uint32_t from, uint32_t len, uint64_t row,
                  uint32_t pos)
{
    const uint32_t *src = in->ids + in->offsets[i] + from;
    uint32_t cs = in->completion[i];
    uint32_t *dst = b->ids + row * b->L + pos;
    uint8_t *w = b->weights + row * b->L + pos;
    memcpy(dst, src, (size_t)len * sizeof *dst);
    for (uint32_t t = 0; t < len; t++) {
        uint32_t j = from + t;
        /* A record without a prompt/completion split (plain text) is all
         * completion: training on it under --loss completion must not
         * silently learn nothing. */
        w[t] = o->loss == PACK_LOSS_ALL || cs == TOKS_NO_COMPLETION || j >= cs;
    }
}

/* Turns the builder into d: spans grouped by row (stable, so in placement
 * order, which is increasing start), span starts and padding weighted 0,
 * rows optionally shuffled. */
static void rb_finish(rows_builder *b, const pack_opts *o, uint64_t seed,
                      pack_data *d)
{
    pack_header *h = &d->h;
    uint64_t R = b->n_rows, L = b->L;
    h->n_rows = R;
    h->n_spans = b->n_spans;
    uint64_t *order = xmalloc((R ? R : 1) * sizeof *order);
    for (uint64_t r = 0; r < R; r++)
        order[r] = r;
    if (o->shuffle) {
        rng g = {seed};
        shuffle_u64(order, R, &g);
    }
    /* new row k is old row order[k] */
    uint64_t *where = xmalloc((R ? R : 1) * sizeof *where);
    for (uint64_t k = 0; k < R; k++)
        where[order[k]] = k;
    uint64_t slots = R * L > 0 ? R * L : 1;
    d->ids = xmalloc(slots * sizeof *d->ids);
    d->weights = xmalloc(slots);
    for (uint64_t k = 0; k < R; k++) {
        memcpy(d->ids + k * L, b->ids + order[k] * L, L * sizeof *d->ids);
        memcpy(d->weights + k * L, b->weights + order[k] * L, L);
    }
    d->row_spans = xcalloc(R + 1, sizeof *d->row_spans);
    for (uint64_t s = 0; s < b->n_spans; s++)
        d->row_spans[where[b->span_row[s]] + 1]++;
    for (uint64_t k = 0; k < R; k++)
        d->row_spans[k + 1] += d->row_spans[k];
    uint64_t *fill = xmalloc((R ? R : 1) * sizeof *fill);
    memcpy(fill, d->row_spans, (R ? R : 1) * sizeof *fill);
    d->spans = xmalloc((b->n_spans ? b->n_spans : 1) * sizeof *d->spans);
    uint64_t tokens = 0, loss = 0;
    for (uint64_t s = 0; s < b->n_spans; s++) {
        uint64_t k = where[b->span_row[s]];
        d->spans[fill[k]++] = b->spans[s];
        d->weights[k * L + b->spans[s].start] = 0;
        tokens += b->spans[s].len;
    }
    for (uint64_t t = 0; t < R * L; t++)
        loss += d->weights[t];
    h->n_tokens = tokens;
    h->n_loss_tokens = loss;
    free(fill);
    free(where);
    free(order);
    free(b->ids);
    free(b->weights);
    free(b->spans);
    free(b->span_row);
    memset(b, 0, sizeof *b);
}

static uint32_t rec_len(const pack_input *in, uint64_t i)
{
    return (uint32_t)(in->offsets[i + 1] - in->offsets[i]);
}

static void pack_concat(const pack_input *in, const pack_opts *o,
                        const uint64_t *recs, uint64_t n, rows_builder *b,
                        pack_header *h)
{
    uint64_t total = 0;
    for (uint64_t k = 0; k < n; k++)
        total += rec_len(in, recs[k]);
    uint64_t R = total / b->L;
    h->n_dropped = total - R * b->L;
    uint64_t row = 0;
    uint32_t pos = 0;
    for (uint64_t k = 0; k < n && row < R; k++) {
        uint64_t i = recs[k];
        uint32_t len = rec_len(in, i), from = 0;
        if (len)
            h->n_docs++;
        while (from < len && row < R) {
            if (pos == 0) {
                rb_new_row(b);
                rb_add_span(b, row, 0, b->L);
            }
            uint32_t take = len - from;
            if (take > b->L - pos)
                take = b->L - pos;
            place(b, in, o, i, from, take, row, pos);
            from += take;
            pos += take;
            if (pos == b->L) {
                pos = 0;
                row++;
            }
        }
    }
}

/* Buckets of rows by free space, with a two-level bitmap of the non-empty
 * buckets: find the smallest free space >= need in a few word scans. */
typedef struct free_index {
    uint32_t L;
    int64_t *head; /* (L + 1): first row with this much room, or -1 */
    int64_t *next; /* per row */
    uint64_t cap_rows;
    uint64_t *bits;    /* (L / 64 + 1) */
    uint64_t *summary; /* (L / 4096 + 1) */
    size_t nwords;
} free_index;

static void fi_set(free_index *f, uint32_t c)
{
    f->bits[c >> 6] |= 1ull << (c & 63);
    f->summary[c >> 12] |= 1ull << ((c >> 6) & 63);
}

static void fi_clear(free_index *f, uint32_t c)
{
    f->bits[c >> 6] &= ~(1ull << (c & 63));
    if (!f->bits[c >> 6])
        f->summary[c >> 12] &= ~(1ull << ((c >> 6) & 63));
}

static void fi_push(free_index *f, uint64_t row, uint32_t room)
{
    if (row >= f->cap_rows) {
        while (row >= f->cap_rows)
            f->cap_rows = f->cap_rows ? f->cap_rows * 2 : 64;
        f->next = xrealloc(f->next, f->cap_rows * sizeof *f->next);
    }
    f->next[row] = f->head[room];
    f->head[room] = (int64_t)row;
    fi_set(f, room);
}

static int64_t fi_pop(free_index *f, uint32_t room)
{
    int64_t row = f->head[room];
    f->head[room] = f->next[row];
    if (f->head[room] < 0)
        fi_clear(f, room);
    return row;
}

/* The smallest room >= need that some row has, or -1. */
static int64_t fi_find(const free_index *f, uint32_t need)
{
    size_t w = need >> 6;
    uint64_t m = f->bits[w] & (~0ull << (need & 63));
    if (m)
        return (int64_t)((w << 6) + (size_t)__builtin_ctzll(m));
    /* the next non-empty word after w, via the summary */
    size_t sw = (w + 1) >> 6;
    size_t nsum = (f->nwords + 63) >> 6;
    if (sw >= nsum)
        return -1;
    uint64_t sm = (w + 1) & 63 ? f->summary[sw] & (~0ull << ((w + 1) & 63))
                               : f->summary[sw];
    while (!sm) {
        if (++sw >= nsum)
            return -1;
        sm = f->summary[sw];
    }
    size_t word = (sw << 6) + (size_t)__builtin_ctzll(sm);
    return (int64_t)((word << 6) + (size_t)__builtin_ctzll(f->bits[word]));
}

typedef struct piece {
    uint64_t rec;
    uint32_t from, len;
} piece;

static int piece_cmp(const void *a, const void *b)
{
    const piece *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    if (x->rec != y->rec)
        return x->rec < y->rec ? -1 : 1;
    return x->from < y->from ? -1 : x->from > y->from;
}

static void pack_bfd(const pack_input *in, const pack_opts *o,
                     const uint64_t *recs, uint64_t n, rows_builder *b,
                     pack_header *h)
{
    uint32_t L = b->L;
    uint64_t np = 0, cap = n ? n : 1;
    piece *pc = xmalloc(cap * sizeof *pc);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = recs[k];
        uint32_t len = rec_len(in, i);
        if (len == 0)
            continue;
        h->n_docs++;
        if (len > L && o->overlong == PACK_OVERLONG_TRUNCATE) {
            h->n_truncated++;
            h->n_dropped += len - L;
            len = L;
        } else if (len > L) {
            h->n_split++;
        }
        for (uint32_t from = 0; from < len; from += L) {
            if (np == cap) {
                cap *= 2;
                pc = xrealloc(pc, cap * sizeof *pc);
            }
            pc[np++] = (piece){i, from, len - from < L ? len - from : L};
        }
    }
    qsort(pc, np, sizeof *pc, piece_cmp);

    free_index f = {.L = L};
    f.head = xmalloc(((size_t)L + 1) * sizeof *f.head);
    for (uint32_t c = 0; c <= L; c++)
        f.head[c] = -1;
    f.nwords = ((size_t)L >> 6) + 1;
    f.bits = xcalloc(f.nwords, sizeof *f.bits);
    f.summary = xcalloc(((f.nwords + 63) >> 6) + 1, sizeof *f.summary);
    for (uint64_t k = 0; k < np; k++) {
        uint32_t len = pc[k].len;
        int64_t room = fi_find(&f, len);
        uint64_t row;
        if (room < 0) {
            row = rb_new_row(b);
            room = L;
        } else {
            row = (uint64_t)fi_pop(&f, (uint32_t)room);
        }
        uint32_t pos = L - (uint32_t)room;
        place(b, in, o, pc[k].rec, pc[k].from, len, row, pos);
        rb_add_span(b, row, pos, len);
        uint32_t left = (uint32_t)room - len;
        if (left > 0)
            fi_push(&f, row, left);
    }
    free(f.head);
    free(f.next);
    free(f.bits);
    free(f.summary);
    free(pc);
}

static void build_one(const pack_input *in, const pack_opts *o,
                      const uint64_t *recs, uint64_t n, int is_eval,
                      pack_data *d)
{
    memset(d, 0, sizeof *d);
    pack_header *h = &d->h;
    h->version = PACK_VERSION;
    h->seq_len = o->seq_len;
    h->vocab_size = in->h.vocab_size;
    h->bos_id = in->h.bos_id;
    h->eos_id = in->h.eos_id;
    memcpy(h->tokenizer, in->h.tokenizer, sizeof h->tokenizer);
    h->mode = o->mode;
    h->loss = o->loss;
    h->overlong = o->overlong;
    h->seed = o->seed;
    h->shuffled = o->shuffle != 0;
    h->is_eval = is_eval;
    h->eval_fraction = o->eval_fraction;
    snprintf(h->producer, sizeof h->producer, "pack %s", QLORA_VERSION);
    rows_builder b = {.L = o->seq_len};
    if (o->mode == PACK_MODE_CONCAT)
        pack_concat(in, o, recs, n, &b, h);
    else
        pack_bfd(in, o, recs, n, &b, h);
    /* Distinct streams for the eval choice and each file's row order. */
    rb_finish(
        &b, o,
        o->seed ^ (is_eval ? 0x6576616c5f726f77ull : 0x747261696e726f77ull), d);
}

int pack_build(const pack_input *in, const pack_opts *o, pack_data *train,
               pack_data *eval)
{
    if (o->seq_len < 2 || o->seq_len > PACK_MAX_SEQ_LEN)
        return msg_error("sequence length %" PRIu32 " out of range (2 to %u)",
                         o->seq_len, PACK_MAX_SEQ_LEN);
    if (!(o->eval_fraction >= 0 && o->eval_fraction < 1))
        return msg_error("eval fraction %g out of range [0, 1)",
                         o->eval_fraction);
    if (o->eval_fraction > 0 && !eval)
        return msg_error("eval fraction given without an eval output");
    uint64_t n = in->n_records;
    uint64_t n_eval = (uint64_t)floor(o->eval_fraction * (double)n + 0.5);
    if (n_eval > n)
        n_eval = n;
    unsigned char *is_eval = xcalloc(n ? n : 1, 1);
    if (n_eval) {
        uint64_t *perm = xmalloc(n * sizeof *perm);
        for (uint64_t i = 0; i < n; i++)
            perm[i] = i;
        rng g = {o->seed ^ 0x6576616c2d736574ull};
        shuffle_u64(perm, n, &g);
        for (uint64_t i = 0; i < n_eval; i++)
            is_eval[perm[i]] = 1;
        free(perm);
    }
    uint64_t *tr = xmalloc((n ? n : 1) * sizeof *tr),
             *ev = xmalloc((n ? n : 1) * sizeof *ev);
    uint64_t nt = 0, ne = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (is_eval[i])
            ev[ne++] = i;
        else
            tr[nt++] = i;
    }
    build_one(in, o, tr, nt, 0, train);
    if (eval)
        build_one(in, o, ev, ne, 1, eval);
    free(tr);
    free(ev);
    free(is_eval);
    return 0;
}
