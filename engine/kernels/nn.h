#pragma once
// The kernels behind engine/ops/nn.cpp: cross-entropy, RMSNorm, RoPE and causal attention. CPU: engine/cpu/nn.cpp;
// CUDA: engine/cuda/nn.cu. Shapes are named as in docs/model.md; F is the float type.
#include "engine/kernels.h"
#include "engine/precision.h"

namespace moelab {

// ---- cross-entropy ----------------------------------------------------------------------------------------------------
// logits [N, V], targets i32 [N]; `count` rows have a target other than ignore_index. Per row r:
//   lse[r] = logsumexp(x_r)   row_loss[r] = lse[r] - x_r[t_r] (0 for an ignored row; f64)
// and loss [] = sum_r row_loss[r] / count (0 when count = 0), summed in row order.
DECLARE_KERNEL(cross_entropy_forward, (const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t count,
                                       const Tensor& loss, const Tensor& lse, const Tensor& row_loss))
// dlogits[r] = (softmax(x_r) - onehot(t_r)) * g / count; ignored rows get zero. g is the scalar upstream gradient [].
DECLARE_KERNEL(cross_entropy_backward, (const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& g,
                                        int32_t ignore_index, int64_t count, const Tensor& dlogits))
// Both in one kernel (one reader of the logits, not two), for a chunk of rows of the LM head (linear_cross_entropy):
// row_loss as above and, unless dlogits is undefined, dlogits[r] = (softmax(x_r) - onehot(t_r)) / count, the gradient
// of the mean for an upstream gradient of 1. The logits may also be bf16 (mixed precision's: computed in f32).
// dlogits has the logits' dtype or is bf16 (the operand of the bf16 products that follow, rounded once as it is
// written); it may be the logits themselves (each row is read before it is written).
DECLARE_KERNEL(cross_entropy_with_gradient, (const Tensor& logits, const Tensor& targets, int32_t ignore_index,
                                             int64_t count, const Tensor& row_loss, const Tensor& dlogits))

// ---- RMSNorm ----------------------------------------------------------------------------------------------------------
// x [rows, d], weight [d]: y = x * rstd * weight with rstd[r] = 1 / sqrt(mean(x_r^2) + eps). y has x's dtype, or is
// bf16 (x f32: computed in f32, rounded as it is stored; rms_norm_to_bf16), and g in the backward likewise (widened).
DECLARE_KERNEL(rms_norm_forward,
               (const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd))
// With s = rstd and gw = g * w: dx = s * gw - x * s^3 * mean(gw * x); dweight = sum over rows of g * x * s, summed in
// a fixed order (the same bits for any thread count or launch). dx_added_to is undefined, or dx itself: then dx is
// added to what dx holds (x's gradient from its other uses, the residual stream's: no add kernel after), and read as
// well as written (an argument, so that the kernel profile counts its bytes).
DECLARE_KERNEL(rms_norm_backward, (const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& g,
                                   const Tensor& dx_added_to, const Tensor& dx, const Tensor& dweight))

// The RoPE and attention kernels read a call's tensors (but the table and lse) as one element type: the ops make them
// share it, and the kernels of both devices refuse tensors that do not.
inline void require_one_dtype(const char* kernel, const std::vector<Tensor>& tensors) {
  for (const Tensor& t : tensors)
    if (t.dtype() != tensors.front().dtype())
      fail("{}: needs tensors of one dtype, got {} beside {}", kernel, t.str(), tensors.front().str());
}

// ---- RoPE -------------------------------------------------------------------------------------------------------------
// x [B, T, H, Dh] and the (cos, sin) table [T, Dh/2, 2]: pair (2i, 2i+1) of each head rotates by the table's angle:
//   y0 = x0 cos - x1 sin,  y1 = x0 sin + x1 cos.
// x and y share a dtype, the table's too, except bf16 x and y: an f32 table, the rotation computed in f32 and rounded
// to bf16 as it is stored (the backward's g and dx likewise).
DECLARE_KERNEL(rope_forward, (const Tensor& x, const Tensor& table, const Tensor& y))
// The rotation is orthogonal: the backward rotates g by the opposite angle.
DECLARE_KERNEL(rope_backward, (const Tensor& g, const Tensor& table, const Tensor& dx))

// ---- causal attention -------------------------------------------------------------------------------------------------
// q, k, v, out [B, T, H, Dh], lse [B, H, T]. For each head (b, h) and query row i:
//   s_j = q_i . k_j / sqrt(Dh) for j <= i,  p = softmax(s),  out_i = sum_j p_j v_j,  lse_i = logsumexp_j s_j.
// Precision::BF16 (f32 tensors; engine/precision.h): both products take bf16 operands and accumulate in f32, so q, k
// and v are rounded to bf16, and so is each p_j after the softmax: out_i = sum_j bf16(p_j) v_j. The softmax, lse and
// out stay f32. bf16 q, k, v (precision BF16; heads of up to 128 dims): the same products, out rounded to bf16 as it is
// stored, lse f32.
DECLARE_KERNEL(attention_forward, (const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                   const Tensor& lse, Precision precision))
// With p_ij = exp(s_ij - lse_i), g = dL/dout and D_i = g_i . out_i:
//   dv_j = sum_i p_ij g_i,  ds_ij = p_ij (g_i . v_j - D_i) / sqrt(Dh),
//   dq_i = sum_j ds_ij k_j,  dk_j = sum_i ds_ij q_i.
// Precision::BF16: q, k, v and g are rounded to bf16 (D_i too is bf16(g_i) . out_i), and so are p_ij where it
// multiplies g_i and ds_ij where it multiplies k_j and q_i; the gradients stay f32 (as the matmul op's of f32
// operands under BF16).
// bf16 q, k, v: out and g are bf16 too, and dq, dk, dv are rounded to bf16 as they are stored.
DECLARE_KERNEL(attention_backward,
               (const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                const Tensor& g, const Tensor& dq, const Tensor& dk, const Tensor& dv, Precision precision))

}  // namespace moelab
