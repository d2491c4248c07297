// GGUF block layouts, unpacked into one canonical form shared by every kernel:
// per group of 32 weights, 32 unsigned values q[0..31] and, per half group (16 weights),
// a scale a and an offset b with w = a * q + b. Q6_K's 16-weight sub-blocks are why the
// scale is per half; every other type has the same a, b for both halves.
// Header-only, no torch: included by each ISA's translation unit inside its own namespace.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

enum GGUFType : int {  // gguf.GGMLQuantizationType values
  kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
};

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) { mant <<= 1; exp--; }
      bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float rd_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

// Block geometry: weights per block, bytes per block.
static inline int block_elems(int t) { return t >= kQ4_K ? 256 : 32; }
static inline int block_bytes(int t) {
  switch (t) {
    case kQ4_0: return 18; case kQ4_1: return 20; case kQ5_0: return 22; case kQ5_1: return 24;
    case kQ8_0: return 34; case kQ4_K: return 144; case kQ5_K: return 176; case kQ6_K: return 210;
    default: return 0;
  }
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7).
static inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Group g (32 weights) of a row: q[32] unsigned, a[2], b[2] (per half).
template <int T>
static inline void unpack_group(const uint8_t* row, int g, uint8_t* q, float* a, float* b) {
  if constexpr (T == kQ4_0 || T == kQ4_1 || T == kQ5_0 || T == kQ5_1) {
    constexpr int bb = T == kQ4_0 ? 18 : T == kQ4_1 ? 20 : T == kQ5_0 ? 22 : 24;
    const uint8_t* blk = row + (size_t)g * bb;
    const float d = rd_half(blk);
    constexpr bool has_min = T == kQ4_1 || T == kQ5_1;
    constexpr bool five = T == kQ5_0 || T == kQ5_1;
    const uint8_t* qs = blk + 2 + (has_min ? 2 : 0) + (five ? 4 : 0);
    uint32_t qh = 0;
    if (five) std::memcpy(&qh, blk + 2 + (has_min ? 2 : 0), 4);
    for (int j = 0; j < 16; j++) {
      q[j] = (qs[j] & 0xF) | (five ? ((qh >> j) & 1) << 4 : 0);
      q[j + 16] = (qs[j] >> 4) | (five ? ((qh >> (j + 16)) & 1) << 4 : 0);
    }
    const float off = has_min ? rd_half(blk + 2) : -d * (five ? 16.f : 8.f);
    a[0] = a[1] = d;
    b[0] = b[1] = off;
  } else if constexpr (T == kQ8_0) {
    const uint8_t* blk = row + (size_t)g * 34;
    const float d = rd_half(blk);
    for (int j = 0; j < 32; j++) q[j] = blk[2 + j] ^ 0x80;  // int8 + 128
    a[0] = a[1] = d;
    b[0] = b[1] = -128.f * d;
  } else if constexpr (T == kQ4_K || T == kQ5_K) {
    constexpr int bb = T == kQ4_K ? 144 : 176;
    const uint8_t* blk = row + (size_t)(g >> 3) * bb;
    const int sub = g & 7;
    int sc, m;
    scale_min_k4(sub, blk + 4, &sc, &m);
    const float d = rd_half(blk) * sc, mn = rd_half(blk + 2) * m;
    const uint8_t* qh = blk + 16;                               // Q5_K only
    const uint8_t* qs = blk + (T == kQ4_K ? 16 : 48) + 32 * (sub >> 1);
    const int shift = (sub & 1) * 4;
    for (int j = 0; j < 32; j++) {
      q[j] = ((qs[j] >> shift) & 0xF) | (T == kQ5_K ? ((qh[j] >> sub) & 1) << 4 : 0);
    }
    a[0] = a[1] = d;
    b[0] = b[1] = -mn;
  } else {  // Q6_K
    const uint8_t* blk = row + (size_t)(g >> 3) * 210;
    const int half = (g >> 2) & 1, t = g & 3;
    const uint8_t* ql = blk + 64 * half + 32 * (t & 1);
    const uint8_t* qh = blk + 128 + 32 * half;
    const int8_t* sc = (const int8_t*)(blk + 192) + 8 * half + 2 * t;
    const float d = rd_half(blk + 208);
    const int lshift = (t >> 1) * 4, hshift = 2 * t;
    for (int j = 0; j < 32; j++) {
      q[j] = ((ql[j] >> lshift) & 0xF) | (((qh[j] >> hshift) & 3) << 4);
    }
    a[0] = d * sc[0];
    a[1] = d * sc[1];
    b[0] = -32.f * a[0];
    b[1] = -32.f * a[1];
  }
}

// Dequantizes rows [0, n) of a packed matrix with k columns into out[n, k] float32.
template <int T>
static void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, float* out) {
  alignas(64) uint8_t q[32];
  float a[2], b[2];
  for (int64_t r = 0; r < n; r++) {
    const uint8_t* row = w + r * row_bytes;
    float* o = out + r * k;
    for (int64_t g = 0; g < k / 32; g++) {
      unpack_group<T>(row, (int)g, q, a, b);
      for (int j = 0; j < 32; j++) o[g * 32 + j] = a[j >> 4] * q[j] + b[j >> 4];
    }
  }
}

// The activations quantized per 32-group to int8 (llama.cpp's Q8 of x): xq[m, k],
// dx[m, k/32] the scale, xs[m, k/32, 2] = dx * sum of xq over each half group,
// xsum[m, k/32] = both halves, xd[m, k/32, 8] = dx repeated (a vector load per group).
struct QuantX {
  const int8_t* xq;
  const float* dx;
  const float* xs;
  const float* xsum;
  const float* xd;
  // xq with each pair of groups (g, g+1) reordered [g 0-15, g+1 0-15, g 16-31, g+1 16-31]:
  // the order the 32-weight blocks' nibbles unpack into (AVX512 fast path).
  const int8_t* xp;
  int64_t m, k;
};
