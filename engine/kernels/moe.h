#pragma once
// The kernels behind the MoE ops (moe/dispatch.cpp: moe_experts and plan_dispatch; moe/router.cpp: route_gates).
// CPU: engine/cpu/moe.cpp; CUDA: engine/cuda/moe.cu. The steps (a)-(f) and their names are those of docs/moe.md.
// Sizes: N tokens, k choices per token, S = N*k slots (slot s = n*k + j), E experts, d model width, h expert hidden
// size. Index tensors are i32; float tensors are F (f32 or f64) and share one dtype.
#include <initializer_list>

#include "engine/error.h"
#include "engine/kernels.h"
#include "engine/precision.h"

namespace moelab {

// ---- the dispatch plan: (a) histogram, (b) prefix sum, (c) stable counting sort -------------------------------------
// (a) counts [E]: the slots of expert_ids [N, k] routed to each expert. Ids outside [0, E) are not counted: the op
// compares the total with S to find them (one host read of E integers), so the kernel needs no error channel.
DECLARE_KERNEL(moe_count_experts, (const Tensor& expert_ids, const Tensor& counts))
// (b) offsets [E+1]: offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e]; expert e owns positions
// [offsets[e], offsets[e+1]).
DECLARE_KERNEL(moe_expert_offsets, (const Tensor& counts, const Tensor& offsets))
// (c) Each slot goes to the next free position of its expert's segment, slots visited in order (stable: within an
// expert, slots keep their token-major order): position_of_slot [N, k]. Needs every id in [0, E).
DECLARE_KERNEL(moe_sort_slots, (const Tensor& expert_ids, const Tensor& offsets, const Tensor& position_of_slot))

// ---- (d) permute and its backward -----------------------------------------------------------------------------------
// x_sorted [S, d]: x_sorted[position_of_slot[n, j]] = x[n] for every token n and choice j, the rows of x [N, d] in
// expert order (each token's row read once, for its k positions). x_sorted has x's dtype, or is bf16 (x f32: each
// element rounded as it is copied, the experts' operand under mixed precision, in half the bytes).
DECLARE_KERNEL(moe_permute_rows, (const Tensor& x, const Tensor& position_of_slot, const Tensor& x_sorted))
// dx [N, d]: dx[n] = sum_j dx_sorted[position_of_slot[n, j]], j in order (each token gathers its own k rows: one
// writer per row, no atomics). dx_sorted has dx's dtype, or is bf16 (dx f32: the experts' input gradient under mixed
// precision, widened as it is read).
DECLARE_KERNEL(moe_unpermute_sum_rows, (const Tensor& dx_sorted, const Tensor& position_of_slot, const Tensor& dx))

// ---- (e) the SwiGLU activation, elementwise on [S, h] ---------------------------------------------------------------
// act = silu(gate_pre) * up_pre, silu(z) = z sigmoid(z). The three share a dtype: f32 or f64, or bf16 (the expert
// activations kept under Precision::BF16): then computed in f32 from the bf16 values and rounded to bf16.
DECLARE_KERNEL(moe_swiglu_forward, (const Tensor& gate_pre, const Tensor& up_pre, const Tensor& act))
// With s = sigmoid(gate_pre): d_up_pre = d_act * silu(gate_pre), d_gate_pre = d_act * up_pre * silu'(gate_pre),
// silu'(z) = s (1 + z (1 - s)). d_act is f32 or f64; gate_pre and up_pre have its dtype or bf16 (widened); d_gate_pre
// and d_up_pre have its dtype, or bf16 (computed in f32 and rounded: the operands of the next products). d_act may be
// d_gate_pre itself (in place: each element is read before it is written).
DECLARE_KERNEL(moe_swiglu_backward, (const Tensor& gate_pre, const Tensor& up_pre, const Tensor& d_act,
                                     const Tensor& d_gate_pre, const Tensor& d_up_pre))

// ---- (e) grouped SwiGLU: per expert e, on its rows [offsets[e], offsets[e+1]) of the sorted tensors -----------------
// w_gate, w_up [E, h, d], w_down [E, d, h]:
//   gate_pre = x_seg W_gate,e^T,  up_pre = x_seg W_up,e^T,  act = silu(gate_pre) * up_pre  [c_e, h]
//   out_sorted = act W_down,e^T                                                            [c_e, d]
// Experts with no rows cost nothing. offsets [E+1] are on the host (DispatchPlan::host_offsets): the grouped GEMMs'
// sizes, which the host needs to queue them.
// precision BF16 (f32 math only): every GEMM operand (x_sorted, the weights, act) is rounded to bf16 and the products
// accumulate in f32; x_sorted may be bf16 already (moe_permute_rows' rounded gather), and so may the weights
// (moe_experts passes bf16 copies: the parameters' own, engine/bf16_weights.h, or its rounding). gate_pre, up_pre and
// act, the activations the backward reads, are bf16 tensors: the gate and up products rounded as they are stored, act
// computed in f32 from those rounded values (so the backward's silu' sees the forward's inputs) and rounded, which is
// the down product's operand as it is; out_sorted is bf16 too, the down product rounded as it is stored (what the
// un-permute weights and its backward reads). The GPU multiplies bf16 copies; the CPU, its reference, multiplies f32
// copies holding the bf16 values with its f32 GEMM (bf16 x bf16 products are exact in f32).
DECLARE_KERNEL(moe_grouped_swiglu_forward,
               (const Tensor& x_sorted, const std::vector<int32_t>& offsets, const Tensor& w_gate, const Tensor& w_up,
                const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre, const Tensor& act,
                const Tensor& out_sorted, Precision precision))
// Backward of one segment, given d_out_sorted:
//   d_act = d_out W_down                            dW_down,e = d_out^T act
//   d_gate_pre, d_up_pre from d_act (moe_swiglu_backward)
//   dW_gate,e = d_gate_pre^T x_seg                  dW_up,e = d_up_pre^T x_seg
//   d_x_sorted = d_gate_pre W_gate,e + d_up_pre W_up,e
// d_act [S, h] is scratch of the kept dtype; d_gate_pre and d_up_pre live only inside the kernel, as the operands of
// the products that follow. Every element of dw_gate, dw_up, dw_down is written: an expert with no rows gets zero.
// offsets on the host, as in the forward.
// precision BF16, as the forward: gate_pre, up_pre and act are the forward's bf16 tensors; the operands (x_sorted,
// the weights, act, d_out_sorted, d_act, and d_gate_pre, d_up_pre once computed in f32) are bf16, with f32
// accumulation, and every product's f32 sum is rounded to bf16 once, as autocast's bf16 products round theirs: d_act
// and d_x_sorted are bf16 tensors (d_x_sorted's two products summed before the rounding), and so are the weight
// gradients (the f32 parameters' gradients in bf16, as autocast's bf16 products give them: optim::AdamW and grad_clip
// read them widened, and a second micro-batch's is added in f32). One bf16 -> bf16 type for every product is what
// lets the GPU run each as one grouped call at the bf16 rate (engine/cuda/moe.cu).
DECLARE_KERNEL(moe_grouped_swiglu_backward,
               (const Tensor& x_sorted, const std::vector<int32_t>& offsets, const Tensor& w_gate, const Tensor& w_up,
                const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre, const Tensor& act,
                const Tensor& d_out_sorted, const Tensor& d_act, const Tensor& d_x_sorted, const Tensor& dw_gate,
                const Tensor& dw_up, const Tensor& dw_down, Precision precision))

// The dtypes the grouped SwiGLU takes, checked by both devices before they read or write a byte (a wrong one would be
// misread). Under FP32 every tensor has the weights' dtype, f32 or f64. Under BF16 the math is f32: the `kept` tensors
// (gate_pre, up_pre, act, out_sorted, and the backward's d_act and d_x_sorted) are bf16, the `inputs` (x_sorted,
// d_out_sorted) f32 or bf16 (rounded already), the three weights f32 or bf16 (the parameters' bf16 copies,
// engine/bf16_weights.h), one dtype for the three, and the `others` (the weight gradients) bf16.
// Returns whether the products round to bf16.
struct NamedTensor {
  const char* name;
  const Tensor& tensor;
};
inline bool grouped_swiglu_rounds(Precision precision, std::initializer_list<NamedTensor> weights,
                                  std::initializer_list<NamedTensor> kept, std::initializer_list<NamedTensor> inputs,
                                  std::initializer_list<NamedTensor> others) {
  const bool bf16 = precision == Precision::BF16;
  const DType weight_dtype = weights.begin()->tensor.dtype();
  const bool weights_ok = bf16 ? weight_dtype == DType::F32 || weight_dtype == DType::BF16
                               : weight_dtype == DType::F32 || weight_dtype == DType::F64;
  if (!weights_ok)
    fail("moe_grouped_swiglu: the weights must be {} under {} precision, got {}", bf16 ? "f32 or bf16" : "f32 or f64",
         enum_name(precision), dtype_name(weight_dtype));
  const DType dtype = bf16 ? DType::F32 : weight_dtype;
  auto require = [&](const NamedTensor& t, DType want, bool or_bf16) {
    const DType got = t.tensor.dtype();
    if (got == want || (or_bf16 && got == DType::BF16)) return;
    fail("moe_grouped_swiglu: {} must be {}{} under {} precision, got {}", t.name, dtype_name(want),
         or_bf16 ? " or bf16" : "", enum_name(precision), dtype_name(got));
  };
  for (const NamedTensor& t : weights) require(t, weight_dtype, false);
  for (const NamedTensor& t : inputs) require(t, dtype, bf16);
  for (const NamedTensor& t : kept) require(t, bf16 ? DType::BF16 : dtype, false);
  for (const NamedTensor& t : others) require(t, bf16 ? DType::BF16 : dtype, false);
  return bf16;
}
// The dtype of the grouped SwiGLU's math and of its f32 or f64 tensors: f32 when it rounds, else the weights'.
inline DType grouped_swiglu_dtype(bool rounds, const Tensor& w_gate) { return rounds ? DType::F32 : w_gate.dtype(); }
// That check for each direction, in its kernel's arguments.
inline bool grouped_swiglu_forward_rounds(const Tensor& x_sorted, const Tensor& w_gate, const Tensor& w_up,
                                          const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre,
                                          const Tensor& act, const Tensor& out_sorted, Precision precision) {
  return grouped_swiglu_rounds(precision, {{"w_gate", w_gate}, {"w_up", w_up}, {"w_down", w_down}},
                               {{"gate_pre", gate_pre}, {"up_pre", up_pre}, {"act", act}, {"out_sorted", out_sorted}},
                               {{"x_sorted", x_sorted}}, {});
}
inline bool grouped_swiglu_backward_rounds(const Tensor& x_sorted, const Tensor& w_gate, const Tensor& w_up,
                                           const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre,
                                           const Tensor& act, const Tensor& d_out_sorted, const Tensor& d_act,
                                           const Tensor& d_x_sorted, const Tensor& dw_gate, const Tensor& dw_up,
                                           const Tensor& dw_down, Precision precision) {
  return grouped_swiglu_rounds(
      precision, {{"w_gate", w_gate}, {"w_up", w_up}, {"w_down", w_down}},
      {{"gate_pre", gate_pre}, {"up_pre", up_pre}, {"act", act}, {"d_act", d_act}, {"d_x_sorted", d_x_sorted}},
      {{"x_sorted", x_sorted}, {"d_out_sorted", d_out_sorted}},
      {{"dw_gate", dw_gate}, {"dw_up", dw_up}, {"dw_down", dw_down}});
}

// ---- (f) weighted un-permute and its backward -----------------------------------------------------------------------
// y [N, d]: y[n] = residual[n] + sum_j gates[n, j] * out_sorted[position_of_slot[n, j]], j in order, the residual
// (undefined: none, else [N, d]: the block's skip connection) added last, so y has the bits of a separate add.
// out_sorted has y's dtype, or is bf16 (y f32: the experts' kept output under mixed precision, widened as it is read;
// so too in the backward).
DECLARE_KERNEL(moe_weighted_unpermute, (const Tensor& out_sorted, const Tensor& gates, const Tensor& position_of_slot,
                                        const Tensor& residual, const Tensor& y))
// Per token n and choice j, slot s = n k + j at position pos = position_of_slot[n, j] (each token's dy row read once,
// for its k slots):
//   d_out_sorted[pos] = gates[s] * dy[n]                  d_gates[s] = <dy[n], out_sorted[pos]>
// d_out_sorted has dy's dtype, or is bf16 (dy f32): the product rounded, the experts' backward operand under mixed
// precision, in half the bytes.
// Each output element has one writer: no atomics, the same bits on every run.
DECLARE_KERNEL(moe_weighted_unpermute_backward,
               (const Tensor& dy, const Tensor& out_sorted, const Tensor& gates, const Tensor& position_of_slot,
                const Tensor& d_gates, const Tensor& d_out_sorted))

// ---- routing: top-k + gates -----------------------------------------------------------------------------------------
// probs [N, E] (finite: the router checked the logits). Per token n:
//   expert_ids[n] = the k most probable experts, descending, ties -> lower id first (topk's order: NaN first)
//   chosen_sum[n] = (F) sum_j probs[n, expert_ids[n, j]], accumulated in double in j order (the `sum` op's way)
//   gates[n, j]   = probs[n, expert_ids[n, j]] / chosen_sum[n]  when norm_topk, else probs[n, expert_ids[n, j]]
// The float operations are those of gather, sum(-1, keepdim) and div, in their order (bit-identical on the CPU).
DECLARE_KERNEL(route_gates_forward, (const Tensor& probs, bool norm_topk, const Tensor& expert_ids, const Tensor& gates,
                                     const Tensor& chosen_sum))
// dprobs [N, E] from g = dL/dgates [N, k]: zero except at the chosen experts, where (norm_topk, with S = chosen_sum[n]
// and y = gates)
//   gb_j = g_j / S,   db = (F) sum_j -(gb_j * y_j) (in double, j order),   dprobs[n, expert_ids[n, j]] = gb_j + db
// i.e. div's backward, sum's backward and gather's scatter, composed; without norm_topk dprobs[n, ids[n, j]] = g_j.
DECLARE_KERNEL(route_gates_backward, (const Tensor& g, const Tensor& expert_ids, const Tensor& gates,
                                      const Tensor& chosen_sum, bool norm_topk, const Tensor& dprobs))

}  // namespace moelab
