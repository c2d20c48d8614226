// Kernel timing (engine/profile.h): what a KernelProfile counts, on the CPU and on the CUDA backend.
#include <doctest/doctest.h>

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/kernels/optim.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "engine/profile.h"
#include "moe/model.h"
#include "optim/adamw.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"

namespace moelab::testing {
namespace {

const KernelTime* find_kernel(const std::vector<KernelTime>& totals, const std::string& name) {
  for (const KernelTime& t : totals)
    if (t.name == name) return &t;
  return nullptr;
}

// Two products, a sum and an AdamW update on `device` under a profile: the seam's calls by name with their tensors'
// bytes, nothing before or after it.
void check_profile_counts(Device device) {
  const Tensor a = on(random({64, 48}, 1, DType::F32), device), b = on(random({48, 32}, 2, DType::F32), device);
  const Tensor before = matmul(a, b);  // before the profile: not counted
  std::vector<KernelTime> totals;
  {
    KernelProfile profile;
    CHECK_THROWS_AS(KernelProfile(), std::logic_error);  // one at a time
    const Tensor c = matmul(a, b), d = matmul(a, b), total = sum(c);
    const Tensor p = on(random({10}, 3, DType::F32), device), g = on(random({10}, 4, DType::F32), device);
    const Tensor m = zeros_like(p), v = zeros_like(p);
    KERNEL(adamw_update, device)({{p, g, m, v, 1.0f, Tensor()}}, AdamWScalars{0.9f, 0.999f, 1e-8f, 1.0f}, 1e-3f);
    totals = profile.totals();
  }
  const Tensor after = matmul(a, b);  // after: not counted either
  const KernelTime* products = find_kernel(totals, "batched_matmul");
  REQUIRE(products != nullptr);
  CHECK(products->calls == 2);
  CHECK(products->device == device);
  CHECK(products->ms > 0);
  CHECK(products->bytes == 2 * (64 * 48 + 48 * 32 + 64 * 32) * 4);  // a, b and the product, f32, per call
  const KernelTime* sums = find_kernel(totals, "sum_all");
  REQUIRE(sums != nullptr);
  CHECK(sums->calls == 1);
  CHECK(sums->bytes == (64 * 32 + 1) * 4);
  const KernelTime* update = find_kernel(totals, "adamw_update");
  REQUIRE(update != nullptr);
  CHECK(update->bytes == 4 * 10 * 4);  // parameter, gradient and moments, each once
  for (size_t i = 1; i < totals.size(); ++i) CHECK(totals[i - 1].ms >= totals[i].ms);  // the most time first
  KernelProfile fresh;                                                                 // a new profile starts empty
  CHECK(fresh.totals().empty());
}

}  // namespace

TEST_CASE("profile: a KernelProfile counts and times the seam's calls while it is alive (CPU)") {
  check_profile_counts(Device::CPU);
}

TEST_CASE("profile: the same on the CUDA backend, timed by events on the stream" * cuda_only()) {
  check_profile_counts(Device::CUDA);
}

TEST_CASE("profile: a training step's kernel bytes are fixed plus per sequence (what moe-bench bytes extrapolates)") {
  // moe-bench bytes measures S and M at batch 1 and 2 and extrapolates each kernel's bytes linearly to the config's
  // batch: every tensor of a step is per token or fixed. Batch 3 must be exactly that line's value, kernel by kernel.
  nn::ModelConfig config = nn::model_preset("tiny");
  config.seq_len = 16;
  auto step_bytes = [&](int64_t batch) {
    moe::RouterLossConfig losses;
    losses.alpha = 0.01, losses.z_coef = 0.001;
    moe::MoEModel model(config, losses, 0);
    optim::AdamW optimizer(model.lm().named_parameters(), optim::AdamWConfig{});
    std::vector<int32_t> tokens(batch * config.seq_len);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((7 * i + 3) % config.vocab_size);
    const Tensor inputs = from_vector(tokens, {batch, config.seq_len}),
                 targets = from_vector(tokens, {batch * config.seq_len});
    std::map<std::string, double> bytes;
    KernelProfile profile;
    PrecisionGuard bf16(Precision::BF16);
    moe::Loss loss = model.loss(inputs, targets, Tensor(), 0);
    loss.value.backward();
    optimizer.step(1e-3, optim::grad_clip(optimizer.params(), 1.0).scale);
    for (const KernelTime& t : profile.totals()) bytes[t.name] = t.bytes;
    return bytes;
  };
  const std::map<std::string, double> one = step_bytes(1), two = step_bytes(2), three = step_bytes(3);
  REQUIRE(three.size() == two.size());
  CHECK(three.count("batched_matmul") == 1);
  CHECK(three.count("adamw_update") == 1);
  for (const auto& [name, bytes] : three) {
    CAPTURE(name);
    CHECK(bytes == 2 * two.at(name) - one.at(name));
  }
}

}  // namespace moelab::testing
