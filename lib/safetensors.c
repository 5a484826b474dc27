/* safetensors.c: the safetensors reader (mmap, every field checked) and the
 * streaming, optionally sharded writer.
 *
 * The reader trusts nothing in a file: the header length must fit the file,
 * the header must be strict JSON, every tensor needs a known dtype, a shape
 * of non-negative integers and offsets whose length matches the shape; the
 * tensors must tile the data area exactly (no overlap, no hole, nothing past
 * the end), as the reference Rust implementation demands.
 *
 * The writer produces the same header bytes as the reference implementation
 * (compact JSON, "__metadata__" first, padded with spaces to a multiple of
 * 8 so that the data starts aligned), so a caller that declares tensors in
 * the order st_serialize_cmp() gives writes files byte-identical to
 * safetensors.torch.save_file.
 */
#define _DEFAULT_SOURCE /* madvise */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io.h"
#include "msg.h"
#include "strbuf.h"

/* The largest header accepted, as in the reference implementation. */
#define ST_MAX_HEADER (100u * 1024 * 1024)

static const struct {
    const char *name;
    size_t size;
    int rank; /* position in the reference implementation's Dtype enum */
} dtypes[ST_NDTYPES] = {
    [ST_F64] = {"F64", 8, 17}, [ST_F32] = {"F32", 4, 15},
    [ST_F16] = {"F16", 2, 11}, [ST_BF16] = {"BF16", 2, 12},
    [ST_I64] = {"I64", 8, 18}, [ST_I32] = {"I32", 4, 13},
    [ST_I16] = {"I16", 2, 9},  [ST_I8] = {"I8", 1, 5},
    [ST_U8] = {"U8", 1, 4},    [ST_BOOL] = {"BOOL", 1, 0},
};

size_t st_dtype_size(st_dtype t)
{
    return (unsigned)t < ST_NDTYPES ? dtypes[t].size : 0;
}

const char *st_dtype_name(st_dtype t)
{
    return (unsigned)t < ST_NDTYPES ? dtypes[t].name : "?";
}

int st_dtype_parse(const char *name, st_dtype *out)
{
    for (int i = 0; i < ST_NDTYPES; i++)
        if (strcmp(name, dtypes[i].name) == 0) {
            *out = (st_dtype)i;
            return 0;
        }
    return -1;
}

int st_serialize_cmp(st_dtype a, const char *name_a, st_dtype b,
                     const char *name_b)
{
    if (dtypes[a].rank != dtypes[b].rank)
        return dtypes[a].rank > dtypes[b].rank ? -1 : 1;
    return strcmp(name_a, name_b);
}

/* ---- conversions ---------------------------------------------------- */

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float st_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t st_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0; /* the canonical quiet NaN, as torch */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f)
        return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24, exact in float */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t st_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: the canonical quiet NaN, as torch */
        return (uint16_t)(sign | 0x7e00);
    if (a >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00);
    if (a < 0x38800000u) {
        /* result is subnormal (or zero): value / 2^-24, rounded to even.
         * Adding 0.5 in float does the rounding exactly for this range. */
        float v = bits_f32(a) + 0.5f;
        return (uint16_t)(sign | (uint16_t)(f32_bits(v) - f32_bits(0.5f)));
    }
    uint32_t mant_odd = (a >> 13) & 1;
    a += ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd;
    return (uint16_t)(sign | (a >> 13));
}

void st_tensor_release(const st_tensor *t)
{
    if (!t->nbytes)
        return;
    /* Whole pages around the data: dropping a read-only file mapping's
     * page is always safe, a neighbour's next access faults it back. */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)t->data & ~(page - 1);
    uintptr_t b = ((uintptr_t)t->data + t->nbytes + page - 1) & ~(page - 1);
    madvise((void *)a, b - a, MADV_DONTNEED);
}

int st_to_f32(const st_tensor *t, float *dst, int64_t offset, int64_t n)
{
    if (offset < 0 || n < 0 || offset > t->numel || n > t->numel - offset)
        return msg_error("elements %lld..%lld out of range of tensor '%s'",
                         (long long)offset, (long long)(offset + n), t->name);
    const unsigned char *p = (const unsigned char *)t->data +
                             (size_t)offset * st_dtype_size(t->dtype);
    switch (t->dtype) {
    case ST_F32:
        memcpy(dst, p, (size_t)n * 4);
        return 0;
    case ST_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            uint32_t u = (uint32_t)h << 16;
            memcpy(dst + i, &u, 4);
        }
        return 0;
    case ST_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = st_f16_to_f32(h);
        }
        return 0;
    case ST_F64:
        for (int64_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            dst[i] = (float)d;
        }
        return 0;
    default:
        return msg_error("tensor '%s' has dtype %s, not a float type", t->name,
                         st_dtype_name(t->dtype));
    }
}

int64_t st_find_nonfinite(const void *data, st_dtype dtype, int64_t n)
{
    /* all exponent bits set: infinity or NaN */
    const unsigned char *p = data;
    switch (dtype) {
    case ST_F64:
        for (int64_t i = 0; i < n; i++) {
            uint64_t u;
            memcpy(&u, p + 8 * i, 8);
            if ((u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull)
                return i;
        }
        return -1;
    case ST_F32:
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, p + 4 * i, 4);
            if ((u & 0x7f800000u) == 0x7f800000u)
                return i;
        }
        return -1;
    case ST_F16:
    case ST_BF16: {
        uint16_t mask = dtype == ST_F16 ? 0x7c00 : 0x7f80;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            if ((h & mask) == mask)
                return i;
        }
        return -1;
    }
    default:
        return -1;
    }
}

/* ---- reading -------------------------------------------------------- */

typedef struct st_file_priv {
    st_file pub;      /* first, so st_file * and this convert */
    json_value *root; /* owns metadata */
    const st_tensor **by_name;
} st_file_priv;

static int cmp_tensor_offset(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    /* zero-length tensors first at a given offset */
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_tensor_ptr_name(const void *a, const void *b)
{
    const st_tensor *x = *(const st_tensor *const *)a;
    const st_tensor *y = *(const st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int get_u64(const json_value *v, uint64_t *out)
{
    if (!v || v->type != JSON_NUMBER || !v->u.number.is_integer ||
        v->u.number.integer < 0)
        return -1;
    *out = (uint64_t)v->u.number.integer;
    return 0;
}

/* Parses one tensor entry; 0 ok, -1 with a message. */
static int parse_entry(const char *path, const char *name, const json_value *e,
                       uint64_t data_len, st_tensor *t)
{
    if (e->type != JSON_OBJECT)
        return msg_error("%s: tensor '%s' is not an object", path, name);
    for (size_t k = 0; k < e->u.object.n; k++) {
        const char *key = e->u.object.keys[k];
        if (strcmp(key, "dtype") && strcmp(key, "shape") &&
            strcmp(key, "data_offsets"))
            return msg_error("%s: tensor '%s' has an unknown field '%s'", path,
                             name, key);
    }
    const char *dt = json_get_string(e, "dtype", NULL);
    if (!dt)
        return msg_error("%s: tensor '%s' has no dtype", path, name);
    if (st_dtype_parse(dt, &t->dtype) != 0)
        return msg_error("%s: tensor '%s' has an unsupported dtype '%s'", path,
                         name, dt);
    const json_value *sh = json_get(e, "shape");
    if (!sh || sh->type != JSON_ARRAY)
        return msg_error("%s: tensor '%s' has no shape array", path, name);
    if (sh->u.array.n > ST_MAX_DIMS)
        return msg_error("%s: tensor '%s' has %zu dimensions (at most %d)",
                         path, name, sh->u.array.n, ST_MAX_DIMS);
    t->ndim = (int)sh->u.array.n;
    uint64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t dim;
        if (get_u64(sh->u.array.items[d], &dim) != 0)
            return msg_error("%s: tensor '%s' has a bad shape", path, name);
        if (dim && numel > (UINT64_MAX / 16) / dim)
            return msg_error("%s: tensor '%s' is too large", path, name);
        numel *= dim;
        t->shape[d] = (int64_t)dim;
    }
    t->numel = (int64_t)numel;
    const json_value *off = json_get(e, "data_offsets");
    uint64_t b, en;
    if (!off || off->type != JSON_ARRAY || off->u.array.n != 2 ||
        get_u64(off->u.array.items[0], &b) != 0 ||
        get_u64(off->u.array.items[1], &en) != 0 || en < b)
        return msg_error("%s: tensor '%s' has bad data_offsets", path, name);
    if (en > data_len)
        return msg_error("%s: tensor '%s' runs past the end of the file "
                         "(truncated? it ends at data byte %llu of %llu)",
                         path, name, (unsigned long long)en,
                         (unsigned long long)data_len);
    t->nbytes = en - b;
    if (t->nbytes != numel * st_dtype_size(t->dtype))
        return msg_error("%s: tensor '%s' has %llu bytes but its shape and "
                         "dtype need %llu",
                         path, name, (unsigned long long)t->nbytes,
                         (unsigned long long)(numel * st_dtype_size(t->dtype)));
    t->offset = b;
    return 0;
}

int st_open(const char *path, st_file **out)
{
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return msg_error("cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return msg_error("cannot stat '%s': %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return msg_error("'%s' is not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 8) {
        close(fd);
        return msg_error("%s: truncated safetensors file (%zu bytes)", path,
                         size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return msg_error("cannot map '%s': %s", path, strerror(errno));

    st_file_priv *fp = xcalloc(1, sizeof *fp);
    st_file *f = &fp->pub;
    f->path = xstrdup(path);
    f->map = map;
    f->map_len = size;

    const unsigned char *m = map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | m[i];
    if (hlen > size - 8) {
        msg_error("%s: header length %llu runs past the end of the file "
                  "(%zu bytes): truncated or not safetensors",
                  path, (unsigned long long)hlen, size);
        goto fail;
    }
    if (hlen > ST_MAX_HEADER || hlen < 2 || m[8] != '{') {
        msg_error("%s: not a safetensors file (bad header)", path);
        goto fail;
    }
    if (json_parse((const char *)m + 8, (size_t)hlen, path, 1, &fp->root) != 0)
        goto fail;
    const json_value *root = fp->root;
    if (root->type != JSON_OBJECT) {
        msg_error("%s: header is not a JSON object", path);
        goto fail;
    }
    uint64_t data_len = size - 8 - hlen;
    const unsigned char *data = m + 8 + hlen;
    f->tensors =
        xcalloc(root->u.object.n ? root->u.object.n : 1, sizeof *f->tensors);
    for (size_t k = 0; k < root->u.object.n; k++) {
        const char *name = root->u.object.keys[k];
        const json_value *e = root->u.object.values[k];
        if (strlen(name) != root->u.object.key_lens[k]) {
            msg_error("%s: a tensor name contains a NUL byte", path);
            goto fail;
        }
        if (strcmp(name, "__metadata__") == 0) {
            if (e->type != JSON_OBJECT) {
                msg_error("%s: __metadata__ is not an object", path);
                goto fail;
            }
            for (size_t j = 0; j < e->u.object.n; j++)
                if (e->u.object.values[j]->type != JSON_STRING) {
                    msg_error("%s: __metadata__ value '%s' is not a string",
                              path, e->u.object.keys[j]);
                    goto fail;
                }
            f->metadata = (json_value *)e;
            continue;
        }
        st_tensor *t = &f->tensors[f->n];
        t->name = xstrdup(name);
        f->n++;
        if (parse_entry(path, name, e, data_len, t) != 0)
            goto fail;
        t->data = data + t->offset;
    }
    /* Names must be unique (the JSON reader keeps duplicates). */
    fp->by_name = xmalloc((f->n ? f->n : 1) * sizeof *fp->by_name);
    for (size_t i = 0; i < f->n; i++)
        fp->by_name[i] = &f->tensors[i];
    qsort(fp->by_name, f->n, sizeof *fp->by_name, cmp_tensor_ptr_name);
    for (size_t i = 1; i < f->n; i++)
        if (strcmp(fp->by_name[i - 1]->name, fp->by_name[i]->name) == 0) {
            msg_error("%s: tensor '%s' appears twice", path,
                      fp->by_name[i]->name);
            goto fail;
        }
    /* The tensors must tile the data area: sorted by offset, each begins
     * where the previous ended and the last ends at the end of the file. */
    qsort(f->tensors, f->n, sizeof *f->tensors, cmp_tensor_offset);
    uint64_t pos = 0;
    for (size_t i = 0; i < f->n; i++) {
        const st_tensor *t = &f->tensors[i];
        if (t->offset < pos) {
            msg_error("%s: tensor '%s' overlaps tensor '%s'", path, t->name,
                      f->tensors[i - 1].name);
            goto fail;
        }
        if (t->offset > pos) {
            msg_error("%s: %llu unused bytes before tensor '%s'", path,
                      (unsigned long long)(t->offset - pos), t->name);
            goto fail;
        }
        pos = t->offset + t->nbytes;
    }
    if (pos != data_len) {
        msg_error("%s: %llu stray bytes after the last tensor (corrupt or "
                  "not safetensors)",
                  path, (unsigned long long)(data_len - pos));
        goto fail;
    }
    /* the sort moved the tensors: rebuild the name index */
    for (size_t i = 0; i < f->n; i++)
        fp->by_name[i] = &f->tensors[i];
    qsort(fp->by_name, f->n, sizeof *fp->by_name, cmp_tensor_ptr_name);
    *out = f;
    return 0;
fail:
    st_close(f);
    return -1;
}

void st_close(st_file *f)
{
    if (!f)
        return;
    st_file_priv *fp = (st_file_priv *)f;
    if (f->map)
        munmap(f->map, f->map_len);
    for (size_t i = 0; i < f->n; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    free(fp->by_name);
    json_free(fp->root);
    free(f->path);
    free(fp);
}

static const st_tensor *find_sorted(const st_tensor *const *v, size_t n,
                                    const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(v[mid]->name, name);
        if (c == 0)
            return v[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    const st_file_priv *fp = (const st_file_priv *)f;
    return find_sorted(fp->by_name, f->n, name);
}

/* ---- checkpoint directories ---------------------------------------- */

static int shard_name_ok(const char *s)
{
    return *s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

int st_model_open(const char *dir, st_model **out)
{
    *out = NULL;
    st_model *m = xcalloc(1, sizeof *m);
    m->dir = xstrdup(dir);
    char *index_path = io_path_join(dir, "model.safetensors.index.json");
    char *single = io_path_join(dir, "model.safetensors");
    char *text = NULL;
    json_value *index = NULL;
    char **names = NULL; /* distinct shard names */
    int rc = -1;

    if (io_exists(index_path)) {
        size_t len;
        if (io_read_file(index_path, &text, &len) != 0 ||
            json_parse(text, len, index_path, 1, &index) != 0)
            goto done;
        const json_value *wm = json_get(index, "weight_map");
        if (!wm || wm->type != JSON_OBJECT) {
            msg_error("%s: no \"weight_map\" object", index_path);
            goto done;
        }
        names = xcalloc(wm->u.object.n + 1, sizeof *names);
        /* m->nfiles stays 0 until m->files exists: st_model_close walks
         * it (a bad shard name after a good one used to reach it with
         * m->files NULL; fuzz_st_index) */
        size_t nnames = 0;
        for (size_t k = 0; k < wm->u.object.n; k++) {
            const json_value *v = wm->u.object.values[k];
            if (v->type != JSON_STRING || !shard_name_ok(v->u.string.s) ||
                strlen(v->u.string.s) != v->u.string.len) {
                msg_error("%s: bad shard name for tensor '%s'", index_path,
                          wm->u.object.keys[k]);
                goto done;
            }
            size_t j = 0;
            while (j < nnames && strcmp(names[j], v->u.string.s))
                j++;
            if (j == nnames)
                names[nnames++] = v->u.string.s;
        }
        if (nnames == 0) {
            msg_error("%s: the weight map is empty", index_path);
            goto done;
        }
        m->files = xcalloc(nnames, sizeof *m->files);
        m->nfiles = nnames;
        for (size_t j = 0; j < m->nfiles; j++) {
            char *p = io_path_join(dir, names[j]);
            if (!io_exists(p)) {
                msg_error("shard '%s' listed in '%s' is missing", p,
                          index_path);
                free(p);
                goto done;
            }
            int r = st_open(p, &m->files[j]);
            free(p);
            if (r != 0)
                goto done;
        }
        /* Every tensor where the index says, and nothing unlisted. */
        size_t total = 0;
        for (size_t j = 0; j < m->nfiles; j++)
            total += m->files[j]->n;
        for (size_t k = 0; k < wm->u.object.n; k++) {
            const char *tn = wm->u.object.keys[k];
            const char *sn = wm->u.object.values[k]->u.string.s;
            size_t j = 0;
            while (strcmp(names[j], sn))
                j++;
            if (!st_find(m->files[j], tn)) {
                msg_error("%s: tensor '%s' is not in shard '%s' as the index "
                          "says",
                          index_path, tn, sn);
                goto done;
            }
        }
        if (total != wm->u.object.n) {
            for (size_t j = 0; j < m->nfiles; j++)
                for (size_t i = 0; i < m->files[j]->n; i++) {
                    const char *tn = m->files[j]->tensors[i].name;
                    const json_value *v = json_get(wm, tn);
                    if (!v || strcmp(v->u.string.s, names[j])) {
                        msg_error("%s: tensor '%s' of shard '%s' is not in "
                                  "the index",
                                  index_path, tn, names[j]);
                        goto done;
                    }
                }
            msg_error("%s: the index lists a tensor twice", index_path);
            goto done;
        }
    } else if (io_exists(single)) {
        m->files = xcalloc(1, sizeof *m->files);
        if (st_open(single, &m->files[0]) != 0)
            goto done;
        m->nfiles = 1;
    } else {
        msg_error("no model.safetensors or model.safetensors.index.json in "
                  "'%s'",
                  dir);
        goto done;
    }
    for (size_t j = 0; j < m->nfiles; j++)
        m->n += m->files[j]->n;
    m->tensors = xmalloc((m->n ? m->n : 1) * sizeof *m->tensors);
    size_t k = 0;
    for (size_t j = 0; j < m->nfiles; j++)
        for (size_t i = 0; i < m->files[j]->n; i++)
            m->tensors[k++] = &m->files[j]->tensors[i];
    qsort(m->tensors, m->n, sizeof *m->tensors, cmp_tensor_ptr_name);
    for (size_t i = 1; i < m->n; i++)
        if (strcmp(m->tensors[i - 1]->name, m->tensors[i]->name) == 0) {
            msg_error("tensor '%s' appears in two shards of '%s'",
                      m->tensors[i]->name, dir);
            goto done;
        }
    rc = 0;
done:
    free(names);
    json_free(index);
    free(text);
    free(index_path);
    free(single);
    if (rc != 0) {
        st_model_close(m);
        return -1;
    }
    *out = m;
    return 0;
}

void st_model_close(st_model *m)
{
    if (!m)
        return;
    for (size_t j = 0; j < m->nfiles; j++)
        st_close(m->files[j]);
    free(m->files);
    free(m->tensors);
    free(m->dir);
    free(m);
}

const st_tensor *st_model_find(const st_model *m, const char *name)
{
    return find_sorted(m->tensors, m->n, name);
}

/* ---- writing -------------------------------------------------------- */

typedef struct wtensor {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset; /* within its shard's data area */
    size_t shard;
} wtensor;

struct st_writer {
    char *dir, *base;
    uint64_t shard_bytes;
    wtensor *t;
    size_t n, cap;
    char **meta; /* key, value, key, value, ... */
    size_t nmeta;
    int begun, failed;
    size_t nshards;
    char **shard_names;
    char **done_paths; /* shards already committed */
    size_t ndone;
    io_writer *out;
    size_t cur;        /* tensor being written */
    uint64_t cur_done; /* its bytes so far */
};

static void append_header(strbuf *sb, const char *const *meta, size_t nmeta,
                          const wtensor *t, size_t n)
{
    sb_putc(sb, '{');
    int first = 1;
    if (nmeta) {
        sb_puts(sb, "\"__metadata__\":{");
        for (size_t i = 0; i < nmeta; i++) {
            if (i)
                sb_putc(sb, ',');
            json_append_string(sb, meta[2 * i], strlen(meta[2 * i]));
            sb_putc(sb, ':');
            json_append_string(sb, meta[2 * i + 1], strlen(meta[2 * i + 1]));
        }
        sb_putc(sb, '}');
        first = 0;
    }
    for (size_t i = 0; i < n; i++) {
        if (!first)
            sb_putc(sb, ',');
        first = 0;
        json_append_string(sb, t[i].name, strlen(t[i].name));
        sb_printf(sb, ":{\"dtype\":\"%s\",\"shape\":[",
                  st_dtype_name(t[i].dtype));
        for (int d = 0; d < t[i].ndim; d++)
            sb_printf(sb, "%s%lld", d ? "," : "", (long long)t[i].shape[d]);
        sb_printf(sb, "],\"data_offsets\":[%llu,%llu]}",
                  (unsigned long long)t[i].offset,
                  (unsigned long long)(t[i].offset + t[i].nbytes));
    }
    sb_putc(sb, '}');
    while (sb->len % 8)
        sb_putc(sb, ' ');
}

static void write_header(io_writer *w, const strbuf *hdr)
{
    unsigned char len[8];
    uint64_t n = hdr->len;
    for (int i = 0; i < 8; i++)
        len[i] = (unsigned char)(n >> (8 * i));
    io_write(w, len, 8);
    io_write(w, hdr->buf, hdr->len);
}

static int fill_wtensor(wtensor *w, const char *name, st_dtype dtype, int ndim,
                        const int64_t *shape)
{
    memset(w, 0, sizeof *w);
    w->name = xstrdup(name);
    w->dtype = dtype;
    if (ndim < 0 || ndim > ST_MAX_DIMS || (unsigned)dtype >= ST_NDTYPES)
        return msg_error("cannot write tensor '%s': bad dtype or rank", name);
    w->ndim = ndim;
    uint64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return msg_error("cannot write tensor '%s': negative dimension",
                             name);
        w->shape[d] = shape[d];
        numel *= (uint64_t)shape[d];
    }
    w->nbytes = numel * st_dtype_size(dtype);
    return 0;
}

st_writer *st_writer_new(const char *dir, const char *base,
                         uint64_t shard_bytes)
{
    st_writer *w = xcalloc(1, sizeof *w);
    w->dir = xstrdup(dir);
    w->base = xstrdup(base);
    w->shard_bytes = shard_bytes;
    return w;
}

void st_writer_declare(st_writer *w, const char *name, st_dtype dtype, int ndim,
                       const int64_t *shape)
{
    if (w->begun) {
        w->failed = 1;
        msg_error("tensor '%s' declared after writing began", name);
        return;
    }
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        w->t = xrealloc(w->t, w->cap * sizeof *w->t);
    }
    if (fill_wtensor(&w->t[w->n], name, dtype, ndim, shape) != 0)
        w->failed = 1;
    w->n++;
}

void st_writer_metadata(st_writer *w, const char *key, const char *value)
{
    w->meta = xrealloc(w->meta, (w->nmeta + 1) * 2 * sizeof *w->meta);
    w->meta[2 * w->nmeta] = xstrdup(key);
    w->meta[2 * w->nmeta + 1] = xstrdup(value);
    w->nmeta++;
}

static char *shard_path(const st_writer *w, size_t s)
{
    return io_path_join(w->dir, w->shard_names[s]);
}

/* Opens shard s and writes its header. */
static int open_shard(st_writer *w, size_t s)
{
    size_t first = 0;
    while (first < w->n && w->t[first].shard != s)
        first++;
    size_t last = first;
    while (last < w->n && w->t[last].shard == s)
        last++;
    strbuf hdr = STRBUF_INIT;
    append_header(&hdr, (const char *const *)w->meta, w->nmeta, w->t + first,
                  last - first);
    char *p = shard_path(w, s);
    w->out = io_writer_open(p, IO_BINARY);
    free(p);
    if (!w->out) {
        sb_free(&hdr);
        return -1;
    }
    write_header(w->out, &hdr);
    sb_free(&hdr);
    return 0;
}

static int close_shard(st_writer *w)
{
    size_t s = w->t[w->cur - 1].shard;
    io_writer *o = w->out;
    w->out = NULL;
    if (io_writer_commit(o) != 0)
        return -1;
    w->done_paths = xrealloc(w->done_paths, (w->ndone + 1) * sizeof(char *));
    w->done_paths[w->ndone++] = shard_path(w, s);
    return 0;
}

/* Moves past finished tensors, switching shards when needed. */
static int advance(st_writer *w)
{
    while (w->cur < w->n && w->cur_done == w->t[w->cur].nbytes) {
        w->cur++;
        w->cur_done = 0;
        if (w->cur < w->n && w->t[w->cur].shard != w->t[w->cur - 1].shard) {
            if (close_shard(w) != 0 || open_shard(w, w->t[w->cur].shard) != 0)
                return -1;
        }
    }
    return 0;
}

int st_writer_begin(st_writer *w)
{
    if (w->failed || w->begun)
        return w->failed ? -1 : msg_error("st_writer_begin called twice");
    w->begun = 1;
    /* Assign shards: a new one when the current is non-empty and the next
     * tensor would make it exceed shard_bytes. */
    uint64_t size = 0;
    size_t s = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (w->shard_bytes && size > 0 &&
            size + w->t[i].nbytes > w->shard_bytes) {
            s++;
            size = 0;
        }
        w->t[i].shard = s;
        w->t[i].offset = size;
        size += w->t[i].nbytes;
    }
    w->nshards = s + 1;
    w->shard_names = xcalloc(w->nshards, sizeof *w->shard_names);
    for (size_t k = 0; k < w->nshards; k++) {
        strbuf sb = STRBUF_INIT;
        if (w->shard_bytes == 0)
            sb_printf(&sb, "%s.safetensors", w->base);
        else
            sb_printf(&sb, "%s-%05zu-of-%05zu.safetensors", w->base, k + 1,
                      w->nshards);
        w->shard_names[k] = xstrdup(sb_str(&sb));
        sb_free(&sb);
    }
    w->cur = 0;
    w->cur_done = 0;
    if (open_shard(w, 0) != 0 || advance(w) != 0) {
        w->failed = 1;
        return -1;
    }
    return 0;
}

int st_writer_write(st_writer *w, const void *data, uint64_t nbytes)
{
    if (w->failed)
        return -1;
    if (!w->begun) {
        w->failed = 1;
        return msg_error("st_writer_write before st_writer_begin");
    }
    const unsigned char *p = data;
    while (nbytes > 0) {
        if (w->cur >= w->n) {
            w->failed = 1;
            return msg_error("more data written than the tensors declared");
        }
        uint64_t room = w->t[w->cur].nbytes - w->cur_done;
        uint64_t k = nbytes < room ? nbytes : room;
        io_write(w->out, p, (size_t)k);
        p += k;
        nbytes -= k;
        w->cur_done += k;
        if (advance(w) != 0) {
            w->failed = 1;
            return -1;
        }
    }
    return 0;
}

static int cmp_wtensor_name(const void *a, const void *b)
{
    const wtensor *x = *(const wtensor *const *)a;
    const wtensor *y = *(const wtensor *const *)b;
    return strcmp(x->name, y->name);
}

static int write_index(st_writer *w)
{
    uint64_t total = 0;
    const wtensor **v = xmalloc((w->n ? w->n : 1) * sizeof *v);
    for (size_t i = 0; i < w->n; i++) {
        total += w->t[i].nbytes;
        v[i] = &w->t[i];
    }
    qsort(v, w->n, sizeof *v, cmp_wtensor_name);
    strbuf sb = STRBUF_INIT;
    sb_printf(&sb,
              "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n"
              "  \"weight_map\": {\n",
              (unsigned long long)total);
    for (size_t i = 0; i < w->n; i++) {
        sb_puts(&sb, "    ");
        json_append_string(&sb, v[i]->name, strlen(v[i]->name));
        sb_puts(&sb, ": ");
        const char *sn = w->shard_names[v[i]->shard];
        json_append_string(&sb, sn, strlen(sn));
        sb_puts(&sb, i + 1 < w->n ? ",\n" : "\n");
    }
    sb_puts(&sb, "  }\n}\n");
    free(v);
    strbuf name = STRBUF_INIT;
    sb_printf(&name, "%s.safetensors.index.json", w->base);
    char *p = io_path_join(w->dir, sb_str(&name));
    sb_free(&name);
    io_writer *o = io_writer_open(p, IO_TEXT);
    int rc = -1;
    if (o) {
        io_write(o, sb.buf, sb.len);
        rc = io_writer_commit(o);
    }
    free(p);
    sb_free(&sb);
    return rc;
}

static void writer_free(st_writer *w)
{
    for (size_t i = 0; i < w->n; i++)
        free(w->t[i].name);
    free(w->t);
    for (size_t i = 0; i < 2 * w->nmeta; i++)
        free(w->meta[i]);
    free(w->meta);
    for (size_t i = 0; i < w->nshards; i++)
        free(w->shard_names[i]);
    free(w->shard_names);
    for (size_t i = 0; i < w->ndone; i++)
        free(w->done_paths[i]);
    free(w->done_paths);
    free(w->dir);
    free(w->base);
    free(w);
}

int st_writer_finish(st_writer *w)
{
    int rc = -1;
    if (w->failed)
        goto out;
    if (!w->begun) {
        msg_error("st_writer_finish before st_writer_begin");
        goto out;
    }
    if (w->cur < w->n) {
        msg_error("tensor '%s' is incomplete (%llu of %llu bytes written)",
                  w->t[w->cur].name, (unsigned long long)w->cur_done,
                  (unsigned long long)w->t[w->cur].nbytes);
        goto out;
    }
    io_writer *o = w->out;
    w->out = NULL;
    if (io_writer_commit(o) != 0)
        goto out;
    w->done_paths = xrealloc(w->done_paths, (w->ndone + 1) * sizeof(char *));
    w->done_paths[w->ndone++] = shard_path(w, w->nshards - 1);
    if (w->shard_bytes > 0 && write_index(w) != 0)
        goto out;
    rc = 0;
out:
    if (rc != 0) {
        st_writer_abort(w);
        return -1;
    }
    writer_free(w);
    return 0;
}

void st_writer_abort(st_writer *w)
{
    if (!w)
        return;
    if (w->out)
        io_writer_abort(w->out);
    for (size_t i = 0; i < w->ndone; i++)
        unlink(w->done_paths[i]);
    writer_free(w);
}

int st_write_file(const char *path, const st_tensor *tensors, size_t n,
                  const char *const *meta_kv, size_t n_meta)
{
    wtensor *t = xcalloc(n ? n : 1, sizeof *t);
    int rc = 0;
    uint64_t off = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = fill_wtensor(&t[i], tensors[i].name, tensors[i].dtype,
                          tensors[i].ndim, tensors[i].shape);
        t[i].offset = off;
        off += t[i].nbytes;
    }
    io_writer *o = NULL;
    if (rc == 0) {
        strbuf hdr = STRBUF_INIT;
        append_header(&hdr, meta_kv, n_meta, t, n);
        o = io_writer_open(path, IO_BINARY);
        if (o) {
            write_header(o, &hdr);
            for (size_t i = 0; i < n; i++)
                io_write(o, tensors[i].data, (size_t)t[i].nbytes);
            rc = io_writer_commit(o);
        } else {
            rc = -1;
        }
        sb_free(&hdr);
    }
    for (size_t i = 0; i < n; i++)
        free(t[i].name);
    free(t);
    return rc;
}
