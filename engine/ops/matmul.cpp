// Matrix products: op(a) @ op(b) with op(x) = x or x^T on the last two dims, 2-D or batched, on the kernels of
// engine/kernels/matmul.h (CPU: engine/cpu/gemm.h; CUDA: cuBLAS).
// The backward is the same product with other transpose flags, so no gradient ever materializes a transpose:
//   C = op(A) op(B)  =>  d op(A) = G op(B)^T,  d op(B) = op(A)^T G,  and dA, dB are those (transposed back when
//   the operand was transposed, which only flips flags and swaps the two factors).
// bf16 operands give an f32 product; their gradients are bf16 products of a bf16 copy of G, rounded to bf16 (ops.h).
// Mixed precision (engine/precision.h): under BF16, f32 operands are multiplied as bf16 copies of themselves and
// their gradients are the same bf16 products, left in f32.
#include "engine/kernels/matmul.h"
#include "engine/ops/common.h"
#include "engine/precision.h"

namespace moelab {
using namespace detail;

// The leading (batch) dims of a tensor with at least two dims.
static Shape batch_dims(const Tensor& x) { return Shape(x.shape().begin(), x.shape().end() - 2); }

// op(A_i) @ op(B_i) for every batch i, on a's device (f32 for bf16 operands). Either operand may be 2-D: one matrix
// shared by every batch. With sum_batches the result is the single [m, n] sum over the batch (the gradient of a
// shared operand) instead of [..., m, n]. Added to `into` and returned as it when `into` has the result's dtype and
// shape (a gradient an input holds; else a new tensor, which backward then adds).
// Shapes are trusted here: matmul() checks them, and the backward passes only consistent ones.
static Tensor product(const Tensor& a, const Tensor& b, bool ta, bool tb, bool sum_batches,
                      const Tensor& into = Tensor()) {
  const MatmulShape s = matmul_shape(a, b, ta, tb);
  Shape out_shape = sum_batches ? Shape{} : batch_dims(a.dim() > 2 ? a : b);
  out_shape.push_back(s.m);
  out_shape.push_back(s.n);
  const DType dtype = a.dtype() == DType::BF16 ? DType::F32 : a.dtype();
  const bool accumulate = into.defined() && into.dtype() == dtype && into.shape() == out_shape;
  Tensor out = accumulate ? into : Tensor::empty(out_shape, dtype, a.device());
  KERNEL(batched_matmul, a.device())(a, b, ta, tb, sum_batches, accumulate ? out : Tensor(), out);
  return out;
}

Tensor detail::rounded_to_bf16(const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), DType::BF16, x.device());
  KERNEL(round_to_bf16, x.device())(x, out);
  return out;
}

bool detail::multiplied_in_bf16(const Tensor& x) {
  return x.dtype() == DType::F32 && product_precision() == Precision::BF16;
}

// g: [..., m, n]. A shared b gets the sum of its per-batch gradients. For bf16 operands g is rounded to bf16 first,
// and with bf16_gradients each gradient after (the operands are bf16 tensors; under mixed precision they are bf16
// copies of f32 tensors, whose gradients stay f32). held: the gradients a and b already hold (AccumulatingBackwardFn);
// an f32 or f64 gradient is added to its own by the product.
static std::vector<Tensor> matmul_backward(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool need_da,
                                           bool need_db, bool bf16_gradients, const Tensor& g_out,
                                           const std::vector<Tensor>& held) {
  const bool bf16 = a.dtype() == DType::BF16;
  const Tensor g = bf16 ? rounded_to_bf16(g_out) : g_out;
  const bool shared_b = b.dim() == 2 && a.dim() > 2;
  auto held_by = [&](size_t input) { return !bf16_gradients && input < held.size() ? held[input] : Tensor(); };
  Tensor da, db;
  if (need_da)
    da = trans_a ? product(b, g, trans_b, true, false, held_by(0))     // op(B) G^T  [..., k, m]
                 : product(g, b, false, !trans_b, false, held_by(0));  // G op(B)^T  [..., m, k]
  // db: [n, k] or [k, n], with the batch dims unless b is shared.
  if (need_db)
    db = trans_b ? product(g, a, true, trans_a, shared_b, held_by(1))     // G^T op(A)
                 : product(a, g, !trans_a, false, shared_b, held_by(1));  // op(A)^T G
  if (bf16_gradients && da.defined()) da = rounded_to_bf16(da);
  if (bf16_gradients && db.defined()) db = rounded_to_bf16(db);
  return {da, db};
}

Tensor product_operand(const Tensor& x) {
  check_defined("product_operand", x);
  return multiplied_in_bf16(x) ? rounded_to_bf16(x) : Tensor();
}

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, const Tensor& a_rounded) {
  check_same_dtype_device("matmul", a, b);
  check_float("matmul", a);
  auto shapes = [&] {
    return fmt::format("{}{} and {}{}", a.str(), trans_a ? "^T" : "", b.str(), trans_b ? "^T" : "");
  };
  if (a.dim() < 2 || b.dim() < 2) fail("matmul: needs matrices (at least 2-D), got {}", shapes());
  if (b.dim() > 2 && batch_dims(a) != batch_dims(b))
    fail("matmul: batch dims differ (b must be 2-D or have a's leading dims), got {}", shapes());
  int64_t k_a = a.size(trans_a ? -2 : -1), k_b = b.size(trans_b ? -1 : -2);
  if (k_a != k_b) fail("matmul: inner dims differ ({} vs {}), got {}", k_a, k_b, shapes());

  const bool mixed = multiplied_in_bf16(a);
  if (a_rounded.defined() && !(mixed && a_rounded.dtype() == DType::BF16 && a_rounded.shape() == a.shape() &&
                               a_rounded.device() == a.device() && !a_rounded.requires_grad()))
    fail("matmul: a_rounded must be product_operand(a) under bf16 precision, got {} for {}", a_rounded.str(), shapes());
  const Tensor a_operand = !mixed ? a.detach() : a_rounded.defined() ? a_rounded : rounded_to_bf16(a);
  const Tensor b_operand = mixed ? rounded_to_bf16(b) : b.detach();
  Tensor out = product(a_operand, b_operand, trans_a, trans_b, /*sum_batches=*/false);  // [..., m, n]

  // Each gradient is a GEMM as large as the forward one: skip it for an operand that takes none (data, frozen weights).
  bool need_da = a.requires_grad(), need_db = b.requires_grad();
  const bool bf16_gradients = a.dtype() == DType::BF16;
  return record_accumulating("matmul", out, {a, b},
                             [a = a_operand, b = b_operand, trans_a, trans_b, need_da, need_db, bf16_gradients](
                                 const Tensor& g, const std::vector<Tensor>& held) {
                               return matmul_backward(a, b, trans_a, trans_b, need_da, need_db, bf16_gradients, g,
                                                      held);
                             });
}

}  // namespace moelab
