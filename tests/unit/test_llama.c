/* test_llama.c: the CPU forward pass against transformers.
 *
 * $SHARED/golden/s260-forward.json holds transformers' F32 forward on
 * stories260K for a 128-token input: the mean next-token loss, the logits
 * of the first five rows and of the last row, and the argmax everywhere.
 * Our forward must agree within REL_TOL_FORWARD. Then properties that need
 * no reference: decoding with a key/value cache, piece by piece, gives the
 * forward's logits; documents packed in one batch do not see each other.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "io.h"
#include "json.h"
#include "llama.h"
#include "lora.h"

#define REL_TOL_FORWARD 1e-4   /* the bound, F32 */
#define ABS_TOL_SAME_MATH 1e-5 /* the same math in another grouping */

static double max_rel_err(const float *got, const json_value *want, int64_t n,
                          double *max_abs)
{
    double worst = 0, wabs = 0, scale = 0;
    for (int64_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(want->u.array.items[i]->u.number.value));
    for (int64_t i = 0; i < n; i++) {
        double w = want->u.array.items[i]->u.number.value;
        double e = fabs(got[i] - w);
        /* relative to the row's largest logit (the infinity norm): logits
         * near zero carry no relative meaning of their own */
        worst = fmax(worst, e / scale);
        wabs = fmax(wabs, e);
    }
    if (max_abs)
        *max_abs = wabs;
    return worst;
}

static void golden_forward(const llama_model *m, const char *shared)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/golden/s260-forward.json", shared);
    char *text;
    size_t len;
    json_value *g;
    if (io_read_file(path, &text, &len) != 0 ||
        json_parse(text, len, path, 1, &g) != 0) {
        CHECK(0, "read %s", path);
        return;
    }
    const json_value *ids = json_get(g, "input_ids");
    int64_t n = (int64_t)ids->u.array.n, V = m->cfg.vocab;
    int32_t *id = malloc(n * sizeof *id), *pos = malloc(n * sizeof *pos);
    int32_t *start = calloc(n, sizeof *start), *tg = malloc(n * sizeof *tg);
    for (int64_t t = 0; t < n; t++) {
        id[t] = (int32_t)ids->u.array.items[t]->u.number.integer;
        pos[t] = (int32_t)t;
    }
    for (int64_t t = 0; t < n; t++)
        tg[t] = t + 1 < n ? id[t + 1] : -1;
    llama_batch b = {n, id, pos, start, tg, NULL};
    float *logits = malloc(n * V * sizeof(float));
    double ls = 0, ws = 0;
    CHECK(llama_forward(m, NULL, &b, logits, &ls, &ws) == 0, "forward runs");
    double loss = ls / ws, want = json_get_number(g, "loss", 0);
    double rel = fabs(loss - want) / want;
    CHECK(rel <= REL_TOL_FORWARD, "loss %.7f vs transformers %.7f (rel %.2e)",
          loss, want, rel);
    const json_value *f5 = json_get(g, "logits_first5_rows");
    double worst = 0, wabs = 0, a;
    for (int r = 0; r < 5; r++) {
        worst = fmax(worst,
                     max_rel_err(logits + r * V, f5->u.array.items[r], V, &a));
        wabs = fmax(wabs, a);
    }
    worst = fmax(worst, max_rel_err(logits + (n - 1) * V,
                                    json_get(g, "logits_last_row"), V, &a));
    wabs = fmax(wabs, a);
    CHECK(worst <= REL_TOL_FORWARD,
          "logits of rows 0-4 and %lld: max rel err %.2e, max abs err %.2e",
          (long long)n - 1, worst, wabs);
    const json_value *am = json_get(g, "argmax");
    int same = 1;
    for (int64_t t = 0; t < n; t++) {
        int64_t best = 0;
        for (int64_t v = 1; v < V; v++)
            if (logits[t * V + v] > logits[t * V + best])
                best = v;
        same &= best == am->u.array.items[t]->u.number.integer;
    }
    CHECK(same, "argmax at all %lld positions", (long long)n);

    /* decoding with a cache: prompt in one piece, then token by token */
    llama_kv_cache *kc = llama_kv_cache_new(m, (int32_t)n);
    float *lg = malloc(V * sizeof(float));
    double dmax = 0;
    int32_t first = 37;
    CHECK(llama_decode(m, NULL, kc, id, first, lg) == 0, "decode prompt");
    for (int64_t v = 0; v < V; v++)
        dmax = fmax(dmax, fabs(lg[v] - logits[(first - 1) * V + v]));
    for (int64_t t = first; t < n; t++) {
        llama_decode(m, NULL, kc, id + t, 1, lg);
        for (int64_t v = 0; v < V; v++)
            dmax = fmax(dmax, fabs(lg[v] - logits[t * V + v]));
    }
    CHECK(dmax <= ABS_TOL_SAME_MATH,
          "kv-cache decoding matches the forward "
          "(max abs diff %.2e)",
          dmax);
    CHECK(llama_decode(m, NULL, kc, id, 1, lg) != 0, "a full cache is refused");
    llama_kv_cache_free(kc);

    /* two documents in one batch = each alone */
    int64_t n1 = 50;
    for (int64_t t = n1; t < n; t++) {
        start[t] = (int32_t)n1;
        pos[t] = (int32_t)(t - n1);
    }
    tg[n1 - 1] = -1;
    float *lg2 = malloc(n * V * sizeof(float));
    llama_forward(m, NULL, &b, lg2, NULL, NULL);
    llama_batch b2 = {n - n1, id + n1, pos + n1, start, NULL, NULL};
    memset(start, 0, n * sizeof *start);
    float *lg3 = malloc((n - n1) * V * sizeof(float));
    llama_forward(m, NULL, &b2, lg3, NULL, NULL);
    double d1 = 0, d2 = 0;
    for (int64_t e = 0; e < n1 * V; e++)
        d1 = fmax(d1, fabs(lg2[e] - logits[e]));
    for (int64_t e = 0; e < (n - n1) * V; e++)
        d2 = fmax(d2, fabs(lg2[n1 * V + e] - lg3[e]));
    CHECK(d1 == 0 && d2 == 0,
          "documents in one batch are independent "
          "(diffs %.2e %.2e)",
          d1, d2);
    free(lg3);
    free(lg2);
    free(lg);
    free(logits);
    free(id);
    free(pos);
    free(start);
    free(tg);
    json_free(g);
    free(text);
}

static void bad_inputs(const llama_model *m)
{
    int32_t id[3] = {1, 2, 9999}, pos[3] = {0, 1, 2}, st[3] = {0, 0, 0};
    llama_batch b = {3, id, pos, st, NULL, NULL};
    fprintf(stderr, "(expected errors follow)\n");
    CHECK(llama_forward(m, NULL, &b, NULL, NULL, NULL) != 0,
          "an id outside the vocabulary is refused");
    id[2] = 3;
    st[2] = 1;
    CHECK(llama_forward(m, NULL, &b, NULL, NULL, NULL) != 0,
          "an attention start inside another document is refused");
    llama_model *x;
    CHECK(llama_load("/nonexistent-model-dir", &x) != 0,
          "a missing model "
          "directory is refused");
}

int main(void)
{
    const char *shared = check_shared();
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/stories260K", shared);
    if (!io_exists(dir)) {
        SKIP("stories260K: %s absent", dir);
        return 77;
    }
    llama_model *m;
    CHECK(llama_load(dir, &m) == 0, "load stories260K");
    if (!m)
        return 1;
    CHECK(m->cfg.n_kv_heads == 4 && m->cfg.head_dim == 8 && m->cfg.tied,
          "config: GQA 8/4 heads, head_dim 8, tied head");
    golden_forward(m, shared);
    bad_inputs(m);
    llama_free(m);
    return CHECK_DONE();
}
