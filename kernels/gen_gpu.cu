/* gen_gpu.cu: lora-gen's GPU backend (see gen_gpu.h). */
#define _Noreturn [[noreturn]]
extern "C" {
#include "msg.h"
}
#include "common.cuh"
#include "gen_gpu.h"
extern "C" int gen_gpu_backend(const llama_model *m, const lora_adapter *a, int32_t slots,
                               int32_t cap, gen_backend *be)
{
    (void)m; (void)a; (void)slots; (void)cap; (void)be;
    return msg_error("the GPU backend is not ready");
}
extern "C" size_t gen_gpu_peak_bytes(const gen_backend *be) { (void)be; return 0; }
