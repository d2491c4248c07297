// torch ops over the GGUF kernels: torch.ops.pagedllm_gguf.{mm, mm_f32, mm_dequant, dequantize, isa}.
// The ISA is chosen once at run time from the CPU's features; rows are split over torch's
// intra-op threads (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "gguf_blocks.h"

namespace gguf_avx512 {
void gemv(int, const uint8_t*, int64_t, const QuantX&, int64_t, int64_t, int64_t, float*);
void dequant(int, const uint8_t*, int64_t, int64_t, int64_t, float*);
void gemv_f32(int, const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
              int64_t, float*);
void dequant_f32(int, const uint8_t*, int64_t, int64_t, int64_t, float*);
}  // namespace gguf_avx512
namespace gguf_generic {
void gemv(int, const uint8_t*, int64_t, const QuantX&, int64_t, int64_t, int64_t, float*);
void dequant(int, const uint8_t*, int64_t, int64_t, int64_t, float*);
void gemv_f32(int, const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
              int64_t, float*);
}  // namespace gguf_generic
namespace gguf_avx2 {
void gemv_f32(int, const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
              int64_t, float*);
void dequant_f32(int, const uint8_t*, int64_t, int64_t, int64_t, float*);
void prepare_x16(const float*, int64_t, int64_t, int16_t*, float*, float*, float*);
void gemv_x16(int, const uint8_t*, int64_t, const int16_t*, const float*, const float*,
              const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
}  // namespace gguf_avx2

namespace {

std::atomic<bool> force_portable{false};

bool use_avx512() {
  if (force_portable.load(std::memory_order_relaxed)) return false;
  static const bool ok = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

// AVX2 + FMA + F16C without AVX512-VNNI (e.g. AMD Zen 2/3): the float kernel and the
// dequantizer have an AVX2 body; the int8 `mm` runs the portable one.
bool use_avx2() {
  if (force_portable.load(std::memory_order_relaxed)) return false;
  static const bool ok = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return ok;
}

// Output rows [0, n) split over the intra-op threads, about four ranges a thread (at least
// 16 rows each); every row is computed by one thread, so results do not depend on the split.
template <typename F>
void for_row_ranges(int64_t n, const F& body) {
  const int64_t grain = std::max<int64_t>(16, n / (4 * at::get_num_threads()));
  at::parallel_for(0, n, grain, body);
}

void check_weight(const at::Tensor& w, int64_t qtype, int64_t k) {
  const int be = block_elems((int)qtype), bb = block_bytes((int)qtype);
  TORCH_CHECK(bb > 0, "GGUF type ", qtype, " has no packed kernel");
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "packed GGUF weight must be a contiguous CPU uint8 [N, row_bytes] tensor");
  TORCH_CHECK(k % be == 0, "K=", k, " is not a multiple of the block size ", be);
  TORCH_CHECK(w.size(1) == k / be * bb, "packed row has ", w.size(1), " bytes, expected ",
              k / be * bb, " for K=", k);
}

// The weight and x of a matmul op checked; x as contiguous float32 [M, K].
at::Tensor checked_x(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k) {
  check_weight(w, qtype, k);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "x must be [M, ", k, "]");
  return x_in.to(at::kFloat).contiguous();
}

// x[m, k] float32 -> int8 per 32-group, scale and half-group sums.
void quantize_x(const float* x, int64_t m, int64_t k, int8_t* xq, float* dx, float* xs,
                float* xsum, float* xd, int8_t* xp) {
  const int64_t groups = k / 32;
  for (int64_t i = 0; i < m; i++) {
    for (int64_t g = 0; g < groups; g++) {
      const float* v = x + i * k + g * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = xq + i * k + g * 32;
      int32_t s0 = 0, s1 = 0;
      for (int j = 0; j < 32; j++) {
        q[j] = (int8_t)std::nearbyint(v[j] * inv);
        (j < 16 ? s0 : s1) += q[j];
      }
      dx[i * groups + g] = d;
      xs[(i * groups + g) * 2] = d * s0;
      xs[(i * groups + g) * 2 + 1] = d * s1;
      xsum[i * groups + g] = d * (s0 + s1);
      for (int j = 0; j < 8; j++) xd[(i * groups + g) * 8 + j] = d;
    }
    std::memcpy(xp + i * k, xq + i * k, k);
    for (int64_t g = 0; g + 2 <= groups; g += 2) {  // pair order of QuantX::xp
      const int8_t* a = xq + i * k + g * 32;
      int8_t* o = xp + i * k + g * 32;
      std::memcpy(o, a, 16);
      std::memcpy(o + 16, a + 32, 16);
      std::memcpy(o + 32, a + 16, 16);
      std::memcpy(o + 48, a + 48, 16);
    }
  }
}

// y = x @ W^T with W packed: integer dot products against x quantized to int8.
at::Tensor gguf_mm(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k) {
  const at::Tensor x = checked_x(x_in, w, qtype, k);
  const int64_t m = x.size(0), n = w.size(0), groups = k / 32;
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  // One reused workspace per calling thread (a decode step calls this ~120 times; seven
  // allocations each cost more than the small matrices' arithmetic).
  thread_local std::vector<float> ws;
  const size_t nf = (size_t)(m * groups * (1 + 2 + 1 + 8)), nb = (size_t)(2 * m * k);
  ws.resize(nf + (nb + 3) / 4);
  float* dx = ws.data();
  float* xs = dx + m * groups;
  float* xsum = xs + m * groups * 2;
  float* xd = xsum + m * groups;
  int8_t* xq = reinterpret_cast<int8_t*>(ws.data() + nf);
  int8_t* xp = xq + m * k;
  quantize_x(x.data_ptr<float>(), m, k, xq, dx, xs, xsum, xd, xp);
  const QuantX qx{xq, dx, xs, xsum, xd, xp, m, k};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
  float* yp = y.data_ptr<float>();
  const bool avx = use_avx512();
  for_row_ranges(n, [&](int64_t n0, int64_t n1) {
    if (avx) {
      gguf_avx512::gemv((int)qtype, wp, row_bytes, qx, n0, n1, n, yp);
    } else {
      gguf_generic::gemv((int)qtype, wp, row_bytes, qx, n0, n1, n, yp);
    }
  });
  return y;
}

// y = x @ W^T with W packed and x in float32, not rounded: the weights are dequantized in
// registers and multiplied by FMAs. Each y[m, r] is computed by one thread in an order that
// depends neither on M nor on the split of N over threads (batch-invariant, deterministic).
at::Tensor gguf_mm_f32(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k) {
  const at::Tensor x = checked_x(x_in, w, qtype, k);
  const int64_t m = x.size(0), n = w.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* xp = x.data_ptr<float>();
  const int64_t row_bytes = w.size(1);
  float* yp = y.data_ptr<float>();
  const bool avx = use_avx512(), avx2 = !avx && use_avx2();
  for_row_ranges(n, [&](int64_t n0, int64_t n1) {
    if (avx) {
      gguf_avx512::gemv_f32((int)qtype, wp, row_bytes, xp, m, k, n0, n1, n, yp);
    } else if (avx2) {
      gguf_avx2::gemv_f32((int)qtype, wp, row_bytes, xp, m, k, n0, n1, n, yp);
    } else {
      gguf_generic::gemv_f32((int)qtype, wp, row_bytes, xp, m, k, n0, n1, n, yp);
    }
  });
  return y;
}

// y = x @ W^T with W packed and x rounded to int16 per 32-group (gguf_x16_avx2.h): the
// decode kernel on AVX2 CPUs; elsewhere the float kernel (mm_f32). Batch-invariant and
// deterministic like mm_f32.
at::Tensor gguf_mm_x16(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype, int64_t k) {
  if (use_avx512() || !use_avx2()) return gguf_mm_f32(x_in, w, qtype, k);
  const at::Tensor x = checked_x(x_in, w, qtype, k);
  const int64_t m = x.size(0), n = w.size(0), groups = k / 32;
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  thread_local std::vector<float> ws;  // dx, S16, S32, then xq (int16)
  const size_t nf = (size_t)(m * groups * 4);
  ws.resize(nf + (size_t)(m * k + 1) / 2);
  float* dx = ws.data();
  float* S16 = dx + m * groups;
  float* S32 = S16 + m * 2 * groups;
  int16_t* xq = reinterpret_cast<int16_t*>(ws.data() + nf);
  gguf_avx2::prepare_x16(x.data_ptr<float>(), m, k, xq, dx, S16, S32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
  float* yp = y.data_ptr<float>();
  for_row_ranges(n, [&](int64_t n0, int64_t n1) {
    gguf_avx2::gemv_x16((int)qtype, wp, row_bytes, xq, dx, S16, S32, m, k, n0, n1, n, yp);
  });
  return y;
}

// W [N, K] float32 from its packed rows.
at::Tensor gguf_dequantize(const at::Tensor& w, int64_t qtype, int64_t k) {
  check_weight(w, qtype, k);
  const int64_t n = w.size(0), row_bytes = w.size(1);
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const bool avx = use_avx512(), avx2 = !avx && use_avx2();
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    if (avx) {
      gguf_avx512::dequant_f32((int)qtype, wp + n0 * row_bytes, row_bytes, n1 - n0, k, op + n0 * k);
    } else if (avx2) {
      gguf_avx2::dequant_f32((int)qtype, wp + n0 * row_bytes, row_bytes, n1 - n0, k, op + n0 * k);
    } else {
      gguf_generic::dequant((int)qtype, wp + n0 * row_bytes, row_bytes, n1 - n0, k, op + n0 * k);
    }
  });
  return out;
}

// y = x @ W^T with W dequantized a tile of rows at a time into float32 for torch's GEMM
// (prefill: many rows of x amortise the dequantization).
at::Tensor gguf_mm_dequant(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype,
                           int64_t k, int64_t tile_rows) {
  check_weight(w, qtype, k);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t n = w.size(0);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  TORCH_CHECK(tile_rows > 0, "tile_rows must be positive");
  auto tile = [&](int64_t r0) {
    const int64_t r1 = std::min(n, r0 + tile_rows);
    const at::Tensor t = gguf_dequantize(w.narrow(0, r0, r1 - r0), qtype, k);
    y.narrow(1, r0, r1 - r0).copy_(at::matmul(x, t.t()));
  };
  const int64_t tiles = (n + tile_rows - 1) / tile_rows;
  if (at::get_num_threads() > 1 && tiles >= 2 * at::get_num_threads()) {
    // Tiles split over the threads, each dequantized and multiplied by one thread (ATen's
    // nested parallel regions run inline, the GEMM single-threaded): no fork/join per
    // small tile GEMM, which made two threads slower than one.
    const bool inference = c10::InferenceMode::is_enabled();  // thread-local: carry it over
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      c10::InferenceMode guard(inference);
      for (int64_t t = t0; t < t1; t++) tile(t * tile_rows);
    });
  } else {
    for (int64_t t = 0; t < tiles; t++) tile(t * tile_rows);
  }
  return y;
}

// 1: AVX512-VNNI, 2: AVX2 (float kernel and dequantizer; int8 `mm` portable), 0: portable.
int64_t gguf_isa() { return use_avx512() ? 1 : use_avx2() ? 2 : 0; }

// Tests: run the portable C++ kernels even where the CPU has AVX512-VNNI or AVX2.
void gguf_set_portable(bool on) { force_portable.store(on); }

}  // namespace

TORCH_LIBRARY(pagedllm_gguf, m) {
  m.def("mm(Tensor x, Tensor w, int qtype, int k) -> Tensor");
  m.def("mm_f32(Tensor x, Tensor w, int qtype, int k) -> Tensor");
  m.def("mm_x16(Tensor x, Tensor w, int qtype, int k) -> Tensor");
  m.def("mm_dequant(Tensor x, Tensor w, int qtype, int k, int tile_rows) -> Tensor");
  m.def("dequantize(Tensor w, int qtype, int k) -> Tensor");
  m.def("isa() -> int", &gguf_isa);
  m.def("set_portable(bool on) -> ()", &gguf_set_portable);
  m.impl("mm", c10::DispatchKey::CPU, TORCH_FN(gguf_mm));
  m.impl("mm_f32", c10::DispatchKey::CPU, TORCH_FN(gguf_mm_f32));
  m.impl("mm_x16", c10::DispatchKey::CPU, TORCH_FN(gguf_mm_x16));
  m.impl("mm_dequant", c10::DispatchKey::CPU, TORCH_FN(gguf_mm_dequant));
  m.impl("dequantize", c10::DispatchKey::CPU, TORCH_FN(gguf_dequantize));
}
