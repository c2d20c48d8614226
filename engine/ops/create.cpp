// Creation ops and seeded random tensors. Each allocates its tensor on the requested device and fills it there
// (engine/kernels/create.h); from_vector copies the host values over, then converts on the device.
#include <cstring>

#include "engine/kernels/create.h"
#include "engine/kernels/shape.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

Tensor full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor out = Tensor::empty(shape, dtype, device);
  KERNEL(fill_value, device)(out, value);
  return out;
}
Tensor zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }
Tensor zeros_like(const Tensor& x) { return zeros(x.shape(), x.dtype(), x.device()); }
Tensor ones_like(const Tensor& x) { return ones(x.shape(), x.dtype(), x.device()); }

Tensor arange(int64_t n, DType dtype, Device device) {
  Tensor out = Tensor::empty({n}, dtype, device);
  KERNEL(fill_arange, device)(out);
  return out;
}

// The values as a tensor of their own type on `device` (one copy), then converted to dtype there.
template <class V>
static Tensor from_values(const std::vector<V>& values, const Shape& shape, DType dtype, Device device) {
  if (static_cast<int64_t>(values.size()) != shape_numel(shape))
    fail("from_vector: {} values do not fill shape {}", values.size(), shape_str(shape));
  Tensor host = Tensor::empty(shape, dtype_of<V>());
  if (!values.empty()) std::memcpy(host.raw_data(), values.data(), values.size() * sizeof(V));
  Tensor source = to_device(host, device);
  if (source.dtype() == dtype) return source;
  Tensor out = Tensor::empty(shape, dtype, device);
  KERNEL(convert_dtype, device)(source, out);
  return out;
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
  Tensor out = Tensor::empty(shape, dtype, device);
  KERNEL(fill_normal, device)(out, gen.seed, gen.advance(shape_numel(shape)), mean, stddev);
  return out;
}

Tensor uniform(const Shape& shape, Generator& gen, double low, double high, DType dtype, Device device) {
  check_float("uniform", Tensor::empty({0}, dtype));
  Tensor out = Tensor::empty(shape, dtype, device);
  KERNEL(fill_uniform, device)(out, gen.seed, gen.advance(shape_numel(shape)), low, high);
  return out;
}

}  // namespace moelab
