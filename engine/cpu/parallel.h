#pragma once
// OpenMP helpers for the CPU backend: parallelize only when there is enough work to pay for waking the threads.
#include <omp.h>

#include <cstdint>

namespace moelab::cpu {

// Below this many elements of simple work, a loop runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;

// Calls body(i) for i in [0, n), in parallel when n * cost_per_item is large enough.
template <class Body> void parallel_for(int64_t n, int64_t cost_per_item, Body body) {
  if (n * cost_per_item < kParallelGrain || omp_get_max_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace moelab::cpu
