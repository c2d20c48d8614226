#pragma once
// The MoE language model with its training objective (spec README "Loss"):
//   L = CE + alpha * mean_layers(L_LB) + z_coef * mean_layers(L_Z) + beta * mean_layers(L_ED)
// Each MoE layer computes its router losses right after routing (MoELayer::on_routing) and reports them in the
// forward context; this class averages them over layers and adds them to the cross-entropy.
#include <memory>
#include <vector>

#include "moe/losses.h"
#include "moe/moe_layer.h"
#include "moe/routing_stats.h"
#include "nn/transformer.h"

namespace moelab::moe {

struct LossBreakdown {
  Tensor total;                 // differentiable scalar
  double objective = 0;         // the value of L, ED counted once (an EDStepScope weights it micro_batches times in total)
  double ce = 0, lb = 0, z = 0, ed = 0;  // the terms (aux terms: means over MoE layers, before coefficients)
  std::vector<double> domain_ce_sum;     // [M] summed token CE per domain ...
  std::vector<int64_t> domain_tokens;    // [M] ... over this many tokens
};

// The expert divergence over a whole optimizer step made of several micro-batches (edl.md, batch scope "step"): per
// MoE layer the domain sums of the step's other micro-batches. With it, a micro-batch's ED term is the whole step's ED
// (its gradient: the exact derivative with respect to this micro-batch), weighted micro_batches times so that the
// trainer's average of the micro-batch losses counts it once.
struct EDStepScope {
  std::vector<DomainSums> rest;  // [MoE layers]
  int64_t micro_batches = 1;
};

class MoEModel {
 public:
  MoEModel(const nn::ModelConfig& config, const RouterLossConfig& losses, uint64_t seed);
  // The layers' on_routing hooks point at this object: it never moves.
  MoEModel(MoEModel&&) = delete;
  MoEModel& operator=(MoEModel&&) = delete;

  // inputs i32 [B, T], targets i32 [B*T], domains i32 [B] in [0, num_domains) (may be undefined: no ED, no per-domain CE).
  // ed_scope: see EDStepScope (null: the ED of this batch alone).
  LossBreakdown loss(const Tensor& inputs, const Tensor& targets, const Tensor& domains, int64_t num_domains,
                     const EDStepScope* ed_scope = nullptr);
  // Per MoE layer, the domain sums of the routing probabilities of a forward pass without gradient (EDStepScope::rest).
  std::vector<DomainSums> routing_domain_sums(const Tensor& inputs, const Tensor& domains, int64_t num_domains);

  nn::TransformerLM& lm() { return *lm_; }
  const nn::TransformerLM& lm() const { return *lm_; }
  std::vector<MoELayer*> moe_layers() const;  // in layer order
  // Statistics of each MoE layer's routing in the last forward pass.
  std::vector<RoutingStats> routing_stats(const Tensor& domains, int64_t num_domains) const;
  const RouterLossConfig& loss_config() const { return losses_; }

 private:
  RouterLossConfig losses_;
  EDForm ed_form_;
  const EDStepScope* ed_scope_ = nullptr;  // set during loss()
  std::unique_ptr<nn::TransformerLM> lm_;
};

// Sums the per-token cross-entropy token_ce [N] (cross_entropy's row_losses) per domain of each sequence
// (N = B*T, domains i32 [B]); tokens whose target is the ignore index (-100) do not count.
void accumulate_domain_ce(const std::vector<double>& token_ce, const Tensor& targets, const Tensor& domains,
                          int64_t num_domains, std::vector<double>& ce_sum, std::vector<int64_t>& tokens);

}  // namespace moelab::moe
