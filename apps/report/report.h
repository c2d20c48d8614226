#pragma once
// moe-analyze's library: analyse a trained run on its held-out split (every metric of docs/analysis.md, per MoE
// layer and per domain), write the numbers as JSON/CSV, and render one self-contained HTML report (inline SVG, no
// scripts, no network) of one run or several side by side. docs/analysis.md explains every number.
//   analyze_run(run folder)        -> RunAnalysis   (checkpoint + metrics.jsonl + the run's corpus)
//   write_analysis_files(runs)     -> analysis.json, <run>/usage.csv, <run>/jsd.csv, <run>/layers.csv
//   render_report(runs)            -> report.html text
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "moe/analysis/expert_metrics.h"
#include "moe/analysis/specialization.h"

namespace moelab::apps {

// ---- the data -------------------------------------------------------------------------------------------------------

// The metrics log of moe-train (metrics.jsonl) as series of (step, value). Every number of a line becomes a series
// named by its path: "loss", "ce", "lb", "lr", "tokens_per_s", "ce_domain/<domain>", ...; a list (one entry per MoE
// layer) is averaged over its entries: "routing/mean_jsd", "omoe/removed". Evaluation lines {step, eval: {...}} fill
// `eval` the same way ("ce", "ce_domain/<domain>", "routing/mean_jsd").
struct MetricsLog {
  using Points = std::vector<std::pair<double, double>>;
  std::map<std::string, Points> train, eval;
  int64_t train_lines = 0, eval_lines = 0;
};
// Throws naming the file (missing) or file:line (not a JSON object, no "step").
MetricsLog read_metrics_log(const std::filesystem::path& file);

struct LayerAnalysis {
  int64_t layer = 0;                 // transformer block index
  moe::LayerSpecialization routing;  // usage, load, MI, JSD matrix, D_inter / D_total
  moe::OutputSimilarity similarity;  // on a sample of held-out tokens (tokens = 0: not computed)
  moe::ParameterVariance variance;   // normalized parameter variance of the expert matrices
  std::vector<double> dppl_domain;   // [M] router-permutation dPPL (NaN: not computed / no tokens)
  double dppl = NAN;                 // over all tokens
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
  MetricsLog log;
  std::optional<RoutingTrace> trace;
};

// ---- analysing a run ------------------------------------------------------------------------------------------------

struct AnalyzeOptions {
  std::string checkpoint = "final";  // <run>/checkpoints/<checkpoint>
  std::string corpus;                // replaces the run's data.corpus (empty: keep)
  int64_t max_batches = 16;          // held-out batches (0: the whole validation split)
  int64_t permutations = 3;          // router permutations per layer for dPPL (0: skip dPPL)
  int64_t similarity_tokens = 256;   // held-out tokens run through every expert per layer
  std::string trace_text;            // non-empty: also trace this text
  std::filesystem::path data_dir;    // shard cache for JSONL corpora (empty: evaluation's default)
};

// Loads <run_dir>/metrics.jsonl and the checkpoint, rebuilds the run's held-out split and computes every metric.
// Errors name the run folder and what is wrong: no folder, no metrics.jsonl, no such checkpoint (listing those
// present), a checkpoint that does not fit its config, a corpus without domain labels or with fewer than 2 domains.
RunAnalysis analyze_run(const std::filesystem::path& run_dir, const AnalyzeOptions& options = {});

// ---- writing it down ------------------------------------------------------------------------------------------------

nlohmann::json analysis_json(const RunAnalysis& run);  // every metric (not the metrics log); NaN -> null
// <out>/analysis.json {"runs": [...]}, and per run <out>/<name>/usage.csv, jsd.csv, layers.csv. Returns the files.
std::vector<std::filesystem::path> write_analysis_files(const std::vector<RunAnalysis>& runs,
                                                        const std::filesystem::path& out_dir);
// A few lines per run for the terminal.
std::string terminal_summary(const std::vector<RunAnalysis>& runs);

struct ReportOptions {
  std::string title = "moelab: expert specialization";
};
// The HTML page: runs and config, summary table, training curves, per-layer tables, heatmaps (usage per domain,
// JSD matrix, expert load), routing traces. Several runs are compared side by side. All text is escaped.
std::string render_report(const std::vector<RunAnalysis>& runs, const ReportOptions& options = {});

// ---- building blocks (exposed for tests) ----------------------------------------------------------------------------

std::string html_escape(std::string_view text);  // & < > " ' -> entities; invalid UTF-8 -> U+FFFD
std::string valid_utf8(std::string_view text);   // invalid bytes -> U+FFFD

}  // namespace moelab::apps
