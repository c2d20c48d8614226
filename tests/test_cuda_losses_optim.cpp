// The CUDA kernels of engine/kernels/router_losses.h and engine/kernels/optim.h against their CPU twins on the same
// inputs, then the router losses, AdamW, grad_clip and OMoE on both devices through their public API.
//
// Bounds. The same bits wherever the GPU does the CPU's arithmetic in the CPU's order: the sequence means and the
// domain means (double sums in sequence order), the ED backward (one division and one product per element), the
// fill of identities, and AdamW: its float expressions are written on the GPU with __fmul_rn / __fadd_rn, which nvcc
// never contracts into a fused multiply-add, so with IEEE division and square root every product and sum is rounded
// once as on the CPU (x86-64 without FMA) and the parameters and moments are the CPU's bits, step after step (a
// stronger check than 1e-6 relative). Elsewhere f32 within 1e-5 and f64 within 1e-12 relative: the z-loss (the GPU's
// exp and log differ from libm's and the CPU's vectorized f32 exp by an ulp or two; its sums run in another fixed
// order), the pairwise JSD (block sums over the experts), the gradient norm (double sums in another order) and the
// clipped gradients (one float product with a scale that may differ in its last bit). OMoE goes through GEMMs that
// sum in another order (cuBLAS), so its projectors and parameters are compared relative to the largest entry of the
// tensor (max |gpu - cpu| <= bound * max |cpu|): see that test for the bound.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "engine/kernels/optim.h"
#include "engine/kernels/router_losses.h"
#include "moe/losses.h"
#include "moe/moe_layer.h"
#include "optim/adamw.h"
#include "optim/omoe.h"
#include "tests/cuda_testing.h"

using namespace moelab;
using namespace moelab::testing;

namespace {

const std::vector<DType> kFloatTypes = {DType::F32, DType::F64};

double f32_or_f64(DType dtype, double f32, double f64) { return dtype == DType::F32 ? f32 : f64; }

// Rows of probabilities [rows, E] (softmax of normal logits), in dtype.
Tensor random_probs(int64_t rows, int64_t E, uint64_t seed, DType dtype) {
  return softmax(random({rows, E}, seed, dtype, 2.0));
}

}  // namespace

// ---- z-loss -----------------------------------------------------------------------------------------------------------

namespace {

struct ZLossOutputs {
  Tensor loss, lse, dlogits;
};

ZLossOutputs z_loss_kernels(const Tensor& logits, Device device) {
  const Tensor x = on(logits, device);
  ZLossOutputs o{Tensor::empty({}, x.dtype(), device), Tensor::empty({x.size(0)}, DType::F64, device),
                 empty_like_on(x, device)};
  KERNEL(z_loss_forward, device)(x, o.loss, o.lse);
  const Tensor g = on(full({}, 0.75, x.dtype()), device);  // the upstream gradient, read on the device
  KERNEL(z_loss_backward, device)(x, o.lse, g, o.dlogits);
  return o;
}

}  // namespace

TEST_CASE("cuda: losses: z-loss kernels match the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    // E = 300: a row longer than the block; N = 1100: the loss's sum strides over its 1024 threads. Rows of up to 32
    // go to one warp each, 8 to a block (N = 1100, E = 32: a partial last block).
    for (auto [N, E] :
         {std::pair<int64_t, int64_t>{1, 1}, {7, 2}, {33, 7}, {5, 300}, {1100, 33}, {1100, 32}, {9, 16}}) {
      const std::string what = fmt::format("{} [{}, {}]", dtype_name(dtype), N, E);
      const Tensor logits = random({N, E}, 10 + N + E, dtype, 3.0);
      const ZLossOutputs cpu = z_loss_kernels(logits, Device::CPU), gpu = z_loss_kernels(logits, Device::CUDA);
      check_gpu_matches(gpu.loss, cpu.loss, rel, 1e-12, what + " loss");
      check_gpu_matches(gpu.lse, cpu.lse, rel, 1e-9, what + " lse");
      check_gpu_matches(gpu.dlogits, cpu.dlogits, rel, 1e-12, what + " dlogits");
    }
  }
}

TEST_CASE("cuda: losses: z_loss and load_balancing_loss on the GPU match the CPU (autograd)" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    const Tensor logits = random({33, 7}, 40, dtype, 2.0);
    Tensor xc = logits.detach().set_requires_grad(), xg = to_gpu(logits).set_requires_grad();
    Tensor lc = moe::z_loss(xc), lg = moe::z_loss(xg);
    REQUIRE(lg.is_cuda());
    check_gpu_matches(lg, lc, rel, 1e-12, "z_loss");
    mul(lc, 0.5).backward();
    mul(lg, 0.5).backward();
    REQUIRE(xg.grad().is_cuda());
    check_gpu_matches(xg.grad(), xc.grad(), rel, 1e-12, "z_loss gradient");

    // Load balancing stays a composite of ops (bincount, to_dtype, mean, mul, sum), each with its CUDA kernel.
    const std::vector<int32_t> ids = {0, 3, 1, 3, 6, 2, 3, 0, 5, 5, 1, 1, 4, 3};  // [7, 2]
    Tensor pc = random_probs(7, 7, 41, dtype).set_requires_grad(), pg = to_gpu(pc).set_requires_grad();
    Tensor bc = moe::load_balancing_loss(pc, from_vector(ids, {7, 2}));
    Tensor bg = moe::load_balancing_loss(pg, from_vector(ids, {7, 2}, Device::CUDA));
    check_gpu_matches(bg, bc, rel, 1e-12, "load_balancing_loss");
    bc.backward();
    bg.backward();
    check_gpu_matches(pg.grad(), pc.grad(), rel, 1e-12, "load_balancing_loss gradient");
  }
}

// ---- expert divergence ------------------------------------------------------------------------------------------------

namespace {

struct EDCase {
  int64_t T, E, M;
  std::vector<int32_t> domains;  // [B]
};

// Odd sizes: E = 300 is longer than the pairwise block (128 threads); domain 4 of M = 5 is absent in the second.
std::vector<EDCase> ed_cases() {
  std::vector<int32_t> many(33);
  for (int32_t s = 0; s < 33; ++s) many[s] = (s * 7) % 4;
  return {{5, 7, 4, {0, 1, 2, 0, 3, 2, 3}}, {3, 33, 5, many}, {1, 2, 3, {0, 0, 2, 2}}, {2, 300, 2, {1, 0, 1, 1, 0}}};
}

// Random domain sums of M domains of E experts (the step's other micro-batches): count_j sequences of domain j, each
// adding a distribution.
moe::DomainSums random_rest(int64_t M, int64_t E, const std::vector<int64_t>& count, uint64_t seed) {
  moe::DomainSums rest{std::vector<moe::Distribution>(M), count};
  const std::vector<double> p = random_probs(M, E, seed, DType::F64).to_vector<double>();
  for (int64_t j = 0; j < M; ++j)
    for (int64_t e = 0; e < E; ++e) rest.sum[j].push_back(static_cast<double>(count[j]) * p[j * E + e]);
  return rest;
}

struct EDOutputs {
  Tensor means, loss, grad_q;
};

// The ED forward kernels on `device`; counts pooled with rest's when rest is given.
EDOutputs ed_forward_kernels(const Tensor& probs, const EDCase& c, const moe::DomainSums* rest, bool neg_log,
                             Device device) {
  const int64_t B = static_cast<int64_t>(c.domains.size());
  std::vector<double> counts(c.M, 0.0);
  for (int32_t d : c.domains) counts[d] += 1;
  Tensor rest_sums;
  if (rest) {
    std::vector<double> flat;
    for (int64_t j = 0; j < c.M; ++j) {
      flat.insert(flat.end(), rest->sum[j].begin(), rest->sum[j].end());
      counts[j] += static_cast<double>(rest->count[j]);
    }
    rest_sums = from_vector(flat, {c.M, c.E}, DType::F64, device);
  }
  EDOutputs o{Tensor::empty({B, c.E}, DType::F64, device), Tensor::empty({}, probs.dtype(), device),
              Tensor::empty({c.M, c.E}, DType::F64, device)};
  const Tensor domains = from_vector(c.domains, {B}, device), n = from_vector(counts, {c.M}, DType::F64, device);
  KERNEL(sequence_means, device)(on(probs, device), o.means);
  KERNEL(expert_divergence_forward, device)(o.means, domains, rest_sums, n, neg_log, 1e-6, o.loss, o.grad_q);
  return o;
}

Tensor ed_backward_kernel(const Tensor& grad_q, const EDCase& c, const moe::DomainSums* rest, DType dtype,
                          Device device) {
  const int64_t B = static_cast<int64_t>(c.domains.size());
  std::vector<double> counts(c.M, 0.0);
  for (int32_t d : c.domains) counts[d] += 1;
  for (int64_t j = 0; rest && j < c.M; ++j) counts[j] += static_cast<double>(rest->count[j]);
  const Tensor g = on(full({}, -0.5, dtype), device), domains = from_vector(c.domains, {B}, device);
  const Tensor n = from_vector(counts, {c.M}, DType::F64, device);
  Tensor dprobs = Tensor::empty({B * c.T, c.E}, dtype, device);
  KERNEL(expert_divergence_backward, device)(g, on(grad_q, device), domains, n, dprobs);
  return dprobs;
}

}  // namespace

TEST_CASE("cuda: losses: expert divergence kernels match the CPU (both forms, both scopes)" * cuda_only()) {
  for (DType dtype : kFloatTypes)
    for (const EDCase& c : ed_cases())
      for (bool neg_log : {true, false})
        for (bool with_rest : {false, true}) {
          const int64_t B = static_cast<int64_t>(c.domains.size());
          const std::string what =
              fmt::format("{} B={} T={} E={} M={} {} {}", dtype_name(dtype), B, c.T, c.E, c.M,
                          neg_log ? "neglog" : "neg_jsd", with_rest ? "step scope" : "micro-batch");
          std::vector<int64_t> rest_count(c.M);
          for (int64_t j = 0; j < c.M; ++j) rest_count[j] = j % 3;  // some domains absent from the rest too
          const moe::DomainSums rest = random_rest(c.M, c.E, rest_count, 60 + c.E);
          const moe::DomainSums* r = with_rest ? &rest : nullptr;
          const Tensor probs = random_probs(B * c.T, c.E, 50 + B, dtype);
          const EDOutputs cpu = ed_forward_kernels(probs, c, r, neg_log, Device::CPU);
          const EDOutputs gpu = ed_forward_kernels(probs, c, r, neg_log, Device::CUDA);
          check_same_bits(gpu.means, cpu.means, what + " sequence means");
          check_gpu_matches(gpu.loss, cpu.loss, f32_or_f64(dtype, 1e-6, 1e-12), 1e-12, what + " loss");
          CHECK(std::abs(cpu.loss.item()) > 0);
          check_scaled(gpu.grad_q, cpu.grad_q, 1e-12, what + " G");
          // The backward of the same G: the CPU's bits; of the GPU's own G: within G's bound.
          const Tensor dcpu = ed_backward_kernel(cpu.grad_q, c, r, dtype, Device::CPU);
          check_same_bits(ed_backward_kernel(cpu.grad_q, c, r, dtype, Device::CUDA), dcpu, what + " dprobs");
          check_scaled(ed_backward_kernel(gpu.grad_q, c, r, dtype, Device::CUDA), dcpu, f32_or_f64(dtype, 1e-6, 1e-12),
                       what + " dprobs from the GPU's G");
        }
}

TEST_CASE("cuda: losses: expert_divergence_loss and routing_domain_sums on the GPU match the CPU" * cuda_only()) {
  using moe::EDForm;
  const int64_t T = 4, E = 5, M = 4;
  const std::vector<int32_t> first{0, 1, 2, 0}, second{3, 2, 3};
  for (DType dtype : kFloatTypes)
    for (EDForm form : {EDForm::NegLog, EDForm::NegJSD}) {
      CAPTURE(dtype_name(dtype));
      CAPTURE(enum_name(form));
      const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
      const Tensor probs = random_probs(7 * T, E, 70, dtype);
      const Tensor p1 = slice_rows(probs, 0, 4 * T), p2 = slice_rows(probs, 4 * T, 7 * T);
      // The step scope's pass 1 on the GPU: the same sums (the sequence means are the CPU's bits, copied to the host).
      const moe::DomainSums rest_cpu = moe::routing_domain_sums(p2, from_vector(second, {3}), M);
      const moe::DomainSums rest_gpu = moe::routing_domain_sums(to_gpu(p2), from_vector(second, {3}, Device::CUDA), M);
      CHECK(rest_gpu.sum == rest_cpu.sum);
      CHECK(rest_gpu.count == rest_cpu.count);
      const std::vector<moe::Distribution> means_cpu = moe::sequence_means(p1, 4);
      CHECK(moe::sequence_means(to_gpu(p1), 4) == means_cpu);

      for (const moe::DomainSums* rest : {static_cast<const moe::DomainSums*>(nullptr), &rest_cpu}) {
        CAPTURE(rest != nullptr);
        Tensor pc = p1.detach().set_requires_grad(), pg = to_gpu(p1).set_requires_grad();
        Tensor lc = moe::expert_divergence_loss(pc, from_vector(first, {4}), M, form, 1e-6, rest);
        // The domains may live on either device: here on the host, with the probabilities on the GPU.
        Tensor lg = moe::expert_divergence_loss(pg, from_vector(first, {4}), M, form, 1e-6, rest);
        REQUIRE(lg.is_cuda());
        check_gpu_matches(lg, lc, rel, 1e-12, "loss");
        mul(lc, 3.0).backward();
        mul(lg, 3.0).backward();
        REQUIRE(pg.grad().is_cuda());
        check_scaled(pg.grad(), pc.grad(), rel, "gradient");
      }
    }
}

TEST_CASE("cuda: losses: expert divergence with fewer than two domains present is 0 on the GPU" * cuda_only()) {
  const int64_t T = 3, E = 4, M = 3;
  const Tensor probs = to_gpu(random_probs(4 * T, E, 80, DType::F32)).set_requires_grad();
  const Tensor one_domain = from_vector(std::vector<int32_t>{1, 1, 1, 1}, {4}, Device::CUDA);
  const moe::DomainSums same_domain = random_rest(M, E, {0, 2, 0}, 81), other_domain = random_rest(M, E, {3, 0, 0}, 82);
  for (const moe::DomainSums* rest : {static_cast<const moe::DomainSums*>(nullptr), &same_domain}) {
    Tensor loss = moe::expert_divergence_loss(probs, one_domain, M, moe::EDForm::NegLog, 1e-6, rest);
    CHECK(loss.is_cuda());
    CHECK(loss.item() == 0.0);
    CHECK_FALSE(loss.requires_grad());  // no gradient
  }
  // The step's other micro-batches bring a second domain: a loss, and a gradient.
  Tensor loss = moe::expert_divergence_loss(probs, one_domain, M, moe::EDForm::NegLog, 1e-6, &other_domain);
  Tensor expected =
      moe::expert_divergence_loss(to_cpu(probs), to_cpu(one_domain), M, moe::EDForm::NegLog, 1e-6, &other_domain);
  CHECK(expected.item() > 0);
  check_gpu_matches(loss, expected, 1e-5, 1e-12, "loss from the step's other domain");
  loss.backward();
  CHECK(probs.grad().is_cuda());
}

// ---- AdamW and gradient clipping --------------------------------------------------------------------------------------

namespace {

// Parameters of 1, 7, 33 and 4097 (= 17 x 241, a matrix: decayed) elements, a 3-D stack, and an empty one.
const std::vector<Shape> kParamShapes = {{1}, {7}, {33}, {17, 241}, {3, 4, 5}, {0}};

std::vector<nn::NamedTensor> random_params(const std::vector<Shape>& shapes, uint64_t seed, Device device) {
  std::vector<nn::NamedTensor> params;
  for (size_t i = 0; i < shapes.size(); ++i)
    params.push_back({fmt::format("p{}", i), on(random(shapes[i], seed + i, DType::F32), device)});
  return params;
}

// Gradients of step t: mixed scales, all zero at t = 4 (v stays small there: the eps regime).
Tensor step_gradient(const Shape& shape, int64_t t, size_t i) {
  Tensor g = mul(random(shape, 100 * t + i, DType::F32), t % 3 == 0 ? 1e-3 : 1.0);
  return t == 4 ? zeros_like(g) : g;
}

}  // namespace

// With the parameters' bf16 copies (mixed precision's, engine/bf16_weights.h), which the update writes too.
TEST_CASE("cuda: optim: AdamW on the GPU, one launch over every parameter, is the CPU's bits" * cuda_only()) {
  const std::vector<nn::NamedTensor> cpu_params = random_params(kParamShapes, 1, Device::CPU);
  const std::vector<nn::NamedTensor> gpu_params = random_params(kParamShapes, 1, Device::CUDA);
  optim::AdamW cpu(cpu_params, {0.9, 0.95, 1e-8, 0.1}), gpu(gpu_params, {0.9, 0.95, 1e-8, 0.1});
  cpu.keep_bf16_weights();
  gpu.keep_bf16_weights();
  for (size_t i = 0; i < cpu_params.size(); ++i) {  // made as a product would make them
    (void)cpu.bf16_weights()->copy_of(cpu_params[i].tensor);
    (void)gpu.bf16_weights()->copy_of(gpu_params[i].tensor);
  }
  auto check_all = [&](const std::string& when) {
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      REQUIRE(gpu_params[i].tensor.is_cuda());
      check_same_bits(gpu_params[i].tensor, cpu_params[i].tensor, when + " " + cpu_params[i].name);
      const Tensor gpu_copy = gpu.bf16_weights()->made_copy_of(gpu_params[i].tensor);
      check_same_bits(gpu_copy, cpu.bf16_weights()->made_copy_of(cpu_params[i].tensor),
                      when + " bf16 copy of " + cpu_params[i].name);
      check_same_bits(gpu_copy, to_dtype(cpu_params[i].tensor, DType::BF16),
                      when + " bf16 copy of " + cpu_params[i].name + ", rounded");
    }
    const std::vector<nn::NamedTensor> sc = cpu.state(), sg = gpu.state();
    for (size_t i = 0; i < sc.size(); ++i) check_same_bits(sg[i].tensor, sc[i].tensor, when + " " + sc[i].name);
  };
  for (int64_t t = 1; t <= 6; ++t) {
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      if (i == 1 && t == 2) continue;  // a parameter without a gradient is left alone
      const Tensor g = step_gradient(kParamShapes[i], t, i);
      cpu_params[i].tensor.set_grad(g);
      gpu_params[i].tensor.set_grad(to_gpu(g));
    }
    const double lr = 1e-2 * (1.0 - 0.1 * static_cast<double>(t));
    const float grad_scale = t % 2 ? 1.0f : 0.37f;  // gradient clipping's factor, applied as each gradient is read
    cpu.step(lr, grad_scale);
    gpu.step(lr, grad_scale);
    check_all(fmt::format("step {}", t));
    cpu.zero_grad();
    gpu.zero_grad();
  }
  // update_direction (OMoE's mode = direction): the direction, an op on it, the step.
  for (int64_t t = 7; t <= 9; ++t) {
    cpu.begin_step();
    gpu.begin_step();
    for (size_t i = 0; i < cpu_params.size(); ++i) {
      const Tensor g = step_gradient(kParamShapes[i], t, i);
      auto half = [](const Tensor& d) { return mul(d, 0.5); };
      cpu.update_direction(i, g, 1e-2, half, 0.5f);
      gpu.update_direction(i, to_gpu(g), 1e-2, half, 0.5f);
    }
    check_all(fmt::format("direction step {}", t));
  }
}

TEST_CASE("cuda: optim: grad_clip on the GPU matches the CPU and leaves the gradients alone" * cuda_only()) {
  std::vector<Shape> shapes = kParamShapes;
  shapes.push_back({3, 4099});                      // four chunks of 4096 elements, the last one partial
  shapes.push_back({5});                            // no gradient
  for (double max_norm_factor : {0.5, 2.0, 0.0}) {  // clipped, under the limit, no limit
    CAPTURE(max_norm_factor);
    const std::vector<nn::NamedTensor> cpu = random_params(shapes, 1, Device::CPU);
    const std::vector<nn::NamedTensor> gpu = random_params(shapes, 1, Device::CUDA);
    std::vector<Tensor> before;
    double total = 0;
    for (size_t i = 0; i + 1 < shapes.size(); ++i) {
      const Tensor g = random(shapes[i], 200 + i, DType::F32, 1.0 + static_cast<double>(i));
      for (float v : g.to_vector<float>()) total += static_cast<double>(v) * v;
      cpu[i].tensor.set_grad(clone(g));
      gpu[i].tensor.set_grad(to_gpu(g));
      before.push_back(g);
    }
    const double max_norm = max_norm_factor * std::sqrt(total);
    const optim::GradClip clip_cpu = optim::grad_clip(cpu, max_norm), clip_gpu = optim::grad_clip(gpu, max_norm);
    CHECK(clip_cpu.norm == doctest::Approx(std::sqrt(total)).epsilon(1e-12));
    CHECK(std::abs(clip_gpu.norm - clip_cpu.norm) <= 1e-12 * clip_cpu.norm);
    const float expected_scale = max_norm_factor == 0.5 ? static_cast<float>(max_norm / (clip_cpu.norm + 1e-6)) : 1.0f;
    CHECK(clip_cpu.scale == expected_scale);
    CHECK(clip_gpu.scale == doctest::Approx(expected_scale).epsilon(1e-6));
    for (size_t i = 0; i + 1 < shapes.size(); ++i) {  // the optimizers apply the scale; the gradients stay as they were
      const std::string what = cpu[i].name + " " + shape_str(shapes[i]);
      check_same_bits(cpu[i].tensor.grad(), before[i], what + " on the CPU");
      check_same_bits(gpu[i].tensor.grad(), before[i], what + " on the GPU");
    }
    CHECK_FALSE(gpu.back().tensor.grad().defined());
  }
}

// ---- OMoE -------------------------------------------------------------------------------------------------------------

TEST_CASE("cuda: optim: fill_identity kernel matches the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes)
    for (Shape shape : {Shape{1, 1, 1}, Shape{3, 7, 7}, Shape{2, 33, 33}}) {
      Tensor cpu = Tensor::empty(shape, dtype), gpu = Tensor::empty(shape, dtype, Device::CUDA);
      KERNEL(fill_identity, Device::CPU)(cpu);
      KERNEL(fill_identity, Device::CUDA)(gpu);
      check_same_bits(gpu, cpu, fmt::format("{} {}", dtype_name(dtype), shape_str(shape)));
    }
}

namespace {

// A MoE layer's router and expert weights as AdamW parameters, moved to `device` (the layer's own handles are
// replaced by the moved ones: OMoE finds the expert matrices among the optimizer's parameters by handle).
std::vector<nn::NamedTensor> layer_params_on(moe::MoELayer& layer, Device device) {
  for (Tensor* t : {&layer.router.weight, &layer.experts.w_gate, &layer.experts.w_up, &layer.experts.w_down})
    *t = on(*t, device).set_requires_grad();
  return {{"moe.router.weight", layer.router.weight},
          {"moe.experts.w_gate", layer.experts.w_gate},
          {"moe.experts.w_up", layer.experts.w_up},
          {"moe.experts.w_down", layer.experts.w_down}};
}

}  // namespace

TEST_CASE("cuda: optim: OMoE observe and step on the GPU match the CPU" * cuda_only()) {
  // Bound: the OWM updates and the projection are GEMMs (k = a^T P a ..., G Pbar), which cuBLAS sums in another order
  // than the CPU's GEMM: f32 rounding differences of ~1e-7 relative per product, carried through a few recursive
  // updates and AdamW's m / sqrt(v). 1e-5 of the tensor's largest entry holds them with room.
  const double bound = 1e-5;
  const int64_t d = 12, hidden = 6, E = 4, N = 10;
  for (optim::OMoEMode mode : {optim::OMoEMode::Grad, optim::OMoEMode::Direction}) {
    CAPTURE(enum_name(mode));
    Generator gen_cpu(3), gen_gpu(3);
    moe::MoELayer cpu_layer(testing::moe_layer_config(d, E, hidden, 2), 0, gen_cpu),
        gpu_layer(testing::moe_layer_config(d, E, hidden, 2), 0, gen_gpu);
    const std::vector<nn::NamedTensor> cpu_params = layer_params_on(cpu_layer, Device::CPU);
    const std::vector<nn::NamedTensor> gpu_params = layer_params_on(gpu_layer, Device::CUDA);
    optim::AdamW cpu_adamw(cpu_params, {}), gpu_adamw(gpu_params, {});
    optim::OMoEConfig config;
    config.every = 2;
    config.reset = mode == optim::OMoEMode::Grad;  // with reset in one run, without in the other
    config.project_down = true;
    config.mode = mode;
    config.spectrum_every = 1;
    optim::OMoE cpu(cpu_adamw, {&cpu_layer}, config), gpu(gpu_adamw, {&gpu_layer}, config);
    REQUIRE(gpu.projectors(0).is_cuda());
    for (int64_t t = 1; t <= 6; ++t) {
      const std::string what = fmt::format("step {}", t);
      for (size_t i = 0; i < cpu_params.size(); ++i) {
        const Tensor g = random(cpu_params[i].tensor.shape(), 1000 * t + i, DType::F32);
        cpu_params[i].tensor.set_grad(g);
        gpu_params[i].tensor.set_grad(to_gpu(g));
      }
      std::vector<int32_t> ids;  // experts 0..2 only: expert 3 never gets a token
      for (int64_t n = 0; n < N; ++n) ids.push_back(int32_t((n + t) % 3)), ids.push_back(int32_t((n + t + 1) % 3));
      const Tensor h = random({N, d}, 5000 + t, DType::F32);
      cpu.observe(0, from_vector(ids, {N, 2}), h);
      gpu.observe(0, from_vector(ids, {N, 2}, Device::CUDA), to_gpu(h));
      check_scaled(gpu.projectors(0), cpu.projectors(0), bound, what + " P_in after observe");
      check_scaled(gpu.projectors(0, true), cpu.projectors(0, true), bound, what + " P_down after observe");
      const optim::OMoEReport rc = cpu.step(0.01), rg = gpu.step(0.01);
      CHECK(rg.o_step == rc.o_step);
      REQUIRE(rg.removed.size() == rc.removed.size());
      for (size_t l = 0; l < rc.removed.size(); ++l)
        CHECK(std::abs(rg.removed[l] - rc.removed[l]) <= bound * rc.removed[l]);
      REQUIRE(rg.pbar_trace.size() == rc.pbar_trace.size());
      for (size_t l = 0; l < rc.pbar_trace.size(); ++l) {
        CHECK(std::abs(rg.pbar_trace[l] - rc.pbar_trace[l]) <= bound * rc.pbar_trace[l]);
        CHECK(std::abs(rg.pbar_min_eig[l] - rc.pbar_min_eig[l]) <= bound);
      }
      check_scaled(gpu.projectors(0), cpu.projectors(0), bound, what + " P_in after the step");
      for (size_t i = 0; i < cpu_params.size(); ++i)
        check_scaled(gpu_params[i].tensor, cpu_params[i].tensor, bound, what + " " + cpu_params[i].name);
      cpu.zero_grad();
      gpu.zero_grad();
    }
  }
}
