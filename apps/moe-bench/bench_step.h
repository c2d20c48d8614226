#pragma once
// What the training-step benchmarks share (moe-bench train-step, moe-bench bytes): the seeded batch, the kinds of
// kernel of a step's breakdown, the memory bandwidth of known devices.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "engine/ops.h"

namespace moelab::bench {

struct Batch {
  Tensor inputs, targets, domains;  // i32 [B, T], [B*T] on the device; [B] on the host (the losses read it there)
};

// Seeded random tokens; sequence s has domain s % domains.
inline Batch make_batch(int64_t batch, int64_t seq, int64_t vocab, int64_t domains, uint64_t seed) {
  std::mt19937_64 rng(seed + 1);
  std::vector<int32_t> inputs(batch * seq), targets(batch * seq), dom(batch);
  for (int32_t& v : inputs) v = static_cast<int32_t>(rng() % vocab);
  for (int32_t& v : targets) v = static_cast<int32_t>(rng() % vocab);
  for (int64_t s = 0; s < batch; ++s) dom[s] = static_cast<int32_t>(s % domains);
  return {from_vector(inputs, {batch, seq}), from_vector(targets, {batch * seq}), from_vector(dom, {batch})};
}

// The kinds of kernel of the breakdown, by seam name (engine/kernels/*.h); a name in none of them is "other".
struct KernelCategory {
  const char* name;
  std::vector<std::string> kernels;
};
inline const std::vector<KernelCategory>& kernel_categories() {
  static const std::vector<KernelCategory> categories = {
      {"expert FFN (GEMMs + SwiGLU)",
       {"moe_grouped_swiglu_forward", "moe_grouped_swiglu_backward", "moe_swiglu_forward", "moe_swiglu_backward"}},
      {"dense GEMMs (+ bf16 rounding)", {"batched_matmul", "round_to_bf16"}},
      {"attention", {"attention_forward", "attention_backward"}},
      {"norms, RoPE, pointwise, copies",
       {"rms_norm_forward", "rms_norm_backward", "rope_forward", "rope_backward", "unary_forward", "unary_backward",
        "binary_forward", "scalar_forward", "expand_forward", "permute_copy", "copy_columns", "convert_dtype",
        "fill_value", "fill_arange"}},
      {"routing and dispatch",
       {"topk_rows",
        "argsort_rows",
        "count_ids",
        "moe_count_experts",
        "moe_expert_offsets",
        "moe_sort_slots",
        "moe_permute_rows",
        "moe_unpermute_sum_rows",
        "moe_weighted_unpermute",
        "moe_weighted_unpermute_backward",
        "route_gates_forward",
        "route_gates_backward",
        "softmax_forward",
        "softmax_backward",
        "log_softmax_forward",
        "log_softmax_backward",
        "select_slices",
        "add_slices",
        "gather_elements",
        "scatter_add_elements",
        "select_where",
        "cumsum"}},
      {"reductions (sum, max)", {"sum_all", "sum_dim", "max_forward", "max_backward"}},
      {"losses (CE, z, ED)",
       {"cross_entropy_forward", "cross_entropy_backward", "cross_entropy_with_gradient", "z_loss_forward",
        "z_loss_backward", "sequence_means", "expert_divergence_forward", "expert_divergence_backward"}},
      {"optimizer (clip, AdamW)", {"adamw_update", "adamw_direction", "adamw_apply_direction", "sum_of_squares"}},
  };
  return categories;
}

// The index of a seam kernel's kind in kernel_categories(), or its size() for "other kernels".
inline size_t category_of(const std::string& kernel) {
  const std::vector<KernelCategory>& categories = kernel_categories();
  size_t c = 0;
  while (c < categories.size() &&
         std::find(categories[c].kernels.begin(), categories[c].kernels.end(), kernel) == categories[c].kernels.end())
    ++c;
  return c;
}

// The device memory's peak bandwidth (bytes/s) by device name, the same way; 0 when not in the table.
inline double memory_peak_bytes_per_s(const std::string& device_name) {
  if (device_name.find("H100") != std::string::npos && device_name.find("PCIe") != std::string::npos) return 2.0e12;
  if (device_name.find("H100") != std::string::npos) return 3.35e12;  // SXM, HBM3
  if (device_name.find("H200") != std::string::npos) return 4.8e12;   // HBM3e
  return 0;
}

}  // namespace moelab::bench
