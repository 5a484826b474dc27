/* config.c: typed configuration from YAML; libyaml lives here only.
 *
 * The loader walks libyaml's event stream rather than building a document
 * tree: a configuration is one flat mapping of key to scalar or to a
 * sequence of scalars, so the events carry everything needed, including the
 * line of each key for messages. Every value, whether it comes from a
 * default, a YAML file or the command line, goes through the same
 * set_value(), so the three can never disagree about what "1e-4" or "yes"
 * means. Nested mappings, aliases and several documents are refused rather
 * than half-understood.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "io.h"
#include "json.h"
#include "msg.h"

static void *member(void *obj, const cfg_field *f)
{
    return (char *)obj + f->offset;
}
static const void *cmember(const void *obj, const cfg_field *f)
{
    return (const char *)obj + f->offset;
}

static void strlist_clear(cfg_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->n = 0;
}

static void strlist_push(cfg_strlist *l, const char *s, size_t n)
{
    l->items = xrealloc(l->items, (l->n + 1) * sizeof *l->items);
    l->items[l->n++] = xstrndup(s, n);
}

static const char *type_name(cfg_type t)
{
    switch (t) {
    case CFG_INT:
        return "an integer";
    case CFG_FLOAT:
        return "a number";
    case CFG_BOOL:
        return "true or false";
    case CFG_STRING:
        return "a string";
    case CFG_STRLIST:
        return "a list of strings";
    }
    return "?";
}

/* s without leading and trailing blanks, as [*b, *e). */
static void trim(const char *s, const char **b, const char **e)
{
    const char *p = s, *q = s + strlen(s);
    while (p < q && isspace((unsigned char)*p))
        p++;
    while (q > p && isspace((unsigned char)q[-1]))
        q--;
    *b = p;
    *e = q;
}

/* Parses text into the field. is_null: the value was YAML null (~, null or
 * nothing). where: "file:line" or the command line's source. On error writes
 * the message into err and returns -1. */
static int set_value(const cfg_field *f, void *obj, const char *text,
                     int is_null, strbuf *err)
{
    const char *b, *e;
    trim(text, &b, &e);
    size_t n = (size_t)(e - b);
    char *t = xstrndup(b, n);
    int rc = 0;
    switch (f->type) {
    case CFG_INT: {
        char *end;
        errno = 0;
        long long v = is_null || n == 0 ? 0 : strtoll(t, &end, 10);
        if (is_null || n == 0 || *end != '\0')
            rc = -1;
        else if (errno == ERANGE) {
            sb_printf(err, "'%s': integer out of range: '%s'", f->key, t);
            free(t);
            return -1;
        } else
            *(int64_t *)member(obj, f) = v;
        break;
    }
    case CFG_FLOAT: {
        char *end;
        double v = is_null || n == 0 ? 0 : strtod(t, &end);
        if (is_null || n == 0 || *end != '\0' || !isfinite(v))
            rc = -1;
        else
            *(double *)member(obj, f) = v;
        break;
    }
    case CFG_BOOL: {
        static const char *yes[] = {"true", "yes", "on"};
        static const char *no[] = {"false", "no", "off"};
        int v = -1;
        for (int i = 0; i < 3 && !is_null; i++) {
            if (strcasecmp(t, yes[i]) == 0)
                v = 1;
            if (strcasecmp(t, no[i]) == 0)
                v = 0;
        }
        if (v < 0)
            rc = -1;
        else
            *(int *)member(obj, f) = v;
        break;
    }
    case CFG_STRING: {
        char **p = member(obj, f);
        free(*p);
        /* Strings keep their blanks: only null or empty means "none". */
        *p = is_null || text[0] == '\0' ? NULL : xstrdup(text);
        break;
    }
    case CFG_STRLIST: {
        cfg_strlist *l = member(obj, f);
        strlist_clear(l);
        if (is_null || n == 0)
            break;
        const char *p = b;
        for (;;) {
            const char *c = memchr(p, ',', (size_t)(e - p));
            const char *q = c ? c : e;
            const char *ib = p, *ie = q;
            while (ib < ie && isspace((unsigned char)*ib))
                ib++;
            while (ie > ib && isspace((unsigned char)ie[-1]))
                ie--;
            if (ib == ie) {
                sb_printf(err, "'%s': empty item in list '%s'", f->key, t);
                strlist_clear(l);
                free(t);
                return -1;
            }
            strlist_push(l, ib, (size_t)(ie - ib));
            if (!c)
                break;
            p = c + 1;
        }
        break;
    }
    }
    if (rc < 0)
        sb_printf(err, "'%s': expected %s, got %s%s%s", f->key,
                  type_name(f->type), is_null ? "" : "'", is_null ? "null" : t,
                  is_null ? "" : "'");
    free(t);
    return rc;
}

int cfg_defaults(const cfg_field *f, size_t n, void *obj)
{
    for (size_t i = 0; i < n; i++) {
        void *m = member(obj, &f[i]);
        switch (f[i].type) {
        case CFG_INT:
            *(int64_t *)m = 0;
            break;
        case CFG_FLOAT:
            *(double *)m = 0;
            break;
        case CFG_BOOL:
            *(int *)m = 0;
            break;
        case CFG_STRING:
            *(char **)m = NULL;
            break;
        case CFG_STRLIST:
            ((cfg_strlist *)m)->items = NULL;
            ((cfg_strlist *)m)->n = 0;
            break;
        }
        if (!f[i].def)
            continue;
        strbuf err = STRBUF_INIT;
        if (set_value(&f[i], obj, f[i].def, 0, &err) < 0) {
            msg_error("bad default: %s", sb_str(&err));
            sb_free(&err);
            return -1;
        }
    }
    return 0;
}

const cfg_field *cfg_find(const cfg_field *f, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(f[i].key, key) == 0)
            return &f[i];
    return NULL;
}

/* Levenshtein distance, for "did you mean" (keys are short). */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63)
        return (size_t)-1;
    size_t row[64];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            if (up + 1 < best)
                best = up + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static void hint_near(const cfg_field *f, size_t n, const char *key)
{
    const char *best = NULL;
    size_t bd = 3;
    for (size_t i = 0; i < n; i++) {
        size_t d = edit_distance(key, f[i].key);
        if (d < bd) {
            bd = d;
            best = f[i].key;
        }
    }
    if (best)
        msg_hint("did you mean '%s'?", best);
}

int cfg_set(const cfg_field *f, size_t n, void *obj, const char *key,
            const char *value, const char *src)
{
    const cfg_field *fd = cfg_find(f, n, key);
    if (!fd) {
        msg_error("%s: unknown key '%s'", src, key);
        hint_near(f, n, key);
        return -1;
    }
    strbuf err = STRBUF_INIT;
    int rc = set_value(fd, obj, value, 0, &err);
    if (rc < 0)
        msg_error("%s: %s", src, sb_str(&err));
    sb_free(&err);
    return rc;
}

/* --- YAML ---------------------------------------------------------------- */

typedef struct yload {
    yaml_parser_t p;
    const char *path;
    const cfg_field *f;
    size_t n;
    void *obj;
    unsigned char *seen; /* per field: already set by this file */
} yload;

static int next_event(yload *y, yaml_event_t *ev)
{
    if (yaml_parser_parse(&y->p, ev))
        return 0;
    const yaml_mark_t *m = &y->p.problem_mark;
    if (y->p.context)
        return msg_error("%s:%zu:%zu: bad YAML: %s %s", y->path, m->line + 1,
                         m->column + 1, y->p.problem, y->p.context);
    return msg_error("%s:%zu:%zu: bad YAML: %s", y->path, m->line + 1,
                     m->column + 1,
                     y->p.problem ? y->p.problem : "parse error");
}

static const char *event_what(const yaml_event_t *ev)
{
    switch (ev->type) {
    case YAML_SEQUENCE_START_EVENT:
        return "a list";
    case YAML_MAPPING_START_EVENT:
        return "a mapping";
    case YAML_ALIAS_EVENT:
        return "an alias";
    default:
        return "something else";
    }
}

static int scalar_is_null(const yaml_event_t *ev)
{
    if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return 0;
    const char *s = (const char *)ev->data.scalar.value;
    return s[0] == '\0' || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 ||
           strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0;
}

/* Reads the value of field fd whose key was at line (1-based). */
static int load_value(yload *y, const cfg_field *fd, size_t line)
{
    yaml_event_t ev;
    if (next_event(y, &ev) < 0)
        return -1;
    int rc = 0;
    strbuf err = STRBUF_INIT;
    if (ev.type == YAML_SCALAR_EVENT) {
        rc = set_value(fd, y->obj, (const char *)ev.data.scalar.value,
                       scalar_is_null(&ev), &err);
    } else if (ev.type == YAML_SEQUENCE_START_EVENT &&
               fd->type == CFG_STRLIST) {
        cfg_strlist *l = member(y->obj, fd);
        strlist_clear(l);
        for (;;) {
            yaml_event_t it;
            if (next_event(y, &it) < 0) {
                rc = -2;
                break;
            }
            if (it.type == YAML_SEQUENCE_END_EVENT) {
                yaml_event_delete(&it);
                break;
            }
            if (it.type != YAML_SCALAR_EVENT || scalar_is_null(&it)) {
                sb_printf(
                    &err,
                    "'%s': expected a list of strings, got %s in the list",
                    fd->key,
                    it.type == YAML_SCALAR_EVENT ? "null" : event_what(&it));
                line = it.start_mark.line + 1;
                yaml_event_delete(&it);
                rc = -1;
                break;
            }
            strlist_push(l, (const char *)it.data.scalar.value,
                         it.data.scalar.length);
            yaml_event_delete(&it);
        }
    } else {
        sb_printf(&err, "'%s': expected %s, got %s", fd->key,
                  type_name(fd->type), event_what(&ev));
        rc = -1;
    }
    yaml_event_delete(&ev);
    if (rc == -1)
        msg_error("%s:%zu: %s", y->path, line, sb_str(&err));
    sb_free(&err);
    return rc < 0 ? -1 : 0;
}

static int load_mapping(yload *y)
{
    for (;;) {
        yaml_event_t ev;
        if (next_event(y, &ev) < 0)
            return -1;
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            return 0;
        }
        size_t line = ev.start_mark.line + 1;
        if (ev.type != YAML_SCALAR_EVENT) {
            msg_error("%s:%zu: expected a key, got %s", y->path, line,
                      event_what(&ev));
            yaml_event_delete(&ev);
            return -1;
        }
        const char *key = (const char *)ev.data.scalar.value;
        const cfg_field *fd = cfg_find(y->f, y->n, key);
        if (!fd) {
            msg_error("%s:%zu: unknown key '%s'", y->path, line, key);
            hint_near(y->f, y->n, key);
            yaml_event_delete(&ev);
            return -1;
        }
        size_t idx = (size_t)(fd - y->f);
        if (y->seen[idx]) {
            msg_error("%s:%zu: duplicate key '%s'", y->path, line, key);
            yaml_event_delete(&ev);
            return -1;
        }
        y->seen[idx] = 1;
        yaml_event_delete(&ev);
        if (load_value(y, fd, line) < 0)
            return -1;
    }
}

static int load_stream(yload *y)
{
    yaml_event_t ev;
    int docs = 0;
    for (;;) {
        if (next_event(y, &ev) < 0)
            return -1;
        yaml_event_type_t t = ev.type;
        size_t line = ev.start_mark.line + 1;
        int is_null = t == YAML_SCALAR_EVENT && scalar_is_null(&ev);
        yaml_event_delete(&ev);
        switch (t) {
        case YAML_STREAM_START_EVENT:
        case YAML_DOCUMENT_END_EVENT:
            break;
        case YAML_STREAM_END_EVENT:
            return 0;
        case YAML_DOCUMENT_START_EVENT:
            if (++docs > 1)
                return msg_error("%s:%zu: more than one YAML document", y->path,
                                 line);
            break;
        case YAML_MAPPING_START_EVENT:
            if (load_mapping(y) < 0)
                return -1;
            break;
        case YAML_SCALAR_EVENT:
            if (is_null) /* an empty document: nothing set */
                break;
            /* fall through */
        default:
            return msg_error("%s:%zu: the top level must be a mapping of keys",
                             y->path, line);
        }
    }
}

int cfg_load_yaml(const char *path, const cfg_field *f, size_t n, void *obj)
{
    char *data;
    size_t len;
    if (io_read_file(path, &data, &len) < 0)
        return -1;
    yload y = {.path = path, .f = f, .n = n, .obj = obj};
    y.seen = xcalloc(n ? n : 1, 1);
    yaml_parser_initialize(&y.p);
    yaml_parser_set_input_string(&y.p, (const unsigned char *)data, len);
    int rc = load_stream(&y);
    yaml_parser_delete(&y.p);
    free(y.seen);
    free(data);
    return rc;
}

void cfg_to_json(const cfg_field *f, size_t n, const void *obj, strbuf *sb)
{
    sb_putc(sb, '{');
    for (size_t i = 0; i < n; i++) {
        const void *m = cmember(obj, &f[i]);
        if (i)
            sb_putc(sb, ',');
        json_append_string(sb, f[i].key, strlen(f[i].key));
        sb_putc(sb, ':');
        switch (f[i].type) {
        case CFG_INT:
            sb_printf(sb, "%" PRId64, *(const int64_t *)m);
            break;
        case CFG_FLOAT:
            json_append_number(sb, *(const double *)m);
            break;
        case CFG_BOOL:
            sb_puts(sb, *(const int *)m ? "true" : "false");
            break;
        case CFG_STRING: {
            const char *s = *(char *const *)m;
            if (s)
                json_append_string(sb, s, strlen(s));
            else
                sb_puts(sb, "null");
            break;
        }
        case CFG_STRLIST: {
            const cfg_strlist *l = m;
            sb_putc(sb, '[');
            for (size_t j = 0; j < l->n; j++) {
                if (j)
                    sb_putc(sb, ',');
                json_append_string(sb, l->items[j], strlen(l->items[j]));
            }
            sb_putc(sb, ']');
            break;
        }
        }
    }
    sb_putc(sb, '}');
}

void cfg_free(const cfg_field *f, size_t n, void *obj)
{
    for (size_t i = 0; i < n; i++) {
        void *m = member(obj, &f[i]);
        if (f[i].type == CFG_STRING) {
            free(*(char **)m);
            *(char **)m = NULL;
        } else if (f[i].type == CFG_STRLIST) {
            strlist_clear(m);
        }
    }
}
