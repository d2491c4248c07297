// y[m, r] = sum_k x[m, k] * W[r, k] for a packed GGUF matrix, x float32 and not rounded, on
// AVX2 + FMA + F16C (8 float lanes, 16 vector registers): the AVX2 counterpart of
// gguf_f32_impl.h's AVX512 body.
//
// Method: the affine dequantization w = a q + b of each 32-weight group (16-weight half for
// Q6_K) is factored out of the inner loop,
//   x . (a q + b) = a (x . q) + b sum(x),
// so each weight costs its unpack, one int -> float conversion and one FMA with x (not a
// second FMA to dequantize it first); a group's x . q goes into its own accumulator, scaled
// by a into the row's total with one FMA per group. The sums of x over each group and half
// group are computed once per call for every row of x and shared by all N weight rows; the
// b terms of a weight row are one dot product of its b with those sums at the end (K-quants:
// b from the row's scale pass; 32-weight types: b accumulated per group). This rounds
// differently from dequantize-then-multiply (x . q in float, then times a), within float32
// accuracy of the exact product (tests/model_executor/test_gguf_kernels.py).
//
// Batch invariance: a row of x goes through the same operations in the same order whatever M
// and the thread split are: its accumulators are its own (two totals, groups alternating),
// units of groups are visited in order, its sums of x are computed from that row alone, and
// the final reductions are fixed. Rows of x are taken 4, 2 or 1 at a time only to share each
// unpacked, converted group.
// Included once inside namespace gguf_avx2 by gguf_avx2.cpp (which sets the target ISA); the
// row loops are in gguf_avx2_rows.h (shared with the int16 kernel).

// Tuning (measured on an AMD EPYC Zen 3, docs/benchmarks.md): weight rows a pass at M = 1,
// most x rows a pass, software prefetch distance in bytes of the weight stream.
#ifndef GGUF_AVX2_RB
#define GGUF_AVX2_RB 2
#endif
#ifndef GGUF_AVX2_MB
#define GGUF_AVX2_MB 4
#endif
#ifndef GGUF_AVX2_PF
#define GGUF_AVX2_PF 2048
#endif
#ifndef GGUF_AVX2_MBLK  // weight rows a block when M > 4
#define GGUF_AVX2_MBLK 8
#endif

#define GGUF_INLINE inline __attribute__((always_inline))
#define GGUF_LAMBDA_INLINE __attribute__((always_inline))

// The 8 lanes of v added in a fixed order.
static GGUF_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static GGUF_INLINE __m256i load8_u8(const uint8_t* p) {  // 8 bytes -> 8 uint32 lanes
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
}

static GGUF_INLINE float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Groups per unpack unit: the groups that share quant bytes unpack together.
template <int T>
constexpr int unit_groups() {
  return T == kQ6_K ? 4 : (T == kQ4_K || T == kQ5_K) ? 2 : 1;
}

// Unit u of a row (groups u * unit_groups .. +unit_groups) unpacked: f(j, c, q) gets the
// weights 8 c .. 8 c + 7 of the unit's group j as floats q (exact small integers), every
// (j, c) once, in an order fixed by the type (c ascending for each j); OJ >= 0: group OJ only
// (the others' unpack is dead code).
template <int T, int OJ = -1, class F>
static GGUF_INLINE void unpack_unit(const uint8_t* row, int64_t u, F&& f) {
  auto emit = [&](int j, int c, __m256 q) GGUF_LAMBDA_INLINE {
    if (OJ < 0 || j == OJ) f(j, c, q);
  };
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  if constexpr (T == kQ4_K || T == kQ5_K) {
    constexpr int bb = T == kQ4_K ? 144 : 176;
    const uint8_t* blk = row + (u >> 2) * bb;
    const int p = (int)(u & 3);  // groups 2 p (low nibbles), 2 p + 1 (high) of the block
    const uint8_t* qs = blk + (T == kQ4_K ? 16 : 48) + 32 * p;
    for (int c = 0; c < 4; c++) {
      const __m256i v = load8_u8(qs + 8 * c);
      __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_srli_epi32(v, 4);
      if constexpr (T == kQ5_K) {  // bit 2 p / 2 p + 1 of qh[j] is bit 4 of q
        const __m256i b16 = _mm256_set1_epi32(0x10);
        const __m256i t = _mm256_srl_epi32(load8_u8(blk + 16 + 8 * c), _mm_cvtsi32_si128(2 * p));
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi32(t, 4), b16));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi32(t, 3), b16));
      }
      emit(0, c, _mm256_cvtepi32_ps(lo));
      emit(1, c, _mm256_cvtepi32_ps(hi));
    }
  } else if constexpr (T == kQ6_K) {  // u: one 128-weight half of a block, groups t = 0..3
    const uint8_t* blk = row + (u >> 1) * 210;
    const int half = (int)(u & 1);
    const uint8_t* ql = blk + 64 * half;
    const uint8_t* qh = blk + 128 + 32 * half;
    const __m256i c30 = _mm256_set1_epi32(0x30);
    for (int c = 0; c < 4; c++) {
      const __m256i l0 = load8_u8(ql + 8 * c), l1 = load8_u8(ql + 32 + 8 * c);
      const __m256i h = load8_u8(qh + 8 * c);
      // 6-bit q = low 4 bits | (2 bits of qh) << 4
      emit(0, c, _mm256_cvtepi32_ps(_mm256_or_si256(
                  _mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi32(h, 4), c30))));
      emit(1, c, _mm256_cvtepi32_ps(_mm256_or_si256(
                  _mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi32(h, 2), c30))));
      emit(2, c, _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(l0, 4),
                                                 _mm256_and_si256(h, c30))));
      emit(3, c, _mm256_cvtepi32_ps(_mm256_or_si256(
                  _mm256_srli_epi32(l1, 4), _mm256_and_si256(_mm256_srli_epi32(h, 2), c30))));
    }
  } else if constexpr (T == kQ8_0) {
    const uint8_t* q = row + u * 34 + 2;
    for (int c = 0; c < 4; c++) {
      emit(0, c, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * c)))));
    }
  } else {  // Q4_0 / Q4_1 / Q5_0 / Q5_1: weights 0-15 low nibbles of 16 bytes, 16-31 high
    constexpr int bb = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : T == kQ5_0 ? 22 : 24;
    const uint8_t* blk = row + u * bb;
    const uint8_t* qs = blk + bb - 16;
    const __m256i v0 = load8_u8(qs), v1 = load8_u8(qs + 8);
    __m256i q[4] = {_mm256_and_si256(v0, m4), _mm256_and_si256(v1, m4), _mm256_srli_epi32(v0, 4),
                    _mm256_srli_epi32(v1, 4)};
    if constexpr (T == kQ5_0 || T == kQ5_1) {  // bit j of qh is bit 4 of weight j
      uint32_t qh;
      std::memcpy(&qh, blk + bb - 20, 4);
      const __m256i hv = _mm256_set1_epi32((int)qh);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i one = _mm256_set1_epi32(1);
      for (int c = 0; c < 4; c++) {
        const __m256i bit = _mm256_and_si256(
            _mm256_srlv_epi32(hv, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * c))), one);
        q[c] = _mm256_or_si256(q[c], _mm256_slli_epi32(bit, 4));
      }
    }
    for (int c = 0; c < 4; c++) emit(0, c, _mm256_cvtepi32_ps(q[c]));
  }
}

// The per-group (Q6_K: per half group) scales of a K-quant row: w = A[i] q + B[i], i = g for
// Q4_K / Q5_K, 2 g + half for Q6_K; the same floats as gguf_f32_impl.h's row_scales.
template <int T>
static void row_scales_k(const uint8_t* row, int64_t groups, float* A, float* B) {
  if constexpr (T == kQ4_K || T == kQ5_K) {
    constexpr int bb = T == kQ4_K ? 144 : 176;
    for (int64_t s = 0; s < groups / 8; s++) {
      const uint8_t* blk = row + s * bb;
      uint32_t u0, u1, u2;  // the 12 bytes of 6-bit scales and mins (see scale_min_k4)
      std::memcpy(&u0, blk + 4, 4);
      std::memcpy(&u1, blk + 8, 4);
      std::memcpy(&u2, blk + 12, 4);
      const uint32_t sc_lo = u0 & 0x3F3F3F3Fu, mn_lo = u1 & 0x3F3F3F3Fu;
      const uint32_t sc_hi = (u2 & 0x0F0F0F0Fu) | (((u0 >> 6) & 0x03030303u) << 4);
      const uint32_t mn_hi = ((u2 >> 4) & 0x0F0F0F0Fu) | (((u1 >> 6) & 0x03030303u) << 4);
      const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(sc_lo, sc_hi, 0, 0)));
      const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(mn_lo, mn_hi, 0, 0)));
      _mm256_storeu_ps(A + 8 * s, _mm256_mul_ps(sc, _mm256_set1_ps(half_at(blk))));
      _mm256_storeu_ps(B + 8 * s, _mm256_mul_ps(mn, _mm256_set1_ps(-half_at(blk + 2))));
    }
  } else {  // Q6_K: 16 int8 scales per 256 weights, in the order of (group, half)
    for (int64_t s = 0; s < groups / 8; s++) {
      const uint8_t* blk = row + s * 210;
      const __m256 d = _mm256_set1_ps(half_at(blk + 208));
      for (int h = 0; h < 2; h++) {
        const __m256 sc = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 192 + 8 * h))));
        const __m256 a = _mm256_mul_ps(sc, d);
        _mm256_storeu_ps(A + 16 * s + 8 * h, a);
        _mm256_storeu_ps(B + 16 * s + 8 * h, _mm256_mul_ps(a, _mm256_set1_ps(-32.f)));
      }
    }
  }
}

// A 32-weight block type's (a, b) for group g: w = a q + b.
template <int T>
static GGUF_INLINE void block_ab(const uint8_t* row, int64_t g, float* a, float* b) {
  constexpr int bb = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : T == kQ5_0 ? 22 : T == kQ5_1 ? 24 : 34;
  const uint8_t* blk = row + g * bb;
  *a = half_at(blk);
  *b = T == kQ4_0 ? *a * -8.f : T == kQ5_0 ? *a * -16.f
     : (T == kQ4_1 || T == kQ5_1) ? half_at(blk + 2) : 0.f;
}

// Sums of each row of x[m, k] over its half groups (S16[m, k / 16]) and groups (S32[m, k / 32],
// the two halves added), each from that row alone in a fixed order.
static void x_sums(const float* x, int64_t m, int64_t k, float* S16, float* S32) {
  for (int64_t i = 0; i < m; i++) {
    for (int64_t h = 0; h < k / 16; h++) {
      const float* v = x + i * k + 16 * h;
      S16[i * (k / 16) + h] = hsum8(_mm256_add_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)));
    }
    for (int64_t g = 0; g < k / 32; g++)
      S32[i * (k / 32) + g] = S16[i * (k / 16) + 2 * g] + S16[i * (k / 16) + 2 * g + 1];
  }
}

// Rows [0, n) dequantized to out[n, k]: w = a q + b by one FMA (the same floats as gguf's
// reference and the AVX512 body).
template <int T>
static void dequant_rows_f32(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k,
                             float* out) {
  constexpr int UG = unit_groups<T>();
  constexpr int H = T == kQ6_K ? 2 : 1;
  const int64_t groups = k / 32;
  thread_local std::vector<float> scales;
  if ((int64_t)scales.size() < 4 * groups + 32) scales.resize(4 * groups + 32);
  float* A = scales.data();
  float* B = A + 2 * groups + 16;
  for (int64_t r = 0; r < n; r++) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * k;
    if constexpr (T >= kQ4_K) {
      row_scales_k<T>(row, groups, A, B);
    } else {
      for (int64_t g = 0; g < groups; g++) block_ab<T>(row, g, A + g, B + g);
    }
    for (int64_t u = 0; u < groups / UG; u++) {
      unpack_unit<T>(row, u, [&](int j, int c, __m256 q) GGUF_LAMBDA_INLINE {
        const int64_t i = H * (u * UG + j) + (H == 2 ? c >> 1 : 0);
        const __m256 v = T == kQ8_0 ? _mm256_mul_ps(_mm256_set1_ps(A[i]), q)
                                    : _mm256_fmadd_ps(q, _mm256_set1_ps(A[i]), _mm256_set1_ps(B[i]));
        _mm256_storeu_ps(o + (u * UG + j) * 32 + 8 * c, v);
      });
    }
  }
}

void dequant_f32(int qtype, const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k,
                 float* out) {
  switch (qtype) {
    case kQ4_0: dequant_rows_f32<kQ4_0>(w, row_bytes, n, k, out); break;
    case kQ4_1: dequant_rows_f32<kQ4_1>(w, row_bytes, n, k, out); break;
    case kQ5_0: dequant_rows_f32<kQ5_0>(w, row_bytes, n, k, out); break;
    case kQ5_1: dequant_rows_f32<kQ5_1>(w, row_bytes, n, k, out); break;
    case kQ8_0: dequant_rows_f32<kQ8_0>(w, row_bytes, n, k, out); break;
    case kQ4_K: dequant_rows_f32<kQ4_K>(w, row_bytes, n, k, out); break;
    case kQ5_K: dequant_rows_f32<kQ5_K>(w, row_bytes, n, k, out); break;
    case kQ6_K: dequant_rows_f32<kQ6_K>(w, row_bytes, n, k, out); break;
    default: break;
  }
}

