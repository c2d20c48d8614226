// moe-analyze: the specialization metrics against hand-computed values (moe/specialization.*), a trained run analysed
// end to end and checked against the trainer's routing statistics, the HTML report (sections, figures, escaping)
// rendered in headless Chromium, and clear errors for bad inputs.
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "apps/analysis/evaluation.h"
#include "apps/analysis/export.h"
#include "apps/analysis/metrics_log.h"
#include "apps/analysis/run_analysis.h"
#include "apps/analysis/text.h"
#include "apps/report/html.h"
#include "apps/report/report.h"
#include "apps/train/trainer.h"
#include "moe/analysis/expert_metrics.h"
#include "moe/analysis/routing_stats.h"
#include "moe/analysis/specialization.h"
#include "nn/safetensors.h"
#include "tests/python_runner.h"
#include "tests/testing.h"

using namespace moelab;
using namespace moelab::apps;
namespace fs = std::filesystem;
using testing::error_of;

namespace {

fs::path scratch(const std::string& name) { return testing::fresh_temp_dir("analyze_" + name); }

// Routing of B sequences of T tokens: each token's top-k choices, and dense probabilities that put `p_top` on its
// first choice and spread the rest evenly.
struct HandRouting {
  int64_t experts;
  std::vector<std::vector<std::vector<int32_t>>> choices;  // [B][T][k]
  std::vector<int32_t> domains;                            // [B]
  double p_top = 0.7;

  std::vector<int32_t> ids() const {
    std::vector<int32_t> out;
    for (const auto& seq : choices)
      for (const auto& tok : seq) out.insert(out.end(), tok.begin(), tok.end());
    return out;
  }
  std::vector<float> probs() const {
    std::vector<float> out;
    for (const auto& seq : choices)
      for (const auto& tok : seq)
        for (int64_t e = 0; e < experts; ++e)
          out.push_back(static_cast<float>(e == tok[0] ? p_top : (1 - p_top) / static_cast<double>(experts - 1)));
    return out;
  }
  moe::LayerSpecialization run(int64_t num_domains) const {
    moe::DomainRoutingCounts counts(experts, num_domains);
    counts.add(probs(), ids(), domains);
    return moe::specialization(counts);
  }
};

// T tokens that all choose `tok`.
std::vector<std::vector<int32_t>> same(std::vector<int32_t> tok, int T = 3) { return {static_cast<size_t>(T), tok}; }

// ---- two small runs (beta = 0 and 0.05) trained once per process ----------------------------------------------------

struct TrainedRuns {
  fs::path dir = scratch("runs");
  fs::path base = dir / "baseline", ed = dir / "ed";
  TrainedRuns() {
    for (auto [out, beta] : {std::pair{base, 0.0}, {ed, 0.05}}) {
      std::ostringstream quiet;
      TrainConfig c = train_preset("tiny");
      c.model.d_model = 32, c.model.n_heads = 2, c.model.seq_len = 32, c.model.expert_hidden = 32;
      c.data.synthetic_docs = 40;
      c.steps = 40, c.warmup = 5, c.eval_every = 20, c.eval_batches = 2, c.log_every = 1000;
      c.losses.beta = beta;
      c.out_dir = out.string();
      Trainer(c, quiet).run();
    }
  }
  ~TrainedRuns() { fs::remove_all(dir); }

  AnalyzeOptions options() const {
    AnalyzeOptions o;
    o.max_batches = 4;
    o.permutations = 1;
    o.similarity_tokens = 64;
    o.data_dir = dir / "data";
    return o;
  }
};

TrainedRuns& trained() {
  static TrainedRuns runs;
  return runs;
}

// ---- reading a screenshot -------------------------------------------------------------------------------------------

struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [height][width][3]
};

uint32_t big_endian(const std::string& s, size_t at) {
  return (uint32_t(uint8_t(s[at])) << 24) | (uint32_t(uint8_t(s[at + 1])) << 16) | (uint32_t(uint8_t(s[at + 2])) << 8) |
         uint32_t(uint8_t(s[at + 3]));
}

// An 8-bit RGB or RGBA PNG: chunks read here, the zlib stream inflated by Python's zlib, the scanline filters undone.
Image read_png(const fs::path& file, const fs::path& scratch_dir) {
  std::ifstream in(file, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE_MESSAGE(bytes.size() > 33, file << " is too short for a PNG");
  REQUIRE(bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
  Image img;
  int depth = 0, color = 0;
  std::string idat;
  for (size_t at = 8; at + 8 <= bytes.size();) {
    uint32_t length = big_endian(bytes, at);
    std::string type = bytes.substr(at + 4, 4);
    if (type == "IHDR") {
      img.width = big_endian(bytes, at + 8), img.height = big_endian(bytes, at + 12);
      depth = uint8_t(bytes[at + 16]), color = uint8_t(bytes[at + 17]);
    }
    if (type == "IDAT") idat += bytes.substr(at + 8, length);
    at += 12 + length;
  }
  REQUIRE_MESSAGE(depth == 8, "PNG bit depth " << depth);
  REQUIRE_MESSAGE((color == 2 || color == 6), "PNG color type " << color);
  const fs::path packed = scratch_dir / "idat.z", raw_file = scratch_dir / "idat.raw";
  std::ofstream(packed, std::ios::binary) << idat;
  testing::PythonRun py = testing::run_python(
      {"-c", "import sys, zlib; open(sys.argv[2], 'wb').write(zlib.decompress(open(sys.argv[1], 'rb').read()))",
       packed.string(), raw_file.string()});
  REQUIRE_MESSAGE(py.ok(), py.output);
  std::ifstream raw_in(raw_file, std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(raw_in)), std::istreambuf_iterator<char>());
  const int64_t bpp = color == 6 ? 4 : 3, stride = img.width * bpp;
  REQUIRE(static_cast<int64_t>(raw.size()) == img.height * (stride + 1));
  std::vector<uint8_t> prev(stride, 0), cur(stride);
  img.rgb.reserve(static_cast<size_t>(img.width * img.height * 3));
  for (int64_t y = 0; y < img.height; ++y) {
    const uint8_t filter = uint8_t(raw[y * (stride + 1)]);
    const uint8_t* line = reinterpret_cast<const uint8_t*>(raw.data()) + y * (stride + 1) + 1;
    for (int64_t i = 0; i < stride; ++i) {
      const int a = i >= bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
      int predictor = 0;
      if (filter == 1)
        predictor = a;
      else if (filter == 2)
        predictor = b;
      else if (filter == 3)
        predictor = (a + b) / 2;
      else if (filter == 4) {
        const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
        predictor = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      cur[i] = uint8_t(line[i] + predictor);
    }
    for (int64_t x = 0; x < img.width; ++x)
      for (int ch = 0; ch < 3; ++ch) img.rgb.push_back(cur[x * bpp + ch]);
    std::swap(prev, cur);
  }
  return img;
}

// Pixels within `tolerance` (per channel) of the color #rrggbb.
int64_t pixels_near(const Image& img, const std::string& hex, int tolerance = 12) {
  const int r = std::stoi(hex.substr(1, 2), nullptr, 16), g = std::stoi(hex.substr(3, 2), nullptr, 16),
            b = std::stoi(hex.substr(5, 2), nullptr, 16);
  int64_t n = 0;
  for (size_t i = 0; i + 2 < img.rgb.size(); i += 3)
    n += std::abs(img.rgb[i] - r) <= tolerance && std::abs(img.rgb[i + 1] - g) <= tolerance &&
         std::abs(img.rgb[i + 2] - b) <= tolerance;
  return n;
}

int64_t count(const std::string& text, const std::string& what) {
  int64_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

}  // namespace

// ==== metrics by hand ================================================================================================

TEST_CASE("analyze: a router that sends each domain to its own expert gives MI = H(domain)") {
  // Top-1: domain 0 only to expert 0, domain 1 only to expert 1, equal token counts -> MI = H(domain) = 1 bit.
  HandRouting r{2, {same({0}), same({1}), same({0}), same({1})}, {0, 1, 0, 1}};
  moe::LayerSpecialization s = r.run(2);
  CHECK(s.mi.bits == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(s.mi.domain_entropy_bits == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(s.mi.normalized == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(s.jsd[0][1] > 0.05);  // Q_0 = (0.7, 0.3) vs Q_1 = (0.3, 0.7)

  // Unequal domains (2 sequences of A, 1 of B): H(domain) = H(2/3, 1/3) and still MI = H.
  HandRouting uneven{3, {same({0}), same({0}), same({2})}, {0, 0, 1}};
  s = uneven.run(2);
  const double h = -(2.0 / 3) * std::log2(2.0 / 3) - (1.0 / 3) * std::log2(1.0 / 3);
  CHECK(s.mi.domain_entropy_bits == doctest::Approx(h).epsilon(1e-12));
  CHECK(s.mi.bits == doctest::Approx(h).epsilon(1e-12));

  // Top-2 with disjoint expert pairs: A -> {0, 1}, B -> {2, 3}: MI = 1 bit.
  HandRouting top2{4, {same({0, 1}), same({2, 3})}, {0, 1}};
  s = top2.run(2);
  CHECK(s.mi.bits == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(s.mi.normalized == doctest::Approx(1.0).epsilon(1e-12));
}

TEST_CASE("analyze: identical routing in every domain gives MI = 0, JSD = 0 and D_inter = 0") {
  // Both domains use experts 0, 1, 2 with the same proportions and the same probabilities.
  std::vector<std::vector<int32_t>> mix = {{0, 1}, {1, 2}, {2, 0}};
  HandRouting r{3, {mix, mix, mix}, {0, 1, 1}};
  moe::LayerSpecialization s = r.run(2);
  CHECK(s.mi.bits == doctest::Approx(0.0).epsilon(1e-12));
  CHECK(s.mi.normalized == doctest::Approx(0.0).epsilon(1e-12));
  CHECK(s.mi.domain_entropy_bits > 0.9);
  CHECK(s.jsd[0][1] == doctest::Approx(0.0).epsilon(1e-12));
  CHECK(s.mean_jsd == doctest::Approx(0.0).epsilon(1e-12));
  CHECK(s.divergence.inter == doctest::Approx(0.0).epsilon(1e-12));
  CHECK(s.inter_share() == doctest::Approx(0.0).epsilon(1e-9));
}

TEST_CASE("analyze: usage per domain and load by hand") {
  // E = 4, top-2. Domain 0: tokens {0,1}, {0,2}; domain 1: tokens {0,1}, {0,1}.
  HandRouting r{4, {{{0, 1}, {0, 2}}, {{0, 1}, {0, 1}}}, {0, 1}};
  moe::LayerSpecialization s = r.run(2);
  CHECK(s.slots == std::vector<std::vector<int64_t>>{{2, 1, 1, 0}, {2, 2, 0, 0}});
  CHECK(s.usage == std::vector<std::vector<double>>{{0.5, 0.25, 0.25, 0.0}, {0.5, 0.5, 0.0, 0.0}});
  CHECK(s.tokens == std::vector<int64_t>{2, 2});
  CHECK(s.sequences == std::vector<int64_t>{1, 1});
  // Load [4, 3, 1, 0]: mean 2, std sqrt((4 + 1 + 1 + 4) / 4), max-violation 4/2 - 1, one dead expert.
  CHECK(s.load.slots == std::vector<int64_t>{4, 3, 1, 0});
  CHECK(s.load.min == 0);
  CHECK(s.load.max == 4);
  CHECK(s.load.std == doctest::Approx(std::sqrt(2.5)));
  CHECK(s.load.max_violation == doctest::Approx(1.0));
  CHECK(s.load.dead == 1);
  const double entropy = -(0.5 * std::log(0.5) + 0.375 * std::log(0.375) + 0.125 * std::log(0.125)) / std::log(4.0);
  CHECK(s.load.entropy == doctest::Approx(entropy));
  // Mean dense probability of domain 0: first choices 0 and 0 get 0.7, the others 0.1 each.
  for (int e = 0; e < 4; ++e) CHECK(s.mean_prob[0][e] == doctest::Approx(e == 0 ? 0.7 : 0.1).epsilon(1e-6));

  // An even load: entropy 1, no violation, no dead expert.
  moe::LoadStats even = moe::load_stats({5, 5, 5, 5});
  CHECK(even.entropy == doctest::Approx(1.0));
  CHECK(even.max_violation == doctest::Approx(0.0));
  CHECK(even.std == 0.0);
  CHECK(even.dead == 0);

  // Sizes that do not fit and ids out of range are errors that say so.
  moe::DomainRoutingCounts counts(4, 2);
  std::vector<float> p(8, 0.25f);
  CHECK_THROWS_WITH(counts.add(p, std::vector<int32_t>{0, 7}, std::vector<int32_t>{0}),
                    doctest::Contains("expert id 7"));
  CHECK_THROWS_WITH(counts.add(p, std::vector<int32_t>{0, 1}, std::vector<int32_t>{3}),
                    doctest::Contains("domain id 3"));
  CHECK_THROWS_WITH(counts.add(std::vector<float>(7, 0.f), std::vector<int32_t>{0}, std::vector<int32_t>{0}),
                    doctest::Contains("do not fit"));
}

TEST_CASE("analyze: the JSD matrix is symmetric with a zero diagonal, and D_total = D_inter + D_intra") {
  // Three domains with random dense probabilities (one absent domain: its row stays 0).
  const int64_t E = 5, T = 4, B = 9;
  Tensor logits = testing::random({B * T, E}, 7, DType::F32, 2.0);
  std::vector<float> p = softmax(logits).to_vector<float>();
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < B * T; ++t) ids.push_back(static_cast<int32_t>(t % E));
  std::vector<int32_t> domains = {0, 1, 3, 0, 1, 3, 0, 3, 3};
  moe::DomainRoutingCounts counts(E, 4);
  counts.add(p, ids, domains);
  moe::LayerSpecialization s = moe::specialization(counts);
  double upper = 0;
  int pairs = 0;
  for (int a = 0; a < 4; ++a) {
    CHECK(s.jsd[a][a] == 0.0);
    for (int b = 0; b < 4; ++b) {
      CHECK(s.jsd[a][b] == s.jsd[b][a]);
      CHECK(s.jsd[a][b] >= 0.0);
      CHECK(s.jsd[a][b] <= std::log(2.0));
      if (a == 2 || b == 2) CHECK(s.jsd[a][b] == 0.0);  // absent
    }
  }
  for (int a : {0, 1, 3})
    for (int b : {0, 1, 3})
      if (a < b) upper += s.jsd[a][b], ++pairs;
  CHECK(s.mean_jsd == doctest::Approx(upper / pairs));
  CHECK(s.divergence.total == doctest::Approx(s.divergence.inter + s.divergence.intra).epsilon(1e-12));
  CHECK(s.inter_share() > 0.0);
  CHECK(s.inter_share() <= 1.0);

  // Disjoint mean distributions: JSD = ln 2 (its maximum).
  HandRouting disjoint{2, {same({0}), same({1})}, {0, 1}, 1.0};
  CHECK(disjoint.run(2).jsd[0][1] == doctest::Approx(std::log(2.0)).epsilon(1e-9));
}

TEST_CASE("analyze: identical experts give output similarity 1 and parameter variance 0") {
  Generator gen(3);
  moe::Experts experts(3, 8, 16, gen, 0.2, 0.2);
  for (Tensor* w : {&experts.w_gate, &experts.w_up, &experts.w_down}) {
    float* data = w->data<float>();
    const int64_t per_expert = w->numel() / 3;
    for (int64_t e = 1; e < 3; ++e) std::copy(data, data + per_expert, data + e * per_expert);
  }
  moe::OutputSimilarity sim = moe::expert_output_similarity(experts, testing::random({10, 8}, 5, DType::F32));
  CHECK(sim.mean == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(sim.centered_mean == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(sim.cka_mean == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(moe::normalized_parameter_variance(experts).all == doctest::Approx(0.0).epsilon(1e-12));
}

// ---- output similarity against naive loops over tokens ----------------------------------------------------------------

namespace {

using Matrix = std::vector<std::vector<double>>;  // [rows][cols]

Matrix rows_of(const std::vector<double>& flat, int64_t n, int64_t d) {
  Matrix m(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(d)));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c) m[i][c] = flat[static_cast<size_t>(i * d + c)];
  return m;
}

std::vector<double> flat_of(const Matrix& m) {
  std::vector<double> out;
  for (const auto& row : m) out.insert(out.end(), row.begin(), row.end());
  return out;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t c = 0; c < a.size(); ++c) s += a[c] * b[c];
  return s;
}

// Each column minus its mean over the rows.
Matrix centered(Matrix m) {
  for (size_t c = 0; c < m[0].size(); ++c) {
    double mean = 0;
    for (const auto& row : m) mean += row[c];
    mean /= static_cast<double>(m.size());
    for (auto& row : m) row[c] -= mean;
  }
  return m;
}

// Linear CKA in the token (N x N) form, HSIC(K_a, K_b) / sqrt(HSIC(K_a, K_a) HSIC(K_b, K_b)) with K = X X^T of the
// centered outputs: a loop over token pairs, independent of the d x d form the library uses.
double naive_cka(const Matrix& a, const Matrix& b) {
  const Matrix ca = centered(a), cb = centered(b);
  double ab = 0, aa = 0, bb = 0;
  for (size_t n = 0; n < ca.size(); ++n)
    for (size_t m = 0; m < ca.size(); ++m) {
      const double ka = dot(ca[n], ca[m]), kb = dot(cb[n], cb[m]);
      ab += ka * kb, aa += ka * ka, bb += kb * kb;
    }
  return ab / std::sqrt(aa * bb);
}

// Mean over tokens of cos(a[n], b[n]).
double naive_cosine(const Matrix& a, const Matrix& b) {
  double s = 0;
  for (size_t n = 0; n < a.size(); ++n) s += dot(a[n], b[n]) / std::sqrt(dot(a[n], a[n]) * dot(b[n], b[n]));
  return s / static_cast<double>(a.size());
}

// SwiGLU of expert e on every row of x, by loops over the weights (f64): [N][d].
Matrix naive_expert_output(const moe::Experts& experts, int64_t e, const Matrix& x) {
  const int64_t h = experts.w_gate.size(1), d = experts.w_gate.size(2);
  const std::vector<double> gate = testing::as_doubles(experts.w_gate), up = testing::as_doubles(experts.w_up),
                            down = testing::as_doubles(experts.w_down);
  Matrix out(x.size(), std::vector<double>(static_cast<size_t>(d), 0.0));
  for (size_t n = 0; n < x.size(); ++n)
    for (int64_t k = 0; k < h; ++k) {
      double g = 0, u = 0;
      for (int64_t c = 0; c < d; ++c) {
        g += gate[static_cast<size_t>((e * h + k) * d + c)] * x[n][c];
        u += up[static_cast<size_t>((e * h + k) * d + c)] * x[n][c];
      }
      const double act = g / (1 + std::exp(-g)) * u;
      for (int64_t c = 0; c < d; ++c) out[n][c] += down[static_cast<size_t>((e * d + c) * h + k)] * act;
    }
  return out;
}

// A Householder reflection I - 2 v v^T / |v|^2 [d][d]: orthogonal.
Matrix reflection(int64_t d, uint64_t seed) {
  const std::vector<double> v = testing::as_doubles(testing::random({d}, seed));
  Matrix r(static_cast<size_t>(d), std::vector<double>(static_cast<size_t>(d)));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) r[i][j] = (i == j ? 1.0 : 0.0) - 2 * v[i] * v[j] / dot(v, v);
  return r;
}

Matrix times(const Matrix& a, const Matrix& b) {  // a [n][k] @ b [k][m]
  Matrix out(a.size(), std::vector<double>(b[0].size(), 0.0));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t k = 0; k < b.size(); ++k)
      for (size_t j = 0; j < b[0].size(); ++j) out[i][j] += a[i][k] * b[k][j];
  return out;
}

}  // namespace

TEST_CASE("analyze: CKA and centered cosine of expert outputs equal naive loops over tokens (E=3, d=5, N=37)") {
  const int64_t E = 3, d = 5, h = 7, N = 37;
  Generator gen(11);
  moe::Experts experts(E, d, h, gen, 0.5, 0.5);
  for (Tensor* w : {&experts.w_gate, &experts.w_up, &experts.w_down}) *w = to_dtype(*w, DType::F64);
  // Expert 1 = expert 0 with its outputs rotated (reflected) and scaled by 2: W_down,1 = 2 R W_down,0, so
  // out_1 = 2 R out_0 and X_1 = 2 X_0 R^T. CKA sees the same expert; the cosines do not.
  {
    const Matrix r = reflection(d, 21);
    std::vector<double> gate = testing::as_doubles(experts.w_gate), up = testing::as_doubles(experts.w_up),
                        down = testing::as_doubles(experts.w_down);
    std::copy(gate.begin(), gate.begin() + h * d, gate.begin() + h * d);
    std::copy(up.begin(), up.begin() + h * d, up.begin() + h * d);
    const Matrix down0 = rows_of(std::vector<double>(down.begin(), down.begin() + d * h), d, h);  // [d][h]
    const std::vector<double> down1 = flat_of(times(r, down0));
    for (size_t i = 0; i < down1.size(); ++i) down[static_cast<size_t>(d * h) + i] = 2 * down1[i];
    experts.w_gate = from_vector(gate, {E, h, d});
    experts.w_up = from_vector(up, {E, h, d});
    experts.w_down = from_vector(down, {E, d, h});
  }
  const Tensor x = testing::random({N, d}, 5);
  const Matrix xs = rows_of(testing::as_doubles(x), N, d);
  std::vector<Matrix> out;
  for (int64_t e = 0; e < E; ++e) out.push_back(naive_expert_output(experts, e, xs));

  moe::OutputSimilarity sim = moe::expert_output_similarity(experts, x);
  CHECK(sim.tokens == N);
  double cka_total = 0, centered_total = 0, cosine_total = 0;
  for (int64_t i = 0; i < E; ++i) {
    CHECK(sim.cka_pair[i][i] == 1.0);
    CHECK(sim.centered_pair[i][i] == 1.0);
    for (int64_t j = i + 1; j < E; ++j) {
      CAPTURE(i);
      CAPTURE(j);
      const double cka = naive_cka(out[i], out[j]);
      const double centered_cos = naive_cosine(centered(out[i]), centered(out[j]));
      const double cos = naive_cosine(out[i], out[j]);
      MESSAGE("pair " << i << "," << j << ": CKA " << sim.cka_pair[i][j] << " (naive " << cka << "), centered cos "
                      << sim.centered_pair[i][j] << " (naive " << centered_cos << "), cos " << sim.pair[i][j]);
      CHECK(sim.cka_pair[i][j] == doctest::Approx(cka).epsilon(1e-10));
      CHECK(sim.cka_pair[j][i] == sim.cka_pair[i][j]);
      CHECK(sim.centered_pair[i][j] == doctest::Approx(centered_cos).epsilon(1e-10));
      CHECK(sim.centered_pair[j][i] == sim.centered_pair[i][j]);
      CHECK(sim.pair[i][j] == doctest::Approx(cos).epsilon(1e-10));
      cka_total += cka, centered_total += centered_cos, cosine_total += cos;
    }
  }
  CHECK(sim.cka_mean == doctest::Approx(cka_total / 3).epsilon(1e-10));
  CHECK(sim.centered_mean == doctest::Approx(centered_total / 3).epsilon(1e-10));
  CHECK(sim.mean == doctest::Approx(cosine_total / 3).epsilon(1e-10));
  // The rotated and scaled copy: CKA 1 while its cosines are well below.
  CHECK(sim.cka_pair[0][1] == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(sim.pair[0][1] < 0.99);
  CHECK(sim.centered_pair[0][1] < 0.99);
  CHECK(sim.cka_pair[0][2] < 0.99);
}

TEST_CASE("analyze: linear CKA is 1 for a matrix with itself and its rotation, and ignores constant offsets") {
  const int64_t n = 37, d = 5;
  const std::vector<double> a = testing::as_doubles(testing::random({n, d}, 31)),
                            b = testing::as_doubles(testing::random({n, d}, 32));
  const double ab = moe::linear_cka(a, b, n, d);
  MESSAGE("CKA of two random 37 x 5 matrices: " << ab);
  CHECK(ab == doctest::Approx(naive_cka(rows_of(a, n, d), rows_of(b, n, d))).epsilon(1e-12));
  CHECK(ab > 0.0);
  CHECK(ab < 0.5);
  CHECK(moe::linear_cka(a, a, n, d) == doctest::Approx(1.0).epsilon(1e-14));
  CHECK(moe::linear_cka(b, a, n, d) == doctest::Approx(ab).epsilon(1e-14));
  // A X R with R orthogonal, also scaled: the same representation.
  Matrix rotated = times(rows_of(a, n, d), reflection(d, 33));
  for (auto& row : rotated)
    for (double& v : row) v *= 3.5;
  CHECK(moe::linear_cka(a, flat_of(rotated), n, d) == doctest::Approx(1.0).epsilon(1e-12));
  // A constant vector added to every row of b: the centering removes it.
  const std::vector<double> offset = {5.0, -3.0, 0.5, 100.0, 2.0};
  std::vector<double> shifted = b;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < d; ++c) shifted[static_cast<size_t>(i * d + c)] += offset[static_cast<size_t>(c)];
  CHECK(moe::linear_cka(a, shifted, n, d) == doctest::Approx(ab).epsilon(1e-10));
  // A constant matrix has nothing left after centering: CKA 0, not NaN.
  CHECK(moe::linear_cka(a, std::vector<double>(n * d, 2.0), n, d) == 0.0);
  testing::check_mentions(error_of([&] { moe::linear_cka(a, b, n, d + 1); }), {"linear_cka", "37 * 6"});
}

// ==== a trained run ==================================================================================================

TEST_CASE("analyze: a trained run end to end agrees with the trainer's routing statistics") {
  TrainedRuns& runs = trained();
  AnalyzeOptions options = runs.options();
  options.max_batches = 1;  // one batch: the pooled metrics equal routing_stats() of that batch
  options.trace_text = "x = 1,2,3;\nHELLO привет";
  RunAnalysis run = analyze_run(runs.ed, options);
  CHECK(run.name == "ed");
  CHECK(run.step == 40);
  CHECK(run.domains.size() == 4);
  CHECK(run.experts == 4);
  CHECK(run.top_k == 2);
  REQUIRE(run.layers.size() == 2);
  CHECK(run.log.train_lines == 40);
  CHECK(run.log.eval_lines == 2);
  CHECK(run.log.train.at("loss").size() == 40);
  CHECK(run.log.train.at("routing/mean_jsd").size() == 40);  // averaged over the MoE layers
  CHECK(run.log.train.at("ce_domain/code").size() > 30);     // batches without a domain have no value
  CHECK(run.log.eval.at("ce").size() == 2);
  CHECK(std::isfinite(run.ce));

  // The same batch through the routing statistics the trainer logs (moe/analysis/routing_stats.*).
  LoadedCheckpoint loaded = load_checkpoint(runs.ed / "checkpoints" / "final");
  EvalOptions eval_options;
  eval_options.data_dir = options.data_dir;
  TrainingData data = prepare_eval_data(loaded, eval_options);
  EvalSet set = make_eval_set(data.validation, *data.tokenizer, loaded.config.batch_size, 1);
  REQUIRE(set.batches.size() == 1);
  const data::Batch& b = set.batches[0];
  Tensor domains = from_vector(b.domains, {b.B});
  {
    NoGradGuard no_grad;
    loaded.model->loss(from_vector(b.inputs, {b.B, b.T}), from_vector(b.targets, {int64_t(b.B) * b.T}), domains, 4);
  }
  std::vector<moe::RoutingStats> expected = moe::routing_stats(loaded.model->moe_layers(), domains, 4);
  for (size_t l = 0; l < 2; ++l) {
    const LayerAnalysis& a = run.layers[l];
    const moe::LayerSpecialization& r = a.routing;
    CAPTURE(l);
    CHECK(a.layer == static_cast<int64_t>(l));
    CHECK(r.load.min == expected[l].tokens_min);
    CHECK(r.load.max == expected[l].tokens_max);
    CHECK(r.load.std == doctest::Approx(expected[l].tokens_std));
    CHECK(r.load.entropy == doctest::Approx(expected[l].load_entropy));
    CHECK(r.load.dead == expected[l].dead_experts);
    CHECK(r.mean_jsd == doctest::Approx(expected[l].mean_pairwise_jsd).epsilon(1e-6));
    CHECK(r.divergence.inter == doctest::Approx(expected[l].d_inter).epsilon(1e-6));
    CHECK(r.divergence.total == doctest::Approx(expected[l].d_total).epsilon(1e-6));
    for (const auto& row : r.usage) {
      double total = 0;
      for (double v : row) total += v;
      CHECK((total == doctest::Approx(1.0) || total == 0.0));
    }
    CHECK(r.mi.bits <= r.mi.domain_entropy_bits + 1e-12);
    CHECK(a.similarity.tokens == 64);
    CHECK(a.similarity.mean < 0.999);  // trained experts differ
    CHECK(a.similarity.centered_mean < 0.999);
    CHECK(a.similarity.cka_mean > 0.0);
    CHECK(a.similarity.cka_mean < 0.999);
    REQUIRE(a.similarity.cka_pair.size() == 4);
    CHECK(a.similarity.cka_pair[2][2] == 1.0);
    // The relative dPPL is the layer's dPPL over the PPL of the same tokens: mean_pi PPL_pi / PPL - 1.
    CHECK(a.relative_dppl == doctest::Approx(a.dppl / std::exp(run.ce)).epsilon(1e-9));
    for (size_t d = 0; d < run.domains.size(); ++d)
      if (std::isfinite(a.dppl_domain[d]))
        CHECK(a.relative_dppl_domain[d] ==
              doctest::Approx(a.dppl_domain[d] / std::exp(run.ce_domain[d])).epsilon(1e-9));
    CHECK(a.variance.all > 0.1);
    CHECK(std::isfinite(a.dppl));
  }
  // The trace: one piece per token, and each layer's choices for each.
  REQUIRE(run.trace.has_value());
  std::string joined;
  for (const std::string& piece : run.trace->pieces) joined += piece;
  CHECK(joined == options.trace_text);
  for (size_t l = 0; l < 2; ++l) {
    REQUIRE(run.trace->experts[l].size() == run.trace->pieces.size());
    CHECK(run.trace->experts[l][0].size() == 2);
  }

  // The files: JSON with every layer, CSVs with their headers and one row per (layer, domain, expert).
  fs::path out = runs.dir / "out";
  std::vector<fs::path> files = write_analysis_files({run}, out);
  CHECK(files.size() == 4);
  std::ifstream json_in(out / "analysis.json");
  nlohmann::json j = nlohmann::json::parse(json_in);
  CHECK(j["runs"][0]["layers"].size() == 2);
  CHECK(j["runs"][0]["layers"][0]["routing"]["jsd"].size() == 4);
  CHECK(j["runs"][0]["layers"][1]["output_similarity"]["cka_pair"].size() == 4);
  CHECK(j["runs"][0]["layers"][1]["output_similarity"]["centered_mean"].get<double>() ==
        run.layers[1].similarity.centered_mean);
  CHECK(j["runs"][0]["layers"][1]["dppl"]["relative_overall"].get<double>() == run.layers[1].relative_dppl);
  CHECK(j["runs"][0]["layers"][1]["dppl"]["relative_domains"].size() == 4);
  std::ifstream layers_csv(out / "ed" / "layers.csv");
  std::string header;
  std::getline(layers_csv, header);
  for (const char* column : {",output_similarity,output_similarity_centered,output_cka,nv,", ",dppl,dppl_relative"})
    CHECK_MESSAGE(header.find(column) != std::string::npos, header);
  std::ifstream usage(out / "ed" / "usage.csv");
  std::string line;
  int lines = 0;
  std::getline(usage, line);
  CHECK(line == "layer,domain,expert,slots,share,mean_prob");
  while (std::getline(usage, line)) ++lines;
  CHECK(lines == 2 * 4 * 4);
  const std::string summary = terminal_summary({run});
  for (const char* text : {"MI bits", "cen-cos", "CKA", "rel-dPPL", "share an init"})
    CHECK_MESSAGE(summary.find(text) != std::string::npos, "summary lacks " << text << ":\n" << summary);
}

TEST_CASE("analyze: the report has every section and figure, compares runs and escapes text") {
  TrainedRuns& runs = trained();
  AnalyzeOptions options = runs.options();
  options.trace_text = "<script>alert(1)</script> a&b";
  RunAnalysis base = analyze_run(runs.base, options), ed = analyze_run(runs.ed, options);
  ed.name = "<b>ed</b> & co";
  std::string html = render_report({base, ed});
  for (const char* id : {"summary", "curves", "by-layer", "layers", "heatmaps", "trace", "config", "glossary"})
    CHECK_MESSAGE(html.find(std::string("id=\"") + id + "\"") != std::string::npos, "no section " << id);
  // 9 training curves + 4 domain CE charts + 10 by-layer charts + 2 runs x 2 layers x (usage + JSD) heatmaps.
  CHECK(count(html, "<svg") == 9 + 4 + 10 + 2 * 2 * 2);
  // CKA, centered cosine and relative dPPL next to the cosine and dPPL; NV's caveat in the summary, the by-layer
  // charts, the table and the glossary, naming the runs (both from random inits) and (E-1)/E for E = 4.
  for (const char* text : {"output CKA", "centered cosine", "relative dPPL", "<th>CKA</th>", "<th>cen-cos</th>",
                           "<th>rel. dPPL</th>", "expert output linear CKA", "<dt>output CKA</dt>"})
    CHECK_MESSAGE(html.find(text) != std::string::npos, "the report lacks " << text);
  // The summary's tooltip and note, the by-layer note and the table's note; the glossary says it too.
  CHECK(count(html, "meaningful only when the experts share an init") == 4);
  CHECK(html.find("Meaningful only when the experts share an init") > html.find("<dt>NV</dt>"));
  CHECK(html.find("independent random inits here: baseline (E = 4: about 0.750)") != std::string::npos);
  CHECK(count(html, "class=\"trace\"") == 2 * 2);
  CHECK(html.find("&lt;b&gt;ed&lt;/b&gt; &amp; co") != std::string::npos);
  CHECK(html.find("<b>ed</b>") == std::string::npos);
  CHECK(html.find("<script") == std::string::npos);
  CHECK(html.find("&lt;</span>") != std::string::npos);  // the traced "<", one span per byte token
  CHECK(html.find("http://") == std::string::npos);      // self-contained: nothing to fetch
  CHECK(html.find("https://") == std::string::npos);
  CHECK(html_escape("a<b & 'c' \"d\"") == "a&lt;b &amp; &#39;c&#39; &quot;d&quot;");
  CHECK(valid_utf8("ok \xD0") == "ok \xEF\xBF\xBD");

  // Rendered in a real browser: headless Chromium takes a screenshot that is not blank and shows the charts of both
  // runs in their colors (scripts/screenshot_report.sh is the command the docs give).
  const char* browser = std::getenv("CHROMIUM");
  if (!(browser && *browser) && !fs::exists("/usr/bin/chromium")) {
    MESSAGE("skipped the screenshot: no /usr/bin/chromium (apt-get install chromium)");
    return;
  }
  fs::path out = runs.dir / "report";
  fs::create_directories(out);
  std::ofstream(out / "report.html") << html;
  const fs::path png = out / "report.png";
  const std::string cmd = testing::shell_quote((testing::source_dir() / "scripts/screenshot_report.sh").string()) +
                          " " + testing::shell_quote((out / "report.html").string()) + " " +
                          testing::shell_quote(png.string()) + " 1280 2000 > " +
                          testing::shell_quote((out / "chromium.log").string()) + " 2>&1";
  const int status = std::system(cmd.c_str());
  std::ifstream log_in(out / "chromium.log");
  std::string log((std::istreambuf_iterator<char>(log_in)), std::istreambuf_iterator<char>());
  REQUIRE_MESSAGE(status == 0, "screenshot failed: " << log);
  Image img = read_png(png, out);
  CHECK(img.width == 1280);
  CHECK(img.height == 2000);
  double mean = 0, var = 0;
  for (uint8_t v : img.rgb) mean += v;
  mean /= static_cast<double>(img.rgb.size());
  for (uint8_t v : img.rgb) var += (v - mean) * (v - mean);
  var /= static_cast<double>(img.rgb.size());
  CHECK_MESSAGE(std::sqrt(var) > 20, "the screenshot is (nearly) uniform: std " << std::sqrt(var));
  CHECK(pixels_near(img, "#1d2430") > 20000);  // the dark header band
  CHECK(pixels_near(img, "#2f6fdf") > 500);    // run 1's lines and chips
  CHECK(pixels_near(img, "#e4572e") > 500);    // run 2's
}

// ==== errors =========================================================================================================

TEST_CASE("analyze: missing files, a mismatched checkpoint and a corpus without domains fail clearly") {
  TrainedRuns& runs = trained();
  AnalyzeOptions options = runs.options();
  const fs::path dir = runs.dir / "bad";
  fs::create_directories(dir / "no_log");
  CHECK_THROWS_WITH(analyze_run(dir / "nowhere", options), doctest::Contains("no such folder"));
  CHECK_THROWS_WITH(analyze_run(dir / "no_log", options), doctest::Contains("no metrics.jsonl"));

  // A run folder without the asked-for checkpoint: the message lists the ones present.
  options.checkpoint = "step_000999";
  std::string message = error_of([&] { analyze_run(runs.base, options); });
  CHECK(message.find("no checkpoint 'step_000999'") != std::string::npos);
  CHECK(message.find("present: final") != std::string::npos);
  options.checkpoint = "final";

  // A checkpoint whose stored config does not fit its tensors.
  const fs::path mismatched = dir / "mismatched";
  fs::create_directories(mismatched / "checkpoints" / "final");
  fs::copy_file(runs.base / "metrics.jsonl", mismatched / "metrics.jsonl");
  nn::SafeTensors st = nn::load_safetensors(runs.base / "checkpoints" / "final" / "model.safetensors");
  nlohmann::json config = nlohmann::json::parse(st.metadata.at("config"));
  config["d_model"] = 64;
  st.metadata["config"] = config.dump();
  nn::save_safetensors(mismatched / "checkpoints" / "final" / "model.safetensors", st.tensors, st.metadata);
  message = error_of([&] { analyze_run(mismatched, options); });
  CHECK(message.find("mismatched") != std::string::npos);
  CHECK(message.find("do not match its model config") != std::string::npos);

  // A corpus whose documents have no domain label, and one with a single domain.
  const fs::path no_domains = dir / "no_domains.jsonl", one_domain = dir / "one_domain.jsonl";
  {
    std::ofstream a(no_domains), b(one_domain);
    for (int i = 0; i < 60; ++i) {
      std::string text = "document " + std::to_string(i) + std::string(200, 'a' + i % 26);
      a << nlohmann::json{{"text", text}}.dump() << "\n";
      b << nlohmann::json{{"text", text}, {"domain", "only"}}.dump() << "\n";
    }
  }
  options.corpus = no_domains.string();
  CHECK_THROWS_WITH(analyze_run(runs.base, options), doctest::Contains("missing key 'domain'"));
  options.corpus = one_domain.string();
  CHECK_THROWS_WITH(analyze_run(runs.base, options), doctest::Contains("need at least 2"));
}

TEST_CASE("analyze: negative counts, a path as checkpoint name and a --data-dir that is a file are refused") {
  AnalyzeOptions options;
  CHECK(options.similarity_tokens == 4096);  // the default output-similarity sample
  options.similarity_tokens = -1;
  testing::check_mentions(error_of([&] { validate(options); }), {"--similarity-tokens must be >= 0", "got -1"});
  // analyze_run checks them before it reads anything.
  testing::check_mentions(error_of([&] { analyze_run("/nowhere", options); }), {"--similarity-tokens"});
  options = {};
  options.max_batches = -3;
  testing::check_mentions(error_of([&] { validate(options); }), {"--max-batches must be >= 0", "got -3"});
  options = {};
  options.checkpoint = "../elsewhere";
  testing::check_mentions(error_of([&] { validate(options); }), {"--checkpoint", "got '../elsewhere'"});
  testing::ScratchDir dir("analyze_flags");
  std::ofstream(dir / "file") << "x";
  options = {};
  options.data_dir = dir / "file";
  testing::check_mentions(error_of([&] { validate(options); }), {"--data-dir", "is not a folder"});
}

TEST_CASE("analyze: a non-finite metric is reported by name; NaN for a domain without tokens is not") {
  RunAnalysis run;
  run.run_dir = "runs/x";
  run.domains = {"a", "b"};
  run.experts = 4;
  run.permutations = 1;
  run.ce_domain = {2.0, NAN};  // domain b has no held-out tokens
  run.ce = 2.0;
  LayerAnalysis layer;
  layer.layer = 1;
  layer.routing.tokens = {10, 0};
  layer.dppl_domain = {0.5, NAN};
  layer.dppl = 0.5;
  layer.relative_dppl_domain = {0.1, NAN};
  layer.relative_dppl = 0.1;
  layer.similarity.tokens = 64;
  run.layers.push_back(layer);
  CHECK_NOTHROW(check_finite_results(run));
  run.layers[0].similarity.cka_mean = NAN;
  run.layers[0].relative_dppl_domain[0] = INFINITY;
  testing::check_mentions(
      error_of([&] { check_finite_results(run); }),
      {"2 non-finite results", "output CKA of layer 1 = nan", "relative dPPL of layer 1 on 'a' = inf"});
  run.layers[0].similarity.cka_mean = 0.5;
  run.layers[0].relative_dppl_domain[0] = 0.1;

  run.layers[0].routing.mi.bits = NAN;
  run.layers[0].dppl = INFINITY;
  testing::check_mentions(
      error_of([&] { check_finite_results(run); }),
      {"run 'runs/x'", "2 non-finite results", "mutual information of layer 1 = nan", "dPPL of layer 1 = inf"});
  run.ce_domain[0] = NAN;
  testing::check_mentions(error_of([&] { check_finite_results(run); }), {"CE of 'a' = nan"});
}

TEST_CASE("analyze: a torn last line of the metrics log is left out, a bad line before it is an error") {
  testing::ScratchDir dir("moelab_metrics_log");
  const fs::path log = dir / "metrics.jsonl";
  std::ofstream(log) << "{\"step\": 1, \"loss\": 2.5}\n{\"step\": 2, \"loss\": 2.0}\n{\"step\": 3, \"lo";
  const apps::MetricsLog read = apps::read_metrics_log(log);
  CHECK(read.train_lines == 2);
  CHECK(read.train.at("loss") == apps::MetricsLog::Points{{1, 2.5}, {2, 2.0}});
  std::ofstream(log) << "{\"step\": 1, \"loss\": 2.5}\n{\"step\": 3, \"lo\n{\"step\": 2, \"loss\": 2.0}\n";
  testing::check_mentions(testing::error_of([&] { apps::read_metrics_log(log); }),
                          {"metrics.jsonl:2", "not a metrics line"});
}
