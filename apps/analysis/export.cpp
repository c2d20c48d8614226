#include "apps/analysis/export.h"

#include <fmt/format.h>

#include <cctype>
#include <cmath>
#include <fstream>
#include <stdexcept>

#include "apps/analysis/text.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

static std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

static json layer_json(const LayerAnalysis& a) {
  json j = {{"layer", a.layer}, {"routing", a.routing}};
  const moe::OutputSimilarity& s = a.similarity;
  if (s.tokens > 0)
    j["output_similarity"] = {{"mean", s.mean},
                              {"pair", s.pair},
                              {"centered_mean", s.centered_mean},
                              {"centered_pair", s.centered_pair},
                              {"cka_mean", s.cka_mean},
                              {"cka_pair", s.cka_pair},
                              {"tokens", s.tokens}};
  j["parameter_variance"] = {
      {"all", a.variance.all}, {"w_gate", a.variance.w_gate}, {"w_up", a.variance.w_up}, {"w_down", a.variance.w_down}};
  j["dppl"] = {{"overall", a.dppl},
               {"domains", a.dppl_domain},
               {"relative_overall", a.relative_dppl},
               {"relative_domains", a.relative_dppl_domain}};
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
        "load_std,load_entropy,max_violation,dead_experts,output_similarity,output_similarity_centered,output_cka,nv,"
        "nv_gate,nv_up,nv_down,dppl,dppl_relative\n";
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
      // An empty field: not computed (no similarity sample, no dPPL).
      auto similarity = [&](double v) { return a.similarity.tokens > 0 ? fmt::format("{:.6g}", v) : std::string(); };
      auto finite = [](double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : std::string(); };
      layers += fmt::format(
          "{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{},{},{:.6g},{:.6g},{:.6g},{},{},{},{},{:.6g},{:.6g},"
          "{:.6g},{:.6g},{},{}\n",
          a.layer, r.mi.bits, r.mi.domain_entropy_bits, r.mi.normalized, r.mean_jsd, r.divergence.inter,
          r.divergence.total, r.inter_share(), r.load.min, r.load.max, r.load.std, r.load.entropy, r.load.max_violation,
          r.load.dead, similarity(a.similarity.mean), similarity(a.similarity.centered_mean),
          similarity(a.similarity.cka_mean), a.variance.all, a.variance.w_gate, a.variance.w_up, a.variance.w_down,
          finite(a.dppl), finite(a.relative_dppl));
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
    out += fmt::format("  {:>5} {:>8} {:>6} {:>7} {:>9} {:>7} {:>8} {:>4} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8}\n",
                       "layer", "MI bits", "MI/H", "JSD", "Dint/Dtot", "load H", "max-viol", "dead", "out-cos",
                       "cen-cos", "CKA", "NV", "dPPL", "rel-dPPL");
    for (const LayerAnalysis& a : run.layers) {
      const moe::LayerSpecialization& r = a.routing;
      auto similarity = [&](double v) { return a.similarity.tokens ? num(v) : std::string("–"); };
      out += fmt::format("  {:>5} {:>8} {:>6} {:>7} {:>9} {:>7} {:>8} {:>4} {:>7} {:>7} {:>6} {:>6} {:>8} {:>8}\n",
                         a.layer, num(r.mi.bits), num(r.mi.normalized), num(r.mean_jsd, 4), num(r.inter_share()),
                         num(r.load.entropy), num(r.load.max_violation), r.load.dead, similarity(a.similarity.mean),
                         similarity(a.similarity.centered_mean), similarity(a.similarity.cka_mean), num(a.variance.all),
                         num(a.dppl), num(a.relative_dppl));
    }
    out +=
        "  NV is meaningful only when the experts share an init (e.g. upcycled from one dense FFN); with independent "
        "random inits it sits at about (E-1)/E.\n";
  }
  return out;
}

}  // namespace moelab::apps
