#pragma once
// The CUDA language for host C++: what lets g++ compile engine/cuda/*.cu in the MOELAB_CUDA=SIM build and run their
// kernels on the CPU (docs/cuda_emulator.md). NVIDIA's own headers give the types and the API's declarations (the
// functions moelab calls are defined in sim/runtime.cpp and sim/cublas.cpp, with exactly those signatures); this file
// adds what only nvcc knows: the built-in variables, barriers, warp collectives, atomics and intrinsics. The threads
// of a block run as fibers (sim/sim.cpp): a thread runs until it reaches a barrier, and a barrier releases once every
// thread it needs has arrived.
#include <cuda_bf16.h>     // bf16 with its host arithmetic
#include <cuda_runtime.h>  // types and cuda* declarations; its crt/host_defines.h empties __global__ etc. for g++
#include <math.h>          // device code calls CUDA's math unqualified (isnan, expf...): <math.h> puts it in ::

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <source_location>
#include <tuple>
#include <type_traits>

// ---- keywords host_defines.h leaves to nvcc -------------------------------------------------------------------------
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// A __shared__ variable would silently be one per thread here: kernels use SHARED_ARRAY/DYNAMIC_SHARED (device.cuh).
#undef __shared__
#define __shared__ \
  _Pragma("GCC error \"__shared__ does not work in the CUDA emulator: use SHARED_ARRAY or DYNAMIC_SHARED\"")

// ---- the running thread's coordinates (the scheduler sets them before it runs or resumes a thread) ----------------
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace moelab::sim {

// Every way a thread can wait: the block barriers, and the warp collectives (barriers over the lanes of a mask).
enum class Barrier : uint8_t {
  syncthreads,
  syncthreads_count,
  syncthreads_and,
  syncthreads_or,
  syncwarp,
  shfl_idx,
  shfl_up,
  shfl_down,
  shfl_xor,
  ballot,
  any,
  all,
  wmma,  // a wmma::*_sync call (sim/mma.h): the whole warp, at the same call
};

// The calling thread waits at `barrier` (for a warp collective: with the lanes of `mask`) and gets its result: a
// shuffle's value from its source lane (`value` is this lane's, `lane_arg` the shuffle's srcLane/delta/laneMask), a
// vote's or __syncthreads_count's reduction. `where` names the call in deadlock reports.
uint64_t wait_at(Barrier barrier, unsigned mask, uint64_t value, unsigned lane_arg, int width,
                 const std::source_location& where);
unsigned active_mask();  // the lanes of the caller's warp that have not returned
// The k-th SHARED_ARRAY a thread declares is the block's k-th array (`where`: the declaration, checked to match).
void* shared_bytes(size_t bytes, size_t alignment, const std::source_location& where);
void* dynamic_shared_bytes();  // the launch's dynamic shared memory
[[noreturn]] void trap(const std::source_location& where);

// The values a collective carries, as raw bits (a float travels as its 4 bytes).
template <class T> uint64_t to_bits(T value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp collectives carry values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <class T> T from_bits(uint64_t bits) {
  T value;
  std::memcpy(static_cast<void*>(&value), &bits, sizeof(T));  // through void*: bf16 has private members
  return value;
}

// ---- kernel launches -------------------------------------------------------------------------------------------------
// Runs `run(closure)` once per thread of every block of `grid` (the scheduler). `kernel` identifies the function for
// cudaFuncSetAttribute's shared-memory opt-in. Throws std::runtime_error naming `name` on a launch outside CUDA's
// limits, a deadlock, or an exception in the kernel.
void run_kernel(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
                void (*run)(const void* closure), const void* closure);

// kernel<<<grid, block, shared_bytes>>>(args...): the arguments are copied once at the launch, as CUDA does, and
// each thread gets its own copy of them (a kernel may modify its parameters).
template <class... Params>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            std::type_identity_t<Params>... args) {
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
    static void run(const void* self) {
      const Call& call = *static_cast<const Call*>(self);
      std::apply(call.kernel, call.args);
    }
  };
  Call call{kernel, {args...}};
  run_kernel(name, reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, &Call::run, &call);
}

template <class T> T* shared_array(size_t count, const std::source_location& where = std::source_location::current()) {
  return static_cast<T*>(shared_bytes(count * sizeof(T), alignof(T), where));
}
template <class T> T* dynamic_shared() { return static_cast<T*>(dynamic_shared_bytes()); }

// How the runnable threads of a block take turns between barriers: in thread order, or in a new random order each
// round. Read from MOELAB_SIM_SCHEDULE=forward|shuffled and MOELAB_SIM_SEED on first use (default: shuffled, seed 1).
enum class Schedule { forward, shuffled };
void set_schedule(Schedule schedule, uint64_t seed = 1);
Schedule schedule();
uint64_t schedule_seed();

}  // namespace moelab::sim

// nvcc's C++ API takes the kernel itself (cuda_runtime.h declares this overload only for nvcc).
template <class... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}

// ---- barriers and warp collectives -----------------------------------------------------------------------------------
// Each takes the caller's source location as a hidden last argument, so that a deadlock report says where threads wait.
#define MOELAB_WHERE const std::source_location& where = std::source_location::current()

inline void __syncthreads(MOELAB_WHERE) { moelab::sim::wait_at(moelab::sim::Barrier::syncthreads, 0, 0, 0, 0, where); }
inline int __syncthreads_count(int predicate, MOELAB_WHERE) {
  return int(moelab::sim::wait_at(moelab::sim::Barrier::syncthreads_count, 0, predicate != 0, 0, 0, where));
}
inline int __syncthreads_and(int predicate, MOELAB_WHERE) {
  return int(moelab::sim::wait_at(moelab::sim::Barrier::syncthreads_and, 0, predicate != 0, 0, 0, where));
}
inline int __syncthreads_or(int predicate, MOELAB_WHERE) {
  return int(moelab::sim::wait_at(moelab::sim::Barrier::syncthreads_or, 0, predicate != 0, 0, 0, where));
}
inline void __syncwarp(unsigned mask = 0xffffffffu, MOELAB_WHERE) {
  moelab::sim::wait_at(moelab::sim::Barrier::syncwarp, mask, 0, 0, 0, where);
}

template <class T> T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, MOELAB_WHERE) {
  using namespace moelab::sim;
  return from_bits<T>(wait_at(Barrier::shfl_idx, mask, to_bits(var), unsigned(srcLane), width, where));
}
template <class T> T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, MOELAB_WHERE) {
  using namespace moelab::sim;
  return from_bits<T>(wait_at(Barrier::shfl_up, mask, to_bits(var), delta, width, where));
}
template <class T> T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, MOELAB_WHERE) {
  using namespace moelab::sim;
  return from_bits<T>(wait_at(Barrier::shfl_down, mask, to_bits(var), delta, width, where));
}
template <class T> T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, MOELAB_WHERE) {
  using namespace moelab::sim;
  return from_bits<T>(wait_at(Barrier::shfl_xor, mask, to_bits(var), unsigned(laneMask), width, where));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, MOELAB_WHERE) {
  return unsigned(moelab::sim::wait_at(moelab::sim::Barrier::ballot, mask, predicate != 0, 0, 0, where));
}
inline int __any_sync(unsigned mask, int predicate, MOELAB_WHERE) {
  return int(moelab::sim::wait_at(moelab::sim::Barrier::any, mask, predicate != 0, 0, 0, where));
}
inline int __all_sync(unsigned mask, int predicate, MOELAB_WHERE) {
  return int(moelab::sim::wait_at(moelab::sim::Barrier::all, mask, predicate != 0, 0, 0, where));
}
inline unsigned __activemask() { return moelab::sim::active_mask(); }
[[noreturn]] inline void __trap(MOELAB_WHERE) { moelab::sim::trap(where); }
#undef MOELAB_WHERE

// Memory fences order a thread's writes for other threads; the emulator's threads take turns, so there is nothing to
// order.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

// ---- atomics: a thread is never interrupted between two barriers, so a plain read-modify-write is atomic -----------
namespace moelab::sim {
template <class T, class Op> T atomic_update(T* address, Op op) {
  T old = *address;
  *address = op(old);
  return old;
}
}  // namespace moelab::sim
inline int atomicAdd(int* a, int v) {
  return moelab::sim::atomic_update(a, [&](int o) { return o + v; });
}
inline unsigned atomicAdd(unsigned* a, unsigned v) {
  return moelab::sim::atomic_update(a, [&](unsigned o) { return o + v; });
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return moelab::sim::atomic_update(a, [&](unsigned long long o) { return o + v; });
}
inline float atomicAdd(float* a, float v) {
  return moelab::sim::atomic_update(a, [&](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return moelab::sim::atomic_update(a, [&](double o) { return o + v; });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
  return moelab::sim::atomic_update(a, [&](__nv_bfloat16 o) { return __hadd(o, v); });
}
inline int atomicSub(int* a, int v) {
  return moelab::sim::atomic_update(a, [&](int o) { return o - v; });
}
inline unsigned atomicSub(unsigned* a, unsigned v) {
  return moelab::sim::atomic_update(a, [&](unsigned o) { return o - v; });
}
template <class T> T atomicMax(T* a, T v) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMax takes integers");
  return moelab::sim::atomic_update(a, [&](T o) { return o < v ? v : o; });
}
template <class T> T atomicMin(T* a, T v) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMin takes integers");
  return moelab::sim::atomic_update(a, [&](T o) { return v < o ? v : o; });
}
template <class T> T atomicExch(T* a, T v) {
  return moelab::sim::atomic_update(a, [&](T) { return v; });
}
template <class T> T atomicCAS(T* a, T compare, T v) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicCAS takes integers");
  return moelab::sim::atomic_update(a, [&](T o) { return o == compare ? v : o; });
}
template <class T> T atomicAnd(T* a, T v) {
  return moelab::sim::atomic_update(a, [&](T o) { return T(o & v); });
}
template <class T> T atomicOr(T* a, T v) {
  return moelab::sim::atomic_update(a, [&](T o) { return T(o | v); });
}
template <class T> T atomicXor(T* a, T v) {
  return moelab::sim::atomic_update(a, [&](T o) { return T(o ^ v); });
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return moelab::sim::atomic_update(a, [&](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return moelab::sim::atomic_update(a, [&](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}

// ---- intrinsics: the fast/approximate ones computed exactly (kernels' tolerances must hold for nvcc's versions) ----
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x), *c = std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
// The _rn arithmetic exists on the GPU to keep nvcc from fusing a * b + c; g++ in ISO C++ mode does not fuse either.
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dsub_rn(double x, double y) { return x - y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __ddiv_rn(double x, double y) { return x / y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0, as on the GPU
inline float __int_as_float(int x) { return moelab::sim::from_bits<float>(uint32_t(x)); }
inline int __float_as_int(float x) { return int(uint32_t(moelab::sim::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return moelab::sim::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return unsigned(moelab::sim::to_bits(x)); }
inline double __longlong_as_double(long long x) { return moelab::sim::from_bits<double>(uint64_t(x)); }
inline long long __double_as_longlong(double x) { return (long long)moelab::sim::to_bits(x); }
// Conversions to integers saturate, and NaN gives 0, as on the GPU (in C++ both would be undefined).
namespace moelab::sim {
template <class Int> Int saturate(double rounded) {
  if (std::isnan(rounded)) return 0;
  if (rounded <= double(std::numeric_limits<Int>::min())) return std::numeric_limits<Int>::min();
  if (rounded >= double(std::numeric_limits<Int>::max())) return std::numeric_limits<Int>::max();
  return Int(rounded);
}
}  // namespace moelab::sim
inline int __float2int_rn(float x) { return moelab::sim::saturate<int>(std::nearbyint(x)); }  // ties to even
inline int __float2int_rz(float x) { return moelab::sim::saturate<int>(std::trunc(x)); }
inline int __float2int_rd(float x) { return moelab::sim::saturate<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return moelab::sim::saturate<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return moelab::sim::saturate<unsigned>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned reversed = 0;
  for (int bit = 0; bit < 32; ++bit) reversed |= ((x >> bit) & 1u) << (31 - bit);
  return reversed;
}
inline unsigned __umulhi(unsigned x, unsigned y) { return unsigned((uint64_t(x) * y) >> 32); }
inline int __mulhi(int x, int y) { return int((int64_t(x) * y) >> 32); }
template <class T> T __ldg(const T* address) { return *address; }
// Device code's min and max, on any two arithmetic types as CUDA's overloads take them (the common type; floats as
// fminf/fmaxf, which skip a NaN).
template <class A, class B>
requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B> std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<T>) {
    return std::fmin(T(a), T(b));
  } else {
    return T(b) < T(a) ? T(b) : T(a);
  }
}
template <class A, class B>
requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B> std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<T>) {
    return std::fmax(T(a), T(b));
  } else {
    return T(a) < T(b) ? T(b) : T(a);
  }
}

// ---- bf16 math that cuda_bf16.h defines for the device only: computed in double, rounded once to bf16 -------------
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __double2bfloat16(double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __nv_bfloat162(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
inline __nv_bfloat16 __hfma_relu(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  __nv_bfloat16 r = __hfma(a, b, c);
  return __hgt(r, __float2bfloat16(0.0f)) || __hisnan(r) ? r : __float2bfloat16(0.0f);
}
#define MOELAB_BF16_MATH(name, name2, expression) \
  inline __nv_bfloat16 name(__nv_bfloat16 h) {    \
    double x = __bfloat162float(h);               \
    return __double2bfloat16(expression);         \
  }                                               \
  inline __nv_bfloat162 name2(__nv_bfloat162 h) { return __nv_bfloat162(name(h.x), name(h.y)); }
MOELAB_BF16_MATH(hexp, h2exp, std::exp(x))
MOELAB_BF16_MATH(hexp2, h2exp2, std::exp2(x))
MOELAB_BF16_MATH(hexp10, h2exp10, std::pow(10.0, x))
MOELAB_BF16_MATH(hlog, h2log, std::log(x))
MOELAB_BF16_MATH(hlog2, h2log2, std::log2(x))
MOELAB_BF16_MATH(hlog10, h2log10, std::log10(x))
MOELAB_BF16_MATH(hsqrt, h2sqrt, std::sqrt(x))
MOELAB_BF16_MATH(hrsqrt, h2rsqrt, 1.0 / std::sqrt(x))
MOELAB_BF16_MATH(hrcp, h2rcp, 1.0 / x)
MOELAB_BF16_MATH(htanh, h2tanh, std::tanh(x))
MOELAB_BF16_MATH(hsin, h2sin, std::sin(x))
MOELAB_BF16_MATH(hcos, h2cos, std::cos(x))
MOELAB_BF16_MATH(hfloor, h2floor, std::floor(x))
MOELAB_BF16_MATH(hceil, h2ceil, std::ceil(x))
MOELAB_BF16_MATH(htrunc, h2trunc, std::trunc(x))
MOELAB_BF16_MATH(hrint, h2rint, std::nearbyint(x))
#undef MOELAB_BF16_MATH
inline int __bfloat162int_rn(__nv_bfloat16 h) {
  return moelab::sim::saturate<int>(std::nearbyint(__bfloat162float(h)));
}
inline int __bfloat162int_rd(__nv_bfloat16 h) { return moelab::sim::saturate<int>(std::floor(__bfloat162float(h))); }
inline int __bfloat162int_ru(__nv_bfloat16 h) { return moelab::sim::saturate<int>(std::ceil(__bfloat162float(h))); }
