// The AVX-512 build of the CPU decode-step kernels (used when the CPU has avx512f/bw/vl).
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include "cpu_kernels.h"
#define PAGEDLLM_AVX512 1
// torch's vectorised float exp on AVX-512 (libtorch_cpu exports it; SiLU-and-mul calls it to
// give at::silu's bits).
extern "C" __m512 Sleef_expf16_u10(__m512);
namespace cpu_avx512 {
#include "cpu_kernels_impl.h"
}  // namespace cpu_avx512
