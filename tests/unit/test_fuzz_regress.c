/* test_fuzz_regress.c: every input the fuzz harnesses (tests/fuzz) found
 * to crash, hang or exhaust memory, kept as a regression test.
 *
 * Each case is the reproducer, shrunk and written here as an inline byte
 * string (or built by the library's own writer), fed to the same parser
 * the harness drives, with the answer it must now give. Memory errors and
 * undefined behaviour show under `make test SAN=1`; allocations that a
 * lying size field used to cause are caught here by running with a 1 GiB
 * address-space limit (without ASan, which needs far more address space).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "io.h"
#include "msg.h"
#include "packfile.h"
#include "safetensors.h"
#include "tokstream.h"

#if defined(__SANITIZE_ADDRESS__)
#define HAVE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HAVE_ASAN 1
#endif
#endif

static char dir[] = "/tmp/test_fuzz_regress.XXXXXX";

static const char *write_bytes(const char *name, const void *data, size_t n)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
    return path;
}

/* Reads a token stream to its end: 0 accepted, -1 refused. */
static int read_stream(const char *path, uint64_t *records)
{
    io_reader *r = io_reader_open(path);
    if (!r)
        return -1;
    toks_reader *tr = toks_reader_new(r, NULL);
    int rc = -1;
    if (tr) {
        toks_record rec = {0};
        while ((rc = toks_read_record(tr, &rec)) == 1)
            ;
        if (records)
            *records = toks_reader_records(tr);
        toks_record_free(&rec);
        toks_reader_free(tr);
    }
    io_reader_close(r);
    return rc < 0 ? -1 : 0;
}

/* The header tok writes for stories260K's vocabulary: 136 bytes. */
#define S260_HEADER                                                            \
    "{\"format\":\"qlora-tokens\",\"version\":1,\"vocab_size\":512,"           \
    "\"bos_id\":1,\"eos_id\":2,\"tokenizer\":\"819be74e5b5089a8\","            \
    "\"producer\":\"tok 0.1.0\"}     \n"

static void tokstream_cases(void)
{
    /* fuzz_tokstream: a stream with no records. Reading its header formed
     * the pointer TOKS_MAGIC_PREFIX + 32, past the 25-byte literal
     * (UBSan: index out of bounds), in lib/tokstream.c read_header_line. */
    static const char empty[] = S260_HEADER "\xff\xff\xff\xff"
                                            "TEND"
                                            "\0\0\0\0\0\0\0\0"
                                            "\0\0\0\0\0\0\0\0";
    uint64_t n = 99;
    int rc =
        read_stream(write_bytes("empty.toks", empty, sizeof empty - 1), &n);
    CHECK(rc == 0 && n == 0,
          "fuzz regress: empty token stream read (header past the magic)");

    /* fuzz_tokstream (oom-36e78a1f): a record claiming 0x20207d22 tokens
     * made toks_read_record allocate 4 GiB before reading any of them.
     * Now the buffer grows with the data: refused as truncated. */
    static const char big[] = S260_HEADER "\x04\0\0\0"
                                          "\xff\xff\xff\xff"
                                          "\x01\0\0\0"
                                          "\x61\x01\0\0"
                                          "\x9b\x01\0\0"
                                          "\x02\0\0\0"
                                          "\x22\x7d\x20\x20"
                                          "\x20\x20\x20\x0a"
                                          "\x00\x00\x00\x02";
    CHECK(read_stream(write_bytes("big.toks", big, sizeof big - 1), NULL) == -1,
          "fuzz regress: a record claiming 2^29 tokens is refused without "
          "allocating them");
    static const char max[] = S260_HEADER "\0\0\0\x40"
                                          "\xff\xff\xff\xff";
    CHECK(read_stream(write_bytes("max.toks", max, sizeof max - 1), NULL) == -1,
          "fuzz regress: a record claiming 2^30 tokens (the maximum) is "
          "refused without allocating them");
}

static void packfile_cases(void)
{
    /* fuzz_packfile: the same out-of-bounds pointer as the token stream
     * (PACK_MAGIC_PREFIX + have) on every header longer than the magic:
     * here a packed file with no rows, as `pack` writes one. */
    pack_data d;
    memset(&d, 0, sizeof d);
    d.h.version = PACK_VERSION;
    d.h.seq_len = 16;
    d.h.vocab_size = 512;
    d.h.bos_id = 1;
    d.h.eos_id = 2;
    snprintf(d.h.producer, sizeof d.h.producer, "test_fuzz_regress");
    uint64_t spans0 = 0;
    d.row_spans = &spans0;
    char path[256];
    snprintf(path, sizeof path, "%s/empty.packed", dir);
    io_writer *w = io_writer_open(path, IO_BINARY);
    pack_write(w, &d);
    CHECK(io_writer_commit(w) == 0, "fuzz regress: write an empty packed file");
    pack_data back;
    CHECK(pack_read(path, &back) == 0 && back.h.n_rows == 0,
          "fuzz regress: empty packed file read (header past the magic)");
    pack_data_free(&back);

    /* fuzz_tokstream (crash-40575cb1): a stream whose first record has no
     * tokens made pack_input_read memcpy 0 bytes from and to NULL (UBSan:
     * applying zero offset to null pointer) in lib/packfile.c. */
    static const char zero[] = S260_HEADER "\0\0\0\0"
                                           "\xff\xff\xff\xff"
                                           "\x01\0\0\0"
                                           "\0\0\0\0"
                                           "\x05\0\0\0"
                                           "\xff\xff\xff\xff"
                                           "TEND"
                                           "\x02\0\0\0\0\0\0\0"
                                           "\x01\0\0\0\0\0\0\0";
    const char *zp = write_bytes("zero.toks", zero, sizeof zero - 1);
    pack_input in;
    memset(&in, 0, sizeof in);
    CHECK(pack_input_read(&in, zp, 0) == 0 && in.n_records == 2 &&
              in.n_tokens == 1 && in.ids[0] == 5,
          "fuzz regress: pack reads a stream whose first record is empty");
    pack_input_free(&in);
}

static void st_index_cases(void)
{
    /* fuzz_st_index: an index whose weight map names a good shard, then a
     * bad shard name. The refusal closed the half-built checkpoint, whose
     * shard count already said 1 while its file array was still NULL:
     * st_close(NULL[0]). */
    static const char idx[] = "{\"weight_map\": {\"a\": \"model-1.safetensors\", "
                              "\"b\": \"../x.safetensors\"}}";
    char sub[300];
    snprintf(sub, sizeof sub, "%s/ckpt", dir);
    CHECK(mkdir(sub, 0700) == 0, "fuzz regress: a checkpoint directory");
    write_bytes("ckpt/model.safetensors.index.json", idx, sizeof idx - 1);
    st_model *m = (st_model *)1;
    CHECK(st_model_open(sub, &m) == -1 && m == NULL,
          "fuzz regress: an index with a bad shard name after a good one is refused");
}

int main(void)
{
    msg_init("test_fuzz_regress");
    if (!mkdtemp(dir)) {
        perror(dir);
        return 2;
    }
#ifndef HAVE_ASAN
    struct rlimit rl = {1ul << 30, 1ul << 30};
    if (setrlimit(RLIMIT_AS, &rl) != 0)
        perror("setrlimit");
#endif
    tokstream_cases();
    packfile_cases();
    st_index_cases();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", dir);
    return CHECK_DONE();
}
