// Portable seeded randomness for the data layer. std::mt19937 is portable but std::uniform_int_distribution and
// std::shuffle are not (their algorithms are unspecified), so the same seed could give other batches with another
// standard library. Everything here is spelled out, so batches are identical everywhere.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace moelab::data {

// Final mixing step of SplitMix64: a bijection on 64-bit words with good avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// An independent seed for stream (a, b) of a run seeded with `seed`, e.g. (epoch) or (domain, epoch).
inline uint64_t derive_seed(uint64_t seed, uint64_t a, uint64_t b = 0) {
  return mix64(mix64(mix64(seed ^ 0x6A09E667F3BCC909ull) + a) + b);
}

// SplitMix64 (Steele, Lea, Flood 2014). One 64-bit word of state, so a loader position saves as one number.
struct SplitMix64 {
  uint64_t state = 0;

  explicit SplitMix64(uint64_t seed = 0) : state(seed) {}

  uint64_t next() { return mix64(state += 0x9E3779B97F4A7C15ull); }

  // Uniform in [0, n) without modulo bias: reject the lowest 2^64 mod n draws, so the accepted range is a multiple
  // of n.
  uint64_t below(uint64_t n) {
    if (n == 0) throw std::invalid_argument("SplitMix64::below: n must be >= 1, got 0");
    const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }

  // Uniform double in [0, 1) from the top 53 bits.
  double uniform01() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

}  // namespace moelab::data
