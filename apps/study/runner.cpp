#include "apps/study/runner.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "apps/analysis/evaluation.h"
#include "apps/analysis/export.h"
#include "apps/analysis/run_analysis.h"
#include "apps/study/metrics.h"
#include "apps/train/checkpoint.h"
#include "apps/train/trainer.h"
#include "data/file_io.h"
#include "engine/error.h"

extern char** environ;

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

// ---- study_run.json -------------------------------------------------------------------------------------------------

double StudyRunResult::metric(const std::string& name) const {
  for (const auto& [key, value] : metrics)
    if (key == name) return value;
  return NAN;
}

ordered_json to_json(const StudyRunResult& r) {
  ordered_json metrics = ordered_json::object();
  for (const auto& [name, value] : r.metrics) metrics[name] = std::isfinite(value) ? ordered_json(value) : nullptr;
  return {{"condition", r.condition},
          {"seed", r.seed},
          {"run_dir", r.dir.string()},
          {"dense", r.dense},
          {"steps", r.steps},
          {"sequences_per_step", r.sequences_per_step},
          {"seconds", r.seconds},
          {"trained_steps", r.trained_steps},
          {"domains", r.domains},
          {"metrics", metrics},
          {"config", ordered_json::parse(r.config.dump())}};
}

StudyRunResult study_run_result_from_json(const ordered_json& j, const fs::path& file) {
  try {
    StudyRunResult r;
    r.condition = j.at("condition").get<std::string>();
    r.seed = j.at("seed").get<uint64_t>();
    r.dir = j.at("run_dir").get<std::string>();
    r.dense = j.at("dense").get<bool>();
    r.steps = j.at("steps").get<int64_t>();
    r.sequences_per_step = j.at("sequences_per_step").get<int64_t>();
    r.seconds = j.at("seconds").get<double>();
    r.trained_steps = j.at("trained_steps").get<int64_t>();
    r.domains = j.at("domains").get<std::vector<std::string>>();
    for (const auto& [name, value] : j.at("metrics").items())
      r.metrics.emplace_back(name, value.is_null() ? NAN : value.get<double>());
    r.config = json::parse(j.at("config").dump());
    return r;
  } catch (const json::exception& e) {
    fail("{}: not a study run's numbers ({}); delete it to redo the run", file.string(), e.what());
  }
}

std::optional<StudyRunResult> read_run_result(const fs::path& run_dir) {
  const fs::path file = run_dir / kStudyRunFile;
  if (!fs::exists(file)) return std::nullopt;
  ordered_json j = ordered_json::parse(data::read_file(file), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail("{}: not valid JSON; delete it to redo the run", file.string());
  StudyRunResult r = study_run_result_from_json(j, file);
  r.dir = run_dir;  // where it is now (the study may have been moved)
  r.read_back = true;
  return r;
}

namespace {

// A reader sees the whole file or none (data::write_file_atomic).
void write_atomically(const fs::path& file, const std::string& text) {
  data::write_file_atomic(file, [&](std::ostream& out) { out << text << '\n'; });
}

bool has_checkpoint(const fs::path& run_dir) {
  try {
    find_checkpoint(run_dir);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

bool has_final_checkpoint(const fs::path& run_dir) {
  const fs::path final_dir = run_dir / kCheckpointsFolder / "final";
  return fs::exists(final_dir / kModelFile) && fs::exists(final_dir / kStateFile);
}

bool has_moe_layer(const nn::ModelConfig& m) {
  for (int64_t l = 0; l < m.n_layers; ++l)
    if (m.n_experts > 0 && m.is_moe_layer(l)) return true;
  return false;
}

}  // namespace

// ---- one run ------------------------------------------------------------------------------------------------------------

StudyRunResult execute_run(const Study& study, const StudyRun& run) {
  const auto start = Clock::now();
  fs::create_directories(run.dir);
  write_atomically(run.dir / kStudyConfigFile, run.identity.dump(2));
  TrainConfig config = run.config;
  int64_t trained_steps = 0;
  if (!has_final_checkpoint(run.dir)) {  // else training finished and the analysis did not
    if (has_checkpoint(run.dir)) config.resume = run.dir.string();
    std::ofstream log(run.dir / "train.log", std::ios::app);
    Trainer trainer(config, log);
    const int64_t from = trainer.step();
    trainer.run();
    trained_steps = config.steps - from;
  }

  const bool dense = !has_moe_layer(config.model);
  RunAnalysis analysis;  // a dense run fills in only its held-out CE
  if (!dense) {
    AnalyzeOptions options;
    options.max_batches = study.eval_batches;
    options.permutations = study.permutations;
    options.similarity_tokens = study.similarity_tokens;
    options.device = config.device;
    analysis = analyze_run(run.dir, options);
    check_finite_results(analysis);
    write_atomically(run.dir / "analysis.json", analysis_json(analysis).dump(1));
  } else {
    EvalOptions options;
    options.max_batches = study.eval_batches;
    options.permutations = 0;
    options.device = config.device;
    CheckpointEvaluation eval = evaluate_checkpoint(run.dir / kCheckpointsFolder / "final", options);
    check_finite_results(eval);
    write_atomically(run.dir / "evaluation.json", evaluation_json(eval).dump(1));
    analysis.domains = eval.domains.names();
    for (const DomainScore& d : eval.scores.domains) analysis.ce_domain.push_back(d.ce());
    analysis.ce = eval.scores.overall.ce();
  }

  StudyRunResult r;
  r.condition = study.conditions[run.condition].name;
  r.seed = run.seed;
  r.dir = run.dir;
  r.config = run.identity;
  r.domains = analysis.domains;
  r.dense = dense;
  r.steps = config.steps;
  r.sequences_per_step = config.batch_size * config.grad_accum;
  r.trained_steps = trained_steps;
  r.metrics = run_metrics(analysis);
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  write_atomically(run.dir / kStudyRunFile, to_json(r).dump(1));  // last: the run is finished
  return r;
}

// ---- what is finished -----------------------------------------------------------------------------------------------

std::vector<std::optional<StudyRunResult>> check_finished_runs(const Study& study, const std::vector<StudyRun>& runs,
                                                               bool rerun_changed, std::ostream* progress) {
  std::vector<std::optional<StudyRunResult>> finished(runs.size());
  std::vector<bool> redo(runs.size(), false);
  for (size_t i = 0; i < runs.size(); ++i) {
    const StudyRun& run = runs[i];
    std::optional<StudyRunResult> result = read_run_result(run.dir);
    json stored;
    if (result) {
      stored = result->config;
    } else if (fs::exists(run.dir / kStudyConfigFile)) {
      stored = json::parse(data::read_file(run.dir / kStudyConfigFile), nullptr, /*allow_exceptions=*/false);
      if (stored.is_discarded()) stored = json();  // torn: the run is redone from its checkpoints' own checks
    }
    const std::string difference = stored.is_null() ? "" : first_difference(stored, run.identity, study);
    const bool after_redone = std::any_of(run.needs.begin(), run.needs.end(), [&](size_t j) { return redo[j]; });
    if (!difference.empty() && !rerun_changed)
      fail("{} ({}) was {} with another config ({}); moe-study --rerun-changed redoes such runs (and those that "
           "start from them), or give another --out",
           run.label, run.dir.string(), result ? "run" : "started", difference);
    if (difference.empty() && !after_redone) {
      finished[i] = std::move(result);
      continue;
    }
    redo[i] = true;
    if (fs::exists(run.dir)) {
      if (progress)
        *progress << fmt::format("{}: redone from scratch ({})", run.label,
                                 difference.empty() ? "it starts from a run that is redone" : difference)
                  << std::endl;
      fs::remove_all(run.dir);
    }
  }
  return finished;
}

// ---- running the grid -----------------------------------------------------------------------------------------------

std::string format_duration(double seconds) {
  if (seconds < 10) return fmt::format("{:.1f} s", seconds);
  if (seconds < 90) return fmt::format("{:.0f} s", seconds);
  if (seconds < 90 * 60) return fmt::format("{:.0f} min", seconds / 60);
  return fmt::format("{:.1f} h", seconds / 3600);
}

namespace {

// Counts the finished runs and estimates the time left: the mean seconds per training step of the runs finished in
// this invocation (read-back runs are no sample), times the steps still to train, shared among the jobs.
class Progress {
 public:
  Progress(const std::vector<StudyRun>& runs, const StudyOptions& options, int64_t finished)
      : runs_(runs), options_(options), finished_(finished) {}

  void started(size_t i) {
    const fs::path& dir = runs_[i].dir;
    const std::string what = has_final_checkpoint(dir) ? "trained, analysing"
                             : has_checkpoint(dir)     ? "resuming from its newest checkpoint"
                                                       : fmt::format("training {} steps", runs_[i].config.steps);
    line(fmt::format("{} {}: {} in {}", counter(), runs_[i].label, what, dir.string()));
  }

  // `running`: the runs in flight and their start times (for the estimate).
  void done(size_t i, const StudyRunResult& r, const std::map<size_t, Clock::time_point>& running,
            const std::vector<bool>& pending) {
    ++finished_;
    if (r.trained_steps > 0) sample_seconds_ += r.seconds, sample_steps_ += r.trained_steps;
    const int64_t left = static_cast<int64_t>(runs_.size()) - finished_;
    std::string tail = left == 0 ? "all runs finished" : fmt::format("{} run{} left", left, left == 1 ? "" : "s");
    if (left > 0 && sample_steps_ > 0) {
      const double per_step = sample_seconds_ / static_cast<double>(sample_steps_);
      double seconds = 0;
      for (size_t j = 0; j < runs_.size(); ++j)
        if (pending[j]) seconds += per_step * static_cast<double>(runs_[j].config.steps);
      for (const auto& [j, since] : running)
        seconds += std::max(0.0, per_step * static_cast<double>(runs_[j].config.steps) -
                                     std::chrono::duration<double>(Clock::now() - since).count());
      seconds /= static_cast<double>(std::max<int64_t>(1, options_.jobs));
      tail += seconds < 1 ? ", nearly done" : ", about " + format_duration(seconds);
    }
    const double ce = r.metric("ce");
    line(fmt::format("{} {}: done in {} (held-out CE {}); {}", counter(), runs_[i].label, format_duration(r.seconds),
                     std::isfinite(ce) ? fmt::format("{:.3f}", ce) : "?", tail));
  }

  void failed(size_t i, double seconds, const std::string& error) {
    line(fmt::format("{} {}: FAILED after {}: {}", counter(), runs_[i].label, format_duration(seconds), error));
  }

 private:
  std::string counter() const {
    const std::string total = std::to_string(runs_.size());
    return fmt::format("[{:>{}}/{}]", finished_, total.size(), total);
  }
  void line(const std::string& text) const {
    if (options_.progress) *options_.progress << text << std::endl;
  }

  const std::vector<StudyRun>& runs_;
  const StudyOptions& options_;
  int64_t finished_;
  double sample_seconds_ = 0;
  int64_t sample_steps_ = 0;
};

// `moe-study STUDY --out OUT --run CONDITION SEED` as a child process, its output in <run>/study.log, with
// OMP_NUM_THREADS = `threads` unless the user set it.
pid_t spawn_run(const Study& study, const StudyRun& run, const StudyOptions& options, int64_t threads) {
  fs::create_directories(run.dir);
  const std::string log = (run.dir / "study.log").string(), exe = options.executable.string();
  std::vector<std::string> args = {exe,
                                   study.file.string(),
                                   "--out",
                                   study.out_dir.string(),
                                   "--run",
                                   study.conditions[run.condition].name,
                                   std::to_string(run.seed)};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  if (!std::getenv("OMP_NUM_THREADS")) env.push_back(fmt::format("OMP_NUM_THREADS={}", threads));
  std::vector<char*> envp;
  for (std::string& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = 0;
  const int error = posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) fail("cannot start {} for {}: {}", exe, run.label, std::strerror(error));
  return pid;
}

// The last non-empty line of a child's log: its error message (without main's "moe-study: error: ").
std::string last_line(const fs::path& file) {
  std::ifstream in(file);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  const std::string prefix = "moe-study: error: ";
  if (last.rfind(prefix, 0) == 0) last = last.substr(prefix.size());
  return last.empty() ? "(no output)" : last;
}

}  // namespace

StudyOutcome run_study(const Study& study, const std::vector<StudyRun>& runs, const StudyOptions& options) {
  std::vector<std::optional<StudyRunResult>> results =
      check_finished_runs(study, runs, options.rerun_changed, options.progress);
  StudyOutcome outcome;
  std::vector<bool> pending(runs.size());
  for (size_t i = 0; i < runs.size(); ++i) pending[i] = !results[i].has_value();
  outcome.read_back = std::count(pending.begin(), pending.end(), false);
  const int64_t jobs = std::max<int64_t>(1, options.jobs);
  if (options.progress)
    *options.progress << fmt::format("moe-study {}: {} runs ({} conditions x {} seeds), {} finished, {} to run{}",
                                     study.name, runs.size(), study.conditions.size(), study.seeds.size(),
                                     outcome.read_back, runs.size() - outcome.read_back,
                                     jobs > 1 ? fmt::format(", {} at a time", jobs) : "")
                      << std::endl;
  Progress progress(runs, options, outcome.read_back);
  std::map<size_t, Clock::time_point> running;  // run index -> start
  std::string failure;
  auto finish = [&](size_t i, StudyRunResult r) {
    running.erase(i);
    results[i] = std::move(r);
    ++outcome.trained;
    progress.done(i, *results[i], running, pending);
  };
  auto fail_run = [&](size_t i, const std::string& error) {
    const double seconds = std::chrono::duration<double>(Clock::now() - running.at(i)).count();
    running.erase(i);
    progress.failed(i, seconds, error);
    if (failure.empty()) failure = fmt::format("{} ({}): {}", runs[i].label, runs[i].dir.string(), error);
  };
  auto ready = [&](size_t i) {
    return pending[i] &&
           std::all_of(runs[i].needs.begin(), runs[i].needs.end(), [&](size_t j) { return results[j].has_value(); });
  };

  if (jobs == 1) {  // in this process, in order (a run comes after those it needs)
    for (size_t i = 0; i < runs.size() && failure.empty(); ++i) {
      if (!pending[i]) continue;
      pending[i] = false;
      running[i] = Clock::now();
      progress.started(i);
      try {
        StudyRunResult r = execute_run(study, runs[i]);
        finish(i, std::move(r));
      } catch (const std::exception& e) {
        fail_run(i, e.what());
      }
    }
  } else {  // child processes, up to `jobs` at a time
    if (study.file.empty() || options.executable.empty())
      fail("--jobs {} runs moe-study itself for each run: it needs the study file and the executable", jobs);
    const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency() / jobs);
    std::map<pid_t, size_t> children;
    for (;;) {
      for (size_t i = 0; i < runs.size() && failure.empty() && static_cast<int64_t>(children.size()) < jobs; ++i) {
        if (!ready(i)) continue;
        pending[i] = false;
        running[i] = Clock::now();
        progress.started(i);
        try {
          children[spawn_run(study, runs[i], options, threads)] = i;
        } catch (const std::exception& e) {
          fail_run(i, e.what());
        }
      }
      if (children.empty()) break;
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, 0);
      if (pid < 0) {
        if (errno == EINTR) continue;
        fail("waiting for the runs failed: {}", std::strerror(errno));
      }
      auto child = children.find(pid);
      if (child == children.end()) continue;  // not one of ours
      const size_t i = child->second;
      children.erase(child);
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        try {
          std::optional<StudyRunResult> r = read_run_result(runs[i].dir);
          if (!r) fail("the run exited without writing {}", (runs[i].dir / kStudyRunFile).string());
          r->read_back = false;
          finish(i, std::move(*r));
        } catch (const std::exception& e) {
          fail_run(i, e.what());
        }
      } else {
        fail_run(i, fmt::format("{} (more in {})", last_line(runs[i].dir / "study.log"),
                                (runs[i].dir / "study.log").string()));
      }
    }
  }
  if (!failure.empty()) throw std::runtime_error(failure);
  for (size_t i = 0; i < runs.size(); ++i)
    if (!results[i]) fail("{}: never started (a run it starts from did not finish)", runs[i].label);
  for (std::optional<StudyRunResult>& r : results) outcome.results.push_back(std::move(*r));
  return outcome;
}

}  // namespace moelab::apps
