/* test_tokstream.c: the token stream reader and writer.
 *
 * Streams are written to temporary files with the real writer, then
 * damaged byte by byte: every proper prefix of a valid stream must be
 * refused, as must a foreign magic, a future version, a trailer whose
 * counts disagree, an id outside the vocabulary and a completion index
 * past the record. stderr is captured so the messages can be checked.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "io.h"
#include "tokstream.h"

static char dir[] = "/tmp/test_tokstream.XXXXXX";
static char errbuf[4096];
static char *errpath;

/* Each name gets its own buffer, kept for the whole run (few names). */
static char *path_in_dir(const char *name)
{
    char *s = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(s, "%s/%s", dir, name);
    return s;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

static char *read_bytes(const char *path, size_t *n)
{
    char *data;
    if (io_read_file(path, &data, n) < 0)
        exit(2);
    return data;
}

static const uint32_t rec0[] = {1, 5, 6, 7, 2};
static const uint32_t rec1[] = {1, 9};
static const uint32_t rec2[] = {1, 3, 4, 8, 99, 2};

static void write_sample(const char *path, const char *producer)
{
    toks_header h = {.version = 1, .vocab_size = 100, .bos_id = 1, .eos_id = 2};
    snprintf(h.tokenizer, sizeof h.tokenizer, "0123456789abcdef");
    snprintf(h.producer, sizeof h.producer, "%s", producer);
    io_writer *w = io_writer_open(path, IO_BINARY);
    toks_writer *tw = toks_writer_new(w, &h);
    toks_write_record(tw, rec0, 5, 3);
    toks_write_record(tw, rec1, 2, TOKS_NO_COMPLETION);
    toks_write_record(tw, NULL, 0, TOKS_NO_COMPLETION);
    toks_write_record(tw, rec2, 6, 6);
    toks_writer_finish(tw);
    if (io_writer_commit(w) < 0)
        exit(2);
}

/* Reads a whole stream; returns the records read or -1 on a refusal, with
 * stderr captured into errbuf. */
static long read_stream(const char *path, toks_header *h)
{
    fflush(stderr);
    int saved = dup(2);
    FILE *cap = fopen(errpath, "w+");
    dup2(fileno(cap), 2);
    long n = -1;
    io_reader *r = io_reader_open(path);
    toks_header tmp;
    toks_reader *tr = r ? toks_reader_new(r, h ? h : &tmp) : NULL;
    if (tr) {
        toks_record rec = {0};
        int rc;
        while ((rc = toks_read_record(tr, &rec)) == 1)
            ;
        if (rc == 0)
            n = (long)toks_reader_records(tr);
        toks_record_free(&rec);
        toks_reader_free(tr);
    }
    io_reader_close(r);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(cap);
    size_t k = fread(errbuf, 1, sizeof errbuf - 1, cap);
    errbuf[k] = '\0';
    fclose(cap);
    return n;
}

static void test_round_trip(void)
{
    char *p = path_in_dir("good.toks");
    write_sample(p, "test 1");
    size_t n;
    char *data = read_bytes(p, &n);
    char *nl = memchr(data, '\n', n);
    size_t hlen = nl ? (size_t)(nl - data) + 1 : 0;
    CHECK(hlen > 0 && hlen % 8 == 0,
          "header line is a multiple of 8 bytes (%zu)", hlen);
    CHECK(strncmp(data, "{\"format\":\"qlora-tokens\",\"version\":1,", 37) == 0,
          "header begins with the magic");
    CHECK(n == hlen + (8 + 20) + (8 + 8) + 8 + (8 + 24) + 24,
          "stream size is header + records + trailer (%zu)", n);
    uint32_t *tail = (uint32_t *)(data + n - 24);
    uint64_t counts[2];
    memcpy(counts, data + n - 16, sizeof counts);
    CHECK(tail[0] == 0xffffffffu && tail[1] == 0x444e4554u && counts[0] == 4 &&
              counts[1] == 13,
          "trailer holds the mark, TEND and the counts");
    free(data);

    io_reader *r = io_reader_open(p);
    toks_header h;
    toks_reader *tr = toks_reader_new(r, &h);
    CHECK(tr != NULL, "reader accepts the header");
    if (!tr)
        return;
    CHECK(h.version == 1 && h.vocab_size == 100 && h.bos_id == 1 &&
              h.eos_id == 2 && strcmp(h.tokenizer, "0123456789abcdef") == 0 &&
              strcmp(h.producer, "test 1") == 0,
          "header fields round-trip");
    toks_record rec = {0};
    int ok = 1;
    const uint32_t *want[] = {rec0, rec1, NULL, rec2};
    const uint32_t wn[] = {5, 2, 0, 6},
                   wc[] = {3, TOKS_NO_COMPLETION, TOKS_NO_COMPLETION, 6};
    for (int i = 0; i < 4; i++) {
        if (toks_read_record(tr, &rec) != 1 || rec.n != wn[i] ||
            rec.completion_start != wc[i] ||
            (wn[i] && memcmp(rec.ids, want[i], wn[i] * 4) != 0))
            ok = 0;
    }
    CHECK(ok, "records round-trip (ids, completion_start, empty record)");
    CHECK(toks_read_record(tr, &rec) == 0,
          "trailer read after the last record");
    CHECK(toks_reader_records(tr) == 4, "reader counts 4 records");
    CHECK(toks_read_record(tr, &rec) == 0,
          "reading past the trailer stays at 0");
    toks_record_free(&rec);
    toks_reader_free(tr);
    io_reader_close(r);
    free(p);

    /* A producer string that needs escaping still gives valid JSON. */
    p = path_in_dir("quote.toks");
    write_sample(p, "a \"quoted\"\\ name");
    CHECK(read_stream(p, &h) == 4 &&
              strcmp(h.producer, "a \"quoted\"\\ name") == 0,
          "escaped producer round-trips");
    free(p);
}

static void test_truncation(void)
{
    char *p = path_in_dir("good.toks");
    write_sample(p, "test 1");
    size_t n;
    char *data = read_bytes(p, &n);
    char *q = path_in_dir("cut.toks");
    size_t accepted = 0, bad_msg = 0;
    for (size_t k = 0; k < n; k++) {
        write_bytes(q, data, k);
        if (read_stream(q, NULL) >= 0)
            accepted++;
        else if (!strstr(errbuf, "truncated") && !strstr(errbuf, "empty") &&
                 !strstr(errbuf, "bad magic") && !strstr(errbuf, "header"))
            bad_msg++;
    }
    CHECK(accepted == 0, "every proper prefix (%zu of them) is refused", n);
    CHECK(bad_msg == 0, "refusals name truncation (%zu do not)", bad_msg);
    write_bytes(q, data, 100 < n ? 100 : n);
    read_stream(q, NULL);
    CHECK(strstr(errbuf, "truncated token stream") &&
              strchr(errbuf, '\n') == errbuf + strlen(errbuf) - 1,
          "a cut in the records is one line: %.*s", (int)strcspn(errbuf, "\n"),
          errbuf);
    write_bytes(q, data, n);
    CHECK(read_stream(q, NULL) == 4, "the whole stream is accepted");
    /* Trailing garbage is refused too. */
    char *more = malloc(n + 1);
    memcpy(more, data, n);
    more[n] = 'x';
    write_bytes(q, more, n + 1);
    CHECK(read_stream(q, NULL) < 0 && strstr(errbuf, "after the trailer"),
          "data after the trailer is refused");
    free(more);
    free(data);
    free(p);
    free(q);
}

static void test_bad_headers(void)
{
    char *q = path_in_dir("bad.toks");
    const char *zip = "PK\003\004\024\000\000\000\010\000binary garbage\n";
    write_bytes(q, zip, strlen(zip));
    CHECK(read_stream(q, NULL) < 0 && strstr(errbuf, "bad magic"),
          "a foreign file is refused as bad magic");
    const char *jsonl = "{\"prompt\":\"hello\",\"completion\":\"x\"}\n";
    write_bytes(q, jsonl, strlen(jsonl));
    CHECK(read_stream(q, NULL) < 0 && strstr(errbuf, "bad magic"),
          "JSON Lines text is refused as bad magic");

    /* A well-formed header of version 2. */
    char hdr[64];
    int k = snprintf(
        hdr, sizeof hdr,
        "{\"format\":\"qlora-tokens\",\"version\":2,\"vocab_size\":10}");
    while ((k + 1) % 8)
        hdr[k++] = ' ';
    hdr[k++] = '\n';
    write_bytes(q, hdr, (size_t)k);
    CHECK(read_stream(q, NULL) < 0 && strstr(errbuf, "version 2") &&
              strstr(errbuf, "hint: regenerate with tok"),
          "a future version is refused with a hint: %.*s",
          (int)strcspn(errbuf, "\n"), errbuf);

    const char *unpadded =
        "{\"format\":\"qlora-tokens\",\"version\":1,\"vocab_size\":10}\n";
    write_bytes(q, unpadded, strlen(unpadded));
    CHECK(read_stream(q, NULL) < 0, "an unpadded header is refused");
    k = snprintf(hdr, sizeof hdr,
                 "{\"format\":\"qlora-tokens\",\"version\":1}");
    while ((k + 1) % 8)
        hdr[k++] = ' ';
    hdr[k++] = '\n';
    write_bytes(q, hdr, (size_t)k);
    CHECK(read_stream(q, NULL) < 0 && strstr(errbuf, "vocab_size"),
          "a header without vocab_size is refused");
    free(q);
}

static void patch_and_read(const char *data, size_t n, size_t off, uint32_t v,
                           const char *want, const char *name)
{
    char *copy = malloc(n);
    memcpy(copy, data, n);
    memcpy(copy + off, &v, 4);
    char *q = path_in_dir("patched.toks");
    write_bytes(q, copy, n);
    long got = read_stream(q, NULL);
    CHECK(got < 0 && strstr(errbuf, want), "%s: %.*s", name,
          (int)strcspn(errbuf, "\n"), errbuf);
    free(copy);
    free(q);
}

static void test_corrupt_records(void)
{
    char *p = path_in_dir("good.toks");
    write_sample(p, "test 1");
    size_t n;
    char *data = read_bytes(p, &n);
    size_t hlen = (size_t)((char *)memchr(data, '\n', n) - data) + 1;
    patch_and_read(data, n, n - 16, 5, "trailer says 5 records",
                   "trailer record count mismatch");
    patch_and_read(data, n, n - 8, 12, "12 tokens",
                   "trailer token count mismatch");
    patch_and_read(data, n, n - 20, 0x12345678, "bad trailer mark",
                   "bad trailer magic");
    patch_and_read(data, n, hlen + 8 + 4, 100, "not below vocab_size 100",
                   "id equal to vocab_size");
    patch_and_read(data, n, hlen + 4, 6, "completion_start 6 > 5",
                   "completion_start past the record");
    patch_and_read(data, n, hlen, 0x7fffffff, "claims", "absurd record length");
    free(data);
    free(p);
}

static void test_fingerprint(void)
{
    char fp[17];
    toks_fingerprint("", 0, fp);
    CHECK(strcmp(fp, "cbf29ce484222325") == 0, "fnv1a64 of nothing");
    toks_fingerprint("a", 1, fp);
    CHECK(strcmp(fp, "af63dc4c8601ec8c") == 0, "fnv1a64 of 'a'");
}

int main(void)
{
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    msg_init("test_tokstream");
    errpath = path_in_dir("stderr");
    test_round_trip();
    test_truncation();
    test_bad_headers();
    test_corrupt_records();
    test_fingerprint();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    free(errpath);
    if (system(cmd) != 0)
        return 2;
    return CHECK_DONE();
}
