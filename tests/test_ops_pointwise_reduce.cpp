// Tests of the pointwise ops (pointwise.cpp) and reductions (reduce.cpp): values against naive index loops in f32 and
// f64, gradients against central differences in f64, and the error messages of bad use.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "tests/testing.h"

using namespace moelab;
using moelab::testing::as_doubles;
using moelab::testing::check_close;
using moelab::testing::check_mentions;
using moelab::testing::error_of;
using moelab::testing::gradcheck;
using moelab::testing::random;
using moelab::testing::ravel;
using moelab::testing::unravel;
using moelab::testing::weighted_sum;

namespace {
// NumPy broadcasting written out: the output shape, and for an output index, the flat index into an operand.
Shape naive_broadcast_shape(const Shape& a, const Shape& b) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t da = i + a.size() >= n ? a[i + a.size() - n] : 1;
    int64_t db = i + b.size() >= n ? b[i + b.size() - n] : 1;
    out[i] = std::max(da, db);
  }
  return out;
}

int64_t operand_index(const std::vector<int64_t>& out_idx, const Shape& in_shape) {
  size_t lead = out_idx.size() - in_shape.size();
  std::vector<int64_t> idx(in_shape.size());
  for (size_t d = 0; d < in_shape.size(); ++d) idx[d] = in_shape[d] == 1 ? 0 : out_idx[d + lead];
  return ravel(idx, in_shape);
}

// Reference of a broadcast binary op, computed in double, returned as a tensor of `dtype`.
Tensor naive_binary(const Tensor& a, const Tensor& b, const std::function<double(double, double)>& f) {
  Shape out_shape = naive_broadcast_shape(a.shape(), b.shape());
  std::vector<double> va = as_doubles(a), vb = as_doubles(b), out(shape_numel(out_shape));
  for (int64_t i = 0; i < static_cast<int64_t>(out.size()); ++i) {
    std::vector<int64_t> idx = unravel(i, out_shape);
    out[i] = f(va[operand_index(idx, a.shape())], vb[operand_index(idx, b.shape())]);
  }
  return from_vector(out, out_shape, a.dtype());
}

Tensor naive_unary(const Tensor& x, const std::function<double(double)>& f) {
  std::vector<double> v = as_doubles(x);
  for (double& e : v) e = f(e);
  return from_vector(v, x.shape(), x.dtype());
}

// Reduction over one dim by index loops: every input element folds into the output element with that dim dropped.
Tensor naive_reduce(const Tensor& x, int64_t dim, bool keepdim, double init,
                    const std::function<double(double, double)>& fold) {
  Shape s = x.shape(), keep = s;
  keep[dim] = 1;
  std::vector<double> v = as_doubles(x), out(shape_numel(keep), init);
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) {
    std::vector<int64_t> idx = unravel(i, s);
    idx[dim] = 0;
    int64_t o = ravel(idx, keep);
    out[o] = fold(out[o], v[i]);
  }
  if (!keepdim) keep.erase(keep.begin() + dim);
  return from_vector(out, keep, x.dtype());
}

// Per-dtype tolerance: relative, and absolute for values near zero.
struct Tol {
  double rel, atol;
};
Tol tol_for(DType dtype) { return dtype == DType::F32 ? Tol{2e-6, 1e-6} : Tol{1e-14, 1e-14}; }
// Sums: relative to 1 + |expected| (float accumulation error scales with the partial sums, not the result).
Tol sum_tol_for(DType dtype) { return dtype == DType::F32 ? Tol{1e-4, 1.0} : Tol{1e-12, 1.0}; }

// Positive values in [lo, hi) for log/sqrt/div denominators.
Tensor positive(const Shape& shape, uint64_t seed, DType dtype, double lo = 0.5, double hi = 3.0) {
  Generator gen(seed);
  return uniform(shape, gen, lo, hi, dtype);
}

const std::vector<std::pair<Shape, Shape>> kBroadcastPairs = {
    {{2, 3}, {2, 3}},       {{3, 1, 5}, {4, 5}},       {{4, 5}, {3, 1, 5}}, {{7}, {1}},
    {{1}, {7}},             {{}, {3, 2}},              {{3, 2}, {}},        {{5, 1}, {1, 6}},
    {{2, 1, 3, 1}, {4, 1, 5}}, {{1, 1}, {3, 4}},       {{3, 4}, {4}},       {{300, 129}, {129}},
    {{300, 1}, {300, 129}}, {{17, 33, 65}, {17, 33, 65}}};

}  // namespace

// ---- binary arithmetic --------------------------------------------------------------------------------------------------

TEST_CASE("ops: add/sub/mul/div broadcast like index loops (f32 and f64)") {
  struct Op {
    const char* name;
    std::function<Tensor(const Tensor&, const Tensor&)> run;
    std::function<double(double, double)> ref;
  };
  std::vector<Op> ops = {
      {"add", [](const Tensor& a, const Tensor& b) { return add(a, b); }, [](double a, double b) { return a + b; }},
      {"sub", [](const Tensor& a, const Tensor& b) { return sub(a, b); }, [](double a, double b) { return a - b; }},
      {"mul", [](const Tensor& a, const Tensor& b) { return mul(a, b); }, [](double a, double b) { return a * b; }},
      {"div", [](const Tensor& a, const Tensor& b) { return div(a, b); }, [](double a, double b) { return a / b; }},
      {"operator+", [](const Tensor& a, const Tensor& b) { return a + b; }, [](double a, double b) { return a + b; }},
      {"operator-", [](const Tensor& a, const Tensor& b) { return a - b; }, [](double a, double b) { return a - b; }},
      {"operator*", [](const Tensor& a, const Tensor& b) { return a * b; }, [](double a, double b) { return a * b; }},
      {"operator/", [](const Tensor& a, const Tensor& b) { return a / b; }, [](double a, double b) { return a / b; }},
  };
  for (DType dtype : {DType::F32, DType::F64}) {
    Tol tol = tol_for(dtype);
    uint64_t seed = 1;
    for (const auto& [sa, sb] : kBroadcastPairs) {
      Tensor a = random(sa, seed++, dtype);
      Tensor b = positive(sb, seed++, dtype);  // positive: div is well conditioned
      if (seed % 4 == 1) b = mul(b, -1.0);  // some pairs negative, for sign coverage
      for (const Op& op : ops) {
        // The operators only forward to the named ops: small shapes are enough for them.
        if (std::string(op.name).starts_with("operator") && shape_numel(naive_broadcast_shape(sa, sb)) > 1000) continue;
        CAPTURE(op.name);
        CAPTURE(dtype_name(dtype));
        CAPTURE(shape_str(sa));
        CAPTURE(shape_str(sb));
        Tensor out = op.run(a, b);
        CHECK(out.dtype() == dtype);
        CHECK(out.shape() == naive_broadcast_shape(sa, sb));
        check_close(out, naive_binary(a, b, op.ref), tol.rel, tol.atol, op.name);
      }
    }
  }
}

TEST_CASE("ops: binary ops read views at their offsets and leave inputs untouched") {
  Tensor base = random({6, 4}, 3, DType::F32);
  Tensor a = slice_rows(base, 2, 5), b = reshape(slice_rows(base, 5, 6), {4});
  std::vector<float> before = base.to_vector<float>();
  check_close(add(a, b), naive_binary(a, b, [](double x, double y) { return x + y; }), 1e-6, 1e-6, "add of views");
  check_close(mul(a, a), naive_binary(a, a, [](double x, double y) { return x * y; }), 1e-6, 1e-6, "mul of views");
  CHECK(base.to_vector<float>() == before);
}

TEST_CASE("ops: scalar forms and operators") {
  for (DType dtype : {DType::F32, DType::F64}) {
    CAPTURE(dtype_name(dtype));
    Tol tol = tol_for(dtype);
    Tensor x = random({5, 7}, 8, dtype), p = positive({5, 7}, 9, dtype);
    check_close(add(x, 2.5), naive_unary(x, [](double v) { return v + 2.5; }), tol.rel, tol.atol, "add scalar");
    check_close(x + 2.5, naive_unary(x, [](double v) { return v + 2.5; }), tol.rel, tol.atol, "x + s");
    check_close(x - 1.25, naive_unary(x, [](double v) { return v - 1.25; }), tol.rel, tol.atol, "x - s");
    check_close(mul(x, -3.0), naive_unary(x, [](double v) { return v * -3.0; }), tol.rel, tol.atol, "mul scalar");
    check_close(x * 0.5, naive_unary(x, [](double v) { return v * 0.5; }), tol.rel, tol.atol, "x * s");
    check_close(0.5 * x, naive_unary(x, [](double v) { return v * 0.5; }), tol.rel, tol.atol, "s * x");
    check_close(x / 4.0, naive_unary(x, [](double v) { return v / 4.0; }), tol.rel, tol.atol, "x / s");
    check_close(x / 3.0, naive_unary(x, [](double v) { return v / 3.0; }), 4 * tol.rel, tol.atol, "x / 3");
    check_close(sub(1.5, x), naive_unary(x, [](double v) { return 1.5 - v; }), tol.rel, tol.atol, "s - x");
    check_close(div(2.0, p), naive_unary(p, [](double v) { return 2.0 / v; }), tol.rel, tol.atol, "s / x");
    check_close(-x, naive_unary(x, [](double v) { return -v; }), 0, 1e-30, "-x");
    CHECK((x + 0.0).shape() == x.shape());
  }
}

// ---- unary math ---------------------------------------------------------------------------------------------------------

TEST_CASE("ops: unary math matches the C library on several shapes (f32 and f64)") {
  struct Op {
    const char* name;
    std::function<Tensor(const Tensor&)> run;
    std::function<double(double)> ref;
    bool positive_domain;
  };
  auto sigmoid_ref = [](double v) { return 1 / (1 + std::exp(-v)); };
  std::vector<Op> ops = {
      {"neg", [](const Tensor& x) { return neg(x); }, [](double v) { return -v; }, false},
      {"exp", [](const Tensor& x) { return exp(x); }, [](double v) { return std::exp(v); }, false},
      {"log", [](const Tensor& x) { return log(x); }, [](double v) { return std::log(v); }, true},
      {"sqrt", [](const Tensor& x) { return sqrt(x); }, [](double v) { return std::sqrt(v); }, true},
      {"rsqrt", [](const Tensor& x) { return rsqrt(x); }, [](double v) { return 1 / std::sqrt(v); }, true},
      {"square", [](const Tensor& x) { return square(x); }, [](double v) { return v * v; }, false},
      {"tanh", [](const Tensor& x) { return tanh(x); }, [](double v) { return std::tanh(v); }, false},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); }, sigmoid_ref, false},
      {"silu", [](const Tensor& x) { return silu(x); }, [&](double v) { return v * sigmoid_ref(v); }, false},
  };
  for (DType dtype : {DType::F32, DType::F64}) {
    // log, exp, tanh in f32 may be off by an ulp or two from the double reference.
    double rel = dtype == DType::F32 ? 5e-7 * 4 : 1e-14;
    uint64_t seed = 100;
    for (Shape shape : {Shape{}, Shape{1}, Shape{13}, Shape{3, 5, 7}, Shape{257, 129}}) {
      Tensor x = random(shape, seed++, dtype, 2.0);
      Tensor p = positive(shape, seed++, dtype, 0.01, 20.0);
      for (const Op& op : ops) {
        CAPTURE(op.name);
        CAPTURE(dtype_name(dtype));
        CAPTURE(shape_str(shape));
        const Tensor& in = op.positive_domain ? p : x;
        Tensor out = op.run(in);
        CHECK(out.shape() == shape);
        CHECK(out.dtype() == dtype);
        check_close(out, naive_unary(in, op.ref), rel, 1e-30, op.name);
      }
    }
  }
}

TEST_CASE("ops: sigmoid, silu and tanh saturate without NaN at extreme inputs") {
  for (DType dtype : {DType::F32, DType::F64}) {
    CAPTURE(dtype_name(dtype));
    Tensor x = from_vector(std::vector<double>{-1000, -100, -30, 0, 30, 100, 1000}, {7}, dtype);
    std::vector<double> s = as_doubles(sigmoid(x)), si = as_doubles(silu(x)), t = as_doubles(tanh(x));
    for (size_t i = 0; i < 7; ++i) {
      REQUIRE(std::isfinite(s[i]));
      REQUIRE(std::isfinite(si[i]));
      REQUIRE(std::isfinite(t[i]));
    }
    CHECK(s[0] == 0.0);
    CHECK(s[3] == 0.5);
    CHECK(s[6] == 1.0);
    CHECK(si[0] == 0.0);
    CHECK(si[6] == 1000.0);
    CHECK(t[0] == -1.0);
    CHECK(t[6] == 1.0);
    // Gradients there are finite too (0 in the flat tails).
    Tensor xg = clone(x).set_requires_grad();
    sum(add(add(sigmoid(xg), silu(xg)), tanh(xg))).backward();
    std::vector<double> g = as_doubles(xg.grad());
    for (double e : g) REQUIRE(std::isfinite(e));
    CHECK(g[0] == 0.0);
    CHECK(g[6] == doctest::Approx(1.0));  // silu' -> 1, sigmoid' and tanh' -> 0
  }
}

// ---- expand and sum_to --------------------------------------------------------------------------------------------------

TEST_CASE("ops: expand copies along broadcast dims and sum_to sums them back") {
  for (DType dtype : {DType::F32, DType::F64}) {
    CAPTURE(dtype_name(dtype));
    for (const auto& [from, to] : std::vector<std::pair<Shape, Shape>>{{{3, 1}, {2, 3, 4}},
                                                                       {{}, {2, 2}},
                                                                       {{4}, {3, 4}},
                                                                       {{1, 5, 1}, {2, 5, 3}},
                                                                       {{2, 3}, {2, 3}},
                                                                       {{1}, {40000}}}) {
      CAPTURE(shape_str(from));
      CAPTURE(shape_str(to));
      Tensor x = random(from, 17, dtype);
      Tensor e = expand(x, to);
      CHECK(e.shape() == to);
      // expand = broadcast against zeros.
      check_close(e, naive_binary(x, zeros(to, dtype), [](double v, double) { return v; }), 0, 1e-30, "expand");
      // sum_to of a random [to] back to [from], by index loops.
      Tensor g = random(to, 18, dtype);
      Tensor s = sum_to(g, from);
      REQUIRE(s.shape() == from);
      std::vector<double> gv = as_doubles(g), ref(shape_numel(from), 0.0);
      for (int64_t i = 0; i < g.numel(); ++i) ref[operand_index(unravel(i, to), from)] += gv[i];
      Tol tol = sum_tol_for(dtype);
      check_close(s, from_vector(ref, from, dtype), tol.rel, tol.atol, "sum_to");
    }
  }
  check_mentions(error_of([] { expand(zeros({3}), {4}); }), {"expand", "[3]", "[4]"});
  check_mentions(error_of([] { expand(zeros({2, 3}), {3}); }), {"expand", "[2, 3]", "[3]"});
  check_mentions(error_of([] { expand(zeros({2, 3}), {2, 1}); }), {"expand", "[2, 3]", "[2, 1]"});
}

TEST_CASE("ops: sum_to refuses a shape the gradient was not broadcast from") {
  // [3, 4] cannot have come from broadcasting [5] or [2, 3, 4]: returning anything but an error hides a bug upstream.
  check_mentions(error_of([] { sum_to(zeros({3, 4}), {5}); }), {"sum_to", "[3, 4]", "[5]"});
  check_mentions(error_of([] { sum_to(zeros({3, 4}), {2, 3, 4}); }), {"sum_to", "[3, 4]", "[2, 3, 4]"});
}

// ---- reductions ---------------------------------------------------------------------------------------------------------

TEST_CASE("ops: sum, mean and max over everything and over each dim, with and without keepdim") {
  for (DType dtype : {DType::F32, DType::F64}) {
    Tol tol = sum_tol_for(dtype);
    uint64_t seed = 200;
    for (Shape shape : {Shape{7}, Shape{3, 5}, Shape{2, 3, 4}, Shape{2, 1, 3, 5}, Shape{33, 1025}, Shape{3, 12000}}) {
      CAPTURE(dtype_name(dtype));
      CAPTURE(shape_str(shape));
      Tensor x = random(shape, seed++, dtype);
      std::vector<double> v = as_doubles(x);
      double total = std::accumulate(v.begin(), v.end(), 0.0);
      double top = *std::max_element(v.begin(), v.end());
      Tensor s = sum(x), m = mean(x), mx = max(x);
      CHECK(s.shape() == Shape{});
      CHECK(m.shape() == Shape{});
      CHECK(mx.shape() == Shape{});
      CHECK(s.dtype() == dtype);
      check_close(s, from_vector(std::vector<double>{total}, {}, dtype), tol.rel, tol.atol, "sum");
      check_close(m, from_vector(std::vector<double>{total / v.size()}, {}, dtype), tol.rel, tol.atol, "mean");
      CHECK(mx.item() == top);
      for (int64_t dim = 0; dim < static_cast<int64_t>(shape.size()); ++dim) {
        for (bool keepdim : {false, true}) {
          CAPTURE(dim);
          CAPTURE(keepdim);
          int64_t neg_dim = dim - static_cast<int64_t>(shape.size());
          Tensor ref_sum = naive_reduce(x, dim, keepdim, 0.0, [](double acc, double e) { return acc + e; });
          Tensor ref_max = naive_reduce(x, dim, keepdim, -std::numeric_limits<double>::infinity(),
                                        [](double acc, double e) { return std::max(acc, e); });
          Tensor ref_mean = naive_unary(ref_sum, [n = shape[dim]](double e) { return e / n; });
          check_close(sum(x, dim, keepdim), ref_sum, tol.rel, tol.atol, "sum dim");
          check_close(sum(x, neg_dim, keepdim), ref_sum, tol.rel, tol.atol, "sum negative dim");
          check_close(mean(x, dim, keepdim), ref_mean, tol.rel, tol.atol, "mean dim");
          check_close(mean(x, neg_dim, keepdim), ref_mean, tol.rel, tol.atol, "mean negative dim");
          check_close(max(x, dim, keepdim), ref_max, 0, 1e-30, "max dim");
          check_close(max(x, neg_dim, keepdim), ref_max, 0, 1e-30, "max negative dim");
        }
      }
    }
  }
  // A 0-d tensor reduces to itself.
  CHECK(sum(full({}, 3.0)).item() == 3.0);
  CHECK(max(full({}, -3.0)).item() == -3.0);
  // Sum of an empty tensor is 0.
  CHECK(sum(zeros({0, 3})).item() == 0.0);
  CHECK(sum(zeros({0, 3}), 0).to_vector<float>() == std::vector<float>{0, 0, 0});
}

TEST_CASE("ops: max sends its gradient to the first maximum") {
  Tensor x = from_vector(std::vector<double>{1, 3, 3, 2, /**/ 5, 5, 5, 5, /**/ -1, -2, -1, -3}, {3, 4});
  x.set_requires_grad();
  sum(max(x, 1)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0});
  x.zero_grad();
  max(x).backward();  // 5 first appears at flat index 4
  CHECK(x.grad().to_vector<double>() == std::vector<double>{0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0});
  x.zero_grad();
  sum(max(x, 0, true)).backward();  // column maxima: 5 (row 1) in every column
  CHECK(x.grad().to_vector<double>() == std::vector<double>{0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0});
}

TEST_CASE("ops: softmax and log_softmax over the last dim") {
  for (DType dtype : {DType::F32, DType::F64}) {
    double rel = dtype == DType::F32 ? 1e-5 : 1e-13;
    uint64_t seed = 300;
    for (Shape shape : {Shape{5}, Shape{1}, Shape{3, 7}, Shape{2, 3, 129}, Shape{4, 1}, Shape{64, 1000}}) {
      CAPTURE(dtype_name(dtype));
      CAPTURE(shape_str(shape));
      Tensor x = random(shape, seed++, dtype, 3.0);
      std::vector<double> v = as_doubles(x), ref_sm(v.size()), ref_lsm(v.size());
      int64_t n = shape.back();
      for (size_t r = 0; r < v.size() / n; ++r) {
        double m = *std::max_element(v.begin() + r * n, v.begin() + (r + 1) * n), z = 0;
        for (int64_t j = 0; j < n; ++j) z += std::exp(v[r * n + j] - m);
        for (int64_t j = 0; j < n; ++j) {
          ref_sm[r * n + j] = std::exp(v[r * n + j] - m) / z;
          ref_lsm[r * n + j] = v[r * n + j] - m - std::log(z);
        }
      }
      Tensor sm = softmax(x), lsm = log_softmax(x);
      CHECK(sm.shape() == shape);
      CHECK(lsm.shape() == shape);
      check_close(sm, from_vector(ref_sm, shape, dtype), rel, 1e-30, "softmax");
      check_close(lsm, from_vector(ref_lsm, shape, dtype), rel, 1.0, "log_softmax");
      // Rows of softmax sum to one.
      check_close(sum(sm, -1), ones(Shape(shape.begin(), shape.end() - 1), dtype), 10 * rel, 0, "softmax rows");
    }
  }
  // Stable at large logits; -inf entries get probability 0 (the masking idiom).
  Tensor big = from_vector(std::vector<float>{1000.f, 1001.f, -1000.f}, {3});
  std::vector<float> p = softmax(big).to_vector<float>();
  CHECK(p[0] == doctest::Approx(1 / (1 + std::exp(1.0))).epsilon(1e-6));
  CHECK(p[1] == doctest::Approx(1 / (1 + std::exp(-1.0))).epsilon(1e-6));
  CHECK(p[2] == 0.f);
  // In f32 an ulp of 1001 is 6e-5: that is the absolute accuracy log_softmax can have there.
  CHECK(log_softmax(big).to_vector<float>()[1] == doctest::Approx(-std::log1p(std::exp(-1.0))).epsilon(5e-4));
  float inf = std::numeric_limits<float>::infinity();
  CHECK(softmax(from_vector(std::vector<float>{0.f, -inf, 0.f}, {3})).to_vector<float>() ==
        std::vector<float>{0.5f, 0.f, 0.5f});
}

TEST_CASE("ops: cumsum over the last dim (f32, f64, i32)") {
  for (DType dtype : {DType::F32, DType::F64, DType::I32}) {
    for (Shape shape : {Shape{5}, Shape{3, 7}, Shape{2, 3, 4}, Shape{4, 1}, Shape{300, 257}}) {
      CAPTURE(dtype_name(dtype));
      CAPTURE(shape_str(shape));
      // Small integers: exact in every dtype, so the comparison is exact.
      Tensor x = to_dtype(from_vector(as_doubles(mul(random(shape, 7, DType::F64), 10.0)), shape), DType::I32);
      x = to_dtype(x, dtype);
      std::vector<double> v = as_doubles(x), ref(v.size());
      int64_t n = shape.back();
      for (size_t r = 0; r < v.size() / n; ++r) {
        double acc = 0;
        for (int64_t j = 0; j < n; ++j) ref[r * n + j] = acc += v[r * n + j];
      }
      Tensor c = cumsum(x);
      CHECK(c.dtype() == dtype);
      CHECK(c.shape() == shape);
      CHECK(as_doubles(c) == ref);
    }
  }
  CHECK(cumsum(from_vector(std::vector<int32_t>{1, 0, 1, 1, 0}, {5})).to_vector<int32_t>() ==
        std::vector<int32_t>{1, 1, 2, 3, 3});
  Tensor r = random({3, 4}, 1, DType::F64).set_requires_grad();
  CHECK_FALSE(cumsum(r).requires_grad());  // no grad
  check_mentions(error_of([] { cumsum(zeros({})); }), {"cumsum"});
}

// ---- gradients (f64, central differences) -------------------------------------------------------------------------------

TEST_CASE("ops: gradients of broadcasting binary ops") {
  using Fn = std::function<Tensor(const Tensor&, const Tensor&)>;
  std::vector<std::pair<const char*, Fn>> ops = {
      {"add", [](const Tensor& a, const Tensor& b) { return add(a, b); }},
      {"sub", [](const Tensor& a, const Tensor& b) { return sub(a, b); }},
      {"mul", [](const Tensor& a, const Tensor& b) { return mul(a, b); }},
      {"div", [](const Tensor& a, const Tensor& b) { return div(a, b); }},
  };
  std::vector<std::pair<Shape, Shape>> pairs = {{{2, 3}, {2, 3}}, {{3, 1, 5}, {4, 5}}, {{4, 5}, {3, 1, 5}},
                                                {{}, {2, 3}},     {{2, 3}, {}},        {{5, 1}, {1, 6}},
                                                {{1}, {4}},       {{2, 1, 3}, {1, 4, 1}}};
  uint64_t seed = 400;
  for (const auto& [name, op] : ops)
    for (const auto& [sa, sb] : pairs) {
      Tensor a = random(sa, seed++).set_requires_grad();
      Tensor b = positive(sb, seed++, DType::F64).set_requires_grad();
      std::string what = fmt::format("{} {} {}", name, shape_str(sa), shape_str(sb));
      gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(op(in[0], in[1])); }, {a, b}, 1e-6, 1e-6,
                what);
      CHECK(a.grad().shape() == sa);
      CHECK(b.grad().shape() == sb);
    }
  // Only one side requires a gradient.
  Tensor a = random({3, 4}, 1).set_requires_grad(), c = random({4}, 2);
  gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(mul(in[0], c)); }, {a}, 1e-6, 1e-6, "mul const");
  CHECK_FALSE(c.grad().defined());
}

TEST_CASE("ops: gradients of scalar forms and unary math") {
  using Fn = std::function<Tensor(const Tensor&)>;
  std::vector<std::tuple<const char*, Fn, bool>> ops = {
      {"add scalar", [](const Tensor& x) { return add(x, 1.5); }, false},
      {"mul scalar", [](const Tensor& x) { return mul(x, -2.5); }, false},
      {"rsub scalar", [](const Tensor& x) { return sub(3.0, x); }, false},
      {"rdiv scalar", [](const Tensor& x) { return div(2.0, x); }, true},
      {"x / s", [](const Tensor& x) { return x / 4.0; }, false},
      {"neg", [](const Tensor& x) { return neg(x); }, false},
      {"exp", [](const Tensor& x) { return exp(x); }, false},
      {"log", [](const Tensor& x) { return log(x); }, true},
      {"sqrt", [](const Tensor& x) { return sqrt(x); }, true},
      {"rsqrt", [](const Tensor& x) { return rsqrt(x); }, true},
      {"square", [](const Tensor& x) { return square(x); }, false},
      {"tanh", [](const Tensor& x) { return tanh(x); }, false},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); }, false},
      {"silu", [](const Tensor& x) { return silu(x); }, false},
  };
  uint64_t seed = 500;
  for (const auto& [name, op, positive_domain] : ops)
    for (Shape shape : {Shape{}, Shape{7}, Shape{2, 3, 2}}) {
      Tensor x = (positive_domain ? positive(shape, seed++, DType::F64) : random(shape, seed++, DType::F64, 1.5));
      x.set_requires_grad();
      gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(op(in[0])); }, {x}, 1e-6, 1e-6,
                fmt::format("{} {}", name, shape_str(shape)));
    }
}

TEST_CASE("ops: gradients of expand, sum_to and the reductions") {
  uint64_t seed = 600;
  auto check = [&](const char* what, const Shape& shape, const std::function<Tensor(const Tensor&)>& f) {
    Tensor x = random(shape, seed++).set_requires_grad();
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(f(in[0])); }, {x}, 1e-6, 1e-6,
              fmt::format("{} {}", what, shape_str(shape)));
    CHECK(x.grad().shape() == shape);
  };
  check("expand", {3, 1}, [](const Tensor& x) { return expand(x, {2, 3, 4}); });
  check("expand 0-d", {}, [](const Tensor& x) { return expand(x, {2, 2}); });
  check("sum_to", {2, 3, 4}, [](const Tensor& x) { return sum_to(x, {3, 1}); });
  check("sum", {2, 3, 4}, [](const Tensor& x) { return sum(x); });
  check("mean", {2, 3, 4}, [](const Tensor& x) { return mean(x); });
  check("max", {2, 3, 4}, [](const Tensor& x) { return max(x); });
  check("softmax", {3, 5}, [](const Tensor& x) { return softmax(x); });
  check("softmax 3-d", {2, 2, 4}, [](const Tensor& x) { return softmax(x); });
  check("log_softmax", {3, 5}, [](const Tensor& x) { return log_softmax(x); });
  check("log_softmax 3-d", {2, 2, 4}, [](const Tensor& x) { return log_softmax(x); });
  for (int64_t dim : {0, 1, 2, -1})
    for (bool keepdim : {false, true}) {
      check("sum dim", {2, 3, 4}, [=](const Tensor& x) { return sum(x, dim, keepdim); });
      check("mean dim", {2, 3, 4}, [=](const Tensor& x) { return mean(x, dim, keepdim); });
      check("max dim", {2, 3, 4}, [=](const Tensor& x) { return max(x, dim, keepdim); });
    }
}

TEST_CASE("ops: gradients where one tensor is used more than once") {
  Tensor x = random({3, 4}, 700).set_requires_grad();
  Tensor row = random({4}, 701).set_requires_grad();
  gradcheck([](const std::vector<Tensor>& in) { return weighted_sum(mul(in[0], in[0])); }, {x}, 1e-6, 1e-6, "x*x");
  gradcheck([](const std::vector<Tensor>& in) { return weighted_sum(add(in[0], in[0])); }, {x}, 1e-6, 1e-6, "x+x");
  gradcheck([](const std::vector<Tensor>& in) { return weighted_sum(div(exp(in[0]), add(square(in[0]), 1.0))); }, {x},
            1e-6, 1e-6, "exp(x)/(x^2+1)");
  gradcheck(
      [](const std::vector<Tensor>& in) {
        Tensor y = tanh(add(in[0], in[1]));  // [3, 4] + [4]
        return weighted_sum(add(mul(y, in[1]), softmax(mul(y, y))));
      },
      {x, row}, 1e-6, 1e-6, "broadcast row used three times");
  gradcheck(
      [](const std::vector<Tensor>& in) { return weighted_sum(sub(in[0], mean(in[0], 1, true))); }, {x}, 1e-6, 1e-6,
      "x - mean(x)");
  // x - x has zero gradient exactly.
  x.zero_grad();
  sum(sub(x, x)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>(12, 0.0));
}

// ---- bad use ------------------------------------------------------------------------------------------------------------

TEST_CASE("ops: bad use throws invalid_argument naming the op and the shapes") {
  Tensor a = zeros({3, 4}), b = zeros({5}), d = zeros({3, 4}, DType::F64), i = zeros({3, 4}, DType::I32);
  for (auto [name, f] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"add", [&] { add(a, b); }}, {"sub", [&] { sub(a, b); }}, {"mul", [&] { mul(a, b); }},
           {"div", [&] { div(b, a); }}}) {
    CAPTURE(name);
    CHECK_THROWS_AS(f(), std::invalid_argument);
    check_mentions(error_of(f), {name, "[3, 4]", "[5]"});
  }
  check_mentions(error_of([&] { add(zeros({3, 1, 5}), zeros({4, 4})); }), {"add", "[3, 1, 5]", "[4, 4]"});
  check_mentions(error_of([&] { add(a, d); }), {"add", "f32[3, 4]", "f64[3, 4]"});
  check_mentions(error_of([&] { mul(i, i); }), {"mul", "i32[3, 4]"});
  check_mentions(error_of([&] { exp(i); }), {"exp", "i32[3, 4]"});
  check_mentions(error_of([&] { add(i, 1.0); }), {"add", "i32[3, 4]"});
  check_mentions(error_of([&] { add(Tensor(), a); }), {"add", "undefined"});
  check_mentions(error_of([&] { sum(i); }), {"sum", "i32[3, 4]"});
  check_mentions(error_of([&] { sum(a, 2); }), {"sum", "dim 2", "2-d"});
  check_mentions(error_of([&] { sum(a, -3); }), {"sum", "dim -3"});
  check_mentions(error_of([&] { max(a, 5); }), {"max", "dim 5"});
  check_mentions(error_of([&] { max(zeros({0})); }), {"max", "f32[0]"});
  check_mentions(error_of([&] { max(zeros({2, 0}), 1); }), {"max", "f32[2, 0]"});
  check_mentions(error_of([&] { mean(zeros({0})); }), {"mean", "f32[0]"});
  check_mentions(error_of([&] { softmax(zeros({})); }), {"softmax", "f32[]"});
  check_mentions(error_of([&] { log_softmax(i); }), {"log_softmax", "i32[3, 4]"});
}

TEST_CASE("ops: mean over an out-of-range dim names the op like the other reductions") {
  Tensor a = zeros({3, 4});
  CHECK_THROWS_AS(mean(a, 2), std::invalid_argument);
  check_mentions(error_of([&] { mean(a, 2); }), {"mean", "dim 2"});
}
