/* merge-adapter: writes a seeded LoRA adapter for a checkpoint, for
 * bench/merge.sh: A as PEFT initialises it, B uniform in [-0.01, 0.01)
 * (not zero, so the merge has work to do).
 *
 *   merge-adapter BASE_DIR OUT_DIR [r [targets [seed]]]
 *
 * targets: comma-separated module names or all-linear (default q_proj,v_proj,
 * the seed's); r defaults to 64, alpha is 16 as in the seed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter.h"
#include "llama.h"
#include "lora.h"
#include "msg.h"

int main(int argc, char **argv)
{
    msg_init(argv[0]);
    if (argc < 3)
        msg_die("usage: merge-adapter base_dir out_dir [r [targets [seed]]]");
    llama_config mc;
    if (llama_config_load(argv[1], &mc) != 0)
        return 2;
    lora_config lc = {argc > 3 ? atoi(argv[3]) : 64, 16.0, 0.1, 0,
                      LORA_DEFAULT_TARGETS};
    if (argc > 4) {
        char *list = xstrdup(argv[4]), *names[LLAMA_NLINEAR + 1];
        size_t n = 0;
        for (char *s = strtok(list, ","); s && n <= LLAMA_NLINEAR;
             s = strtok(NULL, ","))
            names[n++] = s;
        if (lora_targets_parse((const char *const *)names, n, &lc.targets) != 0)
            return 2;
        free(list);
    }
    uint64_t seed = argc > 5 ? strtoull(argv[5], NULL, 10) : 1;
    lora_adapter *a;
    if (lora_new(&mc, &lc, &a) != 0)
        return 2;
    lora_init(a, seed);
    for (int32_t i = 0; i < a->n_layers; i++)
        for (int l = 0; l < LLAMA_NLINEAR; l++) {
            float *B = lora_B(a, i, (llama_linear)l);
            if (!B)
                continue;
            const lora_slot *s = lora_slot_of(a, i, (llama_linear)l);
            uint64_t key = lora_init_key(seed + 1, i, (llama_linear)l);
            for (int64_t j = 0; j < s->out * lc.r; j++)
                B[j] = 0.02f * lora_rand_uniform(key, (uint64_t)j) - 0.01f;
        }
    int rc = adapter_write(argv[2], a, argv[1]);
    lora_free(a);
    return rc ? 2 : 0;
}
