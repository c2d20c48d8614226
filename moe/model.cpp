#include "moe/model.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>


namespace moelab::moe {

constexpr int32_t kIgnoreTarget = -100;  // cross_entropy's default ignore_index

MoEModel::MoEModel(const nn::ModelConfig& config, const RouterLossConfig& losses, uint64_t seed)
    : losses_(losses), ed_form_(parse_ed_form(losses.ed_form)) {
  if (losses.beta != 0 && config.n_experts < 2)
    throw std::invalid_argument("expert divergence (beta != 0) needs at least 2 experts, got " +
                                std::to_string(config.n_experts));
  lm_ = std::make_unique<nn::TransformerLM>(config, seed, moe_feed_forward);
  // Router losses are computed where the routing is: each layer reports them into the forward context.
  std::vector<MoELayer*> layers = moe_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l]->on_routing = [this, l](const Routing& r, nn::ForwardContext& ctx) {
      if (losses_.alpha != 0) ctx.aux_losses["lb"].push_back(load_balancing_loss(r.probs, r.expert_ids));
      if (losses_.z_coef != 0) ctx.aux_losses["z"].push_back(z_loss(r.logits));
      if (losses_.beta != 0 && ctx.domains.defined())
        ctx.aux_losses["ed"].push_back(expert_divergence_loss(r.probs, ctx.domains, ctx.num_domains, ed_form_,
                                                              losses_.ed_eps, ed_scope_ ? &ed_scope_->rest.at(l) : nullptr));
    };
  }
}

std::vector<MoELayer*> MoEModel::moe_layers() const {
  std::vector<MoELayer*> out;
  for (const auto& block : lm_->layers)
    if (auto* moe = dynamic_cast<MoELayer*>(block->ffn.get())) out.push_back(moe);
  return out;
}

// Mean of one aux loss over the layers that reported it (undefined when none did).
static Tensor layer_mean(const std::vector<Tensor>& per_layer) {
  if (per_layer.empty()) return {};
  Tensor total = per_layer[0];
  for (size_t i = 1; i < per_layer.size(); ++i) total = add(total, per_layer[i]);
  return mul(total, 1.0 / static_cast<double>(per_layer.size()));
}

LossBreakdown MoEModel::loss(const Tensor& inputs, const Tensor& targets, const Tensor& domains, int64_t num_domains,
                             const EDStepScope* ed_scope) {
  if (ed_scope && ed_scope->rest.size() != moe_layers().size())
    throw std::invalid_argument(fmt::format("MoEModel::loss: the ED step scope has {} layers, the model {} MoE layers",
                                            ed_scope->rest.size(), moe_layers().size()));
  nn::ForwardContext ctx;
  ctx.domains = domains;
  ctx.num_domains = num_domains;
  struct ClearOnExit {
    const EDStepScope*& scope;
    ~ClearOnExit() { scope = nullptr; }
  } clear{ed_scope_};
  ed_scope_ = ed_scope;  // read by the layers' hooks during this forward
  Tensor logits = lm_->forward(inputs, ctx);  // [B*T, V]
  LossBreakdown out;
  std::vector<double> token_ce;  // per token, for the per-domain sums
  Tensor ce = cross_entropy(logits, targets, kIgnoreTarget, domains.defined() ? &token_ce : nullptr);
  out.total = ce;
  out.ce = ce.item();
  auto add_term = [&](const char* name, double coef, double& value) {
    Tensor term = layer_mean(ctx.aux_losses[name]);
    if (!term.defined()) return;
    value = term.item();
    out.total = add(out.total, mul(term, coef));
  };
  add_term("lb", losses_.alpha, out.lb);
  add_term("z", losses_.z_coef, out.z);
  add_term("ed", losses_.beta * (ed_scope ? static_cast<double>(ed_scope->micro_batches) : 1.0), out.ed);
  out.objective = ed_scope ? out.ce + losses_.alpha * out.lb + losses_.z_coef * out.z + losses_.beta * out.ed
                           : out.total.item();
  if (domains.defined()) {
    out.domain_ce_sum.assign(num_domains, 0.0);
    out.domain_tokens.assign(num_domains, 0);
    accumulate_domain_ce(token_ce, targets, domains, num_domains, out.domain_ce_sum, out.domain_tokens);
  }
  return out;
}

std::vector<DomainSums> MoEModel::routing_domain_sums(const Tensor& inputs, const Tensor& domains, int64_t num_domains) {
  NoGradGuard no_grad;
  nn::ForwardContext ctx;  // no domains: the hooks compute no ED
  lm_->forward(inputs, ctx);
  std::vector<DomainSums> out;
  for (const MoELayer* layer : moe_layers()) out.push_back(moe::routing_domain_sums(layer->last_routing().probs, domains, num_domains));
  return out;
}

std::vector<RoutingStats> MoEModel::routing_stats(const Tensor& domains, int64_t num_domains) const {
  std::vector<RoutingStats> out;
  for (const MoELayer* layer : moe_layers()) {
    const Routing& r = layer->last_routing();
    out.push_back(moe::routing_stats(r.probs, r.expert_ids, domains, num_domains));
  }
  return out;
}

void accumulate_domain_ce(const std::vector<double>& token_ce, const Tensor& targets, const Tensor& domains,
                          int64_t num_domains, std::vector<double>& ce_sum, std::vector<int64_t>& tokens) {
  std::vector<int32_t> tgt = targets.to_vector<int32_t>(), dom = domains.to_vector<int32_t>();
  const int64_t n = static_cast<int64_t>(tgt.size());
  if (static_cast<int64_t>(token_ce.size()) != n || dom.empty() || n % static_cast<int64_t>(dom.size()) != 0)
    throw std::invalid_argument(fmt::format("accumulate_domain_ce: {} token losses, {} targets, {} sequences",
                                            token_ce.size(), n, dom.size()));
  const int64_t seq = n / static_cast<int64_t>(dom.size());
  for (int64_t i = 0; i < n; ++i) {
    if (tgt[i] == kIgnoreTarget) continue;
    int32_t d = dom[i / seq];
    if (d < 0 || d >= num_domains)
      throw std::invalid_argument("domain id " + std::to_string(d) + " out of range [0, " + std::to_string(num_domains) + ")");
    ce_sum[d] += token_ce[i];
    tokens[d] += 1;
  }
}

}  // namespace moelab::moe
