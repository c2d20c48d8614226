#include "nn/layers.h"

#include "engine/precision.h"

namespace moelab::nn {

Linear::Linear(int64_t in_features, int64_t out_features, Generator& gen, double std) {
  weight = add_parameter("weight", randn({out_features, in_features}, gen, 0.0, std));
}

Embedding::Embedding(int64_t vocab_size, int64_t dim, Generator& gen, double std) {
  weight = add_parameter("weight", randn({vocab_size, dim}, gen, 0.0, std));
}

RMSNorm::RMSNorm(int64_t dim, double eps) : eps_(eps) { weight = add_parameter("weight", ones({dim})); }

Tensor RMSNorm::forward_operand(const Tensor& x) const {
  const bool bf16 = product_precision() == Precision::BF16 && x.dtype() == DType::F32;
  return bf16 ? rms_norm_to_bf16(x, weight, eps_) : forward(x);
}

SwiGLU::SwiGLU(int64_t dim, int64_t hidden, Generator& gen, double std, double down_std) {
  w_gate = add_parameter("w_gate", randn({hidden, dim}, gen, 0.0, std));
  w_up = add_parameter("w_up", randn({hidden, dim}, gen, 0.0, std));
  w_down = add_parameter("w_down", randn({dim, hidden}, gen, 0.0, down_std));
}

Tensor SwiGLU::forward(const Tensor& x) {
  Tensor gate = matmul(x, w_gate, false, true);      // [N, h]
  Tensor up = matmul(x, w_up, false, true);          // [N, h]
  return matmul(silu(gate) * up, w_down, false, true);  // [N, d]
}

CausalSelfAttention::CausalSelfAttention(int64_t dim, int64_t heads, double rope_theta, Generator& gen, double std,
                                         double out_std)
    : wqkv(dim, 3 * dim, gen, std), wo(dim, dim, gen, out_std), dim_(dim), heads_(heads), rope_theta_(rope_theta) {
  add_module("wqkv", wqkv);
  add_module("wo", wo);
}

Tensor CausalSelfAttention::forward(const Tensor& x, int64_t batch, int64_t seq) const {
  // q, k and v are three products with row blocks of wqkv (views of the parameter, no copy). One product and a split
  // of its [B*T, 3d] result would move far more: the split copies each part out, and its backward builds the
  // gradient from a zero-filled [B*T, 3d] tensor per part and two adds (docs/performance.md, "Where the bytes go").
  // An f32 x's bf16 copy under mixed precision, made once for all three (a bf16 x is multiplied as it is).
  const Tensor x_operand = product_operand(x);
  // Under mixed precision q, k, v and the attention's output are bf16 tensors, as autocast's: the products write them
  // rounded, RoPE and attention read and write bf16 (computing in f32), their gradients are bf16, and wo multiplies y
  // as it is. That halves the bytes of this block's activations (docs/performance.md). Heads longer than the bf16
  // attention takes stay f32.
  const bool bf16_products = x.dtype() == DType::BF16 || x_operand.defined();
  const bool bf16_activations = bf16_products && dim_ / heads_ <= kMaxBf16HeadDim;
  auto project = [&](int64_t part) {  // [B*T, d]
    const Tensor w = slice_rows(wqkv.weight, part * dim_, (part + 1) * dim_);
    return bf16_activations ? matmul_to_bf16(x, w, false, true, x_operand) : matmul(x, w, false, true, x_operand);
  };
  Shape heads_shape{batch, seq, heads_, dim_ / heads_};
  Tensor q = rope(reshape(project(0), heads_shape), rope_theta_);  // [B, T, H, Dh]
  Tensor k = rope(reshape(project(1), heads_shape), rope_theta_);
  Tensor v = reshape(project(2), heads_shape);
  Tensor y = causal_attention(q, k, v);                // [B, T, H, Dh]
  return wo.forward(reshape(y, {batch * seq, dim_}));  // [B*T, d]
}

}  // namespace moelab::nn
