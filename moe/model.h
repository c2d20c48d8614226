#pragma once
// The MoE language model and its training objective, written out in MoEModel::loss:
//   L = CE + alpha * mean_layers(L_LB) + z_coef * mean_layers(L_Z) + beta * mean_layers(L_ED)
// The forward pass leaves each MoE layer's routing on the layer (MoELayer::last_routing); the loss then computes the
// router losses from it, layer by layer (docs/objective.md).
#include <memory>
#include <vector>

#include "moe/losses.h"
#include "moe/moe_layer.h"
#include "nn/transformer.h"

namespace moelab::moe {

// The numbers of one evaluation of the objective, for logs and validation (plain doubles, no graph).
struct LossTerms {
  double objective = 0;                  // the value of L (ED counted once, whatever its scope)
  double ce = 0, lb = 0, z = 0, ed = 0;  // the terms (aux terms: means over MoE layers, before coefficients)
  std::vector<double> domain_ce_sum;     // [M] summed token CE per domain ...
  std::vector<int64_t> domain_tokens;    // [M] ... over this many tokens
};

struct Loss {
  Tensor value;     // the differentiable scalar that backward() starts from
  LossTerms terms;  // what it is made of
};

// The expert divergence over a whole optimizer step made of several micro-batches (docs/objective.md, "Batch scope"): per
// MoE layer the domain sums of the step's other micro-batches. With it, a micro-batch's ED term is the whole step's ED
// (its gradient: the exact derivative with respect to this micro-batch), weighted micro_batches times in Loss::value
// so that the trainer's average of the micro-batch gradients counts it once.
struct EDStepScope {
  std::vector<DomainSums> rest;  // [MoE layers]
  int64_t micro_batches = 1;
};

// The groups whose mean routing distributions the expert divergence pulls apart: ids i32 [B] in [0, count) on the host.
// By default the batch's domains; with moe.ed_groups = sequence the trainer numbers the step's sequences instead.
struct EDGroups {
  Tensor ids;
  int64_t count = 0;
};

class MoEModel {
 public:
  MoEModel(const nn::ModelConfig& config, const RouterLossConfig& losses, uint64_t seed);

  // inputs i32 [B, T], targets i32 [B*T], domains i32 [B] in [0, num_domains) (may be undefined: no ED, no per-domain
  // CE). ed_scope: see EDStepScope (null: the ED of this batch alone). ed_groups: what ED pulls apart (null: the
  // domains); the step scope's sums must then be sums over the same groups.
  Loss loss(const Tensor& inputs, const Tensor& targets, const Tensor& domains, int64_t num_domains,
            const EDStepScope* ed_scope = nullptr, const EDGroups* ed_groups = nullptr);
  // Per MoE layer, the domain sums of the routing probabilities of a forward pass without gradient (EDStepScope::rest).
  std::vector<DomainSums> routing_domain_sums(const Tensor& inputs, const Tensor& domains, int64_t num_domains);

  nn::TransformerLM& lm() { return *lm_; }
  const nn::TransformerLM& lm() const { return *lm_; }
  std::vector<MoELayer*> moe_layers() const;  // in layer order
  const RouterLossConfig& loss_config() const { return losses_; }

 private:
  RouterLossConfig losses_;
  std::unique_ptr<nn::TransformerLM> lm_;
};

// Sums the per-token cross-entropy token_ce [N] (cross_entropy's row_losses) per domain of each sequence
// (N = B*T, domains i32 [B]); tokens whose target is kIgnoreIndex do not count.
void accumulate_domain_ce(const std::vector<double>& token_ce, const std::vector<int32_t>& targets,
                          const std::vector<int32_t>& domains, int64_t num_domains, std::vector<double>& ce_sum,
                          std::vector<int64_t>& tokens);

}  // namespace moelab::moe
