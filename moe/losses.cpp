#include "moe/losses.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "engine/kernels/router_losses.h"
#include "moe/divergence.h"

namespace moelab::moe {

static_assert(kRouterProbFloor == kProbFloor, "the ED kernels clamp probabilities as moe/divergence.cpp does");

// ---- load balancing: composite of differentiable ops, f carries no gradient ---------------------------------------------
Tensor load_balancing_loss(const Tensor& probs, const Tensor& expert_ids, const Tensor& expert_counts) {
  if (probs.dim() != 2 || expert_ids.dim() != 2 || expert_ids.size(0) != probs.size(0))
    throw std::invalid_argument(fmt::format("load_balancing_loss: probs {} and expert_ids {} must be [N, E] and [N, k]",
                                            probs.str(), expert_ids.str()));
  int64_t experts = probs.size(1), slots = expert_ids.numel();
  if (expert_counts.defined() && expert_counts.shape() != Shape{experts})
    throw std::invalid_argument(
        fmt::format("load_balancing_loss: expert_counts {} must be [E = {}]", expert_counts.str(), experts));
  const Tensor counts =
      expert_counts.defined() ? expert_counts : bincount(reshape(expert_ids, {-1}), experts);  // i32 [E]
  Tensor f = mul(to_dtype(counts, probs.dtype()), 1.0 / static_cast<double>(slots));  // [E], share of slots
  Tensor p_mean = mean(probs, 0);                                                     // [E]
  return mul(sum(mul(f, p_mean)), static_cast<double>(experts));
}

// ---- z-loss: fused logsumexp^2 ---------------------------------------------------------------------------------------
// The forward keeps each row's logsumexp (f64 [N]) for the backward.

static Tensor z_loss_backward(const Tensor& logits, const Tensor& lse, const Tensor& g) {
  Tensor dlogits = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
  KERNEL(z_loss_backward, logits.device())(logits, lse, g, dlogits);
  return dlogits;
}

Tensor z_loss(const Tensor& logits) {
  if (logits.dim() != 2 || logits.size(0) == 0)
    throw std::invalid_argument("z_loss: logits must be a non-empty [N, E], got " + logits.str());
  Tensor out = Tensor::empty({}, logits.dtype(), logits.device());
  Tensor lse = Tensor::empty({logits.size(0)}, DType::F64, logits.device());  // [N]
  KERNEL(z_loss_forward, logits.device())(logits, out, lse);
  return record("z_loss", out, {logits}, [z = logits.detach(), lse](const Tensor& g) -> std::vector<Tensor> {
    return {z_loss_backward(z, lse, g)};
  });
}

// ---- expert divergence ------------------------------------------------------------------------------------------------
// The numbers come from the kernels of engine/kernels/router_losses.h, on the device where probs live; the host reads
// only the domain ids (to check them and to count each domain's sequences, which decides the present domains).

// pbar [B, E] f64 on probs' device.
static Tensor sequence_mean_tensor(const Tensor& probs, int64_t batch) {
  Tensor means = Tensor::empty({batch, probs.size(1)}, DType::F64, probs.device());
  KERNEL(sequence_means, probs.device())(probs, means);
  return means;
}

std::vector<Distribution> sequence_means(const Tensor& probs, int64_t batch) {
  const int64_t experts = probs.size(1);
  const std::vector<double> flat = sequence_mean_tensor(probs, batch).to_vector<double>();
  std::vector<Distribution> means(batch);
  for (int64_t s = 0; s < batch; ++s) means[s].assign(flat.begin() + s * experts, flat.begin() + (s + 1) * experts);
  return means;
}

static void check_ed_inputs(const char* what, const Tensor& probs, const Tensor& domains) {
  if (probs.dim() != 2 || domains.dim() != 1 || domains.dtype() != DType::I32)
    throw std::invalid_argument(
        fmt::format("{}: probs {} must be [N, E] and domains {} i32 [B]", what, probs.str(), domains.str()));
  if (domains.numel() == 0 || probs.size(0) % domains.numel() != 0)
    throw std::invalid_argument(
        fmt::format("{}: {} tokens do not split into {} sequences", what, probs.size(0), domains.numel()));
}

DomainSums routing_domain_sums(const Tensor& probs, const Tensor& domains, int64_t num_domains) {
  check_ed_inputs("routing_domain_sums", probs, domains);
  return domain_sums(sequence_means(probs, domains.numel()), domains.to_vector<int32_t>(), num_domains);
}

static Tensor expert_divergence_backward(const Tensor& g, const Tensor& grad_q, const Tensor& domains,
                                         const Tensor& counts, const Shape& shape) {
  Tensor dprobs = Tensor::empty(shape, g.dtype(), g.device());
  KERNEL(expert_divergence_backward, g.device())(g, grad_q, domains, counts, dprobs);
  return dprobs;
}

Tensor expert_divergence_loss(const Tensor& probs, const Tensor& domains, int64_t num_domains, EDForm form, double eps,
                              const DomainSums* rest) {
  check_ed_inputs("expert_divergence_loss", probs, domains);
  const int64_t experts = probs.size(1), batch = domains.numel();
  if (experts < 2) throw std::invalid_argument("expert_divergence_loss: needs at least 2 experts, got " + probs.str());
  const Device device = probs.device();

  // n_j: the sequences of each domain, pooled with the step's other micro-batches; fewer than two domains present:
  // L_ED = 0, no gradient.
  std::vector<double> count(num_domains, 0.0);
  for (int32_t d : domains.to_vector<int32_t>()) {
    check_domain_id(d, num_domains);
    count[d] += 1;
  }
  if (rest) {
    if (static_cast<int64_t>(rest->sum.size()) != num_domains ||
        static_cast<int64_t>(rest->count.size()) != num_domains)
      throw std::invalid_argument(fmt::format("expert_divergence_loss: the step's other sums have {} domains, not {}",
                                              rest->sum.size(), num_domains));
    for (int64_t j = 0; j < num_domains; ++j) {
      if (static_cast<int64_t>(rest->sum[j].size()) != experts)
        throw std::invalid_argument(fmt::format("expert_divergence_loss: the step's other sums have {} experts, not {}",
                                                rest->sum[j].size(), experts));
      count[j] += static_cast<double>(rest->count[j]);
    }
  }
  if (std::count_if(count.begin(), count.end(), [](double n) { return n > 0; }) < 2)
    return zeros({}, probs.dtype(), device);

  // 1. sequence means pbar_s  2. domain means Q_j, pooled with rest  3-4. pairwise JSD, the loss and G_j = dL/dQ_j
  // (double precision)
  Tensor rest_sums;  // [M, E] f64, undefined without a step scope
  if (rest) {
    std::vector<double> flat;
    for (const Distribution& sum : rest->sum) flat.insert(flat.end(), sum.begin(), sum.end());
    rest_sums = from_vector(flat, {num_domains, experts}, DType::F64, device);
  }
  const Tensor means = sequence_mean_tensor(probs, batch);
  const Tensor counts = from_vector(count, {num_domains}, DType::F64, device);
  const Tensor domains_here = to_device(domains.detach(), device);
  const bool neg_log = form == EDForm::NegLog;
  Tensor out = Tensor::empty({}, probs.dtype(), device);
  Tensor grad_q = Tensor::empty({num_domains, experts}, DType::F64, device);  // [M, E]
  KERNEL(expert_divergence_forward, device)(means, domains_here, rest_sums, counts, neg_log, eps, out, grad_q);
  // token t of sequence s: dL/dp_t = G_{d(s)} / (T n_{d(s)})
  return record("expert_divergence", out, {probs},
                [grad_q, domains_here, counts, shape = probs.shape()](const Tensor& g) -> std::vector<Tensor> {
                  return {expert_divergence_backward(g, grad_q, domains_here, counts, shape)};
                });
}

}  // namespace moelab::moe
