#include "moe/analysis/expert_metrics.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "engine/ops.h"

namespace moelab::moe {

namespace {

using PairMatrix = std::vector<std::vector<double>>;

// Each expert's outputs on every token, f64 on the host: out[e] [N, d] = SwiGLU_e(x) without the router's gate. One
// expert at a time, so only one expert's [N, h] activations are alive at once (N is thousands of tokens).
std::vector<Tensor> expert_outputs(const Experts& experts, const Tensor& x) {
  NoGradGuard no_grad;
  const int64_t E = experts.w_gate.size(0), d = experts.w_gate.size(2);
  if (x.dim() != 2 || x.size(1) != d)
    throw std::invalid_argument(fmt::format("expert_output_similarity: x must be [N, {}], got {}", d, x.str()));
  Tensor xs = to_device(to_dtype(x.detach(), experts.w_gate.dtype()), experts.w_gate.device());  // [N, d]
  auto expert = [](const Tensor& w, int64_t e) {
    return reshape(slice_rows(w.detach(), e, e + 1), {w.size(1), w.size(2)});
  };
  std::vector<Tensor> out;
  for (int64_t e = 0; e < E; ++e) {
    Tensor act = mul(silu(matmul(xs, expert(experts.w_gate, e), false, true)),
                     matmul(xs, expert(experts.w_up, e), false, true));  // [N, h]
    Tensor y = matmul(act, expert(experts.w_down, e), false, true);      // [N, d]
    out.push_back(to_device(to_dtype(y, DType::F64), Device::CPU));
  }
  return out;
}

// x [N, d] minus its mean row: each feature centered over the tokens.
Tensor center_tokens(const Tensor& x) { return sub(x, mean(x, 0, true)); }

// |x[n]| for every row of x [N, d] (f64, CPU).
std::vector<double> row_norms(const Tensor& x) {
  const int64_t N = x.size(0), d = x.size(1);
  const double* p = x.data<double>();
  std::vector<double> norms(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    double s = 0;
    for (int64_t c = 0; c < d; ++c) s += p[n * d + c] * p[n * d + c];
    norms[static_cast<size_t>(n)] = std::sqrt(s);
  }
  return norms;
}

// mean_n cos(a[n], b[n]) for a, b [N, d] with their row norms; a zero row counts 0 (it has no direction).
double mean_token_cosine(const Tensor& a, const std::vector<double>& norm_a, const Tensor& b,
                         const std::vector<double>& norm_b) {
  const int64_t N = a.size(0), d = a.size(1);
  if (N == 0) return 0.0;
  const double *pa = a.data<double>(), *pb = b.data<double>();
  double total = 0;
  for (int64_t n = 0; n < N; ++n) {
    const double norms = norm_a[static_cast<size_t>(n)] * norm_b[static_cast<size_t>(n)];
    if (norms == 0) continue;
    double dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += pa[n * d + c] * pb[n * d + c];
    total += dot / norms;
  }
  return total / static_cast<double>(N);
}

// ||a^T b||_F^2 for a, b [N, d]: through the d x d cross-covariance, O(N d^2); the N x N Gram form tr(K_a K_b) gives
// the same number at O(N^2 d), more while N > d (thousands of tokens, d up to 512). The GEMM uses every thread.
double cross_covariance_norm2(const Tensor& a, const Tensor& b) {
  Tensor c = matmul(a, b, /*trans_a=*/true);  // [d, d]
  return sum(mul(c, c)).item();
}

// CKA from ||A^T B||_F^2 and the self terms ||A^T A||_F^2, ||B^T B||_F^2 (all of centered A, B).
double cka(double cross2, double self_a2, double self_b2) {
  const double denominator = std::sqrt(self_a2) * std::sqrt(self_b2);
  return denominator > 0 ? cross2 / denominator : 0.0;
}

// m[i][j] = m[j][i] = value(i, j) for every pair i < j, 1 on the diagonal; returns the mean over the pairs (1 for
// one expert: nothing differs).
template <class Value> double fill_pairs(int64_t E, PairMatrix& m, Value value) {
  m.assign(static_cast<size_t>(E), std::vector<double>(static_cast<size_t>(E), 1.0));
  double total = 0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = i + 1; j < E; ++j) {
      m[i][j] = m[j][i] = value(i, j);
      total += m[i][j];
    }
  return E > 1 ? total / static_cast<double>(E * (E - 1) / 2) : 1.0;
}

}  // namespace

double linear_cka(const std::vector<double>& a, const std::vector<double>& b, int64_t n, int64_t d) {
  if (n < 0 || d < 0 || a.size() != static_cast<size_t>(n * d) || b.size() != static_cast<size_t>(n * d))
    throw std::invalid_argument(
        fmt::format("linear_cka: a and b must hold n * d = {} * {} values, got {} and {}", n, d, a.size(), b.size()));
  if (n == 0 || d == 0) return 0.0;
  NoGradGuard no_grad;
  Tensor ca = center_tokens(from_vector(a, {n, d})), cb = center_tokens(from_vector(b, {n, d}));
  return cka(cross_covariance_norm2(ca, cb), cross_covariance_norm2(ca, ca), cross_covariance_norm2(cb, cb));
}

OutputSimilarity expert_output_similarity(const Experts& experts, const Tensor& x) {
  std::vector<Tensor> out = expert_outputs(experts, x);  // [E] x [N, d]
  NoGradGuard no_grad;
  const int64_t E = static_cast<int64_t>(out.size());
  std::vector<Tensor> centered;
  std::vector<std::vector<double>> norms, centered_norms;
  std::vector<double> self2;  // ||X_e^T X_e||_F^2 of the centered outputs, once per expert
  for (const Tensor& o : out) {
    centered.push_back(center_tokens(o));
    norms.push_back(row_norms(o));
    centered_norms.push_back(row_norms(centered.back()));
    self2.push_back(cross_covariance_norm2(centered.back(), centered.back()));
  }
  // The raw cosine, as before; the centered one without the mean direction that trained experts' outputs share (it
  // dominates the raw cosine); CKA on the same centered outputs, blind to rotations and isotropic scaling.
  OutputSimilarity r;
  r.tokens = x.size(0);
  r.mean = fill_pairs(E, r.pair,
                      [&](int64_t i, int64_t j) { return mean_token_cosine(out[i], norms[i], out[j], norms[j]); });
  r.centered_mean = fill_pairs(E, r.centered_pair, [&](int64_t i, int64_t j) {
    return mean_token_cosine(centered[i], centered_norms[i], centered[j], centered_norms[j]);
  });
  r.cka_mean = fill_pairs(E, r.cka_pair, [&](int64_t i, int64_t j) {
    return cka(cross_covariance_norm2(centered[i], centered[j]), self2[i], self2[j]);
  });
  return r;
}

// Sums over the columns c of one stack w [E, C]: sum_c Var_i(w[i][c]) and sum_{i,c} w[i][c]^2.
struct VarianceSums {
  double variance = 0, squares = 0;
  int64_t columns = 0, values = 0;
  double nv() const {
    return squares > 0 ? (variance / static_cast<double>(columns)) / (squares / static_cast<double>(values)) : 0.0;
  }
};

static VarianceSums variance_sums(const Tensor& w) {
  if (w.dim() < 2) throw std::invalid_argument("normalized_parameter_variance: needs a stack [E, ...], got " + w.str());
  Tensor host = to_device(to_dtype(w.detach(), DType::F64), Device::CPU);
  const int64_t E = w.size(0), C = w.numel() / E;
  const double* p = host.data<double>();
  VarianceSums s;
  s.columns = C;
  s.values = E * C;
  for (int64_t c = 0; c < C; ++c) {
    double mean = 0;
    for (int64_t i = 0; i < E; ++i) mean += p[i * C + c];
    mean /= static_cast<double>(E);
    double var = 0;
    for (int64_t i = 0; i < E; ++i) {
      double v = p[i * C + c];
      var += (v - mean) * (v - mean);
      s.squares += v * v;
    }
    s.variance += var / static_cast<double>(E);
  }
  return s;
}

double normalized_parameter_variance(const Tensor& w) { return variance_sums(w).nv(); }

ParameterVariance normalized_parameter_variance(const Experts& experts) {
  VarianceSums g = variance_sums(experts.w_gate), u = variance_sums(experts.w_up), d = variance_sums(experts.w_down);
  VarianceSums all{g.variance + u.variance + d.variance, g.squares + u.squares + d.squares,
                   g.columns + u.columns + d.columns, g.values + u.values + d.values};
  return {g.nv(), u.nv(), d.nv(), all.nv()};
}

}  // namespace moelab::moe
