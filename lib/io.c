/* io.c: transparent zstd input, atomic output, checked close.
 *
 * libzstd lives here and nowhere else. Readers keep a small state machine:
 * raw bytes come from a FILE*, and when the first four bytes are the zstd
 * frame magic, everything goes through a ZSTD_DCtx. Writers go to a
 * temporary file next to the target so rename(2) is atomic.
 */
#define _POSIX_C_SOURCE 200809L
#include "io.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <zstd.h>
#if defined(__GLIBC__) || defined(__linux__)
#include <stdio_ext.h> /* __fpurge (glibc, musl) */
#define io_purge(fp) __fpurge(fp)
#elif defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__)
#define io_purge(fp) fpurge(fp)
#else
#define io_purge(fp) ((void)(fp))
#endif

struct io_reader {
    FILE *fp;
    char *name;
    int is_stdin;
    int is_zstd;
    ZSTD_DCtx *dctx;
    unsigned char *zin; /* compressed input buffer */
    ZSTD_inBuffer zib;
    size_t zin_cap;
    int zeof;              /* no more compressed bytes */
    int frame_done;        /* last decompress call finished a frame */
    unsigned char peek[4]; /* bytes read to sniff the magic */
    size_t npeek, peek_pos;
    /* line reading */
    char *lbuf;
    size_t lcap, llen; /* buffered decompressed bytes in lbuf[lpos..llen) */
    size_t lpos;
    char *line;
    size_t line_cap;
    long lineno;
    int at_eof;
};

static const unsigned char zstd_magic[4] = {0x28, 0xb5, 0x2f, 0xfd};

io_reader *io_reader_open(const char *path)
{
    io_reader *r = xcalloc(1, sizeof *r);
    if (!path || strcmp(path, "-") == 0) {
        r->fp = stdin;
        r->is_stdin = 1;
        r->name = xstrdup("<stdin>");
    } else {
        r->fp = fopen(path, "rb");
        if (!r->fp) {
            msg_error("cannot open '%s': %s", path, strerror(errno));
            free(r);
            return NULL;
        }
        struct stat st;
        if (fstat(fileno(r->fp), &st) == 0 && S_ISDIR(st.st_mode)) {
            msg_error("cannot read '%s': Is a directory", path);
            fclose(r->fp);
            free(r);
            return NULL;
        }
        r->name = xstrdup(path);
    }
    r->npeek = fread(r->peek, 1, 4, r->fp);
    if (ferror(r->fp)) {
        msg_error("cannot read '%s': %s", r->name, strerror(errno));
        io_reader_close(r);
        return NULL;
    }
    if (r->npeek == 4 && memcmp(r->peek, zstd_magic, 4) == 0) {
        r->is_zstd = 1;
        r->dctx = ZSTD_createDCtx();
        r->zin_cap = ZSTD_DStreamInSize();
        r->zin = xmalloc(r->zin_cap);
        memcpy(r->zin, r->peek, 4);
        r->zib.src = r->zin;
        r->zib.size = 4;
        r->zib.pos = 0;
        r->npeek = 0;
    }
    return r;
}

const char *io_reader_name(const io_reader *r)
{
    return r->name;
}

static ptrdiff_t raw_read(io_reader *r, unsigned char *buf, size_t n)
{
    size_t got = 0;
    while (got < n && r->peek_pos < r->npeek)
        buf[got++] = r->peek[r->peek_pos++];
    if (got < n) {
        got += fread(buf + got, 1, n - got, r->fp);
        if (ferror(r->fp))
            return msg_error("cannot read '%s': %s", r->name, strerror(errno));
    }
    return (ptrdiff_t)got;
}

static ptrdiff_t zstd_read(io_reader *r, unsigned char *buf, size_t n)
{
    ZSTD_outBuffer ob = {buf, n, 0};
    while (ob.pos < ob.size) {
        if (r->zib.pos == r->zib.size && !r->zeof) {
            size_t got = fread(r->zin, 1, r->zin_cap, r->fp);
            if (ferror(r->fp))
                return msg_error("cannot read '%s': %s", r->name,
                                 strerror(errno));
            if (got == 0)
                r->zeof = 1;
            r->zib.src = r->zin;
            r->zib.size = got;
            r->zib.pos = 0;
        }
        if (r->zib.pos == r->zib.size && r->zeof) {
            if (!r->frame_done)
                return msg_error("'%s': truncated zstd stream", r->name);
            break;
        }
        size_t before = ob.pos;
        size_t ret = ZSTD_decompressStream(r->dctx, &ob, &r->zib);
        if (ZSTD_isError(ret))
            return msg_error("'%s': corrupt zstd data: %s", r->name,
                             ZSTD_getErrorName(ret));
        r->frame_done = (ret == 0);
        if (ob.pos == before && r->zib.pos == r->zib.size && r->zeof &&
            !r->frame_done)
            return msg_error("'%s': truncated zstd stream", r->name);
    }
    return (ptrdiff_t)ob.pos;
}

static ptrdiff_t read_some(io_reader *r, void *buf, size_t n)
{
    return r->is_zstd ? zstd_read(r, buf, n) : raw_read(r, buf, n);
}

ptrdiff_t io_read(io_reader *r, void *buf, size_t n)
{
    /* Serve bytes already buffered by io_read_line first. */
    size_t got = 0;
    if (r->lpos < r->llen) {
        size_t k = r->llen - r->lpos;
        if (k > n)
            k = n;
        memcpy(buf, r->lbuf + r->lpos, k);
        r->lpos += k;
        got = k;
    }
    if (got < n) {
        ptrdiff_t k = read_some(r, (char *)buf + got, n - got);
        if (k < 0)
            return -1;
        got += (size_t)k;
    }
    return (ptrdiff_t)got;
}

int io_read_exact(io_reader *r, void *buf, size_t n, const char *what)
{
    ptrdiff_t got = io_read(r, buf, n);
    if (got < 0)
        return -1;
    if (got == 0 && n > 0)
        return 0;
    if ((size_t)got < n)
        return msg_error("'%s': truncated (in %s: %zu of %zu bytes)", r->name,
                         what, (size_t)got, n);
    return 1;
}

int io_read_line(io_reader *r, char **line, size_t *len)
{
    size_t n = 0;
    for (;;) {
        if (r->lpos == r->llen) {
            if (r->at_eof)
                break;
            if (!r->lbuf) {
                r->lcap = 1 << 16;
                r->lbuf = xmalloc(r->lcap);
            }
            ptrdiff_t k = read_some(r, r->lbuf, r->lcap);
            if (k < 0)
                return -1;
            r->lpos = 0;
            r->llen = (size_t)k;
            if (k == 0) {
                r->at_eof = 1;
                break;
            }
        }
        char *start = r->lbuf + r->lpos;
        size_t avail = r->llen - r->lpos;
        char *nl = memchr(start, '\n', avail);
        size_t take = nl ? (size_t)(nl - start) : avail;
        if (n + take + 1 > r->line_cap) {
            size_t cap = r->line_cap ? r->line_cap : 256;
            while (cap < n + take + 1)
                cap *= 2;
            r->line = xrealloc(r->line, cap);
            r->line_cap = cap;
        }
        memcpy(r->line + n, start, take);
        n += take;
        r->lpos += take;
        if (nl) {
            r->lpos++;
            r->line[n] = '\0';
            r->lineno++;
            *line = r->line;
            *len = n;
            return 1;
        }
    }
    if (n == 0)
        return 0;
    r->line[n] = '\0';
    r->lineno++;
    *line = r->line;
    *len = n;
    return 1;
}

long io_reader_lineno(const io_reader *r)
{
    return r->lineno;
}

void io_reader_close(io_reader *r)
{
    if (!r)
        return;
    if (r->fp && !r->is_stdin)
        fclose(r->fp);
    if (r->dctx)
        ZSTD_freeDCtx(r->dctx);
    free(r->zin);
    free(r->lbuf);
    free(r->line);
    free(r->name);
    free(r);
}

int io_read_header_line(io_reader *r, const char *magic, const char *kind,
                        const char *writer, size_t max, strbuf *sb)
{
    const char *name = io_reader_name(r);
    const size_t magic_len = strlen(magic);
    /* every qlora format's magic starts with this */
    const size_t family_len = sizeof "{\"format\":\"qlora-" - 1;
    char chunk[8];
    for (;;) {
        ptrdiff_t got = io_read(r, chunk, sizeof chunk);
        if (got < 0)
            return -1;
        size_t have = sb->len;
        size_t cmp = have < magic_len ? magic_len - have : 0;
        if (cmp > (size_t)got)
            cmp = (size_t)got;
        /* cmp first: past the prefix, magic + have is out of bounds */
        if (cmp && memcmp(chunk, magic + have, cmp) != 0) {
            size_t at = have;
            while (chunk[at - have] == magic[at])
                at++;
            msg_error("not a %s '%s' (%s)", kind, name,
                      at >= family_len ? "another qlora format" : "bad magic");
            msg_hint("%ss are written by %s", kind, writer);
            return -1;
        }
        if (got == 0 && have == 0)
            return msg_error("empty %s '%s'", kind, name);
        if ((size_t)got < sizeof chunk)
            return msg_error("truncated %s '%s' (in the header)", kind, name);
        char *nl = memchr(chunk, '\n', sizeof chunk);
        if (nl && nl != chunk + 7) {
            msg_error("bad %s header in '%s': not padded to 8 bytes", kind,
                      name);
            msg_hint("regenerate it with %s", writer);
            return -1;
        }
        sb_append(sb, chunk, nl ? 7 : 8);
        if (nl)
            return 0;
        if (sb->len >= max) {
            msg_error("bad %s header in '%s': too long", kind, name);
            msg_hint("regenerate it with %s", writer);
            return -1;
        }
    }
}

int io_read_file(const char *path, char **data, size_t *len)
{
    io_reader *r = io_reader_open(path);
    if (!r)
        return -1;
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (n + 1 >= cap) {
            cap *= 2;
            buf = xrealloc(buf, cap);
        }
        ptrdiff_t k = io_read(r, buf + n, cap - n - 1);
        if (k < 0) {
            free(buf);
            io_reader_close(r);
            return -1;
        }
        if (k == 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    io_reader_close(r);
    *data = buf;
    *len = n;
    return 0;
}

struct io_writer {
    FILE *fp;
    char *name;
    char *tmp; /* NULL for stdout */
    int err;   /* first errno seen, sticky */
    uint64_t written;
};

io_writer *io_writer_open(const char *path, int flags)
{
    io_writer *w = xcalloc(1, sizeof *w);
    if (!path || strcmp(path, "-") == 0) {
        if ((flags & IO_BINARY) && isatty(STDOUT_FILENO)) {
            msg_error("refusing to write binary data to a terminal");
            msg_hint("redirect standard output or use -o FILE");
            free(w);
            return NULL;
        }
        w->fp = stdout;
        w->name = xstrdup("<stdout>");
        return w;
    }
    size_t n = strlen(path) + 32;
    w->tmp = xmalloc(n);
    snprintf(w->tmp, n, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(w->tmp);
    if (fd < 0) {
        msg_error("cannot create '%s': %s", path, strerror(errno));
        free(w->tmp);
        free(w);
        return NULL;
    }
    /* mkstemp makes 0600; give the file the usual umask-governed mode. */
    mode_t um = umask(0);
    umask(um);
    fchmod(fd, 0666 & ~um);
    w->fp = fdopen(fd, "wb");
    w->name = xstrdup(path);
    return w;
}

const char *io_writer_name(const io_writer *w)
{
    return w->name;
}

void io_write(io_writer *w, const void *buf, size_t n)
{
    if (w->err || n == 0)
        return;
    if (fwrite(buf, 1, n, w->fp) != n)
        w->err = errno ? errno : EIO;
    w->written += n;
}

void io_printf(io_writer *w, const char *fmt, ...)
{
    if (w->err)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vfprintf(w->fp, fmt, ap);
    va_end(ap);
    if (n < 0)
        w->err = errno ? errno : EIO;
    else
        w->written += (uint64_t)n;
}

uint64_t io_writer_tell(const io_writer *w)
{
    return w->written;
}

static void writer_free(io_writer *w)
{
    free(w->name);
    free(w->tmp);
    free(w);
}

int io_writer_commit(io_writer *w)
{
    int err = w->err;
    if (!err && fflush(w->fp) != 0)
        err = errno ? errno : EIO;
    if (w->tmp) {
        if (!err && fsync(fileno(w->fp)) != 0 && errno != EINVAL)
            err = errno;
        if (fclose(w->fp) != 0 && !err)
            err = errno ? errno : EIO;
        if (!err && rename(w->tmp, w->name) != 0)
            err = errno;
        if (err) {
            unlink(w->tmp);
            msg_error("cannot write '%s': %s", w->name, strerror(err));
            writer_free(w);
            return -1;
        }
    } else {
        if (fclose(stdout) != 0 && !err)
            err = errno ? errno : EIO;
        if (err) {
            msg_error("cannot write to standard output: %s", strerror(err));
            writer_free(w);
            return -1;
        }
    }
    writer_free(w);
    return 0;
}

void io_writer_abort(io_writer *w)
{
    if (!w)
        return;
    if (w->tmp) {
        fclose(w->fp);
        unlink(w->tmp);
    } else {
        /* stdout cannot be taken back: drop what is still buffered (a
         * header, the first records), so that a failure early in the
         * output sends nothing; what already went out ends without its
         * trailer, which readers refuse as truncated */
        io_purge(w->fp);
    }
    writer_free(w);
}

char *io_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = xmalloc(a + b + 2);
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/')
        p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

int io_exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

char *io_dir_begin(const char *final)
{
    size_t n = strlen(final) + 32;
    char *tmp = xmalloc(n);
    snprintf(tmp, n, "%s.tmp-%ld", final, (long)getpid());
    if (io_exists(tmp))
        io_remove_tree(tmp);
    if (mkdir(tmp, 0777) != 0) {
        msg_error("cannot create directory '%s': %s", final, strerror(errno));
        free(tmp);
        return NULL;
    }
    return tmp;
}

int io_dir_commit(const char *tmp, const char *final)
{
    char *old = NULL;
    if (io_exists(final)) {
        size_t n = strlen(final) + 32;
        old = xmalloc(n);
        snprintf(old, n, "%s.old-%ld", final, (long)getpid());
        if (rename(final, old) != 0) {
            msg_error("cannot replace '%s': %s", final, strerror(errno));
            free(old);
            io_remove_tree(tmp);
            return -1;
        }
    }
    if (rename(tmp, final) != 0) {
        msg_error("cannot create '%s': %s", final, strerror(errno));
        if (old)
            rename(old, final);
        free(old);
        io_remove_tree(tmp);
        return -1;
    }
    if (old) {
        io_remove_tree(old);
        free(old);
    }
    return 0;
}

void io_dir_abort(const char *tmp)
{
    if (tmp)
        io_remove_tree(tmp);
}

int io_remove_tree(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(st.st_mode))
        return unlink(path);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char *p = io_path_join(path, e->d_name);
        if (io_remove_tree(p) != 0)
            rc = -1;
        free(p);
    }
    closedir(d);
    if (rmdir(path) != 0)
        rc = -1;
    return rc;
}

int io_copy_file(const char *from, const char *to)
{
    int in = open(from, O_RDONLY);
    if (in < 0)
        return msg_error("cannot open '%s': %s", from, strerror(errno));
    int out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (out < 0) {
        close(in);
        return msg_error("cannot create '%s': %s", to, strerror(errno));
    }
    char buf[1 << 16];
    ssize_t k;
    int rc = 0;
    while ((k = read(in, buf, sizeof buf)) > 0) {
        char *p = buf;
        while (k > 0) {
            ssize_t m = write(out, p, (size_t)k);
            if (m < 0) {
                rc = msg_error("cannot write '%s': %s", to, strerror(errno));
                goto done;
            }
            p += m;
            k -= m;
        }
    }
    if (k < 0)
        rc = msg_error("cannot read '%s': %s", from, strerror(errno));
done:
    if (close(out) != 0 && rc == 0)
        rc = msg_error("cannot write '%s': %s", to, strerror(errno));
    close(in);
    return rc;
}
