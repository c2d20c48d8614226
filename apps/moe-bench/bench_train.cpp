// `moe-bench train-step`: ms per training step of our engine against the PyTorch twin on the CPU, measured in the
// same run on the same threads, from the same weights and the same batch.
//
// The step is the one of apps/common/trainer.cpp (Trainer::train_step) without the data loader: MoEModel::loss
// (forward, CE + alpha LB + z Z (+ beta ED), the per-domain CE the trainer logs), backward, clip_grad_norm, AdamW step,
// zero_grad. The baseline is scripts/bench_torch_step.py (tests/torch/twin.py's model, torch.optim.AdamW) run by
// Debian's /usr/bin/python3 with torch on as many threads as our OpenMP. Both report the median of --steps timed steps
// after --warmup untimed ones, and the loss of their first step (the same weights and batch: it must agree).
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "apps/moe-bench/benches.h"
#include "moe/model.h"
#include "nn/safetensors.h"
#include "optim/adamw.h"

namespace moelab::bench {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct TrainBenchOptions {
  std::string preset = "tiny";
  int64_t batch = 0;  // 0: the preset's batch (docs/model.md, "Named configs")
  int steps = 20;
  int warmup = 3;
  double alpha = 0.01, z_coef = 0.001, beta = 0.0;
  int64_t domains = 4;  // sequence s has domain s % domains (the ED loss needs >= 2 present)
  double lr = 1e-3, grad_clip = 1.0;
  uint64_t seed = 0;
  bool torch = true;
  bool verbose = false;  // print every timed step
  std::string python = "/usr/bin/python3";  // Debian's python, where python3-torch is
  std::string torch_script;
};

int64_t preset_batch(const std::string& preset) {
  if (preset == "S") return 32;
  if (preset == "M") return 16;
  return 8;  // tiny
}

// scripts/bench_torch_step.py of the source tree this file was compiled from (CMake passes absolute paths).
std::string default_torch_script() {
  const fs::path repo_root = fs::path(__FILE__).parent_path().parent_path().parent_path();
  return (repo_root / "scripts" / "bench_torch_step.py").string();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string shell_quote(const std::string& s) {
  std::string quoted = "'";
  for (char c : s) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

struct Batch {
  Tensor inputs, targets, domains;  // i32 [B, T], [B*T], [B]
};

// Seeded random tokens; sequence s has domain s % domains.
Batch make_batch(int64_t batch, int64_t seq, int64_t vocab, int64_t domains, uint64_t seed) {
  std::mt19937_64 rng(seed + 1);
  std::vector<int32_t> inputs(batch * seq), targets(batch * seq), dom(batch);
  for (int32_t& v : inputs) v = static_cast<int32_t>(rng() % vocab);
  for (int32_t& v : targets) v = static_cast<int32_t>(rng() % vocab);
  for (int64_t s = 0; s < batch; ++s) dom[s] = static_cast<int32_t>(s % domains);
  return {from_vector(inputs, {batch, seq}), from_vector(targets, {batch * seq}), from_vector(dom, {batch})};
}

struct StepTimes {
  double first_loss = 0;
  std::vector<double> ms;      // wall clock per timed step
  std::vector<double> cpu_ms;  // CPU time of the process (all its threads) per timed step
};

// CPU time of this process, all threads, in ms. On a loaded machine a single-threaded run's CPU time per step is
// close to what the wall time would be on an idle one (the time spent waiting for a core is left out).
double process_cpu_ms() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) * 1e-6;
}

// Trainer::train_step on a fixed batch: loss (with the per-domain CE the trainer logs), backward, clip, AdamW, zero.
StepTimes time_our_steps(moe::MoEModel& model, const Batch& b, const TrainBenchOptions& opts) {
  optim::AdamW optimizer(model.lm().named_parameters(), optim::AdamWConfig{});
  auto step = [&] {
    moe::Loss loss = model.loss(b.inputs, b.targets, b.domains, opts.domains);
    loss.value.backward();
    optim::clip_grad_norm(optimizer.params(), opts.grad_clip);
    optimizer.step(opts.lr);
    optimizer.zero_grad();
    return loss.terms.objective;
  };
  StepTimes out;
  out.first_loss = step();
  for (int i = 1; i < opts.warmup; ++i) step();
  for (int i = 0; i < opts.steps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = process_cpu_ms();
    step();
    out.cpu_ms.push_back(process_cpu_ms() - cpu_start);
    out.ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  return out;
}

struct TorchResult {
  std::string version;
  int threads = 0;
  StepTimes times;
  std::string error;  // non-empty when the script could not run
};

// Runs the torch script on `folder` with PYTHONHOME/PYTHONPATH dropped (they belong to the python on PATH) and
// OpenMP pinned to `threads`.
TorchResult torch_steps(const TrainBenchOptions& opts, const fs::path& folder, int threads) {
  TorchResult result;
  const std::string command = fmt::format(
      "env -u PYTHONHOME -u PYTHONPATH PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS={0} {1} {2} {3} --threads {0} "
      "--steps {4} --warmup {5} 2>&1",
      threads, shell_quote(opts.python), shell_quote(opts.torch_script), shell_quote(folder.string()), opts.steps,
      opts.warmup);
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) {
    result.error = "could not start: " + command;
    return result;
  }
  std::string output;
  char line[1 << 16];
  while (std::fgets(line, sizeof line, pipe)) {
    output += line;
    std::istringstream fields(line);
    std::string key;
    fields >> key;
    if (key == "torch") fields >> result.version;
    if (key == "threads") fields >> result.threads;
    if (key == "first_loss") fields >> result.times.first_loss;
    if (key == "step_ms")
      for (double ms; fields >> ms;) result.times.ms.push_back(ms);
    if (key == "step_cpu_ms")
      for (double ms; fields >> ms;) result.times.cpu_ms.push_back(ms);
  }
  const int status = pclose(pipe);
  if (status != 0 || result.times.ms.empty() || result.times.cpu_ms.size() != result.times.ms.size()) result.error = fmt::format("`{}` failed:\n{}", command, output);
  return result;
}

void run_train_bench(const TrainBenchOptions& opts) {
  nn::ModelConfig config = nn::model_preset(opts.preset);
  const int64_t batch = opts.batch > 0 ? opts.batch : preset_batch(opts.preset);
  const int threads = omp_get_max_threads();
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

  // The torch side starts from these weights and this batch: written before our steps change them.
  fs::path folder;
  if (opts.torch) {
    folder = fs::temp_directory_path() / fmt::format("moelab_bench_train_{}", ::getpid());
    fs::create_directories(folder);
    nn::save_safetensors(folder / "model.safetensors", model.lm().named_parameters(), {{"config", json(config).dump()}});
    nn::save_safetensors(folder / "batch.safetensors",
                         {{"inputs", b.inputs}, {"targets", b.targets}, {"domains", b.domains}});
    optim::AdamWConfig adamw;
    json run = {{"alpha", opts.alpha}, {"z_coef", opts.z_coef}, {"beta", opts.beta}, {"ed_form", enum_name(losses.ed_form)},
                {"ed_eps", losses.ed_eps}, {"lr", opts.lr}, {"beta1", adamw.beta1}, {"beta2", adamw.beta2},
                {"eps", adamw.eps}, {"weight_decay", adamw.weight_decay}, {"grad_clip", opts.grad_clip},
                {"num_domains", opts.domains}};
    std::ofstream(folder / "params.json") << run.dump(2);
  }

  StepTimes ours = time_our_steps(model, b, opts);
  const double ours_ms = median(ours.ms);
  TorchResult torch;
  if (opts.torch) {
    torch = torch_steps(opts, folder, threads);
    std::error_code ignored;
    fs::remove_all(folder, ignored);
  }

  const double tokens = static_cast<double>(batch * config.seq_len);
  fmt::print("\n{:<18} {:>9} {:>8} {:>10} {:>11}  {}\n", "", "ms/step", "min ms", "tokens/s", "CPU ms/step",
             "first-step loss");
  auto print_row = [&](const std::string& who, const StepTimes& t) {
    const double ms = median(t.ms);
    fmt::print("{:<18} {:>9.2f} {:>8.2f} {:>10.0f} {:>11.2f}  {:.7f}\n", who, ms, *std::min_element(t.ms.begin(), t.ms.end()),
               tokens / ms * 1e3, median(t.cpu_ms), t.first_loss);
  };
  print_row("moelab", ours);
  auto print_steps = [](const char* who, const std::vector<double>& ms) {
    std::string all;
    for (double t : ms) all += fmt::format(" {:.1f}", t);
    fmt::print("{} step ms:{}\n", who, all);
  };
  if (opts.verbose) print_steps("moelab", ours.ms);
  if (!opts.torch) return;
  if (opts.verbose && !torch.times.ms.empty()) print_steps("pytorch", torch.times.ms);
  if (!torch.error.empty()) {
    fmt::print("PyTorch baseline unavailable: {}\n", torch.error);
    return;
  }
  const double torch_ms = median(torch.times.ms);
  print_row("pytorch " + torch.version, torch.times);
  if (torch.threads != threads) fmt::print("note: torch ran on {} threads, moelab on {}\n", torch.threads, threads);
  const double loss_diff = std::abs(ours.first_loss - torch.times.first_loss) / std::abs(torch.times.first_loss);
  if (loss_diff > 1e-4)
    fmt::print("warning: the first-step losses differ by {:.2g} (relative): the two sides are not doing the same "
               "work\n", loss_diff);
  const double cpu_ratio = median(torch.times.cpu_ms) / median(ours.cpu_ms);
  fmt::print("\nmoelab is {:.2f}x {} than PyTorch (median wall time; by median CPU time: {:.2f}x)\n",
             torch_ms >= ours_ms ? torch_ms / ours_ms : ours_ms / torch_ms, torch_ms >= ours_ms ? "faster" : "slower",
             cpu_ratio);
  fmt::print("(CPU time counts every thread, spinning included: it estimates idle-machine wall time only for 1 thread)\n");
}

}  // namespace

void add_train_step_command(CLI::App& app) {
  auto opts = std::make_shared<TrainBenchOptions>();
  opts->torch_script = default_torch_script();
  CLI::App* cmd = app.add_subcommand("train-step", "ms per training step (forward, loss, backward, clip, AdamW) "
                                                   "against the PyTorch twin on the CPU");
  cmd->add_option("--preset", opts->preset, "model config: tiny, S or M")
      ->check(CLI::IsMember({"tiny", "S", "M"}))
      ->capture_default_str();
  cmd->add_option("--batch", opts->batch, "sequences per batch (default: the preset's, tiny 8, S 32, M 16)");
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
  cmd->add_flag("!--no-torch", opts->torch, "time only our engine (e.g. under a profiler)");
  cmd->add_flag("--verbose", opts->verbose, "print every timed step's ms (to see the noise of a loaded machine)");
  cmd->add_option("--python", opts->python, "python with torch for the baseline")->capture_default_str();
  cmd->add_option("--torch-script", opts->torch_script, "the baseline script")->capture_default_str();
  cmd->callback([opts] { run_train_bench(*opts); });
}

}  // namespace moelab::bench
