#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011): the i-th number of a stream is a pure function
// of (seed, i). No hidden sequential state, so every backend and thread count produces the same values.
// The functions below are inline and compile for the host and for the GPU (engine/cuda/create.cu draws with them):
// the random words and the uniforms are bit-identical on both; the normals go through the C library's log and cos on
// the host and CUDA's on the GPU, so they agree to a few ulps of double (engine/kernels/create.h gives the bound).
#include <array>
#include <cmath>
#include <cstdint>

#include "engine/host_device.h"

namespace moelab {

// Four 32-bit random words for one 128-bit counter under a 64-bit key (a plain array: device code has no std::array).
struct PhiloxWords {
  uint32_t w[4];
};

// Philox4x32 with 10 rounds: a Feistel-like bijection of the 128-bit counter keyed by 64 bits.
MOELAB_HOST_DEVICE inline PhiloxWords philox4x32_words(uint64_t counter, uint64_t key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    uint32_t n1 = static_cast<uint32_t>(p1);
    uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    uint32_t n3 = static_cast<uint32_t>(p0);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += kWeyl0, k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// The same words as a std::array, for host code.
inline std::array<uint32_t, 4> philox4x32(uint64_t counter, uint64_t key) {
  const PhiloxWords r = philox4x32_words(counter, key);
  return {r.w[0], r.w[1], r.w[2], r.w[3]};
}

// 53 random bits -> [0, 1) (exact: an integer below 2^53 times a power of two).
MOELAB_HOST_DEVICE inline double philox_unit(uint32_t hi, uint32_t lo) {
  uint64_t bits = (static_cast<uint64_t>(hi) << 21) ^ (lo >> 11);
  return static_cast<double>(bits & ((1ull << 53) - 1)) * 0x1.0p-53;
}

// x * y rounded on its own. nvcc contracts a product into a neighbouring addition (one FMA, one rounding) by default;
// host C++ (ISO mode) does not: the GPU path spells out the separate rounding to give the host's bits.
MOELAB_HOST_DEVICE inline double mul_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(x, y);
#else
  return x * y;
#endif
}

// uniform double in [0, 1) and standard normal from the stream (seed, index). Normals use Box-Muller on the pair of
// uniforms drawn for counter index, so normal(seed, i) is reproducible element by element.
MOELAB_HOST_DEVICE inline double philox_uniform(uint64_t seed, uint64_t index) {
  PhiloxWords r = philox4x32_words(index, seed);
  return philox_unit(r.w[0], r.w[1]);
}

MOELAB_HOST_DEVICE inline double philox_normal(uint64_t seed, uint64_t index) {
  constexpr double kTwoPi = 2 * 3.14159265358979323846;  // 2 * std::numbers::pi (C++20; nvcc compiles C++17)
  PhiloxWords r = philox4x32_words(index, seed);
  double u1 = 1.0 - philox_unit(r.w[0], r.w[1]);  // (0, 1]: log stays finite
  double u2 = philox_unit(r.w[2], r.w[3]);
  const double radius = std::sqrt(mul_rn(-2.0, std::log(u1)));
  const double angle = mul_rn(kTwoPi, u2);
  return mul_rn(radius, std::cos(angle));
}

// A stream: a seed and how many numbers have been drawn. Its state is two integers, saved in checkpoints.
struct Generator {
  uint64_t seed = 0;
  uint64_t offset = 0;
  explicit Generator(uint64_t seed_ = 0, uint64_t offset_ = 0) : seed(seed_), offset(offset_) {}
  // Reserves n numbers and returns the index of the first.
  uint64_t advance(uint64_t n) {
    uint64_t first = offset;
    offset += n;
    return first;
  }
};

}  // namespace moelab
