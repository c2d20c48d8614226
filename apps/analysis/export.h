#pragma once
// The analysis written down: every metric of each run as JSON and CSV files, and a few lines per run for the terminal.
//   write_analysis_files(runs)     -> analysis.json, <run>/usage.csv, <run>/jsd.csv, <run>/layers.csv
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "apps/analysis/run_analysis.h"

namespace moelab::apps {

nlohmann::json analysis_json(const RunAnalysis& run);  // every metric (not the metrics log); NaN -> null
// <out>/analysis.json {"runs": [...]}, and per run <out>/<name>/usage.csv, jsd.csv, layers.csv. Returns the files.
std::vector<std::filesystem::path> write_analysis_files(const std::vector<RunAnalysis>& runs,
                                                        const std::filesystem::path& out_dir);
// A few lines per run for the terminal.
std::string terminal_summary(const std::vector<RunAnalysis>& runs);

}  // namespace moelab::apps
