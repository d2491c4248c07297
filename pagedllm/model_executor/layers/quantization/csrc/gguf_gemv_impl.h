// y[m, r] = sum_k x[m, k] * W[r, k] for rows r in [n0, n1) of a packed GGUF matrix, with x
// given as QuantX (int8 per 32-group). Included once per ISA inside a namespace; the
// including file defines GGUF_VNNI to 1 for the AVX512-VNNI body, 0 for portable C++.
// Weights are read once per call: each group is unpacked, then dotted with every x row.

#if GGUF_VNNI

// Group g of a row as 32 unsigned bytes in a register, and its a[2], b[2].
template <int T>
static inline __m256i load_group(const uint8_t* row, int g, float* a, float* b) {
  if constexpr (T == kQ4_0 || T == kQ4_1) {
    constexpr int bb = T == kQ4_0 ? 18 : 20;
    const uint8_t* blk = row + (size_t)g * bb;
    const float d = _cvtsh_ss(*(const uint16_t*)blk);
    const __m128i raw = _mm_loadu_si128((const __m128i*)(blk + (T == kQ4_0 ? 2 : 4)));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    a[0] = a[1] = d;
    b[0] = b[1] = T == kQ4_0 ? -8.f * d : _cvtsh_ss(*(const uint16_t*)(blk + 2));
    return _mm256_set_m128i(hi, lo);
  } else if constexpr (T == kQ5_0 || T == kQ5_1) {
    constexpr int bb = T == kQ5_0 ? 22 : 24;
    constexpr int qh_off = T == kQ5_0 ? 2 : 4;
    const uint8_t* blk = row + (size_t)g * bb;
    const float d = _cvtsh_ss(*(const uint16_t*)blk);
    uint32_t qh;
    std::memcpy(&qh, blk + qh_off, 4);
    const __m128i raw = _mm_loadu_si128((const __m128i*)(blk + qh_off + 4));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    const __m256i high = _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
    a[0] = a[1] = d;
    b[0] = b[1] = T == kQ5_0 ? -16.f * d : _cvtsh_ss(*(const uint16_t*)(blk + 2));
    return _mm256_or_si256(_mm256_set_m128i(hi, lo), high);
  } else if constexpr (T == kQ8_0) {
    const uint8_t* blk = row + (size_t)g * 34;
    const float d = _cvtsh_ss(*(const uint16_t*)blk);
    a[0] = a[1] = d;
    b[0] = b[1] = -128.f * d;
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(blk + 2)),
                            _mm256_set1_epi8((char)0x80));
  } else {
    alignas(32) uint8_t q[32];
    unpack_group<T>(row, g, q, a, b);
    return _mm256_load_si256((const __m256i*)q);
  }
}

static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int T>
static inline __m256 scale_vec(const float* a) {
  if constexpr (T == kQ6_K) return _mm256_set_m128(_mm_set1_ps(a[1]), _mm_set1_ps(a[0]));
  return _mm256_set1_ps(a[0]);
}

// Two groups (g, g+1) per 512-bit step: one dpbusd, one convert, one FMA per x row; the
// offsets b * dx * sum(xq) accumulate in scalars.
template <int T, int MB>
static void gemv_block(const uint8_t* w, int64_t row_bytes, const QuantX& x, int64_t m0,
                       int64_t n0, int64_t n1, int64_t ldy, float* y) {
  const int64_t groups = x.k / 32;
  for (int64_t r = n0; r < n1; r++) {
    const uint8_t* row = w + r * row_bytes;
    __m512 acc[MB];
    float off[MB];
    for (int i = 0; i < MB; i++) { acc[i] = _mm512_setzero_ps(); off[i] = 0.f; }
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      float a0[2], b0[2], a1[2], b1[2];
      const __m256i q0 = load_group<T>(row, (int)g, a0, b0);
      const __m256i q1 = load_group<T>(row, (int)g + 1, a1, b1);
      const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
      const __m512 av = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(_mm512_castps256_ps512(scale_vec<T>(a0))),
          _mm256_castps_pd(scale_vec<T>(a1)), 1));
      for (int i = 0; i < MB; i++) {
        const int64_t m = m0 + i;
        const __m512i xv = _mm512_loadu_si512((const void*)(x.xq + m * x.k + g * 32));
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
        const __m512 s = _mm512_mul_ps(av, _mm512_loadu_ps(x.xd + (m * groups + g) * 8));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
        if constexpr (T == kQ6_K) {
          const float* xs = x.xs + (m * groups + g) * 2;
          off[i] += b0[0] * xs[0] + b0[1] * xs[1] + b1[0] * xs[2] + b1[1] * xs[3];
        } else {
          const float* xsum = x.xsum + m * groups + g;
          off[i] += b0[0] * xsum[0] + b1[0] * xsum[1];
        }
      }
    }
    for (; g < groups; g++) {
      float a0[2], b0[2];
      const __m256i q0 = load_group<T>(row, (int)g, a0, b0);
      const __m256 av = scale_vec<T>(a0);
      for (int i = 0; i < MB; i++) {
        const int64_t m = m0 + i;
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.xq + m * x.k + g * 32));
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q0, xv);
        const __m256 s = _mm256_mul_ps(av, _mm256_set1_ps(x.dx[m * groups + g]));
        const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), s);
        acc[i] = _mm512_add_ps(acc[i], _mm512_castps256_ps512(part));
        const float* xs = x.xs + (m * groups + g) * 2;
        off[i] += b0[0] * xs[0] + b0[1] * xs[1];
      }
    }
    for (int i = 0; i < MB; i++) y[(m0 + i) * ldy + r] = _mm512_reduce_add_ps(acc[i]) + off[i];
  }
}

// The 32-weight block types, eight groups per step: the eight blocks' fp16 scales (and
// mins) come in with one gather, the scale x dx products and the offsets are computed for all
// eight at once, and each pair of blocks unpacks into one 512-bit register in the order of
// x.xp, so a pair costs one dpbusd, one permute of the scales and one FMA per x row.
template <int T>
static inline __m512i load_pair(const uint8_t* b0, const uint8_t* b1) {
  if constexpr (T == kQ8_0) {
    const __m512i z = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b0 + 2))),
        _mm256_loadu_si256((const __m256i*)(b1 + 2)), 1);
    return _mm512_xor_si512(_mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)),
                            _mm512_set1_epi8((char)0x80));
  } else {
    constexpr bool has_min = T == kQ4_1 || T == kQ5_1;
    constexpr bool five = T == kQ5_0 || T == kQ5_1;
    constexpr int qs_off = 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
    const __m256i raw = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)(b1 + qs_off)),
                                         _mm_loadu_si128((const __m128i*)(b0 + qs_off)));
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(raw, m4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if constexpr (five) {
      uint32_t h0, h1;
      std::memcpy(&h0, b0 + qs_off - 4, 4);
      std::memcpy(&h1, b1 + qs_off - 4, 4);
      const uint64_t mask = (uint64_t)(h0 & 0xFFFF) | (uint64_t)(h1 & 0xFFFF) << 16 |
                            (uint64_t)(h0 >> 16) << 32 | (uint64_t)(h1 >> 16) << 48;
      q = _mm512_or_si512(q, _mm512_maskz_mov_epi8((__mmask64)mask, _mm512_set1_epi8(0x10)));
    }
    return q;
  }
}

template <int T, int MB>
static void gemv_block_fast(const uint8_t* w, int64_t row_bytes, const QuantX& x, int64_t m0,
                            int64_t n0, int64_t n1, int64_t ldy, float* y) {
  constexpr int bb = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : T == kQ5_0 ? 22 : T == kQ5_1 ? 24 : 34;
  constexpr bool has_min = T == kQ4_1 || T == kQ5_1;
  constexpr float bias = T == kQ4_0 ? -8.f : T == kQ8_0 ? -128.f : -16.f;
  const int64_t groups = x.k / 32;
  const __m256i gidx = _mm256_setr_epi32(0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb);
  __m512i pidx[4];
  for (int p = 0; p < 4; p++) {
    const int a = 2 * p, b = 2 * p + 1;
    pidx[p] = _mm512_setr_epi32(a, a, a, a, b, b, b, b, a, a, a, a, b, b, b, b);
  }
  for (int64_t r = n0; r < n1; r++) {
    const uint8_t* row = w + r * row_bytes;
    __m512 acc[MB];
    __m256 offv[MB];
    float off[MB];
    for (int i = 0; i < MB; i++) {
      acc[i] = _mm512_setzero_ps();
      offv[i] = _mm256_setzero_ps();
      off[i] = 0.f;
    }
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const uint8_t* blk = row + g * bb;
      const __m256i dw = _mm256_i32gather_epi32((const int*)blk, gidx, 1);
      const __m256 d8 = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(dw));
      const __m256 b8 = has_min ? _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(dw, 16)))
                                : _mm256_mul_ps(d8, _mm256_set1_ps(bias));
      __m512 s8[MB];
      for (int i = 0; i < MB; i++) {
        const int64_t m = m0 + i;
        s8[i] = _mm512_castps256_ps512(_mm256_mul_ps(d8, _mm256_loadu_ps(x.dx + m * groups + g)));
        offv[i] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(x.xsum + m * groups + g), offv[i]);
      }
      for (int p = 0; p < 4; p++) {
        const __m512i q = load_pair<T>(blk + 2 * p * bb, blk + (2 * p + 1) * bb);
        for (int i = 0; i < MB; i++) {
          const int64_t m = m0 + i;
          const __m512i xv = _mm512_loadu_si512((const void*)(x.xp + m * x.k + (g + 2 * p) * 32));
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                   _mm512_permutexvar_ps(pidx[p], s8[i]), acc[i]);
        }
      }
    }
    for (; g < groups; g++) {  // the last groups one at a time, natural order
      float a0[2], b0[2];
      const __m256i q0 = load_group<T>(row, (int)g, a0, b0);
      for (int i = 0; i < MB; i++) {
        const int64_t m = m0 + i;
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.xq + m * x.k + g * 32));
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q0, xv);
        const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(dot),
                                          _mm256_set1_ps(a0[0] * x.dx[m * groups + g]));
        acc[i] = _mm512_add_ps(acc[i], _mm512_castps256_ps512(part));
        off[i] += b0[0] * x.xsum[m * groups + g];
      }
    }
    for (int i = 0; i < MB; i++) {
      y[(m0 + i) * ldy + r] = _mm512_reduce_add_ps(acc[i]) + hsum256(offv[i]) + off[i];
    }
  }
}

// Dequantization through the same register unpack: 32 bytes -> 2 x 16 floats.
template <int T>
static void dequant_rows_simd(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k,
                              float* out) {
  for (int64_t r = 0; r < n; r++) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * k;
    for (int64_t g = 0; g < k / 32; g++) {
      float a[2], b[2];
      const __m256i q = load_group<T>(row, (int)g, a, b);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));
      _mm512_storeu_ps(o + g * 32, _mm512_fmadd_ps(lo, _mm512_set1_ps(a[0]), _mm512_set1_ps(b[0])));
      _mm512_storeu_ps(o + g * 32 + 16,
                       _mm512_fmadd_ps(hi, _mm512_set1_ps(a[1]), _mm512_set1_ps(b[1])));
    }
  }
}
#define GGUF_DEQUANT dequant_rows_simd

#else  // portable C++

template <int T, int MB>
static void gemv_block(const uint8_t* w, int64_t row_bytes, const QuantX& x, int64_t m0,
                       int64_t n0, int64_t n1, int64_t ldy, float* y) {
  const int64_t groups = x.k / 32;
  for (int64_t r = n0; r < n1; r++) {
    const uint8_t* row = w + r * row_bytes;
    float acc[MB];
    for (int i = 0; i < MB; i++) acc[i] = 0.f;
    for (int64_t g = 0; g < groups; g++) {
      alignas(32) uint8_t q[32];
      float a[2], b[2];
      unpack_group<T>(row, (int)g, q, a, b);
      for (int i = 0; i < MB; i++) {
        const int64_t m = m0 + i;
        const int8_t* xq = x.xq + m * x.k + g * 32;
        int32_t lo = 0, hi = 0;
        for (int j = 0; j < 16; j++) lo += (int32_t)q[j] * xq[j];
        for (int j = 16; j < 32; j++) hi += (int32_t)q[j] * xq[j];
        const float* xs = x.xs + (m * groups + g) * 2;
        acc[i] += x.dx[m * groups + g] * (a[0] * lo + a[1] * hi) + b[0] * xs[0] + b[1] * xs[1];
      }
    }
    for (int i = 0; i < MB; i++) y[(m0 + i) * ldy + r] = acc[i];
  }
}

#define GGUF_DEQUANT dequant_rows
#endif

// Rows [n0, n1) of y[m, ldy] for every x row, in chunks of up to 8 rows of x.
#if GGUF_VNNI
#define GGUF_BLOCK(T, MB) \
  (T <= kQ8_0 ? gemv_block_fast<T, MB> : gemv_block<T, MB>)
#else
#define GGUF_BLOCK(T, MB) gemv_block<T, MB>
#endif

template <int T>
static void gemv_rows(const uint8_t* w, int64_t row_bytes, const QuantX& x, int64_t n0,
                      int64_t n1, int64_t ldy, float* y) {
  int64_t m0 = 0;
  for (; m0 + 8 <= x.m; m0 += 8) GGUF_BLOCK(T, 8)(w, row_bytes, x, m0, n0, n1, ldy, y);
  for (; m0 + 4 <= x.m; m0 += 4) GGUF_BLOCK(T, 4)(w, row_bytes, x, m0, n0, n1, ldy, y);
  for (; m0 + 2 <= x.m; m0 += 2) GGUF_BLOCK(T, 2)(w, row_bytes, x, m0, n0, n1, ldy, y);
  for (; m0 < x.m; m0++) GGUF_BLOCK(T, 1)(w, row_bytes, x, m0, n0, n1, ldy, y);
}
#undef GGUF_BLOCK

// The entry points of one ISA: dispatch on the type at run time.
void gemv(int qtype, const uint8_t* w, int64_t row_bytes, const QuantX& x, int64_t n0,
          int64_t n1, int64_t ldy, float* y) {
  switch (qtype) {
    case kQ4_0: gemv_rows<kQ4_0>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ4_1: gemv_rows<kQ4_1>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ5_0: gemv_rows<kQ5_0>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ5_1: gemv_rows<kQ5_1>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ8_0: gemv_rows<kQ8_0>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ4_K: gemv_rows<kQ4_K>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ5_K: gemv_rows<kQ5_K>(w, row_bytes, x, n0, n1, ldy, y); break;
    case kQ6_K: gemv_rows<kQ6_K>(w, row_bytes, x, n0, n1, ldy, y); break;
    default: break;
  }
}

void dequant(int qtype, const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, float* out) {
  switch (qtype) {
    case kQ4_0: GGUF_DEQUANT<kQ4_0>(w, row_bytes, n, k, out); break;
    case kQ4_1: GGUF_DEQUANT<kQ4_1>(w, row_bytes, n, k, out); break;
    case kQ5_0: GGUF_DEQUANT<kQ5_0>(w, row_bytes, n, k, out); break;
    case kQ5_1: GGUF_DEQUANT<kQ5_1>(w, row_bytes, n, k, out); break;
    case kQ8_0: GGUF_DEQUANT<kQ8_0>(w, row_bytes, n, k, out); break;
    case kQ4_K: GGUF_DEQUANT<kQ4_K>(w, row_bytes, n, k, out); break;
    case kQ5_K: GGUF_DEQUANT<kQ5_K>(w, row_bytes, n, k, out); break;
    case kQ6_K: GGUF_DEQUANT<kQ6_K>(w, row_bytes, n, k, out); break;
    default: break;
  }
}
#undef GGUF_DEQUANT
