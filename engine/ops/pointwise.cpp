// Elementwise ops: broadcasting arithmetic, scalar forms and unary math. Each op's backward sits right under it.
#include <cmath>

#include "engine/cpu/math.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// ---- broadcasting machinery ------------------------------------------------------------------------------------------

// NumPy rules: align trailing dims; sizes must match or one of them be 1.
static Shape broadcast_shape(const char* op, const Shape& a, const Shape& b) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    if (da != db && da != 1 && db != 1)
      fail("{}: shapes {} and {} do not broadcast (dim {}: {} vs {})", op, shape_str(a), shape_str(b), i, da, db);
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Element strides of `in` indexed by the dims of `out` (0 where `in` is broadcast).
static std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out) {
  std::vector<int64_t> strides(out.size(), 0);
  int64_t stride = 1;
  for (int64_t i = static_cast<int64_t>(in.size()) - 1; i >= 0; --i) {
    size_t o = i + (out.size() - in.size());
    strides[o] = in[i] == 1 ? 0 : stride;
    stride *= in[i];
  }
  return strides;
}

template <class T, class F>
static void binary_kernel(const Tensor& a, const Tensor& b, const Tensor& out, F f) {
  const T* pa = a.data<T>();
  const T* pb = b.data<T>();
  T* po = out.data<T>();
  int64_t n = out.numel();
  if (a.shape() == out.shape() && b.shape() == out.shape()) {  // the common case: one flat loop
    cpu::parallel_for(n, 1, [&](int64_t i) { po[i] = f(pa[i], pb[i]); });
    return;
  }
  if (a.shape() == out.shape() && b.numel() == 1) {
    T s = pb[0];
    cpu::parallel_for(n, 1, [&](int64_t i) { po[i] = f(pa[i], s); });
    return;
  }
  const Shape& shape = out.shape();
  int64_t ndim = static_cast<int64_t>(shape.size());
  std::vector<int64_t> sa = broadcast_strides(a.shape(), shape), sb = broadcast_strides(b.shape(), shape);
  int64_t inner = shape[ndim - 1], rows = inner ? n / inner : 0;
  int64_t ia = sa[ndim - 1], ib = sb[ndim - 1];
  cpu::parallel_for(rows, inner, [&](int64_t r) {
    int64_t rem = r, oa = 0, ob = 0;
    for (int64_t d = ndim - 2; d >= 0; --d) {
      int64_t idx = rem % shape[d];
      rem /= shape[d];
      oa += idx * sa[d], ob += idx * sb[d];
    }
    T* o = po + r * inner;
    for (int64_t i = 0; i < inner; ++i) o[i] = f(pa[oa + i * ia], pb[ob + i * ib]);
  });
}

template <class F> static Tensor binary(const char* op, const Tensor& a, const Tensor& b, F f) {
  check_same_dtype_device(op, a, b);
  check_float(op, a);
  check_cpu(op, a);
  Tensor out = Tensor::empty(broadcast_shape(op, a.shape(), b.shape()), a.dtype(), a.device());
  dispatch_float(op, a.dtype(), [&](auto t) { binary_kernel<decltype(t)>(a, b, out, f); });
  return out;
}

// out[i] = f(x[i]) (or f(x[i], y[i]) for two same-shape tensors), no recording: the building block of unary ops and
// of fused backward formulas.
template <class F> static Tensor map(const char* op, const Tensor& x, F f) {
  check_float(op, x);
  check_cpu(op, x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  dispatch_float(op, x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = out.data<T>();
    cpu::parallel_for(x.numel(), 4, [&](int64_t i) { o[i] = f(in[i]); });
  });
  return out;
}

template <class F> static Tensor map(const char* op, const Tensor& x, const Tensor& y, F f) {
  if (x.shape() != y.shape()) fail("{}: shapes {} and {} differ", op, x.str(), y.str());
  return binary(op, x, y, f);
}

Tensor sum_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  if (shape.size() > g.shape().size() || broadcast_shape("sum_to", shape, g.shape()) != g.shape())
    fail("sum_to: gradient {} was not broadcast from {}", g.str(), shape_str(shape));
  Tensor r = g;
  int64_t lead = g.dim() - static_cast<int64_t>(shape.size());
  for (int64_t d = 0; d < lead; ++d) r = sum(r, 0);  // dims that broadcasting added
  for (size_t d = 0; d < shape.size(); ++d)
    if (shape[d] == 1 && r.size(d) != 1) r = sum(r, static_cast<int64_t>(d), /*keepdim=*/true);
  return r;
}

Tensor expand(const Tensor& x, const Shape& shape) {
  check_float("expand", x);
  if (broadcast_shape("expand", x.shape(), shape) != shape) fail("expand: cannot broadcast {} to {}", x.str(), shape_str(shape));
  if (x.shape() == shape) return x;
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  // The binary kernel's broadcasting with x on both sides, keeping one of them.
  dispatch_float("expand", x.dtype(), [&](auto t) { binary_kernel<decltype(t)>(x, x, out, [](auto v, auto) { return v; }); });
  return record("expand", out, {x}, [in_shape = x.shape()](const Tensor& g) -> std::vector<Tensor> { return {sum_to(g, in_shape)}; });
}

// ---- binary arithmetic -------------------------------------------------------------------------------------------------

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary("add", a, b, [](auto x, auto y) { return x + y; });
  return record("add", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) -> std::vector<Tensor> {
    return {sum_to(g, sa), sum_to(g, sb)};
  });
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary("sub", a, b, [](auto x, auto y) { return x - y; });
  return record("sub", out, {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) -> std::vector<Tensor> {
    return {sum_to(g, sa), sum_to(neg(g), sb)};
  });
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary("mul", a, b, [](auto x, auto y) { return x * y; });
  return record("mul", out, {a, b}, [a = a.detach(), b = b.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {sum_to(mul(g, b), a.shape()), sum_to(mul(g, a), b.shape())};
  });
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary("div", a, b, [](auto x, auto y) { return x / y; });
  return record("div", out, {a, b},
                [a = a.detach(), b = b.detach(), y = out.detach()](const Tensor& g) -> std::vector<Tensor> {
                  // d(a/b)/da = 1/b;  d(a/b)/db = -a/b^2 = -y/b
                  Tensor gb = div(g, b);
                  return {sum_to(gb, a.shape()), sum_to(neg(mul(gb, y)), b.shape())};
                });
}

// ---- scalar forms ------------------------------------------------------------------------------------------------------

Tensor add(const Tensor& a, double s) {
  Tensor out = map("add", a, [s](auto x) { return x + static_cast<decltype(x)>(s); });
  return record("add_scalar", out, {a}, [](const Tensor& g) -> std::vector<Tensor> { return {g}; });
}

Tensor mul(const Tensor& a, double s) {
  Tensor out = map("mul", a, [s](auto x) { return x * static_cast<decltype(x)>(s); });
  return record("mul_scalar", out, {a}, [s](const Tensor& g) -> std::vector<Tensor> { return {mul(g, s)}; });
}

Tensor sub(double s, const Tensor& a) {
  Tensor out = map("rsub", a, [s](auto x) { return static_cast<decltype(x)>(s) - x; });
  return record("rsub_scalar", out, {a}, [](const Tensor& g) -> std::vector<Tensor> { return {neg(g)}; });
}

Tensor div(double s, const Tensor& a) {
  Tensor out = map("rdiv", a, [s](auto x) { return static_cast<decltype(x)>(s) / x; });
  // d(s/a)/da = -s/a^2 = -y/a
  return record("rdiv_scalar", out, {a}, [a = a.detach(), y = out.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("rdiv_backward", g, map("rdiv_backward", y, a, [](auto yi, auto ai) { return -yi / ai; }),
                [](auto gi, auto di) { return gi * di; })};
  });
}

// ---- unary math --------------------------------------------------------------------------------------------------------
// Each backward is one fused elementwise pass over (x or y, g).

Tensor neg(const Tensor& x) {
  Tensor out = map("neg", x, [](auto v) { return -v; });
  return record("neg", out, {x}, [](const Tensor& g) -> std::vector<Tensor> { return {neg(g)}; });
}

Tensor exp(const Tensor& x) {
  Tensor y = map("exp", x, [](auto v) { return std::exp(v); });
  return record("exp", y, {x}, [y = y.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("exp_backward", g, y, [](auto gi, auto yi) { return gi * yi; })};  // dy/dx = y
  });
}

Tensor log(const Tensor& x) {
  Tensor y = map("log", x, [](auto v) { return std::log(v); });
  return record("log", y, {x}, [x = x.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("log_backward", g, x, [](auto gi, auto xi) { return gi / xi; })};  // 1/x
  });
}

Tensor sqrt(const Tensor& x) {
  Tensor y = map("sqrt", x, [](auto v) { return std::sqrt(v); });
  return record("sqrt", y, {x}, [y = y.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("sqrt_backward", g, y, [](auto gi, auto yi) { return gi / (2 * yi); })};  // 1/(2 sqrt x)
  });
}

Tensor rsqrt(const Tensor& x) {
  Tensor y = map("rsqrt", x, [](auto v) { return 1 / std::sqrt(v); });
  return record("rsqrt", y, {x}, [y = y.detach()](const Tensor& g) -> std::vector<Tensor> {
    // d(x^-1/2)/dx = -x^-3/2 / 2 = -y^3 / 2
    return {map("rsqrt_backward", g, y, [](auto gi, auto yi) { return gi * yi * yi * yi * static_cast<decltype(yi)>(-0.5); })};
  });
}

Tensor square(const Tensor& x) {
  Tensor y = map("square", x, [](auto v) { return v * v; });
  return record("square", y, {x}, [x = x.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("square_backward", g, x, [](auto gi, auto xi) { return 2 * gi * xi; })};
  });
}

Tensor tanh(const Tensor& x) {
  Tensor y = map("tanh", x, [](auto v) { return std::tanh(v); });
  return record("tanh", y, {x}, [y = y.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("tanh_backward", g, y, [](auto gi, auto yi) { return gi * (1 - yi * yi); })};  // 1 - y^2
  });
}

Tensor sigmoid(const Tensor& x) {
  Tensor y = map("sigmoid", x, [](auto v) { return cpu::sigmoid(v); });
  return record("sigmoid", y, {x}, [y = y.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {map("sigmoid_backward", g, y, [](auto gi, auto yi) { return gi * yi * (1 - yi); })};  // y (1 - y)
  });
}

Tensor silu(const Tensor& x) {
  Tensor y = map("silu", x, [](auto v) { return v * cpu::sigmoid(v); });
  return record("silu", y, {x}, [x = x.detach()](const Tensor& g) -> std::vector<Tensor> {
    // d(x s)/dx = s + x s (1 - s) = s (1 + x (1 - s)),  s = sigmoid(x)
    return {map("silu_backward", g, x, [](auto gi, auto xi) {
      auto s = cpu::sigmoid(xi);
      return gi * s * (1 + xi * (1 - s));
    })};
  });
}

}  // namespace moelab
