// CPU kernels of engine/kernels/reduce.h: sums, max, softmax / log_softmax over the last dim, cumsum.
#include "engine/kernels/reduce.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "engine/cpu/parallel.h"

namespace moelab::cpu {

namespace {

// The number of rows of the last dim (x.size(-1) values each). Callers keep rows and n as plain variables, not a
// structured binding: clang 14 cannot capture those in the kernels' lambdas (the fuzz preset builds with it).
int64_t last_dim_rows(const Tensor& x) {
  const int64_t n = x.size(-1);
  return n ? x.numel() / n : 0;
}

// y = softmax (or log_softmax) of each row of n, with the max subtracted and the normalizer summed in double.
template <class T> void softmax_rows(const T* in, T* out, int64_t rows, int64_t n, bool log_space) {
  parallel_for(rows, n * 8, [&](int64_t r) {
    const T* x = in + r * n;
    T* y = out + r * n;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
    double z = 0;
    for (int64_t j = 0; j < n; ++j) z += std::exp(static_cast<double>(x[j] - m));
    if (log_space) {
      T log_z = static_cast<T>(std::log(z)) + m;
      for (int64_t j = 0; j < n; ++j) y[j] = x[j] - log_z;
    } else {
      T inv = static_cast<T>(1.0 / z);
      for (int64_t j = 0; j < n; ++j) y[j] = std::exp(x[j] - m) * inv;
    }
  });
}

}  // namespace

// ---- sum -------------------------------------------------------------------------------------------------------------

void sum_all(const Tensor& x, const Tensor& out) {
  dispatch_float("sum", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    *out.data<T>() = static_cast<T>(parallel_sum(x.numel(), [in](int64_t i) { return static_cast<double>(in[i]); }));
  });
}

void sum_dim(const Tensor& x, int64_t dim, const Tensor& out) {
  const ReduceDims v = reduce_dims(x.shape(), dim);
  dispatch_float("sum", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = out.data<T>();
    if (v.inner == 1) {  // reduce contiguous rows
      parallel_for(v.outer, v.n, [&](int64_t r) {
        double acc = 0;
        for (int64_t j = 0; j < v.n; ++j) acc += in[r * v.n + j];
        o[r] = static_cast<T>(acc);
      });
    } else {  // add whole rows of `inner` elements: unit-stride inner loop
      parallel_for(v.outer, v.n * v.inner, [&](int64_t r) {
        T* dst = o + r * v.inner;
        for (int64_t i = 0; i < v.inner; ++i) dst[i] = 0;
        for (int64_t j = 0; j < v.n; ++j) {
          const T* src = in + (r * v.n + j) * v.inner;
          for (int64_t i = 0; i < v.inner; ++i) dst[i] += src[i];
        }
      });
    }
  });
}

// ---- max ---------------------------------------------------------------------------------------------------------------

void max_forward(const Tensor& x, int64_t dim, const Tensor& out, const Tensor& where) {
  const ReduceDims v = reduce_dims(x.shape(), dim);
  dispatch_float("max", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* po = out.data<T>();
    int32_t* pw = where.data<int32_t>();
    parallel_for(v.outer * v.inner, v.n, [&](int64_t r) {
      int64_t o = r / v.inner, i = r % v.inner;
      const T* src = in + o * v.n * v.inner + i;
      T best = src[0];
      int32_t at = 0;
      for (int64_t j = 1; j < v.n; ++j)
        if (src[j * v.inner] > best || (std::isnan(src[j * v.inner]) && !std::isnan(best)))
          best = src[j * v.inner], at = j;
      po[r] = best;
      pw[r] = at;
    });
  });
}

void max_backward(const Tensor& g, const Tensor& where, int64_t dim, const Tensor& dx) {
  const ReduceDims v = reduce_dims(dx.shape(), dim);
  dispatch_float("max_backward", g.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* pg = g.data<T>();
    const int32_t* pw = where.data<int32_t>();
    T* pd = dx.data<T>();
    parallel_for(dx.numel(), 4, [&](int64_t e) { pd[e] = T(0); });
    parallel_for(v.outer * v.inner, 1, [&](int64_t r) {
      int64_t o = r / v.inner, i = r % v.inner;
      pd[(o * v.n + pw[r]) * v.inner + i] = pg[r];
    });
  });
}

// ---- softmax / log_softmax over the last dim ----------------------------------------------------------------------------

void softmax_forward(const Tensor& x, const Tensor& y) {
  const int64_t rows = last_dim_rows(x), n = x.size(-1);
  dispatch_float("softmax", x.dtype(), [&](auto t) {
    using T = decltype(t);
    softmax_rows<T>(x.data<T>(), y.data<T>(), rows, n, false);
  });
}

void log_softmax_forward(const Tensor& x, const Tensor& y) {
  const int64_t rows = last_dim_rows(x), n = x.size(-1);
  dispatch_float("log_softmax", x.dtype(), [&](auto t) {
    using T = decltype(t);
    softmax_rows<T>(x.data<T>(), y.data<T>(), rows, n, true);
  });
}

void softmax_backward(const Tensor& y, const Tensor& g, const Tensor& dx) {
  const int64_t rows = last_dim_rows(y), n = y.size(-1);
  dispatch_float("softmax_backward", g.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *py = y.data<T>(), *pg = g.data<T>();
    T* pd = dx.data<T>();
    parallel_for(rows, n * 4, [&](int64_t r) {
      const T *yr = py + r * n, *gr = pg + r * n;
      double dot = 0;
      for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(gr[j]) * yr[j];
      for (int64_t j = 0; j < n; ++j) pd[r * n + j] = yr[j] * (gr[j] - static_cast<T>(dot));
    });
  });
}

void log_softmax_backward(const Tensor& y, const Tensor& g, const Tensor& dx) {
  const int64_t rows = last_dim_rows(y), n = y.size(-1);
  dispatch_float("log_softmax_backward", g.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *py = y.data<T>(), *pg = g.data<T>();
    T* pd = dx.data<T>();
    parallel_for(rows, n * 4, [&](int64_t r) {
      const T *yr = py + r * n, *gr = pg + r * n;
      double total = 0;
      for (int64_t j = 0; j < n; ++j) total += gr[j];
      for (int64_t j = 0; j < n; ++j) pd[r * n + j] = gr[j] - std::exp(yr[j]) * static_cast<T>(total);
    });
  });
}

// ---- cumsum ------------------------------------------------------------------------------------------------------------

void cumsum(const Tensor& x, const Tensor& out) {
  const int64_t rows = last_dim_rows(x), n = x.size(-1);
  dispatch_all("cumsum", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = out.data<T>();
    parallel_for(rows, n, [&](int64_t r) { std::partial_sum(in + r * n, in + (r + 1) * n, o + r * n); });
  });
}

}  // namespace moelab::cpu
