// Whole training steps on the GPU against the CPU: the same seed, config and batches give the same loss curve, with
// every router loss on (LB + Z + ED), with OMoE, and with ED over a step of two micro-batches. The CPU is the
// oracle; the GPU sums in other orders, so the losses agree to a relative 1e-4 (fp32), not bit for bit. On the GPU a
// run is deterministic: twice the same run gives the same bits.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/train/trainer.h"
#include "tests/cuda_testing.h"

using namespace moelab;
using namespace moelab::apps;
namespace fs = std::filesystem;
using testing::cuda_only;

namespace {

// A small MoE on the synthetic corpus with every router loss on: a few steps run in seconds on the emulator.
TrainConfig gpu_test_config(const fs::path& out, Device device) {
  TrainConfig c = train_preset("tiny");
  c.model.d_model = 32, c.model.n_heads = 2, c.model.seq_len = 16, c.model.expert_hidden = 16;
  c.data.synthetic_docs = 20;
  c.batch_size = 4, c.steps = 4, c.warmup = 2, c.eval_every = 0, c.eval_batches = 2, c.log_every = 1000;
  c.losses.alpha = 0.01, c.losses.z_coef = 0.01, c.losses.beta = 0.05;
  c.device = device;
  c.out_dir = out.string();
  return c;
}

struct Curve {
  std::vector<double> loss, ce, lb, z, ed, grad_norm;
  std::vector<std::vector<float>> parameters;  // after the last step
};

Curve train(TrainConfig c) {
  std::ostringstream quiet;
  Trainer trainer(c, quiet);
  trainer.run();
  Curve out;
  std::ifstream log(trainer.metrics_path());
  for (std::string line; std::getline(log, line);) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;  // an eval line
    out.loss.push_back(j["loss"]), out.ce.push_back(j["ce"]), out.lb.push_back(j["lb"]);
    out.z.push_back(j["z"]), out.ed.push_back(j["ed"]), out.grad_norm.push_back(j["grad_norm"]);
  }
  for (const auto& p : trainer.model().lm().named_parameters()) out.parameters.push_back(p.tensor.to_vector<float>());
  fs::remove_all(c.out_dir);
  return out;
}

void check_same_curve(const Curve& gpu, const Curve& cpu, double rel, double max_lr) {
  REQUIRE(gpu.loss.size() == cpu.loss.size());
  REQUIRE(!cpu.loss.empty());
  auto close = [&](const std::vector<double>& a, const std::vector<double>& b, const char* what) {
    for (size_t i = 0; i < b.size(); ++i)
      CHECK_MESSAGE(std::abs(a[i] - b[i]) <= rel * std::abs(b[i]) + 1e-7,
                    what << " at step " << i + 1 << ": gpu " << a[i] << " vs cpu " << b[i]);
  };
  close(gpu.loss, cpu.loss, "loss");
  close(gpu.ce, cpu.ce, "ce");
  close(gpu.lb, cpu.lb, "lb");
  close(gpu.z, cpu.z, "z");
  close(gpu.ed, cpu.ed, "ed");
  close(gpu.grad_norm, cpu.grad_norm, "grad_norm");
  // The weights after the steps: an Adam step moves each weight by about lr or less, whatever the gradient's size
  // (m / sqrt(v)), so a tiny gradient entry that differs in its last bits can move its weight differently; bound
  // the difference by a small share of the movement all steps together allow.
  double worst = 0;
  for (size_t p = 0; p < cpu.parameters.size(); ++p)
    for (size_t i = 0; i < cpu.parameters[p].size(); ++i)
      worst = std::max(worst, std::abs(double(gpu.parameters[p][i]) - cpu.parameters[p][i]));
  const double movement = max_lr * static_cast<double>(cpu.loss.size());
  CHECK_MESSAGE(worst < 0.01 * movement,
                "parameters after training: worst difference " << worst << " (steps x lr = " << movement << ")");
}

}  // namespace

TEST_CASE("cuda: training: tiny MoE steps with LB + Z + ED match the CPU, and repeat bit for bit" * cuda_only()) {
  const fs::path dir = testing::fresh_temp_dir("cuda_training");
  Curve cpu = train(gpu_test_config(dir / "cpu", Device::CPU));
  Curve gpu = train(gpu_test_config(dir / "gpu", Device::CUDA));
  check_same_curve(gpu, cpu, 1e-4, gpu_test_config("", Device::CPU).lr);
  Curve again = train(gpu_test_config(dir / "gpu_again", Device::CUDA));
  CHECK(again.loss == gpu.loss);
  CHECK(again.parameters == gpu.parameters);
}

TEST_CASE("cuda: training: OMoE steps match the CPU" * cuda_only()) {
  const fs::path dir = testing::fresh_temp_dir("cuda_training_omoe");
  auto config = [&](const fs::path& out, Device device) {
    TrainConfig c = gpu_test_config(out, device);
    c.optimizer = OptimizerKind::OMoE, c.omoe.every = 2, c.omoe.project_down = true;
    return c;
  };
  check_same_curve(train(config(dir / "gpu", Device::CUDA)), train(config(dir / "cpu", Device::CPU)), 1e-4,
                   config("", Device::CPU).lr);
}

TEST_CASE("cuda: training: ED over a step of two micro-batches matches the CPU" * cuda_only()) {
  const fs::path dir = testing::fresh_temp_dir("cuda_training_accum");
  auto config = [&](const fs::path& out, Device device) {
    TrainConfig c = gpu_test_config(out, device);
    c.batch_size = 2, c.grad_accum = 2, c.losses.ed_scope = moe::EDScope::Step;
    return c;
  };
  check_same_curve(train(config(dir / "gpu", Device::CUDA)), train(config(dir / "cpu", Device::CPU)), 1e-4,
                   config("", Device::CPU).lr);
}

// Mixed precision (train.precision = bf16): the operands of every product but the router's are rounded to bf16 (8
// significant bits), so the curve leaves fp32's by about 2^-8 relative per product: the losses stay within 2e-2 of
// the fp32 CPU run's (measured: 5.4e-5). Against the CPU's own bf16 run the two devices round the same values, and
// differ only where an operand computed in another summation order rounds the other way, which is rare: 5e-4
// (measured in the emulator: 8.3e-8 in 8 steps, 2026-12-03). The same with the experts' products on padded rows
// (cuda::ExpertGemm::Padded).
TEST_CASE("cuda: training: bf16 mixed precision follows the fp32 curve and the CPU's bf16 curve" * cuda_only()) {
  const fs::path dir = testing::fresh_temp_dir("cuda_training_bf16");
  auto config = [&](const fs::path& out, Device device, Precision precision) {
    TrainConfig c = gpu_test_config(out, device);
    c.precision = precision;
    return c;
  };
  Curve fp32 = train(config(dir / "cpu_fp32", Device::CPU, Precision::FP32));
  Curve cpu = train(config(dir / "cpu_bf16", Device::CPU, Precision::BF16));
  Curve gpu = train(config(dir / "gpu_bf16", Device::CUDA, Precision::BF16));
  Curve padded;
  {
    const cuda::ExpertGemmScope scope(cuda::ExpertGemm::Padded);  // the experts' products on padded rows, at bf16 rate
    const int64_t padded_before = cuda::padded_expert_calls();
    padded = train(config(dir / "gpu_bf16_padded", Device::CUDA, Precision::BF16));
    CHECK_MESSAGE(cuda::padded_expert_calls() > padded_before, "no layer ran on padded rows");
  }
  REQUIRE(gpu.loss.size() == fp32.loss.size());
  REQUIRE(padded.loss.size() == fp32.loss.size());
  REQUIRE(cpu.loss.size() == fp32.loss.size());
  double from_fp32 = 0, from_cpu = 0;  // the largest relative distances, for the figures above
  for (size_t i = 0; i < fp32.loss.size(); ++i) {
    from_fp32 = std::max(from_fp32, std::abs(gpu.loss[i] - fp32.loss[i]) / fp32.loss[i]);
    from_cpu = std::max(from_cpu, std::abs(gpu.loss[i] - cpu.loss[i]) / cpu.loss[i]);
    CHECK_MESSAGE(std::abs(gpu.loss[i] - fp32.loss[i]) < 2e-2 * fp32.loss[i],
                  "step " << i + 1 << ": bf16 gpu " << gpu.loss[i] << " vs fp32 cpu " << fp32.loss[i]);
    for (const Curve* c : {&gpu, &padded}) {
      const char* name = c == &gpu ? "bf16 gpu" : "bf16 gpu padded";
      CHECK_MESSAGE(std::abs(c->loss[i] - cpu.loss[i]) < 5e-4 * cpu.loss[i],
                    "step " << i + 1 << ": " << name << " " << c->loss[i] << " vs bf16 cpu " << cpu.loss[i]);
      CHECK_MESSAGE(std::abs(c->ce[i] - cpu.ce[i]) < 5e-4 * cpu.ce[i],
                    "step " << i + 1 << ": ce " << name << " " << c->ce[i] << " vs bf16 cpu " << cpu.ce[i]);
    }
  }
  MESSAGE("bf16 gpu losses, largest relative distance from fp32 cpu: ", from_fp32, ", from bf16 cpu: ", from_cpu);
  // Rounding does change the numbers: bf16 is not silently fp32.
  CHECK(cpu.loss.back() != fp32.loss.back());
}

// Every wait for the device drains its queue, and it idles until the host has queued the next kernels. A step of the
// trainer (MoEModel::loss with the per-domain CE, backward, clip, AdamW) waits only where the host needs a number:
// per MoE layer the group sizes (the dispatch's counts); per step the token ids (embedding's check), the targets (the
// CE's count), the loss's numbers in one read, and the gradient norm. Small uploads (the ED loss's domains) are
// queued, not waited for. A wait added anywhere else fails this count.
TEST_CASE("cuda: training: a step waits for the device once per MoE layer and four times more" * cuda_only()) {
  nn::ModelConfig mc = train_preset("tiny").model;
  mc.d_model = 32, mc.n_heads = 2, mc.seq_len = 16, mc.expert_hidden = 16;
  moe::RouterLossConfig losses;
  losses.alpha = 0.01, losses.z_coef = 0.01, losses.beta = 0.05;
  moe::MoEModel model(mc, losses, 5);
  model.lm().to(Device::CUDA);
  const int64_t B = 4, moe_layers = static_cast<int64_t>(model.moe_layers().size());
  REQUIRE(moe_layers >= 2);
  std::vector<int32_t> tokens(B * mc.seq_len);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((7 * i + 3) % mc.vocab_size);
  const Tensor inputs = to_device(from_vector(tokens, {B, mc.seq_len}), Device::CUDA);
  const Tensor targets = to_device(from_vector(tokens, {B * mc.seq_len}), Device::CUDA);
  const Tensor domains = from_vector(std::vector<int32_t>{0, 1, 0, 1}, {B});  // on the host, as the trainer's
  optim::AdamW optimizer(model.lm().named_parameters(), optim::AdamWConfig{});
  auto step = [&] {
    moe::Loss loss = model.loss(inputs, targets, domains, 2);
    loss.value.backward();
    optimizer.step(1e-3, optim::grad_clip(optimizer.params(), 1.0).scale);
    optimizer.zero_grad();
    return loss.terms;
  };
  step();  // the first step also uploads what is made once (RoPE's tables)
  const int64_t before = cuda::host_waits();
  const moe::LossTerms terms = step();
  CHECK(cuda::host_waits() - before == moe_layers + 4);
  CHECK(std::isfinite(terms.objective));
  CHECK(terms.domain_tokens == std::vector<int64_t>{2 * mc.seq_len, 2 * mc.seq_len});

  // The routers' finiteness check travels with the loss's numbers: a NaN router weight still stops the step, naming
  // its router.
  Tensor& weight = model.moe_layers()[1]->router.weight;
  copy_(weight, to_device(full(weight.shape(), NAN), Device::CUDA));
  // Outside the loss (evaluation, analysis) the router checks at once.
  testing::check_error<std::runtime_error>([&] { model.lm().forward(inputs); }, {".moe.router", "NaN or Inf"});
  testing::check_error<std::runtime_error>([&] { model.loss(inputs, targets, domains, 2); },
                                           {".moe.router", "NaN or Inf"});
}
