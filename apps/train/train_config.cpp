#include "apps/train/train_config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <CLI/CLI.hpp>
#include <charconv>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <toml++/toml.h>
#include <utility>
#include <variant>

#include "data/excerpt.h"
#include "data/synthetic.h"
#include "engine/error.h"

namespace moelab::apps {

// ---- the option table ----------------------------------------------------------------------------------------------------

// Upper bounds of the integer options: what their consumers can address. Counts that reach an int or an i32 position
// (the loader's batch size, the shards' seq_len, token ids, SentencePiece's vocabulary) stay within int32; the model's
// widths stay small enough that every tensor size made of them (vocab_size * d_model, n_experts * d_model *
// expert_hidden, ...) fits int64.
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxWidth = int64_t{1} << 20;    // d_model, n_heads, expert_hidden, dense_hidden
constexpr int64_t kMaxLayers = int64_t{1} << 16;   // n_layers, moe_every, dense_layers entries
constexpr int64_t kMaxExperts = int64_t{1} << 16;  // n_experts, top_k, shared_experts
// The seed: a TOML integer, so that the config stored in a checkpoint reads back.
constexpr int64_t kMaxSeed = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();
// Values echoed in error messages are cut (data::excerpt), so that every message stays one short line.
constexpr size_t kMaxShown = 60;

// An integer option (T is int64_t, or uint64_t for the seed) and its allowed values, both ends included.
template <class T> struct Integer {
  T* value;
  int64_t min, max;
};
template <class T> static Integer<T> integer(T& value, int64_t min, int64_t max) { return {&value, min, max}; }

// The allowed values of a real option: always finite; an open end is left out, and max = kInf means no upper bound.
struct RealRange {
  double min = -kInf, max = kInf;
  bool min_open = false, max_open = false;
};
constexpr RealRange kPositive{.min = 0, .min_open = true};
constexpr RealRange kNonNegative{.min = 0};
constexpr RealRange kUnitInterval{.min = 0, .max = 1, .max_open = true};  // [0, 1): Adam's betas

struct Real {
  double* value;
  RealRange range;
};
static Real real(double& value, RealRange range) { return {&value, range}; }

// A list of integers, each in [min, max].
struct IntegerList {
  std::vector<int64_t>* value;
  int64_t min, max;
};

// An option whose value is one of an enum's names (engine/enum_names.h): read and written as that name.
struct EnumField {
  std::function<std::string()> get;
  std::function<void(std::string_view text, std::string_view what)> set;  // throws, listing the allowed names
};
template <class E> static EnumField enum_field(E& field) {
  // The error quotes the text: it gets an excerpt, which is the text itself for every name (short, printable).
  return {[&field] { return std::string(enum_name(field)); },
          [&field](std::string_view text, std::string_view what) {
            field = parse_enum<E>(data::excerpt(text, kMaxShown), what);
          }};
}

using Field = std::variant<Integer<int64_t>, Integer<uint64_t>, Real, bool*, std::string*, IntegerList, EnumField>;

struct Option {
  const char* key;  // TOML path and --flag
  Field field;
  const char* help;
};

static std::vector<Option> option_table(TrainConfig& c) {
  nn::ModelConfig& m = c.model;
  const auto synthetic_domains = static_cast<int64_t>(data::synthetic_domain_names().size());
  return {
      {"model.vocab_size", integer(m.vocab_size, 1, kMaxInt32),
       "vocabulary size (byte tokenizer: 256; bpe: set from the tokenizer)"},
      {"model.d_model", integer(m.d_model, 1, kMaxWidth), "model width d"},
      {"model.n_layers", integer(m.n_layers, 1, kMaxLayers), "transformer blocks"},
      {"model.n_heads", integer(m.n_heads, 1, kMaxWidth), "attention heads (d_model / n_heads must be even)"},
      {"model.seq_len", integer(m.seq_len, 1, kMaxInt32), "tokens per training sequence"},
      {"model.n_experts", integer(m.n_experts, 0, kMaxExperts), "experts per MoE layer (0: dense model)"},
      {"model.top_k", integer(m.top_k, 1, kMaxExperts), "experts per token"},
      {"model.expert_hidden", integer(m.expert_hidden, 0, kMaxWidth), "hidden size of each expert's SwiGLU"},
      {"model.norm_topk", &m.norm_topk, "renormalize the k chosen gate probabilities to sum 1"},
      {"model.shared_experts", integer(m.shared_experts, 0, kMaxExperts), "always-on shared experts per MoE layer"},
      {"model.moe_every", integer(m.moe_every, 1, kMaxLayers), "layer l is MoE when (l+1) % moe_every == 0"},
      {"model.dense_layers", IntegerList{&m.dense_layers, 0, kMaxLayers - 1}, "layers forced dense, e.g. [0]"},
      {"model.dense_hidden", integer(m.dense_hidden, 0, kMaxWidth),
       "hidden size of dense layers (0: top_k * expert_hidden)"},
      {"model.tie_embeddings", &m.tie_embeddings, "share tok_emb and lm_head weights"},
      {"model.rope_theta", real(m.rope_theta, kPositive), "RoPE base"},
      {"model.init_std", real(m.init_std, kPositive), "std of the normal init of matrices"},
      {"data.corpus", &c.data.corpus, "folder with train.jsonl [+ validation.jsonl], a .jsonl file, or 'synthetic'"},
      {"data.text_key", &c.data.text_key, "JSONL key of the document text"},
      {"data.domain_key", &c.data.domain_key, "JSONL key of the domain (dotted path allowed)"},
      {"data.tokenizer", &c.data.tokenizer, "'byte', 'bpe' (trained on the corpus) or a SentencePiece .model file"},
      {"data.bpe_vocab", integer(c.data.bpe_vocab, 1, kMaxInt32), "vocabulary size when training a BPE tokenizer"},
      {"data.balanced", &c.data.balanced, "domain-balanced sampling of training sequences"},
      {"data.labels", enum_field(c.data.labels),
       "training labels: true | permuted (shuffled among training sequences) | uniform (random); held-out data keep "
       "the true ones"},
      {"data.synthetic_docs", integer(c.data.synthetic_docs, 1, kMaxInt32),
       "documents per domain for the synthetic corpus"},
      {"data.synthetic_domains", integer(c.data.synthetic_domains, 1, synthetic_domains),
       "domains of the synthetic corpus (1-5)"},
      {"moe.alpha", real(c.losses.alpha, kNonNegative), "load-balancing loss coefficient"},
      {"moe.z_coef", real(c.losses.z_coef, kNonNegative), "router z-loss coefficient"},
      {"moe.beta", real(c.losses.beta, kNonNegative), "expert-divergence loss coefficient (0: baseline)"},
      {"moe.ed_form", enum_field(c.losses.ed_form), "expert-divergence form: neglog | neg_jsd"},
      {"moe.ed_eps", real(c.losses.ed_eps, kPositive), "eps inside -log(JSD + eps)"},
      {"moe.ed_scope", enum_field(c.losses.ed_scope),
       "with train.grad_accum > 1, ED per micro_batch or over the whole step"},
      {"moe.ed_groups", enum_field(c.losses.ed_groups),
       "what ED pulls apart: domain (mean routing per domain) | sequence (each sequence its own group: the ablation)"},
      {"optim.name", enum_field(c.optimizer), "optimizer: adamw | omoe"},
      {"optim.lr", real(c.lr, kPositive), "peak learning rate"},
      {"optim.min_lr", real(c.min_lr, kNonNegative), "learning rate at the end of the cosine decay (<= optim.lr)"},
      {"optim.warmup", integer(c.warmup, 0, kMaxInt32), "linear warmup steps"},
      {"optim.beta1", real(c.adamw.beta1, kUnitInterval), "AdamW beta1"},
      {"optim.beta2", real(c.adamw.beta2, kUnitInterval), "AdamW beta2"},
      {"optim.eps", real(c.adamw.eps, kPositive), "AdamW eps"},
      {"optim.weight_decay", real(c.adamw.weight_decay, kNonNegative), "decoupled weight decay (matrices only)"},
      {"optim.grad_clip", real(c.grad_clip, kNonNegative), "global gradient-norm clip (0: off)"},
      {"omoe.every", integer(c.omoe.every, 1, kMaxInt32), "OMoE: step t is an O step when t % every == 0 ..."},
      {"omoe.warmup", integer(c.omoe.warmup, 0, kMaxInt32), "OMoE: ... and t > warmup"},
      {"omoe.reset", &c.omoe.reset, "OMoE: reset every projector to I after each O step"},
      {"omoe.alpha", real(c.omoe.alpha, kNonNegative),
       "OMoE: fixed projector alpha (0: alpha_scale * running mean of ||a||^2)"},
      {"omoe.alpha_scale", real(c.omoe.alpha_scale, kNonNegative), "OMoE: c in alpha = c * running mean of ||a||^2"},
      {"omoe.project_down", &c.omoe.project_down, "OMoE: also project W_down (own projectors on expert activations)"},
      {"omoe.mode", enum_field(c.omoe.mode),
       "OMoE: grad (project the gradient) | direction (project the Adam direction)"},
      {"omoe.spectrum_every", integer(c.omoe.spectrum_every, 0, kMaxInt32),
       "OMoE: log trace/min eigenvalue of Pbar every n-th O step (0: off)"},
      {"train.steps", integer(c.steps, 1, kMaxInt32), "optimizer steps"},
      {"train.batch_size", integer(c.batch_size, 1, kMaxInt32),
       "sequences per micro-batch (train.grad_accum of them make a step)"},
      {"train.grad_accum", integer(c.grad_accum, 1, kMaxInt32), "micro-batches per optimizer step, gradients averaged"},
      {"train.seed", integer(c.seed, 0, kMaxSeed), "seed of the model init and the data order"},
      {"train.device", enum_field(c.device), "cpu | cuda"},
      {"train.precision", enum_field(c.precision),
       "fp32 | bf16 (bf16 operands of the matrix products, f32 accumulation, f32 weights, norms, router, losses)"},
      {"train.eval_every", integer(c.eval_every, 0, kMaxInt32), "steps between validation passes (0: only at the end)"},
      {"train.eval_batches", integer(c.eval_batches, 1, kMaxInt32), "validation batches per pass"},
      {"train.checkpoint_every", integer(c.checkpoint_every, 0, kMaxInt32),
       "steps between checkpoints (0: only the final one)"},
      {"train.log_every", integer(c.log_every, 1, kMaxInt32),
       "steps between progress lines when stdout is not a terminal"},
      {"train.out_dir", &c.out_dir, "folder for the metrics log, checkpoints and data shards"},
      {"train.resume", &c.resume, "checkpoint folder to resume from (bit-exact)"},
      {"train.init_from", &c.init_from,
       "checkpoint or run folder whose weights start the run (step 0, fresh optimizer); a dense one is upcycled"},
      {"train.upcycle_noise", real(c.upcycle_noise, kNonNegative),
       "with a dense train.init_from: each expert's weights times 1 + noise * N(0, 1)"},
  };
}

// Calls f with the option's current value: the number, bool, string or list, or the enum's name.
template <class F> static auto with_value(const Field& field, F&& f) {
  return std::visit(
      [&](const auto& x) {
        using X = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<X, EnumField>)
          return f(x.get());
        else if constexpr (std::is_pointer_v<X>)
          return f(*x);
        else
          return f(*x.value);
      },
      field);
}

// ---- flag text: UTF-8, and values in error messages ---------------------------------------------------------------------

// Flag values are stored in checkpoints as JSON text, which must be UTF-8: an error names the first bad byte.
static void require_utf8(std::string_view text, const std::string& what) {
  for (size_t i = 0, n; i < text.size(); i += n)
    if ((n = data::utf8_length(text, i)) == 0)
      fail("{} must be UTF-8 text, got the byte 0x{:02x} at offset {}", what, static_cast<unsigned char>(text[i]), i);
}

// A flag's text in an error message: quoted, one line, cut.
static std::string quoted_text(std::string_view text) { return "'" + data::excerpt(text, kMaxShown) + "'"; }

// ---- ranges --------------------------------------------------------------------------------------------------------------
// `what` names the option as the value's source does: "config: optim.lr", "run.toml: optim.lr" or "--optim.lr".

static bool contains(const RealRange& r, double v) {
  return std::isfinite(v) && (r.min_open ? v > r.min : v >= r.min) && (r.max_open ? v < r.max : v <= r.max);
}

static std::string describe(const RealRange& r) {
  if (r.max == kInf) return fmt::format("a finite number {} {}", r.min_open ? ">" : ">=", r.min);
  return fmt::format("in {}{}, {}{}", r.min_open ? "(" : "[", r.min, r.max, r.max_open ? ")" : "]");
}

// `shown`: the value as the message prints it (the text itself when it does not fit 64 bits).
template <class T>
[[noreturn]] static void fail_range(const Integer<T>& f, const std::string& what, std::string_view shown) {
  fail("{} must be in [{}, {}], got {}", what, f.min, f.max, shown);
}

template <class T, class V> static void require_in_range(const Integer<T>& f, V value, const std::string& what) {
  if (std::cmp_less(value, f.min) || std::cmp_greater(value, f.max)) fail_range(f, what, std::to_string(value));
}
static void require_in_range(const Real& f, double value, const std::string& what) {
  if (!contains(f.range, value)) fail("{} must be {}, got {}", what, describe(f.range), value);
}
static void require_in_range(const IntegerList& f, const std::vector<int64_t>& values, const std::string& what) {
  for (int64_t v : values)
    if (v < f.min || v > f.max) fail("{} entries must be in [{}, {}], got {}", what, f.min, f.max, v);
}

// Checks the option's current value (numbers and lists; every bool, string and enum value is allowed).
static void check_range(const Field& field, const std::string& what) {
  std::visit(
      [&](const auto& f) {
        using F = std::decay_t<decltype(f)>;
        if constexpr (std::is_same_v<F, Real> || std::is_same_v<F, IntegerList> ||
                      std::is_same_v<F, Integer<int64_t>> || std::is_same_v<F, Integer<uint64_t>>)
          require_in_range(f, *f.value, what);
      },
      field);
}

// Range-checked stores, shared by the TOML file and the flags.
template <class T> static void store(const Integer<T>& f, int64_t value, const std::string& what) {
  require_in_range(f, value, what);
  *f.value = static_cast<T>(value);
}
static void store(const Real& f, double value, const std::string& what) {
  require_in_range(f, value, what);
  *f.value = value;
}
static void store(const IntegerList& f, std::vector<int64_t> values, const std::string& what) {
  require_in_range(f, values, what);
  *f.value = std::move(values);
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

void TrainConfig::validate(const std::string& source) const {
  TrainConfig copy = *this;  // the table points into a config it could write; this one is only read
  for (const Option& opt : option_table(copy)) check_range(opt.field, fmt::format("{}: {}", source, opt.key));
  auto require = [&](bool ok, const std::string& what) {
    if (!ok) fail("{}: {}", source, what);
  };
  // The model's shape (the ranges above keep every product below in int64).
  const nn::ModelConfig& m = model;
  require(m.d_model % m.n_heads == 0,
          fmt::format("model.d_model = {} must be a multiple of model.n_heads = {}", m.d_model, m.n_heads));
  require(m.head_dim() % 2 == 0,
          fmt::format("model.d_model / model.n_heads = {} must be even (RoPE rotates pairs)", m.head_dim()));
  if (m.n_experts > 0) {
    require(m.top_k <= m.n_experts,
            fmt::format("model.top_k = {} must be <= model.n_experts = {}", m.top_k, m.n_experts));
    require(m.expert_hidden > 0, fmt::format("model.expert_hidden must be > 0 with experts, got {}", m.expert_hidden));
  }
  for (int64_t layer : m.dense_layers)
    require(layer < m.n_layers,
            fmt::format("model.dense_layers entry {} must be < model.n_layers = {}", layer, m.n_layers));
  require(m.dense_ffn_hidden() > 0, "dense layers need model.dense_hidden > 0 (or model.top_k * model.expert_hidden)");
  try {
    model.validate();  // the model's own rules, should they ever say more than the checks above
  } catch (const std::invalid_argument& e) {
    fail("{}: {}", source, e.what());
  }
  for (const auto& [key, text] : {std::pair<const char*, const std::string&>{"data.corpus", data.corpus},
                                  {"data.text_key", data.text_key},
                                  {"data.domain_key", data.domain_key},
                                  {"data.tokenizer", data.tokenizer},
                                  {"train.out_dir", out_dir}})
    require(!text.empty(), fmt::format("{} must not be empty", key));
  require(min_lr <= lr, fmt::format("optim.min_lr = {} must be <= optim.lr = {}", min_lr, lr));
  // A micro-batch's tokens, and in an MoE model their k routing slots each, are counted with i32 positions.
  const int64_t tokens = batch_size * model.seq_len;  // both factors are below 2^31: no overflow
  if (model.n_experts > 0) {
    require(tokens <= kMaxInt32 / model.top_k,
            fmt::format("train.batch_size ({}) * model.seq_len ({}) * model.top_k ({}) routing slots per micro-batch "
                        "must be <= {} (i32 positions)",
                        batch_size, model.seq_len, model.top_k, kMaxInt32));
  } else {
    require(tokens <= kMaxInt32, fmt::format("train.batch_size ({}) * model.seq_len ({}) tokens per micro-batch must "
                                             "be <= {} (i32 positions)",
                                             batch_size, model.seq_len, kMaxInt32));
  }
  require(omoe.alpha > 0 || omoe.alpha_scale > 0,
          fmt::format("omoe.alpha_scale must be > 0 when omoe.alpha = 0, got {}", omoe.alpha_scale));
  require(optimizer != OptimizerKind::OMoE || model.n_experts >= 2,
          fmt::format("optim.name = omoe needs at least 2 experts (model.n_experts = {})", model.n_experts));
  require(losses.beta == 0 || model.n_experts >= 2,
          fmt::format("moe.beta = {} needs at least 2 experts (model.n_experts = {})", losses.beta, model.n_experts));
  require(upcycle_noise == 0 || !init_from.empty(),
          fmt::format("train.upcycle_noise = {} needs train.init_from (a dense checkpoint)", upcycle_noise));
  require(data.tokenizer != "byte" || model.vocab_size == 256,
          fmt::format("the byte tokenizer needs model.vocab_size = 256, got {}", model.vocab_size));
}

// The named preset; an unknown name is an error that says where it came from (`what`: "--preset", "run.toml: preset").
static TrainConfig preset_from(const std::string& name, const std::string& what) {
  try {
    return train_preset(data::excerpt(name, kMaxShown));  // quoted by the error; a preset's name is its own excerpt
  } catch (const std::invalid_argument& e) {
    fail("{}: {}", what, e.what());
  }
}

// ---- TOML -------------------------------------------------------------------------------------------------------------

// A TOML value as the file spells it, for error messages: on one line (arrays and tables print over several), cut.
static std::string toml_source(const toml::node& node) {
  std::ostringstream printed;
  node.visit([&](const auto& value) { printed << value; });
  std::string line;
  bool line_start = false;
  for (char c : printed.str()) {
    if (c == '\n') {
      line_start = true;
    } else if (!(line_start && c == ' ')) {  // the indentation of the next line goes
      if (line_start) line += ' ';
      line += c, line_start = false;
    }
  }
  return data::excerpt(line, kMaxShown);
}

static void set_from_toml(const Option& opt, const toml::node& node, const std::string& what) {
  auto bad = [&](const char* expected) { fail("{} must be {}, got {}", what, expected, toml_source(node)); };
  std::visit(
      [&](const auto& field) {
        using F = std::decay_t<decltype(field)>;
        if constexpr (std::is_same_v<F, EnumField>) {
          if (!node.is_string()) bad("a string");
          field.set(node.as_string()->get(), what);
        } else if constexpr (std::is_same_v<F, bool*>) {
          if (!node.is_boolean()) bad("true or false");
          *field = node.as_boolean()->get();
        } else if constexpr (std::is_same_v<F, std::string*>) {
          if (!node.is_string()) bad("a string");
          *field = node.as_string()->get();
        } else if constexpr (std::is_same_v<F, Real>) {
          if (!node.is_number()) bad("a number");
          store(field, node.value<double>().value(), what);
        } else if constexpr (std::is_same_v<F, IntegerList>) {
          if (!node.is_array()) bad("an array of integers");
          std::vector<int64_t> values;
          for (const toml::node& v : *node.as_array()) {
            if (!v.is_integer()) bad("an array of integers");
            values.push_back(v.as_integer()->get());
          }
          store(field, std::move(values), what);
        } else {
          if (!node.is_integer()) bad("an integer");
          store(field, node.as_integer()->get(), what);
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
    fail("{}: {} ({})", source_name, data::excerpt(e.description(), 4 * kMaxShown), where.str());
  }
  if (const toml::node* preset = table.get("preset")) {
    if (!preset->is_string()) fail("{}: preset must be a string, got {}", source_name, toml_source(*preset));
    config = preset_from(preset->as_string()->get(), source_name + ": preset");
  }
  std::vector<Option> options = option_table(config);
  std::set<std::string> known{"preset"};
  for (const Option& opt : options) {
    known.insert(opt.key);
    if (const toml::node* node = table.at_path(opt.key).node())
      set_from_toml(opt, *node, fmt::format("{}: {}", source_name, opt.key));
  }
  // Every leaf in the file must be an option: a typo must not be silently ignored.
  for (const auto& [section, node] : table) {
    std::string name(section.str());
    if (const toml::table* sub = node.as_table()) {
      for (const auto& [key, value] : *sub)
        if (!known.count(name + "." + std::string(key.str())))
          fail("{}: unknown key '{}.{}'", source_name, name, key.str());
    } else if (!known.count(name)) {
      fail("{}: unknown key '{}'", source_name, name);
    }
  }
}

// ---- command line --------------------------------------------------------------------------------------------------------

// Strict number parsing: the whole text is the number (no spaces, no '+', integers in decimal). Returns
// std::errc::result_out_of_range when the number does not fit T, std::errc::invalid_argument when the text is not one.
template <class T> static std::errc parse_number(std::string_view text, T& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return end == text.data() + text.size() ? error : std::errc::invalid_argument;
}

// "[0, 2]" (brackets required, as in TOML and --help; "[]" is the empty list) into its integers.
static bool parse_integer_list(std::string_view text, std::vector<int64_t>& values) {
  auto trim = [](std::string_view s) {
    while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
    while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
    return s;
  };
  text = trim(text);
  if (text.size() < 2 || text.front() != '[' || text.back() != ']') return false;
  std::string_view items = trim(text.substr(1, text.size() - 2));
  while (!items.empty()) {
    const size_t comma = items.find(',');
    int64_t value = 0;
    if (parse_number(trim(items.substr(0, comma)), value) != std::errc()) return false;
    values.push_back(value);
    if (comma == std::string_view::npos) break;
    items = items.substr(comma + 1);
    if (trim(items).empty()) return false;  // a trailing comma
  }
  return true;
}

// Parses a flag's text straight into its option, with the checks and messages of the TOML path. The text is only ever
// this one value: it cannot set another option.
static void set_from_flag(const Option& opt, const std::string& text, const std::string& what) {
  require_utf8(text, what);
  auto bad = [&](const char* expected) { fail("{} must be {}, got {}", what, expected, quoted_text(text)); };
  std::visit(
      [&](const auto& field) {
        using F = std::decay_t<decltype(field)>;
        if constexpr (std::is_same_v<F, EnumField>) {
          field.set(text, what);
        } else if constexpr (std::is_same_v<F, bool*>) {
          if (text != "true" && text != "false") bad("true or false");
          *field = text == "true";
        } else if constexpr (std::is_same_v<F, std::string*>) {
          *field = text;
        } else if constexpr (std::is_same_v<F, Real>) {
          double value = 0;
          std::errc error = parse_number(text, value);
          if (error == std::errc::result_out_of_range)
            fail("{} must be {}, got {}", what, describe(field.range), data::excerpt(text, kMaxShown));
          if (error != std::errc()) bad("a number");
          store(field, value, what);
        } else if constexpr (std::is_same_v<F, IntegerList>) {
          std::vector<int64_t> values;
          if (!parse_integer_list(text, values)) bad("a list of integers like [0, 2]");
          store(field, std::move(values), what);
        } else {
          int64_t value = 0;
          std::errc error = parse_number(text, value);
          if (error == std::errc::result_out_of_range) fail_range(field, what, data::excerpt(text, kMaxShown));
          if (error != std::errc()) bad("an integer");
          store(field, value, what);
        }
      },
      opt.field);
}

static std::string current_value(const Field& field) {
  return with_value(field, [](const auto& value) -> std::string {
    using T = std::decay_t<decltype(value)>;
    if constexpr (std::is_same_v<T, bool>)
      return value ? "true" : "false";
    else if constexpr (std::is_same_v<T, std::vector<int64_t>>)
      return fmt::format("[{}]", fmt::join(value, ","));
    else
      return fmt::format("{}", value);
  });
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
  require_utf8(preset_, "--preset");
  TrainConfig config = preset_from(preset_.empty() ? "tiny" : preset_, "--preset");
  if (!config_file_.empty()) {
    std::ifstream in(config_file_, std::ios::binary);
    if (!in) fail("--config: cannot read {}", config_file_);
    std::stringstream text;
    text << in.rdbuf();
    apply_toml(config, text.str(), config_file_);
    if (!preset_.empty() && config.preset != preset_)
      fail("--preset {} conflicts with preset = \"{}\" in {}", preset_, config.preset, config_file_);
  }
  std::vector<Option> options = option_table(config);
  bool any_flag = false;
  for (size_t i = 0; i < options.size(); ++i) {
    if (app_->get_option(std::string("--") + options[i].key)->count() == 0) continue;
    set_from_flag(options[i], values_[i], std::string("--") + options[i].key);
    any_flag = true;
  }
  // Errors across options name where the values came from: "config", "run.toml" or "run.toml + flags".
  config.validate(config_file_.empty() ? "config" : config_file_ + (any_flag ? " + flags" : ""));
  return config;
}

void to_json(nlohmann::json& j, const TrainConfig& c) {
  TrainConfig copy = c;
  j = nlohmann::json::object();
  j["preset"] = c.preset;
  for (const Option& opt : option_table(copy)) with_value(opt.field, [&](const auto& value) { j[opt.key] = value; });
}

}  // namespace moelab::apps
