#include "moe/moe_layer.h"

#include <cmath>
#include <string>

#include "moe/dispatch.h"

namespace moelab::moe {

// As for every residual output projection (nn/transformer.cpp): W_down starts smaller so that the residual stream's
// variance does not grow with depth.
static double residual_std(const nn::ModelConfig& c) { return c.init_std / std::sqrt(2.0 * c.n_layers); }

Experts::Experts(int64_t n_experts, int64_t dim, int64_t hidden, Generator& gen, double std, double down_std) {
  w_gate = add_parameter("w_gate", randn({n_experts, hidden, dim}, gen, 0.0, std));
  w_up = add_parameter("w_up", randn({n_experts, hidden, dim}, gen, 0.0, std));
  w_down = add_parameter("w_down", randn({n_experts, dim, hidden}, gen, 0.0, down_std));
}

MoELayer::MoELayer(const nn::ModelConfig& c, int64_t layer, Generator& gen)
    : router(c.d_model, c.n_experts, c.top_k, c.norm_topk, c.init_std, gen,
             "layers." + std::to_string(layer) + ".moe.router"),
      experts(c.n_experts, c.d_model, c.expert_hidden, gen, c.init_std, residual_std(c)) {
  add_module("router", router);
  add_module("experts", experts);
  if (c.shared_experts > 0) {
    shared = std::make_unique<nn::SwiGLU>(c.d_model, c.shared_experts * c.expert_hidden, gen, c.init_std,
                                          residual_std(c));
    add_module("shared", *shared);
  }
}

Tensor MoELayer::forward(const Tensor& h, nn::ForwardContext& ctx) {
  Routing routing = router.forward(h);
  if (on_routing) on_routing(routing, ctx);
  last_routing_ = routing.detach();
  last_input_ = h.detach();
  Tensor y = moe_experts(h, routing.expert_ids, routing.gates, experts.w_gate, experts.w_up, experts.w_down);  // [N, d]
  return shared ? y + shared->forward(h) : y;
}

nn::NamedFeedForward moe_feed_forward(const nn::ModelConfig& config, int64_t layer, Generator& gen) {
  if (!config.is_moe_layer(layer)) return nn::dense_feed_forward(config, layer, gen);
  return {"moe", std::make_unique<MoELayer>(config, layer, gen)};
}

}  // namespace moelab::moe
