#pragma once
// Tensor-core matrix products (nvcuda::wmma), for the kernels that use them: nvcc's <mma.h>, or in the MOELAB_CUDA=SIM
// build the emulator's (sim/mma.h: the same calls, each lane holding whole tiles; docs/cuda_emulator.md).
#include "engine/cuda/device.cuh"
#if MOELAB_CUDA_SIM
#include "engine/cuda/sim/mma.h"
#else
#include <mma.h>
#endif
