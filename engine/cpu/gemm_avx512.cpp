// AVX-512 sgemm micro-kernel: a 12 x 32 tile of C held in 24 zmm registers.
// Compiled for AVX-512 by the target attribute below, not by a file-wide -mavx512f: a file-wide flag would let inline
// library code instantiated here (std::, fmt::) use AVX-512 and be picked by the linker for the whole program.
// gemm.cpp only calls this kernel after checking __builtin_cpu_supports("avx512f").
#include "engine/cpu/gemm_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

namespace moelab::cpu::gemm_detail {
namespace {

constexpr int kRows = 12;  // MR: 12 rows x 2 vectors = 24 accumulators, leaving 8 of 32 zmm for B and broadcasts
constexpr int kCols = 32;  // NR: two 16-float vectors per row of C

// Per k step: 2 vector loads of B, 12 broadcasts of A, 24 FMAs. The FMAs are the bottleneck (as they should be):
// 24 independent accumulators cover the FMA latency (4 cycles) times its throughput with room to spare.
__attribute__((target("avx512f,fma"))) void sgemm_12x32_avx512(int64_t kc, const float* a_panel,
                                                                const float* b_panel, float* c, int64_t ldc,
                                                                float alpha, float beta, int rows, int cols) {
  __m512 acc[kRows][2];  // fully unrolled loops only, so every index is a constant and acc stays in registers
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();

  // Touch the C tile now so its cache lines arrive while the k loop runs.
  for (int i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + kCols - 1), _MM_HINT_T0);
  }

  const float* a = a_panel;
  const float* b = b_panel;
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    __m512 b_lo = _mm512_load_ps(b);
    __m512 b_hi = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      __m512 a_i = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(a_i, b_lo, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a_i, b_hi, acc[i][1]);
    }
    a += kRows;
    b += kCols;
  }

  // Masks select the valid columns of a partial tile; masked loads/stores never touch memory outside them.
  const __mmask16 mask_lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 mask_hi = cols >= 32 ? __mmask16(0xFFFF) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : 0;
  const __m512 alpha_v = _mm512_set1_ps(alpha);
  const __m512 beta_v = _mm512_set1_ps(beta);
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) {
    if (i >= rows) break;
    float* c_row = c + i * ldc;
    __m512 lo = _mm512_mul_ps(alpha_v, acc[i][0]);
    __m512 hi = _mm512_mul_ps(alpha_v, acc[i][1]);
    if (beta != 0.0f) {  // beta == 0 must not read C: it may hold NaN, and 0 * NaN is NaN
      lo = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask_lo, c_row), lo);
      hi = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask_hi, c_row + 16), hi);
    }
    _mm512_mask_storeu_ps(c_row, mask_lo, lo);
    _mm512_mask_storeu_ps(c_row + 16, mask_hi, hi);
  }
}

}  // namespace

// Block sizes, measured on Zen 4 (32 KiB L1d, 1 MiB L2 per core), single-threaded, n = 512..2048:
//   kc = 512: long k loops amortize each C tile's load/store; kc = 256 was ~8% slower, 768 no better.
//     The A micro-panel [512, 12] is 24 KiB; the B micro-panel [512, 32] (64 KiB) streams from L2.
//   mc = 96: the A block [96, 512] (192 KiB) stays in L2; 48..144 were within noise of each other.
//   nc = 2048: the B block [512, 2048] (4 MiB) stays in L3.
const MicroKernel<float> sgemm_kernel_avx512 = {"avx512-12x32", kRows, kCols, 96, 512, 2048, sgemm_12x32_avx512};

}  // namespace moelab::cpu::gemm_detail
#endif
