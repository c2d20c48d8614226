// PyTorch as an independent oracle: every op runs on seeded f32 inputs here and in Debian's python3-torch
// (tests/torch/op_oracle.py, one process for all cases), and outputs and input gradients must agree to a relative
// error of 1e-5. The scalar loss of a case is sum_k sum(outputs[k] * weights[k]) with seeded weights, so each
// gradient is the op's vector-Jacobian product against a random upstream gradient. See tests/torch/README.md.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "engine/ops.h"
#include "tests/python_runner.h"
#include "tests/testing.h"

namespace {
using namespace moelab;
using json = nlohmann::json;

// f32 relative error: a few ulp (f32 eps is 1.2e-7) accumulated over reductions of up to ~1000 terms in a different
// order from PyTorch's.
constexpr double kRelTol = 1e-5;

// ---- tolerance floors ---------------------------------------------------------------------------------------------
// An element passes when |moelab - torch| <= kRelTol * (|torch| + floor * max|torch over the tensor|).
// A floor is needed because a value near zero that comes out of cancellation carries the absolute rounding error of
// the terms that made it, a few f32 ulps of the tensor's large values, not of itself: tanh's gradient g (1 - y^2)
// where y is near 1, a softmax gradient y (g - <g, y>), a matmul entry whose products nearly cancel, the query
// gradient of the first position of causal attention (exactly 0 in PyTorch, about 2e-7 here, in a tensor whose
// largest entry is about 2). Measured relative to its own tiny size, such an element compares rounding noise (with
// no floor the worst "errors" of this suite are 8e-5 for tanh's gradient, 5e-4 for a 131-term matmul and 2e31 for
// that zero). Floors, as small as the worst cases of this suite allow with a margin of about 5x
// (MOELAB_ORACLE_REPORT=1 prints every case's worst error):
//   kElementwise = 1e-2 for pointwise, indexing and shape ops, where an element is one formula of one input element
//     or a sum of a few: it admits 1e-7 * max|b| absolute, 1 to 2 f32 ulps of the largest value (worst seen:
//     1.3e-6, tanh's gradient).
//   kReduction = 1e-1 for sums, softmax, matmul and the fused ops, whose rows of up to 1001 terms are added in
//     another order than PyTorch's (moelab accumulates some in f64, PyTorch in f32 blocks): it admits 1e-6 * max|b|
//     absolute, 8 to 16 ulps of the largest value, the size of sqrt(n) * eps * |terms| for such rows (worst seen:
//     2.2e-6, causal attention's gradients; with a floor of 1e-2 those and softmax's gradient fail).
constexpr double kElementwise = 1e-2;
constexpr double kReduction = 1e-1;

using OpFn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;

struct OracleCase {
  std::string name;  // unique, shown in failures
  std::string op;    // the op the oracle computes (op_oracle.py's OPS)
  json attrs;        // the op's arguments besides tensors
  std::vector<Tensor> inputs;  // f32 (requires_grad -> its gradient is compared) or i32
  OpFn run;                    // the same computation with moelab's ops
  double floor = kElementwise;
  // Filled by run_moelab():
  std::string error;
  std::vector<Tensor> outputs, weights, grads;  // weights/grads undefined where none applies
};

// ---- seeded inputs (moelab's Philox generator, so the values are the same on every machine) --------------------

struct Inputs {
  Generator gen{20240611};
  Tensor normal(const Shape& shape, double scale = 1.0) { return randn(shape, gen, 0.0, scale, DType::F32); }
  Tensor range(const Shape& shape, double low, double high) { return uniform(shape, gen, low, high, DType::F32); }
  // Values in [0.5, 2): safe denominators and arguments of log/sqrt.
  Tensor positive(const Shape& shape) { return range(shape, 0.5, 2.0); }
  // Uniform integers in [low, high).
  Tensor ints(const Shape& shape, int32_t low, int32_t high) {
    std::vector<float> u = uniform(shape, gen, 0.0, 1.0, DType::F32).to_vector<float>();
    std::vector<int32_t> v(u.size());
    for (size_t i = 0; i < u.size(); ++i)
      v[i] = std::min(high - 1, low + static_cast<int32_t>(std::floor(u[i] * static_cast<float>(high - low))));
    return from_vector(v, shape);
  }
  // Each last-dim row a shuffled, well-separated set of values (no ties, so sort orders are unambiguous).
  Tensor distinct(const Shape& shape) {
    int64_t n = shape.back(), rows = shape_numel(shape) / n;
    std::vector<float> keys = uniform(shape, gen, 0.0, 1.0, DType::F32).to_vector<float>(), out(keys.size());
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<int64_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[r * n + a] < keys[r * n + b]; });
      for (int64_t j = 0; j < n; ++j) out[r * n + order[j]] = 0.25f * static_cast<float>(j) - 1.5f;
    }
    return from_vector(out, shape);
  }
};

Tensor param(Tensor t) {
  t.set_requires_grad();
  return t;
}

// ---- the cases ----------------------------------------------------------------------------------------------------

std::vector<OracleCase> build_cases() {
  Inputs in;
  std::vector<OracleCase> cases;
  auto add_case = [&](std::string name, std::string op, json attrs, std::vector<Tensor> inputs, OpFn run,
                      double floor = kElementwise) {
    OracleCase c;
    c.name = std::move(name), c.op = std::move(op), c.attrs = std::move(attrs);
    c.inputs = std::move(inputs), c.run = std::move(run), c.floor = floor;
    cases.push_back(std::move(c));
  };
  auto unary = [](Tensor (*f)(const Tensor&)) {
    return [f](const std::vector<Tensor>& x) { return std::vector<Tensor>{f(x[0])}; };
  };
  auto binary = [](Tensor (*f)(const Tensor&, const Tensor&)) {
    return [f](const std::vector<Tensor>& x) { return std::vector<Tensor>{f(x[0], x[1])}; };
  };
  const json none = json::object();

  // ---- pointwise: broadcasting arithmetic (same shapes, one side stretched, both sides stretched, scalars) ----
  Tensor (*add_t)(const Tensor&, const Tensor&) = add;
  Tensor (*sub_t)(const Tensor&, const Tensor&) = sub;
  Tensor (*mul_t)(const Tensor&, const Tensor&) = mul;
  Tensor (*div_t)(const Tensor&, const Tensor&) = div;
  add_case("add same shape", "add", none, {param(in.normal({3, 5})), param(in.normal({3, 5}))}, binary(add_t));
  add_case("add [4,7,5]+[7,1]", "add", none, {param(in.normal({4, 7, 5})), param(in.normal({7, 1}))}, binary(add_t));
  add_case("add [3,1,5]+[4,1]", "add", none, {param(in.normal({3, 1, 5})), param(in.normal({4, 1}))}, binary(add_t));
  add_case("add [5]+[2,3,5]", "add", none, {param(in.normal({5})), param(in.normal({2, 3, 5}))}, binary(add_t));
  add_case("add [3,5]+[] (0-d)", "add", none, {param(in.normal({3, 5})), param(in.normal({}))}, binary(add_t));
  add_case("sub [4,7,5]-[7,1]", "sub", none, {param(in.normal({4, 7, 5})), param(in.normal({7, 1}))}, binary(sub_t));
  add_case("sub [1,5]-[3,1]", "sub", none, {param(in.normal({1, 5})), param(in.normal({3, 1}))}, binary(sub_t));
  add_case("mul same shape", "mul", none, {param(in.normal({6, 7})), param(in.normal({6, 7}))}, binary(mul_t));
  add_case("mul [3,1,5]*[4,1]", "mul", none, {param(in.normal({3, 1, 5})), param(in.normal({4, 1}))}, binary(mul_t));
  add_case("mul [2,3,5]*[1]", "mul", none, {param(in.normal({2, 3, 5})), param(in.normal({1}))}, binary(mul_t));
  add_case("mul x*x (gradient accumulates)", "mul_self", none, {param(in.normal({4, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{mul(x[0], x[0])}; });
  add_case("div same shape", "div", none, {param(in.normal({5, 3})), param(in.positive({5, 3}))}, binary(div_t));
  add_case("div [4,7,5]/[7,1]", "div", none, {param(in.normal({4, 7, 5})), param(in.positive({7, 1}))}, binary(div_t));
  add_case("div [5]/[3,1]", "div", none, {param(in.normal({5})), param(neg(in.positive({3, 1})).detach())},
           binary(div_t));
  // Scalars exactly representable in f32, so both sides compute with the same constant.
  add_case("add scalar", "add_scalar", {{"s", 1.75}}, {param(in.normal({3, 7}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{add(x[0], 1.75)}; });
  add_case("mul scalar", "mul_scalar", {{"s", -2.5}}, {param(in.normal({3, 7}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{mul(x[0], -2.5)}; });
  add_case("rsub scalar (s - x)", "rsub_scalar", {{"s", 0.75}}, {param(in.normal({3, 7}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{sub(0.75, x[0])}; });
  add_case("rdiv scalar (s / x)", "rdiv_scalar", {{"s", 1.5}}, {param(in.positive({3, 7}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{div(1.5, x[0])}; });
  add_case("rdiv scalar (s / -x)", "rdiv_scalar", {{"s", -3.0}}, {param(neg(in.positive({2, 9})).detach())},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{div(-3.0, x[0])}; });

  // ---- pointwise: unary math (log/sqrt/rsqrt on positive inputs) ----
  add_case("neg", "neg", none, {param(in.normal({5, 9}))}, unary(neg));
  add_case("exp", "exp", none, {param(in.normal({5, 9}, 2.0))}, unary(exp));
  add_case("log", "log", none, {param(in.range({5, 9}, 0.05, 5.0))}, unary(log));
  add_case("sqrt", "sqrt", none, {param(in.range({5, 9}, 0.05, 5.0))}, unary(sqrt));
  add_case("rsqrt", "rsqrt", none, {param(in.range({5, 9}, 0.05, 5.0))}, unary(rsqrt));
  add_case("square", "square", none, {param(in.normal({5, 9}))}, unary(square));
  add_case("tanh", "tanh", none, {param(in.normal({5, 9}, 2.0))}, unary(tanh));
  add_case("sigmoid", "sigmoid", none, {param(in.normal({5, 9}, 3.0))}, unary(sigmoid));
  add_case("silu", "silu", none, {param(in.normal({7, 9}, 3.0))}, unary(silu));
  add_case("expand [3,1,5]->[2,3,4,5]", "expand", {{"shape", {2, 3, 4, 5}}}, {param(in.normal({3, 1, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{expand(x[0], {2, 3, 4, 5})}; });

  // ---- reductions ----
  auto reduce_dim = [](Tensor (*f)(const Tensor&, int64_t, bool), int64_t dim, bool keepdim) {
    return [=](const std::vector<Tensor>& x) { return std::vector<Tensor>{f(x[0], dim, keepdim)}; };
  };
  Tensor (*sum_all)(const Tensor&) = sum;
  Tensor (*mean_all)(const Tensor&) = mean;
  Tensor (*max_all)(const Tensor&) = max;
  Tensor (*sum_d)(const Tensor&, int64_t, bool) = sum;
  Tensor (*mean_d)(const Tensor&, int64_t, bool) = mean;
  Tensor (*max_d)(const Tensor&, int64_t, bool) = max;
  add_case("sum all [7,13]", "sum", none, {param(in.normal({7, 13}))}, unary(sum_all), kReduction);
  add_case("sum all [1001]", "sum", none, {param(in.normal({1001}))}, unary(sum_all), kReduction);
  struct DimCase {
    Shape shape;
    int64_t dim;
    bool keepdim;
  };
  for (const DimCase& c : std::vector<DimCase>{
           {{3, 5, 7}, 0, false}, {{3, 5, 7}, 1, true}, {{3, 5, 7}, -1, false}, {{3, 1001}, -1, true}}) {
    std::string tag = fmt::format("{} dim {}{}", shape_str(c.shape), c.dim, c.keepdim ? " keepdim" : "");
    json attrs = {{"dim", c.dim}, {"keepdim", c.keepdim}};
    add_case("sum " + tag, "sum", attrs, {param(in.normal(c.shape))}, reduce_dim(sum_d, c.dim, c.keepdim), kReduction);
    add_case("mean " + tag, "mean", attrs, {param(in.normal(c.shape))}, reduce_dim(mean_d, c.dim, c.keepdim),
             kReduction);
    add_case("max " + tag, "max", attrs, {param(in.normal(c.shape))}, reduce_dim(max_d, c.dim, c.keepdim));
  }
  add_case("mean all [5,11]", "mean", none, {param(in.normal({5, 11}))}, unary(mean_all), kReduction);
  add_case("max all [5,11]", "max", none, {param(in.normal({5, 11}))}, unary(max_all));
  add_case("softmax [4,3,11]", "softmax", none, {param(in.normal({4, 3, 11}, 3.0))}, unary(softmax), kReduction);
  add_case("softmax [2,257]", "softmax", none, {param(in.normal({2, 257}, 3.0))}, unary(softmax), kReduction);
  add_case("log_softmax [4,3,11]", "log_softmax", none, {param(in.normal({4, 3, 11}, 3.0))}, unary(log_softmax),
           kReduction);
  add_case("log_softmax [2,257]", "log_softmax", none, {param(in.normal({2, 257}, 3.0))}, unary(log_softmax),
           kReduction);
  add_case("cumsum f32 [3,17]", "cumsum", none, {in.normal({3, 17})}, unary(cumsum), kReduction);
  add_case("cumsum i32 [4,9]", "cumsum", none, {in.ints({4, 9}, -3, 6)}, unary(cumsum));

  // ---- matrix products: 2-D, batched, batched against a shared 2-D b; every transpose combination ----
  struct MatmulCase {
    Shape a, b;  // as stored, i.e. already transposed where the flag says so
    bool ta, tb;
  };
  std::vector<MatmulCase> matmuls;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      auto m = [](bool t, Shape s) {  // stored shape of op(x) = s
        if (t) std::swap(s[s.size() - 1], s[s.size() - 2]);
        return s;
      };
      matmuls.push_back({m(ta, {5, 7}), m(tb, {7, 3}), ta, tb});
      matmuls.push_back({m(ta, {3, 5, 7}), m(tb, {3, 7, 4}), ta, tb});
      matmuls.push_back({m(ta, {2, 3, 5, 9}), m(tb, {9, 6}), ta, tb});
      matmuls.push_back({m(ta, {37, 67}), m(tb, {67, 19}), ta, tb});
    }
  matmuls.push_back({{2, 65, 131}, {2, 131, 33}, false, false});  // long enough for blocked/vector gemm paths
  for (const MatmulCase& c : matmuls) {
    std::string name = fmt::format("matmul {}{} @ {}{}", shape_str(c.a), c.ta ? "^T" : "", shape_str(c.b),
                                   c.tb ? "^T" : "");
    add_case(name, "matmul", {{"trans_a", c.ta}, {"trans_b", c.tb}}, {param(in.normal(c.a)), param(in.normal(c.b))},
             [c](const std::vector<Tensor>& x) { return std::vector<Tensor>{matmul(x[0], x[1], c.ta, c.tb)}; },
             kReduction);
  }

  // ---- indexing (repeated indices, so gradients must accumulate) ----
  add_case("index_select dim 0", "index_select", {{"dim", 0}},
           {param(in.normal({6, 5})), from_vector(std::vector<int32_t>{4, 0, 5, 4, 2, 2, 1, 4}, {8})},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{index_select(x[0], 0, x[1])}; });
  add_case("index_select dim 1", "index_select", {{"dim", 1}},
           {param(in.normal({4, 7, 3})), from_vector(std::vector<int32_t>{6, 0, 3, 3, 5}, {5})},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{index_select(x[0], 1, x[1])}; });
  add_case("gather dim 1", "gather", {{"dim", 1}}, {param(in.normal({5, 7})), in.ints({5, 4}, 0, 7)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{gather(x[0], 1, x[1])}; });
  add_case("gather dim 0", "gather", {{"dim", 0}}, {param(in.normal({6, 3})), in.ints({9, 3}, 0, 6)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{gather(x[0], 0, x[1])}; });
  add_case("gather dim -1 3-d", "gather", {{"dim", -1}}, {param(in.normal({2, 3, 7})), in.ints({2, 3, 2}, 0, 7)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{gather(x[0], -1, x[1])}; });
  // torch semantics: index may be smaller than x in the dims other than `dim`.
  add_case("gather dim 1 smaller index [4,9,3] of [5,6,4]", "gather", {{"dim", 1}},
           {param(in.normal({5, 6, 4})), in.ints({4, 9, 3}, 0, 6)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{gather(x[0], 1, x[1])}; });
  add_case("scatter_add dim 1 smaller index [3,8,2] into [4,6,5]", "scatter_add", {{"dim", 1}},
           {param(in.normal({4, 6, 5})), in.ints({3, 8, 2}, 0, 6), param(in.normal({3, 8, 2}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{scatter_add(x[0], 1, x[1], x[2])}; });
  add_case("scatter_add dim 1", "scatter_add", {{"dim", 1}},
           {param(in.normal({5, 7})), in.ints({5, 4}, 0, 7), param(in.normal({5, 4}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{scatter_add(x[0], 1, x[1], x[2])}; });
  add_case("scatter_add dim 0", "scatter_add", {{"dim", 0}},
           {param(in.normal({4, 3})), in.ints({9, 3}, 0, 4), param(in.normal({9, 3}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{scatter_add(x[0], 0, x[1], x[2])}; });
  add_case("index_add dim 0", "index_add", {{"dim", 0}},
           {param(in.normal({6, 5})), in.ints({9}, 0, 6), param(in.normal({9, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{index_add(x[0], 0, x[1], x[2])}; });
  add_case("index_add dim 1", "index_add", {{"dim", 1}},
           {param(in.normal({3, 4, 5})), in.ints({7}, 0, 4), param(in.normal({3, 7, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{index_add(x[0], 1, x[1], x[2])}; });
  add_case("embedding", "embedding", none, {param(in.normal({11, 6})), in.ints({3, 5}, 0, 11)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{embedding(x[0], x[1])}; });
  add_case("where same shape", "where", none,
           {in.ints({4, 5}, 0, 2), param(in.normal({4, 5})), param(in.normal({4, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{where(x[0], x[1], x[2])}; });
  add_case("where cond [3,5] over [4,3,5]", "where", none,
           {in.ints({3, 5}, 0, 2), param(in.normal({4, 3, 5})), param(in.normal({4, 3, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{where(x[0], x[1], x[2])}; });
  add_case("where all broadcast [1,3,5] ? [4,1,5] : [3,1]", "where", none,
           {in.ints({1, 3, 5}, 0, 2), param(in.normal({4, 1, 5})), param(in.normal({3, 1}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{where(x[0], x[1], x[2])}; });
  add_case("masked_fill", "masked_fill", {{"value", -3.5}}, {param(in.normal({4, 6})), in.ints({4, 6}, 0, 2)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{masked_fill(x[0], x[1], -3.5)}; });
  add_case("masked_fill mask [3,1] over [2,3,5]", "masked_fill", {{"value", 2.25}},
           {param(in.normal({2, 3, 5})), in.ints({3, 1}, 0, 2)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{masked_fill(x[0], x[1], 2.25)}; });
  add_case("topk k=3", "topk", {{"k", 3}}, {in.distinct({5, 11})}, [](const std::vector<Tensor>& x) {
    auto [values, indices] = topk(x[0], 3);
    return std::vector<Tensor>{values, indices};
  });
  add_case("topk k=n 3-d", "topk", {{"k", 7}}, {in.distinct({2, 3, 7})}, [](const std::vector<Tensor>& x) {
    auto [values, indices] = topk(x[0], 7);
    return std::vector<Tensor>{values, indices};
  });
  add_case("argsort ascending", "argsort", {{"descending", false}}, {in.distinct({4, 13})},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{argsort(x[0], false)}; });
  add_case("argsort descending", "argsort", {{"descending", true}}, {in.distinct({2, 3, 9})},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{argsort(x[0], true)}; });
  add_case("bincount", "bincount", {{"bins", 9}}, {in.ints({37}, 0, 7)},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{bincount(x[0], 9)}; });

  // ---- fused neural-net ops ----
  {
    std::vector<int32_t> targets = in.ints({7}, 0, 13).to_vector<int32_t>();
    targets[1] = targets[5] = -100;  // ignored rows
    add_case("cross_entropy [7,13] ignore -100", "cross_entropy", {{"ignore_index", -100}},
             {param(in.normal({7, 13}, 2.0)), from_vector(targets, {7})},
             [](const std::vector<Tensor>& x) { return std::vector<Tensor>{cross_entropy(x[0], x[1])}; }, kReduction);
    std::vector<int32_t> t2 = in.ints({9}, 0, 5).to_vector<int32_t>();
    t2[0] = t2[4] = 2;
    add_case("cross_entropy [9,5] ignore 2", "cross_entropy", {{"ignore_index", 2}},
             {param(in.normal({9, 5}, 2.0)), from_vector(t2, {9})},
             [](const std::vector<Tensor>& x) { return std::vector<Tensor>{cross_entropy(x[0], x[1], 2)}; },
             kReduction);
    add_case("cross_entropy [5,1001]", "cross_entropy", {{"ignore_index", -100}},
             {param(in.normal({5, 1001}, 2.0)), in.ints({5}, 0, 1001)},
             [](const std::vector<Tensor>& x) { return std::vector<Tensor>{cross_entropy(x[0], x[1])}; }, kReduction);
  }
  add_case("rms_norm [3,5,9]", "rms_norm", {{"eps", 1e-5}}, {param(in.normal({3, 5, 9}, 2.0)), param(in.normal({9}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{rms_norm(x[0], x[1], 1e-5)}; }, kReduction);
  add_case("rms_norm [4,33] eps 0.1", "rms_norm", {{"eps", 0.1}},
           {param(in.normal({4, 33}, 0.5)), param(in.normal({33}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{rms_norm(x[0], x[1], 0.1)}; }, kReduction);
  add_case("rope [2,5,3,8]", "rope", {{"theta", 10000.0}, {"pos_offset", 0}}, {param(in.normal({2, 5, 3, 8}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{rope(x[0], 10000.0, 0)}; });
  add_case("rope [1,7,2,6] theta 100 offset 11", "rope", {{"theta", 100.0}, {"pos_offset", 11}},
           {param(in.normal({1, 7, 2, 6}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{rope(x[0], 100.0, 11)}; });
  add_case("causal_attention [2,5,3,8]", "causal_attention", none,
           {param(in.normal({2, 5, 3, 8})), param(in.normal({2, 5, 3, 8})), param(in.normal({2, 5, 3, 8}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{causal_attention(x[0], x[1], x[2])}; },
           kReduction);
  add_case("causal_attention [1,13,2,6]", "causal_attention", none,
           {param(in.normal({1, 13, 2, 6}, 2.0)), param(in.normal({1, 13, 2, 6}, 2.0)), param(in.normal({1, 13, 2, 6}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{causal_attention(x[0], x[1], x[2])}; },
           kReduction);

  // ---- shapes ----
  add_case("reshape [3,4,5]->[5,-1]", "reshape", {{"shape", {5, -1}}}, {param(in.normal({3, 4, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{reshape(x[0], {5, -1})}; });
  add_case("slice_rows [7,3] 2:5", "slice_rows", {{"start", 2}, {"end", 5}}, {param(in.normal({7, 3}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{slice_rows(x[0], 2, 5)}; });
  add_case("transpose [3,4,5] 0<->2", "transpose", {{"dim0", 0}, {"dim1", 2}}, {param(in.normal({3, 4, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{transpose(x[0], 0, 2)}; });
  add_case("transpose [3,4,5] -1<->-2", "transpose", {{"dim0", -1}, {"dim1", -2}}, {param(in.normal({3, 4, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{transpose(x[0], -1, -2)}; });
  add_case("permute [2,3,4,5] (3,1,0,2)", "permute", {{"dims", {3, 1, 0, 2}}}, {param(in.normal({2, 3, 4, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{permute(x[0], {3, 1, 0, 2})}; });
  add_case("concat dim 1", "concat", {{"dim", 1}},
           {param(in.normal({2, 3, 4})), param(in.normal({2, 1, 4})), param(in.normal({2, 5, 4}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{concat(x, 1)}; });
  add_case("concat dim -1", "concat", {{"dim", -1}}, {param(in.normal({3, 2})), param(in.normal({3, 5}))},
           [](const std::vector<Tensor>& x) { return std::vector<Tensor>{concat(x, -1)}; });
  add_case("split dim 0", "split", {{"sizes", {2, 4, 1}}, {"dim", 0}}, {param(in.normal({7, 5}))},
           [](const std::vector<Tensor>& x) { return split(x[0], {2, 4, 1}, 0); });
  add_case("split dim -1", "split", {{"sizes", {3, 2}}, {"dim", -1}}, {param(in.normal({2, 3, 5}))},
           [](const std::vector<Tensor>& x) { return split(x[0], {3, 2}, -1); });
  return cases;
}

// ---- running both sides ---------------------------------------------------------------------------------------

json to_json(const Tensor& t) {
  json data = json::array();
  if (t.dtype() == DType::I32) {
    for (int32_t v : t.to_vector<int32_t>()) data.push_back(v);
  } else {
    for (double v : testing::as_doubles(t)) data.push_back(v);  // f32 -> f64 is exact; json keeps 17 digits
  }
  return {{"dtype", dtype_name(t.dtype())}, {"shape", t.shape()}, {"data", std::move(data)}};
}

// Runs the case with moelab: outputs, then seeded weights for the float outputs and the loss's gradients.
void run_moelab(OracleCase& c, Generator& weight_gen) {
  try {
    c.outputs = c.run(c.inputs);
    bool differentiable = std::any_of(c.inputs.begin(), c.inputs.end(), [](const Tensor& x) { return x.requires_grad(); });
    Tensor loss;
    for (const Tensor& y : c.outputs) {
      Tensor w;
      if (differentiable && y.dtype() != DType::I32) {
        w = randn(y.shape(), weight_gen, 0.0, 1.0, y.dtype());
        Tensor term = sum(mul(y, w));
        loss = loss.defined() ? add(loss, term) : term;
      }
      c.weights.push_back(w);
    }
    if (loss.defined() && loss.requires_grad()) loss.backward();
    for (const Tensor& x : c.inputs) {
      if (!x.requires_grad()) {
        c.grads.emplace_back();
        continue;
      }
      Tensor g = x.grad();
      c.grads.push_back(g.defined() ? g : zeros_like(x));  // no gradient reached it: zero
    }
  } catch (const std::exception& e) {
    c.error = e.what();
  }
}

json case_json(const OracleCase& c) {
  json inputs = json::array(), weights = json::array();
  for (const Tensor& x : c.inputs) {
    json t = to_json(x);
    t["grad"] = x.requires_grad();
    inputs.push_back(std::move(t));
  }
  for (const Tensor& w : c.weights) weights.push_back(w.defined() ? to_json(w) : json(nullptr));
  return {{"name", c.name}, {"op", c.op}, {"attrs", c.attrs}, {"inputs", inputs}, {"weights", weights}};
}

// Worst element of one compared tensor.
struct Mismatch {
  double error = 0;  // |a - b| / (|b| + floor * max|b|), or 1 for a shape/dtype/integer mismatch
  std::string detail;
};

Mismatch compare(const Tensor& actual, const json& expected, double floor) {
  Shape shape = expected.at("shape").get<Shape>();
  std::string dtype = expected.at("dtype").get<std::string>();
  if (actual.shape() != shape || dtype != dtype_name(actual.dtype()))
    return {1.0, fmt::format("moelab gives {}, torch {}{}", actual.str(), dtype, shape_str(shape))};
  std::vector<double> a = testing::as_doubles(actual), b = expected.at("data").get<std::vector<double>>();
  Mismatch m;
  if (actual.dtype() == DType::I32) {
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i]) return {1.0, fmt::format("element {}: moelab {} vs torch {}", i, a[i], b[i])};
    return m;
  }
  double scale = 0;
  for (double v : b) scale = std::max(scale, std::abs(v));
  // The smallest normal float keeps 0/0 (both sides exactly zero) at error 0.
  double floor_abs = floor * scale + std::numeric_limits<float>::min();
  for (size_t i = 0; i < a.size(); ++i) {
    double err = std::abs(a[i] - b[i]) / (std::abs(b[i]) + floor_abs);
    if (!(err <= m.error)) {  // NaN-propagating max
      m.error = err;
      m.detail = fmt::format("element {}: moelab {:.9g} vs torch {:.9g} (max|torch| {:.3g})", i, a[i], b[i], scale);
    }
  }
  return m;
}

bool report_requested() {
  const char* env = std::getenv("MOELAB_ORACLE_REPORT");
  return env && std::string(env) == "1";
}

}  // namespace

TEST_CASE("torch python runner: exit codes and output come back") {
  testing::PythonRun ok = testing::run_python({"-c", "import sys; print('out'); print('err', file=sys.stderr)"});
  if (ok.exit_code == 127) {
    MESSAGE("skipping: no interpreter at " << testing::python_interpreter() << ": " << ok.output);
    return;
  }
  CHECK(ok.exit_code == 0);
  CHECK(ok.output.find("out") != std::string::npos);
  CHECK(ok.output.find("err") != std::string::npos);
  testing::PythonRun failed = testing::run_python({"-c", "import sys; sys.exit(3)", "it's quoted"});
  CHECK(failed.exit_code == 3);
  testing::PythonRun args = testing::run_python({"-c", "import sys; print(sys.argv[1:])", "a b", "it's"});
  CHECK(args.output.find("['a b', \"it's\"]") != std::string::npos);
}

TEST_CASE("torch oracle: outputs and gradients of every op match PyTorch within 1e-5 (f32)") {
  std::vector<OracleCase> cases = build_cases();
  Generator weight_gen(777);
  json request = {{"cases", json::array()}};
  std::vector<OracleCase*> sent;  // the cases moelab could run; the others fail below
  std::vector<std::string> moelab_errors;
  for (OracleCase& c : cases) {
    run_moelab(c, weight_gen);
    if (!c.error.empty()) {
      moelab_errors.push_back(c.name + ": moelab threw: " + c.error);
      continue;
    }
    request["cases"].push_back(case_json(c));
    sent.push_back(&c);
  }

  testing::ScratchDir dir("moelab_torch_oracle");
  std::string cases_path = dir.file("cases.json"), results_path = dir.file("results.json");
  std::ofstream(cases_path) << request.dump();
  std::string script = testing::source_file("tests/torch/op_oracle.py");
  // One interpreter for all cases (importing torch is the slow part); whether torch is there at all is asked only
  // when the script fails, to tell "no torch: skip" from a broken oracle.
  testing::PythonRun run = testing::run_python_script(script, {cases_path, results_path});
  if (!run.ok()) {
    const testing::TorchStatus& torch = testing::torch_status();
    if (!torch.available) {
      MESSAGE("skipping the PyTorch oracle: " << torch.why);
      return;
    }
    dir.keep();
  }
  for (const std::string& e : moelab_errors) FAIL_CHECK(e);
  REQUIRE_MESSAGE(run.ok(), "op_oracle.py exited with " << run.exit_code << " (inputs kept in " << dir.path().string()
                                                        << "):\n" << run.output);
  json results = json::parse(std::ifstream(results_path));
  REQUIRE(results.at("cases").size() == sent.size());

  std::string table;  // one line per case: the worst error of its outputs and of its gradients
  double worst = 0;
  std::string worst_case;
  bool all_ok = true;
  for (size_t k = 0; k < sent.size(); ++k) {
    OracleCase& c = *sent[k];
    const json& r = results["cases"][k];
    REQUIRE(r.at("name").get<std::string>() == c.name);
    if (!r.at("error").is_null()) {
      all_ok = false;
      FAIL_CHECK(c.name << ": torch failed: " << r.at("error").get<std::string>() << "\n"
                        << r.value("trace", std::string()));
      continue;
    }
    double out_err = 0, grad_err = 0;
    auto check = [&](const std::string& what, size_t i, const Tensor& actual, const json& expected, double& acc) {
      Mismatch m = compare(actual, expected, c.floor);
      acc = std::max(acc, m.error);
      if (m.error > worst || std::isnan(m.error)) worst = m.error, worst_case = c.name;
      if (!(m.error <= kRelTol)) all_ok = false;
      CHECK_MESSAGE(m.error <= kRelTol, c.name << ": " << what << " " << i << ": relative error " << m.error << " > "
                                               << kRelTol << "; " << m.detail);
    };
    const json& outs = r.at("outputs");
    CHECK_MESSAGE(outs.size() == c.outputs.size(),
                  c.name << ": moelab gives " << c.outputs.size() << " outputs, torch " << outs.size());
    for (size_t i = 0; i < std::min(outs.size(), c.outputs.size()); ++i) check("output", i, c.outputs[i], outs[i], out_err);
    const json& grads = r.at("grads");
    for (size_t i = 0; i < c.inputs.size() && i < grads.size(); ++i)
      if (c.grads[i].defined()) {
        if (grads[i].is_null()) {
          all_ok = false;
          FAIL_CHECK(c.name << ": torch gives no gradient for input " << i);
        } else {
          check("gradient of input", i, c.grads[i], grads[i], grad_err);
        }
      }
    table += fmt::format("  {:<44} output {:9.2e}  grads {:9.2e}\n", c.name, out_err, grad_err);
  }
  if (!all_ok) {
    dir.keep();
    MESSAGE("inputs and torch results kept in " << dir.path().string() << " (rerun: " << testing::python_interpreter()
                                                << " " << script << " cases.json results.json)");
  }
  if (report_requested() || !all_ok)
    MESSAGE("torch " << results.value("torch_version", std::string("?")) << ", worst relative error per case:\n"
                     << table);
  MESSAGE(sent.size() << " of " << cases.size() << " cases ran on both sides; worst relative error " << worst
                      << " (" << worst_case << ")");
}
