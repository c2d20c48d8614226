#pragma once
// Kernel timing, for a breakdown of where a step's time goes (moe-bench train-step --breakdown). While a
// KernelProfile is alive, every call through the kernel seam (engine/kernels.h: KERNEL(name, device)(args)) is timed
// under the seam's name: a CPU kernel by the host's clock, a CUDA kernel by two events on the compute stream, so its
// time is the device's (from the end of the work queued before it to the end of its own), not its launch's. Work
// outside the seam (copies between host and device, the allocator) is not counted. When no profile is alive the
// seam costs one branch.
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
  double ms = 0;  // the calls' total
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

// Times one seam call: started by the constructor, ended by stop(). A call that throws never reaches stop() and is
// not counted (so nothing here can throw from a destructor).
class KernelTimer {
 public:
  KernelTimer(const char* name, Device device);
  ~KernelTimer();
  void stop();
  KernelTimer(const KernelTimer&) = delete;
  KernelTimer& operator=(const KernelTimer&) = delete;

 private:
  const char* name_;
  Device device_;
  std::chrono::steady_clock::time_point host_start_;  // CPU
  std::unique_ptr<cuda::TimingEvent> device_start_;   // CUDA: recorded on the compute stream
};

}  // namespace detail
}  // namespace moelab
