// `moe-bench gemm`: GFLOP/s of our sgemm against numpy's matmul (OpenBLAS on Debian) on square fp32 matrices,
// both measured in the same run on the same threads, printed as one table. OpenBLAS runs the fastest kernels this CPU
// supports (OPENBLAS_CORETYPE, chosen from /proc/cpuinfo unless set by the user): Debian's OpenBLAS 0.3.21 does not
// recognise recent AVX-512 CPUs and would fall back to its Prescott (SSE3) kernels, under a quarter of its speed.
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "apps/moe-bench/benches.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/gemm_kernels.h"

namespace moelab::bench {
namespace {

struct GemmBenchOptions {
  std::vector<int64_t> sizes = {256, 512, 1024, 2048};
  int reps = 20;
  std::string python = "/usr/bin/python3";  // Debian's python, whose numpy uses the system OpenBLAS
  std::string numpy_script;
};

// scripts/bench_numpy_gemm.py of the source tree this file was compiled from (CMake passes absolute paths).
std::string default_numpy_script() {
  const std::filesystem::path repo_root = std::filesystem::path(__FILE__).parent_path().parent_path().parent_path();
  return (repo_root / "scripts" / "bench_numpy_gemm.py").string();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// C = A @ B on random [n, n] matrices; best GFLOP/s over `reps` timed calls after two warm-up calls.
double sgemm_gflops(int64_t n, int reps) {
  std::mt19937 rng{uint32_t(n)};
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> A(size_t(n * n)), B(size_t(n * n)), C(size_t(n * n));
  for (float& x : A) x = uniform(rng);
  for (float& x : B) x = uniform(rng);
  auto run = [&] { cpu::sgemm(false, false, n, n, n, 1.0f, A.data(), n, B.data(), n, 0.0f, C.data(), n); };
  run();
  run();
  double best_seconds = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    run();
    best_seconds = std::min(best_seconds, seconds_since(start));
  }
  return 2.0 * double(n) * double(n) * double(n) / best_seconds / 1e9;
}

std::string shell_quote(const std::string& s) {
  std::string quoted = "'";
  for (char c : s) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// The CPU's feature flags (the first "flags" line of /proc/cpuinfo, x86 Linux); empty where there is none.
std::set<std::string> cpu_flags() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::istringstream words(line.substr(colon + 1));
    std::set<std::string> flags;
    for (std::string flag; words >> flag;) flags.insert(flag);
    return flags;
  }
  return {};
}

struct OpenBlasCoreType {
  std::string name;  // the OPENBLAS_CORETYPE the baseline runs with; empty: unset (OpenBLAS detects the CPU itself)
  std::string why;   // for the printout
};

// OPENBLAS_CORETYPE for numpy's OpenBLAS: the user's when set, else the fastest kernel set this CPU supports.
// OpenBLAS's own detection (0.3.21, Debian bookworm) misses CPUs newer than it, e.g. an AVX-512 Xeon or EPYC VM,
// and then falls back to Prescott: about 66 GFLOP/s instead of 300 on 2 cores here.
OpenBlasCoreType openblas_coretype() {
  if (const char* user = std::getenv("OPENBLAS_CORETYPE"); user && *user) return {user, "from your environment"};
  const std::set<std::string> flags = cpu_flags();
  auto has_all = [&](std::initializer_list<const char*> names) {
    return std::all_of(names.begin(), names.end(), [&](const char* f) { return flags.count(f) > 0; });
  };
  if (has_all({"avx512f", "avx512bw", "avx512vl", "avx512dq"})) {
    if (has_all({"avx512_bf16"})) {
      return {"COOPERLAKE", "chosen automatically: the CPU has avx512f, avx512bw, avx512vl, avx512dq and avx512_bf16"};
    }
    return {"SKYLAKEX", "chosen automatically: the CPU has avx512f, avx512bw, avx512vl and avx512dq"};
  }
  if (has_all({"avx2", "fma"})) return {"HASWELL", "chosen automatically: the CPU has avx2 and fma"};
  return {"", "unset: no AVX2+FMA or AVX-512 in /proc/cpuinfo, OpenBLAS picks its kernels itself"};
}

struct NumpyResult {
  std::string blas;                  // what the script says numpy calls
  std::map<int64_t, double> gflops;  // by n
  std::string error;                 // non-empty when the script could not run
};

// Runs the numpy script in a subprocess with its own environment: OPENBLAS_CORETYPE = `coretype` (unset when empty),
// OPENBLAS_L2_SIZE unset (this environment may set it, and it slows a current OpenBLAS), and OpenBLAS/OpenMP on the
// same thread count as ours.
NumpyResult numpy_gflops(const GemmBenchOptions& opts, int threads, const std::string& coretype) {
  NumpyResult result;
  std::string sizes;
  for (int64_t n : opts.sizes) sizes += (sizes.empty() ? "" : ",") + std::to_string(n);
  const std::string coretype_setting = coretype.empty() ? "" : "OPENBLAS_CORETYPE=" + shell_quote(coretype) + " ";
  const std::string command = fmt::format(
      "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE {0}OPENBLAS_NUM_THREADS={1} OMP_NUM_THREADS={1} "
      "{2} {3} --sizes {4} --reps {5} 2>&1",
      coretype_setting, threads, shell_quote(opts.python), shell_quote(opts.numpy_script), sizes, opts.reps);
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) {
    result.error = "could not start: " + command;
    return result;
  }
  std::string output;
  char line[4096];
  while (std::fgets(line, sizeof line, pipe)) {
    output += line;
    std::istringstream fields(line);
    std::string key;
    fields >> key;
    if (key == "blas") {
      std::getline(fields >> std::ws, result.blas);
    } else if (key == "gflops") {
      int64_t n = 0;
      double value = 0.0;
      if (fields >> n >> value) result.gflops[n] = value;
    }
  }
  const int status = pclose(pipe);
  if (status != 0 || result.gflops.empty()) result.error = fmt::format("`{}` failed:\n{}", command, output);
  return result;
}

// The 1-minute load average, or -1 where /proc/loadavg is missing.
double load_average() {
  double load = -1.0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = -1.0;
    std::fclose(f);
  }
  return load;
}

void run_gemm_bench(const GemmBenchOptions& opts) {
  const int threads = omp_get_max_threads();
  const char* kernel = cpu::gemm_detail::sgemm_kernels_for_this_cpu().front()->name;
  fmt::print("sgemm C = A @ B, fp32, square n x n, best of {} after 2 warm-ups, {} threads; our kernel: {}\n",
             opts.reps, threads, kernel);
  // Other work on the cores skews both columns, and our OpenMP threads (which spin while waiting) suffer more.
  const double load = load_average();
  if (load > 1.0) {
    fmt::print("warning: load average {:.1f} before the run: not an idle machine, the numbers are skewed\n", load);
  }

  std::map<int64_t, double> ours;
  for (int64_t n : opts.sizes) ours[n] = sgemm_gflops(n, opts.reps);
  const OpenBlasCoreType coretype = openblas_coretype();
  const NumpyResult numpy = numpy_gflops(opts, threads, coretype.name);
  if (!numpy.error.empty()) fmt::print("numpy baseline unavailable: {}\n", numpy.error);
  fmt::print("numpy OpenBLAS core type: OPENBLAS_CORETYPE={} ({})\n", coretype.name.empty() ? "(unset)" : coretype.name,
             coretype.why);
  if (!numpy.blas.empty()) fmt::print("numpy BLAS: {}\n", numpy.blas);

  fmt::print("\n{:>6}  {:>15}  {:>14}  {:>12}\n", "n", "moelab GFLOP/s", "numpy GFLOP/s", "moelab/numpy");
  for (int64_t n : opts.sizes) {
    const auto it = numpy.gflops.find(n);
    if (it == numpy.gflops.end()) {
      fmt::print("{:>6}  {:>15.1f}  {:>14}  {:>12}\n", n, ours[n], "n/a", "n/a");
    } else {
      fmt::print("{:>6}  {:>15.1f}  {:>14.1f}  {:>11.2f}x\n", n, ours[n], it->second, ours[n] / it->second);
    }
  }
}

}  // namespace

void add_gemm_command(CLI::App& app) {
  auto opts = std::make_shared<GemmBenchOptions>();
  opts->numpy_script = default_numpy_script();
  CLI::App* cmd = app.add_subcommand("gemm", "sgemm GFLOP/s against numpy (OpenBLAS) on square matrices");
  cmd->add_option("--sizes", opts->sizes, "square sizes n, comma-separated")->delimiter(',')->capture_default_str();
  cmd->add_option("--reps", opts->reps, "timed repetitions per size (the best is reported)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--python", opts->python, "python with numpy for the baseline")->capture_default_str();
  cmd->add_option("--numpy-script", opts->numpy_script, "the baseline script")->capture_default_str();
  cmd->callback([opts] { run_gemm_bench(*opts); });
}

}  // namespace moelab::bench
