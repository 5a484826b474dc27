/* strbuf.h: a growable byte buffer, always NUL-terminated. */
#ifndef STRBUF_H
#define STRBUF_H

#include "msg.h"
#include <stddef.h>

typedef struct strbuf {
    char *buf; /* NUL-terminated; NULL until the first append */
    size_t len;
    size_t cap;
} strbuf;

#define STRBUF_INIT                                                            \
    {                                                                          \
        NULL, 0, 0                                                             \
    }

void sb_grow(strbuf *sb, size_t extra);
void sb_append(strbuf *sb, const void *data, size_t n);
void sb_puts(strbuf *sb, const char *s);
void sb_putc(strbuf *sb, char c);
void sb_printf(strbuf *sb, const char *fmt, ...) MSG_PRINTF(2, 3);
void sb_reset(strbuf *sb); /* length 0, memory kept */
void sb_free(strbuf *sb);
/* The contents ("" when empty); valid until the next append. */
const char *sb_str(const strbuf *sb);

#endif
