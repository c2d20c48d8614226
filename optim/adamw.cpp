#include "optim/adamw.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "engine/cpu/parallel.h"
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

void AdamW::update(size_t index, const Tensor& grad, double lr) {
  Tensor& p = params_[index].tensor;
  if (grad.shape() != p.shape()) throw std::invalid_argument("AdamW: gradient shape mismatch for " + params_[index].name);
  const double b1 = config_.beta1, b2 = config_.beta2;
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(b1, step_)));
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(b2, step_)));
  const float decay = decay_[index] ? static_cast<float>(1.0 - lr * config_.weight_decay) : 1.0f;
  const float fb1 = static_cast<float>(b1), fb2 = static_cast<float>(b2), eps = static_cast<float>(config_.eps);
  float* w = p.data<float>();
  float* m = m_[index].data<float>();
  float* v = v_[index].data<float>();
  const float* g = grad.data<float>();
  cpu::parallel_for(p.numel(), 8, [&](int64_t i) {
    m[i] = fb1 * m[i] + (1 - fb1) * g[i];
    v[i] = fb2 * v[i] + (1 - fb2) * g[i] * g[i];
    w[i] = w[i] * decay - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
  });
}

void AdamW::update_direction(size_t index, const Tensor& grad, double lr,
                             const std::function<Tensor(const Tensor&)>& transform) {
  Tensor& p = params_[index].tensor;
  if (grad.shape() != p.shape()) throw std::invalid_argument("AdamW: gradient shape mismatch for " + params_[index].name);
  const double b1 = config_.beta1, b2 = config_.beta2;
  const float inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(b1, step_)));
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(b2, step_)));
  const float fb1 = static_cast<float>(b1), fb2 = static_cast<float>(b2), eps = static_cast<float>(config_.eps);
  float* m = m_[index].data<float>();
  float* v = v_[index].data<float>();
  const float* g = grad.data<float>();
  Tensor direction = Tensor::empty(p.shape());
  float* dir = direction.data<float>();
  cpu::parallel_for(p.numel(), 8, [&](int64_t i) {
    m[i] = fb1 * m[i] + (1 - fb1) * g[i];
    v[i] = fb2 * v[i] + (1 - fb2) * g[i] * g[i];
    dir[i] = m[i] * inv_bc1 / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
  });
  Tensor moved = transform(direction);
  if (moved.shape() != p.shape() || moved.dtype() != DType::F32)
    throw std::invalid_argument("AdamW::update_direction: transform returned " + moved.str() + " for " +
                                params_[index].name + " " + p.str());
  const float decay = decay_[index] ? static_cast<float>(1.0 - lr * config_.weight_decay) : 1.0f;
  const float flr = static_cast<float>(lr);
  float* w = p.data<float>();
  const float* d = moved.data<float>();
  cpu::parallel_for(p.numel(), 4, [&](int64_t i) { w[i] = w[i] * decay - flr * d[i]; });
}

void AdamW::step(double lr) {
  begin_step();
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = params_[i].tensor.grad();
    if (g.defined()) update(i, g, lr);
  }
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

double clip_grad_norm(const std::vector<nn::NamedTensor>& params, double max_norm) {
  double total = 0;
  for (const nn::NamedTensor& p : params) {
    Tensor g = p.tensor.grad();
    if (!g.defined()) continue;
    const float* d = g.data<float>();
    total += cpu::parallel_sum(g.numel(), [d](int64_t i) { return static_cast<double>(d[i]) * d[i]; });
  }
  double norm = std::sqrt(total);
  if (max_norm > 0 && norm > max_norm) {
    float scale = static_cast<float>(max_norm / (norm + 1e-6));  // torch's clip_grad_norm_ coefficient
    for (const nn::NamedTensor& p : params) {
      Tensor g = p.tensor.grad();
      if (!g.defined()) continue;
      float* d = g.data<float>();
      cpu::parallel_for(g.numel(), 1, [&](int64_t i) { d[i] *= scale; });
    }
  }
  return norm;
}

}  // namespace moelab::optim
