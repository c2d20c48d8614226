#pragma once
// moe-bench subcommands: each benchmark registers itself on the app (main.cpp calls every add_*_command).
#include <CLI/CLI.hpp>

namespace moelab::bench {

// `moe-bench gemm`: our sgemm against numpy's BLAS on square matrices (bench_gemm.cpp).
void add_gemm_command(CLI::App& app);
// `moe-bench train-step`: ms per training step of our engine against the PyTorch twin on the CPU (bench_train.cpp).
void add_train_step_command(CLI::App& app);
// `moe-bench attention`: causal attention's forward and backward against PyTorch's SDPA (bench_attention.cpp).
void add_attention_command(CLI::App& app);
// `moe-bench experts`: one MoE layer's experts, every way of running their products, against PyTorch
// (bench_experts.cpp).
void add_experts_command(CLI::App& app);
// `moe-bench bytes`: the least bytes each kind of kernel moves in one training step of a config (bench_bytes.cpp).
void add_bytes_command(CLI::App& app);
// `moe-bench optim`: OMoE's optimizer step against AdamW, and its share of a training step (bench_optim.cpp).
void add_optim_command(CLI::App& app);

}  // namespace moelab::bench
