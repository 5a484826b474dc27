/* config.h: typed configuration from YAML (libyaml lives only in config.c).
 *
 * A tool describes its configuration as a table of fields, each a key, a
 * type, the offset of the member in the tool's struct and a default given as
 * text. Loading a YAML mapping fills the struct; an unknown key or a value
 * of the wrong type is an error naming the file, the line and the key:
 *     lora-train: seed.yaml:7: 'lora_alpha': expected a number, got 'abc'
 * Command-line overrides go through cfg_set with the same parsing.
 */
#ifndef CONFIG_H
#define CONFIG_H

#include "strbuf.h"
#include <stddef.h>
#include <stdint.h>

typedef enum {
    CFG_INT,     /* int64_t */
    CFG_FLOAT,   /* double */
    CFG_BOOL,    /* int: true/false (YAML 1.1 yes/no/on/off accepted) */
    CFG_STRING,  /* char * (malloc'ed; NULL for a null/empty default) */
    CFG_STRLIST, /* cfg_strlist: a YAML sequence, or a comma-separated string */
} cfg_type;

typedef struct cfg_strlist {
    char **items;
    size_t n;
} cfg_strlist;

typedef struct cfg_field {
    const char *key; /* Hugging Face's name where one exists */
    cfg_type type;
    size_t offset;    /* offsetof(struct, member) */
    const char *def;  /* default as text, or NULL */
    const char *help; /* one line, for --help and the man page */
} cfg_field;

/* Sets every field to its default. 0 ok, -1 when a default does not parse
 * (a programming error; the message names the key). */
int cfg_defaults(const cfg_field *f, size_t n, void *obj);
/* Loads a YAML file whose top level is a mapping of key: scalar or
 * key: [sequence]. Keys not in the table are errors. 0 ok, -1 error. */
int cfg_load_yaml(const char *path, const cfg_field *f, size_t n, void *obj);
/* Sets one key from text ("2e-4", "true", "q_proj,v_proj"). src names the
 * origin in messages ("--set", "command line"). 0 ok, -1 error. */
int cfg_set(const cfg_field *f, size_t n, void *obj, const char *key,
            const char *value, const char *src);
/* Appends the whole configuration as one JSON object, in table order. */
void cfg_to_json(const cfg_field *f, size_t n, const void *obj, strbuf *sb);
/* Frees strings and lists held by obj. */
void cfg_free(const cfg_field *f, size_t n, void *obj);
/* The field for key, or NULL. */
const cfg_field *cfg_find(const cfg_field *f, size_t n, const char *key);

#endif
