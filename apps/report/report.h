#pragma once
// The HTML report of moe-analyze: one self-contained page (inline SVG and CSS, no scripts, nothing fetched from the
// network) that shows one run or compares several side by side. The figures are svg.h's; the stylesheet and the
// glossary are report.css and glossary.html, compiled in as text at build time. docs/analysis.md explains every number.
//   render_report(runs)            -> report.html text
#include <string>
#include <vector>

#include "apps/analysis/run_analysis.h"

namespace moelab::apps {

struct ReportOptions {
  std::string title = "moelab: expert specialization";
};
// The HTML page: runs and config, summary table, training curves, per-layer tables, heatmaps (usage per domain,
// JSD matrix, expert load), routing traces. Several runs are compared side by side. All text is escaped.
std::string render_report(const std::vector<RunAnalysis>& runs, const ReportOptions& options = {});

}  // namespace moelab::apps
