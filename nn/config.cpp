#include "nn/config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <utility>

#include "data/excerpt.h"
#include "engine/error.h"

namespace moelab::nn {

double ModelConfig::residual_init_std() const { return init_std / std::sqrt(2.0 * static_cast<double>(n_layers)); }

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (n_experts == 0) return false;
  if (std::find(dense_layers.begin(), dense_layers.end(), layer) != dense_layers.end()) return false;
  return (layer + 1) % moe_every == 0;
}

void ModelConfig::validate() const {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("model config: " + what);
  };
  // Sizes become tensor dimensions and int32 token ids: at most 2^31 - 1 keeps every product of two in 63 bits
  // (checked first: the checks below multiply them).
  const std::pair<const char*, int64_t> sizes[] = {{"vocab_size", vocab_size},
                                                   {"d_model", d_model},
                                                   {"n_layers", n_layers},
                                                   {"n_heads", n_heads},
                                                   {"seq_len", seq_len},
                                                   {"n_experts", n_experts},
                                                   {"top_k", top_k},
                                                   {"expert_hidden", expert_hidden},
                                                   {"shared_experts", shared_experts},
                                                   {"moe_every", moe_every},
                                                   {"dense_hidden", dense_hidden}};
  for (const auto& [name, value] : sizes)
    require(value <= INT32_MAX, fmt::format("{} must be <= 2^31 - 1, got {}", name, value));
  require(vocab_size > 0, fmt::format("vocab_size must be > 0, got {}", vocab_size));
  require(d_model > 0 && n_heads > 0 && d_model % n_heads == 0,
          fmt::format("d_model ({}) must be a positive multiple of n_heads ({})", d_model, n_heads));
  require(head_dim() % 2 == 0, fmt::format("head size d_model/n_heads = {} must be even for RoPE", head_dim()));
  require(n_layers > 0, fmt::format("n_layers must be > 0, got {}", n_layers));
  require(seq_len > 0, fmt::format("seq_len must be > 0, got {}", seq_len));
  require(n_experts >= 0, fmt::format("n_experts must be >= 0, got {}", n_experts));
  require(moe_every >= 1, fmt::format("moe_every must be >= 1, got {}", moe_every));
  if (n_experts > 0) {
    require(top_k >= 1 && top_k <= n_experts, fmt::format("top_k = {} must be in [1, n_experts = {}]", top_k, n_experts));
    require(expert_hidden > 0, fmt::format("expert_hidden must be > 0, got {}", expert_hidden));
  }
  require(shared_experts >= 0, fmt::format("shared_experts must be >= 0, got {}", shared_experts));
  require(dense_hidden >= 0, fmt::format("dense_hidden must be >= 0, got {}", dense_hidden));
  for (int64_t l : dense_layers)
    require(l >= 0 && l < n_layers, fmt::format("dense_layers entry {} is not a layer of [0, {})", l, n_layers));
  require(dense_ffn_hidden() > 0, "dense layers need dense_hidden > 0 (or top_k * expert_hidden > 0)");
  require(std::isfinite(rope_theta) && rope_theta > 0, fmt::format("rope_theta must be > 0, got {}", rope_theta));
  require(std::isfinite(norm_eps) && norm_eps > 0, fmt::format("norm_eps must be > 0, got {}", norm_eps));
  require(std::isfinite(init_std) && init_std >= 0, fmt::format("init_std must be >= 0, got {}", init_std));
}

ModelConfig model_preset(const std::string& name) {
  ModelConfig c;  // defaults are "tiny"
  if (name == "tiny") return c;
  if (name == "S") {
    c.vocab_size = 8192, c.d_model = 512, c.n_layers = 8, c.n_heads = 8, c.n_experts = 16, c.top_k = 2;
    c.expert_hidden = 512, c.seq_len = 512;
    return c;
  }
  if (name == "M") {
    c.vocab_size = 32768, c.d_model = 768, c.n_layers = 12, c.n_heads = 12, c.n_experts = 32, c.top_k = 4;
    c.expert_hidden = 384, c.seq_len = 1024;
    return c;
  }
  throw std::invalid_argument(fmt::format("unknown model config '{}' (known: tiny, S, M)", name));
}

void to_json(nlohmann::json& j, const ModelConfig& c) {
  j = nlohmann::json{{"vocab_size", c.vocab_size},   {"d_model", c.d_model},
                     {"n_layers", c.n_layers},       {"n_heads", c.n_heads},
                     {"seq_len", c.seq_len},         {"n_experts", c.n_experts},
                     {"top_k", c.top_k},             {"expert_hidden", c.expert_hidden},
                     {"norm_topk", c.norm_topk},     {"shared_experts", c.shared_experts},
                     {"moe_every", c.moe_every},     {"dense_layers", c.dense_layers},
                     {"dense_hidden", c.dense_hidden}, {"tie_embeddings", c.tie_embeddings},
                     {"rope_theta", c.rope_theta},   {"norm_eps", c.norm_eps},
                     {"init_std", c.init_std}};
}

namespace {

using nlohmann::json;

// The JSON types each field accepts, and their names for errors.
bool has_type(const json& v, const int64_t&) {
  return v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX));
}
bool has_type(const json& v, const double&) { return v.is_number(); }
bool has_type(const json& v, const bool&) { return v.is_boolean(); }
bool has_type(const json& v, const std::vector<int64_t>& list) {
  return v.is_array() && std::all_of(v.begin(), v.end(), [&](const json& x) { return has_type(x, int64_t{}); });
}
const char* type_name(const int64_t&) { return "an integer"; }
const char* type_name(const double&) { return "a number"; }
const char* type_name(const bool&) { return "true or false"; }
const char* type_name(const std::vector<int64_t>&) { return "an array of integers"; }

// j[key] into `out`, its JSON type checked. A missing key is an error when `required`, else `out` keeps its default.
template <class T> void read_key(const json& j, const char* key, T& out, bool required) {
  auto it = j.find(key);
  if (it == j.end()) {
    if (required) fail("model config: missing key '{}'", key);
    return;
  }
  if (!has_type(*it, out))
    fail("model config: key '{}' must be {}, got {} {}", key, type_name(out), it->type_name(),
         data::excerpt(it->dump()));
  out = it->template get<T>();
}

}  // namespace

void from_json(const json& j, ModelConfig& c) {
  if (!j.is_object()) fail("model config: expected a JSON object, got {}", j.type_name());
  static const char* known[] = {"vocab_size", "d_model",      "n_layers",     "n_heads",        "seq_len",
                                "n_experts",  "top_k",        "expert_hidden", "norm_topk",     "shared_experts",
                                "moe_every",  "dense_layers", "dense_hidden", "tie_embeddings", "rope_theta",
                                "norm_eps",   "init_std"};
  for (const auto& item : j.items()) {  // a typo must not pass silently
    const std::string& key = item.key();
    if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return key == k; }) == std::end(known))
      fail("model config: unknown key '{}'", data::excerpt(key));
  }
  c = ModelConfig{};
  // The sizes are required; the later options keep their defaults when absent (checkpoints written before them).
  read_key(j, "vocab_size", c.vocab_size, true);
  read_key(j, "d_model", c.d_model, true);
  read_key(j, "n_layers", c.n_layers, true);
  read_key(j, "n_heads", c.n_heads, true);
  read_key(j, "seq_len", c.seq_len, true);
  read_key(j, "n_experts", c.n_experts, true);
  read_key(j, "top_k", c.top_k, true);
  read_key(j, "expert_hidden", c.expert_hidden, true);
  read_key(j, "norm_topk", c.norm_topk, false);
  read_key(j, "shared_experts", c.shared_experts, false);
  read_key(j, "moe_every", c.moe_every, false);
  read_key(j, "dense_layers", c.dense_layers, false);
  read_key(j, "dense_hidden", c.dense_hidden, false);
  read_key(j, "tie_embeddings", c.tie_embeddings, false);
  read_key(j, "rope_theta", c.rope_theta, false);
  read_key(j, "norm_eps", c.norm_eps, false);
  read_key(j, "init_std", c.init_std, false);
}

}  // namespace moelab::nn
