#pragma once
// Helpers the moe-bench subcommands share: medians, the presets' batch sizes, a forward and backward's pass timer, and
// running a PyTorch baseline script.
#include <fmt/core.h>
#include <omp.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "engine/cuda/runtime.h"
#include "engine/tensor.h"

namespace moelab::bench {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The batch (sequences) of a named config's benchmarks (docs/model.md, "Named configs").
inline int64_t preset_batch(const std::string& preset) {
  if (preset == "S") return 32;
  if (preset == "M") return 16;
  return 8;  // tiny
}

// scripts/NAME of the source tree the calling apps/moe-bench/*.cpp was compiled from (CMake passes absolute paths;
// this header's own path runs through the build's include links).
inline std::string source_script(const std::string& name,
                                 const std::source_location& caller = std::source_location::current()) {
  const std::filesystem::path repo_root =
      std::filesystem::path(caller.file_name()).parent_path().parent_path().parent_path();
  return (repo_root / "scripts" / name).string();
}

// s in single quotes for sh.
inline std::string shell_quote(const std::string& s) {
  std::string quoted = "'";
  for (char c : s) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// The environment prefix for running `python`: Debian's /usr/bin/python3 (where python3-torch is) gets no
// PYTHONHOME/PYTHONPATH, which belong to the python on PATH.
inline std::string python_env(const std::string& python) {
  return python == "/usr/bin/python3" ? "-u PYTHONHOME -u PYTHONPATH " : "";
}

// The prefix that stops a command after `seconds` (none for 0). --foreground keeps the command in moe-bench's process
// group, so that whatever stops moe-bench (gpu_check.sh's own timeout) stops the script too.
inline std::string timeout_prefix(int seconds) {
  return seconds > 0 ? fmt::format("timeout --foreground -k 5 {} ", seconds) : "";
}

// Each pass's ms per timed step of a forward and a backward (moe-bench attention's and experts').
struct PassTimes {
  std::vector<double> forward_ms, backward_ms;
};
// Runs forward() then backward() warmup + steps times and times the last `steps`: on cuda by events on the device
// (the host's queueing is not timed), on the CPU by the host's clock.
template <class Forward, class Backward>
PassTimes time_passes(Device device, int warmup, int steps, Forward&& forward, Backward&& backward) {
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  PassTimes times;
  for (int step = 0; step < warmup + steps; ++step) {
    double forward_ms = 0, backward_ms = 0;
    if (device == Device::CUDA) {
      cuda::TimingEvent start, middle, end;
      start.record();
      forward();
      middle.record();
      backward();
      end.record();
      forward_ms = middle.ms_since(start), backward_ms = end.ms_since(middle);
    } else {
      const auto start = Clock::now();
      forward();
      const auto middle = Clock::now();
      backward();
      forward_ms = ms(start, middle), backward_ms = ms(middle, Clock::now());
    }
    if (step < warmup) continue;
    times.forward_ms.push_back(forward_ms);
    times.backward_ms.push_back(backward_ms);
  }
  return times;
}

// A shell command's output (what it printed to the pipe) and exit status (pclose's; -1 when it could not start).
struct CommandRun {
  std::string output;
  int status = -1;
  bool stopped_by(int timeout_s) const {  // timeout_prefix(timeout_s) stopped it
    return timeout_s > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 124;
  }
};
inline CommandRun run_command(const std::string& command) {
  CommandRun run;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return run;
  char line[1 << 16];
  while (std::fgets(line, sizeof line, pipe)) run.output += line;
  run.status = pclose(pipe);
  return run;
}

// A baseline script's result (moe-bench attention's and experts'): the last line of its output that starts with '{',
// parsed, or why there is none.
struct ScriptResult {
  nlohmann::json result;  // an object when the script ran through
  std::string error;      // non-empty when it did not: the first line says why, the rest is the command and its output
};
// Runs `command`, which timeout_prefix(timeout_s) starts.
inline ScriptResult run_json_script(const std::string& command, int timeout_s) {
  const CommandRun script = run_command(command);
  if (script.status == -1) return {{}, "could not start: " + command};
  std::string json_line, last;
  std::istringstream lines(script.output);
  for (std::string line; std::getline(lines, line);) {
    last = line;
    if (line.starts_with('{')) json_line = line;
  }
  ScriptResult run;
  try {
    if (script.status == 0) run.result = nlohmann::json::parse(json_line);
  } catch (const nlohmann::json::exception&) {
  }
  while (!last.empty() && last.back() == '\r') last.pop_back();
  if (script.stopped_by(timeout_s))
    run.error = fmt::format("stopped after {} s (--torch-timeout)", timeout_s);
  else if (script.status != 0 || !run.result.is_object())
    run.error = fmt::format("failed ({}): {}\n`{}` printed:\n{}",
                            WIFEXITED(script.status) ? fmt::format("exit {}", WEXITSTATUS(script.status)) : "killed",
                            last, command, script.output);
  return run;
}

// --preset and --batch: a named config, and its sequences per batch (0: the preset's benchmark batch, preset_batch).
inline void add_preset_options(CLI::App* cmd, std::string& preset, int64_t& batch) {
  cmd->add_option("--preset", preset, "model config: tiny, S or M")
      ->check(CLI::IsMember({"tiny", "S", "M"}))
      ->capture_default_str();
  cmd->add_option("--batch", batch, "sequences per batch (default: the preset's, tiny 8, S 32, M 16)");
}

// --precision: our products in fp32, or bf16 operands with f32 accumulation (engine/precision.h's names).
inline void add_precision_option(CLI::App* cmd, std::string& precision_name) {
  cmd->add_option("--precision", precision_name, "our products: fp32, or bf16 operands with f32 accumulation")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
}

// The options of a benchmark of one part of a layer against a PyTorch script on the same inputs (moe-bench attention,
// experts), registered by add_part_options.
struct PartBenchOptions {
  std::string preset = "tiny";
  int64_t batch = 0;  // 0: the preset's benchmark batch
  int steps = 20;
  int warmup = 3;
  std::string device_name = "cpu";
  bool torch = true;
  std::string python = "/usr/bin/python3";  // Debian's python, where python3-torch is
  std::string torch_script;
  int torch_timeout_s = 0;  // 0: none; else the script is stopped after this long

  // The device, checked: cuda needs a backend and a visible device.
  Device device() const {
    if (device_name != "cuda") return Device::CPU;
    if (cuda::device_count() == 0)
      throw std::invalid_argument(cuda::built_with_cuda()
                                      ? "--device cuda: no CUDA device is visible"
                                      : "--device cuda: this build has no CUDA backend (MOELAB_CUDA=ON or SIM)");
    return Device::CUDA;
  }
};
inline void add_part_options(CLI::App* cmd, PartBenchOptions& opts) {
  add_preset_options(cmd, opts.preset, opts.batch);
  cmd->add_option("--steps", opts.steps, "timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--warmup", opts.warmup, "untimed steps first")->capture_default_str();
  cmd->add_option("--device", opts.device_name, "cpu | cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("!--no-torch", opts.torch, "skip PyTorch");
  cmd->add_option("--python", opts.python, "python with torch for the baseline")->capture_default_str();
  cmd->add_option("--torch-script", opts.torch_script, "the baseline script")->capture_default_str();
  cmd->add_option("--torch-timeout", opts.torch_timeout_s, "stop the PyTorch script after this many seconds (0: never)")
      ->capture_default_str();
}

// The PyTorch script of a part benchmark on the inputs in `folder`: {"torch": version, "variants": [...]}, or why not.
inline ScriptResult run_part_torch(const PartBenchOptions& opts, const std::filesystem::path& folder) {
  const std::string command = fmt::format(
      "env {}PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS={} {}{} {} {} --device {} --steps {} --warmup {} 2>&1",
      python_env(opts.python), omp_get_max_threads(), timeout_prefix(opts.torch_timeout_s), shell_quote(opts.python),
      shell_quote(opts.torch_script), shell_quote(folder.string()), opts.device_name, opts.steps, opts.warmup);
  return run_json_script(command, opts.torch_timeout_s);
}

}  // namespace moelab::bench
