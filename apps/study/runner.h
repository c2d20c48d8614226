#pragma once
// Running a study: every run of the grid trained (apps::Trainer), then analysed on held-out data (apps::analyze_run;
// a dense run only gets its held-out CE), its numbers saved to <run>/study_run.json, written last and atomically: its
// presence means "finished", and a finished run is read back, not redone. A run folder without it resumes from its
// newest checkpoint. Runs go one at a time in this process, or --jobs N at a time as child processes
// (`moe-study STUDY.toml --out OUT --run CONDITION SEED`), a run starting only once the runs it names ("@name") are
// finished. Progress goes to a stream, one line per event, with an estimate of the time left.
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "apps/study/study.h"

namespace moelab::apps {

inline constexpr const char* kStudyRunFile = "study_run.json";        // a finished run's numbers
inline constexpr const char* kStudyConfigFile = "study_config.json";  // a started run's identity (StudyRun::identity)

// The numbers of one finished run (<run>/study_run.json).
struct StudyRunResult {
  std::string condition;
  uint64_t seed = 0;
  std::filesystem::path dir;
  nlohmann::json config;  // StudyRun::identity of the run
  std::vector<std::string> domains;
  bool dense = false;              // no MoE layer: only the held-out CE
  int64_t steps = 0;               // train.steps
  int64_t sequences_per_step = 0;  // train.batch_size * train.grad_accum
  double seconds = 0;              // wall time of the invocation that finished it (training + analysis)
  int64_t trained_steps = 0;       // steps that invocation trained (fewer after a resume, 0 when none were left)
  std::vector<std::pair<std::string, double>> metrics;  // run_metrics(), in its order (NaN: not a number)
  bool read_back = false;                               // read from study_run.json, not run now: no timing sample

  double metric(const std::string& name) const;  // NaN when absent
};
nlohmann::ordered_json to_json(const StudyRunResult& r);
StudyRunResult study_run_result_from_json(const nlohmann::ordered_json& j, const std::filesystem::path& file);

// <run>/study_run.json read back, or nothing when the run has not finished. Throws naming the file when it is corrupt.
std::optional<StudyRunResult> read_run_result(const std::filesystem::path& run_dir);

// Trains the run (resuming from its newest checkpoint, or skipping training when checkpoints/final exists), writing
// the trainer's output to <run>/train.log; analyses it (also <run>/analysis.json, or evaluation.json for a dense run);
// writes <run>/study_run.json last and returns its numbers.
StudyRunResult execute_run(const Study& study, const StudyRun& run);

struct StudyOptions {
  int64_t jobs = 1;                  // runs at a time; above 1 they are child processes of `executable`
  std::filesystem::path executable;  // moe-study itself (for --jobs > 1)
  bool rerun_changed = false;        // redo finished runs whose config changed (and the runs that start from them)
  std::ostream* progress = nullptr;  // one line per event (null: silent)
};

struct StudyOutcome {
  std::vector<StudyRunResult> results;  // every run of the grid, in resolve_runs' order
  int64_t trained = 0, read_back = 0;   // runs done now / read back from study_run.json
};

// The finished runs, in order, after checking that each was run with the config it resolves to now: a run whose
// stored config differs (finished, or started: study_config.json) is an error naming it and the first differing key,
// or, with rerun_changed, its folder is removed (and the folders of finished runs that start from it) so it is
// redone. Runs without study_run.json are nullopt.
std::vector<std::optional<StudyRunResult>> check_finished_runs(const Study& study, const std::vector<StudyRun>& runs,
                                                               bool rerun_changed, std::ostream* progress = nullptr);

// Runs every unfinished run (check_finished_runs first), one at a time or options.jobs at a time. Stops starting runs
// at the first failure, waits for those in flight, then throws naming the run and its error.
StudyOutcome run_study(const Study& study, const std::vector<StudyRun>& runs, const StudyOptions& options);

// "45 s", "12 min", "1.5 h"
std::string format_duration(double seconds);

}  // namespace moelab::apps
