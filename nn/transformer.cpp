#include "nn/transformer.h"

namespace moelab::nn {

NamedFeedForward dense_feed_forward(const ModelConfig& c, int64_t, Generator& gen) {
  return {"mlp", std::make_unique<SwiGLU>(c.d_model, c.dense_ffn_hidden(), gen, c.init_std, c.residual_init_std())};
}

Block::Block(const ModelConfig& c, int64_t layer, Generator& gen, const FeedForwardFactory& make_ffn)
    : attn_norm(c.d_model, c.norm_eps),
      attn(c.d_model, c.n_heads, c.rope_theta, gen, c.init_std, c.residual_init_std()),
      ffn_norm(c.d_model, c.norm_eps) {
  NamedFeedForward named = make_ffn(c, layer, gen);
  ffn = std::move(named.ffn);
  ffn_name = named.name;
  add_module("attn_norm", attn_norm);
  add_module("attn", attn);
  add_module("ffn_norm", ffn_norm);
  add_module(ffn_name, *ffn);
}

Tensor Block::forward(const Tensor& x, int64_t batch, int64_t seq) {
  // Attention's input in bf16 under mixed precision: its only use is as the q, k and v products' operand.
  Tensor h = x + attn.forward(attn_norm.forward_operand(x), batch, seq);
  return ffn->forward_plus(ffn_norm.forward(h), h);  // h + ffn(norm(h))
}

static const ModelConfig& validated(const ModelConfig& c) {
  c.validate();
  return c;
}

TransformerLM::TransformerLM(const ModelConfig& config, uint64_t seed, const FeedForwardFactory& make_ffn)
    : config_(validated(config)),
      init_rng_(seed),
      tok_emb(config.vocab_size, config.d_model, init_rng_, config.init_std),
      final_norm(config.d_model, config.norm_eps) {
  add_module("tok_emb", tok_emb);
  for (int64_t l = 0; l < config.n_layers; ++l) {
    layers.push_back(std::make_unique<Block>(config, l, init_rng_, make_ffn));
    add_module("layers." + std::to_string(l), *layers.back());
  }
  add_module("final_norm", final_norm);
  if (!config.tie_embeddings) {
    lm_head = std::make_unique<Linear>(config.d_model, config.vocab_size, init_rng_, config.init_std);
    add_module("lm_head", *lm_head);
  }
}

Tensor TransformerLM::hidden(const Tensor& ids) {
  if (ids.dim() != 2 || ids.dtype() != DType::I32)
    throw std::invalid_argument("TransformerLM: ids must be i32 [B, T], got " + ids.str());
  Tensor x = tok_emb.forward(reshape(ids, {-1}));  // [B*T, d]
  for (auto& block : layers) x = block->forward(x, ids.size(0), ids.size(1));
  return final_norm.forward(x);
}

Tensor TransformerLM::forward(const Tensor& ids) {
  return matmul(hidden(ids), output_weight(), false, true);  // [B*T, V]
}

}  // namespace moelab::nn
