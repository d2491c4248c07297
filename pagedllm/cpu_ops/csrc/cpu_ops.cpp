// torch ops over the CPU decode-step kernels: torch.ops.pagedllm_cpu.*. Each checks its
// tensors (CPU, float32 or bfloat16, the strides the kernels assume), picks the ISA once
// from the CPU's features and splits rows or (request, KV head) pairs over torch's intra-op
// threads when there is enough work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cpu_kernels.h"

namespace {

std::atomic<bool> force_portable{false};

bool use_avx512() {
  if (force_portable.load(std::memory_order_relaxed)) return false;
  static const bool ok = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

// AVX2 + FMA without AVX-512 (e.g. AMD Zen 2/3).
bool use_avx2() {
  if (force_portable.load(std::memory_order_relaxed)) return false;
  static const bool ok = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return ok;
}

#define CPU_DISPATCH(fn, ...)                                           \
  (use_avx512() ? cpu_avx512::fn(__VA_ARGS__)                           \
                : use_avx2() ? cpu_avx2::fn(__VA_ARGS__) : cpu_generic::fn(__VA_ARGS__))

using u16 = uint16_t;

bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, not ", t.scalar_type());
}

void check_rows(const at::Tensor& t, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, d] with unit stride");
}

template <typename F>
void over_rows(int64_t rows, int64_t d, const F& f) {
  // Parallel only past ~64k elements: a decode's one row runs inline (no thread wake-up).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, f);
}

// ---- torch's float sum of one contiguous row, in torch's own order -----------------------
// at::sum over a contiguous inner dimension (ATen/native/cpu/SumKernel.cpp): rows of at least
// one vector are summed as vectors (W float lanes, the build's Vectorized<float>), 4 of them
// interleaved, in a 4-level cascade; the tail and then the lanes are added in order. Each
// lane is a sequence of IEEE float adds, so emulating the lanes in scalar code gives the same
// bits. Checked against at::mean once per row width (`torch_lanes`), which also finds W; a
// torch whose order differs keeps calling at::mean.

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// multi_row_sum<nrows=4>: element (i, k) = v[(i * 4 + k) * W + lane] for `size` i.
template <int W>
void multi_row_sum4(const float* v, int64_t size, float (&out)[4][W]) {
  constexpr int levels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / levels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  float acc[levels][4][W] = {};
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) acc[0][k][l] += v[(i * 4 + k) * W + l];
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += v[(i * 4 + k) * W + l];
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  std::memcpy(out, acc[0], sizeof(out));
}

// row_sum over `n` items of W lanes each (W = 1: scalars).
template <int W>
void row_sum(const float* v, int64_t n, float (&lanes)[W]) {
  const int64_t n_ilp = n / 4;
  float part[4][W];
  multi_row_sum4<W>(v, n_ilp, part);
  for (int64_t i = n_ilp * 4; i < n; ++i)
    for (int l = 0; l < W; ++l) part[0][l] += v[i * W + l];
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < W; ++l) part[0][l] += part[k][l];
  std::memcpy(lanes, part[0], sizeof(lanes));
}

template <int W>
float torch_row_sum(const float* v, int64_t d) {
  if (d < W) {  // scalar_inner_sum
    float one[1];
    row_sum<1>(v, d, one);
    return one[0];
  }
  const int64_t nvec = d / W;
  float lanes[W];
  row_sum<W>(v, nvec, lanes);
  float acc = 0.f;
  for (int64_t k = nvec * W; k < d; ++k) acc += v[k];
  for (int l = 0; l < W; ++l) acc += lanes[l];
  return acc;
}

float torch_mean_sq(const float* sq, int64_t d, int lanes) {
  const float sum = lanes == 16 ? torch_row_sum<16>(sq, d) : torch_row_sum<8>(sq, d);
  return sum / static_cast<float>(d);
}

// The vector width (16 or 8 lanes) whose order reproduces at::mean for rows of width d, or
// 0 when neither does; found once per d on random rows.
int torch_lanes(int64_t d) {
  static std::mutex mu;
  static std::unordered_map<int64_t, int> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(d);
  if (it != known.end()) return it->second;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
  const at::Tensor x = at::randn({8, d}, gen, at::kFloat) * 3;
  const at::Tensor sq = at::pow(x, 2);
  const at::Tensor ref = at::mean(sq, {-1}).contiguous();
  int found = 0;
  for (int lanes : {16, 8}) {
    bool ok = true;
    for (int64_t r = 0; r < 8 && ok; ++r) {
      const float m = torch_mean_sq(sq.data_ptr<float>() + r * d, d, lanes);
      ok = std::memcmp(&m, ref.data_ptr<float>() + r, 4) == 0;
    }
    if (ok) {
      found = lanes;
      break;
    }
  }
  known[d] = found;
  return found;
}

// [rows] mean of squares of src's rows, as at::mean(at::pow(src.float(), 2), -1) computes it.
at::Tensor mean_of_squares(const at::Tensor& src) {
  const int64_t rows = src.size(0), d = src.size(1);
  const int lanes = d > 65536 ? 0 : torch_lanes(d);
  if (lanes == 0)
    return at::mean(at::pow(is_bf16(src) ? src.to(at::kFloat) : src, 2), {-1}).contiguous();
  at::Tensor ms = at::empty({rows}, src.options().dtype(at::kFloat));
  float* msp = ms.data_ptr<float>();
  std::vector<float> sq(d);
  const int64_t es = src.element_size();
  const char* base = static_cast<const char*>(src.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = base + r * src.stride(0) * es;
    if (is_bf16(src)) {
      const u16* p = reinterpret_cast<const u16*>(row);
      for (int64_t i = 0; i < d; ++i) {
        uint32_t u = static_cast<uint32_t>(p[i]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        sq[i] = f * f;
      }
    } else {
      const float* p = reinterpret_cast<const float*>(row);
      for (int64_t i = 0; i < d; ++i) sq[i] = p[i] * p[i];
    }
    msp[r] = torch_mean_sq(sq.data(), d, lanes);
  }
  return ms;
}

void rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor* res,
                   const at::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t rows = x.size(0), d = x.size(1);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must match x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == d && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(), "weight must be [d] in x's dtype");
  if (res != nullptr) {
    check_rows(*res, "residual");
    TORCH_CHECK(res->sizes() == x.sizes() && res->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  const float e = static_cast<float>(eps);
  if (res != nullptr) {
    if (is_bf16(x)) {
      auto xp = reinterpret_cast<const u16*>(x.data_ptr());
      auto rp = reinterpret_cast<u16*>(res->data_ptr());
      over_rows(rows, d, [&](int64_t r0, int64_t r1) {
        CPU_DISPATCH(residual_add_bf16, xp, x.stride(0), rp, res->stride(0), r0, r1, d);
      });
    } else {
      const float* xp = x.data_ptr<float>();
      float* rp = res->data_ptr<float>();
      over_rows(rows, d, [&](int64_t r0, int64_t r1) {
        CPU_DISPATCH(residual_add_f32, xp, x.stride(0), rp, res->stride(0), r0, r1, d);
      });
    }
  }
  const at::Tensor& src = res != nullptr ? *res : x;
  // torch's mean of squares (its reduction order): the result equals torch's rms_norm
  // (HF's arithmetic) bit for bit.
  const at::Tensor ms = mean_of_squares(src);
  const float* msp = ms.data_ptr<float>();
  if (is_bf16(x)) {
    auto sp = reinterpret_cast<const u16*>(src.data_ptr());
    auto op = reinterpret_cast<u16*>(out.data_ptr());
    auto wp = reinterpret_cast<const u16*>(w.data_ptr());
    over_rows(rows, d, [&](int64_t r0, int64_t r1) {
      CPU_DISPATCH(rms_apply_bf16, sp, src.stride(0), msp, op, out.stride(0), wp, r0, r1, d, e);
    });
  } else {
    const float* sp = src.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    over_rows(rows, d, [&](int64_t r0, int64_t r1) {
      CPU_DISPATCH(rms_apply_f32, sp, src.stride(0), msp, op, out.stride(0), wp, r0, r1, d, e);
    });
  }
}

void rms_norm(at::Tensor out, at::Tensor x, at::Tensor w, double eps) {
  rms_norm_impl(out, x, nullptr, w, eps);
}

void fused_add_rms_norm(at::Tensor out, at::Tensor x, at::Tensor residual, at::Tensor w,
                        double eps) {
  rms_norm_impl(out, x, &residual, w, eps);
}

// ---- SiLU-and-mul in one pass, bit for bit at::silu's ------------------------------------
// at::silu runs one thread below at::internal::GRAIN_SIZE elements; above, its split points
// could move which elements take its scalar tail, so larger calls keep at::silu.
constexpr int64_t kTorchGrain = 32768;

void silu_mul_kernel(at::Tensor& out, const at::Tensor& x, int64_t rows, int64_t d) {
  const bool avx512 = use_avx512();
  if (is_bf16(x)) {
    const u16* xp = reinterpret_cast<const u16*>(x.data_ptr());
    u16* op = reinterpret_cast<u16*>(out.data_ptr());
    (avx512 ? cpu_avx512::silu_mul_bf16 : cpu_avx2::silu_mul_bf16)(xp, x.stride(0), op,
                                                                   out.stride(0), 0, rows, d);
  } else {
    (avx512 ? cpu_avx512::silu_mul_f32 : cpu_avx2::silu_mul_f32)(
        x.data_ptr<float>(), x.stride(0), out.data_ptr<float>(), out.stride(0), 0, rows, d);
  }
}

// Whether the AVX-512 (or AVX2) kernel gives at::silu(gate) * up's bits for rows of width d
// in this dtype (this torch, this CPU capability): checked once per (ISA, dtype, d) on random
// rows with the exp's edge values (under/overflow, zeros); false on the portable build.
bool silu_kernel_matches(at::ScalarType dtype, int64_t d) {
  const bool avx512 = use_avx512();
  if ((!avx512 && !use_avx2()) || d <= 0) return false;
  static std::mutex mu;
  static std::unordered_map<int64_t, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  const int64_t key = (d * 2 + (dtype == at::kBFloat16 ? 1 : 0)) * 2 + (avx512 ? 1 : 0);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4321);
  const int64_t n = d > kTorchGrain / 4 ? 1 : 4;  // at::silu below stays on one thread
  at::Tensor xf = at::randn({n, 2 * d}, gen, at::kFloat) * 6;
  const float edges[] = {0.f, -0.f, -88.f, 88.f, -104.f, 104.f, 1e-30f, -1e-30f, 20.f, -20.f};
  for (int64_t i = 0; i < std::min<int64_t>(d, 10); ++i) xf.data_ptr<float>()[i] = edges[i];
  const at::Tensor xt = xf.to(dtype);
  const at::Tensor ref = (at::silu(xt.narrow(1, 0, d)) * xt.narrow(1, d, d)).contiguous();
  at::Tensor got = at::empty({n, d}, xt.options());
  silu_mul_kernel(got, xt, n, d);
  const bool ok = std::memcmp(ref.data_ptr(), got.data_ptr(), ref.nbytes()) == 0;
  known[key] = ok;
  return ok;
}

void silu_and_mul(at::Tensor out, at::Tensor x) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  TORCH_CHECK(x.size(1) == 2 * d && out.size(0) == rows && out.size(1) == d &&
                  out.scalar_type() == x.scalar_type(), "out must be [rows, d] for x [rows, 2d]");
  if (rows * d <= kTorchGrain && silu_kernel_matches(x.scalar_type(), d)) {
    // one pass, no TensorIterator (decode: ~12 -> ~4 us a call at d = 1536)
    silu_mul_kernel(out, x, rows, d);
    return;
  }
  // torch's own SiLU (its vectorised exp) and product: the torch path's result bit for bit,
  // one Python-level call instead of three.
  at::silu_out(out, x.narrow(1, 0, d));
  out.mul_(x.narrow(1, d, d));
}

void rope(at::Tensor positions, at::Tensor q, at::Tensor k, at::Tensor cos_sin,
          int64_t head_size, bool neox) {
  check_rows(q, "query");
  check_rows(k, "key");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "query and key dtypes differ");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong &&
                  positions.size(0) == q.size(0) && k.size(0) == q.size(0),
              "positions must be int64 [num_tokens]");
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.is_contiguous() &&
                  cos_sin.scalar_type() == at::kFloat, "cos_sin_cache must be float32 [P, rot]");
  const int64_t rot = cos_sin.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot <= head_size && rot <= 1024, "bad rotary dim ", rot);
  TORCH_CHECK(q.size(1) % head_size == 0 && k.size(1) % head_size == 0,
              "rows are not whole heads");
  const int64_t n = q.size(0), qh = q.size(1) / head_size, kh = k.size(1) / head_size;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_pos = cos_sin.size(0);
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " out of range");
  const float* cs = cos_sin.data_ptr<float>();
  const bool bf = is_bf16(q);
  char* qp = static_cast<char*>(q.data_ptr());
  char* kp = static_cast<char*>(k.data_ptr());
  const int64_t qs = q.stride(0) * q.element_size(), ks = k.stride(0) * k.element_size();
  over_rows(n, q.size(1) + k.size(1), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cs + pos[t] * rot;
      if (bf) {
        CPU_DISPATCH(rope_bf16, reinterpret_cast<u16*>(qp + t * qs), qh, head_size, c, rot, neox);
        CPU_DISPATCH(rope_bf16, reinterpret_cast<u16*>(kp + t * ks), kh, head_size, c, rot, neox);
      } else {
        CPU_DISPATCH(rope_f32, reinterpret_cast<float*>(qp + t * qs), qh, head_size, c, rot,
                     neox);
        CPU_DISPATCH(rope_f32, reinterpret_cast<float*>(kp + t * ks), kh, head_size, c, rot,
                     neox);
      }
    }
  });
}

void check_cache(const at::Tensor& kv_cache) {
  check_float(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be contiguous [2, num_blocks, block_size, num_kv_heads, head_dim]");
}

void write_kv(at::Tensor key, at::Tensor value, at::Tensor kv_cache, at::Tensor slot_mapping) {
  check_cache(kv_cache);
  const int64_t kvh = kv_cache.size(3), hs = kv_cache.size(4);
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->dim() == 3 && t->size(1) == kvh && t->size(2) == hs && t->stride(2) == 1 &&
                    t->stride(1) == hs && t->scalar_type() == kv_cache.scalar_type(),
                "key/value must be [num_tokens, num_kv_heads, head_dim] rows in the cache dtype");
  }
  const int64_t n = key.size(0);
  TORCH_CHECK(value.size(0) == n && slot_mapping.dim() == 1 && slot_mapping.size(0) >= n &&
                  slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64 [>= n]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t row = kvh * hs * kv_cache.element_size();
  char* kc = static_cast<char*>(kv_cache.data_ptr());
  char* vc = kc + num_slots * row;
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  const int64_t ks = key.stride(0) * key.element_size();
  const int64_t vs = value.stride(0) * value.element_size();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    TORCH_CHECK(s < num_slots, "slot ", s, " out of range (", num_slots, " slots)");
    std::memcpy(kc + s * row, kp + t * ks, row);
    std::memcpy(vc + s * row, vp + t * vs, row);
  }
}

void decode_attention(at::Tensor out, at::Tensor query, at::Tensor kv_cache,
                      at::Tensor block_table, at::Tensor seq_lens, at::Tensor rows,
                      at::Tensor reqs, double scale, int64_t window, double soft_cap) {
  check_cache(kv_cache);
  const int64_t block_size = kv_cache.size(2), kvh = kv_cache.size(3), hs = kv_cache.size(4);
  const int64_t num_slots = kv_cache.size(1) * block_size;
  for (const at::Tensor* t : {&query, &out}) {
    TORCH_CHECK(t->dim() == 3 && t->size(2) == hs && t->stride(2) == 1 &&
                    t->scalar_type() == kv_cache.scalar_type(),
                "query/out must be [num_tokens, num_heads, head_dim] in the cache dtype");
  }
  const int64_t nh = query.size(1);
  TORCH_CHECK(out.size(1) == nh && nh % kvh == 0, "num_heads must be a multiple of KV heads");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1, "block_table must be int32 [num_reqs, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous(), "seq_lens must be contiguous int32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && reqs.scalar_type() == at::kLong &&
                  rows.is_contiguous() && reqs.is_contiguous() && rows.numel() == reqs.numel(),
              "rows and reqs must be contiguous int64 of one length");
  const int64_t n = rows.numel(), group = nh / kvh;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* qp = reqs.data_ptr<int64_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t bts = block_table.stride(0), max_blocks = block_table.size(1);
  int64_t work = 0, max_len = 1;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < query.size(0) && rp[i] < out.size(0), "row out of range");
    TORCH_CHECK(qp[i] >= 0 && qp[i] < seq_lens.size(0) && qp[i] < block_table.size(0),
                "request index out of range");
    const int64_t len = lens[qp[i]];
    TORCH_CHECK(len >= 1 && (len + block_size - 1) / block_size <= max_blocks,
                "seq_len ", len, " does not fit the block table");
    const int32_t* table = bt + qp[i] * bts;
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[b] >= 0 && table[b] * block_size < num_slots, "block id out of range");
    const int64_t used = window > 0 ? std::min<int64_t>(len, window) : len;
    work += used;
    max_len = std::max(max_len, used);
  }
  const bool bf = is_bf16(query);
  const float sc = static_cast<float>(scale), cap = static_cast<float>(soft_cap);
  const int64_t es = query.element_size();
  const char* qbase = static_cast<const char*>(query.data_ptr());
  char* obase = static_cast<char*>(out.data_ptr());
  const char* kc = static_cast<const char*>(kv_cache.data_ptr());
  const char* vc = kc + num_slots * kvh * hs * es;
  const int64_t items = n * kvh;
  // Threads only past ~256k multiply-adds a chunk (a short single stream runs inline).
  const int64_t per_item = std::max<int64_t>(1, work / std::max<int64_t>(n, 1)) * group * hs;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_item);
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(decode_scratch_floats(group, hs, max_len));
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t i = it / kvh, h = it % kvh;
      const int64_t len = lens[qp[i]];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int32_t* table = bt + qp[i] * bts;
      const char* q = qbase + (rp[i] * query.stride(0) + h * group * query.stride(1)) * es;
      char* o = obase + (rp[i] * out.stride(0) + h * group * out.stride(1)) * es;
      if (bf) {
        CPU_DISPATCH(decode_attention_bf16, reinterpret_cast<const u16*>(q), query.stride(1),
                     reinterpret_cast<const u16*>(kc), reinterpret_cast<const u16*>(vc), table,
                     block_size, kvh, h, group, hs, start, len, sc, cap,
                     reinterpret_cast<u16*>(o), out.stride(1), scratch.data());
      } else {
        CPU_DISPATCH(decode_attention_f32, reinterpret_cast<const float*>(q), query.stride(1),
                     reinterpret_cast<const float*>(kc), reinterpret_cast<const float*>(vc),
                     table, block_size, kvh, h, group, hs, start, len, sc, cap,
                     reinterpret_cast<float*>(o), out.stride(1), scratch.data());
      }
    }
  });
}

int64_t cpu_isa() { return use_avx512() ? 1 : use_avx2() ? 2 : 0; }
bool silu_one_pass(int64_t d, bool bf16) {
  return silu_kernel_matches(bf16 ? at::kBFloat16 : at::kFloat, d);
}
void cpu_set_portable(bool on) { force_portable.store(on); }

}  // namespace

TORCH_LIBRARY(pagedllm_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor x, Tensor(b!) residual, Tensor weight, "
        "float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rope(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache, "
        "int head_size, bool neox) -> ()");
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
  m.def("decode_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor rows, Tensor reqs, float scale, int window, float soft_cap) "
        "-> ()");
  m.def("isa() -> int", &cpu_isa);
  m.def("silu_one_pass(int d, bool bf16) -> bool", &silu_one_pass);
  m.def("set_portable(bool on) -> ()", &cpu_set_portable);
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("fused_add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(fused_add_rms_norm));
  m.impl("silu_and_mul", c10::DispatchKey::CPU, TORCH_FN(silu_and_mul));
  m.impl("rope", c10::DispatchKey::CPU, TORCH_FN(rope));
  m.impl("write_kv", c10::DispatchKey::CPU, TORCH_FN(write_kv));
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
