// CUDA kernels of engine/kernels/matmul.h: batched products as cuBLAS calls (blas.cuh), and the f32 -> bf16
// rounding of a bf16 product's backward. The CPU kernels (engine/cpu/matmul.cpp) are their reference in the tests.
#include "engine/kernels/matmul.h"

#include <algorithm>
#include <stdexcept>

#include "engine/cuda/blas.cuh"
#include "engine/cuda/device.cuh"
#include "engine/kernels/shape.h"

namespace moelab::cuda {

void batched_matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool sum_batches,
                    const Tensor& added_to, const Tensor& out) {
  const MatmulShape s = matmul_shape(a, b, trans_a, trans_b);
  const DType ab = a.dtype(), c = out.dtype();
  const int64_t lda = trans_a ? s.m : s.k, ldb = trans_b ? s.k : s.n, element = dtype_size(ab);
  const char *pa = static_cast<const char*>(a.raw_data()), *pb = static_cast<const char*>(b.raw_data());
  if (added_to.defined() && added_to.impl() != out.impl())
    throw std::logic_error("batched_matmul: added_to must be out itself");
  if (c == DType::BF16 && sum_batches) {
    // cuBLAS rounds C to bf16 at the end of each call: a sum of several calls would be rounded more than once. It is
    // summed in f32 (from what out holds, widened, when added to) and rounded once (the CPU kernel's order). One call
    // that adds to a bf16 C (beta = 1, below) rounds once: C + the product, in f32.
    Tensor sum = Tensor::empty(out.shape(), DType::F32, Device::CUDA);
    if (added_to.defined()) convert_dtype(out, sum);
    batched_matmul(a, b, trans_a, trans_b, sum_batches, added_to.defined() ? sum : Tensor(), sum);
    round_to_bf16(sum, out);
    return;
  }
  const bool accumulate = added_to.defined();
  const float beta = accumulate ? 1.0f : 0.0f;
  if (!sum_batches) {
    gemm_strided_batched(trans_a, trans_b, s.m, s.n, s.k, 1.0f, pa, lda, s.a_stride, pb, ldb, s.b_stride, beta,
                         out.raw_data(), s.n, s.m * s.n, s.batch, ab, c);
    return;
  }
  if (trans_a && !trans_b && s.a_stride && s.b_stride) {
    // sum_i A_i^T B_i with A_i [k, m], B_i [k, n] stacked along k: one product with k' = batch * k.
    gemm(true, false, s.m, s.n, s.batch * s.k, 1.0f, pa, s.m, pb, s.n, beta, out.raw_data(), s.n, ab, c);
    return;
  }
  // Otherwise one product per batch, each added to the sum (beta = 1) in batch order: stream-ordered, so no two
  // products write C at once.
  if (!accumulate) set_zero(out.raw_data(), out.numel() * dtype_size(c));
  for (int64_t i = 0; i < s.batch; ++i)
    gemm(trans_a, trans_b, s.m, s.n, s.k, 1.0f, pa + i * s.a_stride * element, lda, pb + i * s.b_stride * element, ldb,
         1.0f, out.raw_data(), s.n, ab, c);
}

// One thread per element (grid-stride). Out: __nv_bfloat16, or float for bf16 values kept in f32.
template <class Out> __global__ void round_to_bf16_kernel(const float* x, int64_t n, Out* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<Out>(__float2bfloat16_rn(x[i]));
}

void round_to_bf16(const Tensor& x, const Tensor& out) {
  const int64_t n = x.numel();
  const dim3 grid(std::min<unsigned>(blocks_for(n, 256), 4096));
  if (out.dtype() == DType::F32)
    launch("round_to_bf16", round_to_bf16_kernel<float>, grid, dim3(256), 0, x.data<float>(), n, out.data<float>());
  else
    launch("round_to_bf16", round_to_bf16_kernel<__nv_bfloat16>, grid, dim3(256), 0, x.data<float>(), n,
           reinterpret_cast<__nv_bfloat16*>(out.data<bf16>()));
}

}  // namespace moelab::cuda
