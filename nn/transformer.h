#pragma once
// The decoder-only LM of docs/model.md: pre-norm blocks of RoPE attention and a feed-forward (dense or MoE).
//   x = tok_emb[ids]
//   per layer: x = x + Attn(RMSNorm_a(x));  x = x + FFN(RMSNorm_f(x))
//   logits = lm_head(RMSNorm_final(x))
// The FFN of each layer comes from a factory, so the MoE layer (moe/, a later layer of the build) plugs in here.
#include <functional>
#include <memory>

#include "nn/config.h"
#include "nn/layers.h"

namespace moelab::nn {

// Builds layer `layer`'s feed-forward and names it ("mlp" for dense, "moe" for a mixture) for the checkpoint.
struct NamedFeedForward {
  std::string name;
  std::unique_ptr<FeedForward> ffn;
};
using FeedForwardFactory = std::function<NamedFeedForward(const ModelConfig&, int64_t layer, Generator& gen)>;

// Dense SwiGLU of width config.dense_ffn_hidden() for every layer.
NamedFeedForward dense_feed_forward(const ModelConfig& config, int64_t layer, Generator& gen);

class Block : public Module {
 public:
  Block(const ModelConfig& config, int64_t layer, Generator& gen, const FeedForwardFactory& make_ffn);
  Tensor forward(const Tensor& x, int64_t batch, int64_t seq);  // [B*T, d] -> [B*T, d]
  RMSNorm attn_norm;
  CausalSelfAttention attn;
  RMSNorm ffn_norm;
  std::unique_ptr<FeedForward> ffn;
  std::string ffn_name;
};

class TransformerLM : public Module {
  // Declared first so that they exist before the layers below are built.
  ModelConfig config_;  // validated
  Generator init_rng_;  // the seeded stream every parameter is drawn from, in construction order

 public:
  // Parameters are drawn from one seeded stream in construction order: the same seed gives the same model on every
  // backend.
  TransformerLM(const ModelConfig& config, uint64_t seed, const FeedForwardFactory& make_ffn = dense_feed_forward);
  // ids: i32 [B, T] -> logits [B*T, V]: hidden(ids) @ output_weight()^T.
  Tensor forward(const Tensor& ids);
  // ids: i32 [B, T] -> the final norm's output [B*T, d], the LM head's input: a loss takes it and output_weight()
  // to linear_cross_entropy, which never makes the logits whole.
  Tensor hidden(const Tensor& ids);
  // The LM head's weight [V, d]: lm_head's, or with tie_embeddings the embedding table.
  const Tensor& output_weight() const { return lm_head ? lm_head->weight : tok_emb.weight; }
  const ModelConfig& config() const { return config_; }

  Embedding tok_emb;
  std::vector<std::unique_ptr<Block>> layers;
  RMSNorm final_norm;
  std::unique_ptr<Linear> lm_head;  // absent with tie_embeddings (tok_emb.weight is used)
};

}  // namespace moelab::nn
