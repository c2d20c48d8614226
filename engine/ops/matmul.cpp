// Matrix products: op(a) @ op(b) with op(x) = x or x^T on the last two dims, 2-D or batched, on the kernels of
// engine/kernels/matmul.h (CPU: engine/cpu/gemm.h; CUDA: cuBLAS).
// The backward is the same product with other transpose flags, so no gradient ever materializes a transpose:
//   C = op(A) op(B)  =>  d op(A) = G op(B)^T,  d op(B) = op(A)^T G,  and dA, dB are those (transposed back when
//   the operand was transposed, which only flips flags and swaps the two factors).
// A bf16 product (a bf16 operand, or f32 ones under Precision::BF16) multiplies bf16 copies of its f32 operands, with
// f32 accumulation, into an f32 result (or a bf16 one: matmul_to_bf16). Its gradients are bf16 products of G's bf16
// copy, each written in its operand's dtype (ops.h).
#include "engine/kernels/matmul.h"
#include "engine/bf16_weights.h"
#include "engine/ops/common.h"
#include "engine/precision.h"

namespace moelab {
using namespace detail;

// The leading (batch) dims of a tensor with at least two dims.
static Shape batch_dims(const Tensor& x) { return Shape(x.shape().begin(), x.shape().end() - 2); }

// op(A_i) @ op(B_i) for every batch i, on a's device, as a `dtype` tensor: the operands' own for f32 and f64, f32 or
// bf16 for bf16 operands. Either operand may be 2-D: one matrix shared by every batch. With sum_batches the result is
// the single [m, n] sum over the batch (the gradient of a shared operand) instead of [..., m, n]. Added to `into` and
// returned as it when `into` has the result's shape and dtype (a gradient an input holds; a bf16 one is rounded once,
// after the sum), else a new tensor, which backward then adds.
// Shapes are trusted here: matmul() checks them, and the backward passes only consistent ones.
static Tensor product(const Tensor& a, const Tensor& b, bool ta, bool tb, bool sum_batches, DType dtype,
                      const Tensor& into = Tensor()) {
  const MatmulShape s = matmul_shape(a, b, ta, tb);
  Shape out_shape = sum_batches ? Shape{} : batch_dims(a.dim() > 2 ? a : b);
  out_shape.push_back(s.m);
  out_shape.push_back(s.n);
  const bool accumulate = into.defined() && into.dtype() == dtype && into.shape() == out_shape;
  Tensor out = accumulate ? into : Tensor::empty(out_shape, dtype, a.device());
  KERNEL(batched_matmul, a.device())(a, b, ta, tb, sum_batches, accumulate ? out : Tensor(), out);
  return out;
}

Tensor detail::rounded_to_bf16(const Tensor& x) {
  if (const Bf16Weights* weights = product_bf16_weights())
    if (Tensor copy = weights->copy_of(x); copy.defined()) return copy;  // a parameter's, rounded already
  Tensor out = Tensor::empty(x.shape(), DType::BF16, x.device());
  KERNEL(round_to_bf16, x.device())(x, out);
  return out;
}

bool detail::multiplied_in_bf16(const Tensor& x) {
  return x.dtype() == DType::F32 && product_precision() == Precision::BF16;
}

// g: [..., m, n]. a and b are the operands the forward multiplied (bf16 copies of f32 inputs in a bf16 product), and
// each gradient is written in the dtype of the input it belongs to (da_dtype, db_dtype). In a bf16 product g is
// rounded to bf16 first, unless it is bf16. A shared b gets the sum of its per-batch gradients. held: the gradients a
// and b already hold (AccumulatingBackwardFn), which the products add to (a bf16 one: the sum rounded once).
static std::vector<Tensor> matmul_backward(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, DType da_dtype,
                                           DType db_dtype, bool need_da, bool need_db, const Tensor& g_out,
                                           const std::vector<Tensor>& held) {
  const Tensor g = a.dtype() == DType::BF16 && g_out.dtype() != DType::BF16 ? rounded_to_bf16(g_out) : g_out;
  const bool shared_b = b.dim() == 2 && a.dim() > 2;
  auto held_by = [&](size_t input) { return input < held.size() ? held[input] : Tensor(); };
  Tensor da, db;
  if (need_da)
    da = trans_a ? product(b, g, trans_b, true, false, da_dtype, held_by(0))     // op(B) G^T  [..., k, m]
                 : product(g, b, false, !trans_b, false, da_dtype, held_by(0));  // G op(B)^T  [..., m, k]
  // db: [n, k] or [k, n], with the batch dims unless b is shared.
  if (need_db)
    db = trans_b ? product(g, a, true, trans_a, shared_b, db_dtype, held_by(1))     // G^T op(A)
                 : product(a, g, !trans_a, false, shared_b, db_dtype, held_by(1));  // op(A)^T G
  return {da, db};
}

Tensor product_operand(const Tensor& x) {
  check_defined("product_operand", x);
  return multiplied_in_bf16(x) ? rounded_to_bf16(x) : Tensor();
}

// matmul (an f32 or f64 result) and matmul_to_bf16 (bf16_result).
static Tensor matrix_product(const char* op, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                             const Tensor& a_rounded, bool bf16_result) {
  check_float(op, a);
  check_float(op, b);
  auto shapes = [&] {
    return fmt::format("{}{} and {}{}", a.str(), trans_a ? "^T" : "", b.str(), trans_b ? "^T" : "");
  };
  if (a.device() != b.device()) fail("{}: operands on different devices, got {}", op, shapes());
  // A bf16 product: a bf16 operand, or f32 operands under Precision::BF16. f64 never mixes.
  const bool bf16 = a.dtype() == DType::BF16 || b.dtype() == DType::BF16 || multiplied_in_bf16(a);
  if (a.dtype() != b.dtype() && (a.dtype() == DType::F64 || b.dtype() == DType::F64))
    fail("{}: operands must share a dtype (or be bf16 and f32), got {}", op, shapes());
  if (a.dim() < 2 || b.dim() < 2) fail("{}: needs matrices (at least 2-D), got {}", op, shapes());
  if (b.dim() > 2 && batch_dims(a) != batch_dims(b))
    fail("{}: batch dims differ (b must be 2-D or have a's leading dims), got {}", op, shapes());
  int64_t k_a = a.size(trans_a ? -2 : -1), k_b = b.size(trans_b ? -1 : -2);
  if (k_a != k_b) fail("{}: inner dims differ ({} vs {}), got {}", op, k_a, k_b, shapes());
  if (bf16_result && !bf16)
    fail("{}: needs a bf16 product (a bf16 operand, or f32 ones under bf16 precision), got {}", op, shapes());
  if (a_rounded.defined() &&
      !(bf16 && a.dtype() == DType::F32 && a_rounded.dtype() == DType::BF16 && a_rounded.shape() == a.shape() &&
        a_rounded.device() == a.device() && !a_rounded.requires_grad()))
    fail("{}: a_rounded must be product_operand(a) under bf16 precision, got {} for {}", op, a_rounded.str(), shapes());
  auto operand = [&](const Tensor& x) { return bf16 && x.dtype() == DType::F32 ? rounded_to_bf16(x) : x.detach(); };
  const Tensor a_operand = a_rounded.defined() ? a_rounded : operand(a), b_operand = operand(b);
  const DType result = bf16_result ? DType::BF16 : bf16 ? DType::F32 : a.dtype();
  Tensor out = product(a_operand, b_operand, trans_a, trans_b, /*sum_batches=*/false, result);  // [..., m, n]

  // Each gradient is a GEMM as large as the forward one: skip it for an operand that takes none (data, frozen weights).
  const bool need_da = a.requires_grad(), need_db = b.requires_grad();
  const DType da_dtype = a.dtype(), db_dtype = b.dtype();
  return record_accumulating(op, out, {a, b},
                             [a = a_operand, b = b_operand, trans_a, trans_b, da_dtype, db_dtype, need_da, need_db](
                                 const Tensor& g, const std::vector<Tensor>& held) {
                               return matmul_backward(a, b, trans_a, trans_b, da_dtype, db_dtype, need_da, need_db, g,
                                                      held);
                             });
}

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, const Tensor& a_rounded) {
  return matrix_product("matmul", a, b, trans_a, trans_b, a_rounded, /*bf16_result=*/false);
}

Tensor matmul_to_bf16(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, const Tensor& a_rounded) {
  return matrix_product("matmul_to_bf16", a, b, trans_a, trans_b, a_rounded, /*bf16_result=*/true);
}

}  // namespace moelab
