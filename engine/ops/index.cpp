// Indexing: selecting and adding slices by i32 indices (index_select, index_add, embedding, gather, scatter_add),
// where / masked_fill, and the no-grad sorts and counts (topk, argsort, bincount). The numbers come from the kernels
// of engine/kernels/index.h; the ops check shapes and every index first.
//
// An op along `dim` views x as [outer, n, inner] (outer: the dims before dim, inner: the dims after), so one slice
// along dim is `inner` contiguous elements and selecting or adding slices is copying or adding rows.
#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "engine/kernels/index.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// ---- shared helpers -------------------------------------------------------------------------------------------------

struct DimView {
  int64_t outer = 1, n = 1, inner = 1;
};

static DimView view_along(const Shape& shape, int64_t dim) {
  DimView v;
  for (int64_t d = 0; d < dim; ++d) v.outer *= shape[d];
  v.n = shape[dim];
  for (size_t d = dim + 1; d < shape.size(); ++d) v.inner *= shape[d];
  return v;
}

// The indices, readable on the host: CPU tensors in place; a GPU tensor's are copied over (a synchronizing copy:
// every index check of a GPU op waits for the GPU's queued work).
class HostIndices {
 public:
  explicit HostIndices(const Tensor& index) {
    if (index.is_cuda()) {
      copy_ = index.to_vector<int32_t>();
      data_ = copy_.data();
    } else {
      data_ = index.data<int32_t>();
    }
  }
  const int32_t* data() const { return data_; }

 private:
  std::vector<int32_t> copy_;
  const int32_t* data_;
};

// Throws unless every index lies in [0, bound), naming the op, the first bad index and what it indexes.
static void check_indices(const char* op, const Tensor& index, int64_t bound, int64_t dim, const Tensor& x) {
  HostIndices host(index);
  const int32_t* idx = host.data();
  for (int64_t i = 0; i < index.numel(); ++i)
    if (idx[i] < 0 || idx[i] >= bound)
      fail("{}: index {} (at position {} of {}) out of range [0, {}) for dim {} of {}", op, idx[i], i, index.str(),
           bound, dim, x.str());
}

static void check_same_device(const char* op, const Tensor& x, const Tensor& index) {
  if (x.device() != index.device()) fail("{}: {} and index {} are on different devices", op, x.str(), index.str());
}

// dst (a tensor the caller just made, [outer, N, inner] along dim) += src's slices at rows `index` along dim.
static void add_slices_into(const Tensor& dst, int64_t dim, const Tensor& index, const Tensor& src) {
  DimView v = view_along(dst.shape(), dim);
  KERNEL(add_slices, dst.device())(dst, v.outer, v.n, v.inner, index, src);
}

static Tensor copy_of(const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  copy_(out, x);
  return out;
}

// ---- index_select / index_add: whole slices along dim, picked by a 1-D index ----------------------------------------

// dx: each selected slice's gradient added back where it came from (repeated indices accumulate).
static Tensor index_select_backward(const Tensor& g, const Shape& in_shape, int64_t dim, const Tensor& index) {
  Tensor dx = zeros(in_shape, g.dtype(), g.device());
  add_slices_into(dx, dim, index, g);
  return dx;
}

Tensor index_select(const Tensor& x, int64_t dim, const Tensor& index) {
  check_defined("index_select", x);
  check_index("index_select", index);
  check_same_device("index_select", x, index);
  if (index.dim() != 1) fail("index_select: index must be 1-D, got {} (x {})", index.str(), x.str());
  dim = normalize_dim("index_select", dim, x.dim());
  check_indices("index_select", index, x.size(dim), dim, x);
  DimView v = view_along(x.shape(), dim);
  Shape out_shape = x.shape();
  out_shape[dim] = index.numel();
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());  // [outer, index.numel(), inner]
  KERNEL(select_slices, x.device())(x, v.outer, v.n, v.inner, index, out);
  return record("index_select", out, {x}, [in_shape = x.shape(), dim, index](const Tensor& g) -> std::vector<Tensor> {
    return {index_select_backward(g, in_shape, dim, index)};
  });
}

Tensor index_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src) {
  check_same_dtype_device("index_add", x, src);
  check_index("index_add", index);
  check_same_device("index_add", x, index);
  if (index.dim() != 1) fail("index_add: index must be 1-D, got {} (x {})", index.str(), x.str());
  dim = normalize_dim("index_add", dim, x.dim());
  Shape src_shape = x.shape();
  src_shape[dim] = index.numel();
  if (src.shape() != src_shape)
    fail("index_add: src {} must be x {} with dim {} of size index.numel() = {}", src.str(), x.str(), dim,
         index.numel());
  check_indices("index_add", index, x.size(dim), dim, x);
  Tensor out = copy_of(x);
  add_slices_into(out, dim, index, src);
  // dx = g; dsrc = the slices of g that src was added to.
  return record("index_add", out, {x, src}, [dim, index](const Tensor& g) -> std::vector<Tensor> {
    return {g, index_select(g, dim, index)};
  });
}

// ---- embedding: rows of a [V, d] table ------------------------------------------------------------------------------

// dweight: the rows of g ([..., d], in memory [ids.numel(), d]) added into a zero table at their ids.
static Tensor embedding_backward(const Tensor& g, int64_t vocab, int64_t d, const Tensor& ids) {
  Tensor dweight = zeros({vocab, d}, g.dtype(), g.device());
  KERNEL(add_slices, g.device())(dweight, 1, vocab, d, ids, g);
  return dweight;
}

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  check_defined("embedding", weight);
  check_index("embedding", ids);
  check_same_device("embedding", weight, ids);
  if (weight.dim() != 2) fail("embedding: weight must be [V, d], got {} (ids {})", weight.str(), ids.str());
  int64_t vocab = weight.size(0), d = weight.size(1);
  check_indices("embedding", ids, vocab, 0, weight);
  Shape out_shape = ids.shape();
  out_shape.push_back(d);
  Tensor out = Tensor::empty(out_shape, weight.dtype(), weight.device());  // [..., d]
  KERNEL(select_slices, weight.device())(weight, 1, vocab, d, ids, out);
  return record("embedding", out, {weight}, [vocab, d, ids](const Tensor& g) -> std::vector<Tensor> {
    return {embedding_backward(g, vocab, d, ids)};
  });
}

// ---- gather / scatter_add: one element per index position (torch semantics) -----------------------------------------
// index has x's rank and is no larger than x off `dim`; position (o, j, i) of index (viewed [outer, n, inner])
// addresses x at the same coordinates except dim, where it takes the index value.

static void check_index_map(const char* op, const Tensor& x, int64_t dim, const Tensor& index) {
  check_same_device(op, x, index);
  if (index.dim() != x.dim()) fail("{}: index {} must have the rank of x {}", op, index.str(), x.str());
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != dim && index.size(d) > x.size(d))
      fail("{}: index {} larger than x {} in dim {} (only dim {} may differ freely)", op, index.str(), x.str(), d, dim);
  check_indices(op, index, x.size(dim), dim, x);
}

// dx: each gathered element's gradient added back at its source (repeats accumulate).
static Tensor gather_backward(const Tensor& g, const Shape& in_shape, int64_t dim, const Tensor& index) {
  Tensor dx = zeros(in_shape, g.dtype(), g.device());
  KERNEL(scatter_add_elements, g.device())(dx, dim, index, g);
  return dx;
}

Tensor gather(const Tensor& x, int64_t dim, const Tensor& index) {
  check_defined("gather", x);
  check_index("gather", index);
  dim = normalize_dim("gather", dim, x.dim());
  check_index_map("gather", x, dim, index);
  Tensor out = Tensor::empty(index.shape(), x.dtype(), x.device());
  KERNEL(gather_elements, x.device())(x, dim, index, out);
  return record("gather", out, {x}, [in_shape = x.shape(), dim, index](const Tensor& g) -> std::vector<Tensor> {
    return {gather_backward(g, in_shape, dim, index)};
  });
}

Tensor scatter_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src) {
  check_same_dtype_device("scatter_add", x, src);
  check_index("scatter_add", index);
  dim = normalize_dim("scatter_add", dim, x.dim());
  if (src.shape() != index.shape())
    fail("scatter_add: src {} and index {} must have one shape", src.str(), index.str());
  check_index_map("scatter_add", x, dim, index);
  Tensor out = copy_of(x);
  KERNEL(scatter_add_elements, x.device())(out, dim, index, src);
  // dx = g; dsrc = g at the positions src was added to.
  return record("scatter_add", out, {x, src}, [dim, index](const Tensor& g) -> std::vector<Tensor> {
    return {g, gather(g, dim, index)};
  });
}

// ---- where / masked_fill: elementwise choice under broadcasting -----------------------------------------------------

// NumPy broadcasting: align trailing dims; sizes must match or be 1.
static Shape broadcast_all(const char* op, const std::vector<Tensor>& xs) {
  size_t ndim = 0;
  for (const Tensor& x : xs) ndim = std::max(ndim, x.shape().size());
  Shape out(ndim, 1);
  for (const Tensor& x : xs)
    for (size_t i = 0; i < x.shape().size(); ++i) {
      int64_t& o = out[ndim - x.shape().size() + i];
      int64_t s = x.shape()[i];
      if (s != o && s != 1 && o != 1) {
        std::string shapes;
        for (const Tensor& y : xs) shapes += (shapes.empty() ? "" : ", ") + y.str();
        fail("{}: shapes do not broadcast: {}", op, shapes);
      }
      if (s != 1) o = s;
    }
  return out;
}

// out = cond ? a : b, all three broadcast to one shape. No recording: the forward of where, masked_fill and their
// backward passes.
static Tensor select_where(const char* op, const Tensor& cond, const Tensor& a, const Tensor& b) {
  if (cond.device() != a.device()) fail("{}: condition {} and {} are on different devices", op, cond.str(), a.str());
  Tensor out = Tensor::empty(broadcast_all(op, {cond, a, b}), a.dtype(), a.device());
  KERNEL(select_where, a.device())(cond, a, b, out);
  return out;
}

// The gradient goes to whichever operand was chosen, then is summed back over its broadcast dims.
static std::vector<Tensor> where_backward(const Tensor& g, const Tensor& cond, const Shape& a_shape,
                                          const Shape& b_shape) {
  Tensor zero = zeros({}, g.dtype(), g.device());
  return {sum_to(select_where("where_backward", cond, g, zero), a_shape),
          sum_to(select_where("where_backward", cond, zero, g), b_shape)};
}

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  check_same_dtype_device("where", a, b);
  check_defined("where", cond);
  if (cond.dtype() != DType::I32) fail("where: cond must be i32, got {} (a {}, b {})", cond.str(), a.str(), b.str());
  Tensor out = select_where("where", cond, a, b);
  return record("where", out, {a, b}, [cond, a_shape = a.shape(), b_shape = b.shape()](const Tensor& g) {
    return where_backward(g, cond, a_shape, b_shape);
  });
}

// Filled positions are constants: no gradient flows there.
static Tensor masked_fill_backward(const Tensor& g, const Tensor& mask) {
  return select_where("masked_fill_backward", mask, zeros({}, g.dtype(), g.device()), g);
}

Tensor masked_fill(const Tensor& x, const Tensor& mask, double value) {
  check_defined("masked_fill", x);
  check_defined("masked_fill", mask);
  if (mask.dtype() != DType::I32) fail("masked_fill: mask must be i32, got {} (x {})", mask.str(), x.str());
  if (broadcast_all("masked_fill", {mask, x}) != x.shape())
    fail("masked_fill: mask {} must broadcast to x {}", mask.str(), x.str());
  Tensor out = select_where("masked_fill", mask, full({}, value, x.dtype(), x.device()), x);
  return record("masked_fill", out, {x},
                [mask](const Tensor& g) -> std::vector<Tensor> { return {masked_fill_backward(g, mask)}; });
}

// ---- topk / argsort (no grad): index orderings over the last dim ----------------------------------------------------

// Checks a tensor whose last dim is ordered: at least one dim, short enough for i32 indices.
static void check_last_dim(const char* op, const Tensor& x) {
  check_defined(op, x);
  if (x.dim() == 0) fail("{}: needs at least one dim, got {}", op, x.str());
  if (x.size(-1) > std::numeric_limits<int32_t>::max())
    fail("{}: last dim of {} too long for i32 indices", op, x.str());
}

std::pair<Tensor, Tensor> topk(const Tensor& x, int64_t k) {
  check_last_dim("topk", x);
  if (k < 0 || k > x.size(-1)) fail("topk: k = {} out of range [0, {}] for {}", k, x.size(-1), x.str());
  Shape out_shape = x.shape();
  out_shape.back() = k;
  Tensor values = Tensor::empty(out_shape, x.dtype(), x.device());  // [..., k]
  Tensor indices = Tensor::empty(out_shape, DType::I32, x.device());
  KERNEL(topk_rows, x.device())(x, k, values, indices);
  return {values, indices};
}

Tensor argsort(const Tensor& x, bool descending) {
  check_last_dim("argsort", x);
  Tensor out = Tensor::empty(x.shape(), DType::I32, x.device());
  KERNEL(argsort_rows, x.device())(x, descending, out);
  return out;
}

// ---- bincount (no grad) ---------------------------------------------------------------------------------------------

Tensor bincount(const Tensor& ids, int64_t bins) {
  check_index("bincount", ids);
  if (bins < 0 || bins > std::numeric_limits<int32_t>::max()) fail("bincount: bins = {} out of range", bins);
  HostIndices host(ids);
  for (int64_t i = 0; i < ids.numel(); ++i)
    if (host.data()[i] < 0 || host.data()[i] >= bins)
      fail("bincount: id {} (at position {} of {}) out of range [0, {})", host.data()[i], i, ids.str(), bins);
  Tensor counts = zeros({bins}, DType::I32, ids.device());  // [bins]
  KERNEL(count_ids, ids.device())(ids, counts);
  return counts;
}

}  // namespace moelab
