#pragma once
// The router's auxiliary losses (docs/objective.md). Each is a scalar per MoE layer; the model loss adds
//   alpha * mean_layers(L_LB) + z_coef * mean_layers(L_Z) + beta * mean_layers(L_ED).
#include "engine/enum_names.h"
#include "engine/ops.h"
#include "moe/divergence.h"

namespace moelab::moe {

// L_LB = E * sum_i f_i P_i: f_i = share of the N*k slots routed to expert i (no gradient), P_i = mean_n p_ni.
// 1 at perfect balance. probs [N, E], expert_ids i32 [N, k]. expert_counts, when given, is the slots' histogram
// i32 [E] already at hand (Routing::expert_counts, the dispatch's): then the ids are not counted again, and on a GPU
// not checked on the host, which would wait for the device.
Tensor load_balancing_loss(const Tensor& probs, const Tensor& expert_ids, const Tensor& expert_counts = Tensor());

// L_Z = mean_n logsumexp(z_n)^2 over router logits [N, E] (keeps logits small). Fused:
// dL/dz_n = 2 lse_n softmax(z_n) / N.
Tensor z_loss(const Tensor& logits);

// Expert divergence (docs/objective.md, docs/expert_divergence.md): pulls apart the mean routing distributions of the domains in the batch.
enum class EDForm { NegLog, NegJSD };  // mean_pairs -log(JSD + eps)  |  -mean_pairs JSD
constexpr EnumNames<EDForm, 2> enum_names(EDForm) {
  return {{{EDForm::NegLog, "neglog"}, {EDForm::NegJSD, "neg_jsd"}}};
}

// With gradient accumulation (the trainer's grad_accum > 1): ED on each micro-batch alone, or over the whole
// optimizer step's batch (one extra forward without gradient per micro-batch; docs/objective.md, "Batch scope").
enum class EDScope { MicroBatch, Step };
constexpr EnumNames<EDScope, 2> enum_names(EDScope) {
  return {{{EDScope::MicroBatch, "micro_batch"}, {EDScope::Step, "step"}}};
}

// What the expert divergence pulls apart: the domains (the method), or every sequence of the batch on its own (the
// ablation that asks whether ED helps through the domain information or by pushing sequences apart).
enum class EDGroupBy { Domain, Sequence };
constexpr EnumNames<EDGroupBy, 2> enum_names(EDGroupBy) {
  return {{{EDGroupBy::Domain, "domain"}, {EDGroupBy::Sequence, "sequence"}}};
}

// Coefficients and options of the router losses (config section [moe]).
struct RouterLossConfig {
  double alpha = 0.01;    // load balancing
  double z_coef = 0.001;  // router z-loss
  double beta = 0.0;      // expert divergence (0: the baseline)
  EDForm ed_form = EDForm::NegLog;
  double ed_eps = 1e-6;
  EDScope ed_scope = EDScope::MicroBatch;
  EDGroupBy ed_groups = EDGroupBy::Domain;  // the trainer turns it into the groups of MoEModel::loss (EDGroups)
};

// probs [N, E] with N = B*T (B sequences of T tokens, in order), domains i32 [B] in [0, num_domains).
// Sequence means, then domain means Q_j (each sequence counts once), then the pairwise JSD over present domains.
// Fewer than two domains present -> 0 with no gradient. Forward and backward in double precision.
// `rest`: the domain sums of the optimizer step's other micro-batches (constants). Q_j then pools them with this
// batch's sequences, so the value is the loss of the whole step's batch and the gradient its exact derivative with
// respect to this micro-batch's probs (docs/objective.md, "Batch scope").
Tensor expert_divergence_loss(const Tensor& probs, const Tensor& domains, int64_t num_domains,
                              EDForm form = EDForm::NegLog, double eps = 1e-6, const DomainSums* rest = nullptr);

// The mean routing distribution of each of the B sequences of probs [B*T, E] (f32 or f64), in double: computed where
// probs live, then copied to the host.
std::vector<Distribution> sequence_means(const Tensor& probs, int64_t batch);

// Per-domain sums of the sequence means of probs [N, E] (what expert_divergence_loss pools): no gradient.
DomainSums routing_domain_sums(const Tensor& probs, const Tensor& domains, int64_t num_domains);

}  // namespace moelab::moe
