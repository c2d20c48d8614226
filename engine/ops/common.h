#pragma once
// Shared checks for the op implementations (internal to engine/ops).
#include "engine/cpu/parallel.h"
#include "engine/error.h"
#include "engine/ops.h"

namespace moelab::detail {

inline void check_defined(const char* op, const Tensor& x) {
  if (!x.defined()) fail("{}: undefined input tensor", op);
}

inline void check_same_dtype_device(const char* op, const Tensor& a, const Tensor& b) {
  check_defined(op, a);
  check_defined(op, b);
  if (a.dtype() != b.dtype() || a.device() != b.device())
    fail("{}: operands must share dtype and device, got {} and {}", op, a.str(), b.str());
}

inline void check_float(const char* op, const Tensor& x) {
  check_defined(op, x);
  if (x.dtype() == DType::I32) fail("{}: needs a floating-point tensor, got {}", op, x.str());
}

inline void check_index(const char* op, const Tensor& index) {
  check_defined(op, index);
  if (index.dtype() != DType::I32) fail("{}: indices must be i32, got {}", op, index.str());
}

// A bf16 copy of an f32 tensor (round to nearest even): the operand of a product under mixed precision (matmul.cpp).
// A parameter's (or a view's of one) is the copy the precision guard holds, when it holds the parameters' copies.
Tensor rounded_to_bf16(const Tensor& x);
// Whether a product multiplies x as such a copy: x is f32 and the precision mode is BF16 (f64 is never rounded).
bool multiplied_in_bf16(const Tensor& x);

inline int64_t normalize_dim(const char* op, int64_t dim, int64_t ndim) {
  if (dim < -ndim || dim >= ndim) fail("{}: dim {} out of range for a {}-d tensor", op, dim, ndim);
  return dim < 0 ? dim + ndim : dim;
}

}  // namespace moelab::detail
