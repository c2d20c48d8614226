// AVX2 + FMA sgemm micro-kernel for x86 CPUs without AVX-512: a 6 x 16 tile of C held in 12 ymm registers.
// Compiled for AVX2 by the target attribute (not a file-wide -mavx2), for the same reason as gemm_avx512.cpp;
// gemm.cpp only calls it after checking __builtin_cpu_supports("avx2") and ("fma").
#include "engine/cpu/gemm_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace moelab::cpu::gemm_detail {
namespace {

constexpr int kRows = 6;   // MR: 6 rows x 2 vectors = 12 accumulators of the 16 ymm registers
constexpr int kCols = 16;  // NR: two 8-float vectors per row of C

__attribute__((target("avx2,fma"))) void sgemm_6x16_avx2(int64_t kc, const float* a_panel, const float* b_panel,
                                                          float* c, int64_t ldc, float alpha, float beta, int rows,
                                                          int cols) {
  __m256 acc[kRows][2];
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();

  const float* a = a_panel;
  const float* b = b_panel;
  for (int64_t p = 0; p < kc; ++p) {
    __m256 b_lo = _mm256_load_ps(b);
    __m256 b_hi = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kRows; ++i) {
      __m256 a_i = _mm256_broadcast_ss(a + i);
      acc[i][0] = _mm256_fmadd_ps(a_i, b_lo, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a_i, b_hi, acc[i][1]);
    }
    a += kRows;
    b += kCols;
  }

  // Lane j of a mask is all-ones when column j is inside the tile (maskload/maskstore touch only those).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane);
  const __m256i mask_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lane);
  const __m256 alpha_v = _mm256_set1_ps(alpha);
  const __m256 beta_v = _mm256_set1_ps(beta);
  // Fully unrolled so acc[] is indexed by constants and stays in registers.
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i) {
    if (i >= rows) break;
    float* c_row = c + i * ldc;
    __m256 lo = _mm256_mul_ps(alpha_v, acc[i][0]);
    __m256 hi = _mm256_mul_ps(alpha_v, acc[i][1]);
    if (beta != 0.0f) {  // beta == 0 must not read C (it may hold NaN)
      lo = _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(c_row, mask_lo), lo);
      hi = _mm256_fmadd_ps(beta_v, _mm256_maskload_ps(c_row + 8, mask_hi), hi);
    }
    _mm256_maskstore_ps(c_row, mask_lo, lo);
    _mm256_maskstore_ps(c_row + 8, mask_hi, hi);
  }
}

}  // namespace

// Block sizes, measured on Zen 4 running this kernel (see gemm_avx512.cpp): kc = 512 beat 256 by ~15%;
// mc = 48 keeps the A block [48, 512] at 96 KiB, inside the smaller L2 (256 KiB+) of older AVX2 CPUs.
const MicroKernel<float> sgemm_kernel_avx2 = {"avx2-6x16", kRows, kCols, 48, 512, 2048, sgemm_6x16_avx2};

}  // namespace moelab::cpu::gemm_detail
#endif
