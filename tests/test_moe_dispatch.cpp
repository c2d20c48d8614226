// The MoE dispatch, router and layer against the naive reference (moe/reference.h): forward and every
// gradient, odd sizes, experts that receive no tokens, f32 and f64; gradient checks of the fused op; determinism
// across thread counts; the factory and checkpoint names; and the errors of bad input.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/bf16_weights.h"
#include "engine/kernels/moe.h"
#include "engine/precision.h"
#include "engine/profile.h"
#include "moe/dispatch.h"
#include "moe/moe_layer.h"
#include "moe/reference.h"
#include "moe/router.h"
#include "tests/testing.h"

using namespace moelab;
using testing::as_doubles;
using testing::bitwise_equal;
using testing::check_equal;
using testing::check_error;
using testing::forced_ids;
using testing::gradcheck;
using testing::leaf;
using testing::random;
using testing::weighted_sum;

namespace {

// ---- helpers --------------------------------------------------------------------------------------------------------

// max |a - b| / max |b|: relative to the tensor's scale, so entries that happen to be near zero do not dominate.
double scaled_error(const Tensor& actual, const Tensor& expected) {
  REQUIRE_MESSAGE(actual.shape() == expected.shape(), actual.str() << " vs " << expected.str());
  std::vector<double> a = as_doubles(actual), b = as_doubles(expected);
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double err = std::abs(a[i] - b[i]);
    if (!(err <= diff)) diff = err;  // NaN-propagating max
    scale = std::max(scale, std::abs(b[i]));
  }
  return scale > 0 ? diff / scale : diff;
}

void check_matches(const Tensor& actual, const Tensor& expected, double tol, const std::string& what) {
  REQUIRE_MESSAGE(actual.defined(), what << ": missing");
  double err = scaled_error(actual, expected);
  CHECK_MESSAGE(err <= tol, what << ": scaled error " << err << " > " << tol);
}

// The inputs of one moe_experts call, as f64 values (rounded through f32 so both precisions see the same numbers).
struct Problem {
  Tensor x, ids, gates, w_gate, w_up, w_down;
};

Problem make_problem(int64_t N, int64_t d, int64_t h, int64_t E, int64_t k, uint64_t seed) {
  Problem p;
  auto values = [](const Shape& s, uint64_t sd, double scale) {
    return to_dtype(random(s, sd, DType::F32, scale), DType::F64);
  };
  p.x = values({N, d}, seed, 1.0);
  p.ids = forced_ids(N, k, E, seed + 1);
  p.gates = values({N, k}, seed + 2, 1.0);
  p.w_gate = values({E, h, d}, seed + 3, 0.4);
  p.w_up = values({E, h, d}, seed + 4, 0.4);
  p.w_down = values({E, d, h}, seed + 5, 0.4);
  return p;
}

using ExpertsFn = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&);

// Output and the gradients of (x, gates, w_gate, w_up, w_down) of weighted_sum(fn(...)) in `dtype`.
std::vector<Tensor> run(ExpertsFn fn, const Problem& p, DType dtype) {
  std::vector<Tensor> in = {leaf(p.x, dtype), leaf(p.gates, dtype), leaf(p.w_gate, dtype), leaf(p.w_up, dtype),
                            leaf(p.w_down, dtype)};
  Tensor y = fn(in[0], p.ids, in[1], in[2], in[3], in[4]);
  weighted_sum(y, 77).backward();
  std::vector<Tensor> out = {y.detach()};
  for (const Tensor& t : in) out.push_back(t.grad());
  return out;
}

const char* kNames[] = {"y", "dx", "dgates", "dw_gate", "dw_up", "dw_down"};

nn::ModelConfig small_moe_config() {
  nn::ModelConfig c;
  c.d_model = 10, c.n_experts = 5, c.top_k = 2, c.expert_hidden = 7, c.shared_experts = 2, c.n_layers = 3;
  return c;
}

}  // namespace

// ---- steps (a)-(c): the plan ----------------------------------------------------------------------------------------

TEST_CASE("moe: plan_dispatch is a stable counting sort with histogram and offsets (by hand)") {
  // Slots n*k + j:  s0 -> 2, s1 -> 0, s2 -> 0, s3 -> 1, s4 -> 2, s5 -> 1;  expert 3 gets nothing.
  moe::DispatchPlan plan = moe::plan_dispatch(from_vector(std::vector<int32_t>{2, 0, 0, 1, 2, 1}, {3, 2}), 4);
  CHECK(plan.counts.to_vector<int32_t>() == std::vector<int32_t>{2, 2, 2, 0});
  CHECK(plan.offsets.to_vector<int32_t>() == std::vector<int32_t>{0, 2, 4, 6, 6});
  CHECK(plan.host_offsets == std::vector<int32_t>{0, 2, 4, 6, 6});
  CHECK(plan.position_of_slot.to_vector<int32_t>() == std::vector<int32_t>{4, 0, 1, 2, 5, 3});
}

// ---- moe_experts against the reference ------------------------------------------------------------------------------

TEST_CASE("moe: moe_experts matches the reference, forward and all gradients (E, k, N sweep, empty experts, f32/f64)") {
  const int64_t d = 13, h = 11;
  uint64_t seed = 100;
  for (int64_t E : {2, 4, 7})
    for (int64_t k : {1, 2, 3})
      for (int64_t N : {1, 5, 33}) {
        if (k > E) continue;
        CAPTURE(E);
        CAPTURE(k);
        CAPTURE(N);
        Problem p = make_problem(N, d, h, E, k, seed += 10);
        std::vector<Tensor> expected = run(reference::moe_experts, p, DType::F64);
        std::vector<Tensor> fast64 = run(moe::moe_experts, p, DType::F64);
        std::vector<Tensor> fast32 = run(moe::moe_experts, p, DType::F32);
        for (size_t i = 0; i < expected.size(); ++i) {
          check_matches(fast64[i], expected[i], 1e-12, std::string(kNames[i]) + " f64");
          check_matches(fast32[i], expected[i], 1e-5, std::string(kNames[i]) + " f32");
        }
        // An expert that received no token has exactly zero weight gradient.
        std::vector<int32_t> counts = moe::plan_dispatch(p.ids, E).counts.to_vector<int32_t>();
        std::vector<double> dw = as_doubles(fast32[3]);
        for (int64_t e = 0; e < E; ++e)
          if (counts[e] == 0)
            CHECK(std::all_of(dw.begin() + e * h * d, dw.begin() + (e + 1) * h * d, [](double v) { return v == 0; }));
      }
}

TEST_CASE("moe: moe_experts gradcheck in f64 (empty expert, and a token choosing one expert twice)") {
  Problem p = make_problem(6, 5, 4, 4, 2, 7);  // experts 1 gets no token
  std::vector<Tensor> inputs = {leaf(p.x, DType::F64), leaf(p.gates, DType::F64), leaf(p.w_gate, DType::F64),
                                leaf(p.w_up, DType::F64), leaf(p.w_down, DType::F64)};
  auto loss = [&](const Tensor& ids) {
    return [ids](const std::vector<Tensor>& in) {
      return weighted_sum(moe::moe_experts(in[0], ids, in[1], in[2], in[3], in[4]), 5);
    };
  };
  double worst = gradcheck(loss(p.ids), inputs, 1e-6, 1e-6, "moe_experts");
  CHECK(worst < 1e-6);
  // Duplicate choices are two independent slots (top-k never produces them, but the op must stay exact).
  Tensor dup = from_vector(std::vector<int32_t>{0, 0, 3, 2, 2, 2, 0, 3, 3, 3, 2, 0}, {6, 2});
  CHECK(gradcheck(loss(dup), inputs, 1e-6, 1e-6, "moe_experts duplicates") < 1e-6);
}

TEST_CASE("moe: moe_experts adds a residual in its un-permute: the bits of a separate add, dy as its gradient") {
  Problem p = make_problem(9, 6, 5, 4, 2, 31);
  const Tensor r0 = random({9, 6}, 37, DType::F32);
  for (DType dtype : {DType::F32, DType::F64}) {
    std::vector<Tensor> separate = {leaf(p.x, dtype), leaf(p.gates, dtype), leaf(r0, dtype)};
    std::vector<Tensor> fused = {leaf(p.x, dtype), leaf(p.gates, dtype), leaf(r0, dtype)};
    const Tensor wg = to_dtype(p.w_gate, dtype), wu = to_dtype(p.w_up, dtype), wd = to_dtype(p.w_down, dtype);
    Tensor counts;
    Tensor y_separate = add(separate[2], moe::moe_experts(separate[0], p.ids, separate[1], wg, wu, wd));
    Tensor y_fused = moe::moe_experts(fused[0], p.ids, fused[1], wg, wu, wd, fused[2], counts);
    check_equal(y_fused, y_separate, "y");
    weighted_sum(y_separate, 38).backward();
    weighted_sum(y_fused, 38).backward();
    for (size_t i = 0; i < fused.size(); ++i)
      check_equal(fused[i].grad(), separate[i].grad(), fmt::format("gradient of input {}", i));
  }
  std::vector<Tensor> inputs = {leaf(p.x, DType::F64), leaf(p.gates, DType::F64), leaf(r0, DType::F64)};
  auto loss = [&](const std::vector<Tensor>& in) {
    Tensor counts;
    return weighted_sum(moe::moe_experts(in[0], p.ids, in[1], p.w_gate, p.w_up, p.w_down, in[2], counts), 39);
  };
  CHECK(gradcheck(loss, inputs, 1e-5, 1e-6, "moe_experts with a residual") < 1e-5);
  Tensor counts;
  check_error([&] { moe::moe_experts(p.x, p.ids, p.gates, p.w_gate, p.w_up, p.w_down, p.gates, counts); },
              {"moe_experts", "residual", "f64[9, 2]"});
}

// Under mixed precision moe_experts multiplies the weights' bf16 copies that the guard holds (engine/bf16_weights.h),
// made at its first call and then reused: no weight is rounded, and the output and every gradient (the weights' bf16,
// added in f32 over two passes, as over micro-batches) have the bits of rounding the weights in the op.
TEST_CASE("moe: moe_experts under bf16 multiplies the guard's weight copies: no rounding, the same bits") {
  Problem p = make_problem(12, 6, 5, 4, 2, 41);
  auto round_calls = [](const std::vector<KernelTime>& kernels) {
    int64_t calls = 0;
    for (const KernelTime& k : kernels) calls += k.name == "round_to_bf16" ? k.calls : 0;
    return calls;
  };
  // Two passes (forward and backward) of the layer under BF16, with or without the copies: the outputs, the inputs'
  // gradients, then the weights' (summed over the passes), and each pass's roundings.
  auto two_passes = [&](bool with_copies, std::vector<int64_t>& rounds) {
    const std::vector<Tensor> w = {leaf(p.w_gate, DType::F32), leaf(p.w_up, DType::F32), leaf(p.w_down, DType::F32)};
    const Bf16Weights copies(w);
    std::vector<Tensor> out;
    for (int pass = 0; pass < 2; ++pass) {
      const Tensor x = leaf(p.x, DType::F32), gates = leaf(p.gates, DType::F32);
      PrecisionGuard bf16(Precision::BF16, with_copies ? &copies : nullptr);
      KernelProfile profile;
      const Tensor y = moe::moe_experts(x, p.ids, gates, w[0], w[1], w[2]);
      weighted_sum(y, 42 + pass).backward();
      rounds.push_back(round_calls(profile.totals()));
      out.insert(out.end(), {y.detach(), x.grad(), gates.grad()});
    }
    for (const Tensor& t : w) {
      out.push_back(t.grad());
      CHECK(t.grad().dtype() == DType::F32);  // the passes' bf16 gradients, added in f32
      if (with_copies) CHECK(bitwise_equal(copies.made_copy_of(t), to_dtype(t, DType::BF16)));
    }
    return out;
  };
  std::vector<int64_t> own_rounds, copied_rounds;
  const std::vector<Tensor> own = two_passes(false, own_rounds), copied = two_passes(true, copied_rounds);
  // Without copies each pass rounds the three weights; with them the first pass makes the copies, the second rounds
  // none.
  CHECK(own_rounds == std::vector<int64_t>{3, 3});
  CHECK(copied_rounds == std::vector<int64_t>{3, 0});
  REQUIRE(copied.size() == own.size());
  for (size_t i = 0; i < own.size(); ++i) CHECK_MESSAGE(bitwise_equal(copied[i], own[i]), "result " << i);
}

TEST_CASE("moe: moe_experts with no tokens gives an empty output and zero weight gradients") {
  Problem p = make_problem(3, 6, 5, 3, 2, 13);
  std::vector<Tensor> w = {leaf(p.w_gate, DType::F32), leaf(p.w_up, DType::F32), leaf(p.w_down, DType::F32)};
  Tensor x = leaf(zeros({0, 6}), DType::F32), g = leaf(zeros({0, 2}), DType::F32);
  Tensor y = moe::moe_experts(x, from_vector(std::vector<int32_t>{}, {0, 2}), g, w[0], w[1], w[2]);
  CHECK(y.shape() == Shape{0, 6});
  sum(y).backward();
  for (const Tensor& t : w) CHECK(as_doubles(t.grad()) == std::vector<double>(t.numel(), 0.0));
}

TEST_CASE("moe: moe_experts is bit-identical for 1 and 2 threads (experts side by side and one at a time)") {
  int saved_threads = omp_get_max_threads();
  for (int64_t E : {2, 8}) {  // E = 2: one expert at a time, threaded GEMMs; E = 8: experts side by side
    CAPTURE(E);
    Problem p = make_problem(300, 48, 40, E, 2, 900 + E);
    omp_set_num_threads(1);
    std::vector<Tensor> one = run(moe::moe_experts, p, DType::F32);
    omp_set_num_threads(2);
    std::vector<Tensor> two = run(moe::moe_experts, p, DType::F32);
    for (size_t i = 0; i < one.size(); ++i) check_equal(one[i], two[i], kNames[i]);
  }
  omp_set_num_threads(saved_threads);
}

// Under Precision::BF16 the grouped SwiGLU keeps its activations and output in bf16 (engine/kernels/moe.h): gate_pre
// and up_pre are the products rounded, act is computed in f32 from those rounded values and rounded, out_sorted is
// the down product rounded, and in the backward every product is rounded as autocast's: d_act (then d_gate_pre and
// d_up_pre, computed from it, before their products), the weight gradients (f32 tensors of bf16 values) and
// d_x_sorted, its two products' sum. Against a naive
// loop in double with the same roundings. The inputs are multiples of 1/64 (bf16 values), so the products' sums are
// exact in f32 and double alike, and have more bits than bf16 keeps: gate_pre and up_pre must have the reference's
// bits, and the rounding matters downstream. act and the roundings after it come from exp, whose last f32 bit may
// differ from double's, and out_sorted from a sum f32 may round: one bf16 step (2^-7) at most, and rarely; the rest to
// a tolerance.
TEST_CASE("moe: grouped SwiGLU under bf16 products keeps bf16 activations (naive loop with the same roundings)") {
  const int64_t d = 13, h = 11, E = 3;
  const std::vector<int32_t> offsets = {0, 5, 5, 12};  // expert 1 has no rows
  const int64_t S = offsets.back();
  // Multiples of step in [-limit, limit].
  auto grid = [](const Shape& shape, uint64_t seed, double step, double limit) {
    std::vector<double> v = as_doubles(random(shape, seed));
    for (double& x : v) x = std::clamp(std::round(x * limit / step / 2) * step, -limit, limit);
    return from_vector(std::vector<float>(v.begin(), v.end()), shape);
  };
  const Tensor x = grid({S, d}, 1, 1.0 / 64, 1.0), d_out = grid({S, d}, 2, 1.0 / 64, 1.0);
  const Tensor wg = grid({E, h, d}, 3, 1.0 / 64, 0.5), wu = grid({E, h, d}, 4, 1.0 / 64, 0.5);
  const Tensor wd = grid({E, d, h}, 5, 1.0 / 64, 0.5);
  Tensor gate_pre = Tensor::empty({S, h}, DType::BF16), up_pre = Tensor::empty({S, h}, DType::BF16);
  Tensor act = Tensor::empty({S, h}, DType::BF16), out = Tensor::empty({S, d}, DType::BF16);
  cpu::moe_grouped_swiglu_forward(x, offsets, wg, wu, wd, gate_pre, up_pre, act, out, Precision::BF16);
  Tensor d_act = Tensor::empty({S, h}, DType::BF16), dx = Tensor::empty({S, d}, DType::BF16);
  const Tensor f32_rows = Tensor::empty({S, h}, DType::F32);  // for the dtype errors below
  Tensor dwg = Tensor::empty(wg.shape(), DType::BF16), dwu = Tensor::empty(wu.shape(), DType::BF16);
  Tensor dwd = Tensor::empty(wd.shape(), DType::BF16);
  cpu::moe_grouped_swiglu_backward(x, offsets, wg, wu, wd, gate_pre, up_pre, act, d_out, d_act, dx, dwg, dwu, dwd,
                                   Precision::BF16);

  auto bf = [](double v) { return static_cast<double>(to_float(to_bf16(static_cast<float>(v)))); };
  const std::vector<double> X = as_doubles(x), DO = as_doubles(d_out), WG = as_doubles(wg), WU = as_doubles(wu),
                            WD = as_doubles(wd), G = as_doubles(gate_pre), U = as_doubles(up_pre), A = as_doubles(act);
  std::vector<double> g_ref(S * h), u_ref(S * h), a_ref(S * h), out_ref(S * d, 0), dx_ref(S * d, 0);
  std::vector<double> dwg_ref(E * h * d, 0), dwu_ref(E * h * d, 0), dwd_ref(E * d * h, 0), da_ref(S * h);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
      for (int64_t j = 0; j < h; ++j) {
        double g = 0, u = 0, da = 0;
        for (int64_t i = 0; i < d; ++i) {
          g += X[r * d + i] * WG[(e * h + j) * d + i];
          u += X[r * d + i] * WU[(e * h + j) * d + i];
        }
        for (int64_t c = 0; c < d; ++c) da += DO[r * d + c] * WD[(e * d + c) * h + j];
        da = da_ref[r * h + j] = bf(da);
        g_ref[r * h + j] = bf(g), u_ref[r * h + j] = bf(u);
        const double z = g_ref[r * h + j], up = u_ref[r * h + j], s = 1 / (1 + std::exp(-z));
        a_ref[r * h + j] = z * s * up;  // before its rounding
        const double dg = bf(da * up * s * (1 + z * (1 - s))), du = bf(da * z * s);
        for (int64_t i = 0; i < d; ++i) {
          dwg_ref[(e * h + j) * d + i] += dg * X[r * d + i];
          dwu_ref[(e * h + j) * d + i] += du * X[r * d + i];
          dx_ref[r * d + i] += dg * WG[(e * h + j) * d + i] + du * WU[(e * h + j) * d + i];
        }
        for (int64_t c = 0; c < d; ++c) {  // from the kernel's act (checked above to one step)
          out_ref[r * d + c] += A[r * h + j] * WD[(e * d + c) * h + j];
          dwd_ref[(e * d + c) * h + j] += DO[r * d + c] * A[r * h + j];
        }
      }
  CHECK(G == g_ref);
  CHECK(U == u_ref);
  CHECK(as_doubles(d_act) == da_ref);
  // The values computed in f32 and rounded: each the reference's rounding, or one bf16 step from it in at most 2.
  auto check_rounded = [&](const std::vector<double>& got, const std::vector<double>& exact, const char* what) {
    int64_t off = 0;
    for (size_t i = 0; i < got.size(); ++i)
      if (got[i] != bf(exact[i])) {
        ++off;
        CHECK_MESSAGE(std::abs(got[i] - exact[i]) <= std::abs(exact[i]) / 128,
                      what << " " << i << ": " << got[i] << " vs " << exact[i]);
      }
    CHECK_MESSAGE(off <= 2, what << ": " << off << " values off the reference's rounding");
  };
  check_rounded(A, a_ref, "act");
  check_rounded(as_doubles(out), out_ref, "out_sorted");
  check_rounded(as_doubles(dwd), dwd_ref, "dw_down");
  check_rounded(as_doubles(dwg), dwg_ref, "dw_gate");
  check_rounded(as_doubles(dwu), dwu_ref, "dw_up");
  check_rounded(as_doubles(dx), dx_ref, "d_x_sorted");
  // x_sorted and d_out as the op gives them under mixed precision, bf16 (their values are bf16 ones): the same bits.
  Tensor gate_b = Tensor::empty({S, h}, DType::BF16), up_b = Tensor::empty({S, h}, DType::BF16);
  Tensor act_b = Tensor::empty({S, h}, DType::BF16), out_b = Tensor::empty({S, d}, DType::BF16);
  const Tensor x_b = to_dtype(x, DType::BF16);
  cpu::moe_grouped_swiglu_forward(x_b, offsets, wg, wu, wd, gate_b, up_b, act_b, out_b, Precision::BF16);
  Tensor dx_b = Tensor::empty({S, d}, DType::BF16), dwg_b = Tensor::empty(wg.shape(), DType::BF16);
  Tensor dwu_b = Tensor::empty(wu.shape(), DType::BF16), dwd_b = Tensor::empty(wd.shape(), DType::BF16);
  cpu::moe_grouped_swiglu_backward(x_b, offsets, wg, wu, wd, gate_pre, up_pre, act, to_dtype(d_out, DType::BF16), d_act,
                                   dx_b, dwg_b, dwu_b, dwd_b, Precision::BF16);
  for (const auto& [got, want] :
       {std::pair{act_b, act}, {out_b, out}, {dx_b, dx}, {dwg_b, dwg}, {dwu_b, dwu}, {dwd_b, dwd}})
    CHECK(bitwise_equal(got, want));
  // The weights as moe_experts passes them under mixed precision, bf16 copies (engine/bf16_weights.h): the same bits as
  // f32 weights rounded inside, on weights that are not bf16 values.
  {
    const Tensor rwg = random({E, h, d}, 6, DType::F32, 0.4), rwu = random({E, h, d}, 7, DType::F32, 0.4);
    const Tensor rwd = random({E, d, h}, 8, DType::F32, 0.4);
    auto run = [&](const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down) {
      std::vector<Tensor> t = {Tensor::empty({S, h}, DType::BF16),     Tensor::empty({S, h}, DType::BF16),
                               Tensor::empty({S, h}, DType::BF16),     Tensor::empty({S, d}, DType::BF16),
                               Tensor::empty({S, h}, DType::BF16),     Tensor::empty({S, d}, DType::BF16),
                               Tensor::empty(wg.shape(), DType::BF16), Tensor::empty(wu.shape(), DType::BF16),
                               Tensor::empty(wd.shape(), DType::BF16)};
      cpu::moe_grouped_swiglu_forward(x, offsets, w_gate, w_up, w_down, t[0], t[1], t[2], t[3], Precision::BF16);
      cpu::moe_grouped_swiglu_backward(x, offsets, w_gate, w_up, w_down, t[0], t[1], t[2], d_out, t[4], t[5], t[6],
                                       t[7], t[8], Precision::BF16);
      return t;
    };
    const std::vector<Tensor> f32_weights = run(rwg, rwu, rwd);
    const std::vector<Tensor> copies =
        run(to_dtype(rwg, DType::BF16), to_dtype(rwu, DType::BF16), to_dtype(rwd, DType::BF16));
    for (size_t i = 0; i < copies.size(); ++i) CHECK_MESSAGE(bitwise_equal(copies[i], f32_weights[i]), "tensor " << i);
    check_error(
        [&] {
          cpu::moe_grouped_swiglu_forward(x, offsets, to_dtype(rwg, DType::BF16), rwu, rwd, gate_b, up_b, act_b, out_b,
                                          Precision::BF16);
        },
        {"w_up must be bf16 under bf16 precision, got f32"});
    check_error(
        [&] {
          cpu::moe_grouped_swiglu_forward(x, offsets, to_dtype(rwg, DType::BF16), to_dtype(rwu, DType::BF16),
                                          to_dtype(rwd, DType::BF16), f32_rows, f32_rows, f32_rows, f32_rows,
                                          Precision::FP32);
        },
        {"the weights must be f32 or f64 under fp32 precision, got bf16"});
  }
  // The kept activations must be bf16 under BF16, and of the tensors' dtype under FP32.
  check_error(
      [&] {
        cpu::moe_grouped_swiglu_forward(x, offsets, wg, wu, wd, f32_rows, f32_rows, f32_rows, f32_rows,
                                        Precision::BF16);
      },
      {"gate_pre must be bf16 under bf16 precision, got f32"});
  check_error([&] { cpu::moe_grouped_swiglu_forward(x, offsets, wg, wu, wd, act, act, act, out, Precision::FP32); },
              {"gate_pre must be f32 under fp32 precision, got bf16"});
  check_error([&] { cpu::moe_grouped_swiglu_forward(x_b, offsets, wg, wu, wd, out, out, out, out, Precision::FP32); },
              {"x_sorted must be f32 under fp32 precision, got bf16"});
  check_error(
      [&] {
        cpu::moe_grouped_swiglu_forward(x, offsets, wg, wu, wd, gate_pre, up_pre, act, f32_rows, Precision::BF16);
      },
      {"out_sorted must be bf16 under bf16 precision, got f32"});
  check_error(
      [&] {
        cpu::moe_grouped_swiglu_backward(x, offsets, wg, wu, wd, gate_pre, up_pre, act, d_out, f32_rows, dx, dwg, dwu,
                                         dwd, Precision::BF16);
      },
      {"d_act must be bf16 under bf16 precision, got f32"});
  check_error(
      [&] {
        cpu::moe_grouped_swiglu_backward(x, offsets, wg, wu, wd, gate_pre, up_pre, act, d_out, d_act,
                                         Tensor::empty({S, d}, DType::F32), dwg, dwu, dwd, Precision::BF16);
      },
      {"d_x_sorted must be bf16 under bf16 precision, got f32"});
  check_error(
      [&] {
        cpu::moe_grouped_swiglu_backward(x, offsets, wg, wu, wd, gate_pre, up_pre, act, d_out, d_act, dx,
                                         Tensor::empty(wg.shape(), DType::F32), dwu, dwd, Precision::BF16);
      },
      {"dw_gate must be bf16 under bf16 precision, got f32"});
}

TEST_CASE("moe: moe_experts bad use throws naming the bad value") {
  Problem p = make_problem(4, 6, 5, 3, 2, 11);
  Tensor x = to_dtype(p.x, DType::F32), g = to_dtype(p.gates, DType::F32);
  Tensor wg = to_dtype(p.w_gate, DType::F32), wu = to_dtype(p.w_up, DType::F32), wd = to_dtype(p.w_down, DType::F32);
  Tensor bad_ids = from_vector(std::vector<int32_t>{0, 1, 2, 0, 1, 3, 0, 2}, {4, 2});
  check_error([&] { moe::moe_experts(x, bad_ids, g, wg, wu, wd); }, {"expert id 3", "token 2", "choice 1", "[0, 3)"});
  check_error([&] { moe::moe_experts(x, p.ids, g, wg, wu, wg); }, {"w_down", "[3, 6, 5]"});
  check_error([&] { moe::moe_experts(x, p.ids, p.gates, wg, wu, wd); }, {"dtype", "f64"});
  check_error([&] { moe::moe_experts(x, p.ids, slice_rows(g, 0, 3), wg, wu, wd); }, {"gates", "[3, 2]"});
  check_error([&] { moe::moe_experts(x, to_dtype(p.ids, DType::F32), g, wg, wu, wd); }, {"expert_ids", "i32"});
}

// ---- router ---------------------------------------------------------------------------------------------------------

TEST_CASE("moe: router picks the top-k of softmax, gates renormalized to 1, or raw") {
  for (bool norm : {true, false}) {
    CAPTURE(norm);
    Generator gen(3);
    moe::Router router(16, 6, 3, norm, 0.5, gen);
    CHECK(router.weight.shape() == Shape{6, 16});
    Tensor h = random({20, 16}, 4, DType::F32);
    moe::Routing r = router.forward(h);
    moe::Routing ref = reference::route(h, router.weight, 3, norm);
    CHECK(r.expert_ids.to_vector<int32_t>() == ref.expert_ids.to_vector<int32_t>());
    check_matches(r.probs, ref.probs, 1e-6, "probs");
    check_matches(r.gates, ref.gates, 1e-6, "gates");
    std::vector<double> p = as_doubles(r.probs), g = as_doubles(r.gates);
    std::vector<int32_t> ids = r.expert_ids.to_vector<int32_t>();
    for (int64_t n = 0; n < 20; ++n) {
      double total = 0;
      for (int64_t j = 0; j < 3; ++j) {
        double pj = p[n * 6 + ids[n * 3 + j]];
        if (j > 0) CHECK(pj <= p[n * 6 + ids[n * 3 + j - 1]]);  // descending
        total += g[n * 3 + j];
        if (!norm) CHECK(g[n * 3 + j] == pj);  // raw: the chosen probabilities themselves
      }
      // Every expert left out has a probability no larger than the last one chosen.
      for (int64_t e = 0; e < 6; ++e)
        if (std::find(ids.begin() + n * 3, ids.begin() + n * 3 + 3, e) == ids.begin() + n * 3 + 3)
          CHECK(p[n * 6 + e] <= p[n * 6 + ids[n * 3 + 2]]);
      if (norm) CHECK(total == doctest::Approx(1.0).epsilon(1e-6));
      else CHECK(total < 1.0);
    }
  }
}

TEST_CASE("moe: router gradients (gradcheck in f64 through softmax, gather and renormalization)") {
  for (bool norm : {true, false}) {
    CAPTURE(norm);
    Generator gen(8);
    moe::Router router(7, 5, 2, norm, 0.7, gen);
    router.weight = leaf(router.weight, DType::F64);
    Tensor h = leaf(random({6, 7}, 9), DType::F64);
    auto loss = [&](const std::vector<Tensor>& in) {
      router.weight = in[1];
      moe::Routing r = router.forward(in[0]);
      return weighted_sum(r.gates, 1) + weighted_sum(r.probs, 2);
    };
    CHECK(gradcheck(loss, {h, router.weight}, 1e-6, 1e-6, "router") < 1e-6);
  }
}

TEST_CASE("moe: bad input: k > E and non-finite router logits give clear errors") {
  Generator gen(1);
  check_error([&] { moe::Router(8, 4, 5, true, 0.02, gen, "layers.3.moe.router"); },
              {"layers.3.moe.router", "top_k = 5", "n_experts = 4"});
  nn::ModelConfig c = small_moe_config();
  c.top_k = 6;
  check_error([&] { moe::MoELayer(c, 2, gen); }, {"layers.2.moe.router", "top_k = 6"});

  moe::MoELayer layer(small_moe_config(), 1, gen);
  std::vector<float> values(4 * 10, 0.5f);
  values[13] = NAN;
  check_error<std::runtime_error>([&] { layer.forward(from_vector(values, {4, 10})); },
                                  {"layers.1.moe.router", "NaN"});
  values[13] = INFINITY;
  check_error<std::runtime_error>([&] { layer.forward(from_vector(values, {4, 10})); }, {"layers.1.moe.router"});
}

// ---- the layer ------------------------------------------------------------------------------------------------------

TEST_CASE("moe: MoELayer's forward_plus is residual + forward, bit for bit, with and without shared experts") {
  for (int64_t shared_experts : {0, 2}) {
    nn::ModelConfig c = small_moe_config();
    c.shared_experts = shared_experts;
    Generator gen(23);
    moe::MoELayer layer(c, 0, gen);
    const Tensor h = random({9, 10}, 24, DType::F32), residual = random({9, 10}, 25, DType::F32);
    check_equal(layer.forward_plus(h, residual), add(residual, layer.forward(h)),
                fmt::format("{} shared experts", shared_experts));
  }
}

TEST_CASE("moe: MoELayer with shared experts == reference router + reference experts + shared SwiGLU (values, grads)") {
  nn::ModelConfig c = small_moe_config();
  Generator gen(21);
  moe::MoELayer layer(c, 0, gen);
  REQUIRE(layer.shared);
  CHECK(layer.shared->w_gate.shape() == Shape{14, 10});  // 2 shared experts of 7 fused into one SwiGLU
  // Larger weights than the default init, so every term matters at f32 precision.
  for (auto& [name, t] : layer.named_parameters()) {
    NoGradGuard no_grad;
    Tensor scaled = mul(t, 20.0);
    copy_(t, scaled);
  }
  Tensor h = leaf(random({17, 10}, 22, DType::F32), DType::F32);
  std::vector<nn::NamedTensor> params = layer.named_parameters();

  Tensor y = layer.forward(h);
  // The routing the layer keeps is the one on the graph: router losses computed from it reach the router.
  CHECK(layer.last_routing().gates.requires_grad());
  CHECK(layer.last_routing().probs.requires_grad());
  weighted_sum(y, 23).backward();
  std::vector<Tensor> fast = {y.detach(), h.grad()};
  for (auto& p : params) fast.push_back(p.tensor.grad());

  h.zero_grad();
  for (auto& p : params) p.tensor.zero_grad();
  moe::Routing r = reference::route(h, layer.router.weight, c.top_k, c.norm_topk);
  Tensor y_ref = reference::moe_experts(h, r.expert_ids, r.gates, layer.experts.w_gate, layer.experts.w_up,
                                        layer.experts.w_down) +
                 layer.shared->forward(h);
  weighted_sum(y_ref, 23).backward();
  std::vector<Tensor> expected = {y_ref.detach(), h.grad()};
  for (auto& p : params) expected.push_back(p.tensor.grad());

  CHECK(layer.last_routing().expert_ids.to_vector<int32_t>() == r.expert_ids.to_vector<int32_t>());
  // The dispatch's histogram, kept for the load-balancing loss, is the ids' bincount.
  CHECK(layer.last_routing().expert_counts.to_vector<int32_t>() ==
        bincount(reshape(r.expert_ids, {-1}), c.n_experts).to_vector<int32_t>());
  check_matches(layer.last_routing().probs, r.probs, 1e-6, "last_routing probs");
  check_matches(fast[0], expected[0], 1e-5, "y");
  check_matches(fast[1], expected[1], 1e-5, "dh");
  for (size_t i = 0; i < params.size(); ++i) check_matches(fast[i + 2], expected[i + 2], 1e-5, params[i].name);
}

TEST_CASE("moe: moe_feed_forward honours dense_layers and moe_every") {
  nn::ModelConfig c = small_moe_config();
  c.n_layers = 6, c.moe_every = 2, c.dense_layers = {3};  // MoE when (l + 1) % 2 == 0 and l != 3: layers 1 and 5
  Generator gen(5);
  for (int64_t l = 0; l < 6; ++l) {
    CAPTURE(l);
    nn::NamedFeedForward ffn = moe::moe_feed_forward(c, l, gen);
    bool moe_layer = l == 1 || l == 5;
    CHECK(ffn.name == (moe_layer ? "moe" : "mlp"));
    CHECK((dynamic_cast<moe::MoELayer*>(ffn.ffn.get()) != nullptr) == moe_layer);
    CHECK((dynamic_cast<nn::SwiGLU*>(ffn.ffn.get()) != nullptr) == !moe_layer);
  }
  c.n_experts = 0;  // a dense model
  CHECK(moe::moe_feed_forward(c, 1, gen).name == "mlp");
}

TEST_CASE("moe: TransformerLM with moe_feed_forward has the checkpoint names of docs/model.md and trains end to end") {
  nn::ModelConfig c = nn::model_preset("tiny");
  c.expert_hidden = 32, c.shared_experts = 1, c.dense_layers = {0};
  nn::TransformerLM model(c, 1234, moe::moe_feed_forward);
  std::vector<nn::NamedTensor> params = model.named_parameters();
  auto shape_of = [&](const std::string& name) -> Shape {
    for (auto& p : params)
      if (p.name == name) return p.tensor.shape();
    FAIL_CHECK("no parameter " << name);
    return {};
  };
  CHECK(shape_of("layers.0.mlp.w_gate") == Shape{64, 64});  // dense_ffn_hidden = top_k * expert_hidden
  CHECK(shape_of("layers.0.mlp.w_down") == Shape{64, 64});
  CHECK(shape_of("layers.1.moe.router.weight") == Shape{4, 64});
  CHECK(shape_of("layers.1.moe.experts.w_gate") == Shape{4, 32, 64});
  CHECK(shape_of("layers.1.moe.experts.w_up") == Shape{4, 32, 64});
  CHECK(shape_of("layers.1.moe.experts.w_down") == Shape{4, 64, 32});
  CHECK(shape_of("layers.1.moe.shared.w_gate") == Shape{32, 64});
  CHECK(shape_of("layers.1.moe.shared.w_up") == Shape{32, 64});
  CHECK(shape_of("layers.1.moe.shared.w_down") == Shape{64, 32});
  for (auto& p : params) CHECK_MESSAGE(p.name.find("layers.0.moe") == std::string::npos, p.name);

  // W_down starts at init_std / sqrt(2 * layers) = 0.01; the gates and ups at 0.02.
  auto stddev = [&](const std::string& name) {
    std::vector<double> v;
    for (auto& p : params)
      if (p.name == name) v = as_doubles(p.tensor);
    double ss = 0;
    for (double x : v) ss += x * x;
    return std::sqrt(ss / static_cast<double>(v.size()));
  };
  CHECK(stddev("layers.1.moe.experts.w_down") == doctest::Approx(0.01).epsilon(0.05));
  CHECK(stddev("layers.1.moe.experts.w_gate") == doctest::Approx(0.02).epsilon(0.05));
  CHECK(stddev("layers.1.moe.router.weight") == doctest::Approx(0.02).epsilon(0.15));

  // One forward/backward: every parameter gets a finite gradient (router included, through the gates).
  std::vector<int32_t> ids(2 * 16);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 37) % 256);
  Tensor logits = model.forward(from_vector(ids, {2, 16}));
  std::vector<int32_t> targets(ids.begin() + 1, ids.end());
  targets.push_back(0);
  cross_entropy(logits, from_vector(targets, {32})).backward();
  for (auto& p : params) {
    CAPTURE(p.name);
    REQUIRE(p.tensor.grad().defined());
    std::vector<double> g = as_doubles(p.tensor.grad());
    CHECK(std::all_of(g.begin(), g.end(), [](double v) { return std::isfinite(v); }));
    CHECK(std::any_of(g.begin(), g.end(), [](double v) { return v != 0; }));
  }
}

// ---- timing (skipped by default; run with --no-skip -tc='moe: bench*') ----------------------------------------------

TEST_CASE("moe: bench moe_experts forward + backward" * doctest::skip()) {
  struct Size {
    int64_t N, d, h, E, k;
  };
  for (Size s : {Size{512, 64, 64, 4, 2}, Size{4096, 512, 512, 16, 2}}) {
    Tensor x = leaf(random({s.N, s.d}, 1, DType::F32), DType::F32);
    Tensor logits = random({s.N, s.E}, 2, DType::F32);
    Tensor ids = topk(logits, s.k).second;
    Tensor gates = leaf(softmax(topk(logits, s.k).first), DType::F32);
    Tensor wg = leaf(random({s.E, s.h, s.d}, 3, DType::F32, 0.05), DType::F32);
    Tensor wu = leaf(random({s.E, s.h, s.d}, 4, DType::F32, 0.05), DType::F32);
    Tensor wd = leaf(random({s.E, s.d, s.h}, 5, DType::F32, 0.05), DType::F32);
    Tensor dy = random({s.N, s.d}, 6, DType::F32);
    auto seconds = [](auto f) {
      auto t0 = std::chrono::steady_clock::now();
      f();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    int reps = s.N > 1000 ? 7 : 50;
    std::vector<double> fwd, bwd;
    for (int r = 0; r < reps + 1; ++r) {
      Tensor y;
      double tf = seconds([&] { y = moe::moe_experts(x, ids, gates, wg, wu, wd); });
      double tb = seconds([&] { sum(mul(y, dy)).backward(); });
      if (r > 0) fwd.push_back(tf), bwd.push_back(tb);  // the first run warms caches and allocations
    }
    std::sort(fwd.begin(), fwd.end());
    std::sort(bwd.begin(), bwd.end());
    double flops = 2.0 * 3 * s.N * s.k * s.d * s.h;  // forward GEMMs; backward does twice that
    double f = fwd[fwd.size() / 2], b = bwd[bwd.size() / 2];
    MESSAGE("moe_experts N=" << s.N << " d=" << s.d << " h=" << s.h << " E=" << s.E << " k=" << s.k << " threads="
                             << omp_get_max_threads() << ": median (min) forward " << f * 1e3 << " (" << fwd[0] * 1e3
                             << ") ms = " << flops / f * 1e-9 << " GFLOP/s; backward " << b * 1e3 << " ("
                             << bwd[0] * 1e3 << ") ms = " << 2 * flops / b * 1e-9
                             << " GFLOP/s (backward includes the probe loss's mul/sum)");
  }
}
