// OMoE (optim/omoe.h, docs/omoe.md): the OWM recursion against its closed form, the projection property,
// the O/R schedule, AdamW against torch.optim.AdamW, bit-exact resume through the Trainer, and OMoE against AdamW on
// synthetic multi-domain text with the expert diversity metrics of moe/analysis/expert_metrics.h. Figures go to MESSAGE.
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "apps/train/train_config.h"
#include "apps/train/trainer.h"
#include "engine/bf16_weights.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "moe/analysis/expert_metrics.h"
#include "optim/omoe.h"
#include "tests/python_runner.h"
#include "tests/testing.h"

namespace {
using namespace moelab;
using json = nlohmann::json;
using testing::bitwise_equal;

// ---- helpers -------------------------------------------------------------------------------------------------------

// Inverse of a square matrix (row-major, n x n) by Gauss-Jordan with partial pivoting, in f64.
std::vector<double> inverse(std::vector<double> a, int64_t n) {
  std::vector<double> inv(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) inv[i * n + i] = 1;
  for (int64_t c = 0; c < n; ++c) {
    int64_t pivot = c;
    for (int64_t r = c + 1; r < n; ++r)
      if (std::abs(a[r * n + c]) > std::abs(a[pivot * n + c])) pivot = r;
    for (int64_t j = 0; j < n; ++j) std::swap(a[c * n + j], a[pivot * n + j]), std::swap(inv[c * n + j], inv[pivot * n + j]);
    double p = a[c * n + c];
    for (int64_t j = 0; j < n; ++j) a[c * n + j] /= p, inv[c * n + j] /= p;
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      double f = a[r * n + c];
      for (int64_t j = 0; j < n; ++j) a[r * n + j] -= f * a[c * n + j], inv[r * n + j] -= f * inv[c * n + j];
    }
  }
  return inv;
}

// Orthonormal rows q_0..q_{m-1} in R^n (Gram-Schmidt on seeded normal vectors), as host vectors.
std::vector<std::vector<double>> orthonormal(int64_t m, int64_t n, uint64_t seed) {
  std::vector<double> raw = testing::random({m, n}, seed).to_vector<double>();
  std::vector<std::vector<double>> q;
  for (int64_t i = 0; i < m; ++i) {
    std::vector<double> v(raw.begin() + i * n, raw.begin() + (i + 1) * n);
    for (int pass = 0; pass < 2; ++pass)
      for (const auto& u : q) {
        double dot = 0;
        for (int64_t j = 0; j < n; ++j) dot += u[j] * v[j];
        for (int64_t j = 0; j < n; ++j) v[j] -= dot * u[j];
      }
    double norm = 0;
    for (double x : v) norm += x * x;
    for (double& x : v) x /= std::sqrt(norm);
    q.push_back(v);
  }
  return q;
}

bool is_identity(const Tensor& P) {  // P [B, n, n] exactly the identity in every batch entry
  std::vector<float> v = P.to_vector<float>();
  int64_t B = P.size(0), n = P.size(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (v[(b * n + i) * n + j] != (i == j ? 1.0f : 0.0f)) return false;
  return true;
}

// One expert's [n, n] block of P [E, n, n].
Tensor block(const Tensor& P, int64_t e) { return reshape(slice_rows(P, e, e + 1), {P.size(1), P.size(2)}); }

// ||M x|| for M [out, n] (host f64) and x [n].
double apply_norm(const std::vector<double>& M, int64_t out, int64_t n, const std::vector<double>& x) {
  double total = 0;
  for (int64_t r = 0; r < out; ++r) {
    double s = 0;
    for (int64_t c = 0; c < n; ++c) s += M[r * n + c] * x[c];
    total += s * s;
  }
  return std::sqrt(total);
}

// Feeds expert `expert` of MoE layer 0 the mean input x (three identical tokens, top-1 routing).
void observe_one(optim::OMoE& omoe, int32_t expert, const std::vector<double>& x, double scale) {
  std::vector<double> rows;
  for (int r = 0; r < 3; ++r)
    for (double v : x) rows.push_back(v * scale);
  omoe.observe(0, from_vector(std::vector<int32_t>(3, expert), {3, 1}),
               from_vector(rows, {3, static_cast<int64_t>(x.size())}, DType::F32));
}

// Trainer runs in this file use one OpenMP thread: the tiny model's many small parallel regions cost more in thread
// wake-ups than they save when the 2-core test machine is shared (measured under load average ~10: 20 steps of the
// resume test's config 0.26 s on 1 thread, 11.8 s on 2). Results do not depend on the thread count.
struct OneThread {
  int saved = omp_get_max_threads();
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(saved); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

// ---- the OWM recursion -----------------------------------------------------------------------------------------------

TEST_CASE("omoe: recursive projector update equals the closed form alpha (alpha I + A A^T)^-1") {
  const int64_t n = 8;
  const std::vector<double> alphas = {1e-3, 0.1, 1.0, 10.0};
  const int64_t B = static_cast<int64_t>(alphas.size());
  for (int64_t m : {5, 12}) {  // fewer vectors than dimensions (P keeps an identity part) and more
    std::vector<double> A = testing::random({m, n}, 100 + m).to_vector<double>();  // rows a_1..a_m
    std::vector<float> A32(A.begin(), A.end());
    // The recursion, batched: entry b uses alpha_b; the same vectors go to every entry. In f64 and in f32.
    std::vector<double> eye(static_cast<size_t>(B * n * n), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n; ++i) eye[(b * n + i) * n + i] = 1;
    Tensor P64 = from_vector(eye, {B, n, n}, DType::F64), P32 = from_vector(eye, {B, n, n}, DType::F32);
    for (int64_t v = 0; v < m; ++v) {
      std::vector<double> a, a_row(A.begin() + v * n, A.begin() + (v + 1) * n);
      for (int64_t b = 0; b < B; ++b) a.insert(a.end(), a_row.begin(), a_row.end());
      P64 = optim::owm_update(P64, from_vector(a, {B, n}, DType::F64), alphas, std::vector<bool>(B, true));
      P32 = optim::owm_update(P32, from_vector(a, {B, n}, DType::F32), alphas, std::vector<bool>(B, true));
    }
    for (int64_t b = 0; b < B; ++b) {
      double alpha = alphas[b];
      std::vector<double> M(static_cast<size_t>(n * n), 0.0);  // alpha I + A^T A (A's rows are the vectors)
      for (int64_t i = 0; i < n; ++i) {
        M[i * n + i] = alpha;
        for (int64_t j = 0; j < n; ++j)
          for (int64_t v = 0; v < m; ++v) M[i * n + j] += A[v * n + i] * A[v * n + j];
      }
      std::vector<double> closed = inverse(M, n);
      for (double& x : closed) x *= alpha;
      Tensor expected = from_vector(closed, {n, n}, DType::F64);
      double scale = 0;
      for (double x : closed) scale = std::max(scale, std::abs(x));
      double err64 = testing::max_relative_error(block(P64, b), expected, scale);
      double err32 = testing::max_relative_error(block(P32, b), expected, scale);
      double min_eig = optim::smallest_eigenvalue(block(P64, b).to_vector<double>(), n);
      MESSAGE(fmt::format("m = {:2} vectors, alpha = {:6}: max |P_rec - P_closed| / max|P|: f64 {:.2e}, f32 {:.2e}; "
                          "lambda_min(P) = {:.3e}", m, alpha, err64, err32, min_eig));
      CHECK(err64 < 1e-10);
      CHECK(err32 < 2e-4);
      CHECK(min_eig > 0);
      CHECK(min_eig <= 1.0 + 1e-12);
    }
  }
  // Inactive entries stay as they were.
  Tensor P = from_vector(std::vector<double>{1, 0, 0, 1, 1, 0, 0, 1}, {2, 2, 2});
  Tensor after = optim::owm_update(P, from_vector(std::vector<double>{1, 2, 3, 4}, {2, 2}), {1.0, 1.0}, {true, false});
  CHECK(bitwise_equal(block(after, 1), block(P, 1)));
  CHECK_FALSE(bitwise_equal(block(after, 0), block(P, 0)));
  // One update along u with energy s = alpha: u^T P u = alpha / (alpha + s) = 1/2 (docs/omoe.md: "halves P along a").
  Tensor half = optim::owm_update(from_vector(std::vector<double>{1, 0, 0, 1}, {1, 2, 2}),
                                  from_vector(std::vector<double>{0.6 * 2, 0.8 * 2}, {1, 2}), {4.0}, {true});
  std::vector<double> h = half.to_vector<double>();
  CHECK(0.36 * h[0] + 0.48 * h[1] + 0.48 * h[2] + 0.64 * h[3] == doctest::Approx(0.5).epsilon(1e-12));
}

TEST_CASE("omoe: smallest eigenvalue of a symmetric matrix") {
  const int64_t n = 24;
  std::vector<std::vector<double>> Q = orthonormal(n, n, 7);
  std::vector<double> lambda(n);
  for (int64_t i = 0; i < n; ++i) lambda[i] = 0.05 + 0.9 * std::sin(1.0 + i) * std::sin(1.0 + i);
  lambda[17] = 0.0123;
  std::vector<double> A(static_cast<size_t>(n * n), 0.0);  // Q^T diag(lambda) Q
  for (int64_t k = 0; k < n; ++k)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) A[i * n + j] += lambda[k] * Q[k][i] * Q[k][j];
  double got = optim::smallest_eigenvalue(A, n);
  MESSAGE(fmt::format("lambda_min: {:.15f} (expected 0.0123)", got));
  CHECK(got == doctest::Approx(0.0123).epsilon(1e-10));
  CHECK(optim::smallest_eigenvalue({2.0}, 1) == doctest::Approx(2.0));
}

// ---- the projection property ---------------------------------------------------------------------------------------

TEST_CASE("omoe: projected W_up gradient keeps the outputs on the other experts' stored inputs") {
  // Each expert j stores two mean inputs of its own (orthonormal directions q, scaled by 3), and every expert
  // stores one common input. With a small alpha each P_j is nearly the projector onto the complement of what j stored.
  // Pbar_i averages the OTHER experts' P_j. An update -lr G Pbar_i changes expert i's W_up outputs on an input x by
  // -lr (G Pbar_i) x, so we measure ||G Pbar_i x|| / ||G x|| (0: outputs on x unchanged, 1: unconstrained):
  //   - the common input (stored by every other expert): ~alpha / (alpha + s), i.e. ~0;
  //   - expert i's own inputs (stored by nobody else): Pbar_i x = x, so 1: not constrained;
  //   - an input stored by ONE other expert j: only P_j removes it, so Pbar_i keeps (E - 2) / (E - 1) of it.
  //     With E = 2 that is 0 (Pbar_i = P_j exactly: the property holds for every input the other expert stored);
  //     with E = 4 the update still moves those outputs by 2/3 of the unprojected update (docs/omoe.md's average).
  const int64_t d = 16, hidden = 8;
  const double scale = 3.0, alpha = 1e-4;
  for (int64_t E : {2, 4}) {
    Generator gen(5);
    moe::MoELayer layer(testing::moe_layer_config(d, E, hidden, 1), 0, gen);
    optim::AdamW adamw(layer.named_parameters(), {});
    optim::OMoEConfig config;
    config.alpha = alpha;
    config.reset = false;
    config.every = 1000;
    optim::OMoE omoe(adamw, {&layer}, config);
    std::vector<std::vector<double>> q = orthonormal(2 * E + 1, d, 11);  // q[2j], q[2j+1]: expert j's; q[2E]: common
    for (int32_t j = 0; j < E; ++j) {
      observe_one(omoe, j, q[2 * j], scale);      // the other experts get no tokens: their P must not move
      observe_one(omoe, j, q[2 * j + 1], scale);
    }
    std::vector<double> common_rows;
    for (int64_t j = 0; j < E; ++j)
      for (double v : q[2 * E]) common_rows.push_back(v * scale);
    std::vector<int32_t> every_expert(E);
    for (int32_t j = 0; j < E; ++j) every_expert[j] = j;
    omoe.observe(0, from_vector(every_expert, {E, 1}), from_vector(common_rows, {E, d}, DType::F32));

    Tensor G = testing::random({E, hidden, d}, 77, DType::F32);  // a W_up gradient [E, h, d]
    Tensor Gp = omoe.project(0, G);
    std::vector<double> G64 = testing::as_doubles(G), Gp64 = testing::as_doubles(Gp);
    double worst_common = 0, worst_own = 0, worst_one_other = 0, mean_one_other = 0;
    int count_one_other = 0;
    for (int64_t i = 0; i < E; ++i) {
      auto ratio = [&](const std::vector<double>& x) {  // ||G_i Pbar_i x|| / ||G_i x||
        std::vector<double> Gi(G64.begin() + i * hidden * d, G64.begin() + (i + 1) * hidden * d);
        std::vector<double> Gpi(Gp64.begin() + i * hidden * d, Gp64.begin() + (i + 1) * hidden * d);
        return apply_norm(Gpi, hidden, d, x) / apply_norm(Gi, hidden, d, x);
      };
      worst_common = std::max(worst_common, ratio(q[2 * E]));
      for (int64_t j = 0; j < E; ++j)
        for (int64_t v = 0; v < 2; ++v) {
          double r = ratio(q[2 * j + v]);
          if (j == i) {
            worst_own = std::max(worst_own, std::abs(r - 1));
          } else {
            worst_one_other = std::max(worst_one_other, std::abs(r - double(E - 2) / double(E - 1)));
            mean_one_other += r;
            ++count_one_other;
          }
        }
    }
    mean_one_other /= count_one_other;
    MESSAGE(fmt::format("E = {}: ||G Pbar x|| / ||G x|| on the common input {:.2e} (max), on the expert's own inputs "
                        "1 - {:.2e} (worst), on inputs stored by one other expert {:.4f} (mean; expected (E-2)/(E-1) = "
                        "{:.4f})", E, worst_common, worst_own, mean_one_other, double(E - 2) / double(E - 1)));
    CHECK(worst_common < 1e-3);  // outputs on what every other expert stored barely move ...
    CHECK(worst_own < 1e-4);     // ... and expert i's own inputs are not constrained
    CHECK(worst_one_other < 1e-3);
    if (E == 2) CHECK(mean_one_other < 1e-3);
  }
}

// ---- the schedule ----------------------------------------------------------------------------------------------------

TEST_CASE("omoe: O steps at t > warmup and t % K == 0, reset, experts without tokens skip, R steps are AdamW") {
  const int64_t d = 12, hidden = 6, E = 4;
  for (bool reset : {true, false}) {
    CAPTURE(reset);
    Generator gen_a(3), gen_b(3);
    moe::MoELayer plain_layer(testing::moe_layer_config(d, E, hidden, 2), 0, gen_a),
        omoe_layer(testing::moe_layer_config(d, E, hidden, 2), 0, gen_b);
    optim::AdamWConfig adam_config;
    optim::AdamW plain(plain_layer.named_parameters(), adam_config), wrapped(omoe_layer.named_parameters(), adam_config);
    optim::OMoEConfig config;
    config.every = 5;
    config.warmup = 12;
    config.reset = reset;
    optim::OMoE omoe(wrapped, {&omoe_layer}, config);
    std::vector<int64_t> o_steps;
    const int64_t N = 10;
    for (int64_t t = 1; t <= 30; ++t) {
      // The same gradients for both layers; routing over experts 0..2 only (expert 3 never gets a token).
      std::vector<nn::NamedTensor> pa = plain_layer.named_parameters(), pb = omoe_layer.named_parameters();
      for (size_t i = 0; i < pa.size(); ++i) {
        Tensor g = testing::random(pa[i].tensor.shape(), 1000 * t + i, DType::F32);
        pa[i].tensor.set_grad(g);
        pb[i].tensor.set_grad(clone(g));
      }
      std::vector<int32_t> ids;
      for (int64_t n = 0; n < N; ++n) ids.push_back(int32_t((n + t) % 3)), ids.push_back(int32_t((n + t + 1) % 3));
      omoe.observe(0, from_vector(ids, {N, 2}), testing::random({N, d}, 5000 + t, DType::F32));
      CHECK(is_identity(reshape(block(omoe.projectors(0), 3), {1, d, d})));
      plain.step(0.01);
      optim::OMoEReport report = omoe.step(0.01);
      CHECK(report.step == t);
      if (report.o_step) {
        o_steps.push_back(t);
        REQUIRE(report.removed.size() == 1);
        CHECK(report.removed[0] > 0);
        CHECK(report.removed[0] < 1);
        CHECK(is_identity(omoe.projectors(0)) == reset);  // reset restores I after every O step
      } else {
        CHECK(report.removed.empty());
        CHECK_FALSE(is_identity(omoe.projectors(0)));  // observed experts moved; only expert 3 stays at I
      }
      // Non-expert parameters (the router) and W_down (project_down = false) always step exactly as AdamW; the
      // projected W_gate / W_up do so until the first O step.
      CHECK(bitwise_equal(plain_layer.router.weight, omoe_layer.router.weight));
      CHECK(bitwise_equal(plain_layer.experts.w_down, omoe_layer.experts.w_down));
      bool same_gate = bitwise_equal(plain_layer.experts.w_gate, omoe_layer.experts.w_gate);
      CHECK(same_gate == (t < 15));
      plain.zero_grad();
      omoe.zero_grad();
    }
    CHECK(o_steps == std::vector<int64_t>{15, 20, 25, 30});
  }
  CHECK(optim::is_o_step(10, 10, 0));
  CHECK_FALSE(optim::is_o_step(10, 10, 10));
  CHECK(optim::is_o_step(20, 10, 10));
  CHECK_FALSE(optim::is_o_step(21, 10, 0));
}

TEST_CASE("omoe: mode = direction with an identity Pbar equals AdamW") {
  // No observations: every P = I, so Pbar = I and projecting the Adam direction changes nothing; the direction hook
  // of AdamW computes the same update in another order (lr * (m / bc1) / ... instead of (lr / bc1) * m / ...).
  const int64_t d = 12, hidden = 6, E = 3;
  Generator gen_a(9), gen_b(9);
  moe::MoELayer la(testing::moe_layer_config(d, E, hidden, 1), 0, gen_a),
      lb(testing::moe_layer_config(d, E, hidden, 1), 0, gen_b);
  optim::AdamW plain(la.named_parameters(), {}), wrapped(lb.named_parameters(), {});
  optim::OMoEConfig config;
  config.every = 1;
  config.mode = optim::OMoEMode::Direction;
  config.project_down = true;
  optim::OMoE omoe(wrapped, {&lb}, config);
  for (int64_t t = 1; t <= 5; ++t) {
    std::vector<nn::NamedTensor> pa = la.named_parameters(), pb = lb.named_parameters();
    for (size_t i = 0; i < pa.size(); ++i) {
      Tensor g = testing::random(pa[i].tensor.shape(), 300 * t + i, DType::F32);
      pa[i].tensor.set_grad(g);
      pb[i].tensor.set_grad(clone(g));
    }
    plain.step(0.01);
    optim::OMoEReport report = omoe.step(0.01);
    CHECK(report.o_step);
    CHECK(report.removed[0] < 1e-6);
  }
  double err = 0;
  std::vector<nn::NamedTensor> pa = la.named_parameters(), pb = lb.named_parameters();
  for (size_t i = 0; i < pa.size(); ++i) err = std::max(err, testing::max_relative_error(pb[i].tensor, pa[i].tensor, 1e-3));
  MESSAGE(fmt::format("mode = direction, Pbar = I, 5 steps: max relative difference to AdamW {:.2e}", err));
  CHECK(err < 1e-5);
}

// The trainer runs the optimizer inside its step's BF16 scope: OMoE's products (the projectors' updates, the hidden
// activations of project_down, the projections) stay f32 there, and its updates write the weights' bf16 copies.
TEST_CASE("omoe: under mixed precision the projectors and projections are f32, and the weights' copies follow") {
  const int64_t d = 12, hidden = 6, E = 3, N = 10;
  for (optim::OMoEMode mode : {optim::OMoEMode::Grad, optim::OMoEMode::Direction}) {
    CAPTURE(enum_name(mode));
    Generator gen_a(4), gen_b(4);
    moe::MoELayer la(testing::moe_layer_config(d, E, hidden, 2), 0, gen_a),
        lb(testing::moe_layer_config(d, E, hidden, 2), 0, gen_b);
    optim::AdamW adam_a(la.named_parameters(), {}), adam_b(lb.named_parameters(), {});
    adam_b.keep_bf16_weights();
    for (const nn::NamedTensor& p : lb.named_parameters())
      (void)adam_b.bf16_weights()->copy_of(p.tensor);  // as products
    optim::OMoEConfig config;
    config.every = 2, config.mode = mode, config.project_down = true;
    optim::OMoE fp32(adam_a, {&la}, config), mixed(adam_b, {&lb}, config);
    for (int64_t t = 1; t <= 4; ++t) {
      std::vector<nn::NamedTensor> pa = la.named_parameters(), pb = lb.named_parameters();
      for (size_t i = 0; i < pa.size(); ++i) {
        const Tensor g = testing::random(pa[i].tensor.shape(), 700 * t + i, DType::F32);
        pa[i].tensor.set_grad(g), pb[i].tensor.set_grad(clone(g));
      }
      std::vector<int32_t> ids;
      for (int64_t n = 0; n < N; ++n) ids.push_back(int32_t((n + t) % 3)), ids.push_back(int32_t((n + t + 1) % 3));
      const Tensor expert_ids = from_vector(ids, {N, 2}), h = testing::random({N, d}, 800 + t, DType::F32);
      fp32.observe(0, expert_ids, h);
      fp32.step(0.01);
      {
        PrecisionGuard bf16(Precision::BF16, adam_b.bf16_weights());
        mixed.observe(0, expert_ids, h);
        mixed.step(0.01);
      }
      for (size_t i = 0; i < pa.size(); ++i) {
        CHECK_MESSAGE(bitwise_equal(pb[i].tensor, pa[i].tensor), "step " << t << ": " << pa[i].name);
        CHECK_MESSAGE(
            bitwise_equal(adam_b.bf16_weights()->made_copy_of(pb[i].tensor), to_dtype(pb[i].tensor, DType::BF16)),
            "step " << t << ": the copy of " << pb[i].name);
      }
      adam_a.zero_grad(), adam_b.zero_grad();
    }
  }
}

// ---- AdamW against PyTorch -------------------------------------------------------------------------------------------

TEST_CASE("omoe: AdamW matches torch.optim.AdamW over 10 steps") {
  const testing::TorchStatus& torch = testing::torch_status();
  if (!torch.available) {
    MESSAGE("skipped: " << torch.why);
    return;
  }
  const int64_t steps = 10;
  std::vector<nn::NamedTensor> params = {{"w", testing::random({6, 5}, 1, DType::F32)},
                                         {"stack", testing::random({3, 4, 2}, 2, DType::F32, 0.5)},
                                         {"bias", testing::random({7}, 3, DType::F32)}};
  json case_json = {{"beta1", 0.9}, {"beta2", 0.95}, {"eps", 1e-8}, {"weight_decay", 0.1}, {"lr", json::array()},
                    {"params", json::array()}, {"grads", json::array()}};
  for (const nn::NamedTensor& p : params)
    case_json["params"].push_back({{"name", p.name}, {"shape", p.tensor.shape()}, {"data", p.tensor.to_vector<float>()}});
  optim::AdamW adamw(params, {0.9, 0.95, 1e-8, 0.1});
  optim::LRSchedule schedule{1e-2, 1e-3, 3, steps};
  for (int64_t t = 1; t <= steps; ++t) {
    json grads = json::array();
    for (size_t i = 0; i < params.size(); ++i) {
      // Gradients of mixed scale, with some exact zeros (v stays small there: the eps regime).
      Tensor g = mul(testing::random(params[i].tensor.shape(), 40 * t + i, DType::F32), t % 3 == 0 ? 1e-3 : 1.0);
      if (t == 4) g = zeros_like(g);
      grads.push_back(g.to_vector<float>());
      params[i].tensor.set_grad(g);
    }
    case_json["grads"].push_back(grads);
    case_json["lr"].push_back(schedule.at(t));
    adamw.step(schedule.at(t));
    adamw.zero_grad();
  }
  testing::ScratchDir dir("omoe_adamw");
  std::ofstream(dir.file("case.json")) << case_json.dump();
  testing::PythonRun run = testing::run_python_script(testing::source_file("tests/torch/adamw_oracle.py"),
                                                      {dir.file("case.json"), dir.file("result.json")});
  if (!run.ok()) dir.keep();
  REQUIRE_MESSAGE(run.ok(), run.output);
  json result = json::parse(std::ifstream(dir.file("result.json")));
  double worst_abs = 0, worst_rel_move = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<float> ours = params[i].tensor.to_vector<float>();
    std::vector<double> theirs = result["params"][i].get<std::vector<double>>();
    std::vector<double> start = case_json["params"][i]["data"].get<std::vector<double>>();
    REQUIRE(ours.size() == theirs.size());
    for (size_t j = 0; j < ours.size(); ++j) {
      double err = std::abs(ours[j] - theirs[j]);
      worst_abs = std::max(worst_abs, err);
      worst_rel_move = std::max(worst_rel_move, err / (std::abs(theirs[j] - start[j]) + 1e-12));
    }
  }
  MESSAGE(fmt::format("AdamW vs torch {} after {} steps: max |p - p_torch| = {:.2e}, relative to the parameter's own "
                      "total move {:.2e}", result["torch_version"].get<std::string>(), steps, worst_abs, worst_rel_move));
  CHECK(worst_abs < 1e-6);
  CHECK(worst_rel_move < 1e-4);
}

// A matrix (decayed) and a vector (not), the same values at every call: for two optimizers stepped side by side.
std::vector<nn::NamedTensor> two_params() {
  return {{"w", testing::random({6, 5}, 1, DType::F32)}, {"bias", testing::random({7}, 3, DType::F32)}};
}

TEST_CASE("omoe: AdamW's bf16 copies are its parameters rounded after every update, and change none of its bits") {
  std::vector<nn::NamedTensor> plain_params = two_params(), kept_params = two_params();
  optim::AdamW plain(plain_params, {0.9, 0.95, 1e-8, 0.1}), kept(kept_params, {0.9, 0.95, 1e-8, 0.1});
  CHECK(kept.bf16_weights() == nullptr);
  kept.keep_bf16_weights();
  const Bf16Weights& copies = *kept.bf16_weights();
  // A copy is made when a product first asks for it; the updates rewrite the copies that exist.
  CHECK_FALSE(copies.made_copy_of(kept_params[0].tensor).defined());
  const Tensor first_copy = clone(copies.copy_of(kept_params[0].tensor));
  CHECK(bitwise_equal(copies.made_copy_of(kept_params[0].tensor), first_copy));
  (void)copies.copy_of(kept_params[1].tensor);
  auto check_step = [&](const std::string& when) {
    for (size_t i = 0; i < kept_params.size(); ++i) {
      const Tensor& p = kept_params[i].tensor;
      CHECK_MESSAGE(bitwise_equal(p, plain_params[i].tensor), when << ": " << kept_params[i].name);
      CHECK_MESSAGE(bitwise_equal(copies.made_copy_of(p), to_dtype(p, DType::BF16)),
                    when << ": the copy of " << kept_params[i].name);
    }
  };
  for (int64_t t = 1; t <= 3; ++t) {  // step(): every parameter, one kernel
    for (size_t i = 0; i < kept_params.size(); ++i) {
      const Tensor g = testing::random(kept_params[i].tensor.shape(), 10 * t + i, DType::F32);
      plain_params[i].tensor.set_grad(g), kept_params[i].tensor.set_grad(g);
    }
    plain.step(1e-2, 0.5f), kept.step(1e-2, 0.5f);
    plain.zero_grad(), kept.zero_grad();
    check_step(fmt::format("step {}", t));
  }
  CHECK_FALSE(bitwise_equal(copies.made_copy_of(kept_params[0].tensor), first_copy));
  // update_direction (OMoE's mode = direction): the direction, a transform of it, the step.
  plain.begin_step(), kept.begin_step();
  auto half = [](const Tensor& d) { return mul(d, 0.5); };
  for (size_t i = 0; i < kept_params.size(); ++i) {
    const Tensor g = testing::random(kept_params[i].tensor.shape(), 90 + i, DType::F32);
    plain.update_direction(i, g, 1e-2, half), kept.update_direction(i, g, 1e-2, half);
  }
  check_step("direction step");
}

TEST_CASE("omoe: gradient clipping: grad_clip's norm and factor, which AdamW applies as it reads each gradient") {
  // Two copies of the same parameters: one steps with the clipping factor, the other on gradients scaled first (what
  // torch's clip_grad_norm_ leaves in .grad): the same bits, and the gradients themselves stay unscaled.
  std::vector<nn::NamedTensor> clipped = two_params(), prescaled = two_params();
  optim::AdamW a(clipped, {0.9, 0.95, 1e-8, 0.1}), b(prescaled, {0.9, 0.95, 1e-8, 0.1});
  for (int64_t t = 1; t <= 4; ++t) {
    double squares = 0;
    std::vector<Tensor> grads;
    for (size_t i = 0; i < clipped.size(); ++i) {
      grads.push_back(testing::random(clipped[i].tensor.shape(), 50 * t + i, DType::F32, 2.0));
      for (float v : grads[i].to_vector<float>()) squares += static_cast<double>(v) * v;
      clipped[i].tensor.set_grad(clone(grads[i]));
    }
    const double max_norm = t == 3 ? 1e9 : 1.0;  // step 3 is under the limit
    const optim::GradClip clip = optim::grad_clip(clipped, max_norm);
    CHECK(clip.norm == doctest::Approx(std::sqrt(squares)).epsilon(1e-12));
    CHECK(clip.scale == (t == 3 ? 1.0f : static_cast<float>(1.0 / (clip.norm + 1e-6))));
    CHECK(optim::grad_clip(clipped, 0.0).scale == 1.0f);  // no limit
    for (size_t i = 0; i < clipped.size(); ++i) {
      CHECK(testing::bitwise_equal(clipped[i].tensor.grad(), grads[i]));  // not scaled in place
      prescaled[i].tensor.set_grad(mul(grads[i], static_cast<double>(clip.scale)));
    }
    a.step(1e-2, clip.scale);
    b.step(1e-2);
    a.zero_grad();
    b.zero_grad();
    for (size_t i = 0; i < clipped.size(); ++i)
      CHECK_MESSAGE(testing::bitwise_equal(clipped[i].tensor, prescaled[i].tensor), "step ", t, " ", clipped[i].name);
  }
}

// ---- through the Trainer -------------------------------------------------------------------------------------------

apps::TrainConfig small_config(const std::string& out_dir) {
  apps::TrainConfig c = apps::train_preset("tiny");
  c.model.seq_len = 32;
  c.batch_size = 4;
  c.data.synthetic_docs = 40;
  c.data.synthetic_domains = 4;
  c.eval_every = 0;
  c.eval_batches = 1;
  c.warmup = 5;
  c.out_dir = out_dir;
  return c;
}

TEST_CASE("omoe: resume with OMoE on is bit-exact (20 steps == 10 + resume + 10)") {
  OneThread one_thread;
  testing::ScratchDir dir("omoe_resume");
  apps::TrainConfig c = small_config(dir.file("straight"));
  c.steps = 20;
  c.checkpoint_every = 10;
  c.optimizer = apps::OptimizerKind::OMoE;
  c.omoe.every = 3;  // O steps 3, 6, 9 | 12, 15, 18: the checkpoint at 10 holds P one step after a reset
  c.omoe.warmup = 2;
  c.omoe.project_down = true;
  c.omoe.spectrum_every = 2;
  std::ostringstream log;
  apps::Trainer straight(c, log);
  straight.run();

  c.out_dir = dir.file("resumed");
  c.resume = dir.file("straight/checkpoints/step_000010");
  apps::Trainer resumed(c, log);
  CHECK(resumed.step() == 10);
  resumed.run();
  CHECK(resumed.step() == 20);
  std::vector<nn::NamedTensor> a = straight.model().lm().named_parameters(), b = resumed.model().lm().named_parameters();
  REQUIRE(a.size() == b.size());
  int differing = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (bitwise_equal(a[i].tensor, b[i].tensor)) continue;
    ++differing;
    MESSAGE("differs: " << a[i].name);
  }
  CHECK(differing == 0);

  // The O-step diagnostics in the metrics log: the straight run's O steps, with the spectrum on every second one.
  std::ifstream metrics(straight.metrics_path());
  std::vector<int64_t> o_steps, spectrum_steps;
  std::string line;
  while (std::getline(metrics, line)) {
    json j = json::parse(line);
    if (!j.contains("omoe")) continue;
    o_steps.push_back(j["step"].get<int64_t>());
    std::vector<double> removed = j["omoe"]["removed"].get<std::vector<double>>();
    REQUIRE(removed.size() == 2);  // one per MoE layer
    std::string spectrum;
    if (j["omoe"].contains("pbar_trace")) {
      spectrum_steps.push_back(j["step"].get<int64_t>());
      std::vector<double> trace = j["omoe"]["pbar_trace"].get<std::vector<double>>();
      std::vector<double> min_eig = j["omoe"]["pbar_min_eig"].get<std::vector<double>>();
      for (size_t l = 0; l < 2; ++l) {
        CHECK(trace[l] > 0);
        CHECK(trace[l] <= 1.0 + 1e-5);
        CHECK(min_eig[l] > 0);
        CHECK(min_eig[l] <= trace[l] + 1e-6);
      }
      spectrum = fmt::format(", tr(Pbar)/d {:.4f} {:.4f}, lambda_min {:.4f} {:.4f}", trace[0], trace[1], min_eig[0],
                             min_eig[1]);
    }
    for (double r : removed) CHECK((r > 0 && r < 1));
    MESSAGE(fmt::format("step {:2}: ||G Pbar - G|| / ||G|| per layer {:.4f} {:.4f}{}", j["step"].get<int64_t>(),
                        removed[0], removed[1], spectrum));
  }
  CHECK(o_steps == std::vector<int64_t>{3, 6, 9, 12, 15, 18});
  CHECK(spectrum_steps == std::vector<int64_t>{3, 9, 15});
}

// ---- OMoE against AdamW on synthetic multi-domain text ---------------------------------------------------------------

struct Diversity {
  std::vector<double> similarity, nv;  // per MoE layer
  double mean_similarity = 0, mean_nv = 0, eval_ce = 0;
  double input_cosine = 0;  // mean over layers and expert pairs of cos(a_i, a_j), a_e = mean input routed to e
};

// Expert output similarity and NV of every MoE layer on one fixed held-out batch (its tokens as they reach each layer).
Diversity diversity(apps::Trainer& trainer, bool with_eval = true) {
  NoGradGuard no_grad;
  data::LoaderOptions options;
  options.batch_size = static_cast<int>(std::min<int64_t>(16, trainer.data().validation->size()));
  options.seed = 0;
  data::Loader loader(trainer.data().validation, options);
  data::Batch b = loader.next();
  trainer.model().loss(from_vector(b.inputs, {b.B, b.T}), from_vector(b.targets, {int64_t(b.B) * b.T}),
                       from_vector(b.domains, {b.B}), static_cast<int64_t>(trainer.data().domains.size()));
  Diversity out;
  for (moe::MoELayer* layer : trainer.model().moe_layers()) {
    out.similarity.push_back(moe::expert_output_similarity(layer->experts, layer->last_input()).mean);
    out.nv.push_back(moe::normalized_parameter_variance(layer->experts).all);
    out.mean_similarity += out.similarity.back() / static_cast<double>(trainer.model().moe_layers().size());
    out.mean_nv += out.nv.back() / static_cast<double>(trainer.model().moe_layers().size());
    // The experts' mean routed inputs (what OMoE's projectors store) and how aligned they are.
    Tensor h = layer->last_input();
    std::vector<int32_t> ids = layer->last_routing().expert_ids.to_vector<int32_t>();
    const int64_t E = layer->experts.w_gate.size(0), d = h.size(1), k = layer->last_routing().expert_ids.size(1);
    std::vector<float> hv = h.to_vector<float>();
    std::vector<std::vector<double>> a(E, std::vector<double>(d, 0.0));
    for (size_t s = 0; s < ids.size(); ++s)
      for (int64_t c = 0; c < d; ++c) a[ids[s]][c] += hv[(s / k) * d + c];
    double cos_sum = 0;
    for (int64_t i = 0; i < E; ++i)
      for (int64_t j = i + 1; j < E; ++j) {
        double dot = 0, ni = 0, nj = 0;
        for (int64_t c = 0; c < d; ++c) dot += a[i][c] * a[j][c], ni += a[i][c] * a[i][c], nj += a[j][c] * a[j][c];
        cos_sum += dot / std::sqrt(ni * nj + 1e-30);
      }
    out.input_cosine += cos_sum / double(E * (E - 1) / 2) / static_cast<double>(trainer.model().moe_layers().size());
  }
  if (with_eval) out.eval_ce = trainer.validate().mean_ce;
  return out;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

// One compared run: a name and TOML lines applied on top of the test's base config ("optim.name = \"omoe\"").
struct Variant {
  std::string name, toml;
};

// MOELAB_OMOE_VARIANTS="name: key = value, key = value; name2: ..." (TOML values) replaces the compared runs.
std::vector<Variant> variants_from_env(std::vector<Variant> fallback) {
  const char* text = std::getenv("MOELAB_OMOE_VARIANTS");
  if (!text || !*text) return fallback;
  std::vector<Variant> out;
  std::istringstream runs(text);
  for (std::string run; std::getline(runs, run, ';');) {
    size_t colon = run.find(':');
    REQUIRE(colon != std::string::npos);
    Variant v{run.substr(0, colon), run.substr(colon + 1)};
    v.name.erase(0, v.name.find_first_not_of(' '));
    std::replace(v.toml.begin(), v.toml.end(), ',', '\n');
    out.push_back(v);
  }
  return out;
}

// Near-copies of one expert, as in the paper's MoE-fied models: w_e <- w_0 + spread * (w_e - w_0) for every expert
// matrix (spread 0: identical experts, 1: the random init unchanged).
void pull_experts_together(moe::MoEModel& model, float spread) {
  NoGradGuard no_grad;
  for (moe::MoELayer* layer : model.moe_layers())
    for (Tensor* w : {&layer->experts.w_gate, &layer->experts.w_up, &layer->experts.w_down}) {
      float* p = w->data<float>();
      const int64_t E = w->size(0), per = w->numel() / E;
      for (int64_t e = 1; e < E; ++e)
        for (int64_t i = 0; i < per; ++i) p[e * per + i] = p[i] + spread * (p[e * per + i] - p[i]);
    }
}

TEST_CASE("omoe: training on synthetic multi-domain text, OMoE vs AdamW at equal steps") {
  // The tiny preset on 4 synthetic domains, AdamW against OMoE with its defaults (K = 10, reset, alpha = the
  // running mean of ||a||^2, mode grad), same seed, same batches, same steps; then the expert output similarity on a
  // fixed held-out batch. Run-to-run differences of the similarity between seeds are about +-0.03, so one pair of
  // runs says little: the test runs two seeds and reports the means. MOELAB_OMOE_SEEDS / MOELAB_OMOE_STEPS make the
  // measurement longer, MOELAB_OMOE_BASE (TOML lines, comma-separated) changes every run's config,
  // MOELAB_OMOE_VARIANTS the compared runs and MOELAB_OMOE_SPREAD the experts' init (docs/omoe.md has the study).
  OneThread one_thread;
  testing::ScratchDir dir("omoe_train");
  const int64_t steps = env_int("MOELAB_OMOE_STEPS", 120), seeds = env_int("MOELAB_OMOE_SEEDS", 2);
  std::vector<Variant> variants = variants_from_env({{"adamw", ""}, {"omoe", "optim.name = \"omoe\""}});
  std::string base = std::getenv("MOELAB_OMOE_BASE") ? std::getenv("MOELAB_OMOE_BASE") : "";
  std::replace(base.begin(), base.end(), ',', '\n');
  std::vector<double> mean_similarity(variants.size(), 0.0), mean_ce(variants.size(), 0.0);
  std::vector<std::vector<double>> similarity(variants.size());
  for (int64_t seed = 0; seed < seeds; ++seed) {
    for (size_t v = 0; v < variants.size(); ++v) {
      apps::TrainConfig c = apps::train_preset("tiny");
      c.data.synthetic_docs = 60;
      c.data.synthetic_domains = 4;
      c.eval_every = 0;
      c.eval_batches = 2;
      c.steps = steps;
      c.warmup = 10;
      c.seed = 1234 + seed;
      c.out_dir = dir.file(fmt::format("{}_{}", v, seed));
      apps::apply_toml(c, base, "MOELAB_OMOE_BASE");
      apps::apply_toml(c, variants[v].toml, variants[v].name);
      std::ostringstream log;
      apps::Trainer trainer(c, log);
      if (const char* spread = std::getenv("MOELAB_OMOE_SPREAD")) pull_experts_together(trainer.model(), std::stof(spread));
      Diversity before = diversity(trainer, /*with_eval=*/false);
      trainer.run();
      Diversity after = diversity(trainer);
      MESSAGE(fmt::format("seed {} {:12} {} steps: expert output similarity {:+.4f} -> {:.4f} (per layer {:.4f} {:.4f}), "
                          "NV {:.4f} -> {:.4f}, held-out CE {:.4f}, cos between experts' mean inputs {:.3f}",
                          seed, variants[v].name, steps, before.mean_similarity, after.mean_similarity,
                          after.similarity[0], after.similarity[1], before.mean_nv, after.mean_nv, after.eval_ce,
                          after.input_cosine));
      if (!std::getenv("MOELAB_OMOE_SPREAD"))
        CHECK(std::abs(before.mean_similarity) < 0.05);  // random experts at init: near-orthogonal outputs
      CHECK(after.eval_ce < 2.0);                      // it trained (ln 256 = 5.5 at init)
      similarity[v].push_back(after.mean_similarity);
      mean_similarity[v] += after.mean_similarity / static_cast<double>(seeds);
      mean_ce[v] += after.eval_ce / static_cast<double>(seeds);
    }
  }
  for (size_t v = 0; v < variants.size(); ++v) {
    // Paired with the first run (same seed, same batches): mean difference and its standard error.
    double diff = 0, diff2 = 0;
    for (int64_t s = 0; s < seeds; ++s) {
      double d = similarity[v][s] - similarity[0][s];
      diff += d / double(seeds), diff2 += d * d / double(seeds);
    }
    double se = seeds > 1 ? std::sqrt(std::max(0.0, diff2 - diff * diff) / double(seeds - 1)) : 0.0;
    MESSAGE(fmt::format("mean over {} seeds, {:12}: expert output similarity {:.4f} ({:+.4f} +- {:.4f} vs {}), "
                        "held-out CE {:.4f}",
                        seeds, variants[v].name, mean_similarity[v], diff, se, variants[0].name, mean_ce[v]));
  }
  if (std::getenv("MOELAB_OMOE_VARIANTS")) return;
  // Under AdamW the experts' outputs grow similar (from ~0 at init): the effect OMoE is meant to counter.
  CHECK(mean_similarity[0] > 0.1);
  // The paper's claim (OMoE makes experts more diverse), measured and reported but not enforced: at this size it does not hold (docs/omoe.md).
  WARN_MESSAGE(mean_similarity[1] < mean_similarity[0],
               fmt::format("OMoE did not lower the mean expert output similarity: {:.4f} (OMoE) vs {:.4f} (AdamW)",
                           mean_similarity[1], mean_similarity[0]));
}

// ---- expert metrics --------------------------------------------------------------------------------------------------

TEST_CASE("omoe: expert metrics on known experts") {
  Generator gen(21);
  moe::MoELayer layer(testing::moe_layer_config(16, 4, 8, 2), 0, gen);
  Tensor x = testing::random({64, 16}, 4, DType::F32);
  // Independent random experts: near-orthogonal outputs, NV about (E - 1) / E.
  moe::OutputSimilarity random_sim = moe::expert_output_similarity(layer.experts, x);
  moe::ParameterVariance random_nv = moe::normalized_parameter_variance(layer.experts);
  NoGradGuard no_grad;
  // Expert 1 := expert 0: that pair's similarity is 1.
  for (Tensor* w : {&layer.experts.w_gate, &layer.experts.w_up, &layer.experts.w_down}) {
    Tensor first = slice_rows(*w, 0, 1), second = slice_rows(*w, 1, 2);
    copy_(second, first);
  }
  moe::OutputSimilarity copied = moe::expert_output_similarity(layer.experts, x);
  // All four equal: similarity 1, NV 0.
  for (Tensor* w : {&layer.experts.w_gate, &layer.experts.w_up, &layer.experts.w_down})
    for (int64_t e = 1; e < 4; ++e) {
      Tensor dst = slice_rows(*w, e, e + 1);
      copy_(dst, slice_rows(*w, 0, 1));
    }
  moe::OutputSimilarity same = moe::expert_output_similarity(layer.experts, x);
  MESSAGE(fmt::format("random experts: similarity {:.4f}, NV gate {:.3f} up {:.3f} down {:.3f} all {:.3f} (expected "
                      "about 0.75); expert 1 = expert 0: pair (0,1) {:.6f}; all equal: similarity {:.6f}, NV {:.2e}",
                      random_sim.mean, random_nv.w_gate, random_nv.w_up, random_nv.w_down, random_nv.all,
                      copied.pair[0][1], same.mean, moe::normalized_parameter_variance(layer.experts).all));
  CHECK(std::abs(random_sim.mean) < 0.2);
  CHECK(random_nv.all == doctest::Approx(0.75).epsilon(0.1));
  CHECK(copied.pair[0][1] == doctest::Approx(1.0).epsilon(1e-9));
  CHECK(same.mean == doctest::Approx(1.0).epsilon(1e-9));
  CHECK(moe::normalized_parameter_variance(layer.experts).all == doctest::Approx(0.0));
}

}  // namespace
