#include "moe/router.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace moelab::moe {

Routing Routing::detach() const { return {logits.detach(), probs.detach(), expert_ids, gates.detach()}; }

Router::Router(int64_t dim, int64_t n_experts, int64_t top_k, bool norm_topk, double init_std, Generator& gen,
               std::string where)
    : n_experts_(n_experts), top_k_(top_k), norm_topk_(norm_topk), where_(std::move(where)) {
  if (n_experts < 1) throw std::invalid_argument(fmt::format("{}: n_experts must be >= 1, got {}", where_, n_experts));
  if (top_k < 1 || top_k > n_experts)
    throw std::invalid_argument(
        fmt::format("{}: top_k = {} must be in [1, n_experts = {}]", where_, top_k, n_experts));
  weight = add_parameter("weight", randn({n_experts, dim}, gen, 0.0, init_std));
}

// The sum of all logits is finite exactly when every logit is (barring overflow of the sum itself, which is as
// fatal): one pass, no allocation, so it can stay on in every run.
template <class T> static bool all_finite(const Tensor& t) {
  const T* p = t.data<T>();
  T total = 0;
  for (int64_t i = 0; i < t.numel(); ++i) total += p[i];
  return std::isfinite(total);
}

Routing Router::forward(const Tensor& h) const {
  if (h.dim() != 2 || h.size(1) != weight.size(1))
    throw std::invalid_argument(fmt::format("{}: input must be [N, d = {}], got {}", where_, weight.size(1), h.str()));
  Routing r;
  r.logits = matmul(h, weight, false, true);  // [N, E]
  bool finite = dispatch_float("router", r.logits.dtype(), [&](auto t) { return all_finite<decltype(t)>(r.logits); });
  if (!finite)
    throw std::runtime_error(fmt::format("{}: router logits {} contain NaN or Inf (the layer's input or the router "
                                         "weight has diverged)",
                                         where_, r.logits.str()));
  r.probs = softmax(r.logits);                           // [N, E]
  r.expert_ids = topk(r.probs.detach(), top_k_).second;  // i32 [N, k]
  Tensor chosen = gather(r.probs, 1, r.expert_ids);      // [N, k]
  r.gates = norm_topk_ ? chosen / sum(chosen, -1, /*keepdim=*/true) : chosen;
  return r;
}

}  // namespace moelab::moe
