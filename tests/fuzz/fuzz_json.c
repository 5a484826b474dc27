/* fuzz_json.c: libFuzzer harness for the JSON reader (lib/json.h).
 *
 * Input: any bytes, parsed as one JSON value (a JSON Lines record is one).
 * Promises checked beyond "no crash, no leak": every decoded string and key
 * is valid UTF-8; a value that parses serializes to text that parses again
 * and serializes to the same text (the writer is a fixed point), so
 * whatever a tool reads it can write back faithfully.
 */
#include "fuzz.h"
#include "json.h"
#include "strbuf.h"

static void check_tree(const json_value *v, int depth)
{
    FUZZ_ASSERT(depth <= 1024);
    switch (v->type) {
    case JSON_STRING:
        FUZZ_ASSERT(v->u.string.s[v->u.string.len] == '\0');
        FUZZ_ASSERT(utf8_valid(v->u.string.s, v->u.string.len, NULL));
        break;
    case JSON_ARRAY:
        for (size_t i = 0; i < v->u.array.n; i++)
            check_tree(v->u.array.items[i], depth + 1);
        break;
    case JSON_OBJECT:
        for (size_t i = 0; i < v->u.object.n; i++) {
            FUZZ_ASSERT(
                utf8_valid(v->u.object.keys[i], v->u.object.key_lens[i], NULL));
            check_tree(v->u.object.values[i], depth + 1);
        }
        break;
    case JSON_NUMBER:
        if (v->u.number.is_integer)
            FUZZ_ASSERT((double)v->u.number.integer == v->u.number.value);
        break;
    default:
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_value *v = NULL;
    strbuf err = STRBUF_INIT;
    if (json_parse_quiet((const char *)data, size, "fuzz", 1, &v, &err) < 0) {
        FUZZ_ASSERT(err.len > 0); /* a refusal always says why */
        sb_free(&err);
        return 0;
    }
    check_tree(v, 0);
    (void)json_get(v, "instruction");
    (void)json_get_string(v, "response", NULL);
    (void)json_get_int(v, "version", 0);

    strbuf a = STRBUF_INIT, b = STRBUF_INIT;
    json_append_value(&a, v);
    json_value *w = NULL;
    int rc = json_parse_quiet(sb_str(&a), a.len, "reparse", 1, &w, &err);
    if (rc < 0)
        fprintf(stderr, "fuzz: %s\n", sb_str(&err));
    FUZZ_ASSERT(rc == 0);
    json_append_value(&b, w);
    FUZZ_ASSERT(a.len == b.len && memcmp(sb_str(&a), sb_str(&b), a.len) == 0);
    json_free(w);
    json_free(v);
    sb_free(&a);
    sb_free(&b);
    sb_free(&err);
    return 0;
}
