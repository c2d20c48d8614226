// Indexing: selecting and adding slices by i32 indices (index_select, index_add, embedding, gather, scatter_add),
// where / masked_fill, and the no-grad sorts and counts (topk, argsort, bincount).
//
// An op along `dim` views x as [outer, n, inner] (outer: the dims before dim, inner: the dims after), so one slice
// along dim is `inner` contiguous elements and selecting or adding slices is copying or adding rows.
// Adding never races: slices of different `outer`, or different columns of `inner`, never overlap, so the work is
// split over those, and each task walks the index in order (repeated indices add up in the same order every run).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

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

// Throws unless every index lies in [0, bound), naming the op, the first bad index and what it indexes.
static void check_indices(const char* op, const Tensor& index, int64_t bound, int64_t dim, const Tensor& x) {
  const int32_t* idx = index.data<int32_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    if (idx[i] < 0 || idx[i] >= bound)
      fail("{}: index {} (at position {} of {}) out of range [0, {}) for dim {} of {}", op, idx[i], i, index.str(),
           bound, dim, x.str());
}

// Splits `inner` columns into blocks so that there are at least as many (outer, column block) tasks as threads when
// outer alone is too short; blocks are multiples of 16 elements (a 64-byte line of floats) to limit false sharing.
static int64_t column_block(int64_t outer, int64_t inner) {
  int64_t threads = omp_get_max_threads();
  if (outer >= threads || inner <= 16) return std::max<int64_t>(inner, 1);
  int64_t per_thread = (inner + threads - 1) / threads;
  return (per_thread + 15) / 16 * 16;
}

// In place: dst [outer, N, inner] += src [outer, n, inner] at rows index[0..n) along dim:
// dst[o, index[j], :] += src[o, j, :]. The index is already checked; dst is a tensor the caller just made.
static void index_add_into(const Tensor& dst, int64_t dim, const Tensor& index, const Tensor& src) {
  DimView v = view_along(dst.shape(), dim);
  int64_t n = index.numel();
  int64_t width = column_block(v.outer, v.inner), blocks = (v.inner + width - 1) / width;
  dispatch_all(dst.dtype(), [&](auto t) {
    using T = decltype(t);
    T* pd = dst.data<T>();
    const T* ps = src.data<T>();
    const int32_t* idx = index.data<int32_t>();
    cpu::parallel_for(v.outer * blocks, n * width, [&](int64_t task) {
      int64_t o = task / blocks, c0 = (task % blocks) * width, c1 = std::min(v.inner, c0 + width);
      for (int64_t j = 0; j < n; ++j) {  // in index order: deterministic sums for repeated indices
        T* d = pd + (o * v.n + idx[j]) * v.inner;
        const T* s = ps + (o * n + j) * v.inner;
        for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
      }
    });
  });
}

// dst [outer, n, inner] = src [outer, src_n, inner] at rows idx[0..n): dst[o, j, :] = src[o, idx[j], :].
static void select_slices(const Tensor& dst, const Tensor& src, int64_t src_n, const int32_t* idx, int64_t outer,
                          int64_t n, int64_t inner) {
  size_t row_bytes = inner * dtype_size(src.dtype());
  const char* s = static_cast<const char*>(src.raw_data());
  char* d = static_cast<char*>(dst.raw_data());
  cpu::parallel_for(outer * n, inner, [&](int64_t r) {
    int64_t o = r / n, j = r % n;
    std::memcpy(d + r * row_bytes, s + (o * src_n + idx[j]) * row_bytes, row_bytes);
  });
}

static Tensor copy_of(const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  std::memcpy(out.raw_data(), x.raw_data(), x.numel() * dtype_size(x.dtype()));
  return out;
}

// ---- index_select / index_add: whole slices along dim, picked by a 1-D index ----------------------------------------

Tensor index_select(const Tensor& x, int64_t dim, const Tensor& index) {
  check_defined("index_select", x);
  check_index("index_select", index);
  check_cpu("index_select", x);
  if (index.dim() != 1) fail("index_select: index must be 1-D, got {} (x {})", index.str(), x.str());
  dim = normalize_dim("index_select", dim, x.dim());
  check_indices("index_select", index, x.size(dim), dim, x);
  DimView v = view_along(x.shape(), dim);
  Shape out_shape = x.shape();
  out_shape[dim] = index.numel();
  Tensor out = Tensor::empty(out_shape, x.dtype(), x.device());  // [outer, index.numel(), inner]
  select_slices(out, x, v.n, index.data<int32_t>(), v.outer, index.numel(), v.inner);
  // dx: each selected slice's gradient added back where it came from (repeated indices accumulate).
  return record("index_select", out, {x}, [in_shape = x.shape(), dim, index](const Tensor& g) -> std::vector<Tensor> {
    Tensor dx = zeros(in_shape, g.dtype(), g.device());
    index_add_into(dx, dim, index, g);
    return {dx};
  });
}

Tensor index_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src) {
  check_same_dtype_device("index_add", x, src);
  check_index("index_add", index);
  check_cpu("index_add", x);
  if (index.dim() != 1) fail("index_add: index must be 1-D, got {} (x {})", index.str(), x.str());
  dim = normalize_dim("index_add", dim, x.dim());
  Shape src_shape = x.shape();
  src_shape[dim] = index.numel();
  if (src.shape() != src_shape)
    fail("index_add: src {} must be x {} with dim {} of size index.numel() = {}", src.str(), x.str(), dim,
         index.numel());
  check_indices("index_add", index, x.size(dim), dim, x);
  Tensor out = copy_of(x);
  index_add_into(out, dim, index, src);
  // dx = g; dsrc = the slices of g that src was added to.
  return record("index_add", out, {x, src}, [dim, index](const Tensor& g) -> std::vector<Tensor> {
    return {g, index_select(g, dim, index)};
  });
}

// ---- embedding: rows of a [V, d] table ------------------------------------------------------------------------------

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  check_defined("embedding", weight);
  check_index("embedding", ids);
  check_cpu("embedding", weight);
  if (weight.dim() != 2) fail("embedding: weight must be [V, d], got {} (ids {})", weight.str(), ids.str());
  int64_t vocab = weight.size(0), d = weight.size(1);
  check_indices("embedding", ids, vocab, 0, weight);
  Shape out_shape = ids.shape();
  out_shape.push_back(d);
  Tensor out = Tensor::empty(out_shape, weight.dtype(), weight.device());  // [..., d]
  select_slices(out, weight, vocab, ids.data<int32_t>(), 1, ids.numel(), d);
  // dweight: the rows of g ([..., d], in memory [ids.numel(), d]) added into a zero table at their ids. The work is
  // split over the d columns, so a token repeated in the batch never races with itself.
  return record("embedding", out, {weight}, [vocab, d, ids](const Tensor& g) -> std::vector<Tensor> {
    Tensor dweight = zeros({vocab, d}, g.dtype(), g.device());
    index_add_into(dweight, 0, ids, g);
    return {dweight};
  });
}

// ---- gather / scatter_add: one element per index position (torch semantics) -----------------------------------------
// index has x's rank and is no larger than x off `dim`; position (o, j, i) of index (viewed [outer, n, inner])
// addresses x at the same coordinates except dim, where it takes the index value. IndexMap precomputes x's offset of
// each outer and inner coordinate, since index may be smaller than x in those dims.

struct IndexMap {
  int64_t outer, n, inner;
  int64_t stride;                      // x's element stride along dim
  std::vector<int64_t> outer_offsets;  // [outer]: x offset of index's coordinates before dim
  std::vector<int64_t> inner_offsets;  // [inner]: x offset of index's coordinates after dim
};

// Row-major offsets of every coordinate over dims [begin, end) of `sizes`, with `strides` per dim.
static std::vector<int64_t> coordinate_offsets(const Shape& sizes, const std::vector<int64_t>& strides, int64_t begin,
                                               int64_t end) {
  std::vector<int64_t> offsets{0};
  for (int64_t d = begin; d < end; ++d) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * sizes[d]);
    for (int64_t base : offsets)
      for (int64_t c = 0; c < sizes[d]; ++c) next.push_back(base + c * strides[d]);
    offsets = std::move(next);
  }
  return offsets;
}

static IndexMap index_map(const char* op, const Tensor& x, int64_t dim, const Tensor& index) {
  if (index.dim() != x.dim()) fail("{}: index {} must have the rank of x {}", op, index.str(), x.str());
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != dim && index.size(d) > x.size(d))
      fail("{}: index {} larger than x {} in dim {} (only dim {} may differ freely)", op, index.str(), x.str(), d, dim);
  check_indices(op, index, x.size(dim), dim, x);
  int64_t ndim = x.dim();
  std::vector<int64_t> strides(ndim, 1);
  for (int64_t d = ndim - 2; d >= 0; --d) strides[d] = strides[d + 1] * x.size(d + 1);
  DimView v = view_along(index.shape(), dim);
  return {v.outer, v.n, v.inner, strides[dim], coordinate_offsets(index.shape(), strides, 0, dim),
          coordinate_offsets(index.shape(), strides, dim + 1, ndim)};
}

// In place: dst[map(o, j, i)] += src[o, j, i] for every position of index (dst: a tensor the caller just made).
// Two positions hit one element only with the same (o, i): tasks own (o, a block of i) and walk j in order.
static void scatter_add_into(const Tensor& dst, const IndexMap& map, const Tensor& index, const Tensor& src) {
  int64_t width = column_block(map.outer, map.inner), blocks = (map.inner + width - 1) / width;
  dispatch_all(dst.dtype(), [&](auto t) {
    using T = decltype(t);
    T* pd = dst.data<T>();
    const T* ps = src.data<T>();
    const int32_t* idx = index.data<int32_t>();
    cpu::parallel_for(map.outer * blocks, map.n * width, [&](int64_t task) {
      int64_t o = task / blocks, i0 = (task % blocks) * width, i1 = std::min(map.inner, i0 + width);
      for (int64_t j = 0; j < map.n; ++j)
        for (int64_t i = i0; i < i1; ++i) {
          int64_t p = (o * map.n + j) * map.inner + i;
          pd[map.outer_offsets[o] + idx[p] * map.stride + map.inner_offsets[i]] += ps[p];
        }
    });
  });
}

Tensor gather(const Tensor& x, int64_t dim, const Tensor& index) {
  check_defined("gather", x);
  check_index("gather", index);
  check_cpu("gather", x);
  dim = normalize_dim("gather", dim, x.dim());
  IndexMap map = index_map("gather", x, dim, index);
  Tensor out = Tensor::empty(index.shape(), x.dtype(), x.device());
  dispatch_all(x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* px = x.data<T>();
    const int32_t* idx = index.data<int32_t>();
    T* po = out.data<T>();
    cpu::parallel_for(map.outer * map.n, map.inner, [&](int64_t r) {  // r = (o, j), a row of inner positions
      const int64_t base = map.outer_offsets[r / map.n];
      for (int64_t i = 0; i < map.inner; ++i) {
        int64_t p = r * map.inner + i;
        po[p] = px[base + idx[p] * map.stride + map.inner_offsets[i]];
      }
    });
  });
  // dx: each gathered element's gradient added back at its source (repeats accumulate).
  return record("gather", out, {x}, [in_shape = x.shape(), map = std::move(map), index](const Tensor& g) {
    Tensor dx = zeros(in_shape, g.dtype(), g.device());
    scatter_add_into(dx, map, index, g);
    return std::vector<Tensor>{dx};
  });
}

Tensor scatter_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src) {
  check_same_dtype_device("scatter_add", x, src);
  check_index("scatter_add", index);
  check_cpu("scatter_add", x);
  dim = normalize_dim("scatter_add", dim, x.dim());
  if (src.shape() != index.shape())
    fail("scatter_add: src {} and index {} must have one shape", src.str(), index.str());
  Tensor out = copy_of(x);
  scatter_add_into(out, index_map("scatter_add", x, dim, index), index, src);
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

// Element strides of `in` over the dims of `out` (0 where `in` is broadcast).
static std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out) {
  std::vector<int64_t> strides(out.size(), 0);
  int64_t stride = 1;
  for (int64_t i = static_cast<int64_t>(in.size()) - 1; i >= 0; --i) {
    strides[i + out.size() - in.size()] = in[i] == 1 ? 0 : stride;
    stride *= in[i];
  }
  return strides;
}

// out = cond ? a : b, all three broadcast to one shape. No recording: the kernel of where, masked_fill and their
// backward passes.
static Tensor select_where(const char* op, const Tensor& cond, const Tensor& a, const Tensor& b) {
  Shape shape = broadcast_all(op, {cond, a, b});
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  int64_t ndim = static_cast<int64_t>(shape.size());
  std::vector<int64_t> sc = broadcast_strides(cond.shape(), shape), sa = broadcast_strides(a.shape(), shape),
                       sb = broadcast_strides(b.shape(), shape);
  // Rows of the last dim; a 0-d output is one row of one element.
  int64_t inner = ndim ? shape[ndim - 1] : 1, rows = inner ? shape_numel(shape) / inner : 0;
  int64_t ic = ndim ? sc[ndim - 1] : 0, ia = ndim ? sa[ndim - 1] : 0, ib = ndim ? sb[ndim - 1] : 0;
  dispatch_all(a.dtype(), [&](auto t) {
    using T = decltype(t);
    const int32_t* pc = cond.data<int32_t>();
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* po = out.data<T>();
    cpu::parallel_for(rows, inner, [&](int64_t r) {
      int64_t rem = r, oc = 0, oa = 0, ob = 0;
      for (int64_t d = ndim - 2; d >= 0; --d) {
        int64_t c = rem % shape[d];
        rem /= shape[d];
        oc += c * sc[d], oa += c * sa[d], ob += c * sb[d];
      }
      T* o = po + r * inner;
      for (int64_t i = 0; i < inner; ++i) o[i] = pc[oc + i * ic] ? pa[oa + i * ia] : pb[ob + i * ib];
    });
  });
  return out;
}

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  check_same_dtype_device("where", a, b);
  check_defined("where", cond);
  if (cond.dtype() != DType::I32) fail("where: cond must be i32, got {} (a {}, b {})", cond.str(), a.str(), b.str());
  check_cpu("where", a);
  Tensor out = select_where("where", cond, a, b);
  // The gradient goes to whichever operand was chosen, then is summed back over its broadcast dims.
  return record("where", out, {a, b}, [cond, sa = a.shape(), sb = b.shape()](const Tensor& g) -> std::vector<Tensor> {
    Tensor zero = zeros({}, g.dtype(), g.device());
    return {sum_to(select_where("where_backward", cond, g, zero), sa),
            sum_to(select_where("where_backward", cond, zero, g), sb)};
  });
}

Tensor masked_fill(const Tensor& x, const Tensor& mask, double value) {
  check_defined("masked_fill", x);
  check_defined("masked_fill", mask);
  if (mask.dtype() != DType::I32) fail("masked_fill: mask must be i32, got {} (x {})", mask.str(), x.str());
  check_cpu("masked_fill", x);
  if (broadcast_all("masked_fill", {mask, x}) != x.shape())
    fail("masked_fill: mask {} must broadcast to x {}", mask.str(), x.str());
  Tensor out = select_where("masked_fill", mask, full({}, value, x.dtype(), x.device()), x);
  // Filled positions are constants: no gradient flows there.
  return record("masked_fill", out, {x}, [mask](const Tensor& g) -> std::vector<Tensor> {
    return {select_where("masked_fill_backward", mask, zeros({}, g.dtype(), g.device()), g)};
  });
}

// ---- topk / argsort (no grad): index orderings over the last dim ----------------------------------------------------

// Descending order with NaN above everything (as torch ranks it); NaNs tie among themselves.
template <class T> static bool ranks_above(T u, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    if (std::isnan(u)) return !std::isnan(v);
    if (std::isnan(v)) return false;
  }
  return u > v;
}

// Rows of the last dim, checked to fit i32 indices.
static std::pair<int64_t, int64_t> last_dim_rows(const char* op, const Tensor& x) {
  check_defined(op, x);
  check_cpu(op, x);
  if (x.dim() == 0) fail("{}: needs at least one dim, got {}", op, x.str());
  int64_t n = x.size(-1);
  if (n > std::numeric_limits<int32_t>::max()) fail("{}: last dim of {} too long for i32 indices", op, x.str());
  return {n ? x.numel() / n : 0, n};
}

std::pair<Tensor, Tensor> topk(const Tensor& x, int64_t k) {
  auto [rows, n] = last_dim_rows("topk", x);
  if (k < 0 || k > n) fail("topk: k = {} out of range [0, {}] for {}", k, n, x.str());
  Shape out_shape = x.shape();
  out_shape.back() = k;
  Tensor values = Tensor::empty(out_shape, x.dtype(), x.device());  // [..., k]
  Tensor indices = Tensor::empty(out_shape, DType::I32, x.device());
  dispatch_all(x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* px = x.data<T>();
    T* pv = values.data<T>();
    int32_t* pi = indices.data<int32_t>();
    cpu::parallel_for(rows, n * 4, [&](int64_t r) {
      const T* row = px + r * n;
      thread_local std::vector<int32_t> order;  // reused: router rows are short and many
      order.resize(n);
      std::iota(order.begin(), order.end(), 0);
      // Larger first; equal values keep the lower index first (a total order, so partial_sort is exact).
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t i, int32_t j) {
        return ranks_above(row[i], row[j]) || (!ranks_above(row[j], row[i]) && i < j);
      });
      for (int64_t j = 0; j < k; ++j) pv[r * k + j] = row[order[j]], pi[r * k + j] = order[j];
    });
  });
  return {values, indices};
}

Tensor argsort(const Tensor& x, bool descending) {
  auto [rows, n] = last_dim_rows("argsort", x);
  Tensor out = Tensor::empty(x.shape(), DType::I32, x.device());
  dispatch_all(x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* px = x.data<T>();
    int32_t* po = out.data<int32_t>();
    cpu::parallel_for(rows, n * 8, [&](int64_t r) {
      const T* row = px + r * n;
      int32_t* order = po + r * n;
      std::iota(order, order + n, 0);
      // Stable: equal values keep their original (index) order in both directions.
      std::stable_sort(order, order + n, [&](int32_t i, int32_t j) {
        return descending ? ranks_above(row[i], row[j]) : ranks_above(row[j], row[i]);
      });
    });
  });
  return out;
}

// ---- bincount (no grad) ---------------------------------------------------------------------------------------------

Tensor bincount(const Tensor& ids, int64_t bins) {
  check_index("bincount", ids);
  check_cpu("bincount", ids);
  if (bins < 0 || bins > std::numeric_limits<int32_t>::max()) fail("bincount: bins = {} out of range", bins);
  Tensor counts = zeros({bins}, DType::I32, ids.device());  // [bins]
  const int32_t* id = ids.data<int32_t>();
  int32_t* c = counts.data<int32_t>();
  // One pass on one thread: it is memory-bound and small next to the work it routes (ids are tokens * top-k).
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (id[i] < 0 || id[i] >= bins)
      fail("bincount: id {} (at position {} of {}) out of range [0, {})", id[i], i, ids.str(), bins);
    ++c[id[i]];
  }
  return counts;
}

}  // namespace moelab
