// Creation ops and seeded random tensors.
#include <algorithm>

#include "engine/cuda/runtime.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// Fills a host buffer, then moves it to the device when needed (creation is rare and never on a hot path).
template <class T, class Gen> static Tensor make_filled(const Shape& shape, DType dtype, Device device, Gen value_at) {
  Tensor host = Tensor::empty(shape, dtype, Device::CPU);
  T* out = host.data<T>();
  int64_t n = host.numel();
  cpu::parallel_for(n, 4, [&](int64_t i) { out[i] = static_cast<T>(value_at(i)); });
  return device == Device::CPU ? host : to_device(host, device);
}

template <class Gen> static Tensor make_any(const Shape& shape, DType dtype, Device device, Gen value_at) {
  return dispatch_all(dtype, [&](auto t) { return make_filled<decltype(t)>(shape, dtype, device, value_at); });
}

Tensor full(const Shape& shape, double value, DType dtype, Device device) {
  return make_any(shape, dtype, device, [value](int64_t) { return value; });
}
Tensor zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor zeros_like(const Tensor& x) { return zeros(x.shape(), x.dtype(), x.device()); }
Tensor ones_like(const Tensor& x) { return ones(x.shape(), x.dtype(), x.device()); }

Tensor arange(int64_t n, DType dtype, Device device) {
  return make_any({n}, dtype, device, [](int64_t i) { return static_cast<double>(i); });
}

template <class V> static Tensor from_values(const std::vector<V>& values, const Shape& shape, DType dtype,
                                             Device device) {
  if (static_cast<int64_t>(values.size()) != shape_numel(shape))
    fail("from_vector: {} values do not fill shape {}", values.size(), shape_str(shape));
  return make_any(shape, dtype, device, [&](int64_t i) { return static_cast<double>(values[i]); });
}

Tensor from_vector(const std::vector<float>& values, const Shape& shape, DType dtype, Device device) {
  return from_values(values, shape, dtype, device);
}
Tensor from_vector(const std::vector<double>& values, const Shape& shape, DType dtype, Device device) {
  return from_values(values, shape, dtype, device);
}
Tensor from_vector(const std::vector<int32_t>& values, const Shape& shape, Device device) {
  return from_values(values, shape, DType::I32, device);
}

Tensor randn(const Shape& shape, Generator& gen, double mean, double stddev, DType dtype, Device device) {
  check_float("randn", Tensor::empty({0}, dtype));
  uint64_t first = gen.advance(shape_numel(shape));
  uint64_t seed = gen.seed;
  return make_any(shape, dtype, device,
                  [=](int64_t i) { return mean + stddev * philox_normal(seed, first + static_cast<uint64_t>(i)); });
}

Tensor uniform(const Shape& shape, Generator& gen, double low, double high, DType dtype, Device device) {
  check_float("uniform", Tensor::empty({0}, dtype));
  uint64_t first = gen.advance(shape_numel(shape));
  uint64_t seed = gen.seed;
  return make_any(shape, dtype, device, [=](int64_t i) {
    return low + (high - low) * philox_uniform(seed, first + static_cast<uint64_t>(i));
  });
}

}  // namespace moelab
