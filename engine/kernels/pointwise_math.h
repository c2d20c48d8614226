#pragma once
// The elementwise math of engine/kernels/pointwise.h, written once for both backends: each operation is a functor
// whose members compile for the host (engine/cpu/pointwise.cpp) and for the device (engine/cuda/pointwise.cu). An op
// names its operation with an enum; with_unary_op / with_binary_op turn the enum into the functor once per call, so
// the loops run on a known functor (no switch per element). The CPU functors are the expressions the ops always
// computed (same std:: calls, same order): CPU results are bit-identical to the lambdas they replace. Under nvcc the
// std:: math functions have device overloads for float and double.
#include <cmath>

#include "engine/enum_names.h"
#include "engine/error.h"
#include "engine/host_device.h"

namespace moelab {

// ---- unary: y = forward(x); dx = backward(g, s), where s is what `reads` names --------------------------------------

enum class UnaryOp { neg, exp, log, sqrt, rsqrt, square, tanh, sigmoid, silu };
constexpr EnumNames<UnaryOp, 9> enum_names(UnaryOp) {
  return {{{UnaryOp::neg, "neg"},
           {UnaryOp::exp, "exp"},
           {UnaryOp::log, "log"},
           {UnaryOp::sqrt, "sqrt"},
           {UnaryOp::rsqrt, "rsqrt"},
           {UnaryOp::square, "square"},
           {UnaryOp::tanh, "tanh"},
           {UnaryOp::sigmoid, "sigmoid"},
           {UnaryOp::silu, "silu"}}};
}

// What a unary op's backward reads besides g: the forward's input x, its output y, or neither (a constant derivative).
enum class BackwardReads { input, output, neither };

namespace pointwise {

struct Neg {
  static constexpr BackwardReads reads = BackwardReads::neither;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return -v; }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T) const { return -g; }
};

struct Exp {
  static constexpr BackwardReads reads = BackwardReads::output;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return std::exp(v); }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T y) const { return g * y; }  // dy/dx = y
};

struct Log {
  static constexpr BackwardReads reads = BackwardReads::input;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return std::log(v); }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T x) const { return g / x; }  // 1/x
};

struct Sqrt {
  static constexpr BackwardReads reads = BackwardReads::output;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return std::sqrt(v); }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T y) const { return g / (2 * y); }  // 1/(2 sqrt x)
};

struct Rsqrt {
  static constexpr BackwardReads reads = BackwardReads::output;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return 1 / std::sqrt(v); }
  // d(x^-1/2)/dx = -x^-3/2 / 2 = -y^3 / 2
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T y) const { return g * y * y * y * static_cast<T>(-0.5); }
};

struct Square {
  static constexpr BackwardReads reads = BackwardReads::input;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return v * v; }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T x) const { return 2 * g * x; }
};

struct Tanh {
  static constexpr BackwardReads reads = BackwardReads::output;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return std::tanh(v); }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T y) const { return g * (1 - y * y); }  // 1 - y^2
};

// 1 / (1 + e^-v): the expression of cpu::sigmoid (engine/cpu/math.h), which is host-only.
template <class T> MOELAB_HOST_DEVICE T logistic(T v) { return 1 / (1 + std::exp(-v)); }

struct Sigmoid {
  static constexpr BackwardReads reads = BackwardReads::output;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return logistic(v); }
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T y) const { return g * y * (1 - y); }  // y (1 - y)
};

struct Silu {
  static constexpr BackwardReads reads = BackwardReads::input;
  template <class T> MOELAB_HOST_DEVICE T forward(T v) const { return v * logistic(v); }
  // d(x s)/dx = s + x s (1 - s) = s (1 + x (1 - s)),  s = sigmoid(x)
  template <class T> MOELAB_HOST_DEVICE T backward(T g, T x) const {
    T s = logistic(x);
    return g * s * (1 + x * (1 - s));
  }
};

}  // namespace pointwise

// Calls fn(functor) with the functor of `op` (host code: the kernels' launchers and loops).
template <class Fn> decltype(auto) with_unary_op(UnaryOp op, Fn&& fn) {
  switch (op) {
    case UnaryOp::neg: return fn(pointwise::Neg{});
    case UnaryOp::exp: return fn(pointwise::Exp{});
    case UnaryOp::log: return fn(pointwise::Log{});
    case UnaryOp::sqrt: return fn(pointwise::Sqrt{});
    case UnaryOp::rsqrt: return fn(pointwise::Rsqrt{});
    case UnaryOp::square: return fn(pointwise::Square{});
    case UnaryOp::tanh: return fn(pointwise::Tanh{});
    case UnaryOp::sigmoid: return fn(pointwise::Sigmoid{});
    case UnaryOp::silu: return fn(pointwise::Silu{});
  }
  fail("unknown UnaryOp {}", static_cast<int>(op));
}

inline BackwardReads backward_reads(UnaryOp op) {
  return with_unary_op(op, [](auto f) { return decltype(f)::reads; });
}

// ---- binary: out = a op b (the backward of each is a composition of ops, engine/ops/pointwise.cpp) -----------------

enum class BinaryOp { add, sub, mul, div };
constexpr EnumNames<BinaryOp, 4> enum_names(BinaryOp) {
  return {{{BinaryOp::add, "add"}, {BinaryOp::sub, "sub"}, {BinaryOp::mul, "mul"}, {BinaryOp::div, "div"}}};
}

namespace pointwise {

struct Add {
  template <class T> MOELAB_HOST_DEVICE T operator()(T a, T b) const { return a + b; }
};
struct Sub {
  template <class T> MOELAB_HOST_DEVICE T operator()(T a, T b) const { return a - b; }
};
struct Mul {
  template <class T> MOELAB_HOST_DEVICE T operator()(T a, T b) const { return a * b; }
};
struct Div {
  template <class T> MOELAB_HOST_DEVICE T operator()(T a, T b) const { return a / b; }
};

}  // namespace pointwise

template <class Fn> decltype(auto) with_binary_op(BinaryOp op, Fn&& fn) {
  switch (op) {
    case BinaryOp::add: return fn(pointwise::Add{});
    case BinaryOp::sub: return fn(pointwise::Sub{});
    case BinaryOp::mul: return fn(pointwise::Mul{});
    case BinaryOp::div: return fn(pointwise::Div{});
  }
  fail("unknown BinaryOp {}", static_cast<int>(op));
}

}  // namespace moelab
