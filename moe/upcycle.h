#pragma once
// Sparse upcycling (Komatsuzaki et al. 2023): an MoE model made from a dense checkpoint. Every expert of an MoE layer
// starts as a copy of the dense model's FFN of that layer, every other parameter (embeddings, attention, norms,
// lm_head, the FFN of a dense layer) is the dense model's own, and the router keeps the init the MoEModel constructor
// drew from its seed. With exact copies and normalized gates (norm_topk) the MoE model computes the dense model's
// function whatever the router picks: the k chosen experts are equal and their gates sum to 1. docs/moe.md,
// "Sparse upcycling".
#include <cstdint>

#include "moe/model.h"
#include "nn/config.h"
#include "nn/safetensors.h"

namespace moelab::moe {

struct UpcycleOptions {
  // Relative std of multiplicative noise on the experts: w_e = w * (1 + noise * eps), eps ~ N(0, 1) drawn per expert
  // and element (0: exact copies). Breaks the experts' symmetry; must be finite and >= 0.
  double noise = 0;
  // Seed of the noise's stream, drawn per MoE layer in layer order: w_gate, w_up, w_down, each [E, ...] at once.
  uint64_t seed = 0;
};

// Fills `model` from the dense checkpoint `dense` (as nn::load_safetensors reads it) of `dense_config`, in place.
// Throws std::invalid_argument, naming the first mismatch, when dense_config has experts (n_experts != 0), when the
// two configs differ in anything but the feed-forward options (vocab_size, d_model, n_layers, n_heads,
// tie_embeddings, rope_theta, norm_eps; seq_len and init_std may differ), when the dense hidden size
// (dense_config.dense_ffn_hidden()) differs from model's expert_hidden (or from its own dense layers' hidden size),
// or when model has shared experts (not supported: copies in both would add the dense FFN twice). Throws
// std::runtime_error, naming the tensor and both shapes or dtypes, when `dense` does not hold exactly the parameters
// of dense_config (nn::check_parameters_match) in model's dtype, or holds a NaN or an Inf. Every check comes before
// the first copy: a failure leaves the model as it was. The copies and the noise are engine ops on the parameters'
// device, so the model may live on the CPU or the GPU (tested on the CPU; the noise's normals agree across backends
// to a few ulps).
void upcycle_from_dense(MoEModel& model, const nn::ModelConfig& dense_config, const nn::SafeTensors& dense,
                        const UpcycleOptions& options = {});

}  // namespace moelab::moe
