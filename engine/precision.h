#pragma once
// Mixed precision: the precision of matrix products, a per-thread mode (like grad mode) that the trainer sets around
// each step (its forwards, backwards and update) and validation (train.precision, docs/training.md "Mixed precision").
//   FP32: products of f32 tensors are f32 GEMMs (the default).
//   BF16: the operands of the products of f32 tensors are rounded to bf16 and multiplied with f32 accumulation into f32
//         results: the matmul op (engine/ops/matmul.cpp), the MoE experts' grouped SwiGLU (moe/dispatch.cpp) and causal
//         attention's q k^T and p v for heads of up to 128 dims (engine/ops/nn.cpp; its softmax stays f32). The
//         gradients of f32 weights are f32 too, but for the experts' (below); the output gradient is rounded to bf16 as
//         an operand. Some activations are kept in bf16 in this mode, as under autocast: attention's q, k, v and
//         output, whose gradients are bf16 too (nn/layers.cpp, matmul_to_bf16), and inside their ops the experts'
//         (moe/dispatch.cpp, whose weight gradients are bf16 too) and the LM head's logits with their gradient
//         (linear_cross_entropy). A weight is rounded by each product that multiplies it, unless the guard holds the
//         parameters' bf16 copies, made once and rewritten by the optimizer's update (engine/bf16_weights.h): the
//         trainer's steps.
// Whatever the mode: f64 (gradient checks) and bf16 tensors multiply as their dtype says; everything that is not a
// product (norms, softmax, losses, optimizer) is f32; the router's logits and OMoE's projectors and projections are f32
// products (moe/router.cpp and optim/omoe.cpp ask for FP32). An op reads the mode when it runs forward and its backward
// follows that choice.
#include <cstdint>

#include "engine/enum_names.h"

namespace moelab {

enum class Precision : uint8_t { FP32, BF16 };
constexpr EnumNames<Precision, 2> enum_names(Precision) {
  return {{{Precision::FP32, "fp32"}, {Precision::BF16, "bf16"}}};
}

class Bf16Weights;  // engine/bf16_weights.h

namespace detail {
inline thread_local Precision product_precision_mode = Precision::FP32;
inline thread_local const Bf16Weights* products_bf16_weights = nullptr;
}  // namespace detail

// The mode of this thread.
inline Precision product_precision() { return detail::product_precision_mode; }
// The parameters' bf16 copies this thread's bf16 products read instead of rounding them (engine/bf16_weights.h), or
// null.
inline const Bf16Weights* product_bf16_weights() { return detail::products_bf16_weights; }

// Sets the mode for a scope and restores the previous one when it ends. With `weights`, the scope's bf16 products
// multiply the copies it holds for its parameters; without, the enclosing scope's copies stay in effect (the router's
// FP32 scope inside a BF16 step, which its products do not read).
class PrecisionGuard {
 public:
  explicit PrecisionGuard(Precision precision, const Bf16Weights* weights = nullptr)
      : previous_(detail::product_precision_mode), previous_weights_(detail::products_bf16_weights) {
    detail::product_precision_mode = precision;
    if (weights) detail::products_bf16_weights = weights;
  }
  ~PrecisionGuard() {
    detail::product_precision_mode = previous_;
    detail::products_bf16_weights = previous_weights_;
  }
  PrecisionGuard(const PrecisionGuard&) = delete;
  PrecisionGuard& operator=(const PrecisionGuard&) = delete;

 private:
  Precision previous_;
  const Bf16Weights* previous_weights_;
};

}  // namespace moelab
