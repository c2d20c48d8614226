// The fused MoE expert op: forward steps (a)-(f) of dispatch.h, then the backward steps under them. The numbers come
// from the kernels of engine/kernels/moe.h (engine/cpu/moe.cpp, engine/cuda/moe.cu); this file checks, allocates on
// the inputs' device, and records.
//
// Shapes: N tokens, k choices per token, S = N*k slots, d model width, h expert hidden size, E experts.
// Saved for backward (S*(3h + 2d) floats, all bf16 under mixed precision, plus the plan's S + 2*E + 1 integers):
//   x_sorted         [S, d]   the experts' inputs in sorted order (dW_gate = d(gate)^T x, dW_up = d(up)^T x)
//   gate_pre, up_pre [S, h]   pre-activations W_gate x, W_up x in sorted order (silu' needs gate_pre, d(gate) needs up)
//   act              [S, h]   silu(gate_pre) * up_pre, the input of W_down (dW_down = d(out)^T act)
//   out_sorted       [S, d]   each slot's expert output before gating (d(gates) = <dy, out>)
//   the weights as the products multiply them: under mixed precision bf16 copies, which are the parameters' own
//   (engine/bf16_weights.h) when the precision guard holds them, else made here once for forward and backward
// Backward's own scratch, freed when it returns: d_out_sorted, d_x_sorted [S, d] (bf16 under mixed precision, as
// x_sorted); d_act [S, h] (and the kernel's d_gate_pre, d_up_pre).
#include "moe/dispatch.h"

#include <numeric>
#include <vector>

#include "engine/kernels/moe.h"
#include "engine/ops.h"

namespace moelab::moe {

namespace {

// ---- checks ---------------------------------------------------------------------------------------------------------

struct Dims {
  int64_t tokens, top_k, dim, hidden, experts;
};

Dims check_inputs(const Tensor& x, const Tensor& ids, const Tensor& gates, const Tensor& w_gate, const Tensor& w_up,
                  const Tensor& w_down) {
  const Tensor* all[] = {&x, &ids, &gates, &w_gate, &w_up, &w_down};
  for (const Tensor* t : all)
    if (!t->defined()) fail("moe_experts: undefined input tensor");
  for (const Tensor* t : all)
    if (t->device() != x.device())
      fail("moe_experts: all inputs must be on x's device ({}), got {}", x.str(), t->str());
  if (x.dtype() != DType::F32 && x.dtype() != DType::F64) fail("moe_experts: x must be f32 or f64, got {}", x.str());
  for (const Tensor* t : {&gates, &w_gate, &w_up, &w_down})
    if (t->dtype() != x.dtype())
      fail("moe_experts: all float inputs must share x's dtype ({}), got {}", x.str(), t->str());
  if (ids.dtype() != DType::I32) fail("moe_experts: expert_ids must be i32, got {}", ids.str());
  if (x.dim() != 2) fail("moe_experts: x must be [N, d], got {}", x.str());
  if (w_gate.dim() != 3) fail("moe_experts: w_gate must be [E, h, d], got {}", w_gate.str());
  Dims dims{x.size(0), ids.dim() == 2 ? ids.size(1) : 0, x.size(1), w_gate.size(1), w_gate.size(0)};
  if (ids.dim() != 2 || ids.size(0) != dims.tokens)
    fail("moe_experts: expert_ids must be [N = {}, k], got {}", dims.tokens, ids.str());
  if (gates.shape() != ids.shape())
    fail("moe_experts: gates must be [N, k] like expert_ids {}, got {}", ids.str(), gates.str());
  if (w_gate.size(2) != dims.dim)
    fail("moe_experts: w_gate {} must be [E, h, d] with d = {} (x is {})", w_gate.str(), dims.dim, x.str());
  if (w_up.shape() != w_gate.shape())
    fail("moe_experts: w_up {} must have w_gate's shape {}", w_up.str(), w_gate.str());
  if (w_down.shape() != Shape{dims.experts, dims.dim, dims.hidden})
    fail("moe_experts: w_down must be [E, d, h] = [{}, {}, {}], got {}", dims.experts, dims.dim, dims.hidden,
         w_down.str());
  return dims;
}

// Every id is in [0, E) exactly when the counts, which leave the others out, add up to S. Only when they do not are
// the ids read, to name the first bad one.
void check_expert_ids(const Tensor& expert_ids, const std::vector<int32_t>& counts) {
  if (std::accumulate(counts.begin(), counts.end(), int64_t(0)) == expert_ids.numel()) return;
  const std::vector<int32_t> ids = expert_ids.to_vector<int32_t>();
  const int64_t n_experts = static_cast<int64_t>(counts.size()), k = expert_ids.size(1);
  for (size_t s = 0; s < ids.size(); ++s)
    if (ids[s] < 0 || ids[s] >= n_experts)
      fail("moe_experts: expert id {} at (token {}, choice {}) of {} is out of range [0, {})", ids[s], s / k, s % k,
           expert_ids.str(), n_experts);
}

// ---- backward -------------------------------------------------------------------------------------------------------

// What forward keeps for backward (see the top of this file).
struct Saved {
  DispatchPlan plan;
  Tensor gates;                           // detached (the caller holds it anyway); x's dtype (check_inputs)
  Tensor w_gate, w_up, w_down;            // the products' weights: the inputs detached, or under BF16 bf16 copies
  Tensor x_sorted, out_sorted;            // [S, d]
  Tensor gate_pre, up_pre, act;           // [S, h]
  Precision precision;                    // of the products (engine/precision.h), read once in forward
};

// The steps in reverse; returns the gradients of (x, expert_ids, gates, w_gate, w_up, w_down, residual).
std::vector<Tensor> moe_experts_backward(const Saved& saved, const Tensor& dy) {
  const DispatchPlan& plan = saved.plan;
  const int64_t h = saved.w_gate.size(1), d = saved.w_gate.size(2), slots = plan.tokens * plan.top_k;
  const DType dtype = saved.gates.dtype();  // x's, f32 or f64
  const Device device = saved.w_gate.device();
  auto empty = [&](const Shape& shape) { return Tensor::empty(shape, dtype, device); };

  // (f) backward: gate gradients and the per-slot output gradient in sorted order.
  Tensor d_gates = empty({plan.tokens, plan.top_k});  // [N, k]
  Tensor d_out_sorted = Tensor::empty({slots, d}, saved.x_sorted.dtype(), device);  // [S, d], an operand as x_sorted
  KERNEL(moe_weighted_unpermute_backward, device)
  (dy, saved.out_sorted, saved.gates, plan.position_of_slot, d_gates, d_out_sorted);

  // (e) backward: weight gradients per expert (bf16 under BF16, the products' sums rounded once, as autocast's) and the
  // input gradient per slot.
  const DType dw_dtype = saved.precision == Precision::BF16 ? DType::BF16 : dtype;
  Tensor dw_gate = Tensor::empty(saved.w_gate.shape(), dw_dtype, device);
  Tensor dw_up = Tensor::empty(saved.w_up.shape(), dw_dtype, device);
  Tensor dw_down = Tensor::empty(saved.w_down.shape(), dw_dtype, device);
  Tensor d_act = Tensor::empty({slots, h}, saved.act.dtype(), device);            // [S, h], bf16 as act
  Tensor d_x_sorted = Tensor::empty({slots, d}, saved.x_sorted.dtype(), device);  // [S, d], bf16 as x_sorted
  KERNEL(moe_grouped_swiglu_backward, device)
  (saved.x_sorted, plan.host_offsets, saved.w_gate, saved.w_up, saved.w_down, saved.gate_pre, saved.up_pre, saved.act,
   d_out_sorted, d_act, d_x_sorted, dw_gate, dw_up, dw_down, saved.precision);

  // (d) backward: each token sums its k slots' input gradients.
  Tensor dx = empty({plan.tokens, d});  // [N, d]
  KERNEL(moe_unpermute_sum_rows, device)(d_x_sorted, plan.position_of_slot, dx);
  return {dx, Tensor(), d_gates, dw_gate, dw_up, dw_down, dy};
}

}  // namespace

DispatchPlan plan_dispatch(const Tensor& expert_ids, int64_t n_experts) {
  if (!expert_ids.defined() || expert_ids.dtype() != DType::I32 || expert_ids.dim() != 2)
    fail("plan_dispatch: expert_ids must be an i32 [N, k] tensor, got {}",
         expert_ids.defined() ? expert_ids.str() : "undefined");
  if (n_experts <= 0) fail("plan_dispatch: n_experts must be > 0, got {}", n_experts);
  if (expert_ids.numel() > INT32_MAX)
    fail("plan_dispatch: {} slots ({}) do not fit i32 positions", expert_ids.numel(), expert_ids.str());
  const Device device = expert_ids.device();
  DispatchPlan plan;
  plan.tokens = expert_ids.size(0);
  plan.top_k = expert_ids.size(1);
  plan.experts = n_experts;
  plan.counts = Tensor::empty({n_experts}, DType::I32, device);
  KERNEL(moe_count_experts, device)(expert_ids, plan.counts);  // (a)
  const std::vector<int32_t> counts = plan.counts.to_vector<int32_t>();  // the host's one read
  check_expert_ids(expert_ids, counts);
  plan.host_offsets.assign(1, 0);
  for (int32_t c : counts) plan.host_offsets.push_back(plan.host_offsets.back() + c);
  plan.offsets = Tensor::empty({n_experts + 1}, DType::I32, device);
  KERNEL(moe_expert_offsets, device)(plan.counts, plan.offsets);  // (b)
  plan.position_of_slot = Tensor::empty(expert_ids.shape(), DType::I32, device);
  KERNEL(moe_sort_slots, device)(expert_ids, plan.offsets, plan.position_of_slot);  // (c)
  return plan;
}

Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                   const Tensor& w_up, const Tensor& w_down) {
  Tensor expert_counts;
  return moe_experts(x, expert_ids, gates, w_gate, w_up, w_down, Tensor(), expert_counts);
}

Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                   const Tensor& w_up, const Tensor& w_down, const Tensor& residual, Tensor& expert_counts) {
  const Dims dims = check_inputs(x, expert_ids, gates, w_gate, w_up, w_down);
  if (residual.defined() &&
      (residual.shape() != x.shape() || residual.dtype() != x.dtype() || residual.device() != x.device()))
    fail("moe_experts: residual must be like x ({}), got {}", x.str(), residual.str());
  const int64_t d = dims.dim, h = dims.hidden, slots = dims.tokens * dims.top_k;
  const DType dtype = x.dtype();
  const Device device = x.device();
  auto empty = [&](const Shape& shape) { return Tensor::empty(shape, dtype, device); };

  Saved saved;
  saved.precision = dtype == DType::F32 ? product_precision() : Precision::FP32;  // f64 is never rounded
  saved.plan = plan_dispatch(expert_ids, dims.experts);                           // (a)-(c)
  const DispatchPlan& plan = saved.plan;
  expert_counts = plan.counts;
  // The experts' inputs, the activations backward reads and the experts' outputs: bf16 under mixed precision (half
  // the bytes; moe_permute_rows, moe_grouped_swiglu_forward).
  const DType kept = saved.precision == Precision::BF16 ? DType::BF16 : dtype;
  saved.gate_pre = Tensor::empty({slots, h}, kept, device);
  saved.up_pre = Tensor::empty({slots, h}, kept, device);
  saved.act = Tensor::empty({slots, h}, kept, device);
  saved.out_sorted = Tensor::empty({slots, d}, kept, device);
  // Kept rather than gathered again in backward: a bf16 copy held costs less than reading x and writing it again.
  saved.x_sorted = Tensor::empty({slots, d}, kept, device);
  Tensor y = empty({dims.tokens, d});                                                      // [N, d]
  // The weights as the products multiply them, for the forward and the backward: under BF16 their bf16 copies, the
  // parameters' own where the precision guard holds them (rounded by the optimizer's update, not here).
  auto weight_operand = [&](const Tensor& w) {
    return saved.precision == Precision::BF16 ? product_operand(w) : w.detach();
  };
  saved.w_gate = weight_operand(w_gate), saved.w_up = weight_operand(w_up), saved.w_down = weight_operand(w_down);
  KERNEL(moe_permute_rows, device)(x, plan.position_of_slot, saved.x_sorted);  // (d)
  KERNEL(moe_grouped_swiglu_forward, device)
  (saved.x_sorted, plan.host_offsets, saved.w_gate, saved.w_up, saved.w_down, saved.gate_pre, saved.up_pre, saved.act,
   saved.out_sorted, saved.precision);                                                                  // (e)
  KERNEL(moe_weighted_unpermute, device)(saved.out_sorted, gates, plan.position_of_slot, residual, y);  // (f)

  saved.gates = gates.detach();
  return record("moe_experts", y, {x, expert_ids, gates, w_gate, w_up, w_down, residual},
                [saved = std::move(saved)](const Tensor& dy) { return moe_experts_backward(saved, dy); });
}

}  // namespace moelab::moe
