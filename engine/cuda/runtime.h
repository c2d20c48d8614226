#pragma once
// The CUDA backend's runtime slot: device discovery, stream-ordered memory and copies. Declared for every build;
// defined in runtime.cu when moelab is built with CUDA (MOELAB_HAVE_CUDA), and as "not built" errors otherwise.
#include <cstddef>

namespace moelab::cuda {

bool built_with_cuda();
int device_count();  // 0 when not built with CUDA or when no GPU is present
// Memory from the device's stream-ordered pool (cudaMallocAsync on the compute stream); never a cudaMalloc per op.
void* allocate(size_t bytes);
void release(void* ptr);
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void copy_on_device(void* dst, const void* src, size_t bytes);
void synchronize();

}  // namespace moelab::cuda
