// CPU GEMM: C = alpha * op(A) @ op(B) + beta * C, row-major, written from scratch (no BLAS library).
//
// The blocking scheme (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication"; BLIS).
// A GEMM does 2*m*n*k flops on m*k + k*n + m*n numbers, so each number can be reused many times. The work is to
// keep the reused numbers close to the FMA units. Five loops around a micro-kernel, outermost first:
//
//   for jc in steps of NC:                  B block [kc, nc]: packed once, shared by all threads (lives in L3)
//     for pc in steps of KC:                the k dimension; C is updated k/kc times (beta applies on the first)
//       pack B[pc:pc+kc, jc:jc+nc] into NR-wide panels          b_pack: [nc/NR][kc][NR]
//       for ic in steps of MC:    (threads) A block [mc, kc]: packed by each thread into its own buffer (in L2)
//         pack op(A)[ic:ic+mc, pc:pc+kc] into MR-tall panels    a_pack: [mc/MR][kc][MR]
//         for jr in steps of NR:            one B micro-panel [kc, NR] stays in L1 for the whole ir loop
//           for ir in steps of MR:          A micro-panels stream from L2
//             micro-kernel: C[ir:ir+MR, jr:jr+NR] (+)= A panel @ B panel, the tile held in registers
//
// Packing copies each block into the exact order the micro-kernel reads it (contiguous, aligned, zero-padded to
// whole panels), which also absorbs the four transpose cases and the leading dimensions: after packing, every case
// runs the same kernel. The micro-kernel keeps an MR x NR tile of C in vector registers, and per k step loads NR
// floats of B, broadcasts MR floats of A and does MR*NR multiply-adds; only the FMA units are busy.
// Block sizes come with each kernel (gemm_kernels.h): kc*NR floats fit L1 with room for the streaming A panels,
// mc*kc floats fit L2, kc*nc floats fit L3.
//
// Threads split the ic loop (each packs its own A block, all share the packed B block); when m is too short to give
// every thread a block, the jr loop is split too. Small products run on the calling thread: forking threads costs
// more than it saves. Packing buffers are thread-local and reused, so repeated small calls never allocate.
#include "engine/cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <new>

#include "engine/cpu/gemm_kernels.h"

namespace moelab::cpu {
namespace gemm_detail {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t multiple) { return ceil_div(a, multiple) * multiple; }

// Below this many flops a product runs single-threaded (about 10-20 us of one core's work; an OpenMP fork/join
// costs a few us).
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

// A matrix seen through op(): element (r, c) is data[r * row_stride + c * col_stride].
template <typename T>
struct StridedMatrix {
  const T* data;
  int64_t row_stride, col_stride;
  const T* at(int64_t r, int64_t c) const { return data + r * row_stride + c * col_stride; }
};

// a_panel[p*mr + i] = op(A)(i, p) for i < rows, 0 for rows <= i < mr.   src points at op(A)(0, 0) of the panel.
template <typename T>
void pack_a_panel(T* a_panel, StridedMatrix<T> src, int rows, int64_t kc, int mr) {
  if (src.col_stride == 1) {  // A not transposed: walk each row of A contiguously
    for (int i = 0; i < rows; ++i) {
      const T* row = src.at(i, 0);
      for (int64_t p = 0; p < kc; ++p) a_panel[p * mr + i] = row[p];
    }
    for (int i = rows; i < mr; ++i)
      for (int64_t p = 0; p < kc; ++p) a_panel[p * mr + i] = T(0);
  } else {  // A transposed: the MR values of one k step are contiguous
    for (int64_t p = 0; p < kc; ++p) {
      for (int i = 0; i < rows; ++i) a_panel[p * mr + i] = *src.at(i, p);
      for (int i = rows; i < mr; ++i) a_panel[p * mr + i] = T(0);
    }
  }
}

// b_panel[p*nr + j] = op(B)(p, j) for j < cols, 0 for cols <= j < nr.   src points at op(B)(0, 0) of the panel.
template <typename T>
void pack_b_panel(T* b_panel, StridedMatrix<T> src, int cols, int64_t kc, int nr) {
  if (src.col_stride == 1) {  // B not transposed: each k step is a contiguous row piece
    for (int64_t p = 0; p < kc; ++p) {
      const T* row = src.at(p, 0);
      for (int j = 0; j < cols; ++j) b_panel[p * nr + j] = row[j];
      for (int j = cols; j < nr; ++j) b_panel[p * nr + j] = T(0);
    }
  } else {  // B transposed: walk each stored row (a column of op(B)) contiguously
    for (int j = 0; j < cols; ++j) {
      const T* column = src.at(0, j);
      for (int64_t p = 0; p < kc; ++p) b_panel[p * nr + j] = column[p * src.row_stride];
    }
    for (int64_t p = 0; p < kc; ++p)
      for (int j = cols; j < nr; ++j) b_panel[p * nr + j] = T(0);
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

// How one call is cut into blocks and spread over threads.
struct GemmPlan {
  int threads;
  int64_t mc, kc, nc;  // block sizes for this call (at most the kernel's)
  int64_t m_blocks;    // ic blocks
  int64_t n_splits;    // pieces each B block's panels are cut into (> 1 only when m is short)
};

template <typename T>
GemmPlan plan_gemm(const MicroKernel<T>& kernel0, int64_t m, int64_t n, int64_t k) {
  GemmPlan plan{};
  MicroKernel<T> kernel = kernel0;
  if (getenv("KC")) kernel.kc = atoi(getenv("KC"));
  if (getenv("MC")) kernel.mc = atoi(getenv("MC"));
  if (getenv("NC")) kernel.nc = atoi(getenv("NC"));
  const int64_t flops = 2 * m * n * k;
  plan.threads = (omp_in_parallel() || flops < kMinFlopsForThreads) ? 1 : omp_get_max_threads();
  // Equal blocks, each at most the kernel's size: k = 300 becomes 2 x 150, not 256 + 44.
  plan.kc = ceil_div(k, ceil_div(k, kernel.kc));
  plan.nc = round_up(ceil_div(n, ceil_div(n, kernel.nc)), kernel.nr);
  // A multiple of the thread count of ic blocks, so no thread idles (but never more blocks than MR panels).
  const int64_t m_panels = ceil_div(m, kernel.mr);
  const int64_t m_blocks = std::min(round_up(ceil_div(m, kernel.mc), plan.threads), m_panels);
  plan.mc = ceil_div(m_panels, m_blocks) * kernel.mr;
  plan.m_blocks = ceil_div(m, plan.mc);
  plan.n_splits = plan.m_blocks >= plan.threads ? 1 : ceil_div(plan.threads, plan.m_blocks);
  return plan;
}

template <typename T>
void gemm_driver(const MicroKernel<T>& kernel, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == T(0)) {
    scale_c(m, n, beta, C, ldc);
    return;
  }
  const StridedMatrix<T> op_a{A, trans_a ? 1 : lda, trans_a ? lda : 1};  // op(A): [m, k]
  const StridedMatrix<T> op_b{B, trans_b ? 1 : ldb, trans_b ? ldb : 1};  // op(B): [k, n]
  const GemmPlan plan = plan_gemm(kernel, m, n, k);
  const int mr = kernel.mr, nr = kernel.nr;
  T* b_pack = thread_b_buffer<T>(size_t(plan.kc * plan.nc));  // [nc/NR][kc][NR], shared by the team

#pragma omp parallel num_threads(plan.threads) if (plan.threads > 1)
  {
    T* a_pack = thread_a_buffer<T>(size_t(plan.mc * plan.kc));  // [mc/MR][kc][MR], this thread's own
    for (int64_t jc = 0; jc < n; jc += plan.nc) {
      const int64_t nc = std::min(plan.nc, n - jc);
      const int64_t n_panels = ceil_div(nc, nr);
      const int64_t panels_per_split = ceil_div(n_panels, plan.n_splits);
      for (int64_t pc = 0; pc < k; pc += plan.kc) {
        const int64_t kc = std::min(plan.kc, k - pc);
        const T beta_now = pc == 0 ? beta : T(1);  // later k blocks accumulate onto the first

#pragma omp for schedule(static)
        for (int64_t jp = 0; jp < n_panels; ++jp) {
          const int cols = int(std::min<int64_t>(nr, nc - jp * nr));
          const StridedMatrix<T> src{op_b.at(pc, jc + jp * nr), op_b.row_stride, op_b.col_stride};
          pack_b_panel(b_pack + jp * nr * kc, src, cols, kc, nr);
        }  // implicit barrier: B is packed before anyone reads it

#pragma omp for schedule(static)
        for (int64_t task = 0; task < plan.m_blocks * plan.n_splits; ++task) {
          const int64_t ic = (task / plan.n_splits) * plan.mc;
          const int64_t mc = std::min(plan.mc, m - ic);
          const int64_t jp_begin = (task % plan.n_splits) * panels_per_split;
          const int64_t jp_end = std::min(n_panels, jp_begin + panels_per_split);
          for (int64_t ip = 0; ip * mr < mc; ++ip) {
            const int rows = int(std::min<int64_t>(mr, mc - ip * mr));
            const StridedMatrix<T> src{op_a.at(ic + ip * mr, pc), op_a.row_stride, op_a.col_stride};
            pack_a_panel(a_pack + ip * mr * kc, src, rows, kc, mr);
          }
          for (int64_t jp = jp_begin; jp < jp_end; ++jp) {
            const int cols = int(std::min<int64_t>(nr, nc - jp * nr));
            const T* b_panel = b_pack + jp * nr * kc;
            for (int64_t ip = 0; ip * mr < mc; ++ip) {
              const int rows = int(std::min<int64_t>(mr, mc - ip * mr));
              T* c_tile = C + (ic + ip * mr) * ldc + jc + jp * nr;
              kernel.fn(kc, a_pack + ip * mr * kc, b_panel, c_tile, ldc, alpha, beta_now, rows, cols);
            }
          }
        }  // implicit barrier: everyone is done with b_pack before it is repacked
      }
    }
  }
}

// Plain C++ micro-kernel: the fallback for CPUs without AVX2, and the dgemm kernel. The compiler vectorizes the
// j loop with whatever the baseline ISA offers.
template <typename T, int MR, int NR>
void micro_kernel_portable(int64_t kc, const T* a_panel, const T* b_panel, T* c, int64_t ldc, T alpha, T beta,
                           int rows, int cols) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    const T* a = a_panel + p * MR;
    const T* b = b_panel + p * NR;
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < rows; ++i) {
    T* c_row = c + i * ldc;
    for (int j = 0; j < cols; ++j)
      c_row[j] = beta == T(0) ? alpha * acc[i][j] : alpha * acc[i][j] + beta * c_row[j];
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
