#pragma once
// moe-train's metrics log (metrics.jsonl) read back as numeric series: the report draws its training curves from it.
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace moelab::apps {

// The metrics log of moe-train (metrics.jsonl) as series of (step, value). Every number of a line becomes a series
// named by its path: "loss", "ce", "lb", "lr", "tokens_per_s", "ce_domain/<domain>", ...; a list (one entry per MoE
// layer) is averaged over its entries: "routing/mean_jsd", "omoe/removed". Evaluation lines {step, eval: {...}} fill
// `eval` the same way ("ce", "ce_domain/<domain>", "routing/mean_jsd").
struct MetricsLog {
  using Points = std::vector<std::pair<double, double>>;
  std::map<std::string, Points> train, eval;
  int64_t train_lines = 0, eval_lines = 0;
};
// Throws naming the file (missing) or file:line (not a JSON object, no "step"). A last line without its newline that
// does not parse is a write cut short (a killed run, a full disk): it is left out, not an error.
MetricsLog read_metrics_log(const std::filesystem::path& file);

}  // namespace moelab::apps
