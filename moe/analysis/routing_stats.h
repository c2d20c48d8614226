#pragma once
// Routing statistics of one MoE layer on one batch, logged during training (docs/analysis.md "Load", docs/expert_divergence.md "What gets logged").
#include <cstdint>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "engine/tensor.h"
#include "moe/moe_layer.h"

namespace moelab::moe {

struct RoutingStats {
  int64_t tokens_min = 0, tokens_max = 0;  // token slots per expert
  double tokens_std = 0;
  double load_entropy = 0;                 // entropy of the slot shares / log E: 1 = perfectly even
  int64_t dead_experts = 0;                // experts that received no slot
  double mean_pairwise_jsd = 0;            // between the domains' mean routing distributions (0 with < 2 domains)
  double d_inter = 0, d_total = 0;         // divergence decomposition, equal sequence weights
};

// probs [N, E] (dense softmax), expert_ids i32 [N, k], domains i32 [B] (N = B*T) or undefined.
RoutingStats routing_stats(const Tensor& probs, const Tensor& expert_ids, const Tensor& domains, int64_t num_domains);
// The statistics of each layer's routing in its last forward pass (MoELayer::last_routing), in layer order.
std::vector<RoutingStats> routing_stats(const std::vector<MoELayer*>& layers, const Tensor& domains,
                                        int64_t num_domains);

// Folds `next` into `mean`, the running mean of `seen` earlier statistics (tokens_min/max: the extremes; dead
// experts: counted only when dead in every batch, i.e. the minimum).
void accumulate_mean(RoutingStats& mean, const RoutingStats& next, double seen);

void to_json(nlohmann::json& j, const RoutingStats& s);

}  // namespace moelab::moe
