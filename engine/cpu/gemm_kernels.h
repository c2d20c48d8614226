#pragma once
// Internals of the CPU GEMM (engine/cpu/gemm.cpp), shared with the per-ISA micro-kernel files and the tests.
// Not a public API: everything else calls sgemm/dgemm from engine/cpu/gemm.h.
#include <cstdint>
#include <vector>

namespace moelab::cpu::gemm_detail {

// A micro-kernel computes one MR x NR tile of C from two packed panels:
//   C[0:rows, 0:cols] = alpha * (a_panel @ b_panel) + beta * C[0:rows, 0:cols]
// a_panel is [kc, MR] (column i of op(A)'s MR rows, k-major: a_panel[p*MR + i]);
// b_panel is [kc, NR] (b_panel[p*NR + j]), 64-byte aligned. Padding rows/columns of the panels hold zeros.
// Only rows < `rows` and columns < `cols` of C are touched; beta == 0 means C is not read.
template <typename T>
using MicroKernelFn = void (*)(int64_t kc, const T* a_panel, const T* b_panel, T* c, int64_t ldc, T alpha, T beta,
                               int rows, int cols);

// A micro-kernel and the cache blocks that suit it (see the blocking comment in gemm.cpp).
template <typename T>
struct MicroKernel {
  const char* name;
  int mr, nr;           // register tile: MR rows x NR columns of C
  int64_t mc, kc, nc;   // cache blocks: A block [mc, kc] in L2, B block [kc, nc] in L3 (upper bounds)
  MicroKernelFn<T> fn;
};

// One per instruction set; each lives in its own file, compiled for that ISA by function target attributes.
extern const MicroKernel<float> sgemm_kernel_avx512;    // gemm_avx512.cpp
extern const MicroKernel<float> sgemm_kernel_avx2;      // gemm_avx2.cpp
extern const MicroKernel<float> sgemm_kernel_portable;  // gemm.cpp (plain C++, whatever the compiler makes of it)

// The kernels this CPU can run, fastest first. sgemm() uses the first one.
std::vector<const MicroKernel<float>*> sgemm_kernels_for_this_cpu();

// sgemm with an explicit micro-kernel (the tests run every kernel the CPU supports through the same driver).
void sgemm_with(const MicroKernel<float>& kernel, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                int64_t ldc);

}  // namespace moelab::cpu::gemm_detail
