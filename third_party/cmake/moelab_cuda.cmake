# MOELAB_CUDA = AUTO | ON | OFF. AUTO builds the CUDA backend when nvcc is found (it also compiles where there is no
# GPU: CI checks that the CUDA sources build, and GPU tests skip at run time).
include(CheckLanguage)
set(MOELAB_WITH_CUDA OFF)
if(NOT MOELAB_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MOELAB_WITH_CUDA ON)
  elseif(MOELAB_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOELAB_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
endif()

if(MOELAB_WITH_CUDA)
  # Without a GPU to detect, build for Hopper (sm_90), the target hardware.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)  # CMake 3.25 has no CUDA20 dialect for nvcc; the .cu files need only C++17
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "moelab: CUDA backend ON (architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "moelab: CUDA backend OFF")
endif()
