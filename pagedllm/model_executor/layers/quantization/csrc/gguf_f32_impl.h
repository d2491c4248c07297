// y[m, r] = sum_k x[m, k] * W[r, k] for rows r in [n0, n1) of a packed GGUF matrix with x in
// float32, NOT rounded: each 32-weight group of W is dequantized in registers to exactly the
// floats gguf's reference dequantization gives (w = a * q + b) and multiplied with x by FMAs.
// So y is continuous in x (a 1-ulp change of x moves y by ulps), unlike the int8 kernel.
//
// Batch invariance: every row of x is computed by the same sequence of operations whatever
// the number of rows M of the call and however the N rows are split over threads: a row's
// accumulators are its own (four per row: two per group, groups alternating), the groups are
// visited in order, and the final reduction is fixed. Rows of x are taken 4, 2 or 1 at a time
// only to share each unpacked group (the weight row is read from memory once per call and
// stays in L1 for the other chunks).
// Included once per ISA inside a namespace; the including file defines GGUF_VNNI to 1 for the
// AVX512 body, 0 for portable C++.

#if GGUF_VNNI

// Block bytes of the 32-weight types.
template <int T>
constexpr int block_bytes32() {
  return T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : T == kQ5_0 ? 22 : T == kQ5_1 ? 24 : 34;
}

// The per-group dequantization constants of one weight row. K-quants: w = A[i] * q + B[i],
// i = g for Q4_K / Q5_K, i = 2 g + half for Q6_K (its 16-weight sub-blocks have their own
// scales). Q4_1 / Q5_1: A[2 g] = block g's fp16 d as float, A[2 g + 1] its fp16 min, eight
// blocks' dwords by one gather and one conversion, so the group loop broadcasts them from
// memory (load ports) instead of converting and duplicating them on the vector ports (4 of
// ~13 ALU uops a group; K = 1536 rows 16% faster, measured). The floats are the same (fp16 ->
// float is exact). Q4_0 / Q5_0 / Q8_0 convert their one fp16 d inline (bcast_half: the
// gather pass made the memory-bound Q8_0 LM head slower).
template <int T>
static inline void row_scales(const uint8_t* row, int64_t groups, float* A, float* B) {
  if constexpr (T == kQ4_0 || T == kQ5_0 || T == kQ8_0) {
    (void)row, (void)groups, (void)A, (void)B;
  } else if constexpr (T == kQ4_1 || T == kQ5_1) {
    (void)B;
    constexpr int bb = block_bytes32<T>();
    const __m256i idx = _mm256_setr_epi32(0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb);
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256i dm = _mm256_i32gather_epi32((const int*)(row + g * bb), idx, 1);
      _mm512_storeu_ps(A + 2 * g, _mm512_cvtph_ps(dm));
    }
    for (; g < groups; g++) {
      uint16_t h[2];
      std::memcpy(h, row + g * bb, 4);
      A[2 * g] = _cvtsh_ss(h[0]);
      A[2 * g + 1] = _cvtsh_ss(h[1]);
    }
  } else if constexpr (T == kQ4_K || T == kQ5_K) {
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
      _mm256_storeu_ps(A + 8 * s, _mm256_mul_ps(sc, _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)blk))));
      _mm256_storeu_ps(B + 8 * s, _mm256_mul_ps(mn, _mm256_set1_ps(-_cvtsh_ss(*(const uint16_t*)(blk + 2)))));
    }
  } else {  // Q6_K: 16 int8 scales per 256 weights, in the order of (group, half)
    for (int64_t s = 0; s < groups / 8; s++) {
      const uint8_t* blk = row + s * 210;
      const __m512 sc = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 192))));
      const __m512 a = _mm512_mul_ps(sc, _mm512_set1_ps(_cvtsh_ss(*(const uint16_t*)(blk + 208))));
      _mm512_storeu_ps(A + 16 * s, a);
      _mm512_storeu_ps(B + 16 * s, _mm512_mul_ps(a, _mm512_set1_ps(-32.f)));
    }
  }
}

// fp16 at p broadcast to 16 floats.
static inline __m512 bcast_half(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_set1_epi16(*(const short*)p));
}

// 16 weights from their 4/5/6/8-bit values in int32 lanes: a * q + b (one rounding: the value
// gguf's dequantization gives). A vpermps table (q -> a * q + b, built by one FMA per block)
// was tried instead: on this project's Xeon it ran 1.4x slower than the conversion.
static inline __m512 dequant16(__m512i q, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), a, b);
}

// Group g of a row of a 32-weight block type dequantized: weights 0-15 in wl, 16-31 in wh.
template <int T>
static inline void group_weights(const uint8_t* row, const float* A, int64_t g, __m512& wl,
                                 __m512& wh) {
  static_assert(T <= kQ8_0, "K-quants unpack four groups at a time (group_quad)");
  const __m512i m4 = _mm512_set1_epi32(0x0F), b16 = _mm512_set1_epi32(0x10);
  if constexpr (T == kQ4_0 || T == kQ4_1) {
    constexpr int bb = T == kQ4_0 ? 18 : 20;
    const uint8_t* blk = row + g * bb;
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + bb - 16)));
    const __m512 a = T == kQ4_0 ? bcast_half(blk) : _mm512_set1_ps(A[2 * g]);
    const __m512 b = T == kQ4_0 ? _mm512_mul_ps(a, _mm512_set1_ps(-8.f))
                                : _mm512_set1_ps(A[2 * g + 1]);
    wl = dequant16(_mm512_and_si512(v, m4), a, b);
    wh = dequant16(_mm512_srli_epi32(v, 4), a, b);
  } else if constexpr (T == kQ5_0 || T == kQ5_1) {
    constexpr int bb = T == kQ5_0 ? 22 : 24;
    const uint8_t* blk = row + g * bb;
    uint32_t qh;
    std::memcpy(&qh, blk + bb - 20, 4);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + bb - 16)));
    const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi32(v, 4);
    const __m512 a = T == kQ5_0 ? bcast_half(blk) : _mm512_set1_ps(A[2 * g]);
    const __m512 b = T == kQ5_0 ? _mm512_mul_ps(a, _mm512_set1_ps(-16.f))
                                : _mm512_set1_ps(A[2 * g + 1]);
    wl = dequant16(_mm512_mask_or_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, b16), a, b);
    wh = dequant16(_mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, b16), a, b);
  } else if constexpr (T == kQ8_0) {
    const uint8_t* blk = row + g * 34;
    const __m512 a = bcast_half(blk);
    wl = _mm512_mul_ps(a, _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)))));
    wh = _mm512_mul_ps(a, _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 18)))));
  }
}

// Four groups g..g+3 of a K-quant row (g a multiple of 4) dequantized into w[2 j] (weights
// 0-15 of group g + j) and w[2 j + 1] (16-31): the groups sharing quant bytes (Q4_K/Q5_K's
// low and high nibbles, Q6_K's ql pairs and qh) unpack from one load of them.
template <int T>
static inline void group_quad(const uint8_t* row, int64_t g, const float* A, const float* B,
                              __m512* w) {
  const __m512i m4 = _mm512_set1_epi32(0x0F);
  if constexpr (T == kQ4_K || T == kQ5_K) {
    constexpr int bb = T == kQ4_K ? 144 : 176;
    const uint8_t* blk = row + (g >> 3) * bb;
    const int sub0 = (int)(g & 7);  // 0 or 4
    __m512i hb[2];
    if constexpr (T == kQ5_K) {
      for (int h = 0; h < 2; h++)
        hb[h] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 16 + 16 * h)));
    }
    for (int p = 0; p < 2; p++) {
      const int sub = sub0 + 2 * p;  // even sub-block: low nibbles; sub + 1: high nibbles
      const uint8_t* qs = blk + (T == kQ4_K ? 16 : 48) + 16 * sub;
      for (int h = 0; h < 2; h++) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qs + 16 * h)));
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_srli_epi32(v, 4);
        if constexpr (T == kQ5_K) {
          const __m512i b16 = _mm512_set1_epi32(0x10);
          lo = _mm512_mask_or_epi32(lo, _mm512_test_epi32_mask(hb[h], _mm512_set1_epi32(1 << sub)),
                                    lo, b16);
          hi = _mm512_mask_or_epi32(
              hi, _mm512_test_epi32_mask(hb[h], _mm512_set1_epi32(2 << sub)), hi, b16);
        }
        const int64_t ge = g + 2 * p;
        w[4 * p + h] = dequant16(lo, _mm512_set1_ps(A[ge]), _mm512_set1_ps(B[ge]));
        w[4 * p + 2 + h] = dequant16(hi, _mm512_set1_ps(A[ge + 1]), _mm512_set1_ps(B[ge + 1]));
      }
    }
  } else {  // Q6_K: groups t = 0..3 of one 128-weight half
    const uint8_t* blk = row + (g >> 3) * 210;
    const int half = (int)(g >> 2) & 1;
    const uint8_t* ql = blk + 64 * half;
    const uint8_t* qh = blk + 128 + 32 * half;
    const __m512i c30 = _mm512_set1_epi32(0x30);
    for (int h = 0; h < 2; h++) {
      const __m512i l0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(ql + 16 * h)));
      const __m512i l1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(ql + 32 + 16 * h)));
      const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qh + 16 * h)));
      // 6-bit q = low 4 bits | (2 bits of qh) << 4; 0xD8: c ? b : a, c = 0x30 per lane
      __m512i q[4];
      q[0] = _mm512_ternarylogic_epi32(_mm512_and_si512(l0, m4), _mm512_slli_epi32(u, 4), c30, 0xD8);
      q[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(l1, m4), _mm512_slli_epi32(u, 2), c30, 0xD8);
      q[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(l0, 4), u, c30, 0xD8);
      q[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(l1, 4), _mm512_srli_epi32(u, 2), c30, 0xD8);
      for (int t = 0; t < 4; t++) {
        const int64_t i = 2 * (g + t) + h;
        w[2 * t + h] = dequant16(q[t], _mm512_set1_ps(A[i]), _mm512_set1_ps(B[i]));
      }
    }
  }
}

// acc[i][2 par], acc[i][2 par + 1] += group g's weights (wl, wh) times row i of x.
template <int MB>
static inline void fma_group(__m512 (*acc)[4], int par, __m512 wl, __m512 wh, const float* x,
                             int64_t k, int64_t g) {
  for (int i = 0; i < MB; i++) {
    const float* xr = x + i * k + g * 32;
    acc[i][2 * par] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xr), acc[i][2 * par]);
    acc[i][2 * par + 1] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xr + 16), acc[i][2 * par + 1]);
  }
}

// Rows x[0..MB) (stride k) against one weight row; y[i * ldy] = the dot of row i. Group g
// goes into accumulators 2 (g & 1) and 2 (g & 1) + 1 of its row, in order of g, for every MB.
template <int T, int MB>
static void dot_rows_f32(const uint8_t* row, const float* A, const float* B, const float* x,
                         int64_t k, int64_t ldy, float* y) {
  const int64_t groups = k / 32;
  __m512 acc[MB][4];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
  if constexpr (T >= kQ4_K) {  // groups: a multiple of 8
    for (int64_t g = 0; g < groups; g += 4) {
      __m512 w[8];
      group_quad<T>(row, g, A, B, w);
      for (int j = 0; j < 4; j++) fma_group<MB>(acc, j & 1, w[2 * j], w[2 * j + 1], x, k, g + j);
    }
  } else {
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {  // the parity a constant: acc stays in registers
      __m512 wl, wh;
      group_weights<T>(row, A, g, wl, wh);
      fma_group<MB>(acc, 0, wl, wh, x, k, g);
      group_weights<T>(row, A, g + 1, wl, wh);
      fma_group<MB>(acc, 1, wl, wh, x, k, g + 1);
    }
    if (g < groups) {
      __m512 wl, wh;
      group_weights<T>(row, A, g, wl, wh);
      fma_group<MB>(acc, 0, wl, wh, x, k, g);
    }
  }
  for (int i = 0; i < MB; i++) {
    y[i * ldy] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
  }
}

template <int T>
static void gemv_f32_rows(const uint8_t* w, int64_t row_bytes, const float* x, int64_t m,
                          int64_t k, int64_t n0, int64_t n1, int64_t ldy, float* y) {
  const int64_t groups = k / 32;
  thread_local std::vector<float> scales;
  if ((int64_t)scales.size() < 4 * groups + 32) scales.resize(4 * groups + 32);
  float* A = scales.data();
  float* B = A + 2 * groups + 16;
  for (int64_t r = n0; r < n1; r++) {
    const uint8_t* row = w + r * row_bytes;
    row_scales<T>(row, groups, A, B);
    int64_t m0 = 0;
    for (; m0 + 4 <= m; m0 += 4) dot_rows_f32<T, 4>(row, A, B, x + m0 * k, k, ldy, y + m0 * ldy + r);
    for (; m0 + 2 <= m; m0 += 2) dot_rows_f32<T, 2>(row, A, B, x + m0 * k, k, ldy, y + m0 * ldy + r);
    for (; m0 < m; m0++) dot_rows_f32<T, 1>(row, A, B, x + m0 * k, k, ldy, y + m0 * ldy + r);
  }
}

// Rows [0, n) dequantized to out[n, k] through the same register unpack (the prefill tiles;
// the int8 file's dequantizer unpacks K-quants through a stack buffer, ~3x slower).
template <int T>
static void dequant_rows_f32(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k,
                             float* out) {
  const int64_t groups = k / 32;
  thread_local std::vector<float> scales;
  if ((int64_t)scales.size() < 4 * groups + 32) scales.resize(4 * groups + 32);
  float* A = scales.data();
  float* B = A + 2 * groups + 16;
  for (int64_t r = 0; r < n; r++) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * k;
    row_scales<T>(row, groups, A, B);
    if constexpr (T >= kQ4_K) {
      for (int64_t g = 0; g < groups; g += 4) {
        __m512 wv[8];
        group_quad<T>(row, g, A, B, wv);
        for (int j = 0; j < 8; j++) _mm512_storeu_ps(o + g * 32 + 16 * j, wv[j]);
      }
    } else {
      for (int64_t g = 0; g < groups; g++) {
        __m512 wl, wh;
        group_weights<T>(row, A, g, wl, wh);
        _mm512_storeu_ps(o + g * 32, wl);
        _mm512_storeu_ps(o + g * 32 + 16, wh);
      }
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

#else  // portable C++: the canonical unpack, 16 lane accumulators per row

template <int T, int MB>
static void dot_rows_f32(const uint8_t* row, const float* x, int64_t k, int64_t ldy, float* y) {
  const int64_t groups = k / 32;
  float acc[MB][16];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < 16; j++) acc[i][j] = 0.f;
  for (int64_t g = 0; g < groups; g++) {
    alignas(32) uint8_t q[32];
    float a[2], b[2], wv[32];
    unpack_group<T>(row, (int)g, q, a, b);
    for (int j = 0; j < 32; j++) wv[j] = a[j >> 4] * (float)q[j] + b[j >> 4];
    for (int i = 0; i < MB; i++) {
      const float* xr = x + i * k + g * 32;
      for (int j = 0; j < 16; j++) acc[i][j] += wv[j] * xr[j];
      for (int j = 0; j < 16; j++) acc[i][j] += wv[16 + j] * xr[16 + j];
    }
  }
  for (int i = 0; i < MB; i++) {
    float s = 0.f;
    for (int j = 0; j < 16; j++) s += acc[i][j];
    y[i * ldy] = s;
  }
}

template <int T>
static void gemv_f32_rows(const uint8_t* w, int64_t row_bytes, const float* x, int64_t m,
                          int64_t k, int64_t n0, int64_t n1, int64_t ldy, float* y) {
  for (int64_t r = n0; r < n1; r++) {
    const uint8_t* row = w + r * row_bytes;
    int64_t m0 = 0;
    for (; m0 + 4 <= m; m0 += 4) dot_rows_f32<T, 4>(row, x + m0 * k, k, ldy, y + m0 * ldy + r);
    for (; m0 < m; m0++) dot_rows_f32<T, 1>(row, x + m0 * k, k, ldy, y + m0 * ldy + r);
  }
}

#endif

void gemv_f32(int qtype, const uint8_t* w, int64_t row_bytes, const float* x, int64_t m,
              int64_t k, int64_t n0, int64_t n1, int64_t ldy, float* y) {
  switch (qtype) {
    case kQ4_0: gemv_f32_rows<kQ4_0>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ4_1: gemv_f32_rows<kQ4_1>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ5_0: gemv_f32_rows<kQ5_0>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ5_1: gemv_f32_rows<kQ5_1>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ8_0: gemv_f32_rows<kQ8_0>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ4_K: gemv_f32_rows<kQ4_K>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ5_K: gemv_f32_rows<kQ5_K>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    case kQ6_K: gemv_f32_rows<kQ6_K>(w, row_bytes, x, m, k, n0, n1, ldy, y); break;
    default: break;
  }
}
