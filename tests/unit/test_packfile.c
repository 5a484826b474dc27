/* test_packfile.c: the packed file and the packers.
 *
 * Synthetic records (each unique by its second id, so a span can be traced
 * back to its record) are packed in both modes and checked against
 * independent computations: bfd keeps every record whole and exactly once
 * (across train and eval) and reaches the same row fill levels as a naive
 * best-fit-decreasing; concat is the chunking of the concatenation. Then
 * the file is damaged: every proper prefix, foreign and future headers,
 * trailer and checksum mismatches, and invariant violations written with a
 * valid checksum.
 *
 * The binary is also the fixture generator of tests/cli/pack.sh (so CLI
 * tests need no tokenizer):
 *   test_packfile --toks VOCAB [TOKENIZER] < records.jsonl > x.toks
 *       each line a JSON array of ids, or {"ids":[...],"completion_start":k}
 *   test_packfile --toks-dump FILE
 *       the records back as {"ids":[...],"completion_start":k or null}
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "io.h"
#include "json.h"
#include "packfile.h"
#include "tokstream.h"

static char dir[] = "/tmp/test_packfile.XXXXXX";
static char errpath[300];
static char errbuf[4096];

/* --- fixture helper modes ------------------------------------------------- */

static int make_stream(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    toks_header h = {.version = 1,
                     .vocab_size = (uint32_t)strtoul(argv[2], NULL, 10),
                     .bos_id = 1,
                     .eos_id = 2};
    snprintf(h.tokenizer, sizeof h.tokenizer, "%s", argc > 3 ? argv[3] : "");
    snprintf(h.producer, sizeof h.producer, "test_packfile");
    io_reader *r = io_reader_open(NULL);
    io_writer *w = io_writer_open(NULL, IO_BINARY);
    if (!r || !w)
        return 2;
    toks_writer *tw = toks_writer_new(w, &h);
    char *line;
    size_t len;
    uint32_t *ids = NULL;
    size_t cap = 0;
    int k;
    while ((k = io_read_line(r, &line, &len)) == 1) {
        if (len == 0)
            continue;
        json_value *v;
        if (json_parse(line, len, "<stdin>", io_reader_lineno(r), &v) < 0)
            return 2;
        const json_value *a = v->type == JSON_ARRAY ? v : json_get(v, "ids");
        uint32_t cs = TOKS_NO_COMPLETION;
        const json_value *c = json_get(v, "completion_start");
        if (c && c->type == JSON_NUMBER)
            cs = (uint32_t)c->u.number.integer;
        if (!a || a->type != JSON_ARRAY)
            return 2;
        if (a->u.array.n > cap) {
            cap = a->u.array.n * 2;
            ids = xrealloc(ids, cap * sizeof *ids);
        }
        for (size_t i = 0; i < a->u.array.n; i++)
            ids[i] = (uint32_t)a->u.array.items[i]->u.number.integer;
        toks_write_record(tw, ids, (uint32_t)a->u.array.n, cs);
        json_free(v);
    }
    toks_writer_finish(tw);
    free(ids);
    io_reader_close(r);
    return k < 0 || io_writer_commit(w) < 0 ? 2 : 0;
}

static int dump_stream(const char *path)
{
    io_reader *r = io_reader_open(path);
    toks_header h;
    toks_reader *tr = r ? toks_reader_new(r, &h) : NULL;
    if (!tr)
        return 2;
    toks_record rec = {0};
    int k;
    while ((k = toks_read_record(tr, &rec)) == 1) {
        printf("{\"ids\":[");
        for (uint32_t i = 0; i < rec.n; i++)
            printf(i ? ",%u" : "%u", rec.ids[i]);
        if (rec.completion_start == TOKS_NO_COMPLETION)
            printf("],\"completion_start\":null}\n");
        else
            printf("],\"completion_start\":%u}\n", rec.completion_start);
    }
    toks_record_free(&rec);
    toks_reader_free(tr);
    io_reader_close(r);
    return k < 0 ? 2 : 0;
}

/* --- synthetic input ------------------------------------------------------ */

static uint64_t lcg = 12345;
static uint32_t rnd(uint32_t n)
{
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)((lcg >> 33) % n);
}

#define VOCAB 5000u

/* n records with lengths in [2, maxlen]; record k is 1, 3 + k, ..., 2. */
static void make_input(pack_input *in, uint64_t n, uint32_t maxlen,
                       uint64_t seed)
{
    memset(in, 0, sizeof *in);
    lcg = seed;
    in->h = (toks_header){
        .version = 1, .vocab_size = VOCAB, .bos_id = 1, .eos_id = 2};
    in->offsets = xmalloc((n + 1) * sizeof *in->offsets);
    in->completion = xmalloc((n ? n : 1) * sizeof *in->completion);
    in->ids = xmalloc((n * maxlen + 1) * sizeof *in->ids);
    in->offsets[0] = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint32_t len = 2 + rnd(maxlen - 1);
        uint32_t *p = in->ids + in->n_tokens;
        p[0] = 1;
        p[1] = 3 + (uint32_t)k;
        for (uint32_t t = 2; t < len; t++)
            p[t] = 3 + rnd(VOCAB - 3);
        if (len > 2)
            p[len - 1] = 2;
        in->completion[k] = k % 7 == 3 ? TOKS_NO_COMPLETION : 1 + rnd(len);
        in->n_tokens += len;
        in->offsets[k + 1] = in->n_tokens;
    }
    in->n_records = n;
}

static uint32_t rlen(const pack_input *in, uint64_t k)
{
    return (uint32_t)(in->offsets[k + 1] - in->offsets[k]);
}

/* Checks the invariants of a packed result against its input: each span is
 * a whole record (or a piece of one with split/truncate) whose weights
 * follow the loss scope; padding is 0. Marks records seen in seen[] and
 * returns the number of problems. */
static int check_spans(const pack_input *in, const pack_data *d, unsigned *seen,
                       const char *what)
{
    int bad = 0;
    uint32_t L = d->h.seq_len;
    for (uint64_t r = 0; r < d->h.n_rows; r++) {
        uint32_t ns;
        const pack_span *sp = pack_row_spans(d, r, &ns);
        const uint32_t *ids = pack_row_ids(d, r);
        const uint8_t *w = pack_row_weights(d, r);
        uint32_t end = 0;
        for (uint32_t i = 0; i < ns; i++) {
            for (uint32_t t = end; t < sp[i].start; t++)
                bad += ids[t] != 0 || w[t] != 0;
            end = sp[i].start + sp[i].len;
            /* which record, and which piece of it */
            const uint32_t *s = ids + sp[i].start;
            uint64_t k;
            uint32_t from = 0;
            if (s[0] == 1) {
                k = s[1] - 3;
            } else {
                /* a split piece: find it by content */
                for (k = 0; k < in->n_records; k++) {
                    uint32_t n = rlen(in, k);
                    for (from = L; from < n; from += L)
                        if (memcmp(in->ids + in->offsets[k] + from, s,
                                   (size_t)sp[i].len * 4) == 0)
                            break;
                    if (from < n)
                        break;
                }
                if (k == in->n_records) {
                    bad++;
                    continue;
                }
            }
            uint32_t n = rlen(in, k);
            uint32_t want = n - from < L ? n - from : L;
            bad += sp[i].len != want;
            bad += memcmp(in->ids + in->offsets[k] + from, s,
                          (size_t)sp[i].len * 4) != 0;
            uint32_t cs = in->completion[k];
            for (uint32_t t = 0; t < sp[i].len; t++) {
                int wt =
                    t > 0 && (d->h.loss == PACK_LOSS_ALL ||
                              (cs == TOKS_NO_COMPLETION || from + t >= cs));
                bad += w[sp[i].start + t] != wt;
            }
            seen[k]++;
        }
        for (uint32_t t = end; t < L; t++)
            bad += ids[t] != 0 || w[t] != 0;
    }
    if (bad)
        printf("# %s: %d problems\n", what, bad);
    return bad;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Naive best-fit-decreasing on lengths: the sorted fill levels of the rows. */
static uint32_t *naive_bfd(uint32_t *lens, uint64_t n, uint32_t L,
                           uint64_t *rows)
{
    qsort(lens, n, sizeof *lens, cmp_u32);
    uint32_t *fill = xmalloc((n ? n : 1) * sizeof *fill);
    uint64_t R = 0;
    for (uint64_t i = n; i-- > 0;) {
        uint64_t best = R;
        for (uint64_t r = 0; r < R; r++)
            if (L - fill[r] >= lens[i] && (best == R || fill[r] > fill[best]))
                best = r;
        if (best == R)
            fill[R++] = 0;
        fill[best] += lens[i];
    }
    qsort(fill, R, sizeof *fill, cmp_u32);
    *rows = R;
    return fill;
}

static uint32_t *row_fills(const pack_data *d)
{
    uint32_t *fill = xcalloc(d->h.n_rows ? d->h.n_rows : 1, sizeof *fill);
    for (uint64_t r = 0; r < d->h.n_rows; r++) {
        uint32_t ns;
        const pack_span *sp = pack_row_spans(d, r, &ns);
        for (uint32_t i = 0; i < ns; i++)
            fill[r] += sp[i].len;
    }
    qsort(fill, d->h.n_rows, sizeof *fill, cmp_u32);
    return fill;
}

static void test_bfd(uint32_t L, uint64_t n, uint32_t maxlen, pack_loss loss)
{
    pack_input in;
    make_input(&in, n, maxlen, 7 + L);
    pack_opts o = {.seq_len = L,
                   .mode = PACK_MODE_BFD,
                   .loss = loss,
                   .overlong = PACK_OVERLONG_TRUNCATE,
                   .seed = 3,
                   .shuffle = 1};
    pack_data d;
    CHECK(pack_build(&in, &o, &d, NULL) == 0, "bfd L=%u n=%lu builds", L,
          (unsigned long)n);
    unsigned *seen = xcalloc(n, sizeof *seen);
    int bad = check_spans(&in, &d, seen, "bfd");
    uint64_t once = 0;
    for (uint64_t k = 0; k < n; k++)
        once += seen[k] == 1;
    CHECK(
        bad == 0 && once == n && d.h.n_docs == n &&
            d.h.n_tokens == in.n_tokens && d.h.n_spans == n,
        "bfd L=%u %s: every record whole, exactly once, weights by loss scope",
        L, pack_loss_name(loss));
    uint32_t *lens = xmalloc(n * sizeof *lens);
    for (uint64_t k = 0; k < n; k++)
        lens[k] = rlen(&in, k);
    uint64_t nr;
    uint32_t *want = naive_bfd(lens, n, L, &nr);
    uint32_t *got = row_fills(&d);
    CHECK(nr == d.h.n_rows && memcmp(want, got, nr * sizeof *want) == 0,
          "bfd L=%u: same rows and fill levels as a naive best-fit-decreasing "
          "(%lu rows)",
          L, (unsigned long)nr);
    free(want);
    free(got);
    free(lens);
    free(seen);
    pack_data_free(&d);
    pack_input_free(&in);
}

static void test_overlong(void)
{
    pack_input in;
    make_input(&in, 60, 50, 99);
    uint64_t over = 0, extra = 0;
    for (uint64_t k = 0; k < in.n_records; k++)
        if (rlen(&in, k) > 16) {
            over++;
            extra += rlen(&in, k) - 16;
        }
    pack_opts o = {.seq_len = 16,
                   .mode = PACK_MODE_BFD,
                   .loss = PACK_LOSS_ALL,
                   .overlong = PACK_OVERLONG_TRUNCATE,
                   .seed = 1,
                   .shuffle = 1};
    pack_data d;
    pack_build(&in, &o, &d, NULL);
    unsigned *seen = xcalloc(in.n_records, sizeof *seen);
    int bad = check_spans(&in, &d, seen, "truncate");
    CHECK(bad == 0 && over > 0 && d.h.n_truncated == over &&
              d.h.n_dropped == extra && d.h.n_tokens == in.n_tokens - extra &&
              d.h.n_spans == in.n_records,
          "truncate: %lu over-long records cut to the row, counted",
          (unsigned long)over);
    pack_data_free(&d);
    o.overlong = PACK_OVERLONG_SPLIT;
    pack_build(&in, &o, &d, NULL);
    memset(seen, 0, in.n_records * sizeof *seen);
    bad = check_spans(&in, &d, seen, "split");
    uint64_t pieces = 0;
    for (uint64_t k = 0; k < in.n_records; k++)
        pieces += (rlen(&in, k) + 15) / 16;
    CHECK(bad == 0 && d.h.n_split == over && d.h.n_dropped == 0 &&
              d.h.n_tokens == in.n_tokens && d.h.n_spans == pieces,
          "split: every token kept, %lu pieces", (unsigned long)pieces);
    free(seen);
    pack_data_free(&d);
    pack_input_free(&in);
}

static void test_concat(void)
{
    pack_input in;
    make_input(&in, 200, 40, 5);
    uint32_t L = 64;
    pack_opts o = {.seq_len = L,
                   .mode = PACK_MODE_CONCAT,
                   .loss = PACK_LOSS_COMPLETION,
                   .seed = 9,
                   .shuffle = 0};
    pack_data d;
    pack_build(&in, &o, &d, NULL);
    uint64_t R = in.n_tokens / L;
    /* weights of the concatenation, computed independently */
    uint8_t *w = xmalloc(in.n_tokens);
    for (uint64_t k = 0; k < in.n_records; k++)
        for (uint32_t t = 0; t < rlen(&in, k); t++)
            w[in.offsets[k] + t] =
                in.completion[k] == TOKS_NO_COMPLETION || t >= in.completion[k];
    for (uint64_t r = 0; r < R; r++)
        w[r * L] = 0;
    int same = d.h.n_rows == R && d.h.n_spans == R &&
               memcmp(d.ids, in.ids, R * L * 4) == 0 &&
               memcmp(d.weights, w, R * L) == 0;
    for (uint64_t r = 0; r < R && same; r++)
        same =
            d.row_spans[r] == r && d.spans[r].start == 0 && d.spans[r].len == L;
    CHECK(same,
          "concat: rows are the chunking of the concatenation, one span each");
    CHECK(d.h.n_dropped == in.n_tokens % L && d.h.n_tokens == R * L,
          "concat: the last partial row (%lu tokens) is dropped",
          (unsigned long)(in.n_tokens % L));
    /* shuffled: a permutation of the same rows */
    o.shuffle = 1;
    pack_data s;
    pack_build(&in, &o, &s, NULL);
    int perm = s.h.n_rows == R, moved = 0;
    unsigned char *used = xcalloc(R ? R : 1, 1);
    for (uint64_t r = 0; r < R && perm; r++) {
        uint64_t q;
        for (q = 0; q < R; q++)
            if (!used[q] &&
                memcmp(pack_row_ids(&s, r), pack_row_ids(&d, q), L * 4) == 0 &&
                memcmp(pack_row_weights(&s, r), pack_row_weights(&d, q), L) ==
                    0)
                break;
        perm = q < R;
        if (perm) {
            used[q] = 1;
            moved += q != r;
        }
    }
    CHECK(perm && moved > 0, "concat shuffled: a permutation of the same rows");
    free(used);
    free(w);
    pack_data_free(&s);
    pack_data_free(&d);
    pack_input_free(&in);
}

static void test_eval_split(void)
{
    pack_input in;
    make_input(&in, 300, 30, 11);
    pack_opts o = {.seq_len = 32,
                   .mode = PACK_MODE_BFD,
                   .loss = PACK_LOSS_ALL,
                   .seed = 4,
                   .shuffle = 1,
                   .eval_fraction = 0.1};
    pack_data t, e;
    CHECK(pack_build(&in, &o, &t, &e) == 0, "eval split builds");
    unsigned *seen = xcalloc(in.n_records, sizeof *seen);
    int bad = check_spans(&in, &t, seen, "train") +
              check_spans(&in, &e, seen, "eval");
    uint64_t once = 0;
    for (uint64_t k = 0; k < in.n_records; k++)
        once += seen[k] == 1;
    CHECK(bad == 0 && once == in.n_records && e.h.n_docs == 30 &&
              t.h.n_docs == 270 && e.h.is_eval && !t.h.is_eval,
          "eval split: 30 of 300 records held out, every record exactly once");
    pack_data t2, e2;
    o.seed = 5;
    pack_build(&in, &o, &t2, &e2);
    CHECK(e2.h.n_rows != e.h.n_rows ||
              memcmp(e2.ids, e.ids, e.h.n_rows * 32 * 4) != 0,
          "another seed holds out other records");
    free(seen);
    pack_data_free(&t);
    pack_data_free(&e);
    pack_data_free(&t2);
    pack_data_free(&e2);
    pack_input_free(&in);
}

/* --- files ---------------------------------------------------------------- */

static char *tmp_path(const char *name)
{
    char *s = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(s, "%s/%s", dir, name);
    return s;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0)
        exit(2);
}

static int write_pack(const char *path, const pack_data *d)
{
    io_writer *w = io_writer_open(path, IO_BINARY);
    pack_write(w, d);
    return io_writer_commit(w);
}

/* pack_read with stderr captured into errbuf. */
static int read_quiet(const char *path, pack_data *d)
{
    fflush(stderr);
    int saved = dup(2);
    FILE *cap = fopen(errpath, "w+");
    dup2(fileno(cap), 2);
    int rc = pack_read(path, d);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(cap);
    size_t k = fread(errbuf, 1, sizeof errbuf - 1, cap);
    errbuf[k] = '\0';
    fclose(cap);
    return rc;
}

static void small_pack(pack_data *d, pack_input *in)
{
    make_input(in, 9, 7, 21);
    pack_opts o = {.seq_len = 8,
                   .mode = PACK_MODE_BFD,
                   .loss = PACK_LOSS_COMPLETION,
                   .seed = 2,
                   .shuffle = 1};
    pack_build(in, &o, d, NULL);
}

static void test_file_round_trip(void)
{
    pack_input in;
    pack_data d, r;
    small_pack(&d, &in);
    char *p = tmp_path("a.pack"), *q = tmp_path("b.pack");
    CHECK(write_pack(p, &d) == 0 && read_quiet(p, &r) == 0,
          "write and read back");
    int same = memcmp(&r.h, &d.h, offsetof(pack_header, producer)) == 0 &&
               strcmp(r.h.producer, d.h.producer) == 0 &&
               memcmp(r.ids, d.ids, d.h.n_rows * 8 * 4) == 0 &&
               memcmp(r.weights, d.weights, d.h.n_rows * 8) == 0 &&
               memcmp(r.row_spans, d.row_spans, (d.h.n_rows + 1) * 8) == 0 &&
               memcmp(r.spans, d.spans, d.h.n_spans * 8) == 0;
    CHECK(same, "header, ids, weights and spans round-trip");
    /* determinism: build again, same bytes */
    pack_data d2;
    pack_input in2;
    small_pack(&d2, &in2);
    write_pack(q, &d2);
    pack_data_free(&d2);
    char *a, *b;
    size_t na, nb;
    io_read_file(p, &a, &na);
    io_read_file(q, &b, &nb);
    CHECK(na == nb && memcmp(a, b, na) == 0, "same input and seed: same bytes");
    char *nl = memchr(a, '\n', na);
    CHECK(nl && (nl - a + 1) % 8 == 0 &&
              strncmp(a, "{\"format\":\"qlora-packed\",", 25) == 0,
          "header line begins with the magic and is padded to 8");
    strbuf sb = STRBUF_INIT;
    pack_dump_row(&r, 0, &sb);
    json_value *v = NULL;
    CHECK(json_parse(sb.buf, sb.len, "dump", 1, &v) == 0 &&
              json_get(v, "ids")->u.array.n == 8 &&
              json_get(v, "weights")->u.array.n == 8,
          "a dumped row is JSON with 8 ids and 8 weights");
    json_free(v);
    sb_reset(&sb);
    pack_stats_json(&r.h, &sb);
    CHECK(json_parse(sb.buf, sb.len, "stats", 1, &v) == 0 &&
              json_get_int(v, "rows", -1) == (int64_t)r.h.n_rows &&
              json_get_number(v, "efficiency", -1) > 0.5,
          "stats JSON: %s", sb_str(&sb));
    json_free(v);
    sb_free(&sb);

    /* every proper prefix is refused */
    size_t accepted = 0;
    char *cut = tmp_path("cut.pack");
    for (size_t k = 0; k < na; k++) {
        write_bytes(cut, a, k);
        pack_data x;
        if (read_quiet(cut, &x) == 0) {
            accepted++;
            pack_data_free(&x);
        }
    }
    CHECK(accepted == 0, "every proper prefix (%zu) is refused", na);
    write_bytes(cut, a, na - 5);
    read_quiet(cut, &d2);
    CHECK(strstr(errbuf, "truncated packed file") != NULL,
          "truncation is named: %.*s", (int)strcspn(errbuf, "\n"), errbuf);
    /* trailing data, a flipped weight, trailer counts */
    char *m = malloc(na + 1);
    memcpy(m, a, na);
    m[na] = 0;
    write_bytes(cut, m, na + 1);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "after the trailer"),
          "data after the trailer is refused");
    size_t hl = (size_t)(nl - a) + 1;
    m[hl + d.h.n_rows * 8 * 4 + 1] ^= 1;
    write_bytes(cut, m, na);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "checksum"),
          "a flipped weight fails the checksum");
    memcpy(m, a, na);
    m[na - 24] ^= 1;
    write_bytes(cut, m, na);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "trailer says"),
          "a trailer row count mismatch is refused");
    free(m);
    free(a);
    free(b);

    /* a future version, a token stream, garbage */
    const char *v2 = "{\"format\":\"qlora-packed\",\"version\":2}  \n";
    write_bytes(cut, v2, strlen(v2));
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "version 2") &&
              strstr(errbuf, "hint: regenerate it with pack"),
          "a future version is refused with a hint");
    const char *tk =
        "{\"format\":\"qlora-tokens\",\"version\":1,\"vocab_size\":9}     \n";
    write_bytes(cut, tk, strlen(tk));
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "another qlora format"),
          "a token stream is not a packed file");
    write_bytes(cut,
                "\x7f"
                "ELF\2\1\1\0\0\0\0\0\0\0\0\0",
                16);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "bad magic"), "bad magic");

    /* invariant violations with a valid checksum */
    uint32_t ns;
    const pack_span *sp = pack_row_spans(&d, 0, &ns);
    d.weights[sp[0].start] = 1;
    write_pack(cut, &d);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "weight"),
          "weight 1 at a span start is refused");
    d.weights[sp[0].start] = 0;
    uint32_t saved = d.ids[0];
    d.ids[0] = VOCAB;
    write_pack(cut, &d);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "not below vocab_size"),
          "an id outside the vocabulary is refused");
    d.ids[0] = saved;
    if (d.h.n_spans > 1) {
        pack_span keep = d.spans[0];
        d.spans[0].len = 9;
        write_pack(cut, &d);
        CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "span"),
              "a span beyond the row is refused");
        d.spans[0] = keep;
    }
    d.h.n_tokens++;
    write_pack(cut, &d);
    CHECK(read_quiet(cut, &d2) < 0 && strstr(errbuf, "header says"),
          "a header token count mismatch is refused");
    d.h.n_tokens--;

    free(cut);
    free(p);
    free(q);
    pack_data_free(&d);
    pack_data_free(&d2);
    pack_data_free(&r);
    pack_input_free(&in);
    pack_input_free(&in2);
}

static void test_input_vocab(void)
{
    char *p1 = tmp_path("v1.toks"), *p2 = tmp_path("v2.toks");
    const uint32_t ids[] = {1, 5, 2};
    for (int i = 0; i < 2; i++) {
        toks_header h = {.version = 1,
                         .vocab_size = i ? 600 : 500,
                         .bos_id = 1,
                         .eos_id = 2};
        io_writer *w = io_writer_open(i ? p2 : p1, IO_BINARY);
        toks_writer *tw = toks_writer_new(w, &h);
        toks_write_record(tw, ids, 3, 1);
        toks_writer_finish(tw);
        io_writer_commit(w);
    }
    pack_input in = {0};
    CHECK(pack_input_read(&in, p1, 0) == 0 && in.n_records == 1 &&
              in.n_tokens == 3,
          "pack_input_read reads a stream");
    CHECK(pack_input_read(&in, p1, 0) == 0 && in.n_records == 2 &&
              in.offsets[2] == 6,
          "a second stream of the same vocabulary appends");
    fflush(stderr);
    int saved = dup(2);
    FILE *cap = fopen(errpath, "w+");
    dup2(fileno(cap), 2);
    int rc1 = pack_input_read(&in, p2, 0);
    pack_input in2 = {0};
    int rc2 = pack_input_read(&in2, p1, 32000);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(cap);
    size_t k = fread(errbuf, 1, sizeof errbuf - 1, cap);
    errbuf[k] = '\0';
    fclose(cap);
    CHECK(rc1 < 0 && strstr(errbuf, "another vocabulary"),
          "a stream of another vocabulary is refused");
    CHECK(rc2 < 0 && strstr(errbuf, "not 32000 (--vocab)"),
          "--vocab mismatch is refused");
    pack_input_free(&in);
    pack_input_free(&in2);
    free(p1);
    free(p2);
}

int main(int argc, char **argv)
{
    msg_init("test_packfile");
    if (argc > 1 && strcmp(argv[1], "--toks") == 0)
        return make_stream(argc, argv);
    if (argc > 2 && strcmp(argv[1], "--toks-dump") == 0)
        return dump_stream(argv[2]);
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(errpath, sizeof errpath, "%s/stderr", dir);
    test_bfd(64, 500, 60, PACK_LOSS_COMPLETION);
    test_bfd(64, 500, 64, PACK_LOSS_ALL);
    test_bfd(5000, 400, 3000,
             PACK_LOSS_COMPLETION); /* crosses a summary word */
    test_bfd(2048, 3000, 700, PACK_LOSS_ALL);
    test_overlong();
    test_concat();
    test_eval_split();
    test_file_round_trip();
    test_input_vocab();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        return 2;
    return CHECK_DONE();
}
