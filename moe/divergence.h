#pragma once
// Divergences between routing distributions, in plain double math (no autograd): the forward half of the expert
// divergence loss, the routing statistics and the analysis tools all use these. Natural logs; probabilities are
// clamped at kProbFloor before any log.
#include <cstdint>
#include <vector>

namespace moelab::moe {

constexpr double kProbFloor = 1e-12;

using Distribution = std::vector<double>;  // over E experts, sums to 1

// Throws std::invalid_argument unless 0 <= domain < num_domains.
void check_domain_id(int64_t domain, int64_t num_domains);

double kl_divergence(const Distribution& p, const Distribution& q);  // KL(p || q)
double js_divergence(const Distribution& p, const Distribution& q);  // in [0, ln 2]

// Per-domain mean routing distributions from per-sequence means (each sequence counts once):
// Q_j = mean of pbar_s over the sequences s of domain j. count[j] = number of such sequences (0: Q_j is empty).
struct DomainMeans {
  std::vector<Distribution> mean;  // [M][E]
  std::vector<int64_t> count;      // [M]
  std::vector<int64_t> present() const;  // the domains with count > 0, ascending
};
DomainMeans domain_means(const std::vector<Distribution>& sequence_means, const std::vector<int32_t>& domains,
                         int64_t num_domains);

// The same before the division: per domain the sum of its sequence means and their count. Sums of several
// micro-batches add up to the sums of their union (the expert divergence over a whole optimizer step).
struct DomainSums {
  std::vector<Distribution> sum;  // [M][E]
  std::vector<int64_t> count;     // [M]
  void add(const DomainSums& other);  // this += other (an empty this takes other's shape)
};
DomainSums domain_sums(const std::vector<Distribution>& sequence_means, const std::vector<int32_t>& domains,
                       int64_t num_domains);
DomainMeans domain_means(const DomainSums& sums);

// JSD between every pair of present domains: [M][M] (0 on the diagonal and for absent domains).
std::vector<std::vector<double>> pairwise_jsd(const DomainMeans& means);
// Mean of JSD over unordered pairs of present domains (0 when fewer than two are present).
double mean_pairwise_jsd(const DomainMeans& means);

// The divergence decomposition of docs/expert_divergence.md for sequence weights w_s (summing to 1): with the global mean
// pbar = sum_s w_s pbar_s and domain means Q_j weighted by w_s,
//   total = sum_s w_s KL(pbar_s || pbar) = inter + intra,
//   inter = sum_j w_j KL(Q_j || pbar),   intra = sum_j sum_{s in j} w_s KL(pbar_s || Q_j).
struct Decomposition {
  double total = 0, inter = 0, intra = 0;
};
Decomposition decompose_divergence(const std::vector<Distribution>& sequence_means, const std::vector<int32_t>& domains,
                                   const std::vector<double>& sequence_weights, int64_t num_domains);

}  // namespace moelab::moe
