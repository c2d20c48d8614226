// CPU kernels of engine/kernels/index.h. Adding never races: slices of different `outer`, or different columns of
// `inner`, never overlap, so the work is split over those, and each task walks the index in order (repeated indices
// add up in the same order every run).
#include "engine/kernels/index.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "engine/cpu/parallel.h"
#include "engine/kernels/pointwise.h"

namespace moelab::cpu {

namespace {

// Splits `inner` columns into blocks so that there are at least as many (outer, column block) tasks as threads when
// outer alone is too short; blocks are multiples of 16 elements (a 64-byte line of floats) to limit false sharing.
int64_t column_block(int64_t outer, int64_t inner) {
  int64_t threads = omp_get_max_threads();
  if (outer >= threads || inner <= 16) return std::max<int64_t>(inner, 1);
  int64_t per_thread = (inner + threads - 1) / threads;
  return (per_thread + 15) / 16 * 16;
}

// Where each position of index (viewed [outer, n, inner] along dim) lands in x: position (o, j, i) addresses x at
// outer_offsets[o] + index[o, j, i] * stride + inner_offsets[i] (index may be smaller than x off dim).
struct IndexMap {
  int64_t outer, n, inner;
  int64_t stride;                      // x's element stride along dim
  std::vector<int64_t> outer_offsets;  // [outer]: x offset of index's coordinates before dim
  std::vector<int64_t> inner_offsets;  // [inner]: x offset of index's coordinates after dim
};

// Row-major offsets of every coordinate over dims [begin, end) of `sizes`, with `strides` per dim.
std::vector<int64_t> coordinate_offsets(const Shape& sizes, const std::vector<int64_t>& strides, int64_t begin,
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

IndexMap index_map(const Tensor& x, int64_t dim, const Tensor& index) {
  int64_t ndim = x.dim();
  std::vector<int64_t> strides(ndim, 1);
  for (int64_t d = ndim - 2; d >= 0; --d) strides[d] = strides[d + 1] * x.size(d + 1);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= index.size(d);
  for (int64_t d = dim + 1; d < ndim; ++d) inner *= index.size(d);
  return {outer,
          index.size(dim),
          inner,
          strides[dim],
          coordinate_offsets(index.shape(), strides, 0, dim),
          coordinate_offsets(index.shape(), strides, dim + 1, ndim)};
}

// Descending order with NaN above everything (as torch ranks it); NaNs tie among themselves.
template <class T> bool ranks_above(T u, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    if (std::isnan(u)) return !std::isnan(v);
    if (std::isnan(v)) return false;
  }
  return u > v;
}

}  // namespace

// ---- slices along dim -----------------------------------------------------------------------------------------------

void select_slices(const Tensor& src, int64_t outer, int64_t src_n, int64_t inner, const Tensor& index,
                   const Tensor& dst) {
  const int64_t n = index.numel();
  const int32_t* idx = index.data<int32_t>();
  size_t row_bytes = inner * dtype_size(src.dtype());
  const char* s = static_cast<const char*>(src.raw_data());
  char* d = static_cast<char*>(dst.raw_data());
  parallel_for(outer * n, inner, [&](int64_t r) {
    int64_t o = r / n, j = r % n;
    std::memcpy(d + r * row_bytes, s + (o * src_n + idx[j]) * row_bytes, row_bytes);
  });
}

void add_slices(const Tensor& dst, int64_t outer, int64_t dst_n, int64_t inner, const Tensor& index,
                const Tensor& src) {
  int64_t n = index.numel();
  int64_t width = column_block(outer, inner), blocks = (inner + width - 1) / width;
  dispatch_all("index", dst.dtype(), [&](auto t) {
    using T = decltype(t);
    T* pd = dst.data<T>();
    const T* ps = src.data<T>();
    const int32_t* idx = index.data<int32_t>();
    parallel_for(outer * blocks, n * width, [&](int64_t task) {
      int64_t o = task / blocks, c0 = (task % blocks) * width, c1 = std::min(inner, c0 + width);
      for (int64_t j = 0; j < n; ++j) {  // in index order: deterministic sums for repeated indices
        T* d = pd + (o * dst_n + idx[j]) * inner;
        const T* s = ps + (o * n + j) * inner;
        for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
      }
    });
  });
}

// ---- elements along dim ---------------------------------------------------------------------------------------------

void gather_elements(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& out) {
  const IndexMap map = index_map(x, dim, index);
  dispatch_all("index", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* px = x.data<T>();
    const int32_t* idx = index.data<int32_t>();
    T* po = out.data<T>();
    parallel_for(map.outer * map.n, map.inner, [&](int64_t r) {  // r = (o, j), a row of inner positions
      const int64_t base = map.outer_offsets[r / map.n];
      for (int64_t i = 0; i < map.inner; ++i) {
        int64_t p = r * map.inner + i;
        po[p] = px[base + idx[p] * map.stride + map.inner_offsets[i]];
      }
    });
  });
}

// Two positions hit one element only with the same (o, i): tasks own (o, a block of i) and walk j in order.
void scatter_add_elements(const Tensor& dst, int64_t dim, const Tensor& index, const Tensor& src) {
  const IndexMap map = index_map(dst, dim, index);
  int64_t width = column_block(map.outer, map.inner), blocks = (map.inner + width - 1) / width;
  dispatch_all("index", dst.dtype(), [&](auto t) {
    using T = decltype(t);
    T* pd = dst.data<T>();
    const T* ps = src.data<T>();
    const int32_t* idx = index.data<int32_t>();
    parallel_for(map.outer * blocks, map.n * width, [&](int64_t task) {
      int64_t o = task / blocks, i0 = (task % blocks) * width, i1 = std::min(map.inner, i0 + width);
      for (int64_t j = 0; j < map.n; ++j)
        for (int64_t i = i0; i < i1; ++i) {
          int64_t p = (o * map.n + j) * map.inner + i;
          pd[map.outer_offsets[o] + idx[p] * map.stride + map.inner_offsets[i]] += ps[p];
        }
    });
  });
}

// ---- where ----------------------------------------------------------------------------------------------------------

void select_where(const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out) {
  const Shape& shape = out.shape();
  int64_t ndim = static_cast<int64_t>(shape.size());
  std::vector<int64_t> sc = broadcast_strides(cond.shape(), shape), sa = broadcast_strides(a.shape(), shape),
                       sb = broadcast_strides(b.shape(), shape);
  // Rows of the last dim; a 0-d output is one row of one element.
  int64_t inner = ndim ? shape[ndim - 1] : 1, rows = inner ? shape_numel(shape) / inner : 0;
  int64_t ic = ndim ? sc[ndim - 1] : 0, ia = ndim ? sa[ndim - 1] : 0, ib = ndim ? sb[ndim - 1] : 0;
  dispatch_all("index", a.dtype(), [&](auto t) {
    using T = decltype(t);
    const int32_t* pc = cond.data<int32_t>();
    const T *pa = a.data<T>(), *pb = b.data<T>();
    T* po = out.data<T>();
    parallel_for(rows, inner, [&](int64_t r) {
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
}

// ---- orderings and counts -------------------------------------------------------------------------------------------

void topk_rows(const Tensor& x, int64_t k, const Tensor& values, const Tensor& indices) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch_all("topk", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* px = x.data<T>();
    T* pv = values.data<T>();
    int32_t* pi = indices.data<int32_t>();
    parallel_for(rows, n * 4, [&](int64_t r) {
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
}

void argsort_rows(const Tensor& x, bool descending, const Tensor& out) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch_all("argsort", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* px = x.data<T>();
    int32_t* po = out.data<int32_t>();
    parallel_for(rows, n * 8, [&](int64_t r) {
      const T* row = px + r * n;
      int32_t* order = po + r * n;
      std::iota(order, order + n, 0);
      // Stable: equal values keep their original (index) order in both directions.
      std::stable_sort(order, order + n, [&](int32_t i, int32_t j) {
        return descending ? ranks_above(row[i], row[j]) : ranks_above(row[j], row[i]);
      });
    });
  });
}

// One pass on one thread: it is memory-bound and small next to the work it routes (ids are tokens * top-k).
void count_ids(const Tensor& ids, const Tensor& counts) {
  const int32_t* id = ids.data<int32_t>();
  int32_t* c = counts.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) ++c[id[i]];
}

}  // namespace moelab::cpu
