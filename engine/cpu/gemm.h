#pragma once
// CPU matrix products, written here (no BLAS library). Row-major storage throughout.
#include <cstdint>

namespace moelab::cpu {

// C[m,n] = alpha * op(A) @ op(B) + beta * C, where op(X) = X or X^T.
// A is stored [m,k] (or [k,m] when trans_a), B is stored [k,n] (or [n,k] when trans_b); lda/ldb/ldc are the row
// strides (elements) of the stored matrices. beta == 0 means C is only written, never read (it may hold NaNs).
// Packed, cache-blocked, OpenMP-parallel, AVX-512 when the CPU has it (portable path otherwise).
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// The same contract in double precision (used for f64 gradient checks; correctness over speed).
void dgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* A, int64_t lda,
           const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// sgemm or dgemm with alpha = 1, by element type: the call templated kernels make.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  sgemm(trans_a, trans_b, m, n, k, 1.0f, A, lda, B, ldb, beta, C, ldc);
}
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const double* A, int64_t lda,
                 const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  dgemm(trans_a, trans_b, m, n, k, 1.0, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace moelab::cpu
