#include "apps/analysis/metrics_log.h"

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

// Every finite number under `j` as path -> value; a list contributes the mean over its entries of each path that
// every entry has.
static void flatten(const json& j, const std::string& path, std::map<std::string, double>& out) {
  if (j.is_number()) {
    const double v = j.get<double>();
    if (std::isfinite(v)) out[path] = v;
  } else if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it)
      flatten(it.value(), path.empty() ? it.key() : path + "/" + it.key(), out);
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
    if (j.is_discarded() && in.eof()) break;  // the torn last line (getline hit the end before a newline)
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

}  // namespace moelab::apps
