// Built instead of runtime.cu when moelab has no CUDA backend: every entry point says so.
#include <stdexcept>

#include "engine/cuda/runtime.h"

namespace moelab::cuda {

[[noreturn]] static void not_built() {
  throw std::runtime_error(
      "this moelab build has no CUDA backend (configure with -DMOELAB_CUDA=ON and nvcc, or -DMOELAB_CUDA=SIM)");
}

bool built_with_cuda() { return false; }
bool is_simulator() { return false; }
int device_count() { return 0; }
std::string device_name() { return "none"; }
void* allocate(size_t) { not_built(); }
void release(void*) { not_built(); }
void copy_to_device(void*, const void*, size_t) { not_built(); }
void copy_to_host(void*, const void*, size_t) { not_built(); }
void copy_on_device(void*, const void*, size_t) { not_built(); }
void set_zero(void*, size_t) { not_built(); }
void synchronize() { not_built(); }
int64_t host_waits() { return 0; }
double host_wait_ms() { return 0; }
void set_tf32(bool) { not_built(); }
void set_expert_gemm(ExpertGemm) { not_built(); }
ExpertGemm expert_gemm() { not_built(); }
bool pads_expert_rows(const std::vector<int32_t>&) { not_built(); }
int64_t padded_expert_calls() { return 0; }
size_t peak_memory_bytes() { not_built(); }
void reset_peak_memory() { not_built(); }
TimingEvent::TimingEvent() : event_(nullptr) { not_built(); }
TimingEvent::~TimingEvent() = default;
void TimingEvent::record() { not_built(); }
float TimingEvent::ms_since(const TimingEvent&) const { not_built(); }
void set_debug_sync(bool) {}
bool debug_sync() { return false; }

}  // namespace moelab::cuda
