/* msg.h: the one way every tool and the library talk to the user on stderr.
 *
 * Messages are one line, prefixed with the program name set by msg_init():
 *     tok: cannot open 'x.model': No such file or directory
 * Library functions report an error with msg_error() (which returns -1 so
 * callers can write `return msg_error(...)`) and never exit; tools decide.
 */
#ifndef MSG_H
#define MSG_H

#include <stddef.h>
#include <stdio.h>

#if defined(__GNUC__)
#define MSG_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define MSG_PRINTF(a, b)
#endif

/* Verbosity: 0 quiet (-q), 1 default, 2 verbose (-v), 3 debug (-vv). */
extern int msg_verbosity;

void msg_init(const char *prog);
const char *msg_prog(void);

/* "prog: <message>" on stderr; returns -1. */
int msg_error(const char *fmt, ...) MSG_PRINTF(1, 2);
/* "prog: warning: <message>" unless quiet. */
void msg_warn(const char *fmt, ...) MSG_PRINTF(1, 2);
/* "prog: hint: <message>": how to fix or regenerate. */
void msg_hint(const char *fmt, ...) MSG_PRINTF(1, 2);
/* "prog: <message>" when msg_verbosity >= 2. */
void msg_info(const char *fmt, ...) MSG_PRINTF(1, 2);

/* For tools only (the library never calls it): message, exit status 2. */
_Noreturn void msg_usage_die(void (*usage)(FILE *), const char *fmt, ...)
    MSG_PRINTF(2, 3);
/* ^ a bad command line: the message, then usage(stderr), exit status 2. */
_Noreturn void msg_die(const char *fmt, ...) MSG_PRINTF(1, 2);

/* Allocation that never returns NULL: on failure it reports "out of memory"
 * and exits 2. The one place the library may end the process, as git's
 * xmalloc does; there is nothing sensible to return to. */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

#endif
