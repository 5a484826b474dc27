/* fuzz_config.c: libFuzzer harness for YAML configuration files
 * (cfg_load_yaml, lib/config.h) with lora-train's real field table.
 *
 * Input: the bytes of a YAML file. Promises checked: a loaded
 * configuration serializes to JSON that parses; every string is
 * NUL-terminated; a failed load leaves what it filled freeable.
 */
#include "config.h"
#include "fuzz.h"
#include "json.h"
#include "train.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write_file("config.yaml", data, size);
    train_config c;
    memset(&c, 0, sizeof c);
    FUZZ_ASSERT(cfg_defaults(train_fields, train_nfields, &c) == 0);
    if (cfg_load_yaml(path, train_fields, train_nfields, &c) == 0) {
        strbuf sb = STRBUF_INIT;
        cfg_to_json(train_fields, train_nfields, &c, &sb);
        json_value *v = NULL;
        FUZZ_ASSERT(json_parse_quiet(sb_str(&sb), sb.len, "cfg", 1, &v, NULL) ==
                    0);
        FUZZ_ASSERT(v->type == JSON_OBJECT);
        json_free(v);
        sb_free(&sb);
        for (size_t i = 0; i < c.target_modules.n; i++)
            FUZZ_ASSERT(c.target_modules.items[i] != NULL);
        (void)train_config_check(&c);
    }
    cfg_free(train_fields, train_nfields, &c);
    return 0;
}
