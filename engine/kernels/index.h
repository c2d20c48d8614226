#pragma once
// The kernels behind engine/ops/index.cpp: selecting and adding slices or elements by i32 indices, the elementwise
// choice of where / masked_fill, and the no-grad orderings and counts (topk, argsort, bincount). CPU:
// engine/cpu/index.cpp; CUDA: engine/cuda/index.cu. The ops check every index before calling them.
//
// An op along `dim` views a tensor as [outer, n, inner] (outer: the dims before dim, inner: the dims after), so one
// slice along dim is `inner` contiguous elements. Wherever indices repeat, the additions into one element happen in
// increasing index position, one after the other, on both devices: the results are the same bits on CPU and GPU and
// from run to run (no floating-point atomics).
#include "engine/kernels.h"

namespace moelab {

// ---- slices along dim ---------------------------------------------------------------------------------------------
// dst [outer, n, inner] = src [outer, src_n, inner] at rows index[0..n) (n = index.numel()):
// dst[o, j, :] = src[o, index[j], :]. Any dtype (elements are copied as they are).
DECLARE_KERNEL(select_slices,
               (const Tensor& src, int64_t outer, int64_t src_n, int64_t inner, const Tensor& index, const Tensor& dst))
// In place: dst [outer, dst_n, inner] at rows index[0..n) += src [outer, n, inner] (n = index.numel()):
// dst[o, index[j], :] += src[o, j, :] (f32, f64 or i32).
DECLARE_KERNEL(add_slices,
               (const Tensor& dst, int64_t outer, int64_t dst_n, int64_t inner, const Tensor& index, const Tensor& src))

// ---- elements along dim (torch's gather / scatter_add) ------------------------------------------------------------
// index has x's rank and is no larger than x off dim; position p = (coordinates c) of index addresses x at c with
// c[dim] replaced by index[p]. out (shaped like index) = x at those addresses (f32, f64 or i32).
DECLARE_KERNEL(gather_elements, (const Tensor& x, int64_t dim, const Tensor& index, const Tensor& out))
// In place: dst at the address of each position p of index += src[p] (src shaped like index; f32, f64 or i32).
DECLARE_KERNEL(scatter_add_elements, (const Tensor& dst, int64_t dim, const Tensor& index, const Tensor& src))

// ---- where ----------------------------------------------------------------------------------------------------------
// out = cond ? a : b elementwise, cond (i32, nonzero = true), a and b broadcast (NumPy rules) to out's shape (f32, f64
// or i32; a and b share the dtype).
DECLARE_KERNEL(select_where, (const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out))

// ---- orderings and counts (no grad) ---------------------------------------------------------------------------------
// Over the last dim of x (rows of n): values and indices [rows, k] = the k largest of each row, descending, equal
// values by lower index first; NaN ranks above everything and NaNs tie among themselves (as torch ranks them).
DECLARE_KERNEL(topk_rows, (const Tensor& x, int64_t k, const Tensor& values, const Tensor& indices))
// out [rows, n] (i32) = the stable order of each row: ascending or descending as above, equal values by index.
DECLARE_KERNEL(argsort_rows, (const Tensor& x, bool descending, const Tensor& out))
// counts[b] += number of ids equal to b; counts (i32 [bins]) starts zeroed and every id lies in [0, bins).
DECLARE_KERNEL(count_ids, (const Tensor& ids, const Tensor& counts))

}  // namespace moelab
