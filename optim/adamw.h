#pragma once
// AdamW (Loshchilov & Hutter): Adam moments with bias correction, weight decay decoupled from the gradient.
// Per parameter p with gradient g, at step t (1-based), exactly as torch.optim.AdamW:
//   p <- p * (1 - lr * wd)                               (decay only for matrices: dim >= 2)
//   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "nn/module.h"

namespace moelab {
struct AdamWTensors;  // engine/kernels/optim.h
}

namespace moelab::optim {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  AdamW(std::vector<nn::NamedTensor> params, const AdamWConfig& config);

  // One update of every parameter that has a gradient, with learning rate lr.
  void step(double lr);
  void zero_grad();
  int64_t steps_taken() const { return step_; }
  const AdamWConfig& config() const { return config_; }
  const std::vector<nn::NamedTensor>& params() const { return params_; }

  // The moments as named tensors ("m.<param>", "v.<param>") for the training-state file, and back.
  std::vector<nn::NamedTensor> state() const;
  void load_state(const std::vector<nn::NamedTensor>& state, int64_t steps_taken);

  // The updates of several parameters given their (possibly modified) gradients, as (parameter index, gradient)
  // pairs: used by step() and by OMoE, which projects some gradients first. One kernel launch on the GPU for all of
  // them (the parameters must share a device).
  void update(const std::vector<std::pair<size_t, Tensor>>& grads, double lr);
  void update(size_t index, const Tensor& grad, double lr) { update({{index, grad}}, lr); }
  // As update(), but the Adam direction m_hat / (sqrt(v_hat) + eps) passes through `transform` (same shape in and
  // out) before it is applied: p <- p * (1 - lr * wd) - lr * transform(direction). For OMoE's mode = direction.
  void update_direction(size_t index, const Tensor& grad, double lr,
                        const std::function<Tensor(const Tensor&)>& transform);
  // Advances the step counter (bias corrections use it); step() calls it first.
  void begin_step() { ++step_; }

 private:
  // Parameter `index` with its moments, gradient and decay, checked (the kernels' view of one parameter).
  AdamWTensors tensors_of(size_t index, const Tensor& grad, double lr) const;

  std::vector<nn::NamedTensor> params_;
  std::vector<Tensor> m_, v_;
  std::vector<bool> decay_;
  AdamWConfig config_;
  int64_t step_ = 0;
};

// Scales all gradients so their global L2 norm is at most max_norm (when max_norm > 0); returns the norm before. The
// sum of squares is computed where the gradients live (one device for all); only the one number reaches the host.
double clip_grad_norm(const std::vector<nn::NamedTensor>& params, double max_norm);

}  // namespace moelab::optim
