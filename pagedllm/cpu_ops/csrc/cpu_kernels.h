// Raw-pointer kernels of the CPU decode-step ops, built three times (cpu_avx512.cpp with
// AVX-512 code generation, cpu_avx2.cpp with AVX2 + FMA, cpu_generic.cpp portable) and
// chosen at run time by cpu_ops.cpp.
// Element types: float, or uint16_t holding bfloat16 bits. Arithmetic is float; a bf16 op
// rounds where the torch path it replaces rounds (after each elementwise torch op).
#pragma once
#include <cstdint>

#define PAGEDLLM_CPU_KERNELS(NS)                                                           \
  namespace NS {                                                                           \
  /* res[r] = x[r] + res[r], rounded to the element type */                              \
  void residual_add_f32(const float* x, int64_t xs, float* res, int64_t rs, int64_t r0,     \
                        int64_t r1, int64_t d);                                            \
  void residual_add_bf16(const uint16_t* x, int64_t xs, uint16_t* res, int64_t rs,          \
                         int64_t r0, int64_t r1, int64_t d);                               \
  /* out[r] = x[r] / sqrt(ms[r] + eps) * w (bf16: the normed x rounded first) */           \
  void rms_apply_f32(const float* x, int64_t xs, const float* ms, float* out, int64_t os,   \
                     const float* w, int64_t r0, int64_t r1, int64_t d, float eps);        \
  void rms_apply_bf16(const uint16_t* x, int64_t xs, const float* ms, uint16_t* out,        \
                      int64_t os, const uint16_t* w, int64_t r0, int64_t r1, int64_t d,     \
                      float eps);                                                          \
  /* RoPE in place on `heads` heads of one token's row x (head_size apart); cs is the      \
     position's [cos(rot/2) | sin(rot/2)] row. */                                          \
  void rope_f32(float* x, int64_t heads, int64_t head_size, const float* cs, int64_t rot,  \
                bool neox);                                                                \
  void rope_bf16(uint16_t* x, int64_t heads, int64_t head_size, const float* cs,           \
                 int64_t rot, bool neox);                                                  \
  /* One query row's heads kvh*group .. kvh*group+group-1 over the paged KV of one request: \
     tokens [start, end) of block table `table`; out rows head_size apart. */               \
  void decode_attention_f32(const float* q, int64_t qhs, const float* kc, const float* vc, \
                            const int32_t* table, int64_t block_size, int64_t num_kv_heads, \
                            int64_t kvh, int64_t group, int64_t head_size, int64_t start,   \
                            int64_t end, float scale, float soft_cap, float* out,           \
                            int64_t ohs, float* scratch);                                  \
  void decode_attention_bf16(const uint16_t* q, int64_t qhs, const uint16_t* kc,           \
                             const uint16_t* vc, const int32_t* table, int64_t block_size, \
                             int64_t num_kv_heads, int64_t kvh, int64_t group,              \
                             int64_t head_size, int64_t start, int64_t end, float scale,    \
                             float soft_cap, uint16_t* out, int64_t ohs, float* scratch);  \
  }

PAGEDLLM_CPU_KERNELS(cpu_avx512)
namespace cpu_avx512 {
// out[r] = silu(x[r, :d]) * x[r, d:], torch's AVX-512 SiLU bit for bit (AVX-512 build only:
// it calls libtorch's Sleef exp; the caller checks it against at::silu once per width).
void silu_mul_f32(const float* x, int64_t xs, float* out, int64_t os, int64_t r0, int64_t r1,
                  int64_t d);
void silu_mul_bf16(const uint16_t* x, int64_t xs, uint16_t* out, int64_t os, int64_t r0,
                   int64_t r1, int64_t d);
}  // namespace cpu_avx512
PAGEDLLM_CPU_KERNELS(cpu_avx2)
namespace cpu_avx2 {
// As cpu_avx512's, with torch's AVX2 SiLU (libtorch's Sleef_expf8_u10).
void silu_mul_f32(const float* x, int64_t xs, float* out, int64_t os, int64_t r0, int64_t r1,
                  int64_t d);
void silu_mul_bf16(const uint16_t* x, int64_t xs, uint16_t* out, int64_t os, int64_t r0,
                   int64_t r1, int64_t d);
}  // namespace cpu_avx2
PAGEDLLM_CPU_KERNELS(cpu_generic)

// Floats of scratch decode_attention needs for a context of n tokens.
inline int64_t decode_scratch_floats(int64_t group, int64_t head_size, int64_t n) {
  return group * (n + 2 * head_size);
}
