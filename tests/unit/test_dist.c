/* test_dist.c: the host side of data-parallel training (lib/dist.c),
 * without a GPU: the sharding of a step's micro-batches, the job's shape
 * from the environment, the unique id's exchange over TCP and through a
 * file between forked processes (loopback only, every wait bounded by a
 * few seconds), the launcher (this program started as ranks, which then
 * exchange an id), each rank's device, and NCCL's loader failing cleanly.
 *
 * Started by dist_launch (QLORA_DIST_LAUNCHED=1), the program is a rank:
 * see rank_main.
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "dist.h"
#include "msg.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void make_id(unsigned char *id, int seed)
{
    for (int i = 0; i < DIST_ID_BYTES; i++)
        id[i] = (unsigned char)(i * 7 + seed * 31 + 1);
}

/* ---- as a rank of dist_launch ----------------------------------------------
 */

/* TEST_DIST_MODE "ok": exchange the id (rank 0 publishes seed 5), select
 * the device, write TEST_DIST_DIR/rank-N. "fail": rank 1 exits 3, the
 * others wait to be stopped. */
static int rank_main(void)
{
    dist_env e;
    if (dist_env_read(&e) != 0)
        return 4;
    const char *mode = getenv("TEST_DIST_MODE"), *dir = getenv("TEST_DIST_DIR");
    if (mode && strcmp(mode, "fail") == 0) {
        if (e.rank == 1)
            return 3;
        sleep(30);
        return 0;
    }
    unsigned char id[DIST_ID_BYTES], want[DIST_ID_BYTES];
    make_id(want, 5);
    memset(id, 0, sizeof id);
    if (e.rank == 0)
        memcpy(id, want, sizeof id);
    if (dist_share_id(&e, id) != 0 || memcmp(id, want, sizeof id) != 0)
        return 5;
    if (dist_select_device(e.local_rank) != 0)
        return 6;
    char path[1024];
    snprintf(path, sizeof path, "%s/rank-%d", dir, e.rank);
    FILE *f = fopen(path, "w");
    if (!f)
        return 7;
    fprintf(f, "world=%d local=%d launched=%d cvd=%s\n", e.world, e.local_rank,
            e.launched, getenv("CUDA_VISIBLE_DEVICES"));
    return fclose(f) == 0 ? 0 : 7;
}

/* ---- sharding
 * ---------------------------------------------------------------- */

static void test_shard(void)
{
    int bad = 0;
    int64_t idx[64];
    for (int64_t n = 0; n <= 13; n++)
        for (int world = 1; world <= 5; world++) {
            int seen[16] = {0};
            for (int r = 0; r < world; r++) {
                size_t m = dist_shard(n, world, r, idx);
                if ((int64_t)m > (n + world - 1) / world)
                    bad++;
                for (size_t i = 0; i < m; i++) {
                    if (idx[i] % world != r || (i && idx[i] <= idx[i - 1]) ||
                        idx[i] < 0 || idx[i] >= n)
                        bad++;
                    else
                        seen[idx[i]]++;
                }
            }
            for (int64_t k = 0; k < n; k++)
                bad += seen[k] != 1;
        }
    CHECK(bad == 0,
          "dist_shard: each micro-batch on exactly one rank (k %% world), "
          "in order, union the whole step (%d errors)",
          bad);
    /* the numbers of lora-train(1)'s example: 2 ranks, accumulation 2 */
    size_t m0 = dist_shard(4, 2, 0, idx);
    int ok0 = m0 == 2 && idx[0] == 0 && idx[1] == 2;
    size_t m1 = dist_shard(4, 2, 1, idx);
    CHECK(ok0 && m1 == 2 && idx[0] == 1 && idx[1] == 3,
          "dist_shard: 4 micro-batches on 2 ranks: {0,2} and {1,3}");
    CHECK(dist_shard(1, 4, 2, idx) == 0,
          "dist_shard: a short last step leaves a rank nothing");
}

/* ---- the environment
 * ---------------------------------------------------------- */

static const char *const env_names[] = {
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "QLORA_DIST_PORT",
    "QLORA_NCCL_ID_FILE",
    "QLORA_RUN_ID",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "QLORA_DIST_TIMEOUT",
    "QLORA_DIST_LAUNCHED",
    "NNODES",
    "NODE_RANK",
};

static void clear_env(void)
{
    for (size_t i = 0; i < sizeof env_names / sizeof *env_names; i++)
        unsetenv(env_names[i]);
}

static void test_env(void)
{
    dist_env e;
    clear_env();
    CHECK(dist_env_read(&e) == 0 && e.world == 1 && e.rank == 0 &&
              e.local_rank == 0 && e.master_port == 29500 && !e.master_addr &&
              !e.id_file && e.tag == 0,
          "dist_env: nothing set is a single process");
    setenv("WORLD_SIZE", "4", 1);
    setenv("RANK", "3", 1);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("MASTER_PORT", "1234", 1);
    CHECK(dist_env_read(&e) == 0 && e.world == 4 && e.rank == 3 &&
              e.local_rank == 3 && e.master_port == 1234 && e.master_addr &&
              !strcmp(e.master_addr, "127.0.0.1"),
          "dist_env: torchrun's variables (LOCAL_RANK defaults to RANK)");
    setenv("QLORA_DIST_PORT", "2345", 1);
    setenv("LOCAL_RANK", "1", 1);
    CHECK(dist_env_read(&e) == 0 && e.master_port == 2345 && e.local_rank == 1,
          "dist_env: QLORA_DIST_PORT over MASTER_PORT");
    setenv("RANK", "4", 1);
    CHECK(dist_env_read(&e) == -1,
          "dist_env: RANK outside 0..WORLD_SIZE-1 refused");
    setenv("RANK", "x1", 1);
    CHECK(dist_env_read(&e) == -1, "dist_env: a malformed RANK refused");
    setenv("RANK", "0", 1);
    unsetenv("MASTER_ADDR");
    CHECK(dist_env_read(&e) == -1,
          "dist_env: WORLD_SIZE > 1 without MASTER_ADDR or an id file refused");
    setenv("QLORA_NCCL_ID_FILE", "/tmp/x", 1);
    setenv("QLORA_RUN_ID", "job-17", 1);
    dist_env e2;
    int ok = dist_env_read(&e) == 0 && e.id_file && e.tag != 0;
    setenv("QLORA_RUN_ID", "job-18", 1);
    CHECK(ok && dist_env_read(&e2) == 0 && e2.tag != 0 && e2.tag != e.tag,
          "dist_env: the id file, tagged by the run id");
    clear_env();
}

/* ---- TCP
 * ------------------------------------------------------------------------ */

/* A port nobody listens on now (the kernel's choice for port 0). */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* Forks ranks first .. world-1 running fetch; returns how many exited 0. */
typedef int (*fetch_fn)(int rank, int world, const void *arg);

static int run_ranks(int first, int world, fetch_fn fn, const void *arg,
                     pid_t *pids)
{
    fflush(stdout);
    fflush(stderr);
    for (int r = first; r < world; r++) {
        pid_t p = fork();
        if (p == 0)
            _exit(fn(r, world, arg));
        pids[r] = p;
    }
    return 0;
}

static int wait_ranks(int first, int world, const pid_t *pids)
{
    int good = 0;
    for (int r = first; r < world; r++) {
        int st;
        if (pids[r] > 0 && waitpid(pids[r], &st, 0) == pids[r] &&
            WIFEXITED(st) && WEXITSTATUS(st) == 0)
            good++;
    }
    return good;
}

static int tcp_rank(int rank, int world, const void *arg)
{
    int port = *(const int *)arg;
    unsigned char id[DIST_ID_BYTES], want[DIST_ID_BYTES];
    make_id(want, 1);
    if (dist_tcp_fetch("127.0.0.1", port, world, rank, id, 10) != 0)
        return 1;
    return memcmp(id, want, sizeof id) != 0;
}

static int tcp_rank_wrong_world(int rank, int world, const void *arg)
{
    unsigned char id[DIST_ID_BYTES];
    /* claims a job one rank larger */
    return dist_tcp_fetch("127.0.0.1", *(const int *)arg, world + 1, rank, id,
                          5) == -1
               ? 0
               : 1;
}

static void test_tcp(void)
{
    int port = free_port();
    if (!port) {
        SKIP("dist tcp: no loopback socket");
        return;
    }
    unsigned char id[DIST_ID_BYTES];
    make_id(id, 1);
    pid_t pids[8] = {0};
    /* the ranks start first and retry until rank 0 listens */
    run_ranks(1, 4, tcp_rank, &port, pids);
    sleep_ms(300);
    int rc = dist_tcp_serve("127.0.0.1", port, 4, id, 10);
    int good = wait_ranks(1, 4, pids);
    CHECK(rc == 0 && good == 3,
          "dist tcp: rank 0 hands the 128-byte id to 3 ranks on 127.0.0.1:%d, "
          "which "
          "started first (%d of 3)",
          port, good);

    /* a job of another size is refused on both sides */
    port = free_port();
    memset(pids, 0, sizeof pids);
    run_ranks(1, 2, tcp_rank_wrong_world, &port, pids);
    rc = dist_tcp_serve("127.0.0.1", port, 2, id, 5);
    good = wait_ranks(1, 2, pids);
    CHECK(rc == -1 && good == 1,
          "dist tcp: a rank of a job of another size is refused");

    /* nobody listening: the rank gives up at its deadline */
    port = free_port();
    double t = now_s();
    rc = dist_tcp_fetch("127.0.0.1", port, 2, 1, id, 1);
    t = now_s() - t;
    CHECK(rc == -1 && t > 0.8 && t < 4,
          "dist tcp: no rank 0 -> error after the timeout "
          "(%.1f s of 1)",
          t);

    /* nobody coming: rank 0 gives up at its deadline */
    t = now_s();
    rc = dist_tcp_serve("127.0.0.1", port, 3, id, 1);
    t = now_s() - t;
    CHECK(rc == -1 && t > 0.8 && t < 4,
          "dist tcp: missing ranks -> rank 0's error "
          "after the timeout (%.1f s of 1)",
          t);
    CHECK(dist_tcp_serve("256.1.1.1", port, 2, id, 1) == -1,
          "dist tcp: an address that is not ours is refused");
}

/* ---- the id file
 * ---------------------------------------------------------------- */

static int file_rank(int rank, int world, const void *arg)
{
    (void)rank;
    unsigned char id[DIST_ID_BYTES], want[DIST_ID_BYTES];
    make_id(want, 2);
    if (dist_file_fetch((const char *)arg, world, 99, id, 10) != 0)
        return 1;
    return memcmp(id, want, sizeof id) != 0;
}

static void test_file(const char *dir)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/nccl-id", dir);
    unsigned char id[DIST_ID_BYTES];
    make_id(id, 2);
    pid_t pids[8] = {0};
    run_ranks(1, 3, file_rank, path, pids);
    sleep_ms(200);
    int rc = dist_file_publish(path, 3, 99, id);
    int good = wait_ranks(1, 3, pids);
    CHECK(rc == 0 && good == 2,
          "dist file: the id reaches 2 ranks waiting for QLORA_NCCL_ID_FILE "
          "(%d of 2)",
          good);
    struct stat sb;
    CHECK(stat(path, &sb) == 0 && sb.st_size == 24 + DIST_ID_BYTES,
          "dist file: written whole (magic, world, tag, id)");
    /* the file of another job (other tag, other size) is not taken */
    double t = now_s();
    unsigned char got[DIST_ID_BYTES];
    rc = dist_file_fetch(path, 3, 100, got, 1);
    int rc2 = dist_file_fetch(path, 4, 99, got, 1);
    t = now_s() - t;
    CHECK(
        rc == -1 && rc2 == -1 && t < 6,
        "dist file: another job's file is not taken; error after the timeout");
    dist_file_remove(path);
    CHECK(stat(path, &sb) != 0, "dist file: removed once every rank has it");
    snprintf(path, sizeof path, "%s/no-such-dir/nccl-id", dir);
    CHECK(dist_file_publish(path, 2, 0, id) == -1,
          "dist file: unwritable path -> error");
}

/* ---- the launcher
 * ---------------------------------------------------------------- */

static void test_launch(char **argv, const char *dir)
{
    clear_env();
    unsetenv("CUDA_VISIBLE_DEVICES");
    setenv("TEST_DIST_DIR", dir, 1);
    setenv("TEST_DIST_MODE", "ok", 1);
    setenv("QLORA_DIST_TIMEOUT", "20", 1);
    double t = now_s();
    int rc = dist_launch(3, argv);
    t = now_s() - t;
    int good = 0;
    for (int r = 0; r < 3; r++) {
        char path[1024], line[256] = "", want[256];
        snprintf(path, sizeof path, "%s/rank-%d", dir, r);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(line, sizeof line, f))
                line[0] = 0;
            fclose(f);
        }
        snprintf(want, sizeof want, "world=3 local=%d launched=1 cvd=%d\n", r,
                 r);
        good += strcmp(line, want) == 0;
        unlink(path);
    }
    CHECK(rc == 0 && good == 3,
          "dist_launch: 3 ranks started, id exchanged through a private file, "
          "one "
          "GPU each (%d of 3, %.1f s)",
          good, t);
    CHECK(!getenv("WORLD_SIZE") && !getenv("QLORA_DIST_LAUNCHED") &&
              !getenv("QLORA_NCCL_ID_FILE"),
          "dist_launch: the launcher's own environment unchanged");

    /* a failing rank stops the others (which would sleep 30 s) */
    setenv("TEST_DIST_MODE", "fail", 1);
    t = now_s();
    rc = dist_launch(3, argv);
    t = now_s() - t;
    CHECK(rc == 2 && t < 10,
          "dist_launch: rank 1 fails -> the others stopped, status 2 "
          "(%.1f s)",
          t);
    unsetenv("TEST_DIST_MODE");
    unsetenv("TEST_DIST_DIR");
    unsetenv("QLORA_DIST_TIMEOUT");
    setenv("NNODES", "2", 1);
    CHECK(
        dist_launch(2, argv) == 2,
        "dist_launch: several hosts without MASTER_ADDR or an id file refused");
    unsetenv("NNODES");
}

static void test_select_device(void)
{
    unsetenv("CUDA_VISIBLE_DEVICES");
    int ok = dist_select_device(1) == 0 &&
             !strcmp(getenv("CUDA_VISIBLE_DEVICES"), "1");
    CHECK(ok, "dist_select_device: rank 1 alone sees device 1");
    setenv("CUDA_VISIBLE_DEVICES", "3,5, 7", 1);
    ok = dist_select_device(2) == 0 &&
         !strcmp(getenv("CUDA_VISIBLE_DEVICES"), "7");
    CHECK(ok, "dist_select_device: the LOCAL_RANK-th of CUDA_VISIBLE_DEVICES");
    setenv("CUDA_VISIBLE_DEVICES", "GPU-aa,GPU-bb", 1);
    ok = dist_select_device(1) == 0 &&
         !strcmp(getenv("CUDA_VISIBLE_DEVICES"), "GPU-bb");
    CHECK(ok, "dist_select_device: UUIDs");
    setenv("CUDA_VISIBLE_DEVICES", "0", 1);
    CHECK(dist_select_device(1) == -1,
          "dist_select_device: too few devices -> error");
    unsetenv("CUDA_VISIBLE_DEVICES");
}

/* ---- NCCL's loader
 * ------------------------------------------------------------- */

static void test_nccl(const char *dir)
{
    dist_nccl n;
    setenv("QLORA_NCCL", "/nonexistent/libnccl.so.2", 1);
    CHECK(dist_nccl_load(&n) == -1 && !n.lib,
          "dist_nccl_load: QLORA_NCCL missing -> error");
    setenv("QLORA_NCCL", dir, 1); /* a directory without the library */
    CHECK(dist_nccl_load(&n) == -1,
          "dist_nccl_load: directory without libnccl.so.2 -> error");
    setenv("QLORA_NCCL", "libm.so.6", 1);
    CHECK(dist_nccl_load(&n) == -1 && !n.lib,
          "dist_nccl_load: a library that is not NCCL -> error");
    unsetenv("QLORA_NCCL");
    unsetenv("NCCL_NVLS_ENABLE");
    int rc = dist_nccl_load(&n);
    const char *nvls = getenv("NCCL_NVLS_ENABLE");
    CHECK(nvls && !strcmp(nvls, "0"),
          "dist_nccl_load: NVLink SHARP off by default");
    if (rc == 0) {
        CHECK(n.version > 0 && n.all_reduce && n.comm_init_rank,
              "dist_nccl_load: found '%s', NCCL %d", n.path, n.version);
        dist_nccl_unload(&n);
    } else {
        SKIP("dist_nccl_load: no NCCL on this machine (the failure path above "
             "suffices)");
    }
    unsetenv("NCCL_NVLS_ENABLE");
    CHECK(dist_nccl_error(NULL, "ncclAllReduce", 2) == -1,
          "dist_nccl_error returns -1");
}

int main(int argc, char **argv)
{
    (void)argc;
    const char *launched = getenv("QLORA_DIST_LAUNCHED");
    if (launched && !strcmp(launched, "1")) {
        msg_init("test_dist[rank]");
        return rank_main();
    }
    msg_init("test_dist");
    signal(SIGPIPE, SIG_IGN);
    char dir[] = "/tmp/test_dist.XXXXXX";
    if (!mkdtemp(dir)) {
        printf("not ok test_dist: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    test_shard();
    test_env();
    test_select_device();
    test_tcp();
    test_file(dir);
    test_launch(argv, dir);
    test_nccl(dir);
    rmdir(dir);
    return CHECK_DONE();
}
