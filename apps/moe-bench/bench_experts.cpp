// `moe-bench experts`: one MoE layer's experts alone (the moe_experts op: the dispatch plan, the permutation, three
// products per expert with the SwiGLU between them, the weighted un-permute), forward and backward, on a named
// config's shapes: its benchmark batch of seq_len tokens, each routed to top_k of n_experts experts of expert_hidden.
// Ours in fp32 and bf16 and every way of running the products (cuda::ExpertGemm: grouped, padded, per-expert),
// against PyTorch on the same inputs in the same run (scripts/bench_torch_experts.py): a loop over the experts in
// fp32 and bf16, and torch._grouped_mm in bf16. The median ms of each pass, TFLOP/s, and how far each run's output
// and gradients lie from our grouped run in the same precision (relative norm error: a wrong kernel shows as ~1,
// bf16 rounding as ~1e-3, another order of f32 sums as ~1e-7).
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "apps/moe-bench/bench_util.h"
#include "apps/moe-bench/benches.h"
#include "engine/autograd.h"
#include "engine/cuda/runtime.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "engine/rng.h"
#include "moe/dispatch.h"
#include "nn/config.h"
#include "nn/safetensors.h"

namespace moelab::bench {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The op's inputs and the output gradient, on the CPU: x [N, d], ids and gates [N, k], w_gate and w_up [E, h, d],
// w_down [E, d, h], dy [N, d].
struct Inputs {
  Tensor x, ids, gates, w_gate, w_up, w_down, dy;
};

// Each token picks k distinct experts uniformly (about what a router at initialization does) with positive gates
// that sum to 1; weights scaled to keep the activations of order 1.
Inputs make_inputs(const nn::ModelConfig& c, int64_t tokens) {
  const int64_t d = c.d_model, h = c.expert_hidden, E = c.n_experts, k = c.top_k;
  Generator gen(1234);
  Inputs in;
  in.x = randn({tokens, d}, gen);
  in.w_gate = randn({E, h, d}, gen, 0.0, 1 / std::sqrt(double(d)));
  in.w_up = randn({E, h, d}, gen, 0.0, 1 / std::sqrt(double(d)));
  in.w_down = randn({E, d, h}, gen, 0.0, 1 / std::sqrt(double(h)));
  in.dy = randn({tokens, d}, gen);
  std::mt19937 pick(99);
  std::uniform_real_distribution<float> weight(0.5f, 1.0f);
  std::vector<int32_t> experts(E), ids;
  std::iota(experts.begin(), experts.end(), 0);
  std::vector<float> gates;
  for (int64_t n = 0; n < tokens; ++n) {
    float total = 0;
    for (int64_t j = 0; j < k; ++j) {  // a partial shuffle: the first k are a uniform choice
      std::swap(experts[j], experts[j + std::uniform_int_distribution<int64_t>(0, E - 1 - j)(pick)]);
      ids.push_back(experts[j]);
      gates.push_back(weight(pick));
      total += gates.back();
    }
    for (int64_t j = 0; j < k; ++j) gates[n * k + j] /= total;
  }
  in.ids = from_vector(ids, {tokens, k});
  in.gates = from_vector(gates, {tokens, k});
  return in;
}

// The names of the results, in the order of OurRun::results and of the torch script's errors.
constexpr const char* kResultNames[] = {"y", "dx", "dgates", "dw_gate", "dw_up", "dw_down"};

// One (precision, way) of our runs: per timed step the forward's and the backward's ms, and the last results.
struct OurRun {
  std::string name;  // "moelab bf16 padded"; on the CPU without the way
  Precision precision;
  PassTimes times;
  std::vector<Tensor> results;  // y and the gradients of x, gates, w_gate, w_up, w_down: on the CPU
};

// FLOPs of a forward and backward: 3 products forward, 6 backward, each 2 S d h over all the experts (S = N k).
double experts_flops(int64_t slots, int64_t d, int64_t h) { return 18.0 * slots * d * h; }

// The op's forward, then its backward function called with dy directly (the gradients, no accumulation).
OurRun time_ours(const Inputs& cpu_in, Device device, Precision precision, cuda::ExpertGemm expert_gemm,
                 const PartBenchOptions& opts) {
  std::optional<cuda::ExpertGemmScope> scope;  // the ways exist on a GPU only
  if (device == Device::CUDA) scope.emplace(expert_gemm);
  const PrecisionGuard guard(precision);
  auto leaf = [&](const Tensor& t) { return to_device(t, device).set_requires_grad(); };
  const Tensor x = leaf(cpu_in.x), gates = leaf(cpu_in.gates), w_gate = leaf(cpu_in.w_gate), w_up = leaf(cpu_in.w_up),
               w_down = leaf(cpu_in.w_down), ids = to_device(cpu_in.ids, device), dy = to_device(cpu_in.dy, device);
  OurRun run{fmt::format("moelab {}{}", enum_name(precision),
                         device == Device::CUDA ? fmt::format(" {}", enum_name(expert_gemm)) : ""),
             precision,
             {},
             {}};
  Tensor y;
  std::vector<Tensor> grads;
  const auto forward = [&] { y = moe::moe_experts(x, ids, gates, w_gate, w_up, w_down); };
  const auto backward = [&] {
    NoGradGuard no_grad;  // as Tensor::backward runs backward functions
    grads = y.grad_fn()->backward(dy);
  };
  run.times = time_passes(device, opts.warmup, opts.steps, forward, backward);  // on cuda the plan's wait is forward's
  run.results = {to_device(y.detach(), Device::CPU)};
  for (size_t i : {0, 2, 3, 4, 5}) run.results.push_back(to_device(grads[i], Device::CPU));  // not ids' (1)
  return run;
}

double relative_error(const Tensor& x, const Tensor& reference) {
  const std::vector<double> a = to_dtype(x, DType::F64).to_vector<double>(),
                            b = to_dtype(reference, DType::F64).to_vector<double>();
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) diff += (a[i] - b[i]) * (a[i] - b[i]), norm += b[i] * b[i];
  return std::sqrt(diff / norm);
}

// Where each expert's slots start in expert order, and where the last ends (DispatchPlan::host_offsets' form).
std::vector<int32_t> expert_offsets(const Tensor& ids, int64_t n_experts) {
  std::vector<int32_t> offsets(n_experts + 1, 0);
  for (int32_t e : ids.to_vector<int32_t>()) ++offsets[e + 1];
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  return offsets;
}

void run_experts_bench(const PartBenchOptions& opts) {
  const nn::ModelConfig config = nn::model_preset(opts.preset);
  const int64_t B = opts.batch > 0 ? opts.batch : preset_batch(opts.preset), N = B * config.seq_len, d = config.d_model,
                h = config.expert_hidden, E = config.n_experts, k = config.top_k;
  const Device device = opts.device();
  const Inputs in = make_inputs(config, N);
  fmt::print("MoE experts, config {}: N {} tokens (B {} x T {}), d {}, {} experts of h {}, top-{}; forward and "
             "backward, median of {} after {} warm-ups, on {}{}\n",
             opts.preset, N, B, config.seq_len, d, E, h, k, opts.steps, opts.warmup,
             device == Device::CUDA ? cuda::device_name() : "cpu",
             device == Device::CUDA && cuda::is_simulator() ? " (kernels on the CPU, no speed to read)"
             : device == Device::CPU                        ? fmt::format(", {} threads", omp_get_max_threads())
                                                            : "");
  const std::vector<int32_t> offsets = expert_offsets(in.ids, E);
  int32_t longest = 0;
  for (int64_t e = 0; e < E; ++e) longest = std::max(longest, offsets[e + 1] - offsets[e]);
  fmt::print("routing: uniform random, the longest expert x E / slots {:.3f} (the padded products' rows per slot{})\n",
             static_cast<double>(longest) * E / offsets.back(),
             device == Device::CPU             ? ""
             : cuda::pads_expert_rows(offsets) ? "; padded runs padded"
                                               : "; padded runs grouped: too much padding");

  // The ways of running the products exist on a GPU only; the CPU has one.
  std::vector<OurRun> ours;
  for (Precision precision : {Precision::FP32, Precision::BF16})
    for (cuda::ExpertGemm way : {cuda::ExpertGemm::Grouped, cuda::ExpertGemm::Padded, cuda::ExpertGemm::PerExpert}) {
      if (device == Device::CPU && way != cuda::ExpertGemm::Grouped) continue;
      if (precision == Precision::FP32 && way == cuda::ExpertGemm::PerExpert) continue;  // grouped f32 is per expert
      ours.push_back(time_ours(in, device, precision, way, opts));
    }

  // Our rows first: they stand even if PyTorch fails or is stopped.
  const double flops = experts_flops(N * k, d, h);
  fmt::print("\n{:<28} {:>10} {:>11} {:>9} {:>8}", "variant", "forward ms", "backward ms", "total ms", "TFLOP/s");
  for (const char* name : kResultNames) fmt::print(" {:>8}", name);
  fmt::print(" {:>8}\n", "ours/it");
  auto row = [&](const std::string& name, double forward, double backward, const std::vector<double>& errors,
                 const std::string& ratio) {
    fmt::print("{:<28} {:>10.3f} {:>11.3f} {:>9.3f} {:>8.2f}", name, forward, backward, forward + backward,
               flops / ((forward + backward) * 1e-3) / 1e12);
    for (double e : errors) fmt::print(" {:>8.1e}", e);
    fmt::print(" {:>8}\n", ratio);
  };
  auto reference = [&](const std::string& precision) -> const OurRun& {  // our grouped run in that precision
    return *std::find_if(ours.begin(), ours.end(),
                         [&](const OurRun& r) { return enum_name(r.precision) == precision; });
  };
  for (const OurRun& run : ours) {
    const OurRun& ref = reference(enum_name(run.precision));
    std::vector<double> errors;
    for (size_t i = 0; i < run.results.size(); ++i) errors.push_back(relative_error(run.results[i], ref.results[i]));
    row(run.name, median(run.times.forward_ms), median(run.times.backward_ms), errors, "");
  }
  if (device == Device::CUDA)
    fmt::print("(fp32 grouped: the grouped call takes f32 on TF32 only, so strict f32 runs one call per expert)\n");
  std::fflush(stdout);

  ScriptResult torch;
  if (opts.torch) {
    const fs::path folder = fs::temp_directory_path() / fmt::format("moelab_bench_experts_{}", ::getpid());
    fs::create_directories(folder);
    std::vector<nn::NamedTensor> tensors = {{"x", in.x},           {"ids", in.ids},   {"gates", in.gates},
                                            {"w_gate", in.w_gate}, {"w_up", in.w_up}, {"w_down", in.w_down},
                                            {"dy", in.dy}};
    for (const char* precision : {"fp32", "bf16"})
      for (size_t i = 0; i < std::size(kResultNames); ++i)
        tensors.push_back({fmt::format("{}_{}", kResultNames[i], precision), reference(precision).results[i]});
    nn::save_safetensors(folder / "experts.safetensors", tensors, {});
    torch = run_part_torch(opts, folder);
    fs::remove_all(folder);
  }
  if (torch.result.is_object()) {
    for (const json& variant : torch.result.at("variants")) {
      const std::string name = fmt::format("torch {}", variant.at("name").get<std::string>());
      if (variant.contains("skipped")) {
        fmt::print("{:<28} skipped: {}\n", name, variant.at("skipped").get<std::string>());
        continue;
      }
      const std::string precision = variant.at("precision").get<std::string>();
      if (precision != "fp32" && precision != "bf16")
        fail("moe-bench experts: the torch script ran an unknown precision: {}", variant.dump());
      std::vector<double> errors;  // null where it was not finite
      for (const char* result : kResultNames) {
        const json& error = variant.at("errors").at(result);
        errors.push_back(error.is_number() ? error.get<double>() : NAN);
      }
      double fastest_ours = INFINITY;  // our fastest way in that precision
      for (const OurRun& run : ours)
        if (enum_name(run.precision) == precision)
          fastest_ours = std::min(fastest_ours, median(run.times.forward_ms) + median(run.times.backward_ms));
      const double forward = variant.at("forward_ms"), backward = variant.at("backward_ms");
      row(name, forward, backward, errors, fmt::format("{:.2f}x", (forward + backward) / fastest_ours));
    }
    fmt::print("(torch {}; errors: ||it - ours|| / ||ours|| against our grouped run in the same precision; ours/it: "
               "its total ms over our fastest way's in that precision, above 1 we are faster; TFLOP/s: {:.3g} "
               "FLOPs, the forward's 3 products and the backward's 6)\n",
               torch.result.at("torch").get<std::string>(), flops);
  }
  if (!torch.error.empty()) fmt::print("torch: {}\n", torch.error);
}

}  // namespace

void add_experts_command(CLI::App& app) {
  auto opts = std::make_shared<PartBenchOptions>();
  opts->torch_script = source_script("bench_torch_experts.py");
  CLI::App* cmd = app.add_subcommand("experts", "one MoE layer's experts, forward and backward, on a config's shapes, "
                                                "every way of running the products, against PyTorch");
  add_part_options(cmd, *opts);
  cmd->callback([opts] { run_experts_bench(*opts); });
}

}  // namespace moelab::bench
