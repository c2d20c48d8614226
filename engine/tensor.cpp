#include "engine/tensor.h"

#include <fmt/format.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "engine/autograd.h"
#include "engine/cuda/runtime.h"
#include "engine/error.h"

namespace moelab {

std::string shape_str(const Shape& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  bool overflow = false, has_zero = false;  // a size 0 anywhere makes the count 0, even after an overflow
  for (int64_t s : shape) {
    if (s < 0) fail("shape {} has a negative size", shape_str(shape));
    overflow = __builtin_mul_overflow(n, s, &n) || overflow;
    has_zero = has_zero || s == 0;
  }
  if (has_zero) return 0;
  if (overflow) fail("shape {} has more than 2^63 - 1 elements", shape_str(shape));
  return n;
}

int64_t shape_bytes(const Shape& shape, DType dtype) {
  int64_t bytes = 0;
  if (__builtin_mul_overflow(shape_numel(shape), static_cast<int64_t>(dtype_size(dtype)), &bytes))
    fail("shape {} of {} has more than 2^63 - 1 bytes", shape_str(shape), dtype_name(dtype));
  return bytes;
}

// ---- Storage ---------------------------------------------------------------------------------------------------------

static std::atomic<size_t> cpu_live_bytes{0}, cpu_peak_bytes{0};

size_t cpu_memory_bytes() { return cpu_live_bytes.load(); }
size_t cpu_peak_memory_bytes() { return cpu_peak_bytes.load(); }
void reset_cpu_peak_memory() { cpu_peak_bytes.store(cpu_live_bytes.load()); }

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (device == Device::CUDA) {
    data_ = cuda::allocate(bytes);
  } else if (bytes > 0) {
    // 64-byte alignment: one AVX-512 register, one cache line.
    data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!data_) throw std::bad_alloc();
    const size_t live = cpu_live_bytes.fetch_add(bytes) + bytes;
    size_t peak = cpu_peak_bytes.load();
    while (live > peak && !cpu_peak_bytes.compare_exchange_weak(peak, live)) {
    }
  }
}

Storage::~Storage() {
  if (device_ == Device::CUDA) {
    cuda::release(data_);
  } else {
    std::free(data_);
    cpu_live_bytes.fetch_sub(bytes_);
  }
}

// ---- Tensor ----------------------------------------------------------------------------------------------------------

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t s : shape)
    if (s < 0) throw std::invalid_argument("Tensor::empty: negative size in shape " + shape_str(shape));
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = shape;
  impl->dtype = dtype;
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(shape_bytes(shape, dtype)), device);
  return Tensor(std::move(impl));
}

static TensorImpl& checked(const std::shared_ptr<TensorImpl>& impl) {
  if (!impl) throw std::logic_error("use of an undefined Tensor");
  return *impl;
}

const Shape& Tensor::shape() const { return checked(impl_).shape; }
int64_t Tensor::numel() const { return shape_numel(shape()); }
DType Tensor::dtype() const { return checked(impl_).dtype; }
Device Tensor::device() const { return checked(impl_).storage->device(); }

int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  if (d < -n || d >= n) throw std::out_of_range(fmt::format("size({}) of a tensor with shape {}", d, shape_str(shape())));
  return shape()[d < 0 ? d + n : d];
}

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  return fmt::format("{}{}{}", dtype_name(dtype()), shape_str(shape()), is_cuda() ? "@cuda" : "");
}

void throw_dtype_access_error(DType have, DType want) {
  throw std::invalid_argument(
      fmt::format("tensor data accessed as {} but the tensor holds {}", dtype_name(want), dtype_name(have)));
}

void* Tensor::raw_data() const {
  const TensorImpl& t = checked(impl_);
  return static_cast<char*>(t.storage->data()) + t.offset * dtype_size(t.dtype);
}

template <class T> std::vector<T> Tensor::to_vector() const {
  std::vector<T> out(numel());
  if (is_cuda())
    cuda::copy_to_host(out.data(), data<T>(), out.size() * sizeof(T));
  else if (!out.empty())
    std::memcpy(out.data(), data<T>(), out.size() * sizeof(T));
  return out;
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<bf16> Tensor::to_vector<bf16>() const;

double Tensor::item() const {
  if (numel() != 1) throw std::invalid_argument("item() of a tensor with shape " + shape_str(shape()));
  switch (dtype()) {
    case DType::F32: return to_vector<float>()[0];
    case DType::F64: return to_vector<double>()[0];
    case DType::I32: return to_vector<int32_t>()[0];
    case DType::BF16: return to_float(to_vector<bf16>()[0]);
  }
  return 0;
}

// ---- autograd hooks --------------------------------------------------------------------------------------------------

bool Tensor::requires_grad() const { return checked(impl_).requires_grad; }
bool Tensor::sole_owner() const { return impl_.use_count() == 1 && checked(impl_).storage.use_count() == 1; }

Tensor& Tensor::set_requires_grad(bool on) {
  if (on && dtype() == DType::I32) throw std::invalid_argument("an i32 tensor cannot require a gradient");
  checked(impl_).requires_grad = on;
  return *this;
}

Tensor Tensor::grad() const { return checked(impl_).grad; }
void Tensor::set_grad(const Tensor& g) const { checked(impl_).grad = g; }
void Tensor::zero_grad() const { checked(impl_).grad = Tensor(); }
const std::shared_ptr<Node>& Tensor::grad_fn() const { return checked(impl_).grad_fn; }

void Tensor::move_to(Device device) {
  TensorImpl& t = checked(impl_);
  if (device == this->device()) return;
  auto moved = std::make_shared<Storage>(numel() * dtype_size(t.dtype), device);
  const size_t bytes = numel() * dtype_size(t.dtype);
  if (device == Device::CUDA)
    cuda::copy_to_device(moved->data(), raw_data(), bytes);
  else
    cuda::copy_to_host(moved->data(), raw_data(), bytes);
  t.storage = std::move(moved);
  t.offset = 0;
  if (t.grad.defined()) t.grad.move_to(device);
}

Tensor Tensor::detach() const {
  const TensorImpl& t = checked(impl_);
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = t.shape;
  impl->dtype = t.dtype;
  impl->storage = t.storage;
  impl->offset = t.offset;
  return Tensor(std::move(impl));
}

}  // namespace moelab
