// `moe-bench attention`: causal attention's forward and backward alone, on a named config's shapes (its benchmark
// batch of seq_len tokens, n_heads heads of d_model / n_heads dims), ours in fp32 and in bf16 (bf16 tensors, as the
// training step's under mixed precision: on a GPU the tensor-core kernels, the tiled CUDA-core ones in fp32) against
// PyTorch's F.scaled_dot_product_attention on
// the same inputs in the same run (scripts/bench_torch_attention.py): the median ms of each pass, TFLOP/s, and how far
// PyTorch's output and gradients lie from ours in the same precision (relative norm error: a wrong kernel shows as
// ~1, bf16 rounding as ~1e-3).
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>
#include <vector>

#include "apps/moe-bench/bench_util.h"
#include "apps/moe-bench/benches.h"
#include "engine/cuda/runtime.h"
#include "engine/kernels/nn.h"
#include "engine/ops.h"
#include "engine/rng.h"
#include "nn/config.h"
#include "nn/safetensors.h"

namespace moelab::bench {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// One precision's run of our kernels: per timed step the forward's and the backward's ms, and the last results.
struct OurRun {
  Precision precision;
  PassTimes times;
  Tensor out, dq, dk, dv;  // on the CPU
};

// FLOPs of one forward and backward, FlashAttention's count: the forward's two T x T products are 4 B H T^2 Dh,
// halved by the causal mask; the backward's five (the scores again, dp, dv, dq, dk) are 2.5 times that. Useful work:
// our bf16 kernels execute 10 such products (a second q k^T in the forward, the scores and dp in both backward
// kernels), FlashAttention-2 7.
double attention_flops(int64_t B, int64_t T, int64_t H, int64_t Dh) {
  const double forward = 4.0 * B * H * static_cast<double>(T) * T * Dh / 2;
  return forward * 3.5;
}

// bf16: q, k, v, g and the results in bf16 (lse f32), what the training step's attention takes and gives under
// mixed precision (nn/layers.cpp).
OurRun time_ours(const Tensor& q32, const Tensor& k32, const Tensor& v32, const Tensor& g32, Precision precision,
                 const PartBenchOptions& opts) {
  const Device device = q32.device();
  const DType dtype = precision == Precision::BF16 ? DType::BF16 : DType::F32;
  const Tensor q = to_dtype(q32, dtype), k = to_dtype(k32, dtype), v = to_dtype(v32, dtype), g = to_dtype(g32, dtype);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  Tensor out = Tensor::empty(q.shape(), dtype, device), lse = Tensor::empty({B, H, T}, DType::F32, device);
  Tensor dq = Tensor::empty(q.shape(), dtype, device), dk = Tensor::empty(q.shape(), dtype, device),
         dv = Tensor::empty(q.shape(), dtype, device);
  const auto forward = [&] { KERNEL(attention_forward, device)(q, k, v, out, lse, precision); };
  const auto backward = [&] { KERNEL(attention_backward, device)(q, k, v, out, lse, g, dq, dk, dv, precision); };
  const PassTimes times = time_passes(device, opts.warmup, opts.steps, forward, backward);
  auto on_cpu = [](const Tensor& t) { return to_dtype(to_device(t, Device::CPU), DType::F32); };
  return {precision, times, on_cpu(out), on_cpu(dq), on_cpu(dk), on_cpu(dv)};
}

void run_attention_bench(const PartBenchOptions& opts) {
  const nn::ModelConfig config = nn::model_preset(opts.preset);
  const int64_t B = opts.batch > 0 ? opts.batch : preset_batch(opts.preset), T = config.seq_len, H = config.n_heads,
                Dh = config.head_dim();
  const Device device = opts.device();
  const std::string device_name = device == Device::CUDA ? cuda::device_name() : "cpu";
  fmt::print("causal attention, config {}: B {}, T {}, H {}, Dh {}; forward and backward, median of {} after {} "
             "warm-ups, on {}{}\n",
             opts.preset, B, T, H, Dh, opts.steps, opts.warmup, device_name,
             device == Device::CUDA && cuda::is_simulator() ? " (kernels on the CPU, no speed to read)"
             : device == Device::CPU                        ? fmt::format(", {} threads", omp_get_max_threads())
                                                            : "");

  const Shape shape{B, T, H, Dh};
  Generator gen(1234);
  const Tensor q = randn(shape, gen), k = randn(shape, gen), v = randn(shape, gen), g = randn(shape, gen);
  std::vector<OurRun> ours;
  for (Precision precision : {Precision::FP32, Precision::BF16})
    ours.push_back(time_ours(to_device(q, device), to_device(k, device), to_device(v, device), to_device(g, device),
                             precision, opts));

  // Our rows first: they stand even if PyTorch fails or is stopped.
  const double flops = attention_flops(B, T, H, Dh);
  fmt::print("\n{:<26} {:>10} {:>11} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}\n", "variant", "forward ms",
             "backward ms", "total ms", "TFLOP/s", "out err", "dq err", "dk err", "dv err", "ours/it");
  auto row = [&](const std::string& name, double forward, double backward, const std::string& errors,
                 const std::string& ratio) {
    fmt::print("{:<26} {:>10.3f} {:>11.3f} {:>9.3f} {:>8.2f} {} {:>8}\n", name, forward, backward, forward + backward,
               flops / ((forward + backward) * 1e-3) / 1e12, errors, ratio);
  };
  for (const OurRun& run : ours)
    row(fmt::format("moelab {}", enum_name(run.precision)), median(run.times.forward_ms), median(run.times.backward_ms),
        fmt::format("{:>9} {:>9} {:>9} {:>9}", "", "", "", ""), "1.00x");
  std::fflush(stdout);

  ScriptResult torch;
  if (opts.torch) {
    const fs::path folder = fs::temp_directory_path() / fmt::format("moelab_bench_attention_{}", ::getpid());
    fs::create_directories(folder);
    std::vector<nn::NamedTensor> tensors = {{"q", q}, {"k", k}, {"v", v}, {"g", g}};
    for (const OurRun& run : ours)
      for (const auto& [name, t] :
           {std::pair<const char*, const Tensor&>{"out", run.out}, {"dq", run.dq}, {"dk", run.dk}, {"dv", run.dv}})
        tensors.push_back({fmt::format("{}_{}", name, enum_name(run.precision)), t});
    nn::save_safetensors(folder / "attention.safetensors", tensors, {});
    torch = run_part_torch(opts, folder);
    fs::remove_all(folder);
  }
  if (torch.result.is_object()) {
    for (const json& variant : torch.result.at("variants")) {
      const std::string name = fmt::format("torch {}", variant.at("name").get<std::string>());
      if (variant.contains("skipped")) {
        fmt::print("{:<26} skipped: {}\n", name, variant.at("skipped").get<std::string>());
        continue;
      }
      const json& errors = variant.at("errors");
      const double forward = variant.at("forward_ms"), backward = variant.at("backward_ms");
      const auto same = std::find_if(ours.begin(), ours.end(), [&](const OurRun& run) {
        return enum_name(run.precision) == variant.at("precision").get<std::string>();
      });
      if (same == ours.end())
        fail("moe-bench attention: the torch script ran an unknown precision: {}", variant.dump());
      row(name, forward, backward,
          fmt::format("{:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e}", errors.at("out").get<double>(),
                      errors.at("dq").get<double>(), errors.at("dk").get<double>(), errors.at("dv").get<double>()),
          fmt::format("{:.2f}x",
                      (forward + backward) / (median(same->times.forward_ms) + median(same->times.backward_ms))));
    }
    fmt::print("(torch {}; err: ||torch - ours|| / ||ours|| against our run in the same precision; ours/it: its "
               "total ms over ours in that precision, above 1 we are faster; TFLOP/s: {:.3g} FLOPs, the causal half "
               "of the forward's two products and the backward's five)\n",
               torch.result.at("torch").get<std::string>(), flops);
  }
  if (!torch.error.empty()) fmt::print("torch: {}\n", torch.error);
}

}  // namespace

void add_attention_command(CLI::App& app) {
  auto opts = std::make_shared<PartBenchOptions>();
  opts->torch_script = source_script("bench_torch_attention.py");
  CLI::App* cmd = app.add_subcommand("attention", "causal attention's forward and backward on a config's shapes, "
                                                  "fp32 and bf16, against PyTorch's scaled_dot_product_attention");
  add_part_options(cmd, *opts);
  cmd->callback([opts] { run_attention_bench(*opts); });
}

}  // namespace moelab::bench
