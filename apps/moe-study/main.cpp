// moe-study: a grid of named conditions x seeds over moe-train's options (docs/studies.md). Trains every run that is
// not finished (one at a time, or --jobs N at a time), analyses each on held-out data, and writes results.json,
// results.csv and report.html: per condition mean, standard deviation and n of every metric, and the paired
// difference against the reference condition.
//   moe-study studies/edl.toml --jobs 2
//   moe-study studies/edl.toml --dry-run        the resolved grid, nothing run
//   moe-study studies/edl.toml --collect        only aggregate the finished runs
#include <fmt/format.h>
#include <sys/prctl.h>

#include <csignal>

#include <fmt/ranges.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>

#include "apps/analysis/text.h"
#include "apps/study/results.h"
#include "apps/study/runner.h"
#include "apps/study/study.h"

namespace fs = std::filesystem;
using namespace moelab::apps;

namespace {

void print_grid(const Study& study, const std::vector<StudyRun>& runs) {
  fmt::print("study {} ({}): preset {}, seeds {}, reference {}, out {}\n", study.name, study.source, study.preset,
             fmt::join(study.seeds, ", "), study.reference, study.out_dir.string());
  if (!study.description.empty()) fmt::print("  {}\n", study.description);
  // The options that differ from the preset: those every condition has once, then each condition's own.
  std::vector<std::vector<std::string>> options;
  for (size_t c = 0; c < study.conditions.size(); ++c)
    options.push_back(options_differing_from_preset(study, runs[c].config));  // seed 1's runs come first
  std::vector<std::string> shared;
  for (const std::string& option : options.front())
    if (std::all_of(options.begin(), options.end(), [&](const std::vector<std::string>& o) {
          return std::find(o.begin(), o.end(), option) != o.end();
        }))
      shared.push_back(option);
  fmt::print("options of every condition that differ from preset {}:\n", study.preset);
  for (const std::string& option : shared) fmt::print("      {}\n", option);
  fmt::print("conditions and their own options (seed {}'s):\n", study.seeds.front());
  for (size_t c = 0; c < study.conditions.size(); ++c) {
    const StudyCondition& condition = study.conditions[c];
    fmt::print("  {}{}\n", condition.name,
               condition.name == study.reference ? " (reference)"
               : condition.table                 ? ""
                                                 : " (a stage, not a row of the results)");
    for (const std::string& option : options[c])
      if (std::find(shared.begin(), shared.end(), option) == shared.end()) fmt::print("      {}\n", option);
  }
  const std::vector<std::optional<StudyRunResult>> finished = [&] {
    std::vector<std::optional<StudyRunResult>> out;
    for (const StudyRun& run : runs) out.push_back(read_run_result(run.dir));
    return out;
  }();
  int64_t steps = 0, done = 0;
  fmt::print("runs, in order:\n");
  for (size_t i = 0; i < runs.size(); ++i) {
    const bool is_done = finished[i].has_value();
    done += is_done;
    if (!is_done) steps += runs[i].config.steps;
    fmt::print("  {:<24} {}{}\n", runs[i].label, runs[i].dir.string(),
               is_done                                      ? "  [finished]"
               : fs::exists(runs[i].dir / kStudyConfigFile) ? "  [started]"
                                                            : "");
  }
  fmt::print("{} runs ({} conditions x {} seeds), {} finished, {} training steps to go\n", runs.size(),
             study.conditions.size(), study.seeds.size(), done, steps);
}

// The headline numbers per condition, for the terminal: mean ± std (n), and under each other condition its paired
// difference against the reference.
void print_summary(const Study& study, const StudyResults& results) {
  const std::vector<std::string> metrics = {"ce", "mean_jsd", "mi_normalized", "output_cka", "dppl_relative"};
  fmt::print("{:<18}", "condition");
  for (const std::string& m : metrics) fmt::print(" {:>22}", m);
  fmt::print("\n");
  for (const ConditionResult& c : results.conditions) {
    std::string values = fmt::format("{:<18}", c.name), diffs = fmt::format("{:<18}", "  - " + study.reference);
    for (const std::string& name : metrics) {
      const MetricResult* m = c.metric(name);
      const bool has = m && m->summary.n > 0, has_diff = has && m->vs_reference.diff.n > 0;
      std::string value = "–";
      if (has) value = num(m->summary.mean, 4) + (m->summary.n > 1 ? " ± " + num(m->summary.std, 3) : "");
      if (has) value += fmt::format(" ({})", m->summary.n);
      values += fmt::format(" {:>22}", value);
      const PairedDifference* d = has_diff ? &m->vs_reference : nullptr;
      diffs += fmt::format(
          " {:>22}",
          d ? fmt::format("{}{} ({})", d->diff.mean > 0 ? "+" : "", num(d->diff.mean, 4), direction_text(*d)) : "–");
    }
    fmt::print("{}\n", values);
    if (c.name != study.reference) fmt::print("{}\n", diffs);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moe-study: train and analyse a grid of conditions x seeds (a study file), then compare the conditions "
               "-> results.json, results.csv, report.html (docs/studies.md)"};
  std::string file, out_dir;
  int64_t jobs = 1;
  bool dry_run = false, collect = false, rerun_changed = false;
  std::vector<std::string> run_one;
  app.add_option("study", file, "the study file (TOML: [study], [train], [[condition]])")->required();
  app.add_option("--out", out_dir, "where runs and results go (default: the study's out_dir)");
  app.add_option("--jobs", jobs, "runs at a time, each a child process with OMP_NUM_THREADS = cores / jobs")
      ->default_val(1)
      ->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app.add_flag("--dry-run", dry_run, "print the resolved grid and the number of runs; run nothing");
  app.add_flag("--collect", collect, "run nothing: aggregate the finished runs into the results");
  app.add_flag("--rerun-changed", rerun_changed,
               "redo finished runs whose config the study file changed (and the runs that start from them)");
  app.add_option("--run", run_one, "(internal) do one run: CONDITION SEED")->expected(2)->group("");
  CLI11_PARSE(app, argc, argv);
  try {
    const Study study = load_study(file, out_dir);
    const std::vector<StudyRun> runs = resolve_runs(study);  // validates every run's options before anything runs
    if (!run_one.empty()) {              // a child of `--jobs N`: one run, its numbers in <run>/study_run.json
      prctl(PR_SET_PDEATHSIG, SIGTERM);  // dies with the parent: a killed study leaves no orphan run going on
      for (const StudyRun& run : runs)
        if (study.conditions[run.condition].name == run_one[0] && std::to_string(run.seed) == run_one[1]) {
          execute_run(study, run);
          return 0;
        }
      throw std::invalid_argument(fmt::format("--run: no run {} seed {} in {}", run_one[0], run_one[1], file));
    }
    if (dry_run) {
      print_grid(study, runs);
      return 0;
    }
    std::vector<StudyRunResult> finished;
    if (collect) {
      for (std::optional<StudyRunResult>& r : check_finished_runs(study, runs, false))
        if (r) finished.push_back(std::move(*r));
      fmt::print("moe-study {}: {} of {} runs finished\n", study.name, finished.size(), runs.size());
    } else {
      StudyOptions options;
      options.jobs = jobs;
      options.executable = std::filesystem::read_symlink("/proc/self/exe");  // its name, as `ps` shows the children
      options.rerun_changed = rerun_changed;
      options.progress = &std::cout;
      finished = run_study(study, runs, options).results;
    }
    const StudyResults results = aggregate(study, finished);
    const std::vector<fs::path> files = write_results(study, results);
    print_summary(study, results);
    for (const fs::path& path : files) fmt::print("{}\n", path.string());
  } catch (const std::exception& e) {
    fmt::print(stderr, "moe-study: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
