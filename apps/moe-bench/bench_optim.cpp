// `moe-bench optim`: the optimizer step of OMoE against plain AdamW on a preset model (CPU), and what OMoE adds as a
// share of a full training step. Two identical models train side by side on the same random batches: one with AdamW,
// one with OMoE; each phase of each step is timed separately and the median over the timed steps is reported.
#include <fmt/core.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "apps/moe-bench/bench_util.h"
#include "apps/moe-bench/benches.h"
#include "apps/train/train_config.h"
#include "engine/ops.h"
#include "moe/model.h"
#include "optim/omoe.h"

namespace moelab::bench {
namespace {

struct OptimBenchOptions {
  std::string preset = "tiny";
  int64_t steps = 60;   // timed steps (after the warm-up)
  int64_t warmup = 5;
  int64_t every = 10;   // omoe.every (K)
  bool project_down = false;
  std::string mode = "grad";
};

using clock_type = std::chrono::steady_clock;
double ms_since(clock_type::time_point start) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - start).count();
}

void run_optim_bench(const OptimBenchOptions& opts) {
  apps::TrainConfig config = apps::train_preset(opts.preset);
  const nn::ModelConfig& mc = config.model;
  const int64_t B = config.batch_size, T = mc.seq_len;
  moe::MoEModel plain_model(mc, config.losses, config.seed), omoe_model(mc, config.losses, config.seed);
  optim::AdamW plain(plain_model.lm().named_parameters(), config.adamw);
  optim::AdamW shared(omoe_model.lm().named_parameters(), config.adamw);
  optim::OMoEConfig oc;
  oc.every = opts.every;
  oc.project_down = opts.project_down;
  oc.mode = parse_enum<optim::OMoEMode>(opts.mode, "--mode");
  oc.spectrum_every = 0;  // the occasional eigenvalue diagnostic is not part of the step cost
  optim::OMoE omoe(shared, omoe_model.moe_layers(), oc);
  Generator gen(7);

  std::vector<double> fwd_bwd, adamw_step, observe_ms, r_step, o_step;
  for (int64_t s = 0; s < opts.warmup + opts.steps; ++s) {
    bool timed = s >= opts.warmup;
    // Random tokens (the step cost does not depend on the data); targets = inputs shifted is irrelevant here.
    std::vector<float> u = uniform({B * T + B * T}, gen, 0.0, 1.0).to_vector<float>();
    std::vector<int32_t> ids(B * T), tgt(B * T);
    for (int64_t i = 0; i < B * T; ++i) {
      ids[i] = std::min<int32_t>(int32_t(mc.vocab_size - 1), int32_t(u[i] * mc.vocab_size));
      tgt[i] = std::min<int32_t>(int32_t(mc.vocab_size - 1), int32_t(u[B * T + i] * mc.vocab_size));
    }
    Tensor inputs = from_vector(ids, {B, T}), targets = from_vector(tgt, {B * T});

    auto t0 = clock_type::now();
    plain_model.loss(inputs, targets, Tensor(), 0).value.backward();
    const optim::GradClip plain_clip = optim::grad_clip(plain.params(), config.grad_clip);
    double fb = ms_since(t0);
    t0 = clock_type::now();
    plain.step(1e-3, plain_clip.scale);
    double as = ms_since(t0);
    plain.zero_grad();

    t0 = clock_type::now();
    omoe_model.loss(inputs, targets, Tensor(), 0).value.backward();
    const optim::GradClip omoe_clip = optim::grad_clip(shared.params(), config.grad_clip);
    double fb2 = ms_since(t0);
    t0 = clock_type::now();
    omoe.observe_last_forward();
    double ob = ms_since(t0);
    t0 = clock_type::now();
    optim::OMoEReport report = omoe.step(1e-3, omoe_clip.scale);
    double os = ms_since(t0);
    omoe.zero_grad();
    if (!timed) continue;
    fwd_bwd.push_back(fb);
    fwd_bwd.push_back(fb2);
    adamw_step.push_back(as);
    observe_ms.push_back(ob);
    (report.o_step ? o_step : r_step).push_back(os);
  }

  const double K = static_cast<double>(opts.every);
  const double fb = median(fwd_bwd), adam = median(adamw_step), obs = median(observe_ms);
  const double r = median(r_step), o = o_step.empty() ? r : median(o_step);
  const double omoe_step = obs + ((K - 1) * r + o) / K;  // per step, averaged over one K-step cycle
  const double full = fb + adam;
  fmt::print("OMoE vs AdamW optimizer step, preset {} (d {}, {} layers, {} experts, hidden {}), batch {}x{}, {} threads\n",
             opts.preset, mc.d_model, mc.n_layers, mc.n_experts, mc.expert_hidden, B, T, omp_get_max_threads());
  fmt::print("omoe: every {}, mode {}, project_down {}; medians over {} timed steps (CPU; noisy on a loaded machine)\n\n",
             opts.every, opts.mode, opts.project_down ? "true" : "false", opts.steps);
  fmt::print("{:<38} {:>10}\n", "phase", "ms");
  fmt::print("{:<38} {:>10.3f}\n", "forward + backward + clip", fb);
  fmt::print("{:<38} {:>10.3f}\n", "AdamW step", adam);
  fmt::print("{:<38} {:>10.3f}\n", "OMoE observe (projector updates)", obs);
  fmt::print("{:<38} {:>10.3f}\n", "OMoE step, R step", r);
  fmt::print("{:<38} {:>10.3f}   ({} O steps timed)\n", "OMoE step, O step (projection)", o, o_step.size());
  fmt::print("{:<38} {:>10.3f}\n", "OMoE per step (observe + cycle mean)", omoe_step);
  fmt::print("\nOMoE overhead over AdamW: {:.3f} ms per step = {:.1f}% of a full AdamW training step ({:.3f} ms)\n",
             omoe_step - adam, 100.0 * (omoe_step - adam) / full, full);
}

}  // namespace

void add_optim_command(CLI::App& app) {
  auto opts = std::make_shared<OptimBenchOptions>();
  CLI::App* cmd = app.add_subcommand("optim", "OMoE's optimizer step against AdamW, and its share of a training step");
  cmd->add_option("--preset", opts->preset, "model preset: tiny | S | M")->capture_default_str();
  cmd->add_option("--steps", opts->steps, "timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--warmup", opts->warmup, "untimed steps first")->capture_default_str();
  cmd->add_option("--every", opts->every, "omoe.every: an O step every K steps")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_flag("--project-down", opts->project_down, "omoe.project_down: also project W_down");
  cmd->add_option("--mode", opts->mode, "omoe.mode: grad | direction")->capture_default_str();
  cmd->callback([opts] { run_optim_bench(*opts); });
}

}  // namespace moelab::bench
