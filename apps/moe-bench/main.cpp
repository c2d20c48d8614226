// moe-bench: benchmarks, one subcommand each (`moe-bench --help` lists them). Benchmarks print tables, not tests:
// nothing here passes or fails.
#include <CLI/CLI.hpp>

#include "apps/moe-bench/benches.h"

int main(int argc, char** argv) {
  CLI::App app{"moe-bench: moelab benchmarks"};
  app.require_subcommand(1);
  moelab::bench::add_gemm_command(app);
  moelab::bench::add_train_step_command(app);
  moelab::bench::add_optim_command(app);
  moelab::bench::add_attention_command(app);
  moelab::bench::add_experts_command(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
