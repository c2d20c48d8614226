// CPU kernels of engine/kernels/moe.h: the dispatch plan, the row permutations, the grouped SwiGLU (per-expert
// cpu::gemm calls, with bf16-rounded operands under Precision::BF16) and the fused routing top-k + gates. In this file
// T is the element type (float or double).
// Determinism: the sort is a stable counting sort, every output row has exactly one writer, and every sum over a
// token's k slots runs in j order, so results do not depend on thread count or scheduling (no atomics anywhere).
#include "engine/kernels/moe.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "engine/cpu/bf16.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/math.h"
#include "engine/cpu/parallel.h"
#include "engine/kernels/shape.h"

namespace moelab::cpu {

namespace {

// Runs expert_fn(e) for every expert that received tokens (offsets [E+1]). Experts run side by side (one thread
// each; sgemm stays single-threaded inside a parallel region) when there are enough of them to keep every thread
// busy; otherwise one at a time, each GEMM using all threads. Either way each expert writes only its own rows and
// weight slices.
template <class F> void for_each_expert(const int32_t* offsets, int64_t n_experts, F expert_fn) {
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < n_experts; ++e)
    if (offsets[e + 1] > offsets[e]) busy.push_back(e);
  int64_t n_busy = static_cast<int64_t>(busy.size());
  bool side_by_side = n_busy >= 2 * omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) if (side_by_side)
  for (int64_t i = 0; i < n_busy; ++i) expert_fn(busy[i]);
}

// act = silu(gate_pre) * up_pre over n elements.
template <class T> inline void swiglu_forward_span(const T* gp, const T* up, T* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = gp[i] * sigmoid(gp[i]) * up[i];
}

// d_up = d_act * silu(gp), d_gate = d_act * up * silu'(gp) over n elements; d_act may be d_gate (read first).
template <class T>
inline void swiglu_backward_span(const T* gp, const T* up, const T* d_act, T* d_gate, T* d_up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T s = sigmoid(gp[i]), da = d_act[i];
    d_up[i] = da * gp[i] * s;
    d_gate[i] = da * up[i] * s * (1 + gp[i] * (1 - s));  // silu'(z) = s (1 + z (1 - s))
  }
}

// v rounded to bf16 (nearest, ties to even) and held as T again: under Precision::BF16 the f32 GEMM then multiplies
// bf16 values (their products are exact in f32), the reference of the GPU's bf16 GEMMs.
template <class T> inline T bf16_rounded(T v) { return static_cast<T>(to_float(to_bf16(static_cast<float>(v)))); }

// v stored as an element of type T, or of bf16 (rounded: an operand of a bf16 product).
template <class T> inline void store(T v, T* out) { *out = v; }
inline void store(float v, bf16* out) { *out = to_bf16(v); }

// A stored element's value: bf16 widened (exact), else itself.
template <class T> inline T value(T v) { return v; }
inline float value(bf16 v) { return to_float(v); }

// Calls f(p) with p the elements of t: T*, or bf16* where T is float (t bf16: kept under mixed precision).
template <class T, class Fn> void with_elements(const Tensor& t, Fn&& f) {
  if constexpr (std::is_same_v<T, float>)
    if (t.dtype() == DType::BF16) return f(t.data<bf16>());
  f(t.data<T>());
}

template <class T> inline void round_span_to_bf16(const T* in, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_rounded(in[i]);
}

// The k most probable of n experts, best first: larger p first, NaN above everything (as topk ranks it), ties -> lower
// id. A total order, so the picks are exactly topk's.
template <class T> inline bool ranks_before(T pa, int32_t a, T pb, int32_t b) {
  if (std::isnan(pa) != std::isnan(pb)) return std::isnan(pa);
  if (pa != pb && !std::isnan(pa)) return pa > pb;
  return a < b;
}

}  // namespace

// ---- the dispatch plan ----------------------------------------------------------------------------------------------

void moe_count_experts(const Tensor& expert_ids, const Tensor& counts) {
  const int64_t slots = expert_ids.numel(), n_experts = counts.numel();
  const int32_t* ids = expert_ids.data<int32_t>();
  int32_t* c = counts.data<int32_t>();
  std::fill(c, c + n_experts, 0);
  for (int64_t s = 0; s < slots; ++s)
    if (ids[s] >= 0 && ids[s] < n_experts) ++c[ids[s]];
}

void moe_expert_offsets(const Tensor& counts, const Tensor& offsets) {
  const int64_t n_experts = counts.numel();
  const int32_t* c = counts.data<int32_t>();
  int32_t* o = offsets.data<int32_t>();
  o[0] = 0;
  for (int64_t e = 0; e < n_experts; ++e) o[e + 1] = o[e] + c[e];
}

void moe_sort_slots(const Tensor& expert_ids, const Tensor& offsets, const Tensor& position_of_slot) {
  const int64_t slots = expert_ids.numel();
  const int32_t* ids = expert_ids.data<int32_t>();
  const int32_t* o = offsets.data<int32_t>();
  int32_t* position_of = position_of_slot.data<int32_t>();
  std::vector<int32_t> next(o, o + offsets.numel() - 1);  // each expert's next free position
  for (int64_t s = 0; s < slots; ++s) position_of[s] = next[ids[s]]++;
}

// ---- (d) permute and its backward, the segmented reduction ----------------------------------------------------------

void moe_permute_rows(const Tensor& x, const Tensor& position_of_slot, const Tensor& x_sorted) {
  const int64_t tokens = x.size(0), d = x.size(1), k = position_of_slot.size(1);
  const int32_t* position_of = position_of_slot.data<int32_t>();
  dispatch_float("moe_permute_rows", x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* px = x.data<T>();
    with_elements<T>(x_sorted, [&](auto* xs) {  // T, or bf16 (rounded as copied: mixed precision's expert inputs)
      parallel_for(tokens, k * d, [&](int64_t n) {
        for (int64_t j = 0; j < k; ++j) {
          auto* row = xs + position_of[n * k + j] * d;
          for (int64_t i = 0; i < d; ++i) store(px[n * d + i], row + i);
        }
      });
    });
  });
}

void moe_unpermute_sum_rows(const Tensor& dx_sorted, const Tensor& position_of_slot, const Tensor& dx) {
  const int64_t tokens = dx.size(0), d = dx.size(1), k = position_of_slot.size(1);
  const int32_t* position_of = position_of_slot.data<int32_t>();
  dispatch_float("moe_unpermute_sum_rows", dx.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* pdx = dx.data<T>();
    with_elements<T>(dx_sorted, [&](const auto* pds) {  // T, or bf16 (the experts' input gradient)
      parallel_for(tokens, k * d, [&](int64_t n) {
        T* out = pdx + n * d;
        std::fill(out, out + d, T(0));
        for (int64_t j = 0; j < k; ++j) {
          const auto* row = pds + position_of[n * k + j] * d;
          for (int64_t i = 0; i < d; ++i) out[i] += value(row[i]);
        }
      });
    });
  });
}

// ---- (e) the SwiGLU activation --------------------------------------------------------------------------------------

void moe_swiglu_forward(const Tensor& gate_pre, const Tensor& up_pre, const Tensor& act) {
  const int64_t rows = act.size(0), h = act.size(1);
  if (act.dtype() == DType::BF16) {  // the kept expert activations under Precision::BF16
    const bf16 *gp = gate_pre.data<bf16>(), *up = up_pre.data<bf16>();
    bf16* a = act.data<bf16>();
    parallel_for(rows * h, 8, [&](int64_t i) {
      const float z = to_float(gp[i]);
      a[i] = to_bf16(z * sigmoid(z) * to_float(up[i]));
    });
    return;
  }
  dispatch_float("moe_swiglu_forward", act.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *gp = gate_pre.data<T>(), *up = up_pre.data<T>();
    T* a = act.data<T>();
    parallel_for(rows, h * 8, [&](int64_t r) { swiglu_forward_span(gp + r * h, up + r * h, a + r * h, h); });
  });
}

void moe_swiglu_backward(const Tensor& gate_pre, const Tensor& up_pre, const Tensor& d_act, const Tensor& d_gate_pre,
                         const Tensor& d_up_pre) {
  const int64_t rows = d_up_pre.size(0), h = d_up_pre.size(1);
  if (gate_pre.dtype() == DType::BF16 || d_up_pre.dtype() == DType::BF16) {  // f32 math on bf16 inputs or outputs
    // Widened to (or already) f32, the span computes; then the outputs are stored, rounded where they are bf16.
    const Tensor gp = as_f32(gate_pre), up = as_f32(up_pre);
    const Tensor d_gate = d_gate_pre.dtype() == DType::F32 ? d_gate_pre : Tensor::empty(d_gate_pre.shape(), DType::F32);
    const Tensor d_up = d_up_pre.dtype() == DType::F32 ? d_up_pre : Tensor::empty(d_up_pre.shape(), DType::F32);
    const float *pg = gp.data<float>(), *pu = up.data<float>(), *da = d_act.data<float>();
    float *dg = d_gate.data<float>(), *du = d_up.data<float>();
    parallel_for(rows, h * 8, [&](int64_t r) {
      const int64_t o = r * h;
      swiglu_backward_span(pg + o, pu + o, da + o, dg + o, du + o, h);
    });
    if (d_gate_pre.dtype() == DType::BF16) convert_dtype(d_gate, d_gate_pre);
    if (d_up_pre.dtype() == DType::BF16) convert_dtype(d_up, d_up_pre);
    return;
  }
  dispatch_float("moe_swiglu_backward", d_up_pre.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *gp = gate_pre.data<T>(), *up = up_pre.data<T>(), *da = d_act.data<T>();
    T *dg = d_gate_pre.data<T>(), *du = d_up_pre.data<T>();
    parallel_for(rows, h * 8, [&](int64_t r) {
      const int64_t o = r * h;
      swiglu_backward_span(gp + o, up + o, da + o, dg + o, du + o, h);
    });
  });
}

// ---- (e) grouped SwiGLU: per-expert GEMMs ---------------------------------------------------------------------------

// Under Precision::BF16 the GEMMs read `bf16_operand` copies of their inputs: f32 holding bf16 values, made per expert
// right after they are computed for act, d_gate_pre and d_up_pre. gate_pre, up_pre, act and out_sorted are computed
// into f32 scratch, rounded there, and stored in their bf16 tensors once every expert is done (an exact conversion).
// Under FP32 the scratch is those tensors themselves, and the calls are exactly the f32 ones.

void moe_grouped_swiglu_forward(const Tensor& x_sorted, const std::vector<int32_t>& offsets, const Tensor& w_gate,
                                const Tensor& w_up, const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre,
                                const Tensor& act, const Tensor& out_sorted, Precision precision) {
  const int64_t n_experts = w_gate.size(0), h = w_gate.size(1), d = w_gate.size(2);
  const int32_t* o = offsets.data();
  const bool bf16 =
      grouped_swiglu_forward_rounds(x_sorted, w_gate, w_up, w_down, gate_pre, up_pre, act, out_sorted, precision);
  const Tensor x_op = bf16_operand(x_sorted, bf16), wg_op = bf16_operand(w_gate, bf16),
               wu_op = bf16_operand(w_up, bf16), wd_op = bf16_operand(w_down, bf16);
  const Tensor gate_f = f32_scratch(gate_pre), up_f = f32_scratch(up_pre), act_f = f32_scratch(act),
               out_f = f32_scratch(out_sorted);
  dispatch_float("moe_grouped_swiglu_forward", grouped_swiglu_dtype(bf16, w_gate), [&](auto tag) {
    using T = decltype(tag);
    const T *x = x_op.data<T>(), *wg = wg_op.data<T>(), *wu = wu_op.data<T>(), *wd = wd_op.data<T>();
    T *gate = gate_f.data<T>(), *upp = up_f.data<T>(), *acts = act_f.data<T>(), *out = out_f.data<T>();
    for_each_expert(o, n_experts, [&](int64_t e) {
      int64_t begin = o[e], c = o[e + 1] - o[e];
      const T* xs = x + begin * d;  // [c, d]
      T* gp = gate + begin * h;     // [c, h]
      T* up = upp + begin * h;      // [c, h]
      T* a = acts + begin * h;      // [c, h]
      gemm(false, true, c, h, d, xs, d, wg + e * h * d, d, T(0), gp, h);
      gemm(false, true, c, h, d, xs, d, wu + e * h * d, d, T(0), up, h);
      if (bf16) {
        round_span_to_bf16(gp, gp, c * h);
        round_span_to_bf16(up, up, c * h);
      }
      swiglu_forward_span(gp, up, a, c * h);
      if (bf16) round_span_to_bf16(a, a, c * h);
      gemm(false, true, c, d, h, a, h, wd + e * d * h, h, T(0), out + begin * d, d);
    });
  });
  store_rounded(gate_f, gate_pre);
  store_rounded(up_f, up_pre);
  store_rounded(act_f, act);
  store_rounded(out_f, out_sorted);
}

void moe_grouped_swiglu_backward(const Tensor& x_sorted, const std::vector<int32_t>& offsets, const Tensor& w_gate,
                                 const Tensor& w_up, const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre,
                                 const Tensor& act, const Tensor& d_out_sorted, const Tensor& d_act,
                                 const Tensor& d_x_sorted, const Tensor& dw_gate, const Tensor& dw_up,
                                 const Tensor& dw_down, Precision precision) {
  const int64_t n_experts = w_gate.size(0), h = w_gate.size(1), d = w_gate.size(2);
  const int32_t* o = offsets.data();
  const bool bf16 = grouped_swiglu_backward_rounds(x_sorted, w_gate, w_up, w_down, gate_pre, up_pre, act, d_out_sorted,
                                                   d_act, d_x_sorted, dw_gate, dw_up, dw_down, precision);
  const Tensor x_op = bf16_operand(x_sorted, bf16), wg_op = bf16_operand(w_gate, bf16),
               wu_op = bf16_operand(w_up, bf16), wd_op = bf16_operand(w_down, bf16),
               d_out_op = bf16_operand(d_out_sorted, bf16);
  const Tensor gate_f = as_f32(gate_pre), up_f = as_f32(up_pre), act_f = as_f32(act);  // the forward's values
  // Under BF16 each product's f32 result is rounded to bf16 once: d_act where it is computed (the SwiGLU backward reads
  // the rounded values), d_x (the two products' sum) and the weight gradients as they are stored in their bf16 tensors.
  const Tensor d_act_f32 = f32_scratch(d_act), d_x_f32 = f32_scratch(d_x_sorted);
  const Tensor dw_gate_f32 = f32_scratch(dw_gate), dw_up_f32 = f32_scratch(dw_up), dw_down_f32 = f32_scratch(dw_down);
  const Tensor d_gate_pre = Tensor::empty(d_act.shape(), d_act_f32.dtype());  // [S, h]
  const Tensor d_up_pre = Tensor::empty(d_act.shape(), d_act_f32.dtype());    // [S, h]
  dispatch_float("moe_grouped_swiglu_backward", grouped_swiglu_dtype(bf16, w_gate), [&](auto tag) {
    using T = decltype(tag);
    const T *x = x_op.data<T>(), *wg = wg_op.data<T>(), *wu = wu_op.data<T>(), *wd = wd_op.data<T>();
    const T *gate = gate_f.data<T>(), *upp = up_f.data<T>(), *acts = act_f.data<T>();
    const T* d_out = d_out_op.data<T>();
    T *d_acts = d_act_f32.data<T>(), *d_gates = d_gate_pre.data<T>(), *d_ups = d_up_pre.data<T>();
    T *d_x = d_x_f32.data<T>(), *dwg = dw_gate_f32.data<T>(), *dwu = dw_up_f32.data<T>(), *dwd = dw_down_f32.data<T>();
    for (int64_t e = 0; e < n_experts; ++e)  // an expert with no tokens has zero weight gradients
      if (o[e + 1] == o[e]) {
        std::fill(dwg + e * h * d, dwg + (e + 1) * h * d, T(0));
        std::fill(dwu + e * h * d, dwu + (e + 1) * h * d, T(0));
        std::fill(dwd + e * d * h, dwd + (e + 1) * d * h, T(0));
      }
    for_each_expert(o, n_experts, [&](int64_t e) {
      int64_t begin = o[e], c = o[e + 1] - o[e];
      const T* xs = x + begin * d;        // [c, d]
      const T* dout = d_out + begin * d;  // [c, d]
      const T* gp = gate + begin * h;     // [c, h]
      const T* up = upp + begin * h;      // [c, h]
      T* da = d_acts + begin * h;         // [c, h]
      T* d_gate = d_gates + begin * h;    // [c, h]
      T* d_up = d_ups + begin * h;        // [c, h]
      gemm(false, false, c, h, d, dout, d, wd + e * d * h, h, T(0), da, h);
      gemm(true, false, d, h, c, dout, d, acts + begin * h, h, T(0), dwd + e * d * h, h);
      if (bf16) round_span_to_bf16(da, da, c * h);
      swiglu_backward_span(gp, up, da, d_gate, d_up, c * h);
      if (bf16) {
        round_span_to_bf16(d_gate, d_gate, c * h);
        round_span_to_bf16(d_up, d_up, c * h);
      }
      gemm(true, false, h, d, c, d_gate, h, xs, d, T(0), dwg + e * h * d, d);
      gemm(true, false, h, d, c, d_up, h, xs, d, T(0), dwu + e * h * d, d);
      T* dxs = d_x + begin * d;
      gemm(false, false, c, d, h, d_gate, h, wg + e * h * d, d, T(0), dxs, d);
      gemm(false, false, c, d, h, d_up, h, wu + e * h * d, d, T(1), dxs, d);
    });
  });
  store_rounded(d_act_f32, d_act);
  store_rounded(d_x_f32, d_x_sorted);
  store_rounded(dw_gate_f32, dw_gate), store_rounded(dw_up_f32, dw_up), store_rounded(dw_down_f32, dw_down);
}

// ---- (f) weighted un-permute and its backward -----------------------------------------------------------------------

void moe_weighted_unpermute(const Tensor& out_sorted, const Tensor& gates, const Tensor& position_of_slot,
                            const Tensor& residual, const Tensor& y) {
  const int64_t tokens = y.size(0), d = y.size(1), k = gates.size(1);
  const int32_t* position_of = position_of_slot.data<int32_t>();
  dispatch_float("moe_weighted_unpermute", y.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pg = gates.data<T>();
    const T* pr = residual.defined() ? residual.data<T>() : nullptr;
    T* py = y.data<T>();
    with_elements<T>(out_sorted, [&](const auto* os) {
      parallel_for(tokens, (k + 1) * d, [&](int64_t n) {
        T* out = py + n * d;
        std::fill(out, out + d, T(0));
        for (int64_t j = 0; j < k; ++j) {
          const auto* row = os + position_of[n * k + j] * d;
          T g = pg[n * k + j];
          for (int64_t i = 0; i < d; ++i) out[i] += g * value(row[i]);
        }
        if (pr)
          for (int64_t i = 0; i < d; ++i) out[i] = pr[n * d + i] + out[i];
      });
    });
  });
}

void moe_weighted_unpermute_backward(const Tensor& dy, const Tensor& out_sorted, const Tensor& gates,
                                     const Tensor& position_of_slot, const Tensor& d_gates,
                                     const Tensor& d_out_sorted) {
  const int64_t tokens = dy.size(0), d = d_out_sorted.size(1), k = gates.size(1);
  const int32_t* position_of = position_of_slot.data<int32_t>();
  dispatch_float("moe_weighted_unpermute_backward", dy.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *pdy = dy.data<T>(), *pg = gates.data<T>();
    T* pdg = d_gates.data<T>();
    with_elements<T>(out_sorted, [&](const auto* os) {  // T, or bf16 (kept)
      with_elements<T>(d_out_sorted, [&](auto* pdo) {   // T, or bf16 (rounded: the experts' operand)
        parallel_for(tokens, 2 * k * d, [&](int64_t n) {
          const T* dy_row = pdy + n * d;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t s = n * k + j, pos = position_of[s];
            const auto* out_row = os + pos * d;
            auto* d_out_row = pdo + pos * d;
            T g = pg[s], dot = 0;
            for (int64_t i = 0; i < d; ++i) {
              store(g * dy_row[i], d_out_row + i);
              dot += dy_row[i] * value(out_row[i]);
            }
            pdg[s] = dot;
          }
        });
      });
    });
  });
}

// ---- routing: top-k + gates -----------------------------------------------------------------------------------------

void route_gates_forward(const Tensor& probs, bool norm_topk, const Tensor& expert_ids, const Tensor& gates,
                         const Tensor& chosen_sum) {
  const int64_t tokens = probs.size(0), n_experts = probs.size(1), k = expert_ids.size(1);
  int32_t* ids = expert_ids.data<int32_t>();
  dispatch_float("route_gates", probs.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* pp = probs.data<T>();
    T *pg = gates.data<T>(), *psum = chosen_sum.data<T>();
    parallel_for(tokens, n_experts * k, [&](int64_t n) {
      const T* p = pp + n * n_experts;
      int32_t* row_ids = ids + n * k;
      // Pick j is the best expert ranked after pick j - 1: k passes over the row, nothing to remember but the last.
      for (int64_t j = 0; j < k; ++j) {
        int32_t best = -1;
        for (int32_t e = 0; e < n_experts; ++e) {
          if (j > 0 && !ranks_before(p[row_ids[j - 1]], row_ids[j - 1], p[e], e)) continue;
          if (best < 0 || ranks_before(p[e], e, p[best], best)) best = e;
        }
        row_ids[j] = best;
      }
      double acc = 0;  // as sum(chosen, -1, keepdim): in double, in j order
      for (int64_t j = 0; j < k; ++j) acc += p[row_ids[j]];
      const T total = static_cast<T>(acc);
      psum[n] = total;
      for (int64_t j = 0; j < k; ++j) pg[n * k + j] = norm_topk ? p[row_ids[j]] / total : p[row_ids[j]];
    });
  });
}

void route_gates_backward(const Tensor& g, const Tensor& expert_ids, const Tensor& gates, const Tensor& chosen_sum,
                          bool norm_topk, const Tensor& dprobs) {
  const int64_t tokens = dprobs.size(0), n_experts = dprobs.size(1), k = expert_ids.size(1);
  const int32_t* ids = expert_ids.data<int32_t>();
  dispatch_float("route_gates_backward", g.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T *pg = g.data<T>(), *py = gates.data<T>(), *psum = chosen_sum.data<T>();
    T* pdp = dprobs.data<T>();
    parallel_for(tokens, n_experts + 4 * k, [&](int64_t n) {
      const T* gn = pg + n * k;
      const T* yn = py + n * k;
      const int32_t* row_ids = ids + n * k;
      T* dp = pdp + n * n_experts;
      std::fill(dp, dp + n_experts, T(0));
      if (!norm_topk) {
        for (int64_t j = 0; j < k; ++j) dp[row_ids[j]] += gn[j];
        return;
      }
      // div(chosen, total): gb = g / total to chosen, -(gb * y) summed (sum_to, in double) to total; sum's backward
      // hands total's gradient back to every chosen p.
      const T total = psum[n];
      double acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += -((gn[j] / total) * yn[j]);
      const T d_total = static_cast<T>(acc);
      for (int64_t j = 0; j < k; ++j) dp[row_ids[j]] += gn[j] / total + d_total;
    });
  });
}

}  // namespace moelab::cpu
