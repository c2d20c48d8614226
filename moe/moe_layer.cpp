#include "moe/moe_layer.h"

#include <string>

#include "moe/dispatch.h"

namespace moelab::moe {

Experts::Experts(int64_t n_experts, int64_t dim, int64_t hidden, Generator& gen, double std, double down_std) {
  w_gate = add_parameter("w_gate", randn({n_experts, hidden, dim}, gen, 0.0, std));
  w_up = add_parameter("w_up", randn({n_experts, hidden, dim}, gen, 0.0, std));
  w_down = add_parameter("w_down", randn({n_experts, dim, hidden}, gen, 0.0, down_std));
}

MoELayer::MoELayer(const nn::ModelConfig& c, int64_t layer, Generator& gen)
    : router(c.d_model, c.n_experts, c.top_k, c.norm_topk, c.init_std, gen,
             "layers." + std::to_string(layer) + ".moe.router"),
      experts(c.n_experts, c.d_model, c.expert_hidden, gen, c.init_std, c.residual_init_std()) {
  add_module("router", router);
  add_module("experts", experts);
  if (c.shared_experts > 0) {
    shared = std::make_unique<nn::SwiGLU>(c.d_model, c.shared_experts * c.expert_hidden, gen, c.init_std,
                                          c.residual_init_std());
    add_module("shared", *shared);
  }
}

Tensor MoELayer::forward(const Tensor& h) { return forward_plus(h, Tensor()); }

Tensor MoELayer::forward_plus(const Tensor& h, const Tensor& residual) {
  last_routing_ = router.forward(h);
  last_input_ = h.detach();
  Routing& r = last_routing_;
  auto routed = [&](const Tensor& added) {  // [N, d]: added + the routed experts
    return moe_experts(h, r.expert_ids, r.gates, experts.w_gate, experts.w_up, experts.w_down, added, r.expert_counts);
  };
  if (!shared) return routed(residual);
  // The residual added last, as the block's add did: residual + (routed + shared), the same bits.
  Tensor y = routed(Tensor()) + shared->forward(h);
  return residual.defined() ? residual + y : y;
}

nn::NamedFeedForward moe_feed_forward(const nn::ModelConfig& config, int64_t layer, Generator& gen) {
  if (!config.is_moe_layer(layer)) return nn::dense_feed_forward(config, layer, gen);
  return {"moe", std::make_unique<MoELayer>(config, layer, gen)};
}

}  // namespace moelab::moe
