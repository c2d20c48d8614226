// The CUDA runtime functions moelab calls, for the emulator: one device whose memory is host memory (so that
// AddressSanitizer sees kernels' accesses), and streams on which everything has finished by the time a call returns
// (kernels run at their launch). The signatures are NVIDIA's: cuda_runtime_api.h declares them, and this file is
// compiled with -Werror=missing-declarations, so a definition that differs from its declaration does not compile.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>

#include "engine/cuda/sim/emulator.h"

// The runtime's opaque handles (driver_types.h declares them without a definition).
struct CUstream_st {
  unsigned flags = 0;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point recorded_at;
  bool recorded = false;
};
struct CUmemPoolHandle_st {
  uint64_t release_threshold = 0;
};

namespace {

// Like CUDA's, the last error of each host thread: a failing call sets it, cudaGetLastError returns and clears it.
thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t error) {
  last_error = error;
  return error;
}

// Device memory: host allocations of the exact size, registered so that copies can check their device side.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {  // what is still allocated at exit goes, as the driver frees a process's memory
    for (auto [data, bytes] : sizes_) ::operator delete(const_cast<std::byte*>(data), std::align_val_t(kAlignment));
  }
  void* allocate(size_t bytes) {
    auto* data = static_cast<std::byte*>(::operator new(bytes, std::align_val_t(kAlignment), std::nothrow));
    if (!data) return nullptr;
    std::memset(data, 0xFF, bytes);  // fresh device memory may hold anything: here NaN
    std::lock_guard lock(mutex_);
    sizes_[data] = bytes;
    in_use_ += bytes;
    high_water_ = std::max(high_water_, in_use_);
    return data;
  }
  bool release(void* ptr) {
    std::lock_guard lock(mutex_);
    auto found = sizes_.find(static_cast<std::byte*>(ptr));
    if (found == sizes_.end()) return false;
    in_use_ -= found->second;
    sizes_.erase(found);
    ::operator delete(ptr, std::align_val_t(kAlignment));
    return true;
  }
  // Whether [ptr, ptr + bytes) lies inside one allocation.
  bool contains(const void* ptr, size_t bytes) {
    std::lock_guard lock(mutex_);
    auto next = sizes_.upper_bound(static_cast<const std::byte*>(ptr));
    if (next == sizes_.begin()) return false;
    auto [start, size] = *std::prev(next);
    const std::byte* begin = static_cast<const std::byte*>(ptr);
    return begin >= start && begin + bytes <= start + size;
  }
  size_t in_use() {
    std::lock_guard lock(mutex_);
    return in_use_;
  }
  // The most in use at once since the start or the last reset (cudaMemPoolAttrUsedMemHigh).
  size_t high_water() {
    std::lock_guard lock(mutex_);
    return high_water_;
  }
  void reset_high_water() {
    std::lock_guard lock(mutex_);
    high_water_ = in_use_;
  }

 private:
  static constexpr size_t kAlignment = 256;  // what cudaMalloc guarantees
  std::mutex mutex_;
  std::map<const std::byte*, size_t> sizes_;
  size_t in_use_ = 0;
  size_t high_water_ = 0;
};

// The runtime's state. CUDA creates its runtime at the first call and tears it down at exit, in turn with the static
// objects (last created, first destroyed): a static object created before the first call, such as a cache that
// later holds device tensors, outlives it, and its frees at exit fail with cudaErrorCudartUnloading. Here too.
struct Runtime {
  DeviceMemory memory;
  std::mutex opt_in_mutex;  // cudaFuncSetAttribute's opt-ins to more than 48 KB of dynamic shared memory
  std::unordered_map<const void*, size_t> opt_in_bytes;
  ~Runtime();
};

bool runtime_unloaded = false;
Runtime::~Runtime() { runtime_unloaded = true; }

Runtime* runtime() {  // null once torn down
  static Runtime state;
  return runtime_unloaded ? nullptr : &state;
}

size_t total_memory() { return size_t(sysconf(_SC_PHYS_PAGES)) * size_t(sysconf(_SC_PAGE_SIZE)); }

// A copy's or memset's device side must be device memory: a host pointer there is a bug the GPU would also refuse.
bool device_side_ok(Runtime& rt, const char* call, const char* side, const void* ptr, size_t bytes) {
  if (rt.memory.contains(ptr, bytes)) return true;
  std::fprintf(stderr, "moelab CUDA emulator: %s: the %s [%p, +%zu bytes) is not inside a device allocation\n", call,
               side, ptr, bytes);
  return false;
}

cudaError_t copy(const char* call, void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  bool from_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  bool to_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return fail(cudaErrorInvalidMemcpyDirection);
  if (from_device && !device_side_ok(*rt, call, "source", src, count)) return fail(cudaErrorInvalidValue);
  if (to_device && !device_side_ok(*rt, call, "destination", dst, count)) return fail(cudaErrorInvalidValue);
  if (count) std::memcpy(dst, src, count);  // overlapping ranges: ASan reports them, as they are undefined on a GPU too
  return cudaSuccess;
}

cudaError_t set(const char* call, void* ptr, int value, size_t count) {
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  if (!device_side_ok(*rt, call, "destination", ptr, count)) return fail(cudaErrorInvalidValue);
  if (count) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t malloc_device(void** ptr, size_t size) {
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  if (!ptr) return fail(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (size == 0) return cudaSuccess;
  *ptr = rt->memory.allocate(size);
  return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t free_device(void* ptr) {
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  if (!ptr || rt->memory.release(ptr)) return cudaSuccess;
  return fail(cudaErrorInvalidValue);
}

}  // namespace

namespace moelab::sim {

size_t max_dynamic_shared(const void* kernel) {
  Runtime* rt = runtime();
  if (!rt) return kSharedPerBlock;
  std::lock_guard lock(rt->opt_in_mutex);
  auto found = rt->opt_in_bytes.find(kernel);
  return found == rt->opt_in_bytes.end() ? kSharedPerBlock : found->second;
}

}  // namespace moelab::sim

// ---- errors ----------------------------------------------------------------------------------------------------------

cudaError_t cudaGetLastError() { return std::exchange(last_error, cudaSuccess); }
cudaError_t cudaPeekAtLastError() { return last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorCudartUnloading: return "cudaErrorCudartUnloading";
    default: return "cudaErrorUnknown";
  }
}

// CUDA's own wording, so that messages read the same as on a GPU.
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorCudartUnloading: return "driver shutting down";
    default: return "unrecognized error code";
  }
}

// ---- the device ------------------------------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  if (!runtime()) return fail(cudaErrorCudartUnloading);
  if (!count) return fail(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice); }

cudaError_t cudaGetDevice(int* device) {
  if (!device) return fail(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (!prop) return fail(cudaErrorInvalidValue);
  if (device != 0) return fail(cudaErrorInvalidDevice);
  using namespace moelab::sim;
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "moelab CUDA emulator");
  prop->major = 9;  // compute capability 9.0, as an H100/H200
  prop->minor = 0;
  prop->totalGlobalMem = total_memory();
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = int(kMaxThreadsPerBlock);
  for (int d = 0; d < 3; ++d) {
    prop->maxThreadsDim[d] = int(kMaxBlockDim[d]);
    prop->maxGridSize[d] = int(kMaxGridDim[d]);
  }
  prop->sharedMemPerBlock = kSharedPerBlock;
  prop->sharedMemPerBlockOptin = kSharedPerBlockOptin;
  prop->sharedMemPerMultiprocessor = kSharedPerMultiprocessor;
  prop->reservedSharedMemPerBlock = 1024;
  prop->regsPerBlock = 65536;
  prop->regsPerMultiprocessor = 65536;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->maxBlocksPerMultiProcessor = 32;
  prop->multiProcessorCount = 132;
  prop->totalConstMem = 64 * 1024;
  prop->l2CacheSize = 50 * 1024 * 1024;
  prop->unifiedAddressing = 1;
  prop->memoryPoolsSupported = 1;
  prop->concurrentKernels = 1;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  if (!free || !total) return fail(cudaErrorInvalidValue);
  *total = total_memory();
  size_t used = rt->memory.in_use();
  *free = used < *total ? *total - used : 0;
  return cudaSuccess;
}

// Kernels and copies have finished when their call returns: synchronizing has nothing to wait for.
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  if (!func) return fail(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > moelab::sim::kSharedPerBlockOptin) return fail(cudaErrorInvalidValue);
    std::lock_guard lock(rt->opt_in_mutex);
    rt->opt_in_bytes[func] = size_t(value);
  } else if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    if (value < -1 || value > 100) return fail(cudaErrorInvalidValue);
  }
  return cudaSuccess;  // the other attributes (scheduling hints, clusters) change nothing here
}

// ---- streams and events ----------------------------------------------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  if (!runtime()) return fail(cudaErrorCudartUnloading);
  if (!stream) return fail(cudaErrorInvalidValue);
  *stream = new CUstream_st{flags};
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (!stream) return fail(cudaErrorInvalidResourceHandle);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  if (!event) return fail(cudaErrorInvalidValue);
  *event = new CUevent_st;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  if (!event) return fail(cudaErrorInvalidResourceHandle);
  event->recorded_at = std::chrono::steady_clock::now();
  event->recorded = true;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return event ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms) return fail(cudaErrorInvalidValue);
  if (!start || !end || !start->recorded || !end->recorded) return fail(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->recorded_at - start->recorded_at).count();
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (!event) return fail(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

// ---- memory ----------------------------------------------------------------------------------------------------------

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  if (!pool) return fail(cudaErrorInvalidValue);
  if (device != 0) return fail(cudaErrorInvalidDevice);
  static CUmemPoolHandle_st default_pool;
  *pool = &default_pool;
  return cudaSuccess;
}

// The pool's attributes are accepted and kept; allocations come straight from the host's allocator.
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  if (!pool || !value) return fail(cudaErrorInvalidValue);
  if (attr == cudaMemPoolAttrReleaseThreshold) pool->release_threshold = *static_cast<uint64_t*>(value);
  if (attr == cudaMemPoolAttrUsedMemHigh) {  // only a reset (to 0) is allowed, as on a GPU
    if (*static_cast<uint64_t*>(value) != 0) return fail(cudaErrorInvalidValue);
    if (Runtime* rt = runtime()) rt->memory.reset_high_water();
  }
  return cudaSuccess;
}

// The emulated device's memory is all the pool's: in use is what is allocated.
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value) {
  if (!pool || !value) return fail(cudaErrorInvalidValue);
  Runtime* rt = runtime();
  if (!rt) return fail(cudaErrorCudartUnloading);
  uint64_t& out = *static_cast<uint64_t*>(value);
  switch (attr) {
    case cudaMemPoolAttrReleaseThreshold: out = pool->release_threshold; return cudaSuccess;
    case cudaMemPoolAttrUsedMemCurrent: out = rt->memory.in_use(); return cudaSuccess;
    case cudaMemPoolAttrUsedMemHigh: out = rt->memory.high_water(); return cudaSuccess;
    default: return fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaMalloc(void** devPtr, size_t size) { return malloc_device(devPtr, size); }
cudaError_t cudaMallocAsync(void** devPtr, size_t size, cudaStream_t) { return malloc_device(devPtr, size); }
cudaError_t cudaFree(void* devPtr) { return free_device(devPtr); }
cudaError_t cudaFreeAsync(void* devPtr, cudaStream_t) { return free_device(devPtr); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return copy("cudaMemcpy", dst, src, count, kind);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t) {
  return copy("cudaMemcpyAsync", dst, src, count, kind);
}
cudaError_t cudaMemset(void* devPtr, int value, size_t count) { return set("cudaMemset", devPtr, value, count); }
cudaError_t cudaMemsetAsync(void* devPtr, int value, size_t count, cudaStream_t) {
  return set("cudaMemsetAsync", devPtr, value, count);
}
