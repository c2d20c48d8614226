// The CUDA kernels of engine/kernels/nn.h and engine/kernels/matmul.h against their CPU twins on the same inputs, the
// nn ops and matmul through autograd on both devices, and the row-major cuBLAS API of engine/cuda/blas.cuh against a
// plain product in double. Sizes are odd on purpose (1, 7, 33, 65, 4097: not multiples of a warp or a block).
//
// Tolerances. The devices add in different orders (the emulator's cuBLAS adds in double), so bits may differ. A value
// computed element by element (dlogits, RMSNorm's y, rstd) agrees to 1e-5 relative. A sum of terms of both signs
// agrees to 1e-5 relative to the typical size of such a sum: |gpu - cpu| <= 1e-5 (scale + |cpu|), where the scale is
// 1 for the nn kernels (normalized rows, RoPE's two terms) and sqrt(n) for a product's sums of n terms of N(0, 1)
// values (an f32 sum of n terms carries an error up to about n * 2^-24 times its terms). f64: 1e-12 the same way.
// bf16 results: the same f32 sum rounded once to bf16 on each device may land one bf16 step apart (2^-8 to 2^-7
// relative), so 2^-7.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "engine/kernels/matmul.h"
#include "engine/kernels/nn.h"
#include "tests/cuda_testing.h"
#include "tests/wmma_matmul.h"

#if MOELAB_HAVE_CUDA
#include "engine/cuda/blas.cuh"
#endif

namespace moelab {
using testing::cuda_only;
using testing::empty_like_on;
using testing::on;
using testing::op_and_gradients;
using testing::random;
using testing::to_cpu;
using testing::to_gpu;

namespace {

constexpr double kBf16Step = 1.0 / 128;
constexpr DType kFloatTypes[] = {DType::F32, DType::F64};

double f32_or_f64(DType dtype, double f32, double f64) { return dtype == DType::F64 ? f64 : f32; }

// The typical size of a sum of n products of N(0, 1) values.
double sum_scale(int64_t n) { return std::sqrt(static_cast<double>(std::max<int64_t>(n, 1))); }

// A tensor's values as doubles (bf16 included), copied to the host.
std::vector<double> values_of(const Tensor& x) {
  Tensor c = to_cpu(x);
  if (c.dtype() != DType::BF16) return testing::as_doubles(c);
  std::vector<double> out;
  for (bf16 v : c.to_vector<bf16>()) out.push_back(to_float(v));
  return out;
}

// A CPU tensor of `dtype` (f32, f64, or bf16 rounded to nearest even) holding `values`.
Tensor host_tensor(const std::vector<double>& values, const Shape& shape, DType dtype) {
  if (dtype != DType::BF16) return from_vector(values, shape, dtype);
  Tensor out = Tensor::empty(shape, DType::BF16);
  for (size_t i = 0; i < values.size(); ++i) out.data<bf16>()[i] = to_bf16(static_cast<float>(values[i]));
  return out;
}

Tensor converted(const Tensor& x, DType dtype) { return host_tensor(values_of(x), x.shape(), dtype); }

// N(0, 1) values in any float dtype (bf16: rounded from f32).
Tensor random_of(const Shape& shape, uint64_t seed, DType dtype, double scale = 1.0) {
  return dtype == DType::BF16 ? converted(random(shape, seed, DType::F32, scale), DType::BF16)
                              : random(shape, seed, dtype, scale);
}

// Asserts |actual - expected| <= rel (atol + |expected|) elementwise (atol: the scale of a sum, see above).
void check_values(const std::vector<double>& actual, const std::vector<double>& expected, double rel, double atol,
                  const std::string& what) {
  REQUIRE_MESSAGE(actual.size() == expected.size(), what);
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    double err = std::abs(actual[i] - expected[i]) / (atol + std::abs(expected[i]));
    if (!(err <= worst)) worst = err, at = i;  // NaN-propagating
  }
  CHECK_MESSAGE(worst <= rel, what << ": relative error " << worst << " > " << rel << " at flat index " << at << " ("
                                   << actual[at] << " vs " << expected[at] << ")");
}

// Asserts that a GPU result has the CPU result's shape and dtype and its values within rel (check_values).
void check_match(const Tensor& gpu, const Tensor& cpu, double rel, double atol, const std::string& what) {
  REQUIRE_MESSAGE(gpu.defined() == cpu.defined(), what);
  if (!cpu.defined()) return;
  CHECK_MESSAGE(gpu.device() == Device::CUDA, what << ": " << gpu.str() << " is not on the GPU");
  REQUIRE_MESSAGE((gpu.dtype() == cpu.dtype() && gpu.shape() == cpu.shape()),
                  what << ": " << gpu.str() << " vs " << cpu.str());
  check_values(values_of(gpu), values_of(cpu), rel, atol, what);
}

}  // namespace

// ---- (a) the nn kernels ---------------------------------------------------------------------------------------------

namespace {

struct CrossEntropyOutputs {
  Tensor loss, lse, row_loss, dlogits;
};

CrossEntropyOutputs cross_entropy_kernels(const Tensor& logits, const Tensor& targets, int64_t count, Device device) {
  const int64_t N = logits.size(0);
  const Tensor x = on(logits, device), t = on(targets, device);
  CrossEntropyOutputs o{Tensor::empty({}, x.dtype(), device), Tensor::empty({N}, x.dtype(), device),
                        Tensor::empty({N}, DType::F64, device), empty_like_on(x, device)};
  KERNEL(cross_entropy_forward, device)(x, t, kIgnoreIndex, count, o.loss, o.lse, o.row_loss);
  const Tensor g = on(full({}, 0.75, x.dtype()), device);  // the upstream gradient, read on the device
  KERNEL(cross_entropy_backward, device)(x, t, o.lse, g, kIgnoreIndex, count, o.dlogits);
  return o;
}

// Targets for N rows of V classes: every fourth row (from row 1) ignored, the others spread over [0, V).
std::vector<int32_t> some_ignored_targets(int64_t N, int64_t V) {
  std::vector<int32_t> t(N);
  for (int64_t r = 0; r < N; ++r) t[r] = r % 4 == 1 ? kIgnoreIndex : static_cast<int32_t>((r * 7919 + 3) % V);
  return t;
}

}  // namespace

TEST_CASE("cuda: nn: cross-entropy kernels match the CPU, with ignored rows" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    for (auto [N, V] : {std::pair<int64_t, int64_t>{1, 1}, {7, 33}, {33, 4097}, {66, 300}}) {
      const std::string what = fmt::format("{} [{}, {}]", dtype_name(dtype), N, V);
      const Tensor logits = random({N, V}, 10 + N, dtype, 3.0);
      const std::vector<int32_t> t = some_ignored_targets(N, V);
      int64_t count = 0;
      for (int32_t target : t) count += target != kIgnoreIndex;
      const Tensor targets = from_vector(t, {N});
      const CrossEntropyOutputs cpu = cross_entropy_kernels(logits, targets, count, Device::CPU);
      const CrossEntropyOutputs gpu = cross_entropy_kernels(logits, targets, count, Device::CUDA);
      check_match(gpu.loss, cpu.loss, rel, 1e-9, what + " loss");
      check_match(gpu.lse, cpu.lse, rel, 1e-9, what + " lse");
      check_match(gpu.row_loss, cpu.row_loss, rel, 1e-9, what + " row_loss");
      check_match(gpu.dlogits, cpu.dlogits, rel, 1e-12, what + " dlogits");
    }
  }
}

TEST_CASE("cuda: nn: cross-entropy kernels with every row ignored give a zero loss and zero gradient" * cuda_only()) {
  for (int64_t N : {0, 1, 5}) {
    const Tensor logits = random({N, 9}, 3, DType::F32);
    const Tensor targets = from_vector(std::vector<int32_t>(N, kIgnoreIndex), {N});
    const CrossEntropyOutputs gpu = cross_entropy_kernels(logits, targets, 0, Device::CUDA);
    CHECK(gpu.loss.item() == 0.0);
    for (double v : values_of(gpu.row_loss)) CHECK(v == 0.0);
    for (double v : values_of(gpu.dlogits)) CHECK(v == 0.0);
    check_match(gpu.lse, cross_entropy_kernels(logits, targets, 0, Device::CPU).lse, 1e-5, 1e-9, "lse");
  }
}

TEST_CASE("cuda: nn: the cross-entropy kernel with the gradient matches the CPU: own dtype, in place, bf16, none" *
          cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    for (auto [N, V] : {std::pair<int64_t, int64_t>{1, 1}, {7, 33}, {33, 4097}, {66, 300}}) {
      const Tensor logits = random({N, V}, 10 + N, dtype, 3.0);
      const std::vector<int32_t> t = some_ignored_targets(N, V);
      int64_t count = 0;
      for (int32_t target : t) count += target != kIgnoreIndex;
      const Tensor targets = from_vector(t, {N});
      const CrossEntropyOutputs separate = cross_entropy_kernels(logits, targets, count, Device::CPU);
      for (int mode = 0; mode < 4; ++mode) {  // the gradient: in the logits' dtype, over them, in bf16, none
        if (mode == 2 && dtype != DType::F32) continue;
        const std::string what = fmt::format("{} [{}, {}] mode {}", dtype_name(dtype), N, V, mode);
        auto run = [&](Device device) {
          const Tensor x = to_device(clone(logits), device), row_loss = Tensor::empty({N}, DType::F64, device);
          const Tensor d = mode == 0   ? empty_like_on(x, device)
                           : mode == 1 ? x
                           : mode == 2 ? Tensor::empty({N, V}, DType::BF16, device)
                                       : Tensor();
          KERNEL(cross_entropy_with_gradient, device)(x, on(targets, device), kIgnoreIndex, count, row_loss, d);
          return std::pair{row_loss, d.defined() ? converted(to_cpu(d), dtype) : Tensor()};
        };
        const auto [cpu_rows, cpu_d] = run(Device::CPU);
        const auto [gpu_rows, gpu_d] = run(Device::CUDA);
        check_match(gpu_rows, cpu_rows, rel, 1e-9, what + " row_loss");
        // On the CPU the row losses are the forward kernel's, the gradient the backward kernel's for g = 1 / 0.75
        // (that test's upstream gradient), rounded to bf16 in mode 2.
        CHECK(values_of(cpu_rows) == values_of(separate.row_loss));
        if (mode == 3) continue;
        const double d_rel = mode == 2 ? kBf16Step : rel;
        check_values(values_of(gpu_d), values_of(cpu_d), d_rel, 1e-12, what + " dlogits");  // both copied to the CPU
        Tensor expected = mul(separate.dlogits, 1 / 0.75);
        if (mode == 2) expected = converted(converted(expected, DType::BF16), DType::F32);
        check_values(values_of(cpu_d), values_of(expected), d_rel, 1e-12,
                     what + " dlogits against the backward kernel");
      }
    }
  }
  // bf16 logits (mixed precision's): their gradient written over them, into a separate f32 tensor, or none (the loss
  // alone, as in validation); on the CPU the results of the same values in f32, bit for bit.
  for (auto [N, V] : {std::pair<int64_t, int64_t>{7, 33}, {33, 4097}}) {
    const Tensor logits = random_of({N, V}, 20 + N, DType::BF16, 3.0);
    const std::vector<int32_t> t = some_ignored_targets(N, V);
    int64_t count = 0;
    for (int32_t target : t) count += target != kIgnoreIndex;
    const Tensor targets = from_vector(t, {N});
    const std::string what = fmt::format("bf16 logits [{}, {}]", N, V);
    // mode 0: over the logits (bf16), 1: into f32, 2: none. The f32 values' runs write a bf16 gradient in mode 0.
    auto run = [&](Device device, DType logits_dtype, int mode) {
      const Tensor x = to_device(converted(logits, logits_dtype), device);
      const Tensor row_loss = Tensor::empty({N}, DType::F64, device);
      const Tensor d = mode == 0   ? (logits_dtype == DType::BF16 ? x : Tensor::empty({N, V}, DType::BF16, device))
                       : mode == 1 ? Tensor::empty({N, V}, DType::F32, device)
                                   : Tensor();
      KERNEL(cross_entropy_with_gradient, device)(x, on(targets, device), kIgnoreIndex, count, row_loss, d);
      return std::pair{row_loss, d};
    };
    for (int mode = 0; mode < 3; ++mode) {
      const std::string case_name = fmt::format("{} mode {}", what, mode);
      const auto [cpu_rows, cpu_d] = run(Device::CPU, DType::BF16, mode);
      const auto [gpu_rows, gpu_d] = run(Device::CUDA, DType::BF16, mode);
      const auto [f32_rows, f32_d] = run(Device::CPU, DType::F32, mode);
      CHECK_MESSAGE(values_of(cpu_rows) == values_of(f32_rows), case_name);
      check_match(gpu_rows, cpu_rows, 1e-5, 1e-9, case_name + " row_loss");
      if (mode == 2) continue;
      CHECK_MESSAGE(values_of(cpu_d) == values_of(f32_d), case_name);
      check_values(values_of(gpu_d), values_of(cpu_d), mode == 0 ? kBf16Step : 1e-5, 1e-12, case_name + " dlogits");
    }
  }
}

TEST_CASE("cuda: nn: RMSNorm kernels match the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    // 65 rows: three chunks of the GPU's backward (32 rows each), the last one partial; d past a block's 256 threads;
    // d = 7000: two tiles of the GPU's backward (4096 columns each), each block summing the whole row.
    for (auto [rows, d] : {std::pair<int64_t, int64_t>{1, 1}, {7, 33}, {65, 257}, {33, 4097}, {3, 7000}}) {
      const std::string what = fmt::format("{} [{}, {}]", dtype_name(dtype), rows, d);
      const Tensor x = random({rows, d}, 20 + d, dtype), w = random({d}, 21, dtype), g = random({rows, d}, 22, dtype);
      const Tensor held = random({rows, d}, 23, dtype);  // a gradient x holds already
      auto run = [&](Device device) {
        const Tensor xd = on(x, device), wd = on(w, device), gd = on(g, device);
        std::vector<Tensor> o{empty_like_on(xd, device), Tensor::empty({rows}, dtype, device),
                              empty_like_on(xd, device), empty_like_on(wd, device),
                              on(clone(held), device),   empty_like_on(wd, device)};
        KERNEL(rms_norm_forward, device)(xd, wd, 1e-5, o[0], o[1]);
        KERNEL(rms_norm_backward, device)(xd, wd, o[1], gd, Tensor(), o[2], o[3]);
        KERNEL(rms_norm_backward, device)(xd, wd, o[1], gd, o[4], o[4], o[5]);  // added to held
        return o;
      };
      const std::vector<Tensor> cpu = run(Device::CPU), gpu = run(Device::CUDA);
      check_match(gpu[0], cpu[0], rel, 1e-9, what + " y");
      check_match(gpu[1], cpu[1], rel, 1e-9, what + " rstd");
      check_match(gpu[2], cpu[2], rel, 1.0, what + " dx");
      check_match(gpu[3], cpu[3], rel, 1.0, what + " dweight");
      check_match(gpu[4], cpu[4], rel, 1.0, what + " held + dx");
      // Added to, dx is the add's bits: held + dx, on both devices; dweight does not change.
      for (const std::vector<Tensor>* o : {&cpu, &gpu}) {
        CHECK_MESSAGE(values_of((*o)[4]) == values_of(add(on(held, (*o)[2].device()), (*o)[2])), what);
        CHECK_MESSAGE(values_of((*o)[5]) == values_of((*o)[3]), what);
      }
      if (dtype != DType::F32) continue;
      // rms_norm_to_bf16's kernels: y rounded as it is stored, and its bf16 gradient widened as it is read.
      const Tensor g16 = converted(g, DType::BF16);
      auto run_bf16 = [&](Device device) {
        const Tensor xd = on(x, device), wd = on(w, device);
        std::vector<Tensor> o{Tensor::empty({rows, d}, DType::BF16, device),
                              Tensor::empty({rows}, dtype, device),
                              empty_like_on(xd, device),
                              empty_like_on(wd, device),
                              empty_like_on(xd, device),
                              empty_like_on(wd, device)};
        KERNEL(rms_norm_forward, device)(xd, wd, 1e-5, o[0], o[1]);
        KERNEL(rms_norm_backward, device)(xd, wd, o[1], on(g16, device), Tensor(), o[2], o[3]);
        KERNEL(rms_norm_backward, device)(xd, wd, o[1], on(converted(g16, DType::F32), device), Tensor(), o[4], o[5]);
        return o;
      };
      const std::vector<Tensor> cpu16 = run_bf16(Device::CPU), gpu16 = run_bf16(Device::CUDA);
      CHECK_MESSAGE(values_of(cpu16[0]) == values_of(converted(cpu[0], DType::BF16)), what << ": bf16 y");
      check_match(gpu16[0], cpu16[0], kBf16Step, 1e-9, what + " bf16 y");
      check_match(gpu16[2], cpu16[2], rel, 1.0, what + " dx from a bf16 g");
      check_match(gpu16[3], cpu16[3], rel, 1.0, what + " dweight from a bf16 g");
      for (const std::vector<Tensor>* o : {&cpu16, &gpu16}) {  // a bf16 g is its values in f32
        CHECK_MESSAGE(values_of((*o)[2]) == values_of((*o)[4]), what << ": dx from a bf16 g");
        CHECK_MESSAGE(values_of((*o)[3]) == values_of((*o)[5]), what << ": dweight from a bf16 g");
      }
    }
  }
}

namespace {

// The (cos, sin) table [T, Dh/2, 2] of RoPE with theta 10000 (as engine/ops/nn.cpp builds it).
Tensor rope_table(int64_t T, int64_t Dh, DType dtype) {
  std::vector<double> values;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < Dh / 2; ++i) {
      const double angle = static_cast<double>(t) * std::pow(10000.0, -2.0 * static_cast<double>(i) / Dh);
      values.push_back(std::cos(angle));
      values.push_back(std::sin(angle));
    }
  return from_vector(values, {T, Dh / 2, 2}, dtype);
}

// The RoPE kernels' y (forward of x) and dx (backward of g) on `device`.
std::vector<Tensor> rope_results(const Tensor& x, const Tensor& g, const Tensor& table, Device device) {
  const Tensor xd = on(x, device), gd = on(g, device), td = on(table, device);
  std::vector<Tensor> o{empty_like_on(xd, device), empty_like_on(xd, device)};
  KERNEL(rope_forward, device)(xd, td, o[0]);
  KERNEL(rope_backward, device)(gd, td, o[1]);
  return o;
}

}  // namespace

TEST_CASE("cuda: nn: RoPE kernels match the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    for (const Shape& shape : {Shape{1, 1, 1, 2}, Shape{2, 7, 3, 20}, Shape{3, 33, 2, 64}, Shape{1, 65, 5, 32}}) {
      const std::string what = fmt::format("{} {}", dtype_name(dtype), shape_str(shape));
      const Tensor x = random(shape, 30, dtype), g = random(shape, 31, dtype);
      const Tensor table = rope_table(shape[1], shape[3], dtype);
      const std::vector<Tensor> cpu = rope_results(x, g, table, Device::CPU),
                                gpu = rope_results(x, g, table, Device::CUDA);
      check_match(gpu[0], cpu[0], rel, 1.0, what + " y");
      check_match(gpu[1], cpu[1], rel, 1.0, what + " dx");
    }
  }
}

TEST_CASE("cuda: nn: RoPE kernels on bf16 tensors match the CPU (f32 table, results rounded once)" * cuda_only()) {
  for (const Shape& shape : {Shape{1, 1, 1, 2}, Shape{2, 7, 3, 20}, Shape{1, 65, 5, 32}}) {
    const Tensor x = random_of(shape, 32, DType::BF16), g = random_of(shape, 33, DType::BF16);
    const Tensor table = rope_table(shape[1], shape[3], DType::F32);
    const std::vector<Tensor> cpu = rope_results(x, g, table, Device::CPU),
                              gpu = rope_results(x, g, table, Device::CUDA);
    // One bf16 step apart at most, where the two f32 rotations straddle a rounding boundary.
    check_match(gpu[0], cpu[0], kBf16Step, 1e-2, shape_str(shape) + " y");
    check_match(gpu[1], cpu[1], kBf16Step, 1e-2, shape_str(shape) + " dx");
  }
  // The kernels read both tensors as the input's type: another dtype for the output is refused (the CPU's too).
  for (Device device : {Device::CPU, Device::CUDA}) {
    const Tensor x = on(random_of({1, 2, 1, 4}, 34, DType::BF16), device);
    const Tensor table = on(rope_table(2, 4, DType::F32), device), y = Tensor::empty(x.shape(), DType::F32, device);
    const auto mixed = [&] { KERNEL(rope_forward, device)(x, table, y); };
    CHECK(testing::error_of(mixed).find("rope: needs tensors of one dtype") != std::string::npos);
  }
}

namespace {

// The attention kernels' out, lse (f64 for f64 inputs, else f32), dq, dk, dv for these inputs on `device`.
std::vector<Tensor> attention_results(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, Device device,
                                      Precision precision) {
  const Tensor qd = on(q, device), kd = on(k, device), vd = on(v, device), gd = on(g, device);
  const DType lse_dtype = q.dtype() == DType::F64 ? DType::F64 : DType::F32;
  std::vector<Tensor> o{empty_like_on(qd, device), Tensor::empty({q.size(0), q.size(2), q.size(1)}, lse_dtype, device),
                        empty_like_on(qd, device), empty_like_on(qd, device), empty_like_on(qd, device)};
  KERNEL(attention_forward, device)(qd, kd, vd, o[0], o[1], precision);
  KERNEL(attention_backward, device)(qd, kd, vd, o[0], o[1], gd, o[2], o[3], o[4], precision);
  return o;
}

const char* const kAttentionNames[] = {" out", " lse", " dq", " dk", " dv"};  // attention_results' order

}  // namespace

// The tiled kernels: 1 to 3 tiles of 64 query and key rows (T = 130: a partial third), each tiling (head dims up to
// 64: 64-row tiles; up to 128: 64 rows in f32, 32 in f64; up to 256: 32 rows, f32 only).
TEST_CASE("cuda: nn: causal attention kernels match the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    for (int64_t T : {1, 7, 33, 65, 130}) {
      for (int64_t Dh : {20, 32, 64, 96, 160}) {
        if (dtype == DType::F64 && Dh > 128) continue;
        const Shape shape{2, T, 3, Dh};
        const std::string what = fmt::format("{} {}", dtype_name(dtype), shape_str(shape));
        const Tensor q = random(shape, 40 + T, dtype), k = random(shape, 41, dtype), v = random(shape, 42, dtype),
                     g = random(shape, 43, dtype);
        const std::vector<Tensor> cpu = attention_results(q, k, v, g, Device::CPU, Precision::FP32),
                                  gpu = attention_results(q, k, v, g, Device::CUDA, Precision::FP32);
        for (size_t i = 0; i < cpu.size(); ++i) check_match(gpu[i], cpu[i], rel, 1.0, what + kAttentionNames[i]);
      }
    }
  }
  // Longer heads than the kernels' tiles take are refused by name.
  const Tensor q = on(random({1, 3, 1, 136}, 44, DType::F64), Device::CUDA);
  const Tensor out = empty_like_on(q, Device::CUDA), lse = Tensor::empty({1, 1, 3}, DType::F64, Device::CUDA);
  const auto forward = [&] { KERNEL(attention_forward, Device::CUDA)(q, q, q, out, lse, Precision::FP32); };
  CHECK(testing::error_of(forward).find("head dims up to 256 (f32) or 128 (f64), got 136") != std::string::npos);
}

// Precision::BF16: the tensor-core kernels (nvcuda::wmma; in the emulator the same source, engine/cuda/sim/mma.h)
// against the CPU's kernels, which round the same values: they differ by f32 sums in other orders, and so at times
// in a p or ds that lies near a bf16 rounding boundary and rounds the other way. Head dims 16, 18 and 20 (padded to
// 16, 32, 32), 64 and 96 (to 128); 1 to 3 tiles of 64 rows (T = 130: a partial third). Tiles are loaded four values
// at a time where the head dim is a multiple of 4 and the tensor 16-byte aligned (device memory is 256-byte
// aligned), else one at a time: head dim 18, and views 4 bytes past an aligned start, which must give the same bits.
namespace {

// x (a CPU tensor) on the GPU in a view that starts one element past the start of its memory: 4 bytes for f32 (no
// longer 16-byte aligned), 2 for bf16 (no longer 4-byte aligned).
Tensor misaligned_on_gpu(const Tensor& x) {
  const size_t element = dtype_size(x.dtype());
  Tensor padded = Tensor::empty({x.numel() + 1}, x.dtype());
  std::memset(padded.raw_data(), 0, element);
  std::memcpy(static_cast<char*>(padded.raw_data()) + element, x.raw_data(), element * static_cast<size_t>(x.numel()));
  return reshape(slice_rows(to_gpu(padded), 1, x.numel() + 1), x.shape());
}

// The largest |value| of x (infinity if one is NaN).
double largest_magnitude(const Tensor& x) {
  double largest = 0;
  for (double v : values_of(x)) largest = std::max(largest, std::isnan(v) ? INFINITY : std::abs(v));
  return largest;
}

// Where a few elements (rounded the other way) or all of them are off: the count of those off by more than 1e-5 of
// the largest |expected| (NaN counts as off).
std::string elements_off(const Tensor& actual, const Tensor& expected) {
  const std::vector<double> a = testing::as_doubles(actual), b = testing::as_doubles(expected);
  double largest = 0;
  for (double x : b) largest = std::max(largest, std::abs(x));
  int64_t off = 0;
  for (size_t e = 0; e < a.size(); ++e) off += !(std::abs(a[e] - b[e]) <= 1e-5 * largest);
  return fmt::format("{} of {} elements off by more than 1e-5 of the largest", off, a.size());
}

// The GPU's attention results against the CPU's, each within `bound` of relative norm error. With one key (T = 1),
// ds = p (g . v - g . out) is 0 but for rounding, and so are dq and dk: they are checked to be near 0 (measured here:
// up to 5e-7; the sums of ~96 products of size ~1 carry ~1e-6 of f32 rounding).
void check_attention_matches(const std::vector<Tensor>& gpu, const std::vector<Tensor>& cpu, const Shape& shape,
                             double bound) {
  for (size_t i = 0; i < cpu.size(); ++i) {
    const std::string what = shape_str(shape) + kAttentionNames[i];
    if (shape[1] == 1 && (i == 2 || i == 3)) {
      const double largest = largest_magnitude(gpu[i]);
      CHECK_MESSAGE(largest < 1e-5, what << ": largest |value| " << largest);
      continue;
    }
    const double error = testing::relative_norm_error(gpu[i], cpu[i]);
    CHECK_MESSAGE(error < bound, what << ": relative error " << error << ", " << elements_off(gpu[i], cpu[i]));
  }
}

// The tensor-core kernels' one-value-at-a-time loads (misaligned views of q, k, v, g) give the bits of their wider
// loads (`gpu`, from aligned ones).
void check_one_at_a_time_loads(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                               const std::vector<Tensor>& gpu, const Shape& shape) {
  const std::vector<Tensor> one_at_a_time =
      attention_results(misaligned_on_gpu(q), misaligned_on_gpu(k), misaligned_on_gpu(v), misaligned_on_gpu(g),
                        Device::CUDA, Precision::BF16);
  for (size_t i = 0; i < gpu.size(); ++i)
    CHECK_MESSAGE(testing::bitwise_equal(to_cpu(one_at_a_time[i]), to_cpu(gpu[i])), shape_str(shape)
                                                                                        << kAttentionNames[i]);
}

}  // namespace

TEST_CASE("cuda: nn: bf16 causal attention on the tensor cores matches the CPU's bf16 kernels" * cuda_only()) {
  for (int64_t T : {1, 33, 130}) {
    for (int64_t Dh : {16, 18, 20, 64, 96}) {
      const Shape shape{2, T, 3, Dh};
      const Tensor q = random(shape, 60 + T, DType::F32), k = random(shape, 61, DType::F32),
                   v = random(shape, 62, DType::F32), g = random(shape, 63, DType::F32);
      const std::vector<Tensor> cpu = attention_results(q, k, v, g, Device::CPU, Precision::BF16),
                                gpu = attention_results(q, k, v, g, Device::CUDA, Precision::BF16);
      // Measured: up to 9e-5 (dq and dk at Dh 96, where g . v - D cancels most), in the few rows where a p or ds
      // rounded the other way; elsewhere ~1e-7. Without the rounding of p and ds the error would be ~2e-3.
      check_attention_matches(gpu, cpu, shape, 3e-4);
      // The rounding is there: f32 attention gives another output.
      CHECK(testing::relative_norm_error(gpu[0], attention_results(q, k, v, g, Device::CPU, Precision::FP32)[0]) >
            5e-4);
      if (T == 33 && (Dh == 16 || Dh == 64)) check_one_at_a_time_loads(q, k, v, g, gpu, shape);
    }
  }
  const Tensor q = on(random({1, 3, 1, 136}, 64, DType::F32), Device::CUDA);
  const Tensor out = empty_like_on(q, Device::CUDA), lse = Tensor::empty({1, 1, 3}, DType::F32, Device::CUDA);
  const auto forward = [&] { KERNEL(attention_forward, Device::CUDA)(q, q, q, out, lse, Precision::BF16); };
  CHECK(testing::error_of(forward).find("bf16 attention on the tensor cores takes head dims up to 128, got 136") !=
        std::string::npos);
}

// bf16 tensors (mixed precision's q, k, v): the tiles copy them, two values a load (head dims even, 4-byte aligned)
// or one (odd head dims, misaligned views), and out, dq, dk, dv are rounded as they are stored; lse stays f32.
TEST_CASE("cuda: nn: causal attention on bf16 tensors matches the CPU's, loaded two or one values at a time" *
          cuda_only()) {
  for (int64_t T : {1, 33, 130}) {
    for (int64_t Dh : {9, 16, 18, 64}) {
      const Shape shape{2, T, 3, Dh};
      const Tensor q = random_of(shape, 70 + T, DType::BF16), k = random_of(shape, 71, DType::BF16),
                   v = random_of(shape, 72, DType::BF16), g = random_of(shape, 73, DType::BF16);
      const std::vector<Tensor> cpu = attention_results(q, k, v, g, Device::CPU, Precision::BF16),
                                gpu = attention_results(q, k, v, g, Device::CUDA, Precision::BF16);
      // The f32 test's flips of p and ds (up to 9e-5), and results one bf16 step apart where the devices' f32
      // values straddle a rounding boundary (2^-8 relative each, in few elements).
      check_attention_matches(gpu, cpu, shape, 3e-3);
      if (T == 33 && (Dh == 16 || Dh == 64)) check_one_at_a_time_loads(q, k, v, g, gpu, shape);
    }
  }
}

// ---- the ops through autograd ---------------------------------------------------------------------------------------

namespace {

using Op = std::function<Tensor(const std::vector<Tensor>&)>;

// The op's output and gradients on the GPU match the CPU's (check_values with rel and atol).
void check_op_matches(const Op& op, const std::vector<Tensor>& inputs, const Tensor& g, double rel, double atol,
                      const std::string& what) {
  const std::vector<Tensor> cpu = op_and_gradients(op, inputs, g, Device::CPU);
  const std::vector<Tensor> gpu = op_and_gradients(op, inputs, g, Device::CUDA);
  REQUIRE(cpu.size() == gpu.size());
  for (size_t i = 0; i < cpu.size(); ++i)
    check_match(gpu[i], cpu[i], rel, atol, what + (i == 0 ? " forward" : fmt::format(" gradient {}", i - 1)));
}

}  // namespace

TEST_CASE("cuda: nn: the ops and their backward on the GPU match the CPU" * cuda_only()) {
  const std::vector<int32_t> t = some_ignored_targets(9, 17);
  check_op_matches([](const std::vector<Tensor>& x) { return cross_entropy(x[0], x[1]); },
                   {random({9, 17}, 50, DType::F32, 2.0), from_vector(t, {9})}, full({}, 0.5), 1e-5, 1e-9,
                   "cross_entropy");
  check_op_matches([](const std::vector<Tensor>& x) { return rms_norm(x[0], x[1]); },
                   {random({2, 5, 33}, 51, DType::F32), random({33}, 52, DType::F32)},
                   random({2, 5, 33}, 53, DType::F32), 1e-5, 1.0, "rms_norm");
  check_op_matches([](const std::vector<Tensor>& x) { return rope(x[0], 10000.0, 3); },
                   {random({2, 7, 3, 20}, 54, DType::F32)}, random({2, 7, 3, 20}, 55, DType::F32), 1e-5, 1.0, "rope");
  // The LM head's loss in chunks of 4 rows, with f32 and with bf16 products (a bf16 gradient of the logits: a
  // rounding that flips between devices moves a sum by a bf16 step of one term).
  for (Precision precision : {Precision::FP32, Precision::BF16}) {
    const bool bf16 = precision == Precision::BF16;
    check_op_matches(
        [precision](const std::vector<Tensor>& x) {
          PrecisionGuard mode(precision);
          return linear_cross_entropy(x[0], x[1], x[2], kIgnoreIndex, nullptr, 4);
        },
        {random({11, 24}, 60, DType::F32), random({300, 24}, 61, DType::F32),
         from_vector(some_ignored_targets(11, 300), {11})},
        full({}, 0.5), bf16 ? 1e-3 : 1e-5, 1e-2,  // atol: the gradients' scale (sums of 300 terms that cancel)
        fmt::format("linear_cross_entropy {}", enum_name(precision)));
  }
  const Shape qkv{2, 33, 3, 32};
  check_op_matches([](const std::vector<Tensor>& x) { return causal_attention(x[0], x[1], x[2]); },
                   {random(qkv, 56, DType::F32), random(qkv, 57, DType::F32), random(qkv, 58, DType::F32)},
                   random(qkv, 59, DType::F32), 1e-5, 1.0, "causal_attention");
}

// ---- (b) matmul -----------------------------------------------------------------------------------------------------

namespace {

// An operand of op(X) [rows, cols] with leading dims `lead`: stored [lead..., cols, rows] when transposed.
Shape operand_shape(const Shape& lead, int64_t rows, int64_t cols, bool trans) {
  Shape shape = lead;
  shape.push_back(trans ? cols : rows);
  shape.push_back(trans ? rows : cols);
  return shape;
}

// The shape of the batched_matmul kernel's output.
Shape product_shape(const Tensor& a, const Tensor& b, bool ta, bool tb, bool sum_batches) {
  const MatmulShape s = matmul_shape(a, b, ta, tb);
  const Tensor& batched = a.dim() > 2 ? a : b;
  Shape shape = sum_batches ? Shape{} : Shape(batched.shape().begin(), batched.shape().end() - 2);
  shape.push_back(s.m);
  shape.push_back(s.n);
  return shape;
}

// The batched_matmul kernel on `device`, into a fresh output, or added to a copy of `start` (accumulate).
Tensor matmul_kernel(const Tensor& a, const Tensor& b, bool ta, bool tb, bool sum_batches, Device device,
                     const Tensor& start = Tensor()) {
  Tensor out = start.defined() ? to_device(clone(start), device)
                               : Tensor::empty(product_shape(a, b, ta, tb, sum_batches),
                                               a.dtype() == DType::BF16 ? DType::F32 : a.dtype(), device);
  KERNEL(batched_matmul, device)
  (on(a, device), on(b, device), ta, tb, sum_batches, start.defined() ? out : Tensor(), out);
  return out;
}

struct Sizes {
  int64_t m, n, k;
};
constexpr Sizes kMatmulSizes[] = {{1, 1, 1}, {7, 33, 5}, {33, 17, 65}, {4, 3, 0}, {0, 5, 2}};

}  // namespace

TEST_CASE("cuda: matmul: the batched kernel matches the CPU (transposes, batched, shared, summed, accumulated)" *
          cuda_only()) {
  for (DType dtype : {DType::F32, DType::F64, DType::BF16}) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);  // bf16 operands: f32 products
    const DType out_dtype = dtype == DType::BF16 ? DType::F32 : dtype;
    for (Sizes z : kMatmulSizes) {
      for (int layout = 0; layout < 4; ++layout) {  // 2-D; both batched; a shared; b shared
        const Shape lead{2, 3};
        const Shape a_lead = layout == 1 || layout == 3 ? lead : Shape{},
                    b_lead = layout == 1 || layout == 2 ? lead : Shape{};
        for (int flags = 0; flags < 16; ++flags) {
          const bool ta = flags & 1, tb = flags & 2, sum_batches = flags & 4, accumulate = flags & 8;
          const Tensor a = random_of(operand_shape(a_lead, z.m, z.k, ta), 60 + flags, dtype);
          const Tensor b = random_of(operand_shape(b_lead, z.k, z.n, tb), 70 + layout, dtype);
          const Tensor start = accumulate ? random(product_shape(a, b, ta, tb, sum_batches), 75, out_dtype) : Tensor();
          const std::string what =
              fmt::format("{} {}{} x {}{}{}{}", dtype_name(dtype), a.str(), ta ? "^T" : "", b.str(), tb ? "^T" : "",
                          sum_batches ? " summed" : "", accumulate ? " accumulated" : "");
          const int64_t terms = (sum_batches && layout != 0 ? 6 * z.k : z.k) + 1;  // 6 batches, and start
          const Tensor cpu = matmul_kernel(a, b, ta, tb, sum_batches, Device::CPU, start);
          check_match(matmul_kernel(a, b, ta, tb, sum_batches, Device::CUDA, start), cpu, rel, sum_scale(terms), what);
          // Accumulating adds the product to what the output held.
          if (accumulate)
            check_values(values_of(cpu), values_of(add(start, matmul_kernel(a, b, ta, tb, sum_batches, Device::CPU))),
                         rel, sum_scale(terms), what + " against start + product");
        }
      }
    }
  }
}

TEST_CASE("cuda: matmul: a bf16 result is the f32 product rounded once, summed batches and added to included" *
          cuda_only()) {
  for (Sizes z : kMatmulSizes) {
    for (int layout = 0; layout < 4; ++layout) {  // 2-D; both batched; a shared; b shared
      const Shape lead{2, 3};
      const Shape a_lead = layout == 1 || layout == 3 ? lead : Shape{},
                  b_lead = layout == 1 || layout == 2 ? lead : Shape{};
      for (int flags = 0; flags < 16; ++flags) {
        const bool ta = flags & 1, tb = flags & 2, sum_batches = flags & 4, added = flags & 8;
        const Tensor a = random_of(operand_shape(a_lead, z.m, z.k, ta), 160 + flags, DType::BF16);
        const Tensor b = random_of(operand_shape(b_lead, z.k, z.n, tb), 170 + layout, DType::BF16);
        // What a bf16 gradient holds before a product adds to it (its sum with the product is rounded once).
        const Tensor held = random_of(product_shape(a, b, ta, tb, sum_batches), 175 + flags, DType::BF16);
        const std::string what = fmt::format("{}{} x {}{}{}{}", a.str(), ta ? "^T" : "", b.str(), tb ? "^T" : "",
                                             sum_batches ? " summed" : "", added ? " added to" : "");
        auto bf16_result = [&](Device device) {
          const Tensor out = added ? on(clone(held), device)
                                   : Tensor::empty(product_shape(a, b, ta, tb, sum_batches), DType::BF16, device);
          KERNEL(batched_matmul, device)
          (on(a, device), on(b, device), ta, tb, sum_batches, added ? out : Tensor(), out);
          return out;
        };
        const Tensor cpu = bf16_result(Device::CPU);
        const int64_t terms = (sum_batches && layout != 0 ? 6 * z.k : z.k) + 1;
        check_match(bf16_result(Device::CUDA), cpu, kBf16Step, sum_scale(terms) + (added ? 2.0 : 0.0), what);
        // The CPU's: the f32 kernel's result (from what out held, widened), rounded.
        const Tensor f32 =
            matmul_kernel(a, b, ta, tb, sum_batches, Device::CPU, added ? converted(held, DType::F32) : Tensor());
        CHECK_MESSAGE(values_of(cpu) == values_of(converted(f32, DType::BF16)), what);
      }
    }
  }
}

// Mixed precision's attention block on both devices through autograd: matmul_to_bf16's bf16 q (f32 gradients for its
// f32 operands), RoPE and attention on bf16 tensors with bf16 gradients, and wo's product of the bf16 output with an
// f32 weight (a bf16 gradient for the output, an f32 one for the weight).
TEST_CASE("cuda: nn: the bf16 activations of attention through the ops on the GPU match the CPU" * cuda_only()) {
  PrecisionGuard mode(Precision::BF16);
  const Op project = [](const std::vector<Tensor>& x) { return matmul_to_bf16(x[0], x[1], false, true); };
  const Op rotate = [](const std::vector<Tensor>& x) { return rope(x[0], 10000.0); };
  const Op attend = [](const std::vector<Tensor>& x) { return causal_attention(x[0], x[1], x[2]); };
  const Op output = [](const std::vector<Tensor>& x) { return matmul(x[0], x[1], false, true); };
  const Shape heads{2, 33, 3, 20};
  const Tensor x = random({66, 60}, 190, DType::F32), w = random({60, 60}, 191, DType::F32);
  const Tensor q = random_of(heads, 192, DType::BF16), k = random_of(heads, 193, DType::BF16),
               v = random_of(heads, 194, DType::BF16), y = random_of({66, 60}, 195, DType::BF16);
  struct Case {
    const char* name;
    Op op;
    std::vector<Tensor> inputs;
    Tensor g;
    std::vector<DType> dtypes;  // the output's, then each gradient's
  };
  const Case cases[] = {
      {"matmul_to_bf16", project, {x, w}, random_of({66, 60}, 196, DType::BF16), {DType::BF16, DType::F32, DType::F32}},
      {"rope", rotate, {q}, random_of(heads, 197, DType::BF16), {DType::BF16, DType::BF16}},
      {"causal_attention",
       attend,
       {q, k, v},
       random_of(heads, 198, DType::BF16),
       {DType::BF16, DType::BF16, DType::BF16, DType::BF16}},
      {"matmul of bf16 y", output, {y, w}, random({66, 60}, 199, DType::F32), {DType::F32, DType::BF16, DType::F32}},
  };
  for (const Case& c : cases) {
    const std::vector<Tensor> cpu = op_and_gradients(c.op, c.inputs, c.g, Device::CPU),
                              gpu = op_and_gradients(c.op, c.inputs, c.g, Device::CUDA);
    REQUIRE(cpu.size() == c.dtypes.size());
    for (size_t i = 0; i < cpu.size(); ++i) {
      const std::string what = fmt::format("{} {}", c.name, i == 0 ? "forward" : fmt::format("gradient {}", i - 1));
      CHECK_MESSAGE(cpu[i].dtype() == c.dtypes[i], what);
      CHECK_MESSAGE(gpu[i].dtype() == c.dtypes[i], what);
      // bf16 results one bf16 step apart where the devices' f32 sums straddle a rounding boundary; f32 ones as in
      // the other bf16 tests (a p or ds rounded the other way inside attention: up to 1e-4).
      const double error = testing::relative_norm_error(gpu[i], cpu[i]);
      CHECK_MESSAGE(error < 3e-3, what << ": relative error " << error);
    }
  }
}

TEST_CASE("cuda: matmul: forward and backward on the GPU match the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const double rel = f32_or_f64(dtype, 1e-5, 1e-12);
    for (int flags = 0; flags < 4; ++flags) {
      const bool ta = flags & 1, tb = flags & 2;
      const Op op = [ta, tb](const std::vector<Tensor>& x) { return matmul(x[0], x[1], ta, tb); };
      for (const Shape& lead : {Shape{}, Shape{3}, Shape{2, 3}}) {
        const Tensor a = random(operand_shape(lead, 7, 33, ta), 80, dtype);
        const Tensor g = random(operand_shape(lead, 7, 5, false), 81, dtype);
        const std::string what = fmt::format("{} lead {} ta {} tb {}", dtype_name(dtype), shape_str(lead), ta, tb);
        // The longest sums: 33 terms (the product), 6 x 7 (a shared b's gradient over 6 batches of 7 rows).
        const double scale = sum_scale(42);
        check_op_matches(op, {a, random(operand_shape(lead, 33, 5, tb), 82, dtype)}, g, rel, scale, what);
        check_op_matches(op, {a, random(operand_shape({}, 33, 5, tb), 83, dtype)}, g, rel, scale, what + " shared b");
      }
    }
  }
}

TEST_CASE("cuda: matmul: bf16 operands give an f32 product and bf16 gradients on both devices" * cuda_only()) {
  for (int flags = 0; flags < 4; ++flags) {
    const bool ta = flags & 1, tb = flags & 2;
    const Op op = [ta, tb](const std::vector<Tensor>& x) { return matmul(x[0], x[1], ta, tb); };
    const Tensor a = random_of(operand_shape({3}, 7, 33, ta), 90, DType::BF16);
    const Tensor b = random_of(operand_shape({}, 33, 9, tb), 91, DType::BF16);  // shared: its gradient sums batches
    const Tensor g = random({3, 7, 9}, 92, DType::F32);
    const std::string what = fmt::format("bf16 ta {} tb {}", ta, tb);

    const std::vector<Tensor> cpu = op_and_gradients(op, {a, b}, g, Device::CPU);
    const std::vector<Tensor> gpu = op_and_gradients(op, {a, b}, g, Device::CUDA);
    for (const std::vector<Tensor>& r : {cpu, gpu}) {
      CHECK(r[0].dtype() == DType::F32);
      CHECK(r[1].dtype() == DType::BF16);
      CHECK(r[2].dtype() == DType::BF16);
    }
    check_match(gpu[0], cpu[0], 1e-5, sum_scale(33), what + " forward");
    check_match(gpu[1], cpu[1], kBf16Step, 1e-2, what + " da");
    check_match(gpu[2], cpu[2], kBf16Step, 1e-2, what + " db");

    // On the CPU that is the rule, bit for bit: the f32 products of the widened operands (and of g rounded to bf16),
    // each gradient rounded to bf16.
    const Tensor a32 = converted(a, DType::F32), b32 = converted(b, DType::F32);
    const Tensor g32 = converted(converted(g, DType::BF16), DType::F32);
    const Device cpu_device = Device::CPU;
    CHECK(values_of(cpu[0]) == values_of(matmul_kernel(a32, b32, ta, tb, false, cpu_device)));
    const Tensor da = ta ? matmul_kernel(b32, g32, tb, true, false, cpu_device)
                         : matmul_kernel(g32, b32, false, !tb, false, cpu_device);
    const Tensor db = tb ? matmul_kernel(g32, a32, true, ta, true, cpu_device)
                         : matmul_kernel(a32, g32, !ta, false, true, cpu_device);
    CHECK(values_of(cpu[1]) == values_of(converted(da, DType::BF16)));
    CHECK(values_of(cpu[2]) == values_of(converted(db, DType::BF16)));
  }
}

#if MOELAB_HAVE_CUDA
// ---- (c) blas.cuh ---------------------------------------------------------------------------------------------------

namespace {

// A row-major matrix [rows, cols] stored with row stride ld = cols + pad, as a flat tensor (rows * ld values).
struct Stored {
  Tensor data;  // on the CPU
  int64_t rows, cols, ld;
};

Stored stored(int64_t rows, int64_t cols, int64_t pad, uint64_t seed, DType dtype) {
  const int64_t ld = cols + pad;
  return {random_of({rows * ld}, seed, dtype), rows, cols, ld};
}

// The same matrix with NaN in every element of [rows, cols] (not the padding): beta = 0 must not read it.
Stored poisoned(Stored s) {
  std::vector<double> v = values_of(s.data);
  for (int64_t i = 0; i < s.rows; ++i)
    for (int64_t j = 0; j < s.cols; ++j) v[i * s.ld + j] = std::numeric_limits<double>::quiet_NaN();
  s.data = host_tensor(v, s.data.shape(), s.data.dtype());
  return s;
}

// C = alpha op(A) op(B) + beta C (beta = 0: C not read) in double on row-major storage, the padding left as is.
void reference_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                    const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0;
      for (int64_t p = 0; p < k; ++p) sum += a[ta ? p * lda + i : i * lda + p] * b[tb ? j * ldb + p : p * ldb + j];
      c[i * ldc + j] = alpha * sum + (beta == 0 ? 0.0 : beta * c[i * ldc + j]);
    }
}

// The reference's C for stored matrices.
std::vector<double> reference_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const Stored& A,
                                   const Stored& B, double beta, const Stored& C) {
  const std::vector<double> a = values_of(A.data), b = values_of(B.data);
  std::vector<double> c = values_of(C.data);
  reference_gemm(ta, tb, m, n, k, alpha, a.data(), A.ld, b.data(), B.ld, beta, c.data(), C.ld);
  return c;
}

// How close a product of these types must be to the double reference (relative to the scale of the terms).
double blas_tolerance(DType ab, DType c, bool tf32) {
  if (c == DType::BF16) return kBf16Step;
  if (ab == DType::F64) return 1e-12;
  return tf32 ? 1e-2 : 1e-5;  // TF32: inputs rounded to 10 mantissa bits (2^-11 relative each)
}

// Sets the TF32 switch and the grouped products' mode for a scope, then puts back the defaults.
struct BlasModes {
  BlasModes(bool tf32, cuda::ExpertGemm expert_gemm) {
    cuda::set_tf32(tf32);
    cuda::set_expert_gemm(expert_gemm);
  }
  ~BlasModes() {
    cuda::set_tf32(false);
    cuda::set_expert_gemm(cuda::ExpertGemm::Grouped);
  }
};

struct TypePair {
  DType ab, c;
};
constexpr TypePair kBlasTypes[] = {
    {DType::F32, DType::F32}, {DType::F64, DType::F64}, {DType::BF16, DType::F32}, {DType::BF16, DType::BF16}};

std::string type_names(TypePair t) { return fmt::format("{} -> {}", dtype_name(t.ab), dtype_name(t.c)); }

}  // namespace

TEST_CASE("cuda: blas: gemm matches a product in double (row-major, transposes, strides, alpha, beta)" * cuda_only()) {
  for (TypePair types : kBlasTypes) {
    for (Sizes z : {Sizes{1, 1, 1}, Sizes{7, 33, 5}, Sizes{33, 17, 65}, Sizes{5, 4, 0}}) {
      for (int flags = 0; flags < 8; ++flags) {
        const bool ta = flags & 1, tb = flags & 2, accumulate = flags & 4;
        const Stored A = ta ? stored(z.k, z.m, 3, 100, types.ab) : stored(z.m, z.k, 3, 100, types.ab);
        const Stored B = tb ? stored(z.n, z.k, 1, 101, types.ab) : stored(z.k, z.n, 1, 101, types.ab);
        const Stored C0 = stored(z.m, z.n, 2, 102, types.c);
        const Stored C = accumulate ? C0 : poisoned(C0);
        const float alpha = 0.5f, beta = accumulate ? 0.25f : 0.0f;
        const Tensor a = to_gpu(A.data), b = to_gpu(B.data), c = to_gpu(C.data);
        cuda::gemm(ta, tb, z.m, z.n, z.k, alpha, a.raw_data(), A.ld, b.raw_data(), B.ld, beta, c.raw_data(), C.ld,
                   types.ab, types.c);
        check_values(
            values_of(c), reference_gemm(ta, tb, z.m, z.n, z.k, alpha, A, B, beta, C),
            blas_tolerance(types.ab, types.c, false), sum_scale(z.k),
            fmt::format("{} m {} n {} k {} ta {} tb {} beta {}", type_names(types), z.m, z.n, z.k, ta, tb, beta));
      }
    }
  }
}

TEST_CASE("cuda: blas: strided batched gemm, with a stride-0 (shared) operand" * cuda_only()) {
  const int64_t m = 7, n = 9, k = 33, batch = 3;
  for (TypePair types : kBlasTypes) {
    for (int flags = 0; flags < 4; ++flags) {
      const bool ta = flags & 1, tb = flags & 2;
      // Each batch's matrix starts `stride` elements after the previous one (one row of slack in between); A shared.
      const Stored A = ta ? stored(k, m, 0, 110, types.ab) : stored(m, k, 0, 110, types.ab);
      const Stored B = tb ? stored(batch * (n + 1), k, 0, 111, types.ab) : stored(batch * (k + 1), n, 0, 111, types.ab);
      const Stored C = stored(batch * (m + 1), n, 0, 112, types.c);
      const int64_t stride_b = (tb ? n + 1 : k + 1) * B.ld, stride_c = (m + 1) * C.ld;
      const Tensor a = to_gpu(A.data), b = to_gpu(B.data), c = to_gpu(C.data);
      cuda::gemm_strided_batched(ta, tb, m, n, k, 1.5f, a.raw_data(), A.ld, 0, b.raw_data(), B.ld, stride_b, 0.5f,
                                 c.raw_data(), C.ld, stride_c, batch, types.ab, types.c);
      const std::vector<double> a_values = values_of(A.data), b_values = values_of(B.data);
      std::vector<double> expected = values_of(C.data);
      for (int64_t i = 0; i < batch; ++i)
        reference_gemm(ta, tb, m, n, k, 1.5, a_values.data(), A.ld, b_values.data() + i * stride_b, B.ld, 0.5,
                       expected.data() + i * stride_c, C.ld);
      check_values(values_of(c), expected, blas_tolerance(types.ab, types.c, false), sum_scale(k),
                   fmt::format("{} ta {} tb {}", type_names(types), ta, tb));
    }
  }
}

namespace {

// The problems of one gemm_grouped call: one per expert, several of them empty.
constexpr Sizes kGroupedSizes[] = {{3, 5, 7}, {0, 4, 2}, {4, 0, 3}, {2, 3, 0}, {1, 1, 1}, {17, 9, 33}, {5, 6, 4}};

// Runs gemm_grouped over kGroupedSizes on the GPU; returns each problem's C.
std::vector<std::vector<double>> grouped_on_gpu(bool ta, bool tb, TypePair types, float alpha, float beta,
                                                const std::vector<Stored>& As, const std::vector<Stored>& Bs,
                                                const std::vector<Stored>& Cs) {
  std::vector<Tensor> a, b, c;
  std::vector<cuda::GemmProblem> problems;
  for (size_t i = 0; i < std::size(kGroupedSizes); ++i) {
    const Sizes z = kGroupedSizes[i];
    a.push_back(to_gpu(As[i].data)), b.push_back(to_gpu(Bs[i].data)), c.push_back(to_gpu(Cs[i].data));
    problems.push_back(
        {z.m, z.n, z.k, a[i].raw_data(), As[i].ld, b[i].raw_data(), Bs[i].ld, c[i].raw_data(), Cs[i].ld});
  }
  cuda::gemm_grouped(ta, tb, problems, alpha, beta, types.ab, types.c);
  std::vector<std::vector<double>> out;
  for (const Tensor& ci : c) out.push_back(values_of(ci));
  return out;
}

}  // namespace

TEST_CASE("cuda: blas: grouped gemm with empty problems, as one grouped call and one call per problem" * cuda_only()) {
  for (TypePair types : kBlasTypes) {
    for (bool tf32 : {false, true}) {
      if (tf32 && types.ab != DType::F32) continue;
      for (int flags = 0; flags < 8; ++flags) {
        const bool ta = flags & 1, tb = flags & 2, accumulate = flags & 4;
        const float alpha = 1.5f, beta = accumulate ? 0.5f : 0.0f;
        std::vector<Stored> As, Bs, Cs;
        for (size_t i = 0; i < std::size(kGroupedSizes); ++i) {
          const Sizes z = kGroupedSizes[i];
          As.push_back(ta ? stored(z.k, z.m, 0, 120 + i, types.ab) : stored(z.m, z.k, 0, 120 + i, types.ab));
          Bs.push_back(tb ? stored(z.n, z.k, 0, 130 + i, types.ab) : stored(z.k, z.n, 0, 130 + i, types.ab));
          const Stored C = stored(z.m, z.n, 0, 140 + i, types.c);
          Cs.push_back(accumulate ? C : poisoned(C));
        }
        std::vector<std::vector<double>> by_mode[2];
        for (bool grouped : {false, true}) {
          const BlasModes modes(tf32, grouped ? cuda::ExpertGemm::Grouped : cuda::ExpertGemm::PerExpert);
          by_mode[grouped] = grouped_on_gpu(ta, tb, types, alpha, beta, As, Bs, Cs);
        }
        for (size_t i = 0; i < std::size(kGroupedSizes); ++i) {
          const Sizes z = kGroupedSizes[i];
          const std::string what = fmt::format("{}{} problem {} (m {} n {} k {}) ta {} tb {} beta {}",
                                               type_names(types), tf32 ? " tf32" : "", i, z.m, z.n, z.k, ta, tb, beta);
          const std::vector<double> expected = reference_gemm(ta, tb, z.m, z.n, z.k, alpha, As[i], Bs[i], beta, Cs[i]);
          const double scale = sum_scale(z.k);
          check_values(by_mode[1][i], expected, blas_tolerance(types.ab, types.c, tf32), scale, what + ", grouped");
          // The emulator computes both ways alike, so they must agree exactly; a GPU's kernels may differ in bits.
          if (cuda::is_simulator())
            CHECK_MESSAGE(by_mode[0][i] == by_mode[1][i], what << ": one call per problem differs from grouped");
          else
            check_values(by_mode[0][i], by_mode[1][i], blas_tolerance(types.ab, types.c, tf32), scale, what);
        }
      }
    }
  }
  cuda::gemm_grouped(false, false, {}, 1.0f, 0.0f, DType::F32, DType::F32);  // nothing to do
}

// 100 problems in one grouped call: 300 pointers, more than one queued copy's launch carries (bf16 -> bf16, the
// experts' products under mixed precision).
TEST_CASE("cuda: blas: a grouped gemm of 100 problems" * cuda_only()) {
  constexpr int64_t kProblems = 100;
  std::vector<Stored> As, Bs, Cs;
  std::vector<Tensor> a, b, c;
  std::vector<cuda::GemmProblem> problems;
  for (int64_t i = 0; i < kProblems; ++i) {
    const int64_t m = 1 + i % 7, n = 1 + i % 5, k = 1 + (i * 7) % 40;
    As.push_back(stored(m, k, 0, 300 + i, DType::BF16));
    Bs.push_back(stored(k, n, 0, 500 + i, DType::BF16));
    Cs.push_back(poisoned(stored(m, n, 0, 700 + i, DType::BF16)));
    a.push_back(to_gpu(As[i].data)), b.push_back(to_gpu(Bs[i].data)), c.push_back(to_gpu(Cs[i].data));
    problems.push_back({m, n, k, a[i].raw_data(), k, b[i].raw_data(), n, c[i].raw_data(), n});
  }
  cuda::gemm_grouped(false, false, problems, 1.0f, 0.0f, DType::BF16, DType::BF16);
  for (int64_t i = 0; i < kProblems; ++i) {
    const cuda::GemmProblem& p = problems[i];
    check_values(values_of(c[i]), reference_gemm(false, false, p.m, p.n, p.k, 1.0, As[i], Bs[i], 0.0, Cs[i]),
                 blas_tolerance(DType::BF16, DType::BF16, false), sum_scale(p.k), fmt::format("problem {}", i));
  }
}

TEST_CASE("cuda: blas: set_tf32 changes f32 products, and only by TF32's rounding" * cuda_only()) {
  const Stored A = stored(17, 65, 0, 150, DType::F32), B = stored(65, 9, 0, 151, DType::F32);
  const Stored C = stored(17, 9, 0, 152, DType::F32);
  std::vector<double> results[2];
  for (bool tf32 : {false, true}) {
    const BlasModes modes(tf32, cuda::ExpertGemm::Grouped);
    const Tensor a = to_gpu(A.data), b = to_gpu(B.data), c = to_gpu(C.data);
    cuda::gemm(false, false, 17, 9, 65, 1.0f, a.raw_data(), 65, b.raw_data(), 9, 0.0f, c.raw_data(), 9, DType::F32,
               DType::F32);
    results[tf32] = values_of(c);
    check_values(results[tf32], reference_gemm(false, false, 17, 9, 65, 1.0, A, B, 0.0, C),
                 blas_tolerance(DType::F32, DType::F32, tf32), sum_scale(65), tf32 ? "tf32" : "f32");
  }
  CHECK(results[0] != results[1]);
}

TEST_CASE("cuda: blas: failures name the call and the sizes" * cuda_only()) {
  const Tensor a = to_gpu(random({16}, 1, DType::F32)), c = to_gpu(random({16}, 2, DType::F32));
  // lda 2 < k = 4: cuBLAS refuses the leading dimension.
  const std::string message = testing::error_of([&] {
    cuda::gemm(false, false, 4, 4, 4, 1.0f, a.raw_data(), 2, a.raw_data(), 4, 0.0f, c.raw_data(), 4, DType::F32,
               DType::F32);
  });
  testing::check_mentions(message, {"cublasGemmEx", "m 4, n 4, k 4", "lda 2", "CUBLAS_STATUS_INVALID_VALUE"});
  testing::check_mentions(testing::error_of([&] {
                            cuda::gemm(false, false, 4, 4, 4, 1.0f, a.raw_data(), 4, a.raw_data(), 4, 0.0f,
                                       c.raw_data(), 4, DType::I32, DType::I32);
                          }),
                          {"gemm", "i32"});
}
#endif

// Tensor cores through nvcuda::wmma: on the emulator its sim/mma.h, on a GPU the hardware; the CPU's sum in double of
// the same bf16 values is the reference for both. bf16 x bf16 products are exact in f32, so only the f32 sums of
// K = 80 terms differ (a few ulps of the sum of |terms| each), while a tile loaded from the wrong place, a
// transposed operand or a lost element would be off by the size of the values. b's tiles are loaded both ways the
// attention kernels load theirs: as col_major fragments of b [N, K] (k^T in q k^T) and row_major ones of b^T [K, N]
// (v in p v).
TEST_CASE("cuda: wmma: a tensor-core product of bf16 tiles is the CPU's sum of the exact products" * cuda_only()) {
  const int64_t M = 48, N = 64, K = 80;
  const float alpha = 0.5f;
  const Tensor a = to_dtype(random({M, K}, 71, DType::F32), DType::BF16);
  const Tensor b = to_dtype(random({N, K}, 72, DType::F32), DType::BF16);
  const Tensor c = random({M, N}, 73, DType::F32);
  const std::vector<double> av = to_dtype(a, DType::F64).to_vector<double>(),
                            bv = to_dtype(b, DType::F64).to_vector<double>();
  for (bool b_row_major : {false, true}) {
    Tensor c_gpu = to_gpu(c);
    const Tensor b_operand =  // [K, N] or [N, K]; transposed in f32, exact for bf16 values
        b_row_major ? to_dtype(transpose(to_dtype(b, DType::F32), 0, 1), DType::BF16) : b;
    testing::wmma_matmul(to_gpu(a), to_gpu(b_operand), alpha, c_gpu, b_row_major);
    const std::vector<float> cv = c.to_vector<float>(), got = c_gpu.to_vector<float>();
    double worst = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double sum = 0, magnitude = 0;
        for (int64_t k = 0; k < K; ++k)
          sum += av[i * K + k] * bv[j * K + k], magnitude += std::abs(av[i * K + k] * bv[j * K + k]);
        const double expected = cv[i * N + j] + alpha * sum;
        const double error = std::abs(got[i * N + j] - expected) / (std::abs(cv[i * N + j]) + alpha * magnitude);
        worst = std::max(worst, error);
      }
    CHECK_MESSAGE(worst < 1e-5, "b " << (b_row_major ? "row" : "col") << "_major: worst error relative to the sum "
                                     << "of |terms|: " << worst);
  }
  CHECK_THROWS_WITH_AS(testing::wmma_matmul(to_gpu(a), to_gpu(b), alpha, to_gpu(random({M, 32}, 74, DType::F32))),
                       doctest::Contains("needs bf16 a [M, K]"), std::invalid_argument);
}

}  // namespace moelab
