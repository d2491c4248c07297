// The AVX2 build of the CPU decode-step kernels (CPUs with avx2/fma but no AVX-512, e.g. AMD
// Zen 2/3): the portable loops vectorised 8 floats wide, and SiLU-and-mul through libtorch's
// own AVX2 exp (as torch computes at::silu on such a CPU).
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include "cpu_kernels.h"
#define PAGEDLLM_AVX512 0
#define PAGEDLLM_AVX2 1
extern "C" __m256 Sleef_expf8_u10(__m256);
namespace cpu_avx2 {
#include "cpu_kernels_impl.h"
}  // namespace cpu_avx2
