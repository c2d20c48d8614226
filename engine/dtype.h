#pragma once
// Element types and devices.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/enum_names.h"
#include "engine/error.h"

namespace moelab {

// f32: everything the model computes. f64: CPU only, for gradient checks. i32: token ids, expert ids, indices.
enum class DType : uint8_t { F32, F64, I32 };

enum class Device : uint8_t { CPU, CUDA };
constexpr EnumNames<Device, 2> enum_names(Device) { return {{{Device::CPU, "cpu"}, {Device::CUDA, "cuda"}}}; }

inline size_t dtype_size(DType t) { return t == DType::F64 ? 8 : 4; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F64: return "f64";
    case DType::I32: return "i32";
  }
  return "?";
}

// Maps a C++ element type to its DType (for typed data access and templated kernels).
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }

// Calls f(T{}) with T = float or double according to a floating dtype.
template <class F> decltype(auto) dispatch_float(const char* op, DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    default: fail("{}: needs f32 or f64, got {}", op, dtype_name(dtype));
  }
}

// Calls f(T{}) with T = float, double or int32_t.
template <class F> decltype(auto) dispatch_all(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    default: return f(int32_t{});
  }
}

}  // namespace moelab
