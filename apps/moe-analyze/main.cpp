// moe-analyze: expert specialization of trained runs on held-out data (every metric of docs/analysis.md per
// MoE layer and per domain), written as JSON/CSV, plus one self-contained HTML report comparing the runs
// (docs/analysis.md).
//   moe-analyze runs/base runs/ed --out analysis --trace "def main():\n    return 0"
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

#include "apps/analysis/export.h"
#include "apps/analysis/run_analysis.h"
#include "apps/report/report.h"

namespace fs = std::filesystem;

// "\n" and "\t" typed on a command line become a newline and a tab (so a trace can show code).
static std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == 'n' || s[i + 1] == 't' || s[i + 1] == '\\')) {
      out += s[i + 1] == 'n' ? '\n' : s[i + 1] == 't' ? '\t' : '\\';
      ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

int main(int argc, char** argv) {
  using namespace moelab::apps;
  CLI::App app{"moe-analyze: expert specialization of trained MoE runs on held-out data -> analysis.json, CSV files "
               "and report.html"};
  std::vector<std::string> run_dirs;
  AnalyzeOptions options;
  std::string out_dir, trace, title, data_dir;
  app.add_option("runs", run_dirs, "run folders (train.out_dir of moe-train: metrics.jsonl + checkpoints/)")
      ->required();
  app.add_option("--checkpoint", options.checkpoint, "checkpoint to analyse in each run: checkpoints/<NAME>")
      ->default_val("final");
  app.add_option("--corpus", options.corpus, "corpus folder, .jsonl file or 'synthetic' (default: each run's own)");
  app.add_option("--max-batches", options.max_batches,
                 "held-out batches to analyse: the trainer's shuffled sample (0: every validation sequence)")
      ->default_val(16);
  app.add_option("--permutations", options.permutations, "router permutations per layer for dPPL (0: skip dPPL)")
      ->default_val(3);
  app.add_option("--similarity-tokens", options.similarity_tokens,
                 "held-out tokens run through every expert for the output similarity (cosine, centered cosine, CKA)")
      ->default_val(4096);
  app.add_option("--out", out_dir, "output folder (default: RUN/analysis for one run, ./moe-analysis for several)");
  app.add_option("--trace", trace, "also show how each layer routes the tokens of this text (\\n: newline)");
  app.add_option("--title", title, "title of the report");
  app.add_option("--data-dir", data_dir, "cache folder for shards built from a JSONL corpus (default: system temp)");
  std::string device = "cpu";
  app.add_option("--device", device, "where the models run: cpu | cuda")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  options.trace_text = unescape(trace);
  options.data_dir = data_dir;
  if (out_dir.empty()) out_dir = run_dirs.size() == 1 ? (fs::path(run_dirs[0]) / "analysis").string() : "moe-analysis";
  try {
    options.device = moelab::parse_enum<moelab::Device>(device, "--device");
    validate(options);
    for (const std::string& dir : run_dirs)  // all of them before the first, which may take minutes
      if (!fs::is_directory(dir)) throw std::invalid_argument(fmt::format("run folder '{}' does not exist", dir));
    if (fs::exists(out_dir) && !fs::is_directory(out_dir))
      throw std::invalid_argument(fmt::format("--out '{}' is not a folder", out_dir));
    std::vector<RunAnalysis> runs;
    std::map<std::string, int> names;
    for (const std::string& dir : run_dirs) {
      fmt::print(stderr, "moe-analyze: analysing {} ...\n", dir);
      RunAnalysis run = analyze_run(dir, options);
      check_finite_results(run);
      if (int seen = names[run.name]++; seen > 0) run.name += fmt::format("-{}", seen + 1);  // two runs named alike
      if (!runs.empty() && run.domains != runs.front().domains)
        fmt::print(stderr, "moe-analyze: note: {} has other domains than {} ({} vs {})\n", run.name, runs.front().name,
                   fmt::join(run.domains, ", "), fmt::join(runs.front().domains, ", "));
      runs.push_back(std::move(run));
    }
    std::vector<fs::path> files = write_analysis_files(runs, out_dir);
    ReportOptions report;
    if (!title.empty()) report.title = title;
    const fs::path report_file = fs::path(out_dir) / "report.html";
    std::ofstream html(report_file, std::ios::binary);
    html << render_report(runs, report);
    if (!html) throw std::runtime_error("cannot write " + report_file.string());
    fmt::print("{}", terminal_summary(runs));
    fmt::print("data: {} (+ usage.csv, jsd.csv, layers.csv per run)\n", files.front().string());
    fmt::print("report: {}\n", report_file.string());
  } catch (const std::exception& e) {
    fmt::print(stderr, "moe-analyze: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
