// CPU kernels of engine/kernels/router_losses.h: the fused z-loss and the expert divergence loss (docs/objective.md).
// F is the element type (float or double); the sums and the whole ED computation run in double.
#include "engine/kernels/router_losses.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/cpu/math.h"
#include "engine/cpu/parallel.h"

namespace moelab::cpu {

// ---- z-loss -----------------------------------------------------------------------------------------------------------

void z_loss_forward(const Tensor& logits, const Tensor& loss, const Tensor& lse) {
  const int64_t n = logits.size(0), e = logits.size(1);
  double* plse = lse.data<double>();
  dispatch_float("z_loss", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F* z = logits.data<F>();
    double total = 0;  // in row order
    for (int64_t i = 0; i < n; ++i) plse[i] = row_logsumexp(z + i * e, e), total += plse[i] * plse[i];
    *loss.data<F>() = static_cast<F>(total / n);
  });
}

void z_loss_backward(const Tensor& logits, const Tensor& lse, const Tensor& g, const Tensor& dlogits) {
  const int64_t n = logits.size(0), e = logits.size(1);
  const double* plse = lse.data<double>();
  dispatch_float("z_loss_backward", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F* pz = logits.data<F>();
    F* pd = dlogits.data<F>();
    const double scale = static_cast<double>(*g.data<F>()) * 2.0 / static_cast<double>(n);
    parallel_for(n, e * 8, [&](int64_t i) {
      for (int64_t j = 0; j < e; ++j)  // 2 lse softmax(z) / N
        pd[i * e + j] = static_cast<F>(scale * plse[i] * std::exp(static_cast<double>(pz[i * e + j]) - plse[i]));
    });
  });
}

// ---- expert divergence ------------------------------------------------------------------------------------------------

void sequence_means(const Tensor& probs, const Tensor& means) {
  const int64_t batch = means.size(0), experts = probs.size(1), seq = probs.size(0) / batch;
  double* out = means.data<double>();
  dispatch_float("sequence_means", probs.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F* p = probs.data<F>();
    parallel_for(batch, seq * experts, [&](int64_t s) {
      double* mean = out + s * experts;  // [E]
      std::fill(mean, mean + experts, 0.0);
      for (int64_t t = 0; t < seq; ++t)
        for (int64_t e = 0; e < experts; ++e) mean[e] += p[(s * seq + t) * experts + e];
      for (int64_t e = 0; e < experts; ++e) mean[e] /= static_cast<double>(seq);
    });
  });
}

namespace {

double safe_log(double p) { return std::log(std::max(p, kRouterProbFloor)); }

// KL(p || q) over the e with p_e > 0, natural log (moe::kl_divergence).
double kl_divergence(const double* p, const double* q, int64_t n) {
  double kl = 0;
  for (int64_t e = 0; e < n; ++e)
    if (p[e] > 0) kl += p[e] * (safe_log(p[e]) - safe_log(q[e]));
  return kl;
}

// In [0, ln 2] (moe::js_divergence).
double js_divergence(const double* p, const double* q, int64_t n) {
  std::vector<double> m(n);
  for (int64_t e = 0; e < n; ++e) m[e] = 0.5 * (p[e] + q[e]);
  return 0.5 * kl_divergence(p, m.data(), n) + 0.5 * kl_divergence(q, m.data(), n);
}

}  // namespace

void expert_divergence_forward(const Tensor& means, const Tensor& domains, const Tensor& rest, const Tensor& counts,
                               bool neg_log, double eps, const Tensor& loss, const Tensor& grad_q) {
  const int64_t batch = means.size(0), experts = means.size(1), M = counts.numel();
  const double* pbar = means.data<double>();
  const int32_t* dom = domains.data<int32_t>();
  const double* count = counts.data<double>();

  // 1. domain sums in sequence order, pooled with the other micro-batches'  2. domain means Q_j
  std::vector<double> q(M * experts, 0.0);  // [M, E]
  for (int64_t s = 0; s < batch; ++s)
    for (int64_t e = 0; e < experts; ++e) q[dom[s] * experts + e] += pbar[s * experts + e];
  if (rest.defined()) {
    const double* r = rest.data<double>();
    for (int64_t i = 0; i < M * experts; ++i) q[i] += r[i];
  }
  std::vector<int64_t> present;
  for (int64_t j = 0; j < M; ++j)
    if (count[j] > 0) {
      for (int64_t e = 0; e < experts; ++e) q[j * experts + e] /= count[j];
      present.push_back(j);
    }

  // 3-4. pairwise JSD; the loss; and G_j = sum over pairs with j of dL/dJSD * 0.5 (log Q_j - log m)
  const int64_t pairs = static_cast<int64_t>(present.size() * (present.size() - 1) / 2);
  double total = 0;
  double* grad = grad_q.data<double>();
  std::fill(grad, grad + M * experts, 0.0);
  for (size_t a = 0; a < present.size(); ++a)
    for (size_t b = a + 1; b < present.size(); ++b) {
      const double *qa = q.data() + present[a] * experts, *qb = q.data() + present[b] * experts;
      double* ga = grad + present[a] * experts;
      double* gb = grad + present[b] * experts;
      double jsd = js_divergence(qa, qb, experts);
      double dloss_djsd;
      if (neg_log) {
        total += -std::log(jsd + eps) / pairs;
        dloss_djsd = -1.0 / ((jsd + eps) * pairs);
      } else {
        total += -jsd / pairs;
        dloss_djsd = -1.0 / pairs;
      }
      for (int64_t e = 0; e < experts; ++e) {
        double log_m = std::log(std::max(0.5 * (qa[e] + qb[e]), kRouterProbFloor));
        ga[e] += dloss_djsd * 0.5 * (std::log(std::max(qa[e], kRouterProbFloor)) - log_m);
        gb[e] += dloss_djsd * 0.5 * (std::log(std::max(qb[e], kRouterProbFloor)) - log_m);
      }
    }
  dispatch_float("expert_divergence_loss", loss.dtype(),
                 [&](auto tag) { *loss.data<decltype(tag)>() = static_cast<decltype(tag)>(total); });
}

// Token t of sequence s: dL/dp_t = w_s G_d(s), w_s = g / (T n_d(s)).
void expert_divergence_backward(const Tensor& g, const Tensor& grad_q, const Tensor& domains, const Tensor& counts,
                                const Tensor& dprobs) {
  const int64_t batch = domains.numel(), experts = dprobs.size(1), seq = dprobs.size(0) / batch;
  const int32_t* dom = domains.data<int32_t>();
  const double *grad = grad_q.data<double>(), *count = counts.data<double>();
  dispatch_float("expert_divergence_loss_backward", dprobs.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const double upstream = static_cast<double>(*g.data<F>());
    F* pd = dprobs.data<F>();
    parallel_for(batch, seq * experts, [&](int64_t s) {
      const double w = upstream / (static_cast<double>(seq) * count[dom[s]]);
      const double* gs = grad + dom[s] * experts;
      for (int64_t t = 0; t < seq; ++t)
        for (int64_t e = 0; e < experts; ++e) pd[(s * seq + t) * experts + e] = static_cast<F>(w * gs[e]);
    });
  });
}

}  // namespace moelab::cpu
