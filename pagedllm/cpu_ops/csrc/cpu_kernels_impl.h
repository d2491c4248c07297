// The kernels declared in cpu_kernels.h; included once per ISA inside its namespace.
// Loops are written for the compiler's vectoriser (`omp simd`); -ffp-contract=off keeps
// products and sums rounded separately, as the torch ops they replace round them.
// (The including file includes <algorithm>, <cmath> and <cstring> outside the namespace.)

namespace {

inline float ld(float v) { return v; }
inline float ld(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as c10::BFloat16 does (NaN kept a quiet NaN).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline void st(float* p, float v) { *p = v; }
inline void st(uint16_t* p, float v) { *p = to_bf16(v); }
// The value after rounding to T (the result of a torch op in T).
inline float rnd(float v, const float*) { return v; }
inline float rnd(float v, const uint16_t*) { return ld(to_bf16(v)); }

// exp(x) for float, vectorisable (no libm call): x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, times 2^n built in the exponent bits. Within 2 ulp of expf on the
// range softmax uses; 0 below -87.3, +inf above 88.7.
inline float fast_exp(float x) {
  const float hi = 88.72283f, lo = -87.33654f;
  const bool over = x > hi, under = x < lo;
  x = x > hi ? hi : (x < lo ? lo : x);
  // round to nearest even as nearbyint does (|x * log2 e| < 2^22 here), in a form the
  // vectoriser takes (nearbyint is a library call to it)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^n: n in [-126, 127] here (x clamped)
  const int32_t e = static_cast<int32_t>(n) + 127;
  uint32_t bits = static_cast<uint32_t>(e > 0 ? e : 0) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  float y = p * scale;
  if (n < -126.f) {  // subnormal results: two steps
    uint32_t b1 = static_cast<uint32_t>(static_cast<int32_t>(n) + 127 + 64) << 23;
    std::memcpy(&scale, &b1, 4);
    y = p * scale * 5.42101086e-20f;  // 2^-64
  }
  y = under ? 0.f : y;
  return over ? __builtin_inff() : y;
}

template <typename T>
void residual_add_rows(const T* x, int64_t xs, T* res, int64_t rs, int64_t r0, int64_t r1,
                       int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    T* rr = res + r * rs;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) st(rr + i, ld(xr[i]) + ld(rr[i]));
  }
}

// The mean of squares comes from torch (the caller), so the result is torch's rms_norm bit
// for bit: x * (1 / sqrt(ms + eps)) * w, each product rounded.
template <typename T>
void rms_apply_rows(const T* x, int64_t xs, const float* ms, T* out, int64_t os, const T* w,
                    int64_t r0, int64_t r1, int64_t d, float eps) {
  constexpr bool bf = sizeof(T) == 2;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    T* orow = out + r * os;
    const float inv = 1.f / std::sqrt(ms[r] + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const float n = bf ? rnd(ld(xr[i]) * inv, xr) : ld(xr[i]) * inv;
      st(orow + i, n * ld(w[i]));
    }
  }
}

template <typename T>
void rope_heads(T* x, int64_t heads, int64_t head_size, const float* cs, int64_t rot,
                bool neox) {
  const int64_t half = rot / 2;
  float c[512], s[512];
  for (int64_t i = 0; i < half; ++i) {
    c[i] = rnd(cs[i], x);  // the torch path casts cos/sin to x's dtype first
    s[i] = rnd(cs[half + i], x);
  }
  for (int64_t h = 0; h < heads; ++h) {
    T* xh = x + h * head_size;
    if (neox) {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = ld(xh[i]), b = ld(xh[i + half]);
        st(xh + i, rnd(a * c[i], x) - rnd(b * s[i], x));
        st(xh + i + half, rnd(b * c[i], x) + rnd(a * s[i], x));
      }
    } else {
      for (int64_t i = 0; i < half; ++i) {
        const float a = ld(xh[2 * i]), b = ld(xh[2 * i + 1]);
        st(xh + 2 * i, rnd(a * c[i], x) - rnd(b * s[i], x));
        st(xh + 2 * i + 1, rnd(b * c[i], x) + rnd(a * s[i], x));
      }
    }
  }
}

#if PAGEDLLM_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Scores (scaled q.k) of one query head against tokens [t0, t0 + run) at kb, tok_stride
// apart, and the weighted V sum into acc; NC = head_size / 16 chunks held in registers.
// Lane t = the lane sum of a[t], for 16 vectors, each in _mm512_reduce_add_ps's order
// (halves: lane i + lane i + 8, then i + 4, then i + 2, then i + 1), so the sums have its
// bits; 15 adds and 31 shuffles for 16 tokens instead of 16 x 7 dependent steps.
inline __m512 reduce_add16(const __m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)  // [tok 2j: 8 sums | tok 2j + 1: 8 sums]
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // quad k: tok 4m + k's 4 sums
    c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)  // quad k: 2 sums of tok 4(2m) + k, then of tok 4(2m + 1) + k
    d[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4k + j: tok 4j + k
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

template <int NC, typename T>
void scores_avx512(const float* qg, const T* kb, int64_t tok_stride, int64_t run, float scale,
                   float* sg) {
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(qg + 16 * c);
  int64_t j = 0;
  if constexpr (NC <= 8) {  // 16 tokens at a time (q and 16 sums in registers)
    const __m512 sv = _mm512_set1_ps(scale);
    for (; j + 16 <= run; j += 16) {
      __m512 a[16];
      for (int t = 0; t < 16; ++t) {
        const T* kp = kb + (j + t) * tok_stride;
        a[t] = _mm512_mul_ps(qv[0], load16(kp));
        for (int c = 1; c < NC; ++c) a[t] = _mm512_fmadd_ps(qv[c], load16(kp + 16 * c), a[t]);
      }
      _mm512_storeu_ps(sg + j, _mm512_mul_ps(reduce_add16(a), sv));
    }
  }
  for (; j < run; ++j) {
    const T* kp = kb + j * tok_stride;
    __m512 a = _mm512_mul_ps(qv[0], load16(kp));
    for (int c = 1; c < NC; ++c) a = _mm512_fmadd_ps(qv[c], load16(kp + 16 * c), a);
    sg[j] = _mm512_reduce_add_ps(a) * scale;
  }
}

template <int NC, typename T>
void values_avx512(const float* pg, const T* vb, int64_t tok_stride, int64_t run, float* ag) {
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_loadu_ps(ag + 16 * c);
  for (int64_t j = 0; j < run; ++j) {
    const T* vp = vb + j * tok_stride;
    const __m512 p = _mm512_set1_ps(pg[j]);
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vp + 16 * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) _mm512_storeu_ps(ag + 16 * c, acc[c]);
}
#endif

#if PAGEDLLM_AVX512
// out = silu(gate) * up over rows of x = [gate | up] (d each), as torch computes it on an
// AVX-512 CPU: chunks of 32 through its vectorised SiLU (x / (1 + exp(-x)), the exp being
// libtorch's own Sleef_expf16_u10), the rest of a row through the scalar x / (1 + expf(-x));
// bf16 rounds the SiLU, then the product (two torch ops). The caller checks once per width
// that this reproduces at::silu bit for bit and calls at::silu otherwise.
template <typename T>
void silu_mul_rows(const T* x, int64_t xs, T* out, int64_t os, int64_t r0, int64_t r1,
                   int64_t d) {
  constexpr bool bf = sizeof(T) == 2;
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));  // neg: flip the sign
  const int64_t dv = d / 32 * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * xs;
    const T* u = g + d;
    T* o = out + r * os;
    for (int64_t i = 0; i < dv; i += 16) {
      const __m512 v = load16(g + i);
      const __m512 e = Sleef_expf16_u10(
          _mm512_castsi512_ps(_mm512_xor_si512(sign, _mm512_castps_si512(v))));
      const __m512 sv = _mm512_div_ps(v, _mm512_add_ps(one, e));
      if constexpr (bf) {
        alignas(64) float sf[16], uf[16];
        _mm512_store_ps(sf, sv);
        _mm512_store_ps(uf, load16(u + i));
        for (int l = 0; l < 16; ++l) st(o + i + l, rnd(sf[l], g) * uf[l]);
      } else {
        _mm512_storeu_ps(reinterpret_cast<float*>(o) + i, _mm512_mul_ps(sv, load16(u + i)));
      }
    }
    for (int64_t i = dv; i < d; ++i) {
      const float v = ld(g[i]);
      const float sv = rnd(v / (1.f + std::exp(-v)), g);
      st(o + i, sv * ld(u[i]));
    }
  }
}
#endif

#if PAGEDLLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Lane t = the lane sum of a[t], for 8 vectors (pairwise adds of a transpose).
inline __m256 reduce_add8(const __m256 (&a)[8]) {
  __m256 b[4], c[2];
  for (int j = 0; j < 4; ++j) b[j] = _mm256_hadd_ps(a[2 * j], a[2 * j + 1]);
  for (int j = 0; j < 2; ++j) c[j] = _mm256_hadd_ps(b[2 * j], b[2 * j + 1]);
  // c[0] = per 128-bit half: sums of a0..a3 (low half partials | high half partials)
  const __m256 lo = _mm256_permute2f128_ps(c[0], c[1], 0x20);
  const __m256 hi = _mm256_permute2f128_ps(c[0], c[1], 0x31);
  return _mm256_add_ps(lo, hi);
}

inline float hsum8f(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// As scores_avx512 / values_avx512 with 8-float vectors; NC = head_size / 8.
template <int NC, typename T>
void scores_avx2(const float* qg, const T* kb, int64_t tok_stride, int64_t run, float scale,
                 float* sg) {
  __m256 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm256_loadu_ps(qg + 8 * c);
  int64_t j = 0;
  const __m256 sv = _mm256_set1_ps(scale);
  for (; j + 8 <= run; j += 8) {  // 8 tokens at a time, one transposing reduction
    __m256 a[8];
    for (int t = 0; t < 8; ++t) {
      const T* kp = kb + (j + t) * tok_stride;
      a[t] = _mm256_mul_ps(qv[0], load8(kp));
      for (int c = 1; c < NC; ++c) a[t] = _mm256_fmadd_ps(qv[c], load8(kp + 8 * c), a[t]);
    }
    _mm256_storeu_ps(sg + j, _mm256_mul_ps(reduce_add8(a), sv));
  }
  for (; j < run; ++j) {
    const T* kp = kb + j * tok_stride;
    __m256 a = _mm256_mul_ps(qv[0], load8(kp));
    for (int c = 1; c < NC; ++c) a = _mm256_fmadd_ps(qv[c], load8(kp + 8 * c), a);
    sg[j] = hsum8f(a) * scale;
  }
}

template <int NC, typename T>
void values_avx2(const float* pg, const T* vb, int64_t tok_stride, int64_t run, float* ag) {
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_loadu_ps(ag + 8 * c);
  for (int64_t j = 0; j < run; ++j) {
    const T* vp = vb + j * tok_stride;
    const __m256 p = _mm256_set1_ps(pg[j]);
    for (int c = 0; c < NC; ++c) acc[c] = _mm256_fmadd_ps(p, load8(vp + 8 * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(ag + 8 * c, acc[c]);
}
#endif

// One query head's scores over one run of tokens (the portable loop, or AVX-512 / AVX2 chunks).
template <typename T>
void scores_run(const float* qg, const T* kb, int64_t tok_stride, int64_t run, int64_t hs,
                float scale, float* sg) {
#if PAGEDLLM_AVX512
  switch (hs) {
    case 64: return scores_avx512<4>(qg, kb, tok_stride, run, scale, sg);
    case 128: return scores_avx512<8>(qg, kb, tok_stride, run, scale, sg);
    case 256: return scores_avx512<16>(qg, kb, tok_stride, run, scale, sg);
    case 32: return scores_avx512<2>(qg, kb, tok_stride, run, scale, sg);
    case 96: return scores_avx512<6>(qg, kb, tok_stride, run, scale, sg);
    default: break;
  }
#endif
#if PAGEDLLM_AVX2
  switch (hs) {  // (at 256 the values' 32 accumulators would spill: portable loop)
    case 64: return scores_avx2<8>(qg, kb, tok_stride, run, scale, sg);
    case 128: return scores_avx2<16>(qg, kb, tok_stride, run, scale, sg);
    case 32: return scores_avx2<4>(qg, kb, tok_stride, run, scale, sg);
    case 96: return scores_avx2<12>(qg, kb, tok_stride, run, scale, sg);
    case 80: return scores_avx2<10>(qg, kb, tok_stride, run, scale, sg);
    default: break;
  }
#endif
  for (int64_t j = 0; j < run; ++j) {
    const T* kp = kb + j * tok_stride;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hs; ++i) dot += qg[i] * ld(kp[i]);
    sg[j] = dot * scale;
  }
}

template <typename T>
void values_run(const float* pg, const T* vb, int64_t tok_stride, int64_t run, int64_t hs,
                float* ag) {
#if PAGEDLLM_AVX512
  switch (hs) {
    case 64: return values_avx512<4>(pg, vb, tok_stride, run, ag);
    case 128: return values_avx512<8>(pg, vb, tok_stride, run, ag);
    case 256: return values_avx512<16>(pg, vb, tok_stride, run, ag);
    case 32: return values_avx512<2>(pg, vb, tok_stride, run, ag);
    case 96: return values_avx512<6>(pg, vb, tok_stride, run, ag);
    default: break;
  }
#endif
#if PAGEDLLM_AVX2
  switch (hs) {
    case 64: return values_avx2<8>(pg, vb, tok_stride, run, ag);
    case 128: return values_avx2<16>(pg, vb, tok_stride, run, ag);
    case 32: return values_avx2<4>(pg, vb, tok_stride, run, ag);
    case 96: return values_avx2<12>(pg, vb, tok_stride, run, ag);
    case 80: return values_avx2<10>(pg, vb, tok_stride, run, ag);
    default: break;
  }
#endif
  for (int64_t j = 0; j < run; ++j) {
    const T* vp = vb + j * tok_stride;
    const float p = pg[j];
#pragma omp simd
    for (int64_t i = 0; i < hs; ++i) ag[i] += p * ld(vp[i]);
  }
}

// Softmax in place over n scores (after the optional soft cap).
inline void softmax_row(float* sg, int64_t n, float soft_cap) {
  if (soft_cap > 0.f) {
    const float inv_cap = 1.f / soft_cap;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {  // cap * tanh(s / cap), tanh(y) = 1 - 2 / (e^2y + 1)
      const float y = sg[j] * inv_cap;
      sg[j] = soft_cap * (1.f - 2.f / (fast_exp(2.f * y) + 1.f));
    }
  }
  float mx = sg[0];
#pragma omp simd reduction(max : mx)
  for (int64_t j = 1; j < n; ++j) mx = sg[j] > mx ? sg[j] : mx;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sg[j] = fast_exp(sg[j] - mx);
    sum += sg[j];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) sg[j] *= inv;
}

template <typename T>
void decode_attn(const T* q, int64_t qhs, const T* kc, const T* vc, const int32_t* table,
                 int64_t block_size, int64_t num_kv_heads, int64_t kvh, int64_t group,
                 int64_t head_size, int64_t start, int64_t end, float scale, float soft_cap,
                 T* out, int64_t ohs, float* scratch) {
  const int64_t n = end - start, hs = head_size;
  const int64_t tok_stride = num_kv_heads * hs;  // between tokens of one block
  float* sc = scratch;  // [group, n] scores, then probabilities
  float* qf = sc + group * n;  // [group, hs] the query heads in float
  float* acc = qf + group * hs;  // [group, hs]
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < hs; ++i) {
      qf[g * hs + i] = ld(q[g * qhs + i]);
      acc[g * hs + i] = 0.f;
    }
  // Block by block (a block's tokens are tok_stride apart), each query head of the group.
  for (int64_t t = start; t < end;) {
    const int64_t blk = table[t / block_size], off = t % block_size;
    const int64_t run = std::min(block_size - off, end - t);
    const T* kb = kc + ((blk * block_size + off) * num_kv_heads + kvh) * hs;
    for (int64_t g = 0; g < group; ++g)
      scores_run(qf + g * hs, kb, tok_stride, run, hs, scale, sc + g * n + (t - start));
    t += run;
  }
  for (int64_t g = 0; g < group; ++g) softmax_row(sc + g * n, n, soft_cap);
  for (int64_t t = start; t < end;) {
    const int64_t blk = table[t / block_size], off = t % block_size;
    const int64_t run = std::min(block_size - off, end - t);
    const T* vb = vc + ((blk * block_size + off) * num_kv_heads + kvh) * hs;
    for (int64_t g = 0; g < group; ++g)
      values_run(sc + g * n + (t - start), vb, tok_stride, run, hs, acc + g * hs);
    t += run;
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < hs; ++i) st(out + g * ohs + i, acc[g * hs + i]);
}

}  // namespace

#if PAGEDLLM_AVX2
// out = silu(gate) * up as torch computes it on an AVX2 CPU: chunks of two 8-float vectors
// (float32; bfloat16: of two 16-value vectors) through x / (1 + exp(-x)) with libtorch's
// Sleef_expf8_u10, the rest of a row scalar; bf16 rounds the SiLU, then the product. Checked
// against at::silu once per width by the caller, as the AVX-512 one.
template <typename T>
void silu_mul_rows(const T* x, int64_t xs, T* out, int64_t os, int64_t r0, int64_t r1,
                   int64_t d) {
  constexpr bool bf = sizeof(T) == 2;
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const int64_t dv = bf ? d / 32 * 32 : d / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * xs;
    const T* u = g + d;
    T* o = out + r * os;
    for (int64_t i = 0; i < dv; i += 8) {
      __m256 v, uv;
      if constexpr (bf) {
        alignas(32) float f[8], h[8];
        for (int l = 0; l < 8; ++l) { f[l] = ld(g[i + l]); h[l] = ld(u[i + l]); }
        v = _mm256_load_ps(f);
        uv = _mm256_load_ps(h);
      } else {
        v = _mm256_loadu_ps(reinterpret_cast<const float*>(g) + i);
        uv = _mm256_loadu_ps(reinterpret_cast<const float*>(u) + i);
      }
      const __m256 e = Sleef_expf8_u10(_mm256_xor_ps(sign, v));
      const __m256 sv = _mm256_div_ps(v, _mm256_add_ps(one, e));
      if constexpr (bf) {
        alignas(32) float sf[8], uf[8];
        _mm256_store_ps(sf, sv);
        _mm256_store_ps(uf, uv);
        for (int l = 0; l < 8; ++l) st(o + i + l, rnd(sf[l], g) * uf[l]);
      } else {
        _mm256_storeu_ps(reinterpret_cast<float*>(o) + i, _mm256_mul_ps(sv, uv));
      }
    }
    for (int64_t i = dv; i < d; ++i) {
      const float v = ld(g[i]);
      const float sv = rnd(v / (1.f + std::exp(-v)), g);
      st(o + i, sv * ld(u[i]));
    }
  }
}
#endif
#if PAGEDLLM_AVX512 || PAGEDLLM_AVX2
void silu_mul_f32(const float* x, int64_t xs, float* out, int64_t os, int64_t r0, int64_t r1,
                  int64_t d) {
  silu_mul_rows(x, xs, out, os, r0, r1, d);
}
void silu_mul_bf16(const uint16_t* x, int64_t xs, uint16_t* out, int64_t os, int64_t r0,
                   int64_t r1, int64_t d) {
  silu_mul_rows(x, xs, out, os, r0, r1, d);
}
#endif

void residual_add_f32(const float* x, int64_t xs, float* res, int64_t rs, int64_t r0,
                      int64_t r1, int64_t d) {
  residual_add_rows(x, xs, res, rs, r0, r1, d);
}
void residual_add_bf16(const uint16_t* x, int64_t xs, uint16_t* res, int64_t rs, int64_t r0,
                       int64_t r1, int64_t d) {
  residual_add_rows(x, xs, res, rs, r0, r1, d);
}
void rms_apply_f32(const float* x, int64_t xs, const float* ms, float* out, int64_t os,
                   const float* w, int64_t r0, int64_t r1, int64_t d, float eps) {
  rms_apply_rows(x, xs, ms, out, os, w, r0, r1, d, eps);
}
void rms_apply_bf16(const uint16_t* x, int64_t xs, const float* ms, uint16_t* out, int64_t os,
                    const uint16_t* w, int64_t r0, int64_t r1, int64_t d, float eps) {
  rms_apply_rows(x, xs, ms, out, os, w, r0, r1, d, eps);
}
void rope_f32(float* x, int64_t heads, int64_t head_size, const float* cs, int64_t rot,
              bool neox) {
  rope_heads(x, heads, head_size, cs, rot, neox);
}
void rope_bf16(uint16_t* x, int64_t heads, int64_t head_size, const float* cs, int64_t rot,
               bool neox) {
  rope_heads(x, heads, head_size, cs, rot, neox);
}
void decode_attention_f32(const float* q, int64_t qhs, const float* kc, const float* vc,
                          const int32_t* table, int64_t block_size, int64_t num_kv_heads,
                          int64_t kvh, int64_t group, int64_t head_size, int64_t start,
                          int64_t end, float scale, float soft_cap, float* out, int64_t ohs,
                          float* scratch) {
  decode_attn(q, qhs, kc, vc, table, block_size, num_kv_heads, kvh, group, head_size, start,
              end, scale, soft_cap, out, ohs, scratch);
}
void decode_attention_bf16(const uint16_t* q, int64_t qhs, const uint16_t* kc,
                           const uint16_t* vc, const int32_t* table, int64_t block_size,
                           int64_t num_kv_heads, int64_t kvh, int64_t group, int64_t head_size,
                           int64_t start, int64_t end, float scale, float soft_cap,
                           uint16_t* out, int64_t ohs, float* scratch) {
  decode_attn(q, qhs, kc, vc, table, block_size, num_kv_heads, kvh, group, head_size, start,
              end, scale, soft_cap, out, ohs, scratch);
}
