// report.html of a study: the grid, bar charts of the headline metrics with their seed spread, and one table per
// metric group (mean ± std (n) per condition, and the paired difference against the reference). One self-contained
// page with moe-analyze's stylesheet; every name and text from the study goes through html_escape.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <functional>

#include "apps/analysis/text.h"
#include "apps/report/html.h"
#include "apps/report/svg.h"
#include "apps/study/results.h"

namespace moelab::apps {

// apps/report/report.css, compiled into moelab_report (third_party/cmake/moelab_embed.cmake).
extern const char kReportCss[];

namespace {

// Styles of this page only, after the report's.
constexpr const char* kStudyCss =
    "td .d{color:#5b6472;font-size:11.5px}td .n{color:#5b6472;font-size:11.5px}"
    "pre.opts{margin:0;font:12px ui-monospace,'DejaVu Sans Mono',Menlo,monospace;white-space:pre-wrap;text-align:left}";

// Readable names of run_metrics' names; others (and per-domain parts) show as they are.
std::string display_name(const std::string& metric) {
  static const std::map<std::string, std::string> names = {{"ce", "held-out CE"},
                                                           {"mean_jsd", "mean JSD"},
                                                           {"mi_normalized", "MI / H(domain)"},
                                                           {"mi_bits", "MI (bits)"},
                                                           {"inter_share", "D_inter / D_total"},
                                                           {"d_total", "D_total"},
                                                           {"load_entropy", "load entropy"},
                                                           {"max_violation", "max-violation"},
                                                           {"output_similarity", "output cosine"},
                                                           {"output_similarity_centered", "output cosine, centered"},
                                                           {"output_cka", "output CKA"},
                                                           {"param_variance", "param. variance"},
                                                           {"dppl", "dPPL"},
                                                           {"dppl_relative", "relative dPPL"},
                                                           {"dead_experts", "dead experts"}};
  auto it = names.find(metric);
  return it == names.end() ? metric : it->second;
}

struct Group {
  std::string id, title, note;
  std::function<bool(const std::string&)> has;
};

bool starts(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::string signed_num(double v) { return (v > 0 ? "+" : "") + num(v, 4); }

// One table: a row per condition, a column per metric.
std::string metric_table(const StudyResults& results, const std::string& reference,
                         const std::vector<std::string>& metrics, const std::function<std::string(std::string)>& head) {
  std::string html = "<div class=\"scroll\"><table><tr><th class=\"l\">condition</th>";
  for (const std::string& m : metrics) html += "<th title=\"" + html_escape(m) + "\">" + html_escape(head(m)) + "</th>";
  html += "</tr>";
  for (size_t i = 0; i < results.conditions.size(); ++i) {
    const ConditionResult& c = results.conditions[i];
    html += "<tr><td class=\"l\"><span class=\"chip\" style=\"background:" + color_of(kRunColors, i) + "\"></span>" +
            html_escape(c.name) + (c.name == reference ? " <span class=\"n\">(reference)</span>" : "") + "</td>";
    for (const std::string& name : metrics) {
      const MetricResult* m = c.metric(name);
      if (!m || m->summary.n == 0) {
        html += "<td>–</td>";
        continue;
      }
      html += "<td>" + num(m->summary.mean, 4);
      if (m->summary.n > 1) html += " ± " + num(m->summary.std, 4);
      html += fmt::format(" <span class=\"n\">({})</span>", m->summary.n);
      const PairedDifference& d = m->vs_reference;
      if (c.name != reference && d.diff.n > 0)
        html += fmt::format("<div class=\"d\" title=\"paired difference vs {} over {} seeds\">Δ {}{} · {}</div>",
                            html_escape(reference), d.diff.n, signed_num(d.diff.mean),
                            d.diff.n > 1 ? " ± " + num(d.diff.std, 4) : "", direction_text(d));
      html += "</td>";
    }
    html += "</tr>";
  }
  return html + "</table></div>";
}

std::string grid_section(const Study& study, const StudyResults& results) {
  std::string html = "<section id=\"grid\"><h2>The study</h2>";
  if (!study.description.empty()) html += "<p>" + html_escape(study.description) + "</p>";
  html += "<dl>";
  const std::vector<std::pair<std::string, std::string>> facts = {
      {"study file", study.file.empty() ? "–" : study.file.string()},
      {"preset", study.preset},
      {"seeds", fmt::format("{}", fmt::join(study.seeds, ", "))},
      {"reference", study.reference},
      {"runs",
       fmt::format("{} of {} finished, in {}", results.runs.size(), results.expected_runs, study.out_dir.string())},
      {"held-out data", study.eval_batches == 0
                            ? std::string("the whole validation split")
                            : fmt::format("{} batches of the validation split", study.eval_batches)},
      {"dPPL", fmt::format("{} router permutations per MoE layer", study.permutations)},
      {"output similarity", fmt::format("on {} held-out tokens per layer", study.similarity_tokens)}};
  for (const auto& [term, text] : facts) html += "<dt>" + html_escape(term) + "</dt><dd>" + html_escape(text) + "</dd>";
  html += "</dl><h3>Options every condition shares ([train], over the preset)</h3><pre class=\"opts\">" +
          html_escape(study.train.empty() ? "(none)" : study.train) + "</pre>";
  html += "<h3>Conditions</h3><div class=\"scroll\"><table><tr><th class=\"l\">condition</th><th class=\"l\">options "
          "(after [train])</th><th class=\"l\">role</th><th>runs</th><th title=\"train.batch_size x "
          "train.grad_accum\">sequences per step</th><th title=\"sequences per optimizer step / number of domains: "
          "the mean size of a domain's group in the expert-divergence loss\">per domain</th></tr>";
  for (const StudyCondition& c : study.conditions) {
    const auto result = std::find_if(results.conditions.begin(), results.conditions.end(),
                                     [&](const ConditionResult& r) { return r.name == c.name; });
    int64_t finished = 0;
    for (const StudyRunResult& r : results.runs) finished += r.condition == c.name;
    const bool has = result != results.conditions.end() && result->sequences_per_step > 0;
    std::string role = c.table ? (c.name == study.reference ? "reference" : "row") : "stage (not a row)";
    if (!c.needs.empty()) role += fmt::format(", starts from {}", fmt::join(c.needs, ", "));
    html += fmt::format(
        "<tr><td class=\"l\">{}</td><td class=\"l\"><pre class=\"opts\">{}</pre></td><td class=\"l\">{}</td>"
        "<td>{}/{}</td><td>{}</td><td>{}</td></tr>",
        html_escape(c.name), html_escape(c.options.empty() ? "(none)" : c.options), html_escape(role), finished,
        study.seeds.size(), has ? std::to_string(result->sequences_per_step) : "–",
        has ? num(result->sequences_per_domain, 2) : "–");
  }
  return html + "</table></div></section>";
}

std::string charts_section(const Study& study, const StudyResults& results) {
  const std::vector<std::string> headline = {"ce",         "mean_jsd",       "mi_normalized",
                                             "output_cka", "param_variance", "dppl_relative"};
  std::string charts;
  for (const std::string& name : headline) {
    std::vector<Bar> bars;
    bool any = false;
    for (size_t i = 0; i < results.conditions.size(); ++i) {
      const ConditionResult& c = results.conditions[i];
      Bar bar{c.name, color_of(kRunColors, i), NAN, NAN, {}};
      if (const MetricResult* m = c.metric(name)) {
        bar.mean = m->summary.mean, bar.std = m->summary.std;
        for (const auto& [seed, v] : m->values)
          if (std::isfinite(v)) bar.values.push_back(v);
        any = any || m->summary.n > 0;
      }
      bars.push_back(std::move(bar));
    }
    if (any) charts += "<figure>" + bar_chart(display_name(name), bars) + "</figure>";
  }
  if (charts.empty()) return "";
  return "<section id=\"charts\"><h2>Headline metrics</h2><p class=\"note\">Bars: the mean over seeds; whiskers: ± "
         "one standard deviation; dots: each seed's run. Reference: " +
         html_escape(study.reference) + ".</p><div class=\"charts\">" + charts + "</div></section>";
}

std::string tables_section(const Study& study, const StudyResults& results) {
  std::vector<std::string> all;  // every metric, in order of first appearance
  for (const ConditionResult& c : results.conditions)
    for (const MetricResult& m : c.metrics)
      if (std::find(all.begin(), all.end(), m.name) == all.end()) all.push_back(m.name);
  auto is_layer = [](const std::string& m) { return starts(m, "layer") && m.find('/') != std::string::npos; };
  const std::vector<Group> groups = {
      {"ce", "Held-out CE (nats/token)", "All domains, then each domain.",
       [](const std::string& m) { return m == "ce" || starts(m, "ce/"); }},
      {"specialization", "Specialization (mean over the MoE layers)",
       "Routing metrics on the held-out tokens and the experts' diversity; docs/analysis.md defines each. The "
       "parameter variance means something only when the experts share an init (upcycled from one dense FFN): from "
       "independent random inits it stays near (E-1)/E whatever training does.",
       [&](const std::string& m) {
         return !is_layer(m) && m != "ce" && !starts(m, "ce/") && m != "dppl" && !starts(m, "dppl/");
       }},
      {"dppl", "Router-permutation dPPL (mean over the MoE layers)", "All domains, then each domain.",
       [](const std::string& m) { return m == "dppl" || starts(m, "dppl/"); }}};
  std::string html = "<section id=\"tables\"><h2>Results</h2><p class=\"note\">Each cell: mean ± sample standard "
                     "deviation (n seeds); under it Δ, the paired difference against " +
                     html_escape(study.reference) +
                     " over the seeds both have (mean ± std), and on how many of them it went which way.</p>";
  auto head = [](std::string m) {
    const size_t slash = m.find('/');
    return slash == std::string::npos ? display_name(m) : m.substr(slash + 1);
  };
  for (const Group& g : groups) {
    std::vector<std::string> metrics;
    for (const std::string& m : all)
      if (g.has(m)) metrics.push_back(m);
    if (metrics.empty()) continue;
    html += "<h3 id=\"" + g.id + "\">" + html_escape(g.title) + "</h3><p class=\"note\">" + html_escape(g.note) +
            "</p>" + metric_table(results, study.reference, metrics, head);
  }
  // Per MoE layer: one table per layer, folded.
  std::vector<std::string> layers;
  for (const std::string& m : all)
    if (is_layer(m) && std::find(layers.begin(), layers.end(), m.substr(0, m.find('/'))) == layers.end())
      layers.push_back(m.substr(0, m.find('/')));
  if (!layers.empty()) {
    html += "<details><summary>Per MoE layer</summary>";
    for (const std::string& layer : layers) {
      std::vector<std::string> metrics;
      for (const std::string& m : all)
        if (starts(m, layer + "/")) metrics.push_back(m);
      html +=
          "<h3>" + html_escape(layer) + "</h3>" + metric_table(results, study.reference, metrics, [&](std::string m) {
            const std::string rest = m.substr(layer.size() + 1);
            return rest.find('/') == std::string::npos ? display_name(rest) : rest;
          });
    }
    html += "</details>";
  }
  return html + "</section>";
}

std::string runs_section(const StudyResults& results) {
  std::string html = "<section id=\"runs\"><h2>Runs</h2><details><summary>" +
                     fmt::format("{} finished runs", results.runs.size()) +
                     "</summary><table><tr><th class=\"l\">condition</th><th>seed</th><th class=\"l\">folder</th>"
                     "<th>steps</th><th>seconds</th><th>held-out CE</th></tr>";
  for (const StudyRunResult& r : results.runs)
    html += fmt::format(
        "<tr><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        html_escape(r.condition), r.seed, html_escape(r.dir.string()), r.steps, num(r.seconds, 1),
        num(r.metric("ce"), 4));
  return html + "</table></details></section>";
}

}  // namespace

std::string render_study_report(const Study& study, const StudyResults& results) {
  const std::string title = "moe-study: " + study.name;
  std::string html = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
                     "content=\"width=device-width, initial-scale=1\"><title>" +
                     html_escape(title) + "</title><style>\n" + kReportCss + "\n" + kStudyCss +
                     "\n</style></head><body>";
  html += "<header><h1>" + html_escape(title) + "</h1><div class=\"sub\">" +
          html_escape(study.description.empty() ? "a grid of conditions x seeds" : study.description) +
          fmt::format(" · {} of {} runs finished · reference: ", results.runs.size(), results.expected_runs) +
          html_escape(study.reference) + "</div></header>";
  html += "<nav><a href=\"#grid\">The study</a><a href=\"#charts\">Headline metrics</a><a href=\"#tables\">Results</a>"
          "<a href=\"#runs\">Runs</a></nav><main>";
  html += grid_section(study, results) + charts_section(study, results) + tables_section(study, results) +
          runs_section(results);
  return html + "</main></body></html>\n";
}

}  // namespace moelab::apps
