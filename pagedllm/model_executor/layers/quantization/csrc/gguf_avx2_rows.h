// The AVX2 decode kernels' row loops, shared by the float one (`mm_f32`, x float32:
// gguf_f32_avx2.h's unpack to float lanes and one FMA per weight) and the int16 one
// (`mm_x16`, x rounded per group: gguf_x16_avx2.h's unpack to 16-bit lanes and one vpmaddwd
// per 16 weights). X16 picks the flavour; the blocking, the accumulators, the visiting
// order and the final reductions are the same, so both are batch-invariant the same way.
// Included after gguf_f32_avx2.h and gguf_x16_avx2.h inside namespace gguf_avx2.

// Rows x[0..MB) (stride k; X16: int16 xq with per-group scales dx, stride k / 32) against
// weight rows row0 + r * row_bytes, r < RB; S16 / S32 (stride k / 16, k / 32): each x row's
// float sums over half groups / groups; A, B (stride ab): the weight rows' K-quant scales.
// y[i * ldy + r] = the dot of x row i and weight row r. The RB rows' units alternate (the x
// a unit reads is in L1 for the next row's); each (i, r) is computed by the same operations
// for every MB and RB.
template <int T, int MB, int RB, bool X16>
static void dot_rows_avx2(const uint8_t* row0, int64_t row_bytes, const float* A, const float* B,
                          int64_t ab, const void* xv, const float* dx, const float* S16,
                          const float* S32, int64_t k, int64_t ldy, float* y) {
  using Acc = std::conditional_t<X16, __m256i, __m256>;
  using XT = std::conditional_t<X16, int16_t, float>;
  constexpr bool kquant = T >= kQ4_K;
  constexpr int UG = unit_groups<T>();
  constexpr int H = T == kQ6_K ? 2 : 1;  // scales per group
  constexpr int CPH = X16 ? 1 : 2;  // unpacked chunks (16 or 8 weights) per half group
  const XT* x = static_cast<const XT*>(xv);
  const int64_t groups = k / 32;
  __m256 tot[RB][MB][2];
  float bsum[RB][MB];
  for (int r = 0; r < RB; r++)
    for (int i = 0; i < MB; i++) {
      tot[r][i][0] = tot[r][i][1] = _mm256_setzero_ps();
      bsum[r][i] = 0.f;
    }
  // One unit of weight row r: x . q per (group, scale) into acc, then a (X16: a dx) times
  // that into the totals.
  auto unit = [&](int r, int64_t u, int par) GGUF_LAMBDA_INLINE {
    const uint8_t* row = row0 + r * row_bytes;
    if (((u * UG) & 1) == 0)  // software prefetch: ~2 KB ahead in the weight stream (DRAM)
      _mm_prefetch((const char*)(row + u * UG * 32 * block_bytes(T) / block_elems(T) + GGUF_AVX2_PF),
                   _MM_HINT_T0);
    Acc acc[UG][H][MB];
    const XT* xu = x + u * UG * 32;
    // chunk c of group j (8 floats, or 16 int16 lanes)
    auto dot_x = [&](int j, int c, Acc q) GGUF_LAMBDA_INLINE {
      const int h = H == 2 ? c / CPH : 0;
      const bool first = H == 2 ? c % CPH == 0 : c == 0;
      for (int i = 0; i < MB; i++) {
        const XT* xp = xu + i * k + 32 * j + (32 / (2 * CPH)) * c;
        if constexpr (X16) {
          const __m256i p = _mm256_madd_epi16(q, _mm256_loadu_si256((const __m256i*)xp));
          acc[j][h][i] = first ? p : _mm256_add_epi32(acc[j][h][i], p);
        } else {
          const __m256 xl = _mm256_loadu_ps(xp);
          acc[j][h][i] = first ? _mm256_mul_ps(q, xl) : _mm256_fmadd_ps(q, xl, acc[j][h][i]);
        }
      }
    };
    // The totals take group j's (scale's) x . q in order of (j, h) for every MB; with 4 rows
    // of x the unit is unpacked once per group (the shared loads repeated) so that only one
    // group's accumulators are live (all of them spill 16 registers: 1.2-1.8x slower).
    auto apply = [&](int j) GGUF_LAMBDA_INLINE {
      const int64_t g = u * UG + j;
      const int p = UG == 1 ? par : j & 1;
      float a[H], b = 0.f;
      if constexpr (kquant) {
        for (int h = 0; h < H; h++) a[h] = A[r * ab + H * g + h];
      } else {
        block_ab<T>(row, g, &a[0], &b);
      }
      for (int i = 0; i < MB; i++) {
        for (int h = 0; h < H; h++) {
          if constexpr (X16) {
            tot[r][i][p] = _mm256_fmadd_ps(_mm256_set1_ps(a[h] * dx[i * groups + g]),
                                           _mm256_cvtepi32_ps(acc[j][h][i]), tot[r][i][p]);
          } else {
            tot[r][i][p] = _mm256_fmadd_ps(_mm256_set1_ps(a[h]), acc[j][h][i], tot[r][i][p]);
          }
        }
        if constexpr (!kquant && T != kQ8_0)
          bsum[r][i] = std::fma(b, S32[i * groups + g], bsum[r][i]);
      }
    };
    auto unpack = [&]<int OJ>() GGUF_LAMBDA_INLINE {
      if constexpr (X16) {
        unpack_unit16<T, OJ>(row, u, dot_x);
      } else {
        unpack_unit<T, OJ>(row, u, dot_x);
      }
    };
    if constexpr (MB >= 4 && UG > 1) {
      [&]<int... J>(std::integer_sequence<int, J...>) GGUF_LAMBDA_INLINE {
        ((unpack.template operator()<J>(), apply(J)), ...);
      }(std::make_integer_sequence<int, UG>{});
    } else {
      unpack.template operator()<-1>();
      for (int j = 0; j < UG; j++) apply(j);
    }
  };
  const int64_t units = groups / UG;
  int64_t u = 0;
  if constexpr (UG == 1) {  // the parity a constant: tot stays in registers
    for (; u + 2 <= units; u += 2) {
      for (int r = 0; r < RB; r++) unit(r, u, 0);
      for (int r = 0; r < RB; r++) unit(r, u + 1, 1);
    }
  }
  for (; u < units; u++)
    for (int r = 0; r < RB; r++) unit(r, u, 0);
  if constexpr (kquant) {  // b . (float sums of x): 8 groups (Q6_K: 4 groups' halves) per FMA
    const int64_t nb = H * groups;
    const float* S = H == 2 ? S16 : S32;
    for (int r = 0; r < RB; r++)
      for (int i = 0; i < MB; i++) {
        const float* Si = S + i * nb;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < nb; j += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(B + r * ab + j), _mm256_loadu_ps(Si + j), acc);
        bsum[r][i] = hsum8(acc);
      }
  }
  for (int r = 0; r < RB; r++)
    for (int i = 0; i < MB; i++)
      y[i * ldy + r] = hsum8(_mm256_add_ps(tot[r][i][0], tot[r][i][1])) + bsum[r][i];
}

// Rows [n0, n1) of y for x (float32, or int16 xq with scales dx) and its float sums S16 /
// S32 (x_sums). More than 4 rows of x: blocks of GGUF_AVX2_MBLK weight rows, each x chunk (4,
// 2 or 1 rows) against the whole block, so a chunk's x stays in L1 while the block's rows (in
// L2) are read once per chunk (weight row by weight row, the x rows' 8 * K floats do not fit
// L1).
template <int T, bool X16>
static void gemv_rows_avx2(const uint8_t* w, int64_t row_bytes, const void* xv, const float* dx,
                           const float* S16, const float* S32, int64_t m, int64_t k, int64_t n0,
                           int64_t n1, int64_t ldy, float* y) {
  using XT = std::conditional_t<X16, int16_t, float>;
  const XT* x = static_cast<const XT*>(xv);
  const int64_t groups = k / 32, ab = 2 * groups + 16;
  thread_local std::vector<float> ws;
  constexpr int64_t nab = std::max<int64_t>(GGUF_AVX2_RB, GGUF_AVX2_MBLK);  // rows of scales
  if (ws.size() < (size_t)(2 * nab * ab)) ws.resize(2 * nab * ab);
  float* A = ws.data();
  float* B = A + nab * ab;
  int64_t r = n0;
  constexpr int RB = GGUF_AVX2_RB;
  if (m == 1 && RB > 1) {  // one x row: RB weight rows a pass
    for (; r + RB <= n1; r += RB) {
      const uint8_t* row = w + r * row_bytes;
      if constexpr (T >= kQ4_K) {
        for (int j = 0; j < RB; j++) row_scales_k<T>(row + j * row_bytes, groups, A + j * ab, B + j * ab);
      }
      dot_rows_avx2<T, 1, RB, X16>(row, row_bytes, A, B, ab, x, dx, S16, S32, k, ldy, y + r);
    }
  }
  const int64_t blk = m > 4 ? GGUF_AVX2_MBLK : 1;
  for (; r < n1; r += blk) {
    const int64_t nr = std::min(blk, n1 - r);
    if constexpr (T >= kQ4_K) {
      for (int64_t j = 0; j < nr; j++)
        row_scales_k<T>(w + (r + j) * row_bytes, groups, A + j * ab, B + j * ab);
    }
    auto chunk = [&]<int MB>(int64_t m0) GGUF_LAMBDA_INLINE {
      for (int64_t j = 0; j < nr; j++)
        dot_rows_avx2<T, MB, 1, X16>(w + (r + j) * row_bytes, row_bytes, A + j * ab, B + j * ab,
                                     ab, x + m0 * k, X16 ? dx + m0 * groups : nullptr,
                                     S16 + m0 * 2 * groups, S32 + m0 * groups, k, ldy,
                                     y + m0 * ldy + r + j);
    };
    int64_t m0 = 0;
    if constexpr (GGUF_AVX2_MB >= 4) {
      for (; m0 + 4 <= m; m0 += 4) chunk.template operator()<4>(m0);
    }
    for (; m0 + 2 <= m; m0 += 2) chunk.template operator()<2>(m0);
    for (; m0 < m; m0++) chunk.template operator()<1>(m0);
  }
}

template <bool X16>
static void gemv_avx2(int qtype, const uint8_t* w, int64_t row_bytes, const void* x,
                      const float* dx, const float* S16, const float* S32, int64_t m, int64_t k,
                      int64_t n0, int64_t n1, int64_t ldy, float* y) {
  switch (qtype) {
#define GGUF_AVX2_CASE(t) \
    case t: gemv_rows_avx2<t, X16>(w, row_bytes, x, dx, S16, S32, m, k, n0, n1, ldy, y); break;
    GGUF_AVX2_CASE(kQ4_0) GGUF_AVX2_CASE(kQ4_1) GGUF_AVX2_CASE(kQ5_0) GGUF_AVX2_CASE(kQ5_1)
    GGUF_AVX2_CASE(kQ8_0) GGUF_AVX2_CASE(kQ4_K) GGUF_AVX2_CASE(kQ5_K) GGUF_AVX2_CASE(kQ6_K)
#undef GGUF_AVX2_CASE
    default: break;
  }
}

// mm_f32's body for rows [n0, n1) (x's sums computed here, per call).
void gemv_f32(int qtype, const uint8_t* w, int64_t row_bytes, const float* x, int64_t m,
              int64_t k, int64_t n0, int64_t n1, int64_t ldy, float* y) {
  thread_local std::vector<float> sums;
  if (sums.size() < (size_t)(m * 3 * (k / 32))) sums.resize(m * 3 * (k / 32));
  float* S16 = sums.data();
  float* S32 = S16 + m * 2 * (k / 32);
  x_sums(x, m, k, S16, S32);
  gemv_avx2<false>(qtype, w, row_bytes, x, nullptr, S16, S32, m, k, n0, n1, ldy, y);
}

// mm_x16's body for rows [n0, n1): x already rounded (quant_x16) and summed (x_sums).
void gemv_x16(int qtype, const uint8_t* w, int64_t row_bytes, const int16_t* xq,
              const float* dx, const float* S16, const float* S32, int64_t m, int64_t k,
              int64_t n0, int64_t n1, int64_t ldy, float* y) {
  gemv_avx2<true>(qtype, w, row_bytes, xq, dx, S16, S32, m, k, n0, n1, ldy, y);
}

// Rounds x and sums it (S16 [m, k / 16], S32 [m, k / 32]) once per call, for every thread.
void prepare_x16(const float* x, int64_t m, int64_t k, int16_t* xq, float* dx, float* S16,
                 float* S32) {
  quant_x16(x, m, k, xq, dx);
  x_sums(x, m, k, S16, S32);
}

#undef GGUF_INLINE
#undef GGUF_LAMBDA_INLINE
