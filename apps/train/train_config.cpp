#include "apps/train/train_config.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <toml++/toml.h>
#include <variant>

namespace moelab::apps {

// ---- the option table ----------------------------------------------------------------------------------------------------

// An option whose value is one of an enum's names (engine/enum_names.h): read and written as that name.
struct EnumField {
  std::function<std::string()> get;
  std::function<void(std::string_view text, std::string_view what)> set;  // throws, listing the allowed names
};
template <class E> static EnumField enum_field(E& field) {
  return {[&field] { return std::string(enum_name(field)); },
          [&field](std::string_view text, std::string_view what) { field = parse_enum<E>(text, what); }};
}

using Field = std::variant<int64_t*, uint64_t*, double*, bool*, std::string*, std::vector<int64_t>*, EnumField>;

struct Option {
  const char* key;  // TOML path and --flag
  Field field;
  const char* help;
};

static std::vector<Option> option_table(TrainConfig& c) {
  nn::ModelConfig& m = c.model;
  return {
      {"model.vocab_size", &m.vocab_size, "vocabulary size (byte tokenizer: 256; bpe: set from the tokenizer)"},
      {"model.d_model", &m.d_model, "model width d"},
      {"model.n_layers", &m.n_layers, "transformer blocks"},
      {"model.n_heads", &m.n_heads, "attention heads (d_model / n_heads must be even)"},
      {"model.seq_len", &m.seq_len, "tokens per training sequence"},
      {"model.n_experts", &m.n_experts, "experts per MoE layer (0: dense model)"},
      {"model.top_k", &m.top_k, "experts per token"},
      {"model.expert_hidden", &m.expert_hidden, "hidden size of each expert's SwiGLU"},
      {"model.norm_topk", &m.norm_topk, "renormalize the k chosen gate probabilities to sum 1"},
      {"model.shared_experts", &m.shared_experts, "always-on shared experts per MoE layer"},
      {"model.moe_every", &m.moe_every, "layer l is MoE when (l+1) % moe_every == 0"},
      {"model.dense_layers", &m.dense_layers, "layers forced dense, e.g. [0]"},
      {"model.dense_hidden", &m.dense_hidden, "hidden size of dense layers (0: top_k * expert_hidden)"},
      {"model.tie_embeddings", &m.tie_embeddings, "share tok_emb and lm_head weights"},
      {"model.rope_theta", &m.rope_theta, "RoPE base"},
      {"model.init_std", &m.init_std, "std of the normal init of matrices"},
      {"data.corpus", &c.data.corpus, "folder with train.jsonl [+ validation.jsonl], a .jsonl file, or 'synthetic'"},
      {"data.text_key", &c.data.text_key, "JSONL key of the document text"},
      {"data.domain_key", &c.data.domain_key, "JSONL key of the domain (dotted path allowed)"},
      {"data.tokenizer", &c.data.tokenizer, "'byte', 'bpe' (trained on the corpus) or a SentencePiece .model file"},
      {"data.bpe_vocab", &c.data.bpe_vocab, "vocabulary size when training a BPE tokenizer"},
      {"data.balanced", &c.data.balanced, "domain-balanced sampling of training sequences"},
      {"data.synthetic_docs", &c.data.synthetic_docs, "documents per domain for the synthetic corpus"},
      {"data.synthetic_domains", &c.data.synthetic_domains, "domains of the synthetic corpus (1-5)"},
      {"moe.alpha", &c.losses.alpha, "load-balancing loss coefficient"},
      {"moe.z_coef", &c.losses.z_coef, "router z-loss coefficient"},
      {"moe.beta", &c.losses.beta, "expert-divergence loss coefficient (0: baseline)"},
      {"moe.ed_form", enum_field(c.losses.ed_form), "expert-divergence form: neglog | neg_jsd"},
      {"moe.ed_eps", &c.losses.ed_eps, "eps inside -log(JSD + eps)"},
      {"moe.ed_scope", enum_field(c.losses.ed_scope),
       "with train.grad_accum > 1, ED per micro_batch or over the whole step"},
      {"optim.name", enum_field(c.optimizer), "optimizer: adamw | omoe"},
      {"optim.lr", &c.lr, "peak learning rate"},
      {"optim.min_lr", &c.min_lr, "learning rate at the end of the cosine decay"},
      {"optim.warmup", &c.warmup, "linear warmup steps"},
      {"optim.beta1", &c.adamw.beta1, "AdamW beta1"},
      {"optim.beta2", &c.adamw.beta2, "AdamW beta2"},
      {"optim.eps", &c.adamw.eps, "AdamW eps"},
      {"optim.weight_decay", &c.adamw.weight_decay, "decoupled weight decay (matrices only)"},
      {"optim.grad_clip", &c.grad_clip, "global gradient-norm clip (0: off)"},
      {"omoe.every", &c.omoe.every, "OMoE: step t is an O step when t % every == 0 ..."},
      {"omoe.warmup", &c.omoe.warmup, "OMoE: ... and t > warmup"},
      {"omoe.reset", &c.omoe.reset, "OMoE: reset every projector to I after each O step"},
      {"omoe.alpha", &c.omoe.alpha, "OMoE: fixed projector alpha (0: alpha_scale * running mean of ||a||^2)"},
      {"omoe.alpha_scale", &c.omoe.alpha_scale, "OMoE: c in alpha = c * running mean of ||a||^2"},
      {"omoe.project_down", &c.omoe.project_down, "OMoE: also project W_down (own projectors on expert activations)"},
      {"omoe.mode", enum_field(c.omoe.mode),
       "OMoE: grad (project the gradient) | direction (project the Adam direction)"},
      {"omoe.spectrum_every", &c.omoe.spectrum_every,
       "OMoE: log trace/min eigenvalue of Pbar every n-th O step (0: off)"},
      {"train.steps", &c.steps, "optimizer steps"},
      {"train.batch_size", &c.batch_size, "sequences per micro-batch (train.grad_accum of them make a step)"},
      {"train.grad_accum", &c.grad_accum, "micro-batches per optimizer step, gradients averaged"},
      {"train.seed", &c.seed, "seed of the model init and the data order"},
      {"train.device", enum_field(c.device), "cpu | cuda"},
      {"train.precision", enum_field(c.precision),
       "fp32 | bf16 (bf16 operands of the matrix products, f32 accumulation, f32 weights, norms, router, losses)"},
      {"train.eval_every", &c.eval_every, "steps between validation passes (0: only at the end)"},
      {"train.eval_batches", &c.eval_batches, "validation batches per pass"},
      {"train.checkpoint_every", &c.checkpoint_every, "steps between checkpoints (0: only the final one)"},
      {"train.log_every", &c.log_every, "steps between progress lines when stdout is not a terminal"},
      {"train.out_dir", &c.out_dir, "folder for the metrics log, checkpoints and data shards"},
      {"train.resume", &c.resume, "checkpoint folder to resume from (bit-exact)"},
  };
}

// ---- presets and validation ----------------------------------------------------------------------------------------------

TrainConfig train_preset(const std::string& name) {
  TrainConfig c;
  c.preset = name;
  c.model = nn::model_preset(name);
  if (name == "S") c.batch_size = 32, c.data.tokenizer = "bpe", c.data.bpe_vocab = 8192, c.device = Device::CUDA;
  if (name == "M") c.batch_size = 16, c.data.tokenizer = "bpe", c.data.bpe_vocab = 32768, c.device = Device::CUDA;
  return c;
}

void TrainConfig::validate() const {
  model.validate();
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("config: " + what);
  };
  require(steps > 0, fmt::format("train.steps must be > 0, got {}", steps));
  require(batch_size > 0, fmt::format("train.batch_size must be > 0, got {}", batch_size));
  require(grad_accum > 0, fmt::format("train.grad_accum must be > 0, got {}", grad_accum));
  require(lr > 0 && min_lr >= 0, fmt::format("optim.lr ({}) must be > 0 and optim.min_lr ({}) >= 0", lr, min_lr));
  if (optimizer == OptimizerKind::OMoE) {
    omoe.validate();
    require(model.n_experts >= 2, fmt::format("optim.name = omoe needs at least 2 experts (model.n_experts = {})",
                                              model.n_experts));
  }
  require(!(losses.beta != 0 && model.n_experts < 2),
          fmt::format("moe.beta = {} needs at least 2 experts (model.n_experts = {})", losses.beta, model.n_experts));
  require(data.tokenizer != "byte" || model.vocab_size == 256,
          fmt::format("the byte tokenizer needs model.vocab_size = 256, got {}", model.vocab_size));
}

// ---- TOML -------------------------------------------------------------------------------------------------------------

static void set_from_toml(const Option& opt, const toml::node& node, const std::string& source) {
  auto bad = [&](const char* expected) {
    return std::invalid_argument(fmt::format("{}: key '{}' must be {}", source, opt.key, expected));
  };
  std::visit(
      [&](auto field) {
        using T = std::remove_pointer_t<decltype(field)>;
        if constexpr (std::is_same_v<T, EnumField>) {
          if (!node.is_string()) throw bad("a string");
          field.set(node.as_string()->get(), fmt::format("{}: key '{}'", source, opt.key));
        } else if constexpr (std::is_same_v<T, bool>) {
          if (!node.is_boolean()) throw bad("true or false");
          *field = node.as_boolean()->get();
        } else if constexpr (std::is_same_v<T, double>) {
          if (!node.is_number()) throw bad("a number");
          *field = node.value<double>().value();
        } else if constexpr (std::is_same_v<T, std::string>) {
          if (!node.is_string()) throw bad("a string");
          *field = node.as_string()->get();
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
          if (!node.is_array()) throw bad("an array of integers");
          field->clear();
          for (const toml::node& v : *node.as_array()) {
            if (!v.is_integer()) throw bad("an array of integers");
            field->push_back(v.as_integer()->get());
          }
        } else {
          if (!node.is_integer()) throw bad("an integer");
          *field = static_cast<T>(node.as_integer()->get());
        }
      },
      opt.field);
}

void apply_toml(TrainConfig& config, const std::string& toml_text, const std::string& source_name) {
  toml::table table;
  try {
    table = toml::parse(toml_text, source_name);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    throw std::invalid_argument(fmt::format("{}: {} ({})", source_name, e.description(), where.str()));
  }
  if (auto preset = table["preset"].value<std::string>()) config = train_preset(*preset);
  std::vector<Option> options = option_table(config);
  std::set<std::string> known{"preset"};
  for (const Option& opt : options) {
    known.insert(opt.key);
    if (const toml::node* node = table.at_path(opt.key).node()) set_from_toml(opt, *node, source_name);
  }
  // Every leaf in the file must be an option: a typo must not be silently ignored.
  for (const auto& [section, node] : table) {
    std::string name(section.str());
    if (const toml::table* sub = node.as_table()) {
      for (const auto& [key, value] : *sub)
        if (!known.count(name + "." + std::string(key.str())))
          throw std::invalid_argument(fmt::format("{}: unknown key '{}.{}'", source_name, name, key.str()));
    } else if (!known.count(name)) {
      throw std::invalid_argument(fmt::format("{}: unknown key '{}'", source_name, name));
    }
  }
}

// ---- command line --------------------------------------------------------------------------------------------------------

static std::string current_value(const Field& field) {
  return std::visit(
      [](auto f) -> std::string {
        using T = std::remove_pointer_t<decltype(f)>;
        if constexpr (std::is_same_v<T, EnumField>) return f.get();
        else if constexpr (std::is_same_v<T, bool>) return *f ? "true" : "false";
        else if constexpr (std::is_same_v<T, std::string>) return *f;
        else if constexpr (std::is_same_v<T, std::vector<int64_t>>) return fmt::format("[{}]", fmt::join(*f, ","));
        else return fmt::format("{}", *f);
      },
      field);
}

TrainOptions::TrainOptions(CLI::App& app) : app_(&app) {
  app.add_option("--config", config_file_, "TOML config file (applied after --preset, before other flags)")
      ->check(CLI::ExistingFile);
  app.add_option("--preset", preset_, "named config: tiny | S | M")->default_str("tiny");
  TrainConfig defaults;
  std::vector<Option> options = option_table(defaults);
  values_.resize(options.size());
  // Short names for the flags every tool shares (moe-eval and moe-analyze take --device too).
  const std::map<std::string, std::string> short_names = {{"train.device", "--device"},
                                                          {"train.precision", "--precision"}};
  for (size_t i = 0; i < options.size(); ++i)
    app.add_option(std::string("--") + options[i].key +
                       (short_names.count(options[i].key) ? "," + short_names.at(options[i].key) : ""),
                   values_[i], options[i].help)
        ->default_str(current_value(options[i].field))
        ->group(std::string(options[i].key).substr(0, std::string(options[i].key).find('.')));
}

TrainConfig TrainOptions::resolve() const {
  TrainConfig config = train_preset(preset_.empty() ? "tiny" : preset_);
  if (!config_file_.empty()) {
    std::ifstream in(config_file_);
    std::stringstream text;
    text << in.rdbuf();
    apply_toml(config, text.str(), config_file_);
    if (!preset_.empty() && config.preset != preset_)
      throw std::invalid_argument(fmt::format("--preset {} conflicts with preset = \"{}\" in {}", preset_,
                                              config.preset, config_file_));
  }
  // Each flag becomes a one-line TOML document: one parser, one set of type checks and messages.
  std::vector<Option> options = option_table(config);
  for (size_t i = 0; i < options.size(); ++i) {
    if (app_->get_option(std::string("--") + options[i].key)->count() == 0) continue;
    const std::string& value = values_[i];
    bool is_string = std::holds_alternative<std::string*>(options[i].field) ||
                     std::holds_alternative<EnumField>(options[i].field);
    std::string key = options[i].key;
    size_t dot = key.find('.');
    std::string doc = fmt::format("[{}]\n{} = {}\n", key.substr(0, dot), key.substr(dot + 1),
                                  is_string ? nlohmann::json(value).dump() : value);
    apply_toml(config, doc, "--" + key);
  }
  config.validate();
  return config;
}

void to_json(nlohmann::json& j, const TrainConfig& c) {
  TrainConfig copy = c;
  j = nlohmann::json::object();
  j["preset"] = c.preset;
  for (const Option& opt : option_table(copy))
    std::visit(
        [&](auto f) {
          if constexpr (std::is_same_v<decltype(f), EnumField>) j[opt.key] = f.get();
          else j[opt.key] = *f;
        },
        opt.field);
}

}  // namespace moelab::apps
