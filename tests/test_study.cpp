// moe-study: a 2-condition x 2-seed study of a few steps run end to end (results against the runs' own numbers, a
// second call that redoes nothing, resuming a run from its checkpoint, a changed config caught), the same grid with
// --jobs 2 as child processes, "@name" references, errors that name the condition before anything runs, a dense
// stage, and the statistics against hand-computed values.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/study/results.h"
#include "apps/study/runner.h"
#include "apps/study/study.h"
#include "tests/testing.h"

using namespace moelab;
using namespace moelab::apps;
namespace fs = std::filesystem;
using testing::check_mentions;
using testing::error_of;

namespace {

// A tiny model on the synthetic corpus, 4 steps, a checkpoint every 2.
const char* kSharedOptions = R"(
[train]
model.d_model = 32
model.n_heads = 2
model.seq_len = 16
model.expert_hidden = 16
data.synthetic_docs = 12
train.steps = 4
train.batch_size = 4
train.eval_every = 0
train.eval_batches = 1
train.checkpoint_every = 2
optim.warmup = 1
)";

std::string study_text(const fs::path& out, const std::string& conditions) {
  return fmt::format(R"([study]
name = "t"
description = "a test"
preset = "tiny"
seeds = [1, 2]
reference = "base"
out_dir = "{}"
eval_batches = 2
permutations = 1
similarity_tokens = 32
{}
{})",
                     out.string(), kSharedOptions, conditions);
}

const char* kTwoConditions = R"(
[[condition]]
name = "base"
options = { moe.beta = 0.0 }

[[condition]]
name = "ed"
options = { moe.beta = 0.05 }
)";

Study write_and_load(const fs::path& dir, const std::string& text) {
  fs::create_directories(dir);
  std::ofstream(dir / "study.toml") << text;
  return load_study(dir / "study.toml");
}

nlohmann::json read_json(const fs::path& file) {
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("study: a 2-condition x 2-seed study runs, aggregates, and a second call redoes nothing") {
  testing::ScratchDir dir("study_grid");
  const fs::path out = dir.path() / "out";
  Study study = write_and_load(dir.path(), study_text(out, kTwoConditions));
  std::vector<StudyRun> runs = resolve_runs(study);
  REQUIRE(runs.size() == 4);
  CHECK(runs[1].label == "ed seed 1");
  CHECK(runs[2].dir == out / "base" / "seed2");
  CHECK(runs[3].config.seed == 2);
  CHECK(runs[3].config.losses.beta == 0.05);
  CHECK(runs[3].config.model.d_model == 32);

  StudyOptions options;
  std::ostringstream progress;
  options.progress = &progress;
  StudyOutcome first = run_study(study, runs, options);
  CHECK(first.trained == 4);
  CHECK(first.read_back == 0);
  CHECK(progress.str().find("[4/4] ed seed 2: done in") != std::string::npos);
  CHECK(progress.str().find("all runs finished") != std::string::npos);
  const bool estimate = progress.str().find("3 runs left, about") != std::string::npos ||
                        progress.str().find("3 runs left, nearly done") != std::string::npos;
  CHECK(estimate);  // after the first sample

  const StudyResults results = aggregate(study, first.results);
  write_results(study, results);
  const nlohmann::json j = read_json(out / "results.json");
  REQUIRE(j["conditions"].size() == 2);
  CHECK(j["conditions"][0]["name"] == "base");
  CHECK(j["conditions"][1]["name"] == "ed");
  CHECK(j["conditions"][0]["sequences_per_step"] == 4);
  CHECK(j["conditions"][0]["sequences_per_domain_per_step"].get<double>() ==
        doctest::Approx(4.0 / static_cast<double>(j["conditions"][0]["domains"].size())));
  for (const char* metric : {"ce", "mean_jsd", "mi_normalized", "output_similarity", "dppl", "layer0/mean_jsd"}) {
    CAPTURE(metric);
    const nlohmann::json& base = j["conditions"][0]["metrics"][metric];
    const nlohmann::json& ed = j["conditions"][1]["metrics"][metric];
    CHECK(base["n"] == 2);
    CHECK(ed["n"] == 2);
    // The reference against itself: 0 on every seed.
    CHECK(base["vs_reference"]["mean"].get<double>() == 0.0);
    CHECK(base["vs_reference"]["n"] == 2);
    // The other's paired difference, from the runs' own files.
    double diff_sum = 0, base_sum = 0;
    for (uint64_t seed : {1, 2}) {
      const nlohmann::json b = read_json(out / "base" / fmt::format("seed{}", seed) / kStudyRunFile);
      const nlohmann::json e = read_json(out / "ed" / fmt::format("seed{}", seed) / kStudyRunFile);
      diff_sum += e["metrics"][metric].get<double>() - b["metrics"][metric].get<double>();
      base_sum += b["metrics"][metric].get<double>();
    }
    CHECK(ed["vs_reference"]["mean"].get<double>() == doctest::Approx(diff_sum / 2).epsilon(1e-12));
    CHECK(base["mean"].get<double>() == doctest::Approx(base_sum / 2).epsilon(1e-12));
  }
  std::ifstream csv_file(out / "results.csv");
  std::string header;
  std::getline(csv_file, header);
  CHECK(header == "condition,metric,mean,std,n,diff_mean,diff_std,diff_n,diff_lower,diff_higher");
  std::ostringstream html;
  html << std::ifstream(out / "report.html").rdbuf();
  check_mentions(html.str(), {"moe-study: t", "a test", "base", "ed", "<svg", "held-out CE", "Per MoE layer"});

  // A second call reads every run back: nothing is trained or rewritten.
  const fs::path done = out / "ed" / "seed2" / kStudyRunFile,
                 model = out / "ed" / "seed2" / "checkpoints" / "final" / "model.safetensors";
  const auto done_time = fs::last_write_time(done), model_time = fs::last_write_time(model);
  StudyOutcome second = run_study(study, resolve_runs(study), options);
  CHECK(second.trained == 0);
  CHECK(second.read_back == 4);
  CHECK(fs::last_write_time(done) == done_time);
  CHECK(fs::last_write_time(model) == model_time);
  CHECK(second.results[3].metric("ce") == first.results[3].metric("ce"));

  // A run stopped after its step-2 checkpoint resumes from it: 2 steps trained, the same numbers as before (bit-exact
  // resume).
  fs::remove(out / "base" / "seed1" / kStudyRunFile);
  fs::remove_all(out / "base" / "seed1" / "checkpoints" / "final");
  StudyOutcome resumed = run_study(study, resolve_runs(study), options);
  CHECK(resumed.trained == 1);
  CHECK(resumed.read_back == 3);
  CHECK(resumed.results[0].trained_steps == 2);
  CHECK(resumed.results[0].metric("ce") == first.results[0].metric("ce"));

  // The study file changed: the finished runs no longer match it. An error names the run and the key ...
  std::string text = study_text(out, kTwoConditions);
  text.replace(text.find("train.steps = 4"), 15, "train.steps = 5");
  Study changed = write_and_load(dir.path(), text);
  check_mentions(error_of([&] { check_finished_runs(changed, resolve_runs(changed), false); }),
                 {"base seed 1", "train.steps: was 4, now 5", "--rerun-changed"});
  // ... unless the runs are to be redone.
  std::vector<std::optional<StudyRunResult>> kept = check_finished_runs(changed, resolve_runs(changed), true);
  CHECK(std::none_of(kept.begin(), kept.end(), [](const auto& r) { return r.has_value(); }));
  CHECK_FALSE(fs::exists(out / "base" / "seed1"));
}

TEST_CASE("study: --jobs 2 runs the grid as child processes of moe-study") {
  // moe-study sits in <build>/bin beside <build>/tests/moelab_tests; a build of the tests alone has none.
  const fs::path exe = fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "bin" / "moe-study";
  if (!fs::exists(exe)) {
    MESSAGE("skipped: no " << exe.string() << " (build the moe-study target)");
    return;
  }
  testing::ScratchDir dir("study_jobs");
  const fs::path out = dir.path() / "out";
  Study study = write_and_load(dir.path(), study_text(out, kTwoConditions));
  StudyOptions options;
  options.jobs = 2;
  options.executable = exe;
  StudyOutcome outcome = run_study(study, resolve_runs(study), options);
  CHECK(outcome.trained == 4);
  REQUIRE(outcome.results.size() == 4);
  for (const StudyRunResult& r : outcome.results) {
    CAPTURE(r.dir.string());
    CHECK_FALSE(r.read_back);
    CHECK(std::isfinite(r.metric("ce")));
    CHECK(fs::exists(r.dir / "study.log"));
    CHECK(fs::exists(r.dir / "train.log"));
  }
  CHECK(outcome.results[3].condition == "ed");
  CHECK(outcome.results[3].seed == 2);
}

TEST_CASE("study: '@name' becomes that condition's run folder of the same seed; references must come first") {
  const fs::path out = "studies/x";
  Study study = parse_study(study_text(out, R"(
[[condition]]
name = "base"

[[condition]]
name = "next"
options = { data.corpus = "@base" }
)"),
                            "x.toml");
  std::vector<StudyRun> runs = resolve_runs(study);
  REQUIRE(runs.size() == 4);
  CHECK(runs[1].config.data.corpus == (out / "base" / "seed1").string());
  CHECK(runs[3].config.data.corpus == (out / "base" / "seed2").string());
  CHECK(runs[3].needs == std::vector<size_t>{2});
  CHECK(runs[3].identity["data.corpus"] == "@base");  // a moved --out does not change a run's identity
  CHECK(runs[3].identity.count("train.out_dir") == 0);
  CHECK(study.conditions[1].needs == std::vector<std::string>{"base"});

  auto error = [&](const std::string& conditions) {
    return error_of([&] { parse_study(study_text(out, conditions), "x.toml"); });
  };
  check_mentions(error(R"(
[[condition]]
name = "a"
options = { data.corpus = "@b" }
[[condition]]
name = "b"
)"),
                 {"x.toml [condition a]", "'@b' refers to a later condition"});
  check_mentions(error(R"(
[[condition]]
name = "base"
options = { data.corpus = "@nothing" }
)"),
                 {"x.toml [condition base]", "'@nothing' names no condition"});
  check_mentions(error(R"(
[[condition]]
name = "base"
options = { data.corpus = "@base" }
)"),
                 {"refers to the condition itself"});
}

TEST_CASE("study: a bad option fails before anything runs, naming the file and the condition") {
  testing::ScratchDir dir("study_errors");
  const fs::path out = dir.path() / "out";
  auto resolve_error = [&](const std::string& conditions) {
    return error_of([&] { resolve_runs(parse_study(study_text(out, conditions), "edl.toml")); });
  };
  const char* base = "\n[[condition]]\nname = \"base\"\n";
  check_mentions(
      resolve_error(std::string(base) + "\n[[condition]]\nname = \"adamw\"\noptions = { moe.beta = -1.0 }\n"),
      {"edl.toml [condition adamw]", "moe.beta"});
  check_mentions(resolve_error(std::string(base) + "\n[[condition]]\nname = \"typo\"\noptions = { moe.betta = 0.1 }\n"),
                 {"edl.toml [condition typo]", "unknown key 'moe.betta'"});
  check_mentions(resolve_error(std::string(base) + "\n[[condition]]\nname = \"dense\"\n"
                                                   "options = { model.n_experts = 0, moe.beta = 0.1 }\n"),
                 {"edl.toml [condition dense]", "moe.beta"});  // a check across options
  CHECK_FALSE(fs::exists(out));                                // nothing ran

  auto parse_error = [&](const std::string& text) { return error_of([&] { parse_study(text, "edl.toml"); }); };
  check_mentions(parse_error(study_text(out, std::string(base) + "options = { train.seed = 3 }\n")),
                 {"edl.toml [condition base]", "train.seed cannot be set here", "study.seeds"});
  check_mentions(parse_error(study_text(out, std::string(base) + base)),
                 {"edl.toml [condition base]", "used by an earlier condition"});
  check_mentions(parse_error(study_text(out, "\n[[condition]]\nname = \"a/b\"\n")), {"[A-Za-z0-9_.-]"});
  check_mentions(parse_error(study_text(out, std::string(base) + "colour = 1\n")),
                 {"edl.toml [condition base]", "unknown key 'colour'"});
  check_mentions(parse_error("[study]\nseeds = [1]\n[[condition]]\nname = \"a\"\ntable = false\n"),
                 {"edl.toml", "table = false"});
  check_mentions(parse_error("[study]\nseeds = []\n[[condition]]\nname = \"a\"\n"), {"edl.toml [study]", "seeds"});
  check_mentions(parse_error("[study]\nseeds = [1]\nreference = \"b\"\n[[condition]]\nname = \"a\"\n"),
                 {"edl.toml [study]", "reference 'b' names no condition"});
}

TEST_CASE("study: a dense stage gets its held-out CE and is no row of the results") {
  testing::ScratchDir dir("study_dense");
  const fs::path out = dir.path() / "out";
  std::string text = study_text(out, R"(
[[condition]]
name = "dense"
options = { model.n_experts = 0, model.dense_hidden = 32 }
table = false

[[condition]]
name = "base"
)");
  text.replace(text.find("seeds = [1, 2]"), 14, "seeds = [3]");
  Study study = write_and_load(dir.path(), text);
  StudyOutcome outcome = run_study(study, resolve_runs(study), StudyOptions{});
  REQUIRE(outcome.results.size() == 2);
  const StudyRunResult& dense = outcome.results[0];
  CHECK(dense.dense);
  CHECK(std::isfinite(dense.metric("ce")));
  CHECK(std::isnan(dense.metric("mean_jsd")));  // no MoE layer: no routing metrics
  for (const auto& [name, value] : dense.metrics) CHECK(name.rfind("ce", 0) == 0);
  CHECK(fs::exists(out / "dense" / "seed3" / "evaluation.json"));
  const StudyResults results = aggregate(study, outcome.results);
  REQUIRE(results.conditions.size() == 1);
  CHECK(results.conditions[0].name == "base");
  CHECK(results.runs.size() == 2);
}

TEST_CASE("study: mean, sample standard deviation and paired differences against hand-computed values") {
  Summary s = summarize({1.0, 2.0, NAN, 4.0});
  CHECK(s.n == 3);
  CHECK(s.mean == doctest::Approx(7.0 / 3.0));
  CHECK(s.std == doctest::Approx(std::sqrt(7.0 / 3.0)));  // ((16 + 1 + 25) / 9) / (3 - 1)
  CHECK(std::isnan(summarize({5.0}).std));
  CHECK(summarize({}).n == 0);

  // Seed 4 has no reference; seed 3 is NaN in the condition: pairs on seeds 1 and 2 only.
  PairedDifference d = paired_difference({{1, 3.0}, {2, 1.0}, {3, NAN}, {4, 9.0}}, {{1, 2.0}, {2, 1.5}, {3, 1.0}});
  CHECK(d.diff.n == 2);
  CHECK(d.diff.mean == doctest::Approx(0.25));                  // (1 - 0.5) / 2
  CHECK(d.diff.std == doctest::Approx(std::sqrt(0.5625 * 2)));  // (0.75^2 + 0.75^2) / 1
  CHECK(d.lower == 1);
  CHECK(d.higher == 1);
  CHECK(direction_text(d) == "1 lower, 1 higher");

  // aggregate() on runs made by hand: two conditions x three seeds, one run of "b" missing.
  Study study = parse_study(
      "[study]\nseeds = [1, 2, 3]\nreference = \"a\"\n[[condition]]\nname = \"a\"\n[[condition]]\nname = \"b\"\n",
      "h.toml");
  std::vector<StudyRunResult> runs;
  auto run = [&](const std::string& condition, uint64_t seed, double ce) {
    StudyRunResult r;
    r.condition = condition, r.seed = seed, r.sequences_per_step = 8, r.domains = {"x", "y", "z", "w"};
    r.metrics = {{"ce", ce}, {"ce/x", ce + 1}};
    runs.push_back(r);
  };
  run("a", 1, 2.0), run("a", 2, 3.0), run("a", 3, 4.0);
  run("b", 1, 1.5), run("b", 3, 3.0);
  StudyResults results = aggregate(study, runs);
  REQUIRE(results.conditions.size() == 2);
  CHECK(results.expected_runs == 6);
  const ConditionResult& b = results.conditions[1];
  CHECK(b.sequences_per_domain == 2.0);
  CHECK(b.seeds == std::vector<uint64_t>{1, 3});
  const MetricResult* ce = b.metric("ce");
  REQUIRE(ce != nullptr);
  CHECK(ce->summary.mean == doctest::Approx(2.25));
  CHECK(ce->summary.std == doctest::Approx(std::sqrt(2 * 0.75 * 0.75)));
  CHECK(ce->vs_reference.diff.n == 2);
  CHECK(ce->vs_reference.diff.mean == doctest::Approx(-0.75));  // (-0.5 + -1) / 2
  CHECK(ce->vs_reference.lower == 2);
  CHECK(direction_text(ce->vs_reference) == "2/2 lower");
  CHECK(results.conditions[0].metric("ce")->summary.std == doctest::Approx(1.0));
  const std::string csv = results_csv(results);
  CHECK(csv.find("\nb,ce,2.25,") != std::string::npos);
  CHECK(csv.find(",2,2,0\n") != std::string::npos);  // diff_n, diff_lower, diff_higher of b's CE
}
