// Matrix products: op(a) @ op(b) with op(x) = x or x^T on the last two dims, 2-D or batched, on engine/cpu/gemm.h.
// The backward is the same product with other transpose flags, so no gradient ever materializes a transpose:
//   C = op(A) op(B)  =>  d op(A) = G op(B)^T,  d op(B) = op(A)^T G,  and dA, dB are those (transposed back when
//   the operand was transposed, which only flips flags and swaps the two factors).
#include "engine/cpu/gemm.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// C = op(A) @ op(B) + beta * C on dense row-major [rows, cols] storage.
template <class T> static void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, const T* B, T beta,
                                    T* C) {
  cpu::gemm(ta, tb, m, n, k, A, ta ? m : k, B, tb ? k : n, beta, C, n);
}

// A product below this many flops runs single-threaded inside sgemm (forking costs more than it saves there), so a
// batch of such products is better spread over threads one product each.
constexpr int64_t kSmallGemmFlops = int64_t(1) << 21;

// The leading (batch) dims of a tensor with at least two dims.
static Shape batch_dims(const Tensor& x) { return Shape(x.shape().begin(), x.shape().end() - 2); }

// op(A_i) @ op(B_i) for every batch i. Either operand may be 2-D: one matrix shared by every batch. With
// sum_batches the result is the single [m, n] sum over the batch (the gradient of a shared operand) instead of
// [..., m, n]. Shapes are trusted here: matmul() checks them, and backward calls only pass consistent ones.
static Tensor product(const Tensor& a, const Tensor& b, bool ta, bool tb, bool sum_batches) {
  int64_t m = a.size(ta ? -1 : -2), k = a.size(ta ? -2 : -1), n = b.size(tb ? -2 : -1);
  Shape lead = a.dim() > 2 ? batch_dims(a) : batch_dims(b);
  int64_t batch = shape_numel(lead);
  int64_t a_stride = a.dim() > 2 ? m * k : 0, b_stride = b.dim() > 2 ? k * n : 0;  // 0: shared by every batch
  Shape out_shape = sum_batches ? Shape{} : lead;
  out_shape.push_back(m);
  out_shape.push_back(n);
  // Summing starts from zeros and accumulates (beta = 1); otherwise every product overwrites its own block.
  Tensor out = sum_batches ? zeros(out_shape, a.dtype()) : Tensor::empty(out_shape, a.dtype());
  dispatch_float("matmul", a.dtype(), [&](auto t) {
    using T = decltype(t);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* pc = out.data<T>();
    if (sum_batches) {
      if (ta && !tb && a_stride && b_stride) {
        // sum_i A_i^T B_i with A_i [k, m], B_i [k, n] stacked along k: one GEMM with k' = batch * k.
        gemm(true, false, m, n, batch * k, pa, pb, T(1), pc);
      } else {
        for (int64_t i = 0; i < batch; ++i)  // in order: deterministic, and no two writers share C
          gemm(ta, tb, m, n, k, pa + i * a_stride, pb + i * b_stride, T(1), pc);
      }
      return;
    }
    int64_t flops = 2 * m * n * k;
    bool over_batches = batch > 1 && flops < kSmallGemmFlops && batch * flops >= kSmallGemmFlops;
    // Inside a parallel region sgemm runs single-threaded on its own thread-local buffers, so this nests safely.
#pragma omp parallel for schedule(static) if (over_batches)
    for (int64_t i = 0; i < batch; ++i)
      gemm(ta, tb, m, n, k, pa + i * a_stride, pb + i * b_stride, T(0), pc + i * m * n);
  });
  return out;
}

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  check_same_dtype_device("matmul", a, b);
  check_float("matmul", a);
  check_cpu("matmul", a);
  auto shapes = [&] {
    return fmt::format("{}{} and {}{}", a.str(), trans_a ? "^T" : "", b.str(), trans_b ? "^T" : "");
  };
  if (a.dim() < 2 || b.dim() < 2) fail("matmul: needs matrices (at least 2-D), got {}", shapes());
  if (b.dim() > 2 && batch_dims(a) != batch_dims(b))
    fail("matmul: batch dims differ (b must be 2-D or have a's leading dims), got {}", shapes());
  int64_t k_a = a.size(trans_a ? -2 : -1), k_b = b.size(trans_b ? -1 : -2);
  if (k_a != k_b) fail("matmul: inner dims differ ({} vs {}), got {}", k_a, k_b, shapes());

  Tensor out = product(a, b, trans_a, trans_b, /*sum_batches=*/false);  // [..., m, n]

  bool shared_b = b.dim() == 2 && a.dim() > 2;
  // Each gradient is a GEMM as large as the forward one: skip it for an operand that takes none (data, frozen weights).
  bool need_da = a.requires_grad(), need_db = b.requires_grad();
  return record("matmul", out, {a, b},
                [a = a.detach(), b = b.detach(), trans_a, trans_b, shared_b, need_da, need_db](const Tensor& g) {
                  // g: [..., m, n]. A shared b gets the sum of its per-batch gradients.
                  Tensor da, db;
                  if (need_da)
                    da = trans_a ? product(b, g, trans_b, true, false)       // op(B) G^T  [..., k, m]
                                 : product(g, b, false, !trans_b, false);    // G op(B)^T  [..., m, k]
                  if (need_db)  // [n, k] or [k, n], with the batch dims unless b is shared
                    db = trans_b ? product(g, a, true, trans_a, shared_b)    // G^T op(A)
                                 : product(a, g, !trans_a, false, shared_b); // op(A)^T G
                  return std::vector<Tensor>{da, db};
                });
}

}  // namespace moelab
