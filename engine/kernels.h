#pragma once
// The seam between ops and kernels. An op (engine/ops/X.cpp) checks its inputs, allocates its outputs and records
// its backward; the numbers come from kernels that have one name and one signature on both devices:
//   cpu::rms_norm_forward    engine/cpu/nn.cpp    loops, OpenMP
//   cuda::rms_norm_forward   engine/cuda/nn.cu    a CUDA kernel and its launch
// Each pair is declared once, in engine/kernels/X.h:
//   DECLARE_KERNEL(rms_norm_forward, (const Tensor& x, const Tensor& weight, double eps, const Tensor& y, ...));
// and an op calls the one for its tensors' device:
//   KERNEL(rms_norm_forward, x.device())(x, weight, eps, y, rstd);
// (timed under its name while a KernelProfile is alive: engine/profile.h).
// Both must have the same type, so a signature that drifts between the backends does not compile (the kernel files
// are also built with -Werror=missing-declarations: a definition that matches no declaration is an error).
// Conventions: kernels trust their arguments (the op checked them); outputs are passed as tensors the op allocated
// (a Tensor is a handle: the kernel writes through it); sizes come from the tensors' shapes.
#include <utility>

#include "engine/profile.h"
#include "engine/tensor.h"

#define DECLARE_KERNEL(name, params) \
  namespace cpu {                    \
  void name params;                  \
  }                                  \
  namespace cuda {                   \
  void name params;                  \
  }

namespace moelab::detail {

// KERNEL(name, device) is one of these: it calls the kernel with the kernel's own parameter types (so arguments
// convert as in a plain call), timed and its tensors' bytes counted while a KernelProfile is alive (engine/profile.h).
template <class Kernel> struct SeamCall;
template <class... Params> struct SeamCall<void(Params...)> {
  const char* name;
  Device device;
  void (*kernel)(Params...);
  void operator()(Params... args) const {
    if (!kernel_profile_active.load(std::memory_order_relaxed)) return kernel(std::forward<Params>(args)...);
    KernelTimer timer(name, device, (seam_bytes(args) + ... + 0.0));
    kernel(std::forward<Params>(args)...);
    timer.stop();
  }
};
template <class Kernel>
SeamCall<Kernel> seam_call(const char* name, Device device, Kernel* cuda_kernel, Kernel* cpu_kernel) {
  return {name, device, device == Device::CUDA ? cuda_kernel : cpu_kernel};
}

}  // namespace moelab::detail

#if MOELAB_HAVE_CUDA
#define KERNEL(name, device) ::moelab::detail::seam_call(#name, (device), &::moelab::cuda::name, &::moelab::cpu::name)
#else
// Without a CUDA backend no tensor lives on a GPU (allocating one throws), so there is only the CPU's kernel.
#define KERNEL(name, device) ::moelab::detail::seam_call(#name, (device), &::moelab::cpu::name, &::moelab::cpu::name)
#endif
