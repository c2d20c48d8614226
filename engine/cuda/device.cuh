#pragma once
// Included by every engine/cuda/*.cu file: the CUDA language (nvcc's, or the emulator's in the MOELAB_CUDA=SIM build,
// engine/cuda/sim/), launch(), and the two macros that let one kernel source serve both (shared memory).
#if MOELAB_CUDA_SIM
#include "engine/cuda/sim/device.h"
#else
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "engine/cuda/runtime.h"
#include "engine/tensor.h"

namespace moelab::cuda {

cudaStream_t stream();                             // the one stream all moelab GPU work runs on
void check(cudaError_t status, const char* what);  // throws std::runtime_error naming `what`
void after_launch(const char* kernel);             // the launch's error, and in debug mode the kernel's

// kernel<<<grid, block, shared_bytes, stream()>>>(args...) (on the emulator: the same kernel, run on the CPU).
// An empty grid launches nothing.
template <class... Params, class... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  if (static_cast<uint64_t>(grid.x) * grid.y * grid.z == 0) return;
#if MOELAB_CUDA_SIM
  sim::launch(name, kernel, grid, block, shared_bytes, static_cast<Params>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream()>>>(static_cast<Params>(args)...);
#endif
  after_launch(name);
}

// Blocks of `threads` that cover n items (one item per thread).
inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// Copies a few host bytes to the device in stream order without waiting: they travel as the parameters of a copying
// kernel (2 KB a launch), which the launch itself copies, so src may be freed at once. copy_to_device takes this way
// up to 8 KB and waits above; a cudaMemcpyAsync from pageable memory would wait too. For the small argument arrays
// of multi-tensor and grouped calls.
void copy_to_device_queued(void* dst, const void* src, size_t bytes);

// A host array's device copy, for the launches queued while it lives: made by copy_to_device_queued, freed in stream
// order (after the launches that read it).
template <class T> class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& host) : data_(static_cast<T*>(allocate(host.size() * sizeof(T)))) {
    try {
      copy_to_device_queued(data_, host.data(), host.size() * sizeof(T));
    } catch (...) {
      release(data_);
      throw;
    }
  }
  ~DeviceArray() { release(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return data_; }

 private:
  T* data_;
};

// ---- element types: bf16 beside f32 and f64 -------------------------------------------------------------------------

// A stored element's value in the math type F: bf16 widened (exact), f32 and f64 converted.
template <class F, class S> __device__ F widened(S v) {
  if constexpr (std::is_same_v<S, __nv_bfloat16>)
    return static_cast<F>(__bfloat162float(v));
  else
    return static_cast<F>(v);
}

// v stored as type Out (a product's operand, a kept activation, a bf16 result): to bf16 rounds to nearest even, else
// converts.
template <class Out, class V> __device__ Out converted(V v) {
  if constexpr (std::is_same_v<Out, V>)
    return v;
  else if constexpr (std::is_same_v<Out, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(v));
  else
    return widened<Out>(v);
}

// A tensor's elements as stored, type S (bf16: CUDA's __nv_bfloat16, the same bits as moelab's bf16).
template <class S> S* stored(const Tensor& t) { return static_cast<S*>(t.raw_data()); }

// Calls f(S{}) with S the storage type of a `dtype` tensor beside math in F: F itself, or bf16 beside f32.
template <class F, class Fn> void with_storage(const char* what, DType dtype, Fn&& f) {
  if (dtype == dtype_of<F>()) return f(F{});
  if constexpr (std::is_same_v<F, float>)
    if (dtype == DType::BF16) return f(__nv_bfloat16{});
  fail("{}: a {} tensor beside {} math", what, dtype_name(dtype), dtype_name(dtype_of<F>()));
}

}  // namespace moelab::cuda

// Block shared memory. SHARED_ARRAY(float, partial, 32) declares `partial`: 32 floats that every thread of the block
// sees (the emulator gives each block its own, filled with NaN, as uninitialized shared memory may hold anything).
// DYNAMIC_SHARED(float, buffer) is the launch's shared_bytes, 128-byte aligned (wmma's loads and stores need 32).
#if MOELAB_CUDA_SIM
#define SHARED_ARRAY(type, name, count) type* name = ::moelab::sim::shared_array<type>(count)
#define DYNAMIC_SHARED(type, name) type* name = ::moelab::sim::dynamic_shared<type>()
#else
#define SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define DYNAMIC_SHARED(type, name)                                        \
  extern __shared__ __align__(128) unsigned char moelab_dynamic_shared[]; \
  type* name = reinterpret_cast<type*>(moelab_dynamic_shared)
#endif
