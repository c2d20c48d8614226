#pragma once
// Held-out evaluation of checkpoints (moe-eval; reused by moe-analyze and the demo):
//   checkpoint folder -> MoEModel (architecture from the "config" metadata) + the data config of its run
//   ("train_config" metadata, with command-line overrides) -> the validation split of the corpus -> per domain:
//   mean CE (nats/token), perplexity, bits per byte; and the router-permutation dPPL per MoE layer and domain
//   (docs/analysis.md). docs/evaluation.md explains every number and the JSON layout.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "apps/train/data_setup.h"
#include "apps/train/train_config.h"
#include "moe/model.h"

namespace moelab::apps {

// Data settings that replace the checkpoint's own (empty / 0: keep the checkpoint's).
struct EvalDataOverrides {
  std::string corpus;     // a corpus folder, a .jsonl file or "synthetic"
  std::string tokenizer;  // "byte" or a SentencePiece .model file; must have the model's vocabulary size
  std::string text_key, domain_key;
  int64_t seq_len = 0;  // tokens per evaluated sequence; at most the model's trained seq_len
};

struct EvalOptions {
  EvalDataOverrides data;
  int64_t max_batches = 0;   // 0: every validation sequence; N: the trainer's sample of N shuffled batches
  int64_t batch_size = 0;    // 0: train.batch_size of the checkpoint's run
  int64_t permutations = 3;  // router permutations averaged per MoE layer; 0: no dPPL
  uint64_t seed = 0;         // of the permutations
  Device device = Device::CPU;
  // Where shards built from a JSONL corpus are cached (<data_dir>/data). Empty: a folder under the system's temp
  // folder named by a hash of the corpus path, tokenizer, keys and seq_len. A run's own folder is never written.
  std::filesystem::path data_dir;
};

// Checks the options a user gives on the command line: counts >= 0, a --data-dir that is a folder if it exists.
// Throws std::invalid_argument naming the flag and the value.
void validate(const EvalOptions& options);

// A checkpoint loaded for evaluation.
struct LoadedCheckpoint {
  std::filesystem::path dir;
  int64_t step = 0;
  // The run's options with model = the checkpoint's "config", and the data config resolved for evaluation:
  // overrides applied, data.tokenizer = "byte" or a .model file, model.seq_len = the evaluated sequence length.
  TrainConfig config;
  nn::ModelConfig model_config;              // the architecture, as stored
  std::vector<std::string> ignored_options;  // train_config keys this build does not know (from other versions)
  std::unique_ptr<moe::MoEModel> model;      // on the CPU, no router losses
};

// Reads <dir>/model.safetensors. Errors name the folder or file and what is missing or inconsistent: no such folder, no
// model file, no "config" metadata or a bad key in it, parameters that do not fit the config (checked before the model
// is built) or are not finite, overrides that do not fit the model. `dir` may also be a run folder (out_dir): its
// checkpoints/final is used.
LoadedCheckpoint load_checkpoint(const std::filesystem::path& dir, const EvalOptions& options = {});

// The run's options from a checkpoint's "train_config" metadata (flat JSON, key -> value, as written by to_json).
// Keys this build does not know are listed in `ignored` instead of failing (checkpoints of other versions).
TrainConfig train_config_from_json(const nlohmann::json& flat, std::vector<std::string>* ignored = nullptr);

// Tokenizer, domains and the validation shard for a loaded checkpoint (the trainer's prepare_data on the resolved
// data config, so the split is the one the run held out). Errors name the corpus and the bad line or key.
TrainingData prepare_eval_data(const LoadedCheckpoint& checkpoint, const EvalOptions& options = {});

// The evaluated sequences, batched, with their byte counts.
struct EvalSet {
  std::vector<data::Batch> batches;
  std::vector<int64_t> domain_tokens;  // [M] target tokens per domain
  std::vector<int64_t> domain_bytes;   // [M] UTF-8 bytes of those targets' text (tokenizer.decode)
  int64_t sequences = 0;
  std::string selection;  // e.g. "all 256 validation sequences" or "4 shuffled batches of 8"
};

// max_batches = 0 (or at least the whole split): every sequence once, in shard order, in batches of batch_size (the
// last one shorter). Otherwise the first max_batches batches of a Loader with seed 0 and shuffling: exactly the
// sample Trainer::validate() takes with train.eval_batches = max_batches.
EvalSet make_eval_set(const std::shared_ptr<const data::Shard>& validation, const data::Tokenizer& tokenizer,
                      int64_t batch_size, int64_t max_batches);

// CE summed per domain, with the token and byte counts it is over.
struct DomainScore {
  double ce_sum = 0;  // nats
  int64_t tokens = 0, bytes = 0;
  double ce() const;   // mean nats per token (NaN without tokens)
  double ppl() const;  // exp(ce)
  double bpb() const;  // ce_sum / ln 2 / bytes
};
struct Scores {
  std::vector<DomainScore> domains;  // [M]
  DomainScore overall;               // all domains together
};

// One pass of the model over the set (no gradients), on the model's device.
Scores score(moe::MoEModel& model, const EvalSet& set, int64_t num_domains);

// Router-permutation dPPL of one MoE layer, absolute and relative to the intact model's PPL (the relative one does
// not grow with the baseline's perplexity, so domains and runs of different PPL compare).
struct LayerDPPL {
  int64_t layer = 0;                               // transformer block index
  std::vector<std::vector<int64_t>> permutations;  // [P][E]: row e of the permuted router is row pi[e] of the trained
  std::vector<double> domains;                     // [M] mean over pi of PPL_pi - PPL (NaN: no tokens, or E < 2)
  double overall = 0;                              // the same over all evaluated tokens
  std::vector<double> relative_domains;            // [M] mean over pi of (PPL_pi - PPL) / PPL (NaN as for domains)
  double relative_overall = 0;                     // the same over all evaluated tokens
};

// A seeded random derangement of 0..n-1 (no fixed point, so every expert's row moves; n >= 2), portable: SplitMix64
// Fisher-Yates, redrawn until no element stays.
std::vector<int64_t> random_derangement(int64_t n, uint64_t seed);

// For every MoE layer l: replace its router weight W [E, d] by W[pi] for `permutations` seeded derangements pi
// (seed derived from (seed, l, p)), evaluate, restore W exactly. `base` is score(model, set) of the intact model.
std::vector<LayerDPPL> router_permutation_dppl(moe::MoEModel& model, const EvalSet& set, const Scores& base,
                                               int64_t num_domains, int64_t permutations, uint64_t seed);

// Everything moe-eval reports about one checkpoint.
struct CheckpointEvaluation {
  std::filesystem::path checkpoint;
  int64_t step = 0;
  TrainConfig config;            // as resolved by load_checkpoint; batch_size = the evaluation's
  nn::ModelConfig model_config;  // as stored
  std::vector<std::string> ignored_options;
  data::Domains domains;
  std::string tokenizer;  // Tokenizer::name()
  int64_t sequences = 0, batches = 0;
  std::string selection;
  Scores scores;
  int64_t permutations = 0;
  uint64_t seed = 0;
  std::vector<LayerDPPL> dppl;  // empty with permutations = 0 or a dense model
};

CheckpointEvaluation evaluate_checkpoint(const std::filesystem::path& dir, const EvalOptions& options = {});

// Throws when a result that should be a number is not finite (a diverged or corrupt model), naming each one: the CE of
// every domain with tokens and of all domains, and every dPPL (absolute and relative) that was computed. NaN for a
// domain without tokens is no error.
void check_finite_results(const CheckpointEvaluation& eval);

// The terminal table: one row per domain (CE, PPL, bpb, tokens, dPPL per MoE layer with the relative dPPL in % next
// to it) and a row for all domains.
std::string format_table(const CheckpointEvaluation& eval);
// The JSON object of one checkpoint (schema in docs/evaluation.md); NaN values are null.
nlohmann::json evaluation_json(const CheckpointEvaluation& eval);

}  // namespace moelab::apps
