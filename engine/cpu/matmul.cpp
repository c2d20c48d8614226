// CPU kernels of engine/kernels/matmul.h: batched products on engine/cpu/gemm.h. T is the element type (float or
// double); bf16 operands are widened to f32 (exactly) and multiplied by the f32 GEMM, the reference for the GPU's
// bf16 products.
#include "engine/kernels/matmul.h"

#include <algorithm>
#include <stdexcept>

#include "engine/cpu/bf16.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/parallel.h"

namespace moelab::cpu {

namespace {

// C = op(A) @ op(B) + beta * C on dense row-major [rows, cols] storage.
template <class T>
void dense_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, const T* B, T beta, T* C) {
  gemm(ta, tb, m, n, k, A, ta ? m : k, B, tb ? k : n, beta, C, n);
}

// A product below this many flops runs single-threaded inside sgemm (forking costs more than it saves there), so a
// batch of such products is better spread over threads one product each.
constexpr int64_t kSmallGemmFlops = int64_t(1) << 21;

}  // namespace

void batched_matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool sum_batches,
                    const Tensor& added_to, const Tensor& out) {
  if (added_to.defined() && added_to.impl() != out.impl())
    throw std::logic_error("batched_matmul: added_to must be out itself");
  if (out.dtype() == DType::BF16) {  // the f32 product (added to what out holds, widened), rounded once
    if (a.dtype() != DType::BF16) throw std::logic_error("batched_matmul: a bf16 result needs bf16 operands");
    Tensor sum = added_to.defined() ? as_f32(out) : Tensor::empty(out.shape(), DType::F32);
    batched_matmul(a, b, trans_a, trans_b, sum_batches, added_to.defined() ? sum : Tensor(), sum);
    round_to_bf16(sum, out);
    return;
  }
  if (a.dtype() == DType::BF16) {
    batched_matmul(as_f32(a), as_f32(b), trans_a, trans_b, sum_batches, added_to, out);
    return;
  }
  const MatmulShape s = matmul_shape(a, b, trans_a, trans_b);
  const bool accumulate = added_to.defined();
  const int64_t batch = s.batch, m = s.m, n = s.n, k = s.k, a_stride = s.a_stride, b_stride = s.b_stride;
  dispatch_float("matmul", a.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* pc = out.data<T>();
    if (sum_batches) {
      // Summing starts from zeros (or what out holds) and accumulates (beta = 1).
      if (!accumulate) std::fill(pc, pc + out.numel(), T(0));
      if (trans_a && !trans_b && a_stride && b_stride) {
        // sum_i A_i^T B_i with A_i [k, m], B_i [k, n] stacked along k: one GEMM with k' = batch * k.
        dense_gemm(true, false, m, n, batch * k, pa, pb, T(1), pc);
      } else {
        for (int64_t i = 0; i < batch; ++i)  // in order: deterministic, and no two writers share C
          dense_gemm(trans_a, trans_b, m, n, k, pa + i * a_stride, pb + i * b_stride, T(1), pc);
      }
      return;
    }
    int64_t flops = 2 * m * n * k;
    bool over_batches = batch > 1 && flops < kSmallGemmFlops && batch * flops >= kSmallGemmFlops;
    // Inside a parallel region sgemm runs single-threaded on its own thread-local buffers, so this nests safely.
#pragma omp parallel for schedule(static) if (over_batches)
    for (int64_t i = 0; i < batch; ++i)
      dense_gemm(trans_a, trans_b, m, n, k, pa + i * a_stride, pb + i * b_stride, T(accumulate), pc + i * m * n);
  });
}

void round_to_bf16(const Tensor& x, const Tensor& out) {
  const float* in = x.data<float>();
  if (out.dtype() == DType::F32) {
    float* o = out.data<float>();
    parallel_for(x.numel(), 1, [&](int64_t i) { o[i] = to_float(to_bf16(in[i])); });
    return;
  }
  bf16* o = out.data<bf16>();
  parallel_for(x.numel(), 1, [&](int64_t i) { o[i] = to_bf16(in[i]); });
}

}  // namespace moelab::cpu
