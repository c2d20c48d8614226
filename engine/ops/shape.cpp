// Shape and memory ops: views (reshape, slice_rows), copies (transpose/permute, concat/split, clone), and copies
// between devices and dtypes. Copies that move elements and dtype conversions run in the kernels of
// engine/kernels/shape.h; whole-tensor copies are memory copies (memcpy, or engine/cuda/runtime.h).
#include <cstring>
#include <numeric>

#include "engine/cuda/runtime.h"
#include "engine/kernels/pointwise.h"
#include "engine/kernels/shape.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// A new tensor header over x's storage (a view): same data, new shape and offset.
static Tensor make_view(const Tensor& x, Shape shape, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->shape = std::move(shape);
  impl->dtype = x.dtype();
  impl->storage = x.impl()->storage;
  impl->offset = offset;
  return Tensor(std::move(impl));
}

// ---- reshape: a view; the gradient is reshaped back ------------------------------------------------------------------
Tensor reshape(const Tensor& x, Shape shape) {
  check_defined("reshape", x);
  int64_t known = 1, infer_at = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer_at >= 0) fail("reshape: more than one -1 in {}", shape_str(shape));
      infer_at = static_cast<int64_t>(i);
    } else if (shape[i] < 0) {
      fail("reshape: negative size in {}", shape_str(shape));
    } else if (__builtin_mul_overflow(known, shape[i], &known)) {
      fail("reshape: cannot view {} as {}: more than 2^63 - 1 elements", x.str(), shape_str(shape));
    }
  }
  if (infer_at >= 0) {
    if (known == 0 || x.numel() % known != 0) fail("reshape: cannot view {} as {}", x.str(), shape_str(shape));
    shape[infer_at] = x.numel() / known;
  }
  if (shape_numel(shape) != x.numel()) fail("reshape: cannot view {} as {}", x.str(), shape_str(shape));
  Shape in_shape = x.shape();
  return record("reshape", make_view(x, std::move(shape), x.impl()->offset), {x},
                [in_shape](const Tensor& g) -> std::vector<Tensor> { return {reshape(g, in_shape)}; });
}

// ---- slice_rows: a view of x[start:end] -----------------------------------------------------------------------------
// The gradient lands in those rows of the gradient x holds when it holds one alone (AccumulatingBackwardFn: a weight
// whose row blocks are used apart, as attention's wqkv by the q, k and v products, gets each block's gradient added in
// its rows, not a full-size add per block), else of a zero tensor.
static std::vector<Tensor> slice_rows_backward(const Tensor& g, const Shape& in_shape, int64_t start, int64_t end,
                                               const std::vector<Tensor>& held) {
  const Tensor held_dx = held.empty() ? Tensor() : held[0];
  if (held_dx.defined() && held_dx.dtype() == g.dtype()) {
    const Tensor rows = slice_rows(held_dx, start, end);
    KERNEL(binary_forward, g.device())(BinaryOp::add, rows, g, rows);  // in place: each element read, then written
    return {held_dx};
  }
  Tensor dx = zeros(in_shape, g.dtype(), g.device());
  Tensor rows = slice_rows(dx, start, end);
  copy_(rows, g);
  return {dx};
}

Tensor slice_rows(const Tensor& x, int64_t start, int64_t end) {
  check_defined("slice_rows", x);
  if (x.dim() == 0 || start < 0 || end < start || end > x.size(0))
    fail("slice_rows: rows [{}, {}) out of range for {}", start, end, x.str());
  Shape shape = x.shape();
  shape[0] = end - start;
  int64_t row = x.size(0) ? x.numel() / x.size(0) : 0;
  return record_accumulating("slice_rows", make_view(x, shape, x.impl()->offset + start * row), {x},
                             [in_shape = x.shape(), start, end](const Tensor& g, const std::vector<Tensor>& held) {
                               return slice_rows_backward(g, in_shape, start, end, held);
                             });
}

// ---- permute / transpose: copies into the new dim order; the gradient is permuted back -------------------------------
Tensor permute(const Tensor& x, const std::vector<int64_t>& dims) {
  check_defined("permute", x);
  int64_t ndim = x.dim();
  std::vector<int64_t> order(ndim);
  std::vector<bool> seen(ndim, false);
  if (static_cast<int64_t>(dims.size()) != ndim) fail("permute: {} dims given for {}", dims.size(), x.str());
  for (int64_t d = 0; d < ndim; ++d) {
    order[d] = normalize_dim("permute", dims[d], ndim);
    if (seen[order[d]]) fail("permute: dim {} repeated", order[d]);
    seen[order[d]] = true;
  }
  Shape out_shape(ndim);
  for (int64_t d = 0; d < ndim; ++d) out_shape[d] = x.size(order[d]);
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());
  KERNEL(permute_copy, x.device())(x, order, out);
  std::vector<int64_t> inverse(ndim);
  for (int64_t d = 0; d < ndim; ++d) inverse[order[d]] = d;
  return record("permute", out, {x},
                [inverse](const Tensor& g) -> std::vector<Tensor> { return {permute(g, inverse)}; });
}

Tensor transpose(const Tensor& x, int64_t dim0, int64_t dim1) {
  check_defined("transpose", x);
  std::vector<int64_t> dims(x.dim());
  std::iota(dims.begin(), dims.end(), 0);
  std::swap(dims[normalize_dim("transpose", dim0, x.dim())], dims[normalize_dim("transpose", dim1, x.dim())]);
  return permute(x, dims);
}

// ---- narrow (internal): x[..., start:start+length, ...] along dim, a copy --------------------------------------------
// Viewing x as [outer, size(dim) * inner], a slice along dim is a block of columns in every row, so concat, split and
// their gradients are all row-block copies: [src_col, + width) of each of src's `outer` rows (src_row long) into
// [dst_col, + width) of dst's rows (dst_row long).
static void copy_columns(const Tensor& src, int64_t src_row, int64_t src_col, const Tensor& dst, int64_t dst_row,
                         int64_t dst_col, int64_t outer, int64_t width) {
  KERNEL(copy_columns, src.device())(src, src_row, src_col, dst, dst_row, dst_col, outer, width);
}

static int64_t outer_size(const Shape& shape, int64_t dim) {
  return std::accumulate(shape.begin(), shape.begin() + dim, int64_t{1}, std::multiplies<>());
}
static int64_t inner_size(const Shape& shape, int64_t dim) {
  return std::accumulate(shape.begin() + dim + 1, shape.end(), int64_t{1}, std::multiplies<>());
}

static Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length);

// Gradient of narrow: g placed at [start, start+length) along dim of a zero tensor shaped like the input.
static Tensor narrow_backward(const Tensor& g, const Shape& in_shape, int64_t dim, int64_t start) {
  Tensor dx = zeros(in_shape, g.dtype(), g.device());
  int64_t inner = inner_size(in_shape, dim);
  copy_columns(g, g.size(dim) * inner, 0, dx, in_shape[dim] * inner, start * inner, outer_size(in_shape, dim),
               g.size(dim) * inner);
  return dx;
}

static Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  Shape shape = x.shape();
  shape[dim] = length;
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  int64_t inner = inner_size(x.shape(), dim);
  copy_columns(x, x.size(dim) * inner, start * inner, out, length * inner, 0, outer_size(x.shape(), dim),
               length * inner);
  Shape in_shape = x.shape();
  return record("split", out, {x}, [in_shape, dim, start](const Tensor& g) -> std::vector<Tensor> {
    return {narrow_backward(g, in_shape, dim, start)};
  });
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) {
  check_defined("split", x);
  dim = normalize_dim("split", dim, x.dim());
  int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  if (total != x.size(dim)) fail("split: sizes sum to {} but dim {} of {} has {}", total, dim, x.str(), x.size(dim));
  std::vector<Tensor> parts;
  int64_t start = 0;
  for (int64_t size : sizes) {
    parts.push_back(narrow(x, dim, start, size));
    start += size;
  }
  return parts;
}

// ---- concat: copies each input into its block; each input's gradient is its block of g -------------------------------
Tensor concat(const std::vector<Tensor>& xs, int64_t dim) {
  if (xs.empty()) fail("concat: no tensors");
  const Tensor& first = xs[0];
  dim = normalize_dim("concat", dim, first.dim());
  Shape shape = first.shape();
  shape[dim] = 0;
  for (const Tensor& x : xs) {
    check_same_dtype_device("concat", first, x);
    Shape a = first.shape(), b = x.shape();
    if (a.size() != b.size()) fail("concat: {} and {} differ in rank", first.str(), x.str());
    a[dim] = b[dim] = 0;
    if (a != b) fail("concat: {} and {} differ outside dim {}", first.str(), x.str(), dim);
    shape[dim] += x.size(dim);
  }
  Tensor out = Tensor::empty(shape, first.dtype(), first.device());
  int64_t inner = inner_size(shape, dim), outer = outer_size(shape, dim), start = 0;
  std::vector<int64_t> sizes;
  for (const Tensor& x : xs) {
    copy_columns(x, x.size(dim) * inner, 0, out, shape[dim] * inner, start * inner, outer, x.size(dim) * inner);
    start += x.size(dim);
    sizes.push_back(x.size(dim));
  }
  return record("concat", out, xs, [sizes, dim](const Tensor& g) { return split(g, sizes, dim); });
}

// ---- copies ----------------------------------------------------------------------------------------------------------
static void copy_bytes(const Tensor& dst, const Tensor& src) {
  size_t bytes = src.numel() * dtype_size(src.dtype());
  if (bytes == 0) return;
  if (!src.is_cuda() && !dst.is_cuda())
    std::memcpy(dst.raw_data(), src.raw_data(), bytes);
  else if (src.is_cuda() && dst.is_cuda())
    cuda::copy_on_device(dst.raw_data(), src.raw_data(), bytes);
  else if (dst.is_cuda())
    cuda::copy_to_device(dst.raw_data(), src.raw_data(), bytes);
  else
    cuda::copy_to_host(dst.raw_data(), src.raw_data(), bytes);
}

void copy_(Tensor& dst, const Tensor& src) {
  check_defined("copy_", dst);
  check_defined("copy_", src);
  if (dst.shape() != src.shape() || dst.dtype() != src.dtype())
    fail("copy_: destination {} and source {} differ in shape or dtype", dst.str(), src.str());
  copy_bytes(dst, src);
}

Tensor clone(const Tensor& x) {
  check_defined("clone", x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  copy_bytes(out, x);
  return record("clone", out, {x}, [](const Tensor& g) -> std::vector<Tensor> { return {g}; });
}

Tensor to_device(const Tensor& x, Device device) {
  check_defined("to_device", x);
  if (x.device() == device) return x;
  Tensor out = Tensor::empty(x.shape(), x.dtype(), device);
  copy_bytes(out, x);
  Device from = x.device();
  return record("to_device", out, {x}, [from](const Tensor& g) -> std::vector<Tensor> { return {to_device(g, from)}; });
}

Tensor to_dtype(const Tensor& x, DType dtype) {
  check_defined("to_dtype", x);
  if (x.dtype() == dtype) return x;
  Tensor out = Tensor::empty(x.shape(), dtype, x.device());
  KERNEL(convert_dtype, x.device())(x, out);
  DType from = x.dtype();
  return record("to_dtype", out, {x}, [from](const Tensor& g) -> std::vector<Tensor> { return {to_dtype(g, from)}; });
}

}  // namespace moelab
