// CPU kernels of engine/kernels/optim.h: AdamW's update, gradient clipping, OMoE's projector reset. f32 tensors, one
// parameter after another, each loop parallel over its elements.
#include "engine/kernels/optim.h"

#include <algorithm>
#include <cmath>

#include "engine/cpu/bf16.h"
#include "engine/cpu/parallel.h"

namespace moelab::cpu {

// ---- AdamW ------------------------------------------------------------------------------------------------------------

void adamw_update(const std::vector<AdamWTensors>& params, const AdamWScalars& scalars, float step_size) {
  const float fb1 = scalars.beta1, fb2 = scalars.beta2, eps = scalars.eps, inv_sqrt_bc2 = scalars.inv_sqrt_bc2;
  const float grad_scale = scalars.grad_scale;
  for (const AdamWTensors& p : params) {
    float* w = p.param.data<float>();
    float* m = p.m.data<float>();
    float* v = p.v.data<float>();
    const Tensor g = as_f32(p.grad);  // a bf16 gradient widened (exact)
    const float* grad = g.data<float>();
    bf16* copy = p.bf16_copy.defined() ? p.bf16_copy.data<bf16>() : nullptr;
    const float decay = p.decay;
    parallel_for(p.param.numel(), 8, [&](int64_t i) {
      const float gi = grad[i] * grad_scale;
      m[i] = fb1 * m[i] + (1 - fb1) * gi;
      v[i] = fb2 * v[i] + (1 - fb2) * gi * gi;
      w[i] = w[i] * decay - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
      if (copy) copy[i] = to_bf16(w[i]);
    });
  }
}

void adamw_direction(const AdamWTensors& tensors, const AdamWScalars& scalars, float inv_bc1, const Tensor& direction) {
  const float fb1 = scalars.beta1, fb2 = scalars.beta2, eps = scalars.eps, inv_sqrt_bc2 = scalars.inv_sqrt_bc2;
  float* m = tensors.m.data<float>();
  float* v = tensors.v.data<float>();
  const float* g = tensors.grad.data<float>();
  float* dir = direction.data<float>();
  const float grad_scale = scalars.grad_scale;
  parallel_for(direction.numel(), 8, [&](int64_t i) {
    const float gi = g[i] * grad_scale;
    m[i] = fb1 * m[i] + (1 - fb1) * gi;
    v[i] = fb2 * v[i] + (1 - fb2) * gi * gi;
    dir[i] = m[i] * inv_bc1 / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
  });
}

void adamw_apply_direction(const Tensor& param, const Tensor& direction, float decay, float lr,
                           const Tensor& bf16_copy) {
  float* w = param.data<float>();
  const float* d = direction.data<float>();
  bf16* copy = bf16_copy.defined() ? bf16_copy.data<bf16>() : nullptr;
  parallel_for(param.numel(), 4, [&](int64_t i) {
    w[i] = w[i] * decay - lr * d[i];
    if (copy) copy[i] = to_bf16(w[i]);
  });
}

// ---- gradient clipping ------------------------------------------------------------------------------------------------

void sum_of_squares(const std::vector<Tensor>& tensors, const Tensor& total) {
  double sum = 0;
  for (const Tensor& t : tensors) {
    const Tensor values = as_f32(t);  // a bf16 tensor widened (exact)
    const float* d = values.data<float>();
    sum += parallel_sum(t.numel(), [d](int64_t i) { return static_cast<double>(d[i]) * d[i]; });
  }
  *total.data<double>() = sum;
}

// ---- OMoE -------------------------------------------------------------------------------------------------------------

void fill_identity(const Tensor& P) {
  const int64_t batch = P.size(0), n = P.size(1);
  dispatch_float("fill_identity", P.dtype(), [&](auto tag) {
    using F = decltype(tag);
    F* p = P.data<F>();
    std::fill(p, p + P.numel(), F(0));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < n; ++i) p[(b * n + i) * n + i] = F(1);
  });
}

}  // namespace moelab::cpu
