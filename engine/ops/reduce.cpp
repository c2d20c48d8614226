// Reductions (sum, mean, max), softmax and log_softmax over the last dim, and cumsum. Each op checks its inputs,
// allocates its outputs, runs its kernel (engine/kernels/reduce.h: engine/cpu/reduce.cpp, engine/cuda/reduce.cu) and
// records a named backward. A reduction over `dim` views x as [outer, n, inner] and produces [outer, inner].
#include "engine/kernels/reduce.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// The output shape of a reduction over `dim` (normalized in place), with or without the reduced dim per keepdim.
static Shape reduce_view(const char* op, const Tensor& x, int64_t& dim, bool keepdim) {
  check_float(op, x);
  dim = normalize_dim(op, dim, x.dim());
  Shape out_shape = x.shape();
  if (keepdim)
    out_shape[dim] = 1;
  else
    out_shape.erase(out_shape.begin() + dim);
  return out_shape;
}

// ---- sum -------------------------------------------------------------------------------------------------------------

static Tensor sum_backward(const Tensor& g, const Shape& in_shape) { return expand(g, in_shape); }

Tensor sum(const Tensor& x) {
  check_float("sum", x);
  Tensor out = Tensor::empty({}, x.dtype(), x.device());
  KERNEL(sum_all, x.device())(x, out);
  return record("sum", out, {x},
                [in_shape = x.shape()](const Tensor& g) -> std::vector<Tensor> { return {sum_backward(g, in_shape)}; });
}

// g has the reduced shape; put the reduced dim back as 1 and broadcast it.
static Tensor sum_dim_backward(const Tensor& g, const Shape& in_shape, const Shape& keep_shape) {
  return expand(reshape(g, keep_shape), in_shape);
}

Tensor sum(const Tensor& x, int64_t dim, bool keepdim) {
  Shape out_shape = reduce_view("sum", x, dim, keepdim);
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  KERNEL(sum_dim, x.device())(x, dim, out);
  Shape keep_shape = x.shape();
  keep_shape[dim] = 1;
  return record("sum_dim", out, {x}, [in_shape = x.shape(), keep_shape](const Tensor& g) -> std::vector<Tensor> {
    return {sum_dim_backward(g, in_shape, keep_shape)};
  });
}

// Mean = sum scaled; its backward is the composition's.
Tensor mean(const Tensor& x) {
  check_float("mean", x);
  if (x.numel() == 0) fail("mean: empty tensor {}", x.str());
  return mul(sum(x), 1.0 / static_cast<double>(x.numel()));
}

Tensor mean(const Tensor& x, int64_t dim, bool keepdim) {
  check_float("mean", x);
  dim = normalize_dim("mean", dim, x.dim());
  int64_t n = x.size(dim);
  if (n == 0) fail("mean: dim {} of {} is empty", dim, x.str());
  return mul(sum(x, dim, keepdim), 1.0 / static_cast<double>(n));
}

// ---- max: the gradient goes to the first position of the maximum ------------------------------------------------------

// dx = 0 except dx[o, where[o, i], i] = g[o, i], in the shape `reduced_shape` that `dim` indexes, then in_shape.
static Tensor max_backward(const Tensor& g, const Tensor& where, const Shape& reduced_shape, int64_t dim,
                           const Shape& in_shape) {
  Tensor dx = Tensor::empty(reduced_shape, g.dtype(), g.device());
  KERNEL(max_backward, g.device())(g, where, dim, dx);
  return reshape(dx, in_shape);
}

// The max of x over `dim` of x_reduced (x, or its flat view for the max of every element), shaped out_shape.
static Tensor max_over(const char* op, const Tensor& x, const Tensor& x_reduced, int64_t dim, const Shape& out_shape) {
  if (x_reduced.size(dim) == 0) fail("{}: empty reduction over {}", op, x.str());
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  Tensor where = Tensor::empty(out_shape, DType::I32, x.device());
  KERNEL(max_forward, x.device())(x_reduced, dim, out, where);
  return record(
      op, out, {x},
      [where, reduced_shape = x_reduced.shape(), dim, in_shape = x.shape()](const Tensor& g) -> std::vector<Tensor> {
        return {max_backward(g, where, reduced_shape, dim, in_shape)};
      });
}

Tensor max(const Tensor& x, int64_t dim, bool keepdim) {
  Shape out_shape = reduce_view("max", x, dim, keepdim);
  return max_over("max_dim", x, x, dim, out_shape);
}

Tensor max(const Tensor& x) {
  check_float("max", x);
  return max_over("max", x, reshape(x.detach(), {x.numel()}), 0, {});
}

// ---- softmax / log_softmax over the last dim ----------------------------------------------------------------------------

static void check_rows(const char* op, const Tensor& x) {
  check_float(op, x);
  if (x.dim() == 0) fail("{}: needs at least one dim, got {}", op, x.str());
}

static Tensor softmax_backward(const Tensor& y, const Tensor& g) {
  Tensor dx = Tensor::empty(g.shape(), g.dtype(), g.device());
  KERNEL(softmax_backward, g.device())(y, g, dx);
  return dx;
}

Tensor softmax(const Tensor& x) {
  check_rows("softmax", x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  KERNEL(softmax_forward, x.device())(x, y);
  return record("softmax", y, {x},
                [y = y.detach()](const Tensor& g) -> std::vector<Tensor> { return {softmax_backward(y, g)}; });
}

static Tensor log_softmax_backward(const Tensor& y, const Tensor& g) {
  Tensor dx = Tensor::empty(g.shape(), g.dtype(), g.device());
  KERNEL(log_softmax_backward, g.device())(y, g, dx);
  return dx;
}

Tensor log_softmax(const Tensor& x) {
  check_rows("log_softmax", x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  KERNEL(log_softmax_forward, x.device())(x, y);
  return record("log_softmax", y, {x},
                [y = y.detach()](const Tensor& g) -> std::vector<Tensor> { return {log_softmax_backward(y, g)}; });
}

// ---- cumsum (no grad) --------------------------------------------------------------------------------------------------

Tensor cumsum(const Tensor& x) {
  check_defined("cumsum", x);
  if (x.dim() == 0) fail("cumsum: needs at least one dim, got {}", x.str());
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  KERNEL(cumsum, x.device())(x, out);
  return out;
}

}  // namespace moelab
