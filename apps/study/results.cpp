#include "apps/study/results.h"

#include <fmt/format.h>

#include <algorithm>
#include <fstream>

#include "data/file_io.h"
#include "engine/error.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

Summary summarize(const std::vector<double>& values) {
  Summary s;
  double sum = 0;
  for (double v : values)
    if (std::isfinite(v)) sum += v, ++s.n;
  if (s.n == 0) return s;
  s.mean = sum / static_cast<double>(s.n);
  if (s.n < 2) return s;
  double squares = 0;
  for (double v : values)
    if (std::isfinite(v)) squares += (v - s.mean) * (v - s.mean);
  s.std = std::sqrt(squares / static_cast<double>(s.n - 1));
  return s;
}

PairedDifference paired_difference(const std::map<uint64_t, double>& values,
                                   const std::map<uint64_t, double>& reference) {
  PairedDifference p;
  std::vector<double> diffs;
  for (const auto& [seed, v] : values) {
    auto r = reference.find(seed);
    if (r == reference.end() || !std::isfinite(v) || !std::isfinite(r->second)) continue;
    const double d = v - r->second;
    diffs.push_back(d);
    p.lower += d<0, p.higher += d> 0;
  }
  p.diff = summarize(diffs);
  return p;
}

std::string direction_text(const PairedDifference& d) {
  const int64_t equal = d.diff.n - d.lower - d.higher;
  std::vector<std::pair<int64_t, const char*>> parts;
  for (auto part : {std::pair{d.lower, "lower"}, {d.higher, "higher"}, {equal, "equal"}})
    if (part.first > 0) parts.push_back(part);
  if (parts.size() == 1) return fmt::format("{}/{} {}", parts[0].first, d.diff.n, parts[0].second);
  std::string text;
  for (const auto& [count, word] : parts) text += fmt::format("{}{} {}", text.empty() ? "" : ", ", count, word);
  return text;
}

const MetricResult* ConditionResult::metric(const std::string& wanted) const {
  for (const MetricResult& m : metrics)
    if (m.name == wanted) return &m;
  return nullptr;
}

StudyResults aggregate(const Study& study, const std::vector<StudyRunResult>& runs) {
  StudyResults out;
  out.runs = runs;
  out.expected_runs = static_cast<int64_t>(study.conditions.size() * study.seeds.size());
  for (const StudyCondition* condition : study.table_conditions()) {
    ConditionResult c;
    c.name = condition->name;
    for (const StudyRunResult& r : runs) {
      if (r.condition != c.name) continue;
      c.seeds.push_back(r.seed);
      if (c.sequences_per_step == 0) {
        c.domains = r.domains, c.sequences_per_step = r.sequences_per_step;
        if (!r.domains.empty())
          c.sequences_per_domain = static_cast<double>(r.sequences_per_step) / static_cast<double>(r.domains.size());
      }
      for (const auto& [name, value] : r.metrics) {
        auto m =
            std::find_if(c.metrics.begin(), c.metrics.end(), [&](const MetricResult& x) { return x.name == name; });
        if (m == c.metrics.end()) m = c.metrics.insert(c.metrics.end(), MetricResult{name, {}, {}, {}});
        m->values[r.seed] = value;
      }
    }
    for (MetricResult& m : c.metrics) {
      std::vector<double> values;
      for (const auto& [seed, v] : m.values) values.push_back(v);
      m.summary = summarize(values);
    }
    out.conditions.push_back(std::move(c));
  }
  // Paired differences, once every condition's values are in.
  const auto reference = std::find_if(out.conditions.begin(), out.conditions.end(),
                                      [&](const ConditionResult& c) { return c.name == study.reference; });
  for (ConditionResult& c : out.conditions)
    for (MetricResult& m : c.metrics)
      if (reference != out.conditions.end())
        if (const MetricResult* r = reference->metric(m.name)) m.vs_reference = paired_difference(m.values, r->values);
  return out;
}

namespace {

ordered_json number(double v) { return std::isfinite(v) ? ordered_json(v) : ordered_json(nullptr); }

ordered_json summary_json(const Summary& s) { return {{"mean", number(s.mean)}, {"std", number(s.std)}, {"n", s.n}}; }

std::string csv_number(double v) { return std::isfinite(v) ? fmt::format("{}", v) : ""; }

// A CSV field: quoted when it holds a comma, a quote or a line break.
std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

}  // namespace

ordered_json results_json(const Study& study, const StudyResults& results) {
  ordered_json conditions = ordered_json::array();
  for (const StudyCondition& c : study.conditions)
    conditions.push_back({{"name", c.name}, {"options", c.options}, {"table", c.table}, {"needs", c.needs}});
  ordered_json j;
  j["study"] = {{"name", study.name},
                {"description", study.description},
                {"file", study.file.string()},
                {"preset", study.preset},
                {"seeds", study.seeds},
                {"reference", study.reference},
                {"out_dir", study.out_dir.string()},
                {"eval_batches", study.eval_batches},
                {"permutations", study.permutations},
                {"similarity_tokens", study.similarity_tokens},
                {"train", study.train},
                {"conditions", conditions}};
  j["runs_finished"] = results.runs.size();
  j["runs_expected"] = results.expected_runs;
  j["conditions"] = ordered_json::array();
  for (const ConditionResult& c : results.conditions) {
    ordered_json metrics = ordered_json::object();
    for (const MetricResult& m : c.metrics) {
      ordered_json values = ordered_json::object();
      for (const auto& [seed, v] : m.values) values[std::to_string(seed)] = number(v);
      ordered_json entry = summary_json(m.summary);
      entry["values"] = values;
      entry["vs_reference"] = summary_json(m.vs_reference.diff);
      entry["vs_reference"]["lower"] = m.vs_reference.lower;
      entry["vs_reference"]["higher"] = m.vs_reference.higher;
      metrics[m.name] = entry;
    }
    j["conditions"].push_back({{"name", c.name},
                               {"seeds", c.seeds},
                               {"domains", c.domains},
                               {"sequences_per_step", c.sequences_per_step},
                               {"sequences_per_domain_per_step", number(c.sequences_per_domain)},
                               {"metrics", metrics}});
  }
  j["runs"] = ordered_json::array();
  for (const StudyRunResult& r : results.runs) {
    ordered_json run = to_json(r);
    run.erase("config");  // in each run's study_run.json
    j["runs"].push_back(run);
  }
  return j;
}

std::string results_csv(const StudyResults& results) {
  std::string csv = "condition,metric,mean,std,n,diff_mean,diff_std,diff_n,diff_lower,diff_higher\n";
  for (const ConditionResult& c : results.conditions)
    for (const MetricResult& m : c.metrics) {
      const PairedDifference& d = m.vs_reference;
      csv += fmt::format("{},{},{},{},{},{},{},{},{},{}\n", csv_field(c.name), csv_field(m.name),
                         csv_number(m.summary.mean), csv_number(m.summary.std), m.summary.n, csv_number(d.diff.mean),
                         csv_number(d.diff.std), d.diff.n, d.lower, d.higher);
    }
  return csv;
}

std::vector<fs::path> write_results(const Study& study, const StudyResults& results) {
  fs::create_directories(study.out_dir);
  const std::vector<std::pair<fs::path, std::string>> files = {
      {study.out_dir / "results.json", results_json(study, results).dump(1) + "\n"},
      {study.out_dir / "results.csv", results_csv(results)},
      {study.out_dir / "report.html", render_study_report(study, results)}};
  std::vector<fs::path> written;
  for (const auto& [path, text] : files) {
    data::write_file_atomic(path, [&](std::ostream& out) { out << text; });
    written.push_back(path);
  }
  return written;
}

}  // namespace moelab::apps
