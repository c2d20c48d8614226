#pragma once
// The transformer's building blocks. Shapes: N = B*T tokens, d = model width.
#include <string>
#include <vector>

#include "engine/ops.h"
#include "nn/module.h"

namespace moelab::nn {

// The position-wise half of a transformer block: a dense SwiGLU or a mixture of experts.
class FeedForward : public Module {
 public:
  virtual Tensor forward(const Tensor& x) = 0;  // [N, d] -> [N, d]
  // residual + forward(x), the block's skip connection: a layer that can add it in a pass of its own overrides this
  // (the MoE layer, in its weighted un-permute), saving the add's reads and write.
  virtual Tensor forward_plus(const Tensor& x, const Tensor& residual) { return residual + forward(x); }
};

// y = x W^T, W [out, in], no bias. Init normal(0, std).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, Generator& gen, double std);
  Tensor forward(const Tensor& x) const { return matmul(x, weight, false, true); }  // [N, in] -> [N, out]
  Tensor weight;  // [out, in]
};

// Rows of a table: ids [...] -> [..., d].
class Embedding : public Module {
 public:
  Embedding(int64_t vocab_size, int64_t dim, Generator& gen, double std);
  Tensor forward(const Tensor& ids) const { return embedding(weight, ids); }
  Tensor weight;  // [V, d]
};

// y = x / sqrt(mean(x^2) + eps) * weight; weight starts at ones.
class RMSNorm : public Module {
 public:
  RMSNorm(int64_t dim, double eps);
  Tensor forward(const Tensor& x) const { return rms_norm(x, weight, eps_); }
  // forward(x) as the input of products: under mixed precision (Precision::BF16, f32 x) rounded to bf16 as it is
  // written, the operand they would round it to (rms_norm_to_bf16), else forward(x).
  Tensor forward_operand(const Tensor& x) const;
  Tensor weight;  // [d]

 private:
  double eps_;
};

// y = W_down (silu(W_gate x) * (W_up x)). Checkpoint names w_gate, w_up, w_down (2-D, no ".weight").
class SwiGLU : public FeedForward {
 public:
  SwiGLU(int64_t dim, int64_t hidden, Generator& gen, double std, double down_std);
  Tensor forward(const Tensor& x) override;  // [N, d] -> [N, d]
  Tensor w_gate, w_up;  // [h, d]
  Tensor w_down;        // [d, h]
};

// Causal multi-head self-attention with RoPE: q, k, v = x W_q^T, x W_k^T, x W_v^T (row blocks of W_qkv), rotate q and
// k, softmax(q k^T / sqrt(Dh)) v, W_o. x is f32, or bf16 (the block's norm output under mixed precision).
class CausalSelfAttention : public Module {
 public:
  CausalSelfAttention(int64_t dim, int64_t heads, double rope_theta, Generator& gen, double std, double out_std);
  Tensor forward(const Tensor& x, int64_t batch, int64_t seq) const;  // [B*T, d] -> [B*T, d]
  Linear wqkv;  // [3d, d]: rows are q, then k, then v
  Linear wo;    // [d, d]

 private:
  int64_t dim_, heads_;
  double rope_theta_;
};

}  // namespace moelab::nn
