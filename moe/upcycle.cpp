#include "moe/upcycle.h"

#include <fmt/format.h>

#include <cmath>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/error.h"
#include "engine/ops.h"

namespace moelab::moe {
namespace {

constexpr const char* kWhat = "upcycle_from_dense";

// A checkpoint that does not fit its config: std::runtime_error, as nn::load_parameters reports it.
template <class... Args> [[noreturn]] void fail_file(fmt::format_string<Args...> f, Args&&... args) {
  throw std::runtime_error(fmt::format(f, std::forward<Args>(args)...));
}

// Everything but the feed-forward options must agree: those fields decide the shapes and the function of the
// parameters that are copied as they are. seq_len (the training context; RoPE has no table) and init_std (it only
// draws what is not copied: the routers) may differ.
void check_same_architecture(const nn::ModelConfig& dense, const nn::ModelConfig& moe) {
  auto same = [](const char* field, const auto& in_dense, const auto& in_moe) {
    if (in_dense != in_moe)
      fail("{}: {} differs: {} in the dense config, {} in the MoE model's", kWhat, field, in_dense, in_moe);
  };
  same("vocab_size", dense.vocab_size, moe.vocab_size);
  same("d_model", dense.d_model, moe.d_model);
  same("n_layers", dense.n_layers, moe.n_layers);
  same("n_heads", dense.n_heads, moe.n_heads);
  same("tie_embeddings", dense.tie_embeddings, moe.tie_embeddings);
  same("rope_theta", dense.rope_theta, moe.rope_theta);
  same("norm_eps", dense.norm_eps, moe.norm_eps);
}

void check_options(const nn::ModelConfig& dense, const nn::ModelConfig& moe, const UpcycleOptions& options) {
  if (dense.n_experts != 0)
    fail("{}: the dense config has n_experts = {}; upcycling starts from a dense model (n_experts = 0)", kWhat,
         dense.n_experts);
  dense.validate();
  check_same_architecture(dense, moe);
  if (moe.shared_experts > 0)
    fail("{}: the MoE model has shared_experts = {}: upcycling into shared experts is not supported", kWhat,
         moe.shared_experts);
  const int64_t hidden = dense.dense_ffn_hidden();
  bool any_moe = false, any_dense = false;
  for (int64_t l = 0; l < moe.n_layers; ++l) (moe.is_moe_layer(l) ? any_moe : any_dense) = true;
  if (any_moe && hidden != moe.expert_hidden)
    fail("{}: the dense FFN hidden size (dense_ffn_hidden() = {}) differs from the MoE model's expert_hidden = {}",
         kWhat, hidden, moe.expert_hidden);
  if (any_dense && hidden != moe.dense_ffn_hidden())
    fail("{}: the dense FFN hidden size (dense_ffn_hidden() = {}) differs from the MoE model's dense layers' "
         "(dense_ffn_hidden() = {})",
         kWhat, hidden, moe.dense_ffn_hidden());
  if (!std::isfinite(options.noise) || options.noise < 0)
    fail("{}: noise must be finite and >= 0, got {}", kWhat, options.noise);
}

// The dense tensor `name`, checked against what `param` expects: shape `shape` (the parameter's, or one expert's
// slice of it), the parameter's dtype, finite values.
const Tensor& source(const nn::SafeTensors& dense, const std::string& name, const Tensor& param, const Shape& shape,
                     const std::string& param_name) {
  const Tensor* t = dense.find(name);
  if (!t)
    fail_file("{}: the dense checkpoint has no tensor '{}' for parameter '{}' {}", kWhat, name, param_name,
              param.str());
  if (t->shape() != shape || t->dtype() != param.dtype())
    fail_file("{}: dense tensor '{}' is {} but parameter '{}' is {}{}", kWhat, name, t->str(), param_name, param.str(),
              shape == param.shape() ? "" : " (one copy per expert)");
  if (auto bad = nn::first_non_finite(*t))
    fail_file("{}: dense tensor '{}' holds a non-finite value ({}) at element {}", kWhat, name, bad->second,
              bad->first);
  return *t;
}

}  // namespace

void upcycle_from_dense(MoEModel& model, const nn::ModelConfig& dense_config, const nn::SafeTensors& dense,
                        const UpcycleOptions& options) {
  nn::TransformerLM& lm = model.lm();
  const nn::ModelConfig& config = lm.config();
  check_options(dense_config, config, options);
  nn::check_parameters_match(dense_config, dense, std::string(kWhat) + ": the dense checkpoint");

  NoGradGuard no_grad;
  Generator noise_rng(options.seed);
  std::vector<std::pair<Tensor, Tensor>> copies;  // (parameter, its new value on the parameter's device)
  std::set<std::string> done;                     // the parameters already planned, and the routers

  // The MoE layers: each expert is the dense FFN of that layer (times its noise); the router stays as drawn.
  for (int64_t l = 0; l < config.n_layers; ++l) {
    const nn::Block& block = *lm.layers[l];
    const auto* moe = dynamic_cast<const MoELayer*>(block.ffn.get());
    if (!moe) continue;
    const std::string prefix = fmt::format("layers.{}.{}.", l, block.ffn_name);
    const std::string dense_ffn = fmt::format("layers.{}.mlp.", l);
    done.insert(prefix + "router.weight");
    const std::pair<const char*, const Tensor*> weights[] = {
        {"w_gate", &moe->experts.w_gate}, {"w_up", &moe->experts.w_up}, {"w_down", &moe->experts.w_down}};
    for (const auto& [name, param] : weights) {
      const std::string param_name = prefix + "experts." + name;
      const Shape& shape = param->shape();  // [E, h, d] or [E, d, h]
      const Shape one_expert(shape.begin() + 1, shape.end());
      const Tensor& w = source(dense, dense_ffn + name, *param, one_expert, param_name);  // [h, d] or [d, h]
      Tensor w_e = to_device(w, param->device());
      Shape leading_one = one_expert;
      leading_one.insert(leading_one.begin(), 1);
      w_e = expand(reshape(w_e, leading_one), shape);  // [E, ...]: E copies
      if (options.noise > 0) {
        w_e = w_e * (randn(shape, noise_rng, 0.0, options.noise, param->dtype(), param->device()) + 1.0);
        if (auto bad = nn::first_non_finite(to_device(w_e, Device::CPU)))
          fail("{}: noise = {} makes '{}' non-finite ({}) at element {}", kWhat, options.noise, param_name, bad->second,
               bad->first);
      }
      copies.emplace_back(*param, w_e);
      done.insert(param_name);
    }
  }

  // Everything else, dense layers' FFNs included, by name.
  for (const nn::NamedTensor& p : lm.named_parameters()) {
    if (done.contains(p.name)) continue;
    const Tensor& w = source(dense, p.name, p.tensor, p.tensor.shape(), p.name);
    copies.emplace_back(p.tensor, to_device(w, p.tensor.device()));
  }

  for (auto& [param, value] : copies) copy_(param, value);
}

}  // namespace moelab::moe
