/* test_json.c: the strict JSON reader and the writer.
 *
 * Tables of valid and invalid documents (numbers, escapes, surrogates, each
 * kind of bad UTF-8, depth, trailing garbage), the exact error positions,
 * typed lookups, and writer round trips (strings with every control
 * character, doubles that need 17 digits, random trees).
 */
#define _POSIX_C_SOURCE 200809L /* mkstemp, fdopen */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "json.h"

static int parses(const char *s, size_t n)
{
    json_value *v;
    strbuf err = STRBUF_INIT;
    int rc = json_parse_quiet(s, n, "t", 1, &v, &err);
    if (rc == 0)
        json_free(v);
    sb_free(&err);
    return rc == 0;
}

/* The error message for s, in a static buffer ("" when it parses). */
static const char *error_of(const char *s, size_t n)
{
    static char msg[512];
    json_value *v;
    strbuf err = STRBUF_INIT;
    msg[0] = '\0';
    if (json_parse_quiet(s, n, "in.jsonl", 7, &v, &err) == 0)
        json_free(v);
    else
        snprintf(msg, sizeof msg, "%s", sb_str(&err));
    sb_free(&err);
    return msg;
}

#define VALID(s) CHECK(parses(s, sizeof(s) - 1), "valid: %s", #s)
#define INVALID(s) CHECK(!parses(s, sizeof(s) - 1), "invalid: %s", #s)

static void test_valid(void)
{
    VALID("0");
    VALID("-0");
    VALID("1");
    VALID("-1");
    VALID("123456789");
    VALID("0.5");
    VALID("-0.0e0");
    VALID("1e5");
    VALID("1E+5");
    VALID("1e-5");
    VALID("12.34e-56");
    VALID("1e-400"); /* underflows to 0: in range */
    VALID("true");
    VALID("false");
    VALID("null");
    VALID("\"\"");
    VALID("\"abc\"");
    VALID("[]");
    VALID("{}");
    VALID("[[[]]]");
    VALID(" \t\r\n[ 1 , 2 ]\n ");
    VALID("{\"a\":1,\"b\":[true,false,null],\"c\":{\"d\":\"e\"}}");
    VALID("{\"a\":1,\"a\":2}"); /* duplicate keys are kept */
    VALID("\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t\"");
    VALID("\"\\u0000\"");
    VALID("\"\\u00e9\\u00E9\"");
    VALID("\"\\ud83d\\ude00\"");
    VALID("\"\\uDBFF\\uDFFF\"");
    VALID("\"\xc3\xa9\"");             /* é */
    VALID("\"\xe2\x82\xac\"");         /* € */
    VALID("\"\xf0\x9f\x98\x80\"");     /* 😀 */
    VALID("\"\xf4\x8f\xbf\xbf\"");     /* U+10FFFF */
    VALID("\"\xef\xbf\xbf\"");         /* U+FFFF, a noncharacter but valid */
    VALID("\"\xed\x9f\xbf\"");         /* U+D7FF, just below surrogates */
    VALID("\"\xee\x80\x80\"");         /* U+E000, just above */
    VALID("\"\x7f\"");                 /* DEL is not a control per RFC */
}

static void test_invalid(void)
{
    /* empty and whitespace only */
    INVALID("");
    INVALID("   \n ");
    /* numbers */
    INVALID("01");
    INVALID("-01");
    INVALID("00");
    INVALID("+1");
    INVALID(".5");
    INVALID("1.");
    INVALID("1.e5");
    INVALID("1e");
    INVALID("1e+");
    INVALID("-");
    INVALID("- 1");
    INVALID("0x10");
    INVALID("1e999");
    INVALID("-1e999");
    INVALID("NaN");
    INVALID("Infinity");
    INVALID("-Infinity");
    /* literals */
    INVALID("tru");
    INVALID("True");
    INVALID("nul");
    INVALID("nulll");
    INVALID("undefined");
    /* trailing garbage and multiple values */
    INVALID("1 2");
    INVALID("{} {}");
    INVALID("[1]]");
    INVALID("{\"a\":1}x");
    INVALID("\"a\"\"b\"");
    /* structure */
    INVALID("[");
    INVALID("[1");
    INVALID("[1,");
    INVALID("[1,]");
    INVALID("[,1]");
    INVALID("[1 2]");
    INVALID("{");
    INVALID("{\"a\"");
    INVALID("{\"a\":");
    INVALID("{\"a\":1");
    INVALID("{\"a\":1,}");
    INVALID("{\"a\" 1}");
    INVALID("{a:1}");
    INVALID("{'a':1}");
    INVALID("{1:1}");
    INVALID("{\"a\":1;\"b\":2}");
    INVALID("]");
    INVALID("}");
    /* strings */
    INVALID("\"abc");
    INVALID("'abc'");
    INVALID("\"a\nb\"");
    INVALID("\"a\tb\"");
    INVALID("\"a\x01b\"");
    INVALID("\"\x1f\"");
    INVALID("\"\\x41\"");
    INVALID("\"\\a\"");
    INVALID("\"\\U0041\"");
    INVALID("\"\\u12\"");
    INVALID("\"\\u12g4\"");
    INVALID("\"\\");
    INVALID("\"\\\"");
    /* surrogates in escapes */
    INVALID("\"\\ud800\"");
    INVALID("\"\\ud800x\"");
    INVALID("\"\\ud800\\u0041\"");
    INVALID("\"\\ud800\\ud800\"");
    INVALID("\"\\udc00\"");
    INVALID("\"\\udfff\\ud800\"");
    INVALID("\"\\ud83d\\\"");
    /* bad UTF-8 of every kind */
    INVALID("\"\x80\"");                 /* lone continuation */
    INVALID("\"\xbf\"");
    INVALID("\"\xc0\xaf\"");             /* overlong '/' */
    INVALID("\"\xc1\xbf\"");             /* overlong 2-byte */
    INVALID("\"\xe0\x80\xaf\"");         /* overlong 3-byte */
    INVALID("\"\xe0\x9f\xbf\"");         /* overlong U+07FF */
    INVALID("\"\xf0\x80\x80\xaf\"");     /* overlong 4-byte */
    INVALID("\"\xf0\x8f\xbf\xbf\"");     /* overlong U+FFFF */
    INVALID("\"\xed\xa0\x80\"");         /* U+D800 encoded */
    INVALID("\"\xed\xbf\xbf\"");         /* U+DFFF encoded */
    INVALID("\"\xed\xa0\xbd\xed\xb8\x80\""); /* CESU-8 pair */
    INVALID("\"\xf4\x90\x80\x80\"");     /* U+110000 */
    INVALID("\"\xf5\x80\x80\x80\"");     /* lead > F4 */
    INVALID("\"\xf8\x88\x80\x80\x80\""); /* 5-byte form */
    INVALID("\"\xfe\"");
    INVALID("\"\xff\"");
    INVALID("\"\xc3\"");                 /* truncated 2-byte */
    INVALID("\"\xe2\x82\"");             /* truncated 3-byte */
    INVALID("\"\xf0\x9f\x98\"");         /* truncated 4-byte */
    INVALID("\"\xc3\x41\"");             /* bad continuation */
    INVALID("\"\xe2\x28\xa1\"");
    INVALID("\xc3\xa9");                 /* non-ASCII outside a string */
    /* byte order mark, NUL outside strings */
    INVALID("\xef\xbb\xbf{}");
    CHECK(!parses("[1]\0", 4), "invalid: NUL after value");
    CHECK(!parses("\"a\0b\"", 5), "invalid: raw NUL in string");
}

static void test_errors(void)
{
    CHECK(strcmp(error_of("{\"a\":1 \"b\"}", 11),
                 "in.jsonl:7:8: expected ',' or '}' in object") == 0,
          "error names src:line:col (%s)", error_of("{\"a\":1 \"b\"}", 11));
    const char *multi = "[1,\n  2,\n  x]";
    CHECK(strcmp(error_of(multi, strlen(multi)),
                 "in.jsonl:9:3: unexpected character, expected a value") == 0,
          "error line counts newlines (%s)", error_of(multi, strlen(multi)));
    CHECK(strstr(error_of("01", 2), "leading zero") != NULL, "leading zero msg");
    CHECK(strstr(error_of("1 2", 3), "in.jsonl:7:3: trailing") != NULL,
          "trailing garbage msg (%s)", error_of("1 2", 3));
    CHECK(strstr(error_of("\"\\ud800\"", 8), "surrogate") != NULL,
          "unpaired surrogate msg");
    CHECK(strstr(error_of("\"\xc0\xaf\"", 4), "in.jsonl:7:2: invalid UTF-8: "
                                             "overlong") != NULL,
          "overlong msg (%s)", error_of("\"\xc0\xaf\"", 4));
    CHECK(strstr(error_of("\"\xed\xa0\x80\"", 5), "surrogate") != NULL,
          "encoded surrogate msg");
    CHECK(strstr(error_of("\"\xe2\x82\"", 4), "truncated") != NULL,
          "truncated msg");
    CHECK(strstr(error_of("\"\x80\"", 3), "continuation") != NULL,
          "continuation msg");
    CHECK(strstr(error_of("\"\xf4\x90\x80\x80\"", 6), "U+10FFFF") != NULL,
          "too large msg");
    CHECK(strstr(error_of("\"a\x01\"", 4), "in.jsonl:7:3: control") != NULL,
          "control char msg (%s)", error_of("\"a\x01\"", 4));
    CHECK(strstr(error_of("", 0), "in.jsonl:7:1: unexpected end") != NULL,
          "empty input msg (%s)", error_of("", 0));
    CHECK(strstr(error_of("[1,]", 4), "expected a value before ']'") != NULL,
          "trailing comma msg");
    /* json_parse_quiet with NULL err still fails cleanly */
    json_value *v = (json_value *)1;
    CHECK(json_parse_quiet("[", 1, "x", 1, &v, NULL) == -1 && v == NULL,
          "quiet parse without err buffer");
}

static void test_depth(void)
{
    enum { N = 600 };
    char buf[2 * N + 1];
    for (int depth = 511; depth <= 513; depth++) {
        memset(buf, '[', (size_t)depth);
        memset(buf + depth, ']', (size_t)depth);
        int ok = parses(buf, 2 * (size_t)depth);
        CHECK(ok == (depth <= 512), "depth %d %s", depth,
              depth <= 512 ? "accepted" : "refused");
    }
    memset(buf, '[', N);
    memset(buf + N, ']', N);
    CHECK(strstr(error_of(buf, 2 * N), "nesting too deep") != NULL,
          "depth error message");
    /* Deep objects too. */
    strbuf sb = STRBUF_INIT;
    for (int i = 0; i < N; i++)
        sb_puts(&sb, "{\"a\":");
    sb_puts(&sb, "1");
    for (int i = 0; i < N; i++)
        sb_putc(&sb, '}');
    CHECK(!parses(sb.buf, sb.len), "deep objects refused");
    sb_free(&sb);
}

static void test_values(void)
{
    const char *t = "{\"s\":\"x\\u00e9\\ud83d\\ude00\\u0000y\",\"i\":-42,"
                    "\"big\":9223372036854775807,\"neg\":-9223372036854775808,"
                    "\"over\":9223372036854775808,\"f\":2.5,\"e\":1e3,"
                    "\"a\":[1,2],\"d\":1,\"d\":2,\"n\":null}";
    json_value *v;
    CHECK(json_parse(t, strlen(t), "t", 1, &v) == 0, "parse object");
    if (!v)
        return;
    size_t len = 0;
    const char *s = json_get_string(v, "s", &len);
    CHECK(s && len == 9 && memcmp(s, "x\xc3\xa9\xf0\x9f\x98\x80\0y", 9) == 0,
          "decoded escapes incl. surrogate pair and NUL");
    CHECK(json_get_int(v, "i", 0) == -42, "int");
    CHECK(json_get_int(v, "big", 0) == INT64_MAX, "int64 max exact");
    CHECK(json_get_int(v, "neg", 0) == INT64_MIN, "int64 min exact");
    CHECK(json_get_int(v, "over", 7) == 7, "int64 overflow is not integer");
    CHECK(json_get_number(v, "over", 0) == 9223372036854775808.0,
          "overflowing integer still a number");
    CHECK(json_get_number(v, "f", 0) == 2.5, "double");
    CHECK(json_get_int(v, "f", 9) == 9, "fraction is not integer");
    CHECK(json_get_int(v, "e", 9) == 9 && json_get_number(v, "e", 0) == 1000,
          "exponent form is a number, not integer");
    CHECK(json_get_int(v, "d", 0) == 2, "duplicate key: last wins");
    CHECK(json_get(v, "n") && json_get(v, "n")->type == JSON_NULL, "null");
    CHECK(json_get(v, "missing") == NULL, "absent key");
    CHECK(json_get_string(v, "i", NULL) == NULL, "typed lookup of wrong type");
    CHECK(json_get_number(v, "s", -1) == -1, "number fallback");
    const json_value *a = json_get(v, "a");
    CHECK(a && a->type == JSON_ARRAY && a->u.array.n == 2 &&
              a->u.array.items[1]->u.number.integer == 2,
          "array items");
    CHECK(json_get(a, "x") == NULL, "json_get on non-object");
    CHECK(strcmp(json_type_name(JSON_OBJECT), "object") == 0 &&
              strcmp(json_type_name(JSON_TRUE), "boolean") == 0,
          "type names");
    json_free(v);
    json_free(NULL);
    /* Keys with escapes and NULs compare by bytes. */
    const char *k = "{\"\\u00e9\":1}";
    CHECK(json_parse(k, strlen(k), "t", 1, &v) == 0 &&
              json_get_int(v, "\xc3\xa9", 0) == 1,
          "escaped key lookup");
    json_free(v);
}

static const char *write_string(const char *s, size_t n)
{
    static strbuf sb = STRBUF_INIT;
    sb_reset(&sb);
    json_append_string(&sb, s, n);
    return sb_str(&sb);
}

static const char *write_number(double d)
{
    static strbuf sb = STRBUF_INIT;
    sb_reset(&sb);
    json_append_number(&sb, d);
    return sb_str(&sb);
}

static void test_writer(void)
{
    CHECK(strcmp(write_string("a\"b\\c/", 6), "\"a\\\"b\\\\c/\"") == 0,
          "escape quote and backslash, not slash");
    CHECK(strcmp(write_string("\n\r\t\b\f", 5), "\"\\n\\r\\t\\b\\f\"") == 0,
          "short escapes");
    CHECK(strcmp(write_string("\x01\x1f", 2), "\"\\u0001\\u001f\"") == 0,
          "control escapes");
    CHECK(strcmp(write_string("a\0b", 3), "\"a\\u0000b\"") == 0, "NUL escaped");
    CHECK(strcmp(write_string("\xc3\xa9\x7f", 3), "\"\xc3\xa9\x7f\"") == 0,
          "UTF-8 and DEL kept");
    CHECK(strcmp(write_string("", 0), "\"\"") == 0, "empty string");

    /* Every byte 0..127 and some UTF-8 survive a round trip. */
    char all[140];
    for (int i = 0; i < 128; i++)
        all[i] = (char)i;
    memcpy(all + 128, "\xf0\x9f\x98\x80\xe2\x82\xac", 7);
    const char *w = write_string(all, 135);
    json_value *v;
    int ok = json_parse(w, strlen(w), "w", 1, &v) == 0 &&
             v->type == JSON_STRING && v->u.string.len == 135 &&
             memcmp(v->u.string.s, all, 135) == 0;
    CHECK(ok, "string round trip of all ASCII bytes");
    if (ok)
        json_free(v);

    CHECK(strcmp(write_number(0), "0") == 0, "0");
    CHECK(strcmp(write_number(-0.0), "-0") == 0, "-0");
    CHECK(strcmp(write_number(42), "42") == 0, "42");
    CHECK(strcmp(write_number(-7), "-7") == 0, "-7");
    CHECK(strcmp(write_number(0.25), "0.25") == 0, "0.25");
    CHECK(strcmp(write_number(1e-5), "1e-05") == 0, "1e-05 (%s)",
          write_number(1e-5));
    CHECK(strcmp(write_number(0.1), "0.1") == 0, "0.1 shortest");
    CHECK(strcmp(write_number(1.0 / 3), "0.3333333333333333") == 0,
          "1/3 needs 16 digits (%s)", write_number(1.0 / 3));
    CHECK(strcmp(write_number(0.1 + 0.2), "0.30000000000000004") == 0,
          "0.1+0.2 needs 17 digits (%s)", write_number(0.1 + 0.2));
    CHECK(strcmp(write_number(NAN), "null") == 0, "NaN is null");
    CHECK(strcmp(write_number(INFINITY), "null") == 0, "inf is null");
    CHECK(strcmp(write_number(9007199254740991.0), "9007199254740991") == 0,
          "2^53-1 as integer");
    CHECK(strcmp(write_number(1e300), "1e+300") == 0, "1e300 (%s)",
          write_number(1e300));

    /* Random doubles read back exactly. */
    uint64_t x = 0x9E3779B97F4A7C15ull;
    int bad = 0;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        double d;
        uint64_t bits = x;
        memcpy(&d, &bits, sizeof d);
        if (!isfinite(d))
            continue;
        const char *s = write_number(d);
        if (strtod(s, NULL) != d || !parses(s, strlen(s)))
            bad++;
    }
    CHECK(bad == 0, "random doubles round trip (%d bad)", bad);
}

static void test_tree_round_trip(void)
{
    const char *docs[] = {
        "{\"a\":[1,-2,3.5,1e-07,true,false,null],\"b\":{\"c\":\"d\\n\"},"
        "\"e\":[],\"f\":{},\"g\":-0,\"h\":1.7976931348623157e+308}",
        "[\"\\u0000\\u001f\\\"\\\\\",\"\xe2\x82\xac\"]",
        "\"plain\"",
        "-9223372036854775808",
        "{\"k\":1,\"k\":2}",
    };
    for (size_t i = 0; i < sizeof docs / sizeof *docs; i++) {
        json_value *v, *v2;
        strbuf a = STRBUF_INIT, b = STRBUF_INIT;
        int ok = json_parse(docs[i], strlen(docs[i]), "d", 1, &v) == 0;
        if (ok) {
            json_append_value(&a, v);
            ok = json_parse(a.buf, a.len, "a", 1, &v2) == 0;
            if (ok) {
                json_append_value(&b, v2);
                ok = a.len == b.len && memcmp(a.buf, b.buf, a.len) == 0;
                json_free(v2);
            }
            json_free(v);
        }
        CHECK(ok, "tree round trip %zu (%s)", i, sb_str(&a));
        sb_free(&a);
        sb_free(&b);
    }
    /* Compact output of a known document is exact. */
    const char *in = " { \"a\" : [ 1 , 2.5 ] , \"b\" : \"\\u00e9\" } ";
    json_value *v;
    strbuf out = STRBUF_INIT;
    if (json_parse(in, strlen(in), "in", 1, &v) == 0) {
        json_append_value(&out, v);
        json_free(v);
    }
    CHECK(strcmp(sb_str(&out), "{\"a\":[1,2.5],\"b\":\"\xc3\xa9\"}") == 0,
          "compact serialisation (%s)", sb_str(&out));
    sb_free(&out);
}

static void test_utf8_valid(void)
{
    size_t off = 99;
    CHECK(utf8_valid("", 0, &off), "utf8_valid empty");
    CHECK(utf8_valid("abc\xc3\xa9\xf0\x9f\x98\x80", 9, NULL), "utf8_valid ok");
    CHECK(!utf8_valid("ab\xc0\xaf", 4, &off) && off == 2, "utf8 overlong at 2");
    CHECK(!utf8_valid("abc\xed\xa0\x80", 6, &off) && off == 3,
          "utf8 surrogate at 3");
    CHECK(!utf8_valid("\xe2\x82", 2, &off) && off == 0, "utf8 truncated at 0");
    CHECK(!utf8_valid("a\xf4\x90\x80\x80", 5, &off) && off == 1,
          "utf8 > U+10FFFF at 1");
    CHECK(utf8_valid("a\0b", 3, NULL), "utf8 NUL is valid");
}

static void test_file(void)
{
    char path[] = "/tmp/test_json_XXXXXX";
    int fd = mkstemp(path);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        CHECK(0, "json_parse_file: cannot make a temporary file");
        return;
    }
    fputs("{\n  \"hidden_size\": 64,\n  \"rms_norm_eps\": 1e-05\n}\n", f);
    fclose(f);
    json_value *v;
    int rc = json_parse_file(path, &v);
    CHECK(rc == 0 && json_get_int(v, "hidden_size", 0) == 64 &&
              json_get_number(v, "rms_norm_eps", 0) == 1e-5,
          "json_parse_file reads a file");
    if (rc == 0)
        json_free(v);
    remove(path);
    v = (json_value *)1;
    fprintf(stderr, "(an error message is expected next)\n");
    CHECK(json_parse_file(path, &v) == -1 && v == NULL,
          "json_parse_file: missing file is an error");
}

/* Random byte changes, truncations and insertions of a document: the
 * parser must never crash (the SAN build checks memory), and whatever it
 * accepts must serialise and read back to the same text. */
static void test_mutations(void)
{
    const char *base = "{\"instruction\": \"Caf\u00e9 \\ud83d\\ude00?\", "
                       "\"context\": \"\", \"n\": [-1.5e3, 0, true, null, "
                       "{\"x\": \"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}]}";
    size_t n = strlen(base);
    static const char alphabet[] = "{}[]\":,\\u0123456789eE+-.tfn \t\n\x80\xbf\xc3"
                                   "\xed\xf0\xf4\xff";
    char buf[256];
    uint64_t x = 12345;
    int accepted = 0, bad = 0;
    for (int i = 0; i < 20000; i++) {
        memcpy(buf, base, n);
        size_t len = n;
        int edits = 1 + i % 3;
        for (int k = 0; k < edits; k++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            size_t pos = (size_t)(x >> 33) % len;
            char c = alphabet[(x >> 20) % (sizeof alphabet - 1)];
            switch ((x >> 60) % 4) {
            case 0: buf[pos] = c; break;
            case 1: len = pos; break; /* truncate */
            case 2:
                if (len < sizeof buf - 1) {
                    memmove(buf + pos + 1, buf + pos, len - pos);
                    buf[pos] = c;
                    len++;
                }
                break;
            default: /* delete */
                memmove(buf + pos, buf + pos + 1, len - pos - 1);
                len--;
            }
            if (!len)
                break;
        }
        json_value *v, *v2;
        if (json_parse_quiet(buf, len, "m", 1, &v, NULL))
            continue;
        accepted++;
        strbuf a = STRBUF_INIT, b = STRBUF_INIT;
        json_append_value(&a, v);
        if (json_parse_quiet(a.buf, a.len, "a", 1, &v2, NULL) == 0) {
            json_append_value(&b, v2);
            if (a.len != b.len || memcmp(a.buf, b.buf, a.len))
                bad++;
            json_free(v2);
        } else {
            bad++;
        }
        json_free(v);
        sb_free(&a);
        sb_free(&b);
    }
    CHECK(bad == 0, "mutations: accepted documents round trip (%d of %d bad)",
          bad, accepted);
    CHECK(accepted > 100 && accepted < 20000,
          "mutations: some accepted, some refused (%d accepted)", accepted);
}

int main(void)
{
    test_valid();
    test_invalid();
    test_errors();
    test_depth();
    test_values();
    test_writer();
    test_tree_round_trip();
    test_utf8_valid();
    test_file();
    test_mutations();
    return CHECK_DONE();
}
