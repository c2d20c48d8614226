// CUDA kernels of engine/kernels/pointwise.h. Every kernel is one grid-stride loop over the output elements, applying
// a functor of engine/kernels/pointwise_math.h (the same math as the CPU kernels, engine/cpu/pointwise.cpp). T is the
// element type (float or double), Op the functor.
#include "engine/kernels/pointwise.h"

#include "engine/cuda/device.cuh"

namespace moelab::cuda {

constexpr int kThreads = 256;
constexpr unsigned kMaxBlocks = 4096;  // beyond this the grid-stride loop covers the rest

// Blocks for a grid-stride loop over n elements.
static dim3 grid_for(int64_t n) {
  const unsigned blocks = blocks_for(n, kThreads);
  return dim3(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---- unary ----------------------------------------------------------------------------------------------------------

template <class T, class Op> __global__ void unary_forward_kernel(const T* x, int64_t n, Op op, T* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = op.forward(x[i]);
}

template <class T, class Op>
__global__ void unary_backward_kernel(const T* g, const T* saved, int64_t n, Op op, T* dx) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dx[i] = op.backward(g[i], saved[i]);
}

void unary_forward(UnaryOp op, const Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  dispatch_float(enum_name(op), x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    with_unary_op(op, [&](auto f) {
      launch("unary_forward", unary_forward_kernel<T, decltype(f)>, grid_for(n), dim3(kThreads), 0, x.data<T>(), n, f,
             y.data<T>());
    });
  });
}

void unary_backward(UnaryOp op, const Tensor& g, const Tensor& saved, const Tensor& dx) {
  const int64_t n = g.numel();
  dispatch_float(enum_name(op), g.dtype(), [&](auto tag) {
    using T = decltype(tag);
    with_unary_op(op, [&](auto f) {
      launch("unary_backward", unary_backward_kernel<T, decltype(f)>, grid_for(n), dim3(kThreads), 0, g.data<T>(),
             saved.data<T>(), n, f, dx.data<T>());
    });
  });
}

// ---- binary ---------------------------------------------------------------------------------------------------------

// Where output element i reads its operands: out's dims innermost first, each with a's and b's element strides (0
// where broadcast). Adjacent dims that both operands walk contiguously are merged, and dims of size 1 dropped, so the
// usual cases (same shapes, a row broadcast over a matrix) have one or two dims.
constexpr int kMaxDims = 8;

struct BroadcastIndex {
  int ndim = 0;
  int64_t size[kMaxDims];
  int64_t stride_a[kMaxDims];
  int64_t stride_b[kMaxDims];

  __device__ void offsets(int64_t i, int64_t& offset_a, int64_t& offset_b) const {
    offset_a = 0, offset_b = 0;
    for (int d = 0; d < ndim; ++d) {
      const int64_t idx = i % size[d];
      i /= size[d];
      offset_a += idx * stride_a[d];
      offset_b += idx * stride_b[d];
    }
  }
};

static BroadcastIndex broadcast_index(const Shape& a, const Shape& b, const Shape& out) {
  const std::vector<int64_t> sa = broadcast_strides(a, out), sb = broadcast_strides(b, out);
  BroadcastIndex index;
  for (int64_t d = static_cast<int64_t>(out.size()) - 1; d >= 0; --d) {
    if (out[d] == 1) continue;  // index 0 only: adds nothing to an offset
    const int k = index.ndim - 1;
    if (k >= 0 && sa[d] == index.stride_a[k] * index.size[k] && sb[d] == index.stride_b[k] * index.size[k]) {
      index.size[k] *= out[d];  // dim d continues dim k for both operands
      continue;
    }
    if (index.ndim == kMaxDims)
      fail("broadcast: more than {} dims that cannot be merged in {}, {} -> {}", kMaxDims, shape_str(a), shape_str(b),
           shape_str(out));
    index.size[index.ndim] = out[d];
    index.stride_a[index.ndim] = sa[d];
    index.stride_b[index.ndim] = sb[d];
    ++index.ndim;
  }
  return index;
}

template <class T, class Op>
__global__ void binary_kernel(const T* a, const T* b, BroadcastIndex index, int64_t n, Op op, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t offset_a, offset_b;
    index.offsets(i, offset_a, offset_b);
    out[i] = op(a[offset_a], b[offset_b]);
  }
}

// out = op(a, b) broadcast; the callers dispatch the element type T.
template <class T, class Op> static void launch_binary(const Tensor& a, const Tensor& b, const Tensor& out, Op op) {
  const int64_t n = out.numel();
  launch("binary", binary_kernel<T, Op>, grid_for(n), dim3(kThreads), 0, a.data<T>(), b.data<T>(),
         broadcast_index(a.shape(), b.shape(), out.shape()), n, op, out.data<T>());
}

void binary_forward(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  dispatch_float(enum_name(op), a.dtype(),
                 [&](auto tag) { with_binary_op(op, [&](auto f) { launch_binary<decltype(tag)>(a, b, out, f); }); });
}

// out = x op s (scalar_left false) or s op x (true).
template <class T, class Op>
__global__ void scalar_kernel(const T* x, T s, bool scalar_left, int64_t n, Op op, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = scalar_left ? op(s, x[i]) : op(x[i], s);
}

void scalar_forward(BinaryOp op, const Tensor& x, double s, ScalarSide side, const Tensor& out) {
  const int64_t n = x.numel();
  dispatch_float(enum_name(op), x.dtype(), [&](auto tag) {
    using T = decltype(tag);
    with_binary_op(op, [&](auto f) {
      launch("scalar", scalar_kernel<T, decltype(f)>, grid_for(n), dim3(kThreads), 0, x.data<T>(), static_cast<T>(s),
             side == ScalarSide::left, n, f, out.data<T>());
    });
  });
}

// expand is the binary kernel with x on both sides, keeping the first.
struct KeepFirst {
  template <class T> __device__ T operator()(T a, T) const { return a; }
};

void expand_forward(const Tensor& x, const Tensor& out) {
  dispatch_float("expand", x.dtype(), [&](auto tag) { launch_binary<decltype(tag)>(x, x, out, KeepFirst{}); });
}

}  // namespace moelab::cuda
