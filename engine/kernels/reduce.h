#pragma once
// The kernels behind engine/ops/reduce.cpp: sums, max with the position of the maximum, softmax and log_softmax over
// the last dim, cumsum. CPU: engine/cpu/reduce.cpp; CUDA: engine/cuda/reduce.cu. T is the element type: f32 or f64
// (cumsum also i32). A reduction over `dim` views its input as [outer, n, inner] and produces [outer, inner].
#include "engine/kernels.h"

namespace moelab {

// The [outer, n, inner] view of a tensor of `shape` around dimension `dim` (already normalized to [0, ndim)).
struct ReduceDims {
  int64_t outer = 1, n = 1, inner = 1;
};
inline ReduceDims reduce_dims(const Shape& shape, int64_t dim) {
  ReduceDims v;
  for (int64_t d = 0; d < dim; ++d) v.outer *= shape[d];
  v.n = shape[dim];
  for (int64_t d = dim + 1; d < static_cast<int64_t>(shape.size()); ++d) v.inner *= shape[d];
  return v;
}

// ---- sum ------------------------------------------------------------------------------------------------------------
// out [] = the sum of every element of x, accumulated in double (a loss summed over many tokens stays accurate) in a
// fixed order for a given size.
DECLARE_KERNEL(sum_all, (const Tensor& x, const Tensor& out))
// out[o, i] = sum_j x[o, j, i] over dim: accumulated in double when dim is the last one (inner = 1), else in T in the
// order j = 0, 1, ...
DECLARE_KERNEL(sum_dim, (const Tensor& x, int64_t dim, const Tensor& out))

// ---- max: the gradient goes to the first position of the maximum -------------------------------------------------------
// out[o, i] = max_j x[o, j, i] and where (i32) [o, i] = the first j attaining it; a NaN counts as the maximum (the
// first NaN wins).
DECLARE_KERNEL(max_forward, (const Tensor& x, int64_t dim, const Tensor& out, const Tensor& where))
// dx [outer, n, inner] (the forward's input shape) = 0 except dx[o, where[o, i], i] = g[o, i].
DECLARE_KERNEL(max_backward, (const Tensor& g, const Tensor& where, int64_t dim, const Tensor& dx))

// ---- softmax / log_softmax over the last dim ----------------------------------------------------------------------------
// Per row of the last dim, with m = max(x) and z = sum_j exp(x_j - m) in double:
//   softmax: y = exp(x - m) / z          log_softmax: y = x - (log z + m)
DECLARE_KERNEL(softmax_forward, (const Tensor& x, const Tensor& y))
DECLARE_KERNEL(log_softmax_forward, (const Tensor& x, const Tensor& y))
// softmax: dx = y * (g - <g, y>) per row, the dot product in double.
DECLARE_KERNEL(softmax_backward, (const Tensor& y, const Tensor& g, const Tensor& dx))
// log_softmax: dx = g - exp(y) * sum(g) per row (exp(y) = softmax(x)), the sum in double.
DECLARE_KERNEL(log_softmax_backward, (const Tensor& y, const Tensor& g, const Tensor& dx))

// ---- cumsum ---------------------------------------------------------------------------------------------------------
// out = the running sum of x along the last dim, in T, in order (f32, f64 or i32).
DECLARE_KERNEL(cumsum, (const Tensor& x, const Tensor& out))

}  // namespace moelab
