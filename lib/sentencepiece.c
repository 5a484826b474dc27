/* sentencepiece.c: SentencePiece BPE models, read by hand; encode/decode.
 *
 * Facts reproduced from SentencePiece (normalizer.cc, bpe_model.cc,
 * model_interface.cc, sentencepiece_processor.cc); the code is our own.
 *
 * Why it is built this way:
 *  - The model is a protobuf; the few fields that matter are read with a
 *    bounds-checked wire-format walker, every other field is skipped, so a
 *    foreign or truncated file is one clean error.
 *  - SentencePiece merges two adjacent symbols whenever their concatenated
 *    text is a piece, hashing the text of every candidate pair. We precompute
 *    the same relation once per model as a table keyed by the two symbol ids
 *    (every split of every piece into two known halves), so a candidate pair
 *    costs one integer hash lookup. Characters that are not pieces but occur
 *    inside pieces get "virtual" symbol ids past the vocabulary so that the
 *    relation stays exact for any model.
 *  - The merge loop is SentencePiece's: a doubly linked list of symbols and a
 *    binary heap of candidate pairs ordered by piece score (higher first),
 *    then by position (leftmost first); stale candidates are skipped when
 *    popped. Per record the work is O(n log n) in its characters, with all
 *    scratch memory kept in a per-thread sp_encoder.
 *  - When no piece holds a U+2581 right after another character (checked at
 *    load time; true of models trained with split_by_whitespace, such as
 *    Llama's), no merge can cross the start of a run of U+2581, so BPE over
 *    the whole text equals BPE over each such segment ("▁▁word"), and the
 *    segments' results are cached per thread. Most words repeat, so most
 *    segments cost one hash lookup. Otherwise the whole text is one run.
 *  - The prompt/completion boundary is tracked through normalization as the
 *    first normalized byte produced from a character at or after it, so the
 *    completion's first token falls out of the same pass.
 */
#define _POSIX_C_SOURCE 200809L
#include "sentencepiece.h"

#include <assert.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "msg.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define SP_MAX_PIECE 8000      /* SentencePiece's kMaxPieceSize */
#define SP_DEAD (-2)           /* symbol absorbed by its left neighbour */
#define SP_MAX_TEXT (1u << 30) /* input bytes per call */

static const char ws_symbol[] = "\xe2\x96\x81"; /* U+2581, 3 bytes */

/* 1 when s[i..i+3) is U+2581 (the caller ensures 3 bytes are there). */
static inline int is_ws_at(const char *s, size_t i)
{
    return (unsigned char)s[i] == 0xe2 && (unsigned char)s[i + 1] == 0x96 &&
           (unsigned char)s[i + 2] == 0x81;
}

/* ---------------------------------------------------------------------- */
/* Hash tables                                                             */

static uint32_t hash_bytes(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h ^ (h >> 15);
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* Strings to ids; the strings live in the model (sym_off/sym_len). */
typedef struct {
    uint32_t hash;
    int32_t id; /* -1 empty */
} str_slot;

typedef struct {
    str_slot *slots;
    uint32_t mask;
    uint32_t used;
} str_map;

typedef struct {
    uint64_t key; /* left << 32 | right; UINT64_MAX empty */
    int32_t merged;
} pair_slot;

typedef struct {
    pair_slot *slots;
    uint64_t mask;
    uint64_t used;
} pair_map;

/* ---------------------------------------------------------------------- */
/* The model                                                               */

struct sp_model {
    uint32_t n;     /* pieces: ids 0..n-1 */
    uint32_t n_sym; /* pieces plus virtual characters */
    uint32_t sym_cap;
    char *blob; /* every symbol text, NUL-separated */
    size_t blob_len, blob_cap;
    uint32_t *sym_off; /* (n_sym) offsets into blob */
    uint32_t *sym_len; /* (n_sym) */
    float *score;      /* (n) */
    uint8_t *type;     /* (n) sp_piece_type */

    str_map pieces;   /* NORMAL, USER_DEFINED, UNUSED and virtual chars */
    str_map reserved; /* CONTROL, UNKNOWN, BYTE */
    pair_map pairs;
    int32_t ascii_sym[128];
    int32_t byte_id[256];

    int32_t *user_defined; /* ids of USER_DEFINED pieces, longest first */
    uint32_t n_user_defined;
    uint8_t ud_first[256]; /* first bytes of user-defined pieces */
    int has_unused;
    int segmentable; /* no merge crosses the start of a U+2581 run */

    int byte_fallback;
    int add_dummy_prefix;
    int remove_extra_whitespaces;
    int escape_whitespaces;
    int32_t unk, bos, eos, pad;
    char *unk_surface;
    size_t unk_surface_len;
    char fingerprint[17];
};

static const char *sym_text(const sp_model *m, int32_t id)
{
    return m->blob + m->sym_off[id];
}

static void str_map_init(str_map *t, uint32_t expect)
{
    uint32_t cap = 64;
    while (cap < expect * 2)
        cap <<= 1;
    t->slots = xmalloc(cap * sizeof *t->slots);
    for (uint32_t i = 0; i < cap; i++)
        t->slots[i].id = -1;
    t->mask = cap - 1;
    t->used = 0;
}

static int32_t str_map_get(const sp_model *m, const str_map *t, const char *s,
                           size_t n)
{
    uint32_t h = hash_bytes(s, n);
    for (uint32_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const str_slot *sl = &t->slots[i];
        if (sl->id < 0)
            return -1;
        if (sl->hash == h && m->sym_len[sl->id] == n &&
            memcmp(sym_text(m, sl->id), s, n) == 0)
            return sl->id;
    }
}

static void str_map_grow(const sp_model *m, str_map *t);

/* Inserts id (whose text is already in the blob); 0, or -1 if present. */
static int str_map_put(const sp_model *m, str_map *t, int32_t id)
{
    if ((t->used + 1) * 2 > t->mask + 1)
        str_map_grow(m, t);
    const char *s = sym_text(m, id);
    size_t n = m->sym_len[id];
    uint32_t h = hash_bytes(s, n);
    uint32_t i = h & t->mask;
    for (;; i = (i + 1) & t->mask) {
        str_slot *sl = &t->slots[i];
        if (sl->id < 0)
            break;
        if (sl->hash == h && m->sym_len[sl->id] == n &&
            memcmp(sym_text(m, sl->id), s, n) == 0)
            return -1;
    }
    t->slots[i].hash = h;
    t->slots[i].id = id;
    t->used++;
    return 0;
}

static void str_map_grow(const sp_model *m, str_map *t)
{
    str_map old = *t;
    str_map_init(t, (old.mask + 1));
    for (uint32_t i = 0; i <= old.mask; i++)
        if (old.slots[i].id >= 0)
            str_map_put(m, t, old.slots[i].id);
    free(old.slots);
}

static void pair_map_init(pair_map *t, uint64_t expect)
{
    uint64_t cap = 64;
    while (cap < expect * 2)
        cap <<= 1;
    t->slots = xmalloc(cap * sizeof *t->slots);
    for (uint64_t i = 0; i < cap; i++)
        t->slots[i].key = UINT64_MAX;
    t->mask = cap - 1;
    t->used = 0;
}

static void pair_map_put(pair_map *t, uint64_t key, int32_t merged)
{
    if ((t->used + 1) * 2 > t->mask + 1) {
        pair_map old = *t;
        pair_map_init(t, old.mask + 1);
        for (uint64_t i = 0; i <= old.mask; i++)
            if (old.slots[i].key != UINT64_MAX)
                pair_map_put(t, old.slots[i].key, old.slots[i].merged);
        free(old.slots);
    }
    for (uint64_t i = hash_u64(key) & t->mask;; i = (i + 1) & t->mask) {
        if (t->slots[i].key == key)
            return; /* a piece is determined by its halves: same value */
        if (t->slots[i].key == UINT64_MAX) {
            t->slots[i].key = key;
            t->slots[i].merged = merged;
            t->used++;
            return;
        }
    }
}

static inline int32_t pair_map_get(const pair_map *t, uint64_t key)
{
    for (uint64_t i = hash_u64(key) & t->mask;; i = (i + 1) & t->mask) {
        if (t->slots[i].key == key)
            return t->slots[i].merged;
        if (t->slots[i].key == UINT64_MAX)
            return -1;
    }
}

/* Appends a symbol text to the blob and returns its new symbol id. */
static int32_t add_symbol(sp_model *m, const char *s, size_t n)
{
    if (m->n_sym == m->sym_cap) {
        m->sym_cap = m->sym_cap ? m->sym_cap * 2 : 1024;
        m->sym_off = xrealloc(m->sym_off, m->sym_cap * sizeof *m->sym_off);
        m->sym_len = xrealloc(m->sym_len, m->sym_cap * sizeof *m->sym_len);
    }
    if (m->blob_len + n + 1 > m->blob_cap) {
        while (m->blob_len + n + 1 > m->blob_cap)
            m->blob_cap = m->blob_cap ? m->blob_cap * 2 : 65536;
        m->blob = xrealloc(m->blob, m->blob_cap);
    }
    memcpy(m->blob + m->blob_len, s, n);
    m->blob[m->blob_len + n] = '\0';
    m->sym_off[m->n_sym] = (uint32_t)m->blob_len;
    m->sym_len[m->n_sym] = (uint32_t)n;
    m->blob_len += n + 1;
    return (int32_t)m->n_sym++;
}

/* ---------------------------------------------------------------------- */
/* UTF-8, as SentencePiece judges it                                       */

/* Length of the character starting with byte c, from its lead byte only
 * (SentencePiece's OneCharLen). */
static inline size_t one_char_len(unsigned char c)
{
    static const uint8_t len[16] = {1, 1, 1, 1, 1, 1, 1, 1,
                                    1, 1, 1, 1, 2, 2, 3, 4};
    return len[c >> 4];
}

static inline int is_trail(unsigned char c)
{
    return (c & 0xc0) == 0x80;
}

/* Decodes one character of s[0..n) (n >= 1): returns its length when valid
 * (no overlongs, surrogates or values above U+10FFFF), 0 when invalid. */
static inline size_t utf8_char(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    if (n >= 2 && (c & 0xe0) == 0xc0) {
        uint32_t cp = ((c & 0x1fu) << 6) | (s[1] & 0x3fu);
        if (is_trail(s[1]) && cp >= 0x80)
            return 2;
    } else if (n >= 3 && (c & 0xf0) == 0xe0) {
        uint32_t cp =
            ((c & 0x0fu) << 12) | ((s[1] & 0x3fu) << 6) | (s[2] & 0x3fu);
        if (is_trail(s[1]) && is_trail(s[2]) && cp >= 0x800 &&
            (cp < 0xd800 || cp > 0xdfff))
            return 3;
    } else if (n >= 4 && (c & 0xf8) == 0xf0) {
        uint32_t cp = ((c & 0x07u) << 18) | ((s[1] & 0x3fu) << 12) |
                      ((s[2] & 0x3fu) << 6) | (s[3] & 0x3fu);
        if (is_trail(s[1]) && is_trail(s[2]) && is_trail(s[3]) &&
            cp >= 0x10000 && cp <= 0x10ffff)
            return 4;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Protobuf wire format                                                    */

typedef struct {
    const uint8_t *p, *start, *end;
} pb_reader;

typedef struct {
    uint32_t field;
    int wire;            /* 0 varint, 1 fixed64, 2 bytes, 5 fixed32 */
    uint64_t v;          /* varint and fixed values */
    const uint8_t *data; /* bytes */
    size_t len;
} pb_field;

static int pb_varint(pb_reader *r, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end)
            return -1;
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* 1 a field was read, 0 end of message, -1 malformed. */
static int pb_next(pb_reader *r, pb_field *f)
{
    if (r->p == r->end)
        return 0;
    uint64_t key;
    if (pb_varint(r, &key) < 0 || (key >> 3) == 0 || (key >> 3) > 0x1fffffff)
        return -1;
    f->field = (uint32_t)(key >> 3);
    f->wire = (int)(key & 7);
    f->data = NULL;
    f->len = 0;
    f->v = 0;
    switch (f->wire) {
    case 0:
        return pb_varint(r, &f->v) < 0 ? -1 : 1;
    case 1:
        if (r->end - r->p < 8)
            return -1;
        for (int i = 7; i >= 0; i--)
            f->v = f->v << 8 | r->p[i];
        r->p += 8;
        return 1;
    case 2: {
        uint64_t n;
        if (pb_varint(r, &n) < 0 || n > (uint64_t)(r->end - r->p))
            return -1;
        f->data = r->p;
        f->len = (size_t)n;
        r->p += n;
        return 1;
    }
    case 5:
        if (r->end - r->p < 4)
            return -1;
        f->v = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 |
               (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
        r->p += 4;
        return 1;
    default:
        return -1; /* groups (3, 4) never appear in a ModelProto */
    }
}

/* ---------------------------------------------------------------------- */
/* Loading                                                                 */

typedef struct {
    const uint8_t *text;
    size_t len;
    float score;
    int type;
} raw_piece;

typedef struct {
    int model_type; /* 1 unigram (the proto default), 2 BPE, ... */
    int byte_fallback;
    int ws_suffix;
    const uint8_t *unk_surface;
    size_t unk_surface_len;
    int has_unk_surface;
    const uint8_t *names[4]; /* unk, bos, eos, pad piece names */
    size_t name_len[4];
    int add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    size_t charsmap_len, denorm_charsmap_len;
} raw_spec;

static int corrupt(const char *name, const pb_reader *r)
{
    return msg_error(
        "not a SentencePiece model '%s' (bad protobuf at byte %zu)", name,
        (size_t)(r->p - r->start));
}

static int parse_piece(const uint8_t *d, size_t n, const uint8_t *file,
                       const char *name, raw_piece *out)
{
    pb_reader r = {d, file, d + n};
    pb_field f;
    int rc;
    out->text = NULL;
    out->len = 0;
    out->score = 0;
    out->type = SP_PIECE_NORMAL;
    while ((rc = pb_next(&r, &f)) > 0) {
        if (f.field == 1 && f.wire == 2) {
            out->text = f.data;
            out->len = f.len;
        } else if (f.field == 2 && f.wire == 5) {
            uint32_t bits = (uint32_t)f.v;
            memcpy(&out->score, &bits, sizeof bits);
        } else if (f.field == 3 && f.wire == 0) {
            out->type = (int)f.v;
        } else if (f.field <= 3) {
            return corrupt(name, &r);
        }
    }
    return rc < 0 ? corrupt(name, &r) : 0;
}

static int parse_trainer(const uint8_t *d, size_t n, const uint8_t *file,
                         const char *name, raw_spec *s)
{
    pb_reader r = {d, file, d + n};
    pb_field f;
    int rc;
    while ((rc = pb_next(&r, &f)) > 0) {
        int varint = f.wire == 0, bytes = f.wire == 2;
        switch (f.field) {
        case 3:
            if (!varint)
                return corrupt(name, &r);
            s->model_type = (int)f.v;
            break;
        case 24:
            if (!varint)
                return corrupt(name, &r);
            s->ws_suffix = f.v != 0;
            break;
        case 35:
            if (!varint)
                return corrupt(name, &r);
            s->byte_fallback = f.v != 0;
            break;
        case 44:
            if (!bytes)
                return corrupt(name, &r);
            s->unk_surface = f.data;
            s->unk_surface_len = f.len;
            s->has_unk_surface = 1;
            break;
        case 45:
        case 46:
        case 47:
        case 48:
            if (!bytes)
                return corrupt(name, &r);
            s->names[f.field - 45] = f.data;
            s->name_len[f.field - 45] = f.len;
            break;
        default:
            break;
        }
    }
    return rc < 0 ? corrupt(name, &r) : 0;
}

static int parse_normalizer(const uint8_t *d, size_t n, const uint8_t *file,
                            const char *name, raw_spec *s, int denorm)
{
    pb_reader r = {d, file, d + n};
    pb_field f;
    int rc;
    while ((rc = pb_next(&r, &f)) > 0) {
        if (f.field == 2) {
            if (f.wire != 2)
                return corrupt(name, &r);
            if (denorm)
                s->denorm_charsmap_len = f.len;
            else
                s->charsmap_len = f.len;
        } else if (f.field >= 3 && f.field <= 5 && !denorm) {
            if (f.wire != 0)
                return corrupt(name, &r);
            int v = f.v != 0;
            if (f.field == 3)
                s->add_dummy_prefix = v;
            else if (f.field == 4)
                s->remove_extra_whitespaces = v;
            else
                s->escape_whitespaces = v;
        }
    }
    return rc < 0 ? corrupt(name, &r) : 0;
}

/* "<0xNN>" with upper-case hex, as SentencePiece writes byte pieces. */
static int byte_piece_value(const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    const char *a = memchr(hex, s[3], 16), *b = memchr(hex, s[4], 16);
    if (!a || !b || !s[3] || !s[4])
        return -1;
    return (int)((a - hex) * 16 + (b - hex));
}

/* Longest first, so the first match is the longest (insertion sort:
 * user-defined pieces are few). */
static void sort_user_defined(sp_model *m)
{
    for (uint32_t i = 1; i < m->n_user_defined; i++) {
        int32_t x = m->user_defined[i];
        uint32_t j = i;
        while (j > 0 && m->sym_len[m->user_defined[j - 1]] < m->sym_len[x]) {
            m->user_defined[j] = m->user_defined[j - 1];
            j--;
        }
        m->user_defined[j] = x;
    }
}

/* The id SentencePiece's PieceToId gives (reserved pieces first), or -1. */
int32_t sp_model_piece_to_id(const sp_model *m, const char *s, size_t n)
{
    int32_t id = str_map_get(m, &m->reserved, s, n);
    if (id >= 0)
        return id;
    id = str_map_get(m, &m->pieces, s, n);
    return id >= 0 && (uint32_t)id < m->n ? id : -1;
}

/* Symbol id of a piece text for merging: a piece of pieces_, a virtual
 * character (created on demand when create), or -1. */
static int32_t merge_symbol(sp_model *m, const char *s, size_t n, int create)
{
    int32_t id = str_map_get(m, &m->pieces, s, n);
    if (id >= 0 || !create || one_char_len((unsigned char)s[0]) != n)
        return id;
    id = add_symbol(m, s, n);
    str_map_put(m, &m->pieces, id);
    return id;
}

static void build_pairs(sp_model *m)
{
    pair_map_init(&m->pairs, (uint64_t)m->n * 4);
    for (uint32_t id = 0; id < m->n; id++) {
        int t = m->type[id];
        if (t != SP_PIECE_NORMAL && t != SP_PIECE_USER_DEFINED &&
            t != SP_PIECE_UNUSED)
            continue;
        size_t len = m->sym_len[id];
        for (size_t k = one_char_len((unsigned char)sym_text(m, id)[0]);
             k < len; k += one_char_len((unsigned char)sym_text(m, id)[k])) {
            /* sym_text may move when virtual characters are added */
            int32_t a = merge_symbol(m, sym_text(m, id), k, 1);
            int32_t b = merge_symbol(m, sym_text(m, id) + k, len - k, 1);
            if (a >= 0 && b >= 0)
                pair_map_put(&m->pairs,
                             (uint64_t)(uint32_t)a << 32 | (uint32_t)b,
                             (int32_t)id);
        }
    }
    for (int c = 0; c < 128; c++) {
        char ch = (char)c;
        m->ascii_sym[c] = str_map_get(m, &m->pieces, &ch, 1);
    }

    /* Segmenting at U+2581 runs is exact when no mergeable piece has a
     * U+2581 right after another character (true of SentencePiece models
     * trained with split_by_whitespace) and the resegmentation of UNUSED
     * pieces, which looks at the whole text, is not in play. */
    m->segmentable = m->escape_whitespaces && !m->has_unused;
    for (uint32_t id = 0; id < m->n && m->segmentable; id++) {
        int t = m->type[id];
        if (t != SP_PIECE_NORMAL && t != SP_PIECE_USER_DEFINED)
            continue;
        const char *p = sym_text(m, id);
        for (size_t k = 1; k + 3 <= m->sym_len[id]; k++)
            if (is_ws_at(p, k) && !(k >= 3 && is_ws_at(p, k - 3))) {
                m->segmentable = 0;
                break;
            }
    }
}

sp_model *sp_model_parse(const void *data, size_t len, const char *name)
{
    const uint8_t *file = data;
    pb_reader r = {file, file, file + len};
    pb_field f;
    raw_spec spec = {0};
    spec.model_type = 1;
    spec.add_dummy_prefix = spec.remove_extra_whitespaces =
        spec.escape_whitespaces = 1;
    raw_piece *raw = NULL;
    size_t n_raw = 0, cap_raw = 0;
    int rc, have_trainer = 0;
    sp_model *m = xcalloc(1, sizeof *m);

    while ((rc = pb_next(&r, &f)) > 0) {
        if (f.field >= 1 && f.field <= 5 && f.wire != 2) {
            corrupt(name, &r);
            goto fail;
        }
        if (f.field == 1) {
            if (n_raw == cap_raw) {
                cap_raw = cap_raw ? cap_raw * 2 : 1024;
                raw = xrealloc(raw, cap_raw * sizeof *raw);
            }
            if (parse_piece(f.data, f.len, file, name, &raw[n_raw]) < 0)
                goto fail;
            n_raw++;
        } else if (f.field == 2) {
            have_trainer = 1;
            if (parse_trainer(f.data, f.len, file, name, &spec) < 0)
                goto fail;
        } else if (f.field == 3 || f.field == 5) {
            if (parse_normalizer(f.data, f.len, file, name, &spec,
                                 f.field == 5) < 0)
                goto fail;
        }
    }
    if (rc < 0) {
        corrupt(name, &r);
        goto fail;
    }
    if (n_raw == 0 || !have_trainer) {
        msg_error("not a SentencePiece model '%s' (no %s)", name,
                  n_raw == 0 ? "pieces" : "trainer_spec");
        goto fail;
    }
    if (n_raw >= INT32_MAX / 2) {
        msg_error("not a SentencePiece model '%s' (too many pieces)", name);
        goto fail;
    }

    /* What we refuse rather than tokenize differently from SentencePiece. */
    const char *unsupported = NULL;
    static const char *const kinds[] = {"", "unigram", "BPE", "word", "char"};
    if (spec.model_type != 2)
        unsupported = spec.model_type >= 1 && spec.model_type <= 4
                          ? kinds[spec.model_type]
                          : "of an unknown type";
    if (unsupported) {
        msg_error("unsupported tokenizer model '%s': %s model (only BPE is "
                  "supported)",
                  name, unsupported);
        goto fail;
    }
    if (spec.charsmap_len || spec.denorm_charsmap_len) {
        msg_error("unsupported tokenizer model '%s': non-empty %s "
                  "precompiled_charsmap "
                  "(only identity normalization is supported)",
                  name, spec.charsmap_len ? "normalizer" : "denormalizer");
        goto fail;
    }
    if (spec.ws_suffix) {
        msg_error(
            "unsupported tokenizer model '%s': treat_whitespace_as_suffix",
            name);
        goto fail;
    }

    m->n = (uint32_t)n_raw;
    m->score = xmalloc(n_raw * sizeof *m->score);
    m->type = xmalloc(n_raw);
    str_map_init(&m->pieces, (uint32_t)n_raw);
    str_map_init(&m->reserved, 512);
    for (int i = 0; i < 256; i++)
        m->byte_id[i] = -1;
    m->unk = -1;
    m->byte_fallback = spec.byte_fallback;
    m->add_dummy_prefix = spec.add_dummy_prefix;
    m->remove_extra_whitespaces = spec.remove_extra_whitespaces;
    m->escape_whitespaces = spec.escape_whitespaces;
    int n_bytes = 0;
    for (size_t i = 0; i < n_raw; i++) {
        const raw_piece *p = &raw[i];
        const char *text = (const char *)p->text;
        if (p->len == 0 || memchr(text, '\0', p->len) ||
            p->len >= SP_MAX_PIECE || p->type < SP_PIECE_NORMAL ||
            p->type > SP_PIECE_BYTE) {
            msg_error("invalid tokenizer model '%s': piece %zu is %s", name, i,
                      p->len == 0                  ? "empty"
                      : p->len >= SP_MAX_PIECE     ? "too long"
                      : p->type < 1 || p->type > 6 ? "of an unknown type"
                                                   : "holding a NUL byte");
            goto fail;
        }
        int32_t id = add_symbol(m, text, p->len);
        m->score[id] = p->score;
        m->type[id] = (uint8_t)p->type;
        int normal = p->type == SP_PIECE_NORMAL ||
                     p->type == SP_PIECE_USER_DEFINED ||
                     p->type == SP_PIECE_UNUSED;
        if (str_map_put(m, normal ? &m->pieces : &m->reserved, id) < 0) {
            msg_error("invalid tokenizer model '%s': piece %zu '%.*s' is "
                      "defined twice",
                      name, i, (int)p->len, text);
            goto fail;
        }
        if (p->type == SP_PIECE_UNKNOWN) {
            if (m->unk >= 0) {
                msg_error(
                    "invalid tokenizer model '%s': more than one unknown piece",
                    name);
                goto fail;
            }
            m->unk = id;
        } else if (p->type == SP_PIECE_BYTE) {
            int b = byte_piece_value(text, p->len);
            if (!spec.byte_fallback || b < 0) {
                msg_error("invalid tokenizer model '%s': byte piece '%.*s' %s",
                          name, (int)p->len, text,
                          b < 0 ? "is malformed" : "without byte_fallback");
                goto fail;
            }
            if (m->byte_id[b] < 0)
                n_bytes++;
            m->byte_id[b] = id;
        } else if (p->type == SP_PIECE_USER_DEFINED) {
            m->user_defined =
                xrealloc(m->user_defined,
                         (m->n_user_defined + 1) * sizeof *m->user_defined);
            m->user_defined[m->n_user_defined++] = id;
            m->ud_first[(unsigned char)text[0]] = 1;
        } else if (p->type == SP_PIECE_UNUSED) {
            m->has_unused = 1;
        }
    }
    if (m->unk < 0 || (spec.byte_fallback && n_bytes != 256)) {
        msg_error("invalid tokenizer model '%s': %s", name,
                  m->unk < 0 ? "no unknown piece"
                             : "byte_fallback without 256 byte pieces");
        goto fail;
    }
    sort_user_defined(m);

    static const char *const defaults[4] = {"<unk>", "<s>", "</s>", "<pad>"};
    int32_t *ids[4] = {NULL, &m->bos, &m->eos, &m->pad};
    for (int k = 1; k < 4; k++) {
        const char *nm =
            spec.name_len[k] ? (const char *)spec.names[k] : defaults[k];
        size_t nl = spec.name_len[k] ? spec.name_len[k] : strlen(defaults[k]);
        int32_t id = sp_model_piece_to_id(m, nm, nl);
        *ids[k] = id >= 0 && m->type[id] == SP_PIECE_CONTROL ? id : -1;
    }
    const char *surface = spec.has_unk_surface ? (const char *)spec.unk_surface
                                               : " \xe2\x81\x87 ";
    m->unk_surface_len =
        spec.has_unk_surface ? spec.unk_surface_len : strlen(surface);
    m->unk_surface = xmalloc(m->unk_surface_len + 1);
    memcpy(m->unk_surface, surface, m->unk_surface_len);
    free(raw);
    build_pairs(m);
    return m;

fail:
    free(raw);
    sp_model_free(m);
    return NULL;
}

sp_model *sp_model_load(const char *path)
{
    char *data;
    size_t len;
    if (io_read_file(path, &data, &len) < 0)
        return NULL;
    sp_model *m = sp_model_parse(data, len, path);
    if (m)
        toks_fingerprint(data, len, m->fingerprint);
    free(data);
    return m;
}

void sp_model_free(sp_model *m)
{
    if (!m)
        return;
    free(m->blob);
    free(m->sym_off);
    free(m->sym_len);
    free(m->score);
    free(m->type);
    free(m->pieces.slots);
    free(m->reserved.slots);
    free(m->pairs.slots);
    free(m->user_defined);
    free(m->unk_surface);
    free(m);
}

uint32_t sp_model_vocab_size(const sp_model *m)
{
    return m->n;
}
int32_t sp_model_bos_id(const sp_model *m)
{
    return m->bos;
}
int32_t sp_model_eos_id(const sp_model *m)
{
    return m->eos;
}
int32_t sp_model_pad_id(const sp_model *m)
{
    return m->pad;
}
int32_t sp_model_unk_id(const sp_model *m)
{
    return m->unk;
}
const char *sp_model_fingerprint(const sp_model *m)
{
    return m->fingerprint;
}

const char *sp_model_piece(const sp_model *m, uint32_t id, size_t *len)
{
    assert(id < m->n);
    *len = m->sym_len[id];
    return sym_text(m, id);
}

float sp_model_score(const sp_model *m, uint32_t id)
{
    assert(id < m->n);
    return m->score[id];
}

sp_piece_type sp_model_type(const sp_model *m, uint32_t id)
{
    assert(id < m->n);
    return (sp_piece_type)m->type[id];
}

/* ---------------------------------------------------------------------- */
/* Encoding                                                                */

void sp_ids_push(sp_ids *v, uint32_t id)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 256;
        v->ids = xrealloc(v->ids, v->cap * sizeof *v->ids);
    }
    v->ids[v->n++] = id;
}

void sp_ids_free(sp_ids *v)
{
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

typedef struct {
    int32_t sym;    /* symbol id, -1 unknown character, SP_DEAD merged away */
    int32_t prev;   /* -1 at the start */
    int32_t next;   /* -1 at the end */
    uint32_t start; /* first byte in the normalized text */
    int32_t frozen; /* user-defined: never merged */
} symbol;

typedef struct {
    float score;
    int32_t left, right; /* symbol indices */
    int32_t lsym, rsym;  /* their symbol ids when the pair was proposed */
    int32_t merged;      /* the piece they form */
} candidate;

/* A final symbol of a BPE run: what emit_symbol() turns into ids. */
typedef struct {
    int32_t sym;
    uint32_t len;
} final_sym;

/* The segment cache: segment text -> its final symbols. */
typedef struct {
    uint32_t hash;
    uint32_t key_len; /* 0 = empty slot */
    uint32_t key_off; /* in ckeys */
    uint32_t val_off; /* in cvals */
    uint32_t val_n;
} cache_slot;

#define CACHE_SLOTS (1u << 18)
#define CACHE_MAX_USED (CACHE_SLOTS / 2)
#define CACHE_MAX_KEY 128

struct sp_encoder {
    const sp_model *m;
    char *norm;
    size_t norm_cap;
    symbol *syms;
    size_t syms_cap;
    candidate *heap;
    size_t heap_n, heap_cap;
    final_sym *fin; /* the current BPE run's result */
    size_t fin_n, fin_cap;
    /* UNUSED pieces: the halves last proposed for each (SentencePiece's
     * rev_merge), valid when stamp matches the current call. */
    int32_t *rev_l, *rev_r;
    uint32_t *rev_stamp;
    uint32_t stamp;
    /* segment cache, cleared when full so memory stays bounded */
    cache_slot *cache;
    uint32_t cache_used;
    char *ckeys;
    size_t ckeys_len, ckeys_cap;
    final_sym *cvals;
    size_t cvals_len, cvals_cap;
    /* emission state */
    sp_ids *out;
    size_t out_base;
    size_t nb; /* first normalized byte of the completion */
    size_t cs; /* first completion token (relative), SIZE_MAX unset */
    int prev_unk;
};

sp_encoder *sp_encoder_new(const sp_model *m)
{
    sp_encoder *e = xcalloc(1, sizeof *e);
    e->m = m;
    if (m->has_unused) {
        e->rev_l = xmalloc(m->n * sizeof *e->rev_l);
        e->rev_r = xmalloc(m->n * sizeof *e->rev_r);
        e->rev_stamp = xcalloc(m->n, sizeof *e->rev_stamp);
    }
    return e;
}

void sp_encoder_free(sp_encoder *e)
{
    if (!e)
        return;
    free(e->norm);
    free(e->syms);
    free(e->heap);
    free(e->rev_l);
    free(e->rev_r);
    free(e->rev_stamp);
    free(e->fin);
    free(e->cache);
    free(e->ckeys);
    free(e->cvals);
    free(e);
}

/* The longest user-defined piece at s[0..n), or -1. */
static int32_t match_user_defined(const sp_model *m, const char *s, size_t n)
{
    if (!m->ud_first[(unsigned char)s[0]])
        return -1;
    for (uint32_t i = 0; i < m->n_user_defined; i++) {
        int32_t id = m->user_defined[i];
        size_t l = m->sym_len[id];
        if (l <= n && memcmp(sym_text(m, id), s, l) == 0)
            return id; /* sorted longest first */
    }
    return -1;
}

/* The normalizer's unit at text[at..len): a user-defined piece, a
 * character, or an invalid byte (which stands for U+FFFD). Sets *ptr and
 * *ulen to its normalized text and returns the input bytes it takes. */
static inline size_t next_unit(const sp_model *m, const char *text, size_t len,
                               size_t at, const char **ptr, size_t *ulen)
{
    const unsigned char *u = (const unsigned char *)text + at;
    int32_t ud = m->n_user_defined
                     ? match_user_defined(m, (const char *)u, len - at)
                     : -1;
    size_t c;
    if (ud >= 0)
        c = m->sym_len[ud];
    else if (u[0] < 0x80)
        c = 1;
    else if (!(c = utf8_char(u, len - at))) {
        *ptr = "\xef\xbf\xbd";
        *ulen = 3;
        return 1;
    }
    *ptr = (const char *)u;
    *ulen = c;
    return c;
}

/* SentencePiece's normalizer without a charsmap. Writes e->norm and returns
 * its length; e->nb gets the first normalized byte produced from input at
 * or after boundary (SIZE_MAX when none). */
static size_t normalize(sp_encoder *e, const char *text, size_t len,
                        size_t boundary)
{
    const sp_model *m = e->m;
    const char *ws = m->escape_whitespaces ? ws_symbol : " ";
    const size_t ws_len = m->escape_whitespaces ? 3 : 1;
    size_t need = len * 3 + 8;
    if (need > e->norm_cap) {
        e->norm_cap = need;
        free(e->norm);
        e->norm = xmalloc(need);
    }
    char *out = e->norm;
    size_t o = 0, i = 0;
    e->nb = SIZE_MAX;
    if (len == 0)
        return 0;

    const char *p;
    size_t ul, adv;
    if (m->remove_extra_whitespaces) {
        while (i < len) {
            adv = next_unit(m, text, len, i, &p, &ul);
            if (!(ul == 1 && p[0] == ' '))
                break;
            i += adv;
        }
        if (i == len)
            return 0;
    }
    if (i >= boundary)
        e->nb = 0;
    if (m->add_dummy_prefix) {
        memcpy(out, ws, ws_len);
        o = ws_len;
    }
    int prev_space = m->remove_extra_whitespaces;
    while (i < len) {
        if (e->nb == SIZE_MAX && i >= boundary)
            e->nb = o;
        unsigned char c = (unsigned char)text[i];
        if (c < 0x80 && !m->ud_first[c]) { /* the common case, inlined */
            if (c != ' ') {
                out[o++] = (char)c;
                prev_space = 0;
            } else if (!prev_space) {
                memcpy(out + o, ws, ws_len);
                o += ws_len;
                prev_space = m->remove_extra_whitespaces;
            }
            i++;
            continue;
        }
        adv = next_unit(m, text, len, i, &p, &ul);
        while (prev_space && ul > 0 && *p == ' ') {
            p++;
            ul--;
        }
        if (ul > 0) {
            for (size_t k = 0; k < ul; k++) {
                if (p[k] == ' ') {
                    memcpy(out + o, ws, ws_len);
                    o += ws_len;
                } else {
                    out[o++] = p[k];
                }
            }
            prev_space = p[ul - 1] == ' ';
        }
        i += adv;
        if (!m->remove_extra_whitespaces)
            prev_space = 0;
    }
    if (m->remove_extra_whitespaces)
        while (o >= ws_len && memcmp(out + o - ws_len, ws, ws_len) == 0)
            o -= ws_len;
    return o;
}

static inline int cand_before(const candidate *a, const candidate *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_sift_down(candidate *h, size_t n, size_t i)
{
    candidate x = h[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && cand_before(&h[c + 1], &h[c]))
            c++;
        if (!cand_before(&h[c], &x))
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static void heap_push(sp_encoder *e, const candidate *c)
{
    if (e->heap_n == e->heap_cap) {
        e->heap_cap = e->heap_cap ? e->heap_cap * 2 : 1024;
        e->heap = xrealloc(e->heap, e->heap_cap * sizeof *e->heap);
    }
    candidate *h = e->heap;
    size_t i = e->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_before(c, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = *c;
}

/* Proposes merging symbols l and r (SentencePiece's MaybeAddNewSymbolPair). */
static inline void propose(sp_encoder *e, int32_t l, int32_t r,
                           int heapify_later)
{
    if (l < 0 || r < 0)
        return;
    const symbol *sl = &e->syms[l], *sr = &e->syms[r];
    if (sl->frozen || sr->frozen || sl->sym < 0 || sr->sym < 0)
        return;
    const sp_model *m = e->m;
    int32_t merged = pair_map_get(&m->pairs, (uint64_t)(uint32_t)sl->sym << 32 |
                                                 (uint32_t)sr->sym);
    if (merged < 0)
        return;
    candidate c = {m->score[merged], l, r, sl->sym, sr->sym, merged};
    if (heapify_later) {
        if (e->heap_n == e->heap_cap) {
            e->heap_cap = e->heap_cap ? e->heap_cap * 2 : 1024;
            e->heap = xrealloc(e->heap, e->heap_cap * sizeof *e->heap);
        }
        e->heap[e->heap_n++] = c;
    } else {
        heap_push(e, &c);
    }
    if (m->has_unused && m->type[merged] == SP_PIECE_UNUSED) {
        e->rev_l[merged] = sl->sym;
        e->rev_r[merged] = sr->sym;
        e->rev_stamp[merged] = e->stamp;
    }
}

static void emit_id(sp_encoder *e, uint32_t id, size_t end)
{
    if (e->cs == SIZE_MAX && end > e->nb)
        e->cs = e->out->n - e->out_base;
    sp_ids_push(e->out, id);
}

/* Emits the final symbol sym covering normalized bytes [start, end). */
static void emit_symbol(sp_encoder *e, int32_t sym, size_t start, size_t end)
{
    const sp_model *m = e->m;
    if (sym >= 0 && (uint32_t)sym < m->n) {
        if (m->type[sym] == SP_PIECE_UNUSED && e->rev_stamp[sym] == e->stamp) {
            int32_t a = e->rev_l[sym], b = e->rev_r[sym];
            size_t mid = start + m->sym_len[a];
            emit_symbol(e, a, start, mid);
            emit_symbol(e, b, mid, end);
            return;
        }
        emit_id(e, (uint32_t)sym, end);
        e->prev_unk = 0;
        return;
    }
    /* Not a piece: an unknown character. */
    if (m->byte_fallback) {
        for (size_t k = start; k < end; k++)
            emit_id(e, (uint32_t)m->byte_id[(unsigned char)e->norm[k]], k + 1);
    } else if (e->prev_unk) {
        /* SentencePiece joins a run of unknown pieces into one */
        if (e->cs == SIZE_MAX && end > e->nb)
            e->cs = e->out->n - 1 - e->out_base;
    } else {
        emit_id(e, (uint32_t)m->unk, end);
    }
    e->prev_unk = 1;
}

/* BPE over the normalized bytes s[0..n) (positions relative to s); the
 * final symbols go to e->fin. */
static void bpe(sp_encoder *e, const char *s, size_t n)
{
    const sp_model *m = e->m;
    if (n > e->syms_cap) {
        e->syms_cap = n + 64;
        free(e->syms);
        e->syms = xmalloc(e->syms_cap * sizeof *e->syms);
    }
    symbol *sy = e->syms;
    int32_t ns = 0;

    /* Split into characters and user-defined pieces. */
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t l;
        int32_t sym;
        int frozen = 0;
        int32_t ud = m->n_user_defined && m->ud_first[c]
                         ? match_user_defined(m, s + i, n - i)
                         : -1;
        if (ud >= 0) {
            l = m->sym_len[ud];
            sym = ud;
            frozen = 1;
        } else if (c < 0x80) {
            l = 1;
            sym = m->ascii_sym[c];
        } else {
            l = one_char_len(c);
            if (l > n - i)
                l = n - i;
            sym = str_map_get(m, &m->pieces, s + i, l);
        }
        sy[ns].sym = sym;
        sy[ns].prev = ns - 1;
        sy[ns].next = ns + 1;
        sy[ns].start = (uint32_t)i;
        sy[ns].frozen = frozen;
        ns++;
        i += l;
    }
    if (ns > 0)
        sy[ns - 1].next = -1;

    /* Merge. */
    e->heap_n = 0;
    for (int32_t i = 1; i < ns; i++)
        propose(e, i - 1, i, 1);
    for (size_t i = e->heap_n / 2; i-- > 0;)
        heap_sift_down(e->heap, e->heap_n, i);
    while (e->heap_n > 0) {
        candidate top = e->heap[0];
        e->heap[0] = e->heap[--e->heap_n];
        if (e->heap_n > 0)
            heap_sift_down(e->heap, e->heap_n, 0);
        symbol *l = &sy[top.left], *r = &sy[top.right];
        if (l->sym != top.lsym || r->sym != top.rsym)
            continue; /* stale: one side has changed since */
        l->sym = top.merged;
        l->next = r->next;
        if (r->next >= 0)
            sy[r->next].prev = top.left;
        r->sym = SP_DEAD;
        propose(e, l->prev, top.left, 0);
        propose(e, top.left, l->next, 0);
    }

    if ((size_t)ns > e->fin_cap) {
        e->fin_cap = (size_t)ns + 64;
        free(e->fin);
        e->fin = xmalloc(e->fin_cap * sizeof *e->fin);
    }
    e->fin_n = 0;
    for (int32_t i = ns > 0 ? 0 : -1; i >= 0; i = sy[i].next) {
        size_t end = sy[i].next >= 0 ? sy[sy[i].next].start : n;
        e->fin[e->fin_n].sym = sy[i].sym;
        e->fin[e->fin_n].len = (uint32_t)(end - sy[i].start);
        e->fin_n++;
    }
}

static void emit_final(sp_encoder *e, const final_sym *f, size_t nf, size_t pos)
{
    for (size_t i = 0; i < nf; i++) {
        emit_symbol(e, f[i].sym, pos, pos + f[i].len);
        pos += f[i].len;
    }
}

static void cache_clear(sp_encoder *e)
{
    if (!e->cache)
        e->cache = xmalloc(CACHE_SLOTS * sizeof *e->cache);
    memset(e->cache, 0, CACHE_SLOTS * sizeof *e->cache);
    e->cache_used = 0;
    e->ckeys_len = 0;
    e->cvals_len = 0;
}

/* Encodes the segment norm[pos..pos+n) through the cache. */
static void encode_segment(sp_encoder *e, size_t pos, size_t n)
{
    const char *s = e->norm + pos;
    if (n > CACHE_MAX_KEY) {
        bpe(e, s, n);
        emit_final(e, e->fin, e->fin_n, pos);
        return;
    }
    if (!e->cache || e->cache_used >= CACHE_MAX_USED)
        cache_clear(e);
    uint32_t h = hash_bytes(s, n);
    uint32_t i = h & (CACHE_SLOTS - 1);
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const cache_slot *c = &e->cache[i];
        if (c->key_len == 0)
            break;
        if (c->hash == h && c->key_len == n &&
            memcmp(e->ckeys + c->key_off, s, n) == 0) {
            emit_final(e, e->cvals + c->val_off, c->val_n, pos);
            return;
        }
    }
    bpe(e, s, n);
    if (e->ckeys_len + n > e->ckeys_cap) {
        e->ckeys_cap = (e->ckeys_len + n) * 2 + 4096;
        e->ckeys = xrealloc(e->ckeys, e->ckeys_cap);
    }
    if (e->cvals_len + e->fin_n > e->cvals_cap) {
        e->cvals_cap = (e->cvals_len + e->fin_n) * 2 + 4096;
        e->cvals = xrealloc(e->cvals, e->cvals_cap * sizeof *e->cvals);
    }
    cache_slot *c = &e->cache[i];
    c->hash = h;
    c->key_len = (uint32_t)n;
    c->key_off = (uint32_t)e->ckeys_len;
    c->val_off = (uint32_t)e->cvals_len;
    c->val_n = (uint32_t)e->fin_n;
    memcpy(e->ckeys + e->ckeys_len, s, n);
    e->ckeys_len += n;
    memcpy(e->cvals + e->cvals_len, e->fin, e->fin_n * sizeof *e->fin);
    e->cvals_len += e->fin_n;
    e->cache_used++;
    emit_final(e, e->fin, e->fin_n, pos);
}

int sp_encode(sp_encoder *e, const char *text, size_t len, size_t boundary,
              sp_ids *out, size_t *boundary_index)
{
    const sp_model *m = e->m;
    if (len > SP_MAX_TEXT)
        return msg_error("text of %zu bytes is too long to tokenize", len);
    size_t n = normalize(e, text, len, boundary);
    e->out = out;
    e->out_base = out->n;
    e->cs = SIZE_MAX;
    e->prev_unk = 0;
    if (++e->stamp == 0) {
        if (e->rev_stamp)
            memset(e->rev_stamp, 0, m->n * sizeof *e->rev_stamp);
        e->stamp = 1;
    }

    if (!m->segmentable) {
        bpe(e, e->norm, n);
        emit_final(e, e->fin, e->fin_n, 0);
    } else {
        /* No piece holds a U+2581 after another character, so no merge
         * crosses the start of a U+2581 run: encode the runs' segments
         * one by one, through the cache. */
        const char *s = e->norm;
        size_t seg = 0, i = 0;
        while (i + 3 <= n) {
            const char *p = memchr(s + i, 0xe2, n - i);
            if (!p)
                break;
            i = (size_t)(p - s);
            if (i + 3 > n)
                break;
            if (is_ws_at(s, i)) {
                if (i > seg && !(i >= 3 && is_ws_at(s, i - 3))) {
                    encode_segment(e, seg, i - seg);
                    seg = i;
                }
                i += 3;
            } else {
                i++;
            }
        }
        if (n > seg)
            encode_segment(e, seg, n - seg);
    }
    if (boundary_index)
        *boundary_index = e->cs == SIZE_MAX ? out->n - e->out_base : e->cs;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Decoding                                                                */

/* Appends bytes, each byte that does not start a valid character as
 * U+FFFD (SentencePiece's ProcessBytePieces). */
static void append_bytes(strbuf *out, const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t l = utf8_char(b + i, n - i);
        if (l == 0) {
            sb_append(out, "\xef\xbf\xbd", 3);
            i++;
        } else {
            sb_append(out, b + i, l);
            i += l;
        }
    }
}

void sp_decode(const sp_model *m, const uint32_t *ids, size_t n, strbuf *out)
{
    size_t base = out->len;
    int is_bos_ws = 1, bos_ws_seen = 0;
    for (size_t i = 0; i < n;) {
        uint32_t id = ids[i];
        assert(id < m->n);
        if (m->type[id] == SP_PIECE_BYTE) {
            /* A run of byte pieces: the raw bytes, then any byte that does
             * not form a valid character replaced by U+FFFD. */
            size_t at = out->len;
            for (; i < n && m->type[ids[i]] == SP_PIECE_BYTE; i++)
                sb_putc(out,
                        (char)byte_piece_value(sym_text(m, (int32_t)ids[i]),
                                               m->sym_len[ids[i]]));
            size_t k = at;
            while (k < out->len) {
                size_t l = utf8_char((const unsigned char *)out->buf + k,
                                     out->len - k);
                if (l == 0)
                    break;
                k += l;
            }
            if (k < out->len) {
                size_t n_raw = out->len - at;
                unsigned char *raw = xmalloc(n_raw);
                memcpy(raw, out->buf + at, n_raw);
                out->len = at;
                out->buf[at] = '\0';
                append_bytes(out, raw, n_raw);
                free(raw);
            }
            continue;
        }
        if (bos_ws_seen || out->len != base)
            is_bos_ws = 0;
        int has_bos_ws = 0;
        int t = m->type[id];
        if (t == SP_PIECE_CONTROL) {
            /* invisible */
        } else if (t == SP_PIECE_UNKNOWN) {
            sb_append(out, m->unk_surface, m->unk_surface_len);
        } else {
            const char *p = sym_text(m, (int32_t)id);
            size_t l = m->sym_len[id];
            if (is_bos_ws &&
                (m->add_dummy_prefix || m->remove_extra_whitespaces)) {
                if (l >= 3 && memcmp(p, ws_symbol, 3) == 0) {
                    p += 3;
                    l -= 3;
                    has_bos_ws = 1;
                }
                if (m->remove_extra_whitespaces)
                    has_bos_ws = 0;
            }
            for (size_t k = 0; k < l;) {
                if (l - k >= 3 && memcmp(p + k, ws_symbol, 3) == 0) {
                    sb_putc(out, ' ');
                    k += 3;
                } else {
                    sb_putc(out, p[k]);
                    k++;
                }
            }
        }
        bos_ws_seen = has_bos_ws;
        i++;
    }
}

/* ---------------------------------------------------------------------- */
/* JSON Lines <-> token stream                                             */

/* Records are read in batches, encoded in parallel and written in input
 * order; a batch bounds memory whatever the input size. */
#define BATCH_RECORDS 4096
#define BATCH_BYTES (8u << 20)

typedef struct {
    size_t off, len; /* the line, in the batch text */
    long lineno;
    int worker; /* whose id buffer holds the result */
    size_t ids_off;
    size_t n_ids;
    uint32_t cs;
    int skip;  /* blank line */
    char *err; /* malloc'ed "src:line: problem", or NULL */
} jl_item;

typedef struct {
    sp_encoder *enc;
    sp_ids ids;
    strbuf text;
    strbuf err;
} jl_worker;

static int blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n')
            return 0;
    return 1;
}

static void item_error(jl_item *it, const char *src, const char *fmt,
                       const char *arg)
{
    strbuf sb = STRBUF_INIT;
    sb_printf(&sb, "%s:%ld: ", src, it->lineno);
    sb_printf(&sb, fmt, arg);
    it->err = xstrdup(sb_str(&sb));
    sb_free(&sb);
}

/* A string member, or NULL; *bad is set when present but not a string. */
static const json_value *string_member(const json_value *v, const char *key,
                                       int *bad)
{
    const json_value *m = json_get(v, key);
    if (m && m->type != JSON_STRING) {
        *bad = 1;
        return NULL;
    }
    return m;
}

static void encode_item(const sp_model *m, const sp_jsonl_options *o,
                        const char *src, const char *line, jl_item *it,
                        jl_worker *w)
{
    if (blank(line, it->len)) {
        it->skip = 1;
        return;
    }
    json_value *v = NULL;
    sb_reset(&w->err);
    if (json_parse_quiet(line, it->len, src, it->lineno, &v, &w->err) < 0) {
        it->err = xstrdup(sb_str(&w->err));
        return;
    }
    if (v->type != JSON_OBJECT) {
        item_error(it, src, "record is %s, not an object",
                   json_type_name(v->type));
        json_free(v);
        return;
    }
    const char *keys[3] = {"text", "prompt", "completion"};
    const json_value *f[3];
    for (int k = 0; k < 3; k++) {
        int bad = 0;
        f[k] = string_member(v, keys[k], &bad);
        if (bad) {
            item_error(it, src, "'%s' is not a string", keys[k]);
            json_free(v);
            return;
        }
    }
    const json_value *text = f[0], *prompt = f[1], *completion = f[2];
    const char *problem = NULL;
    if (text && (prompt || completion))
        problem = "record has both 'text' and 'prompt'/'completion'";
    else if (completion && !prompt)
        problem = "record has 'completion' but no 'prompt'";
    else if (!text && !prompt)
        problem = "record has no 'text' or 'prompt'";
    if (problem) {
        item_error(it, src, "%s", problem);
        json_free(v);
        return;
    }
    sb_reset(&w->text);
    size_t boundary;
    if (text) {
        sb_append(&w->text, text->u.string.s, text->u.string.len);
        boundary = text->u.string.len;
    } else {
        sb_append(&w->text, prompt->u.string.s, prompt->u.string.len);
        boundary = prompt->u.string.len;
        if (completion)
            sb_append(&w->text, completion->u.string.s,
                      completion->u.string.len);
    }
    int prompt_only = prompt && !completion;
    json_free(v);
    if (w->text.len > SP_MAX_TEXT) {
        item_error(it, src, "%s", "record too long to tokenize (over 1 GiB)");
        return;
    }

    it->ids_off = w->ids.n;
    if (o->add_bos && m->bos >= 0)
        sp_ids_push(&w->ids, (uint32_t)m->bos);
    size_t first = w->ids.n - it->ids_off, bi;
    sp_encode(w->enc, sb_str(&w->text), w->text.len, boundary, &w->ids, &bi);
    it->cs = completion ? (uint32_t)(first + bi) : TOKS_NO_COMPLETION;
    if (o->add_eos && m->eos >= 0 && !prompt_only)
        sp_ids_push(&w->ids, (uint32_t)m->eos);
    it->n_ids = w->ids.n - it->ids_off;
    if (it->n_ids > TOKS_MAX_RECORD) {
        item_error(it, src, "%s", "record has too many tokens (over 2^30)");
        w->ids.n = it->ids_off;
    }
}

int sp_encode_jsonl(const sp_model *m, io_reader *r, toks_writer *tw,
                    const sp_jsonl_options *o, uint64_t *n_records)
{
    int threads = o->threads > 0 ? o->threads : 1;
    const char *src = io_reader_name(r);
    jl_worker *workers = xcalloc((size_t)threads, sizeof *workers);
    for (int t = 0; t < threads; t++)
        workers[t].enc = sp_encoder_new(m);
    jl_item *items = xmalloc(BATCH_RECORDS * sizeof *items);
    strbuf batch = STRBUF_INIT;
    uint64_t count = 0;
    int rc = 0, eof = 0;

    while (!eof && rc == 0) {
        size_t n_items = 0;
        sb_reset(&batch);
        while (n_items < BATCH_RECORDS && batch.len < BATCH_BYTES) {
            char *line;
            size_t len;
            int got = io_read_line(r, &line, &len);
            if (got < 0) {
                rc = -1;
                break;
            }
            if (got == 0) {
                eof = 1;
                break;
            }
            jl_item *it = &items[n_items++];
            memset(it, 0, sizeof *it);
            it->off = batch.len;
            it->len = len;
            it->lineno = io_reader_lineno(r);
            sb_append(&batch, line, len);
            sb_putc(&batch, '\0');
        }
        if (rc < 0 || n_items == 0)
            break;
        for (int t = 0; t < threads; t++)
            workers[t].ids.n = 0;

        const char *text = sb_str(&batch);
#pragma omp parallel for num_threads(threads)                                  \
    schedule(dynamic, 8) if (threads > 1)
        for (size_t i = 0; i < n_items; i++) {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            items[i].worker = t;
            encode_item(m, o, src, text + items[i].off, &items[i], &workers[t]);
        }

        for (size_t i = 0; i < n_items; i++) {
            jl_item *it = &items[i];
            if (rc == 0 && it->err) {
                msg_error("%s", it->err);
                rc = -1;
            }
            if (rc == 0 && !it->skip) {
                toks_write_record(tw, workers[it->worker].ids.ids + it->ids_off,
                                  (uint32_t)it->n_ids, it->cs);
                count++;
            }
            free(it->err);
        }
    }

    for (int t = 0; t < threads; t++) {
        sp_encoder_free(workers[t].enc);
        sp_ids_free(&workers[t].ids);
        sb_free(&workers[t].text);
        sb_free(&workers[t].err);
    }
    free(workers);
    free(items);
    sb_free(&batch);
    if (n_records)
        *n_records = count;
    return rc;
}

int sp_decode_stream(const sp_model *m, toks_reader *tr, io_writer *w)
{
    toks_record rec = {0};
    strbuf line = STRBUF_INIT, text = STRBUF_INIT;
    int rc;
    while ((rc = toks_read_record(tr, &rec)) > 0) {
        for (uint32_t i = 0; i < rec.n; i++)
            if (rec.ids[i] >= m->n) {
                msg_error("token id %" PRIu32
                          " is outside the model's vocabulary of %" PRIu32,
                          rec.ids[i], m->n);
                rc = -1;
                goto done;
            }
        sb_reset(&line);
        if (rec.completion_start == TOKS_NO_COMPLETION) {
            sb_reset(&text);
            sp_decode(m, rec.ids, rec.n, &text);
            sb_puts(&line, "{\"text\":");
            json_append_string(&line, sb_str(&text), text.len);
        } else {
            uint32_t cs = rec.completion_start;
            sb_reset(&text);
            sp_decode(m, rec.ids, cs, &text);
            sb_puts(&line, "{\"prompt\":");
            json_append_string(&line, sb_str(&text), text.len);
            sb_reset(&text);
            sp_decode(m, rec.ids + cs, rec.n - cs, &text);
            sb_puts(&line, ",\"completion\":");
            json_append_string(&line, sb_str(&text), text.len);
        }
        sb_puts(&line, "}\n");
        io_write(w, line.buf, line.len);
    }
done:
    toks_record_free(&rec);
    sb_free(&line);
    sb_free(&text);
    return rc < 0 ? -1 : 0;
}
