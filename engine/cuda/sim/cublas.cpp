// A stand-in for the cuBLAS calls moelab makes, for the emulator. Same signatures as cublas_v2.h (which renames some,
// e.g. cublasCreate -> cublasCreate_v2), same column-major semantics, argument checks and type tables as cuBLAS's
// documentation, computed by naive loops that sum in double. It is the independent reference for moelab's row-major
// to column-major mapping, so it shares nothing with moelab's CPU GEMM.
//
// Column-major: element (i, j) of a stored matrix X with leading dimension ld is X[i + j * ld]; op(X) is X, or X^T
// for CUBLAS_OP_T (and CUBLAS_OP_C, as the types are real). C = alpha op(A) op(B) + beta C with op(A) m x k,
// op(B) k x n, C m x n. alpha and beta are read through their pointers in either pointer mode (device memory is host
// memory here). beta == 0 means C is not read, and alpha == 0 that A and B are not.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <fmt/format.h>

#include <cstring>
#include <string>
#include <vector>

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

namespace {

cublasStatus_t report(cublasStatus_t status, const char* call, const std::string& why) {
  fmt::print(stderr, "moelab cuBLAS stand-in: {}: {}\n", call, why);
  return status;
}

std::string type_name(cudaDataType type) {
  switch (type) {
    case CUDA_R_16F: return "CUDA_R_16F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_64F: return "CUDA_R_64F";
    case CUDA_R_8I: return "CUDA_R_8I";
    case CUDA_R_32I: return "CUDA_R_32I";
    default: return fmt::format("cudaDataType {}", int(type));
  }
}

std::string compute_name(cublasComputeType_t compute) {
  switch (compute) {
    case CUBLAS_COMPUTE_16F: return "CUBLAS_COMPUTE_16F";
    case CUBLAS_COMPUTE_32F: return "CUBLAS_COMPUTE_32F";
    case CUBLAS_COMPUTE_32F_PEDANTIC: return "CUBLAS_COMPUTE_32F_PEDANTIC";
    case CUBLAS_COMPUTE_32F_FAST_16F: return "CUBLAS_COMPUTE_32F_FAST_16F";
    case CUBLAS_COMPUTE_32F_FAST_16BF: return "CUBLAS_COMPUTE_32F_FAST_16BF";
    case CUBLAS_COMPUTE_32F_FAST_TF32: return "CUBLAS_COMPUTE_32F_FAST_TF32";
    case CUBLAS_COMPUTE_64F: return "CUBLAS_COMPUTE_64F";
    case CUBLAS_COMPUTE_64F_PEDANTIC: return "CUBLAS_COMPUTE_64F_PEDANTIC";
    case CUBLAS_COMPUTE_32I: return "CUBLAS_COMPUTE_32I";
    default: return fmt::format("cublasComputeType_t {}", int(compute));
  }
}

// ---- type tables -----------------------------------------------------------------------------------------------------

// How inputs are read: as stored, or rounded to the precision a "fast" compute type lets cuBLAS use on the GPU (so
// that a tolerance that holds here holds there).
enum class Rounding { none, tf32, bf16 };

struct Types {
  cudaDataType a, b, c;
  cublasComputeType_t compute;
  bool double_scale() const { return compute == CUBLAS_COMPUTE_64F || compute == CUBLAS_COMPUTE_64F_PEDANTIC; }
};

// One row of a documented table (A and B share a type): whether cuBLAS has it, and whether the stand-in computes it.
struct TypeRow {
  cudaDataType ab, c;
  cublasComputeType_t compute;
  bool emulated;
};

// cublasGemmEx and cublasGemmStridedBatchedEx (real types).
constexpr TypeRow kGemmExTypes[] = {
    {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, true},
    {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_PEDANTIC, true},
    {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, true},
    {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, true},
    {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16F, false},
    {CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, true},
    {CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F_PEDANTIC, true},
    {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, true},
    {CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F_PEDANTIC, true},
    {CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_32F, false},
    {CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, false},
    {CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_16F, false},
    {CUDA_R_8I, CUDA_R_32F, CUBLAS_COMPUTE_32F, false},
    {CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I, false},
    {CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F, true},
    {CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F_PEDANTIC, true},
};

// cublasGemmGroupedBatchedEx: bf16 (and fp16) give their own type only; fp32 needs TF32 compute.
constexpr TypeRow kGroupedTypes[] = {
    {CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, true},
    {CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_32F, false},
    {CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, true},
};

template <size_t N> cublasStatus_t check_types(const char* call, const TypeRow (&table)[N], Types types) {
  std::string combination = fmt::format("A {}, B {}, C {} with {}", type_name(types.a), type_name(types.b),
                                        type_name(types.c), compute_name(types.compute));
  for (const TypeRow& row : table) {
    if (row.ab == types.a && row.ab == types.b && row.c == types.c && row.compute == types.compute) {
      if (row.emulated) return CUBLAS_STATUS_SUCCESS;
      return report(CUBLAS_STATUS_NOT_SUPPORTED, call, combination + " is in cuBLAS's table, not in the emulator's");
    }
  }
  return report(CUBLAS_STATUS_NOT_SUPPORTED, call, combination + " is not in cuBLAS's type table for this call");
}

Rounding input_rounding(Types types, cublasMath_t math) {
  if (types.a != CUDA_R_32F) return Rounding::none;
  if (types.compute == CUBLAS_COMPUTE_32F_FAST_TF32) return Rounding::tf32;
  if (types.compute == CUBLAS_COMPUTE_32F_FAST_16BF) return Rounding::bf16;
  // CUBLAS_TF32_TENSOR_OP_MATH lets plain fp32 compute use TF32 too (the flag bits above 0xF are not modes).
  bool tf32_math = (unsigned(math) & 0xFu) == CUBLAS_TF32_TENSOR_OP_MATH;
  return types.compute == CUBLAS_COMPUTE_32F && tf32_math ? Rounding::tf32 : Rounding::none;
}

// ---- the computation -------------------------------------------------------------------------------------------------

// fp32 with 10 mantissa bits (TF32), rounded to nearest even.
float round_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return x;  // inf, nan
  bits += 0xfffu + ((bits >> 13) & 1u);
  bits &= ~0x1fffu;
  std::memcpy(&x, &bits, 4);
  return x;
}

double load(const void* base, cudaDataType type, int64_t index, Rounding rounding = Rounding::none) {
  switch (type) {
    case CUDA_R_64F: return static_cast<const double*>(base)[index];
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    default: break;
  }
  float x = static_cast<const float*>(base)[index];
  if (rounding == Rounding::tf32) return round_to_tf32(x);
  if (rounding == Rounding::bf16) return __bfloat162float(__float2bfloat16(x));
  return x;
}

void store(void* base, cudaDataType type, int64_t index, double value) {
  switch (type) {
    case CUDA_R_64F: static_cast<double*>(base)[index] = value; break;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(base)[index] = __double2bfloat16(value); break;
    default: static_cast<float*>(base)[index] = float(value); break;
  }
}

// One product: C = alpha op(A) op(B) + beta C.
struct Gemm {
  cublasOperation_t transa, transb;
  int64_t m, n, k;
  const void* A;
  int64_t lda;
  const void* B;
  int64_t ldb;
  void* C;
  int64_t ldc;
  double alpha, beta;
};

bool valid_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

cublasStatus_t check_shape(const char* call, const Gemm& g) {
  auto invalid = [&](const std::string& why) { return report(CUBLAS_STATUS_INVALID_VALUE, call, why); };
  if (!valid_op(g.transa) || !valid_op(g.transb)) return invalid("transa and transb must be CUBLAS_OP_N, _T or _C");
  if (g.m < 0 || g.n < 0 || g.k < 0) return invalid(fmt::format("m {}, n {}, k {}: negative", g.m, g.n, g.k));
  int64_t a_rows = g.transa == CUBLAS_OP_N ? g.m : g.k;  // rows of A as stored
  int64_t b_rows = g.transb == CUBLAS_OP_N ? g.k : g.n;
  if (g.lda < std::max<int64_t>(1, a_rows)) return invalid(fmt::format("lda {} < {}, the rows of A", g.lda, a_rows));
  if (g.ldb < std::max<int64_t>(1, b_rows)) return invalid(fmt::format("ldb {} < {}, the rows of B", g.ldb, b_rows));
  if (g.ldc < std::max<int64_t>(1, g.m)) return invalid(fmt::format("ldc {} < {}, the rows of C", g.ldc, g.m));
  return CUBLAS_STATUS_SUCCESS;
}

void multiply(const Gemm& g, Types types, Rounding rounding) {
  // op(A) as m rows of k and op(B) as n columns of k: each element of C is then one contiguous dot product.
  std::vector<double> a, b;
  if (g.alpha != 0) {
    a.resize(size_t(g.m * g.k));
    b.resize(size_t(g.n * g.k));
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t p = 0; p < g.k; ++p) {
        int64_t stored = g.transa == CUBLAS_OP_N ? i + p * g.lda : p + i * g.lda;
        a[size_t(i * g.k + p)] = load(g.A, types.a, stored, rounding);
      }
    }
    for (int64_t j = 0; j < g.n; ++j) {
      for (int64_t p = 0; p < g.k; ++p) {
        int64_t stored = g.transb == CUBLAS_OP_N ? p + j * g.ldb : j + p * g.ldb;
        b[size_t(j * g.k + p)] = load(g.B, types.b, stored, rounding);
      }
    }
  }
  for (int64_t j = 0; j < g.n; ++j) {
    for (int64_t i = 0; i < g.m; ++i) {
      double sum = 0;
      if (g.alpha != 0) {
        for (int64_t p = 0; p < g.k; ++p) sum += a[size_t(i * g.k + p)] * b[size_t(j * g.k + p)];
      }
      double value = g.alpha * sum;
      if (g.beta != 0) value += g.beta * load(g.C, types.c, i + j * g.ldc);
      store(g.C, types.c, i + j * g.ldc, value);
    }
  }
}

double scalar(const void* pointer, Types types, int64_t index = 0) {
  return types.double_scale() ? static_cast<const double*>(pointer)[index] : static_cast<const float*>(pointer)[index];
}

size_t element_bytes(cudaDataType type) { return type == CUDA_R_64F ? 8 : type == CUDA_R_16BF ? 2 : 4; }

const std::byte* offset(const void* base, cudaDataType type, int64_t elements) {
  return static_cast<const std::byte*>(base) + elements * int64_t(element_bytes(type));
}

bool valid_algo(cublasGemmAlgo_t algo) {
  return algo == CUBLAS_GEMM_DEFAULT || algo == CUBLAS_GEMM_DEFAULT_TENSOR_OP || algo == CUBLAS_GEMM_AUTOTUNE ||
         (algo >= CUBLAS_GEMM_ALGO0 && algo <= CUBLAS_GEMM_ALGO23) ||
         (algo >= CUBLAS_GEMM_ALGO0_TENSOR_OP && algo <= CUBLAS_GEMM_ALGO15_TENSOR_OP);
}

// cublasGemmEx, cublasGemmStridedBatchedEx and cublasSgemm: `batch` products, the k-th at the strides' k-th multiple.
cublasStatus_t strided_batched(const char* call, cublasHandle_t handle, Gemm g, const void* alpha, const void* beta,
                               Types types, int64_t stride_a, int64_t stride_b, int64_t stride_c, int64_t batch,
                               cublasGemmAlgo_t algo) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (cublasStatus_t status = check_shape(call, g); status != CUBLAS_STATUS_SUCCESS) return status;
  if (batch < 0) return report(CUBLAS_STATUS_INVALID_VALUE, call, fmt::format("batchCount {} < 0", batch));
  if (!alpha || !beta) return report(CUBLAS_STATUS_INVALID_VALUE, call, "alpha and beta must not be null");
  if (cublasStatus_t status = check_types(call, kGemmExTypes, types); status != CUBLAS_STATUS_SUCCESS) return status;
  if (!valid_algo(algo)) return report(CUBLAS_STATUS_NOT_SUPPORTED, call, fmt::format("algo {}", int(algo)));
  if (g.m == 0 || g.n == 0) return CUBLAS_STATUS_SUCCESS;
  g.alpha = scalar(alpha, types);
  g.beta = scalar(beta, types);
  Rounding rounding = input_rounding(types, handle->math);
  for (int64_t i = 0; i < batch; ++i) {
    Gemm one = g;
    one.A = offset(g.A, types.a, i * stride_a);
    one.B = offset(g.B, types.b, i * stride_b);
    one.C = const_cast<std::byte*>(offset(g.C, types.c, i * stride_c));
    multiply(one, types, rounding);
  }
  return CUBLAS_STATUS_SUCCESS;
}

// The per-group arguments of cublasGemmGroupedBatchedEx, widened to 64 bits.
struct Group {
  cublasOperation_t transa, transb;
  int64_t m, n, k, lda, ldb, ldc, size;
};

// Per-group arrays (transa ... group_size, alpha_array, beta_array) are on the host; Aarray, Barray and Carray are
// pointer arrays in device memory (here: host memory too).
template <class Int>
std::vector<Group> groups_of(const cublasOperation_t transa[], const cublasOperation_t transb[], const Int m[],
                             const Int n[], const Int k[], const Int lda[], const Int ldb[], const Int ldc[],
                             const Int size[], int64_t count) {
  std::vector<Group> groups;
  for (int64_t i = 0; i < count; ++i) {
    groups.push_back(Group{transa[i], transb[i], m[i], n[i], k[i], lda[i], ldb[i], ldc[i], size[i]});
  }
  return groups;
}

// A group's shape as a product with no matrices yet.
Gemm shape_of(const Group& group) {
  return Gemm{group.transa, group.transb, group.m, group.n,   group.k, nullptr, group.lda,
              nullptr,      group.ldb,    nullptr, group.ldc, 0,       0};
}

cublasStatus_t grouped_batched(const char* call, cublasHandle_t handle, const std::vector<Group>& groups,
                               const void* alpha_array, const void* const A[], const void* const B[],
                               const void* beta_array, void* const C[], Types types) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (cublasStatus_t status = check_types(call, kGroupedTypes, types); status != CUBLAS_STATUS_SUCCESS) return status;
  if (!alpha_array || !beta_array) return report(CUBLAS_STATUS_INVALID_VALUE, call, "alpha and beta must not be null");
  for (size_t i = 0; i < groups.size(); ++i) {
    if (groups[i].size < 0) return report(CUBLAS_STATUS_INVALID_VALUE, call, fmt::format("group_size[{}] < 0", i));
    std::string where = fmt::format("{} (group {})", call, i);
    cublasStatus_t status = check_shape(where.c_str(), shape_of(groups[i]));
    if (status != CUBLAS_STATUS_SUCCESS) return status;
  }
  // A, B and C list the problems of group 0, then those of group 1, ...
  Rounding rounding = input_rounding(types, handle->math);
  int64_t problem = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    Gemm g = shape_of(groups[i]);
    g.alpha = scalar(alpha_array, types, int64_t(i));
    g.beta = scalar(beta_array, types, int64_t(i));
    for (int64_t j = 0; j < groups[i].size; ++j, ++problem) {
      g.A = A[problem];
      g.B = B[problem];
      g.C = C[problem];
      if (g.m > 0 && g.n > 0) multiply(g, types, rounding);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

// ---- the handle ------------------------------------------------------------------------------------------------------

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
  handle->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the handle was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "an allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an argument has an invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "the device lacks a feature the call needs";
    case CUBLAS_STATUS_MAPPING_ERROR: return "a GPU memory access failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "a GPU program failed";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the call does not support these arguments";
    case CUBLAS_STATUS_LICENSE_ERROR: return "a license is missing";
  }
  return "unknown cuBLAS status";
}

// ---- GEMM ------------------------------------------------------------------------------------------------------------

cublasStatus_t cublasSgemm_v2_64(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int64_t m,
                                 int64_t n, int64_t k, const float* alpha, const float* A, int64_t lda, const float* B,
                                 int64_t ldb, const float* beta, float* C, int64_t ldc) {
  Gemm g{transa, transb, m, n, k, A, lda, B, ldb, C, ldc, 0, 0};
  Types types{CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F};
  return strided_batched("cublasSgemm", handle, g, alpha, beta, types, 0, 0, 0, 1, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                              int k, const float* alpha, const float* A, int lda, const float* B, int ldb,
                              const float* beta, float* C, int ldc) {
  return cublasSgemm_v2_64(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

cublasStatus_t cublasGemmEx_64(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int64_t m,
                               int64_t n, int64_t k, const void* alpha, const void* A, cudaDataType Atype, int64_t lda,
                               const void* B, cudaDataType Btype, int64_t ldb, const void* beta, void* C,
                               cudaDataType Ctype, int64_t ldc, cublasComputeType_t computeType,
                               cublasGemmAlgo_t algo) {
  Gemm g{transa, transb, m, n, k, A, lda, B, ldb, C, ldc, 0, 0};
  return strided_batched("cublasGemmEx", handle, g, alpha, beta, Types{Atype, Btype, Ctype, computeType}, 0, 0, 0, 1,
                         algo);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  return cublasGemmEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
                         computeType, algo);
}

cublasStatus_t cublasGemmStridedBatchedEx_64(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                             int64_t m, int64_t n, int64_t k, const void* alpha, const void* A,
                                             cudaDataType Atype, int64_t lda, long long int strideA, const void* B,
                                             cudaDataType Btype, int64_t ldb, long long int strideB, const void* beta,
                                             void* C, cudaDataType Ctype, int64_t ldc, long long int strideC,
                                             int64_t batchCount, cublasComputeType_t computeType,
                                             cublasGemmAlgo_t algo) {
  Gemm g{transa, transb, m, n, k, A, lda, B, ldb, C, ldc, 0, 0};
  return strided_batched("cublasGemmStridedBatchedEx", handle, g, alpha, beta, Types{Atype, Btype, Ctype, computeType},
                         strideA, strideB, strideC, batchCount, algo);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long int strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t algo) {
  return cublasGemmStridedBatchedEx_64(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
                                       strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType, algo);
}

cublasStatus_t cublasGemmGroupedBatchedEx_64(
    cublasHandle_t handle, const cublasOperation_t transa_array[], const cublasOperation_t transb_array[],
    const int64_t m_array[], const int64_t n_array[], const int64_t k_array[], const void* alpha_array,
    const void* const Aarray[], cudaDataType_t Atype, const int64_t lda_array[], const void* const Barray[],
    cudaDataType_t Btype, const int64_t ldb_array[], const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
    const int64_t ldc_array[], int64_t group_count, const int64_t group_size[], cublasComputeType_t computeType) {
  const char* call = "cublasGemmGroupedBatchedEx";
  if (group_count < 0) return report(CUBLAS_STATUS_INVALID_VALUE, call, "group_count < 0");
  std::vector<Group> groups = groups_of(transa_array, transb_array, m_array, n_array, k_array, lda_array, ldb_array,
                                        ldc_array, group_size, group_count);
  return grouped_batched(call, handle, groups, alpha_array, Aarray, Barray, beta_array, Carray,
                         Types{Atype, Btype, Ctype, computeType});
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                          const cublasOperation_t transb_array[], const int m_array[],
                                          const int n_array[], const int k_array[], const void* alpha_array,
                                          const void* const Aarray[], cudaDataType_t Atype, const int lda_array[],
                                          const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
                                          const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
                                          const int ldc_array[], int group_count, const int group_size[],
                                          cublasComputeType_t computeType) {
  const char* call = "cublasGemmGroupedBatchedEx";
  if (group_count < 0) return report(CUBLAS_STATUS_INVALID_VALUE, call, "group_count < 0");
  std::vector<Group> groups = groups_of(transa_array, transb_array, m_array, n_array, k_array, lda_array, ldb_array,
                                        ldc_array, group_size, group_count);
  return grouped_batched(call, handle, groups, alpha_array, Aarray, Barray, beta_array, Carray,
                         Types{Atype, Btype, Ctype, computeType});
}
