#pragma once
// Matrix products on the GPU: the only file that calls cuBLAS is blas.cu. Everything here is row-major, as in the
// rest of moelab; blas.cu maps it to cuBLAS's column-major calls (a row-major C = op(A) op(B) is the column-major
// C^T = op(B)^T op(A)^T, so A and B swap places and nothing is copied).
//
// Types: f32 x f32 -> f32 (TF32 tensor cores when set_tf32(true), runtime.h), bf16 x bf16 -> f32 or bf16, with f32
// accumulation.
// lda, ldb, ldc are the row strides (elements) of the stored matrices: A is stored [m, k] (or [k, m] when trans_a),
// B [k, n] (or [n, k] when trans_b), C [m, n]. beta = 0: C is only written.
#include <cstdint>
#include <vector>

#include "engine/dtype.h"

namespace moelab::cuda {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void* A, int64_t lda,
          const void* B, int64_t ldb, float beta, void* C, int64_t ldc, DType ab_type, DType c_type);

// `batch` products whose matrices are stride_a, stride_b, stride_c elements apart (stride 0: one matrix for all).
void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void* A,
                          int64_t lda, int64_t stride_a, const void* B, int64_t ldb, int64_t stride_b, float beta,
                          void* C, int64_t ldc, int64_t stride_c, int64_t batch, DType ab_type, DType c_type);

// Products of different sizes with the same transposes, types, alpha and beta: one per expert of a MoE layer (its m
// or k is the number of tokens routed to it). Problems with m, n or k = 0 are skipped (with k = 0 and beta = 0, C is
// set to zero). Run as one cublasGemmGroupedBatchedEx, or as one cublasGemmEx per problem under
// ExpertGemm::PerExpert (runtime.h): the same results, which is faster is measured (docs/performance.md). The grouped
// call takes bf16 -> bf16, and f32 -> f32 on TF32 tensor cores only (set_tf32); other types run one call per
// problem.
struct GemmProblem {
  int64_t m, n, k;
  const void* A;
  int64_t lda;
  const void* B;
  int64_t ldb;
  void* C;
  int64_t ldc;
};
void gemm_grouped(bool trans_a, bool trans_b, const std::vector<GemmProblem>& problems, float alpha, float beta,
                  DType ab_type, DType c_type);

}  // namespace moelab::cuda
