// CUDA kernels of engine/kernels/shape.h: permuting copies, blocks of columns, dtype conversion. One thread per
// output element; each reads the one input element it needs, so there is nothing to reduce and nothing to order.
#include "engine/kernels/shape.h"

#include <type_traits>

#include "engine/cuda/device.cuh"

namespace moelab::cuda {

constexpr int kThreads = 256;

// ---- permute ----------------------------------------------------------------------------------------------------------

// Up to kMaxDims dims, passed by value: the output's shape and, for each output dim, the input's stride along it.
constexpr int kMaxDims = 8;
struct PermuteLayout {
  int ndim;
  int64_t out_shape[kMaxDims];
  int64_t in_stride[kMaxDims];
};

template <class T> __global__ void permute_kernel(const T* in, int64_t n, PermuteLayout L, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int64_t rem = i, src = 0;  // i's coordinates over the output dims, walked from the last, give its input offset
  for (int d = L.ndim - 1; d >= 0; --d) {
    src += (rem % L.out_shape[d]) * L.in_stride[d];
    rem /= L.out_shape[d];
  }
  out[i] = in[src];
}

void permute_copy(const Tensor& x, const std::vector<int64_t>& dims, const Tensor& out) {
  const int ndim = static_cast<int>(x.dim());
  if (ndim > kMaxDims) fail("permute: at most {} dims on the GPU, got {}", kMaxDims, x.str());
  PermuteLayout L{ndim, {}, {}};
  int64_t stride = 1;
  int64_t in_strides[kMaxDims];
  for (int d = ndim - 1; d >= 0; --d) in_strides[d] = stride, stride *= x.size(d);
  for (int d = 0; d < ndim; ++d) L.out_shape[d] = x.size(dims[d]), L.in_stride[d] = in_strides[dims[d]];
  const int64_t n = x.numel();
  dispatch_all("permute", x.dtype(), [&](auto t) {
    using T = decltype(t);
    launch("permute", permute_kernel<T>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, x.data<T>(), n, L,
           out.data<T>());
  });
}

// ---- blocks of columns ----------------------------------------------------------------------------------------------

// Calls f(W{}) with W an unsigned integer as wide as one element: copies move elements as words of that size.
template <class F> static void with_element_word(DType dtype, F&& f) {
  switch (dtype_size(dtype)) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    default: f(uint64_t{}); break;
  }
}

template <class W>
__global__ void copy_columns_kernel(const W* src, int64_t src_row, int64_t src_col, W* dst, int64_t dst_row,
                                    int64_t dst_col, int64_t outer, int64_t width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= outer * width) return;
  const int64_t r = i / width, c = i % width;
  dst[r * dst_row + dst_col + c] = src[r * src_row + src_col + c];
}

void copy_columns(const Tensor& src, int64_t src_row, int64_t src_col, const Tensor& dst, int64_t dst_row,
                  int64_t dst_col, int64_t outer, int64_t width) {
  with_element_word(src.dtype(), [&](auto word) {
    using W = decltype(word);
    launch("copy_columns", copy_columns_kernel<W>, dim3(blocks_for(outer * width, kThreads)), dim3(kThreads), 0,
           static_cast<const W*>(src.raw_data()), src_row, src_col, static_cast<W*>(dst.raw_data()), dst_row, dst_col,
           outer, width);
  });
}

// ---- dtype conversion -----------------------------------------------------------------------------------------------
// bf16 is __nv_bfloat16 here (the same 16 bits as engine/dtype.h's bf16). Numbers convert with CUDA's round-to-nearest-
// even conversions, which agree with to_bf16 / to_float bit for bit; a NaN is built by hand with its sign and leading
// payload bits and the quiet bit, as the CPU's conversions leave it (CUDA's would give the canonical NaN 0x7fff).

__device__ inline __nv_bfloat16 bf16_from(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16(static_cast<unsigned short>((u >> 16) | 0x40u));
  return __float2bfloat16_rn(f);
}

// Through f32, as the CPU does (two roundings, not one).
__device__ inline __nv_bfloat16 bf16_from(double d) {
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(d));
  if (d != d)
    return __ushort_as_bfloat16(static_cast<unsigned short>(((u >> 48) & 0x8000u) | 0x7fc0u | ((u >> 45) & 0x7fu)));
  return bf16_from(static_cast<float>(d));
}

__device__ inline bool is_nan_bits(__nv_bfloat16 b) { return (__bfloat16_as_ushort(b) & 0x7fffu) > 0x7f80u; }

// out = static_cast<To>(in) among float, double and int32_t; the overloads below for bf16.
template <class From, class To> __device__ inline void convert_one(From in, To& out) { out = static_cast<To>(in); }
__device__ inline void convert_one(float in, __nv_bfloat16& out) { out = bf16_from(in); }
__device__ inline void convert_one(double in, __nv_bfloat16& out) { out = bf16_from(in); }
__device__ inline void convert_one(__nv_bfloat16 in, float& out) {
  const uint32_t h = __bfloat16_as_ushort(in);
  out = is_nan_bits(in) ? __uint_as_float(h << 16) : __bfloat162float(in);
}
__device__ inline void convert_one(__nv_bfloat16 in, double& out) {
  const uint64_t h = __bfloat16_as_ushort(in);
  out = is_nan_bits(in) ? __longlong_as_double(static_cast<long long>(((h & 0x8000u) << 48) | 0x7ff8000000000000ull |
                                                                      ((h & 0x7fu) << 45)))
                        : static_cast<double>(__bfloat162float(in));
}

template <class From, class To> __global__ void convert_kernel(const From* in, int64_t n, To* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) convert_one(in[i], out[i]);
}

template <class T> static auto device_data(const Tensor& t) {
  if constexpr (std::is_same_v<T, bf16>)
    return reinterpret_cast<__nv_bfloat16*>(t.data<bf16>());
  else
    return t.data<T>();
}

template <class From, class To> static void launch_convert(const Tensor& x, const Tensor& out) {
  const int64_t n = x.numel();
  using DeviceFrom = std::remove_pointer_t<decltype(device_data<From>(x))>;
  using DeviceTo = std::remove_pointer_t<decltype(device_data<To>(out))>;
  launch("convert_dtype", convert_kernel<DeviceFrom, DeviceTo>, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0,
         device_data<From>(x), n, device_data<To>(out));
}

void convert_dtype(const Tensor& x, const Tensor& out) {
  if (x.dtype() == DType::BF16) {
    dispatch_float("to_dtype", out.dtype(), [&](auto to) { launch_convert<bf16, decltype(to)>(x, out); });
  } else if (out.dtype() == DType::BF16) {
    dispatch_float("to_dtype", x.dtype(), [&](auto from) { launch_convert<decltype(from), bf16>(x, out); });
  } else {
    dispatch_all("to_dtype", x.dtype(), [&](auto from) {
      dispatch_all("to_dtype", out.dtype(), [&](auto to) { launch_convert<decltype(from), decltype(to)>(x, out); });
    });
  }
}

}  // namespace moelab::cuda
