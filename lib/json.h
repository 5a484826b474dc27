/* json.h: a strict JSON reader (RFC 8259) and helpers to write JSON.
 *
 * The reader builds a small tree. It validates UTF-8 (overlong forms,
 * surrogates, out-of-range code points and unpaired \u escapes are errors),
 * rejects trailing garbage, leading zeros, control characters in strings,
 * duplicate... (duplicates are allowed; json_get returns the last), and
 * limits nesting depth. Errors are one message naming the source, line and
 * column: "data.jsonl:12:40: expected ',' or '}' in object".
 */
#ifndef JSON_H
#define JSON_H

#include "strbuf.h"
#include <stddef.h>
#include <stdint.h>

typedef enum {
    JSON_NULL,
    JSON_FALSE,
    JSON_TRUE,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT,
} json_type;

typedef struct json_value json_value;

struct json_value {
    json_type type;
    union {
        struct {
            double value;
            int64_t integer; /* exact when is_integer */
            int is_integer;  /* no fraction/exponent and fits int64 */
        } number;
        struct {
            char *s; /* decoded UTF-8, NUL-terminated, may hold NULs */
            size_t len;
        } string;
        struct {
            json_value **items;
            size_t n;
        } array;
        struct {
            char **keys; /* NUL-terminated */
            size_t *key_lens;
            json_value **values;
            size_t n;
        } object;
    } u;
};

/* Parses text[0..len) as exactly one JSON value. src names the input in
 * messages and line is the line number of text's first line (1 for a whole
 * file; the record's line for JSON Lines). Returns 0 and *out (free with
 * json_free), or -1 with a message printed. */
int json_parse(const char *text, size_t len, const char *src, long line,
               json_value **out);
/* As json_parse but prints nothing: the message goes to err (if non-NULL). */
int json_parse_quiet(const char *text, size_t len, const char *src, long line,
                     json_value **out, strbuf *err);
void json_free(json_value *v);
/* Reads a whole file (zstd transparently, via io_read_file) and parses it
 * as one JSON value; messages name the path. 0 and *out, or -1 (printed). */
int json_parse_file(const char *path, json_value **out);

/* Object member by key (the last one if repeated), or NULL when absent or
 * when obj is not an object. */
const json_value *json_get(const json_value *obj, const char *key);
/* Typed lookups: NULL / fallback when absent or of another type. */
const char *json_get_string(const json_value *obj, const char *key,
                            size_t *len);
double json_get_number(const json_value *obj, const char *key, double fallback);
int64_t json_get_int(const json_value *obj, const char *key, int64_t fallback);
const char *json_type_name(json_type t);

/* Writers (append to a strbuf). Strings are escaped per RFC 8259: '"' '\\'
 * and control characters; non-ASCII UTF-8 is kept as is. */
void json_append_string(strbuf *sb, const char *s, size_t n);
/* Shortest text that reads back as the same double ("1e-05", "0.25");
 * integers without a fraction. NaN and infinities become null. */
void json_append_number(strbuf *sb, double v);
/* Compact serialisation of a tree. */
void json_append_value(strbuf *sb, const json_value *v);

/* 1 when s[0..n) is valid UTF-8 (no surrogates, no overlongs); else 0 and
 * *bad_offset (if non-NULL) is the first bad byte. */
int utf8_valid(const char *s, size_t n, size_t *bad_offset);

#endif
