// The CUDA backend's host side: one compute stream, memory from the stream-ordered pool, checked calls and copies.
// The same file serves the real backend and the emulator (MOELAB_CUDA=SIM), whose cuda* functions run on the host.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "engine/cuda/device.cuh"

namespace moelab::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(status));
}

static bool debug_sync_flag = [] {
  const char* env = std::getenv("MOELAB_CUDA_DEBUG");
  return env && std::strcmp(env, "1") == 0;
}();

void set_debug_sync(bool on) { debug_sync_flag = on; }
bool debug_sync() { return debug_sync_flag; }

static std::atomic<int64_t> host_wait_count = 0, host_wait_ns = 0;

// Waits for everything queued on the compute stream, counted and timed by host_waits() and host_wait_ms().
static void wait_for_stream(const char* what) {
  host_wait_count.fetch_add(1, std::memory_order_relaxed);
  const auto start = std::chrono::steady_clock::now();
  check(cudaStreamSynchronize(stream()), what);
  host_wait_ns.fetch_add(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count(),
      std::memory_order_relaxed);
}

int64_t host_waits() { return host_wait_count.load(std::memory_order_relaxed); }
double host_wait_ms() { return static_cast<double>(host_wait_ns.load(std::memory_order_relaxed)) * 1e-6; }

void after_launch(const char* kernel) {
  check(cudaGetLastError(), kernel);
  if (debug_sync_flag) check(cudaStreamSynchronize(stream()), kernel);
}

// Created on first use, with the device pool told to keep its memory: by default it hands freed memory back to the
// driver at every synchronization, and the next step would allocate it again.
cudaStream_t stream() {
  static cudaStream_t s = [] {
    cudaStream_t created;
    check(cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking), "cudaStreamCreate");
    cudaMemPool_t pool;
    check(cudaDeviceGetDefaultMemPool(&pool, 0), "cudaDeviceGetDefaultMemPool");
    uint64_t keep_all = UINT64_MAX;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep_all), "cudaMemPoolSetAttribute");
    return created;
  }();
  return s;
}

bool built_with_cuda() { return true; }

bool is_simulator() { return MOELAB_CUDA_SIM; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

std::string device_name() {
  cudaDeviceProp props;
  if (device_count() == 0 || cudaGetDeviceProperties(&props, 0) != cudaSuccess) return "none";
  return props.name;
}

void* allocate(size_t bytes) {
  void* ptr = nullptr;
  if (bytes == 0) return nullptr;
  check(cudaMallocAsync(&ptr, bytes, stream()), "cudaMallocAsync");
  return ptr;
}

// Called from Storage's destructor, also for tensors that outlive the CUDA runtime (static caches, destroyed at exit):
// then there is nothing left to free, and throwing from a destructor would abort.
void release(void* ptr) {
  if (!ptr) return;
  const cudaError_t status = cudaFreeAsync(ptr, stream());
  if (status == cudaErrorCudartUnloading || status == cudaErrorContextIsDestroyed) return;
  check(status, "cudaFreeAsync");
}

constexpr size_t kQueuedCopyBytes = 2048;  // a launch's parameters may take 4 KB
struct QueuedBytes {
  unsigned char bytes[kQueuedCopyBytes];
};

static __global__ void write_bytes_kernel(QueuedBytes block, int64_t count, unsigned char* out) {
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) out[i] = block.bytes[i];
}

void copy_to_device_queued(void* dst, const void* src, size_t bytes) {
  for (size_t begin = 0; begin < bytes; begin += kQueuedCopyBytes) {
    const size_t count = std::min(kQueuedCopyBytes, bytes - begin);
    QueuedBytes block;
    std::memcpy(block.bytes, static_cast<const unsigned char*>(src) + begin, count);
    launch("copy_to_device_queued", write_bytes_kernel, dim3(1), dim3(256), 0, block, static_cast<int64_t>(count),
           static_cast<unsigned char*>(dst) + begin);
  }
}

// Up to 8 KB (four launches) the copy is queued: a host array that small is a kernel's arguments or a loss's
// labels, and waiting for the device would cost more than the launches. Larger ones wait: a cudaMemcpyAsync from
// pageable memory returns once the bytes are staged, and this returns once they have arrived.
void copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  if (bytes <= 4 * kQueuedCopyBytes) return copy_to_device_queued(dst, src, bytes);
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()), "copy host->device");
  wait_for_stream("copy host->device");
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()), "copy device->host");
  wait_for_stream("copy device->host");
}

void copy_on_device(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()), "copy device->device");
}

void set_zero(void* ptr, size_t bytes) {
  if (bytes == 0) return;
  check(cudaMemsetAsync(ptr, 0, bytes, stream()), "cudaMemsetAsync");
}

void synchronize() { wait_for_stream("cudaStreamSynchronize"); }

static cudaMemPool_t default_pool() {
  stream();  // the pool is set up with the stream
  cudaMemPool_t pool;
  check(cudaDeviceGetDefaultMemPool(&pool, 0), "cudaDeviceGetDefaultMemPool");
  return pool;
}

size_t peak_memory_bytes() {
  uint64_t high = 0;
  check(cudaMemPoolGetAttribute(default_pool(), cudaMemPoolAttrUsedMemHigh, &high), "cudaMemPoolGetAttribute");
  return high;
}

void reset_peak_memory() {
  uint64_t zero = 0;  // the only value CUDA takes: the mark restarts from what is in use now
  check(cudaMemPoolSetAttribute(default_pool(), cudaMemPoolAttrUsedMemHigh, &zero), "cudaMemPoolSetAttribute");
}

TimingEvent::TimingEvent() {
  cudaEvent_t event;
  check(cudaEventCreate(&event), "cudaEventCreate");
  event_ = event;
}

TimingEvent::~TimingEvent() { cudaEventDestroy(static_cast<cudaEvent_t>(event_)); }

void TimingEvent::record() { check(cudaEventRecord(static_cast<cudaEvent_t>(event_), stream()), "cudaEventRecord"); }

float TimingEvent::ms_since(const TimingEvent& start) const {
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)), "cudaEventSynchronize");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.event_), static_cast<cudaEvent_t>(event_)),
        "cudaEventElapsedTime");
  return ms;
}

}  // namespace moelab::cuda
