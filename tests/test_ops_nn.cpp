// Fused neural-net ops (engine/ops/nn.cpp): cross-entropy, RMSNorm, RoPE, causal attention.
// Each forward is checked against a plain-loop reference in double, each backward by central differences (f64) and
// by agreement of the f32 path with the f64 path, plus small cases worked out by hand and bad use.
#include <omp.h>

#include <cmath>
#include <stdexcept>

#include "engine/kernels/nn.h"
#include "engine/precision.h"
#include "engine/profile.h"
#include "nn/layers.h"
#include "tests/testing.h"

namespace moelab {
using testing::as_doubles;
using testing::check_close;
using testing::gradcheck;
using testing::random;
using testing::weighted_sum;

namespace {

Tensor f64_tensor(const std::vector<double>& values, const Shape& shape) {
  return from_vector(values, shape, DType::F64);
}

// Leaf copies of `inputs` in `dtype`, each requiring a gradient.
std::vector<Tensor> leaves(const std::vector<Tensor>& inputs, DType dtype) {
  std::vector<Tensor> out;
  for (const Tensor& x : inputs) out.push_back(testing::leaf(x, dtype));
  return out;
}

// Runs loss(inputs) in f32 and in f64 from the same values and asserts the gradients agree (the f32 backward kernels
// are not reached by gradcheck, which needs f64).
void check_f32_grads_match_f64(const std::function<Tensor(const std::vector<Tensor>&)>& loss,
                               const std::vector<Tensor>& inputs, double rel, const char* what) {
  std::vector<Tensor> a = leaves(inputs, DType::F32), b = leaves(inputs, DType::F64);
  loss(a).backward();
  loss(b).backward();
  for (size_t i = 0; i < inputs.size(); ++i) {
    REQUIRE(a[i].grad().defined());
    check_close(a[i].grad(), b[i].grad(), rel, 1e-2, fmt::format("{}: f32 vs f64 gradient of input {}", what, i));
  }
}

// ---- plain references, in double ------------------------------------------------------------------------------------

double ref_cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index) {
  std::vector<double> x = as_doubles(logits);
  std::vector<int32_t> t = targets.to_vector<int32_t>();
  int64_t N = logits.size(0), V = logits.size(1), count = 0;
  double total = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (t[r] == ignore_index) continue;
    // log_softmax of the row, then pick the target
    double m = x[r * V];
    for (int64_t j = 0; j < V; ++j) m = std::max(m, x[r * V + j]);
    double z = 0;
    for (int64_t j = 0; j < V; ++j) z += std::exp(x[r * V + j] - m);
    double log_p = x[r * V + t[r]] - m - std::log(z);
    total += -log_p;
    ++count;
  }
  return count ? total / static_cast<double>(count) : 0.0;
}

Tensor ref_rms_norm(const Tensor& x, const Tensor& w, double eps) {
  std::vector<double> xs = as_doubles(x), ws = as_doubles(w), y(xs.size());
  int64_t d = x.size(-1), rows = x.numel() / d;
  for (int64_t r = 0; r < rows; ++r) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += xs[r * d + j] * xs[r * d + j] / static_cast<double>(d);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = xs[r * d + j] / std::sqrt(ms + eps) * ws[j];
  }
  return f64_tensor(y, x.shape());
}

Tensor ref_rope(const Tensor& x, double theta, int64_t pos_offset) {
  std::vector<double> xs = as_doubles(x), y(xs.size());
  int64_t B = x.size(0), T = x.size(1), H = x.size(2), Dh = x.size(3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Dh / 2; ++i) {
          double angle = static_cast<double>(pos_offset + t) * std::pow(theta, -2.0 * i / static_cast<double>(Dh));
          int64_t at = ((b * T + t) * H + h) * Dh + 2 * i;
          y[at] = xs[at] * std::cos(angle) - xs[at + 1] * std::sin(angle);
          y[at + 1] = xs[at] * std::sin(angle) + xs[at + 1] * std::cos(angle);
        }
  return f64_tensor(y, x.shape());
}

// Explicit T x T scores per (b, h), the causal mask as -inf, row softmax, then P @ V.
Tensor ref_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  std::vector<double> qs = as_doubles(q), ks = as_doubles(k), vs = as_doubles(v), out(qs.size());
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  auto at = [&](int64_t b, int64_t t, int64_t h) { return ((b * T + t) * H + h) * Dh; };
  std::vector<double> scores(T * T), probs(T * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          double s = 0;
          for (int64_t e = 0; e < Dh; ++e) s += qs[at(b, i, h) + e] * ks[at(b, j, h) + e];
          scores[i * T + j] = j <= i ? s / std::sqrt(static_cast<double>(Dh)) : -INFINITY;
        }
      for (int64_t i = 0; i < T; ++i) {
        double m = -INFINITY, z = 0;
        for (int64_t j = 0; j < T; ++j) m = std::max(m, scores[i * T + j]);
        for (int64_t j = 0; j < T; ++j) z += std::exp(scores[i * T + j] - m);
        for (int64_t j = 0; j < T; ++j) probs[i * T + j] = std::exp(scores[i * T + j] - m) / z;
      }
      for (int64_t i = 0; i < T; ++i)
        for (int64_t e = 0; e < Dh; ++e) {
          double acc = 0;
          for (int64_t j = 0; j < T; ++j) acc += probs[i * T + j] * vs[at(b, j, h) + e];
          out[at(b, i, h) + e] = acc;
        }
    }
  return f64_tensor(out, q.shape());
}

// Random targets in [0, V); rows r with r % ignore_every == 1 get ignore_index (none when ignore_every is 0).
Tensor random_targets(int64_t N, int64_t V, uint64_t seed, int32_t ignore_index, int64_t ignore_every) {
  Generator gen(seed);
  std::vector<double> u = uniform({N}, gen, 0.0, 1.0, DType::F64).to_vector<double>();
  std::vector<int32_t> t(N);
  for (int64_t r = 0; r < N; ++r)
    t[r] =
        ignore_every && r % ignore_every == 1 ? ignore_index : std::min<int32_t>(V - 1, static_cast<int32_t>(u[r] * V));
  return from_vector(t, {N});
}

}  // namespace

// ---- cross-entropy --------------------------------------------------------------------------------------------------

TEST_CASE("ops:nn cross_entropy forward matches log_softmax + pick as plain loops") {
  struct Case {
    int64_t N, V;
  };
  for (Case c : {Case{1, 1}, Case{5, 33}, Case{17, 256}, Case{64, 7}})
    for (DType dtype : {DType::F32, DType::F64}) {
      Tensor logits = random({c.N, c.V}, 11 + c.N, dtype, 3.0);
      Tensor targets = random_targets(c.N, c.V, 7 + c.V, -100, 3);
      double expected = ref_cross_entropy(logits, targets, -100);
      double got = cross_entropy(logits, targets).item();
      CHECK_MESSAGE(std::abs(got - expected) <= (dtype == DType::F32 ? 1e-5 : 1e-12) * (1 + std::abs(expected)),
                    "N=" << c.N << " V=" << c.V << " " << dtype_name(dtype) << ": " << got << " vs " << expected);
    }
}

TEST_CASE("ops:nn cross_entropy hand-computed cases") {
  // Uniform logits: every class has probability 1/V, so the loss is log V and dlogits = (1/V - onehot) / N.
  Tensor logits = zeros({3, 7}, DType::F64).set_requires_grad();
  Tensor loss = cross_entropy(logits, from_vector(std::vector<int32_t>{0, 6, 2}, {3}));
  CHECK(loss.item() == doctest::Approx(std::log(7.0)).epsilon(1e-14));
  loss.backward();
  std::vector<double> g = logits.grad().to_vector<double>();
  CHECK(g[0] == doctest::Approx((1.0 / 7 - 1) / 3).epsilon(1e-14));
  CHECK(g[1] == doctest::Approx(1.0 / 21).epsilon(1e-14));
  CHECK(g[7 + 6] == doctest::Approx((1.0 / 7 - 1) / 3).epsilon(1e-14));

  // Row [1, 2, 3] with target 2: log(e + e^2 + e^3) - 3 = log(1 + e^-1 + e^-2).
  Tensor one = from_vector(std::vector<double>{1, 2, 3}, {1, 3});
  CHECK(cross_entropy(one, from_vector(std::vector<int32_t>{2}, {1})).item() ==
        doctest::Approx(0.40760596444438030).epsilon(1e-14));

  // An ignored row does not count toward the mean: only the first row (loss log 2) is averaged.
  Tensor two = from_vector(std::vector<double>{0, 0, 5, -5}, {2, 2});
  Tensor row_losses;
  CHECK(cross_entropy(two, from_vector(std::vector<int32_t>{0, -100}, {2}), -100, &row_losses).item() ==
        doctest::Approx(std::log(2.0)).epsilon(1e-14));
  std::vector<double> rows = row_losses.to_vector<double>();
  // row_losses: each row's own loss, 0 for the ignored one.
  REQUIRE(rows.size() == 2);
  CHECK(rows[0] == doctest::Approx(std::log(2.0)).epsilon(1e-14));
  CHECK(rows[1] == 0.0);
  double mean = cross_entropy(two, from_vector(std::vector<int32_t>{1, 0}, {2}), -100, &row_losses).item();
  rows = row_losses.to_vector<double>();
  CHECK(rows[0] == doctest::Approx(std::log(2.0)).epsilon(1e-14));
  CHECK(rows[1] == doctest::Approx(std::log1p(std::exp(-10.0))).epsilon(1e-14));  // log(e^5 + e^-5) - 5
  CHECK(mean == doctest::Approx((rows[0] + rows[1]) / 2).epsilon(1e-14));
  // A custom ignore_index inside [0, V) ignores rows with that target.
  CHECK(cross_entropy(two, from_vector(std::vector<int32_t>{0, 1}, {2}), /*ignore_index=*/1).item() ==
        doctest::Approx(std::log(2.0)).epsilon(1e-14));
}

TEST_CASE("ops:nn cross_entropy with every row ignored is 0 with a zero gradient") {
  for (DType dtype : {DType::F32, DType::F64}) {
    Tensor logits = random({4, 9}, 3, dtype).set_requires_grad();
    Tensor loss = cross_entropy(logits, from_vector(std::vector<int32_t>(4, -1), {4}), -1);
    CHECK(loss.item() == 0.0);
    loss.backward();
    for (double v : as_doubles(logits.grad())) CHECK(v == 0.0);
  }
  Tensor empty_batch = zeros({0, 5}, DType::F32);
  CHECK(cross_entropy(empty_batch, from_vector(std::vector<int32_t>{}, {0})).item() == 0.0);
}

TEST_CASE("ops:nn cross_entropy gradients: gradcheck with ignored rows and f32 vs f64") {
  Tensor targets = random_targets(6, 5, 21, -100, 3);  // rows 1 and 4 ignored
  Tensor logits = random({6, 5}, 5, DType::F64, 2.0).set_requires_grad();
  auto loss = [&](const std::vector<Tensor>& in) { return weighted_sum(cross_entropy(in[0], targets)); };
  double err = gradcheck(loss, {logits}, 1e-6, 1e-6, "cross_entropy");
  CHECK(err < 1e-6);
  // The ignored rows get exactly zero.
  std::vector<double> g = logits.grad().to_vector<double>();
  for (int64_t j = 0; j < 5; ++j) CHECK(g[1 * 5 + j] == 0.0);

  Tensor big_targets = random_targets(40, 33, 8, -100, 5);
  check_f32_grads_match_f64(
      [&](const std::vector<Tensor>& in) { return weighted_sum(cross_entropy(in[0], big_targets)); },
      {random({40, 33}, 9, DType::F64, 3.0)}, 1e-4, "cross_entropy");
}

TEST_CASE("ops:nn cross_entropy bad use throws") {
  Tensor logits = random({3, 4}, 1, DType::F32);
  auto ids = [](std::vector<int32_t> v) { return from_vector(v, {static_cast<int64_t>(v.size())}); };
  CHECK_THROWS_WITH_AS(cross_entropy(logits, ids({0, 4, 1})), doctest::Contains("target 4 of row 1"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, ids({0, 1, -1})), doctest::Contains("target -1 of row 2"),
                       std::invalid_argument);
  CHECK_THROWS_AS(cross_entropy(logits, ids({0, 1})), std::invalid_argument);                 // N mismatch
  CHECK_THROWS_AS(cross_entropy(reshape(logits, {12}), ids({0})), std::invalid_argument);     // logits not 2-D
  CHECK_THROWS_AS(cross_entropy(logits, random({3}, 1, DType::F32)), std::invalid_argument);  // float targets
  CHECK_THROWS_AS(cross_entropy(ids({1, 2, 3}), ids({0, 1, 2})), std::invalid_argument);      // integer logits
}

// ---- linear cross-entropy ------------------------------------------------------------------------------------------

namespace {

// The loss, row losses and gradients (x, weight) of linear_cross_entropy in chunks of chunk_rows, or with
// chunk_rows < 0 of its reference: cross_entropy of the whole product. The upstream gradient is 0.5: not 1, and a
// power of two, which bf16 rounding commutes with (the op rounds the logits' gradient before it is scaled, matmul's
// backward after).
struct LinearCE {
  Tensor loss, row_losses, dx, dweight;
};
LinearCE run_linear_ce(const Tensor& x, const Tensor& weight, const Tensor& targets, int64_t chunk_rows,
                       Precision precision = Precision::FP32) {
  PrecisionGuard mode(precision);
  Tensor xl = testing::leaf(x, x.dtype()), wl = testing::leaf(weight, weight.dtype());
  LinearCE out;
  // The reference: the product, under bf16 precision rounded to bf16 and widened (the logits' values there).
  auto logits = [&] {
    if (precision == Precision::FP32) return matmul(xl, wl, false, true);
    return to_dtype(matmul_to_bf16(xl, wl, false, true), DType::F32);
  };
  out.loss = chunk_rows < 0 ? cross_entropy(logits(), targets, kIgnoreIndex, &out.row_losses)
                            : linear_cross_entropy(xl, wl, targets, kIgnoreIndex, &out.row_losses, chunk_rows);
  mul(out.loss, 0.5).backward();
  out.dx = xl.grad(), out.dweight = wl.grad();
  return out;
}

}  // namespace

TEST_CASE("ops:nn linear_cross_entropy equals cross_entropy of the product, in any chunks of rows") {
  const Tensor targets = random_targets(10, 37, 31, kIgnoreIndex, 4);  // rows 1, 5 and 9 ignored
  for (DType dtype : {DType::F64, DType::F32}) {
    const double rel = dtype == DType::F64 ? 1e-12 : 1e-5;
    const Tensor x = random({10, 6}, 32, dtype, 2.0), weight = random({37, 6}, 33, dtype, 2.0);
    const LinearCE expected = run_linear_ce(x, weight, targets, -1);
    for (int64_t chunk_rows : {1, 3, 10, 0}) {  // 0: the default, one chunk here
      const std::string what = fmt::format("{} chunks of {}", dtype_name(dtype), chunk_rows);
      const LinearCE got = run_linear_ce(x, weight, targets, chunk_rows);
      check_close(got.loss, expected.loss, rel, 1e-6, what + " loss");
      check_close(got.row_losses, expected.row_losses, rel, 1e-6, what + " row losses");
      check_close(got.dx, expected.dx, rel, 1e-6, what + " dx");
      check_close(got.dweight, expected.dweight, rel, 1e-6, what + " dweight");
    }
  }
  // The forward against the plain loop, and every gradient against central differences, across chunks of 4.
  Tensor x = random({10, 6}, 34, DType::F64).set_requires_grad(),
         w = random({37, 6}, 35, DType::F64).set_requires_grad();
  CHECK(linear_cross_entropy(x, w, targets).item() ==
        doctest::Approx(ref_cross_entropy(matmul(x, w, false, true), targets, kIgnoreIndex)).epsilon(1e-13));
  auto loss = [&](const std::vector<Tensor>& in) {
    return weighted_sum(linear_cross_entropy(in[0], in[1], targets, kIgnoreIndex, nullptr, 4));
  };
  // 1e-5: some gradients are ~1e-4, where the differences' rounding (~1e-16 * loss / eps) shows.
  CHECK(gradcheck(loss, {x, w}, 1e-5, 1e-6, "linear_cross_entropy") < 1e-5);
}

TEST_CASE("ops:nn linear_cross_entropy under bf16 precision: bf16 products, as matmul's, bf16 logits and gradient") {
  const Tensor targets = random_targets(12, 40, 36, kIgnoreIndex, 5);
  const Tensor x = random({12, 16}, 37, DType::F32, 2.0), weight = random({40, 16}, 38, DType::F32, 2.0);
  const LinearCE expected = run_linear_ce(x, weight, targets, -1, Precision::BF16);
  const LinearCE fp32 = run_linear_ce(x, weight, targets, 5, Precision::FP32);
  const LinearCE got = run_linear_ce(x, weight, targets, 5, Precision::BF16);
  // The reference rounds the logits to bf16 as the product writes them, and their gradient to bf16 before its
  // products (matmul's backward): so does the kernel, as it writes it. Only the order of dweight's sum over chunks
  // differs.
  check_close(got.loss, expected.loss, 1e-6, 1e-6, "loss");
  check_close(got.row_losses, expected.row_losses, 1e-6, 1e-6, "row losses");
  check_close(got.dx, expected.dx, 1e-5, 1e-4, "dx");
  check_close(got.dweight, expected.dweight, 1e-5, 1e-4, "dweight");
  {  // The loss alone (validation, no gradient kept): the same.
    NoGradGuard no_grad;
    PrecisionGuard bf16(Precision::BF16);
    check_close(linear_cross_entropy(x, weight, targets, kIgnoreIndex, nullptr, 5), expected.loss, 1e-6, 1e-6,
                "loss without a gradient");
  }
  // And the precision is real: f32 products give another loss and other gradients.
  CHECK(testing::max_relative_error(fp32.loss, got.loss) > 1e-5);
  CHECK(testing::max_relative_error(fp32.dx, got.dx) > 1e-4);
}

TEST_CASE("ops:nn linear_cross_entropy without a gradient, with every row ignored, and with no rows") {
  const Tensor x = random({6, 4}, 39, DType::F32), weight = random({9, 4}, 40, DType::F32);
  const Tensor targets = random_targets(6, 9, 41, kIgnoreIndex, 0);
  {
    NoGradGuard no_grad;  // the loss only: no gradient is kept
    Tensor xl = testing::leaf(x, DType::F32);
    Tensor loss = linear_cross_entropy(xl, weight, targets, kIgnoreIndex, nullptr, 4);
    CHECK(!loss.requires_grad());
    check_close(loss, cross_entropy(matmul(x, weight, false, true), targets), 1e-6, 1e-6, "no grad");
  }
  Tensor xl = testing::leaf(x, DType::F32), wl = testing::leaf(weight, DType::F32);
  Tensor all_ignored = from_vector(std::vector<int32_t>(6, kIgnoreIndex), {6});
  Tensor loss = linear_cross_entropy(xl, wl, all_ignored, kIgnoreIndex, nullptr, 4);
  CHECK(loss.item() == 0.0);
  loss.backward();
  for (const Tensor& g : {xl.grad(), wl.grad()})
    for (double v : as_doubles(g)) CHECK(v == 0.0);
  Tensor none = testing::leaf(zeros({0, 4}, DType::F32), DType::F32), w0 = testing::leaf(weight, DType::F32);
  Tensor empty_loss = linear_cross_entropy(none, w0, from_vector(std::vector<int32_t>{}, {0}));
  CHECK(empty_loss.item() == 0.0);
  empty_loss.backward();
  for (double v : as_doubles(w0.grad())) CHECK(v == 0.0);
}

TEST_CASE("ops:nn linear_cross_entropy bad use throws") {
  const Tensor x = random({3, 4}, 1, DType::F32), weight = random({5, 4}, 2, DType::F32);
  auto ids = [](std::vector<int32_t> v) { return from_vector(v, {static_cast<int64_t>(v.size())}); };
  testing::check_error<std::invalid_argument>(
      [&] {
        linear_cross_entropy(x, weight, ids({0, 5, 1}));
      },
      {"target 5 of row 1", "outside [0, 5)", "weight f32[5, 4]"});
  CHECK_THROWS_AS(linear_cross_entropy(x, weight, ids({0, 1})), std::invalid_argument);    // N mismatch
  CHECK_THROWS_AS(linear_cross_entropy(x, random({5, 3}, 2, DType::F32), ids({0, 1, 2})),  // d mismatch
                  std::invalid_argument);
  CHECK_THROWS_AS(linear_cross_entropy(x, to_dtype(weight, DType::F64), ids({0, 1, 2})),  // dtypes differ
                  std::invalid_argument);
  CHECK_THROWS_AS(linear_cross_entropy(to_dtype(x, DType::BF16), to_dtype(weight, DType::BF16), ids({0, 1, 2})),
                  std::invalid_argument);  // bf16 inputs: mixed precision takes f32 ones
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------------

TEST_CASE("ops:nn rms_norm forward matches a plain loop") {
  for (Shape shape : {Shape{1, 1}, Shape{3, 7}, Shape{2, 5, 64}, Shape{33}})
    for (DType dtype : {DType::F32, DType::F64}) {
      Tensor x = random(shape, 2, dtype, 2.0), w = random({shape.back()}, 3, dtype);
      double tol = dtype == DType::F32 ? 1e-5 : 1e-13;
      check_close(rms_norm(x, w), ref_rms_norm(x, w, 1e-5), tol, 1e-1, "rms_norm " + x.str());
      check_close(rms_norm(x, w, 0.5), ref_rms_norm(x, w, 0.5), tol, 1e-1, "rms_norm eps 0.5 " + x.str());
    }
}

TEST_CASE("ops:nn rms_norm hand-computed case") {
  // x = [3, 4]: mean(x^2) = 12.5, so with eps 0: y = [3, 4] / sqrt(12.5) * [1, 2].
  Tensor y = rms_norm(from_vector(std::vector<double>{3, 4}, {1, 2}), from_vector(std::vector<double>{1, 2}, {2}), 0.0);
  std::vector<double> v = y.to_vector<double>();
  CHECK(v[0] == doctest::Approx(0.84852813742385702).epsilon(1e-14));
  CHECK(v[1] == doctest::Approx(2.2627416997969521).epsilon(1e-14));
}

TEST_CASE("ops:nn rms_norm gradients: gradcheck of x and weight and f32 vs f64") {
  Tensor x = random({2, 3, 5}, 4, DType::F64).set_requires_grad();
  Tensor w = random({5}, 5, DType::F64).set_requires_grad();
  auto loss = [](const std::vector<Tensor>& in) { return weighted_sum(rms_norm(in[0], in[1])); };
  CHECK(gradcheck(loss, {x, w}, 1e-6, 1e-6, "rms_norm") < 1e-6);
  check_f32_grads_match_f64(loss, {random({37, 64}, 6, DType::F64), random({64}, 7, DType::F64)}, 1e-4, "rms_norm");
}

TEST_CASE("ops:nn rms_norm adds x's gradient to the one x holds, as a block's residual stream, with no add kernel") {
  // h = x + norm(x) w_o, x itself a computed tensor (as a block's input is), and a loss of products only (sum(h v)):
  // the residual add's gradient reaches x first, then the norm's backward adds its own to it. The bits are those of
  // the two paths' gradients added.
  for (DType dtype : {DType::F32, DType::F64}) {
    const Tensor x0 = random({6, 5}, 300, dtype), w0 = random({5}, 301, dtype), wo = random({5, 5}, 302, dtype);
    const Tensor v = random({5, 1}, 303, dtype);
    Tensor leaf = testing::leaf(x0, dtype);
    const Tensor x = mul(leaf, 1.0);
    const Tensor l = sum(matmul(add(x, matmul(rms_norm(x, w0), wo)), v));
    std::vector<KernelTime> kernels;
    {
      KernelProfile profile;  // the backward only
      l.backward();
      kernels = profile.totals();
    }
    for (const KernelTime& k : kernels) CHECK_MESSAGE(k.name != "binary_forward", "an add ran in the backward");
    // Each path alone.
    Tensor xr = testing::leaf(x0, dtype), xn = testing::leaf(x0, dtype);
    sum(matmul(xr, v)).backward();
    sum(matmul(matmul(rms_norm(xn, w0), wo), v)).backward();
    CHECK(as_doubles(leaf.grad()) == as_doubles(add(xr.grad(), xn.grad())));
  }
}

TEST_CASE("ops:nn rms_norm_to_bf16 is rms_norm rounded once, and its bf16 gradient gives x's as f32 values would") {
  using testing::bitwise_equal;
  const Tensor x0 = random({37, 64}, 310, DType::F32), w0 = random({64}, 311, DType::F32);
  // An upstream gradient of bf16 values: the rounded output's gradient holds them exactly.
  const Tensor c = to_dtype(to_dtype(random({37, 64}, 312, DType::F32), DType::BF16), DType::F32);
  Tensor x = testing::leaf(x0, DType::F32), w = testing::leaf(w0, DType::F32);
  const Tensor y = rms_norm_to_bf16(x, w);
  CHECK(y.dtype() == DType::BF16);
  CHECK(bitwise_equal(y, to_dtype(rms_norm(x0, w0), DType::BF16)));
  sum(mul(to_dtype(y, DType::F32), c)).backward();  // y's gradient: c, as bf16
  Tensor x_ref = testing::leaf(x0, DType::F32), w_ref = testing::leaf(w0, DType::F32);
  sum(mul(rms_norm(x_ref, w_ref), c)).backward();
  CHECK(bitwise_equal(x.grad(), x_ref.grad()));
  CHECK(bitwise_equal(w.grad(), w_ref.grad()));
  CHECK_THROWS_WITH_AS(rms_norm_to_bf16(random({3, 4}, 1, DType::F64), random({4}, 1, DType::F64)),
                       doctest::Contains("needs an f32 x"), std::invalid_argument);
}

TEST_CASE("ops:nn rms_norm weight gradient is the same for any thread count") {
  // Enough rows that the backward runs in parallel blocks; the block sums are added in a fixed order.
  Tensor x = random({4096, 16}, 8, DType::F32), w = random({16}, 9, DType::F32);
  Tensor g = random({4096, 16}, 10, DType::F32);
  auto dw_with_threads = [&](int threads) {
    int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    Tensor wl = clone(w).detach().set_requires_grad();
    sum(mul(rms_norm(x, wl), g)).backward();
    omp_set_num_threads(saved);
    return wl.grad().to_vector<float>();
  };
  std::vector<float> one = dw_with_threads(1), two = dw_with_threads(2), three = dw_with_threads(3);
  CHECK(one == two);
  CHECK(one == three);
  // And it is the right sum: dw_j = sum over rows of g * x * rstd.
  std::vector<double> xs = as_doubles(x), gs = as_doubles(g), expected(16, 0.0);
  for (int64_t r = 0; r < 4096; ++r) {
    double ms = 0;
    for (int64_t j = 0; j < 16; ++j) ms += xs[r * 16 + j] * xs[r * 16 + j] / 16;
    for (int64_t j = 0; j < 16; ++j) expected[j] += gs[r * 16 + j] * xs[r * 16 + j] / std::sqrt(ms + 1e-5);
  }
  check_close(from_vector(one, {16}), f64_tensor(expected, {16}), 1e-4, 1.0, "rms_norm dw");
}

TEST_CASE("ops:nn rms_norm bad use throws") {
  Tensor x = random({4, 8}, 1, DType::F32);
  CHECK_THROWS_AS(rms_norm(x, random({7}, 1, DType::F32)), std::invalid_argument);        // d mismatch
  CHECK_THROWS_AS(rms_norm(x, random({1, 8}, 1, DType::F32)), std::invalid_argument);     // weight not 1-D
  CHECK_THROWS_AS(rms_norm(x, random({8}, 1, DType::F64)), std::invalid_argument);        // dtype mismatch
  CHECK_THROWS_AS(rms_norm(x, random({8}, 1, DType::F32), -1.0), std::invalid_argument);  // negative eps
  CHECK_THROWS_WITH_AS(rms_norm(x, random({5}, 1, DType::F32)), doctest::Contains("f32[5]"), std::invalid_argument);
}

// ---- RoPE -----------------------------------------------------------------------------------------------------------

TEST_CASE("ops:nn rope forward matches a plain loop") {
  struct Case {
    Shape shape;
    double theta;
    int64_t pos_offset;
  };
  for (const Case& c : {Case{{1, 1, 1, 2}, 10000.0, 0}, Case{{2, 7, 3, 8}, 10000.0, 0},
                        Case{{1, 64, 4, 16}, 10000.0, 3}, Case{{3, 5, 1, 6}, 500.0, 1000}})
    for (DType dtype : {DType::F32, DType::F64}) {
      Tensor x = random(c.shape, 12, dtype);
      double tol = dtype == DType::F32 ? 1e-5 : 1e-12;
      check_close(rope(x, c.theta, c.pos_offset), ref_rope(x, c.theta, c.pos_offset), tol, 1e-1, "rope " + x.str());
    }
}

TEST_CASE("ops:nn rope hand-computed cases") {
  // Position 0 rotates by angle 0: the identity, exactly.
  Tensor x = random({2, 1, 3, 8}, 13, DType::F32);
  CHECK(rope(x).to_vector<float>() == x.to_vector<float>());

  // Dh = 2: the single pair turns by t radians. (1, 0) at t = 1 -> (cos 1, sin 1).
  std::vector<double> y = rope(f64_tensor({1, 0, 1, 0}, {1, 2, 1, 2})).to_vector<double>();
  CHECK(y[0] == 1.0);
  CHECK(y[1] == 0.0);
  CHECK(y[2] == doctest::Approx(std::cos(1.0)).epsilon(1e-15));
  CHECK(y[3] == doctest::Approx(std::sin(1.0)).epsilon(1e-15));

  // Dh = 4, theta 10000, position 100: pair 0 turns by 100 rad, pair 1 by 100 * 10000^(-1/2) = 1 rad.
  // (1, 0) -> (cos 100, sin 100) and (0, 1) -> (-sin 1, cos 1).
  y = rope(f64_tensor({1, 0, 0, 1}, {1, 1, 1, 4}), 10000.0, 100).to_vector<double>();
  CHECK(y[0] == doctest::Approx(std::cos(100.0)).epsilon(1e-13));
  CHECK(y[1] == doctest::Approx(std::sin(100.0)).epsilon(1e-13));
  CHECK(y[2] == doctest::Approx(-std::sin(1.0)).epsilon(1e-13));
  CHECK(y[3] == doctest::Approx(std::cos(1.0)).epsilon(1e-13));

  // pos_offset shifts positions: rope(x, offset 4)[t] == rope of the same row placed at t + 4.
  Tensor seq = random({1, 6, 2, 4}, 14, DType::F64);
  std::vector<double> full_rows = rope(seq).to_vector<double>();
  std::vector<double> tail =
      rope(reshape(slice_rows(reshape(seq, {6, 8}), 4, 6), {1, 2, 2, 4}), 10000.0, 4).to_vector<double>();
  for (size_t i = 0; i < tail.size(); ++i) CHECK(tail[i] == doctest::Approx(full_rows[4 * 8 + i]).epsilon(1e-13));
}

TEST_CASE("ops:nn rope gradients: gradcheck and f32 vs f64") {
  Tensor x = random({2, 3, 2, 4}, 15, DType::F64).set_requires_grad();
  CHECK(gradcheck([](const std::vector<Tensor>& in) { return weighted_sum(rope(in[0], 100.0, 5)); }, {x}, 1e-6, 1e-6,
                  "rope") < 1e-6);
  check_f32_grads_match_f64([](const std::vector<Tensor>& in) { return weighted_sum(rope(in[0], 10000.0, 7)); },
                            {random({2, 9, 3, 8}, 16, DType::F64)}, 1e-4, "rope");
}

TEST_CASE("ops:nn rope bad use throws") {
  CHECK_THROWS_WITH_AS(rope(random({1, 2, 1, 5}, 1, DType::F32)), doctest::Contains("even"), std::invalid_argument);
  CHECK_THROWS_AS(rope(random({2, 1, 4}, 1, DType::F32)), std::invalid_argument);                  // not 4-D
  CHECK_THROWS_AS(rope(random({1, 2, 1, 4}, 1, DType::F32), 10000.0, -1), std::invalid_argument);  // negative offset
  CHECK_THROWS_AS(rope(random({1, 2, 1, 4}, 1, DType::F32), 0.0), std::invalid_argument);          // theta 0
  CHECK_THROWS_AS(rope(zeros({1, 2, 1, 4}, DType::I32)), std::invalid_argument);                   // integer input
}

// ---- causal attention -----------------------------------------------------------------------------------------------

TEST_CASE("ops:nn causal_attention forward matches explicit masked scores then softmax then P @ V") {
  for (Shape shape : {Shape{1, 1, 1, 2}, Shape{2, 7, 3, 4}, Shape{1, 16, 2, 5}, Shape{2, 64, 4, 16}})
    for (DType dtype : {DType::F32, DType::F64}) {
      Tensor q = random(shape, 20, dtype), k = random(shape, 21, dtype), v = random(shape, 22, dtype);
      double tol = dtype == DType::F32 ? 2e-5 : 1e-12;
      check_close(causal_attention(q, k, v), ref_attention(q, k, v), tol, 1e-1, "causal_attention " + q.str());
    }
}

TEST_CASE("ops:nn causal_attention hand-computed and extreme cases") {
  // T = 1: a row attends only to itself, so the output is v.
  Tensor v1 = random({2, 1, 3, 4}, 23, DType::F32);
  check_close(causal_attention(random({2, 1, 3, 4}, 24, DType::F32), random({2, 1, 3, 4}, 25, DType::F32), v1), v1,
              1e-7, 1e-6, "T=1");

  // q = 0: every allowed score is 0, so row i is the mean of v_0..v_i.
  Tensor v = random({1, 5, 2, 3}, 26, DType::F64);
  std::vector<double> vs = v.to_vector<double>(),
                      o = causal_attention(zeros({1, 5, 2, 3}, DType::F64), random({1, 5, 2, 3}, 27, DType::F64), v)
                              .to_vector<double>();
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t he = 0; he < 6; ++he) {  // (h, e) flattened
      double mean = 0;
      for (int64_t j = 0; j <= i; ++j) mean += vs[j * 6 + he] / static_cast<double>(i + 1);
      CHECK(o[i * 6 + he] == doctest::Approx(mean).epsilon(1e-13));
    }

  // Huge scores (|s| ~ 1e4) stay finite in f32 thanks to the max subtraction, and still match the reference.
  Tensor q = random({1, 9, 2, 8}, 28, DType::F32, 100.0), k = random({1, 9, 2, 8}, 29, DType::F32, 100.0);
  Tensor vv = random({1, 9, 2, 8}, 30, DType::F32);
  Tensor out = causal_attention(q, k, vv);
  for (double x : as_doubles(out)) CHECK(std::isfinite(x));
  check_close(out, ref_attention(q, k, vv), 1e-3, 1e-1, "huge scores");
}

TEST_CASE("ops:nn causal_attention gradients: gradcheck of q k v and f32 vs f64") {
  Tensor q = random({2, 4, 2, 3}, 31, DType::F64).set_requires_grad();
  Tensor k = random({2, 4, 2, 3}, 32, DType::F64).set_requires_grad();
  Tensor v = random({2, 4, 2, 3}, 33, DType::F64).set_requires_grad();
  auto loss = [](const std::vector<Tensor>& in) { return weighted_sum(causal_attention(in[0], in[1], in[2])); };
  // 1e-5: some gradients are ~1e-5, where central differences carry ~1e-10 of rounding noise.
  CHECK(gradcheck(loss, {q, k, v}, 1e-5, 1e-6, "causal_attention") < 1e-5);
  // T = 1 edge: the gradient flows to v only (p = 1 whatever q and k are).
  Tensor q1 = random({1, 1, 1, 4}, 34, DType::F64).set_requires_grad();
  Tensor k1 = random({1, 1, 1, 4}, 35, DType::F64).set_requires_grad();
  Tensor v1 = random({1, 1, 1, 4}, 36, DType::F64).set_requires_grad();
  CHECK(gradcheck(loss, {q1, k1, v1}, 1e-6, 1e-6, "causal_attention T=1") < 1e-6);
  for (double g : q1.grad().to_vector<double>()) CHECK(std::abs(g) < 1e-15);

  // Head size 20 and 33 keys: one full 16-wide block plus a remainder, in both the keys and the head dim.
  Shape wide{1, 33, 2, 20};
  Tensor qw = random(wide, 40, DType::F64).set_requires_grad(), kw = random(wide, 41, DType::F64).set_requires_grad();
  Tensor vw = random(wide, 42, DType::F64).set_requires_grad();
  // Step 1e-5: the loss sums 1320 outputs, so a 1e-6 step leaves ~1e-8 of rounding noise in the differences.
  CHECK(gradcheck(loss, {qw, kw, vw}, 1e-5, 1e-5, "causal_attention Dh=20 T=33") < 1e-5);

  // f32 (the AVX-512 copy on CPUs that have it) against f64 (always the baseline code).
  for (Shape s : {Shape{2, 17, 3, 8}, Shape{1, 33, 2, 20}, Shape{1, 64, 1, 16}})
    check_f32_grads_match_f64(loss, {random(s, 37, DType::F64), random(s, 38, DType::F64), random(s, 39, DType::F64)},
                              1e-4, "causal_attention");
}

namespace {

// Causal attention's output and its gradients for the output gradient g, in double, from explicit T x T scores, with
// bf16 rounding where asked: `operands` rounds q, k, v and g; `weights` rounds p_ij where it weights v_j and g_i, and
// ds_ij where it weights k_j and q_i (engine/kernels/nn.h, Precision::BF16).
std::vector<Tensor> ref_attention_and_gradients(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                                bool operands, bool weights) {
  auto bf16_value = [](double x) { return static_cast<double>(to_float(to_bf16(static_cast<float>(x)))); };
  auto values = [&](const Tensor& t) {
    std::vector<double> x = as_doubles(t);
    if (operands)
      for (double& e : x) e = bf16_value(e);
    return x;
  };
  const std::vector<double> qs = values(q), ks = values(k), vs = values(v), gs = values(g);
  std::vector<double> out(qs.size()), dq(qs.size()), dk(qs.size()), dv(qs.size());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const double scale = 1 / std::sqrt(static_cast<double>(Dh));
  auto at = [&](int64_t b, int64_t t, int64_t h) { return ((b * T + t) * H + h) * Dh; };
  auto dot = [&](const std::vector<double>& x, int64_t xi, const std::vector<double>& y, int64_t yi) {
    double s = 0;
    for (int64_t e = 0; e < Dh; ++e) s += x[xi + e] * y[yi + e];
    return s;
  };
  std::vector<double> p(T * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < T; ++i) {
        double m = -INFINITY, z = 0;
        for (int64_t j = 0; j <= i; ++j) m = std::max(m, dot(qs, at(b, i, h), ks, at(b, j, h)) * scale);
        for (int64_t j = 0; j <= i; ++j) z += std::exp(dot(qs, at(b, i, h), ks, at(b, j, h)) * scale - m);
        for (int64_t j = 0; j <= i; ++j) {
          p[i * T + j] = std::exp(dot(qs, at(b, i, h), ks, at(b, j, h)) * scale - m) / z;
          const double weight = weights ? bf16_value(p[i * T + j]) : p[i * T + j];
          for (int64_t e = 0; e < Dh; ++e) {
            out[at(b, i, h) + e] += weight * vs[at(b, j, h) + e];
            dv[at(b, j, h) + e] += weight * gs[at(b, i, h) + e];
          }
        }
      }
      for (int64_t i = 0; i < T; ++i) {
        const double D = dot(gs, at(b, i, h), out, at(b, i, h));
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = p[i * T + j] * (dot(gs, at(b, i, h), vs, at(b, j, h)) - D) * scale;
          const double weight = weights ? bf16_value(ds) : ds;
          for (int64_t e = 0; e < Dh; ++e) {
            dq[at(b, i, h) + e] += weight * ks[at(b, j, h) + e];
            dk[at(b, j, h) + e] += weight * qs[at(b, i, h) + e];
          }
        }
      }
    }
  return {f64_tensor(out, q.shape()), f64_tensor(dq, q.shape()), f64_tensor(dk, q.shape()), f64_tensor(dv, q.shape())};
}

}  // namespace

// The reference rounds the same values in double: the kernel's f32 sums and softmax leave ~1e-7, and a p or ds that
// lies at a bf16 rounding boundary may round the other way (~1e-5 each). Without the rounding of p and ds, or of
// q, k, v and g, the results move by far more.
TEST_CASE("ops:nn causal_attention under bf16 precision rounds the operands of its products") {
  for (Shape shape : {Shape{2, 33, 3, 20}, Shape{1, 64, 2, 16}}) {
    const Tensor q = random(shape, 50, DType::F32), k = random(shape, 51, DType::F32),
                 v = random(shape, 52, DType::F32), g = random(shape, 53, DType::F32);
    Tensor ql = q.detach().set_requires_grad(), kl = k.detach().set_requires_grad(),
           vl = v.detach().set_requires_grad(), out;
    {
      PrecisionGuard bf16(Precision::BF16);
      out = causal_attention(ql, kl, vl);
    }
    sum(mul(out, g)).backward();  // outside the guard: the backward follows the forward's choice
    const std::vector<Tensor> ours = {out, ql.grad(), kl.grad(), vl.grad()};
    const std::vector<Tensor> rounded = ref_attention_and_gradients(q, k, v, g, true, true),
                              unrounded_weights = ref_attention_and_gradients(q, k, v, g, true, false),
                              unrounded = ref_attention_and_gradients(q, k, v, g, false, false);
    const char* names[] = {"out", "dq", "dk", "dv"};
    for (size_t i = 0; i < ours.size(); ++i) {
      const std::string what = fmt::format("{} {}", shape_str(shape), names[i]);
      // Measured: 2e-8 to 1.1e-7; without rounding p and ds 1.4e-3 to 2.1e-3, without any rounding 2.5e-3 to 4.7e-3.
      CHECK_MESSAGE(testing::relative_norm_error(ours[i], rounded[i]) < 1e-5, what);
      CHECK_MESSAGE(testing::relative_norm_error(unrounded_weights[i], rounded[i]) > 5e-4, what);
      CHECK_MESSAGE(testing::relative_norm_error(unrounded[i], rounded[i]) > 5e-4, what);
    }
  }
  // f64 is never rounded, nor are heads longer than the GPU's tensor-core kernels take (128 dims).
  for (const Tensor& q : {random({1, 9, 2, 8}, 54, DType::F64), random({1, 9, 1, 136}, 55, DType::F32)}) {
    const Tensor k = random(q.shape(), 56, q.dtype());
    const Tensor plain = causal_attention(q, k, q);
    PrecisionGuard bf16(Precision::BF16);
    CHECK_MESSAGE(testing::bitwise_equal(causal_attention(q, k, q), plain), q.str());
  }
}

// bf16 tensors through RoPE and attention (mixed precision's q, k, v): computed in f32 from their values, each result
// rounded once as it is stored, the gradients too (engine/cpu/bf16.h). The GPU's bf16 kernels are checked against
// these in tests/test_cuda_nn_matmul.cpp.
TEST_CASE("ops:nn rope of a bf16 x: the rotation of its values rounded once, and a bf16 gradient likewise") {
  using testing::bitwise_equal;
  using testing::node_gradients;
  const Tensor x16 = to_dtype(random({2, 7, 3, 8}, 14, DType::F32), DType::BF16);
  const Tensor g16 = to_dtype(random({2, 7, 3, 8}, 15, DType::F32), DType::BF16);
  const Tensor x = x16.detach().set_requires_grad(), x32 = to_dtype(x16, DType::F32).set_requires_grad();
  const Tensor y = rope(x, 500.0, 3), y32 = rope(x32, 500.0, 3);
  CHECK(y.dtype() == DType::BF16);
  CHECK(bitwise_equal(y, to_dtype(y32, DType::BF16)));
  // Within half a bf16 step of the exact rotation (at most 2^-8 relative), plus the f32 rotation's own error.
  CHECK(testing::max_relative_error(to_dtype(y, DType::F64), ref_rope(x32, 500.0, 3), 1e-6) < 1.001 / 256);
  const Tensor dx = node_gradients(y, g16)[0], dx32 = node_gradients(y32, to_dtype(g16, DType::F32))[0];
  CHECK(dx.dtype() == DType::BF16);
  CHECK(bitwise_equal(dx, to_dtype(dx32, DType::BF16)));
}

TEST_CASE("ops:nn causal_attention of bf16 q, k, v: bf16 products as under bf16 precision, results rounded once") {
  using testing::bitwise_equal;
  using testing::node_gradients;
  for (Shape shape : {Shape{2, 33, 3, 20}, Shape{1, 64, 2, 16}}) {
    auto bf16_random = [&](uint64_t seed) { return to_dtype(random(shape, seed, DType::F32), DType::BF16); };
    const Tensor q16 = bf16_random(70), k16 = bf16_random(71), v16 = bf16_random(72), g16 = bf16_random(73);
    auto widened = [](const Tensor& t) { return to_dtype(t, DType::F32); };
    // In f32 mode too: bf16 tensors always multiply as bf16.
    const Tensor out = causal_attention(q16.detach().set_requires_grad(), k16.detach().set_requires_grad(),
                                        v16.detach().set_requires_grad());
    CHECK(out.dtype() == DType::BF16);
    // The kernels on the widened values under Precision::BF16: out rounded, and the backward reading that rounded out
    // (its D_i = g_i . out_i) with lse in f32, each gradient rounded.
    const Tensor q = widened(q16), k = widened(k16), v = widened(v16), g = widened(g16);
    const Tensor out32 = Tensor::empty(shape, DType::F32), lse = Tensor::empty({shape[0], shape[2], shape[1]});
    KERNEL(attention_forward, Device::CPU)(q, k, v, out32, lse, Precision::BF16);
    CHECK_MESSAGE(bitwise_equal(out, to_dtype(out32, DType::BF16)), shape_str(shape));
    const Tensor dq = Tensor::empty(shape, DType::F32), dk = Tensor::empty(shape, DType::F32),
                 dv = Tensor::empty(shape, DType::F32);
    KERNEL(attention_backward, Device::CPU)(q, k, v, widened(out), lse, g, dq, dk, dv, Precision::BF16);
    const std::vector<Tensor> ours = node_gradients(out, g16), expected = {dq, dk, dv};
    const std::vector<Tensor> reference = ref_attention_and_gradients(q, k, v, g, true, true);
    const char* names[] = {"dq", "dk", "dv"};
    for (size_t i = 0; i < 3; ++i) {
      CHECK(ours[i].dtype() == DType::BF16);
      CHECK_MESSAGE(bitwise_equal(ours[i], to_dtype(expected[i], DType::BF16)), shape_str(shape) << names[i]);
      // Against the reference in double: bf16's rounding of the results (and of out in D_i). Measured: 1e-3 to 3e-3.
      CHECK_MESSAGE(testing::relative_norm_error(widened(ours[i]), reference[i + 1]) < 1e-2, names[i]);
    }
    CHECK(testing::relative_norm_error(widened(out), reference[0]) < 1e-2);
  }
  const Tensor long_heads = to_dtype(random({1, 3, 1, 136}, 74, DType::F32), DType::BF16);
  CHECK_THROWS_WITH_AS(causal_attention(long_heads, long_heads, long_heads),
                       doctest::Contains("bf16 q, k, v take head dims up to 128"), std::invalid_argument);
}

// The attention block (nn/layers.cpp) under bf16 precision: q, k, v and the attention output in bf16 for heads of up
// to kMaxBf16HeadDim dims (then the same bits as the block written out with matmul_to_bf16, and not those of f32
// activations), f32 for longer ones.
TEST_CASE("nn: the attention block keeps q, k, v and its output in bf16 under bf16 precision, heads up to 128 dims") {
  using testing::bitwise_equal;
  const int64_t dim = 136, B = 2, T = 5;
  const Tensor x = random({B * T, dim}, 80, DType::F32);
  for (int64_t heads : {2, 1}) {  // head dims 68 and 136
    Generator gen(81);
    const nn::CausalSelfAttention block(dim, heads, 10000.0, gen, 0.05, 0.05);
    PrecisionGuard mode(Precision::BF16);
    auto written_out = [&](bool bf16) {
      const Tensor x_operand = product_operand(x);
      auto project = [&](int64_t part) {
        const Tensor w = slice_rows(block.wqkv.weight, part * dim, (part + 1) * dim);
        return bf16 ? matmul_to_bf16(x, w, false, true, x_operand) : matmul(x, w, false, true, x_operand);
      };
      const Shape heads_shape{B, T, heads, dim / heads};
      const Tensor q = rope(reshape(project(0), heads_shape)), k = rope(reshape(project(1), heads_shape)),
                   v = reshape(project(2), heads_shape);
      return matmul(reshape(causal_attention(q, k, v), {B * T, dim}), block.wo.weight, false, true);
    };
    const Tensor y = block.forward(x, B, T);
    const bool bf16 = dim / heads <= kMaxBf16HeadDim;
    CHECK_MESSAGE(bitwise_equal(y, written_out(bf16)), "heads " << heads);
    if (bf16) CHECK(!bitwise_equal(y, written_out(false)));
    // A bf16 x (the block's norm output under mixed precision, nn::RMSNorm::forward_operand) is the operand the
    // products made of the f32 one: the same bits.
    CHECK_MESSAGE(bitwise_equal(block.forward(product_operand(x), B, T), y), "heads " << heads << ", bf16 x");
  }
}

TEST_CASE("ops:nn causal_attention bad use throws") {
  Tensor q = random({1, 4, 2, 8}, 1, DType::F32);
  CHECK_THROWS_AS(causal_attention(q, random({1, 5, 2, 8}, 1, DType::F32), q), std::invalid_argument);  // T mismatch
  CHECK_THROWS_AS(causal_attention(q, q, random({1, 4, 2, 4}, 1, DType::F32)), std::invalid_argument);  // Dh mismatch
  CHECK_THROWS_AS(causal_attention(q, q, random({1, 4, 2, 8}, 1, DType::F64)), std::invalid_argument);  // dtype
  Tensor q3 = random({4, 2, 8}, 1, DType::F32);
  CHECK_THROWS_WITH_AS(causal_attention(q3, q3, q3), doctest::Contains("[B, T, H, Dh]"), std::invalid_argument);
}

}  // namespace moelab
