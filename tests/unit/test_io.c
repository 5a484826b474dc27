/* test_io.c: the I/O layer: line reading across buffer edges, transparent
 * zstd, truncated zstd, atomic writes and directories. */
#define _POSIX_C_SOURCE 200809L
#include "check.h"
#include "io.h"
#include "strbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

static char dir[] = "/tmp/test_io.XXXXXX";

static char *path(const char *name)
{
    return io_path_join(dir, name);
}

static void write_raw(const char *p, const void *data, size_t n)
{
    FILE *f = fopen(p, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
}

static void test_lines(void)
{
    /* Lines longer than the reader's 64 KiB buffer, an empty line, and a
     * last line without '\n'. */
    strbuf sb = STRBUF_INIT;
    for (int i = 0; i < 200000; i++)
        sb_putc(&sb, (char)('a' + i % 26));
    sb_puts(&sb, "\n\nshort\nlast");
    char *p = path("lines.txt");
    write_raw(p, sb.buf, sb.len);
    io_reader *r = io_reader_open(p);
    char *line;
    size_t len;
    CHECK(r && io_read_line(r, &line, &len) == 1 && len == 200000 &&
              line[199999] == (char)('a' + 199999 % 26),
          "io: long line across buffers");
    CHECK(io_read_line(r, &line, &len) == 1 && len == 0, "io: empty line");
    CHECK(io_read_line(r, &line, &len) == 1 && strcmp(line, "short") == 0,
          "io: short line");
    CHECK(io_read_line(r, &line, &len) == 1 && strcmp(line, "last") == 0 &&
              io_reader_lineno(r) == 4,
          "io: last line without newline, line numbers");
    CHECK(io_read_line(r, &line, &len) == 0, "io: end of input");
    io_reader_close(r);

    /* The same bytes compressed read back identically. */
    size_t cap = ZSTD_compressBound(sb.len);
    char *z = malloc(cap);
    size_t zn = ZSTD_compress(z, cap, sb.buf, sb.len, 3);
    char *pz = path("lines.txt.zst");
    write_raw(pz, z, zn);
    char *data;
    size_t n;
    CHECK(io_read_file(pz, &data, &n) == 0 && n == sb.len &&
              memcmp(data, sb.buf, n) == 0,
          "io: zstd input decompressed transparently");
    free(data);
    r = io_reader_open(pz);
    int lines = 0;
    while (io_read_line(r, &line, &len) == 1)
        lines++;
    CHECK(lines == 4, "io: zstd input by lines");
    io_reader_close(r);

    /* Truncated zstd is an error, not a short read. */
    write_raw(pz, z, zn / 2);
    fprintf(stderr, "(an error message about truncation is expected)\n");
    CHECK(io_read_file(pz, &data, &n) == -1, "io: truncated zstd refused");

    /* Binary reads: exact, clean end, truncation. */
    write_raw(p, "abcdef", 6);
    r = io_reader_open(p);
    char buf[8];
    CHECK(io_read_exact(r, buf, 4, "head") == 1 && memcmp(buf, "abcd", 4) == 0,
          "io: read exact");
    CHECK(io_read_exact(r, buf, 4, "record") == -1, "io: truncation detected");
    io_reader_close(r);
    r = io_reader_open(p);
    CHECK(io_read_exact(r, buf, 6, "all") == 1 &&
              io_read_exact(r, buf, 1, "more") == 0,
          "io: clean end of input");
    io_reader_close(r);

    char *missing = path("missing");
    CHECK(io_reader_open(missing) == NULL, "io: missing file refused");
    free(missing);
    free(z);
    free(p);
    free(pz);
    sb_free(&sb);
}

static void test_writer(void)
{
    char *p = path("out.bin");
    io_writer *w = io_writer_open(p, IO_BINARY);
    io_write(w, "hello", 5);
    CHECK(!io_exists(p), "io: nothing at the target before commit");
    CHECK(io_writer_commit(w) == 0 && io_exists(p), "io: commit renames");
    char *data;
    size_t n;
    CHECK(io_read_file(p, &data, &n) == 0 && n == 5 &&
              memcmp(data, "hello", 5) == 0,
          "io: committed content");
    free(data);

    w = io_writer_open(p, IO_BINARY);
    io_write(w, "bye", 3);
    io_writer_abort(w);
    CHECK(io_read_file(p, &data, &n) == 0 && n == 5,
          "io: abort keeps the old file");
    free(data);

    /* A full disk is tested through the tools (stdout to /dev/full) in
     * tests/cli/common.sh. */
    CHECK(io_writer_open("/nonexistent-dir/x", 0) == NULL,
          "io: unwritable directory refused");

    char *d = path("outdir");
    char *tmp = io_dir_begin(d);
    char *f = io_path_join(tmp, "a");
    write_raw(f, "x", 1);
    CHECK(!io_exists(d), "io: directory invisible before commit");
    CHECK(io_dir_commit(tmp, d) == 0 && io_exists(d), "io: directory commit");
    free(f);
    free(tmp);
    tmp = io_dir_begin(d);
    f = io_path_join(tmp, "b");
    write_raw(f, "y", 1);
    CHECK(io_dir_commit(tmp, d) == 0, "io: directory replaced");
    char *fa = io_path_join(d, "a"), *fb = io_path_join(d, "b");
    CHECK(!io_exists(fa) && io_exists(fb), "io: replacement is whole");
    free(fa);
    free(fb);
    free(f);
    free(tmp);
    tmp = io_dir_begin(d);
    io_dir_abort(tmp);
    CHECK(!io_exists(tmp) && io_exists(d), "io: abort leaves the old dir");
    free(tmp);
    free(d);
    free(p);
}

int main(void)
{
    if (!mkdtemp(dir))
        return 2;
    test_lines();
    test_writer();
    io_remove_tree(dir);
    return CHECK_DONE();
}
