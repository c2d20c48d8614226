#pragma once
// Dropless top-k expert dispatch as ONE fused autograd op, written as MegaBlocks-style named steps:
//
//   (a) histogram      tokens per expert                        counts  [E]
//   (b) prefix sum     where each expert's segment starts        offsets [E+1]
//   (c) sort           the N*k token slots by expert (stable counting sort, from (a) and (b))
//   (d) permute        gather x rows into expert-contiguous order           x_sorted   [N*k, d]
//   (e) grouped SwiGLU per expert, GEMMs on its contiguous segment          out_sorted [N*k, d]
//   (f) un-permute     y[n] = sum_j gates[n,j] * out_sorted[pos(n,j)]       y          [N, d]
//
// and the backward runs the same steps in reverse (see dispatch.cpp and docs/moe.md). Terms: a "slot" is one
// (token n, choice j) pair, numbered n*k + j; its "position" is where the sort put it in expert order. Each step is a
// kernel of engine/kernels/moe.h, on the CPU or the GPU as the inputs live.
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace moelab::moe {

// Steps (a)-(c): the routing of S = N*k slots to E experts as i32 tensors on expert_ids' device. Computed once in
// forward and kept for backward.
struct DispatchPlan {
  int64_t tokens = 0, top_k = 0, experts = 0;
  Tensor counts;            // i32 [E]    slots routed to each expert
  Tensor offsets;           // i32 [E+1]  expert e owns positions [offsets[e], offsets[e+1])
  std::vector<int32_t> host_offsets;  // the same on the host: the grouped products' sizes, for forward and backward
  Tensor position_of_slot;            // i32 [N, k] the sorted order: slot n*k + j -> its position
};

// Builds the plan from expert_ids (i32 [N, k], each in [0, n_experts); throws naming a bad id and its place).
// Deterministic: within an expert, slots keep their original (token-major) order. Reads the E counts on the host (to
// check the ids, and for host_offsets): on a GPU, the one wait for the device of a MoE layer's forward and backward.
// The ids themselves come over only when one is bad.
DispatchPlan plan_dispatch(const Tensor& expert_ids, int64_t n_experts);

// y[n] = sum_j gates[n,j] * SwiGLU_{ids[n,j]}(x[n]),  SwiGLU_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x)).
//   x        [N, d]       f32 or f64 (f64 is for gradient checks)
//   expert_ids i32 [N, k] no gradient
//   gates    [N, k]       differentiable
//   w_gate   [E, h, d],  w_up [E, h, d],  w_down [E, d, h]
// All on one device. Returns y [N, d]; gradients flow to x, gates and the three weight tensors. Every slot is computed
// (dropless); experts with no tokens cost nothing and get a zero weight gradient. Same inputs -> bit-identical
// outputs and gradients for any thread count. Under Precision::BF16 (engine/precision.h) the f32 experts' products
// multiply bf16 roundings of their operands with f32 accumulation, forward and backward, and the experts' inputs and
// the activations backward reads are kept in bf16 (the gate and up products rounded; docs/moe.md "Memory").
Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                   const Tensor& w_up, const Tensor& w_down);
// residual + the same, residual [N, d] (x's dtype and device; undefined: none) being the block's skip connection,
// added in the un-permute's pass instead of by an add of its own; residual's gradient is dy. expert_counts receives
// the dispatch's histogram (DispatchPlan::counts, i32 [E]).
Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                   const Tensor& w_up, const Tensor& w_down, const Tensor& residual, Tensor& expert_counts);

}  // namespace moelab::moe
