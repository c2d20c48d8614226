// Model parity with the PyTorch twin (tests/torch/twin.py, Debian's python3-torch): the same seeded model, batch and
// objective on both sides, compared on
//   (a) the loss of a fixed batch, its terms (CE, LB, Z, ED), the logits and every parameter's gradient, and
//   (b) every weight after 3 AdamW steps with gradient clipping (constant lr),
// in f32. The twin writes what it computed into the case's folder (twin.py's docstring lists it); a failing case keeps
// that folder and names it, so `python3 tests/torch/twin.py parity DIR` can be rerun by hand; it also holds ours.safetensors
// (our logits, first-step gradients "grad.<name>" and final weights, named as in the twin's output), and
// `twin.py parity DIR --f64` adds a float64 run, closer to the exact result than either side. MOELAB_TWIN_REPORT=1
// prints every case's worst errors; MOELAB_TWIN_KEEP=1 keeps every case's folder. Skips (with a message) only when /usr/bin/python3 cannot import torch.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "moe/model.h"
#include "nn/safetensors.h"
#include "optim/adamw.h"
#include "tests/python_runner.h"
#include "tests/testing.h"

namespace {
using namespace moelab;
using json = nlohmann::json;

// ---- tolerances ---------------------------------------------------------------------------------------------------
// The loss and its terms: relative error in f32, a few ulp accumulated over the forward's reductions.
constexpr double kLossRel = 1e-5;
// Logits: relative 1e-5 with a floor of 1e-1 * max|logit| (the op oracle's floor for reductions, see
// test_torch_oracle.cpp: a logit near 0 is a 64-term dot product whose rounding is set by its larger terms).
constexpr double kLogitRel = 1e-5, kLogitFloor = 1e-1;
// Gradients of the first step, per tensor: max|ours - torch| <= 1e-5 * max|torch|. A whole-model gradient goes through
// ~25 ops in f32 summed in other orders; measured against a float64 run of the twin (`twin.py parity DIR --f64`), both
// sides are off by up to ~9e-7 of the tensor's largest entry (every case, both sides alike), so 1e-5 is a ~10x margin,
// while a real mistake in a backward (a missing term, a wrong factor) changes gradients by O(1) of that scale.
constexpr double kGradRel = 1e-5;
// Weights after the AdamW steps, per element: |ours - torch| <= 1e-5 |torch| + kLrFraction * lr * steps.
// The first term is f32 agreement of the weights themselves. The second exists because AdamW normalizes: an element
// moves by lr * m_hat / (sqrt(v_hat) + eps) whatever the size of its gradient, so for an element whose gradient is
// itself at the level of rounding noise (~1e-6 of its tensor's largest entry) the step's direction and size are set by
// rounding, which differs between the two sides. Example, measured: layers.0.attn.wqkv.weight[10846] of the LB+Z+ED
// case has a first gradient of 7e-8 = 2e-7 of its tensor's max; the two sides' weights end 0.015 lr apart, and each is
// as far from the float64 run as the other. kLrFraction = 2e-2 per step leaves a ~4x margin over the worst such
// element seen, while a wrong update (a missing bias correction, decay on a vector, a wrong clip factor) moves many
// elements by O(lr) and fails by ~50x.
constexpr double kWeightRel = 1e-5, kLrFraction = 2e-2;

struct TrainParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  double grad_clip = 0.5;  // below the gradient norms of these cases, so clipping is exercised
  int steps = 3;
};

struct ParityCase {
  std::string name;  // also names the scratch folder
  nn::ModelConfig config;
  moe::RouterLossConfig losses;
  TrainParams train;
};

// A fixed batch: B sequences of T tokens, seeded, with domains {0, 2, 0, 3, 2, 0} of 4 (three present, one absent).
struct Batch {
  int64_t B = 6, T = 32, num_domains = 4;
  Tensor inputs, targets, domains;  // i32 [B, T], [B*T], [B]
};

Batch make_batch(int64_t vocab) {
  Batch b;
  std::mt19937 rng(20260301);
  std::vector<int32_t> inputs(b.B * b.T), targets(b.B * b.T);
  for (int32_t& v : inputs) v = static_cast<int32_t>(rng() % vocab);
  for (int32_t& v : targets) v = static_cast<int32_t>(rng() % vocab);
  b.inputs = from_vector(inputs, {b.B, b.T});
  b.targets = from_vector(targets, {b.B * b.T});
  b.domains = from_vector(std::vector<int32_t>{0, 2, 0, 3, 2, 0}, {b.B});
  return b;
}

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value && *value && std::string(value) != "0";
}

double relative(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); }

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

const Tensor& twin_tensor(const nn::SafeTensors& out, const std::string& name) {
  const Tensor* t = out.find(name);
  REQUIRE_MESSAGE(t != nullptr, "twin output has no '" << name << "'");
  return *t;
}

double twin_scalar(const nn::SafeTensors& out, const std::string& name) { return twin_tensor(out, name).item(); }

// What one case measured, for the report and for keeping the folder of a failing case.
struct Worst {
  double loss = 0, terms = 0, logits = 0, grad_norm = 0;
  double grad = 0;
  std::string grad_where;
  double weight = 0;  // |a - b| / tolerance (<= 1 passes)
  double weight_abs_over_lr = 0;
  std::string weight_where;
};

void run_parity(const ParityCase& c) {
  const testing::TorchStatus& torch = testing::torch_status();
  if (!torch.available) {
    MESSAGE("skipped: " << torch.why);
    return;
  }
  testing::ScratchDir dir("moelab_twin_" + c.name);
  const TrainParams& tp = c.train;

  // ---- inputs of both sides -------------------------------------------------------------------------------------
  moe::MoEModel model(c.config, c.losses, /*seed=*/1234);
  std::vector<nn::NamedTensor> params = model.lm().named_parameters();
  nn::save_safetensors(dir.path() / "model.safetensors", params, {{"config", json(c.config).dump()}});
  Batch batch = make_batch(c.config.vocab_size);
  nn::save_safetensors(dir.path() / "batch.safetensors",
                       {{"inputs", batch.inputs}, {"targets", batch.targets}, {"domains", batch.domains}});
  json run = {{"alpha", c.losses.alpha},   {"z_coef", c.losses.z_coef}, {"beta", c.losses.beta},
              {"ed_form", enum_name(c.losses.ed_form)}, {"ed_eps", c.losses.ed_eps}, {"lr", tp.lr},
              {"beta1", tp.beta1},         {"beta2", tp.beta2},         {"eps", tp.eps},
              {"weight_decay", tp.weight_decay}, {"grad_clip", tp.grad_clip}, {"steps", tp.steps}};
  std::ofstream(dir.path() / "params.json") << run.dump(2);

  testing::PythonRun twin = testing::run_python_script(testing::source_file("tests/torch/twin.py"), {"parity", dir.path()});
  if (!twin.ok()) dir.keep();
  REQUIRE_MESSAGE(twin.ok(), "twin.py parity " << dir.path().string() << " failed (exit " << twin.exit_code << "):\n"
                                               << twin.output);
  nn::SafeTensors out = nn::load_safetensors(dir.path() / "out.safetensors");

  // ---- our side: the logits, then the same steps as apps/common/trainer.cpp ---------------------------------------
  Tensor logits;
  {
    NoGradGuard no_grad;
    logits = model.lm().forward(batch.inputs);  // [B*T, V]
  }
  optim::AdamWConfig adamw_config;
  adamw_config.beta1 = tp.beta1, adamw_config.beta2 = tp.beta2, adamw_config.eps = tp.eps;
  adamw_config.weight_decay = tp.weight_decay;
  optim::AdamW optimizer(params, adamw_config);
  std::vector<double> losses, grad_norms;
  moe::LossTerms first;
  std::vector<Tensor> first_grads;
  for (int step = 0; step < tp.steps; ++step) {
    moe::Loss loss = model.loss(batch.inputs, batch.targets, batch.domains, batch.num_domains);
    loss.value.backward();
    losses.push_back(loss.value.item());
    if (step == 0) {
      first = loss.terms;
      for (const nn::NamedTensor& p : params)
        first_grads.push_back(p.tensor.grad().defined() ? clone(p.tensor.grad()) : zeros_like(p.tensor));
    }
    const optim::GradClip clip = optim::grad_clip(params, tp.grad_clip);
    grad_norms.push_back(clip.norm);
    optimizer.step(tp.lr, clip.scale);
    optimizer.zero_grad();
  }

  // ---- compare ----------------------------------------------------------------------------------------------------
  Worst w;
  bool failed = false;
  std::vector<double> twin_losses = testing::as_doubles(twin_tensor(out, "losses"));
  std::vector<double> twin_norms = testing::as_doubles(twin_tensor(out, "grad_norms"));
  REQUIRE(twin_losses.size() == losses.size());
  for (size_t s = 0; s < losses.size(); ++s) {
    double err = relative(losses[s], twin_losses[s]);
    w.loss = std::max(w.loss, err);
    if (!(err < kLossRel)) failed = true;
    CHECK_MESSAGE(err < kLossRel, fmt::format("loss of step {}: ours {:.9g}, torch {:.9g}, relative error {:.3g}", s + 1,
                                              losses[s], twin_losses[s], err));
    w.grad_norm = std::max(w.grad_norm, relative(grad_norms[s], twin_norms[s]));
  }
  CHECK_MESSAGE(w.grad_norm < kGradRel, "gradient norms before clipping differ by " << w.grad_norm << " (relative)");
  CHECK_MESSAGE(grad_norms[0] > tp.grad_clip, "this case should exercise clipping: the first gradient norm is "
                                                  << grad_norms[0] << " <= grad_clip " << tp.grad_clip);

  const std::pair<const char*, double> terms[] = {{"ce", first.ce}, {"lb", first.lb}, {"z", first.z}, {"ed", first.ed}};
  for (const auto& [name, ours] : terms) {
    double theirs = twin_scalar(out, name);
    double err = ours == theirs ? 0.0 : relative(ours, theirs);
    w.terms = std::max(w.terms, err);
    if (!(err < kLossRel)) failed = true;
    CHECK_MESSAGE(err < kLossRel, fmt::format("loss term {} of the first step: ours {:.9g}, torch {:.9g}", name, ours, theirs));
  }

  {
    std::vector<double> a = testing::as_doubles(logits), b = testing::as_doubles(twin_tensor(out, "logits"));
    REQUIRE(a.size() == b.size());
    double floor = kLogitFloor * max_abs(b);
    for (size_t i = 0; i < a.size(); ++i) w.logits = std::max(w.logits, std::abs(a[i] - b[i]) / (std::abs(b[i]) + floor));
    if (!(w.logits < kLogitRel)) failed = true;
    CHECK_MESSAGE(w.logits < kLogitRel, "logits differ: worst relative error (floor " << kLogitFloor << " max) " << w.logits);
  }

  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].name;
    std::vector<double> a = testing::as_doubles(first_grads[i]), b = testing::as_doubles(twin_tensor(out, "grad." + name));
    REQUIRE_MESSAGE(a.size() == b.size(), name);
    double scale = max_abs(b), diff = 0;
    for (size_t j = 0; j < a.size(); ++j) diff = std::max(diff, std::abs(a[j] - b[j]));
    double err = scale > 0 ? diff / scale : diff;
    if (err > w.grad) w.grad = err, w.grad_where = name;
    if (!(err <= kGradRel)) failed = true;
    CHECK_MESSAGE(err <= kGradRel, fmt::format("gradient of {} (first step): max |ours - torch| = {:.3g} = {:.3g} of "
                                               "max|torch| = {:.3g}",
                                               name, diff, err, scale));
  }

  const double lr_slack = kLrFraction * tp.lr * tp.steps;
  for (const nn::NamedTensor& p : params) {
    std::vector<double> a = testing::as_doubles(p.tensor), b = testing::as_doubles(twin_tensor(out, p.name));
    REQUIRE_MESSAGE(a.size() == b.size(), p.name);
    size_t bad = 0, worst_at = 0;
    double worst = 0;
    for (size_t j = 0; j < a.size(); ++j) {
      double ratio = std::abs(a[j] - b[j]) / (kWeightRel * std::abs(b[j]) + lr_slack);
      if (!(ratio <= 1)) ++bad;
      if (!(ratio <= worst)) worst = ratio, worst_at = j;
    }
    if (worst > w.weight)
      w.weight = worst, w.weight_where = fmt::format("{}[{}]", p.name, worst_at),
      w.weight_abs_over_lr = std::abs(a[worst_at] - b[worst_at]) / tp.lr;
    if (bad) failed = true;
    CHECK_MESSAGE(bad == 0, fmt::format("{} of {} elements of {} differ after {} steps beyond 1e-5 |w| + {:.1g}; worst at "
                                        "{}: ours {:.9g}, torch {:.9g}",
                                        bad, a.size(), p.name, tp.steps, lr_slack, worst_at, a[worst_at], b[worst_at]));
  }

  if (failed || env_flag("MOELAB_TWIN_KEEP")) {
    std::vector<nn::NamedTensor> ours{{"logits", logits}};
    for (size_t i = 0; i < params.size(); ++i) ours.push_back({"grad." + params[i].name, first_grads[i]});
    for (const nn::NamedTensor& p : params) ours.push_back(p);
    nn::save_safetensors(dir.path() / "ours.safetensors", ours);
    dir.keep();
    MESSAGE("kept the case's files in " << dir.path().string());
  }
  if (env_flag("MOELAB_TWIN_REPORT"))
    MESSAGE(fmt::format("twin parity '{}' (torch {}): loss rel {:.2g} | terms rel {:.2g} | logits {:.2g} | grad norm rel "
                        "{:.2g} | grads {:.2g} of max ({}) | weights {:.2g} of tolerance, |diff| = {:.2g} lr ({})",
                        c.name, torch.version, w.loss, w.terms, w.logits, w.grad_norm, w.grad, w.grad_where, w.weight,
                        w.weight_abs_over_lr, w.weight_where));
}

// The tiny config of docs/model.md with the router losses of the baseline turned up, so that their gradients weigh in the
// comparison (at alpha = 0.01 and z = 0.001 a mistake in them would hide under the CE gradient's tolerance).
moe::RouterLossConfig strong_router_losses() {
  moe::RouterLossConfig l;
  l.alpha = 0.1;
  l.z_coef = 0.01;
  return l;
}

}  // namespace

TEST_CASE("twin: dense model (n_experts = 0) matches PyTorch: loss, gradients, 3 AdamW steps") {
  ParityCase c{"dense", nn::model_preset("tiny"), {}, {}};
  c.config.n_experts = 0;
  c.losses.beta = 0;
  run_parity(c);
}

TEST_CASE("twin: MoE with LB + Z + ED (neglog), norm_topk, matches PyTorch: loss, gradients, 3 AdamW steps") {
  ParityCase c{"moe_lb_z_ed", nn::model_preset("tiny"), strong_router_losses(), {}};
  c.config.norm_topk = true;
  c.losses.beta = 0.1;
  c.losses.ed_form = moe::EDForm::NegLog;
  run_parity(c);
}

TEST_CASE("twin: MoE with a shared expert, dense layer 0, raw top-k gates (ED neg_jsd) matches PyTorch") {
  ParityCase c{"moe_shared_dense0", nn::model_preset("tiny"), strong_router_losses(), {}};
  c.config.shared_experts = 1;
  c.config.dense_layers = {0};
  c.config.norm_topk = false;
  c.losses.beta = 0.5;
  c.losses.ed_form = moe::EDForm::NegJSD;
  run_parity(c);
}

TEST_CASE("twin: MoE with tied embeddings, top_k 1, 3 layers with moe_every 2 matches PyTorch") {
  ParityCase c{"moe_tied_top1", nn::model_preset("tiny"), strong_router_losses(), {}};
  c.config.tie_embeddings = true;
  c.config.top_k = 1;
  c.config.n_layers = 3;
  c.config.moe_every = 2;
  c.losses.beta = 0.1;
  run_parity(c);
}
