// CUDA runtime slot: one compute stream, memory from the stream-ordered allocator, checked calls.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "engine/cuda/runtime.h"

namespace moelab::cuda {

static void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(status));
}

// The one stream all moelab GPU work runs on (created on first use).
static cudaStream_t compute_stream() {
  static cudaStream_t stream = [] {
    cudaStream_t s;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    return s;
  }();
  return stream;
}

bool built_with_cuda() { return true; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

void* allocate(size_t bytes) {
  void* ptr = nullptr;
  if (bytes == 0) return nullptr;
  check(cudaMallocAsync(&ptr, bytes, compute_stream()), "cudaMallocAsync");
  return ptr;
}

void release(void* ptr) {
  if (ptr) check(cudaFreeAsync(ptr, compute_stream()), "cudaFreeAsync");
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, compute_stream()), "copy host->device");
  check(cudaStreamSynchronize(compute_stream()), "copy host->device");
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, compute_stream()), "copy device->host");
  check(cudaStreamSynchronize(compute_stream()), "copy device->host");
}

void copy_on_device(void* dst, const void* src, size_t bytes) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, compute_stream()), "copy device->device");
}

void synchronize() { check(cudaStreamSynchronize(compute_stream()), "cudaStreamSynchronize"); }

}  // namespace moelab::cuda
