#pragma once
// Reductions over a warp and over a block, for kernels that give one row to one block. Each sums in a fixed order
// for a given block size, so a kernel's result does not change from run to run.
#include <cmath>

#include "engine/cuda/device.cuh"

namespace moelab::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <class T> __device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <class T> __device__ __forceinline__ T warp_max(T v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// The sum (or max) of v over the block's threads, returned to every thread. blockDim.x must be a multiple of 32 (at
// most 1024) and every thread of the block must call it.
template <class T> __device__ T block_sum(T v) {
  SHARED_ARRAY(T, partial, 32);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = warp_sum(lane < warps ? partial[lane] : T(0));
  __syncthreads();  // partial is free again for the next call
  return total;
}

template <class T> __device__ T block_max(T v) {
  SHARED_ARRAY(T, partial, 32);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = warp_max(lane < warps ? partial[lane] : -INFINITY);
  __syncthreads();
  return total;
}

}  // namespace moelab::cuda
