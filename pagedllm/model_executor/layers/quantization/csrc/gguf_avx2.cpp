// The AVX2 build of the GGUF kernels (CPUs with avx2/fma/f16c but no AVX512-VNNI, e.g. AMD
// Zen 2/3): mm_f32, mm_x16 (the decode kernel on these CPUs) and the dequantizer; the int8
// `mm` stays portable.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include "gguf_blocks.h"
namespace gguf_avx2 {
#include "gguf_f32_avx2.h"
#include "gguf_x16_avx2.h"
#include "gguf_avx2_rows.h"
}  // namespace gguf_avx2
