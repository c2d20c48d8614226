#pragma once
// OMoE: orthogonal expert updates on top of AdamW (the method and measurements: docs/omoe.md).
//
// Per MoE layer l and expert i an OWM projector P_{l,i} [d, d] (fp32, starts at I) for the inputs of W_gate,i and
// W_up,i. Every step, with a = the mean of the inputs routed to expert i in that step (skipped when it got none):
//   k = P a;   P <- P - k k^T / (alpha + a^T k)          (= alpha (alpha I + A A^T)^-1 over all a seen, A = [a ...])
// Step t (1-based) is an O step when t > warmup and t % every == 0, otherwise an R step. On an O step, with
// Pbar_i = (sum_j P_{l,j} - P_{l,i}) / (E - 1), the other experts' average projector:
//   G(W_gate,i) <- G(W_gate,i) Pbar_i,   G(W_up,i) <- G(W_up,i) Pbar_i           (mode = grad)
// or the same product applied to the Adam direction m_hat / (sqrt(v_hat) + eps) instead (mode = direction); then the
// one shared AdamW step runs on every parameter. With reset, every P returns to I after each O step.
// With project_down, W_down,i gets the same treatment from separate projectors [h, h] fed by the mean of expert i's
// hidden activations silu(W_gate,i x) * (W_up,i x).
#include <cstdint>
#include <string>
#include <vector>

#include "engine/enum_names.h"
#include "moe/moe_layer.h"
#include "optim/adamw.h"

namespace moelab::optim {

// What an O step projects: the gradient before AdamW, or the Adam direction m_hat / (sqrt(v_hat) + eps).
enum class OMoEMode { Grad, Direction };
constexpr EnumNames<OMoEMode, 2> enum_names(OMoEMode) {
  return {{{OMoEMode::Grad, "grad"}, {OMoEMode::Direction, "direction"}}};
}

struct OMoEConfig {
  int64_t every = 10;         // K: O steps at t % K == 0 ...
  int64_t warmup = 0;         // ... and t > warmup
  bool reset = true;          // every P back to I after each O step (false: pure OWM, P keeps shrinking)
  double alpha = 0;           // > 0: this fixed alpha; 0: alpha = alpha_scale * running mean of ||a||^2
  double alpha_scale = 1.0;   // c (1: one update halves P along a)
  bool project_down = false;  // also project W_down's gradients (separate [h, h] projectors)
  OMoEMode mode = OMoEMode::Grad;
  int64_t spectrum_every = 10;  // trace and smallest eigenvalue of Pbar on every this-many-th O step (0: never)

  // Throws std::invalid_argument naming the bad option and value.
  void validate() const;
};

// Whether step t (1-based) is an O step.
bool is_o_step(int64_t t, int64_t every, int64_t warmup);

// One batched OWM update. P [B, n, n], a [B, n] (f32 or f64, same device), alpha: B values > 0; batch entries with
// active[b] false are returned unchanged. Returns the new P (engine ops only, so it runs where P lives).
Tensor owm_update(const Tensor& P, const Tensor& a, const std::vector<double>& alpha, const std::vector<bool>& active);

// The smallest eigenvalue of the symmetric matrix A (row-major n x n, double): Householder tridiagonalization, then
// Sturm-sequence bisection. O(n^3); for the occasional spectrum diagnostic.
double smallest_eigenvalue(std::vector<double> A, int64_t n);

// What one step did (for the metrics log).
struct OMoEReport {
  int64_t step = 0;  // t
  bool o_step = false;
  // O steps only, one entry per MoE layer:
  std::vector<double> removed;  // ||G Pbar - G|| / ||G|| over the layer's projected matrices (all experts)
  // On spectrum steps (else empty), per MoE layer: mean over experts of trace(Pbar_i) / n, min over experts of
  // lambda_min(Pbar_i) (n = d, the W_gate/W_up fan-in).
  std::vector<double> pbar_trace, pbar_min_eig;
};

class OMoE {
 public:
  // `adamw` owns the parameters and the shared moments (it must outlive this object); `layers` are the model's MoE
  // layers in order. Their expert matrices must be among adamw's parameters. Throws when a layer has < 2 experts.
  OMoE(AdamW& adamw, std::vector<moe::MoELayer*> layers, const OMoEConfig& config);

  // Updates layer `layer`'s projectors from this step's routing: expert_ids i32 [N, k], h [N, d] the layer's input.
  // Call once per layer and step, after the forward pass and before step() (docs/omoe.md's order: update P, then project).
  void observe(size_t layer, const Tensor& expert_ids, const Tensor& h);
  // observe() for every layer from its last forward (MoELayer::last_routing, last_input).
  void observe_last_forward();
  // One optimizer step with learning rate lr: projection on O steps, then the shared AdamW update, then the reset.
  // grad_scale: gradient clipping's factor (optim::grad_clip), applied by the AdamW update as it reads each gradient;
  // the projection is linear, so projecting the unclipped gradient first changes nothing but the rounding.
  OMoEReport step(double lr, float grad_scale = 1.0f);
  void zero_grad() { adamw_.zero_grad(); }

  // G Pbar_i for every expert i: G [E, out, n] -> [E, out, n], n = d (down = false) or h (down = true).
  Tensor project(size_t layer, const Tensor& G, bool down = false) const;
  // Pbar [E, n, n] of a layer (down: the W_down projectors).
  Tensor average_projectors(size_t layer, bool down = false) const;
  const Tensor& projectors(size_t layer, bool down = false) const;  // P [E, n, n]
  size_t layer_count() const { return layers_.size(); }
  int64_t steps_taken() const { return step_; }
  const OMoEConfig& config() const { return config_; }
  AdamW& adamw() { return adamw_; }

  // The projectors and counters as named tensors for the training-state file ("omoe.<layer>.P_in" [E, d, d], ...),
  // and back (bit-exact). AdamW's own state is separate (adamw().state()).
  std::vector<nn::NamedTensor> state() const;
  void load_state(const std::vector<nn::NamedTensor>& state);

 private:
  // A running mean of ||a||^2 over every mean input a one kind of projector has seen (for the scaled alpha).
  struct SquaredNormMean {
    double sum = 0;
    double count = 0;
  };
  struct Layer {
    moe::MoELayer* moe = nullptr;
    std::string name;  // "layers.1.moe"
    size_t gate = 0, up = 0, down = 0;  // indices of the expert matrices in adamw_.params()
    Tensor P_in, P_down;                // [E, d, d], [E, h, h] (P_down only with project_down)
    SquaredNormMean in_norm, down_norm;
  };
  void update_projectors(Tensor& P, const Tensor& a, const std::vector<bool>& active, SquaredNormMean& norms);
  void reset_projectors();

  AdamW& adamw_;
  OMoEConfig config_;
  std::vector<Layer> layers_;
  int64_t step_ = 0;
};

}  // namespace moelab::optim
