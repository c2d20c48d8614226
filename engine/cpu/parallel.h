#pragma once
// OpenMP helpers for the CPU backend: parallelize only when there is enough work to pay for waking the threads.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

// sum of term(i) for i in [0, n) in double, the same bits for any thread count: fixed-size chunks are summed in
// parallel, then the chunk sums are added in order. (OpenMP's reduction clause combines in thread arrival order,
// which would make training runs differ from run to run.)
template <class Term> double parallel_sum(int64_t n, Term term) {
  constexpr int64_t kChunk = 4096;
  int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  parallel_for(chunks, kChunk, [&](int64_t c) {
    double s = 0;
    for (int64_t i = c * kChunk, end = std::min(n, i + kChunk); i < end; ++i) s += term(i);
    partial[c] = s;
  });
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace moelab::cpu
