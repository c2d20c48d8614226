// tests/wmma_matmul.h: one warp per 16 x 16 tile of c, two warps a block.
#include "tests/wmma_matmul.h"

#include <stdexcept>
#include <type_traits>

#include "engine/cuda/mma.cuh"

namespace moelab::testing {
namespace {

using namespace nvcuda;

// Warp w of block (x, y) owns c's tile at row 16 y, column 16 (2 x + w). The product starts from zero, is scaled
// element by element and added to c's tile element by element: two fragments of one kind hold their elements in the
// same places (NVIDIA's own samples rely on it; the documentation promises only element-wise use of one fragment).
// BLayout: wmma::col_major for b [N, K] (the tile of b^T), wmma::row_major for b [K, N].
template <class BLayout>
__global__ void wmma_matmul_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float alpha, float* c, int64_t n,
                                   int64_t k) {
  const int64_t row = 16 * static_cast<int64_t>(blockIdx.y);
  const int64_t col = 16 * (2 * static_cast<int64_t>(blockIdx.x) + threadIdx.x / 32);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> product, c_tile;
  wmma::fill_fragment(product, 0.0f);
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a_tile;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, BLayout> b_tile;
    wmma::load_matrix_sync(a_tile, a + row * k + k0, static_cast<unsigned>(k));
    if constexpr (std::is_same_v<BLayout, wmma::col_major>)
      wmma::load_matrix_sync(b_tile, b + col * k + k0, static_cast<unsigned>(k));
    else
      wmma::load_matrix_sync(b_tile, b + k0 * n + col, static_cast<unsigned>(n));
    wmma::mma_sync(product, a_tile, b_tile, product);
  }
  wmma::load_matrix_sync(c_tile, c + row * n + col, static_cast<unsigned>(n), wmma::mem_row_major);
  for (int e = 0; e < c_tile.num_elements; ++e) c_tile.x[e] += alpha * product.x[e];
  wmma::store_matrix_sync(c + row * n + col, c_tile, static_cast<unsigned>(n), wmma::mem_row_major);
}

}  // namespace

void wmma_matmul(const Tensor& a, const Tensor& b, float alpha, const Tensor& c, bool b_row_major) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(b_row_major ? 1 : 0);
  if (a.dtype() != DType::BF16 || b.dtype() != DType::BF16 || c.dtype() != DType::F32 ||
      b.size(b_row_major ? 0 : 1) != k || c.shape() != Shape{m, n} || m % 16 != 0 || k % 16 != 0 || n % 32 != 0 ||
      !a.is_cuda() || !b.is_cuda() || !c.is_cuda())
    throw std::invalid_argument("wmma_matmul: needs bf16 a [M, K], b [N, K] (or [K, N] row-major), f32 c [M, N] on the "
                                "GPU, M, K % 16 == 0, N % 32 == 0; got " +
                                a.str() + ", " + b.str() + ", " + c.str());
  const dim3 grid(static_cast<unsigned>(n / 32), static_cast<unsigned>(m / 16));
  const auto* pa = reinterpret_cast<const __nv_bfloat16*>(a.data<bf16>());
  const auto* pb = reinterpret_cast<const __nv_bfloat16*>(b.data<bf16>());
  if (b_row_major)
    cuda::launch("wmma_matmul", wmma_matmul_kernel<wmma::row_major>, grid, dim3(64), 0, pa, pb, alpha, c.data<float>(),
                 n, k);
  else
    cuda::launch("wmma_matmul", wmma_matmul_kernel<wmma::col_major>, grid, dim3(64), 0, pa, pb, alpha, c.data<float>(),
                 n, k);
}

}  // namespace moelab::testing
