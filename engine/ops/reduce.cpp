// Reductions (sum, mean, max), softmax and log_softmax over the last dim, and cumsum.
// A reduction over `dim` views x as [outer, n, inner] and produces [outer, inner].
#include <cmath>
#include <limits>
#include <numeric>

#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

struct ReduceView {
  int64_t outer = 1, n = 1, inner = 1;
  Shape out_shape;  // with or without the reduced dim, per keepdim
};

static ReduceView reduce_view(const char* op, const Tensor& x, int64_t& dim, bool keepdim) {
  check_float(op, x);
  check_cpu(op, x);
  dim = normalize_dim(op, dim, x.dim());
  ReduceView v;
  const Shape& s = x.shape();
  for (int64_t d = 0; d < dim; ++d) v.outer *= s[d];
  v.n = s[dim];
  for (int64_t d = dim + 1; d < x.dim(); ++d) v.inner *= s[d];
  v.out_shape = s;
  if (keepdim)
    v.out_shape[dim] = 1;
  else
    v.out_shape.erase(v.out_shape.begin() + dim);
  return v;
}

// ---- sum -------------------------------------------------------------------------------------------------------------

Tensor sum(const Tensor& x) {
  check_float("sum", x);
  check_cpu("sum", x);
  Tensor out = Tensor::empty({}, x.dtype(), x.device());
  dispatch_float("sum", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    // double accumulator: a loss summed over many tokens stays accurate
    *out.data<T>() = static_cast<T>(cpu::parallel_sum(x.numel(), [in](int64_t i) { return static_cast<double>(in[i]); }));
  });
  return record("sum", out, {x}, [in_shape = x.shape()](const Tensor& g) -> std::vector<Tensor> {
    return {expand(g, in_shape)};
  });
}

Tensor sum(const Tensor& x, int64_t dim, bool keepdim) {
  ReduceView v = reduce_view("sum", x, dim, keepdim);
  Tensor out = Tensor::empty(v.out_shape, x.dtype(), x.device());
  dispatch_float("sum", x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = out.data<T>();
    if (v.inner == 1) {  // reduce contiguous rows
      cpu::parallel_for(v.outer, v.n, [&](int64_t r) {
        double acc = 0;
        for (int64_t j = 0; j < v.n; ++j) acc += in[r * v.n + j];
        o[r] = static_cast<T>(acc);
      });
    } else {  // add whole rows of `inner` elements: unit-stride inner loop
      cpu::parallel_for(v.outer, v.n * v.inner, [&](int64_t r) {
        T* dst = o + r * v.inner;
        for (int64_t i = 0; i < v.inner; ++i) dst[i] = 0;
        for (int64_t j = 0; j < v.n; ++j) {
          const T* src = in + (r * v.n + j) * v.inner;
          for (int64_t i = 0; i < v.inner; ++i) dst[i] += src[i];
        }
      });
    }
  });
  Shape keep_shape = x.shape();
  keep_shape[dim] = 1;
  return record("sum_dim", out, {x}, [in_shape = x.shape(), keep_shape](const Tensor& g) -> std::vector<Tensor> {
    return {expand(reshape(g, keep_shape), in_shape)};
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

// out[o, i] = max_j x[o, j, i]; where[o, i] = first j attaining it.
template <class T> static void max_kernel(const T* in, T* out, int32_t* where, const ReduceView& v) {
  cpu::parallel_for(v.outer * v.inner, v.n, [&](int64_t r) {
    int64_t o = r / v.inner, i = r % v.inner;
    const T* src = in + o * v.n * v.inner + i;
    T best = src[0];
    int32_t at = 0;
    for (int64_t j = 1; j < v.n; ++j)
      if (src[j * v.inner] > best || (std::isnan(src[j * v.inner]) && !std::isnan(best))) best = src[j * v.inner], at = j;
    out[r] = best;
    where[r] = at;
  });
}

// dx = 0 except dx[o, where[o,i], i] = g[o, i].
static Tensor max_backward(const Tensor& g, const Tensor& where, const Shape& in_shape, const ReduceView& v) {
  Tensor dx = zeros(in_shape, g.dtype(), g.device());
  dispatch_float("max_backward", g.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* pg = g.data<T>();
    const int32_t* pw = where.data<int32_t>();
    T* pd = dx.data<T>();
    cpu::parallel_for(v.outer * v.inner, 1, [&](int64_t r) {
      int64_t o = r / v.inner, i = r % v.inner;
      pd[(o * v.n + pw[r]) * v.inner + i] = pg[r];
    });
  });
  return dx;
}

static Tensor max_over(const char* op, const Tensor& x, const ReduceView& v) {
  if (v.n == 0) fail("{}: empty reduction over {}", op, x.str());
  Tensor out = Tensor::empty(v.out_shape, x.dtype(), x.device());
  Tensor where = Tensor::empty(v.out_shape, DType::I32, x.device());
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    max_kernel<T>(x.data<T>(), out.data<T>(), where.data<int32_t>(), v);
  });
  return record(op, out, {x}, [where, v, in_shape = x.shape()](const Tensor& g) -> std::vector<Tensor> {
    return {max_backward(g, where, in_shape, v)};
  });
}

Tensor max(const Tensor& x, int64_t dim, bool keepdim) { return max_over("max_dim", x, reduce_view("max", x, dim, keepdim)); }

Tensor max(const Tensor& x) {
  check_float("max", x);
  check_cpu("max", x);
  ReduceView v;
  v.n = x.numel();
  return max_over("max", x, v);
}

// ---- softmax / log_softmax over the last dim ----------------------------------------------------------------------------

// Rows of the last dim: (rows, n).
static std::pair<int64_t, int64_t> rows_of(const char* op, const Tensor& x) {
  check_float(op, x);
  check_cpu(op, x);
  if (x.dim() == 0) fail("{}: needs at least one dim, got {}", op, x.str());
  int64_t n = x.size(-1);
  return {n ? x.numel() / n : 0, n};
}

template <class T> static void softmax_rows(const T* in, T* out, int64_t rows, int64_t n, bool log_space) {
  cpu::parallel_for(rows, n * 8, [&](int64_t r) {
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

Tensor softmax(const Tensor& x) {
  auto [rows, n] = rows_of("softmax", x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  dispatch_float("softmax", x.dtype(), [&](auto t) {
    using T = decltype(t);
    softmax_rows<T>(x.data<T>(), y.data<T>(), rows, n, false);
  });
  // dx = y * (g - <g, y>) per row
  return record("softmax", y, {x}, [y = y.detach(), rows, n](const Tensor& g) -> std::vector<Tensor> {
    Tensor dx = Tensor::empty(g.shape(), g.dtype(), g.device());
    dispatch_float("softmax_backward", g.dtype(), [&](auto t) {
      using T = decltype(t);
      const T *py = y.data<T>(), *pg = g.data<T>();
      T* pd = dx.data<T>();
      cpu::parallel_for(rows, n * 4, [&](int64_t r) {
        const T *yr = py + r * n, *gr = pg + r * n;
        double dot = 0;
        for (int64_t j = 0; j < n; ++j) dot += static_cast<double>(gr[j]) * yr[j];
        for (int64_t j = 0; j < n; ++j) pd[r * n + j] = yr[j] * (gr[j] - static_cast<T>(dot));
      });
    });
    return {dx};
  });
}

Tensor log_softmax(const Tensor& x) {
  auto [rows, n] = rows_of("log_softmax", x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  dispatch_float("log_softmax", x.dtype(), [&](auto t) {
    using T = decltype(t);
    softmax_rows<T>(x.data<T>(), y.data<T>(), rows, n, true);
  });
  // dx = g - softmax(x) * sum(g) per row, softmax(x) = exp(y)
  return record("log_softmax", y, {x}, [y = y.detach(), rows, n](const Tensor& g) -> std::vector<Tensor> {
    Tensor dx = Tensor::empty(g.shape(), g.dtype(), g.device());
    dispatch_float("log_softmax_backward", g.dtype(), [&](auto t) {
      using T = decltype(t);
      const T *py = y.data<T>(), *pg = g.data<T>();
      T* pd = dx.data<T>();
      cpu::parallel_for(rows, n * 4, [&](int64_t r) {
        const T *yr = py + r * n, *gr = pg + r * n;
        double total = 0;
        for (int64_t j = 0; j < n; ++j) total += gr[j];
        for (int64_t j = 0; j < n; ++j) pd[r * n + j] = gr[j] - std::exp(yr[j]) * static_cast<T>(total);
      });
    });
    return {dx};
  });
}

// ---- cumsum (no grad) --------------------------------------------------------------------------------------------------

Tensor cumsum(const Tensor& x) {
  check_defined("cumsum", x);
  check_cpu("cumsum", x);
  if (x.dim() == 0) fail("cumsum: needs at least one dim, got {}", x.str());
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  dispatch_all(x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = out.data<T>();
    cpu::parallel_for(rows, n, [&](int64_t r) { std::partial_sum(in + r * n, in + (r + 1) * n, o + r * n); });
  });
  return out;
}

}  // namespace moelab
