// Elementwise ops: broadcasting arithmetic, scalar forms and unary math. Each op checks its inputs, allocates its
// output, runs its kernel (engine/kernels/pointwise.h: engine/cpu/pointwise.cpp, engine/cuda/pointwise.cu) and records
// a named backward, which sits right above it.
#include "engine/kernels/pointwise.h"
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

// out = a op b, broadcast; not recorded (the callers record their own backward).
static Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  const char* name = enum_name(op);
  check_same_dtype_device(name, a, b);
  check_float(name, a);
  Tensor out = Tensor::empty(broadcast_shape(name, a.shape(), b.shape()), a.dtype(), a.device());
  KERNEL(binary_forward, a.device())(op, a, b, out);
  return out;
}

// out = x op s or s op x; not recorded.
static Tensor scalar(const char* name, BinaryOp op, const Tensor& x, double s, ScalarSide side) {
  check_float(name, x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  KERNEL(scalar_forward, x.device())(op, x, s, side, out);
  return out;
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
  if (broadcast_shape("expand", x.shape(), shape) != shape)
    fail("expand: cannot broadcast {} to {}", x.str(), shape_str(shape));
  if (x.shape() == shape) return x;
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  KERNEL(expand_forward, x.device())(x, out);
  return record("expand", out, {x},
                [in_shape = x.shape()](const Tensor& g) -> std::vector<Tensor> { return {sum_to(g, in_shape)}; });
}

// ---- binary arithmetic -------------------------------------------------------------------------------------------------
// Each backward sums the gradient back to its operand's shape (sum_to undoes the broadcasting).

static std::vector<Tensor> add_backward(const Tensor& g, const Shape& a_shape, const Shape& b_shape) {
  return {sum_to(g, a_shape), sum_to(g, b_shape)};
}

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary(BinaryOp::add, a, b);
  return record("add", out, {a, b},
                [sa = a.shape(), sb = b.shape()](const Tensor& g) { return add_backward(g, sa, sb); });
}

static std::vector<Tensor> sub_backward(const Tensor& g, const Shape& a_shape, const Shape& b_shape) {
  return {sum_to(g, a_shape), sum_to(neg(g), b_shape)};
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary(BinaryOp::sub, a, b);
  return record("sub", out, {a, b},
                [sa = a.shape(), sb = b.shape()](const Tensor& g) { return sub_backward(g, sa, sb); });
}

static std::vector<Tensor> mul_backward(const Tensor& g, const Tensor& a, const Tensor& b) {
  return {sum_to(mul(g, b), a.shape()), sum_to(mul(g, a), b.shape())};
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary(BinaryOp::mul, a, b);
  return record("mul", out, {a, b},
                [a = a.detach(), b = b.detach()](const Tensor& g) { return mul_backward(g, a, b); });
}

// d(a/b)/da = 1/b;  d(a/b)/db = -a/b^2 = -y/b
static std::vector<Tensor> div_backward(const Tensor& g, const Tensor& a, const Tensor& b, const Tensor& y) {
  Tensor gb = div(g, b);
  return {sum_to(gb, a.shape()), sum_to(neg(mul(gb, y)), b.shape())};
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary(BinaryOp::div, a, b);
  return record("div", out, {a, b}, [a = a.detach(), b = b.detach(), y = out.detach()](const Tensor& g) {
    return div_backward(g, a, b, y);
  });
}

// ---- scalar forms ------------------------------------------------------------------------------------------------------

Tensor add(const Tensor& a, double s) {
  Tensor out = scalar("add", BinaryOp::add, a, s, ScalarSide::right);
  return record("add_scalar", out, {a}, [](const Tensor& g) -> std::vector<Tensor> { return {g}; });
}

Tensor mul(const Tensor& a, double s) {
  Tensor out = scalar("mul", BinaryOp::mul, a, s, ScalarSide::right);
  return record("mul_scalar", out, {a}, [s](const Tensor& g) -> std::vector<Tensor> { return {mul(g, s)}; });
}

Tensor sub(double s, const Tensor& a) {
  Tensor out = scalar("rsub", BinaryOp::sub, a, s, ScalarSide::left);
  return record("rsub_scalar", out, {a}, [](const Tensor& g) -> std::vector<Tensor> { return {neg(g)}; });
}

// d(s/a)/da = -s/a^2 = -y/a. (-y)/a is exactly -(y/a): IEEE rounding is symmetric.
static Tensor rdiv_backward(const Tensor& g, const Tensor& a, const Tensor& y) {
  return binary(BinaryOp::mul, g, binary(BinaryOp::div, neg(y), a));
}

Tensor div(double s, const Tensor& a) {
  Tensor out = scalar("rdiv", BinaryOp::div, a, s, ScalarSide::left);
  return record("rdiv_scalar", out, {a}, [a = a.detach(), y = out.detach()](const Tensor& g) -> std::vector<Tensor> {
    return {rdiv_backward(g, a, y)};
  });
}

// ---- unary math --------------------------------------------------------------------------------------------------------
// One forward pass, and a backward that is one fused elementwise pass over (g, x or y): the math of each is in
// engine/kernels/pointwise_math.h.

static Tensor unary_backward(UnaryOp op, const Tensor& g, const Tensor& saved) {
  Tensor dx = Tensor::empty(g.shape(), g.dtype(), g.device());
  KERNEL(unary_backward, g.device())(op, g, saved, dx);
  return dx;
}

static Tensor unary(UnaryOp op, const Tensor& x) {
  const char* name = enum_name(op);
  check_float(name, x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  KERNEL(unary_forward, x.device())(op, x, y);
  const BackwardReads reads = backward_reads(op);
  // Kept for the backward: x or y, or nothing at all.
  Tensor saved = reads == BackwardReads::input ? x.detach() : reads == BackwardReads::output ? y.detach() : Tensor();
  return record(name, y, {x}, [op, saved](const Tensor& g) -> std::vector<Tensor> {
    return {unary_backward(op, g, saved.defined() ? saved : g)};
  });
}

Tensor neg(const Tensor& x) { return unary(UnaryOp::neg, x); }
Tensor exp(const Tensor& x) { return unary(UnaryOp::exp, x); }
Tensor log(const Tensor& x) { return unary(UnaryOp::log, x); }
Tensor sqrt(const Tensor& x) { return unary(UnaryOp::sqrt, x); }
Tensor rsqrt(const Tensor& x) { return unary(UnaryOp::rsqrt, x); }
Tensor square(const Tensor& x) { return unary(UnaryOp::square, x); }
Tensor tanh(const Tensor& x) { return unary(UnaryOp::tanh, x); }
Tensor sigmoid(const Tensor& x) { return unary(UnaryOp::sigmoid, x); }
Tensor silu(const Tensor& x) { return unary(UnaryOp::silu, x); }

}  // namespace moelab
