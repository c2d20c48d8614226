#include "apps/train/trainer.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include "apps/train/checkpoint.h"
#include "data/file_io.h"
#include "data/rng.h"
#include "engine/cuda/runtime.h"
#include "engine/error.h"
#include "moe/upcycle.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

struct BatchTensors {
  Tensor inputs, targets;  // i32 [B, T], [B*T] on the model's device
  Tensor domains;          // i32 [B] on the host: the losses and statistics read them there
};

static BatchTensors to_tensors(const data::Batch& b, Device device) {
  return {from_vector(b.inputs, {b.B, b.T}, device), from_vector(b.targets, {int64_t(b.B) * b.T}, device),
          from_vector(b.domains, {b.B})};
}

// After a resume from `step`, the log keeps its lines up to that step: the lines of later steps (written after the
// checkpoint, before the run died) and a torn last line go, so the steps never go back in time. Returns the size kept.
static uint64_t truncate_metrics_log(const fs::path& path, int64_t step, std::ostream& out) {
  if (!fs::exists(path)) return 0;
  std::istringstream in(data::read_file(path));
  std::string kept;
  int64_t dropped = 0;
  for (std::string line; std::getline(in, line);) {
    const bool complete = !in.eof();  // the last line has no '\n' only when its write was cut short
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (complete && j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
        j["step"].get<int64_t>() <= step)
      kept += line + '\n';
    else
      ++dropped;
  }
  if (dropped > 0) {
    data::write_file_atomic(path, [&](std::ostream& file) { file << kept; });
    out << fmt::format("resume: {}: dropped {} lines after step {} (logged after the checkpoint, or torn)\n",
                       path.string(), dropped, step);
  }
  return kept.size();
}

Trainer::Trainer(TrainConfig config, std::ostream& out) : config_(std::move(config)), out_(out) {
  config_.validate();
  if (config_.device == Device::CUDA && cuda::device_count() == 0)
    throw std::invalid_argument(cuda::built_with_cuda()
                                    ? "train.device = cuda: no CUDA device is visible"
                                    : "train.device = cuda: this build has no CUDA backend (MOELAB_CUDA=ON or SIM)");
  std::vector<fs::path> stale = remove_stale_temporaries(config_.out_dir);
  if (!stale.empty()) {
    std::string names;
    for (const fs::path& path : stale) names += (names.empty() ? "" : ", ") + path.string();
    out_ << fmt::format("cleanup: removed {} temporaries of an interrupted run: {}\n", stale.size(), names);
  }
  ResumePoint resume;
  if (!config_.resume.empty()) {
    resume = find_checkpoint(config_.resume);
    if (!resume.choice.empty()) out_ << resume.choice << '\n';
  }
  data_ = prepare_data(config_);
  // Before the first step: a split without one whole sequence would otherwise fail only after training.
  for (const auto& [split, shard] : {std::pair{"training", data_.train}, std::pair{"validation", data_.validation}})
    if (shard->size() == 0)
      fail("data.corpus = {}: the {} split has no sequence of model.seq_len = {} tokens (too few or too short "
           "documents)",
           config_.data.corpus, split, config_.model.seq_len);
  check_vocab(config_, *data_.tokenizer);
  if (!resume.dir.empty()) {
    nn::ModelConfig saved = checkpoint_model_config(resume.dir);
    if (json(saved) != json(config_.model))
      throw std::invalid_argument(fmt::format("resume: the checkpoint's model config {} does not match this run's {}",
                                              json(saved).dump(), json(config_.model).dump()));
  }
  // Built on the CPU from the seed, then moved: the same seed gives the same model on every device.
  model_ = std::make_unique<moe::MoEModel>(config_.model, config_.losses, config_.seed);
  if (!config_.init_from.empty() && resume.dir.empty()) init_weights(config_.init_from);  // a resume has its own
  model_->lm().to(config_.device);
  optimizer_ = std::make_unique<optim::AdamW>(model_->lm().named_parameters(), config_.adamw);
  if (config_.optimizer == OptimizerKind::OMoE)
    omoe_ = std::make_unique<optim::OMoE>(*optimizer_, model_->moe_layers(), config_.omoe);
  schedule_ = {config_.lr, config_.min_lr, config_.warmup, config_.steps};
  data::LoaderOptions loader_options;
  loader_options.batch_size = static_cast<int>(config_.batch_size);
  loader_options.seed = config_.seed;
  loader_options.balanced_domains = config_.data.balanced;
  train_loader_ = std::make_unique<data::Loader>(data_.train, loader_options);
  fs::create_directories(config_.out_dir);
  if (!resume.dir.empty()) {
    restore(resume.dir);
    metrics_bytes_ = truncate_metrics_log(metrics_path(), step_, out_);
  }
  // The weights' bf16 copies (each made at its first product), kept from here, where only the optimizer writes them.
  if (config_.precision == Precision::BF16) optimizer_->keep_bf16_weights();
  metrics_.open(metrics_path(), resume.dir.empty() ? std::ios::trunc : std::ios::app);
  if (!metrics_) throw std::runtime_error("cannot write the metrics log " + metrics_path().string());
  on_terminal_ = &out_ == &std::cout && isatty(STDOUT_FILENO);
}

void Trainer::init_weights(const fs::path& from) {
  const fs::path dir = find_checkpoint(from).dir, path = dir / kModelFile;
  const nn::ModelConfig source = checkpoint_model_config(dir);
  nn::SafeTensors file = nn::load_safetensors(path);
  if (source.n_experts == 0 && config_.model.n_experts > 0) {
    constexpr uint64_t kNoiseStream = 0x0c7c1e;  // the noise's own seed stream, apart from the model's init
    moe::upcycle_from_dense(*model_, source, file,
                            {.noise = config_.upcycle_noise, .seed = data::derive_seed(config_.seed, kNoiseStream)});
    out_ << fmt::format("init: upcycled the dense model of {} into {} experts per MoE layer (noise {})\n", dir.string(),
                        config_.model.n_experts, config_.upcycle_noise);
    return;
  }
  if (json(source) != json(config_.model))
    fail("train.init_from: the model config of {} ({}) differs from this run's ({}); only a dense checkpoint may start "
         "an MoE model (upcycling)",
         dir.string(), json(source).dump(), json(config_.model).dump());
  if (config_.upcycle_noise != 0)
    fail("train.upcycle_noise = {}: {} is not a dense checkpoint, nothing is upcycled", config_.upcycle_noise,
         dir.string());
  nn::check_parameters_match(config_.model, file, path.string());
  nn::load_parameters(model_->lm(), file, path.string());
  out_ << fmt::format("init: weights from {}\n", dir.string());
}

fs::path Trainer::metrics_path() const { return fs::path(config_.out_dir) / "metrics.jsonl"; }

// The step's ED scope: per MoE layer, the sum of every other micro-batch's domain sums.
static moe::EDStepScope others_of(const std::vector<std::vector<moe::DomainSums>>& sums, size_t micro) {
  moe::EDStepScope scope;
  scope.micro_batches = static_cast<int64_t>(sums.size());
  scope.rest.resize(sums[micro].size());
  for (size_t m = 0; m < sums.size(); ++m)
    if (m != micro)
      for (size_t l = 0; l < sums[m].size(); ++l) scope.rest[l].add(sums[m][l]);
  return scope;
}

// What the expert divergence pulls apart in micro-batch `micro` of `micro_batches` (moe.ed_groups): the domains, or
// every sequence on its own, numbered through the micro-batches that share one ED (the step scope).
static moe::EDGroups ed_groups(moe::EDGroupBy by, const BatchTensors& batch, int64_t domains, int64_t micro,
                               int64_t micro_batches) {
  if (by == moe::EDGroupBy::Domain) return {batch.domains, domains};
  const int64_t B = batch.domains.numel();
  std::vector<int32_t> ids(static_cast<size_t>(B));
  std::iota(ids.begin(), ids.end(), static_cast<int32_t>(micro * B));
  return {from_vector(ids, {B}), B * micro_batches};
}

moe::LossTerms Trainer::train_step() {
  ++step_;
  // The products of this step's forwards and backwards, and the weights' copies they multiply under BF16.
  PrecisionGuard precision(config_.precision, optimizer_->bf16_weights());
  const int64_t micro_batches = config_.grad_accum;
  std::vector<BatchTensors> micro;
  for (int64_t m = 0; m < micro_batches; ++m) micro.push_back(to_tensors(train_loader_->next(), config_.device));
  const int64_t domains = data_.domains.size();
  // ED over the whole step: every micro-batch's routing, per group, before any gradient (docs/objective.md, "Batch scope").
  const bool step_scope =
      micro_batches > 1 && config_.losses.ed_scope == moe::EDScope::Step && config_.losses.beta != 0;
  std::vector<moe::EDGroups> groups;
  for (int64_t m = 0; m < micro_batches; ++m)
    groups.push_back(
        ed_groups(config_.losses.ed_groups, micro[m], domains, step_scope ? m : 0, step_scope ? micro_batches : 1));
  std::vector<std::vector<moe::DomainSums>> sums;
  if (step_scope)
    for (int64_t m = 0; m < micro_batches; ++m)
      sums.push_back(model_->routing_domain_sums(micro[m].inputs, groups[m].ids, groups[m].count));

  std::vector<moe::MoELayer*> layers = model_->moe_layers();
  std::vector<std::vector<Tensor>> routed_ids(layers.size()), routed_inputs(layers.size());  // for OMoE
  moe::LossTerms step_loss;  // the micro-batches' mean
  step_loss.domain_ce_sum.assign(domains, 0.0);
  step_loss.domain_tokens.assign(domains, 0);
  for (int64_t m = 0; m < micro_batches; ++m) {
    const BatchTensors& t = micro[m];
    moe::EDStepScope scope = step_scope ? others_of(sums, m) : moe::EDStepScope{};
    moe::Loss loss = model_->loss(t.inputs, t.targets, t.domains, domains, step_scope ? &scope : nullptr, &groups[m]);
    // The step's gradient is the mean of the micro-batches' (each has batch_size sequences).
    const double share = 1.0 / static_cast<double>(micro_batches);
    mul(loss.value, share).backward();
    const moe::LossTerms& terms = loss.terms;
    step_loss.objective += share * terms.objective;
    step_loss.ce += share * terms.ce, step_loss.lb += share * terms.lb, step_loss.z += share * terms.z;
    step_loss.ed += share * terms.ed;  // with step scope every micro-batch reports the step's ED
    for (int64_t d = 0; d < domains; ++d)
      step_loss.domain_ce_sum[d] += terms.domain_ce_sum[d], step_loss.domain_tokens[d] += terms.domain_tokens[d];
    for (size_t l = 0; omoe_ && l < layers.size(); ++l) {
      routed_ids[l].push_back(layers[l]->last_routing().expert_ids);
      routed_inputs[l].push_back(layers[l]->last_input().detach());
    }
    last_domains_ = t.domains;
  }
  const optim::GradClip clip = optim::grad_clip(optimizer_->params(), config_.grad_clip);
  const double grad_norm = clip.norm;
  check_finite_step(step_loss, grad_norm);
  double lr = schedule_.at(step_);
  if (omoe_) {
    // Projectors first, from the mean routed inputs of the whole step; then the (projected) step.
    for (size_t l = 0; l < layers.size(); ++l)
      omoe_->observe(l, concat(routed_ids[l], 0), concat(routed_inputs[l], 0));
    last_omoe_ = omoe_->step(lr, clip.scale);
  } else {
    optimizer_->step(lr, clip.scale);
  }
  optimizer_->zero_grad();
  tokens_seen_ += micro_batches * config_.batch_size * config_.model.seq_len;
  last_grad_norm_ = grad_norm;
  last_lr_ = lr;
  return step_loss;
}

Validation Trainer::validate() {
  NoGradGuard no_grad;
  PrecisionGuard precision(config_.precision, optimizer_->bf16_weights());
  data::LoaderOptions options;
  options.batch_size = static_cast<int>(std::min<int64_t>(config_.batch_size, data_.validation->size()));
  options.seed = 0;  // a fixed, shuffled sample: every domain is represented, and every evaluation sees the same one
  data::Loader loader(data_.validation, options);
  int64_t batches = std::min<int64_t>(config_.eval_batches, std::max<int64_t>(1, loader.batches_per_epoch()));
  int64_t domains = data_.domains.size();
  std::vector<double> ce_sum(domains, 0.0);
  std::vector<int64_t> tokens(domains, 0);
  Validation eval;
  for (int64_t i = 0; i < batches; ++i) {
    BatchTensors t = to_tensors(loader.next(), config_.device);
    moe::LossTerms loss = model_->loss(t.inputs, t.targets, t.domains, domains).terms;
    for (int64_t d = 0; d < domains; ++d) ce_sum[d] += loss.domain_ce_sum[d], tokens[d] += loss.domain_tokens[d];
    std::vector<moe::RoutingStats> stats = moe::routing_stats(model_->moe_layers(), t.domains, domains);
    if (eval.routing.empty()) eval.routing.resize(stats.size());
    for (size_t l = 0; l < stats.size(); ++l) moe::accumulate_mean(eval.routing[l], stats[l], static_cast<double>(i));
  }
  double total = 0;
  int64_t count = 0;
  for (int64_t d = 0; d < domains; ++d) {
    eval.domain_ce.push_back(tokens[d] ? ce_sum[d] / tokens[d] : NAN);
    total += ce_sum[d], count += tokens[d];
  }
  eval.mean_ce = count ? total / count : NAN;
  return eval;
}

// The loss terms and the gradient norm are one host number each (no pass over the weights): a NaN or Inf in one stops
// the run before the update, so the weights stay those of the last good step and no checkpoint of this step is made.
void Trainer::check_finite_step(const moe::LossTerms& loss, double grad_norm) const {
  const std::pair<const char*, double> terms[] = {
      {"CE loss", loss.ce}, {"LB loss", loss.lb}, {"Z loss", loss.z}, {"ED loss", loss.ed}, {"grad norm", grad_norm}};
  for (const auto& [term, value] : terms)
    if (!std::isfinite(value))
      throw std::runtime_error(fmt::format("step {}: the {} is {}; training stopped before the update, no checkpoint "
                                           "of this step (lower optim.lr, or resume from an earlier checkpoint)",
                                           step_, term, value));
}

// ---- logging -------------------------------------------------------------------------------------------------------------

static json domain_values(const data::Domains& domains, const std::vector<double>& values) {
  json j = json::object();
  for (int d = 0; d < domains.size(); ++d)
    if (!std::isnan(values[d])) j[domains.name(d)] = values[d];
  return j;
}

void Trainer::log_step(const moe::LossTerms& loss, double tokens_per_s) {
  std::vector<double> domain_ce(loss.domain_ce_sum.size(), NAN);
  for (size_t d = 0; d < domain_ce.size(); ++d)
    if (loss.domain_tokens[d]) domain_ce[d] = loss.domain_ce_sum[d] / loss.domain_tokens[d];
  json line = {{"step", step_},        {"loss", loss.objective}, {"ce", loss.ce},
               {"lb", loss.lb},        {"z", loss.z},               {"ed", loss.ed},
               {"lr", last_lr_},       {"grad_norm", last_grad_norm_}, {"tokens_per_s", tokens_per_s},
               {"tokens", tokens_seen_}, {"ce_domain", domain_values(data_.domains, domain_ce)}};
  std::vector<moe::RoutingStats> stats = moe::routing_stats(model_->moe_layers(), last_domains_, data_.domains.size());
  if (!stats.empty()) line["routing"] = stats;
  if (omoe_ && last_omoe_.o_step) {
    json omoe = {{"removed", last_omoe_.removed}};  // ||G Pbar - G|| / ||G|| per MoE layer
    if (!last_omoe_.pbar_trace.empty()) {  // spectrum of Pbar, now and then (omoe.spectrum_every)
      omoe["pbar_trace"] = last_omoe_.pbar_trace;
      omoe["pbar_min_eig"] = last_omoe_.pbar_min_eig;
    }
    line["omoe"] = omoe;
  }
  append_metrics(line);
}

void Trainer::append_metrics(const json& line) {
  const std::string text = line.dump() + '\n';
  metrics_ << text << std::flush;
  if (!metrics_) {
    const int error = errno;
    // Cut the torn line off (a regular file only), so readers of the log still parse every line.
    std::error_code ignored;
    metrics_.close();
    fs::resize_file(metrics_path(), metrics_bytes_, ignored);
    throw std::runtime_error(fmt::format("{}: writing the line of step {} failed ({}); training stopped (resume from "
                                         "the newest checkpoint)",
                                         metrics_path().string(), step_, std::strerror(error)));
  }
  metrics_bytes_ += text.size();
}

void Trainer::log_validation(const Validation& eval) {
  json line = {{"step", step_},
               {"eval", {{"ce", eval.mean_ce}, {"ce_domain", domain_values(data_.domains, eval.domain_ce)}}}};
  if (!eval.routing.empty()) line["eval"]["routing"] = eval.routing;
  append_metrics(line);
  out_ << fmt::format("{}eval @ step {}: mean CE {:.4f} |", on_terminal_ ? "\n" : "", step_, eval.mean_ce);
  for (int d = 0; d < data_.domains.size(); ++d) out_ << fmt::format(" {} {:.3f}", data_.domains.name(d), eval.domain_ce[d]);
  out_ << std::endl;
}

static std::string clock(double seconds) {
  int64_t s = static_cast<int64_t>(seconds + 0.5);
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60) : fmt::format("{}:{:02}", s / 60, s % 60);
}

void Trainer::show_progress(const moe::LossTerms& loss, double tokens_per_s, double seconds_per_step) {
  double eta = seconds_per_step * static_cast<double>(config_.steps - step_);
  std::string terms = fmt::format("loss {:.4f} ce {:.4f} lb {:.3f} z {:.3f} ed {:.3f}", loss.objective, loss.ce,
                                  loss.lb, loss.z, loss.ed);
  if (on_terminal_) {
    constexpr int kWidth = 24;
    int filled = static_cast<int>(kWidth * step_ / config_.steps);
    out_ << fmt::format("\r[{}{}] {}/{} {} | {:.0f} tok/s | ETA {}  ", std::string(filled, '#'),
                        std::string(kWidth - filled, '.'), step_, config_.steps, terms, tokens_per_s, clock(eta))
         << std::flush;
  } else if (step_ % config_.log_every == 0 || step_ == config_.steps) {
    out_ << fmt::format("step {}/{} {} | {:.0f} tok/s | ETA {}", step_, config_.steps, terms, tokens_per_s, clock(eta))
         << std::endl;
  }
}

// ---- the loop ------------------------------------------------------------------------------------------------------------

void Trainer::run(int64_t until) {
  if (until < 0 || until > config_.steps) until = config_.steps;
  using clock_type = std::chrono::steady_clock;
  double smoothed_step_s = 0;
  try {
    while (step_ < until) {
      auto start = clock_type::now();
      moe::LossTerms loss = train_step();
      double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
      smoothed_step_s = smoothed_step_s == 0 ? seconds : 0.9 * smoothed_step_s + 0.1 * seconds;
      double tokens_per_s =
          static_cast<double>(config_.grad_accum * config_.batch_size * config_.model.seq_len) / seconds;
      log_step(loss, tokens_per_s);
      show_progress(loss, tokens_per_s, smoothed_step_s);
      if (step_ == config_.steps) {
        // The weights first: a failing final evaluation cannot cost the run its final checkpoint.
        out_ << "final checkpoint: " << save_checkpoint("final").string() << std::endl;
        log_validation(validate());
      } else {
        if (config_.eval_every > 0 && step_ % config_.eval_every == 0) log_validation(validate());
        if (config_.checkpoint_every > 0 && step_ % config_.checkpoint_every == 0)
          save_checkpoint(fmt::format("step_{:06}", step_));
      }
    }
  } catch (...) {
    if (on_terminal_) out_ << std::endl;  // end the progress bar's line before the error is printed
    throw;
  }
}

// ---- checkpoints ---------------------------------------------------------------------------------------------------------

static std::vector<nn::NamedTensor> host_copies(std::vector<nn::NamedTensor> tensors) {
  for (nn::NamedTensor& t : tensors) t.tensor = to_device(t.tensor.detach(), Device::CPU);
  return tensors;
}

fs::path Trainer::save_checkpoint(const std::string& name) {
  const fs::path dir = fs::path(config_.out_dir) / kCheckpointsFolder / name, tmp = data::temporary_folder(dir);
  std::vector<nn::NamedTensor> params = host_copies(model_->lm().named_parameters());
  std::vector<nn::NamedTensor> state = optimizer_->state();
  if (omoe_)
    for (nn::NamedTensor& t : omoe_->state()) state.push_back(std::move(t));
  state = host_copies(std::move(state));
  // A weight can turn Inf in the update after the last checked step: such a checkpoint is never written.
  check_finite(params, fmt::format("checkpoint {} not written", name));
  check_finite(state, fmt::format("checkpoint {} not written", name));
  fs::remove_all(tmp);
  try {
    fs::create_directories(tmp);
    nn::save_safetensors(tmp / kModelFile, params,
                         {{"config", json(config_.model).dump()},
                          {"train_config", json(config_).dump()},
                          {"step", std::to_string(step_)},
                          {"format", "moelab-checkpoint-1"}});
    nn::save_safetensors(tmp / kStateFile, state,
                         {{"step", std::to_string(step_)},
                          {"optimizer_steps", std::to_string(optimizer_->steps_taken())},
                          {"tokens_seen", std::to_string(tokens_seen_)},
                          {"loader", json(train_loader_->state()).dump()}});
    data::replace_folder(tmp, dir);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
  return dir;
}

void Trainer::restore(const fs::path& dir) {
  const fs::path model_path = dir / kModelFile, state_path = dir / kStateFile;
  nn::SafeTensors model_file = nn::load_safetensors(model_path);
  nn::check_parameters_match(config_.model, model_file, model_path.string());  // names and shapes, before any copy
  nn::load_parameters(model_->lm(), model_file, model_path.string());
  // A different batch per step is allowed (e.g. more accumulation late in a run): the step count, the schedule and
  // the data order go on from the checkpoint, but the run is no longer the one that was saved, so say so.
  if (auto it = model_file.metadata.find("train_config"); it != model_file.metadata.end()) {
    json saved = json::parse(it->second, nullptr, /*allow_exceptions=*/false), now = config_;
    if (!saved.is_object()) fail("{}: metadata 'train_config' is not a JSON object", model_path.string());
    for (const char* key : {"train.batch_size", "train.grad_accum"})
      if (saved.contains(key) && saved[key] != now[key])
        out_ << fmt::format("resume: {} is {} (the checkpoint was trained with {})\n", key, now[key].dump(),
                            saved[key].dump());
  }
  if (!fs::exists(state_path)) fail("resume: missing {}", state_path.string());
  nn::SafeTensors state = nn::load_safetensors(state_path);
  check_finite(state.tensors, state_path.string());

  // Every field strictly, before any of it is used: the schedule, Adam's bias correction and the loader trust them.
  const TrainingState saved = read_training_state(state.metadata, state_path);
  const int64_t step = saved.step;
  if (step >= config_.steps)
    fail("{}: metadata 'step' = {} is not below train.steps = {}: nothing left to train (raise train.steps to "
         "continue)",
         state_path.string(), step, config_.steps);
  if (model_file.metadata.contains("step") && metadata_int(model_file.metadata, model_path, "step", 0) != step)
    fail("{}: metadata 'step' = {} differs from the step {} of {}: the files come from different saves",
         model_path.string(), model_file.metadata.at("step"), step, state_path.string());
  try {
    train_loader_->restore(saved.loader);
  } catch (const std::exception& e) {
    fail("{}: metadata 'loader': {}", state_path.string(), e.what());
  }

  optimizer_->load_state(state.tensors, saved.optimizer_steps);
  if (omoe_) omoe_->load_state(state.tensors);
  step_ = step;
  tokens_seen_ = saved.tokens_seen;
}

}  // namespace moelab::apps
