#include "apps/study/metrics.h"

#include <fmt/format.h>

#include <cmath>

namespace moelab::apps {

namespace {

// The scalars of one MoE layer (NaN when not computed: no similarity sample, no dPPL).
std::vector<std::pair<std::string, double>> layer_metrics(const RunAnalysis& run, const LayerAnalysis& a) {
  std::vector<std::pair<std::string, double>> m = {
      {"mean_jsd", a.routing.mean_jsd},
      {"mi_normalized", a.routing.mi.normalized},
      {"mi_bits", a.routing.mi.bits},
      {"inter_share", a.routing.inter_share()},
      {"d_total", a.routing.divergence.total},
      {"load_entropy", a.routing.load.entropy},
      {"max_violation", a.routing.load.max_violation},
      {"output_similarity", a.similarity.tokens > 0 ? a.similarity.mean : NAN},
      {"output_similarity_centered", a.similarity.tokens > 0 ? a.similarity.centered_mean : NAN},
      {"output_cka", a.similarity.tokens > 0 ? a.similarity.cka_mean : NAN},
      {"param_variance", a.variance.all},
      {"dppl", run.permutations > 0 ? a.dppl : NAN},
      {"dppl_relative", run.permutations > 0 ? a.relative_dppl : NAN},
  };
  for (size_t d = 0; d < run.domains.size(); ++d)
    m.emplace_back("dppl/" + run.domains[d], run.permutations > 0 && d < a.dppl_domain.size() ? a.dppl_domain[d] : NAN);
  m.emplace_back("dead_experts", static_cast<double>(a.routing.load.dead));
  return m;
}

}  // namespace

// The one mapping RunAnalysis -> named scalars of a study: add a metric here (a line in layer_metrics for a per-layer
// one, which then also gets its mean over layers) and it reaches study_run.json, results.json/.csv and the report.
std::vector<std::pair<std::string, double>> run_metrics(const RunAnalysis& run) {
  std::vector<std::pair<std::string, double>> out = {{"ce", run.ce}};
  for (size_t d = 0; d < run.domains.size(); ++d)
    out.emplace_back("ce/" + run.domains[d], d < run.ce_domain.size() ? run.ce_domain[d] : NAN);
  if (run.layers.empty()) return out;
  std::vector<std::vector<std::pair<std::string, double>>> layers;
  for (const LayerAnalysis& a : run.layers) layers.push_back(layer_metrics(run, a));
  // Mean over the layers where the metric is a number; dead experts add up.
  for (size_t i = 0; i < layers.front().size(); ++i) {
    const std::string& name = layers.front()[i].first;
    double sum = 0;
    int64_t n = 0;
    for (const auto& layer : layers)
      if (std::isfinite(layer[i].second)) sum += layer[i].second, ++n;
    out.emplace_back(name, n == 0 ? NAN : name == "dead_experts" ? sum : sum / static_cast<double>(n));
  }
  for (size_t l = 0; l < layers.size(); ++l)
    for (const auto& [name, value] : layers[l])
      out.emplace_back(fmt::format("layer{}/{}", run.layers[l].layer, name), value);
  return out;
}

}  // namespace moelab::apps
