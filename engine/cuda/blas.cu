// The row-major GEMM API of blas.cuh on cuBLAS: the only file that calls cuBLAS. A row-major C [m, n] with row
// stride ldc is the column-major C^T [n, m] with leading dimension ldc, and C^T = op(B)^T op(A)^T: every call below
// passes (B, A) and (n, m) where the row-major caller said (A, B) and (m, n), with the same transpose flags and
// leading dimensions. Nothing is copied.
#include "engine/cuda/blas.cuh"

#include <cublas_v2.h>
#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "engine/cuda/device.cuh"

namespace moelab::cuda {

static bool tf32_products = false;  // set_tf32
static ExpertGemm expert_gemm_mode = ExpertGemm::Grouped;  // set_expert_gemm

[[noreturn]] static void blas_failed(cublasStatus_t status, const char* call, const std::string& sizes) {
  throw std::runtime_error(
      fmt::format("cuBLAS {} ({}): {}: {}", call, sizes, cublasGetStatusName(status), cublasGetStatusString(status)));
}

static void check_blas(cublasStatus_t status, const char* call, const std::string& sizes = "") {
  if (status != CUBLAS_STATUS_SUCCESS) blas_failed(status, call, sizes);
}

// Split-K reductions in f32, never in a bf16 output's type (cuBLAS may otherwise reduce in it): a bf16 result is the
// f32 sum rounded once, as the CPU's.
static cublasMath_t math_mode() {
  const int base = tf32_products ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH;
  return static_cast<cublasMath_t>(base | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
}

// The one handle, created on first use: it runs on moelab's stream, and in the math mode set_tf32 picked (with
// CUBLAS_COMPUTE_32F, TF32_TENSOR_OP_MATH lets cuBLAS round f32 inputs to TF32 on tensor cores).
static cublasHandle_t handle() {
  static cublasHandle_t created = [] {
    cublasHandle_t h;
    check_blas(cublasCreate(&h), "cublasCreate");
    check_blas(cublasSetStream(h, stream()), "cublasSetStream");
    check_blas(cublasSetMathMode(h, math_mode()), "cublasSetMathMode");
    return h;
  }();
  return created;
}

// cuBLAS's names for a product's types. alpha and beta are read in the compute type's scalar type: double for f64,
// float otherwise.
struct BlasTypes {
  cudaDataType ab, c;
  cublasComputeType_t compute;
  bool f64;
};

static BlasTypes blas_types(DType ab, DType c, const char* call) {
  if (ab == DType::F32 && c == DType::F32) return {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, false};
  if (ab == DType::F64 && c == DType::F64) return {CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F, true};
  if (ab == DType::BF16 && c == DType::F32) return {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, false};
  if (ab == DType::BF16 && c == DType::BF16) return {CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, false};
  fail("{}: no product of {} operands into {} (f32 -> f32, f64 -> f64, bf16 -> f32 or bf16)", call, dtype_name(ab),
       dtype_name(c));
}

// alpha and beta as cuBLAS reads them (host pointer mode).
struct BlasScalars {
  float alpha32, beta32;
  double alpha64, beta64;
  bool f64;
  BlasScalars(float alpha, float beta, bool f64)
      : alpha32(alpha), beta32(beta), alpha64(alpha), beta64(beta), f64(f64) {}
  const void* alpha() const { return f64 ? static_cast<const void*>(&alpha64) : &alpha32; }
  const void* beta() const { return f64 ? static_cast<const void*>(&beta64) : &beta32; }
};

static cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

// cuBLAS wants a leading dimension of at least 1 even for a matrix with no columns (row stride 0 in moelab); such a
// matrix is never read, so 1 serves.
static int64_t leading(int64_t row_stride) { return std::max<int64_t>(row_stride, 1); }

static std::string sizes_of(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                            int64_t ldc, DType ab, DType c) {
  return fmt::format("row-major m {}, n {}, k {}, trans_a {}, trans_b {}, lda {}, ldb {}, ldc {}, {} -> {}", m, n, k,
                     trans_a, trans_b, lda, ldb, ldc, dtype_name(ab), dtype_name(c));
}

static __device__ inline double as_double(float x) { return x; }
static __device__ inline double as_double(double x) { return x; }
static __device__ inline double as_double(__nv_bfloat16 x) { return __bfloat162float(x); }

// C = beta C for `batch` [m, n] matrices (rows ldc apart, matrices stride_c apart): the whole of a product with
// k = 0, which cuBLAS is not asked for. beta = 0 writes zeros without reading C (it may hold NaN), as cuBLAS does.
template <class T>
__global__ void scale_matrices_kernel(T* c, int64_t m, int64_t n, int64_t ldc, int64_t stride_c, int64_t total,
                                      double beta) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t matrix = i / (m * n), row = (i / n) % m, col = i % n;
    T& x = c[matrix * stride_c + row * ldc + col];
    x = T(beta == 0 ? 0.0 : beta * as_double(x));
  }
}

static void scale_matrices(void* c, int64_t m, int64_t n, int64_t ldc, int64_t stride_c, int64_t batch, float beta,
                           DType c_type) {
  const int64_t total = batch * m * n;
  if (beta == 1 || total == 0) return;
  const dim3 grid(std::min<unsigned>(blocks_for(total, 256), 4096));
  switch (c_type) {
    case DType::F32:
      launch("scale_matrices", scale_matrices_kernel<float>, grid, dim3(256), 0, static_cast<float*>(c), m, n, ldc,
             stride_c, total, double(beta));
      break;
    case DType::F64:
      launch("scale_matrices", scale_matrices_kernel<double>, grid, dim3(256), 0, static_cast<double*>(c), m, n, ldc,
             stride_c, total, double(beta));
      break;
    default:
      launch("scale_matrices", scale_matrices_kernel<__nv_bfloat16>, grid, dim3(256), 0, static_cast<__nv_bfloat16*>(c),
             m, n, ldc, stride_c, total, double(beta));
  }
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void* A, int64_t lda,
          const void* B, int64_t ldb, float beta, void* C, int64_t ldc, DType ab_type, DType c_type) {
  const BlasTypes types = blas_types(ab_type, c_type, "gemm");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    scale_matrices(C, m, n, ldc, 0, 1, beta, c_type);
    return;
  }
  const BlasScalars s(alpha, beta, types.f64);
  check_blas(
      cublasGemmEx_64(handle(), op(trans_b), op(trans_a), n, m, k, s.alpha(), B, types.ab, leading(ldb), A, types.ab,
                      leading(lda), s.beta(), C, types.c, leading(ldc), types.compute, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx", sizes_of(trans_a, trans_b, m, n, k, lda, ldb, ldc, ab_type, c_type));
}

void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const void* A,
                          int64_t lda, int64_t stride_a, const void* B, int64_t ldb, int64_t stride_b, float beta,
                          void* C, int64_t ldc, int64_t stride_c, int64_t batch, DType ab_type, DType c_type) {
  const BlasTypes types = blas_types(ab_type, c_type, "gemm_strided_batched");
  if (m == 0 || n == 0 || batch == 0) return;
  if (k == 0) {
    scale_matrices(C, m, n, ldc, stride_c, batch, beta, c_type);
    return;
  }
  const BlasScalars s(alpha, beta, types.f64);
  check_blas(
      cublasGemmStridedBatchedEx_64(handle(), op(trans_b), op(trans_a), n, m, k, s.alpha(), B, types.ab, leading(ldb),
                                    stride_b, A, types.ab, leading(lda), stride_a, s.beta(), C, types.c, leading(ldc),
                                    stride_c, batch, types.compute, CUBLAS_GEMM_DEFAULT),
      "cublasGemmStridedBatchedEx",
      fmt::format("{}, strides {} {} {}, batch {}", sizes_of(trans_a, trans_b, m, n, k, lda, ldb, ldc, ab_type, c_type),
                  stride_a, stride_b, stride_c, batch));
}

// cublasGemmGroupedBatchedEx takes bf16 -> bf16, and f32 -> f32 with TF32 compute only (its type table). Other types,
// and f32 while set_tf32 is off (the grouped call would round the inputs to TF32), run one call per problem.
static bool grouped_call_takes(const BlasTypes& types) {
  if (types.ab == CUDA_R_16BF) return types.c == CUDA_R_16BF;
  return types.ab == CUDA_R_32F && tf32_products;
}

void gemm_grouped(bool trans_a, bool trans_b, const std::vector<GemmProblem>& problems, float alpha, float beta,
                  DType ab_type, DType c_type) {
  const BlasTypes types = blas_types(ab_type, c_type, "gemm_grouped");
  std::vector<const GemmProblem*> products;  // those with something to multiply
  for (const GemmProblem& p : problems) {
    if (p.m == 0 || p.n == 0) continue;
    if (p.k == 0) {
      scale_matrices(p.C, p.m, p.n, p.ldc, 0, 1, beta, c_type);
      continue;
    }
    products.push_back(&p);
  }
  if (products.empty()) return;
  if (expert_gemm_mode == ExpertGemm::PerExpert || !grouped_call_takes(types)) {
    for (const GemmProblem* p : products)
      gemm(trans_a, trans_b, p->m, p->n, p->k, alpha, p->A, p->lda, p->B, p->ldb, beta, p->C, p->ldc, ab_type, c_type);
    return;
  }
  // One group per problem (their sizes differ). Per-group arguments on the host, in column-major terms; the A, B and
  // C pointer arrays on the device, in one allocation: [B of each problem, A of each, C of each].
  const int64_t count = static_cast<int64_t>(products.size());
  std::vector<cublasOperation_t> ops_first(count, op(trans_b)), ops_second(count, op(trans_a));
  std::vector<int64_t> rows(count), cols(count), inner(count), ld_first(count), ld_second(count), ld_out(count),
      group_size(count, 1);
  std::vector<float> alphas(count, alpha), betas(count, beta);
  std::vector<const void*> pointers(3 * count);
  std::string sizes = fmt::format("{} problems, row-major m x n x k:", count);
  for (int64_t i = 0; i < count; ++i) {
    const GemmProblem& p = *products[i];
    rows[i] = p.n, cols[i] = p.m, inner[i] = p.k;
    ld_first[i] = leading(p.ldb), ld_second[i] = leading(p.lda), ld_out[i] = leading(p.ldc);
    pointers[i] = p.B, pointers[count + i] = p.A, pointers[2 * count + i] = p.C;
    if (i < 8) sizes += fmt::format(" {}x{}x{}", p.m, p.n, p.k);
  }
  if (count > 8) sizes += " ...";
  const DeviceArray<const void*> device(pointers);  // no host wait (device.cuh)
  const cublasComputeType_t compute = types.ab == CUDA_R_32F ? CUBLAS_COMPUTE_32F_FAST_TF32 : types.compute;
  check_blas(cublasGemmGroupedBatchedEx_64(handle(), ops_first.data(), ops_second.data(), rows.data(), cols.data(),
                                           inner.data(), alphas.data(), device.get(), types.ab, ld_first.data(),
                                           device.get() + count, types.ab, ld_second.data(), betas.data(),
                                           const_cast<void* const*>(device.get() + 2 * count), types.c, ld_out.data(),
                                           count, group_size.data(), compute),
             "cublasGemmGroupedBatchedEx", sizes);
}

void set_tf32(bool on) {
  tf32_products = on;
  check_blas(cublasSetMathMode(handle(), math_mode()), "cublasSetMathMode");
}

void set_expert_gemm(ExpertGemm mode) { expert_gemm_mode = mode; }
ExpertGemm expert_gemm() { return expert_gemm_mode; }

}  // namespace moelab::cuda
