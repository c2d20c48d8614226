// CPU kernels of engine/kernels/create.h: every element is a double computed from its index, cast to the element
// type (T: float, double or int32_t; F: float or double).
#include "engine/kernels/create.h"

#include "engine/cpu/parallel.h"
#include "engine/rng.h"

namespace moelab::cpu {

namespace {

// out[i] = value_at(i) cast to T.
template <class T, class Gen> void fill_with(const Tensor& out, Gen value_at) {
  T* o = out.data<T>();
  parallel_for(out.numel(), 4, [&](int64_t i) { o[i] = static_cast<T>(value_at(i)); });
}

}  // namespace

void fill_value(const Tensor& out, double value) {
  dispatch_all("create", out.dtype(), [&](auto t) { fill_with<decltype(t)>(out, [value](int64_t) { return value; }); });
}

void fill_arange(const Tensor& out) {
  dispatch_all("arange", out.dtype(),
               [&](auto t) { fill_with<decltype(t)>(out, [](int64_t i) { return static_cast<double>(i); }); });
}

void fill_uniform(const Tensor& out, uint64_t seed, uint64_t first, double low, double high) {
  dispatch_float("uniform", out.dtype(), [&](auto t) {
    fill_with<decltype(t)>(
        out, [=](int64_t i) { return low + (high - low) * philox_uniform(seed, first + static_cast<uint64_t>(i)); });
  });
}

void fill_normal(const Tensor& out, uint64_t seed, uint64_t first, double mean, double stddev) {
  dispatch_float("randn", out.dtype(), [&](auto t) {
    fill_with<decltype(t)>(
        out, [=](int64_t i) { return mean + stddev * philox_normal(seed, first + static_cast<uint64_t>(i)); });
  });
}

}  // namespace moelab::cpu
