#pragma once
// A study (moe-study, docs/studies.md): a grid of named conditions x seeds over moe-train's options, read from a TOML
// file, and its resolution into runs, each with the full TrainConfig it trains with:
//   train_preset(study.preset) -> [train] -> the condition's options -> train.seed = seed,
//   train.out_dir = <out>/<condition>/seed<seed>, and every string option "@name" -> <out>/<name>/seed<seed>.
//   load_study(STUDY.toml)         -> Study
//   resolve_runs(study)            -> the runs, seed by seed, conditions in file order (each config validated)
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "apps/train/train_config.h"

namespace moelab::apps {

struct StudyCondition {
  std::string name;                // [A-Za-z0-9_.-]+, unique in the study
  std::string options;             // its moe-train options as TOML text (the file's table, reprinted)
  bool table = true;               // false: a stage other conditions start from, not a row of the results
  std::vector<std::string> needs;  // the conditions its "@name" options (and [train]'s) refer to, in file order
};

struct Study {
  std::filesystem::path file;  // the study file ("" when parsed from text)
  std::string source;          // how errors name it: the file's name
  std::string name, description;
  std::string preset = "tiny";
  std::vector<uint64_t> seeds;
  std::string reference;          // a table condition; paired differences are against it (default: the first one)
  std::filesystem::path out_dir;  // runs go to <out_dir>/<condition>/seed<seed> (default: runs/studies/<name>)
  int64_t eval_batches = 0;       // held-out batches for the analysis (0: the whole validation split)
  int64_t permutations = 3;       // router permutations per MoE layer for dPPL (0: none)
  int64_t similarity_tokens = 4096;
  std::string train;  // [train]: the options every condition shares, as TOML text
  std::vector<StudyCondition> conditions;

  const StudyCondition& condition(const std::string& name) const;  // throws naming the study when there is none
  std::vector<const StudyCondition*> table_conditions() const;     // those with table = true, in file order
};

// Parses a study file's text; errors name `source` and the section ("edl.toml [condition adamw]: ..."). Checks the
// grid's shape (names, seeds, references to earlier conditions, the reference) but not the train options: that is
// resolve_runs'. `out_dir` (when not empty) replaces study.out_dir.
Study parse_study(const std::string& text, const std::string& source, const std::filesystem::path& out_dir = {});
Study load_study(const std::filesystem::path& file, const std::filesystem::path& out_dir = {});

// One training run of the grid.
struct StudyRun {
  size_t condition = 0;  // index into Study::conditions
  uint64_t seed = 0;
  std::filesystem::path dir;  // <out>/<condition>/seed<seed>
  TrainConfig config;         // resolved and validated
  // What a finished run is compared on when the study is run again: the config as JSON (to_json) without
  // train.out_dir and train.resume, with each "@name" option kept as written (so a moved --out changes nothing).
  nlohmann::json identity;
  std::vector<size_t> needs;  // indices (into the runs) of the runs it starts from: they must finish first
  std::string label;          // "<condition> seed <seed>"
};

// Every run, seed by seed, each seed's conditions in file order (so a run comes after those it needs). Each config
// is validated here, before anything runs: an error names the study file and the condition.
std::vector<StudyRun> resolve_runs(const Study& study);

// The options of a resolved config that differ from the study's preset, as "key = value" (JSON values), sorted by
// key; train.out_dir and train.seed are left out (every run has its own).
std::vector<std::string> options_differing_from_preset(const Study& study, const TrainConfig& config);

// The first key whose value differs between a stored identity and the current one, as "KEY: was A, now B"; "" when
// they agree. A key only in `now` whose value is the preset's (an option added to moe-train since) is no difference.
std::string first_difference(const nlohmann::json& stored, const nlohmann::json& now, const Study& study);

}  // namespace moelab::apps
