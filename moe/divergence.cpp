#include "moe/divergence.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace moelab::moe {

static double safe_log(double p) { return std::log(std::max(p, kProbFloor)); }

double kl_divergence(const Distribution& p, const Distribution& q) {
  double kl = 0;
  for (size_t e = 0; e < p.size(); ++e)
    if (p[e] > 0) kl += p[e] * (safe_log(p[e]) - safe_log(q[e]));
  return kl;
}

double js_divergence(const Distribution& p, const Distribution& q) {
  Distribution m(p.size());
  for (size_t e = 0; e < p.size(); ++e) m[e] = 0.5 * (p[e] + q[e]);
  return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m);
}

std::vector<int64_t> DomainMeans::present() const {
  std::vector<int64_t> out;
  for (size_t j = 0; j < count.size(); ++j)
    if (count[j] > 0) out.push_back(static_cast<int64_t>(j));
  return out;
}

void check_domain_id(int64_t domain, int64_t num_domains) {
  if (domain < 0 || domain >= num_domains)
    throw std::invalid_argument("domain id " + std::to_string(domain) + " out of range [0, " +
                                std::to_string(num_domains) + ")");
}

DomainSums domain_sums(const std::vector<Distribution>& sequence_means, const std::vector<int32_t>& domains,
                       int64_t num_domains) {
  size_t experts = sequence_means.empty() ? 0 : sequence_means[0].size();
  DomainSums out{std::vector<Distribution>(num_domains, Distribution(experts, 0.0)),
                 std::vector<int64_t>(num_domains, 0)};
  for (size_t s = 0; s < sequence_means.size(); ++s) {
    check_domain_id(domains[s], num_domains);
    for (size_t e = 0; e < experts; ++e) out.sum[domains[s]][e] += sequence_means[s][e];
    out.count[domains[s]]++;
  }
  return out;
}

void DomainSums::add(const DomainSums& other) {
  if (sum.empty()) {
    *this = other;
    return;
  }
  if (other.sum.size() != sum.size() || (!sum.empty() && other.sum[0].size() != sum[0].size()))
    throw std::invalid_argument("DomainSums::add: the sums differ in domains or experts");
  for (size_t j = 0; j < sum.size(); ++j) {
    for (size_t e = 0; e < sum[j].size(); ++e) sum[j][e] += other.sum[j][e];
    count[j] += other.count[j];
  }
}

DomainMeans domain_means(const DomainSums& sums) {
  DomainMeans out{sums.sum, sums.count};
  for (size_t j = 0; j < out.count.size(); ++j)
    if (out.count[j] > 0)
      for (double& v : out.mean[j]) v /= static_cast<double>(out.count[j]);
  return out;
}

DomainMeans domain_means(const std::vector<Distribution>& sequence_means, const std::vector<int32_t>& domains,
                         int64_t num_domains) {
  return domain_means(domain_sums(sequence_means, domains, num_domains));
}

std::vector<std::vector<double>> pairwise_jsd(const DomainMeans& means) {
  size_t m = means.count.size();
  std::vector<std::vector<double>> jsd(m, std::vector<double>(m, 0.0));
  std::vector<int64_t> present = means.present();
  for (size_t a = 0; a < present.size(); ++a)
    for (size_t b = a + 1; b < present.size(); ++b) {
      double v = js_divergence(means.mean[present[a]], means.mean[present[b]]);
      jsd[present[a]][present[b]] = jsd[present[b]][present[a]] = v;
    }
  return jsd;
}

double mean_pairwise_jsd(const DomainMeans& means) {
  std::vector<int64_t> present = means.present();
  if (present.size() < 2) return 0.0;
  std::vector<std::vector<double>> jsd = pairwise_jsd(means);
  double total = 0;
  int64_t pairs = 0;
  for (size_t a = 0; a < present.size(); ++a)
    for (size_t b = a + 1; b < present.size(); ++b) total += jsd[present[a]][present[b]], ++pairs;
  return total / static_cast<double>(pairs);
}

Decomposition decompose_divergence(const std::vector<Distribution>& sequence_means, const std::vector<int32_t>& domains,
                                   const std::vector<double>& sequence_weights, int64_t num_domains) {
  size_t experts = sequence_means.empty() ? 0 : sequence_means[0].size();
  Distribution global(experts, 0.0);
  std::vector<Distribution> q(num_domains, Distribution(experts, 0.0));
  std::vector<double> domain_weight(num_domains, 0.0);
  for (size_t s = 0; s < sequence_means.size(); ++s) {
    check_domain_id(domains[s], num_domains);
    double w = sequence_weights[s];
    domain_weight[domains[s]] += w;
    for (size_t e = 0; e < experts; ++e) {
      global[e] += w * sequence_means[s][e];
      q[domains[s]][e] += w * sequence_means[s][e];
    }
  }
  for (int64_t j = 0; j < num_domains; ++j)
    if (domain_weight[j] > 0)
      for (double& v : q[j]) v /= domain_weight[j];
  Decomposition d;
  for (size_t s = 0; s < sequence_means.size(); ++s) {
    d.total += sequence_weights[s] * kl_divergence(sequence_means[s], global);
    d.intra += sequence_weights[s] * kl_divergence(sequence_means[s], q[domains[s]]);
  }
  for (int64_t j = 0; j < num_domains; ++j)
    if (domain_weight[j] > 0) d.inter += domain_weight[j] * kl_divergence(q[j], global);
  return d;
}

}  // namespace moelab::moe
