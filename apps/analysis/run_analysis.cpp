#include "apps/analysis/run_analysis.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <stdexcept>

#include "apps/analysis/evaluation.h"
#include "engine/error.h"
#include "engine/ops.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

static std::vector<std::string> checkpoint_names(const fs::path& run_dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(run_dir / "checkpoints", ec))
    if (entry.is_directory()) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Block index of every MoE layer.
static std::vector<int64_t> moe_block_indices(moe::MoEModel& model) {
  std::vector<int64_t> out;
  for (moe::MoELayer* layer : model.moe_layers())
    for (size_t b = 0; b < model.lm().layers.size(); ++b)
      if (model.lm().layers[b]->ffn.get() == layer) out.push_back(static_cast<int64_t>(b));
  return out;
}

// Each token's text: the growth of the decoded prefix (keeps SentencePiece's spaces), or the token decoded alone when
// the prefix does not grow by appending.
static std::vector<std::string> token_pieces(const data::Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  std::vector<std::string> pieces;
  std::string previous;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::string prefix = tokenizer.decode(std::span<const int32_t>(ids.data(), i + 1));
    if (prefix.size() >= previous.size() && prefix.compare(0, previous.size(), previous) == 0)
      pieces.push_back(prefix.substr(previous.size()));
    else
      pieces.push_back(tokenizer.decode(std::span<const int32_t>(&ids[i], 1)));
    previous = std::move(prefix);
  }
  return pieces;
}

static constexpr size_t kMaxTraceTokens = 512;

static RoutingTrace trace_text(moe::MoEModel& model, const data::Tokenizer& tokenizer, const std::string& text,
                               int64_t seq_len) {
  RoutingTrace trace;
  trace.text = text;
  std::vector<int32_t> ids = tokenizer.encode(text);
  if (ids.empty()) throw std::invalid_argument("--trace: the text has no tokens");
  if (ids.size() > kMaxTraceTokens) ids.resize(kMaxTraceTokens);
  trace.pieces = token_pieces(tokenizer, ids);
  trace.layers = moe_block_indices(model);
  std::vector<moe::MoELayer*> layers = model.moe_layers();
  trace.experts.assign(layers.size(), {});
  trace.probs.assign(layers.size(), {});
  NoGradGuard no_grad;
  // The model saw sequences of seq_len tokens: a longer text is routed in windows of that length.
  for (size_t start = 0; start < ids.size(); start += static_cast<size_t>(seq_len)) {
    size_t end = std::min(ids.size(), start + static_cast<size_t>(seq_len));
    std::vector<int32_t> window(ids.begin() + static_cast<std::ptrdiff_t>(start),
                                ids.begin() + static_cast<std::ptrdiff_t>(end));
    model.lm().hidden(
        from_vector(window, {1, static_cast<int64_t>(window.size())}, model.lm().tok_emb.weight.device()));
    for (size_t l = 0; l < layers.size(); ++l) {
      const moe::Routing& r = layers[l]->last_routing();
      std::vector<int32_t> chosen = to_device(r.expert_ids, Device::CPU).to_vector<int32_t>();
      std::vector<float> p = to_dtype(to_device(r.probs, Device::CPU), DType::F32).to_vector<float>();
      const size_t E = static_cast<size_t>(r.probs.size(1)), k = chosen.size() / window.size();
      for (size_t t = 0; t < window.size(); ++t) {
        std::vector<int32_t> e(chosen.begin() + static_cast<std::ptrdiff_t>(t * k),
                               chosen.begin() + static_cast<std::ptrdiff_t>((t + 1) * k));
        std::vector<float> q;
        for (int32_t id : e) q.push_back(p[t * E + static_cast<size_t>(id)]);
        trace.experts[l].push_back(std::move(e));
        trace.probs[l].push_back(std::move(q));
      }
    }
  }
  return trace;
}

void validate(const AnalyzeOptions& o) {
  const std::pair<const char*, int64_t> counts[] = {{"--max-batches", o.max_batches},
                                                    {"--permutations", o.permutations},
                                                    {"--similarity-tokens", o.similarity_tokens}};
  for (const auto& [flag, value] : counts)
    if (value < 0) fail("{} must be >= 0, got {}", flag, value);
  if (o.checkpoint.empty() || o.checkpoint.find('/') != std::string::npos)
    fail("--checkpoint must be the name of a folder in <run>/checkpoints (e.g. final), got '{}'", o.checkpoint);
  if (fs::exists(o.data_dir) && !fs::is_directory(o.data_dir))
    fail("--data-dir '{}' is not a folder", o.data_dir.string());
}

void check_finite_results(const RunAnalysis& run) {
  std::vector<std::string> bad;
  auto require = [&](double value, const std::string& what) {
    if (!std::isfinite(value))
      bad.push_back(fmt::format("{} = {}", what, std::isnan(value) ? "nan" : fmt::format("{}", value)));
  };
  // Every MoE layer routes every held-out token, so the first layer's counts are the domains' tokens.
  const std::vector<int64_t> no_tokens(run.domains.size(), 0);
  const std::vector<int64_t>& tokens = run.layers.empty() ? no_tokens : run.layers.front().routing.tokens;
  for (size_t d = 0; d < run.domains.size(); ++d)
    if (tokens[d] > 0) require(run.ce_domain[d], fmt::format("CE of '{}'", run.domains[d]));
  require(run.ce, "CE of all domains");
  for (const LayerAnalysis& a : run.layers) {
    const std::string layer = fmt::format("layer {}", a.layer);
    const moe::LayerSpecialization& r = a.routing;
    for (const auto& [value, name] : {std::pair{r.mi.bits, "mutual information"},
                                      {r.mi.normalized, "normalized MI"},
                                      {r.mean_jsd, "mean JSD"},
                                      {r.divergence.total, "D_total"},
                                      {r.divergence.inter, "D_inter"},
                                      {r.divergence.intra, "D_intra"},
                                      {r.load.entropy, "load entropy"},
                                      {r.load.std, "load std"},
                                      {a.variance.all, "parameter variance"}})
      require(value, fmt::format("{} of {}", name, layer));
    if (a.similarity.tokens > 0) {
      require(a.similarity.mean, "output similarity of " + layer);
      require(a.similarity.centered_mean, "centered output similarity of " + layer);
      require(a.similarity.cka_mean, "output CKA of " + layer);
    }
    if (run.permutations > 0 && run.experts >= 2) {
      for (size_t d = 0; d < run.domains.size(); ++d)
        if (tokens[d] > 0) {
          require(a.dppl_domain[d], fmt::format("dPPL of {} on '{}'", layer, run.domains[d]));
          require(a.relative_dppl_domain[d], fmt::format("relative dPPL of {} on '{}'", layer, run.domains[d]));
        }
      require(a.dppl, "dPPL of " + layer);
      require(a.relative_dppl, "relative dPPL of " + layer);
    }
  }
  if (bad.empty()) return;
  const size_t shown = std::min<size_t>(bad.size(), 4);
  throw std::runtime_error(fmt::format("run '{}': {} non-finite results (a diverged or corrupt model): {}{}",
                                       run.run_dir.string(), bad.size(),
                                       fmt::join(bad.begin(), bad.begin() + static_cast<std::ptrdiff_t>(shown), ", "),
                                       bad.size() > shown ? ", ..." : ""));
}

RunAnalysis analyze_run(const fs::path& run_dir, const AnalyzeOptions& options) {
  validate(options);
  const std::string where = "run folder " + run_dir.string();
  if (!fs::is_directory(run_dir)) throw std::runtime_error(where + ": no such folder");
  const fs::path log_file = run_dir / "metrics.jsonl";
  if (!fs::exists(log_file))
    throw std::runtime_error(where + ": no metrics.jsonl (expected the train.out_dir of a moe-train run)");
  const fs::path checkpoint = run_dir / "checkpoints" / options.checkpoint;
  if (!fs::exists(checkpoint / "model.safetensors")) {
    std::vector<std::string> present = checkpoint_names(run_dir);
    throw std::runtime_error(
        fmt::format("{}: no checkpoint '{}' (no {}; checkpoints present: {})", where, options.checkpoint,
                    (checkpoint / "model.safetensors").string(),
                    present.empty() ? std::string("none") : fmt::format("{}", fmt::join(present, ", "))));
  }
  RunAnalysis run;
  run.run_dir = run_dir;
  run.checkpoint = checkpoint;
  run.name = run_dir.filename().empty() ? run_dir.parent_path().filename().string() : run_dir.filename().string();
  run.log = read_metrics_log(log_file);

  EvalOptions eval_options;
  eval_options.data.corpus = options.corpus;
  eval_options.max_batches = options.max_batches;
  eval_options.permutations = options.permutations;
  eval_options.data_dir = options.data_dir;
  eval_options.device = options.device;
  LoadedCheckpoint loaded = [&] {
    try {
      return load_checkpoint(checkpoint, eval_options);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}: cannot load checkpoint '{}': {}", where, options.checkpoint, e.what()));
    }
  }();
  TrainingData data = [&] {
    try {
      return prepare_eval_data(loaded, eval_options);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}: cannot read its held-out data: {}", where, e.what()));
    }
  }();
  moe::MoEModel& model = *loaded.model;
  const int64_t M = data.domains.size();
  if (M < 2)
    throw std::runtime_error(fmt::format("{}: corpus '{}' has {} domain ({}); the specialization metrics compare "
                                         "domains and need at least 2",
                                         where, loaded.config.data.corpus, M, data.domains.joined()));
  std::vector<moe::MoELayer*> layers = model.moe_layers();
  if (layers.empty())
    throw std::runtime_error(where + ": the model has no MoE layers (model.n_experts = 0): nothing to analyse");

  run.step = loaded.step;
  run.config = json(loaded.config);
  run.domains = data.domains.names();
  run.experts = loaded.model_config.n_experts;
  run.top_k = loaded.model_config.top_k;
  run.tokenizer = data.tokenizer->name();

  EvalSet set = make_eval_set(data.validation, *data.tokenizer, loaded.config.batch_size, options.max_batches);
  if (set.batches.empty()) throw std::runtime_error(where + ": the validation split has no sequences");
  run.selection = set.selection;
  run.sequences = set.sequences;
  Scores scores = score(model, set, M);
  for (const DomainScore& d : scores.domains) run.ce_domain.push_back(d.ce());
  run.ce = scores.overall.ce();

  // One pass for the routing: counts per layer and domain, and an evenly spread sample of each layer's inputs.
  const std::vector<int64_t> blocks = moe_block_indices(model);
  const int64_t E = run.experts;
  std::vector<moe::DomainRoutingCounts> counts(layers.size(), moe::DomainRoutingCounts(E, M));
  std::vector<std::vector<float>> sample(layers.size());  // [L][S*d]
  const int64_t per_batch = (options.similarity_tokens + static_cast<int64_t>(set.batches.size()) - 1) /
                            static_cast<int64_t>(set.batches.size());
  {
    NoGradGuard no_grad;
    for (const data::Batch& b : set.batches) {
      Tensor inputs = from_vector(b.inputs, {b.B, b.T}, options.device), domains = from_vector(b.domains, {b.B});
      model.lm().hidden(inputs);  // for the routing: no LM head
      run.tokens += int64_t(b.B) * b.T;
      for (size_t l = 0; l < layers.size(); ++l) {
        counts[l].add(layers[l]->last_routing(), domains);
        const Tensor& x = layers[l]->last_input();  // [N, d]
        const int64_t N = x.size(0), d = x.size(1), take = std::min(per_batch, N);
        std::vector<float> rows = to_dtype(to_device(x, Device::CPU), DType::F32).to_vector<float>();
        for (int64_t i = 0; i < take && static_cast<int64_t>(sample[l].size()) / d < options.similarity_tokens; ++i) {
          const int64_t row = i * N / take;
          sample[l].insert(sample[l].end(), rows.begin() + row * d, rows.begin() + (row + 1) * d);
        }
      }
    }
  }
  std::vector<LayerDPPL> dppl;
  run.permutations = options.permutations;
  if (options.permutations > 0)
    dppl = router_permutation_dppl(model, set, scores, M, options.permutations, eval_options.seed);
  for (size_t l = 0; l < layers.size(); ++l) {
    LayerAnalysis a;
    a.layer = blocks[l];
    a.routing = moe::specialization(counts[l]);
    const int64_t d = layers[l]->experts.w_gate.size(2);
    if (!sample[l].empty())
      a.similarity = moe::expert_output_similarity(
          layers[l]->experts, from_vector(sample[l], {static_cast<int64_t>(sample[l].size()) / d, d}));
    a.variance = moe::normalized_parameter_variance(layers[l]->experts);
    a.dppl_domain.assign(M, NAN);
    a.relative_dppl_domain.assign(M, NAN);
    for (const LayerDPPL& p : dppl)
      if (p.layer == a.layer) {
        a.dppl_domain = p.domains, a.dppl = p.overall;
        a.relative_dppl_domain = p.relative_domains, a.relative_dppl = p.relative_overall;
      }
    run.layers.push_back(std::move(a));
  }
  if (!options.trace_text.empty())
    run.trace = trace_text(model, *data.tokenizer, options.trace_text, loaded.model_config.seq_len);
  return run;
}

}  // namespace moelab::apps
