#include "moe/router.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "engine/kernels/moe.h"
#include "engine/precision.h"

namespace moelab::moe {

// ---- route_gates: top-k + gates, one op -----------------------------------------------------------------------------

// dprobs [N, E] from dL/dgates: div's, sum's and gather's backward in one kernel (engine/kernels/moe.h).
static Tensor route_gates_backward(const Tensor& g, const Tensor& expert_ids, const Tensor& gates,
                                   const Tensor& chosen_sum, int64_t n_experts, bool norm_topk) {
  Tensor dprobs = Tensor::empty({g.size(0), n_experts}, g.dtype(), g.device());
  KERNEL(route_gates_backward, g.device())(g, expert_ids, gates, chosen_sum, norm_topk, dprobs);
  return dprobs;
}

RouteGates route_gates(const Tensor& probs, int64_t k, bool norm_topk) {
  if (!probs.defined() || probs.dim() != 2 || (probs.dtype() != DType::F32 && probs.dtype() != DType::F64))
    fail("route_gates: probs must be an f32 or f64 [N, E] tensor, got {}", probs.defined() ? probs.str() : "undefined");
  if (k < 1 || k > probs.size(1)) fail("route_gates: k = {} must be in [1, E] for probs {}", k, probs.str());
  const int64_t tokens = probs.size(0);
  RouteGates out;
  out.expert_ids = Tensor::empty({tokens, k}, DType::I32, probs.device());
  out.gates = Tensor::empty({tokens, k}, probs.dtype(), probs.device());
  Tensor chosen_sum = Tensor::empty({tokens}, probs.dtype(), probs.device());  // [N], for the backward
  KERNEL(route_gates_forward, probs.device())(probs, norm_topk, out.expert_ids, out.gates, chosen_sum);
  out.gates = record("route_gates", out.gates, {probs},
                     [ids = out.expert_ids, gates = out.gates.detach(), chosen_sum, n_experts = probs.size(1),
                      norm_topk](const Tensor& g) -> std::vector<Tensor> {
                       return {route_gates_backward(g, ids, gates, chosen_sum, n_experts, norm_topk)};
                     });
  return out;
}

// ---- the router -----------------------------------------------------------------------------------------------------

Router::Router(int64_t dim, int64_t n_experts, int64_t top_k, bool norm_topk, double init_std, Generator& gen,
               std::string where)
    : n_experts_(n_experts), top_k_(top_k), norm_topk_(norm_topk), where_(std::move(where)) {
  if (n_experts < 1) throw std::invalid_argument(fmt::format("{}: n_experts must be >= 1, got {}", where_, n_experts));
  if (top_k < 1 || top_k > n_experts)
    throw std::invalid_argument(fmt::format("{}: top_k = {} must be in [1, n_experts = {}]", where_, top_k, n_experts));
  weight = add_parameter("weight", randn({n_experts, dim}, gen, 0.0, init_std));
}

static thread_local bool router_checks_deferred = false;
DeferRouterChecks::DeferRouterChecks() : was_active_(router_checks_deferred) { router_checks_deferred = true; }
DeferRouterChecks::~DeferRouterChecks() { router_checks_deferred = was_active_; }
bool DeferRouterChecks::active() { return router_checks_deferred; }

// The sum of all logits is finite exactly when every logit is (barring overflow of the sum itself, which is as
// fatal): one cheap reduction, so the check stays on in every run.
void Router::check_logits_sum(const Routing& r, double logits_sum) const {
  if (!std::isfinite(logits_sum))
    throw std::runtime_error(fmt::format("{}: router logits {} contain NaN or Inf (the layer's input or the router "
                                         "weight has diverged)",
                                         where_, r.logits.str()));
}

Routing Router::forward(const Tensor& h) const {
  if (h.dim() != 2 || h.size(1) != weight.size(1))
    throw std::invalid_argument(fmt::format("{}: input must be [N, d = {}], got {}", where_, weight.size(1), h.str()));
  Routing r;
  {
    PrecisionGuard fp32(Precision::FP32);       // the router is f32 under mixed precision too (engine/precision.h)
    r.logits = matmul(h, weight, false, true);  // [N, E]
  }
  r.logits_sum = sum(r.logits.detach());
  if (!r.logits.is_cuda() || !DeferRouterChecks::active()) check_logits_sum(r, r.logits_sum.item());
  r.probs = softmax(r.logits);  // [N, E]
  RouteGates chosen = route_gates(r.probs, top_k_, norm_topk_);
  r.expert_ids = chosen.expert_ids;  // i32 [N, k]
  r.gates = chosen.gates;            // [N, k]
  return r;
}

}  // namespace moelab::moe
