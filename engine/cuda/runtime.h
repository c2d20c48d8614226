#pragma once
// The CUDA backend's host side: devices, stream-ordered memory and copies. Declared for every build; defined in
// runtime.cu when moelab has a CUDA backend (nvcc, or the emulator of MOELAB_CUDA=SIM), and as "not built" errors in
// runtime_stub.cpp otherwise. Kernels and their launches are in the other engine/cuda/*.cu files (device.cuh).
#include <cstddef>
#include <string>

namespace moelab::cuda {

// Whether this build has a CUDA backend: a real one, or the emulator that runs the same kernels on the CPU.
bool built_with_cuda();
bool is_simulator();
int device_count();         // 0 without a backend or without a GPU (the emulator is one device)
std::string device_name();  // e.g. "NVIDIA H200" or "moelab CUDA emulator"

// Memory from the device's stream-ordered pool on the compute stream; the pool keeps what it has (no cudaMalloc per
// op, no return of memory to the driver at every synchronization).
void* allocate(size_t bytes);
void release(void* ptr);
void copy_to_device(void* dst, const void* src, size_t bytes);  // returns when done (src may be freed at once)
void copy_to_host(void* dst, const void* src, size_t bytes);    // returns when done
void copy_on_device(void* dst, const void* src, size_t bytes);  // stream-ordered
void set_zero(void* ptr, size_t bytes);                         // stream-ordered
void synchronize();

// Debug mode: synchronize and check after every kernel, so that an asynchronous failure names the kernel that
// caused it. On when the environment sets MOELAB_CUDA_DEBUG=1.
void set_debug_sync(bool on);
bool debug_sync();

}  // namespace moelab::cuda
