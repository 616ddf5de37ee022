// Small vectorisable helpers shared by the CPU ops (decode attention, prefix block).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ptpeft_cpu {

// SIMD vectors through GCC's vector extension (AVX-512 registers in a -mavx512f build; a v16
// is two AVX2 registers otherwise), with unaligned loads and stores (one vmovups each).
typedef float v8 __attribute__((vector_size(32)));
typedef float v16 __attribute__((vector_size(64)));

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Reductions with 8 independent lanes: without -ffast-math a single running sum or max is a
// serial chain the compiler does not vectorise.
template <typename T, typename A = T>
inline A dot(const T* a, const T* b, int64_t n) {
  A s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) s[u] += static_cast<A>(a[i + u]) * static_cast<A>(b[i + u]);
  A t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) t += static_cast<A>(a[i]) * static_cast<A>(b[i]);
  return t;
}

template <typename T>
inline T max_of(const T* x, int64_t n) {
  T s[8];
  for (int u = 0; u < 8; ++u) s[u] = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) s[u] = std::max(s[u], x[i + u]);
  T t = std::max(std::max(std::max(s[0], s[1]), std::max(s[2], s[3])), std::max(std::max(s[4], s[5]), std::max(s[6], s[7])));
  for (; i < n; ++i) t = std::max(t, x[i]);
  return t;
}

template <typename T>
inline T sum_of(const T* x, int64_t n) {
  T s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) s[u] += x[i + u];
  T t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) t += x[i];
  return t;
}

// exp(x) for x <= 0 in float without a libm call (libm's expf is a scalar call per element):
// Cody-Waite reduction x = n·ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r (rel. error
// < 2e-7) and 2^n through the exponent bits. Rounding by the 1.5·2^23 trick and bit casts
// (not floor + memcpy) keep a loop over it vectorisable. fp64 keeps libm's accuracy.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // keeps 2^n a normal float; e^-87 ~ 1.6e-38 is 0 for a softmax
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split hi + lo
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return __builtin_bit_cast(float, __builtin_bit_cast(int32_t, p) + (static_cast<int32_t>(n) << 23));
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// A softmax weight exp(x), x = score - row max <= 0, exactly 0 below -64 in float: the row's largest
// term is 1, so terms under e^-64 ≈ 1.6e-28 cannot change an fp32 sum, and masked keys (score
// ≈ finfo.min) then weigh 0 instead of the clamped e^-87 ≈ 1.6e-38, whose products with the values
// are denormal floats (slow everywhere: a padded batch ran 14x slower through the GEMMs) and
// let values behind the mask leak in. fp64 keeps exp (its masked terms underflow to 0).
inline float softmax_weight(float x) { return x < -64.0f ? 0.0f : exp_nonpositive(x); }
inline double softmax_weight(double x) { return std::exp(x); }

}  // namespace ptpeft_cpu
