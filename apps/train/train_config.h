#pragma once
// moe-train's configuration: a named preset (tiny/S/M), then a TOML file, then command-line overrides.
// Every option is one row of a table (train_config.cpp) that gives its TOML key ("train.steps"), its command-line
// flag (--train.steps), its allowed values and its help text, so the file format, --help, the range checks and the
// checkpoint metadata cannot drift apart.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/loader.h"
#include "engine/dtype.h"
#include "engine/enum_names.h"
#include "engine/precision.h"
#include "moe/losses.h"
#include "nn/config.h"
#include "optim/adamw.h"
#include "optim/omoe.h"

namespace CLI {
class App;
}

namespace moelab::apps {

struct DataConfig {
  // A folder with train.jsonl (+ validation.jsonl), a .jsonl file (validation: every 20th sequence held out), or
  // "synthetic" (the built-in generator of the tests).
  std::string corpus = "synthetic";
  std::string text_key = "text";
  std::string domain_key = "domain";  // dotted paths allowed, e.g. meta.pile_set_name
  std::string tokenizer = "byte";     // "byte" | "bpe" (trained on the corpus into out_dir) | a .model file
  int64_t bpe_vocab = 8192;
  bool balanced = false;              // domain-balanced sampling
  data::DomainLabels labels = data::DomainLabels::True;  // the random-label controls of the training split
  int64_t synthetic_docs = 120;       // per domain, for corpus = "synthetic"
  int64_t synthetic_domains = 4;
};

enum class OptimizerKind { AdamW, OMoE };  // OMoE: AdamW with orthogonal expert updates ([omoe] options)
constexpr EnumNames<OptimizerKind, 2> enum_names(OptimizerKind) {
  return {{{OptimizerKind::AdamW, "adamw"}, {OptimizerKind::OMoE, "omoe"}}};
}

struct TrainConfig {
  std::string preset = "tiny";
  nn::ModelConfig model;
  DataConfig data;
  moe::RouterLossConfig losses;
  optim::AdamWConfig adamw;
  OptimizerKind optimizer = OptimizerKind::AdamW;
  optim::OMoEConfig omoe;
  int64_t steps = 300;
  int64_t batch_size = 8;        // sequences per micro-batch
  int64_t grad_accum = 1;        // micro-batches per optimizer step (their gradients are averaged)
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup = 30;
  double grad_clip = 1.0;
  uint64_t seed = 1234;
  Device device = Device::CPU;
  Precision precision = Precision::FP32;  // of the matrix products (engine/precision.h); weights stay f32
  int64_t eval_every = 100;      // steps between validation passes (0: only at the end)
  int64_t eval_batches = 8;
  int64_t checkpoint_every = 0;  // steps between checkpoints (0: only the final one)
  int64_t log_every = 10;        // steps between progress lines when not on a terminal
  std::string out_dir = "runs/latest";
  std::string resume;            // a checkpoint folder to continue from
  // A checkpoint (or run folder) whose weights start this run, with a fresh optimizer at step 0. The same architecture
  // is loaded as is; a dense checkpoint into an MoE model is upcycled (moe/upcycle.h: every expert a copy of the FFN,
  // times 1 + upcycle_noise * N(0, 1) per weight; the router initialized from the seed as usual).
  std::string init_from;
  double upcycle_noise = 0;

  // Throws std::invalid_argument naming the option as the user writes it, after `source` (where the values came from:
  // "config", a file name): every option's range first ("config: optim.beta1 must be in [0, 1), got 1.5"), then the
  // checks across options (optim.min_lr <= optim.lr, model.top_k <= model.n_experts, ...).
  void validate(const std::string& source = "config") const;
};

// The preset's model and batch: the named configs of docs/model.md (tiny, S, M).
TrainConfig train_preset(const std::string& name);

// Applies a TOML document (errors name the file, the key and the expected type or range; unknown keys are errors).
void apply_toml(TrainConfig& config, const std::string& toml_text, const std::string& source_name);

// Declares every option on `app` (with help and defaults) plus --config and --preset. After app.parse(...), call
// resolve() to get preset -> file -> flags applied in that order, then validated. A flag's text is parsed as that one
// option's value (never as TOML source), with the type and range checks of the TOML path; errors name the flag.
class TrainOptions {
 public:
  explicit TrainOptions(CLI::App& app);
  TrainConfig resolve() const;

 private:
  std::string config_file_;
  std::string preset_;
  std::vector<std::string> values_;  // storage CLI11 writes into, one per option
  CLI::App* app_;
};

void to_json(nlohmann::json& j, const TrainConfig& c);  // every option, for checkpoints and logs

}  // namespace moelab::apps
