#pragma once
// Scalar math shared by the CPU kernels: a vectorizable e^x, a row's logsumexp, the logistic sigmoid.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace moelab::cpu {

// e^x for f32 as plain arithmetic and bit operations, so that a loop over it vectorizes (libm's expf is one call per
// element and dominated cross-entropy and attention). Cephes' expf: e^x = 2^n e^r with n = round(x / ln 2), r = x - n
// ln 2 in two parts, e^r by a degree-7 polynomial; relative error under 1e-7 (about 1.3 ulp). x below -87.3 (and -inf)
// gives 0, NaN gives NaN; x above 88 overflows (callers pass x - max <= 0). Selects are written as bit masks because
// a float branch would keep the compiler from vectorizing.
[[gnu::always_inline]] inline float exp_simd(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  // all ones where x < -87.3 or x = -inf (NaN excluded), else zero
  const uint32_t under = 0u - static_cast<uint32_t>((bits > 0xC2AE999Au) & (bits <= 0xFF800000u));
  const float xc = std::bit_cast<float>((bits & ~under) | (std::bit_cast<uint32_t>(-87.3f) & under));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, held in the low mantissa bits
  const float t = xc * 1.44269504f + magic;
  const float n = t - magic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((std::bit_cast<uint32_t>(t) - std::bit_cast<uint32_t>(magic) + 127u) << 23);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(e_r * two_n) & ~under);
}
[[gnu::always_inline]] inline double exp_simd(double x) { return std::exp(x); }  // f64 is the gradient-check path: libm's exact exp

// logsumexp of one row: max subtracted, the sum in double.
template <class F> double row_logsumexp(const F* x, int64_t n) {
  F m = -std::numeric_limits<F>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  double z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) z += exp_simd(x[j] - m);
  return static_cast<double>(m) + std::log(z);
}

// 1 / (1 + e^-v): SiLU's gate and its derivative.
template <class T> T sigmoid(T v) { return 1 / (1 + std::exp(-v)); }

}  // namespace moelab::cpu
