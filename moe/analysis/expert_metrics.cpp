#include "moe/analysis/expert_metrics.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "engine/ops.h"

namespace moelab::moe {

OutputSimilarity expert_output_similarity(const Experts& experts, const Tensor& x) {
  NoGradGuard no_grad;
  const int64_t E = experts.w_gate.size(0), d = experts.w_gate.size(2);
  if (x.dim() != 2 || x.size(1) != d)
    throw std::invalid_argument(fmt::format("expert_output_similarity: x must be [N, {}], got {}", d, x.str()));
  Tensor xs = to_device(to_dtype(x.detach(), experts.w_gate.dtype()), experts.w_gate.device());
  // All experts on all tokens at once: [E, h, d] @ [N, d]^T -> [E, h, N], then [E, d, h] @ [E, h, N] -> [E, d, N].
  Tensor act = mul(silu(matmul(experts.w_gate.detach(), xs, false, true)), matmul(experts.w_up.detach(), xs, false, true));
  Tensor out = to_device(to_dtype(matmul(experts.w_down.detach(), act), DType::F64), Device::CPU);  // [E, d, N]
  const int64_t N = x.size(0);
  const double* o = out.data<double>();
  auto value = [&](int64_t e, int64_t c, int64_t n) { return o[(e * d + c) * N + n]; };
  // Unit output vectors u[e][n] (zero when the output is zero), then pairwise dot products per token.
  std::vector<double> unit(static_cast<size_t>(E * N * d));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t n = 0; n < N; ++n) {
      double norm2 = 0;
      for (int64_t c = 0; c < d; ++c) norm2 += value(e, c, n) * value(e, c, n);
      double inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;
      for (int64_t c = 0; c < d; ++c) unit[static_cast<size_t>((e * N + n) * d + c)] = value(e, c, n) * inv;
    }
  OutputSimilarity result;
  result.tokens = N;
  result.pair.assign(E, std::vector<double>(E, 1.0));
  double total = 0;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = i + 1; j < E; ++j) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) {
        const double* ui = &unit[static_cast<size_t>((i * N + n) * d)];
        const double* uj = &unit[static_cast<size_t>((j * N + n) * d)];
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += ui[c] * uj[c];
        s += dot;
      }
      result.pair[i][j] = result.pair[j][i] = N > 0 ? s / static_cast<double>(N) : 0.0;
      total += result.pair[i][j];
    }
  result.mean = E > 1 ? total / static_cast<double>(E * (E - 1) / 2) : 1.0;
  return result;
}

// Sums over the columns c of one stack w [E, C]: sum_c Var_i(w[i][c]) and sum_{i,c} w[i][c]^2.
struct VarianceSums {
  double variance = 0, squares = 0;
  int64_t columns = 0, values = 0;
  double nv() const { return squares > 0 ? (variance / static_cast<double>(columns)) / (squares / static_cast<double>(values)) : 0.0; }
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
