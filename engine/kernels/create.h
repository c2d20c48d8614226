#pragma once
// The kernels behind engine/ops/create.cpp: constant fills, arange, and the seeded random fills. CPU:
// engine/cpu/create.cpp; CUDA: engine/cuda/create.cu (which fills on the device: no host buffer, no copy).
// Every value is computed in double and cast once to the element type, on both devices.
#include "engine/kernels.h"

namespace moelab {

// out[i] = value, cast to out's dtype (f32, f64 or i32).
DECLARE_KERNEL(fill_value, (const Tensor& out, double value))
// out[i] = i, cast to out's dtype (f32, f64 or i32).
DECLARE_KERNEL(fill_arange, (const Tensor& out))

// The random fills draw element i from the counter first + i of the stream `seed` (engine/rng.h), cast from double
// to out's dtype (f32 or f64). Both devices run the same Philox code, with the affine map unfused (no FMA), so:
//   fill_uniform: out[i] = low + (high - low) * u   is bit-identical on CPU and GPU;
//   fill_normal:  out[i] = mean + stddev * z        has z = sqrt(-2 log u1) cos(2 pi u2), whose log and cos are the
//     C library's on the CPU (and the emulator: the same bits there) and CUDA's on a GPU (within 1 and 2 ulps): f64
//     values of z agree to about 5 ulps (1e-15 relative; tests/test_cuda_shape_index.cpp allows 1e-14), and f32
//     values are the same bits unless the double lands within those ulps of a rounding boundary of float (about one
//     element in 10^8; then they differ by one f32 ulp).
DECLARE_KERNEL(fill_uniform, (const Tensor& out, uint64_t seed, uint64_t first, double low, double high))
DECLARE_KERNEL(fill_normal, (const Tensor& out, uint64_t seed, uint64_t first, double mean, double stddev))

}  // namespace moelab
