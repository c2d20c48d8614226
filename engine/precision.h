#pragma once
// Mixed precision: the precision of matrix products, a per-thread mode (like grad mode) that the trainer sets around
// each micro-batch's forward and backward (train.precision, docs/training.md "Mixed precision").
//   FP32: products of f32 tensors are f32 GEMMs (the default).
//   BF16: the operands of the products of f32 tensors are rounded to bf16 and multiplied with f32 accumulation into
//         f32 results: the matmul op (engine/ops/matmul.cpp), the MoE experts' grouped SwiGLU (moe/dispatch.cpp)
//         and causal attention's q k^T and p v for heads of up to 128 dims (engine/ops/nn.cpp; its softmax stays
//         f32). Their gradients are f32 too (the output gradient is rounded to bf16 as an operand, the products are
//         not). Some activations are kept in bf16 in this mode, as under autocast: attention's q, k, v and output,
//         whose gradients are bf16 too (nn/layers.cpp, matmul_to_bf16), and inside their ops the experts'
//         (moe/dispatch.cpp) and the LM head's logits with their gradient (linear_cross_entropy).
// Whatever the mode: f64 (gradient checks) and bf16 tensors multiply as their dtype says; everything that is not a
// product (norms, softmax, losses, optimizer) is f32; the router's logits are an f32 product (moe/router.cpp asks
// for FP32). An op reads the mode when it runs forward and its backward follows that choice.
#include <cstdint>

#include "engine/enum_names.h"

namespace moelab {

enum class Precision : uint8_t { FP32, BF16 };
constexpr EnumNames<Precision, 2> enum_names(Precision) {
  return {{{Precision::FP32, "fp32"}, {Precision::BF16, "bf16"}}};
}

namespace detail {
inline thread_local Precision product_precision_mode = Precision::FP32;
}

// The mode of this thread.
inline Precision product_precision() { return detail::product_precision_mode; }

// Sets the mode for a scope and restores the previous one when it ends.
class PrecisionGuard {
 public:
  explicit PrecisionGuard(Precision precision) : previous_(detail::product_precision_mode) {
    detail::product_precision_mode = precision;
  }
  ~PrecisionGuard() { detail::product_precision_mode = previous_; }
  PrecisionGuard(const PrecisionGuard&) = delete;
  PrecisionGuard& operator=(const PrecisionGuard&) = delete;

 private:
  Precision previous_;
};

}  // namespace moelab
