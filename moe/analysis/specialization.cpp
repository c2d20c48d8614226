#include "moe/analysis/specialization.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "engine/ops.h"

namespace moelab::moe {

DomainRoutingCounts::DomainRoutingCounts(int64_t num_experts, int64_t num_domains)
    : experts(num_experts),
      domains(num_domains),
      slots(num_domains, std::vector<int64_t>(num_experts, 0)),
      tokens(num_domains, 0) {
  if (num_experts < 1 || num_domains < 1)
    throw std::invalid_argument(
        fmt::format("DomainRoutingCounts: needs >= 1 expert and >= 1 domain, got {} and {}", num_experts, num_domains));
}

void DomainRoutingCounts::add(std::span<const float> probs, std::span<const int32_t> expert_ids,
                              std::span<const int32_t> batch_domains) {
  const int64_t E = experts, B = static_cast<int64_t>(batch_domains.size());
  const int64_t N = static_cast<int64_t>(probs.size()) / E;
  if (B == 0 || static_cast<int64_t>(probs.size()) != N * E || N % B != 0 || N == 0 ||
      expert_ids.size() % static_cast<size_t>(N) != 0)
    throw std::invalid_argument(
        fmt::format("DomainRoutingCounts::add: probs ({} values), expert_ids ({}) and domains "
                    "({}) do not fit [N, {}], [N, k], [B] with N = B*T",
                    probs.size(), expert_ids.size(), B, E));
  const int64_t T = N / B, k = static_cast<int64_t>(expert_ids.size()) / N;
  for (int64_t s = 0; s < B; ++s) {
    const int32_t d = batch_domains[s];
    check_domain_id(d, domains);
    Distribution mean(E, 0.0);
    for (int64_t t = s * T; t < (s + 1) * T; ++t) {
      for (int64_t e = 0; e < E; ++e) mean[e] += probs[t * E + e];
      for (int64_t c = 0; c < k; ++c) {
        const int32_t id = expert_ids[t * k + c];
        if (id < 0 || id >= E) throw std::invalid_argument(fmt::format("expert id {} out of range [0, {})", id, E));
        slots[d][id] += 1;
      }
    }
    for (double& v : mean) v /= static_cast<double>(T);
    tokens[d] += T;
    sequence_means.push_back(std::move(mean));
    sequence_domains.push_back(d);
  }
}

void DomainRoutingCounts::add(const Routing& routing, const Tensor& batch_domains) {
  if (routing.probs.dim() != 2 || routing.probs.size(1) != experts)
    throw std::invalid_argument(
        fmt::format("DomainRoutingCounts::add: probs must be [N, {}], got {}", experts, routing.probs.str()));
  auto host = [](const Tensor& t) { return to_device(t.detach(), Device::CPU); };
  std::vector<float> p = to_dtype(host(routing.probs), DType::F32).to_vector<float>();
  std::vector<int32_t> ids = host(routing.expert_ids).to_vector<int32_t>();
  std::vector<int32_t> dom = host(batch_domains).to_vector<int32_t>();
  add(p, ids, dom);
}

LoadStats load_stats(const std::vector<int64_t>& slots_per_expert) {
  LoadStats s;
  s.slots = slots_per_expert;
  const double E = static_cast<double>(slots_per_expert.size());
  if (slots_per_expert.empty()) return s;
  double total = 0;
  for (int64_t c : slots_per_expert) total += static_cast<double>(c);
  s.min = *std::min_element(slots_per_expert.begin(), slots_per_expert.end());
  s.max = *std::max_element(slots_per_expert.begin(), slots_per_expert.end());
  const double mean = total / E;
  double var = 0, entropy = 0;
  for (int64_t c : slots_per_expert) {
    var += (static_cast<double>(c) - mean) * (static_cast<double>(c) - mean) / E;
    if (c > 0) entropy -= (static_cast<double>(c) / total) * std::log(static_cast<double>(c) / total);
    s.dead += c == 0;
  }
  s.std = std::sqrt(var);
  s.entropy = E > 1 ? entropy / std::log(E) : 1.0;
  s.max_violation = mean > 0 ? static_cast<double>(s.max) / mean - 1.0 : 0.0;
  return s;
}

MutualInformation domain_expert_mutual_information(const std::vector<std::vector<int64_t>>& joint) {
  MutualInformation mi;
  if (joint.empty()) return mi;
  const size_t M = joint.size(), E = joint[0].size();
  std::vector<double> pd(M, 0.0), pe(E, 0.0);
  double total = 0;
  for (size_t j = 0; j < M; ++j)
    for (size_t e = 0; e < E; ++e) {
      const double c = static_cast<double>(joint[j].at(e));
      pd[j] += c, pe[e] += c, total += c;
    }
  if (total <= 0) return mi;
  for (size_t j = 0; j < M; ++j)
    if (pd[j] > 0) mi.domain_entropy_bits -= (pd[j] / total) * std::log2(pd[j] / total);
  for (size_t j = 0; j < M; ++j)
    for (size_t e = 0; e < E; ++e) {
      const double c = static_cast<double>(joint[j][e]);
      // p(j,e) log2(p(j,e) / (p(j) p(e))) with p = count / total
      if (c > 0) mi.bits += (c / total) * std::log2(c * total / (pd[j] * pe[e]));
    }
  mi.bits = std::max(0.0, mi.bits);  // rounding can leave -1e-17 for independent counts
  mi.normalized = mi.domain_entropy_bits > 0 ? std::min(1.0, mi.bits / mi.domain_entropy_bits) : 0.0;
  return mi;
}

std::vector<std::vector<double>> row_shares(const std::vector<std::vector<int64_t>>& counts) {
  std::vector<std::vector<double>> out;
  for (const std::vector<int64_t>& row : counts) {
    double total = 0;
    for (int64_t c : row) total += static_cast<double>(c);
    std::vector<double> shares(row.size(), 0.0);
    if (total > 0)
      for (size_t e = 0; e < row.size(); ++e) shares[e] = static_cast<double>(row[e]) / total;
    out.push_back(std::move(shares));
  }
  return out;
}

LayerSpecialization specialization(const DomainRoutingCounts& counts) {
  LayerSpecialization s;
  s.slots = counts.slots;
  s.usage = row_shares(counts.slots);
  s.tokens = counts.tokens;
  std::vector<int64_t> per_expert(counts.experts, 0);
  for (const std::vector<int64_t>& row : counts.slots)
    for (int64_t e = 0; e < counts.experts; ++e) per_expert[e] += row[e];
  s.load = load_stats(per_expert);
  s.mi = domain_expert_mutual_information(counts.slots);
  DomainMeans means = domain_means(counts.sequence_means, counts.sequence_domains, counts.domains);
  s.mean_prob = means.mean;
  s.sequences = means.count;
  s.jsd = pairwise_jsd(means);
  s.mean_jsd = mean_pairwise_jsd(means);
  const size_t S = counts.sequence_means.size();
  if (S > 0)
    s.divergence = decompose_divergence(counts.sequence_means, counts.sequence_domains,
                                        std::vector<double>(S, 1.0 / static_cast<double>(S)), counts.domains);
  return s;
}

void to_json(nlohmann::json& j, const LoadStats& s) {
  j = {{"slots", s.slots}, {"min", s.min},         {"max", s.max},
       {"std", s.std},     {"entropy", s.entropy}, {"max_violation", s.max_violation},
       {"dead", s.dead}};
}

void to_json(nlohmann::json& j, const MutualInformation& m) {
  j = {{"bits", m.bits}, {"domain_entropy_bits", m.domain_entropy_bits}, {"normalized", m.normalized}};
}

void to_json(nlohmann::json& j, const LayerSpecialization& s) {
  j = {{"slots", s.slots},
       {"usage", s.usage},
       {"mean_prob", s.mean_prob},
       {"tokens", s.tokens},
       {"sequences", s.sequences},
       {"load", s.load},
       {"mutual_information", s.mi},
       {"jsd", s.jsd},
       {"mean_jsd", s.mean_jsd},
       {"d_total", s.divergence.total},
       {"d_inter", s.divergence.inter},
       {"d_intra", s.divergence.intra},
       {"d_inter_share", s.inter_share()}};
}

}  // namespace moelab::moe
