#include "moe/model.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace moelab::moe {

MoEModel::MoEModel(const nn::ModelConfig& config, const RouterLossConfig& losses, uint64_t seed) : losses_(losses) {
  if (losses.beta != 0 && config.n_experts < 2)
    throw std::invalid_argument("expert divergence (beta != 0) needs at least 2 experts, got " +
                                std::to_string(config.n_experts));
  lm_ = std::make_unique<nn::TransformerLM>(config, seed, moe_feed_forward);
}

std::vector<MoELayer*> MoEModel::moe_layers() const {
  std::vector<MoELayer*> out;
  for (const auto& block : lm_->layers)
    if (auto* moe = dynamic_cast<MoELayer*>(block->ffn.get())) out.push_back(moe);
  return out;
}

// The mean of one router loss over the MoE layers; a zero scalar like `like` when it was not computed (its
// coefficient is 0, or ED without domains), which adds nothing to L.
static Tensor layer_mean(const std::vector<Tensor>& per_layer, const Tensor& like) {
  if (per_layer.empty()) return zeros({}, like.dtype(), like.device());
  Tensor total = per_layer[0];
  for (size_t i = 1; i < per_layer.size(); ++i) total = add(total, per_layer[i]);
  return mul(total, 1.0 / static_cast<double>(per_layer.size()));
}

Loss MoEModel::loss(const Tensor& inputs, const Tensor& targets, const Tensor& domains, int64_t num_domains,
                    const EDStepScope* ed_scope, const EDGroups* ed_groups) {
  const std::vector<MoELayer*> layers = moe_layers();
  if (ed_scope && ed_scope->rest.size() != layers.size())
    throw std::invalid_argument(fmt::format("MoEModel::loss: the ED step scope has {} layers, the model {} MoE layers",
                                            ed_scope->rest.size(), layers.size()));
  const RouterLossConfig& c = losses_;
  const EDGroups groups = ed_groups ? *ed_groups : EDGroups{domains, num_domains};
  Tensor logits = lm_->forward(inputs);  // [B*T, V]; every MoE layer keeps its routing
  std::vector<double> token_ce;          // per token, for the per-domain sums
  Tensor ce = cross_entropy(logits, targets, kIgnoreIndex, domains.defined() ? &token_ce : nullptr);

  // The router losses of each MoE layer, from the routing its forward kept (still on the graph).
  std::vector<Tensor> lb, z, ed;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Routing& r = layers[l]->last_routing();
    if (c.alpha != 0) lb.push_back(load_balancing_loss(r.probs, r.expert_ids));
    if (c.z_coef != 0) z.push_back(z_loss(r.logits));
    if (c.beta != 0 && groups.ids.defined())
      ed.push_back(expert_divergence_loss(r.probs, groups.ids, groups.count, c.ed_form, c.ed_eps,
                                          ed_scope ? &ed_scope->rest[l] : nullptr));
  }
  const Tensor L_lb = layer_mean(lb, ce), L_z = layer_mean(z, ce), L_ed = layer_mean(ed, ce);
  // With the step scope, ED enters the value micro_batches times (see EDStepScope).
  const double ed_weight = ed_scope ? static_cast<double>(ed_scope->micro_batches) : 1.0;

  Loss out;
  out.value = ce + c.alpha * L_lb + c.z_coef * L_z + c.beta * ed_weight * L_ed;
  LossTerms& t = out.terms;
  t.ce = ce.item(), t.lb = L_lb.item(), t.z = L_z.item(), t.ed = L_ed.item();
  t.objective = out.value.item() - (ed_weight - 1) * c.beta * t.ed;  // ED counted once
  if (domains.defined()) {
    t.domain_ce_sum.assign(num_domains, 0.0);
    t.domain_tokens.assign(num_domains, 0);
    accumulate_domain_ce(token_ce, targets, domains, num_domains, t.domain_ce_sum, t.domain_tokens);
  }
  return out;
}

std::vector<DomainSums> MoEModel::routing_domain_sums(const Tensor& inputs, const Tensor& domains, int64_t num_domains) {
  NoGradGuard no_grad;
  lm_->forward(inputs);
  std::vector<DomainSums> out;
  for (const MoELayer* layer : moe_layers())
    out.push_back(moe::routing_domain_sums(layer->last_routing().probs, domains, num_domains));
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
    if (tgt[i] == kIgnoreIndex) continue;
    int32_t d = dom[i / seq];
    check_domain_id(d, num_domains);
    ce_sum[d] += token_ce[i];
    tokens[d] += 1;
  }
}

}  // namespace moelab::moe
