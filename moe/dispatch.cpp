// The fused MoE expert op: forward steps (a)-(f) of dispatch.h, then the backward steps under them.
//
// Shapes: N tokens, k choices per token, S = N*k slots, d model width, h expert hidden size, E experts.
// Saved for backward (S*(3h + d) floats, plus the plan's 2*S + 2*E + 1 integers):
//   gate_pre, up_pre [S, h]   pre-activations W_gate x, W_up x in sorted order (silu' needs gate_pre, d(gate) needs up)
//   act              [S, h]   silu(gate_pre) * up_pre, the input of W_down (dW_down = d(out)^T act)
//   out_sorted       [S, d]   each slot's expert output before gating (d(gates) = <dy, out>)
// x_sorted [S, d] is NOT saved: backward re-gathers it from x (a row copy, cheap next to the GEMMs).
// Backward's own scratch, freed when it returns: x_sorted, d_out_sorted, d_x_sorted [S, d];
// d_gate_pre, d_up_pre [S, h].
// Determinism: the sort is a stable counting sort, every output row has exactly one writer, and every sum over a
// token's k slots runs in j order, so results do not depend on thread count or scheduling (no atomics anywhere).
#include "moe/dispatch.h"

#include <fmt/format.h>
#include <omp.h>

#include <cmath>
#include <memory>
#include <stdexcept>

#include "engine/cpu/gemm.h"
#include "engine/cpu/math.h"
#include "engine/cpu/parallel.h"
#include "engine/ops.h"

namespace moelab::moe {

namespace {

using cpu::gemm;

// Runs expert_fn(e) for every expert that received tokens. Experts run side by side (one thread each; sgemm stays
// single-threaded inside a parallel region) when there are enough of them to keep every thread busy; otherwise one
// at a time, each GEMM using all threads. Either way each expert writes only its own rows and weight slices.
template <class F> void for_each_expert(const DispatchPlan& plan, F expert_fn) {
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < plan.experts; ++e)
    if (plan.counts[e] > 0) busy.push_back(e);
  int64_t n_busy = static_cast<int64_t>(busy.size());
  bool side_by_side = n_busy >= 2 * omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) if (side_by_side)
  for (int64_t i = 0; i < n_busy; ++i) expert_fn(busy[i]);
}

// ---- checks ---------------------------------------------------------------------------------------------------------

struct Dims {
  int64_t tokens, top_k, dim, hidden, experts;
};

Dims check_inputs(const Tensor& x, const Tensor& ids, const Tensor& gates, const Tensor& w_gate, const Tensor& w_up,
                  const Tensor& w_down) {
  const Tensor* all[] = {&x, &ids, &gates, &w_gate, &w_up, &w_down};
  for (const Tensor* t : all) {
    if (!t->defined()) fail("moe_experts: undefined input tensor");
    if (t->is_cuda()) fail("moe_experts: no CUDA kernel in this build for input {}", t->str());
  }
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
  if (dims.tokens * dims.top_k > INT32_MAX)
    fail("moe_experts: {} slots do not fit i32 positions", dims.tokens * dims.top_k);
  return dims;
}

// ---- (a) histogram, (b) prefix sum, (c) stable counting sort --------------------------------------------------------

std::vector<int64_t> histogram_experts(const int32_t* ids, int64_t slots, int64_t n_experts, const Tensor& ids_tensor) {
  std::vector<int64_t> counts(n_experts, 0);
  for (int64_t s = 0; s < slots; ++s) {
    int32_t e = ids[s];
    if (e < 0 || e >= n_experts)
      fail("moe_experts: expert id {} at (token {}, choice {}) of {} is out of range [0, {})", e,
           s / ids_tensor.size(1), s % ids_tensor.size(1), ids_tensor.str(), n_experts);
    ++counts[e];
  }
  return counts;
}

std::vector<int64_t> prefix_sum_offsets(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) offsets[e + 1] = offsets[e] + counts[e];
  return offsets;
}

// Each slot goes to the next free position of its expert's segment, visiting slots in order: stable.
void sort_slots_by_expert(const int32_t* ids, DispatchPlan& plan) {
  int64_t slots = plan.tokens * plan.top_k;
  std::vector<int64_t> next(plan.offsets.begin(), plan.offsets.end() - 1);
  plan.slot_at_position.resize(slots);
  plan.position_of_slot.resize(slots);
  for (int64_t s = 0; s < slots; ++s) {
    int64_t pos = next[ids[s]]++;
    plan.slot_at_position[pos] = static_cast<int32_t>(s);
    plan.position_of_slot[s] = static_cast<int32_t>(pos);
  }
}

// ---- (d) permute and its backward, the segmented reduction ----------------------------------------------------------

// x_sorted[pos] = x[token of slot_at_position[pos]]  ([S, d])
template <class T> void permute_rows(const DispatchPlan& plan, const T* x, int64_t d, T* x_sorted) {
  int64_t slots = plan.tokens * plan.top_k;
  cpu::parallel_for(slots, d, [&](int64_t pos) {
    const T* src = x + (plan.slot_at_position[pos] / plan.top_k) * d;
    std::copy(src, src + d, x_sorted + pos * d);
  });
}

// dx[n] = sum_j dx_sorted[position_of_slot[n*k + j]]: each token gathers its own k rows (one writer per row).
template <class T> void unpermute_sum_rows(const DispatchPlan& plan, const T* dx_sorted, int64_t d, T* dx) {
  cpu::parallel_for(plan.tokens, plan.top_k * d, [&](int64_t n) {
    T* out = dx + n * d;
    std::fill(out, out + d, T(0));
    for (int64_t j = 0; j < plan.top_k; ++j) {
      const T* row = dx_sorted + plan.position_of_slot[n * plan.top_k + j] * d;
      for (int64_t i = 0; i < d; ++i) out[i] += row[i];
    }
  });
}

// ---- (e) grouped SwiGLU ---------------------------------------------------------------------------------------------

// For expert e's segment of c rows: gate_pre = x W_gate^T, up_pre = x W_up^T, act = silu(gate_pre) * up_pre,
// out = act W_down^T.
template <class T>
void grouped_swiglu_forward(const DispatchPlan& plan, int64_t d, int64_t h, const T* x_sorted, const T* w_gate,
                            const T* w_up, const T* w_down, T* gate_pre, T* up_pre, T* act, T* out_sorted) {
  for_each_expert(plan, [&](int64_t e) {
    int64_t begin = plan.offsets[e], c = plan.counts[e];
    const T* xs = x_sorted + begin * d;  // [c, d]
    T* gp = gate_pre + begin * h;        // [c, h]
    T* up = up_pre + begin * h;          // [c, h]
    T* a = act + begin * h;              // [c, h]
    gemm(false, true, c, h, d, xs, d, w_gate + e * h * d, d, T(0), gp, h);
    gemm(false, true, c, h, d, xs, d, w_up + e * h * d, d, T(0), up, h);
    for (int64_t i = 0; i < c * h; ++i) a[i] = gp[i] * cpu::sigmoid(gp[i]) * up[i];
    gemm(false, true, c, d, h, a, h, w_down + e * d * h, h, T(0), out_sorted + begin * d, d);
  });
}

// Backward of one segment, given d_out [c, d]:
//   d_act = d_out W_down                      dW_down = d_out^T act
//   d_gate_pre = d_act * up * silu'(gate_pre)  d_up_pre = d_act * silu(gate_pre)
//   dW_gate = d_gate_pre^T x                  dW_up = d_up_pre^T x
//   d_x = d_gate_pre W_gate + d_up_pre W_up
// Experts with no tokens keep the zero their weight gradients start from.
template <class T>
void grouped_swiglu_backward(const DispatchPlan& plan, int64_t d, int64_t h, const T* x_sorted, const T* w_gate,
                             const T* w_up, const T* w_down, const T* gate_pre, const T* up_pre, const T* act,
                             const T* d_out_sorted, T* d_gate_pre, T* d_up_pre, T* d_x_sorted, T* dw_gate, T* dw_up,
                             T* dw_down) {
  for_each_expert(plan, [&](int64_t e) {
    int64_t begin = plan.offsets[e], c = plan.counts[e];
    const T* xs = x_sorted + begin * d;        // [c, d]
    const T* dout = d_out_sorted + begin * d;  // [c, d]
    const T* gp = gate_pre + begin * h;        // [c, h]
    const T* up = up_pre + begin * h;          // [c, h]
    T* d_gate = d_gate_pre + begin * h;        // [c, h], holds d_act first
    T* d_up = d_up_pre + begin * h;            // [c, h]
    gemm(false, false, c, h, d, dout, d, w_down + e * d * h, h, T(0), d_gate, h);
    gemm(true, false, d, h, c, dout, d, act + begin * h, h, T(0), dw_down + e * d * h, h);
    for (int64_t i = 0; i < c * h; ++i) {
      T s = cpu::sigmoid(gp[i]), d_act = d_gate[i];
      d_up[i] = d_act * gp[i] * s;
      d_gate[i] = d_act * up[i] * s * (1 + gp[i] * (1 - s));  // silu'(z) = s (1 + z (1 - s))
    }
    gemm(true, false, h, d, c, d_gate, h, xs, d, T(0), dw_gate + e * h * d, d);
    gemm(true, false, h, d, c, d_up, h, xs, d, T(0), dw_up + e * h * d, d);
    T* dxs = d_x_sorted + begin * d;
    gemm(false, false, c, d, h, d_gate, h, w_gate + e * h * d, d, T(0), dxs, d);
    gemm(false, false, c, d, h, d_up, h, w_up + e * h * d, d, T(1), dxs, d);
  });
}

// ---- (f) weighted un-permute and its backward ----------------------------------------------------------------------

// y[n] = sum_j g[n,j] * out_sorted[position_of_slot[n*k + j]]  (j in order: deterministic)
template <class T>
void weighted_unpermute(const DispatchPlan& plan, const T* out_sorted, const T* gates, int64_t d, T* y) {
  int64_t k = plan.top_k;
  cpu::parallel_for(plan.tokens, k * d, [&](int64_t n) {
    T* out = y + n * d;
    std::fill(out, out + d, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const T* row = out_sorted + plan.position_of_slot[n * k + j] * d;
      T g = gates[n * k + j];
      for (int64_t i = 0; i < d; ++i) out[i] += g * row[i];
    }
  });
}

// One pass over positions, each owned by one slot s (token n = s / k):
//   d_out_sorted[pos] = g[s] * dy[n]  (a gather, no atomics)     d_gates[s] = <dy[n], out_sorted[pos]>
template <class T>
void weighted_unpermute_backward(const DispatchPlan& plan, const T* dy, const T* out_sorted, const T* gates, int64_t d,
                                 T* d_gates, T* d_out_sorted) {
  int64_t k = plan.top_k, slots = plan.tokens * k;
  cpu::parallel_for(slots, 2 * d, [&](int64_t pos) {
    int64_t s = plan.slot_at_position[pos];
    const T* dy_row = dy + (s / k) * d;
    const T* out_row = out_sorted + pos * d;
    T* d_out_row = d_out_sorted + pos * d;
    T g = gates[s], dot = 0;
    for (int64_t i = 0; i < d; ++i) {
      d_out_row[i] = g * dy_row[i];
      dot += dy_row[i] * out_row[i];
    }
    d_gates[s] = dot;
  });
}

// What forward keeps for backward (see the top of this file).
struct Saved {
  std::shared_ptr<const DispatchPlan> plan;
  Tensor x, gates, w_gate, w_up, w_down;  // detached inputs (the caller holds them anyway)
  Tensor gate_pre, up_pre, act;           // [S, h]
  Tensor out_sorted;                      // [S, d]
};

template <class T> std::vector<Tensor> moe_experts_backward(const Saved& saved, const Tensor& dy_in, const Dims& dims) {
  const DispatchPlan& plan = *saved.plan;
  int64_t d = dims.dim, h = dims.hidden, slots = dims.tokens * dims.top_k;
  DType dtype = saved.x.dtype();
  const T* dy = dy_in.data<T>();

  // (f) backward: gate gradients and the per-slot output gradient in sorted order.
  Tensor d_gates = Tensor::empty({dims.tokens, dims.top_k}, dtype);  // [N, k]
  Tensor d_out_sorted = Tensor::empty({slots, d}, dtype);            // [S, d]
  weighted_unpermute_backward(plan, dy, saved.out_sorted.data<T>(), saved.gates.data<T>(), d, d_gates.data<T>(),
                              d_out_sorted.data<T>());

  // (d) again: the expert inputs, re-gathered rather than saved.
  Tensor x_sorted = Tensor::empty({slots, d}, dtype);  // [S, d]
  permute_rows(plan, saved.x.data<T>(), d, x_sorted.data<T>());

  // (e) backward: weight gradients per expert and the input gradient per slot.
  Tensor dw_gate = zeros(saved.w_gate.shape(), dtype), dw_up = zeros(saved.w_up.shape(), dtype);
  Tensor dw_down = zeros(saved.w_down.shape(), dtype);
  Tensor d_gate_pre = Tensor::empty({slots, h}, dtype), d_up_pre = Tensor::empty({slots, h}, dtype);  // [S, h]
  Tensor d_x_sorted = Tensor::empty({slots, d}, dtype);                                               // [S, d]
  grouped_swiglu_backward(plan, d, h, x_sorted.data<T>(), saved.w_gate.data<T>(), saved.w_up.data<T>(),
                          saved.w_down.data<T>(), saved.gate_pre.data<T>(), saved.up_pre.data<T>(),
                          saved.act.data<T>(), d_out_sorted.data<T>(), d_gate_pre.data<T>(), d_up_pre.data<T>(),
                          d_x_sorted.data<T>(), dw_gate.data<T>(), dw_up.data<T>(), dw_down.data<T>());

  // (d) backward: each token sums its k slots' input gradients.
  Tensor dx = Tensor::empty({dims.tokens, d}, dtype);  // [N, d]
  unpermute_sum_rows(plan, d_x_sorted.data<T>(), d, dx.data<T>());
  return {dx, Tensor(), d_gates, dw_gate, dw_up, dw_down};
}

}  // namespace

DispatchPlan plan_dispatch(const Tensor& expert_ids, int64_t n_experts) {
  if (!expert_ids.defined() || expert_ids.dtype() != DType::I32 || expert_ids.dim() != 2 || expert_ids.is_cuda())
    fail("plan_dispatch: expert_ids must be a CPU i32 [N, k] tensor, got {}",
         expert_ids.defined() ? expert_ids.str() : "undefined");
  if (n_experts <= 0) fail("plan_dispatch: n_experts must be > 0, got {}", n_experts);
  DispatchPlan plan;
  plan.tokens = expert_ids.size(0);
  plan.top_k = expert_ids.size(1);
  plan.experts = n_experts;
  const int32_t* ids = expert_ids.data<int32_t>();
  plan.counts = histogram_experts(ids, plan.tokens * plan.top_k, n_experts, expert_ids);  // (a)
  plan.offsets = prefix_sum_offsets(plan.counts);                                         // (b)
  sort_slots_by_expert(ids, plan);                                                        // (c)
  return plan;
}

Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                   const Tensor& w_up, const Tensor& w_down) {
  Dims dims = check_inputs(x, expert_ids, gates, w_gate, w_up, w_down);
  int64_t d = dims.dim, h = dims.hidden, slots = dims.tokens * dims.top_k;
  DType dtype = x.dtype();

  Saved saved;
  saved.plan = std::make_shared<const DispatchPlan>(plan_dispatch(expert_ids, dims.experts));  // (a)-(c)
  saved.gate_pre = Tensor::empty({slots, h}, dtype);
  saved.up_pre = Tensor::empty({slots, h}, dtype);
  saved.act = Tensor::empty({slots, h}, dtype);
  saved.out_sorted = Tensor::empty({slots, d}, dtype);
  Tensor y = Tensor::empty({dims.tokens, d}, dtype);  // [N, d]

  auto forward = [&](auto t) {
    using T = decltype(t);
    const DispatchPlan& plan = *saved.plan;
    Tensor x_sorted = Tensor::empty({slots, d}, dtype);  // [S, d]
    permute_rows(plan, x.data<T>(), d, x_sorted.data<T>());  // (d)
    grouped_swiglu_forward(plan, d, h, x_sorted.data<T>(), w_gate.data<T>(), w_up.data<T>(), w_down.data<T>(),
                           saved.gate_pre.data<T>(), saved.up_pre.data<T>(), saved.act.data<T>(),
                           saved.out_sorted.data<T>());  // (e)
    weighted_unpermute(plan, saved.out_sorted.data<T>(), gates.data<T>(), d, y.data<T>());  // (f)
  };
  dispatch_float("moe_experts", dtype, forward);

  saved.x = x.detach(), saved.gates = gates.detach();
  saved.w_gate = w_gate.detach(), saved.w_up = w_up.detach(), saved.w_down = w_down.detach();
  return record("moe_experts", y, {x, expert_ids, gates, w_gate, w_up, w_down},
                [saved = std::move(saved), dims](const Tensor& dy) -> std::vector<Tensor> {
                  return dispatch_float("moe_experts_backward", saved.x.dtype(), [&](auto t) {
                    return moe_experts_backward<decltype(t)>(saved, dy, dims);
                  });
                });
}

}  // namespace moelab::moe
