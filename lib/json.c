/* json.c: a strict RFC 8259 reader that builds a tree, and a writer.
 *
 * The reader is a recursive-descent parser over an in-memory buffer. It is
 * built for JSON Lines of a few kilobytes a record (Dolly is 13 MB in
 * 15,011 lines), so the hot paths are the string scanner, which copies runs
 * of plain ASCII with one memcpy and validates UTF-8 inline, and allocation,
 * which is one malloc per node. Line and column are computed only when an
 * error is reported, by rescanning from the start of the text, so the
 * common path counts nothing. Columns count bytes from 1.
 *
 * Strictness: exactly one value, surrounded by optional whitespace
 * (space, tab, LF, CR); no byte order mark; numbers without leading zeros,
 * '+' or bare '.'; strings without raw control characters and with valid
 * UTF-8; \u escapes must pair surrogates; nesting deeper than
 * JSON_MAX_DEPTH is refused. Duplicate object keys are kept; json_get
 * returns the last.
 */
#include "json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"

#define JSON_MAX_DEPTH 512

typedef struct {
    const char *start; /* the whole text, for line/column */
    const char *p;
    const char *end;
    const char *src;
    long line;
    int depth;
    strbuf *err;  /* NULL: count only */
    int failed;
    strbuf tmp;   /* scratch for string decoding */
} parser;

/* Records the first error at position `at`. Returns NULL so parse
 * functions can `return fail(...)`. */
static json_value *fail_at(parser *ps, const char *at, const char *what)
{
    if (ps->failed)
        return NULL;
    ps->failed = 1;
    if (!ps->err)
        return NULL;
    long line = ps->line;
    const char *ls = ps->start;
    for (const char *q = ps->start; q < at; q++)
        if (*q == '\n') {
            line++;
            ls = q + 1;
        }
    sb_reset(ps->err);
    sb_printf(ps->err, "%s:%ld:%ld: %s", ps->src ? ps->src : "<input>", line,
              (long)(at - ls) + 1, what);
    return NULL;
}

static json_value *fail(parser *ps, const char *what)
{
    return fail_at(ps, ps->p, what);
}

static json_value *new_value(json_type t)
{
    json_value *v = xmalloc(sizeof *v);
    memset(v, 0, sizeof *v);
    v->type = t;
    return v;
}

static void skip_ws(parser *ps)
{
    const char *p = ps->p, *e = ps->end;
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    ps->p = p;
}

/* Length of the valid UTF-8 sequence starting at s (s[0] >= 0x80), or 0
 * when it is invalid (bad lead, overlong, surrogate, > U+10FFFF,
 * truncated, bad continuation). */
static size_t utf8_seq(const unsigned char *s, const unsigned char *e)
{
    unsigned c = s[0];
    size_t avail = (size_t)(e - s);
    if (c < 0xC2)
        return 0; /* continuation byte or overlong 2-byte lead */
    if (c < 0xE0) {
        if (avail < 2 || (s[1] & 0xC0) != 0x80)
            return 0;
        return 2;
    }
    if (c < 0xF0) {
        if (avail < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80)
            return 0;
        if (c == 0xE0 && s[1] < 0xA0)
            return 0; /* overlong */
        if (c == 0xED && s[1] >= 0xA0)
            return 0; /* surrogate */
        return 3;
    }
    if (c < 0xF5) {
        if (avail < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 ||
            (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90)
            return 0; /* overlong */
        if (c == 0xF4 && s[1] >= 0x90)
            return 0; /* above U+10FFFF */
        return 4;
    }
    return 0;
}

/* What is wrong with the invalid sequence at s, for the message. */
static const char *utf8_problem(const unsigned char *s, const unsigned char *e)
{
    unsigned c = s[0];
    size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    if (c >= 0x80 && c < 0xC0)
        return "invalid UTF-8: unexpected continuation byte";
    if (c == 0xC0 || c == 0xC1)
        return "invalid UTF-8: overlong encoding";
    if (c >= 0xF5)
        return c >= 0xF8 ? "invalid UTF-8: invalid lead byte"
                         : "invalid UTF-8: code point above U+10FFFF";
    for (size_t i = 1; i < need; i++)
        if (s + i >= e || (s[i] & 0xC0) != 0x80)
            return "invalid UTF-8: truncated sequence";
    if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xF0 && s[1] < 0x90))
        return "invalid UTF-8: overlong encoding";
    if (c == 0xED)
        return "invalid UTF-8: encoded surrogate";
    return "invalid UTF-8: code point above U+10FFFF";
}

int utf8_valid(const char *s, size_t n, size_t *bad_offset)
{
    const unsigned char *p = (const unsigned char *)s, *e = p + n;
    while (p < e) {
        if (*p < 0x80) {
            p++;
            continue;
        }
        size_t k = utf8_seq(p, e);
        if (!k) {
            if (bad_offset)
                *bad_offset = (size_t)(p - (const unsigned char *)s);
            return 0;
        }
        p += k;
    }
    return 1;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

static void put_utf8(strbuf *sb, unsigned cp)
{
    char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (char)(0xC0 | (cp >> 6));
        b[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12));
        b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18));
        b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    sb_append(sb, b, n);
}

/* Parses a string at ps->p (which is at '"') into ps->tmp. 0 ok, -1 error. */
static int parse_string_raw(parser *ps)
{
    const char *p = ps->p + 1, *e = ps->end;
    strbuf *sb = &ps->tmp;
    sb_reset(sb);
    for (;;) {
        /* The run of bytes needing no attention. */
        const char *run = p;
        while (p < e) {
            unsigned char c = (unsigned char)*p;
            if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80)
                break;
            p++;
        }
        if (p > run)
            sb_append(sb, run, (size_t)(p - run));
        if (p >= e) {
            fail_at(ps, p, "unterminated string");
            return -1;
        }
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            ps->p = p + 1;
            return 0;
        }
        if (c >= 0x80) {
            size_t k = utf8_seq((const unsigned char *)p,
                                (const unsigned char *)e);
            if (!k) {
                fail_at(ps, p,
                        utf8_problem((const unsigned char *)p,
                                     (const unsigned char *)e));
                return -1;
            }
            sb_append(sb, p, k);
            p += k;
            continue;
        }
        if (c < 0x20) {
            fail_at(ps, p, c == '\n' ? "unterminated string (raw newline)"
                                     : "control character in string");
            return -1;
        }
        /* backslash */
        if (p + 1 >= e) {
            fail_at(ps, p, "unterminated string");
            return -1;
        }
        char esc = p[1];
        switch (esc) {
        case '"': sb_putc(sb, '"'); break;
        case '\\': sb_putc(sb, '\\'); break;
        case '/': sb_putc(sb, '/'); break;
        case 'b': sb_putc(sb, '\b'); break;
        case 'f': sb_putc(sb, '\f'); break;
        case 'n': sb_putc(sb, '\n'); break;
        case 'r': sb_putc(sb, '\r'); break;
        case 't': sb_putc(sb, '\t'); break;
        case 'u': {
            unsigned cp;
            if (e - p < 6 || hex4(p + 2, &cp)) {
                fail_at(ps, p, "invalid \\u escape (need 4 hex digits)");
                return -1;
            }
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                fail_at(ps, p, "unpaired low surrogate in \\u escape");
                return -1;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (e - p < 12 || p[6] != '\\' || p[7] != 'u' ||
                    hex4(p + 8, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                    fail_at(ps, p, "unpaired high surrogate in \\u escape");
                    return -1;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            put_utf8(sb, cp);
            p += 6;
            continue;
        }
        default:
            fail_at(ps, p, "invalid escape in string");
            return -1;
        }
        p += 2;
    }
}

static json_value *parse_value(parser *ps);

static json_value *parse_number(parser *ps)
{
    const char *p = ps->p, *e = ps->end, *s = p;
    int integral = 1;
    if (p < e && *p == '-')
        p++;
    if (p >= e || *p < '0' || *p > '9')
        return fail_at(ps, p, "invalid number: expected a digit");
    if (*p == '0') {
        p++;
        if (p < e && *p >= '0' && *p <= '9')
            return fail_at(ps, s, "invalid number: leading zero");
    } else {
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < e && *p == '.') {
        integral = 0;
        p++;
        if (p >= e || *p < '0' || *p > '9')
            return fail_at(ps, p, "invalid number: expected a digit after '.'");
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        integral = 0;
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p >= e || *p < '0' || *p > '9')
            return fail_at(ps, p,
                           "invalid number: expected a digit in exponent");
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    }
    size_t n = (size_t)(p - s);
    char small[64];
    char *buf = n < sizeof small ? small : xmalloc(n + 1);
    memcpy(buf, s, n);
    buf[n] = '\0';
    double d = strtod(buf, NULL);
    if (!isfinite(d)) {
        if (buf != small)
            free(buf);
        return fail_at(ps, s, "number out of range");
    }
    json_value *v = new_value(JSON_NUMBER);
    v->u.number.value = d;
    if (integral) {
        /* Exact int64 when it fits. */
        const char *q = buf;
        int neg = *q == '-';
        q += neg;
        uint64_t acc = 0, lim = neg ? (uint64_t)INT64_MAX + 1 : INT64_MAX;
        int fits = 1;
        for (; *q; q++) {
            unsigned dig = (unsigned)(*q - '0');
            if (acc > (lim - dig) / 10) {
                fits = 0;
                break;
            }
            acc = acc * 10 + dig;
        }
        if (fits) {
            v->u.number.is_integer = 1;
            v->u.number.integer =
                neg ? (acc == (uint64_t)INT64_MAX + 1 ? INT64_MIN
                                                       : -(int64_t)acc)
                    : (int64_t)acc;
        }
    }
    if (buf != small)
        free(buf);
    ps->p = p;
    return v;
}

static json_value *parse_array(parser *ps)
{
    json_value *v = new_value(JSON_ARRAY);
    size_t cap = 0;
    ps->p++; /* '[' */
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ']') {
        ps->p++;
        return v;
    }
    for (;;) {
        json_value *item = parse_value(ps);
        if (!item)
            goto bad;
        if (v->u.array.n == cap) {
            cap = cap ? cap * 2 : 4;
            v->u.array.items =
                xrealloc(v->u.array.items, cap * sizeof *v->u.array.items);
        }
        v->u.array.items[v->u.array.n++] = item;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            skip_ws(ps);
            continue;
        }
        if (ps->p < ps->end && *ps->p == ']') {
            ps->p++;
            return v;
        }
        fail(ps, ps->p >= ps->end ? "unterminated array"
                                  : "expected ',' or ']' in array");
        goto bad;
    }
bad:
    json_free(v);
    return NULL;
}

static json_value *parse_object(parser *ps)
{
    json_value *v = new_value(JSON_OBJECT);
    size_t cap = 0;
    ps->p++; /* '{' */
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        return v;
    }
    for (;;) {
        if (ps->p >= ps->end) {
            fail(ps, "unterminated object");
            goto bad;
        }
        if (*ps->p != '"') {
            fail(ps, "expected a string key in object");
            goto bad;
        }
        if (parse_string_raw(ps))
            goto bad;
        char *key = xmalloc(ps->tmp.len + 1);
        memcpy(key, sb_str(&ps->tmp), ps->tmp.len + 1);
        size_t klen = ps->tmp.len;
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p != ':') {
            free(key);
            fail(ps, ps->p >= ps->end ? "unterminated object"
                                      : "expected ':' after object key");
            goto bad;
        }
        ps->p++;
        skip_ws(ps);
        json_value *item = parse_value(ps);
        if (!item) {
            free(key);
            goto bad;
        }
        if (v->u.object.n == cap) {
            cap = cap ? cap * 2 : 8;
            v->u.object.keys =
                xrealloc(v->u.object.keys, cap * sizeof *v->u.object.keys);
            v->u.object.key_lens = xrealloc(
                v->u.object.key_lens, cap * sizeof *v->u.object.key_lens);
            v->u.object.values =
                xrealloc(v->u.object.values, cap * sizeof *v->u.object.values);
        }
        v->u.object.keys[v->u.object.n] = key;
        v->u.object.key_lens[v->u.object.n] = klen;
        v->u.object.values[v->u.object.n] = item;
        v->u.object.n++;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            skip_ws(ps);
            continue;
        }
        if (ps->p < ps->end && *ps->p == '}') {
            ps->p++;
            return v;
        }
        fail(ps, ps->p >= ps->end ? "unterminated object"
                                  : "expected ',' or '}' in object");
        goto bad;
    }
bad:
    json_free(v);
    return NULL;
}

static int match_word(parser *ps, const char *w, size_t n)
{
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, w, n) != 0)
        return 0;
    ps->p += n;
    return 1;
}

/* At a non-whitespace byte (or the end). */
static json_value *parse_value(parser *ps)
{
    if (ps->p >= ps->end)
        return fail(ps, "unexpected end of input, expected a value");
    json_value *v;
    switch (*ps->p) {
    case '{':
    case '[':
        if (ps->depth >= JSON_MAX_DEPTH)
            return fail(ps, "nesting too deep");
        ps->depth++;
        v = *ps->p == '{' ? parse_object(ps) : parse_array(ps);
        ps->depth--;
        return v;
    case '"':
        if (parse_string_raw(ps))
            return NULL;
        v = new_value(JSON_STRING);
        v->u.string.len = ps->tmp.len;
        v->u.string.s = xmalloc(ps->tmp.len + 1);
        memcpy(v->u.string.s, sb_str(&ps->tmp), ps->tmp.len + 1);
        return v;
    case 't':
        if (match_word(ps, "true", 4))
            return new_value(JSON_TRUE);
        break;
    case 'f':
        if (match_word(ps, "false", 5))
            return new_value(JSON_FALSE);
        break;
    case 'n':
        if (match_word(ps, "null", 4))
            return new_value(JSON_NULL);
        break;
    case '-':
    case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
        return parse_number(ps);
    case ']':
    case '}':
        return fail(ps, *ps->p == ']' ? "expected a value before ']'"
                                      : "expected a value before '}'");
    default:
        break;
    }
    if ((unsigned char)*ps->p >= 0x80 &&
        !utf8_seq((const unsigned char *)ps->p, (const unsigned char *)ps->end))
        return fail(ps, utf8_problem((const unsigned char *)ps->p,
                                     (const unsigned char *)ps->end));
    return fail(ps, "unexpected character, expected a value");
}

int json_parse_quiet(const char *text, size_t len, const char *src, long line,
                     json_value **out, strbuf *err)
{
    parser ps = {0};
    ps.start = ps.p = text;
    ps.end = text + len;
    ps.src = src;
    ps.line = line;
    ps.err = err;
    *out = NULL;
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) {
        fail(&ps, "byte order mark not allowed");
        sb_free(&ps.tmp);
        return -1;
    }
    skip_ws(&ps);
    json_value *v = parse_value(&ps);
    if (v) {
        skip_ws(&ps);
        if (ps.p < ps.end) {
            fail(&ps, "trailing characters after JSON value");
            json_free(v);
            v = NULL;
        }
    }
    sb_free(&ps.tmp);
    if (!v)
        return -1;
    *out = v;
    return 0;
}

int json_parse(const char *text, size_t len, const char *src, long line,
               json_value **out)
{
    strbuf err = STRBUF_INIT;
    int rc = json_parse_quiet(text, len, src, line, out, &err);
    if (rc)
        msg_error("%s", sb_str(&err));
    sb_free(&err);
    return rc;
}

int json_parse_file(const char *path, json_value **out)
{
    char *data;
    size_t len;
    *out = NULL;
    if (io_read_file(path, &data, &len))
        return -1;
    int rc = json_parse(data, len, path, 1, out);
    free(data);
    return rc;
}

void json_free(json_value *v)
{
    if (!v)
        return;
    switch (v->type) {
    case JSON_STRING:
        free(v->u.string.s);
        break;
    case JSON_ARRAY:
        for (size_t i = 0; i < v->u.array.n; i++)
            json_free(v->u.array.items[i]);
        free(v->u.array.items);
        break;
    case JSON_OBJECT:
        for (size_t i = 0; i < v->u.object.n; i++) {
            free(v->u.object.keys[i]);
            json_free(v->u.object.values[i]);
        }
        free(v->u.object.keys);
        free(v->u.object.key_lens);
        free(v->u.object.values);
        break;
    default:
        break;
    }
    free(v);
}

const json_value *json_get(const json_value *obj, const char *key)
{
    if (!obj || obj->type != JSON_OBJECT || !key)
        return NULL;
    size_t klen = strlen(key);
    for (size_t i = obj->u.object.n; i-- > 0;)
        if (obj->u.object.key_lens[i] == klen &&
            memcmp(obj->u.object.keys[i], key, klen) == 0)
            return obj->u.object.values[i];
    return NULL;
}

const char *json_get_string(const json_value *obj, const char *key, size_t *len)
{
    const json_value *v = json_get(obj, key);
    if (!v || v->type != JSON_STRING)
        return NULL;
    if (len)
        *len = v->u.string.len;
    return v->u.string.s;
}

double json_get_number(const json_value *obj, const char *key, double fallback)
{
    const json_value *v = json_get(obj, key);
    return v && v->type == JSON_NUMBER ? v->u.number.value : fallback;
}

int64_t json_get_int(const json_value *obj, const char *key, int64_t fallback)
{
    const json_value *v = json_get(obj, key);
    return v && v->type == JSON_NUMBER && v->u.number.is_integer
               ? v->u.number.integer
               : fallback;
}

const char *json_type_name(json_type t)
{
    switch (t) {
    case JSON_NULL: return "null";
    case JSON_FALSE:
    case JSON_TRUE: return "boolean";
    case JSON_NUMBER: return "number";
    case JSON_STRING: return "string";
    case JSON_ARRAY: return "array";
    case JSON_OBJECT: return "object";
    }
    return "unknown";
}

void json_append_string(strbuf *sb, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    sb_grow(sb, n + 2);
    sb_putc(sb, '"');
    const char *p = s, *e = s + n;
    while (p < e) {
        const char *run = p;
        while (p < e && (unsigned char)*p >= 0x20 && *p != '"' && *p != '\\')
            p++;
        if (p > run)
            sb_append(sb, run, (size_t)(p - run));
        if (p >= e)
            break;
        unsigned char c = (unsigned char)*p++;
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t k = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            k = 6;
        }
        sb_append(sb, esc, k);
    }
    sb_putc(sb, '"');
}

void json_append_number(strbuf *sb, double v)
{
    if (!isfinite(v)) {
        sb_puts(sb, "null");
        return;
    }
    char buf[40];
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        /* Exact integers print without fraction or exponent. */
        snprintf(buf, sizeof buf, "%.0f", v);
        if (v == 0 && signbit(v))
            snprintf(buf, sizeof buf, "-0");
        sb_puts(sb, buf);
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    sb_puts(sb, buf);
}

void json_append_value(strbuf *sb, const json_value *v)
{
    if (!v) {
        sb_puts(sb, "null");
        return;
    }
    switch (v->type) {
    case JSON_NULL: sb_puts(sb, "null"); break;
    case JSON_FALSE: sb_puts(sb, "false"); break;
    case JSON_TRUE: sb_puts(sb, "true"); break;
    case JSON_NUMBER:
        if (v->u.number.is_integer &&
            !(v->u.number.integer == 0 && signbit(v->u.number.value)))
            sb_printf(sb, "%lld", (long long)v->u.number.integer);
        else
            json_append_number(sb, v->u.number.value);
        break;
    case JSON_STRING:
        json_append_string(sb, v->u.string.s, v->u.string.len);
        break;
    case JSON_ARRAY:
        sb_putc(sb, '[');
        for (size_t i = 0; i < v->u.array.n; i++) {
            if (i)
                sb_putc(sb, ',');
            json_append_value(sb, v->u.array.items[i]);
        }
        sb_putc(sb, ']');
        break;
    case JSON_OBJECT:
        sb_putc(sb, '{');
        for (size_t i = 0; i < v->u.object.n; i++) {
            if (i)
                sb_putc(sb, ',');
            json_append_string(sb, v->u.object.keys[i],
                               v->u.object.key_lens[i]);
            sb_putc(sb, ':');
            json_append_value(sb, v->u.object.values[i]);
        }
        sb_putc(sb, '}');
        break;
    }
}
