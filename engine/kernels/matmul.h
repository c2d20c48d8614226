#pragma once
// The kernels behind engine/ops/matmul.cpp: batched matrix products. CPU: engine/cpu/matmul.cpp (engine/cpu/gemm.h);
// CUDA: engine/cuda/matmul.cu (cuBLAS, through engine/cuda/blas.cuh).
#include "engine/kernels.h"

namespace moelab {

// The sizes of `batch` products op(A_i) [m, k] @ op(B_i) [k, n], op(X) = X or X^T on the last two dims. a is
// [..., m, k] ([..., k, m] when trans_a), b [..., k, n] ([..., n, k] when trans_b); either may be 2-D: one matrix
// shared by every batch (its stride is 0). The batch dims are those of the operand that has them.
struct MatmulShape {
  int64_t batch, m, n, k;
  int64_t a_stride, b_stride;  // elements from one batch's matrix to the next (0: shared)
};
inline MatmulShape matmul_shape(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  MatmulShape s;
  s.m = a.size(trans_a ? -1 : -2), s.k = a.size(trans_a ? -2 : -1), s.n = b.size(trans_b ? -2 : -1);
  const Tensor& batched = a.dim() > 2 ? a : b;
  s.batch = 1;
  for (int64_t d = 0; d < batched.dim() - 2; ++d) s.batch *= batched.size(d);
  s.a_stride = a.dim() > 2 ? s.m * s.k : 0;
  s.b_stride = b.dim() > 2 ? s.k * s.n : 0;
  return s;
}

// out = op(A_i) @ op(B_i) for every batch i: [..., m, n]; with sum_batches, out is the one [m, n] sum over the batch
// (the gradient of a shared operand), summed in batch order. added_to is undefined, or out itself: then the products
// are added to what out holds (a GEMM's beta = 1: a gradient added to without a temporary), and out is read as well
// as written (an argument, so that the kernel profile counts its bytes). a and b share a dtype: f32 or f64 (out the
// same), or bf16 (the products accumulate in f32; the CPU widens the operands to f32 and runs its f32 GEMM), out f32
// or bf16 (the f32 result rounded to nearest even as it is written: once on the CPU, by cuBLAS on the GPU; a bf16 out
// added to is rounded once, after the f32 sum of what it held and the products: a bf16 activation's gradient from
// several products).
DECLARE_KERNEL(batched_matmul, (const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool sum_batches,
                                const Tensor& added_to, const Tensor& out))

// out = x (f32) rounded to bf16, to nearest, ties to even: the bf16 copies a bf16 product's backward works on. out is
// bf16, or f32 holding the bf16 values (the operands the CPU kernels multiply with their f32 GEMM, cpu/bf16.h).
DECLARE_KERNEL(round_to_bf16, (const Tensor& x, const Tensor& out))

}  // namespace moelab
