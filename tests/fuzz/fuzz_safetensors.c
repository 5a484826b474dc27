/* fuzz_safetensors.c: libFuzzer harness for safetensors files (st_open).
 *
 * Input: the bytes of one .safetensors file (st_open maps a path, so each
 * input is written to a scratch file first). Promises checked: an opened
 * file's tensors lie inside the mapping, tile the data area in offset
 * order, have nbytes = numel * dtype size, are found by name, and convert
 * to f32 (float dtypes) or are refused (others).
 */
#include "fuzz.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = fuzz_write_file("model.safetensors", data, size);
    st_file *f = NULL;
    if (st_open(path, &f) != 0) {
        FUZZ_ASSERT(f == NULL);
        return 0;
    }
    const unsigned char *lo = f->map, *hi = lo + f->map_len;
    uint64_t pos = 0;
    for (size_t i = 0; i < f->n; i++) {
        const st_tensor *t = &f->tensors[i];
        const unsigned char *p = t->data;
        FUZZ_ASSERT(p >= lo && p <= hi && t->nbytes <= (uint64_t)(hi - p));
        FUZZ_ASSERT(t->nbytes == (uint64_t)t->numel * st_dtype_size(t->dtype));
        FUZZ_ASSERT(t->offset == pos);
        pos += t->nbytes;
        FUZZ_ASSERT(t->ndim >= 0 && t->ndim <= ST_MAX_DIMS);
        FUZZ_ASSERT(st_find(f, t->name) == t);
        float buf[16];
        int64_t n = t->numel < 16 ? t->numel : 16;
        int rc = st_to_f32(t, buf, t->numel - n, n);
        int is_float = t->dtype == ST_F32 || t->dtype == ST_F16 ||
                       t->dtype == ST_BF16 || t->dtype == ST_F64;
        FUZZ_ASSERT(is_float ? rc == 0 : rc == -1);
        FUZZ_ASSERT(st_to_f32(t, buf, t->numel, 1) == -1);
    }
    FUZZ_ASSERT(st_find(f, "no such tensor \x01") == NULL);
    st_close(f);
    return 0;
}
