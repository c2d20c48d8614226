#include "apps/report/svg.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "apps/analysis/text.h"
#include "apps/report/html.h"

namespace moelab::apps {

// ---- colors ---------------------------------------------------------------------------------------------------------

const std::vector<std::string> kRunColors = {"#2f6fdf", "#e4572e", "#2ca58d", "#8e5fd6",
                                             "#e0a100", "#d1495b", "#00798c", "#6c757d"};

namespace {

const std::vector<std::string> kExpertColors = {"#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                                                "#f7b6d2", "#dbdb8d", "#9edae5", "#d9d9d9", "#fdd49e", "#b3de69"};
const std::vector<std::string> kBlues = {"#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"};
const std::vector<std::string> kOranges = {"#fff5eb", "#fdd0a2", "#fd8d3c", "#d94801", "#7f2704"};

struct Rgb {
  double r, g, b;
};
Rgb parse_hex(const std::string& hex) {
  auto channel = [&](size_t i) { return static_cast<double>(std::stoi(hex.substr(i, 2), nullptr, 16)); };
  return {channel(1), channel(3), channel(5)};
}

// t in [0, 1] along the palette's stops.
Rgb scale_color(const std::vector<std::string>& stops, double t) {
  t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0);
  const double pos = t * static_cast<double>(stops.size() - 1);
  const size_t i = std::min(static_cast<size_t>(pos), stops.size() - 2);
  const double f = pos - static_cast<double>(i);
  Rgb a = parse_hex(stops[i]), b = parse_hex(stops[i + 1]);
  return {a.r + f * (b.r - a.r), a.g + f * (b.g - a.g), a.b + f * (b.b - a.b)};
}
std::string hex(Rgb c) {
  return fmt::format("#{:02x}{:02x}{:02x}", static_cast<int>(std::lround(c.r)), static_cast<int>(std::lround(c.g)),
                     static_cast<int>(std::lround(c.b)));
}
bool is_dark(Rgb c) { return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b < 140; }

}  // namespace

std::string color_of(const std::vector<std::string>& palette, size_t i) { return palette[i % palette.size()]; }

std::string expert_color(int64_t e, int64_t experts) {
  if (experts <= static_cast<int64_t>(kExpertColors.size())) return kExpertColors[static_cast<size_t>(e)];
  return fmt::format("hsl({:.0f},70%,78%)", 360.0 * static_cast<double>(e) / static_cast<double>(experts));
}

// ---- line charts ----------------------------------------------------------------------------------------------------

namespace {

std::vector<double> nice_ticks(double lo, double hi, int target = 5) {
  const double raw = (hi - lo) / target, magnitude = std::pow(10.0, std::floor(std::log10(raw))), f = raw / magnitude;
  const double step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * magnitude;
  std::vector<double> ticks;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    ticks.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return ticks;
}

std::string tick_label(double v, double step) {
  const double a = std::abs(v);
  if (a >= 1e4) return fmt::format("{:.{}f}k", v / 1000, step >= 1000 ? 0 : 1);
  if (a != 0 && a < 1e-3) return fmt::format("{:.0e}", v);
  const int decimals = std::clamp(static_cast<int>(-std::floor(std::log10(step) + 1e-9)), 0, 6);
  return fmt::format("{:.{}f}", v, decimals);
}

// Averages consecutive points into at most `limit` points (keeps charts of long runs small).
std::vector<std::pair<double, double>> downsample(const std::vector<std::pair<double, double>>& pts, size_t limit) {
  if (pts.size() <= limit) return pts;
  std::vector<std::pair<double, double>> out;
  const double per = static_cast<double>(pts.size()) / static_cast<double>(limit);
  for (size_t b = 0; b < limit; ++b) {
    size_t from = static_cast<size_t>(b * per), to = std::min(pts.size(), static_cast<size_t>((b + 1) * per));
    double x = 0, y = 0;
    for (size_t i = from; i < to; ++i) x += pts[i].first, y += pts[i].second;
    out.emplace_back(x / static_cast<double>(to - from), y / static_cast<double>(to - from));
  }
  return out;
}

// Exponential moving average with a window of about n / 25 points (at least 1).
std::vector<std::pair<double, double>> smooth(const std::vector<std::pair<double, double>>& pts) {
  const double window = std::max(1.0, static_cast<double>(pts.size()) / 25.0), a = 1.0 / window;
  std::vector<std::pair<double, double>> out;
  double m = 0;
  for (size_t i = 0; i < pts.size(); ++i) {
    m = i == 0 ? pts[i].second : (1 - a) * m + a * pts[i].second;
    out.emplace_back(pts[i].first, m);
  }
  return out;
}

// A chart's <svg> opening with its title at the top left, and the y axis's grid lines with their labels for
// [y0, y1] across the plot from x = left to x = right (py: a value's y coordinate). Shared by the line and bar charts.
std::string chart_frame(const std::string& title, double width, double height, double left, double right, double y0,
                        double y1, const std::function<double(double)>& py) {
  std::string svg =
      fmt::format("<svg class=\"chart\" viewBox=\"0 0 {0:.0f} {1:.0f}\" width=\"{0:.0f}\" height=\"{1:.0f}\" "
                  "role=\"img\" aria-label=\"{2}\"><text x=\"{3:.0f}\" y=\"17\" class=\"ct\">{2}</text>",
                  width, height, html_escape(title), left - 44);
  const std::vector<double> yt = nice_ticks(y0, y1, 4);
  const double ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
  for (double v : yt)
    svg += fmt::format("<line x1=\"{0:.0f}\" x2=\"{1:.0f}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" class=\"grid\"/>"
                       "<text x=\"{3:.0f}\" y=\"{4:.1f}\" class=\"tick\" text-anchor=\"end\">{5}</text>",
                       left, right, py(v), left - 6, py(v) + 3.5, tick_label(v, ystep));
  return svg;
}

}  // namespace

std::string line_chart(const std::string& title, const std::vector<Series>& series, const std::string& x_label,
                       bool integer_x) {
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const Series& s : series)
    for (auto [x, y] : s.points) x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
  if (!std::isfinite(x0)) return "";
  if (x1 <= x0) x0 -= 1, x1 += 1;
  if (y1 - y0 <= 1e-12 * std::max(1.0, std::abs(y0))) {
    const double pad = std::abs(y0) > 0 ? std::abs(y0) * 0.1 : 0.5;
    y0 -= pad, y1 += pad;
  } else {
    const double pad = (y1 - y0) * 0.06;
    y0 -= pad, y1 += pad;
  }
  constexpr double W = 360, H = 210, L = 52, R = 12, T = 28, B = 34;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  std::string svg = chart_frame(title, W, H, L, W - R, y0, y1, py);
  std::vector<double> xt = nice_ticks(x0, x1, 5);
  if (integer_x) std::erase_if(xt, [](double v) { return std::abs(v - std::round(v)) > 1e-9; });
  const double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1;
  for (double v : xt)
    svg += fmt::format("<line x1=\"{0:.1f}\" x2=\"{0:.1f}\" y1=\"{1}\" y2=\"{2}\" class=\"axis\"/>"
                       "<text x=\"{0:.1f}\" y=\"{3}\" class=\"tick\" text-anchor=\"middle\">{4}</text>",
                       px(v), H - B, H - B + 4, H - B + 15, tick_label(v, std::max(xstep, integer_x ? 1.0 : 0.0)));
  svg += fmt::format("<line x1=\"{0}\" x2=\"{1}\" y1=\"{2}\" y2=\"{2}\" class=\"axis\"/>", L, W - R, H - B);
  svg += fmt::format("<text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{}</text>", (L + W - R) / 2, H - 4,
                     html_escape(x_label));
  for (const Series& s : series) {
    if (s.points.empty()) continue;
    std::string d;
    for (size_t i = 0; i < s.points.size(); ++i)
      d += fmt::format("{}{:.1f},{:.1f}", i ? " L" : "M", px(s.points[i].first), py(s.points[i].second));
    if (s.points.size() > 1 || !s.markers)
      svg += fmt::format("<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{}{}><title>{}</title></path>",
                         d, s.color, s.faint ? 1 : 1.8, s.faint ? " stroke-opacity=\"0.25\"" : "",
                         s.dashed ? " stroke-dasharray=\"5 3\"" : "", html_escape(s.label));
    if (s.markers)
      for (auto [x, y] : s.points)
        svg += fmt::format(
            "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2.8\" fill=\"#fff\" stroke=\"{}\" stroke-width=\"1.5\">"
            "<title>{}: {} at {}</title></circle>",
            px(x), py(y), s.color, html_escape(s.label), num(y, 4), num(x, 0));
  }
  return svg + "</svg>";
}

void add_series(std::vector<Series>& out, const std::string& label, const std::string& color, const MetricsLog& log,
                const std::string& key, bool with_eval, bool smoothed) {
  const MetricsLog::Points none;
  auto find = [&](const std::map<std::string, MetricsLog::Points>& series) -> const MetricsLog::Points& {
    auto it = series.find(key);
    return it == series.end() ? none : it->second;
  };
  const MetricsLog::Points& pts = find(log.train);
  if (!pts.empty()) {
    if (smoothed && pts.size() > 30) {
      out.push_back({label + " (raw)", color, downsample(pts, 300), false, false, true});
      out.push_back({label, color, downsample(smooth(pts), 300)});
    } else {
      out.push_back({label, color, downsample(pts, 300)});
    }
  }
  if (with_eval && !find(log.eval).empty()) out.push_back({label + " (held out)", color, find(log.eval), true, true});
}

// ---- heatmaps -------------------------------------------------------------------------------------------------------

namespace {

struct HeatmapStyle {
  const std::vector<std::string>* palette = &kBlues;
  double vmax = 1;
  int decimals = 2;
  std::string value_name = "share";
};

// Heatmap geometry shared by the usage map and the load bars under it, so their columns line up.
struct Grid {
  double label_w, cell_w, cell_h, top;
};
Grid grid_for(const std::vector<std::string>& rows, size_t columns) {
  size_t longest = 4;
  for (const std::string& r : rows) longest = std::max(longest, std::min<size_t>(r.size(), 16));
  return {8.0 + 6.8 * static_cast<double>(longest), std::clamp(280.0 / static_cast<double>(columns), 9.0, 40.0),
          rows.size() > 10 ? 18.0 : 24.0, 20.0};
}

std::string short_label(const std::string& s) { return s.size() <= 16 ? s : s.substr(0, 15) + "…"; }

// Rows x columns of colored cells, labels left and on top, values written in the cells when they fit.
std::string heatmap_cells(const std::vector<std::vector<double>>& values, const std::vector<std::string>& rows,
                          const std::vector<std::string>& cols, const Grid& g, const HeatmapStyle& style) {
  std::string svg;
  const size_t label_every = g.cell_w >= 16 ? 1 : static_cast<size_t>(std::ceil(16.0 / g.cell_w));
  for (size_t c = 0; c < cols.size(); c += label_every)
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"middle\">{}</text>",
                       g.label_w + (static_cast<double>(c) + 0.5) * g.cell_w, g.top - 6, html_escape(cols[c]));
  for (size_t r = 0; r < rows.size(); ++r) {
    const double y = g.top + static_cast<double>(r) * g.cell_h;
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">{}<title>{}</title></text>",
                       g.label_w - 5, y + g.cell_h / 2 + 3.5, html_escape(short_label(rows[r])), html_escape(rows[r]));
    for (size_t c = 0; c < cols.size(); ++c) {
      const double v = values[r][c];
      Rgb color = scale_color(*style.palette, style.vmax > 0 ? v / style.vmax : 0);
      const double x = g.label_w + static_cast<double>(c) * g.cell_w;
      svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\">"
                         "<title>{} / {}: {} {}</title></rect>",
                         x, y, g.cell_w - 1, g.cell_h - 1, hex(color), html_escape(rows[r]), html_escape(cols[c]),
                         style.value_name, num(v, 4));
      if (g.cell_w >= 30)
        svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"cv\" text-anchor=\"middle\" fill=\"{}\">{}</text>",
                           x + g.cell_w / 2, y + g.cell_h / 2 + 3.5, is_dark(color) ? "#fff" : "#1d2430",
                           fmt::format("{:.{}f}", v, style.decimals));
    }
  }
  return svg;
}

// Color bar from 0 to vmax under a heatmap.
std::string color_bar(double x, double y, double width, const HeatmapStyle& style) {
  std::string svg;
  constexpr int steps = 24;
  for (int i = 0; i < steps; ++i)
    svg +=
        fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.2f}\" height=\"7\" fill=\"{}\"/>",
                    x + width * i / steps, y, width / steps + 0.3, hex(scale_color(*style.palette, (i + 0.5) / steps)));
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\">0</text>", x, y + 18);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">{}</text>", x + width, y + 18,
                     num(style.vmax, 3));
  return svg;
}

}  // namespace

std::string usage_figure(const RunAnalysis& run, const LayerAnalysis& a, double vmax) {
  std::vector<std::string> cols;
  for (int64_t e = 0; e < run.experts; ++e) cols.push_back(std::to_string(e));
  Grid g = grid_for(run.domains, cols.size());
  HeatmapStyle style{&kBlues, vmax, 2, "share of slots"};
  const double map_h = g.top + g.cell_h * static_cast<double>(run.domains.size());
  const double bars_top = map_h + 10, bars_h = 42, width = g.label_w + g.cell_w * static_cast<double>(cols.size()) + 8;
  const double height = bars_top + bars_h + 34;
  std::string svg =
      fmt::format("<svg class=\"heat\" viewBox=\"0 0 {0:.0f} {1:.0f}\" width=\"{0:.0f}\" height=\"{1:.0f}\" "
                  "role=\"img\" aria-label=\"expert usage per domain, layer {2}\">",
                  width, height, a.layer);
  svg += heatmap_cells(a.routing.usage, run.domains, cols, g, style);
  // Load bars: share of all slots per expert.
  const moe::LoadStats& load = a.routing.load;
  double total = 0, top = 0;
  for (int64_t c : load.slots) total += static_cast<double>(c);
  for (int64_t c : load.slots) top = std::max(top, total > 0 ? static_cast<double>(c) / total : 0.0);
  const double even = cols.empty() ? 0 : 1.0 / static_cast<double>(cols.size()), scale = std::max(top, even * 1.5);
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">load</text>", g.label_w - 5,
                     bars_top + bars_h - 2);
  for (size_t e = 0; e < load.slots.size(); ++e) {
    const double share = total > 0 ? static_cast<double>(load.slots[e]) / total : 0, h = bars_h * share / scale;
    const double x = g.label_w + static_cast<double>(e) * g.cell_w;
    svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\">"
                       "<title>expert {}: {} slots ({:.1f}%)</title></rect>",
                       x + 1, bars_top + bars_h - h, std::max(1.0, g.cell_w - 3), h,
                       load.slots[e] == 0 ? "#d1495b" : "#7b8794", e, load.slots[e], 100 * share);
  }
  const double even_y = bars_top + bars_h - bars_h * even / scale;
  svg += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#1d2430\" "
                     "stroke-dasharray=\"3 3\" stroke-width=\"1\"/>",
                     g.label_w, g.label_w + g.cell_w * static_cast<double>(cols.size()), even_y, even_y);
  svg +=
      color_bar(g.label_w, bars_top + bars_h + 8, std::min(160.0, g.cell_w * static_cast<double>(cols.size())), style);
  return svg + "</svg>";
}

std::string jsd_figure(const RunAnalysis& run, const LayerAnalysis& a) {
  Grid g = grid_for(run.domains, run.domains.size());
  g.cell_w = std::clamp(180.0 / static_cast<double>(run.domains.size()), 9.0, 38.0);
  g.cell_h = std::min(g.cell_h, g.cell_w);
  HeatmapStyle style{&kOranges, std::log(2.0), 3, "JSD"};
  std::vector<std::string> cols;
  for (const std::string& d : run.domains) cols.push_back(short_label(d).substr(0, g.cell_w >= 30 ? 5 : 2));
  const double width = g.label_w + g.cell_w * static_cast<double>(cols.size()) + 12;
  const double height = g.top + g.cell_h * static_cast<double>(run.domains.size()) + 30;
  std::string svg =
      fmt::format("<svg class=\"heat\" viewBox=\"0 0 {0:.0f} {1:.0f}\" width=\"{0:.0f}\" height=\"{1:.0f}\" "
                  "role=\"img\" aria-label=\"JSD between domains, layer {2}\">",
                  width, height, a.layer);
  svg += heatmap_cells(a.routing.jsd, run.domains, cols, g, style);
  svg += color_bar(g.label_w, height - 26, std::min(140.0, g.cell_w * static_cast<double>(cols.size())), style);
  return svg + "</svg>";
}

// ---- bar charts -----------------------------------------------------------------------------------------------------

std::string bar_chart(const std::string& title, const std::vector<Bar>& bars) {
  double lo = INFINITY, hi = -INFINITY;
  for (const Bar& b : bars) {
    if (!std::isfinite(b.mean)) continue;
    const double spread = std::isfinite(b.std) ? b.std : 0;
    lo = std::min({lo, b.mean - spread, b.mean}), hi = std::max({hi, b.mean + spread, b.mean});
    for (double v : b.values) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  if (!std::isfinite(lo)) return "";
  // From 0 when the values are not far from it; otherwise zoomed in on them (the chart says so).
  double y0 = lo, y1 = hi;
  if (lo >= 0 && lo <= 0.5 * hi) y0 = 0;
  if (hi <= 0 && hi >= 0.5 * lo) y1 = 0;
  if (y1 - y0 <= 1e-12 * std::max(1.0, std::abs(y0))) {
    const double pad = std::abs(y0) > 0 ? std::abs(y0) * 0.1 : 0.5;
    y0 -= y0 == 0 && lo >= 0 ? 0 : pad, y1 += pad;
  } else {
    const double pad = (y1 - y0) * 0.08;
    if (y0 != 0) y0 -= pad;
    if (y1 != 0) y1 += pad;
  }
  const bool from_zero = y0 <= 0 && y1 >= 0;
  const double base = std::clamp(0.0, y0, y1);
  constexpr double H = 210, L = 52, R = 12, T = 28, B = 36, slot = 64;
  const double W = std::max(260.0, L + R + slot * static_cast<double>(bars.size()));
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  std::string svg = chart_frame(title, W, H, L, W - R, y0, y1, py);
  if (!from_zero)
    svg += fmt::format("<text x=\"{:.0f}\" y=\"17\" class=\"tick\" text-anchor=\"end\">axis not from 0</text>", W - R);
  svg +=
      fmt::format("<line x1=\"{0}\" x2=\"{1:.0f}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" class=\"axis\"/>", L, W - R, py(base));
  const double slot_w = (W - L - R) / static_cast<double>(bars.size()), bar_w = std::min(34.0, slot_w * 0.6);
  for (size_t i = 0; i < bars.size(); ++i) {
    const Bar& b = bars[i];
    const double cx = L + (static_cast<double>(i) + 0.5) * slot_w;
    const std::string label = b.label.size() <= 10 ? b.label : b.label.substr(0, 9) + "…";
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{}<title>{}</title></text>",
                       cx, H - B + 14, html_escape(label), html_escape(b.label));
    if (!std::isfinite(b.mean)) continue;
    const double top = py(std::max(b.mean, base)), bottom = py(std::min(b.mean, base));
    const bool spread = std::isfinite(b.std) && b.std > 0;
    svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\" "
                       "fill-opacity=\"0.35\" stroke=\"{}\"><title>{}: mean {}{} (n = {})</title></rect>",
                       cx - bar_w / 2, top, bar_w, std::max(0.5, bottom - top), b.color, b.color, html_escape(b.label),
                       num(b.mean, 4), spread ? " ± " + num(b.std, 4) : "", b.values.size());
    if (spread) {
      const double a = py(b.mean - b.std), c = py(b.mean + b.std);
      svg +=
          fmt::format("<path d=\"M{0:.1f},{1:.1f} L{0:.1f},{2:.1f} M{3:.1f},{1:.1f} L{4:.1f},{1:.1f} M{3:.1f},{2:.1f} "
                      "L{4:.1f},{2:.1f}\" stroke=\"#1d2430\" stroke-width=\"1.2\" fill=\"none\"/>",
                      cx, a, c, cx - 5, cx + 5);
    }
    const double n = static_cast<double>(b.values.size());
    const double gap = n > 1 ? std::min(7.0, bar_w * 0.7 / (n - 1)) : 0;
    for (size_t k = 0; k < b.values.size(); ++k)
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2.6\" fill=\"#fff\" stroke=\"{}\" "
                         "stroke-width=\"1.4\"><title>{}: {}</title></circle>",
                         cx + (static_cast<double>(k) - (n - 1) / 2) * gap, py(b.values[k]), b.color,
                         html_escape(b.label), num(b.values[k], 4));
  }
  return svg + "</svg>";
}

}  // namespace moelab::apps
