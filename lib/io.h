/* io.h: reading inputs and writing outputs the way every tool must.
 *
 * Input: a path, or NULL / "-" for stdin. zstd-compressed input is
 * recognised by its magic bytes (28 b5 2f fd) and decompressed on the fly,
 * so `tok data.jsonl.zst` and `zstd -dc data.jsonl.zst | tok` are the same.
 *
 * Output: a path, or NULL / "-" for stdout. A file is written under a
 * temporary name in the same directory and renamed over the target only by
 * io_writer_commit(), so a failure never leaves a half-written file. Every
 * write error (a full disk) is remembered and reported by commit, once,
 * naming the file. Committing stdout closes it and checks the close.
 *
 * All functions report errors through msg_error() and return -1 / NULL.
 */
#ifndef IO_H
#define IO_H

#include "msg.h"
#include "strbuf.h"
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct io_reader io_reader;

/* Opens path (NULL or "-" = stdin). NULL on error, message printed. */
io_reader *io_reader_open(const char *path);
/* The name used in messages: the path, or "<stdin>". */
const char *io_reader_name(const io_reader *r);
/* Reads up to n bytes, fewer only at end of input. Returns the count
 * (0 at end), or -1 on error (message printed). */
ptrdiff_t io_read(io_reader *r, void *buf, size_t n);
/* Reads exactly n bytes: 1 done, 0 clean end of input before any byte,
 * -1 error or truncation (message printed, naming `what`). */
int io_read_exact(io_reader *r, void *buf, size_t n, const char *what);
/* Reads the next line without its '\n' into a buffer the reader owns
 * (valid until the next call; NUL-terminated; may contain NULs, so use
 * *len). Returns 1 for a line, 0 at end of input, -1 on error. The last
 * line need not end in '\n'. *lineno counts lines from 1. */
int io_read_line(io_reader *r, char **line, size_t *len);
/* The number of the line most recently returned by io_read_line (from 1). */
long io_reader_lineno(const io_reader *r);
/* Closes (never stdin's descriptor) and frees. */
void io_reader_close(io_reader *r);

/* Reads the header line of one of our binary formats: JSON text padded
 * with spaces so that the line with its '\n' is a multiple of 8 bytes,
 * beginning with magic ("{\"format\":\"qlora-tokens\""). The line goes to
 * sb without its '\n'. kind names the format in messages ("token stream")
 * and writer the tool that makes it (for the hint). Refuses an empty
 * input, another magic (saying so when it is a sibling qlora format), a
 * truncated or unpadded header and one of max bytes or more. 0 ok, -1. */
int io_read_header_line(io_reader *r, const char *magic, const char *kind,
                        const char *writer, size_t max, strbuf *sb);

/* Reads a whole file (decompressed) into a malloc'ed NUL-terminated buffer. */
int io_read_file(const char *path, char **data, size_t *len);

enum {
    IO_TEXT = 0,
    IO_BINARY = 1, /* refuse to write binary data to a terminal */
};

typedef struct io_writer io_writer;

/* Opens path (NULL or "-" = stdout) for writing. NULL on error. */
io_writer *io_writer_open(const char *path, int flags);
const char *io_writer_name(const io_writer *w);
/* Buffered writes; errors are sticky and reported by commit. */
void io_write(io_writer *w, const void *buf, size_t n);
void io_printf(io_writer *w, const char *fmt, ...) MSG_PRINTF(2, 3);
/* Bytes written so far. */
uint64_t io_writer_tell(const io_writer *w);
/* Flushes, syncs, closes and renames into place. 0 ok, -1 error (the
 * temporary file is removed). Frees w either way. */
int io_writer_commit(io_writer *w);
/* Discards: removes the temporary file, frees w. For stdout, drops what
 * is still buffered (what was flushed already has gone out). */
void io_writer_abort(io_writer *w);

/* Output directories, atomically: io_dir_begin creates "<final>.tmp-<pid>"
 * and returns its path (malloc'ed); io_dir_commit renames it over final
 * (replacing an existing directory); io_dir_abort removes it. */
char *io_dir_begin(const char *final);
int io_dir_commit(const char *tmp, const char *final);
void io_dir_abort(const char *tmp);
/* Removes a file or a directory tree; 0 ok, -1 error. */
int io_remove_tree(const char *path);
/* Copies a file (for tokenizer files carried along). */
int io_copy_file(const char *from, const char *to);
/* Joins a directory and a name into a malloc'ed path. */
char *io_path_join(const char *dir, const char *name);
/* 1 when path exists (any type), else 0. */
int io_exists(const char *path);

#endif
