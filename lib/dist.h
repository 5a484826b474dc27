/* dist.h: data-parallel training across processes, one per GPU: the
 * rank's place in the job, the exchange of NCCL's unique id, the launcher
 * behind `lora-train --gpus N`, the sharding of a step's micro-batches and
 * NCCL itself, loaded at run time.
 *
 * Why NCCL is loaded with dlopen: the toolkit builds without NCCL's headers
 * or library (CI and most build machines have neither), and a single-GPU
 * or CPU run must not need it. The few functions and constants used are
 * declared here from NCCL's public header (nccl.h, NVIDIA/nccl
 * src/nccl.h.in); their ABI has been stable since NCCL 2.0.
 *
 * Everything here is plain C without CUDA, so the bootstrap, the launcher,
 * the sharding and the loader's failure path are tested on machines
 * without a GPU (tests/unit/test_dist.c, tests/cli/lora-train-dist.sh);
 * kernels/dist_gpu.h has the part that runs on the device.
 *
 * The job's shape comes from the environment, with torchrun's names:
 *     WORLD_SIZE   ranks in the job (default 1: no data parallelism)
 *     RANK         this process's rank, 0 .. WORLD_SIZE-1 (default 0)
 *     LOCAL_RANK   its GPU on this host (default RANK)
 *     MASTER_ADDR, MASTER_PORT   where rank 0 serves the unique id (TCP)
 *     QLORA_DIST_PORT            a port to use instead of MASTER_PORT
 *                                (torchrun's own store holds MASTER_PORT)
 *     QLORA_NCCL_ID_FILE         or a file rank 0 writes it to instead
 *     QLORA_DIST_TIMEOUT         seconds the exchange waits (default 300)
 */
#ifndef DIST_H
#define DIST_H

#include <stddef.h>
#include <stdint.h>

#define DIST_ID_BYTES 128 /* NCCL_UNIQUE_ID_BYTES */

typedef struct dist_env {
    int world; /* 1: a single process */
    int rank;
    int local_rank;
    int launched;            /* started by dist_launch (QLORA_DIST_LAUNCHED) */
    const char *master_addr; /* NULL when unset */
    int master_port;         /* QLORA_DIST_PORT, MASTER_PORT, or 29500 */
    const char *id_file;     /* NULL when unset */
    uint64_t tag; /* run identity for the id file (see dist_file_*) */
    double timeout_s;
} dist_env;

/* Reads the variables above. -1 (with a message naming the variable) when
 * one is malformed or out of range, or when WORLD_SIZE > 1 gives neither
 * MASTER_ADDR nor QLORA_NCCL_ID_FILE. */
int dist_env_read(dist_env *e);

/* ---- the unique id's exchange --------------------------------------------
 * Rank 0 holds id (from ncclGetUniqueId) and hands it to the other ranks;
 * the others receive it into id. Either over TCP (rank 0 listens on
 * MASTER_ADDR:MASTER_PORT, the address bound as given, and answers each
 * rank's hello with the 128 bytes; the others connect with retries) or
 * through a file (rank 0 writes it atomically: temporary name, rename;
 * the others wait for it). Every wait is bounded by timeout_s; a peer of
 * another job size is refused. dist_share_id picks the file when id_file
 * is set, else TCP. 0 ok, -1 error (message printed). */
int dist_share_id(const dist_env *e, unsigned char id[DIST_ID_BYTES]);
int dist_tcp_serve(const char *addr, int port, int world,
                   const unsigned char id[DIST_ID_BYTES], double timeout_s);
int dist_tcp_fetch(const char *addr, int port, int world, int rank,
                   unsigned char id[DIST_ID_BYTES], double timeout_s);
/* The file holds a magic, the world size and tag (a hash of
 * QLORA_RUN_ID, TORCHELASTIC_RUN_ID or SLURM_JOB_ID, whichever is set
 * first, else 0), so a file left by another job is not taken for this
 * one's. Rank 0 removes it once every rank has joined (dist_file_remove). */
int dist_file_publish(const char *path, int world, uint64_t tag,
                      const unsigned char id[DIST_ID_BYTES]);
int dist_file_fetch(const char *path, int world, uint64_t tag,
                    unsigned char id[DIST_ID_BYTES], double timeout_s);
void dist_file_remove(const char *path);

/* ---- the launcher --------------------------------------------------------
 * Runs gpus copies of this program (/proc/self/exe with argv), ranks
 * NODE_RANK * gpus + i of NNODES * gpus (NNODES and NODE_RANK from the
 * environment, default 1 and 0), each with RANK, WORLD_SIZE, LOCAL_RANK,
 * LOCAL_WORLD_SIZE and QLORA_DIST_LAUNCHED=1 set, OMP_NUM_THREADS a share
 * of the cores unless set. On one host without MASTER_ADDR or
 * QLORA_NCCL_ID_FILE, the id goes through a file in a private temporary
 * directory. Ranks other than 0 get /dev/null as stdout. When a rank
 * fails, the others are stopped (SIGTERM). Returns the exit status for the
 * launcher: 0 when every rank exited 0, else 2 (with one message). */
int dist_launch(int gpus, char **argv);

/* The ranks of one host share its GPUs: rank LOCAL_RANK sees only the
 * LOCAL_RANK-th of the devices visible to the job (CUDA_VISIBLE_DEVICES'
 * entries when set, else device LOCAL_RANK), as its device 0. Call before
 * anything touches CUDA. -1 when CUDA_VISIBLE_DEVICES has too few. */
int dist_select_device(int local_rank);

/* ---- sharding ------------------------------------------------------------
 * A data-parallel step of n micro-batches (those of a single-process step
 * with gradient_accumulation_steps * world, in the same row order) gives
 * micro-batch k to rank k % world: index receives this rank's k in
 * increasing order (at most ceil(n / world) of them); returns how many. */
size_t dist_shard(int64_t n, int world, int rank, int64_t *index);

/* ---- NCCL, loaded at run time ----------------------------------------- */

/* Values of nccl.h's enums (NVIDIA/nccl src/nccl.h.in):
 * ncclResult_t ncclSuccess = 0; ncclDataType_t ncclUint64 = 5,
 * ncclFloat32 (ncclFloat) = 7, ncclFloat64 (ncclDouble) = 8,
 * ncclBfloat16 = 9; ncclRedOp_t ncclSum = 0, ncclMax = 2, ncclMin = 3,
 * ncclAvg = 4. Enums are passed as int by the C ABI. */
enum {
    DIST_NCCL_SUCCESS = 0,
    DIST_NCCL_UINT64 = 5,
    DIST_NCCL_FLOAT32 = 7,
    DIST_NCCL_FLOAT64 = 8,
    DIST_NCCL_BFLOAT16 = 9,
    DIST_NCCL_SUM = 0,
    DIST_NCCL_MAX = 2,
    DIST_NCCL_MIN = 3,
    DIST_NCCL_AVG = 4,
};

/* typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;
 * passed by value to ncclCommInitRank, as this struct is. */
typedef struct dist_nccl_id {
    char internal[DIST_ID_BYTES];
} dist_nccl_id;

/* The entry points, with nccl.h's signatures (ncclComm_t and cudaStream_t
 * are pointers, here void *). */
typedef struct dist_nccl {
    void *lib;
    char path[1024]; /* what was loaded */
    int version;     /* ncclGetVersion, e.g. 22703 for 2.27.3 */
    int (*get_version)(int *version);
    int (*get_unique_id)(dist_nccl_id *id);
    int (*comm_init_rank)(void **comm, int nranks, dist_nccl_id id, int rank);
    int (*all_reduce)(const void *send, void *recv, size_t count, int datatype,
                      int op, void *comm, void *stream);
    int (*group_start)(void);
    int (*group_end)(void);
    int (*comm_destroy)(void *comm);
    int (*comm_abort)(void *comm);
    const char *(*error_string)(int result);
} dist_nccl;

/* Loads NCCL: the file QLORA_NCCL names when set (a path to the library,
 * or a directory holding libnccl.so.2), and nothing else then; otherwise
 * libnccl.so.2 on the loader's path (LD_LIBRARY_PATH, ldconfig), then the
 * copy a pip-installed PyTorch carries (the nvidia-nccl wheel's
 * nvidia/NAME/lib/libnccl.so.2 in the site- or dist-packages of
 * $VIRTUAL_ENV, $CONDA_PREFIX, /usr/local, /usr and ~/.local).
 * Sets NCCL_NVLS_ENABLE=0 unless the environment sets it (NVLink SHARP is
 * off unless asked for). 0 ok; -1 with one line saying what was tried. */
int dist_nccl_load(dist_nccl *n);
void dist_nccl_unload(dist_nccl *n);
/* "call: message" for a failed NCCL call, as msg_error; returns -1. */
int dist_nccl_error(const dist_nccl *n, const char *call, int result);

#endif
