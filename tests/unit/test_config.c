/* test_config.c: typed YAML configuration.
 *
 * A small table with one field of every type is loaded from YAML files
 * written here; errors are captured from stderr and compared with the
 * exact lines users will see.
 */
#define _POSIX_C_SOURCE 200809L
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "config.h"
#include "msg.h"

typedef struct conf {
    int64_t r;
    double lora_alpha;
    double lr;
    int gradient_checkpointing;
    char *model;
    char *note;
    cfg_strlist target_modules;
} conf;

static const cfg_field fields[] = {
    {"r", CFG_INT, offsetof(conf, r), "64", "LoRA rank"},
    {"lora_alpha", CFG_FLOAT, offsetof(conf, lora_alpha), "16", "LoRA alpha"},
    {"learning_rate", CFG_FLOAT, offsetof(conf, lr), "2e-4", "learning rate"},
    {"gradient_checkpointing", CFG_BOOL, offsetof(conf, gradient_checkpointing),
     "true", "recompute activations"},
    {"model", CFG_STRING, offsetof(conf, model), NULL, "model directory"},
    {"note", CFG_STRING, offsetof(conf, note), "hello", "free text"},
    {"target_modules", CFG_STRLIST, offsetof(conf, target_modules),
     "q_proj,v_proj", "modules"},
};
#define NF (sizeof fields / sizeof fields[0])

static char dir[] = "/tmp/test_config.XXXXXX";
static char path[256], errpath[256];
static char errbuf[4096];
static int saved_fd = -1;
static FILE *cap;

static void capture_begin(void)
{
    fflush(stderr);
    saved_fd = dup(2);
    cap = fopen(errpath, "w+");
    dup2(fileno(cap), 2);
}

static void capture_end(void)
{
    fflush(stderr);
    dup2(saved_fd, 2);
    close(saved_fd);
    rewind(cap);
    size_t k = fread(errbuf, 1, sizeof errbuf - 1, cap);
    errbuf[k] = '\0';
    fclose(cap);
}

static const char *yaml_file(const char *name, const char *text)
{
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

/* Loads text into c (after defaults); returns the load's status with its
 * stderr in errbuf. */
static int load(conf *c, const char *name, const char *text)
{
    cfg_defaults(fields, NF, c);
    const char *p = yaml_file(name, text);
    capture_begin();
    int rc = cfg_load_yaml(p, fields, NF, c);
    capture_end();
    return rc;
}

static int list_is(const cfg_strlist *l, int n, const char *a, const char *b)
{
    return (int)l->n == n && (n < 1 || strcmp(l->items[0], a) == 0) &&
           (n < 2 || strcmp(l->items[1], b) == 0);
}

static void test_defaults_and_json(void)
{
    conf c;
    CHECK(cfg_defaults(fields, NF, &c) == 0, "defaults parse");
    CHECK(c.r == 64 && c.lora_alpha == 16 && c.lr == 2e-4 &&
              c.gradient_checkpointing == 1 && c.model == NULL &&
              strcmp(c.note, "hello") == 0 &&
              list_is(&c.target_modules, 2, "q_proj", "v_proj"),
          "defaults fill every type");
    strbuf sb = STRBUF_INIT;
    cfg_to_json(fields, NF, &c, &sb);
    const char *want =
        "{\"r\":64,\"lora_alpha\":16,\"learning_rate\":0.0002,"
        "\"gradient_checkpointing\":true,\"model\":null,"
        "\"note\":\"hello\",\"target_modules\":[\"q_proj\",\"v_proj\"]}";
    CHECK(strcmp(sb_str(&sb), want) == 0, "JSON of the defaults: %s",
          sb_str(&sb));
    sb_free(&sb);
    cfg_free(fields, NF, &c);
    CHECK(c.note == NULL && c.target_modules.n == 0, "cfg_free clears");
    CHECK(cfg_find(fields, NF, "lora_alpha") == &fields[1] &&
              cfg_find(fields, NF, "nope") == NULL,
          "cfg_find");

    static const cfg_field bad[] = {{"x", CFG_INT, 0, "1.5", ""}};
    int64_t x;
    capture_begin();
    int rc = cfg_defaults(bad, 1, &x);
    capture_end();
    CHECK(rc < 0 && strstr(errbuf, "'x'"),
          "a default that does not parse is an error");
}

static void test_good_file(void)
{
    conf c;
    int rc = load(&c, "good.yaml",
                  "# a comment\n"
                  "r: 16\n"
                  "lora_alpha: \"32\"   # quoted numbers are numbers\n"
                  "learning_rate: 1e-5\n"
                  "gradient_checkpointing: no\n"
                  "model: ../models/llama 2\n"
                  "note: ''\n"
                  "target_modules:\n"
                  "  - q_proj\n"
                  "  - k_proj\n");
    CHECK(rc == 0 && errbuf[0] == '\0', "good file loads quietly");
    CHECK(c.r == 16 && c.lora_alpha == 32 && c.lr == 1e-5 &&
              c.gradient_checkpointing == 0 &&
              strcmp(c.model, "../models/llama 2") == 0 && c.note == NULL &&
              list_is(&c.target_modules, 2, "q_proj", "k_proj"),
          "good file sets every type");
    strbuf sb = STRBUF_INIT;
    cfg_to_json(fields, NF, &c, &sb);
    CHECK(strstr(sb_str(&sb), "\"learning_rate\":1e-05,") &&
              strstr(sb_str(&sb), "\"model\":\"../models/llama 2\""),
          "JSON of a loaded file: %s", sb_str(&sb));
    sb_free(&sb);
    cfg_free(fields, NF, &c);

    rc = load(&c, "empty.yaml", "# nothing but a comment\n");
    CHECK(rc == 0 && c.r == 64, "a file of comments keeps the defaults");
    cfg_free(fields, NF, &c);
    rc = load(&c, "bools.yaml", "gradient_checkpointing: On\n");
    CHECK(rc == 0 && c.gradient_checkpointing == 1, "YAML 1.1 booleans (On)");
    cfg_free(fields, NF, &c);
    rc = load(&c, "null.yaml", "model: ~\nnote: null\n");
    CHECK(rc == 0 && c.model == NULL && c.note == NULL,
          "null strings are NULL");
    cfg_free(fields, NF, &c);
    rc = load(&c, "nulltext.yaml", "note: 'null'\n");
    CHECK(rc == 0 && c.note && strcmp(c.note, "null") == 0,
          "a quoted 'null' is text");
    cfg_free(fields, NF, &c);
}

static void test_lists(void)
{
    conf c;
    int rc = load(&c, "flow.yaml", "target_modules: [q_proj, o_proj]\n");
    CHECK(rc == 0 && list_is(&c.target_modules, 2, "q_proj", "o_proj"),
          "flow sequence");
    cfg_free(fields, NF, &c);
    rc = load(&c, "comma.yaml", "target_modules: q_proj , up_proj\n");
    CHECK(rc == 0 && list_is(&c.target_modules, 2, "q_proj", "up_proj"),
          "comma-separated string");
    cfg_free(fields, NF, &c);
    rc = load(&c, "one.yaml", "target_modules: down_proj\n");
    CHECK(rc == 0 && list_is(&c.target_modules, 1, "down_proj", NULL),
          "single string");
    cfg_free(fields, NF, &c);
    rc = load(&c, "none.yaml", "target_modules: []\n");
    CHECK(rc == 0 && c.target_modules.n == 0, "empty flow sequence");
    cfg_free(fields, NF, &c);
    rc = load(&c, "nested.yaml", "target_modules:\n  - [a, b]\n");
    CHECK(rc < 0 &&
              strstr(errbuf,
                     "nested.yaml:2: 'target_modules': expected a list of "
                     "strings, got a list in the list"),
          "a list inside the list is refused: %.*s", (int)strcspn(errbuf, "\n"),
          errbuf);
    cfg_free(fields, NF, &c);
    rc = load(&c, "emptyitem.yaml", "target_modules: a,,b\n");
    CHECK(rc < 0 && strstr(errbuf, "empty item"),
          "an empty comma item is refused");
    cfg_free(fields, NF, &c);
}

static void test_errors(void)
{
    conf c;
    int rc = load(&c, "unknown.yaml", "r: 8\n\nlora_alpah: 3\n");
    CHECK(rc < 0 &&
              strstr(errbuf, "unknown.yaml:3: unknown key 'lora_alpah'\n") &&
              strstr(errbuf, "hint: did you mean 'lora_alpha'?"),
          "unknown key names file:line and key, with a hint: %.*s",
          (int)strcspn(errbuf, "\n"), errbuf);
    cfg_free(fields, NF, &c);

    rc = load(&c, "type.yaml", "r: 8\nlora_alpha: abc\n");
    char want[512];
    snprintf(want, sizeof want,
             "test_config: %s/type.yaml:2: 'lora_alpha': expected a number, "
             "got 'abc'\n",
             dir);
    CHECK(rc < 0 && strcmp(errbuf, want) == 0,
          "wrong type, exact message: %.*s", (int)strcspn(errbuf, "\n"),
          errbuf);
    cfg_free(fields, NF, &c);

    rc = load(&c, "int.yaml", "r: 1.5\n");
    CHECK(rc < 0 &&
              strstr(errbuf, "int.yaml:1: 'r': expected an integer, got '1.5'"),
          "a fraction for an integer");
    cfg_free(fields, NF, &c);
    rc = load(&c, "big.yaml", "r: 99999999999999999999\n");
    CHECK(rc < 0 && strstr(errbuf, "out of range"), "an integer out of range");
    cfg_free(fields, NF, &c);
    rc = load(&c, "nan.yaml", "learning_rate: nan\n");
    CHECK(rc < 0 && strstr(errbuf, "expected a number"), "nan is not a number");
    cfg_free(fields, NF, &c);
    rc = load(&c, "bool.yaml", "gradient_checkpointing: maybe\n");
    CHECK(rc < 0 && strstr(errbuf, "expected true or false, got 'maybe'"),
          "bad boolean");
    cfg_free(fields, NF, &c);
    rc = load(&c, "nullint.yaml", "r:\n");
    CHECK(rc < 0 && strstr(errbuf, "'r': expected an integer, got null"),
          "null integer");
    cfg_free(fields, NF, &c);
    rc = load(&c, "map.yaml", "r: 8\nlora_alpha:\n  a: 1\n");
    CHECK(rc < 0 && strstr(errbuf,
                           "map.yaml:2: 'lora_alpha': expected a number, got a "
                           "mapping"),
          "a mapping value is refused");
    cfg_free(fields, NF, &c);
    rc = load(&c, "listnum.yaml", "r: [1, 2]\n");
    CHECK(rc < 0 && strstr(errbuf, "'r': expected an integer, got a list"),
          "a list for a scalar is refused");
    cfg_free(fields, NF, &c);
    rc = load(&c, "dup.yaml", "r: 8\nr: 9\n");
    CHECK(rc < 0 && strstr(errbuf, "dup.yaml:2: duplicate key 'r'"),
          "duplicate key");
    cfg_free(fields, NF, &c);
    rc = load(&c, "top.yaml", "- r\n- 8\n");
    CHECK(rc < 0 &&
              strstr(errbuf, "top.yaml:1: the top level must be a mapping"),
          "a top-level list is refused");
    cfg_free(fields, NF, &c);
    rc = load(&c, "docs.yaml", "r: 8\n---\nr: 9\n");
    CHECK(rc < 0 && strstr(errbuf, "docs.yaml:2: more than one YAML document"),
          "several documents are refused: %.*s", (int)strcspn(errbuf, "\n"),
          errbuf);
    cfg_free(fields, NF, &c);
    rc = load(&c, "syntax.yaml", "r: 8\ntarget_modules: [a, b\nmodel: x\n");
    CHECK(rc < 0 && strstr(errbuf, "syntax.yaml:") &&
              strstr(errbuf, "bad YAML") &&
              strchr(errbuf, '\n') == errbuf + strlen(errbuf) - 1,
          "bad YAML syntax is one line: %.*s", (int)strcspn(errbuf, "\n"),
          errbuf);
    cfg_free(fields, NF, &c);
    rc = load(&c, "syntax2.yaml", "r: 8\nnote: x: y\n");
    CHECK(rc < 0 && strstr(errbuf, "syntax2.yaml:2:") &&
              strstr(errbuf, "bad YAML"),
          "a colon inside a plain value names line 2: %.*s",
          (int)strcspn(errbuf, "\n"), errbuf);
    cfg_free(fields, NF, &c);

    cfg_defaults(fields, NF, &c);
    capture_begin();
    rc = cfg_load_yaml("/nonexistent/x.yaml", fields, NF, &c);
    capture_end();
    CHECK(rc < 0 && strstr(errbuf, "cannot open '/nonexistent/x.yaml'"),
          "missing file");
    cfg_free(fields, NF, &c);
}

static void test_set(void)
{
    conf c;
    cfg_defaults(fields, NF, &c);
    CHECK(cfg_set(fields, NF, &c, "learning_rate", "3e-4", "--set") == 0 &&
              c.lr == 3e-4,
          "cfg_set a float");
    CHECK(cfg_set(fields, NF, &c, "target_modules", "q_proj,k_proj,v_proj",
                  "--set") == 0 &&
              c.target_modules.n == 3 &&
              strcmp(c.target_modules.items[2], "v_proj") == 0,
          "cfg_set a list");
    CHECK(cfg_set(fields, NF, &c, "note", "two words", "--set") == 0 &&
              strcmp(c.note, "two words") == 0,
          "cfg_set a string");
    CHECK(cfg_set(fields, NF, &c, "gradient_checkpointing", "false", "--set") ==
                  0 &&
              c.gradient_checkpointing == 0,
          "cfg_set a boolean");
    capture_begin();
    int rc = cfg_set(fields, NF, &c, "r", "x", "--set");
    capture_end();
    CHECK(
        rc < 0 &&
            strcmp(errbuf,
                   "test_config: --set: 'r': expected an integer, got 'x'\n") ==
                0,
        "cfg_set wrong type: %.*s", (int)strcspn(errbuf, "\n"), errbuf);
    capture_begin();
    rc = cfg_set(fields, NF, &c, "learning-rate", "1", "--set");
    capture_end();
    CHECK(rc < 0 && strstr(errbuf, "--set: unknown key 'learning-rate'") &&
              strstr(errbuf, "did you mean 'learning_rate'"),
          "cfg_set unknown key: %.*s", (int)strcspn(errbuf, "\n"), errbuf);
    cfg_free(fields, NF, &c);
}

int main(void)
{
    msg_init("test_config");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(errpath, sizeof errpath, "%s/stderr", dir);
    test_defaults_and_json();
    test_good_file();
    test_lists();
    test_errors();
    test_set();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        return 2;
    return CHECK_DONE();
}
