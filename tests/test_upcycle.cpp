// Sparse upcycling (moe/upcycle.h): a dense checkpoint, saved and read back as a file, turned into an MoE model whose
// logits equal the dense model's (equal experts, normalized gates); the sanity check that raw gates break it; the
// multiplicative noise's size and seed; the router left as drawn; the errors of mismatched configs and checkpoints.
#include <algorithm>
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/model.h"
#include "moe/upcycle.h"
#include "nn/safetensors.h"
#include "tests/testing.h"

using namespace moelab;
using testing::as_doubles;
using testing::bitwise_equal;
using testing::check_error;

namespace {

constexpr uint64_t kDenseSeed = 11, kMoESeed = 23;

// The tiny architecture with a dense FFN of hidden 48 (n_experts = 0).
nn::ModelConfig dense_config() {
  nn::ModelConfig c;  // tiny: vocab 256, d 64, 2 layers, 4 heads
  c.n_experts = 0;
  c.dense_hidden = 48;
  return c;
}

// The same architecture with E experts of hidden 48.
nn::ModelConfig moe_config(int64_t top_k, bool norm_topk) {
  nn::ModelConfig c;
  c.n_experts = 4;
  c.top_k = top_k;
  c.expert_hidden = 48;
  c.norm_topk = norm_topk;
  return c;
}

Tensor parameter(const nn::Module& m, const std::string& name) {
  for (const nn::NamedTensor& p : m.named_parameters())
    if (p.name == name) return p.tensor;
  FAIL("no parameter " << name);
  return {};
}

// The dense model, its norms moved away from their init of ones (so that a norm left uncopied shows), written as a
// checkpoint with its config and read back: the path a real run takes.
struct DenseCheckpoint {
  nn::ModelConfig config;
  nn::SafeTensors file;
  Tensor logits;  // [B*T, V] of the dense model on batch()
};

Tensor batch() {
  std::mt19937 gen(5);
  std::uniform_int_distribution<int32_t> token(0, 255);
  std::vector<int32_t> ids(3 * 16);
  for (int32_t& id : ids) id = token(gen);
  return from_vector(ids, {3, 16});
}

DenseCheckpoint dense_checkpoint() {
  const nn::ModelConfig config = dense_config();
  moe::MoEModel model(config, moe::RouterLossConfig{}, kDenseSeed);
  Generator gen(99);
  for (nn::NamedTensor& p : model.lm().named_parameters())
    if (p.name.ends_with("norm.weight")) {
      NoGradGuard no_grad;
      copy_(p.tensor, randn(p.tensor.shape(), gen, 1.0, 0.1));
    }
  testing::ScratchDir dir("moelab_upcycle");
  nn::save_safetensors(dir / "model.safetensors", model.lm().named_parameters(),
                       {{"config", nlohmann::json(config).dump()}});
  DenseCheckpoint out;
  out.file = nn::load_safetensors(dir / "model.safetensors");
  out.config = nlohmann::json::parse(out.file.metadata.at("config")).get<nn::ModelConfig>();
  NoGradGuard no_grad;
  out.logits = model.lm().forward(batch());
  return out;
}

// max |a - b| / max |b|.
double scaled_error(const Tensor& actual, const Tensor& expected) {
  REQUIRE(actual.shape() == expected.shape());
  std::vector<double> a = as_doubles(actual), b = as_doubles(expected);
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i)
    diff = std::max(diff, std::abs(a[i] - b[i])), scale = std::max(scale, std::abs(b[i]));
  return diff / scale;
}

Tensor upcycled_logits(const DenseCheckpoint& dense, const nn::ModelConfig& config) {
  moe::MoEModel model(config, moe::RouterLossConfig{}, kMoESeed);
  moe::upcycle_from_dense(model, dense.config, dense.file);
  NoGradGuard no_grad;
  return model.lm().forward(batch());
}

// std of x / w - 1 over the elements of expert e of an upcycled [E, ...] weight against the dense w.
double relative_noise_std(const Tensor& upcycled, const Tensor& dense, int64_t e) {
  const std::vector<double> x = as_doubles(upcycled), w = as_doubles(dense);
  const size_t n = w.size();
  double sum = 0, sum_sq = 0;
  for (size_t i = 0; i < n; ++i) {
    const double r = x[e * n + i] / w[i] - 1;
    sum += r, sum_sq += r * r;
  }
  const double mean = sum / n;
  return std::sqrt(sum_sq / n - mean * mean);
}

}  // namespace

TEST_CASE("upcycle: the upcycled MoE model computes the dense model's logits (equal experts, gates sum to 1)") {
  const DenseCheckpoint dense = dense_checkpoint();
  for (int64_t top_k : {2, 1}) {
    CAPTURE(top_k);
    const double err = scaled_error(upcycled_logits(dense, moe_config(top_k, true)), dense.logits);
    MESSAGE("top_k = " << top_k << ": max |logits - dense| / max |dense| = " << err);
    CHECK(err < 1e-5);
  }
  // A dense first layer in the MoE model takes the dense FFN as it is.
  nn::ModelConfig mixed = moe_config(2, true);
  mixed.dense_layers = {0};
  mixed.dense_hidden = 48;
  const double err = scaled_error(upcycled_logits(dense, mixed), dense.logits);
  MESSAGE("dense_layers = {0}: max |logits - dense| / max |dense| = " << err);
  CHECK(err < 1e-5);
}

TEST_CASE("upcycle: with raw gates (norm_topk = false) the logits differ from the dense model's") {
  const DenseCheckpoint dense = dense_checkpoint();
  const double err = scaled_error(upcycled_logits(dense, moe_config(2, false)), dense.logits);
  MESSAGE("norm_topk = false: max |logits - dense| / max |dense| = " << err);
  CHECK(err > 1e-2);
}

TEST_CASE("upcycle: copies every parameter but the routers, which keep their seeded init") {
  const DenseCheckpoint dense = dense_checkpoint();
  const nn::ModelConfig config = moe_config(2, true);
  moe::MoEModel fresh(config, moe::RouterLossConfig{}, kMoESeed), model(config, moe::RouterLossConfig{}, kMoESeed);
  moe::upcycle_from_dense(model, dense.config, dense.file);
  for (const nn::NamedTensor& p : model.lm().named_parameters()) {
    CAPTURE(p.name);
    if (p.name.ends_with("router.weight")) {
      CHECK(bitwise_equal(p.tensor, parameter(fresh.lm(), p.name)));
    } else if (p.name.find(".moe.experts.") != std::string::npos) {
      const std::string name = p.name.substr(0, p.name.find(".moe.")) + ".mlp." + p.name.substr(p.name.rfind('.') + 1);
      for (int64_t e = 0; e < config.n_experts; ++e)
        CHECK(bitwise_equal(reshape(slice_rows(p.tensor, e, e + 1), dense.file.find(name)->shape()),
                            *dense.file.find(name)));
    } else {
      CHECK(bitwise_equal(p.tensor, *dense.file.find(p.name)));
    }
  }
}

TEST_CASE("upcycle: noise makes the experts differ by the asked relative std, the same seed gives the same weights") {
  const DenseCheckpoint dense = dense_checkpoint();
  const nn::ModelConfig config = moe_config(2, true);
  const double noise = 0.05;
  auto upcycled = [&](uint64_t seed) {
    auto model = std::make_unique<moe::MoEModel>(config, moe::RouterLossConfig{}, kMoESeed);
    moe::upcycle_from_dense(*model, dense.config, dense.file, {.noise = noise, .seed = seed});
    return model;
  };
  auto a = upcycled(7), b = upcycled(7), c = upcycled(8);
  double lowest = 1e9, highest = 0;
  for (const nn::NamedTensor& p : a->lm().named_parameters()) {
    CAPTURE(p.name);
    CHECK(bitwise_equal(p.tensor, parameter(b->lm(), p.name)));
    if (p.name.find(".moe.experts.") == std::string::npos) continue;
    CHECK_FALSE(bitwise_equal(p.tensor, parameter(c->lm(), p.name)));
    const std::string name = p.name.substr(0, p.name.find(".moe.")) + ".mlp." + p.name.substr(p.name.rfind('.') + 1);
    const Tensor& w = *dense.file.find(name);
    for (int64_t e = 0; e < config.n_experts; ++e) {
      const double s = relative_noise_std(p.tensor, w, e);
      lowest = std::min(lowest, s), highest = std::max(highest, s);
      CHECK(std::abs(s / noise - 1) < 0.1);
      if (e > 0) {
        const Tensor prev = slice_rows(p.tensor, e - 1, e), cur = slice_rows(p.tensor, e, e + 1);
        CHECK(scaled_error(cur, prev) > noise);  // the experts are no longer copies of each other
      }
    }
  }
  MESSAGE("noise = " << noise << ": measured std of w_e / w - 1 per expert and tensor in [" << lowest << ", " << highest
                     << "]");
}

TEST_CASE("upcycle: mismatched configs and checkpoints fail naming the difference, before any copy") {
  const DenseCheckpoint dense = dense_checkpoint();
  moe::MoEModel model(moe_config(2, true), moe::RouterLossConfig{}, kMoESeed);
  const Tensor before = clone(parameter(model.lm(), "tok_emb.weight")).detach();

  nn::ModelConfig narrow = dense.config;
  narrow.d_model = 32;
  check_error([&] { moe::upcycle_from_dense(model, narrow, dense.file); }, {"d_model", "32", "64"});

  nn::ModelConfig wide = dense.config;
  wide.dense_hidden = 64;
  check_error([&] { moe::upcycle_from_dense(model, wide, dense.file); }, {"64", "expert_hidden = 48"});

  check_error([&] { moe::upcycle_from_dense(model, moe_config(2, true), dense.file); }, {"n_experts = 4", "dense"});

  nn::ModelConfig shared = moe_config(2, true);
  shared.shared_experts = 1;
  moe::MoEModel with_shared(shared, moe::RouterLossConfig{}, kMoESeed);
  check_error([&] { moe::upcycle_from_dense(with_shared, dense.config, dense.file); },
              {"shared_experts = 1", "not supported"});

  check_error([&] { moe::upcycle_from_dense(model, dense.config, dense.file, {.noise = -1}); }, {"noise", "-1"});

  // A checkpoint that does not fit its config, and a NaN: named, and the model is left as it was (all checks come
  // before the first copy; lm_head is checked last).
  nn::SafeTensors bad = dense.file;
  for (nn::NamedTensor& t : bad.tensors) t.tensor = clone(t.tensor);
  auto tensor_of = [&](const std::string& name) -> Tensor& {
    for (nn::NamedTensor& t : bad.tensors)
      if (t.name == name) return t.tensor;
    FAIL("no tensor " << name);
    return bad.tensors.front().tensor;
  };
  Tensor& w_up = tensor_of("layers.1.mlp.w_up");
  const Tensor good_w_up = w_up;
  w_up = zeros({47, 64});
  check_error<std::runtime_error>([&] { moe::upcycle_from_dense(model, dense.config, bad); },
                                  {"layers.1.mlp.w_up", "[47, 64]", "[48, 64]"});
  w_up = good_w_up;
  tensor_of("lm_head.weight").data<float>()[3] = NAN;
  check_error<std::runtime_error>([&] { moe::upcycle_from_dense(model, dense.config, bad); },
                                  {"lm_head.weight", "non-finite", "element 3"});
  CHECK(bitwise_equal(parameter(model.lm(), "tok_emb.weight"), before));
}
