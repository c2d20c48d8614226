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
// (token n, choice j) pair, numbered n*k + j; its "position" is where the sort put it in expert order.
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace moelab::moe {

// Steps (a)-(c): the routing of N*k slots to E experts as index arrays. No tensors: pure bookkeeping, computed once
// in forward and kept for backward.
struct DispatchPlan {
  int64_t tokens = 0, top_k = 0, experts = 0;
  std::vector<int64_t> counts;            // [E]    slots routed to each expert
  std::vector<int64_t> offsets;           // [E+1]  expert e owns positions [offsets[e], offsets[e+1])
  std::vector<int32_t> slot_at_position;  // [N*k]  the sorted order: position -> slot (token = slot / k)
  std::vector<int32_t> position_of_slot;  // [N*k]  its inverse: slot -> position
};

// Builds the plan from expert_ids (i32 [N, k], each in [0, n_experts); throws naming a bad id and its place).
// Deterministic: within an expert, slots keep their original (token-major) order.
DispatchPlan plan_dispatch(const Tensor& expert_ids, int64_t n_experts);

// y[n] = sum_j gates[n,j] * SwiGLU_{ids[n,j]}(x[n]),  SwiGLU_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x)).
//   x        [N, d]       f32 or f64 (f64 is for gradient checks)
//   expert_ids i32 [N, k] no gradient
//   gates    [N, k]       differentiable
//   w_gate   [E, h, d],  w_up [E, h, d],  w_down [E, d, h]
// Returns y [N, d]; gradients flow to x, gates and the three weight tensors. Every slot is computed (dropless);
// experts with no tokens cost nothing and get a zero weight gradient. Same inputs -> bit-identical outputs and
// gradients for any thread count.
Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                   const Tensor& w_up, const Tensor& w_down);

}  // namespace moelab::moe
