#pragma once
// MOELAB_HOST_DEVICE marks functions callable from host and device code. nvcc defines __CUDACC__; the emulator
// (MOELAB_CUDA=SIM) compiles the .cu files as C++, where CUDA's headers define __host__ and __device__ as nothing, so
// empty is the same there.
#if defined(__CUDACC__)
#define MOELAB_HOST_DEVICE __host__ __device__
#else
#define MOELAB_HOST_DEVICE
#endif
