#pragma once
// Helpers for the tests that train: a small MoE on the synthetic corpus, fast enough for many steps on 2 cores.
#include <filesystem>

#include "apps/train/train_config.h"

namespace moelab::testing {

inline apps::TrainConfig small_train_config(const std::filesystem::path& out, int64_t steps) {
  apps::TrainConfig c = apps::train_preset("tiny");
  c.model.d_model = 32, c.model.n_heads = 2, c.model.seq_len = 32, c.model.expert_hidden = 32;
  c.data.synthetic_docs = 40;
  c.steps = steps, c.warmup = 5, c.eval_every = 0, c.eval_batches = 4, c.log_every = 1000;
  c.out_dir = out.string();
  return c;
}

}  // namespace moelab::testing
