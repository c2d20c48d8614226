#pragma once
// bf16 tensors in the CPU kernels, which compute them in f32: values widened as they are read (exact) and results
// rounded once as they are stored (to nearest even), so that they are the reference of the GPU's bf16 kernels.
#include "engine/kernels/matmul.h"
#include "engine/kernels/shape.h"

namespace moelab::cpu {

// t as f32 values: a bf16 tensor widened, any other t itself.
inline Tensor as_f32(const Tensor& t) {
  if (t.dtype() != DType::BF16) return t;
  Tensor out = Tensor::empty(t.shape(), DType::F32);
  convert_dtype(t, out);
  return out;
}

// An operand of a product as the f32 GEMM multiplies it: t itself, or an f32 copy whose every element is a bf16 value
// (a bf16 t widened; with `round`, the operands of a bf16 product, an f32 t rounded to nearest even).
inline Tensor bf16_operand(const Tensor& t, bool round) {
  if (t.dtype() == DType::BF16) return as_f32(t);
  if (!round) return t;
  Tensor rounded = Tensor::empty(t.shape(), DType::F32);
  round_to_bf16(t, rounded);
  return rounded;
}

// Where an f32 computation writes the result `out`: out itself, or an f32 scratch for a bf16 out, which
// store_rounded then rounds into it.
inline Tensor f32_scratch(const Tensor& out) {
  return out.dtype() == DType::BF16 ? Tensor::empty(out.shape(), DType::F32) : out;
}
inline void store_rounded(const Tensor& scratch, const Tensor& out) {
  if (scratch.impl() != out.impl()) convert_dtype(scratch, out);
}

}  // namespace moelab::cpu
