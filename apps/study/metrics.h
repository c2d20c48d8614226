#pragma once
// The numbers a study compares, per run: one function turns a RunAnalysis into named scalars. Everything downstream
// (study_run.json, the per-condition means and paired differences, results.json/.csv, the report's tables) takes
// whatever names it returns, so a new metric is one line there.
#include <string>
#include <utility>
#include <vector>

#include "apps/analysis/run_analysis.h"

namespace moelab::apps {

// Named scalars of one analysed run, in a fixed order (NaN: not a number, e.g. a domain without tokens):
//   ce, ce/<domain>                      held-out CE (nats/token), all domains and per domain
//   then per MoE layer averaged over the layers (absent for a dense run, which has no layers):
//   mean_jsd, mi_normalized, mi_bits, inter_share (D_inter / D_total), d_total, load_entropy, max_violation,
//   output_similarity (cosine mean), param_variance (all matrices), dppl, dppl/<domain>
//   dead_experts                          summed over the layers
//   layer<b>/<name>                       the same per MoE layer (b = block index)
std::vector<std::pair<std::string, double>> run_metrics(const RunAnalysis& run);

}  // namespace moelab::apps
