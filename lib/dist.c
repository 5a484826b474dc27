/* dist.c: the host side of data-parallel training (see dist.h): the job's
 * shape from the environment, the unique id's exchange over TCP or a
 * file, the launcher of `lora-train --gpus N`, sharding, and NCCL loaded
 * with dlopen.
 *
 * The exchange is deliberately tiny: 128 bytes from rank 0 to everyone,
 * once, before NCCL's own bootstrap takes over (ncclCommInitRank connects
 * the ranks through the address inside the id). Every wait is bounded by
 * a deadline, so a missing rank ends in an error naming what was waited
 * for, never in a hang.
 */
#define _POSIX_C_SOURCE 200809L
#include "dist.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "msg.h"

static const char magic[8] = {'Q', 'L', 'D', 'I', 'S', 'T', '0', '1'};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* ---- the environment ----------------------------------------------------- */

/* *out = the variable as an integer in [lo, hi], def when unset. */
static int env_int(const char *name, long def, long lo, long hi, int *out)
{
    const char *v = getenv(name);
    if (!v || !*v) {
        *out = (int)def;
        return 0;
    }
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return msg_error("%s='%s': expected an integer in %ld..%ld", name, v,
                         lo, hi);
    *out = (int)x;
    return 0;
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

int dist_env_read(dist_env *e)
{
    memset(e, 0, sizeof *e);
    if (env_int("WORLD_SIZE", 1, 1, 65536, &e->world) != 0 ||
        env_int("RANK", 0, 0, e->world - 1, &e->rank) != 0 ||
        env_int("LOCAL_RANK", e->rank, 0, 65535, &e->local_rank) != 0 ||
        env_int("MASTER_PORT", 29500, 1, 65535, &e->master_port) != 0 ||
        env_int("QLORA_DIST_PORT", e->master_port, 1, 65535, &e->master_port) !=
            0)
        return -1;
    int t;
    if (env_int("QLORA_DIST_TIMEOUT", 300, 1, 86400, &t) != 0)
        return -1;
    e->timeout_s = t;
    const char *v = getenv("QLORA_DIST_LAUNCHED");
    e->launched = v && strcmp(v, "1") == 0;
    v = getenv("MASTER_ADDR");
    e->master_addr = v && *v ? v : NULL;
    v = getenv("QLORA_NCCL_ID_FILE");
    e->id_file = v && *v ? v : NULL;
    const char *ids[] = {"QLORA_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"};
    for (size_t i = 0; i < sizeof ids / sizeof *ids && !e->tag; i++)
        if ((v = getenv(ids[i])) && *v)
            e->tag = fnv1a(v);
    if (e->world > 1 && !e->master_addr && !e->id_file)
        return msg_error("WORLD_SIZE=%d: set MASTER_ADDR (and MASTER_PORT) or "
                         "QLORA_NCCL_ID_FILE so the ranks can find each other",
                         e->world);
    return 0;
}

int dist_share_id(const dist_env *e, unsigned char id[DIST_ID_BYTES])
{
    if (e->world <= 1)
        return 0;
    if (e->id_file)
        return e->rank == 0
                   ? dist_file_publish(e->id_file, e->world, e->tag, id)
                   : dist_file_fetch(e->id_file, e->world, e->tag, id,
                                     e->timeout_s);
    return e->rank == 0 ? dist_tcp_serve(e->master_addr, e->master_port,
                                         e->world, id, e->timeout_s)
                        : dist_tcp_fetch(e->master_addr, e->master_port,
                                         e->world, e->rank, id, e->timeout_s);
}

/* ---- TCP ----------------------------------------------------------------- */

/* Hello (rank -> rank 0): magic, world, rank. Reply: magic, world, status
 * (0 ok, 1 other job size), the id. Little-endian. */
enum { HELLO_BYTES = 16, REPLY_BYTES = 16 + DIST_ID_BYTES };

static int resolve(const char *addr, int port, int passive,
                   struct addrinfo **res)
{
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(addr, ps, &hints, res);
    if (rc != 0) {
        msg_error("cannot resolve MASTER_ADDR '%s': %s", addr,
                  gai_strerror(rc));
        return -1;
    }
    return 0;
}

static int remaining_ms(double deadline)
{
    double r = deadline - now_s();
    return r <= 0 ? 0 : r > 1e6 ? 1000000000 : (int)(r * 1000) + 1;
}

/* All n bytes through a non-blocking socket before the deadline. 0 ok,
 * -1 with errno (ETIMEDOUT, or ECONNRESET for a peer that closed). */
static int sock_io(int fd, void *buf, size_t n, int writing, double deadline)
{
    unsigned char *p = buf;
    while (n > 0) {
        struct pollfd pf = {fd, (short)(writing ? POLLOUT : POLLIN), 0};
        int pr = poll(&pf, 1, remaining_ms(deadline));
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr < 0)
            return -1;
        if (pr == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k < 0 &&
            (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (k < 0)
            return -1;
        if (k == 0) {
            errno = ECONNRESET;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void set_nonblocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int dist_tcp_serve(const char *addr, int port, int world,
                   const unsigned char id[DIST_ID_BYTES], double timeout_s)
{
    struct addrinfo *res, *ai;
    if (resolve(addr, port, 1, &res) != 0)
        return -1;
    int lfd = -1, err = 0;
    for (ai = res; ai && lfd < 0; ai = ai->ai_next) {
        lfd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                     ai->ai_protocol);
        if (lfd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(lfd, ai->ai_addr, ai->ai_addrlen) != 0 ||
            listen(lfd, 128) != 0) {
            err = errno;
            close(lfd);
            lfd = -1;
        }
    }
    freeaddrinfo(res);
    if (lfd < 0)
        return msg_error(
            "cannot listen on MASTER_ADDR:MASTER_PORT %s:%d: %s (it must "
            "be an address of rank 0's host; under torchrun, whose store holds "
            "MASTER_PORT, "
            "set QLORA_DIST_PORT)",
            addr, port, strerror(err));
    set_nonblocking(lfd);
    unsigned char *seen = xcalloc((size_t)world, 1);
    int joined = 0, rc = 0;
    double deadline = now_s() + timeout_s;
    while (joined < world - 1) {
        struct pollfd pf = {lfd, POLLIN, 0};
        int pr = poll(&pf, 1, remaining_ms(deadline));
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0) {
            rc = msg_error("only %d of the other %d ranks reached rank 0 at "
                           "%s:%d within %.0f s",
                           joined, world - 1, addr, port, timeout_s);
            break;
        }
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        set_nonblocking(fd);
        unsigned char hello[HELLO_BYTES], reply[REPLY_BYTES];
        /* a peer gets a few seconds to say hello, within the deadline */
        double d = now_s() + 10 < deadline ? now_s() + 10 : deadline;
        if (sock_io(fd, hello, sizeof hello, 0, d) != 0 ||
            memcmp(hello, magic, sizeof magic) != 0) {
            close(fd); /* not one of ours */
            continue;
        }
        uint32_t w = get_u32(hello + 8), r = get_u32(hello + 12);
        memcpy(reply, magic, sizeof magic);
        put_u32(reply + 8, (uint32_t)world);
        put_u32(reply + 12, w != (uint32_t)world);
        memcpy(reply + 16, id, DIST_ID_BYTES);
        int sent = sock_io(fd, reply, sizeof reply, 1, d) == 0;
        close(fd);
        if (w != (uint32_t)world) {
            rc = msg_error(
                "rank %u of a job of %u ranks reached rank 0 at %s:%d, "
                "whose job has %d",
                r, w, addr, port, world);
            break;
        }
        if (sent && r >= 1 && r < (uint32_t)world && !seen[r]) {
            seen[r] = 1;
            joined++;
        }
    }
    free(seen);
    close(lfd);
    return rc;
}

/* A connected non-blocking socket to addr:port, or -1 (errno set). */
static int connect_once(const char *addr, int port, double deadline)
{
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    if (getaddrinfo(addr, ps, &hints, &res) != 0) {
        errno = EHOSTUNREACH;
        return -1;
    }
    int fd = -1, err = ECONNREFUSED;
    for (ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        set_nonblocking(fd);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        if (errno == EINPROGRESS) {
            struct pollfd pf = {fd, POLLOUT, 0};
            int ms = remaining_ms(deadline);
            if (poll(&pf, 1, ms < 5000 ? ms : 5000) == 1) {
                int so = 0;
                socklen_t sl = sizeof so;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &so, &sl);
                if (so == 0)
                    break;
                err = so;
            } else {
                err = ETIMEDOUT;
            }
        } else {
            err = errno;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        errno = err;
    return fd;
}

int dist_tcp_fetch(const char *addr, int port, int world, int rank,
                   unsigned char id[DIST_ID_BYTES], double timeout_s)
{
    double deadline = now_s() + timeout_s, pause = 0.05;
    int err = 0;
    for (;;) {
        int fd = connect_once(addr, port, deadline);
        if (fd >= 0) {
            unsigned char hello[HELLO_BYTES], reply[REPLY_BYTES];
            memcpy(hello, magic, sizeof magic);
            put_u32(hello + 8, (uint32_t)world);
            put_u32(hello + 12, (uint32_t)rank);
            int ok = sock_io(fd, hello, sizeof hello, 1, deadline) == 0 &&
                     sock_io(fd, reply, sizeof reply, 0, deadline) == 0;
            err = errno;
            close(fd);
            if (ok && memcmp(reply, magic, sizeof magic) == 0) {
                if (get_u32(reply + 12) != 0)
                    return msg_error(
                        "rank 0 at %s:%d runs a job of %u ranks, this "
                        "rank (%d) one of %d",
                        addr, port, get_u32(reply + 8), rank, world);
                memcpy(id, reply + 16, DIST_ID_BYTES);
                return 0;
            }
        } else {
            err = errno;
        }
        double left = deadline - now_s();
        if (left <= 0)
            break;
        sleep_s(pause < left ? pause : left); /* rank 0 not listening yet */
        pause = pause < 0.5 ? pause * 2 : 0.5;
    }
    return msg_error(
        "cannot reach rank 0 at MASTER_ADDR:MASTER_PORT %s:%d within %.0f s: "
        "%s",
        addr, port, timeout_s, strerror(err ? err : ETIMEDOUT));
}

/* ---- the id file --------------------------------------------------------- */

enum { FILE_BYTES = 24 + DIST_ID_BYTES }; /* magic, world, 0, tag, id */

int dist_file_publish(const char *path, int world, uint64_t tag,
                      const unsigned char id[DIST_ID_BYTES])
{
    unsigned char buf[FILE_BYTES];
    memcpy(buf, magic, sizeof magic);
    put_u32(buf + 8, (uint32_t)world);
    put_u32(buf + 12, 0);
    put_u64(buf + 16, tag);
    memcpy(buf + 24, id, DIST_ID_BYTES);
    size_t n = strlen(path) + 32;
    char *tmp = xmalloc(n);
    snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int ok = fd >= 0 && write(fd, buf, sizeof buf) == (ssize_t)sizeof buf;
    int err = errno;
    if (fd >= 0) {
        ok = ok && fsync(fd) == 0;
        ok = close(fd) == 0 && ok;
    }
    ok = ok && rename(tmp, path) == 0;
    if (!ok) {
        err = errno ? errno : err;
        unlink(tmp);
        free(tmp);
        return msg_error("cannot write QLORA_NCCL_ID_FILE '%s': %s", path,
                         strerror(err));
    }
    free(tmp);
    return 0;
}

int dist_file_fetch(const char *path, int world, uint64_t tag,
                    unsigned char id[DIST_ID_BYTES], double timeout_s)
{
    double deadline = now_s() + timeout_s, pause = 0.02;
    const char *why = "it does not exist";
    for (;;) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            unsigned char buf[FILE_BYTES];
            ssize_t k = read(fd, buf, sizeof buf);
            close(fd);
            if (k == (ssize_t)sizeof buf &&
                memcmp(buf, magic, sizeof magic) == 0) {
                if (get_u32(buf + 8) == (uint32_t)world &&
                    get_u64(buf + 16) == tag) {
                    memcpy(id, buf + 24, DIST_ID_BYTES);
                    return 0;
                }
                why = "it belongs to another job (world size or run id differ)";
            } else {
                why = "it is not an id file";
            }
        }
        double left = deadline - now_s();
        if (left <= 0)
            break;
        sleep_s(pause < left ? pause : left);
        pause = pause < 0.2 ? pause * 2 : 0.2;
    }
    return msg_error(
        "QLORA_NCCL_ID_FILE '%s': no id from rank 0 within %.0f s (%s)", path,
        timeout_s, why);
}

void dist_file_remove(const char *path)
{
    if (path)
        unlink(path);
}

/* ---- the launcher ---------------------------------------------------------
 */

static pid_t *launch_pids;
static volatile sig_atomic_t launch_n;

static void forward_signal(int sig)
{
    for (int i = 0; i < launch_n; i++)
        if (launch_pids[i] > 0)
            kill(launch_pids[i], sig);
}

static void set_env_int(const char *name, int v)
{
    char b[32];
    snprintf(b, sizeof b, "%d", v);
    setenv(name, b, 1);
}

int dist_launch(int gpus, char **argv)
{
    int nnodes, node_rank;
    if (gpus < 1) {
        msg_error("--gpus %d: expected at least 1", gpus);
        return 2;
    }
    if (env_int("NNODES", 1, 1, 65536, &nnodes) != 0 ||
        env_int("NODE_RANK", 0, 0, nnodes - 1, &node_rank) != 0)
        return 2;
    int world = nnodes * gpus;
    const char *ma = getenv("MASTER_ADDR"), *idf = getenv("QLORA_NCCL_ID_FILE");
    int have_rdv = (ma && *ma) || (idf && *idf);
    if (nnodes > 1 && !have_rdv) {
        msg_error("NNODES=%d: set MASTER_ADDR (rank 0's host) or a "
                  "QLORA_NCCL_ID_FILE on a shared file system",
                  nnodes);
        return 2;
    }
    char *tmpdir = NULL, *idpath = NULL;
    if (!have_rdv) {
        const char *t = getenv("TMPDIR");
        size_t n = strlen(t && *t ? t : "/tmp") + 64;
        tmpdir = xmalloc(n);
        snprintf(tmpdir, n, "%s/lora-train-dist-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(tmpdir)) {
            msg_error("cannot create a directory in '%s': %s",
                      t && *t ? t : "/tmp", strerror(errno));
            free(tmpdir);
            return 2;
        }
        idpath = xmalloc(n + 16);
        snprintf(idpath, n + 16, "%s/nccl-id", tmpdir);
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = cpus / gpus > 1 ? (int)(cpus / gpus) : 1;
    pid_t *pids = xcalloc((size_t)gpus, sizeof *pids);
    int failed = 0;
    fflush(stdout);
    fflush(stderr);
    for (int i = 0; i < gpus; i++) {
        pid_t pid = fork();
        if (pid == 0) { /* the rank's environment; the launcher's stays */
            if (idpath)
                setenv("QLORA_NCCL_ID_FILE", idpath, 1);
            if (!getenv("OMP_NUM_THREADS"))
                set_env_int("OMP_NUM_THREADS", threads);
            set_env_int("WORLD_SIZE", world);
            set_env_int("LOCAL_WORLD_SIZE", gpus);
            setenv("QLORA_DIST_LAUNCHED", "1", 1);
            set_env_int("RANK", node_rank * gpus + i);
            set_env_int("LOCAL_RANK", i);
            if (node_rank * gpus + i != 0) {
                int fd = open("/dev/null", O_WRONLY);
                if (fd >= 0) {
                    dup2(fd, 1);
                    close(fd);
                }
            }
            execv("/proc/self/exe", argv);
            fprintf(stderr, "%s: cannot run rank %d: %s\n", msg_prog(), i,
                    strerror(errno));
            _exit(127);
        }
        if (pid < 0) {
            msg_error("cannot start rank %d: %s", node_rank * gpus + i,
                      strerror(errno));
            failed = 1;
            break;
        }
        pids[i] = pid;
    }
    launch_pids = pids;
    launch_n = gpus;
    struct sigaction sa, old_int, old_term, old_hup;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGHUP, &sa, &old_hup);
    if (failed)
        forward_signal(SIGTERM);
    int running = 0;
    for (int i = 0; i < gpus; i++)
        running += pids[i] > 0;
    while (running > 0) {
        int st;
        pid_t pid = waitpid(-1, &st, 0);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid < 0)
            break;
        int i = 0;
        while (i < gpus && pids[i] != pid)
            i++;
        if (i == gpus)
            continue;
        pids[i] = -1;
        running--;
        int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        if (!ok && !failed) {
            failed = 1;
            /* a rank exiting 2 has said why; anything else is said here */
            if (WIFSIGNALED(st))
                msg_error(
                    "rank %d was killed by signal %d; stopping the others",
                    node_rank * gpus + i, WTERMSIG(st));
            else if (WEXITSTATUS(st) != 2)
                msg_error("rank %d exited with status %d; stopping the others",
                          node_rank * gpus + i, WEXITSTATUS(st));
            forward_signal(SIGTERM);
        }
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    sigaction(SIGHUP, &old_hup, NULL);
    launch_n = 0;
    launch_pids = NULL;
    free(pids);
    if (tmpdir) {
        unlink(idpath);
        rmdir(tmpdir);
        free(idpath);
        free(tmpdir);
    }
    return failed ? 2 : 0;
}

int dist_select_device(int local_rank)
{
    const char *v = getenv("CUDA_VISIBLE_DEVICES");
    if (!v) {
        set_env_int("CUDA_VISIBLE_DEVICES", local_rank);
        return 0;
    }
    int k = 0;
    const char *p = v;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len && (*p == ' ' || *p == '\t'))
            p++, len--;
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if (len && k++ == local_rank) {
            char *one = xstrndup(p, len);
            setenv("CUDA_VISIBLE_DEVICES", one, 1);
            free(one);
            return 0;
        }
        if (!end)
            break;
        p = end + 1;
    }
    return msg_error(
        "LOCAL_RANK=%d, but CUDA_VISIBLE_DEVICES='%s' lists %d device%s",
        local_rank, v, k, k == 1 ? "" : "s");
}

/* ---- sharding ------------------------------------------------------------ */

size_t dist_shard(int64_t n, int world, int rank, int64_t *index)
{
    size_t m = 0;
    if (world < 1)
        world = 1;
    for (int64_t k = rank; k < n; k += world)
        index[m++] = k;
    return m;
}

/* ---- NCCL ------------------------------------------------------------------
 */

static void *open_lib(const char *path, char *err, size_t errlen)
{
    dlerror();
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(err, errlen, "%s", e ? e : "unknown error");
    }
    return h;
}

/* The copy a pip-installed PyTorch carries (package nvidia-nccl-cu*). */
static void *open_in_python(char *path, size_t len)
{
    const char *roots[5] = {getenv("VIRTUAL_ENV"), getenv("CONDA_PREFIX"),
                            "/usr/local", "/usr", NULL};
    char home[1024];
    const char *h = getenv("HOME");
    if (h && *h) {
        snprintf(home, sizeof home, "%s/.local", h);
        roots[4] = home;
    }
    for (size_t i = 0; i < 5; i++) {
        if (!roots[i] || !*roots[i])
            continue;
        for (int dp = 0; dp < 2; dp++) {
            char pat[1200];
            snprintf(pat, sizeof pat,
                     "%s/lib/python3*/%s/nvidia/*/lib/libnccl.so.2", roots[i],
                     dp ? "dist-packages" : "site-packages");
            glob_t g;
            if (glob(pat, 0, NULL, &g) != 0)
                continue;
            for (size_t k = g.gl_pathc; k-- > 0;) { /* newest Python first */
                char err[256];
                void *lib = open_lib(g.gl_pathv[k], err, sizeof err);
                if (lib) {
                    snprintf(path, len, "%s", g.gl_pathv[k]);
                    globfree(&g);
                    return lib;
                }
            }
            globfree(&g);
        }
    }
    return NULL;
}

static int sym(dist_nccl *n, void *fp, const char *name)
{
    void *s = dlsym(n->lib, name);
    if (!s)
        return msg_error("'%s' is not a usable NCCL library: no %s", n->path,
                         name);
    memcpy(fp, &s, sizeof s);
    return 0;
}

int dist_nccl_load(dist_nccl *n)
{
    memset(n, 0, sizeof *n);
    /* NVLink SHARP (multicast) stays off unless asked for */
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    char err[512] = "";
    const char *want = getenv("QLORA_NCCL");
    if (want && *want) {
        struct stat sb;
        if (stat(want, &sb) == 0 && S_ISDIR(sb.st_mode))
            snprintf(n->path, sizeof n->path, "%s/libnccl.so.2", want);
        else
            snprintf(n->path, sizeof n->path, "%s", want);
        n->lib = open_lib(n->path, err, sizeof err);
        if (!n->lib)
            return msg_error("cannot load NCCL from QLORA_NCCL='%s': %s", want,
                             err);
    } else {
        snprintf(n->path, sizeof n->path, "libnccl.so.2");
        n->lib = open_lib(n->path, err, sizeof err);
        if (!n->lib)
            n->lib = open_in_python(n->path, sizeof n->path);
        if (!n->lib)
            return msg_error(
                "cannot load NCCL: libnccl.so.2 is neither on the loader's "
                "path nor in a PyTorch install; set QLORA_NCCL to its path");
    }
    if (sym(n, &n->get_version, "ncclGetVersion") ||
        sym(n, &n->get_unique_id, "ncclGetUniqueId") ||
        sym(n, &n->comm_init_rank, "ncclCommInitRank") ||
        sym(n, &n->all_reduce, "ncclAllReduce") ||
        sym(n, &n->group_start, "ncclGroupStart") ||
        sym(n, &n->group_end, "ncclGroupEnd") ||
        sym(n, &n->comm_destroy, "ncclCommDestroy") ||
        sym(n, &n->comm_abort, "ncclCommAbort") ||
        sym(n, &n->error_string, "ncclGetErrorString")) {
        dist_nccl_unload(n);
        return -1;
    }
    if (n->get_version(&n->version) != DIST_NCCL_SUCCESS)
        n->version = 0;
    return 0;
}

void dist_nccl_unload(dist_nccl *n)
{
    if (n->lib)
        dlclose(n->lib);
    n->lib = NULL;
}

int dist_nccl_error(const dist_nccl *n, const char *call, int result)
{
    const char *s = n && n->error_string ? n->error_string(result) : NULL;
    return msg_error("%s: NCCL error %d (%s)", call, result, s ? s : "unknown");
}
