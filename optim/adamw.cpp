#include "optim/adamw.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "engine/kernels/optim.h"
#include "engine/ops.h"

namespace moelab::optim {

AdamW::AdamW(std::vector<nn::NamedTensor> params, const AdamWConfig& config)
    : params_(std::move(params)), config_(config) {
  for (const nn::NamedTensor& p : params_) {
    if (p.tensor.dtype() != DType::F32) throw std::invalid_argument("AdamW: parameter " + p.name + " is not f32");
    m_.push_back(zeros_like(p.tensor));
    v_.push_back(zeros_like(p.tensor));
    decay_.push_back(p.tensor.dim() >= 2);
  }
}

// The step's moment scalars, computed in double and rounded to float once (the kernels' float math starts there).
static AdamWScalars moment_scalars(const AdamWConfig& c, int64_t step, float grad_scale) {
  return {static_cast<float>(c.beta1), static_cast<float>(c.beta2), static_cast<float>(c.eps),
          static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(c.beta2, step))), grad_scale};
}

AdamWTensors AdamW::tensors_of(size_t index, const Tensor& grad, double lr) const {
  const Tensor& p = params_[index].tensor;
  if (grad.shape() != p.shape())
    throw std::invalid_argument("AdamW: gradient shape mismatch for " + params_[index].name);
  if ((grad.dtype() != DType::F32 && grad.dtype() != DType::BF16) || grad.device() != p.device())
    throw std::invalid_argument(fmt::format("AdamW: the gradient {} of {} {} must be f32 or bf16 on its device",
                                            grad.str(), params_[index].name, p.str()));
  const float decay = decay_[index] ? static_cast<float>(1.0 - lr * config_.weight_decay) : 1.0f;
  return {p, grad, m_[index], v_[index], decay, bf16_weights_ ? bf16_weights_->made_copy_of(p) : Tensor()};
}

void AdamW::keep_bf16_weights() {
  if (bf16_weights_) return bf16_weights_->refresh();  // the same object: a guard may hold it
  std::vector<Tensor> params;
  for (const nn::NamedTensor& p : params_) params.push_back(p.tensor);
  bf16_weights_ = std::make_unique<Bf16Weights>(std::move(params));
}

void AdamW::update(const std::vector<std::pair<size_t, Tensor>>& grads, double lr, float grad_scale) {
  if (grads.empty()) return;
  const Device device = params_[grads[0].first].tensor.device();
  std::vector<AdamWTensors> tensors;
  for (const auto& [index, grad] : grads) {
    if (params_[index].tensor.device() != device)
      throw std::invalid_argument(fmt::format("AdamW: one update over parameters on two devices ({} and {})",
                                              params_[grads[0].first].name, params_[index].name));
    tensors.push_back(tensors_of(index, grad, lr));
  }
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(config_.beta1, step_)));
  KERNEL(adamw_update, device)(tensors, moment_scalars(config_, step_, grad_scale), step_size);
}

void AdamW::update_direction(size_t index, const Tensor& grad, double lr,
                             const std::function<Tensor(const Tensor&)>& transform, float grad_scale) {
  if (grad.dtype() != DType::F32)
    throw std::invalid_argument(
        fmt::format("AdamW::update_direction: the gradient {} of {} must be f32", grad.str(), params_[index].name));
  const AdamWTensors tensors = tensors_of(index, grad, lr);
  const Tensor& p = tensors.param;
  const float inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(config_.beta1, step_)));
  Tensor direction = Tensor::empty(p.shape(), DType::F32, p.device());
  KERNEL(adamw_direction, p.device())(tensors, moment_scalars(config_, step_, grad_scale), inv_bc1, direction);
  Tensor moved = transform(direction);
  if (moved.shape() != p.shape() || moved.dtype() != DType::F32 || moved.device() != p.device())
    throw std::invalid_argument("AdamW::update_direction: transform returned " + moved.str() + " for " +
                                params_[index].name + " " + p.str());
  KERNEL(adamw_apply_direction, p.device())(p, moved, tensors.decay, static_cast<float>(lr), tensors.bf16_copy);
}

void AdamW::step(double lr, float grad_scale) {
  begin_step();
  std::vector<std::pair<size_t, Tensor>> grads;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = params_[i].tensor.grad();
    if (g.defined()) grads.emplace_back(i, g);
  }
  update(grads, lr, grad_scale);
}

void AdamW::zero_grad() {
  for (const nn::NamedTensor& p : params_) p.tensor.zero_grad();
}

std::vector<nn::NamedTensor> AdamW::state() const {
  std::vector<nn::NamedTensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.push_back({"m." + params_[i].name, m_[i]});
    out.push_back({"v." + params_[i].name, v_[i]});
  }
  return out;
}

void AdamW::load_state(const std::vector<nn::NamedTensor>& state, int64_t steps_taken) {
  auto find = [&](const std::string& name) -> const Tensor& {
    for (const nn::NamedTensor& t : state)
      if (t.name == name) return t.tensor;
    throw std::runtime_error("AdamW state: missing '" + name + "'");
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& m = find("m." + params_[i].name);
    const Tensor& v = find("v." + params_[i].name);
    copy_(m_[i], to_device(m, m_[i].device()));
    copy_(v_[i], to_device(v, v_[i].device()));
  }
  step_ = steps_taken;
}

GradClip grad_clip(const std::vector<nn::NamedTensor>& params, double max_norm) {
  std::vector<Tensor> grads;
  for (const nn::NamedTensor& p : params) {
    Tensor g = p.tensor.grad();
    if (!g.defined()) continue;
    if ((g.dtype() != DType::F32 && g.dtype() != DType::BF16) || (!grads.empty() && g.device() != grads[0].device()))
      throw std::invalid_argument(fmt::format("grad_clip: the gradient {} of {} is not f32 or bf16 on the first "
                                              "gradient's device",
                                              g.str(), p.name));
    grads.push_back(g);
  }
  GradClip clip;
  if (grads.empty()) return clip;
  const Device device = grads[0].device();
  Tensor total = Tensor::empty({}, DType::F64, device);  // the sum of squares
  KERNEL(sum_of_squares, device)(grads, total);
  clip.norm = std::sqrt(total.item());
  if (max_norm > 0 && clip.norm > max_norm) clip.scale = static_cast<float>(max_norm / (clip.norm + 1e-6));
  return clip;
}

}  // namespace moelab::optim
