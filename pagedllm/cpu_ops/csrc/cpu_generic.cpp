// The portable build of the CPU decode-step kernels (any CPU).
#include <algorithm>
#include <cmath>
#include <cstring>
#include "cpu_kernels.h"
#define PAGEDLLM_AVX512 0
namespace cpu_generic {
#include "cpu_kernels_impl.h"
}  // namespace cpu_generic
