// y[m, r] = sum_k x[m, k] * W[r, k] for a packed GGUF matrix with x rounded to int16 per
// 32-weight group (x ~= dx[g] * xq, |xq| <= 32767): the AVX2 decode kernel (`mm_x16`).
//
// Why: on AVX2 the float kernel (gguf_f32_avx2.h) spends one int -> float conversion and one
// FMA per weight after its unpack, and is bound by the vector ports (~30 operations per 64
// Q4_K weights). With x in int16 a weight is unpacked to a 16-bit lane and multiplied and
// pair-summed by vpmaddwd (16 weights an instruction); the conversion and the FMA with the
// group scale happen once per 8 pair sums (~16 operations per 64 weights): 1.4-1.5x the
// float kernel's rate on an AMD Zen 3 (docs/benchmarks.md).
//
// Numerics: x's rounding error is at most 2^-16 of its group's largest |x| (float32: 2^-24 of
// each value; bf16, what vLLM's CPU backend computes in: 2^-9), so y is within ~1e-5 of
// |x| . |w| (tests/model_executor/test_gguf_kernels.py); the affine offsets b of the weights
// multiply the float32 sums of x (not rounded). llama.cpp rounds x to int8 (2^-8).
//
// Batch invariance: as the float kernel: a row of x is rounded from that row alone, and its
// accumulators, visiting order and final reductions are the same whatever M and the thread
// split (integer sums are exact). Included after gguf_f32_avx2.h inside namespace gguf_avx2;
// the row loops are gguf_avx2_rows.h's (X16 = true).

// Each row of x[m, k] as int16 xq[m, k] and its per-group scale dx[m, k / 32]:
// xq = round-to-nearest-even(x * 32767 / max|x_group|).
static void quant_x16(const float* x, int64_t m, int64_t k, int16_t* xq, float* dx) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < m; i++)
    for (int64_t g = 0; g < k / 32; g++) {
      const float* v = x + i * k + 32 * g;
      __m256 f[4], mx = _mm256_setzero_ps();
      for (int c = 0; c < 4; c++) {
        f[c] = _mm256_loadu_ps(v + 8 * c);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, f[c]));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
      // A group so small that 32767 / amax overflows (amax < ~1e-34: denormal-scale x) is
      // rounded to zeros (its |x| . |w| is far below float32 resolution of any other term).
      const float scale = amax > 0.f ? 32767.f / amax : 0.f;
      const bool ok = scale <= 3.0e38f;
      dx[i * (k / 32) + g] = ok ? amax / 32767.f : 0.f;
      const __m256 inv = _mm256_set1_ps(ok ? scale : 0.f);
      for (int c = 0; c < 4; c += 2) {  // packs interleaves 128-bit lanes: permute back
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(f[c], inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(f[c + 1], inv));
        _mm256_storeu_si256((__m256i*)(xq + i * k + 32 * g + 8 * c),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
      }
    }
}

static GGUF_INLINE __m256i load16_u8(const uint8_t* p) {  // 16 bytes -> 16 uint16 lanes
  return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
}

// Unit u of a row (as unpack_unit): f(j, c, q) gets weights 16 c .. 16 c + 15 of the unit's
// group j as int16 lanes, every (j, c) once, c ascending for each j; OJ >= 0: group OJ only.
template <int T, int OJ = -1, class F>
static GGUF_INLINE void unpack_unit16(const uint8_t* row, int64_t u, F&& f) {
  auto emit = [&](int j, int c, __m256i q) GGUF_LAMBDA_INLINE {
    if (OJ < 0 || j == OJ) f(j, c, q);
  };
  const __m256i m4 = _mm256_set1_epi16(0x0F);
  if constexpr (T == kQ4_K || T == kQ5_K) {
    constexpr int bb = T == kQ4_K ? 144 : 176;
    const uint8_t* blk = row + (u >> 2) * bb;
    const int p = (int)(u & 3);  // groups 2 p (low nibbles), 2 p + 1 (high) of the block
    const uint8_t* qs = blk + (T == kQ4_K ? 16 : 48) + 32 * p;
    for (int c = 0; c < 2; c++) {
      const __m256i v = load16_u8(qs + 16 * c);
      __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_srli_epi16(v, 4);
      if constexpr (T == kQ5_K) {  // bit 2 p / 2 p + 1 of qh[j] is bit 4 of q
        const __m256i b16 = _mm256_set1_epi16(0x10);
        const __m256i t = _mm256_srl_epi16(load16_u8(blk + 16 + 16 * c), _mm_cvtsi32_si128(2 * p));
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(t, 4), b16));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(t, 3), b16));
      }
      emit(0, c, lo);
      emit(1, c, hi);
    }
  } else if constexpr (T == kQ6_K) {  // u: one 128-weight half of a block, groups 0..3
    const uint8_t* blk = row + (u >> 1) * 210;
    const int half = (int)(u & 1);
    const uint8_t* ql = blk + 64 * half;
    const uint8_t* qh = blk + 128 + 32 * half;
    const __m256i c30 = _mm256_set1_epi16(0x30);
    for (int c = 0; c < 2; c++) {
      const __m256i l0 = load16_u8(ql + 16 * c), l1 = load16_u8(ql + 32 + 16 * c);
      const __m256i h = load16_u8(qh + 16 * c);
      emit(0, c, _mm256_or_si256(_mm256_and_si256(l0, m4),
                                 _mm256_and_si256(_mm256_slli_epi16(h, 4), c30)));
      emit(1, c, _mm256_or_si256(_mm256_and_si256(l1, m4),
                                 _mm256_and_si256(_mm256_slli_epi16(h, 2), c30)));
      emit(2, c, _mm256_or_si256(_mm256_srli_epi16(l0, 4), _mm256_and_si256(h, c30)));
      emit(3, c, _mm256_or_si256(_mm256_srli_epi16(l1, 4),
                                 _mm256_and_si256(_mm256_srli_epi16(h, 2), c30)));
    }
  } else if constexpr (T == kQ8_0) {
    const uint8_t* q = row + u * 34 + 2;
    for (int c = 0; c < 2; c++)
      emit(0, c, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + 16 * c))));
  } else {  // Q4_0 / Q4_1 / Q5_0 / Q5_1: weights 0-15 low nibbles of 16 bytes, 16-31 high
    constexpr int bb = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : T == kQ5_0 ? 22 : 24;
    const uint8_t* blk = row + u * bb;
    const __m256i v = load16_u8(blk + bb - 16);
    __m256i q[2] = {_mm256_and_si256(v, m4), _mm256_srli_epi16(v, 4)};
    if constexpr (T == kQ5_0 || T == kQ5_1) {  // bit j of qh is bit 4 of weight j
      uint32_t qh;
      std::memcpy(&qh, blk + bb - 20, 4);
      const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                            4096, 8192, 16384, (short)0x8000);
      for (int c = 0; c < 2; c++) {
        const __m256i hv = _mm256_set1_epi16((short)(qh >> (16 * c)));
        const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(hv, bit), bit);
        q[c] = _mm256_or_si256(q[c], _mm256_and_si256(set, _mm256_set1_epi16(0x10)));
      }
    }
    emit(0, 0, q[0]);
    emit(0, 1, q[1]);
  }
}
