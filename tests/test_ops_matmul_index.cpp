// matmul and the indexing ops: forward against naive loops on odd shapes, gradients by central differences, exact
// orderings and counts for the no-grad ops, and the errors of bad use.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/bf16_weights.h"
#include "engine/precision.h"
#include "engine/profile.h"
#include "tests/testing.h"

using namespace moelab;
using testing::as_doubles;
using testing::bitwise_equal;
using testing::check_close;
using testing::check_equal;
using testing::check_error;
using testing::gradcheck;
using testing::random;
using testing::ravel;
using testing::unravel;
using testing::weighted_sum;

namespace {

// ---- helpers --------------------------------------------------------------------------------------------------------

Tensor random_ids(const Shape& shape, int32_t bound, uint64_t seed) {
  std::mt19937 gen(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> dist(0, bound - 1);
  std::vector<int32_t> ids(shape_numel(shape));
  for (int32_t& id : ids) id = dist(gen);
  return from_vector(ids, shape);
}

Tensor tensor_of(const std::vector<double>& values, const Shape& shape, DType dtype) {
  return from_vector(values, shape, dtype);
}

// Sums of a few f32 terms against a double reference: relative to max(1, |value|) (atol 1 in check_close).
double sum_tolerance(DType dtype) { return dtype == DType::F32 ? 1e-5 : 1e-12; }

// ---- naive references -----------------------------------------------------------------------------------------------

// op(a) @ op(b) by the definition, in double; b may be 2-D (shared).
Tensor reference_matmul(const Tensor& a, const Tensor& b, bool ta, bool tb) {
  std::vector<double> A = as_doubles(a), B = as_doubles(b);
  int64_t m = a.size(ta ? -1 : -2), k = a.size(ta ? -2 : -1), n = b.size(tb ? -2 : -1);
  bool shared = b.dim() == 2;
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  int64_t batch = shape_numel(out_shape);
  out_shape.push_back(m);
  out_shape.push_back(n);
  std::vector<double> C(batch * m * n);
  for (int64_t s = 0; s < batch; ++s) {
    const double* As = A.data() + s * m * k;
    const double* Bs = B.data() + (shared ? 0 : s * k * n);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t p = 0; p < k; ++p)
          acc += (ta ? As[p * m + i] : As[i * k + p]) * (tb ? Bs[j * k + p] : Bs[p * n + j]);
        C[(s * m + i) * n + j] = acc;
      }
  }
  return tensor_of(C, out_shape, a.dtype());
}

Tensor reference_index_select(const Tensor& x, int64_t dim, const Tensor& index) {
  std::vector<double> X = as_doubles(x);
  std::vector<int32_t> I = index.to_vector<int32_t>();
  Shape out_shape = x.shape();
  out_shape[dim] = index.numel();
  std::vector<double> out(shape_numel(out_shape));
  for (int64_t p = 0; p < static_cast<int64_t>(out.size()); ++p) {
    std::vector<int64_t> c = unravel(p, out_shape);
    c[dim] = I[c[dim]];
    out[p] = X[ravel(c, x.shape())];
  }
  return tensor_of(out, out_shape, x.dtype());
}

Tensor reference_index_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src) {
  std::vector<double> out = as_doubles(x), S = as_doubles(src);
  std::vector<int32_t> I = index.to_vector<int32_t>();
  for (int64_t p = 0; p < src.numel(); ++p) {
    std::vector<int64_t> c = unravel(p, src.shape());
    c[dim] = I[c[dim]];
    out[ravel(c, x.shape())] += S[p];
  }
  return tensor_of(out, x.shape(), x.dtype());
}

Tensor reference_gather(const Tensor& x, int64_t dim, const Tensor& index) {
  std::vector<double> X = as_doubles(x), out(index.numel());
  std::vector<int32_t> I = index.to_vector<int32_t>();
  for (int64_t p = 0; p < index.numel(); ++p) {
    std::vector<int64_t> c = unravel(p, index.shape());
    c[dim] = I[p];
    out[p] = X[ravel(c, x.shape())];
  }
  return tensor_of(out, index.shape(), x.dtype());
}

Tensor reference_scatter_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src) {
  std::vector<double> out = as_doubles(x), S = as_doubles(src);
  std::vector<int32_t> I = index.to_vector<int32_t>();
  for (int64_t p = 0; p < index.numel(); ++p) {
    std::vector<int64_t> c = unravel(p, index.shape());
    c[dim] = I[p];
    out[ravel(c, x.shape())] += S[p];
  }
  return tensor_of(out, x.shape(), x.dtype());
}

// Element of `t` at output coordinates `c` under NumPy broadcasting.
double broadcast_at(const std::vector<double>& values, const Shape& shape, const std::vector<int64_t>& c) {
  std::vector<int64_t> own(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) own[d] = shape[d] == 1 ? 0 : c[c.size() - shape.size() + d];
  return values[ravel(own, shape)];
}

Tensor reference_where(const Tensor& cond, const Tensor& a, const Tensor& b, const Shape& out_shape) {
  std::vector<double> C = as_doubles(cond), A = as_doubles(a), B = as_doubles(b), out(shape_numel(out_shape));
  for (int64_t p = 0; p < static_cast<int64_t>(out.size()); ++p) {
    std::vector<int64_t> c = unravel(p, out_shape);
    out[p] = broadcast_at(C, cond.shape(), c) != 0 ? broadcast_at(A, a.shape(), c) : broadcast_at(B, b.shape(), c);
  }
  return tensor_of(out, out_shape, a.dtype());
}

// topk by repeated selection: the first strictly larger value wins, so ties go to the lower index.
std::pair<std::vector<double>, std::vector<int32_t>> reference_topk(const Tensor& x, int64_t k) {
  std::vector<double> X = as_doubles(x), values;
  std::vector<int32_t> indices;
  int64_t n = x.size(-1);
  for (int64_t r = 0; r < x.numel() / n; ++r) {
    std::vector<bool> taken(n, false);
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t i = 0; i < n; ++i)
        if (!taken[i] && (best < 0 || X[r * n + i] > X[r * n + best])) best = i;
      taken[best] = true;
      values.push_back(X[r * n + best]);
      indices.push_back(static_cast<int32_t>(best));
    }
  }
  return {values, indices};
}

// Stable argsort by insertion: an element moves left only past strictly greater (ascending) values.
std::vector<int32_t> reference_argsort(const Tensor& x, bool descending) {
  std::vector<double> X = as_doubles(x);
  std::vector<int32_t> out;
  int64_t n = x.size(-1);
  for (int64_t r = 0; r < x.numel() / n; ++r) {
    std::vector<int32_t> order;
    for (int32_t i = 0; i < n; ++i) {
      auto before = [&](int32_t u, int32_t v) {
        return descending ? X[r * n + u] > X[r * n + v] : X[r * n + u] < X[r * n + v];
      };
      size_t at = order.size();
      while (at > 0 && before(i, order[at - 1])) --at;
      order.insert(order.begin() + at, i);
    }
    out.insert(out.end(), order.begin(), order.end());
  }
  return out;
}

struct MatmulCase {
  Shape batch;  // leading dims of a
  int64_t m, k, n;
  bool shared_b;
};

Shape stored(const Shape& batch, int64_t rows, int64_t cols, bool transposed) {
  Shape s = batch;
  s.push_back(transposed ? cols : rows);
  s.push_back(transposed ? rows : cols);
  return s;
}

}  // namespace

// ---- matmul ---------------------------------------------------------------------------------------------------------

TEST_CASE("ops: matmul forward matches a naive product (2-D and batched and shared b, all transposes, f32 and f64)") {
  const std::vector<MatmulCase> cases = {
      {{}, 1, 1, 1, false},      {{}, 3, 7, 5, false},      {{}, 33, 65, 7, false}, {{}, 65, 33, 66, false},
      {{2}, 7, 3, 33, false},    {{2, 3}, 5, 1, 7, false},  {{3}, 33, 7, 65, true}, {{2, 2}, 1, 65, 3, true},
      {{64}, 33, 33, 33, false},  // many small products: spread over threads one product each
      {{0}, 3, 4, 5, false},     {{}, 4, 0, 3, false},
  };
  uint64_t seed = 1;
  for (DType dtype : {DType::F32, DType::F64}) {
    double rel = sum_tolerance(dtype);
    for (const MatmulCase& c : cases)
      for (bool ta : {false, true})
        for (bool tb : {false, true}) {
          Tensor a = random(stored(c.batch, c.m, c.k, ta), seed++, dtype);
          Tensor b = random(stored(c.shared_b ? Shape{} : c.batch, c.k, c.n, tb), seed++, dtype);
          Tensor out = matmul(a, b, ta, tb);
          check_close(out, reference_matmul(a, b, ta, tb), rel, 1.0,
                      fmt::format("matmul {} {} ta={} tb={}", a.str(), b.str(), ta, tb));
        }
  }
}

TEST_CASE("ops: matmul gradients for all transposes of 2-D and batched and shared-b products") {
  const std::vector<MatmulCase> cases = {
      {{}, 3, 4, 5, false}, {{2}, 3, 1, 2, false}, {{2, 2}, 2, 3, 3, true}, {{3}, 1, 2, 3, true}};
  uint64_t seed = 100;
  for (const MatmulCase& c : cases)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        Tensor a = random(stored(c.batch, c.m, c.k, ta), seed++).set_requires_grad();
        Tensor b = random(stored(c.shared_b ? Shape{} : c.batch, c.k, c.n, tb), seed++).set_requires_grad();
        gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(matmul(in[0], in[1], ta, tb)); }, {a, b},
                  1e-6, 1e-6, fmt::format("matmul {} {} ta={} tb={}", a.str(), b.str(), ta, tb));
      }
}

TEST_CASE("ops: matmul computes only the gradients that are needed") {
  Tensor a = random({2, 3, 4}, 201).set_requires_grad(), b = random({4, 5}, 202);  // b: data, no gradient
  Tensor upstream = random({2, 3, 5}, 203);
  sum(mul(matmul(a, b), upstream)).backward();
  CHECK_FALSE(b.grad().defined());
  check_close(a.grad(), reference_matmul(upstream, b, false, true), 1e-12, 1.0, "da = G B^T");
}

TEST_CASE("ops: matmul adds a gradient into the one its operand holds, with no add kernel") {
  // x used by three products, as attention's input is by q, k and v; w's gradient over two backward passes, as a
  // weight's over micro-batches. Under bf16 precision too: the gradients of f32 operands stay f32.
  for (Precision precision : {Precision::FP32, Precision::BF16}) {
    PrecisionGuard mode(precision);
    const double rel = precision == Precision::FP32 ? 1e-5 : 1e-4;
    const Tensor x0 = random({6, 5}, 210, DType::F32), w0 = random({3, 5}, 211, DType::F32);
    // Each use's loss is sum((x w^T) v_i): its backward runs products only (no pointwise kernel of its own).
    const std::vector<Tensor> vs = {random({3, 1}, 212, DType::F32), random({3, 1}, 213, DType::F32),
                                    random({3, 1}, 214, DType::F32)};
    auto use = [](const Tensor& x, const Tensor& w, const Tensor& v) {
      return sum(matmul(matmul(x, w, false, true), v));
    };
    Tensor x = testing::leaf(x0, DType::F32), w = testing::leaf(w0, DType::F32);
    auto loss = [&] { return add(add(use(x, w, vs[0]), use(x, w, vs[1])), use(x, w, vs[2])); };
    // Each product's gradients alone, summed here.
    Tensor dx, dw;
    for (const Tensor& v : vs) {
      Tensor xi = testing::leaf(x0, DType::F32), wi = testing::leaf(w0, DType::F32);
      use(xi, wi, v).backward();
      dx = dx.defined() ? add(dx, xi.grad()) : xi.grad();
      dw = dw.defined() ? add(dw, wi.grad()) : wi.grad();
    }
    std::vector<KernelTime> kernels;
    {
      Tensor l = loss();
      KernelProfile profile;  // the backward only
      l.backward();
      kernels = profile.totals();
    }
    for (const KernelTime& k : kernels) CHECK_MESSAGE(k.name != "binary_forward", "an add ran in the backward");
    check_close(x.grad(), dx, rel, 1e-3, "dx");
    check_close(w.grad(), dw, rel, 1e-3, "dw");
    loss().backward();  // a second pass: w's gradient adds the same again
    check_close(w.grad(), mul(dw, 2.0), rel, 1e-3, "dw after two passes");
  }
}

TEST_CASE("ops: a bf16 operand's gradient from three products is added up in bf16 by the products, no add kernel") {
  // x bf16 used by three products (attention's input under mixed precision): the first product writes its gradient,
  // the next two add to it (GEMM beta = 1), each sum rounded once. Against the products' f32 gradients, rounded after
  // each add in the order backward ran them (one of the six).
  const Tensor x0 = to_dtype(random({6, 5}, 220, DType::F32), DType::BF16);
  const std::vector<Tensor> ws = {random({3, 5}, 221, DType::F32), random({3, 5}, 222, DType::F32),
                                  random({3, 5}, 223, DType::F32)};
  const Tensor v = random({3, 1}, 224, DType::F32);
  Tensor leaf = testing::leaf(to_dtype(x0, DType::F32), DType::F32);
  const Tensor x = to_dtype(leaf, DType::BF16);
  Tensor loss;
  for (const Tensor& w : ws) {
    const Tensor use = sum(matmul(matmul(x, w, false, true), v));
    loss = loss.defined() ? add(loss, use) : use;
  }
  std::vector<KernelTime> kernels;
  {
    KernelProfile profile;  // the backward only
    loss.backward();
    kernels = profile.totals();
  }
  for (const KernelTime& k : kernels) CHECK_MESSAGE(k.name != "binary_forward", "an add ran in the backward");
  // Each product's gradient of x in f32: G w with G = v^T per row, the bf16 product's operands (v and w rounded).
  std::vector<std::vector<double>> parts;
  for (const Tensor& w : ws) {
    Tensor xi = testing::leaf(to_dtype(x0, DType::F32), DType::F32);
    PrecisionGuard mode(Precision::BF16);  // the products' operands rounded as the bf16 x's are
    sum(matmul(matmul(xi, w, false, true), v)).backward();
    parts.push_back(as_doubles(xi.grad()));
  }
  auto bf = [](double value) { return static_cast<double>(to_float(to_bf16(static_cast<float>(value)))); };
  const std::vector<double> got = as_doubles(leaf.grad());
  bool matched = false;
  for (const auto& order :
       std::vector<std::array<int, 3>>{{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}}) {
    std::vector<double> want(got.size());
    for (size_t i = 0; i < got.size(); ++i) {
      const auto& [p, q, r] = order;
      const float first = static_cast<float>(bf(parts[p][i]));
      const float second = static_cast<float>(bf(static_cast<float>(first + static_cast<float>(parts[q][i]))));
      want[i] = bf(static_cast<float>(second + static_cast<float>(parts[r][i])));
    }
    matched = matched || want == got;
  }
  CHECK_MESSAGE(matched, "x's gradient is not the three products' sum, rounded after each add");
}

TEST_CASE("ops: matmul multiplies product_operand's copy as its own, and the copy is made once for three products") {
  const Tensor x0 = random({6, 5}, 220, DType::F32), w0 = random({9, 5}, 221, DType::F32);
  auto three_products = [&](bool shared_copy, Tensor& x, Tensor& w) {
    x = testing::leaf(x0, DType::F32), w = testing::leaf(w0, DType::F32);
    const Tensor x_operand = shared_copy ? product_operand(x) : Tensor();
    Tensor total;
    for (int64_t part = 0; part < 3; ++part) {
      Tensor y = matmul(x, slice_rows(w, 3 * part, 3 * part + 3), false, true, x_operand);
      Tensor loss = weighted_sum(y, 230 + part);
      total = total.defined() ? add(total, loss) : loss;
    }
    return total;
  };
  auto round_calls = [](const std::vector<KernelTime>& kernels) {
    int64_t calls = 0;
    for (const KernelTime& k : kernels) calls += k.name == "round_to_bf16" ? k.calls : 0;
    return calls;
  };
  for (Precision precision : {Precision::FP32, Precision::BF16}) {
    PrecisionGuard mode(precision);
    CHECK(product_operand(x0).defined() == (precision == Precision::BF16));
    Tensor x_own, w_own, x_shared, w_shared;
    int64_t own_rounds = 0, shared_rounds = 0;
    Tensor own, shared;
    {
      KernelProfile profile;
      own = three_products(false, x_own, w_own);
      own_rounds = round_calls(profile.totals());
    }
    {
      KernelProfile profile;
      shared = three_products(true, x_shared, w_shared);
      shared_rounds = round_calls(profile.totals());
    }
    // Bf16: x and each slice of w rounded per product (6), or x once (4). Nothing is rounded in f32.
    CHECK(own_rounds == (precision == Precision::BF16 ? 6 : 0));
    CHECK(shared_rounds == (precision == Precision::BF16 ? 4 : 0));
    check_equal(shared, own, "loss");
    own.backward();
    shared.backward();
    check_equal(x_shared.grad(), x_own.grad(), "dx");
    check_equal(w_shared.grad(), w_own.grad(), "dw");
  }
}

// Bf16Weights (engine/bf16_weights.h): the products of a BF16 scope that holds them multiply a parameter's copy (and a
// view's range of it) instead of rounding the weight, with the same bits; the copy stays as it was made until
// refresh().
TEST_CASE("ops: under a guard with the parameters' bf16 copies, products multiply them and round no weight") {
  const Tensor w = testing::leaf(random({9, 5}, 241, DType::F32), DType::F32);
  const Tensor x0 = random({6, 5}, 240, DType::F32);
  Bf16Weights copies({w});
  const Tensor copy = copies.copy_of(w);
  REQUIRE(copy.defined());
  CHECK(bitwise_equal(copy, to_dtype(w, DType::BF16)));
  // A view's range of the copy: a slice of rows, a reshape. Other tensors have none.
  const Tensor rows = slice_rows(w, 3, 6), rows_copy = copies.copy_of(rows);
  REQUIRE(rows_copy.defined());
  CHECK(bitwise_equal(rows_copy, to_dtype(rows, DType::BF16)));
  CHECK(rows_copy.raw_data() == static_cast<const char*>(copy.raw_data()) + 3 * 5 * 2);  // no new copy
  CHECK(bitwise_equal(copies.copy_of(reshape(w, {45})), to_dtype(reshape(w, {45}), DType::BF16)));
  CHECK_FALSE(copies.copy_of(x0).defined());
  CHECK_FALSE(copies.copy_of(clone(w)).defined());
  check_error([] { Bf16Weights({random({2}, 1, DType::F64)}); }, {"Bf16Weights", "f32", "f64[2]"});

  // Three products of x with the row blocks of w, and their gradients: the same bits with and without the copies.
  auto round_calls = [](const std::vector<KernelTime>& kernels) {
    int64_t calls = 0;
    for (const KernelTime& k : kernels) calls += k.name == "round_to_bf16" ? k.calls : 0;
    return calls;
  };
  auto three_products = [&](const Bf16Weights* weights, int64_t& rounds) {
    PrecisionGuard mode(Precision::BF16, weights);
    w.zero_grad();
    const Tensor x = testing::leaf(x0, DType::F32);
    KernelProfile profile;
    Tensor total;
    for (int64_t part = 0; part < 3; ++part) {
      Tensor loss = weighted_sum(matmul(x, slice_rows(w, 3 * part, 3 * part + 3), false, true), 250 + part);
      total = total.defined() ? add(total, loss) : loss;
    }
    total.backward();
    rounds = round_calls(profile.totals());
    return std::vector<Tensor>{total.detach(), x.grad(), w.grad()};
  };
  int64_t own_rounds = 0, copied_rounds = 0;
  const std::vector<Tensor> own = three_products(nullptr, own_rounds), copied = three_products(&copies, copied_rounds);
  // Each product rounds x and its block of w, and its backward the output gradient (once for both gradient products):
  // with the copies, the blocks of w are not rounded.
  CHECK(own_rounds == 9);
  CHECK(copied_rounds == 6);
  for (size_t i = 0; i < own.size(); ++i) CHECK_MESSAGE(bitwise_equal(copied[i], own[i]), "result " << i);

  // A nested guard without copies keeps the enclosing one's (the router's FP32 scope); each guard restores its own.
  {
    PrecisionGuard outer(Precision::BF16, &copies);
    {
      PrecisionGuard inner(Precision::FP32);
      CHECK(product_bf16_weights() == &copies);
    }
    CHECK(product_bf16_weights() == &copies);
    CHECK(product_precision() == Precision::BF16);
  }
  CHECK(product_bf16_weights() == nullptr);

  // A write the copies did not see: products multiply the old copy until refresh() rounds the new values.
  Tensor target = w.detach();
  copy_(target, random({9, 5}, 242, DType::F32));
  {
    PrecisionGuard mode(Precision::BF16, &copies);
    CHECK(bitwise_equal(product_operand(w), copy));
    copies.refresh();
    CHECK(bitwise_equal(product_operand(w), to_dtype(w, DType::BF16)));
    CHECK_FALSE(bitwise_equal(product_operand(w), copy));
  }
}

TEST_CASE("ops: matmul's a_rounded must be product_operand(a)") {
  const Tensor a = random({2, 3}, 1, DType::F32), b = random({4, 3}, 2, DType::F32);
  {
    PrecisionGuard mode(Precision::FP32);  // no copy is multiplied in f32
    const Tensor copy = to_dtype(random({2, 3}, 3, DType::F32), DType::BF16);
    check_error([&] { (void)matmul(a, b, false, true, copy); }, {"matmul", "a_rounded", "bf16[2, 3]", "f32[2, 3]"});
  }
  PrecisionGuard mode(Precision::BF16);
  CHECK_NOTHROW(matmul(a, b, false, true, product_operand(a)));
  check_error(
      [&] {
        (void)matmul(a, b, false, true, product_operand(random({3, 2}, 4, DType::F32)));
      },
      {"matmul", "a_rounded", "bf16[3, 2]"});
  check_error([&] { (void)matmul(a, b, false, true, a); }, {"matmul", "a_rounded", "f32[2, 3]"});
}

TEST_CASE("ops: matmul_to_bf16 is matmul's bf16 product rounded once; a bf16 operand mixes with an f32 one") {
  using testing::bitwise_equal;
  using testing::leaf;
  using testing::node_gradients;
  const Tensor a0 = random({2, 5, 7}, 240, DType::F32), w0 = random({6, 7}, 241, DType::F32);
  const Tensor w2 = random({3, 6}, 243, DType::F32);
  const Tensor g16 = to_dtype(random({2, 5, 6}, 242, DType::F32), DType::BF16);
  const Tensor g32 = random({2, 5, 3}, 244, DType::F32);
  Tensor y16;
  {
    PrecisionGuard mode(Precision::BF16);
    // The forward: matmul's f32 result rounded once. The backward: matmul's, for the gradient's values (a bf16 g is
    // multiplied as it is, an f32 g rounded first, the same bits here), each gradient f32 as its operand.
    const Tensor a = leaf(a0, DType::F32), w = leaf(w0, DType::F32);
    y16 = matmul_to_bf16(a, w, false, true);
    const Tensor y32 = matmul(leaf(a0, DType::F32), leaf(w0, DType::F32), false, true);
    CHECK(y16.dtype() == DType::BF16);
    CHECK(bitwise_equal(y16, to_dtype(y32, DType::BF16)));
    const std::vector<Tensor> ours = node_gradients(y16, g16), plain = node_gradients(y32, to_dtype(g16, DType::F32));
    for (size_t i = 0; i < 2; ++i) {
      CHECK(ours[i].dtype() == DType::F32);
      CHECK_MESSAGE(bitwise_equal(ours[i], plain[i]), "gradient " << i);
    }
  }
  // A bf16 operand beside an f32 one, whatever the mode: a bf16 product, as of f32 operands holding the bf16 values
  // under bf16 precision; the bf16 operand's gradient is bf16 (that product rounded), the f32 one's f32.
  const Tensor y_values = to_dtype(y16, DType::F32);
  for (Precision precision : {Precision::FP32, Precision::BF16}) {
    PrecisionGuard mode(precision);
    const Tensor y = y16.detach().set_requires_grad(), w = leaf(w2, DType::F32);
    const Tensor z = matmul(y, w, false, true);
    Tensor z_ref;
    {
      PrecisionGuard bf16(Precision::BF16);
      z_ref = matmul(leaf(y_values, DType::F32), leaf(w2, DType::F32), false, true);
    }
    CHECK(z.dtype() == DType::F32);
    CHECK(bitwise_equal(z, z_ref));
    const std::vector<Tensor> ours = node_gradients(z, g32), plain = node_gradients(z_ref, g32);
    CHECK(ours[0].dtype() == DType::BF16);
    CHECK(bitwise_equal(ours[0], to_dtype(plain[0], DType::BF16)));
    CHECK(bitwise_equal(ours[1], plain[1]));
  }
  // The other way round: an f32 a beside a bf16 b.
  {
    const Tensor w = leaf(w2, DType::F32), y = reshape(y16, {10, 6}).detach().set_requires_grad();
    const Tensor z = matmul(w, y, false, true);  // [3, 10]
    Tensor z_ref;
    {
      PrecisionGuard bf16(Precision::BF16);
      z_ref = matmul(leaf(w2, DType::F32), leaf(reshape(y_values, {10, 6}), DType::F32), false, true);
    }
    CHECK(bitwise_equal(z, z_ref));
    const Tensor g = random({3, 10}, 245, DType::F32);
    const std::vector<Tensor> ours = node_gradients(z, g), plain = node_gradients(z_ref, g);
    CHECK(bitwise_equal(ours[0], plain[0]));
    CHECK(ours[1].dtype() == DType::BF16);
    CHECK(bitwise_equal(ours[1], to_dtype(plain[1], DType::BF16)));
  }
  // Only a bf16 product can give a bf16 result, and f64 mixes with nothing.
  check_error([&] { (void)matmul_to_bf16(a0, w0, false, true); },
              {"matmul_to_bf16", "needs a bf16 product", "f32[2, 5, 7]"});
  check_error([&] { (void)matmul(y16, to_dtype(w2, DType::F64), false, true); },
              {"matmul", "share a dtype", "bf16[2, 5, 6]", "f64[3, 6]"});
}

TEST_CASE("ops: matmul bad use throws naming both shapes") {
  Tensor a = random({2, 3}, 1, DType::F32), b = random({4, 5}, 2, DType::F32);
  check_error([&] { (void)matmul(a, b); }, {"matmul", "f32[2, 3]", "f32[4, 5]"});
  check_error([&] { (void)matmul(a, b, true, false); }, {"matmul", "f32[2, 3]^T", "f32[4, 5]"});
  CHECK_NOTHROW(matmul(a, random({5, 3}, 3, DType::F32), false, true));
  check_error([&] { (void)matmul(random({2, 3, 4}, 1, DType::F32), random({3, 4, 5}, 2, DType::F32)); },
              {"f32[2, 3, 4]", "f32[3, 4, 5]"});
  check_error([&] { (void)matmul(random({3, 4}, 1, DType::F32), random({2, 4, 5}, 2, DType::F32)); },
              {"f32[3, 4]", "f32[2, 4, 5]"});
  check_error([&] { (void)matmul(random({4}, 1, DType::F32), random({4, 5}, 2, DType::F32)); },
              {"f32[4]", "f32[4, 5]"});
  check_error([&] { (void)matmul(random({2, 3}, 1, DType::F32), random({3, 5}, 2, DType::F64)); },
              {"f32[2, 3]", "f64[3, 5]"});
  check_error([&] {
    (void)matmul(from_vector(std::vector<int32_t>{1, 2}, {1, 2}), from_vector(std::vector<int32_t>{1, 2}, {2, 1}));
  }, {"matmul", "i32"});
}

// ---- index_select / index_add / embedding ---------------------------------------------------------------------------

TEST_CASE("ops: index_select and index_add forward match naive loops on every dim") {
  const std::vector<Shape> shapes = {{1}, {65}, {3, 7, 5}, {33, 65}, {2, 1, 3, 7}};
  uint64_t seed = 7;
  for (DType dtype : {DType::F32, DType::F64})
    for (const Shape& shape : shapes)
      for (int64_t dim = -1; dim < static_cast<int64_t>(shape.size()); ++dim) {
        int64_t d = dim < 0 ? dim + static_cast<int64_t>(shape.size()) : dim;
        Tensor x = random(shape, seed++, dtype);
        for (int64_t count : {1, 3, 9}) {  // 9 > most sizes: indices repeat
          Tensor index = random_ids({count}, static_cast<int32_t>(shape[d]), seed++);
          std::string what = fmt::format("{} dim {} index {}", x.str(), dim, count);
          check_equal(index_select(x, dim, index), reference_index_select(x, d, index), "index_select " + what);
          Shape src_shape = shape;
          src_shape[d] = count;
          Tensor src = random(src_shape, seed++, dtype);
          check_close(index_add(x, dim, index, src), reference_index_add(x, d, index, src), sum_tolerance(dtype), 1.0,
                      "index_add " + what);
        }
      }
  // i32 data selects too (e.g. picking token ids).
  Tensor ids = from_vector(std::vector<int32_t>{10, 11, 12, 13, 14, 15}, {2, 3});
  CHECK(index_select(ids, 1, from_vector(std::vector<int32_t>{2, 0, 2}, {3})).to_vector<int32_t>() ==
        std::vector<int32_t>{12, 10, 12, 15, 13, 15});
}

TEST_CASE("ops: index_add with many repeats is deterministic across the threaded split") {
  // 4000 additions into 7 rows of 300 columns: large enough that the column blocks run on several threads.
  Tensor x = random({7, 300}, 11, DType::F32);
  Tensor index = random_ids({4000}, 7, 12);
  Tensor src = random({4000, 300}, 13, DType::F32);
  Tensor first = index_add(x, 0, index, src);
  check_close(first, reference_index_add(x, 0, index, src), 1e-4, 1.0, "index_add many repeats");
  CHECK(index_add(x, 0, index, src).to_vector<float>() == first.to_vector<float>());  // bit for bit
}

TEST_CASE("ops: embedding forward and backward match naive loops") {
  for (const Shape& ids_shape : {Shape{1}, Shape{7}, Shape{3, 33}, Shape{2, 1, 5}}) {
    Tensor weight = random({11, 7}, 21, DType::F32);
    Tensor ids = random_ids(ids_shape, 11, 22);
    Tensor out = embedding(weight, ids);
    Shape want_shape = ids_shape;
    want_shape.push_back(7);
    REQUIRE(out.shape() == want_shape);
    check_equal(reshape(out, {ids.numel(), 7}), reference_index_select(weight, 0, reshape(ids, {ids.numel()})),
                "embedding " + shape_str(ids_shape));
  }
  // Backward with heavy repeats (5000 tokens over 13 rows, d = 300: threaded over column blocks) equals the naive
  // per-row sum of the upstream gradient, in f64 and with the same summation order.
  Tensor weight = random({13, 300}, 23).set_requires_grad();
  Tensor ids = random_ids({50, 100}, 13, 24);
  Tensor upstream = random({50, 100, 300}, 25);
  sum(mul(embedding(weight, ids), upstream)).backward();
  Tensor want =
      reference_index_add(zeros({13, 300}, DType::F64), 0, reshape(ids, {5000}), reshape(upstream, {5000, 300}));
  check_close(weight.grad(), want, 1e-12, 1e-9, "embedding backward");
}

TEST_CASE("ops: index_select and index_add and embedding gradients with repeated indices") {
  Tensor x = random({4, 5, 3}, 31).set_requires_grad();
  for (int64_t dim : {0, 1, 2}) {
    Tensor index = from_vector(std::vector<int32_t>{2, 0, 2, 1, 2}, {5});
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(index_select(in[0], dim, index)); }, {x}, 1e-6,
              1e-6, fmt::format("index_select dim {}", dim));
    Shape src_shape = x.shape();
    src_shape[dim] = 5;
    Tensor src = random(src_shape, 32 + dim).set_requires_grad();
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(index_add(in[0], dim, index, in[1])); },
              {x, src}, 1e-6, 1e-6, fmt::format("index_add dim {}", dim));
  }
  Tensor weight = random({6, 4}, 35).set_requires_grad();
  Tensor ids = from_vector(std::vector<int32_t>{5, 0, 5, 5, 2, 0, 1, 5, 3, 3}, {2, 5});
  gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(embedding(in[0], ids)); }, {weight}, 1e-6, 1e-6,
            "embedding");
}

// ---- gather / scatter_add -------------------------------------------------------------------------------------------

TEST_CASE("ops: gather and scatter_add forward match naive loops (index smaller than x off dim)") {
  struct Case {
    Shape x, index;
    int64_t dim;
  };
  const std::vector<Case> cases = {{{7}, {9}, 0},          {{3, 5}, {3, 9}, 1},       {{3, 5}, {7, 5}, 0},
                                   {{3, 5}, {2, 4}, 1},    {{4, 7, 5}, {3, 9, 2}, 1}, {{4, 7, 5}, {4, 7, 33}, 2},
                                   {{4, 7, 5}, {1, 1, 1}, -3}, {{33, 65}, {33, 65}, -1}, {{65, 2}, {1, 2}, 0}};
  uint64_t seed = 41;
  for (DType dtype : {DType::F32, DType::F64})
    for (const Case& c : cases) {
      int64_t dim = c.dim < 0 ? c.dim + static_cast<int64_t>(c.x.size()) : c.dim;
      Tensor x = random(c.x, seed++, dtype);
      Tensor index = random_ids(c.index, static_cast<int32_t>(c.x[dim]), seed++);
      Tensor src = random(c.index, seed++, dtype);
      std::string what = fmt::format("{} dim {} index {}", x.str(), c.dim, index.str());
      check_equal(gather(x, c.dim, index), reference_gather(x, dim, index), "gather " + what);
      check_close(scatter_add(x, c.dim, index, src), reference_scatter_add(x, dim, index, src), sum_tolerance(dtype),
                  1.0, "scatter_add " + what);
    }
  // Threaded: 2 outer rows x 2000 inner columns, with 40 repeated positions along dim 1 hitting 3 rows.
  Tensor x = random({2, 3, 2000}, 51, DType::F32), index = random_ids({2, 40, 2000}, 3, 52);
  Tensor src = random({2, 40, 2000}, 53, DType::F32);
  Tensor first = scatter_add(x, 1, index, src);
  check_close(first, reference_scatter_add(x, 1, index, src), 1e-4, 1.0, "scatter_add threaded");
  CHECK(scatter_add(x, 1, index, src).to_vector<float>() == first.to_vector<float>());
}

TEST_CASE("ops: gather and scatter_add gradients (repeated indices)") {
  Tensor x = random({3, 4, 5}, 61).set_requires_grad();
  struct Case {
    Shape index;
    int64_t dim;
  };
  uint64_t seed = 62;
  for (const Case& c : std::vector<Case>{{{3, 6, 2}, 1}, {{5, 4, 5}, 0}, {{2, 3, 7}, 2}}) {
    Tensor index = random_ids(c.index, static_cast<int32_t>(x.size(c.dim)), seed++);
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(gather(in[0], c.dim, index)); }, {x}, 1e-6, 1e-6,
              fmt::format("gather dim {}", c.dim));
    Tensor src = random(c.index, seed++).set_requires_grad();
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(scatter_add(in[0], c.dim, index, in[1])); },
              {x, src}, 1e-6, 1e-6, fmt::format("scatter_add dim {}", c.dim));
  }
}

// ---- where / masked_fill --------------------------------------------------------------------------------------------

TEST_CASE("ops: where and masked_fill forward with broadcasting") {
  struct Case {
    Shape cond, a, b, out;
  };
  const std::vector<Case> cases = {{{7}, {7}, {7}, {7}},           {{3, 1}, {3, 5}, {5}, {3, 5}},
                                   {{1, 33}, {}, {7, 33}, {7, 33}}, {{2, 3, 1}, {1, 65}, {3, 65}, {2, 3, 65}},
                                   {{}, {4}, {1}, {4}}};
  uint64_t seed = 71;
  for (DType dtype : {DType::F32, DType::F64})
    for (const Case& c : cases) {
      Tensor cond = random_ids(c.cond, 2, seed++), a = random(c.a, seed++, dtype), b = random(c.b, seed++, dtype);
      Tensor out = where(cond, a, b);
      check_equal(out, reference_where(cond, a, b, c.out), fmt::format("where {} {} {}", cond.str(), a.str(), b.str()));
    }
  // Nonzero means true; infinities pass through untouched (attention masks rely on it). -inf is the point here, so
  // the NaN/Inf debug checks (on in MOELAB_NAN_CHECKS builds) are off for this part.
  bool checks_were_on = nan_checks();
  set_nan_checks(false);
  Tensor x = from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor mask = from_vector(std::vector<int32_t>{0, 7, -1}, {1, 3});
  CHECK(masked_fill(x, mask, -INFINITY).to_vector<float>() ==
        std::vector<float>{1, -INFINITY, -INFINITY, 4, -INFINITY, -INFINITY});
  CHECK(masked_fill(x, from_vector(std::vector<int32_t>{1, 0}, {2, 1}), 0.5).to_vector<float>() ==
        std::vector<float>{0.5f, 0.5f, 0.5f, 4, 5, 6});
  set_nan_checks(checks_were_on);
}

TEST_CASE("ops: where and masked_fill gradients are summed back over broadcast dims") {
  Tensor cond = from_vector(std::vector<int32_t>{1, 0, 1}, {3, 1});
  Tensor a = random({3, 4}, 81).set_requires_grad(), b = random({4}, 82).set_requires_grad();
  gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(where(cond, in[0], in[1])); }, {a, b}, 1e-6, 1e-6,
            "where");
  Tensor s = random({}, 83).set_requires_grad(), c = random({2, 1, 3}, 84).set_requires_grad();
  Tensor cond2 = random_ids({2, 4, 1}, 2, 85);
  gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(where(cond2, in[0], in[1])); }, {s, c}, 1e-6, 1e-6,
            "where scalar");
  Tensor x = random({3, 4}, 86).set_requires_grad();
  Tensor mask = from_vector(std::vector<int32_t>{0, 1, 1, 0}, {1, 4});
  gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(masked_fill(in[0], mask, 3.0)); }, {x}, 1e-6, 1e-6,
            "masked_fill");
  // The filled positions get exactly zero gradient.
  x.zero_grad();
  sum(masked_fill(x, mask, 3.0)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1});
}

// ---- topk / argsort / bincount --------------------------------------------------------------------------------------

TEST_CASE("ops: topk gives values descending with ties to the lower index") {
  Tensor x = from_vector(std::vector<float>{3, 1, 3, 2, 3, 0, 5, 5, 5, 5, 5, 5}, {2, 6});
  auto [values, indices] = topk(x, 4);
  CHECK(values.shape() == Shape{2, 4});
  CHECK(values.to_vector<float>() == std::vector<float>{3, 3, 3, 2, 5, 5, 5, 5});
  CHECK(indices.to_vector<int32_t>() == std::vector<int32_t>{0, 2, 4, 3, 0, 1, 2, 3});
  CHECK(indices.dtype() == DType::I32);
  // Random rows with many ties (values from a small set), against repeated selection.
  uint64_t seed = 91;
  const std::vector<std::pair<Shape, int64_t>> cases = {
      {{1}, 1}, {{7, 33}, 5}, {{3, 65}, 65}, {{2, 3, 7}, 0}, {{4, 9}, 2}};
  for (auto [shape, k] : cases) {
    Tensor ids = random_ids(shape, 4, seed++);
    for (DType dtype : {DType::F32, DType::F64}) {
      Tensor t = tensor_of(as_doubles(ids), shape, dtype);
      auto [v, i] = topk(t, k);
      auto [want_v, want_i] = reference_topk(t, k);
      CHECK(as_doubles(v) == want_v);
      CHECK(i.to_vector<int32_t>() == want_i);
    }
    auto [v, i] = topk(ids, k);  // i32 input
    CHECK(i.to_vector<int32_t>() == reference_topk(ids, k).second);
  }
  // NaN ranks above everything.
  auto [nv, ni] = topk(from_vector(std::vector<float>{1, NAN, 2}, {3}), 2);
  CHECK(std::isnan(nv.to_vector<float>()[0]));
  CHECK(ni.to_vector<int32_t>() == std::vector<int32_t>{1, 2});
}

TEST_CASE("ops: argsort is stable in both directions for f32 and f64 and i32") {
  Tensor x = from_vector(std::vector<float>{2, 1, 2, 0, 1}, {5});
  CHECK(argsort(x).to_vector<int32_t>() == std::vector<int32_t>{3, 1, 4, 0, 2});
  CHECK(argsort(x, true).to_vector<int32_t>() == std::vector<int32_t>{0, 2, 1, 4, 3});
  uint64_t seed = 101;
  for (const Shape& shape : {Shape{1}, Shape{5, 33}, Shape{2, 65}, Shape{3, 1, 7}}) {
    Tensor ids = random_ids(shape, 5, seed++);
    for (bool descending : {false, true}) {
      std::vector<int32_t> want = reference_argsort(ids, descending);
      CHECK(argsort(ids, descending).to_vector<int32_t>() == want);
      CHECK(argsort(tensor_of(as_doubles(ids), shape, DType::F32), descending).to_vector<int32_t>() == want);
      CHECK(argsort(tensor_of(as_doubles(ids), shape, DType::F64), descending).to_vector<int32_t>() == want);
    }
    // Distinct values: the order is fully determined by the values.
    Tensor r = random(shape, seed++, DType::F32);
    CHECK(argsort(r).to_vector<int32_t>() == reference_argsort(r, false));
  }
}

TEST_CASE("ops: bincount counts every id") {
  CHECK(bincount(from_vector(std::vector<int32_t>{0, 2, 2, 5, 0, 2}, {6}), 6).to_vector<int32_t>() ==
        std::vector<int32_t>{2, 0, 3, 0, 0, 1});
  CHECK(bincount(from_vector(std::vector<int32_t>{}, {0}), 3).to_vector<int32_t>() == std::vector<int32_t>{0, 0, 0});
  Tensor ids = random_ids({300, 7}, 37, 111);
  std::vector<int32_t> want(37, 0);
  for (int32_t id : ids.to_vector<int32_t>()) ++want[id];
  Tensor counts = bincount(ids, 37);
  CHECK(counts.shape() == Shape{37});
  CHECK(counts.to_vector<int32_t>() == want);
}

// ---- bad use --------------------------------------------------------------------------------------------------------

TEST_CASE("ops: indexing bad use throws naming the op and the index and the bound") {
  Tensor x = random({3, 5}, 1, DType::F32);
  Tensor bad = from_vector(std::vector<int32_t>{0, 5}, {2});
  check_error([&] { (void)index_select(x, 1, bad); }, {"index_select", "index 5", "[0, 5)", "f32[3, 5]"});
  check_error([&] { (void)index_select(x, 0, from_vector(std::vector<int32_t>{-1}, {1})); },
              {"index_select", "index -1", "[0, 3)"});
  check_error([&] { (void)index_select(x, 2, from_vector(std::vector<int32_t>{0}, {1})); }, {"index_select", "dim 2"});
  check_error([&] { (void)index_select(x, 0, from_vector(std::vector<float>{0}, {1})); },
              {"index_select", "i32", "f32[1]"});
  check_error([&] { (void)index_add(x, 1, bad, random({3, 2}, 2, DType::F32)); }, {"index_add", "index 5", "[0, 5)"});
  check_error([&] {
    (void)index_add(x, 1, from_vector(std::vector<int32_t>{0, 1}, {2}), random({3, 3}, 2, DType::F32));
  }, {"index_add", "f32[3, 3]", "f32[3, 5]"});
  check_error([&] {
    (void)index_add(x, 1, from_vector(std::vector<int32_t>{0, 1}, {2}), random({3, 2}, 2, DType::F64));
  }, {"index_add", "f32[3, 5]", "f64[3, 2]"});
  check_error([&] { (void)embedding(random({4, 2}, 3, DType::F32), from_vector(std::vector<int32_t>{1, 4}, {2})); },
              {"embedding", "index 4", "[0, 4)"});
  check_error([&] { (void)embedding(random({4}, 3, DType::F32), from_vector(std::vector<int32_t>{1}, {1})); },
              {"embedding", "f32[4]"});
  check_error([&] { (void)gather(x, 1, from_vector(std::vector<int32_t>{0, 9}, {1, 2})); },
              {"gather", "index 9", "[0, 5)"});
  check_error([&] { (void)gather(x, 1, from_vector(std::vector<int32_t>{0, 1}, {2})); },
              {"gather", "i32[2]", "f32[3, 5]"});
  check_error([&] { (void)gather(x, 1, random_ids({4, 2}, 5, 4)); }, {"gather", "i32[4, 2]", "f32[3, 5]"});
  check_error([&] { (void)scatter_add(x, 0, random_ids({2, 5}, 3, 5), random({2, 4}, 6, DType::F32)); },
              {"scatter_add", "f32[2, 4]", "i32[2, 5]"});
  check_error([&] {
    (void)scatter_add(x, 0, from_vector(std::vector<int32_t>{3}, {1, 1}), random({1, 1}, 6, DType::F32));
  }, {"scatter_add", "index 3", "[0, 3)"});
  check_error([&] { (void)where(random({3, 5}, 7, DType::F32), x, x); }, {"where", "cond", "f32[3, 5]"});
  check_error([&] { (void)where(random_ids({3, 5}, 2, 8), x, random({4, 5}, 9, DType::F32)); },
              {"where", "f32[3, 5]", "f32[4, 5]"});
  check_error([&] { (void)where(random_ids({3, 5}, 2, 8), x, random({3, 5}, 9, DType::F64)); },
              {"where", "f32[3, 5]", "f64[3, 5]"});
  check_error([&] { (void)masked_fill(x, random_ids({2, 3, 5}, 2, 10), 0.0); },
              {"masked_fill", "i32[2, 3, 5]", "f32[3, 5]"});
  check_error([&] { (void)masked_fill(x, random({3, 5}, 10, DType::F32), 0.0); }, {"masked_fill", "mask", "i32"});
  check_error([&] { (void)topk(x, 6); }, {"topk", "k = 6", "f32[3, 5]"});
  check_error([&] { (void)topk(random({}, 1, DType::F32), 1); }, {"topk", "f32[]"});
  check_error([&] { (void)argsort(random({}, 1, DType::F32)); }, {"argsort", "f32[]"});
  check_error([&] { (void)bincount(from_vector(std::vector<int32_t>{0, 8}, {2}), 8); }, {"bincount", "id 8", "[0, 8)"});
  check_error([&] { (void)bincount(from_vector(std::vector<int32_t>{-2}, {1}), 8); }, {"bincount", "id -2", "[0, 8)"});
  check_error([&] { (void)bincount(random({3}, 1, DType::F32), 8); }, {"bincount", "i32", "f32[3]"});
}
