#pragma once
// Expert diversity metrics of docs/analysis.md, on one MoE layer (used by OMoE's tests and moe-analyze):
//   expert output similarity     every sampled token through every expert; cosine similarity of the outputs,
//                                averaged over expert pairs i < j and tokens (1 = identical experts)
//   normalized parameter variance NV = mean_c Var_i(W_i[c]) / mean_{i,c} W_i[c]^2 over each expert's flattened
//                                matrix (population variance over experts; 0 = equal experts, about (E-1)/E for
//                                independent zero-mean ones)
#include <cstdint>
#include <vector>

#include "moe/moe_layer.h"

namespace moelab::moe {

struct OutputSimilarity {
  double mean = 0;                        // over pairs i < j and tokens
  std::vector<std::vector<double>> pair;  // [E][E]: mean over tokens of cos(out_i, out_j); 1 on the diagonal
  int64_t tokens = 0;
};

// x [N, d]: tokens as they reach the layer (its input h, e.g. MoELayer::last_input() after a forward pass).
// out_e = SwiGLU_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x)), without router gates. A token whose output is
// exactly zero for some expert contributes 0 to that expert's pairs.
OutputSimilarity expert_output_similarity(const Experts& experts, const Tensor& x);

// NV of a stack of expert matrices w [E, ...] (each expert's slice flattened).
double normalized_parameter_variance(const Tensor& w);

struct ParameterVariance {
  double w_gate = 0, w_up = 0, w_down = 0;
  double all = 0;  // each expert's three matrices flattened into one vector
};
ParameterVariance normalized_parameter_variance(const Experts& experts);

}  // namespace moelab::moe
