// CUDA kernels of engine/kernels/index.h. Selecting is one thread per output element. Adding where indices may repeat
// never uses floating-point atomics: each destination element is summed by one thread, which adds its sources in
// increasing index position (the CPU's order, so the same bits):
//   add_slices (index_add, index_select's and embedding's backward): the index positions are grouped by destination
//     row on the device (a stable counting sort: integer histogram, scan, stable scatter); then one thread per
//     destination element walks its row's group;
//   scatter_add_elements (scatter_add, gather's backward): two positions of index can meet only in the same column
//     (the same coordinates off dim), so one thread per column walks the positions along dim in order.
// topk and argsort give one block to a row and place each element by counting the elements that come before it.
#include "engine/kernels/index.h"

#include <limits>
#include <type_traits>

#include "engine/cuda/device.cuh"
#include "engine/kernels/pointwise.h"

namespace moelab::cuda {

constexpr int kThreads = 256;

// Index arithmetic of one thread: its element among blocks of blockDim.x.
__device__ inline int64_t thread_element() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }

// Shapes up to kMaxDims dims travel to the kernels by value.
constexpr int kMaxDims = 8;
static void check_rank(const char* op, const Tensor& x) {
  if (x.dim() > kMaxDims) fail("{}: at most {} dims on the GPU, got {}", op, kMaxDims, x.str());
}

// Calls f(W{}) with W an unsigned integer as wide as one element: copies move elements as words of that size.
template <class F> static void with_element_word(DType dtype, F&& f) {
  switch (dtype_size(dtype)) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    default: f(uint64_t{}); break;
  }
}

// ---- grouping index positions by key (a stable counting sort) ------------------------------------------------------

// counts[key[p]] += 1 for every position p (integer atomics: the counts do not depend on the order).
static __global__ void count_keys_kernel(const int32_t* keys, int64_t n, int32_t* counts) {
  const int64_t p = thread_element();
  if (p < n) atomicAdd(&counts[keys[p]], 1);
}

// One block: offsets[b] = counts[0] + ... + counts[b - 1] for b in [0, bins]. Each thread sums one contiguous segment
// of bins; thread 0 turns the segment sums into segment starts; each thread then writes its segment's offsets.
constexpr int kScanThreads = 1024;
static __global__ void exclusive_scan_kernel(const int32_t* counts, int64_t bins, int32_t* offsets) {
  SHARED_ARRAY(int32_t, segment_start, kScanThreads);
  const int64_t per_thread = (bins + blockDim.x - 1) / blockDim.x;
  const int64_t begin = threadIdx.x * per_thread < bins ? threadIdx.x * per_thread : bins;
  const int64_t end = begin + per_thread < bins ? begin + per_thread : bins;
  int32_t total = 0;
  for (int64_t b = begin; b < end; ++b) total += counts[b];
  segment_start[threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t running = 0;
    for (unsigned t = 0; t < blockDim.x; ++t) {
      const int32_t segment = segment_start[t];
      segment_start[t] = running;
      running += segment;
    }
    offsets[bins] = running;
  }
  __syncthreads();
  int32_t running = segment_start[threadIdx.x];
  for (int64_t b = begin; b < end; ++b) {
    offsets[b] = running;
    running += counts[b];
  }
}

// One block, over the positions in tiles of blockDim.x: a position's slot in its key's group is the group's start,
// plus the positions of that key placed by earlier tiles (filled), plus those before it in this tile (rank). The
// last position of each key in the tile then advances filled. Stable: groups list positions in increasing order.
constexpr int kScatterThreads = 256;
static __global__ void stable_scatter_kernel(const int32_t* keys, int64_t n, const int32_t* offsets, int32_t* filled,
                                             int32_t* order) {
  SHARED_ARRAY(int32_t, tile, kScatterThreads);
  for (int64_t tile_start = 0; tile_start < n; tile_start += blockDim.x) {
    const int64_t p = tile_start + threadIdx.x;
    const int32_t key = p < n ? keys[p] : -1;
    tile[threadIdx.x] = key;
    __syncthreads();
    int32_t rank = 0;
    bool last_of_key = true;
    if (key >= 0) {
      for (unsigned t = 0; t < threadIdx.x; ++t) rank += tile[t] == key;
      for (unsigned t = threadIdx.x + 1; t < blockDim.x; ++t) last_of_key = last_of_key && tile[t] != key;
      order[offsets[key] + filled[key] + rank] = static_cast<int32_t>(p);
    }
    __syncthreads();  // every thread has read filled[] for this tile
    if (key >= 0 && last_of_key) filled[key] += rank + 1;
    __syncthreads();  // filled[] and tile are ready for the next tile
  }
}

// Positions [0, n) of `keys` (i32, each in [0, bins)) grouped by key: order[offsets[k], offsets[k + 1]) lists the
// positions whose key is k, in increasing order.
struct KeyGroups {
  Tensor offsets;  // i32 [bins + 1]
  Tensor order;    // i32 [n]
};

static KeyGroups group_by_key(const Tensor& keys, int64_t bins) {
  const int64_t n = keys.numel();
  if (n > std::numeric_limits<int32_t>::max()) fail("index: {} indices are too many for i32 positions", n);
  Tensor counts = Tensor::empty({bins}, DType::I32, Device::CUDA),
         filled = Tensor::empty({bins}, DType::I32, Device::CUDA);
  set_zero(counts.raw_data(), bins * sizeof(int32_t));
  set_zero(filled.raw_data(), bins * sizeof(int32_t));
  KeyGroups groups{Tensor::empty({bins + 1}, DType::I32, Device::CUDA), Tensor::empty({n}, DType::I32, Device::CUDA)};
  const int32_t* key = keys.data<int32_t>();
  launch("count_keys", count_keys_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, key, n,
         counts.data<int32_t>());
  launch("exclusive_scan", exclusive_scan_kernel, dim3(1), dim3(kScanThreads), 0, counts.data<int32_t>(), bins,
         groups.offsets.data<int32_t>());
  launch("stable_scatter", stable_scatter_kernel, dim3(1), dim3(kScatterThreads), 0, key, n,
         groups.offsets.data<int32_t>(), filled.data<int32_t>(), groups.order.data<int32_t>());
  return groups;
}

// ---- slices along dim -----------------------------------------------------------------------------------------------

template <class W>
__global__ void select_slices_kernel(const W* src, const int32_t* index, int64_t outer, int64_t src_n, int64_t n,
                                     int64_t inner, W* dst) {
  const int64_t e = thread_element();
  if (e >= outer * n * inner) return;
  const int64_t c = e % inner, j = (e / inner) % n, o = e / (inner * n);
  dst[e] = src[(o * src_n + index[j]) * inner + c];
}

void select_slices(const Tensor& src, int64_t outer, int64_t src_n, int64_t inner, const Tensor& index,
                   const Tensor& dst) {
  const int64_t n = index.numel();
  with_element_word(src.dtype(), [&](auto word) {
    using W = decltype(word);
    launch("select_slices", select_slices_kernel<W>, dim3(blocks_for(outer * n * inner, kThreads)), dim3(kThreads), 0,
           static_cast<const W*>(src.raw_data()), index.data<int32_t>(), outer, src_n, n, inner,
           static_cast<W*>(dst.raw_data()));
  });
}

// One thread per element (o, t, c) of dst [outer, dst_n, inner]: adds src[o, j, c] for the positions j of row t's
// group, in increasing j, straight into the element (as the CPU's d += s, so the same roundings).
template <class T>
__global__ void add_grouped_slices_kernel(T* dst, const T* src, const int32_t* offsets, const int32_t* order,
                                          int64_t outer, int64_t dst_n, int64_t n, int64_t inner) {
  const int64_t e = thread_element();
  if (e >= outer * dst_n * inner) return;
  const int64_t c = e % inner, t = (e / inner) % dst_n, o = e / (inner * dst_n);
  const int32_t begin = offsets[t], end = offsets[t + 1];
  if (begin == end) return;
  T value = dst[e];
  for (int32_t s = begin; s < end; ++s) value += src[(o * n + order[s]) * inner + c];
  dst[e] = value;
}

void add_slices(const Tensor& dst, int64_t outer, int64_t dst_n, int64_t inner, const Tensor& index,
                const Tensor& src) {
  const int64_t n = index.numel();
  if (n == 0 || dst.numel() == 0) return;
  const KeyGroups groups = group_by_key(index, dst_n);
  dispatch_all("index", dst.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("add_grouped_slices", add_grouped_slices_kernel<T>, dim3(blocks_for(outer * dst_n * inner, kThreads)),
           dim3(kThreads), 0, dst.data<T>(), src.data<T>(), groups.offsets.data<int32_t>(),
           groups.order.data<int32_t>(), outer, dst_n, n, inner);
  });
}

// ---- elements along dim ---------------------------------------------------------------------------------------------

// index's shape and x's strides: position p of index (row-major over index_shape) addresses x at
// base_offset(p) + index[p] * x_stride[dim].
struct ElementLayout {
  int ndim, dim;
  int64_t index_shape[kMaxDims];
  int64_t x_stride[kMaxDims];
  // x's offset of p's coordinates, leaving out the one along dim.
  __device__ int64_t base_offset(int64_t p) const {
    int64_t offset = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t c = p % index_shape[d];
      p /= index_shape[d];
      if (d != dim) offset += c * x_stride[d];
    }
    return offset;
  }
};

static ElementLayout element_layout(const char* op, const Tensor& x, int64_t dim, const Tensor& index) {
  check_rank(op, x);
  ElementLayout L{static_cast<int>(x.dim()), static_cast<int>(dim), {}, {}};
  int64_t stride = 1;
  for (int d = L.ndim - 1; d >= 0; --d) {
    L.index_shape[d] = index.size(d);
    L.x_stride[d] = stride;
    stride *= x.size(d);
  }
  return L;
}

template <class T>
__global__ void gather_elements_kernel(const T* x, const int32_t* index, int64_t n, ElementLayout L, T* out) {
  const int64_t p = thread_element();
  if (p < n) out[p] = x[L.base_offset(p) + index[p] * L.x_stride[L.dim]];
}

void gather_elements(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& out) {
  const ElementLayout L = element_layout("gather", x, dim, index);
  const int64_t n = index.numel();
  dispatch_all("index", x.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("gather_elements", gather_elements_kernel<T>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, x.data<T>(),
           index.data<int32_t>(), n, L, out.data<T>());
  });
}

// One thread per column (o, i) of index viewed [outer, along, inner]: the positions (o, 0..along, i) in order.
template <class T>
__global__ void scatter_add_columns_kernel(T* dst, const int32_t* index, const T* src, int64_t outer, int64_t along,
                                           int64_t inner, ElementLayout L) {
  const int64_t column = thread_element();
  if (column >= outer * inner) return;
  const int64_t first = (column / inner) * along * inner + column % inner;  // position (o, 0, i)
  const int64_t base = L.base_offset(first), stride = L.x_stride[L.dim];
  for (int64_t j = 0; j < along; ++j) {
    const int64_t p = first + j * inner;
    dst[base + index[p] * stride] += src[p];
  }
}

void scatter_add_elements(const Tensor& dst, int64_t dim, const Tensor& index, const Tensor& src) {
  if (index.numel() == 0) return;  // nothing to add (and a zero size would divide by zero in base_offset)
  const ElementLayout L = element_layout("scatter_add", dst, dim, index);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= index.size(d);
  for (int64_t d = dim + 1; d < index.dim(); ++d) inner *= index.size(d);
  dispatch_all("index", dst.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("scatter_add_columns", scatter_add_columns_kernel<T>, dim3(blocks_for(outer * inner, kThreads)),
           dim3(kThreads), 0, dst.data<T>(), index.data<int32_t>(), src.data<T>(), outer, index.size(dim), inner, L);
  });
}

// ---- where ----------------------------------------------------------------------------------------------------------

// out's shape and each operand's broadcast strides over it (0 along a broadcast dim).
struct WhereLayout {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t cond_stride[kMaxDims], a_stride[kMaxDims], b_stride[kMaxDims];
};

template <class T>
__global__ void select_where_kernel(const int32_t* cond, const T* a, const T* b, int64_t n, WhereLayout L, T* out) {
  const int64_t e = thread_element();
  if (e >= n) return;
  int64_t rem = e, oc = 0, oa = 0, ob = 0;
  for (int d = L.ndim - 1; d >= 0; --d) {
    const int64_t c = rem % L.shape[d];
    rem /= L.shape[d];
    oc += c * L.cond_stride[d], oa += c * L.a_stride[d], ob += c * L.b_stride[d];
  }
  out[e] = cond[oc] ? a[oa] : b[ob];
}

void select_where(const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out) {
  check_rank("where", out);
  const Shape& shape = out.shape();
  const std::vector<int64_t> sc = broadcast_strides(cond.shape(), shape), sa = broadcast_strides(a.shape(), shape),
                             sb = broadcast_strides(b.shape(), shape);
  WhereLayout L{static_cast<int>(shape.size()), {}, {}, {}, {}};
  for (int d = 0; d < L.ndim; ++d)
    L.shape[d] = shape[d], L.cond_stride[d] = sc[d], L.a_stride[d] = sa[d], L.b_stride[d] = sb[d];
  const int64_t n = out.numel();
  dispatch_all("index", a.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("select_where", select_where_kernel<T>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0,
           cond.data<int32_t>(), a.data<T>(), b.data<T>(), n, L, out.data<T>());
  });
}

// ---- orderings and counts -------------------------------------------------------------------------------------------

// Descending order with NaN above everything; NaNs tie among themselves (v != v: v is NaN).
template <class T> __device__ bool ranks_above(T u, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    if (u != u) return v == v;
    if (v != v) return false;
  }
  return u > v;
}

// Whether u (at index i) comes before v (at index j) in the row's order: the higher-ranked first when descending, the
// lower-ranked first when ascending, and equal values by index. A strict total order on the row's elements.
template <class T> __device__ bool comes_before(T u, int64_t i, T v, int64_t j, bool descending) {
  const bool u_first = descending ? ranks_above(u, v) : ranks_above(v, u);
  const bool v_first = descending ? ranks_above(v, u) : ranks_above(u, v);
  return u_first || (!v_first && i < j);
}

// One block per row of n: element j's place in the order is the number of elements that come before it. Places below
// `keep` are written: indices[place] = j (and values[place] = x_j when values is given). O(n^2) per row: meant for
// rows of up to a few thousand (router rows, expert ids).
template <class T>
__global__ void place_rows_kernel(const T* x, int64_t n, bool descending, int64_t keep, T* values, int32_t* indices) {
  const T* row = x + static_cast<int64_t>(blockIdx.x) * n;
  const int64_t out_row = static_cast<int64_t>(blockIdx.x) * keep;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    int64_t place = 0;
    for (int64_t i = 0; i < n; ++i) place += comes_before(row[i], i, row[j], j, descending);
    if (place >= keep) continue;
    indices[out_row + place] = static_cast<int32_t>(j);
    if (values) values[out_row + place] = row[j];
  }
}

constexpr int kRowThreads = 128;

void topk_rows(const Tensor& x, int64_t k, const Tensor& values, const Tensor& indices) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch_all("topk", x.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("topk_rows", place_rows_kernel<T>, dim3(rows), dim3(kRowThreads), 0, x.data<T>(), n, true, k,
           values.data<T>(), indices.data<int32_t>());
  });
}

void argsort_rows(const Tensor& x, bool descending, const Tensor& out) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch_all("argsort", x.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("argsort_rows", place_rows_kernel<T>, dim3(rows), dim3(kRowThreads), 0, x.data<T>(), n, descending, n,
           static_cast<T*>(nullptr), out.data<int32_t>());
  });
}

void count_ids(const Tensor& ids, const Tensor& counts) {
  const int64_t n = ids.numel();
  launch("count_ids", count_keys_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, ids.data<int32_t>(), n,
         counts.data<int32_t>());
}

}  // namespace moelab::cuda
