#pragma once
// What the emulator's parts share (sim.cpp, runtime.cpp, cublas.cpp): the emulated device's limits and the runtime's
// state that launches read. Not for kernels: they include device.h through engine/cuda/device.cuh.
#include <cuda_runtime.h>

#include <cstddef>

namespace moelab::sim {

// An sm_90 device (H100/H200) as far as a launch can tell.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535, 65535};
constexpr size_t kSharedPerBlock = 48 * 1024;        // static shared memory, and dynamic without an opt-in
constexpr size_t kSharedPerBlockOptin = 227 * 1024;  // static + dynamic with cudaFuncSetAttribute's opt-in
constexpr size_t kSharedPerMultiprocessor = 228 * 1024;

// The dynamic shared memory `kernel` may use: what cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) allowed, else 48 KB.
size_t max_dynamic_shared(const void* kernel);

}  // namespace moelab::sim
