/* dollyfmt.c: templates and record formatting behind dolly-fmt(1).
 *
 * A template is compiled into a flat list of operations (literal text,
 * field, section start, section end, completion marker) so that rendering
 * a record is a single pass with no parsing; a section start stores the
 * index of its end, so a section that is not kept is skipped in one step.
 * The built-in templates are ordinary template text, compiled like a
 * user's file, so `--print-template seed > t` and `-t t` are the same.
 */
#include "dollyfmt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char seed_text[] =
    "### Instruction:\n"
    "Use the Input below to create an instruction, which could have been "
    "used to generate the input using an LLM. \n"
    "\n"
    "### Input:\n"
    "{response}\n"
    "\n"
    "### Response:\n"
    "{@completion}{instruction}\n";

/* The Stanford Alpaca prompts (with and without input), with a newline
 * after "### Response:" as in the seed template. */
static const char alpaca_text[] =
    "Below is an instruction that describes a task"
    "{#context}, paired with an input that provides further context{/context}"
    ". Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "{#context}### Input:\n"
    "{context}\n"
    "\n"
    "{/context}### Response:\n"
    "{@completion}{response}\n";

const char *dollyfmt_builtin_text(const char *name)
{
    if (strcmp(name, "seed") == 0)
        return seed_text;
    if (strcmp(name, "alpaca") == 0)
        return alpaca_text;
    return NULL;
}

typedef enum {
    OP_TEXT,
    OP_FIELD,
    OP_IF,     /* {#field}: keep when non-empty */
    OP_UNLESS, /* {^field}: keep when absent, null or empty */
    OP_END,
    OP_MARK,
} op_kind;

typedef struct {
    op_kind kind;
    char *s; /* text, or the field name (NUL-terminated) */
    size_t len;
    size_t end; /* OP_IF/OP_UNLESS: index of the matching OP_END */
} op;

struct dollyfmt_template {
    char *name;
    op *ops;
    size_t n, cap;
};

#define MAX_SECTION_DEPTH 32

static void add_op(dollyfmt_template *t, op_kind k, const char *s, size_t len)
{
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 16;
        t->ops = xrealloc(t->ops, t->cap * sizeof *t->ops);
    }
    op *o = &t->ops[t->n++];
    o->kind = k;
    o->s = xstrndup(s, len);
    o->len = len;
    o->end = 0;
}

/* Appends literal text, merging with a preceding literal. */
static void add_text(dollyfmt_template *t, const char *s, size_t len)
{
    if (!len)
        return;
    if (t->n && t->ops[t->n - 1].kind == OP_TEXT) {
        op *o = &t->ops[t->n - 1];
        o->s = xrealloc(o->s, o->len + len + 1);
        memcpy(o->s + o->len, s, len);
        o->len += len;
        o->s[o->len] = '\0';
        return;
    }
    add_op(t, OP_TEXT, s, len);
}

static int tpl_error(const char *src, const char *text, const char *at,
                     const char *fmt, ...) MSG_PRINTF(4, 5);
static int tpl_error(const char *src, const char *text, const char *at,
                     const char *fmt, ...)
{
    long line = 1;
    const char *ls = text;
    for (const char *q = text; q < at; q++)
        if (*q == '\n') {
            line++;
            ls = q + 1;
        }
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return msg_error("%s:%ld:%ld: %s", src, line, (long)(at - ls) + 1, what);
}

static int is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.';
}

int dollyfmt_template_parse(const char *text, size_t len, const char *src,
                            dollyfmt_template **out)
{
    dollyfmt_template *t = xcalloc(1, sizeof *t);
    t->name = xstrdup(src);
    size_t stack[MAX_SECTION_DEPTH];
    const char *stack_at[MAX_SECTION_DEPTH];
    int depth = 0, marks = 0;
    const char *p = text, *e = text + len;
    *out = NULL;

    size_t bad;
    if (!utf8_valid(text, len, &bad)) {
        tpl_error(src, text, text + bad, "invalid UTF-8");
        goto fail;
    }
    while (p < e) {
        const char *run = p;
        while (p < e && *p != '{' && *p != '}')
            p++;
        add_text(t, run, (size_t)(p - run));
        if (p >= e)
            break;
        if (*p == '}') {
            if (p + 1 < e && p[1] == '}') {
                add_text(t, "}", 1);
                p += 2;
                continue;
            }
            tpl_error(src, text, p, "stray '}' (write '}}' for a brace)");
            goto fail;
        }
        if (p + 1 < e && p[1] == '{') {
            add_text(t, "{", 1);
            p += 2;
            continue;
        }
        const char *open = p;
        const char *close = memchr(p, '}', (size_t)(e - p));
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        if (!close || (nl && nl < close)) {
            tpl_error(src, text, open,
                      "unterminated placeholder (write '{{' for a brace)");
            goto fail;
        }
        char sigil = p[1];
        const char *name = p + 1;
        if (sigil == '#' || sigil == '^' || sigil == '/' || sigil == '@')
            name++;
        size_t nlen = (size_t)(close - name);
        int valid = nlen > 0;
        for (size_t i = 0; i < nlen; i++)
            if (!is_name_char(name[i]))
                valid = 0;
        if (!valid) {
            tpl_error(src, text, open,
                      "invalid placeholder '%.*s' (write '{{' for a brace)",
                      (int)(close - open + 1), open);
            goto fail;
        }
        switch (sigil) {
        case '@':
            if (nlen != 10 || memcmp(name, "completion", 10) != 0) {
                tpl_error(src, text, open, "unknown placeholder '%.*s'",
                          (int)(close - open + 1), open);
                goto fail;
            }
            if (depth) {
                tpl_error(src, text, open, "{@completion} inside a section");
                goto fail;
            }
            if (marks++) {
                tpl_error(src, text, open, "second {@completion} marker");
                goto fail;
            }
            add_op(t, OP_MARK, "", 0);
            break;
        case '#':
        case '^':
            if (depth == MAX_SECTION_DEPTH) {
                tpl_error(src, text, open, "sections nested too deep");
                goto fail;
            }
            stack_at[depth] = open;
            stack[depth++] = t->n;
            add_op(t, sigil == '#' ? OP_IF : OP_UNLESS, name, nlen);
            break;
        case '/': {
            if (!depth) {
                tpl_error(src, text, open, "'%.*s' closes no section",
                          (int)(close - open + 1), open);
                goto fail;
            }
            op *o = &t->ops[stack[depth - 1]];
            if (o->len != nlen || memcmp(o->s, name, nlen) != 0) {
                tpl_error(src, text, open,
                          "'%.*s' does not close the open section",
                          (int)(close - open + 1), open);
                goto fail;
            }
            depth--;
            t->ops[stack[depth]].end = t->n;
            add_op(t, OP_END, name, nlen);
            break;
        }
        default:
            add_op(t, OP_FIELD, name, nlen);
        }
        p = close + 1;
    }
    if (depth) {
        tpl_error(src, text, stack_at[depth - 1], "section '%s' not closed",
                  t->ops[stack[depth - 1]].s);
        goto fail;
    }
    if (!marks) {
        tpl_error(src, text, e,
                  "no {@completion} marker (it starts the completion)");
        goto fail;
    }
    *out = t;
    return 0;
fail:
    dollyfmt_template_free(t);
    return -1;
}

int dollyfmt_template_load(const char *name_or_path, dollyfmt_template **out)
{
    const char *builtin = dollyfmt_builtin_text(name_or_path);
    if (builtin)
        return dollyfmt_template_parse(builtin, strlen(builtin), name_or_path,
                                       out);
    char *data;
    size_t len;
    if (io_read_file(name_or_path, &data, &len))
        return -1;
    int rc = dollyfmt_template_parse(data, len, name_or_path, out);
    free(data);
    return rc;
}

void dollyfmt_template_free(dollyfmt_template *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n; i++)
        free(t->ops[i].s);
    free(t->ops);
    free(t->name);
    free(t);
}

const char *dollyfmt_template_name(const dollyfmt_template *t)
{
    return t->name;
}

/* "an array", "a number", "null" for messages. */
static const char *a_type(json_type t)
{
    switch (t) {
    case JSON_NULL: return "null";
    case JSON_FALSE:
    case JSON_TRUE: return "a boolean";
    case JSON_NUMBER: return "a number";
    case JSON_STRING: return "a string";
    case JSON_ARRAY: return "an array";
    case JSON_OBJECT: return "an object";
    }
    return "a value";
}

/* The record key holding template field `name`. */
static const char *record_key(const dollyfmt_options *o, const char *name)
{
    for (size_t i = o->n_rename; i-- > 0;)
        if (strcmp(o->rename_from[i], name) == 0)
            return o->rename_to[i];
    return name;
}

static void describe_field(const dollyfmt_options *o, const char *name,
                           strbuf *err)
{
    const char *key = record_key(o, name);
    if (key == name)
        sb_printf(err, "'%s'", name);
    else
        sb_printf(err, "'%s' (template field '%s')", key, name);
}

/* Looks up a template field. 1 found string (*s, *n), 0 absent or null,
 * -1 another type (message in err). */
static int field_lookup(const dollyfmt_options *o, const json_value *rec,
                        const char *name, const char **s, size_t *n,
                        strbuf *err)
{
    const json_value *v = json_get(rec, record_key(o, name));
    if (!v || v->type == JSON_NULL)
        return 0;
    if (v->type != JSON_STRING) {
        sb_puts(err, "field ");
        describe_field(o, name, err);
        sb_printf(err, " is %s, not a string", a_type(v->type));
        return -1;
    }
    *s = v->u.string.s;
    *n = v->u.string.len;
    return 1;
}

int dollyfmt_render(const dollyfmt_options *o, const json_value *rec,
                    strbuf *prompt, strbuf *completion, strbuf *err)
{
    const dollyfmt_template *t = o->tpl;
    strbuf *dst = prompt;
    sb_reset(prompt);
    sb_reset(completion);
    for (size_t i = 0; i < t->n; i++) {
        const op *x = &t->ops[i];
        const char *s = NULL;
        size_t n = 0;
        int r;
        switch (x->kind) {
        case OP_TEXT:
            sb_append(dst, x->s, x->len);
            break;
        case OP_FIELD:
            r = field_lookup(o, rec, x->s, &s, &n, err);
            if (r < 0)
                return -1;
            if (r == 0) {
                sb_puts(err, "missing field ");
                describe_field(o, x->s, err);
                sb_printf(err, " used by template '%s'", t->name);
                return -1;
            }
            sb_append(dst, s, n);
            break;
        case OP_IF:
        case OP_UNLESS:
            r = field_lookup(o, rec, x->s, &s, &n, err);
            if (r < 0)
                return -1;
            if ((r == 1 && n > 0) != (x->kind == OP_IF))
                i = x->end; /* skip the section */
            break;
        case OP_END:
            break;
        case OP_MARK:
            if (o->prompt_only)
                return 0; /* fields of the completion are not needed */
            dst = completion;
            break;
        }
    }
    return 0;
}

int dollyfmt_format_line(const dollyfmt_options *o, const char *line,
                         size_t len, const char *src, long lineno,
                         strbuf *out, strbuf *err)
{
    size_t i = 0;
    while (i < len && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r'))
        i++;
    if (i == len)
        return 0; /* blank line */
    sb_reset(err);
    json_value *rec;
    if (json_parse_quiet(line, len, src, lineno, &rec, err))
        return -1;
    int rc = -1;
    strbuf prompt = STRBUF_INIT, completion = STRBUF_INIT;
    if (rec->type != JSON_OBJECT) {
        sb_printf(err, "%s:%ld:%zu: record is %s, not an object", src,
                  lineno, i + 1, a_type(rec->type));
        goto done;
    }
    if (o->n_categories) {
        const char *cat = NULL;
        size_t clen = 0;
        sb_printf(err, "%s:%ld: ", src, lineno);
        int r = field_lookup(o, rec, "category", &cat, &clen, err);
        if (r < 0)
            goto done;
        if (r == 0) {
            sb_puts(err, "missing field ");
            describe_field(o, "category", err);
            sb_puts(err, " used by --category");
            goto done;
        }
        sb_reset(err);
        size_t k;
        for (k = 0; k < o->n_categories; k++)
            if (strlen(o->categories[k]) == clen &&
                memcmp(o->categories[k], cat, clen) == 0)
                break;
        if (k == o->n_categories) {
            rc = 0;
            goto done;
        }
    }
    sb_printf(err, "%s:%ld: ", src, lineno);
    if (dollyfmt_render(o, rec, &prompt, &completion, err))
        goto done;
    sb_reset(err);
    sb_puts(out, "{\"prompt\": ");
    json_append_string(out, prompt.buf ? prompt.buf : "", prompt.len);
    if (!o->prompt_only) {
        sb_puts(out, ", \"completion\": ");
        json_append_string(out, completion.buf ? completion.buf : "",
                           completion.len);
    }
    sb_puts(out, "}\n");
    rc = 1;
done:
    sb_free(&prompt);
    sb_free(&completion);
    json_free(rec);
    return rc;
}

int dollyfmt_run(const dollyfmt_options *o, io_reader *r, io_writer *w,
                 long *n_written, long *n_skipped)
{
    strbuf out = STRBUF_INIT, err = STRBUF_INIT;
    const char *src = io_reader_name(r);
    int rc = 0;
    char *line;
    size_t len;
    for (;;) {
        int k = io_read_line(r, &line, &len);
        if (k < 0) {
            rc = -1;
            break;
        }
        if (k == 0)
            break;
        int f = dollyfmt_format_line(o, line, len, src, io_reader_lineno(r),
                                     &out, &err);
        if (f < 0) {
            if (!o->skip_bad) {
                msg_error("%s", sb_str(&err));
                rc = -1;
                break;
            }
            msg_info("skipped %s", sb_str(&err));
            if (n_skipped)
                (*n_skipped)++;
            continue;
        }
        if (f > 0 && n_written)
            (*n_written)++;
        /* Write in large chunks; io_write buffers too, but this keeps the
         * per-record cost to one memcpy. */
        if (out.len >= (1u << 16)) {
            io_write(w, out.buf, out.len);
            sb_reset(&out);
        }
    }
    if (out.len)
        io_write(w, out.buf, out.len);
    sb_free(&out);
    sb_free(&err);
    return rc;
}
