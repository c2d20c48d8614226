// End to end: small MLPs trained with the engine's ops and autograd on toy tasks generated from the seeded RNG.
// The optimizers are hand-written here (the project's AdamW lives in optim/): plain tensor code under NoGradGuard.
#include <cmath>
#include <numbers>
#include <vector>

#include "tests/testing.h"

using namespace moelab;

namespace {

// Two interleaved half circles ("two moons"), labels 0/1, Gaussian noise. x: [n, 2] f32, y: [n] i32.
std::pair<Tensor, Tensor> two_moons(int64_t n, double noise, uint64_t seed) {
  Generator gen(seed);
  std::vector<float> t = uniform({n}, gen, 0.0, std::numbers::pi).to_vector<float>();
  std::vector<float> jitter = randn({n, 2}, gen, 0.0, noise).to_vector<float>();
  std::vector<float> xs(2 * n);
  std::vector<int32_t> ys(n);
  for (int64_t i = 0; i < n; ++i) {
    int32_t label = static_cast<int32_t>(i % 2);
    float c = std::cos(t[i]), s = std::sin(t[i]);
    xs[2 * i] = (label == 0 ? c : 1.f - c) + jitter[2 * i];
    xs[2 * i + 1] = (label == 0 ? s : 0.5f - s) + jitter[2 * i + 1];
    ys[i] = label;
  }
  return {from_vector(xs, {n, 2}), from_vector(ys, {n})};
}

struct Linear {
  Tensor weight, bias;  // [in, out], [out]
  Linear(int64_t in, int64_t out, Generator& gen)
      : weight(randn({in, out}, gen, 0.0, 1.0 / std::sqrt(static_cast<double>(in))).set_requires_grad()),
        bias(zeros({out}).set_requires_grad()) {}
  Tensor operator()(const Tensor& x) const { return add(matmul(x, weight), bias); }  // [n, out]
};

// Adam (Kingma & Ba) on a list of parameters, updating them in place so they stay the same leaves.
struct Adam {
  std::vector<Tensor> params, m, v;
  double lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int step_count = 0;
  Adam(std::vector<Tensor> ps, double lr_) : params(std::move(ps)), lr(lr_) {
    for (const Tensor& p : params) m.push_back(zeros_like(p)), v.push_back(zeros_like(p));
  }
  void step() {
    NoGradGuard no_grad;
    ++step_count;
    double c1 = 1 - std::pow(beta1, step_count), c2 = 1 - std::pow(beta2, step_count);
    for (size_t i = 0; i < params.size(); ++i) {
      Tensor g = params[i].grad();
      REQUIRE(g.defined());
      m[i] = add(mul(m[i], beta1), mul(g, 1 - beta1));
      v[i] = add(mul(v[i], beta2), mul(square(g), 1 - beta2));
      Tensor update = div(mul(m[i], lr / c1), add(sqrt(mul(v[i], 1 / c2)), eps));
      copy_(params[i], sub(params[i], update));
      params[i].zero_grad();
    }
  }
};

double accuracy(const Tensor& logits, const Tensor& labels) {  // logits [n, 2]
  std::vector<float> l = logits.to_vector<float>();
  std::vector<int32_t> y = labels.to_vector<int32_t>();
  int correct = 0;
  for (size_t i = 0; i < y.size(); ++i) correct += static_cast<int32_t>(l[2 * i + 1] > l[2 * i]) == y[i];
  return static_cast<double>(correct) / y.size();
}

}  // namespace

TEST_CASE("e2e: a 2-32-32-2 tanh MLP learns two moons with cross-entropy and Adam") {
  // 192 points keep every activation under the CPU backend's parallel grain: one thread, quick on a busy machine.
  auto [x, y] = two_moons(192, 0.1, 7);            // train: [192, 2], [192]
  auto [x_test, y_test] = two_moons(512, 0.1, 8);  // held out
  Generator init(42);
  Linear l1(2, 32, init), l2(32, 32, init), l3(32, 2, init);
  auto forward = [&](const Tensor& in) { return l3(tanh(l2(tanh(l1(in))))); };  // [n, 2]
  Adam adam({l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias}, 0.01);

  double initial = cross_entropy(forward(x), y).item();
  CHECK(initial == doctest::Approx(std::log(2.0)).epsilon(0.3));  // a fresh net is close to a coin flip
  double loss = initial;
  for (int step = 0; step < 200; ++step) {
    Tensor l = cross_entropy(forward(x), y);
    loss = l.item();
    REQUIRE(std::isfinite(loss));
    l.backward();
    adam.step();
  }
  MESSAGE("two moons: cross-entropy " << initial << " -> " << loss);
  CHECK(loss < 0.05);
  CHECK(loss < initial / 10);
  NoGradGuard no_grad;
  double train_acc = accuracy(forward(x), y), test_acc = accuracy(forward(x_test), y_test);
  MESSAGE("accuracy: train " << train_acc << ", test " << test_acc);
  CHECK(train_acc >= 0.99);
  CHECK(test_acc >= 0.97);
}

TEST_CASE("e2e: a 1-32-32-1 SiLU MLP fits sin(3x) with MSE and plain SGD") {
  const int64_t n = 128;
  Generator data_gen(3);
  Tensor x = uniform({n, 1}, data_gen, -1.0, 1.0);  // [n, 1]
  std::vector<float> xv = x.to_vector<float>(), tv(n);
  for (int64_t i = 0; i < n; ++i) tv[i] = std::sin(3 * xv[i]);
  Tensor target = from_vector(tv, {n, 1});  // [n, 1]
  Generator init(11);
  Linear l1(1, 32, init), l2(32, 32, init), l3(32, 1, init);
  std::vector<Tensor> params{l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias};
  auto mse = [&] { return mean(square(sub(l3(silu(l2(silu(l1(x))))), target))); };

  double initial = mse().item(), loss = initial;
  for (int step = 0; step < 1000; ++step) {
    Tensor l = mse();
    loss = l.item();
    l.backward();
    NoGradGuard no_grad;
    for (Tensor& p : params) {
      copy_(p, sub(p, mul(p.grad(), 0.2)));
      p.zero_grad();
    }
  }
  MESSAGE("sin(3x): MSE " << initial << " -> " << loss);
  CHECK(loss < 0.01);
  CHECK(loss < initial / 20);
}
