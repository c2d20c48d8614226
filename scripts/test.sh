#!/usr/bin/env bash
# The whole test suite on a fresh machine: install what is missing, build (Release; the CUDA backend is compiled when
# nvcc is found, and GPU tests skip without a GPU), run every test with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
ctest --preset release
