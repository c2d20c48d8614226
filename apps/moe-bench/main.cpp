// moe-bench: benchmarks, one subcommand each (`moe-bench --help` lists them). Benchmarks print tables, not tests:
// nothing here passes or fails.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <exception>

#include "apps/moe-bench/benches.h"

int main(int argc, char** argv) {
  CLI::App app{"moe-bench: moelab benchmarks"};
  app.require_subcommand(1);
  moelab::bench::add_gemm_command(app);
  moelab::bench::add_train_step_command(app);
  moelab::bench::add_optim_command(app);
  moelab::bench::add_attention_command(app);
  moelab::bench::add_experts_command(app);
  moelab::bench::add_bytes_command(app);
  try {  // a benchmark's error (no GPU, a bad option value) ends the run with its message, not an abort
    CLI11_PARSE(app, argc, argv);
  } catch (const std::exception& e) {
    fmt::print(stderr, "moe-bench: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
