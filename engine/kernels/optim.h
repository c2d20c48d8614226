#pragma once
// The kernels behind optim/: AdamW's update, gradient clipping, OMoE's projector reset. CPU: engine/cpu/optim.cpp;
// CUDA: engine/cuda/optim.cu. The tensors are f32. The step's scalars (bias corrections, decay) are computed by the
// caller on the host in double and passed as float, and both devices then evaluate the same float expressions, one
// rounding per operation: the GPU's results are the CPU's bits.
#include <vector>

#include "engine/kernels.h"

namespace moelab {

// ---- AdamW ------------------------------------------------------------------------------------------------------------

// One parameter of an AdamW update: the parameter, its gradient and its two moments (f32, one shape, one device; the
// gradient may be bf16 in adamw_update, read widened: the experts' weight gradients under mixed precision), its
// decay factor (1 - lr * weight_decay for a matrix, 1 otherwise), and its bf16 copy or an undefined tensor (bf16, the
// parameter's shape: the copy mixed precision's products read, engine/bf16_weights.h, written with the parameter).
struct AdamWTensors {
  Tensor param, grad, m, v;
  float decay = 1.0f;
  Tensor bf16_copy;
};
// Its bytes in a kernel profile (engine/profile.h): the tensors, each once.
inline double seam_bytes(const AdamWTensors& t) {
  return detail::seam_bytes(t.param) + detail::seam_bytes(t.grad) + detail::seam_bytes(t.m) + detail::seam_bytes(t.v) +
         detail::seam_bytes(t.bf16_copy);
}

// The step's moment scalars: beta1, beta2, eps, 1 / sqrt(1 - beta2^t), and the factor every gradient is multiplied by
// as it is read, g = grad * grad_scale (gradient clipping's, optim::grad_clip; 1 without clipping), so that clipped
// gradients are never written.
struct AdamWScalars {
  float beta1 = 0, beta2 = 0, eps = 0, inv_sqrt_bc2 = 0, grad_scale = 1;
};

// Every element of every listed parameter (one launch on the GPU, whatever the number of parameters), with
// step_size = lr / (1 - beta1^t) and g = grad * grad_scale:
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g g;   p = p decay - step_size m / (sqrt(v) inv_sqrt_bc2 + eps)
// and, where a parameter has a bf16 copy, copy = p rounded to nearest even (round_to_bf16's bits).
DECLARE_KERNEL(adamw_update, (const std::vector<AdamWTensors>& params, const AdamWScalars& scalars, float step_size))
// The moments as adamw_update, and the Adam direction m_hat / (sqrt(v_hat) + eps) = m inv_bc1 / (sqrt(v) inv_sqrt_bc2
// + eps) into `direction`, inv_bc1 = 1 / (1 - beta1^t). The parameter is not touched (its decay is unused).
DECLARE_KERNEL(adamw_direction,
               (const AdamWTensors& tensors, const AdamWScalars& scalars, float inv_bc1, const Tensor& direction))
// p = p decay - lr direction, and bf16_copy (undefined: none) = p rounded as in adamw_update.
DECLARE_KERNEL(adamw_apply_direction,
               (const Tensor& param, const Tensor& direction, float decay, float lr, const Tensor& bf16_copy))

// ---- gradient clipping ------------------------------------------------------------------------------------------------

// total f64 [] = the sum of the squares of every element of every listed tensor (f32, or bf16 widened), in double: each
// tensor's sum in fixed chunks of 4096 elements added in order, then the tensors' sums in list order (the same bits on
// every run).
DECLARE_KERNEL(sum_of_squares, (const std::vector<Tensor>& tensors, const Tensor& total))

// ---- OMoE -------------------------------------------------------------------------------------------------------------

// P [B, n, n] = the identity in every batch entry.
DECLARE_KERNEL(fill_identity, (const Tensor& P))

}  // namespace moelab
