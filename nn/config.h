#pragma once
// The model's architecture: everything needed to build the network and to rebuild it from a checkpoint.
// Stored as JSON in the checkpoint's __metadata__ (key "config") so the PyTorch twin can rebuild the same model.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moelab::nn {

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t d_model = 64;
  int64_t n_layers = 2;
  int64_t n_heads = 4;
  int64_t seq_len = 64;             // context length the model is trained at
  // Feed-forward: MoE layers (n_experts > 0) and dense SwiGLU layers.
  int64_t n_experts = 4;            // 0: a dense model
  int64_t top_k = 2;
  int64_t expert_hidden = 64;
  bool norm_topk = true;            // renormalize the k chosen router probabilities to sum 1
  int64_t shared_experts = 0;       // always-on SwiGLU experts added to the routed output
  int64_t moe_every = 1;            // layer l is MoE when (l + 1) % moe_every == 0 ...
  std::vector<int64_t> dense_layers;  // ... and l is not listed here (e.g. {0}: first layer dense)
  int64_t dense_hidden = 0;         // hidden size of dense layers; 0 = top_k * expert_hidden (same active compute)
  bool tie_embeddings = false;      // lm_head shares tok_emb's weight
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  double init_std = 0.02;

  int64_t head_dim() const { return d_model / n_heads; }
  // Init std of the residual output projections (W_o, W_down of dense layers and experts): smaller than init_std so
  // that the residual stream's variance does not grow with depth.
  double residual_init_std() const;
  bool is_moe_layer(int64_t layer) const;
  int64_t dense_ffn_hidden() const { return dense_hidden > 0 ? dense_hidden : top_k * expert_hidden; }
  // Throws std::invalid_argument naming the bad field and value.
  void validate() const;
};

// The named configs of docs/model.md: "tiny" (CPU tests), "S" and "M" (one GPU).
ModelConfig model_preset(const std::string& name);

void to_json(nlohmann::json& j, const ModelConfig& c);
void from_json(const nlohmann::json& j, ModelConfig& c);

}  // namespace moelab::nn
