#pragma once
// Learning-rate schedule: linear warmup to the peak, then cosine decay to min_lr at total_steps (constant after).
#include <cstdint>

namespace moelab::optim {

struct LRSchedule {
  double peak_lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  // Learning rate of step t (1-based).
  double at(int64_t step) const;
};

}  // namespace moelab::optim
