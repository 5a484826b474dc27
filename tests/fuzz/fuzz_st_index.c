/* fuzz_st_index.c: libFuzzer harness for sharded checkpoints: the index
 * file model.safetensors.index.json and the shards it names (st_model_open,
 * lib/safetensors.h).
 *
 * Input: the index's bytes, then any number of sections
 * "\n--- shard NAME ---\n" followed by that shard's bytes (seeds.sh writes
 * real sharded checkpoints this way). Each goes to a scratch directory,
 * emptied first; a NAME outside [A-Za-z0-9._-]{1,64}, or the index's own
 * name, is not written. Promises checked: a checkpoint opened has files,
 * its tensors are those of its files, sorted by name without duplicates,
 * each found by st_model_find and lying inside its file's mapping; one
 * refused leaves nothing (*out NULL).
 */
#include <dirent.h>

#include "fuzz.h"
#include "safetensors.h"

static const char sep[] = "\n--- shard ";

static const uint8_t *find(const uint8_t *h, size_t n, const char *s, size_t k)
{
    for (size_t i = 0; i + k <= n; i++)
        if (h[i] == (uint8_t)s[0] && memcmp(h + i, s, k) == 0)
            return h + i;
    return NULL;
}

static int name_ok(const uint8_t *s, size_t n)
{
    if (n < 1 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '-' || c == '_'))
            return 0;
    }
    return !(n == 1 && s[0] == '.') && !(n == 2 && s[0] == '.' && s[1] == '.') &&
           !(n == 28 && memcmp(s, "model.safetensors.index.json", 28) == 0);
}

static void empty_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char p[600];
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char dir[300], name[100];
    snprintf(dir, sizeof dir, "%s/ckpt", fuzz_tmpdir());
    mkdir(dir, 0700);
    empty_dir(dir);
    const uint8_t *cut = find(data, size, sep, sizeof sep - 1);
    size_t ilen = cut ? (size_t)(cut - data) : size;
    (void)fuzz_write_file("ckpt/model.safetensors.index.json", data, ilen);
    while (cut) {
        const uint8_t *nm = cut + sizeof sep - 1, *end = data + size;
        const uint8_t *close = find(nm, (size_t)(end - nm), " ---\n", 5);
        if (!close)
            break;
        const uint8_t *body = close + 5;
        cut = find(body, (size_t)(end - body), sep, sizeof sep - 1);
        size_t blen = (size_t)((cut ? cut : end) - body);
        if (name_ok(nm, (size_t)(close - nm))) {
            snprintf(name, sizeof name, "ckpt/%.*s", (int)(close - nm), (const char *)nm);
            (void)fuzz_write_file(name, body, blen);
        }
    }

    st_model *m = NULL;
    if (st_model_open(dir, &m) != 0) {
        FUZZ_ASSERT(m == NULL);
        return 0;
    }
    FUZZ_ASSERT(m && m->nfiles >= 1);
    size_t total = 0;
    for (size_t j = 0; j < m->nfiles; j++) {
        const st_file *f = m->files[j];
        total += f->n;
        const unsigned char *lo = f->map, *hi = lo + f->map_len;
        for (size_t i = 0; i < f->n; i++) {
            const st_tensor *t = &f->tensors[i];
            const unsigned char *p = t->data;
            FUZZ_ASSERT(p >= lo && p <= hi && t->nbytes <= (uint64_t)(hi - p));
            FUZZ_ASSERT(st_model_find(m, t->name) == t);
        }
    }
    FUZZ_ASSERT(total == m->n);
    for (size_t i = 1; i < m->n; i++)
        FUZZ_ASSERT(strcmp(m->tensors[i - 1]->name, m->tensors[i]->name) < 0);
    FUZZ_ASSERT(st_model_find(m, "no such tensor \x01") == NULL);
    st_model_close(m);
    return 0;
}
