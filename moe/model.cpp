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

// The values of tensors as f64 on the host. Those on a GPU come in one copy: one wait for the device, not one each.
static std::vector<std::vector<double>> read_on_host(const std::vector<Tensor>& parts) {
  std::vector<std::vector<double>> out(parts.size());
  std::vector<Tensor> on_device;
  for (size_t i = 0; i < parts.size(); ++i) {
    Tensor flat = reshape(to_dtype(parts[i].detach(), DType::F64), {parts[i].numel()});
    if (flat.is_cuda())
      on_device.push_back(flat);
    else
      out[i] = flat.to_vector<double>();
  }
  if (on_device.empty()) return out;
  const std::vector<double> values = concat(on_device, 0).to_vector<double>();
  auto next = values.begin();
  for (size_t i = 0; i < parts.size(); ++i) {
    if (!parts[i].is_cuda()) continue;
    out[i].assign(next, next + parts[i].numel());
    next += parts[i].numel();
  }
  return out;
}

Loss MoEModel::loss(const Tensor& inputs, const Tensor& targets, const Tensor& domains, int64_t num_domains,
                    const EDStepScope* ed_scope, const EDGroups* ed_groups) {
  const std::vector<MoELayer*> layers = moe_layers();
  if (ed_scope && ed_scope->rest.size() != layers.size())
    throw std::invalid_argument(fmt::format("MoEModel::loss: the ED step scope has {} layers, the model {} MoE layers",
                                            ed_scope->rest.size(), layers.size()));
  if (domains.defined() && domains.dtype() != DType::I32)
    throw std::invalid_argument("MoEModel::loss: domains must be i32 [B], got " + domains.str());
  const RouterLossConfig& c = losses_;
  const EDGroups groups = ed_groups ? *ed_groups : EDGroups{domains, num_domains};
  Tensor hidden;  // [B*T, d], the LM head's input; every MoE layer keeps its routing
  {
    DeferRouterChecks defer;  // checked below, in the one read
    hidden = lm_->hidden(inputs);
  }
  Tensor token_ce;  // f64 [B*T], for the per-domain sums
  Tensor ce = linear_cross_entropy(hidden, lm_->output_weight(), targets, kIgnoreIndex,
                                   domains.defined() ? &token_ce : nullptr);

  // The router losses of each MoE layer, from the routing its forward kept (still on the graph).
  std::vector<Tensor> lb, z, ed;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Routing& r = layers[l]->last_routing();
    if (c.alpha != 0) lb.push_back(load_balancing_loss(r.probs, r.expert_ids, r.expert_counts));
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
  // The numbers the host needs: the value and its terms, each router's logit sum (Router::forward), and for the
  // per-domain CE the token losses, targets and domains.
  std::vector<Tensor> parts = {out.value, ce, L_lb, L_z, L_ed};
  for (const MoELayer* layer : layers) parts.push_back(layer->last_routing().logits_sum);
  if (domains.defined()) parts.insert(parts.end(), {token_ce, targets, domains});
  const std::vector<std::vector<double>> host = read_on_host(parts);
  LossTerms& t = out.terms;
  t.ce = host[1][0], t.lb = host[2][0], t.z = host[3][0], t.ed = host[4][0];
  t.objective = host[0][0] - (ed_weight - 1) * c.beta * t.ed;  // ED counted once
  for (size_t l = 0; l < layers.size(); ++l)
    layers[l]->router.check_logits_sum(layers[l]->last_routing(), host[5 + l][0]);
  if (domains.defined()) {
    const std::vector<double>&token_losses = host[5 + layers.size()], &target_values = host[6 + layers.size()],
          &domain_values = host[7 + layers.size()];
    t.domain_ce_sum.assign(num_domains, 0.0);
    t.domain_tokens.assign(num_domains, 0);
    accumulate_domain_ce(token_losses, std::vector<int32_t>(target_values.begin(), target_values.end()),
                         std::vector<int32_t>(domain_values.begin(), domain_values.end()), num_domains, t.domain_ce_sum,
                         t.domain_tokens);
  }
  return out;
}

std::vector<DomainSums> MoEModel::routing_domain_sums(const Tensor& inputs, const Tensor& domains, int64_t num_domains) {
  NoGradGuard no_grad;
  lm_->hidden(inputs);  // for the routing only: no LM head
  std::vector<DomainSums> out;
  for (const MoELayer* layer : moe_layers())
    out.push_back(moe::routing_domain_sums(layer->last_routing().probs, domains, num_domains));
  return out;
}

void accumulate_domain_ce(const std::vector<double>& token_ce, const std::vector<int32_t>& tgt,
                          const std::vector<int32_t>& dom, int64_t num_domains, std::vector<double>& ce_sum,
                          std::vector<int64_t>& tokens) {
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
