#pragma once
// Expert specialization from routing data (docs/analysis.md), per MoE layer and per domain: pure functions of
// the top-k choices and the dense router probabilities of held-out tokens, in plain double math.
//   usage          freq[j][e] = share of domain j's token slots (top-k choices) that go to expert e
//   mean prob      Q_j = the domain's mean dense router distribution (each sequence counts once, as in
//                  docs/expert_divergence.md)
//   load           token slots per expert: min, max, std, entropy / log E, max-violation, dead experts
//   mutual info    I(domain; expert) over token slots, in bits, and divided by H(domain)
//   JSD matrix     between the Q_j, and the decomposition D_total = D_inter + D_intra (equal sequence weights)
// The model-side metrics (expert output similarity, parameter variance) are in moe/analysis/expert_metrics.h.
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <vector>

#include "moe/divergence.h"
#include "moe/router.h"

namespace moelab::moe {

// One layer's routing of held-out batches, summed per domain. Feed it batch by batch, then call specialization().
struct DomainRoutingCounts {
  DomainRoutingCounts() = default;
  DomainRoutingCounts(int64_t num_experts, int64_t num_domains);

  // probs [N*E] row-major dense softmax, expert_ids [N*k] row-major top-k choices, domains [B] with N = B*T
  // (every sequence has T tokens and one domain). Throws on sizes that do not fit or ids out of range.
  void add(std::span<const float> probs, std::span<const int32_t> expert_ids, std::span<const int32_t> domains);
  // The same from a layer's Routing (probs [N, E], expert_ids [N, k]) and domains i32 [B].
  void add(const Routing& routing, const Tensor& domains);

  int64_t experts = 0, domains = 0;
  std::vector<std::vector<int64_t>> slots;   // [M][E] top-k slots of domain j's tokens given to expert e
  std::vector<int64_t> tokens;               // [M] tokens of domain j
  std::vector<Distribution> sequence_means;  // [S][E] mean dense distribution of every sequence seen
  std::vector<int32_t> sequence_domains;     // [S]
};

struct LoadStats {
  std::vector<int64_t> slots;  // [E] token slots per expert (all domains)
  int64_t min = 0, max = 0;
  double std = 0;            // population std of slots over experts
  double entropy = 0;        // entropy of the slot shares / log E: 1 = perfectly even (1 when E = 1)
  double max_violation = 0;  // max slots / mean slots - 1: 0 = perfectly even
  int64_t dead = 0;          // experts that got no slot
};
LoadStats load_stats(const std::vector<int64_t>& slots_per_expert);

struct MutualInformation {
  double bits = 0;                 // I(domain; expert) with p(j, e) = slots[j][e] / all slots
  double domain_entropy_bits = 0;  // H(domain) with p(j) = domain j's share of the slots
  double normalized = 0;           // bits / H(domain) in [0, 1]; 0 when H(domain) = 0
};
// From joint counts [M][E] (domain x expert).
MutualInformation domain_expert_mutual_information(const std::vector<std::vector<int64_t>>& joint);

// Each row divided by its sum ([M][E] -> shares; a row without counts stays all 0).
std::vector<std::vector<double>> row_shares(const std::vector<std::vector<int64_t>>& counts);

struct LayerSpecialization {
  std::vector<std::vector<int64_t>> slots;     // [M][E] top-k slots of domain j given to expert e
  std::vector<std::vector<double>> usage;      // [M][E] freq[j][e] = slots[j][e] / sum_e slots[j][e]
  std::vector<std::vector<double>> mean_prob;  // [M][E] Q_j (all 0 for a domain without sequences)
  std::vector<int64_t> tokens, sequences;      // [M]
  LoadStats load;
  MutualInformation mi;
  std::vector<std::vector<double>> jsd;  // [M][M] symmetric, 0 on the diagonal and for absent domains
  double mean_jsd = 0;                   // over pairs of present domains (nats, in [0, ln 2])
  Decomposition divergence;              // equal sequence weights (nats)
  double inter_share() const { return divergence.total > 0 ? divergence.inter / divergence.total : 0.0; }
};
LayerSpecialization specialization(const DomainRoutingCounts& counts);

void to_json(nlohmann::json& j, const LoadStats& s);
void to_json(nlohmann::json& j, const MutualInformation& m);
void to_json(nlohmann::json& j, const LayerSpecialization& s);

}  // namespace moelab::moe
