#include "nn/config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>

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
  for (int64_t l : dense_layers)
    require(l >= 0 && l < n_layers, fmt::format("dense_layers entry {} is not a layer of [0, {})", l, n_layers));
  require(dense_ffn_hidden() > 0, "dense layers need dense_hidden > 0 (or top_k * expert_hidden > 0)");
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

void from_json(const nlohmann::json& j, ModelConfig& c) {
  ModelConfig d;  // missing keys keep their defaults; unknown keys are an error (a typo must not pass silently)
  static const char* known[] = {"vocab_size", "d_model",      "n_layers",     "n_heads",        "seq_len",
                                "n_experts",  "top_k",        "expert_hidden", "norm_topk",     "shared_experts",
                                "moe_every",  "dense_layers", "dense_hidden", "tie_embeddings", "rope_theta",
                                "norm_eps",   "init_std"};
  for (const auto& [key, value] : j.items())
    if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return key == k; }) == std::end(known))
      throw std::invalid_argument("model config: unknown key '" + key + "'");
  c.vocab_size = j.value("vocab_size", d.vocab_size);
  c.d_model = j.value("d_model", d.d_model);
  c.n_layers = j.value("n_layers", d.n_layers);
  c.n_heads = j.value("n_heads", d.n_heads);
  c.seq_len = j.value("seq_len", d.seq_len);
  c.n_experts = j.value("n_experts", d.n_experts);
  c.top_k = j.value("top_k", d.top_k);
  c.expert_hidden = j.value("expert_hidden", d.expert_hidden);
  c.norm_topk = j.value("norm_topk", d.norm_topk);
  c.shared_experts = j.value("shared_experts", d.shared_experts);
  c.moe_every = j.value("moe_every", d.moe_every);
  c.dense_layers = j.value("dense_layers", d.dense_layers);
  c.dense_hidden = j.value("dense_hidden", d.dense_hidden);
  c.tie_embeddings = j.value("tie_embeddings", d.tie_embeddings);
  c.rope_theta = j.value("rope_theta", d.rope_theta);
  c.norm_eps = j.value("norm_eps", d.norm_eps);
  c.init_std = j.value("init_std", d.init_std);
}

}  // namespace moelab::nn
