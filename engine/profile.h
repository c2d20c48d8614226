#pragma once
// Kernel timing, for a breakdown of where a step's time goes (moe-bench train-step --breakdown). While a
// KernelProfile is alive, every call through the kernel seam (engine/kernels.h: KERNEL(name, device)(args)) is timed
// under the seam's name: a CPU kernel by the host's clock, a CUDA kernel by two events on the compute stream, so its
// time is the device's (from the end of the work queued before it to the end of its own), not its launch's. Work
// outside the seam (copies between host and device, the allocator) is not counted. Each call also adds the bytes of
// its tensors (the least the kernel reads and writes), so that a kind of kernel's time can be read against the memory's
// bandwidth. When no profile is alive the seam costs one branch.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace moelab {
namespace cuda {
class TimingEvent;  // engine/cuda/runtime.h
}

struct KernelTime {
  std::string name;  // the seam's name: "batched_matmul", "attention_backward", ...
  Device device = Device::CPU;
  int64_t calls = 0;
  double ms = 0;     // the calls' total
  double bytes = 0;  // the calls' tensors' bytes, each argument counted once (detail::seam_bytes)
};

class KernelProfile {
 public:
  KernelProfile();   // starts timing (one profile at a time: a second throws)
  ~KernelProfile();  // stops
  KernelProfile(const KernelProfile&) = delete;
  KernelProfile& operator=(const KernelProfile&) = delete;
  // The totals so far, one per kernel and device, the most time first. Waits for the device's queued work.
  std::vector<KernelTime> totals() const;
};

namespace detail {

inline std::atomic<bool> kernel_profile_active = false;  // read by every seam call, set by KernelProfile

// The bytes of a seam call's tensors, each argument counted once: what its kernel must at least read or write, if it
// reads each input and writes each output once (a tensor updated in place is read and written but counts once; a
// kernel that reads a tile many times, attention's, moves more). Arguments other than tensors count nothing; a
// struct of tensors adds an overload in its own header (AdamWTensors: engine/kernels/optim.h).
inline double seam_bytes(const Tensor& t) {
  return t.defined() ? static_cast<double>(t.numel()) * static_cast<double>(dtype_size(t.dtype())) : 0.0;
}
template <class T> double seam_bytes(const T&) { return 0; }
template <class T> double seam_bytes(const std::vector<T>& items) {
  double bytes = 0;
  for (const T& item : items) bytes += seam_bytes(item);
  return bytes;
}

// Times one seam call: started by the constructor, ended by stop(). A call that throws never reaches stop() and is
// not counted (so nothing here can throw from a destructor).
class KernelTimer {
 public:
  KernelTimer(const char* name, Device device, double bytes);
  ~KernelTimer();
  void stop();
  KernelTimer(const KernelTimer&) = delete;
  KernelTimer& operator=(const KernelTimer&) = delete;

 private:
  const char* name_;
  Device device_;
  double bytes_;
  std::chrono::steady_clock::time_point host_start_;  // CPU
  std::unique_ptr<cuda::TimingEvent> device_start_;   // CUDA: recorded on the compute stream
};

}  // namespace detail
}  // namespace moelab
