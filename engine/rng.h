#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011): the i-th number of a stream is a pure function
// of (seed, i). No hidden sequential state, so every backend and thread count produces the same values.
#include <array>
#include <cstdint>

namespace moelab {

// Four 32-bit random words for one 128-bit counter under a 64-bit key.
std::array<uint32_t, 4> philox4x32(uint64_t counter, uint64_t key);

// uniform float in [0, 1) and standard normal from the stream (seed, index). Normals use Box-Muller on the pair of
// uniforms drawn for counter index, so normal(seed, i) is reproducible element by element.
double philox_uniform(uint64_t seed, uint64_t index);
double philox_normal(uint64_t seed, uint64_t index);

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
