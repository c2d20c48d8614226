// The CUDA kernels of engine/kernels/moe.h against their CPU twins on the same inputs: the dispatch plan, the row
// permutations, the SwiGLU activation, the grouped SwiGLU, the routing top-k + gates; then moe_experts and
// route_gates through autograd on both devices. Sizes: N in {1, 5, 33, 257}, E in {2, 4, 7, 16}, k in {1, 2, 3}
// (k <= E), with ids forced so that some experts receive no token. Also, on the CPU alone: route_gates is the
// composition it replaced (topk, gather, sum, div), to the bit.
//
// Bounds. Integer results (the plan, expert ids) exactly. The same bits wherever the GPU does the CPU's arithmetic in
// the CPU's order: row copies, the k-term sums of the un-permute-sum, the products of d_out_sorted, and the routing
// (its sums run in double in j order on both devices; only f64's backward may differ, by nvcc fusing a multiply and an
// add, to 1e-12). f32 within 1e-5 and f64 within 1e-12 relative elsewhere: the SwiGLU activation elementwise (the
// GPU's exp differs from libm's by an ulp or two); and, where the GPU sums in another order (GEMMs, dot products over
// d, the gate-weighted sums whose terms can cancel) or the backward's factor 1 + z (1 - s) cancels near z = -1.28,
// relative to the largest entry of the tensor (max |gpu - cpu| <= bound * max |cpu|), since an entry that cancels to
// near zero has no relative accuracy on either device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/cuda/blas.cuh"
#include "engine/kernels/moe.h"
#include "moe/dispatch.h"
#include "moe/router.h"
#include "tests/cuda_testing.h"

using namespace moelab;
using namespace moelab::testing;

namespace {

const std::vector<DType> kFloatTypes = {DType::F32, DType::F64};

double float_bound(DType dtype) { return dtype == DType::F32 ? 1e-5 : 1e-12; }

struct Sizes {
  int64_t N, E, k;
};

// Every (N, E, k) of the sweep with k <= E.
std::vector<Sizes> sweep() {
  std::vector<Sizes> all;
  for (int64_t N : {1, 5, 33, 257})
    for (int64_t E : {2, 4, 7, 16})
      for (int64_t k : {1, 2, 3})
        if (k <= E) all.push_back({N, E, k});
  return all;
}

std::string name_of(const Sizes& s) { return fmt::format("N={} E={} k={}", s.N, s.E, s.k); }

// The plan's tensors on `device`, from the kernels alone.
moe::DispatchPlan plan_with_kernels(const Tensor& ids, int64_t E, Device device) {
  moe::DispatchPlan plan;
  plan.tokens = ids.size(0), plan.top_k = ids.size(1), plan.experts = E;
  plan.counts = Tensor::empty({E}, DType::I32, device);
  plan.offsets = Tensor::empty({E + 1}, DType::I32, device);
  plan.position_of_slot = Tensor::empty(ids.shape(), DType::I32, device);
  if (device == Device::CPU) {
    cpu::moe_count_experts(ids, plan.counts);
    cpu::moe_expert_offsets(plan.counts, plan.offsets);
    cpu::moe_sort_slots(ids, plan.offsets, plan.position_of_slot);
  } else {
    Tensor ids_gpu = to_gpu(ids);
    cuda::moe_count_experts(ids_gpu, plan.counts);
    cuda::moe_expert_offsets(plan.counts, plan.offsets);
    cuda::moe_sort_slots(ids_gpu, plan.offsets, plan.position_of_slot);
  }
  return plan;
}

void check_same_plan(const moe::DispatchPlan& gpu, const moe::DispatchPlan& cpu, const std::string& what) {
  check_same_bits(gpu.counts, cpu.counts, what + " counts");
  check_same_bits(gpu.offsets, cpu.offsets, what + " offsets");
  check_same_bits(gpu.position_of_slot, cpu.position_of_slot, what + " position_of_slot");
}

// A fresh leaf on `device` holding t's values.
Tensor leaf_on(const Tensor& t, Device device) {
  Tensor out = clone(to_device(t.detach(), device)).detach();
  out.set_requires_grad(true);
  return out;
}

// Probabilities [N, E] (softmax of normal logits); with `ties`, logits rounded to integers, so rows hold equal values.
Tensor probabilities(int64_t N, int64_t E, uint64_t seed, DType dtype, bool ties) {
  std::vector<double> z = as_doubles(random({N, E}, seed, DType::F64, 2.0));
  if (ties)
    for (double& v : z) v = std::round(v);
  return softmax(from_vector(z, {N, E}, dtype)).detach();
}

}  // namespace

// ---- the dispatch plan ----------------------------------------------------------------------------------------------

TEST_CASE("cuda: moe: plan kernels give exactly the CPU's counts, offsets and positions" * cuda_only()) {
  uint64_t seed = 10;
  std::vector<Sizes> cases = sweep();
  cases.push_back({0, 3, 2});       // no tokens
  cases.push_back({257, 1500, 3});  // more experts than one chunk of the scan (1024)
  cases.push_back({3000, 8, 2});    // 6,000 slots: blocks of 2,048 slots (moe.cu's kSlotChunk), the last one partial
  cases.push_back({2049, 5, 1});    // one slot past the first block
  for (const Sizes& s : cases) {
    Tensor ids = forced_ids(s.N, s.k, s.E, ++seed);
    check_same_plan(plan_with_kernels(ids, s.E, Device::CUDA), plan_with_kernels(ids, s.E, Device::CPU), name_of(s));
  }
  // Repeated and unbalanced ids (not top-k's distinct choices; the plan does not care): every slot to one expert.
  Tensor same = from_vector(std::vector<int32_t>(3 * 70, 2), {70, 3});
  check_same_plan(plan_with_kernels(same, 4, Device::CUDA), plan_with_kernels(same, 4, Device::CPU), "all to one");
}

TEST_CASE("cuda: moe: plan_dispatch on the GPU equals the CPU's plan and names a bad id the same way" * cuda_only()) {
  uint64_t seed = 200;
  for (const Sizes& s : sweep()) {
    Tensor ids = forced_ids(s.N, s.k, s.E, ++seed);
    moe::DispatchPlan gpu = moe::plan_dispatch(to_gpu(ids), s.E), cpu = moe::plan_dispatch(ids, s.E);
    CHECK(gpu.counts.is_cuda());
    CHECK((gpu.tokens == cpu.tokens && gpu.top_k == cpu.top_k && gpu.experts == cpu.experts));
    CHECK(gpu.host_offsets == cpu.host_offsets);
    CHECK(gpu.host_offsets == cpu.offsets.to_vector<int32_t>());
    check_same_plan(gpu, cpu, name_of(s));
  }
  Tensor bad = from_vector(std::vector<int32_t>{0, 1, 2, 0, 1, -1, 0, 3}, {4, 2});
  for (const Tensor& ids : {bad, to_gpu(bad)})
    check_mentions(error_of([&] { moe::plan_dispatch(ids, 3); }), {"expert id -1", "token 2", "choice 1", "[0, 3)"});
}

// ---- row permutations and the weighted un-permute -------------------------------------------------------------------

TEST_CASE("cuda: moe: permute, un-permute-sum and weighted un-permute kernels match the CPU" * cuda_only()) {
  uint64_t seed = 300;
  for (DType dtype : kFloatTypes)
    for (const Sizes& s : sweep()) {
      const std::string what = fmt::format("{} {}", name_of(s), dtype_name(dtype));
      const int64_t d = s.N == 257 ? 131 : 13, S = s.N * s.k;  // d > one block of 128 threads once
      Tensor ids = forced_ids(s.N, s.k, s.E, ++seed);
      moe::DispatchPlan plan = moe::plan_dispatch(ids, s.E), plan_gpu = moe::plan_dispatch(to_gpu(ids), s.E);

      Tensor x = random({s.N, d}, ++seed, dtype);
      Tensor x_sorted = Tensor::empty({S, d}, dtype), x_sorted_gpu = empty_like_on(x_sorted, Device::CUDA);
      cpu::moe_permute_rows(x, plan.position_of_slot, x_sorted);
      cuda::moe_permute_rows(to_gpu(x), plan_gpu.position_of_slot, x_sorted_gpu);
      check_same_bits(x_sorted_gpu, x_sorted, what + " permute");
      if (dtype == DType::F32) {  // rounded to bf16 as gathered (mixed precision): the rows' bf16 roundings
        Tensor rounded = Tensor::empty({S, d}, DType::BF16), rounded_gpu = empty_like_on(rounded, Device::CUDA);
        cpu::moe_permute_rows(x, plan.position_of_slot, rounded);
        cuda::moe_permute_rows(to_gpu(x), plan_gpu.position_of_slot, rounded_gpu);
        CHECK_MESSAGE(bitwise_equal(rounded, to_dtype(x_sorted, DType::BF16)), what << ": the bf16 permute's bits");
        check_same_bits(rounded_gpu, rounded, what + " permute to bf16");
      }

      Tensor dx_sorted = random({S, d}, ++seed, dtype);
      Tensor dx = Tensor::empty({s.N, d}, dtype), dx_gpu = empty_like_on(dx, Device::CUDA);
      cpu::moe_unpermute_sum_rows(dx_sorted, plan.position_of_slot, dx);
      cuda::moe_unpermute_sum_rows(to_gpu(dx_sorted), plan_gpu.position_of_slot, dx_gpu);
      check_same_bits(dx_gpu, dx, what + " un-permute-sum");

      Tensor out_sorted = random({S, d}, ++seed, dtype), gates = random({s.N, s.k}, ++seed, dtype);
      Tensor residual = random({s.N, d}, ++seed, dtype);
      for (const Tensor& added : {Tensor(), residual}) {
        Tensor y = Tensor::empty({s.N, d}, dtype), y_gpu = empty_like_on(y, Device::CUDA);
        cpu::moe_weighted_unpermute(out_sorted, gates, plan.position_of_slot, added, y);
        cuda::moe_weighted_unpermute(to_gpu(out_sorted), to_gpu(gates), plan_gpu.position_of_slot,
                                     added.defined() ? to_gpu(added) : Tensor(), y_gpu);
        check_scaled(y_gpu, y, float_bound(dtype),
                     what + " weighted un-permute" + (added.defined() ? " + residual" : ""));
      }
      if (dtype == DType::F32) {  // the experts' output kept in bf16 (mixed precision), widened as it is read
        const Tensor kept = to_dtype(out_sorted, DType::BF16);
        Tensor y = Tensor::empty({s.N, d}, dtype), y_gpu = empty_like_on(y, Device::CUDA);
        cpu::moe_weighted_unpermute(kept, gates, plan.position_of_slot, residual, y);
        cuda::moe_weighted_unpermute(to_gpu(kept), to_gpu(gates), plan_gpu.position_of_slot, to_gpu(residual), y_gpu);
        check_scaled(y_gpu, y, float_bound(dtype), what + " weighted un-permute of bf16 rows");
        Tensor y_widened = Tensor::empty({s.N, d}, dtype);
        cpu::moe_weighted_unpermute(to_dtype(kept, DType::F32), gates, plan.position_of_slot, residual, y_widened);
        CHECK_MESSAGE(bitwise_equal(y, y_widened), what << ": the bf16 rows must weigh as their f32 values do");
      }

      Tensor dy = random({s.N, d}, ++seed, dtype);
      Tensor d_gates = Tensor::empty({s.N, s.k}, dtype), d_gates_gpu = empty_like_on(d_gates, Device::CUDA);
      Tensor d_out = Tensor::empty({S, d}, dtype), d_out_gpu = empty_like_on(d_out, Device::CUDA);
      cpu::moe_weighted_unpermute_backward(dy, out_sorted, gates, plan.position_of_slot, d_gates, d_out);
      cuda::moe_weighted_unpermute_backward(to_gpu(dy), to_gpu(out_sorted), to_gpu(gates), plan_gpu.position_of_slot,
                                            d_gates_gpu, d_out_gpu);
      check_same_bits(d_out_gpu, d_out, what + " d_out_sorted");
      check_scaled(d_gates_gpu, d_gates, float_bound(dtype), what + " d_gates");
      if (dtype == DType::F32) {  // d_out_sorted rounded to bf16 as it is written (mixed precision)
        Tensor rounded = Tensor::empty({S, d}, DType::BF16), rounded_gpu = empty_like_on(rounded, Device::CUDA);
        cpu::moe_weighted_unpermute_backward(dy, out_sorted, gates, plan.position_of_slot, d_gates, rounded);
        cuda::moe_weighted_unpermute_backward(to_gpu(dy), to_gpu(out_sorted), to_gpu(gates), plan_gpu.position_of_slot,
                                              d_gates_gpu, rounded_gpu);
        CHECK_MESSAGE(bitwise_equal(rounded, to_dtype(d_out, DType::BF16)), what << ": the bf16 d_out_sorted's bits");
        check_same_bits(rounded_gpu, rounded, what + " d_out_sorted in bf16");
        // and the kept output in bf16 as the d_gates' other factor
        const Tensor kept = to_dtype(out_sorted, DType::BF16);
        cpu::moe_weighted_unpermute_backward(dy, kept, gates, plan.position_of_slot, d_gates, rounded);
        cuda::moe_weighted_unpermute_backward(to_gpu(dy), to_gpu(kept), to_gpu(gates), plan_gpu.position_of_slot,
                                              d_gates_gpu, rounded_gpu);
        check_scaled(d_gates_gpu, d_gates, float_bound(dtype), what + " d_gates from bf16 rows");
        Tensor d_gates_widened = Tensor::empty({s.N, s.k}, dtype);
        cpu::moe_weighted_unpermute_backward(dy, to_dtype(kept, DType::F32), gates, plan.position_of_slot,
                                             d_gates_widened, rounded);
        CHECK_MESSAGE(bitwise_equal(d_gates, d_gates_widened), what << ": d_gates from bf16 rows as from their values");
      }
    }
}

// ---- the SwiGLU activation and the grouped SwiGLU -------------------------------------------------------------------

TEST_CASE("cuda: moe: SwiGLU activation kernels match the CPU" * cuda_only()) {
  uint64_t seed = 400;
  for (DType dtype : kFloatTypes)
    for (Shape shape : {Shape{1, 1}, Shape{7, 11}, Shape{33, 70}, Shape{771, 37}}) {
      const std::string what = fmt::format("{} {}", shape_str(shape), dtype_name(dtype));
      Tensor gate_pre = random(shape, ++seed, dtype, 2.0), up_pre = random(shape, ++seed, dtype, 2.0);
      Tensor act = Tensor::empty(shape, dtype), act_gpu = empty_like_on(act, Device::CUDA);
      cpu::moe_swiglu_forward(gate_pre, up_pre, act);
      cuda::moe_swiglu_forward(to_gpu(gate_pre), to_gpu(up_pre), act_gpu);
      check_gpu_matches(act_gpu, act, float_bound(dtype), 1e-6, what + " act");

      Tensor d_act = random(shape, ++seed, dtype);
      Tensor d_gate = Tensor::empty(shape, dtype), d_up = Tensor::empty(shape, dtype);
      cpu::moe_swiglu_backward(gate_pre, up_pre, d_act, d_gate, d_up);
      Tensor d_gate_gpu = empty_like_on(d_gate, Device::CUDA), d_up_gpu = empty_like_on(d_up, Device::CUDA);
      cuda::moe_swiglu_backward(to_gpu(gate_pre), to_gpu(up_pre), to_gpu(d_act), d_gate_gpu, d_up_gpu);
      check_gpu_matches(d_up_gpu, d_up, float_bound(dtype), 1e-6, what + " d_up_pre");
      check_scaled(d_gate_gpu, d_gate, float_bound(dtype), what + " d_gate_pre");
      // In place: d_act's buffer becomes d_gate_pre.
      Tensor in_place = to_gpu(d_act), d_up_again = empty_like_on(d_up, Device::CUDA);
      cuda::moe_swiglu_backward(to_gpu(gate_pre), to_gpu(up_pre), in_place, in_place, d_up_again);
      check_same_bits(in_place, to_cpu(d_gate_gpu), what + " d_gate_pre in place");
    }
}

// Under Precision::BF16 the grouped SwiGLU keeps gate_pre, up_pre and act in bf16 and writes d_gate_pre, d_up_pre
// as bf16 operands: f32 math on bf16 inputs, rounded outputs. Where the devices' f32 values differ in the last bit
// (exp), a rounding may go the other way: one bf16 step, at most 2^-7 relative. The f32-math rounding itself is checked
// exactly: act is the bf16 rounding of the f32 kernel's act on the widened inputs.
TEST_CASE("cuda: moe: SwiGLU activation kernels on bf16 activations match the CPU" * cuda_only()) {
  uint64_t seed = 450;
  const double bf16_step = 1.0 / 128;
  for (Shape shape : {Shape{1, 1}, Shape{7, 11}, Shape{771, 37}}) {
    const std::string what = shape_str(shape);
    const Tensor gate_pre = to_dtype(random(shape, ++seed, DType::F32, 2.0), DType::BF16);
    const Tensor up_pre = to_dtype(random(shape, ++seed, DType::F32, 2.0), DType::BF16);
    Tensor act = Tensor::empty(shape, DType::BF16), act_gpu = empty_like_on(act, Device::CUDA);
    cpu::moe_swiglu_forward(gate_pre, up_pre, act);
    cuda::moe_swiglu_forward(to_gpu(gate_pre), to_gpu(up_pre), act_gpu);
    check_gpu_matches(act_gpu, act, bf16_step, 1e-6, what + " act");
    Tensor act_f32 = Tensor::empty(shape, DType::F32);
    cpu::moe_swiglu_forward(to_dtype(gate_pre, DType::F32), to_dtype(up_pre, DType::F32), act_f32);
    CHECK_MESSAGE(bitwise_equal(act, to_dtype(act_f32, DType::BF16)), what << ": act is not the rounded f32 act");

    const Tensor d_act = random(shape, ++seed, DType::F32);
    Tensor d_gate_f32 = Tensor::empty(shape, DType::F32), d_up_f32 = Tensor::empty(shape, DType::F32);
    cpu::moe_swiglu_backward(to_dtype(gate_pre, DType::F32), to_dtype(up_pre, DType::F32), d_act, d_gate_f32, d_up_f32);
    for (DType out : {DType::F32, DType::BF16}) {
      const std::string which = what + " -> " + dtype_name(out);
      Tensor d_gate = Tensor::empty(shape, out), d_up = Tensor::empty(shape, out);
      cpu::moe_swiglu_backward(gate_pre, up_pre, d_act, d_gate, d_up);
      CHECK_MESSAGE(bitwise_equal(d_gate, to_dtype(d_gate_f32, out)), which << ": d_gate_pre is not the f32 one");
      CHECK_MESSAGE(bitwise_equal(d_up, to_dtype(d_up_f32, out)), which << ": d_up_pre is not the f32 one");
      Tensor d_gate_gpu = empty_like_on(d_gate, Device::CUDA), d_up_gpu = empty_like_on(d_up, Device::CUDA);
      cuda::moe_swiglu_backward(to_gpu(gate_pre), to_gpu(up_pre), to_gpu(d_act), d_gate_gpu, d_up_gpu);
      const double bound = out == DType::BF16 ? bf16_step : float_bound(DType::F32);
      check_scaled(d_up_gpu, d_up, bound, which + " d_up_pre");
      check_scaled(d_gate_gpu, d_gate, bound, which + " d_gate_pre");
    }
  }
}

// Under Precision::BF16 both devices multiply the same bf16 roundings of the inputs, with f32 accumulation. The kept
// gate_pre, up_pre and act, and d_gate_pre and d_up_pre, are rounded after they are computed: where the two devices'
// f32 values differ in the last bit, the rounding may go different ways and that value differs by a bf16 step (at
// most 2^-7 relative). They and the products they enter are checked against 2^-7 of their largest entry.
// Every way of running the products (cuda::ExpertGemm): grouped calls (under BF16 the forward's products bf16 -> bf16,
// the backward's TF32 calls on bf16 values kept in f32), padded rows with strided-batched calls (bf16 operands), one
// call per expert (BF16 only: otherwise it is what the grouped path does for f32 and f64 without TF32). Padded falls
// back to grouped calls where the padding would add more than half the rows (cuda::pads_expert_rows): the sweep has
// cases of both kinds, counted. Two cases more: no slots at all, and rows wider than a block's 128 threads (the padded
// kernels loop over the columns) whose experts must pad, some of them partly (forced_ids leaves expert 1 of 4 without
// rows: the other three share 600 slots).
TEST_CASE("cuda: moe: grouped SwiGLU kernels match the CPU, empty experts get zero weight gradients" * cuda_only()) {
  uint64_t seed = 500;
  int padded_cases[2] = {0, 0};  // under Padded: [fell back to grouped, padded]
  std::vector<Sizes> cases = sweep();
  cases.push_back({0, 3, 2});   // no slots
  cases.push_back({300, 4, 2});  // d 300, h 200 below
  for (DType dtype : kFloatTypes)
    for (Precision precision : {Precision::FP32, Precision::BF16})
      for (cuda::ExpertGemm mode : {cuda::ExpertGemm::Grouped, cuda::ExpertGemm::Padded, cuda::ExpertGemm::PerExpert})
        for (const Sizes& s : cases) {
          if (precision == Precision::BF16 && dtype != DType::F32) continue;
          if (mode == cuda::ExpertGemm::PerExpert && precision != Precision::BF16) continue;
          const cuda::ExpertGemmScope scope(mode);
          const std::string what =
              fmt::format("{} {} {} {}", name_of(s), dtype_name(dtype), enum_name(precision), enum_name(mode));
          const double bound = precision == Precision::BF16 ? 1.0 / 128 : float_bound(dtype);
          const bool wide = s.N == 300;
          const int64_t d = wide ? 300 : 13, h = wide ? 200 : 11, S = s.N * s.k;
          Tensor ids = forced_ids(s.N, s.k, s.E, ++seed);
          moe::DispatchPlan plan = moe::plan_dispatch(ids, s.E);
          if (mode == cuda::ExpertGemm::Padded) ++padded_cases[cuda::pads_expert_rows(plan.host_offsets)];
          if (wide && mode == cuda::ExpertGemm::Padded) {
            const std::vector<int32_t> counts = plan.counts.to_vector<int32_t>();
            const int32_t longest = *std::max_element(counts.begin(), counts.end());
            REQUIRE_MESSAGE(cuda::pads_expert_rows(plan.host_offsets), what << ": the wide case must pad");
            REQUIRE_MESSAGE(std::any_of(counts.begin(), counts.end(), [&](int32_t c) { return c > 0 && c < longest; }),
                            what << ": the wide case must pad an expert partly");
          }
          Tensor x_sorted = random({S, d}, ++seed, dtype), d_out = random({S, d}, ++seed, dtype);
          Tensor w_gate = random({s.E, h, d}, ++seed, dtype, 0.4), w_up = random({s.E, h, d}, ++seed, dtype, 0.4);
          Tensor w_down = random({s.E, d, h}, ++seed, dtype, 0.4);

          // Forward: gate_pre, up_pre, act [S, h], out_sorted [S, d] (kept: bf16 under BF16).
          const DType kept = precision == Precision::BF16 ? DType::BF16 : dtype;
          std::vector<Tensor> fwd = {Tensor::empty({S, h}, kept), Tensor::empty({S, h}, kept),
                                     Tensor::empty({S, h}, kept), Tensor::empty({S, d}, kept)};
          std::vector<Tensor> fwd_gpu;
          for (const Tensor& t : fwd) fwd_gpu.push_back(empty_like_on(t, Device::CUDA));
          // Under BF16 the GPU gets x_sorted and d_out in every other case as the op gives them, rounded (bf16) by
          // the permute and the un-permute's backward, and the weights as the parameters' bf16 copies, else in f32,
          // as the CPU always does.
          const bool rounded_rows = precision == Precision::BF16 && seed % 2 == 0;
          auto as_given = [&](const Tensor& t) { return to_gpu(rounded_rows ? to_dtype(t, DType::BF16) : t); };
          const Tensor x_sorted_gpu = as_given(x_sorted), d_out_gpu = as_given(d_out);
          const Tensor w_gate_gpu = as_given(w_gate), w_up_gpu = as_given(w_up), w_down_gpu = as_given(w_down);
          cpu::moe_grouped_swiglu_forward(x_sorted, plan.host_offsets, w_gate, w_up, w_down, fwd[0], fwd[1], fwd[2],
                                          fwd[3], precision);
          cuda::moe_grouped_swiglu_forward(x_sorted_gpu, plan.host_offsets, w_gate_gpu, w_up_gpu, w_down_gpu,
                                           fwd_gpu[0], fwd_gpu[1], fwd_gpu[2], fwd_gpu[3], precision);
          const char* fwd_names[] = {"gate_pre", "up_pre", "act", "out_sorted"};
          for (size_t i = 0; i < fwd.size(); ++i)
            check_scaled(fwd_gpu[i], fwd[i], i < 3 && kept != DType::BF16 ? float_bound(dtype) : bound,
                         what + " " + fwd_names[i]);

          // Backward from the CPU's saved tensors on both devices: d_x_sorted [S, d], dw_gate, dw_up [E, h, d],
          // dw_down [E, d, h] (kept: bf16 under BF16). The GPU's outputs start as NaN: every element must be written.
          // d_act [S, h] is scratch.
          std::vector<Tensor> bwd = {Tensor::empty({S, d}, kept), Tensor::empty(w_gate.shape(), kept),
                                     Tensor::empty(w_up.shape(), kept), Tensor::empty(w_down.shape(), kept)};
          std::vector<Tensor> bwd_gpu;
          for (const Tensor& t : bwd) bwd_gpu.push_back(to_gpu(to_dtype(full(t.shape(), NAN, dtype), t.dtype())));
          const Tensor d_act = Tensor::empty({S, h}, kept), d_act_gpu = empty_like_on(d_act, Device::CUDA);
          cpu::moe_grouped_swiglu_backward(x_sorted, plan.host_offsets, w_gate, w_up, w_down, fwd[0], fwd[1], fwd[2],
                                           d_out, d_act, bwd[0], bwd[1], bwd[2], bwd[3], precision);
          cuda::moe_grouped_swiglu_backward(x_sorted_gpu, plan.host_offsets, w_gate_gpu, w_up_gpu, w_down_gpu,
                                            to_gpu(fwd[0]), to_gpu(fwd[1]), to_gpu(fwd[2]), d_out_gpu, d_act_gpu,
                                            bwd_gpu[0], bwd_gpu[1], bwd_gpu[2], bwd_gpu[3], precision);
          const char* bwd_names[] = {"d_x_sorted", "dw_gate", "dw_up", "dw_down"};
          for (size_t i = 0; i < bwd.size(); ++i) check_scaled(bwd_gpu[i], bwd[i], bound, what + " " + bwd_names[i]);

          const std::vector<int32_t> counts = plan.counts.to_vector<int32_t>();
          for (size_t i = 1; i < bwd.size(); ++i) {
            const std::vector<double> dw = as_doubles(to_cpu(bwd_gpu[i]));
            const int64_t per_expert = h * d;
            for (int64_t e = 0; e < s.E; ++e)
              if (counts[e] == 0)
                CHECK_MESSAGE(
                    std::all_of(dw.begin() + e * per_expert, dw.begin() + (e + 1) * per_expert,
                                [](double v) { return v == 0; }),
                    what << " " << bwd_names[i] << ": expert " << e << " has no token but a nonzero gradient");
          }
        }
  // The rule itself: E times the longest expert's rows at most 1.5 times the slots.
  CHECK(cuda::pads_expert_rows({0, 4, 8, 8, 12}));      // 4 x 4 = 16 <= 18
  CHECK(!cuda::pads_expert_rows({0, 5, 9, 9, 12}));     // 4 x 5 = 20 > 18
  CHECK(!cuda::pads_expert_rows({0, 10, 10, 10, 10}));  // every slot to one expert of 4
  CHECK(cuda::pads_expert_rows({0, 3, 6, 6, 8}));       // 4 x 3 = 12 <= 12: the limit itself
  CHECK(cuda::pads_expert_rows({0, 0, 0}));             // no slots: nothing to pad
  CHECK(!cuda::pads_expert_rows({0, 1500000000, 2000000000}));  // 2 x 1.5e9 padded rows: more than a grid's blocks
  INFO("padded: ", padded_cases[1], " cases, fell back to grouped calls: ", padded_cases[0]);
  CHECK(padded_cases[0] > 0);
  CHECK(padded_cases[1] > 0);
}

// A dtype the kernels would misread is refused before a byte is read (the GPU's casts are unchecked otherwise): the
// same checks as the CPU's, and the elementwise SwiGLU's shared dtypes.
TEST_CASE("cuda: moe: the SwiGLU kernels refuse dtypes they would misread" * cuda_only()) {
  const std::vector<int32_t> offsets = {0, 2, 3};
  const Tensor x = to_gpu(random({3, 4}, 1, DType::F32)), w = to_gpu(random({2, 5, 4}, 2, DType::F32));
  const Tensor wd = to_gpu(random({2, 4, 5}, 3, DType::F32));
  const Tensor kept = Tensor::empty({3, 5}, DType::BF16, Device::CUDA),
               f32 = Tensor::empty({3, 5}, DType::F32, Device::CUDA);
  const Tensor out_bf16 = Tensor::empty({3, 4}, DType::BF16, Device::CUDA);
  const Tensor out = Tensor::empty({3, 4}, DType::F32, Device::CUDA),
               dw = Tensor::empty({2, 5, 4}, DType::F32, Device::CUDA);
  const Tensor dwd = Tensor::empty({2, 4, 5}, DType::F32, Device::CUDA);
  check_error([&] { cuda::moe_grouped_swiglu_forward(x, offsets, w, w, wd, kept, f32, kept, out, Precision::BF16); },
              {"up_pre must be bf16 under bf16 precision, got f32"});
  check_error(
      [&] {
        cuda::moe_grouped_swiglu_backward(x, offsets, w, w, wd, kept, kept, kept, out, f32, out_bf16, dw, dw, dwd,
                                          Precision::BF16);
      },
      {"d_act must be bf16 under bf16 precision, got f32"});
  check_error(
      [&] {
        cuda::moe_grouped_swiglu_backward(x, offsets, w, w, wd, kept, kept, kept, out, kept, out, dw, dw, dwd,
                                          Precision::BF16);
      },
      {"d_x_sorted must be bf16 under bf16 precision, got f32"});
  check_error([&] { cuda::moe_swiglu_forward(kept, f32, kept); }, {"moe_swiglu_forward", "share a dtype"});
  check_error([&] { cuda::moe_swiglu_backward(kept, kept, f32, kept, f32); }, {"moe_swiglu_backward", "share a dtype"});
}

// ---- routing: top-k + gates -----------------------------------------------------------------------------------------

TEST_CASE("cuda: moe: route_gates kernels match the CPU (ids exactly, ties to the lower id)" * cuda_only()) {
  uint64_t seed = 600;
  for (DType dtype : kFloatTypes)
    for (const Sizes& s : sweep())
      for (bool ties : {false, true})
        for (bool norm : {true, false}) {
          const std::string what = fmt::format("{} {} ties={} norm={}", name_of(s), dtype_name(dtype), ties, norm);
          Tensor probs = probabilities(s.N, s.E, ++seed, dtype, ties);
          Tensor ids = Tensor::empty({s.N, s.k}, DType::I32), gates = Tensor::empty({s.N, s.k}, dtype);
          Tensor chosen_sum = Tensor::empty({s.N}, dtype);
          cpu::route_gates_forward(probs, norm, ids, gates, chosen_sum);
          Tensor ids_gpu = empty_like_on(ids, Device::CUDA), gates_gpu = empty_like_on(gates, Device::CUDA);
          Tensor chosen_sum_gpu = empty_like_on(chosen_sum, Device::CUDA);
          cuda::route_gates_forward(to_gpu(probs), norm, ids_gpu, gates_gpu, chosen_sum_gpu);
          check_same_bits(ids_gpu, ids, what + " expert_ids");
          check_same_bits(gates_gpu, gates, what + " gates");
          check_same_bits(chosen_sum_gpu, chosen_sum, what + " chosen_sum");

          Tensor g = random({s.N, s.k}, ++seed, dtype);
          Tensor dprobs = Tensor::empty({s.N, s.E}, dtype), dprobs_gpu = empty_like_on(dprobs, Device::CUDA);
          cpu::route_gates_backward(g, ids, gates, chosen_sum, norm, dprobs);
          cuda::route_gates_backward(to_gpu(g), ids_gpu, gates_gpu, chosen_sum_gpu, norm, dprobs_gpu);
          if (dtype == DType::F32)
            check_same_bits(dprobs_gpu, dprobs, what + " dprobs");
          else
            check_gpu_matches(dprobs_gpu, dprobs, 1e-12, 1e-12, what + " dprobs");
        }
}

TEST_CASE("moe: route_gates is bit-identical to topk + gather + sum + div, values and gradients") {
  uint64_t seed = 700;
  for (DType dtype : kFloatTypes)
    for (const Sizes& s : sweep())
      for (bool ties : {false, true})
        for (bool norm : {true, false}) {
          CAPTURE(name_of(s));
          CAPTURE(ties);
          CAPTURE(norm);
          Tensor p = probabilities(s.N, s.E, ++seed, dtype, ties);
          Tensor probe = random({s.N, s.k}, ++seed, dtype);
          // The router's composition before route_gates.
          Tensor p_composed = leaf_on(p, Device::CPU);
          Tensor ids = topk(p_composed.detach(), s.k).second;
          Tensor chosen = gather(p_composed, 1, ids);
          Tensor gates = norm ? chosen / sum(chosen, -1, /*keepdim=*/true) : chosen;
          sum(mul(gates, probe)).backward();
          // The fused op.
          Tensor p_fused = leaf_on(p, Device::CPU);
          moe::RouteGates fused = moe::route_gates(p_fused, s.k, norm);
          sum(mul(fused.gates, probe)).backward();

          CHECK(fused.expert_ids.to_vector<int32_t>() == ids.to_vector<int32_t>());
          CHECK(as_doubles(fused.gates) == as_doubles(gates));
          CHECK(as_doubles(p_fused.grad()) == as_doubles(p_composed.grad()));
        }
}

// ---- the ops through autograd on the GPU ----------------------------------------------------------------------------

TEST_CASE("cuda: moe: route_gates op on the GPU: ids, gates and the gradient of probs match the CPU" * cuda_only()) {
  uint64_t seed = 800;
  for (const Sizes& s : {Sizes{33, 7, 2}, Sizes{257, 16, 3}})
    for (bool norm : {true, false}) {
      const std::string what = fmt::format("{} norm={}", name_of(s), norm);
      Tensor p = probabilities(s.N, s.E, ++seed, DType::F32, false), probe = random({s.N, s.k}, ++seed, DType::F32);
      std::vector<Tensor> results[2];
      for (Device device : {Device::CPU, Device::CUDA}) {
        Tensor probs = leaf_on(p, device);
        moe::RouteGates r = moe::route_gates(probs, s.k, norm);
        CHECK(r.gates.requires_grad());
        sum(mul(r.gates, to_device(probe, device))).backward();
        results[device == Device::CUDA] = {r.expert_ids, r.gates.detach(), probs.grad()};
      }
      check_same_bits(results[1][0], results[0][0], what + " expert_ids");
      check_same_bits(results[1][1], results[0][1], what + " gates");
      check_same_bits(results[1][2], results[0][2], what + " dprobs");
    }
}

// With the experts' products as grouped calls and on padded rows (cuda::ExpertGemm), and under mixed precision (f32
// tensors, the kept ones bf16: where the devices' f32 sums differ in the last bit a kept value may round a bf16 step
// the other way, so 2^-7 of the largest entry).
TEST_CASE("cuda: moe: moe_experts forward and every gradient on the GPU match the CPU" * cuda_only()) {
  const char* names[] = {"y", "dx", "dgates", "dw_gate", "dw_up", "dw_down"};
  uint64_t seed = 900;
  for (DType dtype : kFloatTypes)
    for (Precision precision : {Precision::FP32, Precision::BF16})
      for (cuda::ExpertGemm mode : {cuda::ExpertGemm::Grouped, cuda::ExpertGemm::Padded})
        for (const Sizes& s : sweep()) {
          if (precision == Precision::BF16 && dtype != DType::F32) continue;
          const cuda::ExpertGemmScope scope(mode);
          const PrecisionGuard products(precision);
          const double bound = precision == Precision::BF16 ? 1.0 / 128 : float_bound(dtype);
          const std::string what =
              fmt::format("{} {} {} {}", name_of(s), dtype_name(dtype), enum_name(precision), enum_name(mode));
          const int64_t d = 13, h = 11;
          Tensor ids = forced_ids(s.N, s.k, s.E, ++seed);
          std::vector<Tensor> values = {random({s.N, d}, ++seed, dtype), random({s.N, s.k}, ++seed, dtype),
                                        random({s.E, h, d}, ++seed, dtype, 0.4),
                                        random({s.E, h, d}, ++seed, dtype, 0.4),
                                        random({s.E, d, h}, ++seed, dtype, 0.4)};
          Tensor probe = random({s.N, d}, ++seed, dtype);
          std::vector<Tensor> results[2];  // y and the gradients of (x, gates, w_gate, w_up, w_down), CPU then GPU
          for (Device device : {Device::CPU, Device::CUDA}) {
            std::vector<Tensor> in;
            for (const Tensor& v : values) in.push_back(leaf_on(v, device));
            Tensor y = moe::moe_experts(in[0], to_device(ids, device), in[1], in[2], in[3], in[4]);
            CHECK(y.device() == device);
            sum(mul(y, to_device(probe, device))).backward();
            std::vector<Tensor>& out = results[device == Device::CUDA];
            out.push_back(y.detach());
            for (const Tensor& t : in) out.push_back(t.grad());
          }
          for (size_t i = 0; i < results[0].size(); ++i) {
            REQUIRE_MESSAGE(results[1][i].defined(), what << " " << names[i] << ": missing on the GPU");
            CHECK(results[1][i].is_cuda());
            check_scaled(results[1][i], results[0][i], bound, what + " " + names[i]);
          }
        }
}
