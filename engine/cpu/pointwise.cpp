// CPU kernels of engine/kernels/pointwise.h: the elementwise loops, each running one functor of
// engine/kernels/pointwise_math.h (chosen once per call, so the loop body is the functor's expression inlined).
#include "engine/kernels/pointwise.h"

#include "engine/cpu/parallel.h"

namespace moelab::cpu {

namespace {

// out = f(a, b) with NumPy broadcasting. Same shapes, and a tensor with a scalar, are flat loops; otherwise each row
// of out's last dim finds its operands' offsets once and walks them with their last-dim strides.
template <class T, class F> void binary_kernel(const Tensor& a, const Tensor& b, const Tensor& out, F f) {
  const T* pa = a.data<T>();
  const T* pb = b.data<T>();
  T* po = out.data<T>();
  int64_t n = out.numel();
  if (a.shape() == out.shape() && b.shape() == out.shape()) {  // the common case: one flat loop
    parallel_for(n, 1, [&](int64_t i) { po[i] = f(pa[i], pb[i]); });
    return;
  }
  if (a.shape() == out.shape() && b.numel() == 1) {
    T s = pb[0];
    parallel_for(n, 1, [&](int64_t i) { po[i] = f(pa[i], s); });
    return;
  }
  const Shape& shape = out.shape();
  int64_t ndim = static_cast<int64_t>(shape.size());
  std::vector<int64_t> sa = broadcast_strides(a.shape(), shape), sb = broadcast_strides(b.shape(), shape);
  int64_t inner = shape[ndim - 1], rows = inner ? n / inner : 0;
  int64_t ia = sa[ndim - 1], ib = sb[ndim - 1];
  parallel_for(rows, inner, [&](int64_t r) {
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

}  // namespace

// ---- unary ----------------------------------------------------------------------------------------------------------

void unary_forward(UnaryOp op, const Tensor& x, const Tensor& y) {
  dispatch_float(enum_name(op), x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = y.data<T>();
    with_unary_op(op, [&](auto f) { parallel_for(x.numel(), 4, [&](int64_t i) { o[i] = f.forward(in[i]); }); });
  });
}

void unary_backward(UnaryOp op, const Tensor& g, const Tensor& saved, const Tensor& dx) {
  dispatch_float(enum_name(op), g.dtype(), [&](auto t) {
    using T = decltype(t);
    const T *pg = g.data<T>(), *ps = saved.data<T>();
    T* pd = dx.data<T>();
    with_unary_op(op,
                  [&](auto f) { parallel_for(g.numel(), 1, [&](int64_t i) { pd[i] = f.backward(pg[i], ps[i]); }); });
  });
}

// ---- binary ---------------------------------------------------------------------------------------------------------

void binary_forward(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  dispatch_float(enum_name(op), a.dtype(),
                 [&](auto t) { with_binary_op(op, [&](auto f) { binary_kernel<decltype(t)>(a, b, out, f); }); });
}

void scalar_forward(BinaryOp op, const Tensor& x, double s, ScalarSide side, const Tensor& out) {
  dispatch_float(enum_name(op), x.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* in = x.data<T>();
    T* o = out.data<T>();
    const T scalar = static_cast<T>(s);
    with_binary_op(op, [&](auto f) {
      if (side == ScalarSide::right)
        parallel_for(x.numel(), 4, [&](int64_t i) { o[i] = f(in[i], scalar); });
      else
        parallel_for(x.numel(), 4, [&](int64_t i) { o[i] = f(scalar, in[i]); });
    });
  });
}

// The binary kernel's broadcasting with x on both sides, keeping one of them.
void expand_forward(const Tensor& x, const Tensor& out) {
  dispatch_float("expand", x.dtype(),
                 [&](auto t) { binary_kernel<decltype(t)>(x, x, out, [](auto v, auto) { return v; }); });
}

}  // namespace moelab::cpu
