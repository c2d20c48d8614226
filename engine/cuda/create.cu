// CUDA kernels of engine/kernels/create.h: one thread per element computes its value on the device (nothing is
// filled on the host and copied over). The random fills run engine/rng.h's Philox and Box-Muller, the same code as
// the CPU's.
#include "engine/kernels/create.h"

#include "engine/cuda/device.cuh"
#include "engine/rng.h"

namespace moelab::cuda {

constexpr int kThreads = 256;

// a + b * x rounded twice, as the CPU computes it: nvcc would otherwise contract it into one fused multiply-add (one
// rounding) and change the last bit. The emulator compiles this as host C++, which does not contract (ISO C++ mode).
__device__ inline double add_product(double a, double b, double x) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, __dmul_rn(b, x));
#else
  return a + b * x;
#endif
}

template <class T> __global__ void fill_value_kernel(T* out, int64_t n, T value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

template <class T> __global__ void fill_arange_kernel(T* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<T>(static_cast<double>(i));
}

template <class F>
__global__ void fill_uniform_kernel(F* out, int64_t n, uint64_t seed, uint64_t first, double low, double width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<F>(add_product(low, width, philox_uniform(seed, first + static_cast<uint64_t>(i))));
}

template <class F>
__global__ void fill_normal_kernel(F* out, int64_t n, uint64_t seed, uint64_t first, double mean, double stddev) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<F>(add_product(mean, stddev, philox_normal(seed, first + static_cast<uint64_t>(i))));
}

void fill_value(const Tensor& out, double value) {
  const int64_t n = out.numel();
  dispatch_all("create", out.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("fill_value", fill_value_kernel<T>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, out.data<T>(), n,
           static_cast<T>(value));  // cast on the host, as the CPU does
  });
}

void fill_arange(const Tensor& out) {
  const int64_t n = out.numel();
  dispatch_all("arange", out.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("fill_arange", fill_arange_kernel<T>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, out.data<T>(), n);
  });
}

void fill_uniform(const Tensor& out, uint64_t seed, uint64_t first, double low, double high) {
  const int64_t n = out.numel();
  dispatch_float("uniform", out.dtype(), [&](auto t) {
    using F = decltype(t);
    launch("fill_uniform", fill_uniform_kernel<F>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, out.data<F>(), n,
           seed, first, low, high - low);
  });
}

void fill_normal(const Tensor& out, uint64_t seed, uint64_t first, double mean, double stddev) {
  const int64_t n = out.numel();
  dispatch_float("randn", out.dtype(), [&](auto t) {
    using F = decltype(t);
    launch("fill_normal", fill_normal_kernel<F>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, out.data<F>(), n,
           seed, first, mean, stddev);
  });
}

}  // namespace moelab::cuda
