/* embedding.c: the embedding gather against ops_embedding: bit-identical. */
#include "gpu_test.h"

static void one(int64_t n, int vocab, int d)
{
    float *table = gt_rand((int64_t)vocab * d, 1.0f);
    gt_round_bf16(table, (int64_t)vocab * d);
    int32_t *ids = malloc((size_t)n * 4);
    for (int64_t t = 0; t < n; t++)
        ids[t] = (int32_t)(gt_u64() % (uint64_t)vocab);
    float *ref = malloc((size_t)(n * d) * 4);
    ops_embedding(ref, table, ids, n, d);
    kn_bf16 *dt = gt_up_bf16(table, (int64_t)vocab * d), *out = gt_dev((size_t)(n * d) * 2);
    int32_t *dids = gt_up(ids, (size_t)n * 4);
    kn_embedding_forward(out, dt, dids, n, d, 0);
    float *got = gt_down_bf16(out, n * d);
    char what[80];
    snprintf(what, sizeof what, "embedding n=%lld vocab=%d d=%d", (long long)n, vocab, d);
    gt_compare(what, got, ref, n * d, TOL_EXACT, "TOL_EXACT");
    free(table); free(ids); free(ref); free(got);
    kn_free(dt); kn_free(out); kn_free(dids);
}

int main(int argc, char **argv)
{
    gt_init("embedding", argc, argv);
    gt_seed(10);
    one(1, 512, 64);
    one(300, 512, 64);
    one(77, 1000, 100);
    one(2048, 32000, 4096);
    return gt_done();
}
