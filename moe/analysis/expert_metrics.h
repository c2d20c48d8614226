#pragma once
// Expert diversity metrics of docs/analysis.md, on one MoE layer (used by OMoE's tests and moe-analyze):
//   expert output similarity     every sampled token through every expert, then per expert pair i < j:
//                                  cosine      mean over tokens of cos(out_i, out_j) (1 = identical experts)
//                                  centered    the same after subtracting each expert's mean output over the tokens
//                                              (the raw cosine is dominated by a mean direction the experts share)
//                                  linear CKA  ||X_i^T X_j||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F), X_e the [N, d]
//                                              outputs of expert e centered over the tokens (invariant to rotations
//                                              and isotropic scaling of either expert's outputs)
//                                averaged over the pairs i < j
//   normalized parameter variance NV = mean_c Var_i(W_i[c]) / mean_{i,c} W_i[c]^2 over each expert's flattened
//                                matrix (population variance over experts; 0 = equal experts, about (E-1)/E for
//                                independent zero-mean ones: meaningful only when the experts share an init)
#include <cstdint>
#include <vector>

#include "moe/moe_layer.h"

namespace moelab::moe {

struct OutputSimilarity {
  double mean = 0;                                 // cosine, over pairs i < j and tokens
  std::vector<std::vector<double>> pair;           // [E][E]: mean over tokens of cos(out_i, out_j); 1 on the diagonal
  double centered_mean = 0;                        // centered cosine, over pairs i < j and tokens
  std::vector<std::vector<double>> centered_pair;  // [E][E]: the cosine of out_e - mean_tokens out_e; 1 on the diagonal
  double cka_mean = 0;                             // linear CKA, over pairs i < j
  std::vector<std::vector<double>> cka_pair;       // [E][E]: linear CKA of the experts' outputs; 1 on the diagonal
  int64_t tokens = 0;
};

// x [N, d]: tokens as they reach the layer (its input h, e.g. MoELayer::last_input() after a forward pass).
// out_e = SwiGLU_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x)), without router gates. A token whose output is
// exactly zero for some expert (after centering, for the centered cosine) contributes 0 to that expert's pairs; a
// pair whose CKA denominator is 0 (an expert with constant output) has CKA 0. With one expert every mean is 1.
// Computed in f64 on the host; the CKA in the d x d form, O(E^2 N d^2 / 2).
OutputSimilarity expert_output_similarity(const Experts& experts, const Tensor& x);

// Linear CKA of two row-major matrices a, b [n, d] (rows = the same n inputs): both are centered over the rows, then
// ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F); 0 when a denominator is 0.
double linear_cka(const std::vector<double>& a, const std::vector<double>& b, int64_t n, int64_t d);

// NV of a stack of expert matrices w [E, ...] (each expert's slice flattened).
double normalized_parameter_variance(const Tensor& w);

struct ParameterVariance {
  double w_gate = 0, w_up = 0, w_down = 0;
  double all = 0;  // each expert's three matrices flattened into one vector
};
ParameterVariance normalized_parameter_variance(const Experts& experts);

}  // namespace moelab::moe
