// `moe-bench train-step`: ms per training step of our engine against the PyTorch twin, measured in the same run on
// the same threads (and the same GPU with --device cuda), from the same weights and the same batch.
//
// The step is the one of apps/common/trainer.cpp (Trainer::train_step) without the data loader: MoEModel::loss
// (forward, CE + alpha LB + z Z (+ beta ED), the per-domain CE the trainer logs), backward, grad_clip, AdamW step,
// zero_grad. The baseline is scripts/bench_torch_step.py (tests/torch/twin.py's model, torch.optim.AdamW) run by
// Debian's /usr/bin/python3 with torch on as many threads as our OpenMP. Both report the median of --steps timed steps
// after --warmup untimed ones, and the loss of their first step (the same weights and batch: it must agree).
// With --device cuda (or --torch-variants) it is a race: our step against each PyTorch variant of the script
// (eager fp32/TF32, eager bf16 with a loop over experts, eager bf16 with torch._grouped_mm, torch.compile of that), in
// one table with tokens/s, the ratio to each, and the model FLOPs utilization (docs/performance.md).
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "apps/moe-bench/bench_step.h"
#include "apps/moe-bench/bench_util.h"
#include "apps/moe-bench/benches.h"
#include "engine/cuda/runtime.h"
#include "engine/precision.h"
#include "engine/profile.h"
#include "moe/model.h"
#include "nn/safetensors.h"
#include "optim/adamw.h"

namespace moelab::bench {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The PyTorch variants of scripts/bench_torch_step.py (--variant), in the order of the table.
const std::vector<std::string> kTorchVariants = {"eager_fp32", "eager_bf16_loop", "eager_bf16_grouped",
                                                 "compile_bf16_grouped"};

struct TrainBenchOptions {
  std::string preset = "tiny";
  int64_t batch = 0;  // 0: the preset's batch (docs/model.md, "Named configs")
  int steps = 20;
  int warmup = 3;
  double alpha = 0.01, z_coef = 0.001, beta = 0.0;
  int64_t domains = 4;  // sequence s has domain s % domains (the ED loss needs >= 2 present)
  double lr = 1e-3, grad_clip = 1.0;
  uint64_t seed = 0;
  std::string device_name = "cpu", precision_name = "fp32";  // the flags; the callback sets the two below
  Device device = Device::CPU;
  Precision precision = Precision::FP32;
  bool torch = true;
  std::vector<std::string> torch_variants;  // empty: eager_fp32 on the CPU, all four on cuda
  int torch_timeout_s = 0;                  // 0: none; else each variant's script is stopped after this long
  bool breakdown = false;                   // time the phases of our step (forward, backward, clip, optimizer)
  std::string expert_gemm = "grouped";      // cuda: how the experts' products run (cuda::ExpertGemm's names)
  bool tf32 = false;                        // cuda: f32 products on TF32 tensor cores (cuda::set_tf32)
  bool bf16_weights = true;                 // bf16: the weights' copies kept by the optimizer (as the trainer)
  bool verbose = false;                     // print every timed step, and every kernel of the breakdown
  std::string python = "/usr/bin/python3";  // Debian's python, where python3-torch is
  std::string torch_script;
};

// Training FLOPs of one step of `tokens` tokens, the usual "6 N D" count plus attention's two T x T products:
//   per token = 6 * N_matmul + 6 * n_layers * T * d
// 6 = 2 FLOPs per multiply-add x 3 (forward, and backward's two products: input and weight gradients).
// N_matmul: the weights one token multiplies: per layer attention's wqkv and wo (4 d^2), then the feed-forward: on an
// MoE layer the router (d E) plus 3 d h per expert it runs and the shared experts' 3 d h each, on a dense layer
// 3 d dense_hidden; and the LM head (d V). "active": the top_k chosen experts; "dense-equivalent": all n_experts, as
// if every token ran every expert. Attention: q k^T and the weighted sum of v are T d multiply-adds each per token and
// layer, over the full T that is 4 T d FLOPs forward and 12 T d for training; the causal mask halves it: 6 T d.
// Not counted: the embedding lookup (no product), norms, softmax, RoPE, the losses, the optimizer.
struct StepFlops {
  double active = 0, dense_equivalent = 0;
};
StepFlops step_flops(const nn::ModelConfig& c, double tokens) {
  const double d = static_cast<double>(c.d_model);
  auto per_token = [&](int64_t experts_run) {
    double weights = static_cast<double>(c.vocab_size) * d;  // LM head
    for (int64_t layer = 0; layer < c.n_layers; ++layer) {
      weights += 4 * d * d;
      if (c.is_moe_layer(layer))
        weights += d * static_cast<double>(c.n_experts) +
                   3 * d * static_cast<double>(c.expert_hidden * (experts_run + c.shared_experts));
      else
        weights += 3 * d * static_cast<double>(c.dense_ffn_hidden());
    }
    return 6 * weights + 6 * static_cast<double>(c.n_layers * c.seq_len) * d;
  };
  return {per_token(c.top_k) * tokens, per_token(c.n_experts) * tokens};
}

// Dense bf16 tensor-core peak (FLOP/s, without sparsity) by device name; 0 when the device is not in the table.
double bf16_peak_flops(const std::string& device_name) {
  if (device_name.find("H100") != std::string::npos && device_name.find("PCIe") != std::string::npos) return 756e12;
  if (device_name.find("H100") != std::string::npos) return 989e12;  // SXM
  if (device_name.find("H200") != std::string::npos) return 989e12;
  return 0;
}

struct StepTimes {
  double first_loss = 0;
  std::vector<double> ms;      // wall clock per timed step
  std::vector<double> cpu_ms;  // CPU time of the process (all its threads) per timed step
  double peak_mem_bytes = -1;  // the tensors' high-water mark: the device pool's (cuda) or the CPU's
  int64_t host_waits = -1;     // times a timed step waited for the device (cuda::host_waits); -1: the CPU
  int64_t padded_calls = -1;   // calls of the experts' products on padded rows in a timed step (cuda); -1: the CPU
  // cuda, per timed step: the host's own work (queueing kernels, its share of the engine), its time blocked in the
  // step's waits, and how long the device still ran after the step's last call returned.
  std::vector<double> host_work_ms, host_blocked_ms, device_tail_ms;
};

// --breakdown's kernel profile: its steps' wall time and each kernel's total over them.
struct KernelBreakdown {
  int steps = 0;
  double wall_ms = 0;
  std::vector<KernelTime> kernels;
};

// The phases of our step, each timed between two device synchronizations (--breakdown).
constexpr int kPhases = 4;
const char* const kPhaseNames[kPhases] = {"forward + loss", "backward", "gradient norm (clip)",
                                          "AdamW step + zero_grad"};

// CPU time of this process, all threads, in ms. On a loaded machine a single-threaded run's CPU time per step is
// close to what the wall time would be on an idle one (the time spent waiting for a core is left out).
double process_cpu_ms() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) * 1e-6;
}

// Trainer::train_step on a fixed batch: loss (with the per-domain CE the trainer logs), backward, clip, AdamW, zero.
// On cuda the kernels run asynchronously: the device is synchronized before every reading of the clock.
StepTimes time_our_steps(moe::MoEModel& model, const Batch& b, const TrainBenchOptions& opts,
                         std::vector<std::vector<double>>& phase_ms, KernelBreakdown& kernels) {
  optim::AdamW optimizer(model.lm().named_parameters(), optim::AdamWConfig{});
  if (opts.precision == Precision::BF16 && opts.bf16_weights) optimizer.keep_bf16_weights();  // as the trainer
  auto sync = [&] {
    if (opts.device == Device::CUDA) cuda::synchronize();
  };
  using Clock = std::chrono::steady_clock;
  auto since = [](Clock::time_point start) {
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  };
  // phases: when non-null, each phase's ms (with a synchronization after it)
  auto step = [&](double* phases) {
    // as Trainer::train_step: the products of the forward and backward, with the weights' bf16 copies under BF16
    PrecisionGuard precision(opts.precision, optimizer.bf16_weights());
    Clock::time_point start = Clock::now();
    auto lap = [&](int phase) {
      if (!phases) return;
      sync();
      phases[phase] = since(start);
      start = Clock::now();
    };
    moe::Loss loss = model.loss(b.inputs, b.targets, b.domains, opts.domains);
    lap(0);
    loss.value.backward();
    lap(1);
    const optim::GradClip clip = optim::grad_clip(optimizer.params(), opts.grad_clip);
    lap(2);
    optimizer.step(opts.lr, clip.scale);
    optimizer.zero_grad();
    lap(3);
    return loss.terms.objective;
  };
  StepTimes out;
  out.first_loss = step(nullptr);
  for (int i = 1; i < opts.warmup; ++i) step(nullptr);
  for (int i = 0; i < opts.steps; ++i) {
    sync();
    const auto start = Clock::now();
    const double cpu_start = process_cpu_ms();
    const int64_t waits_before = cuda::host_waits(), padded_before = cuda::padded_expert_calls();
    const double blocked_before = cuda::host_wait_ms();
    step(nullptr);
    const double queued_ms = since(start), blocked_ms = cuda::host_wait_ms() - blocked_before;
    if (opts.device == Device::CUDA) {
      out.host_waits = cuda::host_waits() - waits_before;
      out.padded_calls = cuda::padded_expert_calls() - padded_before;
    }
    const auto queued = Clock::now();
    sync();
    if (opts.device == Device::CUDA) {
      out.host_work_ms.push_back(queued_ms - blocked_ms);
      out.host_blocked_ms.push_back(blocked_ms);
      out.device_tail_ms.push_back(since(queued));
    }
    out.cpu_ms.push_back(process_cpu_ms() - cpu_start);
    out.ms.push_back(since(start));
  }
  out.peak_mem_bytes =
      static_cast<double>(opts.device == Device::CUDA ? cuda::peak_memory_bytes() : cpu_peak_memory_bytes());
  // The breakdown's synchronizations stop the host from queueing the next phase while the device runs this one, so
  // its steps are extra ones, after the timed steps.
  phase_ms.assign(kPhases, {});
  for (int i = 0; opts.breakdown && i < opts.steps; ++i) {
    double phases[kPhases] = {};
    sync();
    step(phases);
    for (int p = 0; p < kPhases; ++p) phase_ms[p].push_back(phases[p]);
  }
  // Then as many steps again with every kernel timed (extra ones too: the timers' events and clock readings add
  // host work).
  if (opts.breakdown) {
    KernelProfile profile;
    sync();
    const auto start = Clock::now();
    for (int i = 0; i < opts.steps; ++i) step(nullptr);
    sync();
    kernels.wall_ms = since(start);
    kernels.steps = opts.steps;
    kernels.kernels = profile.totals();
  }
  return out;
}

// Who sets the pace of our step on a GPU (docs/performance.md, "Host waits"): while the host is blocked in a wait or
// after its last call the device is busy; the rest of the step is the host's own work, during which the device runs
// what is queued and idles once it has caught up. A step that is almost all host work is host-bound: fewer launches
// or CUDA graphs would help, faster kernels would not.
void print_host_time(const StepTimes& t) {
  const double work = median(t.host_work_ms), blocked = median(t.host_blocked_ms), tail = median(t.device_tail_ms);
  const double busy_share = (blocked + tail) / (work + blocked + tail);
  fmt::print("our step on the host (medians): {:.2f} ms of its own work, {:.2f} ms blocked in its waits, then {:.2f} "
             "ms until the device finished: {}\n",
             work, blocked, tail,
             busy_share < 0.1 ? "host-bound (the device waits for the host)"
                              : fmt::format("the device was known busy for {:.0f}% of it", 100 * busy_share));
}

// The balance of the last step's routing, as what --expert-gemm padded pays: the longest expert's slots times E over
// all slots (1: even; padded runs a layer on padded rows up to 1.5), the least and the most of the MoE layers.
void print_expert_load(const moe::MoEModel& model) {
  double least = INFINITY, most = 0;
  for (const moe::MoELayer* layer : model.moe_layers()) {
    const std::vector<int32_t> counts =
        to_device(layer->last_routing().expert_counts, Device::CPU).to_vector<int32_t>();
    const double slots = std::accumulate(counts.begin(), counts.end(), 0.0);
    const double padded = static_cast<double>(*std::max_element(counts.begin(), counts.end())) * counts.size();
    least = std::min(least, padded / slots), most = std::max(most, padded / slots);
  }
  if (most > 0)
    fmt::print("expert load of the last step: longest expert x E / slots {:.2f} to {:.2f} over the MoE layers "
               "(the padded products' rows per slot)\n",
               least, most);
}

// The kernel breakdown: per category, then the kernels that take the most time (all of them with every_kernel); ms
// per step. GB: the bytes of the
// calls' tensors (each once: the least the kernels move, engine/profile.h), and the rate that makes: a kind far below
// the memory's peak (memory_peak, 0 if unknown) is slower than its traffic requires; one near it needs fewer bytes.
void print_kernel_breakdown(const KernelBreakdown& k, Device device, double memory_peak, bool every_kernel) {
  const double steps = k.steps, wall = k.wall_ms / steps;
  const size_t n_categories = kernel_categories().size() + 1;  // the last one: other kernels
  std::vector<double> category_ms(n_categories, 0.0), category_calls(n_categories, 0.0),
      category_bytes(n_categories, 0.0);
  double kernels_ms = 0;
  for (const KernelTime& t : k.kernels) {
    const size_t c = category_of(t.name);
    category_ms[c] += t.ms / steps;
    category_calls[c] += static_cast<double>(t.calls) / steps;
    category_bytes[c] += t.bytes / steps;
    kernels_ms += t.ms / steps;
  }
  fmt::print("\nkernel breakdown of our step ({} more steps, every kernel timed {}; per step)\n", k.steps,
             device == Device::CUDA ? "by events on the device" : "by the host clock");
  fmt::print("  {:<40} {:>9} {:>6} {:>10} {:>8} {:>8}\n", "kind of kernel", "ms", "share", "calls", "GB", "GB/s");
  auto row = [&](const std::string& name, double ms, double calls, double bytes) {
    fmt::print("  {:<40} {:>9.3f} {:>5.1f}% {:>10}", name, ms, 100 * ms / wall,
               calls >= 0 ? fmt::format("{:.0f}", calls) : "");
    if (bytes >= 0) fmt::print(" {:>8.3f} {:>8.0f}", bytes / 1e9, ms > 0 ? bytes / 1e6 / ms : 0.0);
    fmt::print("\n");
  };
  for (size_t c = 0; c < n_categories; ++c)
    row(c < kernel_categories().size() ? kernel_categories()[c].name : "other kernels", category_ms[c],
        category_calls[c], category_bytes[c]);
  row("outside the kernels (host gaps, copies)", wall - kernels_ms, -1, -1);
  row("step (wall, with the timers)", wall, -1, -1);
  fmt::print("  {}:\n", every_kernel ? "every kernel" : "the most time");
  for (size_t i = 0; i < (every_kernel ? k.kernels.size() : std::min<size_t>(k.kernels.size(), 12)); ++i) {
    const KernelTime& t = k.kernels[i];
    row("    " + t.name, t.ms / steps, static_cast<double>(t.calls) / steps, t.bytes / steps);
  }
  const double total_bytes = std::accumulate(category_bytes.begin(), category_bytes.end(), 0.0);
  fmt::print("  GB: the kernels' tensors, each once a call (the least they move): {:.2f} GB a step{}\n",
             total_bytes / 1e9,
             memory_peak > 0 ? fmt::format(", {:.2f} ms at the memory's peak of {:.0f} GB/s",
                                           total_bytes / memory_peak * 1e3, memory_peak / 1e9)
                             : "");
}

struct TorchResult {
  std::string variant;
  std::string version;
  int threads = 0;
  StepTimes times;
  double first_step_s = 0;     // the first step's wall time (torch.compile compiles there)
  std::string skipped;         // the script's reason when the variant cannot run here
  std::string error;           // non-empty when the script failed
};

// Runs the torch script for one variant on `folder` with OpenMP pinned to `threads`. With the default python
// (Debian's), PYTHONHOME/PYTHONPATH are dropped: they belong to the python on PATH.
TorchResult torch_steps(const TrainBenchOptions& opts, const std::string& variant, const fs::path& folder,
                        int threads) {
  TorchResult result;
  result.variant = variant;
  const std::string command = fmt::format(
      "env {6}PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS={0} {7}{1} {2} {3} --threads {0} --steps {4} --warmup {5} "
      "--device {8} --variant {9} 2>&1",
      threads, shell_quote(opts.python), shell_quote(opts.torch_script), shell_quote(folder.string()), opts.steps,
      opts.warmup, python_env(opts.python), timeout_prefix(opts.torch_timeout_s), enum_name(opts.device), variant);
  const CommandRun run = run_command(command);
  if (run.status == -1) {
    result.error = "could not start: " + command;
    return result;
  }
  std::istringstream lines(run.output);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string key;
    fields >> key;
    if (key == "torch") fields >> result.version;
    if (key == "threads") fields >> result.threads;
    if (key == "first_loss") fields >> result.times.first_loss;
    if (key == "first_step_s") fields >> result.first_step_s;
    if (key == "peak_mem_bytes") fields >> result.times.peak_mem_bytes;
    if (key == "step_ms")
      for (double ms; fields >> ms;) result.times.ms.push_back(ms);
    if (key == "step_cpu_ms")
      for (double ms; fields >> ms;) result.times.cpu_ms.push_back(ms);
    if (key == "skipped") {  // "skipped <variant>: <reason>"
      const size_t colon = line.find(": ");
      result.skipped = colon == std::string::npos ? line : line.substr(colon + 2);
      while (!result.skipped.empty() && result.skipped.back() == '\r') result.skipped.pop_back();
    }
  }
  if (!result.skipped.empty() && run.status == 0) return result;
  if (run.status != 0 || result.times.ms.empty() || result.times.cpu_ms.size() != result.times.ms.size())
    result.error = run.stopped_by(opts.torch_timeout_s)
                       ? fmt::format("stopped after {} s (--torch-timeout)", opts.torch_timeout_s)
                       : fmt::format("`{}` failed:\n{}", command, run.output);
  return result;
}

// The last line of a (possibly multi-line) error, for a table cell.
std::string last_line(const std::string& text) {
  std::string s = text;
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  const size_t nl = s.rfind('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
}

std::string format_bytes(double bytes) {
  if (bytes < 0) return "n/a";
  return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024.0 * 1024.0));
}

void run_train_bench(const TrainBenchOptions& opts) {
  nn::ModelConfig config = nn::model_preset(opts.preset);
  const int64_t batch = opts.batch > 0 ? opts.batch : preset_batch(opts.preset);
  const int threads = omp_get_max_threads();
  if (opts.device == Device::CUDA && cuda::device_count() == 0)
    fail("--device cuda: {}", cuda::built_with_cuda() ? "no CUDA device is visible"
                                                      : "this build has no CUDA backend (MOELAB_CUDA=ON or SIM)");
  std::vector<std::string> variants = opts.torch_variants;
  if (variants.empty())
    variants = opts.device == Device::CUDA ? kTorchVariants : std::vector<std::string>{"eager_fp32"};
  // The CPU's default (eager fp32 against our fp32 on the CPU) prints the table as it always has; anything else is
  // the race table.
  const bool race = opts.device == Device::CUDA || opts.precision != Precision::FP32 ||
                    variants != std::vector<std::string>{"eager_fp32"};
  moe::RouterLossConfig losses;
  losses.alpha = opts.alpha, losses.z_coef = opts.z_coef, losses.beta = opts.beta;
  moe::MoEModel model(config, losses, opts.seed);
  Batch b = make_batch(batch, config.seq_len, config.vocab_size, opts.domains, opts.seed);

  fmt::print("training step, config {}: V {}, d {}, {} layers, {} heads, {} experts top-{} (hidden {}), {} params\n",
             opts.preset, config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.n_experts,
             config.top_k, config.expert_hidden, model.lm().parameter_count());
  fmt::print("batch {} x {} tokens, loss CE + {} LB + {} Z{}, clip {}, AdamW; median of {} steps after {} warm-ups, "
             "{} threads\n",
             batch, config.seq_len, opts.alpha, opts.z_coef,
             opts.beta > 0 ? fmt::format(" + {} ED ({} domains)", opts.beta, opts.domains) : "", opts.grad_clip,
             opts.steps, opts.warmup, threads);
  const std::string device_name = opts.device == Device::CUDA ? cuda::device_name() : "cpu";
  if (race)
    fmt::print("moelab on {}, products in {}{}{}\n",
               opts.device == Device::CPU
                   ? std::string("the CPU")
                   : fmt::format("cuda ({}{})", device_name,
                                 cuda::is_simulator() ? ": kernels on the CPU, no speed to read" : ""),
               enum_name(opts.precision),
               opts.device == Device::CPU
                   ? ""
                   : fmt::format(", expert products {}{}",
                                 opts.expert_gemm == "grouped"  ? "as grouped calls"
                                 : opts.expert_gemm == "padded" ? "padded to the longest expert, strided-batched calls"
                                                                : "one call per expert",
                                 opts.tf32 ? ", f32 products on TF32" : ""),
               opts.precision == Precision::BF16 && !opts.bf16_weights ? ", each product rounding its weights" : "");

  // The torch side starts from these weights and this batch: written before our steps change them.
  fs::path folder;
  if (opts.torch) {
    folder = fs::temp_directory_path() / fmt::format("moelab_bench_train_{}", ::getpid());
    fs::create_directories(folder);
    nn::save_safetensors(folder / "model.safetensors", model.lm().named_parameters(),
                         {{"config", json(config).dump()}});
    nn::save_safetensors(folder / "batch.safetensors",
                         {{"inputs", b.inputs}, {"targets", b.targets}, {"domains", b.domains}});
    optim::AdamWConfig adamw;
    json run = {{"alpha", opts.alpha},
                {"z_coef", opts.z_coef},
                {"beta", opts.beta},
                {"ed_form", enum_name(losses.ed_form)},
                {"ed_eps", losses.ed_eps},
                {"lr", opts.lr},
                {"beta1", adamw.beta1},
                {"beta2", adamw.beta2},
                {"eps", adamw.eps},
                {"weight_decay", adamw.weight_decay},
                {"grad_clip", opts.grad_clip},
                {"num_domains", opts.domains}};
    std::ofstream(folder / "params.json") << run.dump(2);
  }

  // Built on the CPU from the seed, then moved (as the trainer does): the same weights on every device.
  if (opts.device == Device::CUDA) {
    cuda::set_expert_gemm(parse_enum<cuda::ExpertGemm>(opts.expert_gemm, "--expert-gemm"));
    cuda::set_tf32(opts.tf32);
    model.lm().to(Device::CUDA);
    b.inputs = to_device(b.inputs, Device::CUDA);
    b.targets = to_device(b.targets, Device::CUDA);
  }
  std::vector<std::vector<double>> phase_ms;
  KernelBreakdown kernels;
  StepTimes ours = time_our_steps(model, b, opts, phase_ms, kernels);
  const double ours_ms = median(ours.ms);
  std::vector<TorchResult> torch;
  if (opts.torch) {
    for (const std::string& variant : variants) torch.push_back(torch_steps(opts, variant, folder, threads));
    std::error_code ignored;
    fs::remove_all(folder, ignored);
  }

  const double tokens = static_cast<double>(batch * config.seq_len);
  auto print_steps = [](const std::string& who, const std::vector<double>& ms) {
    std::string all;
    for (double t : ms) all += fmt::format(" {:.1f}", t);
    fmt::print("{} step ms:{}\n", who, all);
  };

  if (!race) {  // the CPU table of docs/benchmarks.md
    fmt::print("\n{:<18} {:>9} {:>8} {:>10} {:>11}  {}\n", "", "ms/step", "min ms", "tokens/s", "CPU ms/step",
               "first-step loss");
    auto print_row = [&](const std::string& who, const StepTimes& t) {
      const double ms = median(t.ms);
      fmt::print("{:<18} {:>9.2f} {:>8.2f} {:>10.0f} {:>11.2f}  {:.7f}\n", who, ms,
                 *std::min_element(t.ms.begin(), t.ms.end()), tokens / ms * 1e3, median(t.cpu_ms), t.first_loss);
    };
    print_row("moelab", ours);
    if (opts.verbose) print_steps("moelab", ours.ms);
    if (opts.torch) {
      const TorchResult& t = torch.front();
      if (opts.verbose && !t.times.ms.empty()) print_steps("pytorch", t.times.ms);
      if (!t.error.empty() || !t.skipped.empty()) {
        fmt::print("PyTorch baseline unavailable: {}\n", t.error.empty() ? t.skipped : t.error);
      } else {
        const double torch_ms = median(t.times.ms);
        print_row("pytorch " + t.version, t.times);
        if (t.threads != threads) fmt::print("note: torch ran on {} threads, moelab on {}\n", t.threads, threads);
        const double loss_diff = std::abs(ours.first_loss - t.times.first_loss) / std::abs(t.times.first_loss);
        if (loss_diff > 1e-4)
          fmt::print("warning: the first-step losses differ by {:.2g} (relative): the two sides are not doing the "
                     "same work\n",
                     loss_diff);
        const double cpu_ratio = median(t.times.cpu_ms) / median(ours.cpu_ms);
        fmt::print("\nmoelab is {:.2f}x {} than PyTorch (median wall time; by median CPU time: {:.2f}x)\n",
                   torch_ms >= ours_ms ? torch_ms / ours_ms : ours_ms / torch_ms,
                   torch_ms >= ours_ms ? "faster" : "slower", cpu_ratio);
        fmt::print("(CPU time counts every thread, spinning included: it estimates idle-machine wall time only for 1 "
                   "thread)\n");
      }
    }
  } else {  // the race: one row per side, ours first
    fmt::print("\n{:<27} {:>9} {:>9} {:>10} {:>16} {:>10} {:>8}\n", "variant", "ms/step", "min ms", "tokens/s",
               "first-step loss", "peak mem", "ours/it");
    fmt::print("{:<27} {:>9.2f} {:>9.2f} {:>10.0f} {:>16.7f} {:>10} {:>8}\n",
               fmt::format("moelab {}", enum_name(opts.precision)), ours_ms,
               *std::min_element(ours.ms.begin(), ours.ms.end()), tokens / ours_ms * 1e3, ours.first_loss,
               format_bytes(ours.peak_mem_bytes), "1.00x");
    const TorchResult* fastest = nullptr;
    for (const TorchResult& t : torch) {
      const std::string who = "torch " + t.variant;
      if (!t.skipped.empty()) {
        fmt::print("{:<27} skipped: {}\n", who, t.skipped);
        continue;
      }
      if (!t.error.empty()) {
        fmt::print("{:<27} failed: {}\n", who, last_line(t.error));
        continue;
      }
      const double ms = median(t.times.ms);
      fmt::print("{:<27} {:>9.2f} {:>9.2f} {:>10.0f} {:>16.7f} {:>10} {:>7.2f}x\n", who, ms,
                 *std::min_element(t.times.ms.begin(), t.times.ms.end()), tokens / ms * 1e3, t.times.first_loss,
                 format_bytes(t.times.peak_mem_bytes), ms / ours_ms);
      if (!fastest || ms < median(fastest->times.ms)) fastest = &t;
    }
    if (!torch.empty())
      fmt::print("(ours/it: our tokens/s over its tokens/s, above 1 we are faster; peak mem: torch.cuda's "
                 "max_memory_allocated, ours the memory pool's high-water mark, on the CPU its tensors')\n");
    if (fastest) {
      const double fastest_ms = median(fastest->times.ms);
      fmt::print("fastest PyTorch variant: {} ({:.2f} ms/step); moelab / fastest: {:.2f}x (tokens/s)\n",
                 fastest->variant, fastest_ms, fastest_ms / ours_ms);
    }
    if (ours.host_waits >= 0) {
      fmt::print("our step waits for the device {} times (host syncs; the group sizes need one per MoE layer: {})\n",
                 ours.host_waits, model.moe_layers().size());
      print_host_time(ours);
    }
    if (opts.device == Device::CUDA) print_expert_load(model);
    if (opts.expert_gemm == "padded" && ours.padded_calls >= 0)
      fmt::print("padded products: {} of the step's {} calls (a forward and a backward per MoE layer; the others ran "
                 "as grouped calls)\n",
                 ours.padded_calls, 2 * model.moe_layers().size());
    for (const TorchResult& t : torch) {
      if (!t.skipped.empty() || !t.error.empty()) continue;
      if (!t.version.empty() && &t == &torch.front()) fmt::print("torch version: {}\n", t.version);
      if (t.first_step_s > 10) fmt::print("note: {}'s first step took {:.1f} s\n", t.variant, t.first_step_s);
      // Against f32 on the CPU the losses agree to f32 rounding; TF32, bf16 and other kernels move them by ~1e-3.
      const bool exact = opts.device == Device::CPU && opts.precision == Precision::FP32 && t.variant == "eager_fp32";
      const double loss_diff = std::abs(ours.first_loss - t.times.first_loss) / std::abs(t.times.first_loss);
      if (loss_diff > (exact ? 1e-4 : 1e-2))
        fmt::print("warning: the first-step losses of moelab and {} differ by {:.2g} (relative): not the same work\n",
                   t.variant, loss_diff);
      if (opts.verbose) print_steps(t.variant, t.times.ms);
    }
    if (opts.verbose) print_steps("moelab", ours.ms);
  }

  // Model FLOPs utilization, against the device's dense bf16 peak (whatever --precision: the best the chip offers).
  const StepFlops flops = step_flops(config, tokens);
  const double peak = opts.device == Device::CUDA ? bf16_peak_flops(device_name) : 0;
  if (race) {
    fmt::print("\nFLOPs per step (docs/performance.md): {:.3g} active (top-{}), {:.3g} dense-equivalent (all {} "
               "experts)\n",
               flops.active, config.top_k, flops.dense_equivalent, config.n_experts);
    if (peak > 0) {
      auto mfu = [&](double ms) {
        return fmt::format("{:.1f}% active, {:.1f}% dense-equivalent", 100 * flops.active / (ms * 1e-3) / peak,
                           100 * flops.dense_equivalent / (ms * 1e-3) / peak);
      };
      fmt::print("MFU against {} bf16 dense peak {:.0f} TFLOP/s: moelab {}\n", device_name, peak / 1e12, mfu(ours_ms));
      for (const TorchResult& t : torch)
        if (t.skipped.empty() && t.error.empty()) fmt::print("MFU torch {}: {}\n", t.variant, mfu(median(t.times.ms)));
    } else {
      fmt::print("MFU: not shown ({})\n", opts.device == Device::CPU
                                              ? "GPU only"
                                              : fmt::format("{} is not in the peak table: H100, H200", device_name));
    }
  }

  if (opts.breakdown) {
    double total = 0;
    for (int p = 0; p < kPhases; ++p) total += median(phase_ms[p]);
    fmt::print("\nphase breakdown of our step ({} more steps; medians; the device synchronized after each phase: "
               "phases, not kernels)\n",
               opts.steps);
    for (int p = 0; p < kPhases; ++p)
      fmt::print("  {:<24} {:>9.2f} ms {:>5.1f}%\n", kPhaseNames[p], median(phase_ms[p]),
                 100 * median(phase_ms[p]) / total);
    fmt::print("  {:<24} {:>9.2f} ms (the timed steps' median, without these synchronizations: {:.2f} ms)\n", "sum",
               total, ours_ms);
    print_kernel_breakdown(kernels, opts.device, opts.device == Device::CUDA ? memory_peak_bytes_per_s(device_name) : 0,
                           opts.verbose);
  }
}

}  // namespace

void add_train_step_command(CLI::App& app) {
  auto opts = std::make_shared<TrainBenchOptions>();
  opts->torch_script = source_script("bench_torch_step.py");
  CLI::App* cmd = app.add_subcommand("train-step", "ms per training step (forward, loss, backward, clip, AdamW) "
                                                   "against the PyTorch twin, on the CPU or a GPU");
  add_preset_options(cmd, opts->preset, opts->batch);
  cmd->add_option("--steps", opts->steps, "timed steps (the median is reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--warmup", opts->warmup, "untimed steps before (at least 1 is always run)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--alpha", opts->alpha, "load-balancing coefficient")->capture_default_str();
  cmd->add_option("--z-coef", opts->z_coef, "router z-loss coefficient")->capture_default_str();
  cmd->add_option("--beta", opts->beta, "expert-divergence coefficient (0: no ED)")->capture_default_str();
  cmd->add_option("--domains", opts->domains, "domains in the batch (sequence s has domain s % domains)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--lr", opts->lr, "constant learning rate")->capture_default_str();
  cmd->add_option("--grad-clip", opts->grad_clip, "max global gradient norm (0: no clipping)")->capture_default_str();
  cmd->add_option("--seed", opts->seed, "model init and batch seed")->capture_default_str();
  cmd->add_option("--device", opts->device_name, "where our step runs: cpu or cuda (the torch side runs there too)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  add_precision_option(cmd, opts->precision_name);
  cmd->add_option("--torch-variants", opts->torch_variants,
                  "PyTorch variants, comma-separated: eager_fp32, eager_bf16_loop, eager_bf16_grouped, "
                  "compile_bf16_grouped (default: eager_fp32 on the CPU, all four on cuda)")
      ->delimiter(',')
      ->check(CLI::IsMember(kTorchVariants));
  cmd->add_option("--torch-timeout", opts->torch_timeout_s, "stop each variant's script after this many s (0: never)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_flag("--breakdown", opts->breakdown,
                "then time our step's phases (a synchronization after each), and every kernel (extra steps)");
  cmd->add_option("--expert-gemm", opts->expert_gemm,
                  "cuda: the experts' products as one grouped cuBLAS call per product (bf16: forward bf16, backward "
                  "TF32 calls on bf16 values), as one strided-batched call on rows padded to the longest "
                  "expert's, or one call per "
                  "expert")
      ->check(CLI::IsMember({"grouped", "padded", "per-expert"}))
      ->capture_default_str();
  cmd->add_flag("--tf32", opts->tf32, "cuda: f32 products on TF32 tensor cores (our fp32 is strict f32 otherwise)");
  cmd->add_flag("!--no-torch", opts->torch, "time only our engine (e.g. under a profiler)");
  cmd->add_flag("!--no-bf16-weights", opts->bf16_weights,
                "bf16: no bf16 copies of the weights kept by the optimizer; each product rounds its weights (the "
                "cost the copies save)");
  cmd->add_flag("--verbose", opts->verbose,
                "print every timed step's ms (to see the noise of a loaded machine), and every kernel of --breakdown");
  cmd->add_option("--python", opts->python, "python with torch for the baseline")->capture_default_str();
  cmd->add_option("--torch-script", opts->torch_script, "the baseline script")->capture_default_str();
  cmd->callback([opts] {
    opts->device = opts->device_name == "cuda" ? Device::CUDA : Device::CPU;
    opts->precision = opts->precision_name == "bf16" ? Precision::BF16 : Precision::FP32;
    run_train_bench(*opts);
  });
}

}  // namespace moelab::bench
