#pragma once
// A study's results: per table condition and metric the mean, sample standard deviation and n over its seeds, and the
// paired difference against the reference condition over the seeds both have; written as results.json, results.csv
// (long format) and report.html.
//   aggregate(study, finished runs)  -> StudyResults
//   write_results(study, results)    -> <out>/results.json, results.csv, report.html
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "apps/study/runner.h"
#include "apps/study/study.h"

namespace moelab::apps {

struct Summary {
  double mean = NAN, std = NAN;  // std: sample standard deviation (n - 1); NaN when n < 2
  int64_t n = 0;                 // finite values
};
Summary summarize(const std::vector<double>& values);  // non-finite values are left out

struct PairedDifference {
  Summary diff;                   // of condition - reference, per seed both have as a number
  int64_t lower = 0, higher = 0;  // seeds where the condition is below / above the reference
};
// `values` and `reference` by seed.
PairedDifference paired_difference(const std::map<uint64_t, double>& values,
                                   const std::map<uint64_t, double>& reference);
// Which way the seeds went: "5/5 lower", "3 lower, 2 higher", "2/2 equal", "4 higher, 1 equal".
std::string direction_text(const PairedDifference& d);

struct MetricResult {
  std::string name;
  std::map<uint64_t, double> values;  // by seed (NaN kept: not counted)
  Summary summary;
  PairedDifference vs_reference;
};

struct ConditionResult {
  std::string name;
  std::vector<uint64_t> seeds;        // of its finished runs
  std::vector<std::string> domains;   // of its first finished run
  int64_t sequences_per_step = 0;     // train.batch_size * train.grad_accum (0: no finished run)
  double sequences_per_domain = NAN;  // sequences_per_step / number of domains: the mean size of an ED group
  std::vector<MetricResult> metrics;  // every metric its runs have, in run_metrics' order
  const MetricResult* metric(const std::string& name) const;  // null when absent
};

struct StudyResults {
  std::vector<ConditionResult> conditions;  // the table conditions, in file order
  std::vector<StudyRunResult> runs;         // every finished run (table = false ones too)
  int64_t expected_runs = 0;                // conditions x seeds
};

// Groups the finished runs by condition (table conditions only) and computes every summary.
StudyResults aggregate(const Study& study, const std::vector<StudyRunResult>& runs);

// results.json: the study, per condition its summaries, and every run's numbers. NaN is null.
nlohmann::ordered_json results_json(const Study& study, const StudyResults& results);
// results.csv: condition,metric,mean,std,n,diff_mean,diff_std,diff_n,diff_lower,diff_higher (empty: NaN)
std::string results_csv(const StudyResults& results);
// report.html: one self-contained page (study_report.cpp).
std::string render_study_report(const Study& study, const StudyResults& results);

// Writes <out>/results.json, results.csv and report.html; returns their paths.
std::vector<std::filesystem::path> write_results(const Study& study, const StudyResults& results);

}  // namespace moelab::apps
