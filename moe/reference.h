#pragma once
// The naive reference MoE that the fast dispatch (moe/dispatch.h) and the MoE layer are tested against.
// Written to be obviously right, not fast: one token at a time, one chosen expert at a time, each expert's SwiGLU
// spelled out with engine ops, so autograd supplies every reference gradient. The router's top-k is a plain sort.
#include <algorithm>
#include <numeric>
#include <vector>

#include "engine/ops.h"
#include "moe/router.h"

namespace moelab::reference {

// Expert e's SwiGLU on one token x [1, d]: W_down,e (silu(W_gate,e x) * (W_up,e x)) -> [1, d].
inline Tensor expert_swiglu(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down,
                            int32_t e) {
  int64_t h = w_gate.size(1), d = w_gate.size(2);
  Tensor id = from_vector(std::vector<int32_t>{e}, {1});
  Tensor wg = reshape(index_select(w_gate, 0, id), {h, d});
  Tensor wu = reshape(index_select(w_up, 0, id), {h, d});
  Tensor wd = reshape(index_select(w_down, 0, id), {d, h});
  return matmul(silu(matmul(x, wg, false, true)) * matmul(x, wu, false, true), wd, false, true);
}

// y[n] = sum_j gates[n,j] * SwiGLU_{ids[n,j]}(x[n]) for x [N, d], ids i32 [N, k], gates [N, k].
inline Tensor moe_experts(const Tensor& x, const Tensor& expert_ids, const Tensor& gates, const Tensor& w_gate,
                          const Tensor& w_up, const Tensor& w_down) {
  int64_t n_tokens = x.size(0), k = expert_ids.size(1);
  std::vector<int32_t> ids = expert_ids.to_vector<int32_t>();
  std::vector<Tensor> rows;
  for (int64_t n = 0; n < n_tokens; ++n) {
    Tensor token = slice_rows(x, n, n + 1);            // [1, d]
    Tensor token_gates = slice_rows(gates, n, n + 1);  // [1, k]
    Tensor y = zeros({1, x.size(1)}, x.dtype());
    for (int64_t j = 0; j < k; ++j) {
      Tensor gate = index_select(token_gates, 1, from_vector(std::vector<int32_t>{int32_t(j)}, {1}));  // [1, 1]
      y = y + gate * expert_swiglu(token, w_gate, w_up, w_down, ids[n * k + j]);
    }
    rows.push_back(y);
  }
  return concat(rows, 0);  // [N, d]
}

// The router of docs/model.md: p = softmax(h W^T); each token's k most probable experts (a plain stable sort, so ties go
// to the lower id); gates = the chosen p, divided by their sum when norm_topk.
inline moe::Routing route(const Tensor& h, const Tensor& weight, int64_t k, bool norm_topk) {
  moe::Routing r;
  r.logits = matmul(h, weight, false, true);
  r.probs = softmax(r.logits);
  int64_t n_tokens = h.size(0), n_experts = weight.size(0);
  Tensor p64 = to_dtype(r.probs.detach(), DType::F64);
  std::vector<double> p = p64.to_vector<double>();
  std::vector<int32_t> ids;
  for (int64_t n = 0; n < n_tokens; ++n) {
    std::vector<int32_t> order(n_experts);
    std::iota(order.begin(), order.end(), 0);
    const double* row = p.data() + n * n_experts;
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    ids.insert(ids.end(), order.begin(), order.begin() + k);
  }
  r.expert_ids = from_vector(ids, {n_tokens, k});
  Tensor chosen = gather(r.probs, 1, r.expert_ids);
  r.gates = norm_topk ? chosen / sum(chosen, -1, true) : chosen;
  return r;
}

}  // namespace moelab::reference
