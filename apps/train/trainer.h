#pragma once
// The training loop of moe-train: data -> model -> loss -> backward -> clip -> AdamW, with validation per domain,
// a JSONL metrics log, a progress line, and checkpoints that resume bit-exactly. A NaN or Inf in a loss term or the
// gradient norm stops the run before the update; a failed write of the log stops it too.
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <ostream>

#include "apps/train/data_setup.h"
#include "apps/train/train_config.h"
#include "moe/analysis/routing_stats.h"
#include "moe/model.h"
#include "optim/adamw.h"
#include "optim/omoe.h"
#include "optim/schedule.h"

namespace moelab::apps {

// The validation pass during training (a fixed sample of the validation split; "eval" lines of the metrics log).
// moe-eval's held-out evaluation of a checkpoint is apps/analysis/evaluation.h.
struct Validation {
  std::vector<double> domain_ce;  // [M] mean token CE per domain on the validation sample (NaN: no tokens)
  double mean_ce = 0;             // over all validation tokens
  // Per MoE layer, the routing statistics averaged over the validation batches (dead experts: over all of them).
  std::vector<moe::RoutingStats> routing;
};

class Trainer {
 public:
  // Removes the temporaries of a killed run from out_dir, builds data (both splits must hold a sequence), model and
  // optimizer; with config.resume (a checkpoint, or a run's out_dir or checkpoints/ folder: its newest complete
  // checkpoint), restores everything from that checkpoint and cuts the metrics log back to its step.
  explicit Trainer(TrainConfig config, std::ostream& out);

  // Trains until step `until` (default: config.steps), evaluating, logging and checkpointing on the way.
  // Writes the final checkpoint when it reaches config.steps, then runs the final evaluation.
  void run(int64_t until = -1);
  // One optimizer step on the next training batch; returns its loss terms (the micro-batches' mean). Throws, naming
  // the step and the term, when a loss term or the gradient norm is NaN or Inf; the weights are then left unchanged.
  moe::LossTerms train_step();
  Validation validate();
  // Writes checkpoints/<name> as one unit (a temporary folder, then one rename); refuses non-finite weights or state.
  std::filesystem::path save_checkpoint(const std::string& name);

  int64_t step() const { return step_; }
  const TrainConfig& config() const { return config_; }
  moe::MoEModel& model() { return *model_; }
  const TrainingData& data() const { return data_; }
  const optim::OMoE* omoe() const { return omoe_.get(); }  // null unless optim.name = omoe
  const optim::AdamW& optimizer() const { return *optimizer_; }
  std::filesystem::path metrics_path() const;

 private:
  void restore(const std::filesystem::path& checkpoint_dir);
  void init_weights(const std::filesystem::path& from);  // train.init_from
  void check_finite_step(const moe::LossTerms& loss, double grad_norm) const;
  void append_metrics(const nlohmann::json& line);  // throws naming the file when the write fails
  void log_step(const moe::LossTerms& loss, double tokens_per_s);
  void log_validation(const Validation& validation);
  void show_progress(const moe::LossTerms& loss, double tokens_per_s, double seconds_per_step);

  TrainConfig config_;
  std::ostream& out_;
  TrainingData data_;
  std::unique_ptr<moe::MoEModel> model_;
  std::unique_ptr<optim::AdamW> optimizer_;
  std::unique_ptr<optim::OMoE> omoe_;  // with optim.name = omoe: projects expert updates, steps optimizer_
  optim::OMoEReport last_omoe_;
  optim::LRSchedule schedule_;
  std::unique_ptr<data::Loader> train_loader_;
  std::ofstream metrics_;
  uint64_t metrics_bytes_ = 0;  // the log's size after its last complete line: a failed write is cut back to it
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  bool on_terminal_ = false;
  Tensor last_domains_;  // of the last training batch, for routing statistics
  double last_grad_norm_ = 0, last_lr_ = 0;
};

}  // namespace moelab::apps
