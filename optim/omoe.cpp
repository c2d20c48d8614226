#include "optim/omoe.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "engine/kernels/moe.h"
#include "engine/kernels/optim.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "moe/dispatch.h"

namespace moelab::optim {

// fp32 rounding slowly breaks the symmetry of P; every this many steps (and before every O step) P <- (P + P^T) / 2.
constexpr int64_t kSymmetrizeEvery = 16;

void OMoEConfig::validate() const {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("OMoEConfig: " + what);
  };
  require(every >= 1, fmt::format("omoe.every must be >= 1, got {}", every));
  require(warmup >= 0, fmt::format("omoe.warmup must be >= 0, got {}", warmup));
  require(alpha >= 0, fmt::format("omoe.alpha must be >= 0 (0: scaled by the running mean of ||a||^2), got {}", alpha));
  require(alpha > 0 || alpha_scale > 0,
          fmt::format("omoe.alpha_scale must be > 0 when omoe.alpha = 0, got {}", alpha_scale));
  require(spectrum_every >= 0, fmt::format("omoe.spectrum_every must be >= 0, got {}", spectrum_every));
}

bool is_o_step(int64_t t, int64_t every, int64_t warmup) { return t > warmup && t % every == 0; }

// ---- OWM projectors --------------------------------------------------------------------------------------------------

Tensor owm_update(const Tensor& P, const Tensor& a, const std::vector<double>& alpha, const std::vector<bool>& active) {
  NoGradGuard no_grad;
  const PrecisionGuard fp32(Precision::FP32);  // the optimizer's products are f32 under mixed precision too
  if (P.dim() != 3 || P.size(1) != P.size(2) || a.dim() != 2 || a.size(0) != P.size(0) || a.size(1) != P.size(1))
    throw std::invalid_argument(
        fmt::format("owm_update: needs P [B, n, n] and a [B, n], got P {} and a {}", P.str(), a.str()));
  const int64_t B = P.size(0), n = P.size(1);
  if (static_cast<int64_t>(alpha.size()) != B || static_cast<int64_t>(active.size()) != B)
    throw std::invalid_argument(
        fmt::format("owm_update: {} alphas and {} flags for a batch of {}", alpha.size(), active.size(), B));
  std::vector<double> mask(B), alpha_or_one(B);
  for (int64_t b = 0; b < B; ++b) {
    if (active[b] && !(alpha[b] > 0))
      throw std::invalid_argument(fmt::format("owm_update: alpha[{}] = {} must be > 0", b, alpha[b]));
    mask[b] = active[b] ? 1.0 : 0.0;
    alpha_or_one[b] = active[b] ? alpha[b] : 1.0;  // inactive: coefficient 0 / (1 + a^T P a), no division by zero
  }
  Tensor a3 = reshape(a, {B, n, 1});
  Tensor k = matmul(P, a3);                 // [B, n, 1]   k = P a
  Tensor akt = matmul(a3, k, true, false);  // [B, 1, 1]   a^T k
  Tensor coef = div(from_vector(mask, {B, 1, 1}, P.dtype(), P.device()),
                    add(from_vector(alpha_or_one, {B, 1, 1}, P.dtype(), P.device()), akt));
  return sub(P, matmul(mul(k, coef), k, false, true));  // P - k k^T / (alpha + a^T k)
}

// batch f32 identities [batch, n, n], made on `device`.
static Tensor identity_batch(int64_t batch, int64_t n, Device device) {
  Tensor eye = Tensor::empty({batch, n, n}, DType::F32, device);
  KERNEL(fill_identity, device)(eye);
  return eye;
}

static Tensor symmetrized(const Tensor& P) { return mul(add(P, transpose(P, 1, 2)), 0.5); }

// ---- smallest eigenvalue of a symmetric matrix ---------------------------------------------------------------------

double smallest_eigenvalue(std::vector<double> A, int64_t n) {
  if (n <= 0 || static_cast<int64_t>(A.size()) != n * n)
    throw std::invalid_argument(fmt::format("smallest_eigenvalue: {} values for an {} x {} matrix", A.size(), n, n));
  auto at = [&](int64_t i, int64_t j) -> double& { return A[static_cast<size_t>(i * n + j)]; };
  // Householder: A <- H A H with H = I - 2 v v^T zeroing column k below the subdiagonal. With p = A v and
  // q = p - (v^T p) v, H A H = A - 2 v q^T - 2 q v^T (on the trailing block).
  std::vector<double> v(n), p(n);
  for (int64_t k = 0; k + 2 < n; ++k) {
    double norm2 = 0;
    for (int64_t i = k + 1; i < n; ++i) norm2 += at(i, k) * at(i, k);
    double norm = std::sqrt(norm2);
    if (norm == 0) continue;
    double alpha = at(k + 1, k) > 0 ? -norm : norm;
    double vnorm2 = 0;
    for (int64_t i = k + 1; i < n; ++i) {
      v[i] = at(i, k) - (i == k + 1 ? alpha : 0.0);
      vnorm2 += v[i] * v[i];
    }
    if (vnorm2 == 0) continue;
    double inv = 1.0 / std::sqrt(vnorm2);
    for (int64_t i = k + 1; i < n; ++i) v[i] *= inv;
    double vp = 0;
    for (int64_t i = k + 1; i < n; ++i) {
      double s = 0;
      for (int64_t j = k + 1; j < n; ++j) s += at(i, j) * v[j];
      p[i] = s;
      vp += v[i] * s;
    }
    for (int64_t i = k + 1; i < n; ++i) p[i] -= vp * v[i];  // q
    for (int64_t i = k + 1; i < n; ++i)
      for (int64_t j = k + 1; j < n; ++j) at(i, j) -= 2 * (v[i] * p[j] + p[i] * v[j]);
    at(k + 1, k) = at(k, k + 1) = alpha;
    for (int64_t i = k + 2; i < n; ++i) at(i, k) = at(k, i) = 0;
  }
  std::vector<double> diag(n), off(n, 0.0);  // off[i] couples i and i+1
  for (int64_t i = 0; i < n; ++i) diag[i] = at(i, i);
  for (int64_t i = 0; i + 1 < n; ++i) off[i] = 0.5 * (at(i, i + 1) + at(i + 1, i));
  // Sturm count: how many eigenvalues are < x (signs of the LDL^T pivots of T - x I).
  auto count_below = [&](double x) {
    int64_t count = 0;
    double q = 1;
    for (int64_t i = 0; i < n; ++i) {
      double prev = i > 0 ? off[i - 1] * off[i - 1] / q : 0.0;
      q = diag[i] - x - prev;
      if (q == 0) q = -1e-300;
      if (q < 0) ++count;
    }
    return count;
  };
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;  // Gershgorin bounds
  for (int64_t i = 0; i < n; ++i) {
    double r = (i > 0 ? std::abs(off[i - 1]) : 0.0) + std::abs(off[i]);
    lo = std::min(lo, diag[i] - r);
    hi = std::max(hi, diag[i] + r);
  }
  for (int iter = 0; iter < 200 && hi - lo > 1e-15 * std::max(1.0, std::abs(lo) + std::abs(hi)); ++iter) {
    double mid = 0.5 * (lo + hi);
    if (count_below(mid) >= 1)
      hi = mid;
    else
      lo = mid;
  }
  return 0.5 * (lo + hi);
}

// ---- the optimizer -------------------------------------------------------------------------------------------------

static size_t param_index(const AdamW& adamw, const Tensor& t, const std::string& what) {
  const std::vector<nn::NamedTensor>& params = adamw.params();
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].tensor.same(t)) return i;
  throw std::invalid_argument("OMoE: " + what + " is not a parameter of the AdamW optimizer");
}

OMoE::OMoE(AdamW& adamw, std::vector<moe::MoELayer*> layers, const OMoEConfig& config)
    : adamw_(adamw), config_(config) {
  config_.validate();
  for (size_t l = 0; l < layers.size(); ++l) {
    moe::MoELayer* moe = layers[l];
    const moe::Experts& ex = moe->experts;
    const int64_t E = ex.w_gate.size(0), hidden = ex.w_gate.size(1), d = ex.w_gate.size(2);
    Layer layer;
    layer.moe = moe;
    layer.gate = param_index(adamw, ex.w_gate, fmt::format("MoE layer {}'s experts.w_gate", l));
    layer.up = param_index(adamw, ex.w_up, fmt::format("MoE layer {}'s experts.w_up", l));
    layer.down = param_index(adamw, ex.w_down, fmt::format("MoE layer {}'s experts.w_down", l));
    const std::string& gate_name = adamw.params()[layer.gate].name;  // "layers.1.moe.experts.w_gate"
    const std::string suffix = ".experts.w_gate";
    layer.name = gate_name.size() > suffix.size() && gate_name.ends_with(suffix)
                     ? gate_name.substr(0, gate_name.size() - suffix.size())
                     : fmt::format("moe{}", l);
    if (E < 2)
      throw std::invalid_argument(
          fmt::format("OMoE: {} has {} expert(s); the other experts' projector needs >= 2", layer.name, E));
    layer.P_in = identity_batch(E, d, ex.w_gate.device());
    if (config_.project_down) layer.P_down = identity_batch(E, hidden, ex.w_gate.device());
    layers_.push_back(std::move(layer));
  }
}

const Tensor& OMoE::projectors(size_t layer, bool down) const {
  const Layer& L = layers_.at(layer);
  if (down && !config_.project_down)
    throw std::invalid_argument("OMoE: no W_down projectors (omoe.project_down = false)");
  return down ? L.P_down : L.P_in;
}

void OMoE::update_projectors(Tensor& P, const Tensor& a, const std::vector<bool>& routed, SquaredNormMean& norms) {
  const int64_t E = P.size(0);
  std::vector<float> squared = sum(square(a), 1).to_vector<float>();  // ||a_e||^2, [E]
  std::vector<bool> active = routed;
  for (int64_t e = 0; e < E; ++e) {
    if (!active[e]) continue;
    if (squared[e] == 0) {  // a zero mean input carries no direction (and would make alpha 0)
      active[e] = false;
      continue;
    }
    norms.sum += squared[e];
    norms.count += 1;
  }
  if (std::none_of(active.begin(), active.end(), [](bool b) { return b; })) return;
  double alpha = config_.alpha > 0 ? config_.alpha : config_.alpha_scale * norms.sum / norms.count;
  P = owm_update(P, a, std::vector<double>(E, alpha), active);
}

void OMoE::observe(size_t index, const Tensor& expert_ids, const Tensor& h) {
  NoGradGuard no_grad;
  const PrecisionGuard fp32(Precision::FP32);  // the optimizer's products are f32 under mixed precision too
  Layer& L = layers_.at(index);
  const int64_t E = L.P_in.size(0), d = L.P_in.size(1);
  if (h.dim() != 2 || h.size(1) != d || expert_ids.dim() != 2 || expert_ids.size(0) != h.size(0) ||
      h.device() != L.P_in.device() || expert_ids.device() != L.P_in.device())
    throw std::invalid_argument(fmt::format("OMoE::observe({}): needs h [N, {}] and expert_ids [N, k] on the "
                                            "projectors' device, got {} and {}",
                                            L.name, d, h.str(), expert_ids.str()));
  // The routed tokens in expert order (the dispatch's counting sort and permutation, on the tensors' device): expert
  // e's rows are [offsets[e], offsets[e+1]). Only the E counts come to the host (the plan's host_offsets).
  moe::DispatchPlan plan = moe::plan_dispatch(expert_ids, E);
  const std::vector<int32_t>& offsets = plan.host_offsets;
  Tensor x = to_dtype(h.detach(), DType::F32);
  Tensor x_sorted = Tensor::empty({plan.tokens * plan.top_k, d}, DType::F32, x.device());  // [N*k, d]
  KERNEL(moe_permute_rows, x.device())(x, plan.position_of_slot, x_sorted);
  std::vector<bool> routed(E);
  std::vector<Tensor> rows(E);  // each expert's slice of x_sorted (undefined: no tokens)
  std::vector<Tensor> means(E);
  for (int64_t e = 0; e < E; ++e) {
    routed[e] = offsets[e + 1] > offsets[e];
    if (routed[e]) rows[e] = slice_rows(x_sorted, offsets[e], offsets[e + 1]);  // [c_e, d]
    means[e] = routed[e] ? mean(rows[e], 0, true) : zeros({1, d}, DType::F32, x.device());
  }
  update_projectors(L.P_in, concat(means, 0), routed, L.in_norm);  // a: [E, d]
  if (!config_.project_down) return;
  // W_down's input: the expert's hidden activation silu(W_gate,e x) * (W_up,e x), [c_e, h], at this step's weights.
  const moe::Experts& ex = L.moe->experts;
  const int64_t hidden = ex.w_gate.size(1);
  std::vector<Tensor> hidden_means(E);
  for (int64_t e = 0; e < E; ++e) {
    if (!routed[e]) {
      hidden_means[e] = zeros({1, hidden}, DType::F32, x.device());
      continue;
    }
    Tensor w_gate = reshape(slice_rows(ex.w_gate.detach(), e, e + 1), {hidden, d});
    Tensor w_up = reshape(slice_rows(ex.w_up.detach(), e, e + 1), {hidden, d});
    Tensor act = mul(silu(matmul(rows[e], w_gate, false, true)), matmul(rows[e], w_up, false, true));  // [c_e, h]
    hidden_means[e] = mean(act, 0, true);
  }
  update_projectors(L.P_down, concat(hidden_means, 0), routed, L.down_norm);  // [E, h]
}

void OMoE::observe_last_forward() {
  for (size_t l = 0; l < layers_.size(); ++l) {
    const moe::MoELayer& moe = *layers_[l].moe;
    if (!moe.last_input().defined())
      throw std::logic_error("OMoE::observe_last_forward: " + layers_[l].name + " has not run a forward pass");
    observe(l, moe.last_routing().expert_ids, moe.last_input());
  }
}

Tensor OMoE::average_projectors(size_t layer, bool down) const {
  NoGradGuard no_grad;
  const Tensor& P = projectors(layer, down);  // [E, n, n]
  const int64_t E = P.size(0);
  return mul(sub(sum(P, 0, true), P), 1.0 / static_cast<double>(E - 1));  // (S - P_i) / (E - 1)
}

Tensor OMoE::project(size_t layer, const Tensor& G, bool down) const {
  NoGradGuard no_grad;
  const PrecisionGuard fp32(Precision::FP32);         // the optimizer's products are f32 under mixed precision too
  return matmul(G, average_projectors(layer, down));  // [E, out, n] @ [E, n, n]
}

void OMoE::reset_projectors() {
  for (Layer& L : layers_) {
    L.P_in = identity_batch(L.P_in.size(0), L.P_in.size(1), L.P_in.device());
    if (L.P_down.defined()) L.P_down = identity_batch(L.P_down.size(0), L.P_down.size(1), L.P_down.device());
  }
}

OMoEReport OMoE::step(double lr, float grad_scale) {
  NoGradGuard no_grad;
  const PrecisionGuard fp32(Precision::FP32);  // the optimizer's products are f32 under mixed precision too
  adamw_.begin_step();
  ++step_;
  OMoEReport report;
  report.step = step_;
  report.o_step = is_o_step(step_, config_.every, config_.warmup);
  if (report.o_step || step_ % kSymmetrizeEvery == 0) {
    for (Layer& L : layers_) {
      L.P_in = symmetrized(L.P_in);
      if (L.P_down.defined()) L.P_down = symmetrized(L.P_down);
    }
  }
  const std::vector<nn::NamedTensor>& params = adamw_.params();
  // On O steps: which Pbar multiplies each parameter's gradient (none for non-expert parameters), and per layer the
  // squared norms of what the projection removes and of what it was given.
  std::vector<const Tensor*> pbar_of(params.size(), nullptr);
  std::vector<size_t> layer_of(params.size(), 0);
  std::vector<Tensor> pbar_in(layers_.size()), pbar_down(layers_.size());
  std::vector<double> removed2(layers_.size(), 0.0), total2(layers_.size(), 0.0);
  if (report.o_step) {
    for (size_t l = 0; l < layers_.size(); ++l) {
      pbar_in[l] = average_projectors(l);
      pbar_of[layers_[l].gate] = pbar_of[layers_[l].up] = &pbar_in[l];
      layer_of[layers_[l].gate] = layer_of[layers_[l].up] = l;
      if (config_.project_down) {
        pbar_down[l] = average_projectors(l, true);
        pbar_of[layers_[l].down] = &pbar_down[l];
        layer_of[layers_[l].down] = l;
      }
    }
  }
  std::vector<std::pair<size_t, Tensor>> plain;  // the parameters AdamW updates as they are: one update at the end
  for (size_t i = 0; i < params.size(); ++i) {
    Tensor g = params[i].tensor.grad();
    if (!g.defined()) continue;
    if (!pbar_of[i]) {
      plain.emplace_back(i, g);
      continue;
    }
    g = to_dtype(g, DType::F32);             // a bf16 expert weight gradient (mixed precision) projected in f32
    auto projected = [&](const Tensor& G) {  // G [E, out, n] -> G Pbar, and the removed share's parts
      Tensor moved = matmul(G, *pbar_of[i]);
      removed2[layer_of[i]] += sum(square(sub(moved, G))).item();
      total2[layer_of[i]] += sum(square(G)).item();
      return moved;
    };
    if (config_.mode == OMoEMode::Grad)
      adamw_.update(i, projected(g), lr, grad_scale);
    else
      adamw_.update_direction(i, g, lr, projected, grad_scale);
  }
  adamw_.update(plain, lr, grad_scale);
  if (report.o_step) {
    for (size_t l = 0; l < layers_.size(); ++l)
      report.removed.push_back(total2[l] > 0 ? std::sqrt(removed2[l] / total2[l]) : 0.0);
    // Spectrum on the first O step and every spectrum_every-th after it (O steps are counted from t, not stored).
    int64_t o_index = step_ / config_.every - config_.warmup / config_.every;  // 1-based index of this O step
    if (config_.spectrum_every > 0 && (o_index - 1) % config_.spectrum_every == 0) {
      for (size_t l = 0; l < layers_.size(); ++l) {
        const int64_t E = pbar_in[l].size(0), n = pbar_in[l].size(1);
        const std::vector<double> values = to_dtype(pbar_in[l], DType::F64).to_vector<double>();  // to the host
        double trace = 0, min_eig = std::numeric_limits<double>::infinity();
        for (int64_t e = 0; e < E; ++e) {
          std::vector<double> m(values.begin() + e * n * n, values.begin() + (e + 1) * n * n);
          for (int64_t j = 0; j < n; ++j) trace += m[static_cast<size_t>(j * n + j)];
          min_eig = std::min(min_eig, smallest_eigenvalue(std::move(m), n));
        }
        report.pbar_trace.push_back(trace / static_cast<double>(E * n));
        report.pbar_min_eig.push_back(min_eig);
      }
    }
    if (config_.reset) reset_projectors();
  }
  return report;
}

// ---- training state ------------------------------------------------------------------------------------------------

std::vector<nn::NamedTensor> OMoE::state() const {
  std::vector<nn::NamedTensor> out;
  out.push_back({"omoe.step", from_vector(std::vector<double>{static_cast<double>(step_)}, {1})});
  for (const Layer& L : layers_) {
    out.push_back({"omoe." + L.name + ".P_in", L.P_in});
    if (L.P_down.defined()) out.push_back({"omoe." + L.name + ".P_down", L.P_down});
    out.push_back(
        {"omoe." + L.name + ".norm_sums",
         from_vector(std::vector<double>{L.in_norm.sum, L.in_norm.count, L.down_norm.sum, L.down_norm.count}, {4})});
  }
  return out;
}

void OMoE::load_state(const std::vector<nn::NamedTensor>& state) {
  auto find = [&](const std::string& name, const Shape& shape) -> Tensor {
    for (const nn::NamedTensor& t : state) {
      if (t.name != name) continue;
      if (t.tensor.shape() != shape)
        throw std::runtime_error(fmt::format("OMoE state: '{}' has shape {}, expected {}", name,
                                             shape_str(t.tensor.shape()), shape_str(shape)));
      return t.tensor;
    }
    throw std::runtime_error("OMoE state: missing '" + name + "' (was the run trained with these omoe options?)");
  };
  Tensor step = to_device(find("omoe.step", {1}), Device::CPU);
  for (Layer& L : layers_) {
    L.P_in = clone(to_dtype(to_device(find("omoe." + L.name + ".P_in", L.P_in.shape()), L.P_in.device()), DType::F32));
    if (L.P_down.defined())
      L.P_down = clone(
          to_dtype(to_device(find("omoe." + L.name + ".P_down", L.P_down.shape()), L.P_down.device()), DType::F32));
    std::vector<double> sums = to_dtype(find("omoe." + L.name + ".norm_sums", {4}), DType::F64).to_vector<double>();
    L.in_norm = {sums[0], sums[1]};
    L.down_norm = {sums[2], sums[3]};
  }
  step_ = static_cast<int64_t>(to_dtype(step, DType::F64).to_vector<double>()[0]);
}

}  // namespace moelab::optim
