#pragma once
// The CUDA backend's host side: devices, stream-ordered memory and copies. Declared for every build; defined in
// runtime.cu when moelab has a CUDA backend (nvcc, or the emulator of MOELAB_CUDA=SIM), and as "not built" errors in
// runtime_stub.cpp otherwise. Kernels and their launches are in the other engine/cuda/*.cu files (device.cuh).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/enum_names.h"

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
void copy_to_device(void* dst, const void* src, size_t bytes);  // stream-ordered; src may be freed at once
void copy_to_host(void* dst, const void* src, size_t bytes);    // returns when done
void copy_on_device(void* dst, const void* src, size_t bytes);  // stream-ordered
void set_zero(void* ptr, size_t bytes);                         // stream-ordered
void synchronize();
// How many times the host has waited for the compute stream so far (copies to the host, copies to the device of more
// than 8 KB, synchronize(); not the profiler's TimingEvent reads): each wait drains the queue, and the device idles
// until the host has queued the next kernels. moe-bench reports it per step (docs/performance.md, "Host waits").
int64_t host_waits();
// How long the host has been blocked in those waits so far, in ms: a step's time less this is the host's own work.
double host_wait_ms();

// cuBLAS's switch (engine/cuda/blas.cu): f32 products on TF32 tensor cores (default off: f32 results match the CPU's).
void set_tf32(bool on);

// How the MoE experts' products run (engine/cuda/moe.cu, docs/performance.md; moe-bench train-step --expert-gemm):
//   Grouped    one grouped cuBLAS call per product, one problem per expert (the default). Under bf16 precision
//              every product, forward and backward, is bf16 -> bf16 (the grouped API has no bf16 -> f32).
//   Padded     every expert's rows copied into a buffer padded with zero rows to the longest expert's count, and one
//              strided-batched call per product, of the same types: one uniform batch, for the price of the padding. A
//              layer whose padded rows would be more than 1.5 times its slots runs grouped instead
//              (pads_expert_rows).
//   PerExpert  one cuBLAS call per expert and product.
// The results are the same up to the order of f32 sums (under bf16, a kept activation may then round a bf16 step
// the other way); which is fastest is measured.
enum class ExpertGemm : uint8_t { Grouped, Padded, PerExpert };
constexpr EnumNames<ExpertGemm, 3> enum_names(ExpertGemm) {
  return {{{ExpertGemm::Grouped, "grouped"}, {ExpertGemm::Padded, "padded"}, {ExpertGemm::PerExpert, "per-expert"}}};
}
void set_expert_gemm(ExpertGemm mode);
ExpertGemm expert_gemm();
// Sets the mode for a scope and puts back the one before when it ends, also when the scope throws.
class ExpertGemmScope {
 public:
  [[nodiscard]] explicit ExpertGemmScope(ExpertGemm mode) : previous_(expert_gemm()) { set_expert_gemm(mode); }
  ~ExpertGemmScope() { set_expert_gemm(previous_); }
  ExpertGemmScope(const ExpertGemmScope&) = delete;
  ExpertGemmScope& operator=(const ExpertGemmScope&) = delete;

 private:
  ExpertGemm previous_;
};
// Under ExpertGemm::Padded: whether a layer whose experts own the sorted rows [offsets[e], offsets[e+1]) (the plan's
// host offsets) pads them, i.e. whether E times the longest expert's count is at most 1.5 times the slots (and fits
// a grid of one block per row).
bool pads_expert_rows(const std::vector<int32_t>& offsets);
// How many calls of the experts' products (a layer's forward or backward) have run on padded rows so far.
int64_t padded_expert_calls();

// The pool's high-water mark: the most bytes allocated at once since the start or the last reset_peak_memory().
size_t peak_memory_bytes();
void reset_peak_memory();

// A point in the compute stream's work, for timing it on the device: record() marks "after everything queued so
// far"; ms_since(start) waits until this event has happened and returns the device time between the two.
class TimingEvent {
 public:
  TimingEvent();
  ~TimingEvent();
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
  void record();
  float ms_since(const TimingEvent& start) const;

 private:
  void* event_;  // a cudaEvent_t
};

// Debug mode: synchronize and check after every kernel, so that an asynchronous failure names the kernel that
// caused it. On when the environment sets MOELAB_CUDA_DEBUG=1.
void set_debug_sync(bool on);
bool debug_sync();

}  // namespace moelab::cuda
