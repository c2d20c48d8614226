// Tests of the tape (autograd.cpp): accumulation, no-grad mode, freeing the graph, errors, deep graphs, NaN checks,
// and the gradients of the shape ops (shape.cpp), which route gradients rather than compute them.
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/profile.h"
#include "tests/testing.h"

using namespace moelab;
using moelab::testing::check_mentions;
using moelab::testing::error_of;
using moelab::testing::gradcheck;
using moelab::testing::random;
using moelab::testing::weighted_sum;

namespace {
Tensor leaf(const std::vector<double>& values, const Shape& shape) {
  return from_vector(values, shape).set_requires_grad();
}

// Restores the NaN-check setting on scope exit, even when a check fails.
struct NanChecksScope {
  bool previous = nan_checks();
  explicit NanChecksScope(bool on) { set_nan_checks(on); }
  ~NanChecksScope() { set_nan_checks(previous); }
};

}  // namespace

TEST_CASE("autograd: a tensor used twice gets both contributions") {
  Tensor x = leaf({1.5, -2.0, 3.0}, {3});
  sum(mul(x, x)).backward();  // d(x^2)/dx = 2x
  CHECK(x.grad().to_vector<double>() == std::vector<double>{3.0, -4.0, 6.0});
  x.zero_grad();
  sum(add(x, x)).backward();  // add hands the same gradient tensor to both inputs
  CHECK(x.grad().to_vector<double>() == std::vector<double>{2.0, 2.0, 2.0});
  x.zero_grad();
  // An intermediate used twice: y = exp(x); d/dx sum(y*y + y) = (2y + 1) y.
  Tensor y = exp(x);
  sum(add(mul(y, y), y)).backward();
  std::vector<double> e = exp(x.detach()).to_vector<double>(), g = x.grad().to_vector<double>();
  for (size_t i = 0; i < 3; ++i) CHECK(g[i] == doctest::Approx((2 * e[i] + 1) * e[i]).epsilon(1e-14));
  // A diamond: a feeds b and c, both feed the loss.
  Tensor w = random({2, 3}, 5).set_requires_grad();
  gradcheck(
      [](const std::vector<Tensor>& in) {
        Tensor a = mul(in[0], 2.0), b = exp(a), c = mul(a, b);
        return weighted_sum(add(c, tanh(b)));
      },
      {w}, 1e-6, 1e-6, "diamond");
}

TEST_CASE("autograd: backward calls accumulate into leaves until zero_grad") {
  Tensor x = leaf({1.0, 2.0}, {2});
  sum(mul(x, 3.0)).backward();
  Tensor first = x.grad();
  CHECK(first.to_vector<double>() == std::vector<double>{3.0, 3.0});
  sum(mul(x, x)).backward();  // + 2x
  CHECK(x.grad().to_vector<double>() == std::vector<double>{5.0, 7.0});
  CHECK(first.to_vector<double>() == std::vector<double>{3.0, 3.0});  // accumulation is out of place
  x.zero_grad();
  CHECK_FALSE(x.grad().defined());
  sum(x).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{1.0, 1.0});

  // Two leaves that received the very same gradient tensor (add) stay independent afterwards.
  Tensor a = leaf({1.0, 1.0}, {2}), b = leaf({2.0, 2.0}, {2});
  sum(add(a, b)).backward();
  sum(mul(a, 4.0)).backward();
  CHECK(a.grad().to_vector<double>() == std::vector<double>{5.0, 5.0});
  CHECK(b.grad().to_vector<double>() == std::vector<double>{1.0, 1.0});

  // A leaf the loss does not reach keeps no gradient; one that does not require a gradient gets none.
  Tensor unused = leaf({1.0}, {1}), constant = from_vector(std::vector<double>{2.0, 2.0}, {2});
  sum(mul(a, constant)).backward();
  CHECK_FALSE(unused.grad().defined());
  CHECK_FALSE(constant.grad().defined());
}

TEST_CASE("autograd: leaves never share gradient storage") {
  // Optimizer code edits gradients in place (e.g. torch's clip_grad_norm_ scales each p.grad() in place). If two leaves'
  // gradients were one buffer, that buffer would be scaled twice. add hands the same tensor to both of its inputs,
  // and reshape/clone pass views of it along, so backward must give each leaf a buffer of its own.
  Tensor a = leaf({1.0, 2.0}, {2}), b = leaf({3.0, 4.0}, {2}), c = leaf({5.0, 6.0}, {1, 2});
  sum(add(add(a, b), reshape(c, {2}))).backward();
  REQUIRE(a.grad().defined());
  REQUIRE(b.grad().defined());
  REQUIRE(c.grad().defined());
  CHECK(a.grad().impl()->storage != b.grad().impl()->storage);
  CHECK(a.grad().impl()->storage != c.grad().impl()->storage);
  CHECK(b.grad().impl()->storage != c.grad().impl()->storage);
  // What goes wrong otherwise: scaling one gradient in place must leave the others alone.
  Tensor ga = a.grad();
  ga.data<double>()[0] = 0.5;
  CHECK(b.grad().to_vector<double>() == std::vector<double>{1.0, 1.0});
  CHECK(c.grad().to_vector<double>() == std::vector<double>{1.0, 1.0});
}

TEST_CASE("autograd: a leaf keeps a gradient nothing else holds, and copies one that is held elsewhere") {
  // A product's weight gradient is a fresh tensor that only the tape holds: copying it would move every weight
  // gradient's bytes twice more each step. One that something else still holds must be copied, as above.
  for (bool held_elsewhere : {false, true}) {
    Tensor w = leaf({1.0, 2.0}, {2});
    Tensor elsewhere;
    const void* given = nullptr;
    Tensor y = record("twice", mul(w.detach(), 2.0), {w}, [&](const Tensor& g) -> std::vector<Tensor> {
      Tensor dw = mul(g, 2.0);
      given = dw.raw_data();
      if (held_elsewhere) elsewhere = dw;
      return {dw};
    });
    sum(y).backward();
    CHECK_MESSAGE((w.grad().raw_data() == given) == !held_elsewhere, "held elsewhere: ", held_elsewhere);
    CHECK(w.grad().to_vector<double>() == std::vector<double>{2.0, 2.0});
    if (held_elsewhere) CHECK(elsewhere.raw_data() == given);
  }
}

TEST_CASE("autograd: an accumulating backward is offered the gradient an input holds alone, and may add to it") {
  // y_i = 2 x for three uses of x; each use's backward adds 2 g into the gradient x holds when offered one.
  Tensor x = leaf({1.0, 2.0}, {2});
  std::vector<bool> offered;
  auto use = [&](const Tensor& input) {
    return record_accumulating("twice", mul(input.detach(), 2.0), {input},
                               [&](const Tensor& g, const std::vector<Tensor>& held) -> std::vector<Tensor> {
                                 offered.push_back(!held.empty() && held[0].defined());
                                 if (offered.back()) {
                                   Tensor into = held[0];
                                   copy_(into, add(held[0], mul(g, 2.0)));  // the sum, written over it
                                   return {into};
                                 }
                                 return {mul(g, 2.0)};
                               });
  };
  Tensor h = mul(x, 1.0);  // an intermediate: its gradient is the sum of the three uses'
  sum(add(add(use(h), mul(use(h), 3.0)), use(h))).backward();
  // The first use to run (the last in the graph) makes h's gradient; the two after it are offered it and add to it.
  CHECK(offered == std::vector<bool>{false, true, true});
  CHECK(x.grad().to_vector<double>() == std::vector<double>{10.0, 10.0});  // 2 + 6 + 2
  // A gradient that something else holds is not offered: add hands one tensor to both of its inputs.
  offered.clear();
  x.zero_grad();
  Tensor y = mul(x, 1.0);
  sum(add(y, use(y))).backward();
  CHECK(offered == std::vector<bool>{false});
  CHECK(x.grad().to_vector<double>() == std::vector<double>{3.0, 3.0});
}

TEST_CASE("autograd: one gradient tensor handed to two inputs that are one intermediate counts twice") {
  // add's backward returns g itself for both of its inputs: h's gradient is 2 g, not g (nothing was added in place).
  Tensor x = leaf({1.0, 2.0}, {2});
  Tensor h = mul(x, 3.0);
  sum(add(h, h)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{6.0, 6.0});
  x.zero_grad();
  Tensor c = leaf({5.0, 5.0}, {2});
  Tensor k = mul(x, 1.0);
  sum(add(k, add(k, c))).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{2.0, 2.0});
}

TEST_CASE("autograd: a bf16 tensor's gradients from two uses are added in f32 and rounded once") {
  // t bf16 feeds two RoPEs (bf16 gradients, not added in place): the second gradient is added to the first by
  // backward itself, which `add` could not do on bf16 tensors.
  const Tensor x0 = random({1, 4, 2, 8}, 40, DType::F32);
  const Tensor c1 = random({1, 4, 2, 8}, 41, DType::F32), c2 = random({1, 4, 2, 8}, 42, DType::F32);
  auto path = [](const Tensor& t, double theta, const Tensor& c) {
    return sum(mul(to_dtype(rope(t, theta), DType::F32), c));
  };
  Tensor x = testing::leaf(x0, DType::F32);
  const Tensor t = to_dtype(x, DType::BF16);
  add(path(t, 10000.0, c1), path(t, 500.0, c2)).backward();
  // Each path alone gives its bf16 gradient (widened in x's).
  Tensor x1 = testing::leaf(x0, DType::F32), x2 = testing::leaf(x0, DType::F32);
  path(to_dtype(x1, DType::BF16), 10000.0, c1).backward();
  path(to_dtype(x2, DType::BF16), 500.0, c2).backward();
  const Tensor want = to_dtype(to_dtype(add(x1.grad(), x2.grad()), DType::BF16), DType::F32);
  CHECK(testing::bitwise_equal(x.grad(), want));
}

TEST_CASE("autograd: backward from a leaf accumulates like from any other loss") {
  Tensor x = leaf({2.0}, {});
  x.backward();
  CHECK(x.grad().item() == 1.0);
  x.backward();
  CHECK_MESSAGE(x.grad().item() == 2.0, "a second backward() of a leaf loss must accumulate, not overwrite");
}

TEST_CASE("autograd: requires_grad propagates, detach and i32 cut the graph") {
  Tensor x = leaf({1.0, 2.0}, {2}), c = from_vector(std::vector<double>{3.0, 4.0}, {2});
  CHECK(x.requires_grad());
  CHECK(x.is_leaf());
  Tensor y = mul(x, c);
  CHECK(y.requires_grad());
  CHECK_FALSE(y.is_leaf());
  CHECK(std::string(y.grad_fn()->op) == "mul");
  CHECK(y.grad_fn()->inputs.size() == 2);
  CHECK(y.grad_fn()->inputs[0].same(x));
  Tensor z = mul(c, c);
  CHECK_FALSE(z.requires_grad());
  CHECK(z.is_leaf());

  Tensor d = y.detach();
  CHECK(d.impl()->storage == y.impl()->storage);
  CHECK_FALSE(d.requires_grad());
  CHECK(d.is_leaf());
  check_mentions(error_of([&] { sum(d).backward(); }), {"backward", "does not require a gradient"});
  // Gradient stops at the detached branch: only the attached use of x counts.
  sum(add(mul(y.detach(), x), x)).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>{4.0, 9.0});  // d/dx (y * x + x) with y constant: y + 1

  check_mentions(error_of([] { zeros({2}, DType::I32).set_requires_grad(); }), {"i32"});
  // An op producing i32 records nothing.
  Tensor xf = leaf({1.7, -2.2}, {2});
  Tensor as_int = to_dtype(xf, DType::I32);
  CHECK_FALSE(as_int.requires_grad());
  CHECK(as_int.grad_fn() == nullptr);
  // A float op of an int-derived tensor and a leaf still reaches the leaf.
  sum(mul(to_dtype(as_int, DType::F64), xf)).backward();
  CHECK(xf.grad().to_vector<double>() == std::vector<double>{1.0, -2.0});
  // Turning it off again makes a plain tensor.
  x.set_requires_grad(false);
  CHECK_FALSE(mul(x, c).requires_grad());
}

TEST_CASE("autograd: no-grad scope records nothing and restores the previous mode") {
  Tensor x = leaf({1.0, 2.0}, {2});
  CHECK(grad_enabled());
  {
    NoGradGuard no_grad;
    CHECK_FALSE(grad_enabled());
    Tensor y = exp(mul(x, 2.0));
    CHECK_FALSE(y.requires_grad());
    CHECK(y.grad_fn() == nullptr);
    CHECK(y.to_vector<double>()[0] == doctest::Approx(std::exp(2.0)));
    {
      NoGradGuard nested;
      CHECK_FALSE(grad_enabled());
    }
    CHECK_FALSE(grad_enabled());  // the inner guard restores "off", not "on"
    check_mentions(error_of([&] { sum(y).backward(); }), {"backward"});
  }
  CHECK(grad_enabled());
  Tensor y = mul(x, 2.0);
  CHECK(y.requires_grad());
  CHECK(y.grad_fn() != nullptr);
  // A guard unwinds with an exception too.
  try {
    NoGradGuard no_grad;
    throw std::runtime_error("unwind");
  } catch (const std::runtime_error&) {
  }
  CHECK(grad_enabled());
}

TEST_CASE("autograd: backward frees the graph: intermediates lose their grads and a second pass throws") {
  Tensor x = leaf({0.5, -1.0, 2.0}, {3});
  std::weak_ptr<Storage> y_storage, z_storage;
  Tensor loss, z;
  {
    Tensor y = mul(x, 2.0);  // only exp's node keeps y once this scope ends
    z = exp(y);
    loss = sum(z);
    y_storage = y.impl()->storage;
    z_storage = z.impl()->storage;
  }
  CHECK_FALSE(y_storage.expired());
  loss.backward();
  CHECK(x.grad().defined());
  // Intermediate and root gradients are dropped, nodes are emptied.
  CHECK_FALSE(z.grad().defined());
  CHECK_FALSE(loss.grad().defined());
  REQUIRE(loss.grad_fn() != nullptr);
  CHECK(loss.grad_fn()->inputs.empty());
  CHECK_FALSE(static_cast<bool>(loss.grad_fn()->backward));
  CHECK(z.grad_fn()->inputs.empty());
  // The tensors only the graph held are released.
  CHECK(y_storage.expired());
  CHECK_FALSE(z_storage.expired());  // we still hold z
  z = Tensor();
  CHECK(z_storage.expired());

  std::string msg = error_of([&] { loss.backward(); });
  check_mentions(msg, {"sum", "freed"});
  CHECK_THROWS_AS(loss.backward(), std::logic_error);
  // The leaf's gradient is untouched by the failed pass.
  std::vector<double> ex = exp(mul(x.detach(), 2.0)).to_vector<double>(), g = x.grad().to_vector<double>();
  for (size_t i = 0; i < 3; ++i) CHECK(g[i] == doctest::Approx(2 * ex[i]).epsilon(1e-14));
}

TEST_CASE("autograd: backward needs a one-element loss that requires a gradient") {
  Tensor x = random({2, 3}, 1).set_requires_grad();
  Tensor y = mul(x, 2.0);
  std::string msg = error_of([&] { y.backward(); });
  check_mentions(msg, {"backward", "one-element", "f64[2, 3]"});
  CHECK_THROWS_AS(y.backward(), std::invalid_argument);
  CHECK_FALSE(x.grad().defined());
  // [1, 1] is one element: fine.
  reshape(sum(y), {1, 1}).backward();
  CHECK(x.grad().to_vector<double>() == std::vector<double>(6, 2.0));
  check_mentions(error_of([] { sum(zeros({3})).backward(); }), {"backward", "does not require a gradient"});
}

TEST_CASE("autograd: a chain of 10^4 ops neither overflows the stack nor loses precision") {
  const int n = 10000;
  Tensor x = leaf({0.25}, {});
  Tensor y = x;
  for (int i = 0; i < n; ++i) y = (i % 2 == 0) ? add(y, 1.0) : mul(y, 1.0);
  CHECK(y.item() == 0.25 + n / 2);
  y.backward();
  CHECK(x.grad().item() == 1.0);
  // A deep graph dropped without backward is destroyed without overflowing too.
  Tensor z = x;
  for (int i = 0; i < n; ++i) z = tanh(z);
  CHECK(z.requires_grad());
  z = Tensor();
  // A deep chain with wide tensors and a real derivative: d/dx (x * 1.0001^n) over a product chain.
  Tensor w = leaf({1.0, 2.0}, {2});
  Tensor p = w;
  for (int i = 0; i < 2000; ++i) p = mul(p, 1.0001);
  sum(p).backward();
  for (double g : w.grad().to_vector<double>()) CHECK(g == doctest::Approx(std::pow(1.0001, 2000)).epsilon(1e-12));
}

TEST_CASE("autograd: NaN checks name the op that produced a NaN and let infinities pass") {
  NanChecksScope on(true);
  CHECK(nan_checks());
  Tensor neg_one = from_vector(std::vector<double>{1.0, -1.0}, {2});
  std::string msg = error_of([&] { log(neg_one); });
  check_mentions(msg, {"NaN check", "'log'", "flat index 1", "f64[2]"});
  CHECK_THROWS_AS(log(neg_one), std::runtime_error);
  check_mentions(error_of([] { div(zeros({2}), zeros({2})); }), {"'div'", "nan", "f32[2]"});  // 0/0
  // bf16 outputs too (mixed precision's q, k, v): the bf16 copy of a NaN.
  const Tensor with_nan = from_vector(std::vector<float>{0.f, std::nanf("")}, {2});
  check_mentions(error_of([&] { to_dtype(with_nan, DType::BF16); }), {"'to_dtype'", "flat index 1", "bf16[2]"});
  // Infinities are legitimate values (an attention mask is -inf; exp overflows): only NaN is an error.
  CHECK(std::isinf(exp(from_vector(std::vector<float>{1000.f}, {1})).item()));
  CHECK(std::isinf(div(ones({2}), zeros({2})).to_vector<float>()[0]));
  check_mentions(error_of([] {
                   Tensor inf = div(ones({1}), zeros({1}));
                   sub(inf, inf);  // inf - inf = NaN
                 }),
                 {"'sub'"});
  // Finite results pass; the check also runs inside backward's own ops and under no-grad.
  Tensor x = random({3}, 2).set_requires_grad();
  sum(exp(x)).backward();
  CHECK(x.grad().defined());
  {
    NoGradGuard no_grad;
    CHECK_THROWS_AS(sqrt(neg_one), std::runtime_error);
  }
  // Off: NaN flows through silently.
  set_nan_checks(false);
  CHECK(std::isnan(log(neg_one).to_vector<double>()[1]));
}

// ---- gradients of the shape ops -------------------------------------------------------------------------------------

TEST_CASE("autograd: row blocks of one weight used apart get their gradients in its rows, with no full-size add") {
  // w [6, 4] as three blocks of 2 rows, one per product (attention's wqkv and its q, k and v products).
  const Tensor w0 = random({6, 4}, 820), x = random({5, 4}, 821), v = random({2, 1}, 822);
  Tensor w = testing::leaf(w0, DType::F64);
  auto use = [&](const Tensor& weight, int64_t block) {
    return sum(matmul(matmul(x, slice_rows(weight, 2 * block, 2 * block + 2), false, true), v));
  };
  const Tensor loss = add(add(use(w, 0), use(w, 1)), use(w, 2));
  std::vector<KernelTime> kernels;
  {
    KernelProfile profile;  // the backward only
    loss.backward();
    kernels = profile.totals();
  }
  const double full_add_bytes = 3.0 * w0.numel() * 8;  // two reads and a write of a [6, 4] f64 tensor
  double add_bytes = 0;
  for (const KernelTime& k : kernels)
    if (k.name == "binary_forward") add_bytes += k.bytes;
  CHECK_MESSAGE(add_bytes < full_add_bytes, "the blocks' gradients were added full-size: " << add_bytes << " bytes");
  // Each block's rows hold its own product's gradient, bit for bit.
  for (int64_t block = 0; block < 3; ++block) {
    Tensor alone = testing::leaf(w0, DType::F64);
    use(alone, block).backward();
    CHECK(testing::bitwise_equal(slice_rows(w.grad(), 2 * block, 2 * block + 2),
                                 slice_rows(alone.grad(), 2 * block, 2 * block + 2)));
  }
}

TEST_CASE("autograd: shape ops route gradients back (reshape, slice_rows, transpose, permute, concat, split, clone)") {
  uint64_t seed = 800;
  auto check = [&](const char* what, const Shape& shape, const std::function<Tensor(const Tensor&)>& f) {
    Tensor x = random(shape, seed++).set_requires_grad();
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(f(in[0])); }, {x}, 1e-6, 1e-6, what);
    CHECK(x.grad().shape() == shape);
  };
  check("reshape", {2, 6}, [](const Tensor& x) { return reshape(x, {3, -1}); });
  check("slice_rows", {5, 3}, [](const Tensor& x) { return slice_rows(x, 1, 4); });
  check("slice_rows of reshape", {4, 6}, [](const Tensor& x) { return slice_rows(reshape(x, {8, 3}), 2, 7); });
  check("two slices, overlapping", {5, 2},
        [](const Tensor& x) { return add(slice_rows(x, 0, 3), mul(slice_rows(x, 2, 5), 3.0)); });
  check("transpose", {3, 5}, [](const Tensor& x) { return transpose(x, 0, 1); });
  check("transpose 3-d", {2, 3, 4}, [](const Tensor& x) { return transpose(x, 0, 2); });
  check("permute", {2, 3, 4, 5}, [](const Tensor& x) { return permute(x, {2, 0, 3, 1}); });
  check("clone", {4}, [](const Tensor& x) { return clone(x); });
  check("to_device same device", {4}, [](const Tensor& x) { return to_device(x, Device::CPU); });
  // split: each part is weighted differently so every element's route is seen; the parts are used out of order.
  for (int64_t dim : {0, 1, 2}) {
    Tensor x = random({4, 5, 6}, seed++).set_requires_grad();
    int64_t n = x.size(dim);
    gradcheck(
        [&](const std::vector<Tensor>& in) {
          std::vector<Tensor> parts = split(in[0], {1, n - 3, 2}, dim);
          return add(add(weighted_sum(parts[2], 1), weighted_sum(parts[0], 2)), weighted_sum(parts[1], 3));
        },
        {x}, 1e-6, 1e-6, fmt::format("split dim {}", dim));
    // Only some parts used: the others contribute zero.
    x.zero_grad();
    sum(split(x, {1, n - 1}, dim)[0]).backward();
    CHECK(sum(x.grad()).item() == doctest::Approx(static_cast<double>(x.numel() / n)));
  }
  // concat of three tensors, one of them twice.
  for (int64_t dim : {0, 1, -1}) {
    Tensor a = random({2, 3, 4}, seed++).set_requires_grad(), b = random({2, 3, 4}, seed++).set_requires_grad();
    gradcheck([&](const std::vector<Tensor>& in) { return weighted_sum(concat({in[0], in[1], in[0]}, dim)); }, {a, b},
              1e-6, 1e-6, fmt::format("concat dim {}", dim));
  }
  // to_dtype: the gradient comes back in the input's dtype.
  Tensor x = random({3}, seed++).set_requires_grad();
  Tensor w32 = from_vector(std::vector<float>{1.f, -2.f, 0.5f}, {3});
  sum(mul(to_dtype(x, DType::F32), w32)).backward();
  CHECK(x.grad().dtype() == DType::F64);
  CHECK(x.grad().to_vector<double>() == std::vector<double>{1.0, -2.0, 0.5});
}
