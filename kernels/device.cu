/* device.cu: device selection, the error reporters, and device memory
 * through one counter (so the training metrics can report peak memory the
 * way torch.cuda.max_memory_allocated does: bytes we allocated, not what
 * the driver keeps for itself). */
#include "common.cuh"

static int g_dev = -1;
static cudaDeviceProp g_prop;
static size_t g_cur, g_peak;

/* The allocation counter keeps each block's size in a header in front of
 * it would misalign; a small open-addressing table maps pointer -> size. */
typedef struct { void *p; size_t n; } alloc_slot;
static alloc_slot *g_slots;
static size_t g_nslots, g_used;

static size_t slot_hash(void *p, size_t cap)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return (size_t)(x & (cap - 1));
}

static void slot_put(void *p, size_t n);

static void slots_grow(void)
{
    alloc_slot *old = g_slots;
    size_t oldn = g_nslots;
    g_nslots = oldn ? oldn * 2 : 1024;
    g_slots = (alloc_slot *)calloc(g_nslots, sizeof *g_slots);
    if (!g_slots) {
        fprintf(stderr, "kernels: out of host memory\n");
        exit(2);
    }
    g_used = 0;
    for (size_t i = 0; i < oldn; i++)
        if (old[i].p)
            slot_put(old[i].p, old[i].n);
    free(old);
}

static void slot_put(void *p, size_t n)
{
    if ((g_used + 1) * 2 > g_nslots)
        slots_grow();
    size_t i = slot_hash(p, g_nslots);
    while (g_slots[i].p)
        i = (i + 1) & (g_nslots - 1);
    g_slots[i].p = p;
    g_slots[i].n = n;
    g_used++;
}

/* Removes p (linear probing deletion with re-insertion of the run). */
static size_t slot_take(void *p)
{
    if (!g_nslots)
        return 0;
    size_t i = slot_hash(p, g_nslots);
    while (g_slots[i].p && g_slots[i].p != p)
        i = (i + 1) & (g_nslots - 1);
    if (!g_slots[i].p)
        return 0;
    size_t n = g_slots[i].n;
    g_slots[i].p = NULL;
    g_used--;
    for (size_t j = (i + 1) & (g_nslots - 1); g_slots[j].p;
         j = (j + 1) & (g_nslots - 1)) {
        alloc_slot s = g_slots[j];
        g_slots[j].p = NULL;
        g_used--;
        slot_put(s.p, s.n);
    }
    return n;
}

void kn_fail_cuda(cudaError_t e, const char *call, const char *file, int line)
{
    fprintf(stderr, "%s: %s (%s:%d, device %d %s)\n", call,
            cudaGetErrorString(e), file, line, g_dev,
            g_dev >= 0 ? g_prop.name : "?");
    exit(2);
}

void kn_fail_require(const char *what, const char *file, int line)
{
    fprintf(stderr, "kernels: contract violated: %s (%s:%d)\n", what, file,
            line);
    exit(2);
}

extern "C" int kn_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" error */
        return 0;
    }
    return n;
}

extern "C" int kn_init(int dev)
{
    cudaError_t e = cudaSetDevice(dev);
    if (e == cudaSuccess)
        e = cudaGetDeviceProperties(&g_prop, dev);
    if (e == cudaSuccess)
        e = cudaFree(0); /* create the context now, not inside a timing */
    if (e != cudaSuccess) {
        fprintf(stderr, "cannot use CUDA device %d: %s\n", dev,
                cudaGetErrorString(e));
        cudaGetLastError();
        return -1;
    }
    g_dev = dev;
    return 0;
}

static void ensure_init(void)
{
    if (g_dev < 0 && kn_init(0) != 0)
        exit(2);
}

extern "C" int kn_sm_count(void)
{
    ensure_init();
    return g_prop.multiProcessorCount;
}

extern "C" size_t kn_smem_optin(void)
{
    ensure_init();
    return g_prop.sharedMemPerBlockOptin;
}

extern "C" const char *kn_device_name(void)
{
    ensure_init();
    return g_prop.name;
}

extern "C" void *kn_malloc(size_t bytes)
{
    ensure_init();
    void *p = NULL;
    if (bytes == 0)
        bytes = 1;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        fprintf(stderr,
                "cudaMalloc: out of device memory asking for %.1f MiB "
                "(%.1f MiB ours, %.1f of %.1f MiB free; device %d %s)\n",
                bytes / 1048576.0, g_cur / 1048576.0, fr / 1048576.0,
                tot / 1048576.0, g_dev, g_prop.name);
        exit(2);
    }
    slot_put(p, bytes);
    g_cur += bytes;
    if (g_cur > g_peak)
        g_peak = g_cur;
    return p;
}

extern "C" void kn_free(void *p)
{
    if (!p)
        return;
    g_cur -= slot_take(p);
    CUDA_CHECK(cudaFree(p));
}

extern "C" size_t kn_mem_current(void) { return g_cur; }
extern "C" size_t kn_mem_peak(void) { return g_peak; }
extern "C" void kn_mem_reset_peak(void) { g_peak = g_cur; }

extern "C" void kn_mem_device(size_t *used, size_t *total)
{
    size_t fr = 0, tot = 0;
    CUDA_CHECK(cudaMemGetInfo(&fr, &tot));
    *used = tot - fr;
    *total = tot;
}

extern "C" void kn_memcpy_h2d(void *dst, const void *src, size_t bytes,
                              cudaStream_t s)
{
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
}

extern "C" void kn_memcpy_d2h(void *dst, const void *src, size_t bytes,
                              cudaStream_t s)
{
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
}

extern "C" void kn_memset(void *p, int byte, size_t bytes, cudaStream_t s)
{
    CUDA_CHECK(cudaMemsetAsync(p, byte, bytes, s));
}

extern "C" void kn_stream_sync(cudaStream_t s)
{
    CUDA_CHECK(cudaStreamSynchronize(s));
}
