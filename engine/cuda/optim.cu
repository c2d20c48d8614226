// CUDA kernels of engine/kernels/optim.h: AdamW's update, gradient clipping, OMoE's projector reset. The CPU kernels
// (engine/cpu/optim.cpp) are their reference in the tests.
//
// Multi-tensor launches. One launch covers every listed tensor: the host queues one record per tensor (its pointers,
// size, and where it starts in the concatenation of all of them; DeviceArray, without a host wait), and each thread
// finds its tensor by a binary search over the starts.
//
// Bits. nvcc contracts a * b + c into one fused multiply-add (one rounding), which the CPU build (x86-64 without FMA)
// never does. The AdamW expressions are therefore written with __fmul_rn / __fadd_rn, which nvcc never fuses: each
// product and sum is rounded once, in the CPU's order; with IEEE division and square root (nvcc's defaults) the GPU's
// parameters and moments are the CPU's bits.
#include "engine/kernels/optim.h"

#include <cmath>
#include <vector>

#include "engine/cuda/device.cuh"
#include "engine/cuda/reduce.cuh"

namespace moelab::cuda {

constexpr int kThreads = 256;

// A bf16 tensor's elements, or null for an undefined tensor (none).
inline __nv_bfloat16* bf16_data(const Tensor& t) {
  return t.defined() ? reinterpret_cast<__nv_bfloat16*>(t.data<bf16>()) : nullptr;
}

// An f32 or bf16 tensor's elements, read as float (bf16 widened, exact): a gradient.
struct FloatElements {
  const float* f32;  // or null, and the elements are bf16
  const __nv_bfloat16* bf16;
  __device__ float operator[](int64_t i) const { return f32 ? f32[i] : __bfloat162float(bf16[i]); }
};
inline FloatElements float_elements(const Tensor& t) {
  const bool bf16 = t.dtype() == DType::BF16;
  return {bf16 ? nullptr : t.data<float>(), bf16 ? bf16_data(t) : nullptr};
}

// ---- the tensor lists of a multi-tensor launch ------------------------------------------------------------------------

// The record that holds flat index i: the last one with start <= i (records in increasing start, none empty).
template <class Record> __device__ const Record& record_of(const Record* records, int count, int64_t i) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (records[mid].start <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return records[lo];
}

// ---- AdamW ------------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }

// m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g g with g = grad grad_scale, in place, rounded as on the CPU; returns
// sqrt(v) inv_sqrt_bc2 + eps.
__device__ __forceinline__ float update_moments(float grad, float& m, float& v, const AdamWScalars& s) {
  const float g = mul_rn(grad, s.grad_scale);
  m = add_rn(mul_rn(s.beta1, m), mul_rn(1 - s.beta1, g));
  v = add_rn(mul_rn(s.beta2, v), mul_rn(mul_rn(1 - s.beta2, g), g));
  return add_rn(mul_rn(sqrtf(v), s.inv_sqrt_bc2), s.eps);
}

struct AdamWRecord {
  float *param, *m, *v;
  FloatElements grad;
  int64_t numel, start;  // start: the first element's index in the concatenation of all parameters
  float decay;
  __nv_bfloat16* bf16_copy;  // null: none
};

// The parameter's bf16 copy, where it has one, rounded as round_to_bf16 rounds.
__device__ __forceinline__ void store_copy(__nv_bfloat16* bf16_copy, int64_t k, float param) {
  if (bf16_copy) bf16_copy[k] = __float2bfloat16_rn(param);
}

// One thread per element of all the parameters.
static __global__ void adamw_update_kernel(const AdamWRecord* records, int count, int64_t total, AdamWScalars scalars,
                                           float step_size) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const AdamWRecord& r = record_of(records, count, i);
  const int64_t k = i - r.start;
  float m = r.m[k], v = r.v[k];
  const float denominator = update_moments(r.grad[k], m, v, scalars);
  r.m[k] = m, r.v[k] = v;
  const float param = add_rn(mul_rn(r.param[k], r.decay), -(mul_rn(step_size, m) / denominator));
  r.param[k] = param;
  store_copy(r.bf16_copy, k, param);
}

void adamw_update(const std::vector<AdamWTensors>& params, const AdamWScalars& scalars, float step_size) {
  std::vector<AdamWRecord> records;
  int64_t total = 0;
  for (const AdamWTensors& p : params) {
    if (p.param.numel() == 0) continue;
    records.push_back({p.param.data<float>(), p.m.data<float>(), p.v.data<float>(), float_elements(p.grad),
                       p.param.numel(), total, p.decay, bf16_data(p.bf16_copy)});
    total += p.param.numel();
  }
  if (records.empty()) return;
  const DeviceArray<AdamWRecord> device(records);
  launch("adamw_update", adamw_update_kernel, dim3(blocks_for(total, kThreads)), dim3(kThreads), 0, device.get(),
         static_cast<int>(records.size()), total, scalars, step_size);
}

static __global__ void adamw_direction_kernel(const float* grad, float* m, float* v, int64_t n, AdamWScalars scalars,
                                              float inv_bc1, float* direction) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float mi = m[i], vi = v[i];
  const float denominator = update_moments(grad[i], mi, vi, scalars);
  m[i] = mi, v[i] = vi;
  direction[i] = mul_rn(mi, inv_bc1) / denominator;
}

void adamw_direction(const AdamWTensors& tensors, const AdamWScalars& scalars, float inv_bc1, const Tensor& direction) {
  const int64_t n = direction.numel();
  launch("adamw_direction", adamw_direction_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0,
         tensors.grad.data<float>(), tensors.m.data<float>(), tensors.v.data<float>(), n, scalars, inv_bc1,
         direction.data<float>());
}

static __global__ void adamw_apply_direction_kernel(float* param, const float* direction, int64_t n, float decay,
                                                    float lr, __nv_bfloat16* bf16_copy) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float updated = add_rn(mul_rn(param[i], decay), -mul_rn(lr, direction[i]));
  param[i] = updated;
  store_copy(bf16_copy, i, updated);
}

void adamw_apply_direction(const Tensor& param, const Tensor& direction, float decay, float lr,
                           const Tensor& bf16_copy) {
  const int64_t n = param.numel();
  launch("adamw_apply_direction", adamw_apply_direction_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0,
         param.data<float>(), direction.data<float>(), n, decay, lr, bf16_data(bf16_copy));
}

// ---- gradient clipping ------------------------------------------------------------------------------------------------

// The CPU's chunks (parallel_sum): each tensor's elements in chunks of kChunk, one block per chunk of every tensor.
constexpr int64_t kChunk = 4096;

// One f32 or bf16 tensor of a list; `start` is the index of its first chunk among all the tensors' chunks.
struct FloatTensorRecord {
  FloatElements data;
  int64_t numel;
  int64_t start;
};

// The non-empty tensors of a list, with their first chunks; `chunks` gets the chunks of all of them.
static std::vector<FloatTensorRecord> float_tensor_records(const std::vector<Tensor>& tensors, int64_t& chunks) {
  std::vector<FloatTensorRecord> records;
  chunks = 0;
  for (const Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    records.push_back({float_elements(t), t.numel(), chunks});
    chunks += (t.numel() + kChunk - 1) / kChunk;
  }
  return records;
}

static __global__ void chunk_sum_of_squares_kernel(const FloatTensorRecord* records, int count, double* partial) {
  const FloatTensorRecord& r = record_of(records, count, blockIdx.x);
  const int64_t begin = (blockIdx.x - r.start) * kChunk;
  const int64_t end = begin + kChunk < r.numel ? begin + kChunk : r.numel;
  double total = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) total += static_cast<double>(r.data[i]) * r.data[i];
  total = block_sum(total);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// One block per tensor: the sum of its chunk sums.
static __global__ void tensor_sum_of_squares_kernel(const FloatTensorRecord* records, const double* partial,
                                                    double* tensor_sums) {
  const FloatTensorRecord& r = records[blockIdx.x];
  const int64_t chunks = (r.numel + kChunk - 1) / kChunk;
  double total = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) total += partial[r.start + c];
  total = block_sum(total);
  if (threadIdx.x == 0) tensor_sums[blockIdx.x] = total;
}

// One thread: the tensors' sums in list order (the CPU's order).
static __global__ void total_sum_of_squares_kernel(const double* tensor_sums, int count, double* out) {
  double total = 0;
  for (int t = 0; t < count; ++t) total += tensor_sums[t];
  *out = total;
}

void sum_of_squares(const std::vector<Tensor>& tensors, const Tensor& total) {
  int64_t chunks = 0;
  const std::vector<FloatTensorRecord> records = float_tensor_records(tensors, chunks);
  const int count = static_cast<int>(records.size());
  const DeviceArray<FloatTensorRecord> device(records);
  Tensor partial = Tensor::empty({chunks}, DType::F64, Device::CUDA);
  Tensor tensor_sums = Tensor::empty({count}, DType::F64, Device::CUDA);
  launch("chunk_sum_of_squares", chunk_sum_of_squares_kernel, dim3(chunks), dim3(kThreads), 0, device.get(), count,
         partial.data<double>());
  launch("tensor_sum_of_squares", tensor_sum_of_squares_kernel, dim3(count), dim3(kThreads), 0, device.get(),
         partial.data<double>(), tensor_sums.data<double>());
  launch("total_sum_of_squares", total_sum_of_squares_kernel, dim3(1), dim3(1), 0, tensor_sums.data<double>(), count,
         total.data<double>());
}

// ---- OMoE -------------------------------------------------------------------------------------------------------------

// One thread per element of P [B, n, n].
template <class F> __global__ void fill_identity_kernel(F* P, int64_t n, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) P[i] = (i / n) % n == i % n ? F(1) : F(0);
}

void fill_identity(const Tensor& P) {
  dispatch_float("fill_identity", P.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("fill_identity", fill_identity_kernel<F>, dim3(blocks_for(P.numel(), kThreads)), dim3(kThreads), 0,
           P.data<F>(), P.size(1), P.numel());
  });
}

}  // namespace moelab::cuda
