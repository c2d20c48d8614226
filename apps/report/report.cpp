#include "apps/report/report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "apps/analysis/text.h"
#include "apps/report/html.h"
#include "apps/report/svg.h"

namespace moelab::apps {

using nlohmann::json;

// apps/report/report.css and glossary.html, compiled in at build time (third_party/cmake/moelab_embed.cmake).
extern const char kReportCss[];
extern const char kGlossaryHtml[];

namespace {

std::string figure(const std::string& svg, const std::string& caption = "") {
  if (svg.empty()) return "";
  return "<figure>" + svg + (caption.empty() ? "" : "<figcaption>" + caption + "</figcaption>") + "</figure>";
}

std::string chip(const std::string& color) { return "<span class=\"chip\" style=\"background:" + color + "\"></span>"; }

// One row of the summary: a label, a value per run and which direction is better (+1 higher, -1 lower, 0 neither).
struct SummaryColumn {
  std::string title, tip;
  int better;
  std::function<double(const RunAnalysis&)> value;
  int decimals = 3;
};

double mean_of(const std::vector<double>& v) {
  double s = 0;
  int64_t n = 0;
  for (double x : v)
    if (std::isfinite(x)) s += x, ++n;
  return n ? s / static_cast<double>(n) : NAN;
}

double layer_mean(const RunAnalysis& run, const std::function<double(const LayerAnalysis&)>& f) {
  std::vector<double> v;
  for (const LayerAnalysis& a : run.layers) v.push_back(f(a));
  return mean_of(v);
}

// Layer mean of one output-similarity number (NaN for layers without a similarity sample).
double similarity_mean(const RunAnalysis& run, double moe::OutputSimilarity::*field) {
  return layer_mean(run, [&](const LayerAnalysis& a) { return a.similarity.tokens ? a.similarity.*field : NAN; });
}

// The caveat printed next to NV. Experts drawn independently at random start with NV about (E-1)/E (the expected
// population variance of E independent draws) and keep it however they train, so NV only compares experts that
// started equal. Names the runs here whose experts started from independent random inits (no train.init_from).
std::string nv_note(const std::vector<RunAnalysis>& runs) {
  std::vector<std::string> independent;
  for (const RunAnalysis& r : runs) {
    auto it = r.config.find("train.init_from");
    const bool initialized = it != r.config.end() && it->is_string() && !it->get<std::string>().empty();
    if (!initialized)
      independent.push_back(fmt::format("{} (E = {}: about {})", html_escape(r.name), r.experts,
                                        r.experts > 0 ? num(static_cast<double>(r.experts - 1) / r.experts) : "–"));
  }
  std::string note =
      "NV (param. variance) is meaningful only when the experts share an init (e.g. upcycled from one dense FFN with "
      "train.init_from): with independent random inits it sits at about (E-1)/E whatever training does.";
  if (!independent.empty())
    note += fmt::format(" Experts with independent random inits here: {}.", fmt::join(independent, ", "));
  return note;
}

std::string summary_section(const std::vector<RunAnalysis>& runs) {
  std::vector<SummaryColumn> cols = {
      {"step", "checkpoint step", 0, [](const RunAnalysis& r) { return static_cast<double>(r.step); }, 0},
      {"held-out CE", "mean cross-entropy (nats/token) on the held-out split", -1,
       [](const RunAnalysis& r) { return r.ce; }, 4},
      {"PPL", "exp(CE)", -1, [](const RunAnalysis& r) { return std::exp(r.ce); }, 3},
      {"MI / H(domain)", "how much the chosen expert tells about the domain (mean over MoE layers)", +1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.mi.normalized; });
       }},
      {"mean JSD", "between the domains' mean routing distributions (nats, max ln 2)", +1,
       [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.mean_jsd; }); },
       4},
      {"D_inter / D_total", "share of the routing diversity that lies between domains", +1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.inter_share(); });
       }},
      {"load entropy", "entropy of the expert load / log E (1 = even)", +1,
       [](const RunAnalysis& r) {
         return layer_mean(r, [](const LayerAnalysis& a) { return a.routing.load.entropy; });
       }},
      {"dead experts", "experts never chosen, summed over layers", -1,
       [](const RunAnalysis& r) {
         double s = 0;
         for (const LayerAnalysis& a : r.layers) s += static_cast<double>(a.routing.load.dead);
         return s;
       },
       0},
      {"output cosine", "mean cosine similarity of expert outputs (1 = identical experts)", -1,
       [](const RunAnalysis& r) { return similarity_mean(r, &moe::OutputSimilarity::mean); }},
      {"centered cosine",
       "mean cosine similarity of expert outputs after subtracting each expert's mean output (the direction all "
       "experts share)",
       -1, [](const RunAnalysis& r) { return similarity_mean(r, &moe::OutputSimilarity::centered_mean); }},
      {"output CKA", "mean linear CKA between the experts' outputs (1 = equal up to a rotation and scale)", -1,
       [](const RunAnalysis& r) { return similarity_mean(r, &moe::OutputSimilarity::cka_mean); }},
      {"param. variance",
       "normalized parameter variance of the expert matrices (0 = equal experts); meaningful only when the experts "
       "share an init: with independent random inits about (E-1)/E whatever training does",
       +1, [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.variance.all; }); }},
      {"dPPL", "router-permutation dPPL, PPL_pi - PPL (higher = experts less interchangeable)", +1,
       [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.dppl; }); }},
      {"relative dPPL", "router-permutation dPPL divided by the PPL, (PPL_pi - PPL) / PPL", +1,
       [](const RunAnalysis& r) { return layer_mean(r, [](const LayerAnalysis& a) { return a.relative_dppl; }); }},
  };
  std::string html = "<section id=\"summary\"><h2>Summary</h2><p class=\"note\">Held-out numbers at the analysed "
                     "checkpoint; layer metrics are means over the MoE layers. Arrows say which direction means more "
                     "specialized (or better); with several runs the best value is <b>bold</b>.</p><div "
                     "class=\"scroll\"><table><tr><th class=\"l\">run</th>";
  for (const SummaryColumn& c : cols)
    html += fmt::format("<th title=\"{}\">{}{}</th>", html_escape(c.tip), html_escape(c.title),
                        c.better > 0   ? " ↑"
                        : c.better < 0 ? " ↓"
                                       : "");
  html += "</tr>";
  std::vector<std::vector<double>> values(cols.size());
  for (size_t c = 0; c < cols.size(); ++c)
    for (const RunAnalysis& r : runs) values[c].push_back(cols[c].value(r));
  for (size_t i = 0; i < runs.size(); ++i) {
    html += "<tr><td class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</td>";
    for (size_t c = 0; c < cols.size(); ++c) {
      double v = values[c][i];
      bool best = runs.size() > 1 && cols[c].better != 0 && std::isfinite(v), tie = true;
      for (double o : values[c]) {
        if (std::isfinite(o) && (cols[c].better > 0 ? o > v : o < v)) best = false;
        if (o != v) tie = false;
      }
      best = best && !tie;
      html += fmt::format("<td{}>{}</td>", best ? " class=\"best\"" : "", num(v, cols[c].decimals));
    }
    html += "</tr>";
  }
  html += "</table></div><p class=\"note\">" + nv_note(runs) + "</p>";
  // Held-out CE per domain, one row per run.
  std::vector<std::string> domains;
  for (const RunAnalysis& r : runs)
    for (const std::string& d : r.domains)
      if (std::find(domains.begin(), domains.end(), d) == domains.end()) domains.push_back(d);
  html += "<h3>Held-out CE per domain</h3><table><tr><th class=\"l\">run</th>";
  for (const std::string& d : domains) html += "<th>" + html_escape(d) + " ↓</th>";
  html += "</tr>";
  auto ce_of = [&](const RunAnalysis& r, const std::string& d) {
    auto it = std::find(r.domains.begin(), r.domains.end(), d);
    return it == r.domains.end() ? NAN : r.ce_domain[static_cast<size_t>(it - r.domains.begin())];
  };
  for (size_t i = 0; i < runs.size(); ++i) {
    html += "<tr><td class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</td>";
    for (const std::string& d : domains) {
      double v = ce_of(runs[i], d);
      bool best = runs.size() > 1 && std::isfinite(v);
      for (const RunAnalysis& o : runs)
        if (std::isfinite(ce_of(o, d)) && ce_of(o, d) < v) best = false;
      html += fmt::format("<td{}>{}</td>", best ? " class=\"best\"" : "", num(v, 4));
    }
    html += "</tr>";
  }
  return html + "</table></section>";
}

std::string run_legend(const std::vector<RunAnalysis>& runs, const std::string& note = "") {
  std::string html = "<div class=\"legend\">";
  for (size_t i = 0; i < runs.size(); ++i)
    html += "<span>" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</span>";
  if (!note.empty()) html += "<span style=\"color:#5b6472\">" + html_escape(note) + "</span>";
  return html + "</div>";
}

std::string curves_section(const std::vector<RunAnalysis>& runs) {
  struct Curve {
    std::string title, key;
    bool smoothed, has_eval;
  };
  std::vector<Curve> curves = {{"total loss", "loss", true, false},
                               {"cross-entropy (nats/token)", "ce", true, true},
                               {"load-balancing loss L_LB", "lb", true, false},
                               {"router z-loss L_Z", "z", true, false},
                               {"expert-divergence loss L_ED", "ed", true, false},
                               {"mean pairwise JSD (routing)", "routing/mean_jsd", true, true},
                               {"learning rate", "lr", false, false},
                               {"tokens / s", "tokens_per_s", true, false},
                               {"gradient norm", "grad_norm", true, false}};
  if (std::any_of(runs.begin(), runs.end(), [](const RunAnalysis& r) { return r.log.train.count("omoe/removed"); }))
    curves.push_back({"OMoE: share of expert gradient removed", "omoe/removed", false, false});
  std::string charts;
  for (const Curve& c : curves) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i)
      add_series(series, runs[i].name, color_of(kRunColors, i), runs[i].log, c.key, c.has_eval, c.smoothed);
    charts += figure(line_chart(c.title, series, "step"));
  }
  // CE per domain: one chart with a line per domain for one run; one chart per domain with a line per run otherwise.
  std::vector<std::string> domains;
  for (const RunAnalysis& r : runs)
    for (const std::string& d : r.domains)
      if (std::find(domains.begin(), domains.end(), d) == domains.end()) domains.push_back(d);
  std::string domain_charts;
  if (runs.size() == 1) {
    std::vector<Series> series;
    std::string caption;
    for (size_t k = 0; k < domains.size(); ++k) {
      add_series(series, domains[k], color_of(kRunColors, k + 1), runs[0].log, "ce_domain/" + domains[k], true, true);
      caption += "<span style=\"margin-right:12px\">" + chip(color_of(kRunColors, k + 1)) + html_escape(domains[k]) +
                 "</span>";
    }
    domain_charts += figure(line_chart("cross-entropy per domain", series, "step"), caption);
  } else {
    for (const std::string& d : domains) {
      std::vector<Series> series;
      for (size_t i = 0; i < runs.size(); ++i)
        add_series(series, runs[i].name, color_of(kRunColors, i), runs[i].log, "ce_domain/" + d, true, true);
      domain_charts += figure(line_chart("cross-entropy: " + d, series, "step"));
    }
  }
  return "<section id=\"curves\"><h2>Training curves</h2><p class=\"note\">From each run's metrics.jsonl. Loss terms "
         "are before their coefficients and averaged over MoE layers; JSD is between the domains of each batch.</p>" +
         run_legend(runs, "solid: training batches (smoothed; raw faint) · dashed with dots: held-out evaluations") +
         "<div class=\"charts\">" + charts + domain_charts + "</div></section>";
}

std::string by_layer_section(const std::vector<RunAnalysis>& runs) {
  struct Metric {
    std::string title;
    std::function<double(const LayerAnalysis&)> value;
  };
  const std::vector<Metric> metrics = {
      {"MI(domain; expert) / H(domain)", [](const LayerAnalysis& a) { return a.routing.mi.normalized; }},
      {"mean JSD between domains", [](const LayerAnalysis& a) { return a.routing.mean_jsd; }},
      {"D_inter / D_total", [](const LayerAnalysis& a) { return a.routing.inter_share(); }},
      {"load entropy / log E", [](const LayerAnalysis& a) { return a.routing.load.entropy; }},
      {"expert output cosine", [](const LayerAnalysis& a) { return a.similarity.tokens ? a.similarity.mean : NAN; }},
      {"expert output cosine, centered",
       [](const LayerAnalysis& a) { return a.similarity.tokens ? a.similarity.centered_mean : NAN; }},
      {"expert output linear CKA",
       [](const LayerAnalysis& a) { return a.similarity.tokens ? a.similarity.cka_mean : NAN; }},
      {"normalized parameter variance", [](const LayerAnalysis& a) { return a.variance.all; }},
      {"router-permutation dPPL", [](const LayerAnalysis& a) { return a.dppl; }},
      {"relative dPPL (PPL_pi - PPL) / PPL", [](const LayerAnalysis& a) { return a.relative_dppl; }}};
  std::string charts;
  for (const Metric& m : metrics) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i) {
      Series s{runs[i].name, color_of(kRunColors, i), {}, false, true};
      for (const LayerAnalysis& a : runs[i].layers)
        if (double v = m.value(a); std::isfinite(v)) s.points.emplace_back(static_cast<double>(a.layer), v);
      series.push_back(std::move(s));
    }
    charts += figure(line_chart(m.title, series, "layer", true));
  }
  return "<section id=\"by-layer\"><h2>Specialization by layer</h2><p class=\"note\">Each MoE layer of each run on "
         "held-out data. " +
         nv_note(runs) + "</p>" + run_legend(runs) + "<div class=\"charts\">" + charts + "</div></section>";
}

// The MoE layers analysed in any of the runs, ascending.
std::set<int64_t> analysed_layers(const std::vector<RunAnalysis>& runs) {
  std::set<int64_t> layers;
  for (const RunAnalysis& r : runs)
    for (const LayerAnalysis& a : r.layers) layers.insert(a.layer);
  return layers;
}

std::string layers_section(const std::vector<RunAnalysis>& runs) {
  std::string html =
      "<section id=\"layers\"><h2>Per-layer metrics</h2><p class=\"note\">MI in bits over token slots; JSD and D in "
      "nats; load over top-k slots (max-viol = max load / mean load - 1); out-cos = mean cosine of the expert "
      "outputs over expert pairs, cen-cos = the same after subtracting each expert's mean output, CKA = mean linear "
      "CKA of the outputs over expert pairs; NV = normalized parameter variance; dPPL = PPL with a permuted router - "
      "PPL, rel. dPPL = dPPL / PPL. " +
      nv_note(runs) +
      "</p><div class=\"scroll\"><table><tr>"
      "<th class=\"l\">layer</th><th class=\"l\">run</th><th>MI bits</th><th>H(domain)</th><th>MI/H</th><th>mean "
      "JSD</th>"
      "<th>D_inter</th><th>D_total</th><th>D_inter/D_total</th><th>load min…max</th><th>load std</th><th>load H</th>"
      "<th>max-viol</th><th>dead</th><th>out-cos</th><th>cen-cos</th><th>CKA</th><th>NV</th><th>dPPL</th>"
      "<th>rel. dPPL</th></tr>";
  std::set<int64_t> layer_ids = analysed_layers(runs);
  for (int64_t layer : layer_ids) {
    bool first = true;
    for (size_t i = 0; i < runs.size(); ++i)
      for (const LayerAnalysis& a : runs[i].layers) {
        if (a.layer != layer) continue;
        const moe::LayerSpecialization& r = a.routing;
        auto similarity = [&](double v) { return a.similarity.tokens ? num(v) : std::string("–"); };
        html += fmt::format(
            "<tr{}><td class=\"l\">{}</td><td class=\"l\">{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td><td>{}…{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            first ? " class=\"group\"" : "", first ? std::to_string(layer) : "", chip(color_of(kRunColors, i)),
            html_escape(runs[i].name), num(r.mi.bits), num(r.mi.domain_entropy_bits), num(r.mi.normalized),
            num(r.mean_jsd, 4), num(r.divergence.inter, 4), num(r.divergence.total, 4), num(r.inter_share()),
            r.load.min, r.load.max, num(r.load.std, 1), num(r.load.entropy), num(r.load.max_violation), r.load.dead,
            similarity(a.similarity.mean), similarity(a.similarity.centered_mean), similarity(a.similarity.cka_mean),
            num(a.variance.all), num(a.dppl), num(a.relative_dppl, 4));
        first = false;
      }
  }
  return html + "</table></div></section>";
}

std::string columns_style(size_t n) {
  return fmt::format(" style=\"grid-template-columns:repeat({},minmax(0,max-content))\"", n);
}

std::string heatmaps_section(const std::vector<RunAnalysis>& runs) {
  std::string html =
      "<section id=\"heatmaps\"><h2>Expert usage per domain</h2><p class=\"note\">Blue: share of each "
      "domain's top-k slots that go to each expert (rows sum to 1; a common color scale per layer). Bars: "
      "the experts' overall load (dashed: even load; red: dead expert). Orange: JSD between the domains' "
      "mean routing distributions (scale 0 … ln 2).</p>";
  std::set<int64_t> layer_ids = analysed_layers(runs);
  for (int64_t layer : layer_ids) {
    double vmax = 0;
    for (const RunAnalysis& r : runs)
      for (const LayerAnalysis& a : r.layers)
        if (a.layer == layer)
          for (const auto& row : a.routing.usage)
            for (double v : row) vmax = std::max(vmax, v);
    html += fmt::format("<div class=\"layerrow\"><h3>Layer {}</h3><div class=\"cols\"{}>", layer,
                        columns_style(runs.size()));
    for (size_t i = 0; i < runs.size(); ++i) {
      html += "<div><div class=\"runname\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</div>";
      for (const LayerAnalysis& a : runs[i].layers)
        if (a.layer == layer)
          html += "<div style=\"display:flex;gap:14px;align-items:flex-start;flex-wrap:wrap\">" +
                  figure(usage_figure(runs[i], a, std::max(vmax, 1e-9)), "usage: domains × experts") +
                  figure(jsd_figure(runs[i], a), fmt::format("JSD · mean {}", num(a.routing.mean_jsd, 4))) + "</div>";
      html += "</div>";
    }
    html += "</div></div>";
  }
  return html + "</section>";
}

// A token's text for a tooltip: control characters as escapes, valid UTF-8.
std::string visible_piece(const std::string& s) {
  std::string out;
  for (char c : valid_utf8(s)) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\t')
      out += "\\t";
    else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
    else
      out += c;
  }
  return out;
}

// Control characters made visible; the rest escaped.
std::string visible_text(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '\n')
      out += "↵\n";
    else if (c == '\t')
      out += "⇥";
    else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      out += "·";
    else
      out += c;
  }
  return html_escape(out);
}

std::string trace_block(const RunAnalysis& run, size_t l) {
  const RoutingTrace& t = *run.trace;
  std::string html = "<div class=\"trace\">";
  // Tokens are grouped until their bytes are valid UTF-8 (a byte tokenizer splits multi-byte characters).
  size_t i = 0;
  while (i < t.pieces.size()) {
    size_t j = i;
    std::string bytes;
    do bytes += t.pieces[j++];
    while (!is_valid_utf8(bytes) && j < t.pieces.size() && j - i < 4);
    std::vector<std::string> colors;
    std::string tip;
    for (size_t k = i; k < j; ++k) {
      const std::vector<int32_t>& e = t.experts[l][k];
      colors.push_back(expert_color(e.empty() ? 0 : e[0], run.experts));
      tip += fmt::format("{}token {} \"{}\" →", k > i ? "\n" : "", k, visible_piece(t.pieces[k]));
      for (size_t c = 0; c < e.size(); ++c) tip += fmt::format(" e{} ({:.0f}%)", e[c], 100 * t.probs[l][k][c]);
    }
    std::string background = colors[0];
    if (colors.size() > 1) {
      background = "linear-gradient(90deg";
      for (size_t c = 0; c < colors.size(); ++c)
        background +=
            fmt::format(",{} {:.0f}% {:.0f}%", colors[c], 100.0 * c / colors.size(), 100.0 * (c + 1) / colors.size());
      background += ")";
    }
    html += fmt::format("<span style=\"background:{}\" title=\"{}\">{}</span>", background, html_escape(tip),
                        visible_text(bytes));
    i = j;
  }
  return html + "</div>";
}

std::string trace_section(const std::vector<RunAnalysis>& runs) {
  bool any = false;
  int64_t experts = 0;
  size_t max_layers = 0;
  for (const RunAnalysis& r : runs)
    if (r.trace)
      any = true, experts = std::max(experts, r.experts), max_layers = std::max(max_layers, r.trace->layers.size());
  if (!any) return "";
  std::string legend = "<div class=\"legend\">";
  for (int64_t e = 0; e < experts; ++e)
    legend += "<span>" + chip(expert_color(e, experts)) + fmt::format("expert {}", e) + "</span>";
  legend += "</div>";
  std::string html =
      "<section id=\"trace\"><h2>Routing trace</h2><p class=\"note\">Each token colored by the expert "
      "the router ranked first (its top-1), per MoE layer; hover a token for its top-k experts and their "
      "probabilities. Characters split over several byte tokens show one stripe per token.</p>" +
      legend;
  for (size_t l = 0; l < max_layers; ++l) {
    html += fmt::format("<div class=\"layerrow\"><div class=\"cols\"{}>",
                        fmt::format(" style=\"grid-template-columns:repeat({},minmax(0,1fr))\"", runs.size()));
    for (size_t i = 0; i < runs.size(); ++i) {
      html += "<div>";
      if (runs[i].trace && l < runs[i].trace->layers.size())
        html += "<div class=\"runname\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) +
                fmt::format(" · layer {}</div>", runs[i].trace->layers[l]) + trace_block(runs[i], l);
      html += "</div>";
    }
    html += "</div></div>";
  }
  return html + "</section>";
}

std::string value_text(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

std::string config_section(const std::vector<RunAnalysis>& runs) {
  std::set<std::string> keys;
  for (const RunAnalysis& r : runs)
    for (auto it = r.config.begin(); it != r.config.end(); ++it) keys.insert(it.key());
  const std::vector<std::string> headline = {"preset",      "model.d_model",    "model.n_layers", "model.n_experts",
                                             "model.top_k", "moe.alpha",        "moe.beta",       "optim.name",
                                             "train.steps", "train.batch_size", "data.corpus"};
  auto row = [&](const std::string& key, bool mark) {
    std::set<std::string> distinct;
    std::string cells;
    for (const RunAnalysis& r : runs) {
      std::string v = r.config.contains(key) ? value_text(r.config[key]) : "–";
      distinct.insert(v);
      cells += "<td class=\"l\">" + html_escape(v) + "</td>";
    }
    const bool differs = mark && runs.size() > 1 && distinct.size() > 1;
    if (differs) {
      size_t pos = 0;
      while ((pos = cells.find("<td class=\"l\">", pos)) != std::string::npos) {
        cells.replace(pos, 14, "<td class=\"l diff\">");
        pos += 19;
      }
    }
    return std::pair{"<tr><td class=\"l\">" + html_escape(key) + "</td>" + cells + "</tr>", differs};
  };
  std::string head = "<tr><th class=\"l\">option</th>";
  for (size_t i = 0; i < runs.size(); ++i)
    head += "<th class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) + "</th>";
  head += "</tr>";
  std::string main_rows, all_rows;
  for (const std::string& k : keys) {
    auto [html, differs] = row(k, true);
    if (differs || std::find(headline.begin(), headline.end(), k) != headline.end()) main_rows += html;
    all_rows += html;
  }
  std::string files = "<table><tr><th class=\"l\">run</th><th class=\"l\">folder</th><th class=\"l\">checkpoint</th>"
                      "<th class=\"l\">held-out data</th><th class=\"l\">tokenizer</th></tr>";
  for (size_t i = 0; i < runs.size(); ++i)
    files += "<tr><td class=\"l\">" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) +
             "</td><td class=\"l\">" + html_escape(runs[i].run_dir.string()) + "</td><td class=\"l\">" +
             html_escape(runs[i].checkpoint.string()) + fmt::format(" (step {})", runs[i].step) +
             "</td><td class=\"l\">" + html_escape(fmt::format("{} · {} tokens", runs[i].selection, runs[i].tokens)) +
             "</td><td class=\"l\">" + html_escape(runs[i].tokenizer) + "</td></tr>";
  files += "</table>";
  return "<section id=\"config\"><h2>Runs and configuration</h2><p class=\"note\">Headline options" +
         std::string(runs.size() > 1 ? "; options that differ between the runs are highlighted" : "") +
         ".</p><div class=\"scroll\">" + files + "</div><h3>Options</h3><div class=\"scroll\"><table>" + head +
         main_rows + "</table></div><details><summary>every option</summary><div class=\"scroll\"><table>" + head +
         all_rows + "</table></div></details></section>";
}

}  // namespace

std::string render_report(const std::vector<RunAnalysis>& runs, const ReportOptions& options) {
  if (runs.empty()) throw std::invalid_argument("render_report: no runs");
  std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M", std::localtime(&now));
  std::string runs_line;
  for (size_t i = 0; i < runs.size(); ++i)
    runs_line += "<span>" + chip(color_of(kRunColors, i)) + html_escape(runs[i].name) +
                 fmt::format(" · step {} · {} MoE layers × {} experts (top-{}) · {} domains</span>", runs[i].step,
                             runs[i].layers.size(), runs[i].experts, runs[i].top_k, runs[i].domains.size());
  bool traced = std::any_of(runs.begin(), runs.end(), [](const RunAnalysis& r) { return r.trace.has_value(); });
  std::string html = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
                     "content=\"width=device-width,initial-scale=1\"><title>" +
                     html_escape(options.title) + "</title><style>\n" + kReportCss + "\n</style></head><body>";
  html += "<header><h1>" + html_escape(options.title) + "</h1><div class=\"sub\">" +
          html_escape(
              fmt::format("{} run{} · generated {} by moe-analyze", runs.size(), runs.size() > 1 ? "s" : "", stamp)) +
          "</div><div class=\"runs\">" + runs_line + "</div></header>";
  html +=
      "<nav><a href=\"#summary\">Summary</a><a href=\"#curves\">Training curves</a><a href=\"#by-layer\">By layer</a>"
      "<a href=\"#layers\">Per-layer table</a><a href=\"#heatmaps\">Heatmaps</a>" +
      std::string(traced ? "<a href=\"#trace\">Routing trace</a>" : "") +
      "<a href=\"#config\">Config</a><a href=\"#glossary\">Glossary</a></nav><main>";
  html += summary_section(runs) + curves_section(runs) + by_layer_section(runs) + heatmaps_section(runs) +
          layers_section(runs) + trace_section(runs) + config_section(runs) + kGlossaryHtml;
  return html + "</main></body></html>\n";
}

}  // namespace moelab::apps
