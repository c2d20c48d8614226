#pragma once
// The mixture-of-experts feed-forward (docs/model.md):
//   routing = router(h)
//   y = sum over the k chosen experts of gate * SwiGLU_e(h)   (moe_experts, dispatch.h: dropless)
//     + shared(h)                                             (when shared_experts > 0)
// Checkpoint names under the layer ("layers.{l}.moe."): router.weight [E, d], experts.w_gate [E, h, d],
// experts.w_up [E, h, d], experts.w_down [E, d, h], shared.w_gate|w_up|w_down (2-D).
#include <memory>
#include <string>

#include "moe/router.h"
#include "nn/config.h"
#include "nn/layers.h"
#include "nn/transformer.h"

namespace moelab::moe {

// The E routed experts' weights, stacked along a leading expert dim so that the dispatch addresses expert e as a
// slice (no per-expert modules).
class Experts : public nn::Module {
 public:
  // w_gate, w_up ~ normal(0, std); w_down ~ normal(0, down_std), drawn in that order.
  Experts(int64_t n_experts, int64_t dim, int64_t hidden, Generator& gen, double std, double down_std);
  Tensor w_gate;  // [E, h, d]
  Tensor w_up;    // [E, h, d]
  Tensor w_down;  // [E, d, h]
};

class MoELayer final : public nn::FeedForward {
 public:
  // Parameters are drawn from gen in this order: router.weight, experts.w_gate, w_up, w_down, then shared's
  // w_gate, w_up, w_down (the PyTorch twin must draw in the same order). `layer` only names the layer in errors.
  MoELayer(const nn::ModelConfig& config, int64_t layer, Generator& gen);

  // h [N, d] -> [N, d]. Keeps this forward's routing and input for what comes after the forward pass: the router
  // losses (MoEModel::loss), routing statistics and OMoE's projectors.
  Tensor forward(const Tensor& h) override;
  // residual + forward(h): without shared experts the residual is added by the experts' weighted un-permute.
  Tensor forward_plus(const Tensor& h, const Tensor& residual) override;

  // The routing of the last forward (probs, expert_ids, ...), as computed: while that forward's graph lives (until
  // backward), a loss on it sends gradients into the router.
  const Routing& last_routing() const { return last_routing_; }
  // The input h [N, d] of the last forward, detached: with last_routing(), what each expert saw (OMoE's projectors).
  const Tensor& last_input() const { return last_input_; }

  Router router;
  Experts experts;
  // n shared experts fused into ONE SwiGLU of hidden n * expert_hidden: sum_i W_down,i (silu(W_gate,i h) * W_up,i h)
  // is exactly that wider SwiGLU with the n experts' rows (w_gate, w_up) and columns (w_down) stacked.
  std::unique_ptr<nn::SwiGLU> shared;  // null when config.shared_experts == 0

 private:
  Routing last_routing_;
  Tensor last_input_;
};

// The transformer's FeedForwardFactory for MoE models: a MoELayer named "moe" on layers where
// config.is_moe_layer(layer), otherwise the dense SwiGLU named "mlp" (nn::dense_feed_forward).
nn::NamedFeedForward moe_feed_forward(const nn::ModelConfig& config, int64_t layer, Generator& gen);

}  // namespace moelab::moe
