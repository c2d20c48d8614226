#include "apps/report/report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>

#include "apps/analysis/evaluation.h"
#include "engine/ops.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

// ==== text ===========================================================================================================

// Length of the valid UTF-8 sequence starting at s[i], or 0 when the bytes there are not one.
static size_t utf8_sequence(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
  if (n == 2 && c < 0xC2) return 0;                          // overlong
  if (n == 3 && c == 0xE0 && byte(i + 1) < 0xA0) return 0;   // overlong
  if (n == 3 && c == 0xED && byte(i + 1) >= 0xA0) return 0;  // surrogates
  if (n == 4 && (c > 0xF4 || (c == 0xF0 && byte(i + 1) < 0x90) || (c == 0xF4 && byte(i + 1) >= 0x90))) return 0;
  return n;
}

static bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t n = utf8_sequence(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string valid_utf8(std::string_view text) {
  std::string out;
  for (size_t i = 0; i < text.size();) {
    size_t n = utf8_sequence(text, i);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(text.substr(i, n));
      i += n;
    }
  }
  return out;
}

std::string html_escape(std::string_view text) {
  std::string out;
  for (char c : valid_utf8(text)) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

static std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

// A metric value for tables: "–" for NaN, fewer decimals for larger numbers.
static std::string num(double v, int decimals = 3) {
  if (!std::isfinite(v)) return "–";
  if (decimals == 0) return fmt::format("{:.0f}", v);
  double a = std::abs(v);
  if (a >= 1000) return fmt::format("{:.0f}", v);
  if (a >= 100) return fmt::format("{:.1f}", v);
  return fmt::format("{:.{}f}", v, decimals);
}

static double mean_of(const std::vector<double>& v) {
  double s = 0;
  int64_t n = 0;
  for (double x : v)
    if (std::isfinite(x)) s += x, ++n;
  return n ? s / static_cast<double>(n) : NAN;
}

// ==== the metrics log ================================================================================================

// Every finite number under `j` as path -> value; a list contributes the mean over its entries of each path that
// every entry has.
static void flatten(const json& j, const std::string& path, std::map<std::string, double>& out) {
  if (j.is_number()) {
    const double v = j.get<double>();
    if (std::isfinite(v)) out[path] = v;
  } else if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) flatten(it.value(), path.empty() ? it.key() : path + "/" + it.key(), out);
  } else if (j.is_array() && !j.empty()) {
    std::map<std::string, std::pair<double, size_t>> sums;
    for (const json& entry : j) {
      std::map<std::string, double> one;
      flatten(entry, path, one);
      for (const auto& [key, v] : one) sums[key].first += v, sums[key].second += 1;
    }
    for (const auto& [key, sum] : sums)
      if (sum.second == j.size()) out[key] = sum.first / static_cast<double>(sum.second);
  }
}

MetricsLog read_metrics_log(const fs::path& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error(fmt::format("cannot read the metrics log {}", file.string()));
  MetricsLog log;
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step"))
      throw std::runtime_error(
          fmt::format("{}:{}: not a metrics line (expected a JSON object with \"step\")", file.string(), line_no));
    const double step = j["step"].is_number() ? j["step"].get<double>() : NAN;
    const bool is_eval = j.contains("eval");
    std::map<std::string, double> values;
    flatten(is_eval ? j["eval"] : j, "", values);
    values.erase("step");
    for (const auto& [key, v] : values) (is_eval ? log.eval : log.train)[key].emplace_back(step, v);
    ++(is_eval ? log.eval_lines : log.train_lines);
  }
  return log;
}

// ==== analysing a run ================================================================================================

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
    model.lm().forward(from_vector(window, {1, static_cast<int64_t>(window.size())}));
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

RunAnalysis analyze_run(const fs::path& run_dir, const AnalyzeOptions& options) {
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
    throw std::runtime_error(
        fmt::format("{}: corpus '{}' has {} domain ({}); the specialization metrics compare "
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
      Tensor inputs = from_vector(b.inputs, {b.B, b.T}), domains = from_vector(b.domains, {b.B});
      model.lm().forward(inputs);
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
    for (const LayerDPPL& p : dppl)
      if (p.layer == a.layer) a.dppl_domain = p.domains, a.dppl = p.overall;
    run.layers.push_back(std::move(a));
  }
  if (!options.trace_text.empty())
    run.trace = trace_text(model, *data.tokenizer, options.trace_text, loaded.model_config.seq_len);
  return run;
}

// ==== JSON, CSV, terminal ============================================================================================

static json layer_json(const LayerAnalysis& a) {
  json j = {{"layer", a.layer}, {"routing", a.routing}};
  if (a.similarity.tokens > 0)
    j["output_similarity"] = {
        {"mean", a.similarity.mean}, {"pair", a.similarity.pair}, {"tokens", a.similarity.tokens}};
  j["parameter_variance"] = {
      {"all", a.variance.all}, {"w_gate", a.variance.w_gate}, {"w_up", a.variance.w_up}, {"w_down", a.variance.w_down}};
  j["dppl"] = {{"overall", a.dppl}, {"domains", a.dppl_domain}};
  return j;
}

json analysis_json(const RunAnalysis& run) {
  json j = {{"name", run.name},
            {"run_dir", run.run_dir.string()},
            {"checkpoint", run.checkpoint.string()},
            {"step", run.step},
            {"domains", run.domains},
            {"experts", run.experts},
            {"top_k", run.top_k},
            {"tokenizer", run.tokenizer},
            {"selection", run.selection},
            {"sequences", run.sequences},
            {"tokens", run.tokens},
            {"ce", run.ce},
            {"ce_domain", run.ce_domain},
            {"config", run.config}};
  json layers = json::array();
  for (const LayerAnalysis& a : run.layers) layers.push_back(layer_json(a));
  j["layers"] = layers;
  if (run.trace) {
    const RoutingTrace& t = *run.trace;
    std::vector<std::string> pieces;
    for (const std::string& p : t.pieces) pieces.push_back(valid_utf8(p));
    j["trace"] = {{"text", valid_utf8(t.text)},
                  {"pieces", pieces},
                  {"layers", t.layers},
                  {"experts", t.experts},
                  {"probs", t.probs}};
  }
  return j;
}

// A folder name from a run name: anything but [A-Za-z0-9._-] becomes '_'.
static std::string safe_name(const std::string& name) {
  std::string out;
  for (char c : name)
    out += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-') ? c : '_';
  if (out.empty() || out == "." || out == "..") out = "run";
  return out;
}

static void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + file.string());
}

std::vector<fs::path> write_analysis_files(const std::vector<RunAnalysis>& runs, const fs::path& out_dir) {
  fs::create_directories(out_dir);
  std::vector<fs::path> files;
  json all = {{"runs", json::array()}};
  for (const RunAnalysis& run : runs) {
    all["runs"].push_back(analysis_json(run));
    const fs::path dir = out_dir / safe_name(run.name);
    fs::create_directories(dir);
    std::string usage = "layer,domain,expert,slots,share,mean_prob\n", jsd = "layer,domain_a,domain_b,jsd\n";
    std::string layers =
        "layer,mi_bits,domain_entropy_bits,mi_normalized,mean_jsd,d_inter,d_total,d_inter_share,load_min,load_max,"
        "load_std,load_entropy,max_violation,dead_experts,output_similarity,nv,nv_gate,nv_up,nv_down,dppl\n";
    for (const LayerAnalysis& a : run.layers) {
      const moe::LayerSpecialization& r = a.routing;
      for (size_t j = 0; j < run.domains.size(); ++j) {
        for (int64_t e = 0; e < run.experts; ++e) {
          usage += fmt::format("{},{},{},{},{:.6g},{:.6g}\n", a.layer, csv_field(run.domains[j]), e, r.slots[j][e],
                               r.usage[j][e], r.mean_prob[j][e]);
        }
        for (size_t k = 0; k < run.domains.size(); ++k)
          jsd += fmt::format("{},{},{},{:.6g}\n", a.layer, csv_field(run.domains[j]), csv_field(run.domains[k]),
                             r.jsd[j][k]);
      }
      layers += fmt::format(
          "{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{},{},{:.6g},{:.6g},{:.6g},{},{},{:.6g},{:.6g},"
          "{:.6g},{:.6g},{}\n",
          a.layer, r.mi.bits, r.mi.domain_entropy_bits, r.mi.normalized, r.mean_jsd, r.divergence.inter,
          r.divergence.total, r.inter_share(), r.load.min, r.load.max, r.load.std, r.load.entropy, r.load.max_violation,
          r.load.dead, a.similarity.tokens > 0 ? fmt::format("{:.6g}", a.similarity.mean) : std::string(),
          a.variance.all, a.variance.w_gate, a.variance.w_up, a.variance.w_down,
          std::isfinite(a.dppl) ? fmt::format("{:.6g}", a.dppl) : std::string());
    }
    for (auto [name, text] : {std::pair{"usage.csv", &usage}, {"jsd.csv", &jsd}, {"layers.csv", &layers}}) {
      write_text(dir / name, *text);
      files.push_back(dir / name);
    }
  }
  write_text(out_dir / "analysis.json", all.dump(1) + "\n");
  files.insert(files.begin(), out_dir / "analysis.json");
  return files;
}

std::string terminal_summary(const std::vector<RunAnalysis>& runs) {
  std::string out;
  for (const RunAnalysis& run : runs) {
    out += fmt::format("{} (step {}, {} sequences, {} tokens): held-out CE {} |", run.name, run.step, run.sequences,
                       run.tokens, num(run.ce, 4));
    for (size_t j = 0; j < run.domains.size(); ++j) out += fmt::format(" {} {}", run.domains[j], num(run.ce_domain[j]));
    out += "\n";
    out += fmt::format("  {:>5} {:>8} {:>6} {:>7} {:>9} {:>7} {:>8} {:>4} {:>7} {:>6} {:>8}\n", "layer", "MI bits",
                       "MI/H", "JSD", "Dint/Dtot", "load H", "max-viol", "dead", "out-sim", "NV", "dPPL");
    for (const LayerAnalysis& a : run.layers) {
      const moe::LayerSpecialization& r = a.routing;
      out += fmt::format("  {:>5} {:>8} {:>6} {:>7} {:>9} {:>7} {:>8} {:>4} {:>7} {:>6} {:>8}\n", a.layer,
                         num(r.mi.bits), num(r.mi.normalized), num(r.mean_jsd, 4), num(r.inter_share()),
                         num(r.load.entropy), num(r.load.max_violation), r.load.dead,
                         a.similarity.tokens ? num(a.similarity.mean) : "–", num(a.variance.all), num(a.dppl));
    }
  }
  return out;
}

// ==== SVG figures ====================================================================================================

namespace {

const std::vector<std::string> kRunColors = {"#2f6fdf", "#e4572e", "#2ca58d", "#8e5fd6",
                                             "#e0a100", "#d1495b", "#00798c", "#6c757d"};
const std::vector<std::string> kExpertColors = {"#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                                                "#f7b6d2", "#dbdb8d", "#9edae5", "#d9d9d9", "#fdd49e", "#b3de69"};
const std::vector<std::string> kBlues = {"#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"};
const std::vector<std::string> kOranges = {"#fff5eb", "#fdd0a2", "#fd8d3c", "#d94801", "#7f2704"};

std::string color_of(const std::vector<std::string>& palette, size_t i) { return palette[i % palette.size()]; }

std::string expert_color(int64_t e, int64_t experts) {
  if (experts <= static_cast<int64_t>(kExpertColors.size())) return kExpertColors[static_cast<size_t>(e)];
  return fmt::format("hsl({:.0f},70%,78%)", 360.0 * static_cast<double>(e) / static_cast<double>(experts));
}

struct Rgb {
  double r, g, b;
};
Rgb parse_hex(const std::string& hex) {
  auto channel = [&](size_t i) { return static_cast<double>(std::stoi(hex.substr(i, 2), nullptr, 16)); };
  return {channel(1), channel(3), channel(5)};
}

// t in [0, 1] along the palette's stops.
Rgb scale_color(const std::vector<std::string>& stops, double t) {
  t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0);
  const double pos = t * static_cast<double>(stops.size() - 1);
  const size_t i = std::min(static_cast<size_t>(pos), stops.size() - 2);
  const double f = pos - static_cast<double>(i);
  Rgb a = parse_hex(stops[i]), b = parse_hex(stops[i + 1]);
  return {a.r + f * (b.r - a.r), a.g + f * (b.g - a.g), a.b + f * (b.b - a.b)};
}
std::string hex(Rgb c) {
  return fmt::format("#{:02x}{:02x}{:02x}", static_cast<int>(std::lround(c.r)), static_cast<int>(std::lround(c.g)),
                     static_cast<int>(std::lround(c.b)));
}
bool is_dark(Rgb c) { return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b < 140; }

std::vector<double> nice_ticks(double lo, double hi, int target = 5) {
  const double raw = (hi - lo) / target, magnitude = std::pow(10.0, std::floor(std::log10(raw))), f = raw / magnitude;
  const double step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * magnitude;
  std::vector<double> ticks;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    ticks.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return ticks;
}

std::string tick_label(double v, double step) {
  const double a = std::abs(v);
  if (a >= 1e4) return fmt::format("{:.{}f}k", v / 1000, step >= 1000 ? 0 : 1);
  if (a != 0 && a < 1e-3) return fmt::format("{:.0e}", v);
  const int decimals = std::clamp(static_cast<int>(-std::floor(std::log10(step) + 1e-9)), 0, 6);
  return fmt::format("{:.{}f}", v, decimals);
}

struct Series {
  std::string label, color;
  std::vector<std::pair<double, double>> points;  // (x, y), finite
  bool dashed = false, markers = false, faint = false;
};

// Averages consecutive points into at most `limit` points (keeps charts of long runs small).
std::vector<std::pair<double, double>> downsample(const std::vector<std::pair<double, double>>& pts, size_t limit) {
  if (pts.size() <= limit) return pts;
  std::vector<std::pair<double, double>> out;
  const double per = static_cast<double>(pts.size()) / static_cast<double>(limit);
  for (size_t b = 0; b < limit; ++b) {
    size_t from = static_cast<size_t>(b * per), to = std::min(pts.size(), static_cast<size_t>((b + 1) * per));
    double x = 0, y = 0;
    for (size_t i = from; i < to; ++i) x += pts[i].first, y += pts[i].second;
    out.emplace_back(x / static_cast<double>(to - from), y / static_cast<double>(to - from));
  }
  return out;
}

// Exponential moving average with a window of about n / 25 points (at least 1).
std::vector<std::pair<double, double>> smooth(const std::vector<std::pair<double, double>>& pts) {
  const double window = std::max(1.0, static_cast<double>(pts.size()) / 25.0), a = 1.0 / window;
  std::vector<std::pair<double, double>> out;
  double m = 0;
  for (size_t i = 0; i < pts.size(); ++i) {
    m = i == 0 ? pts[i].second : (1 - a) * m + a * pts[i].second;
    out.emplace_back(pts[i].first, m);
  }
  return out;
}

// One line chart: axes, grid, ticks, one path per series. Empty when no series has a point.
std::string line_chart(const std::string& title, const std::vector<Series>& series, const std::string& x_label,
                       bool integer_x = false) {
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const Series& s : series)
    for (auto [x, y] : s.points) x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
  if (!std::isfinite(x0)) return "";
  if (x1 <= x0) x0 -= 1, x1 += 1;
  if (y1 - y0 <= 1e-12 * std::max(1.0, std::abs(y0))) {
    const double pad = std::abs(y0) > 0 ? std::abs(y0) * 0.1 : 0.5;
    y0 -= pad, y1 += pad;
  } else {
    const double pad = (y1 - y0) * 0.06;
    y0 -= pad, y1 += pad;
  }
  constexpr double W = 360, H = 210, L = 52, R = 12, T = 28, B = 34;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  std::string svg = fmt::format(
      "<svg class=\"chart\" viewBox=\"0 0 {0} {1}\" width=\"{0}\" height=\"{1}\" role=\"img\" aria-label=\"{2}\">"
      "<text x=\"{3}\" y=\"17\" class=\"ct\">{2}</text>",
      W, H, html_escape(title), L - 44);
  std::vector<double> yt = nice_ticks(y0, y1, 4);
  const double ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
  for (double v : yt)
    svg += fmt::format(
        "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" class=\"grid\"/>"
        "<text x=\"{3}\" y=\"{4:.1f}\" class=\"tick\" text-anchor=\"end\">{5}</text>",
        L, W - R, py(v), L - 6, py(v) + 3.5, tick_label(v, ystep));
  std::vector<double> xt = nice_ticks(x0, x1, 5);
  if (integer_x) std::erase_if(xt, [](double v) { return std::abs(v - std::round(v)) > 1e-9; });
  const double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1;
  for (double v : xt)
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" x2=\"{0:.1f}\" y1=\"{1}\" y2=\"{2}\" class=\"axis\"/>"
        "<text x=\"{0:.1f}\" y=\"{3}\" class=\"tick\" text-anchor=\"middle\">{4}</text>",
        px(v), H - B, H - B + 4, H - B + 15, tick_label(v, std::max(xstep, integer_x ? 1.0 : 0.0)));
  svg += fmt::format("<line x1=\"{0}\" x2=\"{1}\" y1=\"{2}\" y2=\"{2}\" class=\"axis\"/>", L, W - R, H - B);
  svg += fmt::format("<text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{}</text>", (L + W - R) / 2, H - 4,
                     html_escape(x_label));
  for (const Series& s : series) {
    if (s.points.empty()) continue;
    std::string d;
    for (size_t i = 0; i < s.points.size(); ++i)
      d += fmt::format("{}{:.1f},{:.1f}", i ? " L" : "M", px(s.points[i].first), py(s.points[i].second));
    if (s.points.size() > 1 || !s.markers)
      svg += fmt::format("<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{}{}><title>{}</title></path>",
                         d, s.color, s.faint ? 1 : 1.8, s.faint ? " stroke-opacity=\"0.25\"" : "",
                         s.dashed ? " stroke-dasharray=\"5 3\"" : "", html_escape(s.label));
    if (s.markers)
      for (auto [x, y] : s.points)
        svg += fmt::format(
            "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2.8\" fill=\"#fff\" stroke=\"{}\" stroke-width=\"1.5\">"
            "<title>{}: {} at {}</title></circle>",
            px(x), py(y), s.color, html_escape(s.label), num(y, 4), num(x, 0));
  }
  return svg + "</svg>";
}

struct HeatmapStyle {
  const std::vector<std::string>* palette = &kBlues;
  double vmax = 1;
  int decimals = 2;
  std::string value_name = "share";
};

// Heatmap geometry shared by the usage map and the load bars under it, so their columns line up.
struct Grid {
  double label_w, cell_w, cell_h, top;
};
Grid grid_for(const std::vector<std::string>& rows, size_t columns) {
  size_t longest = 4;
  for (const std::string& r : rows) longest = std::max(longest, std::min<size_t>(r.size(), 16));
  return {8.0 + 6.8 * static_cast<double>(longest), std::clamp(280.0 / static_cast<double>(columns), 9.0, 40.0),
          rows.size() > 10 ? 18.0 : 24.0, 20.0};
}

std::string short_label(const std::string& s) { return s.size() <= 16 ? s : s.substr(0, 15) + "…"; }

// Rows x columns of colored cells, labels left and on top, values written in the cells when they fit.
std::string heatmap_cells(const std::vector<std::vector<double>>& values, const std::vector<std::string>& rows,
                          const std::vector<std::string>& cols, const Grid& g, const HeatmapStyle& style) {
  std::string svg;
  const size_t label_every = g.cell_w >= 16 ? 1 : static_cast<size_t>(std::ceil(16.0 / g.cell_w));
  for (size_t c = 0; c < cols.size(); c += label_every)
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"middle\">{}</text>",
                       g.label_w + (static_cast<double>(c) + 0.5) * g.cell_w, g.top - 6, html_escape(cols[c]));
  for (size_t r = 0; r < rows.size(); ++r) {
    const double y = g.top + static_cast<double>(r) * g.cell_h;
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">{}<title>{}</title></text>",
                       g.label_w - 5, y + g.cell_h / 2 + 3.5, html_escape(short_label(rows[r])), html_escape(rows[r]));
    for (size_t c = 0; c < cols.size(); ++c) {
      const double v = values[r][c];
      Rgb color = scale_color(*style.palette, style.vmax > 0 ? v / style.vmax : 0);
      const double x = g.label_w + static_cast<double>(c) * g.cell_w;
      svg += fmt::format(
          "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\">"
          "<title>{} / {}: {} {}</title></rect>",
          x, y, g.cell_w - 1, g.cell_h - 1, hex(color), html_escape(rows[r]), html_escape(cols[c]), style.value_name,
          num(v, 4));
      if (g.cell_w >= 30)
        svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"cv\" text-anchor=\"middle\" fill=\"{}\">{}</text>",
                           x + g.cell_w / 2, y + g.cell_h / 2 + 3.5, is_dark(color) ? "#fff" : "#1d2430",
                           fmt::format("{:.{}f}", v, style.decimals));
    }
  }
  return svg;
}

// Color bar from 0 to vmax under a heatmap.
std::string color_bar(double x, double y, double width, const HeatmapStyle& style) {
  std::string svg;
  constexpr int steps = 24;
  for (int i = 0; i < steps; ++i)
    svg +=
        fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.2f}\" height=\"7\" fill=\"{}\"/>",
                    x + width * i / steps, y, width / steps + 0.3, hex(scale_color(*style.palette, (i + 0.5) / steps)));
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\">0</text>", x, y + 18);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">{}</text>", x + width, y + 18,
                     num(style.vmax, 3));
  return svg;
}

// Domain x expert usage, with the experts' overall load as bars underneath (dashed line: an even load).
std::string usage_figure(const RunAnalysis& run, const LayerAnalysis& a, double vmax) {
  std::vector<std::string> cols;
  for (int64_t e = 0; e < run.experts; ++e) cols.push_back(std::to_string(e));
  Grid g = grid_for(run.domains, cols.size());
  HeatmapStyle style{&kBlues, vmax, 2, "share of slots"};
  const double map_h = g.top + g.cell_h * static_cast<double>(run.domains.size());
  const double bars_top = map_h + 10, bars_h = 42, width = g.label_w + g.cell_w * static_cast<double>(cols.size()) + 8;
  const double height = bars_top + bars_h + 34;
  std::string svg = fmt::format(
      "<svg class=\"heat\" viewBox=\"0 0 {0:.0f} {1:.0f}\" width=\"{0:.0f}\" height=\"{1:.0f}\" "
      "role=\"img\" aria-label=\"expert usage per domain, layer {2}\">",
      width, height, a.layer);
  svg += heatmap_cells(a.routing.usage, run.domains, cols, g, style);
  // Load bars: share of all slots per expert.
  const moe::LoadStats& load = a.routing.load;
  double total = 0, top = 0;
  for (int64_t c : load.slots) total += static_cast<double>(c);
  for (int64_t c : load.slots) top = std::max(top, total > 0 ? static_cast<double>(c) / total : 0.0);
  const double even = cols.empty() ? 0 : 1.0 / static_cast<double>(cols.size()), scale = std::max(top, even * 1.5);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">load</text>", g.label_w - 5,
                     bars_top + bars_h - 2);
  for (size_t e = 0; e < load.slots.size(); ++e) {
    const double share = total > 0 ? static_cast<double>(load.slots[e]) / total : 0, h = bars_h * share / scale;
    const double x = g.label_w + static_cast<double>(e) * g.cell_w;
    svg += fmt::format(
        "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\">"
        "<title>expert {}: {} slots ({:.1f}%)</title></rect>",
        x + 1, bars_top + bars_h - h, std::max(1.0, g.cell_w - 3), h, load.slots[e] == 0 ? "#d1495b" : "#7b8794", e,
        load.slots[e], 100 * share);
  }
  const double even_y = bars_top + bars_h - bars_h * even / scale;
  svg += fmt::format(
      "<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#1d2430\" "
      "stroke-dasharray=\"3 3\" stroke-width=\"1\"/>",
      g.label_w, g.label_w + g.cell_w * static_cast<double>(cols.size()), even_y, even_y);
  svg +=
      color_bar(g.label_w, bars_top + bars_h + 8, std::min(160.0, g.cell_w * static_cast<double>(cols.size())), style);
  return svg + "</svg>";
}

std::string jsd_figure(const RunAnalysis& run, const LayerAnalysis& a) {
  Grid g = grid_for(run.domains, run.domains.size());
  g.cell_w = std::clamp(180.0 / static_cast<double>(run.domains.size()), 9.0, 38.0);
  g.cell_h = std::min(g.cell_h, g.cell_w);
  HeatmapStyle style{&kOranges, std::log(2.0), 3, "JSD"};
  std::vector<std::string> cols;
  for (const std::string& d : run.domains) cols.push_back(short_label(d).substr(0, g.cell_w >= 30 ? 5 : 2));
  const double width = g.label_w + g.cell_w * static_cast<double>(cols.size()) + 12;
  const double height = g.top + g.cell_h * static_cast<double>(run.domains.size()) + 30;
  std::string svg = fmt::format(
      "<svg class=\"heat\" viewBox=\"0 0 {0:.0f} {1:.0f}\" width=\"{0:.0f}\" height=\"{1:.0f}\" "
      "role=\"img\" aria-label=\"JSD between domains, layer {2}\">",
      width, height, a.layer);
  svg += heatmap_cells(a.routing.jsd, run.domains, cols, g, style);
  svg += color_bar(g.label_w, height - 26, std::min(140.0, g.cell_w * static_cast<double>(cols.size())), style);
  return svg + "</svg>";
}

// ---- the metrics log as series --------------------------------------------------------------------------------------

// Train series (faint raw + smoothed) and, when the log has them, eval points (dashed with markers).
void add_series(std::vector<Series>& out, const std::string& label, const std::string& color, const MetricsLog& log,
                const std::string& key, bool with_eval, bool smoothed) {
  const MetricsLog::Points none;
  auto find = [&](const std::map<std::string, MetricsLog::Points>& series) -> const MetricsLog::Points& {
    auto it = series.find(key);
    return it == series.end() ? none : it->second;
  };
  const MetricsLog::Points& pts = find(log.train);
  if (!pts.empty()) {
    if (smoothed && pts.size() > 30) {
      out.push_back({label + " (raw)", color, downsample(pts, 300), false, false, true});
      out.push_back({label, color, downsample(smooth(pts), 300)});
    } else {
      out.push_back({label, color, downsample(pts, 300)});
    }
  }
  if (with_eval && !find(log.eval).empty()) out.push_back({label + " (held out)", color, find(log.eval), true, true});
}

std::string figure(const std::string& svg, const std::string& caption = "") {
  if (svg.empty()) return "";
  return "<figure>" + svg + (caption.empty() ? "" : "<figcaption>" + caption + "</figcaption>") + "</figure>";
}

std::string chip(const std::string& color) { return "<span class=\"chip\" style=\"background:" + color + "\"></span>"; }

}  // namespace

// ==== the page =======================================================================================================

namespace {

const char* kStyle = R"CSS(
:root{--fg:#1d2430;--muted:#5b6472;--line:#e3e7ee;--bg:#f5f6f8;--card:#fff;--accent:#2f6fdf}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:var(--fg);background:var(--bg)}
header{background:#1d2430;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:21px;font-weight:600}
header .sub{color:#b8c0cc;margin-top:4px;font-size:13px}
header .runs{margin-top:10px;display:flex;flex-wrap:wrap;gap:8px 18px;font-size:13px}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid var(--line);font-size:13px}
nav a{color:var(--accent);text-decoration:none;margin-right:16px}
main{padding:4px 32px 40px;max-width:1500px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 20px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 2px}
h3{font-size:14px;margin:14px 0 6px}
p.note{color:var(--muted);margin:0 0 12px;font-size:13px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 8px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}
th{font-weight:600;color:var(--muted);font-size:12px;vertical-align:bottom;white-space:normal;max-width:110px}
td.l,th.l{text-align:left}
tr.group td{border-top:2px solid var(--line)}
td.best{font-weight:700;color:#0b7a43}
td.diff{background:#fff7e0}
.chip{display:inline-block;width:11px;height:11px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:6px 14px}
.scroll{overflow-x:auto}
.cols{display:grid;gap:10px 24px;align-items:start}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px;margin:0 0 8px}
figure{margin:0}
figcaption{font-size:12px;color:var(--muted);margin-top:2px}
svg text{font-family:inherit}
svg .ct{font-size:12.5px;font-weight:600;fill:#1d2430}
svg .tick{font-size:10px;fill:#5b6472}
svg .cv{font-size:10px}
svg .grid{stroke:#eef0f4;stroke-width:1}
svg .axis{stroke:#c9ced6;stroke-width:1}
.layerrow{border-top:1px solid var(--line);padding-top:8px;margin-top:10px}
.runname{font-weight:600;font-size:13px;margin-bottom:4px}
.trace{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:13px;white-space:pre-wrap;line-height:1.85;
  word-break:break-all;background:#fbfbfc;border:1px solid var(--line);border-radius:6px;padding:6px 8px}
.trace span{border-radius:3px;padding:1px 0}
details{margin-top:8px}
details summary{cursor:pointer;color:var(--accent);font-size:13px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;font-size:13px;margin:6px 0 0}
dt{font-weight:600}
dd{margin:0;color:var(--muted)}
)CSS";

// One row of the summary: a label, a value per run and which direction is better (+1 higher, -1 lower, 0 neither).
struct SummaryColumn {
  std::string title, tip;
  int better;
  std::function<double(const RunAnalysis&)> value;
  int decimals = 3;
};

double layer_mean(const RunAnalysis& run, const std::function<double(const LayerAnalysis&)>& f) {
  std::vector<double> v;
  for (const LayerAnalysis& a : run.layers) v.push_back(f(a));
  return mean_of(v);
}

std::string summary_section(const std::vector<RunAnalysis>& runs) {
  std::vector<SummaryColumn> cols = {
      {"step", "checkpoint step", 0, [](const RunAnalysis& r) { return static_cast<double>(r.step); }, 0},
      {"held-out CE", "mean cross-entropy (nats/token) on the held-out split", -1,
       [](const RunAnalysis& r) { return r.ce; }, 4},
      {"PPL", "exp(CE)", -1, [](const RunAnalysis& r) { return std::exp(r.ce); }, 3},
      {"MI / H(domain)", "how much the chosen expert tells about the domain (mean over MoE layers)", +1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.mi.normalized; });
       }},
      {"mean JSD", "between the domains' mean routing distributions (nats, max ln 2)", +1,
       [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.mean_jsd; }); },
       4},
      {"D_inter / D_total", "share of the routing diversity that lies between domains", +1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.inter_share(); });
       }},
      {"load entropy", "entropy of the expert load / log E (1 = even)", +1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.load.entropy; });
       }},
      {"dead experts", "experts never chosen, summed over layers", -1,
       [](const RunAnalysis& r) {
         double s = 0;
         for (const LayerAnalysis& a : r.layers) s += static_cast<double>(a.routing.load.dead);
         return s;
       },
       0},
      {"output similarity", "mean cosine similarity of expert outputs (1 = identical experts)", -1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.similarity.tokens ? a.similarity.mean : NAN; });
       }},
      {"param. variance", "normalized parameter variance of the expert matrices (0 = equal experts)", +1,
       [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.variance.all; }); }},
      {"dPPL", "router-permutation dPPL (higher = experts less interchangeable)", +1,
       [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.dppl; }); }},
  };
  std::string html =
      "<section id=\"summary\"><h2>Summary</h2><p class=\"note\">Held-out numbers at the analysed "
      "checkpoint; layer metrics are means over the MoE layers. Arrows say which direction means more "
      "specialized (or better); with several runs the best value is <b>bold</b>.</p><div "
      "class=\"scroll\"><table><tr><th class=\"l\">run</th>";
  for (const SummaryColumn& c : cols)
    html += fmt::format("<th title=\"{}\">{}{}</th>", html_escape(c.tip), html_escape(c.title),
                        c.better > 0   ? " ↑"
                        : c.better < 0 ? " ↓"
                                       : "");
  html += "</tr>";
  std::vector<std::vector<double>> values(cols.size());
  for (size_t c = 0; c < cols.size(); ++c)
    for (const RunAnalysis& r : runs) values[c].push_back(cols[c].value(r));
  for (size_t i = 0; i < runs.size(); ++i) {
    html += "<tr><td class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</td>";
    for (size_t c = 0; c < cols.size(); ++c) {
      double v = values[c][i];
      bool best = runs.size() > 1 && cols[c].better != 0 && std::isfinite(v), tie = true;
      for (double o : values[c]) {
        if (std::isfinite(o) && (cols[c].better > 0 ? o > v : o < v)) best = false;
        if (o != v) tie = false;
      }
      best = best && !tie;
      html += fmt::format("<td{}>{}</td>", best ? " class=\"best\"" : "", num(v, cols[c].decimals));
    }
    html += "</tr>";
  }
  html += "</table></div>";
  // Held-out CE per domain, one row per run.
  std::vector<std::string> domains;
  for (const RunAnalysis& r : runs)
    for (const std::string& d : r.domains)
      if (std::find(domains.begin(), domains.end(), d) == domains.end()) domains.push_back(d);
  html += "<h3>Held-out CE per domain</h3><table><tr><th class=\"l\">run</th>";
  for (const std::string& d : domains) html += "<th>" + html_escape(d) + " ↓</th>";
  html += "</tr>";
  auto ce_of = [&](const RunAnalysis& r, const std::string& d) {
    auto it = std::find(r.domains.begin(), r.domains.end(), d);
    return it == r.domains.end() ? NAN : r.ce_domain[static_cast<size_t>(it - r.domains.begin())];
  };
  for (size_t i = 0; i < runs.size(); ++i) {
    html += "<tr><td class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</td>";
    for (const std::string& d : domains) {
      double v = ce_of(runs[i], d);
      bool best = runs.size() > 1 && std::isfinite(v);
      for (const RunAnalysis& o : runs)
        if (std::isfinite(ce_of(o, d)) && ce_of(o, d) < v) best = false;
      html += fmt::format("<td{}>{}</td>", best ? " class=\"best\"" : "", num(v, 4));
    }
    html += "</tr>";
  }
  return html + "</table></section>";
}

std::string run_legend(const std::vector<RunAnalysis>& runs, const std::string& note = "") {
  std::string html = "<div class=\"legend\">";
  for (size_t i = 0; i < runs.size(); ++i)
    html += "<span>" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</span>";
  if (!note.empty()) html += "<span style=\"color:#5b6472\">" + html_escape(note) + "</span>";
  return html + "</div>";
}

std::string curves_section(const std::vector<RunAnalysis>& runs) {
  struct Curve {
    std::string title, key;
    bool smoothed, has_eval;
  };
  std::vector<Curve> curves = {{"total loss", "loss", true, false},
                               {"cross-entropy (nats/token)", "ce", true, true},
                               {"load-balancing loss L_LB", "lb", true, false},
                               {"router z-loss L_Z", "z", true, false},
                               {"expert-divergence loss L_ED", "ed", true, false},
                               {"mean pairwise JSD (routing)", "routing/mean_jsd", true, true},
                               {"learning rate", "lr", false, false},
                               {"tokens / s", "tokens_per_s", true, false},
                               {"gradient norm", "grad_norm", true, false}};
  if (std::any_of(runs.begin(), runs.end(), [](const RunAnalysis& r) { return r.log.train.count("omoe/removed"); }))
    curves.push_back({"OMoE: share of expert gradient removed", "omoe/removed", false, false});
  std::string charts;
  for (const Curve& c : curves) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i)
      add_series(series, runs[i].name, color_of(kRunColors, i), runs[i].log, c.key, c.has_eval, c.smoothed);
    charts += figure(line_chart(c.title, series, "step"));
  }
  // CE per domain: one chart with a line per domain for one run; one chart per domain with a line per run otherwise.
  std::vector<std::string> domains;
  for (const RunAnalysis& r : runs)
    for (const std::string& d : r.domains)
      if (std::find(domains.begin(), domains.end(), d) == domains.end()) domains.push_back(d);
  std::string domain_charts;
  if (runs.size() == 1) {
    std::vector<Series> series;
    std::string caption;
    for (size_t k = 0; k < domains.size(); ++k) {
      add_series(series, domains[k], color_of(kRunColors, k + 1), runs[0].log, "ce_domain/" + domains[k], true, true);
      caption += "<span style=\"margin-right:12px\">" + chip(color_of(kRunColors, k + 1)) + html_escape(domains[k]) +
                 "</span>";
    }
    domain_charts += figure(line_chart("cross-entropy per domain", series, "step"), caption);
  } else {
    for (const std::string& d : domains) {
      std::vector<Series> series;
      for (size_t i = 0; i < runs.size(); ++i)
        add_series(series, runs[i].name, color_of(kRunColors, i), runs[i].log, "ce_domain/" + d, true, true);
      domain_charts += figure(line_chart("cross-entropy: " + d, series, "step"));
    }
  }
  return "<section id=\"curves\"><h2>Training curves</h2><p class=\"note\">From each run's metrics.jsonl. Loss terms "
         "are before their coefficients and averaged over MoE layers; JSD is between the domains of each batch.</p>" +
         run_legend(runs, "solid: training batches (smoothed; raw faint) · dashed with dots: held-out evaluations") +
         "<div class=\"charts\">" + charts + domain_charts + "</div></section>";
}

std::string by_layer_section(const std::vector<RunAnalysis>& runs) {
  struct Metric {
    std::string title;
    std::function<double(const LayerAnalysis&)> value;
  };
  const std::vector<Metric> metrics = {
      {"MI(domain; expert) / H(domain)", [](const LayerAnalysis& a) { return a.routing.mi.normalized; }},
      {"mean JSD between domains", [](const LayerAnalysis& a) { return a.routing.mean_jsd; }},
      {"D_inter / D_total", [](const LayerAnalysis& a) { return a.routing.inter_share(); }},
      {"load entropy / log E", [](const LayerAnalysis& a) { return a.routing.load.entropy; }},
      {"expert output similarity",
       [](const LayerAnalysis& a) { return a.similarity.tokens ? a.similarity.mean : NAN; }},
      {"normalized parameter variance", [](const LayerAnalysis& a) { return a.variance.all; }},
      {"router-permutation dPPL", [](const LayerAnalysis& a) { return a.dppl; }}};
  std::string charts;
  for (const Metric& m : metrics) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i) {
      Series s{runs[i].name, color_of(kRunColors, i), {}, false, true};
      for (const LayerAnalysis& a : runs[i].layers)
        if (double v = m.value(a); std::isfinite(v)) s.points.emplace_back(static_cast<double>(a.layer), v);
      series.push_back(std::move(s));
    }
    charts += figure(line_chart(m.title, series, "layer", true));
  }
  return "<section id=\"by-layer\"><h2>Specialization by layer</h2><p class=\"note\">Each MoE layer of each run on "
         "held-out data.</p>" +
         run_legend(runs) + "<div class=\"charts\">" + charts + "</div></section>";
}

// The MoE layers analysed in any of the runs, ascending.
std::set<int64_t> analysed_layers(const std::vector<RunAnalysis>& runs) {
  std::set<int64_t> layers;
  for (const RunAnalysis& r : runs)
    for (const LayerAnalysis& a : r.layers) layers.insert(a.layer);
  return layers;
}

std::string layers_section(const std::vector<RunAnalysis>& runs) {
  std::string html =
      "<section id=\"layers\"><h2>Per-layer metrics</h2><p class=\"note\">MI in bits over token slots; JSD and D in "
      "nats; load over top-k slots (max-viol = max load / mean load - 1); output similarity = mean cosine over expert "
      "pairs; NV = normalized parameter variance; dPPL = PPL with a permuted router - PPL.</p><div "
      "class=\"scroll\"><table><tr>"
      "<th class=\"l\">layer</th><th class=\"l\">run</th><th>MI bits</th><th>H(domain)</th><th>MI/H</th><th>mean "
      "JSD</th>"
      "<th>D_inter</th><th>D_total</th><th>D_inter/D_total</th><th>load min…max</th><th>load std</th><th>load H</th>"
      "<th>max-viol</th><th>dead</th><th>out-sim</th><th>NV</th><th>dPPL</th></tr>";
  std::set<int64_t> layer_ids = analysed_layers(runs);
  for (int64_t layer : layer_ids) {
    bool first = true;
    for (size_t i = 0; i < runs.size(); ++i)
      for (const LayerAnalysis& a : runs[i].layers) {
        if (a.layer != layer) continue;
        const moe::LayerSpecialization& r = a.routing;
        html += fmt::format(
            "<tr{}><td class=\"l\">{}</td><td class=\"l\">{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td><td>{}…{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td></tr>",
            first ? " class=\"group\"" : "", first ? std::to_string(layer) : "", chip(color_of(kRunColors, i)),
            html_escape(runs[i].name), num(r.mi.bits), num(r.mi.domain_entropy_bits), num(r.mi.normalized),
            num(r.mean_jsd, 4), num(r.divergence.inter, 4), num(r.divergence.total, 4), num(r.inter_share()),
            r.load.min, r.load.max, num(r.load.std, 1), num(r.load.entropy), num(r.load.max_violation), r.load.dead,
            a.similarity.tokens ? num(a.similarity.mean) : "–", num(a.variance.all), num(a.dppl));
        first = false;
      }
  }
  return html + "</table></div></section>";
}

std::string columns_style(size_t n) {
  return fmt::format(" style=\"grid-template-columns:repeat({},minmax(0,max-content))\"", n);
}

std::string heatmaps_section(const std::vector<RunAnalysis>& runs) {
  std::string html =
      "<section id=\"heatmaps\"><h2>Expert usage per domain</h2><p class=\"note\">Blue: share of each "
      "domain's top-k slots that go to each expert (rows sum to 1; a common color scale per layer). Bars: "
      "the experts' overall load (dashed: even load; red: dead expert). Orange: JSD between the domains' "
      "mean routing distributions (scale 0 … ln 2).</p>";
  std::set<int64_t> layer_ids = analysed_layers(runs);
  for (int64_t layer : layer_ids) {
    double vmax = 0;
    for (const RunAnalysis& r : runs)
      for (const LayerAnalysis& a : r.layers)
        if (a.layer == layer)
          for (const auto& row : a.routing.usage)
            for (double v : row) vmax = std::max(vmax, v);
    html += fmt::format("<div class=\"layerrow\"><h3>Layer {}</h3><div class=\"cols\"{}>", layer,
                        columns_style(runs.size()));
    for (size_t i = 0; i < runs.size(); ++i) {
      html += "<div><div class=\"runname\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</div>";
      for (const LayerAnalysis& a : runs[i].layers)
        if (a.layer == layer)
          html += "<div style=\"display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap\">" +
                  figure(usage_figure(runs[i], a, std::max(vmax, 1e-9)), "usage: domains × experts") +
                  figure(jsd_figure(runs[i], a), fmt::format("JSD · mean {}", num(a.routing.mean_jsd, 4))) + "</div>";
      html += "</div>";
    }
    html += "</div></div>";
  }
  return html + "</section>";
}

// A token's text for a tooltip: control characters as escapes, valid UTF-8.
std::string visible_piece(const std::string& s) {
  std::string out;
  for (char c : valid_utf8(s)) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\t')
      out += "\\t";
    else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
    else
      out += c;
  }
  return out;
}

// Control characters made visible; the rest escaped.
std::string visible_text(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\n')
      out += "↵\n";
    else if (c == '\t')
      out += "⇥";
    else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      out += "·";
    else
      out += c;
  }
  return html_escape(out);
}

std::string trace_block(const RunAnalysis& run, size_t l) {
  const RoutingTrace& t = *run.trace;
  std::string html = "<div class=\"trace\">";
  // Tokens are grouped until their bytes are valid UTF-8 (a byte tokenizer splits multi-byte characters).
  size_t i = 0;
  while (i < t.pieces.size()) {
    size_t j = i;
    std::string bytes;
    do bytes += t.pieces[j++];
    while (!is_valid_utf8(bytes) && j < t.pieces.size() && j - i < 4);
    std::vector<std::string> colors;
    std::string tip;
    for (size_t k = i; k < j; ++k) {
      const std::vector<int32_t>& e = t.experts[l][k];
      colors.push_back(expert_color(e.empty() ? 0 : e[0], run.experts));
      tip += fmt::format("{}token {} \"{}\" →", k > i ? "\n" : "", k, visible_piece(t.pieces[k]));
      for (size_t c = 0; c < e.size(); ++c) tip += fmt::format(" e{} ({:.0f}%)", e[c], 100 * t.probs[l][k][c]);
    }
    std::string background = colors[0];
    if (colors.size() > 1) {
      background = "linear-gradient(90deg";
      for (size_t c = 0; c < colors.size(); ++c)
        background +=
            fmt::format(",{} {:.0f}% {:.0f}%", colors[c], 100.0 * c / colors.size(), 100.0 * (c + 1) / colors.size());
      background += ")";
    }
    html += fmt::format("<span style=\"background:{}\" title=\"{}\">{}</span>", background, html_escape(tip),
                        visible_text(bytes));
    i = j;
  }
  return html + "</div>";
}

std::string trace_section(const std::vector<RunAnalysis>& runs) {
  bool any = false;
  int64_t experts = 0;
  size_t max_layers = 0;
  for (const RunAnalysis& r : runs)
    if (r.trace)
      any = true, experts = std::max(experts, r.experts), max_layers = std::max(max_layers, r.trace->layers.size());
  if (!any) return "";
  std::string legend = "<div class=\"legend\">";
  for (int64_t e = 0; e < experts; ++e)
    legend += "<span>" + chip(expert_color(e, experts)) + fmt::format("expert {}", e) + "</span>";
  legend += "</div>";
  std::string html =
      "<section id=\"trace\"><h2>Routing trace</h2><p class=\"note\">Each token colored by the expert "
      "the router ranked first (its top-1), per MoE layer; hover a token for its top-k experts and their "
      "probabilities. Characters split over several byte tokens show one stripe per token.</p>" +
      legend;
  for (size_t l = 0; l < max_layers; ++l) {
    html += fmt::format("<div class=\"layerrow\"><div class=\"cols\"{}>",
                        fmt::format(" style=\"grid-template-columns:repeat({},minmax(0,1fr))\"", runs.size()));
    for (size_t i = 0; i < runs.size(); ++i) {
      html += "<div>";
      if (runs[i].trace && l < runs[i].trace->layers.size())
        html += "<div class=\"runname\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) +
                fmt::format(" · layer {}</div>", runs[i].trace->layers[l]) + trace_block(runs[i], l);
      html += "</div>";
    }
    html += "</div></div>";
  }
  return html + "</section>";
}

std::string value_text(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

std::string config_section(const std::vector<RunAnalysis>& runs) {
  std::set<std::string> keys;
  for (const RunAnalysis& r : runs)
    for (auto it = r.config.begin(); it != r.config.end(); ++it) keys.insert(it.key());
  const std::vector<std::string> headline = {"preset",      "model.d_model",    "model.n_layers", "model.n_experts",
                                             "model.top_k", "moe.alpha",        "moe.beta",       "optim.name",
                                             "train.steps", "train.batch_size", "data.corpus"};
  auto row = [&](const std::string& key, bool mark) {
    std::set<std::string> distinct;
    std::string cells;
    for (const RunAnalysis& r : runs) {
      std::string v = r.config.contains(key) ? value_text(r.config[key]) : "–";
      distinct.insert(v);
      cells += "<td class=\"l\">" + html_escape(v) + "</td>";
    }
    const bool differs = mark && runs.size() > 1 && distinct.size() > 1;
    if (differs) {
      size_t pos = 0;
      while ((pos = cells.find("<td class=\"l\">", pos)) != std::string::npos) {
        cells.replace(pos, 14, "<td class=\"l diff\">");
        pos += 19;
      }
    }
    return std::pair{"<tr><td class=\"l\">" + html_escape(key) + "</td>" + cells + "</tr>", differs};
  };
  std::string head = "<tr><th class=\"l\">option</th>";
  for (size_t i = 0; i < runs.size(); ++i)
    head += "<th class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</th>";
  head += "</tr>";
  std::string main_rows, all_rows;
  for (const std::string& k : keys) {
    auto [html, differs] = row(k, true);
    if (differs || std::find(headline.begin(), headline.end(), k) != headline.end()) main_rows += html;
    all_rows += html;
  }
  std::string files =
      "<table><tr><th class=\"l\">run</th><th class=\"l\">folder</th><th class=\"l\">checkpoint</th>"
      "<th class=\"l\">held-out data</th><th class=\"l\">tokenizer</th></tr>";
  for (size_t i = 0; i < runs.size(); ++i)
    files += "<tr><td class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) +
             "</td><td class=\"l\">" + html_escape(runs[i].run_dir.string()) + "</td><td class=\"l\">" +
             html_escape(runs[i].checkpoint.string()) + fmt::format(" (step {})", runs[i].step) +
             "</td><td class=\"l\">" + html_escape(fmt::format("{} · {} tokens", runs[i].selection, runs[i].tokens)) +
             "</td><td class=\"l\">" + html_escape(runs[i].tokenizer) + "</td></tr>";
  files += "</table>";
  return "<section id=\"config\"><h2>Runs and configuration</h2><p class=\"note\">Headline options" +
         std::string(runs.size() > 1 ? "; options that differ between the runs are highlighted" : "") +
         ".</p><div class=\"scroll\">" + files + "</div><h3>Options</h3><div class=\"scroll\"><table>" + head +
         main_rows + "</table></div><details><summary>every option</summary><div class=\"scroll\"><table>" + head +
         all_rows + "</table></div></details></section>";
}

const char* kGlossary = R"HTML(<section id="glossary"><h2>What the numbers mean</h2><dl>
<dt>usage freq[j][e]</dt><dd>share of domain j's token slots (each token has top-k slots) that the layer routes to expert e.</dd>
<dt>load</dt><dd>token slots per expert over all domains: min, max, std; entropy / log E (1 = perfectly even); max-violation = max / mean - 1; dead = experts never chosen.</dd>
<dt>MI(domain; expert)</dt><dd>mutual information between a slot's domain and its expert, in bits; divided by H(domain) it is 0 when experts ignore the domain and 1 when the expert determines it.</dd>
<dt>JSD matrix</dt><dd>Jensen-Shannon divergence between the domains' mean dense router distributions (nats, 0 … ln 2).</dd>
<dt>D_inter / D_total</dt><dd>the routing diversity across sequences (D_total) split into between-domain (D_inter) and within-domain parts; the share between domains.</dd>
<dt>output similarity</dt><dd>held-out tokens run through every expert: mean cosine similarity of the outputs over expert pairs (1 = identical experts).</dd>
<dt>NV</dt><dd>normalized parameter variance of the expert matrices: 0 when all experts are equal, about (E-1)/E for independent ones.</dd>
<dt>dPPL</dt><dd>perplexity with the layer's router rows permuted (tokens reach the wrong experts) minus the perplexity; higher = experts less interchangeable.</dd>
</dl></section>)HTML";

}  // namespace

std::string render_report(const std::vector<RunAnalysis>& runs, const ReportOptions& options) {
  if (runs.empty()) throw std::invalid_argument("render_report: no runs");
  std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M", std::localtime(&now));
  std::string runs_line;
  for (size_t i = 0; i < runs.size(); ++i)
    runs_line += "<span>" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) +
                 fmt::format(" · step {} · {} MoE layers × {} experts (top-{}) · {} domains</span>", runs[i].step,
                             runs[i].layers.size(), runs[i].experts, runs[i].top_k, runs[i].domains.size());
  bool traced = std::any_of(runs.begin(), runs.end(), [](const RunAnalysis& r) { return r.trace.has_value(); });
  std::string html =
      "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
      "content=\"width=device-width,initial-scale=1\"><title>" +
      html_escape(options.title) + "</title><style>" + kStyle + "</style></head><body>";
  html += "<header><h1>" + html_escape(options.title) + "</h1><div class=\"sub\">" +
          html_escape(
              fmt::format("{} run{} · generated {} by moe-analyze", runs.size(), runs.size() > 1 ? "s" : "", stamp)) +
          "</div><div class=\"runs\">" + runs_line + "</div></header>";
  html +=
      "<nav><a href=\"#summary\">Summary</a><a href=\"#curves\">Training curves</a><a href=\"#by-layer\">By layer</a>"
      "<a href=\"#layers\">Per-layer table</a><a href=\"#heatmaps\">Heatmaps</a>" +
      std::string(traced ? "<a href=\"#trace\">Routing trace</a>" : "") +
      "<a href=\"#config\">Config</a><a href=\"#glossary\">Glossary</a></nav><main>";
  html += summary_section(runs) + curves_section(runs) + by_layer_section(runs) + heatmaps_section(runs) +
          layers_section(runs) + trace_section(runs) + config_section(runs) + kGlossary;
  return html + "</main></body></html>\n";
}

}  // namespace moelab::apps
