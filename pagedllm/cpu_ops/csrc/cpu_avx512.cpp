// The AVX-512 build of the CPU decode-step kernels (used when the CPU has avx512f/bw/vl).
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include "cpu_kernels.h"
#define PAGEDLLM_AVX512 1
namespace cpu_avx512 {
#include "cpu_kernels_impl.h"
}  // namespace cpu_avx512
