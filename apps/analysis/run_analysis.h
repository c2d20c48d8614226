#pragma once
// Analysing a trained run (moe-analyze): load its checkpoint, metrics log and held-out split, run held-out batches
// through the model and compute every metric of docs/analysis.md per MoE layer and per domain; optionally trace how
// each layer routes the tokens of a given text. export.h writes the result down, apps/report/ draws it.
//   analyze_run(run folder)        -> RunAnalysis   (checkpoint + metrics.jsonl + the run's corpus)
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "apps/analysis/metrics_log.h"
#include "moe/analysis/expert_metrics.h"
#include "moe/analysis/specialization.h"

namespace moelab::apps {

// ---- the data -------------------------------------------------------------------------------------------------------

struct LayerAnalysis {
  int64_t layer = 0;                 // transformer block index
  moe::LayerSpecialization routing;  // usage, load, MI, JSD matrix, D_inter / D_total
  moe::OutputSimilarity similarity;  // cosine, centered cosine and linear CKA on a sample of held-out tokens
                                     // (tokens = 0: not computed)
  moe::ParameterVariance variance;   // normalized parameter variance of the expert matrices (meaningful only when
                                     // the experts share an init, e.g. upcycled from one dense FFN)
  std::vector<double> dppl_domain;  // [M] router-permutation dPPL, mean_pi PPL_pi - PPL (NaN: not computed / no tokens)
  double dppl = NAN;                // over all tokens
  std::vector<double> relative_dppl_domain;  // [M] relative dPPL, mean_pi (PPL_pi - PPL) / PPL (NaN as dppl_domain)
  double relative_dppl = NAN;                // over all tokens
};

// What each layer's router did with each token of a given text: for teaching.
struct RoutingTrace {
  std::string text;
  std::vector<std::string> pieces;                         // [n] each token's text (tokenizer.decode of the one id)
  std::vector<int64_t> layers;                             // [L] block index of each MoE layer
  std::vector<std::vector<std::vector<int32_t>>> experts;  // [L][n][k] chosen experts, most probable first
  std::vector<std::vector<std::vector<float>>> probs;      // [L][n][k] their router probabilities
};

struct RunAnalysis {
  std::string name;  // shown in the report: the run folder's name (unique among the runs)
  std::filesystem::path run_dir, checkpoint;
  int64_t step = 0;                  // of the checkpoint
  nlohmann::json config;             // the run's options, flat (key -> value, as in the checkpoint)
  std::vector<std::string> domains;  // [M]
  int64_t experts = 0, top_k = 0;
  std::string tokenizer, selection;  // Tokenizer::name(); which held-out sequences were analysed
  int64_t sequences = 0, tokens = 0;
  std::vector<double> ce_domain;  // [M] held-out mean CE (nats/token; NaN: no tokens)
  double ce = NAN;
  std::vector<LayerAnalysis> layers;  // MoE layers in order
  int64_t permutations = 0;           // router permutations per layer of the dPPL (0: not computed)
  MetricsLog log;
  std::optional<RoutingTrace> trace;
};

// ---- analysing a run ------------------------------------------------------------------------------------------------

struct AnalyzeOptions {
  std::string checkpoint = "final";  // <run>/checkpoints/<checkpoint>
  std::string corpus;                // replaces the run's data.corpus (empty: keep)
  int64_t max_batches = 16;          // held-out batches (0: the whole validation split)
  int64_t permutations = 3;          // router permutations per layer for dPPL (0: skip dPPL)
  int64_t similarity_tokens = 4096;  // held-out tokens run through every expert per layer (fewer if the batches
                                     // hold fewer)
  std::string trace_text;            // non-empty: also trace this text
  std::filesystem::path data_dir;    // shard cache for JSONL corpora (empty: evaluation's default)
  Device device = Device::CPU;       // where the model runs (the metrics are computed on the host)
};

// Loads <run_dir>/metrics.jsonl and the checkpoint, rebuilds the run's held-out split and computes every metric.
// Errors name the run folder and what is wrong: no folder, no metrics.jsonl, no such checkpoint (listing those
// present), a checkpoint that does not fit its config, a corpus without domain labels or with fewer than 2 domains.
RunAnalysis analyze_run(const std::filesystem::path& run_dir, const AnalyzeOptions& options = {});

// Checks the options a user gives on the command line: counts >= 0, a checkpoint name, a --data-dir that is a folder
// if it exists. Throws std::invalid_argument naming the flag and the value.
void validate(const AnalyzeOptions& options);

// Throws when a metric that should be a number is not finite (a diverged or corrupt model), naming each one: the CE of
// every domain with tokens and of all domains, and per layer the routing metrics, the output similarity (cosine,
// centered cosine, CKA) and parameter variance, and the dPPL (absolute and relative) when it was computed.
void check_finite_results(const RunAnalysis& run);

}  // namespace moelab::apps
