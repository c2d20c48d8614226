#pragma once
// Helpers for the CUDA tests: the CPU kernels are the oracle of the CUDA kernels. Each test runs a kernel (or an op)
// on CPU tensors and on their copies on the GPU, and compares. The tests run in the MOELAB_CUDA=SIM build (the same
// .cu kernels on the CPU, under two thread schedules) and on a real GPU; elsewhere they are skipped.
//   TEST_CASE("cuda: rms_norm kernels match the CPU" * cuda_only()) { ... }
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "engine/cuda/runtime.h"
#include "engine/ops.h"
#include "tests/testing.h"

namespace moelab::testing {

// A device to run on: the emulator, or a GPU.
inline bool have_cuda_device() { return cuda::built_with_cuda() && cuda::device_count() > 0; }

// Decorator for CUDA test cases: skipped (and reported as skipped) where there is no device.
inline auto cuda_only() { return doctest::skip(!have_cuda_device()); }

inline Tensor to_gpu(const Tensor& t) { return to_device(t.detach(), Device::CUDA); }
inline Tensor to_cpu(const Tensor& t) { return to_device(t.detach(), Device::CPU); }

// x on `device`, cut from any graph: a copy on the other device, the same storage where it already is.
inline Tensor on(const Tensor& x, Device device) { return to_device(x.detach(), device); }

// An uninitialized tensor shaped like t on `device` (an output buffer for a kernel).
inline Tensor empty_like_on(const Tensor& t, Device device) { return Tensor::empty(t.shape(), t.dtype(), device); }

// Asserts that a GPU result equals the CPU's within rel (relative to |cpu| + atol).
inline void check_gpu_matches(const Tensor& gpu, const Tensor& cpu, double rel, double atol = 1e-6,
                              const std::string& what = "") {
  check_close(to_cpu(gpu), cpu, rel, atol, what);
}

// Asserts that a GPU result has the CPU result's shape, dtype and bits (NaN equals NaN of the same bits).
inline void check_same_bits(const Tensor& gpu, const Tensor& cpu, const std::string& what) {
  Tensor host = to_cpu(gpu);
  REQUIRE_MESSAGE(host.shape() == cpu.shape(), what << ": " << host.str() << " vs " << cpu.str());
  REQUIRE(host.dtype() == cpu.dtype());
  CHECK_MESSAGE(bitwise_equal(host, cpu), what << ": the GPU's bits differ from the CPU's");
}

// Asserts max |gpu - cpu| <= bound * max |cpu|: relative to the largest entry of the tensor, for results whose entries
// can cancel to near zero (which then have no relative accuracy on either device).
inline void check_scaled(const Tensor& gpu, const Tensor& cpu, double bound, const std::string& what) {
  Tensor host = to_cpu(gpu);
  REQUIRE_MESSAGE(host.shape() == cpu.shape(), what << ": " << host.str() << " vs " << cpu.str());
  std::vector<double> a = as_doubles(host), b = as_doubles(cpu);
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double err = std::abs(a[i] - b[i]);
    if (!(err <= diff)) diff = err;  // NaN-propagating max
    scale = std::max(scale, std::abs(b[i]));
  }
  CHECK_MESSAGE(diff <= bound * scale, what << ": max error " << diff << " > " << bound << " * max " << scale);
}

// op(inputs) on `device`, then the gradients its recorded backward returns for the upstream gradient g (every float
// input requires one): {out, d input 0, d input 1, ...} (undefined where the op gives none).
inline std::vector<Tensor> op_and_gradients(const std::function<Tensor(const std::vector<Tensor>&)>& op,
                                            const std::vector<Tensor>& inputs, const Tensor& g, Device device) {
  std::vector<Tensor> xs;
  for (const Tensor& x : inputs) {
    Tensor y = on(x, device);
    if (y.dtype() != DType::I32) y.set_requires_grad();
    xs.push_back(y);
  }
  const Tensor out = op(xs);
  REQUIRE(out.grad_fn());
  std::vector<Tensor> results{out};
  NoGradGuard no_grad;  // as Tensor::backward runs backward functions
  for (const Tensor& grad : out.grad_fn()->backward(on(g, device))) results.push_back(grad);
  return results;
}

}  // namespace moelab::testing
