# MOELAB_CUDA = AUTO | ON | SIM | OFF picks the CUDA backend (engine/CMakeLists.txt builds it):
#   ON, or AUTO when nvcc is found: nvcc compiles engine/cuda/*.cu for Hopper (sm_90), linked with cudart and cuBLAS
#     (this also builds where there is no GPU: CI checks that the CUDA sources compile, GPU tests skip at run time);
#   SIM: the host compiler compiles the same engine/cuda/*.cu as C++ against the emulator in engine/cuda/sim/, which
#     runs the kernels on the CPU (docs/cuda_emulator.md); it needs the CUDA toolkit's headers only, and Boost.Context;
#   OFF (or AUTO without nvcc): no CUDA backend.
# Sets MOELAB_CUDA_BACKEND to NVCC, SIM or OFF.
set_property(CACHE MOELAB_CUDA PROPERTY STRINGS AUTO ON SIM OFF)
include(CheckLanguage)
set(MOELAB_CUDA_BACKEND OFF)
if(MOELAB_CUDA STREQUAL "SIM")
  set(MOELAB_CUDA_BACKEND SIM)
elseif(MOELAB_CUDA STREQUAL "ON" OR MOELAB_CUDA STREQUAL "AUTO")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MOELAB_CUDA_BACKEND NVCC)
  elseif(MOELAB_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOELAB_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
elseif(NOT MOELAB_CUDA STREQUAL "OFF")
  message(FATAL_ERROR "MOELAB_CUDA must be AUTO, ON, SIM or OFF, not '${MOELAB_CUDA}'")
endif()

if(MOELAB_CUDA_BACKEND STREQUAL "NVCC")
  # Without a GPU to detect, build for Hopper (sm_90), the target hardware.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)  # CMake 3.25 has no CUDA20 dialect for nvcc; the .cu files need only C++17
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "moelab: CUDA backend ON (nvcc, architectures ${CMAKE_CUDA_ARCHITECTURES})")
elseif(MOELAB_CUDA_BACKEND STREQUAL "SIM")
  # NVIDIA's headers only (cuda_runtime.h, cuda_bf16.h, cublas_v2.h): the emulator defines the functions it declares.
  find_package(CUDAToolkit QUIET)
  find_path(MOELAB_CUDA_INCLUDE_DIR cuda_runtime_api.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  if(NOT MOELAB_CUDA_INCLUDE_DIR)
    message(FATAL_ERROR "MOELAB_CUDA=SIM needs the CUDA toolkit's headers (cuda_runtime_api.h); set CUDAToolkit_ROOT")
  endif()
  find_package(Boost 1.74 REQUIRED COMPONENTS context)  # the threads of a block run as fibers
  message(STATUS "moelab: CUDA backend SIM (the emulator; headers from ${MOELAB_CUDA_INCLUDE_DIR})")
else()
  message(STATUS "moelab: CUDA backend OFF")
endif()
