/* dollyfmt.h: prompt templates and the JSON Lines formatting of dolly-fmt.
 *
 * A template is text with placeholders (the syntax is specified in
 * qlora-formats(5), "JSON Lines records"):
 *     {field}            the record's string field
 *     {#field}...{/field} kept only when field is present and non-empty
 *     {^field}...{/field} kept only when field is absent, null or empty
 *     {@completion}      where the prompt ends and the completion begins
 *     {{ and }}          literal braces
 * Templates are compiled once and rendered per record. The built-in ones
 * (seed, alpaca) are written in the same syntax.
 */
#ifndef DOLLYFMT_H
#define DOLLYFMT_H

#include <stddef.h>
#include "io.h"
#include "json.h"
#include "strbuf.h"

typedef struct dollyfmt_template dollyfmt_template;

/* The text of a built-in template ("seed", "alpaca"), or NULL. */
const char *dollyfmt_builtin_text(const char *name);
/* Compiles template text; src names it in messages. Returns 0 and *out, or
 * -1 with "src:line:col: problem" printed. */
int dollyfmt_template_parse(const char *text, size_t len, const char *src,
                            dollyfmt_template **out);
/* A built-in name, else a template file. -1 with a message on error. */
int dollyfmt_template_load(const char *name_or_path, dollyfmt_template **out);
void dollyfmt_template_free(dollyfmt_template *t);
const char *dollyfmt_template_name(const dollyfmt_template *t);

/* What to do with each record. Strings are borrowed. */
typedef struct {
    const dollyfmt_template *tpl;
    int prompt_only;            /* write {"prompt"} only */
    int skip_bad;               /* skip (and count) malformed records */
    const char **categories;    /* keep only these categories; NULL = all */
    size_t n_categories;
    const char **rename_from;   /* template field name ... */
    const char **rename_to;     /* ... read from this record key */
    size_t n_rename;
} dollyfmt_options;

/* Renders the template for one record into prompt and completion (both
 * reset first). The record key of each field goes through the renaming.
 * With o->prompt_only the completion is left empty and its fields need not
 * exist.
 * Returns 0, or -1 with the problem in err ("missing field 'x'"). */
int dollyfmt_render(const dollyfmt_options *o, const json_value *rec,
                    strbuf *prompt, strbuf *completion, strbuf *err);

/* Formats one input line, appending its output record (with '\n') to out.
 * Returns 1 when a record was written, 0 when the line was blank or
 * filtered out, -1 when it is malformed: err then holds
 * "src:line[:col]: problem". */
int dollyfmt_format_line(const dollyfmt_options *o, const char *line,
                         size_t len, const char *src, long lineno,
                         strbuf *out, strbuf *err);

/* Formats every line of r into w. Counts go to *n_written / *n_skipped
 * (may be NULL). A malformed line is an error (-1, message printed) unless
 * o->skip_bad, when it is counted and described only at -v. */
int dollyfmt_run(const dollyfmt_options *o, io_reader *r, io_writer *w,
                 long *n_written, long *n_skipped);

#endif
