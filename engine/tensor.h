#pragma once
// Tensor = a shape and dtype over a shared, reference-counted Storage, plus the autograd hooks.
//
// Layout: every tensor is dense and row-major (contiguous) starting at `offset` elements into its storage.
// Views share storage and never copy: reshape() and slice_rows() (a range along dim 0) are views.
// transpose()/permute() COPY into a new contiguous tensor: kernels then only ever see contiguous memory, which keeps
// every op one simple loop, and matmul takes "transposed" flags so the hot path needs no transposes at all.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/dtype.h"

namespace moelab {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);  // "[2, 3]"
// Elements of a shape. Throws std::invalid_argument on a negative size or a count above 2^63 - 1 (shapes come from
// files too: a corrupt one must fail, not wrap around).
int64_t shape_numel(const Shape& shape);
// Bytes of a dense tensor of `shape` and `dtype`; throws like shape_numel, also when the bytes pass 2^63 - 1.
int64_t shape_bytes(const Shape& shape, DType dtype);

// One allocation on one device. Tensors that are views of each other share it.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

// The bytes of CPU storage alive now, and the most alive at once since the start or the last reset_cpu_peak_memory():
// a step's peak memory on the CPU (cuda::peak_memory_bytes() is the GPU pool's).
size_t cpu_memory_bytes();
size_t cpu_peak_memory_bytes();
void reset_cpu_peak_memory();

struct Node;        // autograd.h: how to send a gradient back to the inputs of the op that made a tensor
struct TensorImpl;  // below

class Tensor {
 public:
  Tensor() = default;  // undefined ("no tensor"), e.g. a missing gradient
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}
  // Uninitialized contiguous tensor.
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  int64_t dim() const { return static_cast<int64_t>(shape().size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const;
  DType dtype() const;
  Device device() const;
  bool is_cuda() const { return device() == Device::CUDA; }
  std::string str() const;  // "f32[2, 3]" for error messages

  // Typed pointer to the first element (checks the dtype; CPU or device memory as the tensor lives).
  template <class T> T* data() const;
  void* raw_data() const;
  // The single element of a one-element tensor, as double (copies from the GPU if needed).
  double item() const;
  template <class T> std::vector<T> to_vector() const;

  // ---- autograd ----
  bool requires_grad() const;
  // Marks a leaf (a parameter) so that backward() accumulates into grad().
  Tensor& set_requires_grad(bool on = true);
  Tensor grad() const;  // undefined until a backward pass reached this tensor
  void set_grad(const Tensor& g) const;
  void zero_grad() const;  // drops the gradient
  const std::shared_ptr<Node>& grad_fn() const;
  bool is_leaf() const { return grad_fn() == nullptr; }
  // Runs reverse-mode autodiff from this one-element tensor (seed gradient 1).
  void backward() const;
  // Same storage, cut from the graph (no grad_fn, no requires_grad).
  Tensor detach() const;
  // Moves this tensor's data (and its gradient) to `device` in place: every handle to this tensor sees the move.
  // For leaves such as a model's parameters; a view of its old storage keeps the old data.
  void move_to(Device device);

  TensorImpl* impl() const { return impl_.get(); }
  // True when this handle is the only way to its data: no other handle to this tensor, no view of its storage.
  bool sole_owner() const;
  bool same(const Tensor& other) const { return impl_ == other.impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

struct TensorImpl {
  Shape shape;
  DType dtype = DType::F32;
  std::shared_ptr<Storage> storage;
  int64_t offset = 0;  // in elements
  bool requires_grad = false;
  Tensor grad;
  std::shared_ptr<Node> grad_fn;
};

[[noreturn]] void throw_dtype_access_error(DType have, DType want);

template <class T> T* Tensor::data() const {
  if (dtype() != dtype_of<T>()) throw_dtype_access_error(dtype(), dtype_of<T>());
  return static_cast<T*>(raw_data());
}

}  // namespace moelab
