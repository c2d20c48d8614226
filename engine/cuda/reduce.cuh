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
// block_sum on a given scratch array of 32 shared values: for a kernel that sums in a loop, which declares the array
// once at its top (the emulator takes each shared array's declaration once per thread, kernel and block).
template <class T> __device__ T block_sum(T v, T* partial) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = warp_sum(lane < warps ? partial[lane] : T(0));
  __syncthreads();  // partial is free again for the next call
  return total;
}
template <class T> __device__ T block_sum(T v) {
  SHARED_ARRAY(T, partial, 32);
  return block_sum(v, partial);
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

// Row-wise kernels whose rows may be short (the router's softmax over 16 or 32 experts) give each row a team: a
// warp when the row has at most 32 entries (blockDim (32, rows per block): no shared memory, no barrier), else the
// whole block (blockDim (threads, 1)). A block of 256 threads for 16 entries would leave 240 idle and pay two
// barriers per reduction, for each of 16k rows. The team's row is blockIdx.x * blockDim.y + threadIdx.y; every thread
// of a team must call the team reductions, each sums in a fixed order for a given team.
struct RowTeams {
  dim3 grid, block;
};
inline RowTeams row_teams(int64_t rows, int64_t n, unsigned threads) {
  if (n <= 32) return {dim3(blocks_for(rows, static_cast<int>(threads / 32))), dim3(32, threads / 32)};
  return {dim3(static_cast<unsigned>(rows)), dim3(threads)};
}
__device__ __forceinline__ int64_t team_row() { return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; }
template <class T> __device__ T team_sum(T v) { return blockDim.x == 32 ? warp_sum(v) : block_sum(v); }
template <class T> __device__ T team_max(T v) { return blockDim.x == 32 ? warp_max(v) : block_max(v); }

}  // namespace moelab::cuda
