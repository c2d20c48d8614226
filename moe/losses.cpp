#include "moe/losses.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "engine/cpu/math.h"
#include "engine/cpu/parallel.h"
#include "moe/divergence.h"

namespace moelab::moe {

// ---- load balancing: composite of differentiable ops, f carries no gradient ---------------------------------------------
Tensor load_balancing_loss(const Tensor& probs, const Tensor& expert_ids) {
  if (probs.dim() != 2 || expert_ids.dim() != 2 || expert_ids.size(0) != probs.size(0))
    throw std::invalid_argument(fmt::format("load_balancing_loss: probs {} and expert_ids {} must be [N, E] and [N, k]",
                                            probs.str(), expert_ids.str()));
  int64_t experts = probs.size(1), slots = expert_ids.numel();
  Tensor counts = bincount(reshape(expert_ids, {-1}), experts);                  // i32 [E]
  Tensor f = mul(to_dtype(counts, probs.dtype()), 1.0 / static_cast<double>(slots));  // [E], share of slots
  Tensor p_mean = mean(probs, 0);                                              // [E]
  return mul(sum(mul(f, p_mean)), static_cast<double>(experts));
}

// ---- z-loss: fused logsumexp^2 ---------------------------------------------------------------------------------------

Tensor z_loss(const Tensor& logits) {
  if (logits.dim() != 2 || logits.size(0) == 0)
    throw std::invalid_argument("z_loss: logits must be a non-empty [N, E], got " + logits.str());
  int64_t n = logits.size(0), e = logits.size(1);
  std::vector<double> lse(n);
  Tensor out = Tensor::empty({}, logits.dtype());
  auto run = [&](auto t) {
    using T = decltype(t);
    const T* z = logits.data<T>();
    double total = 0;
    for (int64_t i = 0; i < n; ++i) lse[i] = cpu::row_logsumexp(z + i * e, e), total += lse[i] * lse[i];
    *out.data<T>() = static_cast<T>(total / n);
  };
  dispatch_float("z_loss", logits.dtype(), run);
  return record("z_loss", out, {logits}, [z = logits.detach(), lse, n, e](const Tensor& g) -> std::vector<Tensor> {
    Tensor dz = Tensor::empty(z.shape(), z.dtype());
    auto run = [&](auto t) {
      using T = decltype(t);
      const T* pz = z.data<T>();
      T* pd = dz.data<T>();
      double scale = g.item() * 2.0 / static_cast<double>(n);
      cpu::parallel_for(n, e * 8, [&](int64_t i) {
        for (int64_t j = 0; j < e; ++j)  // 2 lse softmax(z) / N
          pd[i * e + j] = static_cast<T>(scale * lse[i] * std::exp(static_cast<double>(pz[i * e + j]) - lse[i]));
      });
    };
    dispatch_float("z_loss_backward", z.dtype(), run);
    return {dz};
  });
}

// ---- expert divergence ------------------------------------------------------------------------------------------------
std::vector<Distribution> sequence_means(const Tensor& probs, int64_t batch) {
  const int64_t experts = probs.size(1), seq = probs.size(0) / batch;
  std::vector<Distribution> means(batch, Distribution(experts, 0.0));
  auto accumulate = [&](auto t) {
    using T = decltype(t);
    const T* p = probs.data<T>();
    cpu::parallel_for(batch, seq * experts, [&](int64_t s) {
      for (int64_t t = 0; t < seq; ++t)
        for (int64_t e = 0; e < experts; ++e) means[s][e] += p[(s * seq + t) * experts + e];
      for (double& v : means[s]) v /= static_cast<double>(seq);
    });
  };
  dispatch_float("sequence_means", probs.dtype(), accumulate);
  return means;
}

static void check_ed_inputs(const char* what, const Tensor& probs, const Tensor& domains) {
  if (probs.dim() != 2 || domains.dim() != 1 || domains.dtype() != DType::I32)
    throw std::invalid_argument(fmt::format("{}: probs {} must be [N, E] and domains {} i32 [B]", what, probs.str(),
                                            domains.str()));
  if (domains.numel() == 0 || probs.size(0) % domains.numel() != 0)
    throw std::invalid_argument(fmt::format("{}: {} tokens do not split into {} sequences", what, probs.size(0),
                                            domains.numel()));
}

DomainSums routing_domain_sums(const Tensor& probs, const Tensor& domains, int64_t num_domains) {
  check_ed_inputs("routing_domain_sums", probs, domains);
  Tensor p = to_device(probs.detach(), Device::CPU);
  return domain_sums(sequence_means(p, domains.numel()), domains.to_vector<int32_t>(), num_domains);
}

Tensor expert_divergence_loss(const Tensor& probs, const Tensor& domains, int64_t num_domains, EDForm form, double eps,
                              const DomainSums* rest) {
  check_ed_inputs("expert_divergence_loss", probs, domains);
  int64_t experts = probs.size(1), batch = domains.numel();
  if (experts < 2) throw std::invalid_argument("expert_divergence_loss: needs at least 2 experts, got " + probs.str());
  int64_t seq = probs.size(0) / batch;
  std::vector<int32_t> dom = domains.to_vector<int32_t>();

  // 1. sequence means pbar_s  2. domain means Q_j (double precision), pooled with the step's other micro-batches
  DomainSums sums = domain_sums(sequence_means(probs, batch), dom, num_domains);
  if (rest) sums.add(*rest);
  DomainMeans q = domain_means(sums);
  std::vector<int64_t> present = q.present();
  if (present.size() < 2) return zeros({}, probs.dtype());  // L_ED = 0, no gradient

  // 3-4. pairwise JSD; the loss; and G_j = sum over pairs with j of dL/dJSD * 0.5 (log Q_j - log m)
  int64_t pairs = static_cast<int64_t>(present.size() * (present.size() - 1) / 2);
  double loss = 0;
  std::vector<Distribution> grad_q(num_domains, Distribution(experts, 0.0));
  for (size_t a = 0; a < present.size(); ++a)
    for (size_t b = a + 1; b < present.size(); ++b) {
      const Distribution &qa = q.mean[present[a]], &qb = q.mean[present[b]];
      double jsd = js_divergence(qa, qb);
      double dloss_djsd;
      if (form == EDForm::NegLog) {
        loss += -std::log(jsd + eps) / pairs;
        dloss_djsd = -1.0 / ((jsd + eps) * pairs);
      } else {
        loss += -jsd / pairs;
        dloss_djsd = -1.0 / pairs;
      }
      for (int64_t e = 0; e < experts; ++e) {
        double log_m = std::log(std::max(0.5 * (qa[e] + qb[e]), kProbFloor));
        grad_q[present[a]][e] += dloss_djsd * 0.5 * (std::log(std::max(qa[e], kProbFloor)) - log_m);
        grad_q[present[b]][e] += dloss_djsd * 0.5 * (std::log(std::max(qb[e], kProbFloor)) - log_m);
      }
    }
  Tensor out = full({}, loss, probs.dtype());
  // token t of sequence s: dL/dp_t = w_t G_{d(s)}, w_t = 1 / (T * n_{d(s)})
  return record("expert_divergence", out, {probs},
                [grad_q, count = q.count, dom, seq, experts, shape = probs.shape(), dtype = probs.dtype()](
                    const Tensor& g) -> std::vector<Tensor> {
                  Tensor dp = Tensor::empty(shape, dtype);
                  double upstream = g.item();
                  auto fill = [&](auto t) {
                    using T = decltype(t);
                    T* pd = dp.data<T>();
                    cpu::parallel_for(static_cast<int64_t>(dom.size()), seq * experts, [&](int64_t s) {
                      double w = upstream / (static_cast<double>(seq) * count[dom[s]]);
                      for (int64_t t = 0; t < seq; ++t)
                        for (int64_t e = 0; e < experts; ++e)
                          pd[(s * seq + t) * experts + e] = static_cast<T>(w * grad_q[dom[s]][e]);
                    });
                  };
                  dispatch_float("expert_divergence_loss_backward", dtype, fill);
                  return {dp};
                });
}

}  // namespace moelab::moe
