#include "moe/analysis/routing_stats.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "engine/ops.h"
#include "moe/divergence.h"
#include "moe/losses.h"

namespace moelab::moe {

RoutingStats routing_stats(const Tensor& probs, const Tensor& expert_ids, const Tensor& domains, int64_t num_domains) {
  int64_t experts = probs.size(1);
  RoutingStats s;
  std::vector<int32_t> counts = bincount(reshape(expert_ids.detach(), {-1}), experts).to_vector<int32_t>();
  double total = expert_ids.numel(), mean = total / experts, var = 0, entropy = 0;
  s.tokens_min = *std::min_element(counts.begin(), counts.end());
  s.tokens_max = *std::max_element(counts.begin(), counts.end());
  for (int32_t c : counts) {
    var += (c - mean) * (c - mean) / experts;
    if (c > 0) entropy -= (c / total) * std::log(c / total);
    s.dead_experts += c == 0;
  }
  s.tokens_std = std::sqrt(var);
  s.load_entropy = experts > 1 ? entropy / std::log(static_cast<double>(experts)) : 0.0;
  if (domains.defined() && domains.numel() > 0) {
    std::vector<int32_t> dom = domains.to_vector<int32_t>();
    std::vector<Distribution> means = sequence_means(to_device(probs.detach(), Device::CPU),
                                                     static_cast<int64_t>(dom.size()));
    s.mean_pairwise_jsd = mean_pairwise_jsd(domain_means(means, dom, num_domains));
    Decomposition d = decompose_divergence(means, dom, std::vector<double>(dom.size(), 1.0 / dom.size()), num_domains);
    s.d_inter = d.inter, s.d_total = d.total;
  }
  return s;
}

std::vector<RoutingStats> routing_stats(const std::vector<MoELayer*>& layers, const Tensor& domains,
                                        int64_t num_domains) {
  std::vector<RoutingStats> out;
  for (const MoELayer* layer : layers) {
    const Routing& r = layer->last_routing();
    out.push_back(routing_stats(r.probs, r.expert_ids, domains, num_domains));
  }
  return out;
}

void accumulate_mean(RoutingStats& mean, const RoutingStats& next, double seen) {
  if (seen == 0) {
    mean = next;
    return;
  }
  auto fold = [&](double& m, double x) { m += (x - m) / (seen + 1); };
  mean.tokens_min = std::min(mean.tokens_min, next.tokens_min);
  mean.tokens_max = std::max(mean.tokens_max, next.tokens_max);
  fold(mean.tokens_std, next.tokens_std);
  fold(mean.load_entropy, next.load_entropy);
  mean.dead_experts = std::min(mean.dead_experts, next.dead_experts);
  fold(mean.mean_pairwise_jsd, next.mean_pairwise_jsd);
  fold(mean.d_inter, next.d_inter);
  fold(mean.d_total, next.d_total);
}

void to_json(nlohmann::json& j, const RoutingStats& s) {
  j = {{"tokens_min", s.tokens_min},     {"tokens_max", s.tokens_max}, {"tokens_std", s.tokens_std},
       {"load_entropy", s.load_entropy}, {"dead_experts", s.dead_experts}, {"mean_jsd", s.mean_pairwise_jsd},
       {"d_inter", s.d_inter},           {"d_total", s.d_total}};
}

}  // namespace moelab::moe
