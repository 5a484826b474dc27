/* check.h: the tiny assertion layer of the unit tests.
 * Each CHECK prints "ok NAME" or "not ok NAME" (with file:line), which
 * tests/run.sh counts. */
#ifndef CHECK_H
#define CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int check_failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (cond) {                                                            \
            printf("ok ");                                                     \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
        } else {                                                               \
            printf("not ok ");                                                 \
            printf(__VA_ARGS__);                                               \
            printf(" (%s:%d: %s)\n", __FILE__, __LINE__, #cond);               \
            check_failures++;                                                  \
        }                                                                      \
        fflush(stdout);                                                        \
    } while (0)

#define SKIP(...)                                                              \
    do {                                                                       \
        printf("skip ");                                                       \
        printf(__VA_ARGS__);                                                   \
        printf("\n");                                                          \
    } while (0)

#define CHECK_DONE() (check_failures ? 1 : 0)

/* Tolerances are named where they are used, e.g. REL_TOL_F32 = 1e-5. */

/* The shared reference files, or NULL when ../shared is absent. */
static inline const char *check_shared(void)
{
    const char *s = getenv("SHARED");
    return s && *s ? s : "../shared";
}

#endif
