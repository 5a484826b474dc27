/* fuzz.h: what every libFuzzer harness in tests/fuzz shares.
 *
 * Several parsers take a path rather than bytes (they mmap, or read through
 * io_reader for transparent zstd), so a harness writes each input to a file
 * that lives for the whole process: under $FUZZ_TMPDIR when set (run.sh
 * sets it and removes it, since a crash skips the exit handler), else in
 * /dev/shm when there is one (a tmpfs: no disk traffic at thousands of
 * executions a second), else in $TMPDIR. The directory is removed at exit.
 *
 * A harness aborts (a "crash" for libFuzzer) only when the library breaks a
 * promise its header makes, never because an input is refused: refusing is
 * the expected answer to almost every input.
 */
#ifndef FUZZ_H
#define FUZZ_H

#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "msg.h"

static char fuzz_dir[256];

static void fuzz_cleanup(void)
{
    char cmd[300];
    if (fuzz_dir[0]) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir);
        if (system(cmd) != 0)
            fprintf(stderr, "fuzz: could not remove '%s'\n", fuzz_dir);
    }
}

/* The per-process scratch directory, created on first use. */
static inline const char *fuzz_tmpdir(void)
{
    if (!fuzz_dir[0]) {
        struct stat st;
        const char *base = getenv("FUZZ_TMPDIR");
        if (!base)
            base = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode)
                       ? "/dev/shm"
                       : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        snprintf(fuzz_dir, sizeof fuzz_dir, "%s/qlora-fuzz-%ld", base,
                 (long)getpid());
        if (mkdir(fuzz_dir, 0700) != 0) {
            perror(fuzz_dir);
            abort();
        }
        atexit(fuzz_cleanup);
        msg_init("fuzz");
    }
    return fuzz_dir;
}

/* Writes data[0..n) to <tmpdir>/name and returns the path (static). */
static inline const char *fuzz_write_file(const char *name, const uint8_t *data,
                                          size_t n)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", fuzz_tmpdir(), name);
    FILE *fp = fopen(path, "wb");
    if (!fp || (n && fwrite(data, 1, n, fp) != n) || fclose(fp) != 0) {
        perror(path);
        abort();
    }
    return path;
}

/* A broken promise: print it and abort, which libFuzzer reports with the
 * input that caused it. */
#define FUZZ_ASSERT(cond)                                                      \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz: %s:%d: broken promise: %s\n", __FILE__,     \
                    __LINE__, #cond);                                          \
            abort();                                                           \
        }                                                                      \
    } while (0)

#endif
