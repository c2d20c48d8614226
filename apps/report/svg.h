#pragma once
// The report's figures as inline SVG text: line charts with readable ticks (training curves from the metrics log,
// metrics against the layer index) and heatmaps (domain x expert usage with the experts' load underneath, the
// domain x domain JSD matrix); and the colors of runs and experts, which the page's legends share.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "apps/analysis/metrics_log.h"
#include "apps/analysis/run_analysis.h"

namespace moelab::apps {

extern const std::vector<std::string> kRunColors;  // run i is drawn in color_of(kRunColors, i)
std::string color_of(const std::vector<std::string>& palette, size_t i);
std::string expert_color(int64_t e, int64_t experts);  // fixed pastels up to 12 experts, hues beyond

struct Series {
  std::string label, color;
  std::vector<std::pair<double, double>> points;  // (x, y), finite
  bool dashed = false, markers = false, faint = false;
};

// One line chart: axes, grid, ticks, one path per series. Empty when no series has a point.
std::string line_chart(const std::string& title, const std::vector<Series>& series, const std::string& x_label,
                       bool integer_x = false);

// Train series (faint raw + smoothed) and, when the log has them, eval points (dashed with markers).
void add_series(std::vector<Series>& out, const std::string& label, const std::string& color, const MetricsLog& log,
                const std::string& key, bool with_eval, bool smoothed);

// Domain x expert usage, with the experts' overall load as bars underneath (dashed line: an even load).
std::string usage_figure(const RunAnalysis& run, const LayerAnalysis& a, double vmax);
std::string jsd_figure(const RunAnalysis& run, const LayerAnalysis& a);  // the domain x domain JSD matrix

// One bar per group (a study's condition): the mean, an error bar of +-std, and each seed's value as a dot.
struct Bar {
  std::string label, color;
  double mean = 0, std = 0;    // std NaN or 0: no error bar
  std::vector<double> values;  // each seed's value (finite)
};
// The y axis starts at 0 unless the values lie far from it (then it says so). Empty when no bar has a finite mean.
std::string bar_chart(const std::string& title, const std::vector<Bar>& bars);

}  // namespace moelab::apps
