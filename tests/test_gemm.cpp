// sgemm/dgemm against a naive triple loop in double: every transpose case, odd shapes, k = 0, alpha/beta,
// NaN-filled C with beta = 0, padded leading dimensions. Every micro-kernel this CPU supports runs the same cases.
#include <doctest/doctest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/gemm.h"
#include "engine/cpu/gemm_kernels.h"

namespace {

using moelab::cpu::gemm_detail::MicroKernel;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// One GEMM problem with its operands stored in padded buffers. The padding (columns beyond the logical ones within
// each leading dimension) holds NaN in A and B, so reading it poisons the result, and a sentinel in C, so writing
// it is caught.
struct GemmCase {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  int64_t pad = 0;  // extra elements per stored row of A, B and C
  bool nan_c = false;  // fill C with NaN (only meaningful with beta == 0)

  int64_t a_rows() const { return trans_a ? k : m; }
  int64_t a_cols() const { return trans_a ? m : k; }
  int64_t b_rows() const { return trans_b ? n : k; }
  int64_t b_cols() const { return trans_b ? k : n; }
  int64_t lda() const { return a_cols() + pad; }
  int64_t ldb() const { return b_cols() + pad; }
  int64_t ldc() const { return n + pad; }
  std::string describe() const {
    return "trans_a=" + std::to_string(trans_a) + " trans_b=" + std::to_string(trans_b) + " m=" + std::to_string(m) +
           " n=" + std::to_string(n) + " k=" + std::to_string(k) + " alpha=" + std::to_string(alpha) +
           " beta=" + std::to_string(beta) + " pad=" + std::to_string(pad) + " nan_c=" + std::to_string(nan_c);
  }
};

constexpr float kCSentinel = 12345.0f;  // marks C padding; must survive every call

// A [rows, cols] matrix stored with row stride ld: uniform(-1, 1) inside, `padding` in the extra columns.
std::vector<float> random_matrix(int64_t rows, int64_t cols, int64_t ld, float padding, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> x(size_t(std::max<int64_t>(rows * ld, 1)), padding);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) x[size_t(r * ld + c)] = uniform(rng);
  return x;
}

// C[i, j] = alpha * sum_p op(A)[i, p] * op(B)[p, j] + beta * C[i, j], in double; beta == 0 ignores C.
std::vector<double> reference_gemm(const GemmCase& g, const std::vector<float>& A, const std::vector<float>& B,
                                   const std::vector<float>& C) {
  // op(A) as dense [m, k] and op(B) as dense [k, n], so the triple loop below walks memory in order.
  std::vector<double> op_a(size_t(g.m * g.k)), op_b(size_t(g.k * g.n));
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t p = 0; p < g.k; ++p)
      op_a[size_t(i * g.k + p)] = g.trans_a ? A[size_t(p * g.lda() + i)] : A[size_t(i * g.lda() + p)];
  for (int64_t p = 0; p < g.k; ++p)
    for (int64_t j = 0; j < g.n; ++j)
      op_b[size_t(p * g.n + j)] = g.trans_b ? B[size_t(j * g.ldb() + p)] : B[size_t(p * g.ldb() + j)];

  std::vector<double> out(size_t(g.m * g.n), 0.0);
  for (int64_t i = 0; i < g.m; ++i) {
    double* out_row = out.data() + i * g.n;
    for (int64_t p = 0; p < g.k; ++p) {
      const double a = op_a[size_t(i * g.k + p)];
      const double* b_row = op_b.data() + p * g.n;
      for (int64_t j = 0; j < g.n; ++j) out_row[j] += a * b_row[j];
    }
    for (int64_t j = 0; j < g.n; ++j) {
      const double c_old = g.beta == 0.0f ? 0.0 : double(C[size_t(i * g.ldc() + j)]);
      out_row[j] = double(g.alpha) * out_row[j] + double(g.beta) * c_old;
    }
  }
  return out;
}

// Every kernel this CPU can run (through the shared driver), then the public entry point; visit(name, gemm) gets
// each as a callable with sgemm's signature.
template <typename Visit>
void for_each_sgemm(Visit visit) {
  for (const MicroKernel<float>* kernel : moelab::cpu::gemm_detail::sgemm_kernels_for_this_cpu()) {
    visit(kernel->name, [kernel](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
                                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
      moelab::cpu::gemm_detail::sgemm_with(*kernel, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    });
  }
  visit("sgemm", moelab::cpu::sgemm);
}

// Runs the case through every sgemm (for_each_sgemm) and checks each against the double-precision reference.
void check_case(const GemmCase& g) {
  std::mt19937 rng(uint32_t(g.m * 7919 + g.n * 104729 + g.k * 13 + g.pad));
  const std::vector<float> A = random_matrix(g.a_rows(), g.a_cols(), g.lda(), kNaN, rng);
  const std::vector<float> B = random_matrix(g.b_rows(), g.b_cols(), g.ldb(), kNaN, rng);
  std::vector<float> C_before = random_matrix(g.m, g.n, g.ldc(), kCSentinel, rng);
  if (g.nan_c)
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) C_before[size_t(i * g.ldc() + j)] = kNaN;
  const std::vector<double> expected = reference_gemm(g, A, B, C_before);

  for_each_sgemm([&](const std::string& who, auto gemm) {
    std::vector<float> C = C_before;
    gemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, A.data(), g.lda(), B.data(), g.ldb(), g.beta, C.data(),
         g.ldc());

    double max_ref = 0.0, max_diff = 0.0;
    bool finite = true, padding_intact = true;
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t j = 0; j < g.ldc(); ++j) {
        const float got = C[size_t(i * g.ldc() + j)];
        if (j >= g.n) {
          padding_intact &= got == kCSentinel;
          continue;
        }
        const double want = expected[size_t(i * g.n + j)];
        finite &= std::isfinite(got);
        max_ref = std::max(max_ref, std::abs(want));
        max_diff = std::max(max_diff, std::abs(double(got) - want));
      }
    }
    // fp32 rounding grows like sqrt(k) for sums of k products of numbers in [-1, 1]; every kernel stays 10x or more
    // below this bound here, and a missed or doubled term (size ~0.3) is far above it.
    const double tolerance = 5e-7 * std::sqrt(double(g.k) + 1.0) * (1.0 + max_ref);
    INFO(who, ": ", g.describe(), " threads=", omp_get_max_threads(), "  max|diff|=", max_diff,
         " tolerance=", tolerance);
    CHECK(finite);
    CHECK(padding_intact);
    CHECK(max_diff <= tolerance);
  });
}

void check_all_transposes(GemmCase g) {
  for (int t = 0; t < 4; ++t) {
    g.trans_a = t & 1;
    g.trans_b = t & 2;
    check_case(g);
  }
}

// Runs body() with sgemm allowed `threads` OpenMP threads (ctest gives each test one; the parallel paths need more).
template <typename Body>
void with_threads(int threads, Body body) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  body();
  omp_set_num_threads(before);
}

}  // namespace

TEST_CASE("sgemm: 2x3 @ 3x2 by hand") {
  const float A[6] = {1, 2, 3, 4, 5, 6};     // [2, 3]
  const float B[6] = {7, 8, 9, 10, 11, 12};  // [3, 2]
  float C[4] = {1, 1, 1, 1};
  moelab::cpu::sgemm(false, false, 2, 2, 3, 1.0f, A, 3, B, 2, 0.5f, C, 2);
  CHECK(C[0] == 58.5f);  // 1*7 + 2*9 + 3*11 + 0.5
  CHECK(C[1] == 64.5f);
  CHECK(C[2] == 139.5f);
  CHECK(C[3] == 154.5f);
}

TEST_CASE("sgemm: odd shapes, all transposes, every kernel") {
  const int64_t shapes[][3] = {{1, 1, 1},    {7, 17, 33},  {33, 7, 17},   {17, 33, 7},   {1, 65, 100},
                               {65, 1, 257}, {100, 65, 1}, {13, 31, 64},  {64, 192, 64}, {100, 257, 65},
                               {257, 33, 513}, {5, 1000, 9}};
  for (const auto& shape : shapes) check_all_transposes({.m = shape[0], .n = shape[1], .k = shape[2]});
}

TEST_CASE("sgemm: alpha and beta") {
  const float alpha_beta[][2] = {{1.0f, 1.0f}, {-0.5f, 2.0f}, {2.0f, 0.0f}, {0.0f, 0.5f}, {0.0f, 0.0f}, {1.0f, -1.0f}};
  for (const auto& ab : alpha_beta)
    check_all_transposes({.m = 37, .n = 45, .k = 29, .alpha = ab[0], .beta = ab[1]});
}

TEST_CASE("sgemm: beta = 0 never reads C (C full of NaN)") {
  check_all_transposes({.m = 31, .n = 47, .k = 19, .alpha = 1.5f, .beta = 0.0f, .nan_c = true});
  check_all_transposes({.m = 31, .n = 47, .k = 0, .alpha = 1.5f, .beta = 0.0f, .nan_c = true});
  check_all_transposes({.m = 31, .n = 47, .k = 19, .alpha = 0.0f, .beta = 0.0f, .nan_c = true});
}

TEST_CASE("sgemm: k = 0 and empty outputs") {
  check_all_transposes({.m = 9, .n = 11, .k = 0, .alpha = 1.0f, .beta = 0.0f});
  check_all_transposes({.m = 9, .n = 11, .k = 0, .alpha = 1.0f, .beta = 3.0f});
  check_all_transposes({.m = 0, .n = 11, .k = 5});
  check_all_transposes({.m = 9, .n = 0, .k = 5});
}

TEST_CASE("sgemm: padded leading dimensions") {
  for (int64_t pad : {1, 3, 16, 37})
    check_all_transposes({.m = 29, .n = 53, .k = 41, .alpha = 0.75f, .beta = 0.25f, .pad = pad});
}

TEST_CASE("sgemm: several cache blocks in every dimension, on one thread and on two") {
  // m > mc, n > nc (2048), k > kc (512) for every kernel. On one thread every block loop runs more than once; on
  // two, each thread's slab still has several blocks in m and k.
  for (int threads : {1, 2}) {
    with_threads(threads, [] {
      check_all_transposes({.m = 100, .n = 2080, .k = 600, .alpha = 1.0f, .beta = 0.5f, .pad = 5});
    });
  }
}

TEST_CASE("sgemm: threads cut C into slabs of columns, of rows, or a grid") {
  with_threads(2, [] {
    check_all_transposes({.m = 5, .n = 1000, .k = 500, .alpha = 1.0f, .beta = 0.0f});   // 1 x 2 slabs
    check_all_transposes({.m = 1000, .n = 5, .k = 500, .alpha = 1.0f, .beta = 0.0f});   // 2 x 1 slabs
  });
  with_threads(3, [] { check_all_transposes({.m = 40, .n = 333, .k = 100, .beta = 1.0f, .pad = 2}); });  // 1 x 3
  with_threads(4, [] { check_all_transposes({.m = 150, .n = 170, .k = 90, .beta = 1.0f, .pad = 2}); });  // 2 x 2
}

TEST_CASE("sgemm: called from inside a parallel region") {
  // Each thread runs its own product (as an expert-parallel caller would); results must not interfere.
  const int threads = 2;
  std::vector<int> failures(threads, 0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int64_t m = 70 + t, n = 90, k = 110;
    std::vector<float> A(size_t(m * k)), B(size_t(k * n)), C(size_t(m * n), kNaN);
    for (size_t i = 0; i < A.size(); ++i) A[i] = float((i * 7 + size_t(t)) % 13) - 6.0f;
    for (size_t i = 0; i < B.size(); ++i) B[i] = float((i * 5) % 11) - 5.0f;
    moelab::cpu::sgemm(false, false, m, n, k, 1.0f, A.data(), k, B.data(), n, 0.0f, C.data(), n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double want = 0.0;  // small integers: the float result is exact
        for (int64_t p = 0; p < k; ++p) want += double(A[size_t(i * k + p)]) * double(B[size_t(p * n + j)]);
        failures[size_t(t)] += double(C[size_t(i * n + j)]) != want;
      }
    }
  }
  for (int t = 0; t < threads; ++t) CHECK(failures[size_t(t)] == 0);
}

TEST_CASE("dgemm: all transposes, odd shapes, alpha/beta, padded, NaN C") {
  const int64_t shapes[][3] = {{1, 1, 1}, {7, 17, 33}, {65, 33, 300}, {33, 70, 1}, {3, 2100, 20}};
  for (const auto& shape : shapes) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t m = shape[0], n = shape[1], k = shape[2], pad = 3;
      const int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
      std::mt19937 rng(uint32_t(m + n + k + t));
      std::uniform_real_distribution<double> uniform(-1.0, 1.0);
      std::vector<double> A(size_t((ta ? k : m) * lda)), B(size_t((tb ? n : k) * ldb)), C(size_t(m * ldc));
      for (double& x : A) x = uniform(rng);
      for (double& x : B) x = uniform(rng);
      for (double& x : C) x = uniform(rng);
      for (const double beta : {0.0, -1.5}) {
        std::vector<double> got = C;
        if (beta == 0.0) std::fill(got.begin(), got.end(), std::numeric_limits<double>::quiet_NaN());
        moelab::cpu::dgemm(ta, tb, m, n, k, 0.5, A.data(), lda, B.data(), ldb, beta, got.data(), ldc);
        double max_diff = 0.0;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double sum = 0.0;
            for (int64_t p = 0; p < k; ++p)
              sum += (ta ? A[size_t(p * lda + i)] : A[size_t(i * lda + p)]) *
                     (tb ? B[size_t(j * ldb + p)] : B[size_t(p * ldb + j)]);
            const double want = 0.5 * sum + (beta == 0.0 ? 0.0 : beta * C[size_t(i * ldc + j)]);
            const double diff = std::abs(got[size_t(i * ldc + j)] - want);
            max_diff = std::isnan(diff) ? INFINITY : std::max(max_diff, diff);
          }
        }
        INFO("dgemm trans_a=", ta, " trans_b=", tb, " m=", m, " n=", n, " k=", k, " beta=", beta);
        CHECK(max_diff <= 1e-13 * double(k + 1));
      }
    }
  }
}
