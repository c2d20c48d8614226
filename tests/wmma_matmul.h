#pragma once
// A tensor-core product for the tests, written with nvcuda::wmma (tests/wmma_matmul.cu): on the emulator it checks
// the emulator's wmma (engine/cuda/sim/mma.h) against the CPU; on a GPU the same source checks the hardware's, and so
// that the emulator means what the hardware does.
#include "engine/tensor.h"

namespace moelab::testing {

// c = alpha * a b^T + c on the GPU: a [M, K] and b [N, K] bf16 (b's tiles loaded as col_major matrix_b fragments),
// c [M, N] f32, all CUDA and contiguous; M and K multiples of 16, N of 32. With b_row_major, b is [K, N] (row_major
// fragments) and c = alpha * a b + c.
void wmma_matmul(const Tensor& a, const Tensor& b, float alpha, const Tensor& c, bool b_row_major = false);

}  // namespace moelab::testing
