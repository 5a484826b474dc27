/* gemm.cu: the one home of cuBLASLt. Every matrix product of the toolkit
 * goes through kn_gemm / kn_gemm_ex: bf16 operands, fp32 accumulation
 * (CUBLAS_COMPUTE_32F), bf16 or fp32 output.
 *
 * Transpose convention (stated once, kernels.h): row-major
 *     C (m, n) = alpha * op(A) (m, k) . op(B) (k, n) + beta * C.
 * cuBLAS is column-major, and a row-major (r, c) matrix is the same bytes as
 * a column-major (c, r) one, so we ask cuBLASLt for the transposed product
 *     C^T (n, m) = op(B)^T (n, k) . op(A)^T (k, m)
 * with B as its first operand and A as its second; a row-major operand that
 * is not transposed is then a column-major one that is not transposed.
 *
 * Descriptors and the heuristic's choice are cached per shape: a training
 * step repeats the same few dozen shapes, and asking the heuristic costs
 * tens of microseconds of host time per call. */
#include "common.cuh"
#include <cublasLt.h>
#include <string.h>

#define GEMM_WORKSPACE (32u << 20)
#define GEMM_CACHE 128

static void fail_cublas(cublasStatus_t st, const char *call, const char *file,
                        int line)
{
    int dev = -1;
    cudaGetDevice(&dev);
    fprintf(stderr, "%s: cuBLAS status %d (%s:%d, device %d %s)\n", call,
            (int)st, file, line, dev, kn_device_name());
    exit(2);
}

#define CUBLAS_CHECK(call)                                                   \
    do {                                                                     \
        cublasStatus_t st_ = (call);                                         \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                    \
            fail_cublas(st_, #call, __FILE__, __LINE__);                     \
    } while (0)

typedef struct gemm_key {
    int ta, tb, m, n, k, lda, ldb, ldc, ct, beta0, inplace, align;
} gemm_key;

typedef struct gemm_plan {
    gemm_key key;
    int used;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
} gemm_plan;

static cublasLtHandle_t g_lt;
static void *g_ws;
static gemm_plan g_plans[GEMM_CACHE];
static int g_next;

static int ptr_align(const void *p)
{
    uintptr_t a = (uintptr_t)p;
    int al = 256;
    while (al > 2 && (a % al))
        al >>= 1;
    return al;
}

static void plan_destroy(gemm_plan *p)
{
    if (!p->used)
        return;
    cublasLtMatrixLayoutDestroy(p->la);
    cublasLtMatrixLayoutDestroy(p->lb);
    cublasLtMatrixLayoutDestroy(p->lc);
    cublasLtMatmulDescDestroy(p->op);
    p->used = 0;
}

static gemm_plan *plan_get(const gemm_key *k)
{
    for (int i = 0; i < GEMM_CACHE; i++)
        if (g_plans[i].used && !memcmp(&g_plans[i].key, k, sizeof *k))
            return &g_plans[i];
    if (!g_lt) {
        CUBLAS_CHECK(cublasLtCreate(&g_lt));
        g_ws = kn_malloc(GEMM_WORKSPACE);
    }
    gemm_plan *p = &g_plans[g_next];
    g_next = (g_next + 1) % GEMM_CACHE;
    plan_destroy(p);
    p->key = *k;

    cudaDataType_t ct = k->ct == KN_F32 ? CUDA_R_32F : CUDA_R_16BF;
    /* First cuBLAS operand: our B. Stored row-major (k, n) = column-major
     * (n, k) when tb == 0; row-major (n, k) = column-major (k, n) else. */
    cublasOperation_t opa = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t opb = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
        p->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
        p->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->la, CUDA_R_16BF,
                                            k->tb ? k->k : k->n,
                                            k->tb ? k->n : k->k, k->ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lb, CUDA_R_16BF,
                                            k->ta ? k->m : k->k,
                                            k->ta ? k->k : k->m, k->lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lc, ct, k->n, k->m, k->ldc));

    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = GEMM_WORKSPACE;
    uint32_t al = (uint32_t)k->align;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al, sizeof al));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al, sizeof al));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al, sizeof al));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al, sizeof al));
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(g_lt, p->op, p->la, p->lb,
                                                p->lc, p->lc, pref, 1, &res,
                                                &nres));
    cublasLtMatmulPreferenceDestroy(pref);
    if (nres < 1)
        fail_cublas(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmulAlgoGetHeuristic",
                    __FILE__, __LINE__);
    p->algo = res.algo;
    p->used = 1;
    return p;
}

extern "C" void kn_gemm_ex(int ta, int tb, int m, int n, int k, float alpha,
                           const kn_bf16 *A, int lda, const kn_bf16 *B,
                           int ldb, float beta, const void *C, void *D,
                           kn_dtype ct, int ldc, cudaStream_t s)
{
    KN_REQUIRE(m > 0 && n > 0 && k > 0);
    KN_REQUIRE(lda >= (ta ? m : k) && ldb >= (tb ? k : n) && ldc >= n);
    KN_REQUIRE(A && B && D && (beta == 0.0f || C));
    gemm_key key;
    memset(&key, 0, sizeof key);
    key.ta = ta; key.tb = tb; key.m = m; key.n = n; key.k = k;
    key.lda = lda; key.ldb = ldb; key.ldc = ldc; key.ct = (int)ct;
    key.beta0 = beta == 0.0f;
    key.inplace = C == D;
    int al = ptr_align(A);
    int a2 = ptr_align(B), a3 = ptr_align(D);
    if (a2 < al) al = a2;
    if (a3 < al) al = a3;
    if (C) {
        int a4 = ptr_align(C);
        if (a4 < al) al = a4;
    }
    key.align = al;
    gemm_plan *p = plan_get(&key);
    CUBLAS_CHECK(cublasLtMatmul(g_lt, p->op, &alpha, B, p->la, A, p->lb,
                                &beta, C ? C : D, p->lc, D, p->lc, &p->algo,
                                g_ws, GEMM_WORKSPACE, s));
}

extern "C" void kn_gemm(int ta, int tb, int m, int n, int k, float alpha,
                        const kn_bf16 *A, int lda, const kn_bf16 *B, int ldb,
                        float beta, void *C, kn_dtype ct, int ldc,
                        cudaStream_t s)
{
    kn_gemm_ex(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, C, ct, ldc, s);
}
