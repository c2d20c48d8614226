#pragma once
// AdamW (Loshchilov & Hutter): Adam moments with bias correction, weight decay decoupled from the gradient.
// Per parameter p with gradient g, at step t (1-based), exactly as torch.optim.AdamW:
//   p <- p * (1 - lr * wd)                               (decay only for matrices: dim >= 2)
//   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/bf16_weights.h"
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

  // One update of every parameter that has a gradient, with learning rate lr, each gradient multiplied by grad_scale
  // as it is read (gradient clipping's factor: grad_clip(...).scale).
  void step(double lr, float grad_scale = 1.0f);
  void zero_grad();
  int64_t steps_taken() const { return step_; }
  const AdamWConfig& config() const { return config_; }
  const std::vector<nn::NamedTensor>& params() const { return params_; }

  // The moments as named tensors ("m.<param>", "v.<param>") for the training-state file, and back.
  std::vector<nn::NamedTensor> state() const;
  void load_state(const std::vector<nn::NamedTensor>& state, int64_t steps_taken);

  // The updates of several parameters given their (possibly modified) gradients, as (parameter index, gradient)
  // pairs: used by step() and by OMoE, which projects some gradients first. One kernel launch on the GPU for all of
  // them (the parameters must share a device). grad_scale as in step(). A gradient is f32, or bf16 (read widened: the
  // experts' weight gradients under mixed precision, moe/dispatch.cpp).
  void update(const std::vector<std::pair<size_t, Tensor>>& grads, double lr, float grad_scale = 1.0f);
  void update(size_t index, const Tensor& grad, double lr, float grad_scale = 1.0f) {
    update({{index, grad}}, lr, grad_scale);
  }
  // As update(), but the Adam direction m_hat / (sqrt(v_hat) + eps) passes through `transform` (same shape in and
  // out) before it is applied: p <- p * (1 - lr * wd) - lr * transform(direction). For OMoE's mode = direction; the
  // gradient is f32.
  void update_direction(size_t index, const Tensor& grad, double lr,
                        const std::function<Tensor(const Tensor&)>& transform, float grad_scale = 1.0f);
  // Advances the step counter (bias corrections use it); step() calls it first.
  void begin_step() { ++step_; }

  // Mixed precision's bf16 copies of the parameters (engine/bf16_weights.h), from now on: each made when a product
  // first multiplies its parameter, then rewritten by every update in the pass that writes the parameter, so that the
  // products of a step round no weight. Called again (after writing the parameters otherwise: a checkpoint's load),
  // it drops the copies, which are then made again from the new values.
  void keep_bf16_weights();
  // The copies, for the precision guard of the steps' forwards and backwards (PrecisionGuard), or null.
  const Bf16Weights* bf16_weights() const { return bf16_weights_.get(); }

 private:
  // Parameter `index` with its moments, gradient and decay, checked (the kernels' view of one parameter).
  AdamWTensors tensors_of(size_t index, const Tensor& grad, double lr) const;

  std::vector<nn::NamedTensor> params_;
  std::vector<Tensor> m_, v_;
  std::vector<bool> decay_;
  AdamWConfig config_;
  int64_t step_ = 0;
  std::unique_ptr<Bf16Weights> bf16_weights_;
};

// Gradient clipping to a global L2 norm of max_norm: the norm of all gradients, and the factor that clips it. The
// optimizers apply the factor as they read each gradient (step(lr, scale)), so the clipped gradients are never written
// (torch's clip_grad_norm_ scales them in place: they would be read and written once more).
struct GradClip {
  double norm = 0;  // before clipping
  float scale = 1;  // max_norm / (norm + 1e-6), torch's coefficient, when max_norm > 0 and norm > max_norm; else 1
};
// The sum of squares is computed where the gradients live (one device for all); only the one number reaches the host.
GradClip grad_clip(const std::vector<nn::NamedTensor>& params, double max_norm);

}  // namespace moelab::optim
