// `moe-bench bytes`: the least bytes each kind of kernel moves in one training step of a config at its benchmark
// batch, and the time that takes at a memory's peak bandwidth (docs/performance.md, "Where the bytes go").
//
// The same ops make the same seam calls with the same tensors on both devices, so the bytes counted on the CPU
// (engine/profile.h: each call's tensor arguments, each once) are the GPU's too. S and M at their benchmark batches do
// not fit a small machine, so the step runs at batch 1 and 2 and each kernel's bytes are extrapolated linearly: a
// kernel's tensors are per token (activations; attention's per sequence of fixed length) or fixed (weights,
// gradients, optimizer state). The step is train-step's: loss (CE + LB + Z), backward, gradient clipping, AdamW.
#include <fmt/core.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "apps/moe-bench/bench_step.h"
#include "apps/moe-bench/bench_util.h"
#include "apps/moe-bench/benches.h"
#include "engine/precision.h"
#include "engine/profile.h"
#include "moe/model.h"
#include "optim/adamw.h"

namespace moelab::bench {
namespace {

struct BytesOptions {
  std::string preset = "M";
  int64_t batch = 0;  // 0: the preset's
  std::string precision_name = "bf16";
  double bandwidth_gb_s = 4800;  // the H200's HBM3e
  bool every_kernel = false;
};

struct KernelBytes {
  double calls = 0, bytes = 0;
};
struct StepBytes {
  std::map<std::string, KernelBytes> kernels;
  double peak_memory = 0;  // the step's tensors at most at once (the model's and the optimizer's included)
};

// The seam's calls and bytes per kernel in the second of two training steps at `batch` sequences (the first one makes
// what is made once, such as RoPE's tables and AdamW's moments), and the peak memory of that step.
StepBytes step_bytes(const nn::ModelConfig& config, int64_t batch, Precision precision) {
  moe::RouterLossConfig losses;
  losses.alpha = 0.01, losses.z_coef = 0.001;  // train-step's defaults
  moe::MoEModel model(config, losses, /*seed=*/0);
  optim::AdamW optimizer(model.lm().named_parameters(), optim::AdamWConfig{});
  if (precision == Precision::BF16) optimizer.keep_bf16_weights();  // as the trainer
  const Batch b = make_batch(batch, config.seq_len, config.vocab_size, /*domains=*/4, /*seed=*/0);
  auto step = [&] {
    PrecisionGuard guard(precision, optimizer.bf16_weights());
    moe::Loss loss = model.loss(b.inputs, b.targets, b.domains, 4);
    loss.value.backward();
    optimizer.step(1e-3, optim::grad_clip(optimizer.params(), 1.0).scale);
    optimizer.zero_grad();
  };
  step();
  reset_cpu_peak_memory();
  KernelProfile profile;
  step();
  StepBytes out;
  out.peak_memory = static_cast<double>(cpu_peak_memory_bytes());
  for (const KernelTime& t : profile.totals()) out.kernels[t.name] = {static_cast<double>(t.calls), t.bytes};
  return out;
}

void run_bytes_bench(const BytesOptions& opts) {
  const nn::ModelConfig config = nn::model_preset(opts.preset);
  const int64_t batch = opts.batch > 0 ? opts.batch : preset_batch(opts.preset);
  const Precision precision = opts.precision_name == "bf16" ? Precision::BF16 : Precision::FP32;
  fmt::print("bytes of one training step, config {} at batch {} x {} tokens, products in {}: each kernel's tensors, "
             "each once a call (the least it moves), measured on the CPU at batch 1 and 2 and extrapolated\n",
             opts.preset, batch, config.seq_len, opts.precision_name);
  const StepBytes at_one_sequence = step_bytes(config, 1, precision), at_two = step_bytes(config, 2, precision);
  const std::map<std::string, KernelBytes>&one = at_one_sequence.kernels, &two = at_two.kernels;

  struct Row {
    std::string name;
    double calls = 0, fixed = 0, per_sequence = 0;
    double at_batch(int64_t b) const { return fixed + per_sequence * static_cast<double>(b); }
  };
  std::vector<Row> kernels;
  for (const auto& [name, second] : two) {
    const auto first = one.find(name);
    const double at_one = first == one.end() ? 0.0 : first->second.bytes;
    kernels.push_back({name, second.calls, 2 * at_one - second.bytes, second.bytes - at_one});
  }
  std::vector<Row> kinds(kernel_categories().size() + 1);
  for (size_t c = 0; c < kinds.size(); ++c)
    kinds[c].name = c < kernel_categories().size() ? kernel_categories()[c].name : "other kernels";
  Row all{"all kernels"};
  for (const Row& k : kernels)
    for (Row* sum : {&kinds[category_of(k.name)], &all})
      sum->calls += k.calls, sum->fixed += k.fixed, sum->per_sequence += k.per_sequence;

  const double bandwidth = opts.bandwidth_gb_s * 1e9;
  fmt::print("  {:<40} {:>7} {:>9} {:>12} {:>11} {:>16} {:>6}\n", "kind of kernel", "calls", "fixed GB", "GB/sequence",
             fmt::format("GB at {}", batch), fmt::format("ms at {:.0f} GB/s", opts.bandwidth_gb_s), "share");
  auto print_row = [&](const Row& r) {
    const double bytes = r.at_batch(batch);
    fmt::print("  {:<40} {:>7.0f} {:>9.3f} {:>12.4f} {:>11.2f} {:>16.3f} {:>5.1f}%\n", r.name, r.calls, r.fixed / 1e9,
               r.per_sequence / 1e9, bytes / 1e9, bytes / bandwidth * 1e3, 100 * bytes / all.at_batch(batch));
  };
  for (const Row& r : kinds)
    if (r.calls > 0) print_row(r);
  print_row(all);
  std::sort(kernels.begin(), kernels.end(),
            [&](const Row& a, const Row& b) { return a.at_batch(batch) > b.at_batch(batch); });
  fmt::print("  {}:\n", opts.every_kernel ? "every kernel" : "the 12 kernels with the most bytes");
  for (size_t i = 0; i < (opts.every_kernel ? kernels.size() : std::min<size_t>(kernels.size(), 12)); ++i) {
    Row r = kernels[i];
    r.name = "    " + r.name;
    print_row(r);
  }
  // Not extrapolated: buffers of a fixed size (the LM head's chunk of logits) fill up over the first sequences.
  fmt::print("peak tensor memory of the step (CPU): {:.2f} GB at batch 1, {:.2f} GB at batch 2\n",
             at_one_sequence.peak_memory / 1e9, at_two.peak_memory / 1e9);
}

}  // namespace

void add_bytes_command(CLI::App& app) {
  auto opts = std::make_shared<BytesOptions>();
  CLI::App* cmd = app.add_subcommand("bytes", "the least bytes each kind of kernel moves in one training step at a "
                                              "config's batch (counted on the CPU), and their time at a bandwidth");
  add_preset_options(cmd, opts->preset, opts->batch);
  add_precision_option(cmd, opts->precision_name);
  cmd->add_option("--bandwidth", opts->bandwidth_gb_s, "the memory's peak, GB/s (H200 4800, H100 SXM 3350)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_flag("--every-kernel", opts->every_kernel, "list every kernel, not the 12 with the most bytes");
  cmd->callback([opts] { run_bytes_bench(*opts); });
}

}  // namespace moelab::bench
