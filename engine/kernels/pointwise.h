#pragma once
// The kernels behind engine/ops/pointwise.cpp: unary math and its backward, broadcasting binary arithmetic, the
// scalar forms, and expand. CPU: engine/cpu/pointwise.cpp; CUDA: engine/cuda/pointwise.cu. The math of each
// operation is written once, in engine/kernels/pointwise_math.h, and chosen by the UnaryOp / BinaryOp argument.
// Every kernel supports f32 and f64; all tensors are contiguous and share the dtype.
#include <vector>

#include "engine/kernels.h"
#include "engine/kernels/pointwise_math.h"

namespace moelab {

// ---- unary ----------------------------------------------------------------------------------------------------------
// y[i] = forward(x[i]) for op's functor; x and y have the same shape.
DECLARE_KERNEL(unary_forward, (UnaryOp op, const Tensor& x, const Tensor& y))
// dx[i] = backward(g[i], saved[i]), where saved is the forward's input x or output y as backward_reads(op) says (g
// itself when the backward reads neither); g, saved and dx have the same shape.
DECLARE_KERNEL(unary_backward, (UnaryOp op, const Tensor& g, const Tensor& saved, const Tensor& dx))

// ---- binary ---------------------------------------------------------------------------------------------------------
// out = a op b with NumPy broadcasting: out has the broadcast shape of a and b.
DECLARE_KERNEL(binary_forward, (BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out))

// Which side of the operation the scalar is on.
enum class ScalarSide { right, left };
// out[i] = x[i] op s (ScalarSide::right) or s op x[i] (ScalarSide::left), with s cast to the element type first.
DECLARE_KERNEL(scalar_forward, (BinaryOp op, const Tensor& x, double s, ScalarSide side, const Tensor& out))

// out = x broadcast to out's shape (NumPy rules; the op checked that x broadcasts to it).
DECLARE_KERNEL(expand_forward, (const Tensor& x, const Tensor& out))

// Element strides of a tensor of shape `in` indexed by the dims of the broadcast shape `out` (0 where `in` is
// broadcast): both backends walk broadcast operands with these.
inline std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out) {
  std::vector<int64_t> strides(out.size(), 0);
  int64_t stride = 1;
  for (int64_t i = static_cast<int64_t>(in.size()) - 1; i >= 0; --i) {
    size_t o = i + (out.size() - in.size());
    strides[o] = in[i] == 1 ? 0 : stride;
    stride *= in[i];
  }
  return strides;
}

}  // namespace moelab
