#pragma once
// The top-k router (docs/model.md): z = h W_r^T, p = softmax(z), the k most probable experts per token, and their gate
// weights (the chosen probabilities, renormalized to sum 1 when norm_topk).
#include <cstdint>
#include <string>

#include "engine/ops.h"
#include "nn/module.h"

namespace moelab::moe {

// One routing decision for N tokens over E experts. logits, probs and gates carry gradients back to the router
// weight and to h; expert_ids do not.
struct Routing {
  Tensor logits;      // [N, E]  z = h W_r^T
  Tensor probs;       // [N, E]  softmax(z), in the input's float type (f32 in the model)
  Tensor expert_ids;  // i32 [N, k]  the k most probable experts, by descending probability (ties: lower id first)
  Tensor gates;       // [N, k]  p at expert_ids, divided by their sum when norm_topk
  Tensor logits_sum;  // []  finite exactly when every logit is (Router::check_logits_sum; no gradient)
  Tensor expert_counts;  // i32 [E]  slots routed to each expert: the dispatch's histogram (set by MoELayer::forward)
};

// The routing step after softmax, as one op: per token the k most probable experts (descending p, ties -> lower id)
// and their gates (the chosen p, divided by their sum when norm_topk). probs [N, E] -> {expert_ids i32 [N, k],
// gates [N, k]}; the gradient of gates flows back to probs. The same numbers, to the bit on the CPU, as topk, gather,
// sum(-1, keepdim) and div composed (docs/moe.md), in one kernel per direction on either device.
struct RouteGates {
  Tensor expert_ids;  // i32 [N, k], no gradient
  Tensor gates;       // [N, k]
};
RouteGates route_gates(const Tensor& probs, int64_t k, bool norm_topk);

// On a GPU the finiteness check reads the logits' sum on the host: a wait for the device in every MoE layer. While
// one of these is alive (on this thread), Router::forward on a GPU leaves the sum on the device (Routing::logits_sum)
// for the caller to check with check_logits_sum: MoEModel::loss does, in its one read of the loss's numbers.
class DeferRouterChecks {
 public:
  DeferRouterChecks();
  ~DeferRouterChecks();
  DeferRouterChecks(const DeferRouterChecks&) = delete;
  DeferRouterChecks& operator=(const DeferRouterChecks&) = delete;
  static bool active();

 private:
  bool was_active_;
};

class Router : public nn::Module {
 public:
  // `where` names the router in errors (e.g. "layers.1.moe.router"). Throws std::invalid_argument unless
  // 1 <= top_k <= n_experts.
  Router(int64_t dim, int64_t n_experts, int64_t top_k, bool norm_topk, double init_std, Generator& gen,
         std::string where = "router");
  // h [N, d] -> Routing. Throws std::runtime_error naming the router when the logits are not finite; on a GPU, while
  // a DeferRouterChecks is alive, the check is left to the caller (below).
  Routing forward(const Tensor& h) const;
  // Throws the error above unless logits_sum, the value of r.logits_sum, is finite.
  void check_logits_sum(const Routing& r, double logits_sum) const;

  int64_t n_experts() const { return n_experts_; }
  int64_t top_k() const { return top_k_; }
  bool norm_topk() const { return norm_topk_; }

  Tensor weight;  // [E, d]

 private:
  int64_t n_experts_, top_k_;
  bool norm_topk_;
  std::string where_;
};

}  // namespace moelab::moe
