#pragma once
// The kernels behind engine/ops/shape.cpp: the copies that move elements (permute, blocks of columns for concat and
// split) and dtype conversion. CPU: engine/cpu/shape.cpp; CUDA: engine/cuda/shape.cu. Views (reshape, slice_rows)
// need no kernel, and whole-tensor copies (clone, copy_, to_device) are memory copies (engine/cuda/runtime.h).
#include <vector>

#include "engine/kernels.h"

namespace moelab {

// out = x with its dims reordered: out dim d is x dim dims[d], out.shape[d] = x.shape[dims[d]] (f32, f64 or i32).
DECLARE_KERNEL(permute_copy, (const Tensor& x, const std::vector<int64_t>& dims, const Tensor& out))

// With src viewed as rows of src_row elements and dst as rows of dst_row elements: for each of the `outer` rows r,
// dst[r * dst_row + dst_col, + width) = src[r * src_row + src_col, + width). Any dtype (the bytes are copied).
DECLARE_KERNEL(copy_columns, (const Tensor& src, int64_t src_row, int64_t src_col, const Tensor& dst, int64_t dst_row,
                              int64_t dst_col, int64_t outer, int64_t width))

// out[i] = x[i] converted to out's dtype. Among f32, f64 and i32 a C++ static_cast (float -> i32 truncates toward
// zero); bf16 converts to and from f32 and f64 as engine/dtype.h's to_bf16 / to_float do: round to nearest even, f64
// through f32, and a NaN keeps its sign and leading payload bits, quieted (on a GPU too, whose own conversion would
// give its canonical NaN). Bit-identical on both devices, except that a NaN converted between f32 and f64 on a GPU
// may come out as another NaN.
DECLARE_KERNEL(convert_dtype, (const Tensor& x, const Tensor& out))

}  // namespace moelab
