/* safetensors.h: reading and writing safetensors files and checkpoints.
 *
 * Format (see man 5 qlora-formats): u64 little-endian header length N, N
 * bytes of JSON { name: {dtype, shape, data_offsets:[begin,end]}, ...,
 * "__metadata__": {str: str} }, then the data; offsets are relative to the
 * byte after the header. Every field and offset is checked: offsets inside
 * the file, end - begin == product(shape) * dtype size, no two tensors
 * overlapping.
 *
 * Files are mmap'ed read-only; tensor data pointers point into the map and
 * stay valid until st_close.
 */
#ifndef SAFETENSORS_H
#define SAFETENSORS_H

#include "json.h"
#include <stddef.h>
#include <stdint.h>

typedef enum {
    ST_F64,
    ST_F32,
    ST_F16,
    ST_BF16,
    ST_I64,
    ST_I32,
    ST_I16,
    ST_I8,
    ST_U8,
    ST_BOOL,
    ST_NDTYPES
} st_dtype;

#define ST_MAX_DIMS 8

size_t st_dtype_size(st_dtype t);
const char *st_dtype_name(st_dtype t);               /* "F32", ... */
int st_dtype_parse(const char *name, st_dtype *out); /* 0 ok, -1 unknown */

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const void *data; /* into the mapping */
    uint64_t nbytes;
    uint64_t offset; /* data offset from the start of the data area */
} st_tensor;

typedef struct st_file {
    char *path;
    void *map;
    size_t map_len;
    st_tensor *tensors; /* in file (offset) order */
    size_t n;
    json_value *metadata; /* the "__metadata__" object or NULL */
} st_file;

/* Opens and validates one file. 0 ok, -1 error (message names the file). */
int st_open(const char *path, st_file **out);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);

/* A checkpoint directory: model.safetensors, or the shards listed by
 * model.safetensors.index.json (every shard must exist and every tensor
 * must be in the shard the index says). */
typedef struct st_model {
    char *dir;
    st_file **files;
    size_t nfiles;
    const st_tensor **tensors; /* all tensors, sorted by name */
    size_t n;
} st_model;

int st_model_open(const char *dir, st_model **out);
void st_model_close(st_model *m);
const st_tensor *st_model_find(const st_model *m, const char *name);

/* Lets the pages of a tensor's data leave the process's memory (they stay
 * in the page cache; touching the data again brings them back): streaming
 * over a large checkpoint keeps the resident size near one tensor. */
void st_tensor_release(const st_tensor *t);

/* Converts n elements of a tensor's data to float (F32, F16, BF16, F64). */
int st_to_f32(const st_tensor *t, float *dst, int64_t offset, int64_t n);
/* The index of the first NaN or infinity among n elements of float dtype
 * dtype at data (F64, F32, F16, BF16; other dtypes have none), or -1. The
 * tools refuse such weights rather than quantize, merge or train on them. */
int64_t st_find_nonfinite(const void *data, st_dtype dtype, int64_t n);

/* Writing, streaming tensor by tensor: declare every tensor first (so the
 * headers can be written), then st_writer_begin, then write each tensor's
 * bytes in declaration order, then st_writer_finish. With shard_bytes > 0
 * the tensors are split into "<base>-00001-of-0000N.safetensors" files of
 * at most that size (a single larger tensor gets its own shard) plus
 * "<base>.safetensors.index.json" (even when one shard suffices: callers that
 * want save_pretrained's single "model.safetensors" for a small model pass
 * 0); otherwise one "<base>.safetensors".
 * Files go to dir (which must exist) through temporary names. */
typedef struct st_writer st_writer;

st_writer *st_writer_new(const char *dir, const char *base,
                         uint64_t shard_bytes);
void st_writer_declare(st_writer *w, const char *name, st_dtype dtype, int ndim,
                       const int64_t *shape);
void st_writer_metadata(st_writer *w, const char *key, const char *value);
int st_writer_begin(st_writer *w);
/* Appends bytes of the current tensor; a tensor may be written in pieces.
 * Writing past the declared size is an error. */
int st_writer_write(st_writer *w, const void *data, uint64_t nbytes);
int st_writer_finish(st_writer *w); /* checks all bytes came; frees w */
void st_writer_abort(st_writer *w); /* removes partial files; frees w */

/* Writes one small file in one call: tensors with their data (nbytes and
 * offset are ignored; the size comes from dtype and shape), in the order
 * given. meta_kv holds n_meta key/value pairs: key0, value0, key1, ... */
int st_write_file(const char *path, const st_tensor *tensors, size_t n,
                  const char *const *meta_kv, size_t n_meta);

/* The order the reference serializer (safetensors.torch.save_file, and so
 * transformers' save_pretrained) puts tensors in: larger dtypes first (by
 * its Dtype enum, descending), then by name. Declaring tensors in this
 * order makes st_writer's output byte-identical to it. strcmp-like. */
int st_serialize_cmp(st_dtype a, const char *name_a, st_dtype b,
                     const char *name_b);

/* bf16/f16 conversions (round to nearest even; NaN becomes the canonical
 * quiet NaN, as in torch). */
float st_bf16_to_f32(uint16_t h);
uint16_t st_f32_to_bf16(float f);
float st_f16_to_f32(uint16_t h);
uint16_t st_f32_to_f16(float f);

#endif
