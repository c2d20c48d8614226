// Values read from disk, checked before they are used: element counts and byte sizes that overflow, the model config
// stored in checkpoints (types and keys), a config checked against a file's tensors before the model is built, and
// parameters that are not finite. Every error names the file (or the key) and what is wrong.
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "moe/model.h"
#include "nn/safetensors.h"
#include "tests/testing.h"

using namespace moelab;
using nlohmann::json;
using testing::check_mentions;
using testing::error_of;

namespace {

// The parameters of a freshly built model of `config`, as a loaded checkpoint holds them.
nn::SafeTensors file_of(const nn::ModelConfig& config) {
  moe::MoEModel model(config, moe::RouterLossConfig{}, /*seed=*/1);
  nn::SafeTensors file;
  for (const nn::NamedTensor& p : model.lm().named_parameters())
    file.tensors.push_back({p.name, clone(p.tensor.detach())});
  return file;
}

nn::ModelConfig small_config() {
  nn::ModelConfig c = testing::moe_layer_config(16, 4, 8, 2);
  c.vocab_size = 32;
  c.n_layers = 3;
  return c;
}

}  // namespace

TEST_CASE("tensor: element counts and byte sizes that overflow 63 bits fail instead of wrapping around") {
  CHECK(shape_numel({3, 4}) == 12);
  CHECK(shape_numel({int64_t(1) << 40, 0, int64_t(1) << 40}) == 0);  // a zero anywhere: no elements, no overflow
  CHECK(shape_bytes({int64_t(1) << 60}, DType::F32) == int64_t(1) << 62);
  check_mentions(error_of([] {
                   shape_numel({int64_t(1) << 32, int64_t(1) << 32});
                 }),
                 {"[4294967296, 4294967296]", "more than 2^63 - 1 elements"});
  check_mentions(error_of([] { shape_bytes({int64_t(1) << 62}, DType::F32); }),
                 {"[4611686018427387904]", "f32", "more than 2^63 - 1 bytes"});
  check_mentions(error_of([] { shape_numel({2, -3}); }), {"[2, -3]", "negative size"});
  check_mentions(error_of([] { Tensor::empty({int64_t(1) << 62}, DType::F64); }), {"more than 2^63 - 1 bytes"});
  // reshape's product of the known sizes, before its -1 is inferred.
  check_mentions(error_of([] {
                   reshape(arange(8), {-1, int64_t(1) << 32, int64_t(1) << 32});
                 }),
                 {"reshape", "more than 2^63 - 1 elements"});
}

TEST_CASE("model config JSON: wrong types, missing and unknown keys name the key") {
  const json good = small_config();
  CHECK(json(good.get<nn::ModelConfig>()) == good);
  auto error_with = [&](const std::function<void(json&)>& edit) {
    json j = good;
    edit(j);
    return error_of([&] { j.get<nn::ModelConfig>(); });
  };
  check_mentions(error_with([](json& j) { j["n_layers"] = "two"; }),
                 {"model config: key 'n_layers' must be an integer, got string \"two\""});
  check_mentions(error_with([](json& j) { j["d_model"] = 2.5; }), {"key 'd_model' must be an integer, got number 2.5"});
  check_mentions(error_with([](json& j) { j["dense_layers"] = nullptr; }),
                 {"key 'dense_layers' must be an array of integers, got null"});
  check_mentions(error_with([](json& j) { j["norm_topk"] = 1; }), {"key 'norm_topk' must be true or false"});
  check_mentions(error_with([](json& j) { j["rope_theta"] = "big"; }), {"key 'rope_theta' must be a number"});
  check_mentions(error_with([](json& j) { j.erase("vocab_size"); }), {"model config: missing key 'vocab_size'"});
  check_mentions(error_with([](json& j) { j[std::string(5000, 'k')] = 1; }),
                 {"unknown key 'kkk", "kkk... (5000 bytes)'"});
  check_mentions(error_of([] { json::array().get<nn::ModelConfig>(); }), {"expected a JSON object, got array"});
  // Options added later keep their defaults when absent (checkpoints written before them).
  json old = good;
  old.erase("shared_experts");
  CHECK(old.get<nn::ModelConfig>().shared_experts == 0);
}

TEST_CASE("model config: sizes beyond 2^31 - 1 and non-finite numbers are refused") {
  nn::ModelConfig c = small_config();
  c.n_layers = int64_t(1) << 40;
  check_mentions(error_of([&] { c.validate(); }), {"n_layers must be <= 2^31 - 1, got 1099511627776"});
  c = small_config();
  c.norm_eps = std::numeric_limits<double>::infinity();
  check_mentions(error_of([&] { c.validate(); }), {"norm_eps must be > 0, got inf"});
  c = small_config();
  c.dense_hidden = -1;
  check_mentions(error_of([&] { c.validate(); }), {"dense_hidden must be >= 0, got -1"});
}

TEST_CASE("checkpoint check: the config's parameter names and shapes equal those of the built model") {
  std::vector<nn::ModelConfig> configs(5, small_config());
  configs[1].n_experts = 0;  // dense
  configs[2].moe_every = 2, configs[2].dense_layers = {1};
  configs[3].shared_experts = 2, configs[3].dense_hidden = 24;
  configs[4].tie_embeddings = true, configs[4].dense_layers = {0};
  for (const nn::ModelConfig& c : configs) {
    CAPTURE(json(c).dump());
    CHECK_NOTHROW(nn::check_parameters_match(c, file_of(c), "x.safetensors"));
  }
}

TEST_CASE("checkpoint check: a config that does not fit the file fails at the first tensor, naming it") {
  const nn::ModelConfig c = small_config();
  const nn::SafeTensors file = file_of(c);
  nn::ModelConfig claims = c;
  claims.n_layers = 100000;  // a small file claiming 100000 layers: stops at the first missing layer
  check_mentions(error_of([&] { nn::check_parameters_match(claims, file, "x.safetensors"); }),
                 {"x.safetensors", "needs tensor 'layers.3.attn_norm.weight' [16]", "has none of that name"});
  nn::ModelConfig wider = c;
  wider.d_model = 32;
  check_mentions(error_of([&] { nn::check_parameters_match(wider, file, "x.safetensors"); }),
                 {"tensor 'tok_emb.weight' is f32[32, 16] in the file but the model config needs [32, 32]"});
  nn::ModelConfig fewer = c;
  fewer.n_layers = 2;
  check_mentions(error_of([&] { nn::check_parameters_match(fewer, file, "x.safetensors"); }),
                 {"tensor 'layers.2.attn_norm.weight' is not a parameter of a model with this config"});
  nn::ModelConfig invalid = c;
  invalid.top_k = 9;
  check_mentions(error_of([&] { nn::check_parameters_match(invalid, file, "x.safetensors"); }), {"top_k = 9"});
}

TEST_CASE("load_parameters: a non-finite value is refused by tensor name, and nothing is loaded") {
  const nn::ModelConfig c = small_config();
  nn::SafeTensors file = file_of(c);
  moe::MoEModel model(c, moe::RouterLossConfig{}, /*seed=*/2);
  const std::vector<float> before = model.lm().tok_emb.weight.to_vector<float>();
  for (nn::NamedTensor& t : file.tensors)
    if (t.name == "layers.1.attn.wo.weight") t.tensor.data<float>()[5] = std::numeric_limits<float>::quiet_NaN();
  check_mentions(error_of([&] { nn::load_parameters(model.lm(), file, "x.safetensors"); }),
                 {"x.safetensors", "parameter 'layers.1.attn.wo.weight' holds a non-finite value (nan) at element 5"});
  CHECK(model.lm().tok_emb.weight.to_vector<float>() == before);  // checked before the first copy
}
