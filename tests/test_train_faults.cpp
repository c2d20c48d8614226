// The training run's faults: a diverging run stops before it writes non-finite weights, checkpoints are atomic
// folders that resume from the newest complete one, bad checkpoint metadata and bad data fail clearly before any
// step, and the metrics log survives a kill (no repeated steps) and a full disk (a loud error).
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/train/checkpoint.h"
#include "apps/train/trainer.h"
#include "tests/testing.h"
#include "tests/train_testing.h"

using namespace moelab;
using namespace moelab::apps;
using moelab::testing::small_train_config;
namespace fs = std::filesystem;

namespace {

// The "step" of every step line (not the eval lines) of a metrics log, in file order; every line must parse.
std::vector<int64_t> logged_steps(const fs::path& log) {
  std::ifstream in(log);
  std::vector<int64_t> steps;
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("loss")) steps.push_back(j["step"].get<int64_t>());
  }
  return steps;
}

std::vector<int64_t> one_to(int64_t n) {
  std::vector<int64_t> steps;
  for (int64_t s = 1; s <= n; ++s) steps.push_back(s);
  return steps;
}

bool all_finite(const nn::SafeTensors& file) {
  for (const nn::NamedTensor& t : file.tensors)
    if (t.tensor.dtype() != DType::I32)
      for (double x : testing::as_doubles(t.tensor))
        if (!std::isfinite(x)) return false;
  return true;
}

// Rewrites `file` with `edit` applied to its tensors and metadata (the way a corrupted checkpoint would look).
void rewrite(const fs::path& file, const std::function<void(nn::SafeTensors&)>& edit) {
  nn::SafeTensors st = nn::load_safetensors(file);
  edit(st);
  nn::save_safetensors(file, st.tensors, st.metadata);
}

}  // namespace

TEST_CASE("train faults: a huge learning rate stops at the first non-finite step, naming the term, with no non-finite "
          "checkpoint") {
  testing::ScratchDir dir("faults_lr");
  TrainConfig c = small_train_config(dir.path(), 20);
  c.model.n_experts = 0;  // dense: no router check between the weights and the loss
  c.losses.alpha = 0, c.losses.z_coef = 0;
  c.lr = 1e30, c.min_lr = 1e30, c.warmup = 0, c.grad_clip = 0, c.checkpoint_every = 1;
  std::ostringstream quiet;
  Trainer t(c, quiet);
  std::string error = testing::error_of([&] { t.run(); });
  // Step 1's update takes the weights to ~1e30: step 2's attention overflows.
  testing::check_mentions(error, {"step 2: the CE loss is", "nan", "training stopped before the update"});
  CHECK(logged_steps(t.metrics_path()) == one_to(1));  // the non-finite step is not logged
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir / "checkpoints")) {
    names.push_back(entry.path().filename().string());
    for (const char* file : {kModelFile, kStateFile})
      CHECK_MESSAGE(all_finite(nn::load_safetensors(entry.path() / file)), (entry.path() / file) << " is not finite");
  }
  CHECK(names == std::vector<std::string>{"step_000001"});
}

TEST_CASE("train faults: resuming from a checkpoint with an Inf in an Adam moment fails naming the tensor") {
  testing::ScratchDir dir("faults_inf");
  std::ostringstream quiet;
  Trainer first(small_train_config(dir.path(), 4), quiet);
  first.run(2);
  fs::path checkpoint = first.save_checkpoint("step_000002");
  std::string moment;
  rewrite(checkpoint / kStateFile, [&](nn::SafeTensors& st) {
    nn::NamedTensor& m = st.tensors.front();
    moment = m.name;
    m.tensor.data<float>()[3] = std::numeric_limits<float>::infinity();
  });
  REQUIRE(moment.starts_with("m."));
  TrainConfig resumed = small_train_config(dir.path(), 4);
  resumed.resume = checkpoint.string();
  testing::check_mentions(testing::error_of([&] { Trainer t(resumed, quiet); }),
                          {(checkpoint / kStateFile).string(), "tensor '" + moment + "'", "holds inf at element 3"});
}

TEST_CASE("train faults: bad checkpoint metadata fails naming the file, the field and the value") {
  testing::ScratchDir dir("faults_metadata");
  std::ostringstream quiet;
  Trainer first(small_train_config(dir.path(), 4), quiet);
  first.run(2);
  const fs::path good = first.save_checkpoint("step_000002"), bad = dir / "bad";
  struct Case {
    const char* file;
    const char* field;
    const char* value;  // nullptr: the field is removed
    std::vector<std::string> mentions;
    const char* named_file = nullptr;  // the file the error names, when not `file`
  };
  const std::vector<Case> cases = {
      {kStateFile, "step", "abc", {"metadata 'step' = \"abc\" is not an integer"}},
      {kStateFile, "step", "12abc", {"metadata 'step' = \"12abc\" is not an integer"}},
      {kStateFile, "step", "", {"metadata 'step' = \"\" is not an integer"}},
      {kStateFile, "step", "-3", {"metadata 'step' = -3 must be >= 0"}},
      {kStateFile, "step", "4", {"metadata 'step' = 4 is not below train.steps = 4", "nothing left to train"}},
      {kStateFile, "step", "9", {"metadata 'step' = 9 is not below train.steps = 4"}},
      {kStateFile, "step", "99999999999999999999", {"metadata 'step' = \"99999999999999999999\" does not fit"}},
      {kStateFile, "step", "3", {"metadata 'step' = 2 differs from the step 3", "different saves"}, kModelFile},
      {kStateFile, "optimizer_steps", "-100000", {"metadata 'optimizer_steps' = -100000 is out of range [0, 2]"}},
      {kStateFile, "optimizer_steps", "-9223372036854775808", {"= -9223372036854775808 is out of range [0, 2]"}},
      {kStateFile, "tokens_seen", "1e6", {"metadata 'tokens_seen' = \"1e6\" is not an integer"}},
      {kStateFile, "tokens_seen", nullptr, {"no 'tokens_seen' in __metadata__"}},
      {kStateFile, "loader", "{\"seed\": ", {"metadata 'loader' is not valid JSON"}},
      {kStateFile, "loader", "{}", {"metadata 'loader'", "missing key 'seed'"}},
      {kStateFile, "loader", "{\"seed\": \"x\"}", {"metadata 'loader'", "key 'seed' has the wrong type"}},
      {kModelFile, "train_config", "[1, ", {"metadata 'train_config' is not a JSON object"}},
      {kModelFile, "config", "{\"d_model\": ", {"metadata 'config' is not a model config"}},
  };
  for (const Case& bad_case : cases) {
    CAPTURE(bad_case.field);
    CAPTURE(bad_case.value ? bad_case.value : "(removed)");
    fs::remove_all(bad);
    fs::copy(good, bad);
    rewrite(bad / bad_case.file, [&](nn::SafeTensors& st) {
      if (bad_case.value)
        st.metadata[bad_case.field] = bad_case.value;
      else
        st.metadata.erase(bad_case.field);
    });
    TrainConfig c = small_train_config(dir.path(), 4);
    c.resume = bad.string();
    std::string error = testing::error_of([&] { Trainer t(c, quiet); });
    testing::check_mentions(error, {(bad / (bad_case.named_file ? bad_case.named_file : bad_case.file)).string()});
    testing::check_mentions(error, bad_case.mentions);
  }
}

TEST_CASE("train faults: after a resume the metrics log holds every step once, in order") {
  // A run killed after step 6 with its last checkpoint at step 4: the log has steps 5 and 6 and a torn line.
  testing::ScratchDir dir("faults_log");
  std::ostringstream quiet;
  TrainConfig c = small_train_config(dir.path(), 8);
  c.checkpoint_every = 2, c.eval_every = 2;
  Trainer first(c, quiet);
  first.run(4);
  {
    std::ofstream log(first.metrics_path(), std::ios::app);
    log << R"({"step": 5, "loss": 1.0})" << '\n'
        << R"({"step": 6, "eval": {"ce": 1.0}})" << '\n'
        << R"({"step": 6, "loss": 1.0})" << '\n'
        << R"({"step": 7, "lo)";
  }
  c.resume = (dir / "checkpoints" / "step_000004").string();
  std::ostringstream out;
  Trainer resumed(c, out);
  testing::check_mentions(out.str(), {"dropped 4 lines after step 4"});
  resumed.run();
  CHECK(logged_steps(resumed.metrics_path()) == one_to(8));
}

TEST_CASE("train faults: temporaries of a killed run are removed at start, those of a running process are kept") {
  testing::ScratchDir dir("faults_stale");
  const fs::path own = dir / "checkpoints" / fmt::format(".tmp-step_000002-{}", ::getpid());
  const fs::path gone = dir / "data" / "train.shard.tmp-999999999";  // above any pid_max: no such process
  const fs::path running = dir / "checkpoints" / "final" / "model.safetensors.tmp-1";  // pid 1 always runs
  for (const fs::path& folder : {own, gone.parent_path(), running.parent_path()}) fs::create_directories(folder);
  for (const fs::path& file : {own / kModelFile, gone, running}) std::ofstream(file) << "partial";
  std::ostringstream out;
  Trainer t(small_train_config(dir.path(), 2), out);
  CHECK_FALSE(fs::exists(own));
  CHECK_FALSE(fs::exists(gone));
  CHECK(fs::exists(running));
  testing::check_mentions(out.str(), {"cleanup: removed 2 temporaries of an interrupted run", own.string()});
}

TEST_CASE("train faults: a checkpoint is one folder, and saving it again replaces it whole") {
  testing::ScratchDir dir("faults_replace");
  std::ostringstream quiet;
  Trainer t(small_train_config(dir.path(), 4), quiet);
  t.run(1);
  fs::path checkpoint = t.save_checkpoint("latest");
  t.run(2);
  CHECK(t.save_checkpoint("latest") == checkpoint);
  CHECK(nn::read_safetensors_metadata(checkpoint / kStateFile).at("step") == "2");
  CHECK(nn::read_safetensors_metadata(checkpoint / kModelFile).at("step") == "2");
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir / "checkpoints"))
    names.push_back(entry.path().filename().string());
  CHECK(names == std::vector<std::string>{"latest"});  // no temporary left beside it
}

TEST_CASE("train faults: a checkpoint of non-finite weights is refused, naming the tensor") {
  testing::ScratchDir dir("faults_refused");
  std::ostringstream quiet;
  Trainer t(small_train_config(dir.path(), 4), quiet);
  t.run(1);
  const nn::NamedTensor& weight = t.model().lm().named_parameters().back();
  weight.tensor.data<float>()[1] = -std::numeric_limits<float>::infinity();
  testing::check_mentions(
      testing::error_of([&] { t.save_checkpoint("step_000001"); }),
      {"checkpoint step_000001 not written", "tensor '" + weight.name + "'", "holds -inf at element 1"});
  CHECK_FALSE(fs::exists(dir / "checkpoints"));  // neither the checkpoint nor its temporary folder
}

TEST_CASE("train faults: resume from a run folder takes its newest complete checkpoint") {
  testing::ScratchDir dir("faults_newest");
  std::ostringstream quiet;
  TrainConfig c = small_train_config(dir.path(), 8);
  c.checkpoint_every = 2;
  Trainer first(c, quiet);
  first.run(6);
  fs::remove(dir / "checkpoints" / "step_000006" / kStateFile);  // a directory left by a kill under an older version
  for (const fs::path& resume : {dir.path(), dir / "checkpoints"}) {
    CAPTURE(resume);
    c.resume = resume.string();
    std::ostringstream out;
    Trainer resumed(c, out);
    CHECK(resumed.step() == 4);
    testing::check_mentions(out.str(), {(dir / "checkpoints" / "step_000004").string() + " (step 4)",
                                        "skipped step_000006 (no state.safetensors)"});
  }
  c.resume = (dir / "data").string();  // a folder without checkpoints
  testing::check_mentions(testing::error_of([&] { Trainer t(c, quiet); }),
                          {"train.resume", "missing model.safetensors", "no complete checkpoint"});
}

TEST_CASE("train faults: a validation split without one sequence fails before the first step") {
  testing::ScratchDir dir("faults_split");
  TrainConfig c = small_train_config(dir.path(), 4);
  c.data.synthetic_docs = 1, c.model.seq_len = 256;  // fewer than 10 sequences: none is held out for validation
  std::ostringstream quiet;
  testing::check_mentions(testing::error_of([&] { Trainer t(c, quiet); }),
                          {"data.corpus = synthetic", "the validation split has no sequence", "model.seq_len = 256"});
  CHECK_FALSE(fs::exists(dir / "metrics.jsonl"));
}

TEST_CASE("train faults: a failed metrics write stops the run naming the file") {
  if (!fs::exists("/dev/full")) {
    MESSAGE("no /dev/full on this machine: skipped");
    return;
  }
  testing::ScratchDir dir("faults_full");
  fs::create_symlink("/dev/full", dir / "metrics.jsonl");  // every write fails with ENOSPC
  TrainConfig c = small_train_config(dir.path(), 4);
  c.checkpoint_every = 1;
  std::ostringstream quiet;
  Trainer t(c, quiet);
  testing::check_mentions(
      testing::error_of([&] { t.run(); }),
      {(dir / "metrics.jsonl").string(), "writing the line of step 1 failed", "No space left on device"});
  CHECK_FALSE(fs::exists(dir / "checkpoints"));  // stopped at the first line, before the step's checkpoint
}
