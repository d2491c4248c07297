// The AVX512-VNNI build of the GGUF kernels (used when the CPU reports avx512vnni/bw/vl).
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
#include "gguf_blocks.h"
namespace gguf_avx512 {
#define GGUF_VNNI 1
#include "gguf_gemv_impl.h"
#include "gguf_f32_impl.h"
#undef GGUF_VNNI
}  // namespace gguf_avx512
