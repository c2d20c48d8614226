// CPU GEMM: C = alpha * op(A) @ op(B) + beta * C, row-major, written from scratch (no BLAS library).
//
// The blocking scheme (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication"; BLIS).
// A GEMM does 2*m*n*k flops on m*k + k*n + m*n numbers, so each number is used many times; the work is to serve
// those uses from registers and caches instead of memory. Five loops around a micro-kernel, outermost first:
//
//   for jc in steps of NC:                    column block of C and B
//     for pc in steps of KC:                  the k dimension; C is updated k/kc times (beta applies on the first)
//       pack op(B)[pc:pc+kc, jc:jc+nc] into NR-wide panels      b_pack: [nc/NR][kc][NR]   (L3)
//       for ic in steps of MC:
//         pack op(A)[ic:ic+mc, pc:pc+kc] into MR-tall panels    a_pack: [mc/MR][kc][MR]   (L2)
//         for jr in steps of NR:              one B micro-panel [kc, NR] serves the whole ir loop
//           for ir in steps of MR:            A micro-panels stream through
//             micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= A panel @ B panel, the tile held in registers
//
// Packing copies each block into the exact order the micro-kernel reads it: contiguous, 64-byte aligned, zero-padded
// to whole panels. It also absorbs the four transpose cases and the leading dimensions, so every case runs the same
// kernel. The micro-kernel keeps an MR x NR tile of C in vector registers; per k step it loads NR numbers of B,
// broadcasts MR numbers of A and does MR*NR multiply-adds, so the FMA units are the bottleneck, not memory.
// Each kernel brings its own block sizes (gemm_kernels.h and the kernel files say why those).
//
// Threads: C is cut into one slab per thread (along n for wide products, along m for tall ones, a grid for many
// threads) and each thread runs the five loops on its slab with its own packing buffers. Threads never wait for
// each other before the end: a thread that gets descheduled delays only its own slab. The price is that each
// thread packs its own copy of the operand the slabs share (A when cutting along n), a few percent of the work at
// 1024^3; on 2 Zen 4 cores this still beat sharing one packed B block between threads (a barrier per block) by
// 10-15%. Products under ~2 MFLOP run on the calling thread (waking threads costs more), and packing buffers are
// thread-local and reused, so repeated small calls never allocate.
#include "engine/cpu/gemm.h"

#include <omp.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>

#include "engine/cpu/gemm_kernels.h"

namespace moelab::cpu {
namespace gemm_detail {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t multiple) { return ceil_div(a, multiple) * multiple; }

// Below this many flops a product runs on the calling thread: ~20 us of one core's work, against a few us to wake
// and join the OpenMP team.
constexpr int64_t kMinFlopsForThreads = int64_t(1) << 21;

// A growable, 64-byte aligned scratch buffer. Each thread keeps its own (thread_local below), reused across calls.
template <typename T>
struct ScratchBuffer {
  T* data = nullptr;
  size_t capacity = 0;  // elements
  T* reserve(size_t count) {
    if (count > capacity) {
      std::free(data);
      data = static_cast<T*>(std::aligned_alloc(64, size_t(round_up(int64_t(count * sizeof(T)), 64))));
      if (!data) throw std::bad_alloc();
      capacity = count;
    }
    return data;
  }
  ~ScratchBuffer() { std::free(data); }
};

template <typename T>
T* thread_a_buffer(size_t count) {
  thread_local ScratchBuffer<T> buffer;
  return buffer.reserve(count);
}
template <typename T>
T* thread_b_buffer(size_t count) {
  thread_local ScratchBuffer<T> buffer;
  return buffer.reserve(count);
}

// A stored row-major matrix read through op(): element (r, c) of op(X) is X[r*ld + c], or X[c*ld + r] when
// transposed. `block(r, c)` is the same view starting at element (r, c).
template <typename T>
struct OpMatrix {
  const T* data;
  int64_t ld;
  bool transposed;
  const T* at(int64_t r, int64_t c) const { return transposed ? data + c * ld + r : data + r * ld + c; }
  OpMatrix block(int64_t r, int64_t c) const { return {at(r, c), ld, transposed}; }
};

#if defined(__SSE__)
// src rows [0, rows) x columns [0, kc), both multiples of 4, into panel[p*width + i]: 4 x 4 tiles through SSE
// registers (baseline on x86-64) instead of one scalar store per number.
void transpose_4x4_tiles(float* panel, const float* src, int64_t src_stride, int rows, int64_t kc, int width) {
  for (int i = 0; i < rows; i += 4) {
    const float* r0 = src + i * src_stride;
    for (int64_t p = 0; p < kc; p += 4) {
      __m128 x0 = _mm_loadu_ps(r0 + p), x1 = _mm_loadu_ps(r0 + src_stride + p);
      __m128 x2 = _mm_loadu_ps(r0 + 2 * src_stride + p), x3 = _mm_loadu_ps(r0 + 3 * src_stride + p);
      _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
      _mm_storeu_ps(panel + p * width + i, x0);
      _mm_storeu_ps(panel + (p + 1) * width + i, x1);
      _mm_storeu_ps(panel + (p + 2) * width + i, x2);
      _mm_storeu_ps(panel + (p + 3) * width + i, x3);
    }
  }
}
#endif

// One panel from memory that holds it transposed: panel[p*width + i] = src[i*src_stride + p] for i < count,
// zero for count <= i < width. (The A panels when A is not transposed; the B panels when B is.)
template <typename T>
void pack_panel_transposing(T* panel, const T* src, int64_t src_stride, int count, int64_t kc, int width) {
  int tiled_rows = 0;  // [0, tiled_rows) x [0, tiled_kc) went through 4 x 4 tiles
  int64_t tiled_kc = 0;
#if defined(__SSE__)
  if constexpr (std::is_same_v<T, float>) {
    tiled_rows = count / 4 * 4;
    tiled_kc = kc / 4 * 4;
    transpose_4x4_tiles(panel, src, src_stride, tiled_rows, tiled_kc, width);
  }
#endif
  for (int i = 0; i < count; ++i) {
    const T* row = src + i * src_stride;
    for (int64_t p = i < tiled_rows ? tiled_kc : 0; p < kc; ++p) panel[p * width + i] = row[p];
  }
  for (int64_t p = 0; p < kc; ++p)
    for (int i = count; i < width; ++i) panel[p * width + i] = T(0);
}

// Panels from memory that holds each k step contiguously: panels[ip][p][i] = src[p*src_stride + ip*width + i] for
// ip*width + i < count, zero beyond. Walks each stored row once across all panels, so reads are sequential.
// (The A panels when A is transposed; the B panels when B is not.)
template <typename T>
void pack_panels_straight(T* panels, const T* src, int64_t src_stride, int64_t count, int64_t kc, int width) {
  const int64_t n_panels = ceil_div(count, width);
  for (int64_t p = 0; p < kc; ++p) {
    const T* row = src + p * src_stride;
    if (p + 8 < kc) {  // rows are ld apart (often a page): ask for row p+8 now (+6% on transposed A at 1024^3)
      for (int64_t i = 0; i < count; i += 64 / int64_t(sizeof(T))) __builtin_prefetch(row + 8 * src_stride + i);
    }
    for (int64_t ip = 0; ip < n_panels; ++ip) {
      T* dst = panels + ip * width * kc + p * width;
      const int valid = int(std::min<int64_t>(width, count - ip * width));
      for (int i = 0; i < valid; ++i) dst[i] = row[ip * width + i];
      for (int i = valid; i < width; ++i) dst[i] = T(0);
    }
  }
}

// op(A)[0:rows, 0:kc] into MR-tall panels: a_pack[ip][p][i] = op(A)(ip*mr + i, p), each panel [kc, mr].
template <typename T>
void pack_a_block(T* a_pack, OpMatrix<T> a, int64_t rows, int64_t kc, int mr) {
  if (a.transposed) {  // stored row p of A is op(A)(:, p)
    pack_panels_straight(a_pack, a.data, a.ld, rows, kc, mr);
  } else {  // stored row i of A is op(A)(i, :)
    for (int64_t i = 0; i < rows; i += mr)
      pack_panel_transposing(a_pack + i * kc, a.at(i, 0), a.ld, int(std::min<int64_t>(mr, rows - i)), kc, mr);
  }
}

// op(B)[0:kc, 0:cols] into NR-wide panels: b_pack[jp][p][j] = op(B)(p, jp*nr + j), each panel [kc, nr].
template <typename T>
void pack_b_block(T* b_pack, OpMatrix<T> b, int64_t cols, int64_t kc, int nr) {
  if (!b.transposed) {  // stored row p of B is op(B)(p, :)
    pack_panels_straight(b_pack, b.data, b.ld, cols, kc, nr);
  } else {  // stored row j of B is op(B)(:, j)
    for (int64_t j = 0; j < cols; j += nr)
      pack_panel_transposing(b_pack + j * kc, b.at(0, j), b.ld, int(std::min<int64_t>(nr, cols - j)), kc, nr);
  }
}

// C = beta * C, for k == 0 or alpha == 0 (then op(A) @ op(B) contributes nothing and A, B are not read).
template <typename T>
void scale_c(int64_t m, int64_t n, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* row = C + i * ldc;
    if (beta == T(0)) {
      std::fill(row, row + n, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

// Block sizes for one thread's problem: at most the kernel's, and equal-sized (k = 600 with KC = 512 becomes 2 x 300,
// not 512 + 88), mc and nc whole register tiles.
struct BlockSizes {
  int64_t mc, kc, nc;
};

template <typename T>
BlockSizes block_sizes(const MicroKernel<T>& kernel, int64_t m, int64_t n, int64_t k) {
  return {round_up(ceil_div(m, ceil_div(m, kernel.mc)), kernel.mr), ceil_div(k, ceil_div(k, kernel.kc)),
          round_up(ceil_div(n, ceil_div(n, kernel.nc)), kernel.nr)};
}

// The five loops of the blocking scheme on one thread: C[m, n] (+)= alpha * op(A)[m, k] @ op(B)[k, n].
template <typename T>
void gemm_blocked(const MicroKernel<T>& kernel, int64_t m, int64_t n, int64_t k, T alpha, OpMatrix<T> a,
                  OpMatrix<T> b, T beta, T* C, int64_t ldc) {
  const BlockSizes blocks = block_sizes(kernel, m, n, k);
  const int mr = kernel.mr, nr = kernel.nr;
  T* b_pack = thread_b_buffer<T>(size_t(blocks.kc * blocks.nc));  // [nc/NR][kc][NR]
  T* a_pack = thread_a_buffer<T>(size_t(blocks.mc * blocks.kc));  // [mc/MR][kc][MR]
  for (int64_t jc = 0; jc < n; jc += blocks.nc) {
    const int64_t nc = std::min(blocks.nc, n - jc);
    for (int64_t pc = 0; pc < k; pc += blocks.kc) {
      const int64_t kc = std::min(blocks.kc, k - pc);
      const T beta_now = pc == 0 ? beta : T(1);  // later k blocks accumulate onto the first
      pack_b_block(b_pack, b.block(pc, jc), nc, kc, nr);
      for (int64_t ic = 0; ic < m; ic += blocks.mc) {
        const int64_t mc = std::min(blocks.mc, m - ic);
        pack_a_block(a_pack, a.block(ic, pc), mc, kc, mr);
        for (int64_t jr = 0; jr < nc; jr += nr) {
          const int cols = int(std::min<int64_t>(nr, nc - jr));
          const T* b_panel = b_pack + jr * kc;
          for (int64_t ir = 0; ir < mc; ir += mr) {
            const int rows = int(std::min<int64_t>(mr, mc - ir));
            T* c_tile = C + (ic + ir) * ldc + jc + jr;
            kernel.fn(kc, a_pack + ir * kc, b_panel, c_tile, ldc, alpha, beta_now, rows, cols);
          }
        }
      }
    }
  }
}

// How C is cut into a grid of slabs, one per thread.
struct ThreadGrid {
  int rows = 1, cols = 1;  // slabs along m and along n
};

// Each thread packs all of op(A) for its rows of C and all of op(B) for its columns, so a grid of r x c slabs packs
// (c*m + r*n)*k numbers in total: pick the grid that packs least, among those with a register tile per slab.
template <typename T>
ThreadGrid thread_grid(const MicroKernel<T>& kernel, int threads, int64_t m, int64_t n) {
  ThreadGrid best;
  int64_t best_packed = INT64_MAX;
  for (int rows = 1; rows <= threads; ++rows) {
    if (threads % rows != 0) continue;
    const int cols = threads / rows;
    if (ceil_div(m, kernel.mr) < rows || ceil_div(n, kernel.nr) < cols) continue;
    const int64_t packed = cols * m + rows * n;
    if (packed < best_packed) best = {rows, cols}, best_packed = packed;
  }
  return best;
}

// [begin, end) of slab `index` of `count` when `extent` is cut into whole tiles of `tile`.
std::pair<int64_t, int64_t> slab_range(int64_t extent, int64_t tile, int index, int count) {
  const int64_t tiles = ceil_div(extent, tile);
  const int64_t begin = std::min(extent, tiles * index / count * tile);
  const int64_t end = std::min(extent, tiles * (index + 1) / count * tile);
  return {begin, end};
}

template <typename T>
void gemm_driver(const MicroKernel<T>& kernel, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == T(0)) {
    scale_c(m, n, beta, C, ldc);
    return;
  }
  const OpMatrix<T> a{A, lda, trans_a};  // op(A): [m, k]
  const OpMatrix<T> b{B, ldb, trans_b};  // op(B): [k, n]
  const int64_t flops = 2 * m * n * k;
  const int threads = (omp_in_parallel() || flops < kMinFlopsForThreads) ? 1 : omp_get_max_threads();
  if (threads == 1) {
    gemm_blocked(kernel, m, n, k, alpha, a, b, beta, C, ldc);
    return;
  }
  const ThreadGrid grid = thread_grid(kernel, threads, m, n);
#pragma omp parallel num_threads(grid.rows * grid.cols)
  {
    const int t = omp_get_thread_num();
    const auto [i0, i1] = slab_range(m, kernel.mr, t / grid.cols, grid.rows);
    const auto [j0, j1] = slab_range(n, kernel.nr, t % grid.cols, grid.cols);
    if (i0 < i1 && j0 < j1) {
      gemm_blocked(kernel, i1 - i0, j1 - j0, k, alpha, a.block(i0, 0), b.block(0, j0), beta, C + i0 * ldc + j0, ldc);
    }
  }
}

// Plain C++ micro-kernel: the fallback for CPUs without AVX2, and the dgemm kernel. The compiler vectorizes the
// j loops with whatever the baseline ISA offers. Every loop has constant bounds and is fully unrolled, so acc[][]
// is indexed by constants only and lives in registers (one runtime index would put it in memory).
template <typename T, int MR, int NR>
void micro_kernel_portable(int64_t kc, const T* a_panel, const T* b_panel, T* c, int64_t ldc, T alpha, T beta,
                           int rows, int cols) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    const T* a = a_panel + p * MR;
    const T* b = b_panel + p * NR;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    T* c_row = c + i * ldc;
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      if (i >= rows || j >= cols) continue;
      c_row[j] = beta == T(0) ? alpha * acc[i][j] : alpha * acc[i][j] + beta * c_row[j];
    }
  }
}

const MicroKernel<double> dgemm_kernel_portable = {"portable-4x8", 4, 8, 64, 256, 2048,
                                                   micro_kernel_portable<double, 4, 8>};

}  // namespace

const MicroKernel<float> sgemm_kernel_portable = {"portable-4x16", 4, 16, 64, 256, 2048,
                                                  micro_kernel_portable<float, 4, 16>};

std::vector<const MicroKernel<float>*> sgemm_kernels_for_this_cpu() {
  std::vector<const MicroKernel<float>*> kernels;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) kernels.push_back(&sgemm_kernel_avx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) kernels.push_back(&sgemm_kernel_avx2);
#endif
  kernels.push_back(&sgemm_kernel_portable);
  return kernels;
}

void sgemm_with(const MicroKernel<float>& kernel, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                int64_t ldc) {
  gemm_driver(kernel, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace gemm_detail

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  static const gemm_detail::MicroKernel<float>* const best = gemm_detail::sgemm_kernels_for_this_cpu().front();
  gemm_detail::gemm_driver(*best, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

void dgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* A, int64_t lda,
           const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_detail::gemm_driver(gemm_detail::dgemm_kernel_portable, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta,
                           C, ldc);
}

}  // namespace moelab::cpu
