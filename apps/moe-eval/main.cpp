// moe-eval: per-domain cross-entropy, perplexity and bits per byte on the held-out split, and the router-permutation
// dPPL per MoE layer (absolute, and relative to the PPL), for one or more checkpoints (docs/evaluation.md).
//   moe-eval runs/base/checkpoints/final runs/ed/checkpoints/final --max-batches 50 --json eval.json
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "apps/analysis/evaluation.h"

int main(int argc, char** argv) {
  using namespace moelab::apps;
  CLI::App app{"moe-eval: held-out CE, perplexity, bits per byte and router-permutation dPPL (absolute and relative) "
               "per domain"};
  std::vector<std::string> checkpoints;
  EvalOptions o;
  std::string json_out, data_dir;
  bool no_dppl = false;
  app.add_option("checkpoints", checkpoints, "checkpoint folders (a run folder means its checkpoints/final)")
      ->required();
  app.add_option("--corpus", o.data.corpus, "corpus folder, .jsonl file or 'synthetic' (default: the run's)");
  app.add_option("--tokenizer", o.data.tokenizer, "'byte' or a SentencePiece .model file (default: the run's)");
  app.add_option("--text-key", o.data.text_key, "JSONL key of the text (default: the run's)");
  app.add_option("--domain-key", o.data.domain_key, "JSONL key of the domain, dotted path ok (default: the run's)");
  app.add_option("--seq-len", o.data.seq_len, "tokens per sequence, at most the model's (default: the model's)");
  app.add_option("--max-batches", o.max_batches,
                 "evaluate the trainer's sample of N shuffled validation batches (0: every validation sequence)")
      ->default_val(0);
  app.add_option("--batch-size", o.batch_size, "sequences per forward pass (0: the run's train.batch_size)")
      ->default_val(0);
  app.add_option("--permutations", o.permutations, "router permutations averaged per MoE layer for dPPL")
      ->default_val(3);
  app.add_option("--seed", o.seed, "seed of the router permutations")->default_val(0);
  app.add_flag("--no-dppl", no_dppl, "skip the router-permutation dPPL");
  app.add_option("--json", json_out, "write the results as JSON to this file");
  std::string device = "cpu";
  app.add_option("--device", device, "cpu | cuda")->capture_default_str();
  app.add_option("--data-dir", data_dir,
                 "cache folder for shards built from a JSONL corpus (default: under the "
                 "system's temp folder)");
  CLI11_PARSE(app, argc, argv);
  if (no_dppl) o.permutations = 0;
  o.data_dir = data_dir;
  try {
    o.device = moelab::parse_enum<moelab::Device>(device, "--device");
    validate(o);
    for (const std::string& dir : checkpoints)  // all of them before the first, which may take minutes
      if (!std::filesystem::exists(dir))
        throw std::invalid_argument(fmt::format("checkpoint '{}' does not exist", dir));
    nlohmann::json out = {{"format", "moelab-eval-1"}, {"checkpoints", nlohmann::json::array()}};
    std::vector<CheckpointEvaluation> evals;
    for (const std::string& dir : checkpoints) {
      fmt::print(stderr, "moe-eval: evaluating {} ...\n", dir);
      CheckpointEvaluation e = evaluate_checkpoint(dir, o);
      if (!e.ignored_options.empty())
        fmt::print(stderr,
                   "moe-eval: note: {} options of this build unknown in the checkpoint's train_config "
                   "were ignored: {}\n",
                   e.ignored_options.size(), fmt::join(e.ignored_options, ", "));
      fmt::print("{}\n", format_table(e));
      check_finite_results(e);
      out["checkpoints"].push_back(evaluation_json(e));
      evals.push_back(std::move(e));
    }
    if (evals.size() > 1) {
      fmt::print("all domains: {:>8} {:>9} {:>8}  checkpoint\n", "CE(nats)", "PPL", "bpb");
      for (const CheckpointEvaluation& e : evals)
        fmt::print("             {:>8.4f} {:>9.3f} {:>8.4f}  {}\n", e.scores.overall.ce(), e.scores.overall.ppl(),
                   e.scores.overall.bpb(), e.checkpoint.string());
    }
    if (!json_out.empty()) {
      std::filesystem::path file(json_out);
      if (file.has_parent_path()) std::filesystem::create_directories(file.parent_path());
      std::ofstream f(file);
      f << out.dump(2) << '\n';
      if (!f) throw std::runtime_error("cannot write " + json_out);
      fmt::print("results: {}\n", json_out);
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "moe-eval: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
