// CPU kernels of engine/kernels/shape.h: permuting copies, blocks of columns, dtype conversion.
#include "engine/kernels/shape.h"

#include <cstring>

#include "engine/cpu/parallel.h"

namespace moelab::cpu {

namespace {

template <class T> void permute_rows(const T* in, T* out, const Shape& in_shape, const std::vector<int64_t>& dims) {
  int64_t ndim = static_cast<int64_t>(in_shape.size());
  std::vector<int64_t> in_strides(ndim, 1);
  for (int64_t d = ndim - 2; d >= 0; --d) in_strides[d] = in_strides[d + 1] * in_shape[d + 1];
  Shape out_shape(ndim);
  std::vector<int64_t> stride_of_out(ndim);  // input stride of each output dim
  for (int64_t d = 0; d < ndim; ++d) out_shape[d] = in_shape[dims[d]], stride_of_out[d] = in_strides[dims[d]];
  int64_t inner = ndim ? out_shape[ndim - 1] : 1, inner_stride = ndim ? stride_of_out[ndim - 1] : 1;
  int64_t rows = inner ? shape_numel(out_shape) / inner : 0;
  parallel_for(rows, inner, [&](int64_t r) {
    // Input offset of output row r: decompose r over the outer output dims.
    int64_t rem = r, src = 0;
    for (int64_t d = ndim - 2; d >= 0; --d) src += (rem % out_shape[d]) * stride_of_out[d], rem /= out_shape[d];
    T* dst = out + r * inner;
    for (int64_t i = 0; i < inner; ++i) dst[i] = in[src + i * inner_stride];
  });
}

template <class From, class To, class Convert> void convert_each(const Tensor& x, const Tensor& out, Convert convert) {
  const From* in = x.data<From>();
  To* o = out.data<To>();
  parallel_for(x.numel(), 1, [&](int64_t i) { o[i] = convert(in[i]); });
}

}  // namespace

void permute_copy(const Tensor& x, const std::vector<int64_t>& dims, const Tensor& out) {
  dispatch_all("permute", x.dtype(), [&](auto t) {
    using T = decltype(t);
    permute_rows<T>(x.data<T>(), out.data<T>(), x.shape(), dims);
  });
}

void copy_columns(const Tensor& src, int64_t src_row, int64_t src_col, const Tensor& dst, int64_t dst_row,
                  int64_t dst_col, int64_t outer, int64_t width) {
  if (outer == 0 || width == 0) return;  // empty tensors may have no storage at all
  size_t elem = dtype_size(src.dtype());
  const char* s = static_cast<const char*>(src.raw_data());
  char* d = static_cast<char*>(dst.raw_data());
  parallel_for(outer, width, [&](int64_t r) {
    std::memcpy(d + (r * dst_row + dst_col) * elem, s + (r * src_row + src_col) * elem, width * elem);
  });
}

void convert_dtype(const Tensor& x, const Tensor& out) {
  if (x.dtype() == DType::BF16) {
    dispatch_float("to_dtype", out.dtype(), [&](auto to) {
      using To = decltype(to);
      convert_each<bf16, To>(x, out, [](bf16 v) { return static_cast<To>(to_float(v)); });
    });
  } else if (out.dtype() == DType::BF16) {
    dispatch_float("to_dtype", x.dtype(), [&](auto from) {
      using From = decltype(from);
      convert_each<From, bf16>(x, out, [](From v) { return to_bf16(static_cast<float>(v)); });
    });
  } else {
    dispatch_all("to_dtype", x.dtype(), [&](auto from) {
      dispatch_all("to_dtype", out.dtype(), [&](auto to) {
        using From = decltype(from);
        using To = decltype(to);
        convert_each<From, To>(x, out, [](From v) { return static_cast<To>(v); });
      });
    });
  }
}

}  // namespace moelab::cpu
