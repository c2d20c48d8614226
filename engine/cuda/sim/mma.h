#pragma once
// nvcuda::wmma for the emulator: the warp-level matrix products of nvcc's <mma.h> (the tensor cores), in the shape
// and types moelab's kernels use: m16n16k16, bf16 inputs, f32 accumulators.
//
// On a GPU a fragment's elements are spread over the 32 lanes of a warp in an unspecified order. Here every lane
// holds the whole tile, row-major: code that does the same to every element of a fragment (fill, scale, convert)
// means the same on both, and code that counts on a particular spread is wrong on both. num_elements is therefore
// the tile's size here and a share of it on a GPU: loop to num_elements, never to a constant.
//
// The _sync calls are warp collectives: the warp's 32 lanes must reach the same call together (a block whose last
// warp is partial fails the launch; lanes at different calls deadlock, and the report names where each waits). NVIDIA
// documents no memory ordering for them, and the emulator is stricter than the documentation: a load reads before
// its barrier and a store writes after it, each lane its own share of the elements, so a missing __syncwarp or
// __syncthreads between one lane's store and another lane's load reads stale (NaN) data under one of the schedules.
// Pointers must be 32-byte aligned and ldm a multiple of 16 bytes, as the documentation requires (the GPU's result is
// undefined otherwise); anything else fails the launch.
#include <cstdint>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "engine/cuda/sim/device.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

// A fragment's tile: matrix_a is M x K, matrix_b K x N, the accumulator M x N.
template <class Use, int M, int N, int K> struct Tile;
template <int M, int N, int K> struct Tile<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct Tile<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct Tile<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

inline void check_memory(const char* call, const void* p, unsigned ldm, size_t element_bytes,
                         const std::source_location& where) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm * element_bytes % 16 != 0)
    throw std::runtime_error(
        std::string("wmma::") + call + " at " + where.file_name() + ":" + std::to_string(where.line()) +
        ": the pointer must be 32-byte aligned and ldm a multiple of 16 bytes, got " +
        std::to_string(reinterpret_cast<uintptr_t>(p) % 32) + " bytes past 32 and ldm " + std::to_string(ldm));
}

// Element (r, c) of a tile stored row-major or column-major with leading dimension ldm.
inline size_t offset(int r, int c, unsigned ldm, bool row_major) {
  return row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r;
}

inline unsigned thread_in_block() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline unsigned lane() { return thread_in_block() % warpSize; }

// The barrier of every _sync call: the whole warp, at this same call.
inline void warp_barrier(const char* call, const std::source_location& where) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z, warp_start = thread_in_block() - lane();
  if (warp_start + warpSize > threads)
    throw std::runtime_error(std::string("wmma::") + call + " at " + where.file_name() + ":" +
                             std::to_string(where.line()) + " in a warp of " + std::to_string(threads - warp_start) +
                             " threads: wmma needs whole warps");
  moelab::sim::wait_at(moelab::sim::Barrier::wmma, 0xffffffffu, 0, 0, 0, where);
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has wmma's m16n16k16 shape only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float> : std::is_same_v<T, __nv_bfloat16>,
                "the emulator has bf16 inputs and f32 accumulators only");
  static_assert(std::is_same_v<Use, accumulator>
                    ? std::is_void_v<Layout>
                    : std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a and matrix_b take row_major or col_major, the accumulator no layout (as nvcc's)");
  enum { num_elements = detail::Tile<Use, M, N, K>::rows * detail::Tile<Use, M, N, K>::cols };  // an enum, as nvcc's
  T x[num_elements];  // element (r, c) is x[r * cols + c], the tile being rows x cols (detail::Tile)
};

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const std::type_identity_t<T>& value) {
  for (T& e : f.x) e = value;
}

// matrix_a or matrix_b, laid out in memory as the fragment's Layout says.
template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm,
                      const std::source_location& where = std::source_location::current()) {
  detail::check_memory("load_matrix_sync", p, ldm, sizeof(T), where);
  using Shape = detail::Tile<Use, M, N, K>;
  for (int r = 0; r < Shape::rows; ++r)
    for (int c = 0; c < Shape::cols; ++c)
      f.x[r * Shape::cols + c] = p[detail::offset(r, c, ldm, std::is_same_v<Layout, row_major>)];
  detail::warp_barrier("load_matrix_sync", where);
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout,
                      const std::source_location& where = std::source_location::current()) {
  detail::check_memory("load_matrix_sync", p, ldm, sizeof(T), where);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = p[detail::offset(r, c, ldm, layout == mem_row_major)];
  detail::warp_barrier("load_matrix_sync", where);
}

// Each lane writes every 32nd element, starting at its lane: every element once, none of them by every lane.
template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                       const std::source_location& where = std::source_location::current()) {
  detail::check_memory("store_matrix_sync", p, ldm, sizeof(T), where);
  detail::warp_barrier("store_matrix_sync", where);
  for (int e = static_cast<int>(detail::lane()); e < M * N; e += warpSize)
    p[detail::offset(e / N, e % N, ldm, layout == mem_row_major)] = f.x[e];
}

// d = a b + c with f32 accumulation, over k in order, each add rounded to nearest (the products of bf16 values are
// exact in f32; a GPU adds them in its own order and may truncate when it aligns partial sums). d may be c.
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c,
              const std::source_location& where = std::source_location::current()) {
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) sum += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      out[i * N + j] = static_cast<TC>(sum);
    }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
  detail::warp_barrier("mma_sync", where);
}

}  // namespace nvcuda::wmma
