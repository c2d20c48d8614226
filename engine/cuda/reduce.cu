// CUDA kernels of engine/kernels/reduce.h. Every sum happens inside one thread or one block in a fixed order (no
// atomics), so each result is the same from run to run. A reduction over a contiguous row (the last dim, inner = 1)
// gives the row to one block; over another dim, one thread per output walks its column in order j = 0, 1, ... (the
// CPU's order: those results are the CPU's bits), except a sum of few but long columns, which is summed in chunks of
// rows (sum_dim). T is the element type (float or double; cumsum also int32_t).
#include "engine/kernels/reduce.h"

#include <algorithm>
#include <cmath>

#include "engine/cuda/device.cuh"
#include "engine/cuda/reduce.cuh"

namespace moelab::cuda {

constexpr int kRowThreads = 256;  // threads of a one-row-per-block kernel (a power of two: max_rows_kernel halves it)
constexpr int kThreads = 256;     // threads of a one-item-per-thread kernel

// ---- sum ------------------------------------------------------------------------------------------------------------

// Like the CPU's parallel_sum, chunks of kSumChunk elements are summed separately (one block each), then the chunk
// sums in chunk order by one block.
constexpr int64_t kSumChunk = 4096;

template <class T> __global__ void sum_chunks_kernel(const T* x, int64_t n, double* partial) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSumChunk;
  const int64_t end = begin + kSumChunk < n ? begin + kSumChunk : n;
  double acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) acc += static_cast<double>(x[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <class T> __global__ void sum_partials_kernel(const double* partial, int64_t chunks, T* out) {
  double acc = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) acc += partial[c];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<T>(acc);
}

void sum_all(const Tensor& x, const Tensor& out) {
  const int64_t n = x.numel(), chunks = (n + kSumChunk - 1) / kSumChunk;
  Tensor partial = Tensor::empty({chunks}, DType::F64, Device::CUDA);
  dispatch_float("sum", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    launch("sum_chunks", sum_chunks_kernel<T>, dim3(chunks), dim3(kRowThreads), 0, x.data<T>(), n,
           partial.data<double>());
    launch("sum_partials", sum_partials_kernel<T>, dim3(1), dim3(1024), 0, partial.data<double>(), chunks,
           out.data<T>());
  });
}

// One block per contiguous row of n: out[r] = the row's sum, accumulated in double.
template <class T> __global__ void sum_rows_kernel(const T* x, int64_t n, T* out) {
  const T* row = x + static_cast<int64_t>(blockIdx.x) * n;
  double acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) acc += static_cast<double>(row[j]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<T>(acc);
}

// One thread per output (o, i): out[o, i] = sum over j of x[o, j, i] in T, j in order (adjacent threads read adjacent
// elements).
template <class T> __global__ void sum_columns_kernel(const T* x, ReduceDims v, T* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= v.outer * v.inner) return;
  const T* column = x + (r / v.inner) * v.n * v.inner + r % v.inner;
  T acc = 0;
  for (int64_t j = 0; j < v.n; ++j) acc += column[j * v.inner];
  out[r] = acc;
}

// With few outputs and long columns (the MoE's mean of the router's probabilities over 16k tokens: 16 to 32 columns)
// one thread per column would walk all its rows alone. Then block row y sums chunk y of `rows` rows of each column in
// double (partial [chunks, outputs]), and one thread per output adds its chunks in order.
constexpr int64_t kColumnChunk = 256;              // rows per chunk, at least
constexpr int64_t kMaxColumnChunks = 256;          // chunks, at most (longer columns get longer chunks)
constexpr int64_t kFewColumns = int64_t(1) << 16;  // more outputs than this fill the GPU one thread per output

template <class T> __global__ void sum_column_chunks_kernel(const T* x, ReduceDims v, int64_t rows, double* partial) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, outputs = v.outer * v.inner;
  if (r >= outputs) return;
  const T* column = x + (r / v.inner) * v.n * v.inner + r % v.inner;
  const int64_t begin = blockIdx.y * rows, end = begin + rows < v.n ? begin + rows : v.n;
  double acc = 0;
  for (int64_t j = begin; j < end; ++j) acc += static_cast<double>(column[j * v.inner]);
  partial[blockIdx.y * outputs + r] = acc;
}

template <class T>
__global__ void sum_column_partials_kernel(const double* partial, int64_t chunks, int64_t outputs, T* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= outputs) return;
  double acc = 0;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * outputs + r];
  out[r] = static_cast<T>(acc);
}

void sum_dim(const Tensor& x, int64_t dim, const Tensor& out) {
  const ReduceDims v = reduce_dims(x.shape(), dim);
  const int64_t outputs = v.outer * v.inner;
  const int64_t rows = std::max(kColumnChunk, (v.n + kMaxColumnChunks - 1) / kMaxColumnChunks);
  const int64_t chunks = (v.n + rows - 1) / rows;
  dispatch_float("sum", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    if (v.inner == 1) {
      launch("sum_rows", sum_rows_kernel<T>, dim3(v.outer), dim3(kRowThreads), 0, x.data<T>(), v.n, out.data<T>());
    } else if (chunks > 1 && outputs <= kFewColumns) {
      Tensor partial = Tensor::empty({chunks, outputs}, DType::F64, Device::CUDA);
      launch("sum_column_chunks", sum_column_chunks_kernel<T>,
             dim3(blocks_for(outputs, kThreads), static_cast<unsigned>(chunks)), dim3(kThreads), 0, x.data<T>(), v,
             rows, partial.data<double>());
      launch("sum_column_partials", sum_column_partials_kernel<T>, dim3(blocks_for(outputs, kThreads)), dim3(kThreads),
             0, partial.data<double>(), chunks, outputs, out.data<T>());
    } else {
      launch("sum_columns", sum_columns_kernel<T>, dim3(blocks_for(outputs, kThreads)), dim3(kThreads), 0, x.data<T>(),
             v, out.data<T>());
    }
  });
}

// ---- max ------------------------------------------------------------------------------------------------------------

// Whether x[j] = value replaces the best so far, x[at] = best, in a scan that keeps the first maximum and lets the
// first NaN win (the CPU's rule). Written as an order on (value, position) pairs, so partial bests of a block combine
// in any grouping to the scan's answer.
template <class T> __device__ bool beats(T value, int64_t j, T best, int64_t at) {
  const bool value_nan = std::isnan(value), best_nan = std::isnan(best);
  if (value_nan != best_nan) return value_nan;
  if (!value_nan && value != best) return value > best;
  return j < at;
}

// One block per contiguous row of n: each thread scans its strided share, then a tree over the block's threads.
template <class T> __global__ void max_rows_kernel(const T* x, int64_t n, T* out, int32_t* where) {
  SHARED_ARRAY(T, best_value, kRowThreads);
  SHARED_ARRAY(int64_t, best_at, kRowThreads);
  const T* row = x + static_cast<int64_t>(blockIdx.x) * n;
  T best = static_cast<T>(-INFINITY);
  int64_t at = n;  // past the row: loses every tie against a real position
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (beats(row[j], j, best, at)) best = row[j], at = j;
  best_value[threadIdx.x] = best;
  best_at[threadIdx.x] = at;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const unsigned other = threadIdx.x + half;
      if (beats(best_value[other], best_at[other], best_value[threadIdx.x], best_at[threadIdx.x]))
        best_value[threadIdx.x] = best_value[other], best_at[threadIdx.x] = best_at[other];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[blockIdx.x] = best_value[0];
    where[blockIdx.x] = static_cast<int32_t>(best_at[0]);
  }
}

// One thread per output (o, i): the CPU's scan of its column.
template <class T> __global__ void max_columns_kernel(const T* x, ReduceDims v, T* out, int32_t* where) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= v.outer * v.inner) return;
  const T* column = x + (r / v.inner) * v.n * v.inner + r % v.inner;
  T best = column[0];
  int32_t at = 0;
  for (int64_t j = 1; j < v.n; ++j)
    if (beats(column[j * v.inner], j, best, at)) best = column[j * v.inner], at = static_cast<int32_t>(j);
  out[r] = best;
  where[r] = at;
}

void max_forward(const Tensor& x, int64_t dim, const Tensor& out, const Tensor& where) {
  const ReduceDims v = reduce_dims(x.shape(), dim);
  dispatch_float("max", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    if (v.inner == 1)
      launch("max_rows", max_rows_kernel<T>, dim3(v.outer), dim3(kRowThreads), 0, x.data<T>(), v.n, out.data<T>(),
             where.data<int32_t>());
    else
      launch("max_columns", max_columns_kernel<T>, dim3(blocks_for(v.outer * v.inner, kThreads)), dim3(kThreads), 0,
             x.data<T>(), v, out.data<T>(), where.data<int32_t>());
  });
}

// One thread per element (o, j, i) of dx: g[o, i] where j is the maximum's position, else 0 (every element written
// once: no zero fill first, no atomics).
template <class T> __global__ void max_backward_kernel(const T* g, const int32_t* where, ReduceDims v, T* dx) {
  const int64_t total = v.outer * v.n * v.inner;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % v.inner, j = (e / v.inner) % v.n, o = e / (v.inner * v.n);
    const int64_t r = o * v.inner + i;
    dx[e] = where[r] == j ? g[r] : T(0);
  }
}

void max_backward(const Tensor& g, const Tensor& where, int64_t dim, const Tensor& dx) {
  const ReduceDims v = reduce_dims(dx.shape(), dim);
  const unsigned blocks = blocks_for(dx.numel(), kThreads);
  dispatch_float("max_backward", g.dtype(), [&](auto tag) {
    using T = decltype(tag);
    launch("max_backward", max_backward_kernel<T>, dim3(blocks < 4096 ? blocks : 4096), dim3(kThreads), 0, g.data<T>(),
           where.data<int32_t>(), v, dx.data<T>());
  });
}

// ---- softmax / log_softmax over the last dim ----------------------------------------------------------------------------

// One block per row of n: m = max(x), z = sum exp(x - m) in double; then softmax y = exp(x - m) * (1/z) or
// log_softmax y = x - (log z + m), rounded as the CPU rounds them.
template <class T> __global__ void softmax_rows_kernel(const T* x, int64_t rows, int64_t n, bool log_space, T* y) {
  const int64_t row = team_row();
  if (row >= rows) return;  // a whole warp team (block teams fill the grid exactly)
  const T* xr = x + row * n;
  T* yr = y + row * n;
  T m = static_cast<T>(-INFINITY);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = m < xr[j] ? xr[j] : m;
  m = team_max(m);
  double z = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) z += std::exp(static_cast<double>(xr[j] - m));
  z = team_sum(z);
  if (log_space) {
    const T log_z = static_cast<T>(std::log(z)) + m;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) yr[j] = xr[j] - log_z;
  } else {
    const T inv = static_cast<T>(1.0 / z);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) yr[j] = std::exp(xr[j] - m) * inv;
  }
}

static void softmax_rows(const char* op, const Tensor& x, bool log_space, const Tensor& y) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const RowTeams teams = row_teams(rows, n, kRowThreads);
  dispatch_float(op, x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    launch(op, softmax_rows_kernel<T>, teams.grid, teams.block, 0, x.data<T>(), rows, n, log_space, y.data<T>());
  });
}

void softmax_forward(const Tensor& x, const Tensor& y) { softmax_rows("softmax", x, false, y); }
void log_softmax_forward(const Tensor& x, const Tensor& y) { softmax_rows("log_softmax", x, true, y); }

// One team per row: dx = y * (g - <g, y>), the dot product in double.
template <class T> __global__ void softmax_backward_kernel(const T* y, const T* g, int64_t rows, int64_t n, T* dx) {
  const int64_t row = team_row();
  if (row >= rows) return;
  const int64_t offset = row * n;
  const T *yr = y + offset, *gr = g + offset;
  double dot = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += static_cast<double>(gr[j]) * yr[j];
  const T d = static_cast<T>(team_sum(dot));
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dx[offset + j] = yr[j] * (gr[j] - d);
}

// One team per row: dx = g - exp(y) * sum(g), the sum in double.
template <class T> __global__ void log_softmax_backward_kernel(const T* y, const T* g, int64_t rows, int64_t n, T* dx) {
  const int64_t row = team_row();
  if (row >= rows) return;
  const int64_t offset = row * n;
  const T *yr = y + offset, *gr = g + offset;
  double total = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) total += gr[j];
  const T s = static_cast<T>(team_sum(total));
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dx[offset + j] = gr[j] - std::exp(yr[j]) * s;
}

void softmax_backward(const Tensor& y, const Tensor& g, const Tensor& dx) {
  const int64_t n = y.size(-1), rows = n ? y.numel() / n : 0;
  const RowTeams teams = row_teams(rows, n, kRowThreads);
  dispatch_float("softmax_backward", g.dtype(), [&](auto tag) {
    using T = decltype(tag);
    launch("softmax_backward", softmax_backward_kernel<T>, teams.grid, teams.block, 0, y.data<T>(), g.data<T>(), rows,
           n, dx.data<T>());
  });
}

void log_softmax_backward(const Tensor& y, const Tensor& g, const Tensor& dx) {
  const int64_t n = y.size(-1), rows = n ? y.numel() / n : 0;
  const RowTeams teams = row_teams(rows, n, kRowThreads);
  dispatch_float("log_softmax_backward", g.dtype(), [&](auto tag) {
    using T = decltype(tag);
    launch("log_softmax_backward", log_softmax_backward_kernel<T>, teams.grid, teams.block, 0, y.data<T>(), g.data<T>(),
           rows, n, dx.data<T>());
  });
}

// ---- cumsum ---------------------------------------------------------------------------------------------------------

// One thread per row of n: the running sum in T, in order (the CPU's std::partial_sum).
template <class T> __global__ void cumsum_kernel(const T* x, int64_t rows, int64_t n, T* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const T* xr = x + r * n;
  T* yr = out + r * n;
  T acc = xr[0];
  yr[0] = acc;
  for (int64_t j = 1; j < n; ++j) {
    acc = acc + xr[j];
    yr[j] = acc;
  }
}

void cumsum(const Tensor& x, const Tensor& out) {
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch_all("cumsum", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    launch("cumsum", cumsum_kernel<T>, dim3(blocks_for(rows, kThreads)), dim3(kThreads), 0, x.data<T>(), rows, n,
           out.data<T>());
  });
}

}  // namespace moelab::cuda
