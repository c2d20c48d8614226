#!/usr/bin/env bash
# The whole test suite on a fresh machine, no GPU needed: install what is missing, then
#   1. the emulator build (preset sim): every test, the CUDA kernels included, running on the CPU (docs/cuda_emulator.md);
#   2. the CPU-only build (preset cpu): every test of a build without a CUDA backend;
#   3. where nvcc is installed, nvcc compiles the real CUDA kernels for Hopper (preset gpu: sm_90, warnings as errors):
#      the engine's and the tests' own (tests/wmma_matmul.cu, against nvcc's <mma.h>).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
jobs=$(nproc)

cmake --preset sim >/dev/null
cmake --build --preset sim -j "$jobs"
ctest --preset sim

cmake --preset cpu >/dev/null
cmake --build --preset cpu -j "$jobs"
ctest --preset cpu

if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  cmake --preset gpu >/dev/null
  cmake --build --preset gpu -j "$jobs" --target moelab_engine moelab_test_kernels
  echo "test.sh: nvcc compiled the CUDA kernels (the engine's and the tests') for sm_90 without a warning"
else
  echo "test.sh: no nvcc: the CUDA kernels were compiled by the emulator build only"
fi
