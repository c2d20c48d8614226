#include "apps/analysis/evaluation.h"

#include "engine/cuda/runtime.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>
#include <stdexcept>

#include "apps/train/checkpoint.h"
#include "data/excerpt.h"
#include "data/file_io.h"
#include "data/rng.h"
#include "engine/error.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- the checkpoint -------------------------------------------------------------------------------------------------

// The checkpoint folder itself, or a run folder's checkpoints/final.
static fs::path checkpoint_folder(const fs::path& dir) {
  if (!fs::exists(dir)) throw std::runtime_error(fmt::format("checkpoint '{}' does not exist", dir.string()));
  if (!fs::is_directory(dir))
    throw std::runtime_error(fmt::format("checkpoint '{}' is not a folder (expected a checkpoint folder holding {}, "
                                         "e.g. runs/tiny/checkpoints/final)",
                                         dir.string(), kModelFile));
  if (fs::exists(dir / kModelFile)) return dir;
  if (fs::exists(dir / "checkpoints" / "final" / kModelFile)) return dir / "checkpoints" / "final";
  throw std::runtime_error(fmt::format("checkpoint '{}': no {} in it (expected a checkpoint folder written by "
                                       "moe-train, e.g. <out_dir>/checkpoints/final)",
                                       dir.string(), kModelFile));
}

// The run folder a checkpoint was written into (<out_dir>/checkpoints/<name>), or empty.
static fs::path run_folder(const fs::path& checkpoint_dir) {
  fs::path dir = fs::absolute(checkpoint_dir).lexically_normal();
  if (!dir.has_filename()) dir = dir.parent_path();  // "…/final/"
  fs::path parent = dir.parent_path();
  if (parent.filename() == "checkpoints") return parent.parent_path();
  return {};
}

// A JSON value as a TOML value (empty: not representable, e.g. null for a NaN).
static std::string toml_literal(const json& v) {
  if (v.is_string() || v.is_boolean() || v.is_number_integer()) return v.dump();
  if (v.is_number_float()) return std::isfinite(v.get<double>()) ? v.dump() : "";
  if (v.is_array()) {
    std::vector<std::string> items;
    for (const json& item : v) {
      items.push_back(toml_literal(item));
      if (items.back().empty()) return "";
    }
    return fmt::format("[{}]", fmt::join(items, ", "));
  }
  return "";
}

TrainConfig train_config_from_json(const json& flat, std::vector<std::string>* ignored) {
  if (!flat.is_object())
    throw std::invalid_argument("train_config: expected a JSON object, got " + std::string(flat.type_name()));
  json preset = flat.value("preset", json("tiny"));
  if (!preset.is_string()) throw std::invalid_argument("train_config: 'preset' must be a string");
  TrainConfig c = train_preset(preset.get<std::string>());
  // Each value goes through apply_toml as a one-line document: the option table's own parser and type checks.
  for (const auto& [key, value] : flat.items()) {
    if (key == "preset") continue;
    size_t dot = key.find('.');
    std::string literal = toml_literal(value);
    if (dot == std::string::npos || literal.empty()) {
      if (ignored) ignored->push_back(key);
      continue;
    }
    std::string doc =
        fmt::format("[{}]\n{} = {}\n", json(key.substr(0, dot)).dump(), json(key.substr(dot + 1)).dump(), literal);
    try {
      apply_toml(c, doc, "train_config");
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find("unknown key") == std::string::npos) throw;
      if (ignored) ignored->push_back(key);
    }
  }
  return c;
}

// "byte" or an absolute .model path for the evaluation; never trains a tokenizer (a new one would not be the model's).
static std::string resolve_tokenizer(const TrainConfig& c, const fs::path& checkpoint_dir,
                                     const std::string& override_) {
  std::string spec = override_.empty() ? c.data.tokenizer : override_;
  if (spec == "byte") return spec;
  if (spec == "bpe") {
    if (!override_.empty())
      throw std::invalid_argument("--tokenizer bpe would train a new tokenizer: give the run's .model file instead "
                                  "(<out_dir>/data/bpe-<vocab>.model)");
    std::string name = fmt::format("bpe-{}.model", c.data.bpe_vocab);
    std::vector<std::string> candidates;
    if (fs::path run = run_folder(checkpoint_dir); !run.empty()) candidates.push_back((run / "data" / name).string());
    candidates.push_back((fs::path(c.out_dir) / "data" / name).string());
    for (const std::string& file : candidates)
      if (fs::exists(file)) return fs::absolute(file).lexically_normal().string();
    throw std::runtime_error(fmt::format("checkpoint '{}' was trained with a BPE tokenizer (data.bpe_vocab = {}), but "
                                         "it is not at {}: pass --tokenizer <file>.model",
                                         checkpoint_dir.string(), c.data.bpe_vocab, fmt::join(candidates, " nor ")));
  }
  if (!fs::exists(spec))
    throw std::runtime_error(fmt::format("tokenizer file '{}' ({}) does not exist", spec,
                                         override_.empty() ? "data.tokenizer of the checkpoint's run" : "--tokenizer"));
  return fs::absolute(spec).lexically_normal().string();
}

void validate(const EvalOptions& o) {
  const std::pair<const char*, int64_t> counts[] = {{"--max-batches", o.max_batches},
                                                    {"--batch-size", o.batch_size},
                                                    {"--permutations", o.permutations},
                                                    {"--seq-len", o.data.seq_len}};
  for (const auto& [flag, value] : counts)
    if (value < 0) fail("{} must be >= 0 (0: the default), got {}", flag, value);
  if (fs::exists(o.data_dir) && !fs::is_directory(o.data_dir))
    fail("--data-dir '{}' is not a folder", o.data_dir.string());
}

// A JSON value stored as a __metadata__ string; parse errors name the file and the key and quote little.
static json metadata_json(const std::string& text, const fs::path& file, const char* key) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("{}: __metadata__ '{}': {}", file.string(), key, data::json_error(e, text)));
  }
}

LoadedCheckpoint load_checkpoint(const fs::path& dir_arg, const EvalOptions& options) {
  validate(options);
  if (options.device == Device::CUDA && cuda::device_count() == 0)
    throw std::invalid_argument(cuda::built_with_cuda() ? "device cuda: no CUDA device is visible"
                                                        : "device cuda: this build has no CUDA backend");
  LoadedCheckpoint out;
  out.dir = checkpoint_folder(dir_arg);
  const fs::path file = out.dir / kModelFile;
  const std::string where = fmt::format("checkpoint '{}'", out.dir.string());
  nn::SafeTensors st = nn::load_safetensors(file);
  auto meta = [&](const char* key) -> const std::string* {
    auto it = st.metadata.find(key);
    return it == st.metadata.end() ? nullptr : &it->second;
  };

  const std::string* model_json = meta("config");
  if (!model_json)
    throw std::runtime_error(fmt::format("{}: {} has no model config (\"config\") in __metadata__", where, kModelFile));
  const json model_config = metadata_json(*model_json, file, "config");
  try {
    out.model_config = model_config.get<nn::ModelConfig>();
    out.model_config.validate();
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: __metadata__ 'config': {}", file.string(), e.what()));
  }
  // Before anything is built: a config that claims more than the file holds fails here, not in an allocation.
  try {
    nn::check_parameters_match(out.model_config, st, file.string());
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: its parameters do not match its model config: {}", where, e.what()));
  }

  const EvalDataOverrides& o = options.data;
  if (const std::string* train_json = meta("train_config")) {
    const json train_config = metadata_json(*train_json, file, "train_config");
    try {
      out.config = train_config_from_json(train_config, &out.ignored_options);
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("{}: __metadata__ 'train_config': {}", file.string(), e.what()));
    }
  } else if (o.corpus.empty() || o.tokenizer.empty()) {
    throw std::runtime_error(fmt::format("{}: {} has no \"train_config\" in __metadata__, so the corpus and tokenizer "
                                         "are unknown: pass --corpus and --tokenizer",
                                         where, kModelFile));
  }
  if (const std::string* step = meta("step")) {
    const char* end = step->data() + step->size();
    auto [stop, error] = std::from_chars(step->data(), end, out.step);
    if (error != std::errc() || stop != end || out.step < 0)
      throw std::runtime_error(fmt::format("{}: __metadata__ 'step' must be an integer >= 0, got '{}'", file.string(),
                                           data::excerpt(*step)));
  }

  // The data config for evaluation: the run's, with the overrides; it must fit the stored model.
  TrainConfig& c = out.config;
  c.model = out.model_config;
  if (!o.corpus.empty()) c.data.corpus = o.corpus;
  if (!o.text_key.empty()) c.data.text_key = o.text_key;
  if (!o.domain_key.empty()) c.data.domain_key = o.domain_key;
  if (o.seq_len > out.model_config.seq_len)
    throw std::invalid_argument(fmt::format("{}: --seq-len {} does not match the model, which was trained at "
                                            "model.seq_len = {} (evaluate at most that)",
                                            where, o.seq_len, out.model_config.seq_len));
  if (o.seq_len > 0) c.model.seq_len = o.seq_len;
  c.data.tokenizer = resolve_tokenizer(c, out.dir, o.tokenizer);
  std::unique_ptr<data::Tokenizer> tokenizer = data::load_tokenizer(c.data.tokenizer);
  if (tokenizer->vocab_size() != out.model_config.vocab_size)
    throw std::invalid_argument(fmt::format("{}: tokenizer '{}' has {} tokens but the model's config has "
                                            "vocab_size = {}: give the tokenizer the model was trained with",
                                            where, c.data.tokenizer, tokenizer->vocab_size(),
                                            out.model_config.vocab_size));

  moe::RouterLossConfig no_losses;  // evaluation needs the logits only
  no_losses.alpha = no_losses.z_coef = no_losses.beta = 0;
  out.model = std::make_unique<moe::MoEModel>(out.model_config, no_losses, /*seed=*/0);
  try {
    nn::load_parameters(out.model->lm(), st, file.string());
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("{}: cannot load its parameters: {}", where, e.what()));
  }
  out.model->lm().to(options.device);
  return out;
}

// ---- the data -------------------------------------------------------------------------------------------------------

static uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

TrainingData prepare_eval_data(const LoadedCheckpoint& checkpoint, const EvalOptions& options) {
  TrainConfig c = checkpoint.config;
  c.data.corpus = data::expand_home(c.data.corpus).string();  // "~/..." as the trainer reads it
  const std::string corpus_origin = options.data.corpus.empty() ? "data.corpus of the checkpoint's run" : "--corpus";
  if (c.data.corpus != "synthetic" && !fs::exists(c.data.corpus))
    throw std::runtime_error(fmt::format("corpus '{}' ({}) does not exist (expected a folder with train.jsonl, a "
                                         ".jsonl file, or 'synthetic')",
                                         c.data.corpus, corpus_origin));
  if (!options.data_dir.empty()) {
    c.out_dir = options.data_dir.string();
  } else {
    std::string key = fmt::format("{}|{}|{}|{}|{}", fs::absolute(c.data.corpus).lexically_normal().string(),
                                  c.data.tokenizer, c.data.text_key, c.data.domain_key, c.model.seq_len);
    c.out_dir = (fs::temp_directory_path() / "moelab-eval" / fmt::format("{:016x}", fnv1a(key))).string();
  }
  TrainingData out;
  try {
    out = prepare_data(c);
  } catch (const std::exception& e) {
    std::string message = fmt::format("corpus '{}' ({}): {}", c.data.corpus, corpus_origin, e.what());
    if (message.find("missing key '" + c.data.domain_key + "'") != std::string::npos)
      message += fmt::format(" -- every document needs its domain under the key '{}' (choose another with "
                             "--domain-key)",
                             c.data.domain_key);
    throw std::runtime_error(message);
  }
  if (out.validation->size() == 0)
    throw std::runtime_error(fmt::format("corpus '{}': the validation split holds no sequence of {} + 1 tokens",
                                         c.data.corpus, c.model.seq_len));
  return out;
}

EvalSet make_eval_set(const std::shared_ptr<const data::Shard>& validation, const data::Tokenizer& tokenizer,
                      int64_t batch_size, int64_t max_batches) {
  const data::Shard& shard = *validation;
  const int64_t n = shard.size();
  if (n == 0) throw std::invalid_argument("make_eval_set: the validation shard is empty");
  if (batch_size < 1) throw std::invalid_argument(fmt::format("batch size must be >= 1, got {}", batch_size));
  if (max_batches < 0) throw std::invalid_argument(fmt::format("--max-batches must be >= 0, got {}", max_batches));
  const int64_t bs = std::min(batch_size, n);
  const int T = shard.seq_len();
  EvalSet set;
  const int64_t domains = shard.header.domains.size();
  set.domain_tokens.assign(domains, 0);
  set.domain_bytes.assign(domains, 0);
  if (max_batches > 0 && max_batches * bs < n) {
    data::LoaderOptions lo;  // Trainer::validate()'s sample
    lo.batch_size = static_cast<int>(bs);
    lo.seed = 0;
    data::Loader loader(validation, lo);
    for (int64_t i = 0; i < max_batches; ++i) set.batches.push_back(loader.next());
    set.selection = fmt::format("{} shuffled batches of {} (seed 0) of {} validation sequences", max_batches, bs, n);
  } else {
    for (int64_t start = 0; start < n; start += bs) {
      data::Batch b;
      b.B = static_cast<int>(std::min(bs, n - start));
      b.T = T;
      for (int64_t i = start; i < start + b.B; ++i) {
        std::span<const int32_t> row = shard.tokens(i);  // [T+1]
        b.inputs.insert(b.inputs.end(), row.begin(), row.end() - 1);
        b.targets.insert(b.targets.end(), row.begin() + 1, row.end());
        b.domains.push_back(shard.domain(i));
        b.sequence_ids.push_back(i);
      }
      set.batches.push_back(std::move(b));
    }
    set.selection = fmt::format("all {} validation sequences", n);
  }
  for (const data::Batch& b : set.batches) {
    for (int i = 0; i < b.B; ++i) {
      std::span<const int32_t> targets(b.targets.data() + int64_t(i) * b.T, size_t(b.T));
      set.domain_tokens[b.domains[i]] += b.T;
      // Byte tokenizer: T bytes. SentencePiece (no dummy prefix, identity normalization): the targets' exact text,
      // except that a character cut by the sequence start into byte pieces decodes as U+FFFD.
      set.domain_bytes[b.domains[i]] += static_cast<int64_t>(tokenizer.decode(targets).size());
    }
    set.sequences += b.B;
  }
  return set;
}

// ---- scores ---------------------------------------------------------------------------------------------------------

double DomainScore::ce() const { return tokens ? ce_sum / static_cast<double>(tokens) : NAN; }
double DomainScore::ppl() const { return std::exp(ce()); }
double DomainScore::bpb() const { return bytes ? ce_sum / std::log(2.0) / static_cast<double>(bytes) : NAN; }

Scores score(moe::MoEModel& model, const EvalSet& set, int64_t num_domains) {
  NoGradGuard no_grad;
  const Device dev = model.lm().tok_emb.weight.device();
  std::vector<double> ce_sum(num_domains, 0.0);
  std::vector<int64_t> tokens(num_domains, 0);
  for (const data::Batch& b : set.batches) {
    Tensor inputs = from_vector(b.inputs, {b.B, b.T}, dev);              // i32 [B, T]
    Tensor targets = from_vector(b.targets, {int64_t(b.B) * b.T}, dev);  // i32 [B*T]
    Tensor token_ce;                                                     // f64 [B*T]
    linear_cross_entropy(model.lm().hidden(inputs), model.lm().output_weight(), targets, kIgnoreIndex, &token_ce);
    moe::accumulate_domain_ce(token_ce.to_vector<double>(), b.targets, b.domains, num_domains, ce_sum, tokens);
  }
  Scores s;
  s.domains.resize(num_domains);
  for (int64_t d = 0; d < num_domains; ++d) {
    DomainScore& ds = s.domains[d];
    ds.ce_sum = ce_sum[d], ds.tokens = tokens[d];
    ds.bytes = d < static_cast<int64_t>(set.domain_bytes.size()) ? set.domain_bytes[d] : 0;
    s.overall.ce_sum += ds.ce_sum, s.overall.tokens += ds.tokens, s.overall.bytes += ds.bytes;
  }
  return s;
}

// ---- router-permutation dPPL ----------------------------------------------------------------------------------------

std::vector<int64_t> random_derangement(int64_t n, uint64_t seed) {
  if (n < 2) throw std::invalid_argument(fmt::format("random_derangement: needs n >= 2, got {}", n));
  data::SplitMix64 rng(seed);
  std::vector<int64_t> pi(n);
  for (;;) {  // a uniform permutation is a derangement with probability ~1/e: a few draws on average
    std::iota(pi.begin(), pi.end(), int64_t(0));
    for (size_t i = pi.size(); i > 1; i--) std::swap(pi[i - 1], pi[rng.below(i)]);
    bool fixed_point = false;
    for (int64_t i = 0; i < n; ++i) fixed_point = fixed_point || pi[i] == i;
    if (!fixed_point) return pi;
  }
}

namespace {
// Puts a router weight back exactly, also when an evaluation throws.
struct RestoreWeight {
  Tensor& weight;
  Tensor saved;
  ~RestoreWeight() {
    NoGradGuard no_grad;
    copy_(weight, saved);
  }
};
}  // namespace

std::vector<LayerDPPL> router_permutation_dppl(moe::MoEModel& model, const EvalSet& set, const Scores& base,
                                               int64_t num_domains, int64_t permutations, uint64_t seed) {
  if (permutations < 1) throw std::invalid_argument(fmt::format("--permutations must be >= 1, got {}", permutations));
  std::vector<LayerDPPL> out;
  const auto& blocks = model.lm().layers;
  for (size_t l = 0; l < blocks.size(); ++l) {
    auto* moe = dynamic_cast<moe::MoELayer*>(blocks[l]->ffn.get());
    if (!moe) continue;
    LayerDPPL r;
    r.layer = static_cast<int64_t>(l);
    r.domains.assign(num_domains, NAN);
    r.overall = NAN;
    r.relative_domains.assign(num_domains, NAN);
    r.relative_overall = NAN;
    const int64_t E = moe->router.n_experts();
    if (E < 2) {  // one expert: nothing to permute
      out.push_back(std::move(r));
      continue;
    }
    std::vector<double> ppl_sum(num_domains, 0.0), relative_sum(num_domains, 0.0);  // of PPL_pi, (PPL_pi - PPL) / PPL
    double overall_sum = 0, relative_overall_sum = 0;
    auto relative = [](double ppl_pi, double ppl) { return (ppl_pi - ppl) / ppl; };
    {
      Tensor& weight = moe->router.weight;  // [E, d]
      RestoreWeight restore{weight, [&] {
                              NoGradGuard no_grad;
                              return clone(weight);
                            }()};
      for (int64_t p = 0; p < permutations; ++p) {
        std::vector<int64_t> pi = random_derangement(E, data::derive_seed(seed, l, static_cast<uint64_t>(p)));
        {
          NoGradGuard no_grad;
          Tensor index = from_vector(std::vector<int32_t>(pi.begin(), pi.end()), {E}, weight.device());
          copy_(weight, index_select(restore.saved, 0, index));  // row e <- trained row pi[e]
        }
        Scores s = score(model, set, num_domains);
        for (int64_t d = 0; d < num_domains; ++d) {
          ppl_sum[d] += s.domains[d].ppl();
          relative_sum[d] += relative(s.domains[d].ppl(), base.domains[d].ppl());
        }
        overall_sum += s.overall.ppl();
        relative_overall_sum += relative(s.overall.ppl(), base.overall.ppl());
        r.permutations.push_back(std::move(pi));
      }
    }
    const double P = static_cast<double>(permutations);
    for (int64_t d = 0; d < num_domains; ++d)
      if (base.domains[d].tokens) {
        r.domains[d] = ppl_sum[d] / P - base.domains[d].ppl();
        r.relative_domains[d] = relative_sum[d] / P;
      }
    r.overall = overall_sum / P - base.overall.ppl();
    r.relative_overall = relative_overall_sum / P;
    out.push_back(std::move(r));
  }
  return out;
}

// ---- one checkpoint -------------------------------------------------------------------------------------------------

CheckpointEvaluation evaluate_checkpoint(const fs::path& dir, const EvalOptions& options) {
  LoadedCheckpoint ck = load_checkpoint(dir, options);
  TrainingData data = prepare_eval_data(ck, options);
  const int64_t batch_size = options.batch_size > 0 ? options.batch_size : ck.config.batch_size;
  EvalSet set = make_eval_set(data.validation, *data.tokenizer, batch_size, options.max_batches);
  CheckpointEvaluation e;
  e.checkpoint = ck.dir;
  e.step = ck.step;
  e.config = ck.config;
  e.model_config = ck.model_config;
  e.ignored_options = ck.ignored_options;
  e.config.batch_size = std::min<int64_t>(batch_size, data.validation->size());
  e.domains = data.domains;
  e.tokenizer = data.tokenizer->name();
  e.sequences = set.sequences;
  e.batches = static_cast<int64_t>(set.batches.size());
  e.selection = set.selection;
  const int64_t M = data.domains.size();
  e.scores = score(*ck.model, set, M);
  e.permutations = options.permutations;
  e.seed = options.seed;
  if (options.permutations > 0)
    e.dppl = router_permutation_dppl(*ck.model, set, e.scores, M, options.permutations, options.seed);
  return e;
}

void check_finite_results(const CheckpointEvaluation& e) {
  std::vector<std::string> bad;
  auto require = [&](double value, const std::string& what) {
    if (!std::isfinite(value))
      bad.push_back(fmt::format("{} = {}", what, std::isnan(value) ? "nan" : fmt::format("{}", value)));
  };
  for (int d = 0; d < e.domains.size(); ++d)
    if (e.scores.domains[d].tokens > 0) require(e.scores.domains[d].ce(), fmt::format("CE of '{}'", e.domains.name(d)));
  require(e.scores.overall.ce(), "CE of all domains");
  for (const LayerDPPL& l : e.dppl) {
    if (l.permutations.empty()) continue;  // one expert: nothing was permuted
    for (int d = 0; d < e.domains.size(); ++d)
      if (e.scores.domains[d].tokens > 0) {
        require(l.domains[d], fmt::format("dPPL of layer {} on '{}'", l.layer, e.domains.name(d)));
        require(l.relative_domains[d], fmt::format("relative dPPL of layer {} on '{}'", l.layer, e.domains.name(d)));
      }
    require(l.overall, fmt::format("dPPL of layer {}", l.layer));
    require(l.relative_overall, fmt::format("relative dPPL of layer {}", l.layer));
  }
  if (bad.empty()) return;
  const size_t shown = std::min<size_t>(bad.size(), 4);
  throw std::runtime_error(fmt::format("checkpoint '{}': {} non-finite results (a diverged or corrupt model): {}{}",
                                       e.checkpoint.string(), bad.size(),
                                       fmt::join(bad.begin(), bad.begin() + static_cast<std::ptrdiff_t>(shown), ", "),
                                       bad.size() > shown ? ", ..." : ""));
}

// ---- output ---------------------------------------------------------------------------------------------------------

static std::string number(double v, const char* spec) {
  return std::isnan(v) ? "-" : fmt::format(fmt::runtime(spec), v);
}

std::string format_table(const CheckpointEvaluation& e) {
  std::string out = fmt::format("checkpoint {} (step {})\n", e.checkpoint.string(), e.step);
  out += fmt::format("  data: corpus {} | tokenizer {} | seq_len {} | {} ({} tokens)\n", e.config.data.corpus,
                     e.tokenizer, e.config.model.seq_len, e.selection, e.scores.overall.tokens);
  size_t w = 6;
  for (const std::string& name : e.domains.names()) w = std::max(w, name.size());
  out += fmt::format("  {:<{}} {:>9} {:>9} {:>9} {:>7}", "domain", w, "tokens", "CE(nats)", "PPL", "bpb");
  // Each layer's column holds the absolute dPPL and, after it, the relative one in percent of the domain's PPL.
  for (const LayerDPPL& l : e.dppl) out += fmt::format(" {:>19}", fmt::format("dPPL L{} (rel.)", l.layer));
  out += '\n';
  auto row = [&](const std::string& name, const DomainScore& s, auto dppl_of, auto relative_of) {
    out += fmt::format("  {:<{}} {:>9} {:>9} {:>9} {:>7}", name, w, s.tokens, number(s.ce(), "{:.4f}"),
                       number(s.ppl(), "{:.3f}"), number(s.bpb(), "{:.4f}"));
    for (const LayerDPPL& l : e.dppl)
      out +=
          fmt::format(" {:>9} {:>9}", number(dppl_of(l), "{:+.4f}"),
                      std::isnan(relative_of(l)) ? std::string("") : fmt::format("({:+.1f}%)", 100 * relative_of(l)));
    out += '\n';
  };
  for (int d = 0; d < e.domains.size(); ++d)
    row(
        e.domains.name(d), e.scores.domains[d], [&](const LayerDPPL& l) { return l.domains[d]; },
        [&](const LayerDPPL& l) { return l.relative_domains[d]; });
  row(
      "all", e.scores.overall, [](const LayerDPPL& l) { return l.overall; },
      [](const LayerDPPL& l) { return l.relative_overall; });
  if (!e.dppl.empty())
    out += fmt::format("  dPPL Ll: PPL with MoE layer l's router rows permuted, minus PPL (mean of {} seeded "
                       "derangements, seed {})\n  (rel.): the same divided by PPL, in percent\n",
                       e.permutations, e.seed);
  return out;
}

static json finite_or_null(double v) { return std::isnan(v) || std::isinf(v) ? json(nullptr) : json(v); }

static json score_json(const DomainScore& s) {
  return {{"ce", finite_or_null(s.ce())},
          {"ppl", finite_or_null(s.ppl())},
          {"bpb", finite_or_null(s.bpb())},
          {"tokens", s.tokens},
          {"bytes", s.bytes},
          {"ce_sum", s.ce_sum}};
}

json evaluation_json(const CheckpointEvaluation& e) {
  json j;
  j["checkpoint"] = e.checkpoint.string();
  j["step"] = e.step;
  j["model"] = e.model_config;
  j["data"] = {{"corpus", e.config.data.corpus},
               {"tokenizer", e.tokenizer},
               {"text_key", e.config.data.text_key},
               {"domain_key", e.config.data.domain_key},
               {"seq_len", e.config.model.seq_len},
               {"split", "validation"},
               {"selection", e.selection},
               {"sequences", e.sequences},
               {"batches", e.batches},
               {"batch_size", e.config.batch_size}};
  j["domains"] = e.domains.names();
  j["overall"] = score_json(e.scores.overall);
  j["per_domain"] = json::object();
  for (int d = 0; d < e.domains.size(); ++d) j["per_domain"][e.domains.name(d)] = score_json(e.scores.domains[d]);
  json layers = json::array();
  for (const LayerDPPL& l : e.dppl) {
    json per_domain = json::object(), relative_per_domain = json::object();
    for (int d = 0; d < e.domains.size(); ++d) {
      per_domain[e.domains.name(d)] = finite_or_null(l.domains[d]);
      relative_per_domain[e.domains.name(d)] = finite_or_null(l.relative_domains[d]);
    }
    layers.push_back({{"layer", l.layer},
                      {"overall", finite_or_null(l.overall)},
                      {"per_domain", per_domain},
                      {"relative_overall", finite_or_null(l.relative_overall)},
                      {"relative_per_domain", relative_per_domain},
                      {"permutations", l.permutations}});
  }
  j["dppl"] = {{"permutations", e.permutations}, {"seed", e.seed}, {"layers", layers}};
  return j;
}

}  // namespace moelab::apps
