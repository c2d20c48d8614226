#pragma once
// Element types and devices.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "engine/enum_names.h"
#include "engine/error.h"

namespace moelab {

// f32: what the model computes and keeps (master weights, optimizer state, norms, softmax, losses).
// bf16: the operands of matrix products under mixed precision (products accumulate in f32).
// f64: gradient checks and a few exact sums. i32: token ids, expert ids, indices.
enum class DType : uint8_t { F32, F64, I32, BF16 };

// bfloat16 on the host: the top 16 bits of an f32 (8 exponent bits, 7 mantissa bits). Same layout as CUDA's
// __nv_bfloat16, so kernels read a bf16 tensor's memory as either.
struct bf16 {
  uint16_t bits = 0;
};
// Round to nearest, ties to even (CUDA's __float2bfloat16_rn); NaN stays a (quiet) NaN.
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t lsb = (u >> 16) & 1u;
  return bf16{static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16)};
}
inline float to_float(bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

enum class Device : uint8_t { CPU, CUDA };
constexpr EnumNames<Device, 2> enum_names(Device) { return {{{Device::CPU, "cpu"}, {Device::CUDA, "cuda"}}}; }

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: return 8;
    case DType::BF16: return 2;
    default: return 4;
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::I32: return "i32";
    case DType::BF16: return "bf16";
  }
  return "?";
}

// Maps a C++ element type to its DType (for typed data access and templated kernels).
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }

// Calls f(T{}) with T = float or double according to a floating dtype.
template <class F> decltype(auto) dispatch_float(const char* op, DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    default: fail("{}: needs f32 or f64, got {}", op, dtype_name(dtype));
  }
}

// Calls f(T{}) with T = float, double or int32_t (bf16 tensors: only the ops that name it support them).
template <class F> decltype(auto) dispatch_all(const char* op, DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::I32: return f(int32_t{});
    default: fail("{}: needs f32, f64 or i32, got {}", op, dtype_name(dtype));
  }
}

}  // namespace moelab
