// CUDA kernels of engine/kernels/moe.h: the dispatch plan, the row permutations, the SwiGLU activation, the grouped
// SwiGLU (cuBLAS grouped GEMMs through blas.cuh, the activation kernels between them, f32 or bf16 operands) and the
// fused routing top-k + gates. The CPU kernels (engine/cpu/moe.cpp) are their reference in the tests. F is the
// element type (float or double).
// Determinism: no floating-point atomics. The plan is built without any atomics: each (expert, chunk of slots) block
// walks its chunk in order and starts after the expert's slots in earlier chunks, so the sort gives exactly the CPU's
// positions; every output row has one writer, and sums over a token's
// k slots run in j order inside one thread.
#include "engine/kernels/moe.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "engine/cuda/blas.cuh"
#include "engine/cuda/device.cuh"
#include "engine/cuda/reduce.cuh"
#include "engine/error.h"
#include "engine/kernels/matmul.h"
#include "engine/kernels/shape.h"

namespace moelab::cuda {

constexpr int kRowThreads = 128;   // one row per block (multiple of 32: block_sum)
constexpr int kScanThreads = 256;  // one expert per block, walking the slots in chunks of this size
constexpr int kFlatThreads = 256;  // elementwise kernels

// Kernels and helpers have internal linkage: another kernel file may use the same names.
namespace {

// Blocks of kFlatThreads for an elementwise grid-stride loop over n items (capped: each thread loops).
inline unsigned flat_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(blocks_for(n, kFlatThreads), 1 << 16));
}

// ---- the dispatch plan ----------------------------------------------------------------------------------------------

// The slots are cut into chunks of kSlotChunk, one block per (expert, chunk): one block per expert walking all the
// slots alone would take 256 sequential steps for M's 65,536 slots.
constexpr int64_t kSlotChunk = 8 * kScanThreads;

inline unsigned slot_chunks(int64_t slots) { return static_cast<unsigned>((slots + kSlotChunk - 1) / kSlotChunk); }

// (a) Block (e, c): chunk_counts[e * chunks + c] = the slots of chunk c whose id is e (integer, so exact in any order).
// Ids outside [0, E) match no block.
__global__ void count_chunk_kernel(const int32_t* ids, int64_t slots, int32_t* chunk_counts) {
  const int32_t e = static_cast<int32_t>(blockIdx.x);
  const int64_t begin = blockIdx.y * kSlotChunk, end = begin + kSlotChunk < slots ? begin + kSlotChunk : slots;
  int32_t count = 0;
  for (int64_t start = begin; start < end; start += blockDim.x) {
    const int64_t s = start + threadIdx.x;
    count += __syncthreads_count(s < end && ids[s] == e);
  }
  if (threadIdx.x == 0) chunk_counts[e * gridDim.y + blockIdx.y] = count;
}

// counts[e] = the sum of e's chunk counts, one thread per expert.
__global__ void sum_chunk_counts_kernel(const int32_t* chunk_counts, int64_t chunks, int64_t n_experts,
                                        int32_t* counts) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n_experts) return;
  int32_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += chunk_counts[e * chunks + c];
  counts[e] = total;
}

// Inclusive prefix sum of v over the lanes of a warp.
__device__ __forceinline__ int32_t warp_inclusive_sum(int32_t v) {
  const int lane = threadIdx.x % 32;
  for (int delta = 1; delta < 32; delta *= 2) {
    const int32_t below = __shfl_up_sync(kFullMask, v, delta);
    if (lane >= delta) v += below;
  }
  return v;
}

// (b) One block: offsets[e+1] = offsets[e] + counts[e], over chunks of blockDim.x experts (one chunk when E <= 1024).
// Within a chunk: a scan in each warp, then each thread adds the totals of the warps before its own.
__global__ void expert_offsets_kernel(const int32_t* counts, int64_t n_experts, int32_t* offsets) {
  SHARED_ARRAY(int32_t, warp_totals, 32);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x == 0) offsets[0] = 0;
  int32_t carry = 0;  // the experts of earlier chunks (every thread holds the same value)
  for (int64_t start = 0; start < n_experts; start += blockDim.x) {
    const int64_t e = start + threadIdx.x;
    const int32_t inclusive = warp_inclusive_sum(e < n_experts ? counts[e] : 0);
    if (threadIdx.x % 32 == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    int32_t before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) before += warp_totals[w];
      total += warp_totals[w];
    }
    if (e < n_experts) offsets[e + 1] = carry + before + inclusive;
    carry += total;
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }
}

// (c) Block (e, c) walks chunk c in order: a slot of e goes to offsets[e] + e's slots in the chunks before c + the
// number of e's slots before it in this chunk (a ballot per warp, then the counts of the warps before). Exactly the
// CPU's stable order.
__global__ void sort_chunk_kernel(const int32_t* ids, int64_t slots, const int32_t* offsets,
                                  const int32_t* chunk_counts, int32_t* position_of_slot) {
  SHARED_ARRAY(int32_t, warp_counts, 32);
  const int32_t e = static_cast<int32_t>(blockIdx.x);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t begin = blockIdx.y * kSlotChunk, end = begin + kSlotChunk < slots ? begin + kSlotChunk : slots;
  int32_t next = offsets[e];  // the segment's next free position (every thread holds the same value)
  for (unsigned c = 0; c < blockIdx.y; ++c) next += chunk_counts[e * gridDim.y + c];
  for (int64_t start = begin; start < end; start += blockDim.x) {
    const int64_t s = start + threadIdx.x;
    const bool mine = s < end && ids[s] == e;
    const unsigned ballot = __ballot_sync(kFullMask, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int32_t before = 0, total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) before += warp_counts[w];
      total += warp_counts[w];
    }
    if (mine) {
      position_of_slot[s] = next + before + __popc(ballot & ((1u << lane) - 1u));
    }
    next += total;
    __syncthreads();  // warp_counts is rewritten by the next step
  }
}

}  // namespace

// The chunk counts of every expert: [E, chunks] on the device.
static Tensor expert_chunk_counts(const Tensor& expert_ids, int64_t n_experts) {
  const int64_t slots = expert_ids.numel();
  Tensor chunk_counts = Tensor::empty({n_experts, static_cast<int64_t>(slot_chunks(slots))}, DType::I32, Device::CUDA);
  launch("moe_count_chunks", count_chunk_kernel, dim3(n_experts, slot_chunks(slots)), dim3(kScanThreads), 0,
         expert_ids.data<int32_t>(), slots, chunk_counts.data<int32_t>());
  return chunk_counts;
}

void moe_count_experts(const Tensor& expert_ids, const Tensor& counts) {
  const int64_t n_experts = counts.numel(), chunks = slot_chunks(expert_ids.numel());
  if (chunks == 0) {
    set_zero(counts.raw_data(), n_experts * sizeof(int32_t));
    return;
  }
  const Tensor chunk_counts = expert_chunk_counts(expert_ids, n_experts);
  launch("moe_sum_chunk_counts", sum_chunk_counts_kernel, dim3(blocks_for(n_experts, kScanThreads)), dim3(kScanThreads),
         0, chunk_counts.data<int32_t>(), chunks, n_experts, counts.data<int32_t>());
}

void moe_expert_offsets(const Tensor& counts, const Tensor& offsets) {
  const int64_t n_experts = counts.numel();
  const int threads = static_cast<int>(std::clamp<int64_t>((n_experts + 31) / 32 * 32, 32, 1024));
  launch("moe_expert_offsets", expert_offsets_kernel, dim3(1), dim3(threads), 0, counts.data<int32_t>(), n_experts,
         offsets.data<int32_t>());
}

void moe_sort_slots(const Tensor& expert_ids, const Tensor& offsets, const Tensor& position_of_slot) {
  const int64_t n_experts = offsets.numel() - 1, slots = expert_ids.numel();
  if (slots == 0) return;
  const Tensor chunk_counts = expert_chunk_counts(expert_ids, n_experts);
  launch("moe_sort_slots", sort_chunk_kernel, dim3(n_experts, slot_chunks(slots)), dim3(kScanThreads), 0,
         expert_ids.data<int32_t>(), slots, offsets.data<int32_t>(), chunk_counts.data<int32_t>(),
         position_of_slot.data<int32_t>());
}

// ---- (d) permute and its backward -----------------------------------------------------------------------------------

namespace {

// One block per token n: x_sorted[position_of_slot[n, j]] = x[n] for each j, stored as Out. The token's row is read
// from memory once (its k copies from the cache), where a block per position would read it k times, far apart.
template <class F, class Out>
__global__ void permute_rows_kernel(const F* x, const int32_t* position_of_slot, int64_t k, int64_t d, Out* x_sorted) {
  const int64_t n = blockIdx.x;
  for (int64_t j = 0; j < k; ++j) {
    Out* row = x_sorted + position_of_slot[n * k + j] * d;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) row[i] = converted<Out>(x[n * d + i]);
  }
}

// One block per token n: dx[n] = sum_j dx_sorted[position_of_slot[n, j]], j in order, dx_sorted's elements (type S)
// widened to F.
template <class F, class S>
__global__ void unpermute_sum_rows_kernel(const S* dx_sorted, const int32_t* position_of_slot, int64_t k, int64_t d,
                                          F* dx) {
  const int64_t n = blockIdx.x;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    F total = 0;
    for (int64_t j = 0; j < k; ++j) total += widened<F>(dx_sorted[position_of_slot[n * k + j] * d + i]);
    dx[n * d + i] = total;
  }
}

}  // namespace

void moe_permute_rows(const Tensor& x, const Tensor& position_of_slot, const Tensor& x_sorted) {
  dispatch_float("moe_permute_rows", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("moe_permute_rows", x_sorted.dtype(), [&](auto stored_as) {
      using Out = decltype(stored_as);
      launch("moe_permute_rows", permute_rows_kernel<F, Out>, dim3(x.size(0)), dim3(kRowThreads), 0, x.data<F>(),
             position_of_slot.data<int32_t>(), position_of_slot.size(1), x.size(1), stored<Out>(x_sorted));
    });
  });
}

void moe_unpermute_sum_rows(const Tensor& dx_sorted, const Tensor& position_of_slot, const Tensor& dx) {
  dispatch_float("moe_unpermute_sum_rows", dx.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("moe_unpermute_sum_rows", dx_sorted.dtype(), [&](auto stored_as) {
      using S = decltype(stored_as);
      launch("moe_unpermute_sum_rows", unpermute_sum_rows_kernel<F, S>, dim3(dx.size(0)), dim3(kRowThreads), 0,
             stored<const S>(dx_sorted), position_of_slot.data<int32_t>(), position_of_slot.size(1), dx.size(1),
             dx.data<F>());
    });
  });
}

// ---- (e) the SwiGLU activation --------------------------------------------------------------------------------------

namespace {

template <class F> __device__ F sigmoid(F z) { return F(1) / (F(1) + exp(-z)); }

// silu(z) * up, for z = gate_pre.
template <class F> __device__ F swiglu(F z, F up) { return z * sigmoid(z) * up; }

// From d_act: d_up = d_act * silu(z), d_gate = d_act * up * s (1 + z (1 - s)) with s = sigmoid(z).
template <class F> __device__ void swiglu_gradients(F z, F up, F d_act, F& d_gate, F& d_up) {
  const F s = sigmoid(z);
  d_up = d_act * z * s;
  d_gate = d_act * up * s * (1 + z * (1 - s));
}

// act = silu(gate_pre) * up_pre, elementwise, computed in F and stored as S.
template <class F, class S>
__global__ void swiglu_forward_kernel(const S* gate_pre, const S* up_pre, int64_t n, S* act) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    act[i] = converted<S>(swiglu(widened<F>(gate_pre[i]), widened<F>(up_pre[i])));
}

// Over the n elements of [n / h, h] inputs (gate_pre, up_pre stored as S, d_act as D, computed in F); element (r, c)
// of each output is at r * ld + c (ld = h: the outputs are as the inputs; ld = 2h with d_up_pre = d_gate_pre + h: the
// rows of one [n / h, 2h] tensor, [d_gate | d_up]). d_act may be d_gate_pre (D = Out, ld = h): each thread reads its
// element before writing it.
template <class F, class S, class D, class Out>
__global__ void swiglu_backward_kernel(const S* gate_pre, const S* up_pre, const D* d_act, int64_t n, int64_t h,
                                       int64_t ld, Out* d_gate_pre, Out* d_up_pre) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    F d_gate, d_up;
    swiglu_gradients(widened<F>(gate_pre[i]), widened<F>(up_pre[i]), widened<F>(d_act[i]), d_gate, d_up);
    const int64_t at = (i / h) * ld + i % h;
    d_gate_pre[at] = converted<Out>(d_gate), d_up_pre[at] = converted<Out>(d_up);
  }
}

}  // namespace

void moe_swiglu_forward(const Tensor& gate_pre, const Tensor& up_pre, const Tensor& act) {
  if (gate_pre.dtype() != act.dtype() || up_pre.dtype() != act.dtype())  // read as act's type below
    fail("moe_swiglu_forward: gate_pre, up_pre and act must share a dtype, got {}, {}, {}",
         dtype_name(gate_pre.dtype()), dtype_name(up_pre.dtype()), dtype_name(act.dtype()));
  const DType math = act.dtype() == DType::BF16 ? DType::F32 : act.dtype();
  dispatch_float("moe_swiglu_forward", math, [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("moe_swiglu_forward", act.dtype(), [&](auto stored_as) {
      using S = decltype(stored_as);
      launch("moe_swiglu_forward", swiglu_forward_kernel<F, S>, dim3(flat_blocks(act.numel())), dim3(kFlatThreads), 0,
             stored<const S>(gate_pre), stored<const S>(up_pre), act.numel(), stored<S>(act));
    });
  });
}

// swiglu_backward_kernel over d_act's elements, in rows of h, the gradients (of dtype `out`) written in rows of ld.
static void swiglu_backward_rows(const Tensor& gate_pre, const Tensor& up_pre, const Tensor& d_act, int64_t h,
                                 int64_t ld, DType out, void* d_gate_pre, void* d_up_pre) {
  const DType math = d_act.dtype() == DType::BF16 ? DType::F32 : d_act.dtype();
  dispatch_float("moe_swiglu_backward", math, [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("moe_swiglu_backward", gate_pre.dtype(), [&](auto in_tag) {
      with_storage<F>("moe_swiglu_backward", d_act.dtype(), [&](auto d_act_tag) {
        with_storage<F>("moe_swiglu_backward", out, [&](auto out_tag) {
          using S = decltype(in_tag);
          using D = decltype(d_act_tag);
          using Out = decltype(out_tag);
          launch("moe_swiglu_backward", swiglu_backward_kernel<F, S, D, Out>, dim3(flat_blocks(d_act.numel())),
                 dim3(kFlatThreads), 0, stored<const S>(gate_pre), stored<const S>(up_pre), stored<const D>(d_act),
                 d_act.numel(), h, ld, static_cast<Out*>(d_gate_pre), static_cast<Out*>(d_up_pre));
        });
      });
    });
  });
}

void moe_swiglu_backward(const Tensor& gate_pre, const Tensor& up_pre, const Tensor& d_act, const Tensor& d_gate_pre,
                         const Tensor& d_up_pre) {
  if (up_pre.dtype() != gate_pre.dtype() || d_gate_pre.dtype() != d_up_pre.dtype())  // read as one type each below
    fail(
        "moe_swiglu_backward: gate_pre and up_pre, and d_gate_pre and d_up_pre, must share a dtype, got {}, {}, {}, {}",
        dtype_name(gate_pre.dtype()), dtype_name(up_pre.dtype()), dtype_name(d_gate_pre.dtype()),
        dtype_name(d_up_pre.dtype()));
  if (d_act.dtype() == DType::BF16)  // the CPU's kernel takes none either (engine/kernels/moe.h)
    fail("moe_swiglu_backward: d_act must be f32 or f64, got {}", dtype_name(d_act.dtype()));
  const int64_t n = std::max<int64_t>(d_act.numel(), 1);  // one row: the outputs are laid out as the inputs
  swiglu_backward_rows(gate_pre, up_pre, d_act, n, n, d_up_pre.dtype(), d_gate_pre.raw_data(), d_up_pre.raw_data());
}

// ---- (e) grouped SwiGLU: one grouped GEMM per product, one problem per expert ---------------------------------------
// Expert e's problem has m or k = c_e, its number of rows; gemm_grouped skips the empty ones, and zeroes C where only
// k = 0, which gives an expert with no tokens its zero weight gradient. The offsets are the plan's host copy.
// Under Precision::BF16 every product multiplies bf16 operands with f32 accumulation and writes bf16, as autocast's
// grouped products do: one grouped bf16 -> bf16 call each at the bf16 rate (cublasGemmGroupedBatchedEx has no bf16 ->
// f32), on the kept bf16 tensors as they are. The forward's three write the kept activations and output; the
// backward's d_act, d_x_sorted and weight gradients are bf16 tensors (each the f32 sum rounded once, as on the CPU).
// d_x = d_gate W_gate + d_up W_up is one product with k = 2h, of [d_gate | d_up] (the SwiGLU backward writes both into
// the rows of one [S, 2h] tensor) and the weights stacked per expert, [W_gate,e ; W_up,e] [2h, d], so that its sum too
// is rounded once. Under ExpertGemm::PerExpert (runtime.h) each expert's product is one cublasGemmEx of the same types,
// under Padded (below) each product one strided-batched call.

namespace {

// Row `row` of t seen as a row-major matrix of `cols` columns (any dtype).
inline char* row_of(const Tensor& t, int64_t row, int64_t cols) {
  return static_cast<char*>(t.raw_data()) + row * cols * static_cast<int64_t>(dtype_size(t.dtype()));
}

// A GEMM operand: t itself, or with `round` its bf16 copy (an f32 t rounded; a bf16 t as it is).
inline Tensor operand(const Tensor& t, bool round) {
  if (!round || t.dtype() == DType::BF16) return t;
  Tensor out = Tensor::empty(t.shape(), DType::BF16, Device::CUDA);
  round_to_bf16(t, out);
  return out;
}

// Column `col` of t's first row, t seen as a row-major matrix (any dtype): a GEMM operand of t's columns from col on,
// whose rows are t's (lda: t's row length).
inline char* column_of(const Tensor& t, int64_t col) {
  return static_cast<char*>(t.raw_data()) + col * static_cast<int64_t>(dtype_size(t.dtype()));
}

// stacked [E, 2h, d]: expert e's W_gate rows, then its W_up rows, the elements (stored as In) stored as Out.
template <class In, class Out>
__global__ void stack_gate_up_kernel(const In* w_gate, const In* w_up, int64_t n, int64_t h, int64_t d, Out* stacked) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i / (2 * h * d), row = (i / d) % (2 * h), col = i % d;
    const In* w = row < h ? w_gate + (e * h + row) * d : w_up + (e * h + row - h) * d;
    stacked[i] = converted<Out>(w[col]);
  }
}

// The backward's operand [W_gate,e ; W_up,e] [E, 2h, d] of dtype `type`: the weights' own, or bf16 (f32 weights
// rounded, bf16 ones copied).
inline Tensor stacked_gate_up(const Tensor& w_gate, const Tensor& w_up, DType type) {
  const int64_t h = w_gate.size(1), d = w_gate.size(2);
  Tensor stacked = Tensor::empty({w_gate.size(0), 2 * h, d}, type, Device::CUDA);
  auto stack = [&](auto weights_as, auto stored_as) {
    using In = decltype(weights_as);
    using Out = decltype(stored_as);
    launch("moe_stack_gate_up", stack_gate_up_kernel<In, Out>, dim3(flat_blocks(stacked.numel())), dim3(kFlatThreads),
           0, stored<const In>(w_gate), stored<const In>(w_up), stacked.numel(), h, d, stored<Out>(stacked));
  };
  if (type == DType::BF16)
    with_storage<float>("moe_stack_gate_up", w_gate.dtype(), [&](auto in) { stack(in, __nv_bfloat16{}); });
  else
    dispatch_float("moe_stack_gate_up", type, [&](auto f) { stack(f, f); });
  return stacked;
}

}  // namespace

// ---- (e) with padded rows (ExpertGemm::Padded) ----------------------------------------------------------------------
// Expert e's sorted rows [offsets[e], offsets[e+1]) are copied to the rows [e R, e R + c_e) of a padded buffer [E R,
// cols], R the longest expert's count, and its other rows are zero. Every product is then one strided-batched call over
// the E experts: zero rows of an operand give zero rows of the output where the rows are the product's m, and add
// nothing where they are its k (the weight gradients, so an expert with no rows gets zero), so the results are the
// grouped products'. The padded copies are the products' operands, under BF16 rounded to bf16 as they are copied, and
// every product is bf16 -> bf16 as the grouped calls are: what padding buys is one uniform strided batch in place of
// a grouped call over problems of different sizes, which is faster is for the GPU to say. The price: E R - S rows of
// zeros multiplied, at most S / 2 more (pads_expert_rows), and the outputs copied back to the sorted rows.

// R: the most rows an expert has.
static int64_t longest_expert(const std::vector<int32_t>& offsets) {
  int64_t rows = 0;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) rows = std::max<int64_t>(rows, offsets[e + 1] - offsets[e]);
  return rows;
}

// At most half the slots again in rows of zeros: 1.5 S is a guess, for the GPU to tune (it was set when the grouped
// backward ran on TF32 at half the rate, which the padded one did not). A grid has at most 2^31 - 1 blocks, one per
// padded row.
bool pads_expert_rows(const std::vector<int32_t>& offsets) {
  const int64_t padded_rows = (static_cast<int64_t>(offsets.size()) - 1) * longest_expert(offsets);
  return 2 * padded_rows <= 3 * static_cast<int64_t>(offsets.back()) && padded_rows <= INT32_MAX;
}

static std::atomic<int64_t> padded_calls = 0;
int64_t padded_expert_calls() { return padded_calls.load(std::memory_order_relaxed); }

// Whether this call of the experts' products runs on padded rows (ExpertGemm::Padded and pads_expert_rows), counted.
static bool runs_padded(const std::vector<int32_t>& offsets) {
  if (expert_gemm() != ExpertGemm::Padded || !pads_expert_rows(offsets)) return false;
  padded_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

namespace {

// Where padded row p = e R + r comes from: the sorted row offsets[e] + r when r < c_e, else nowhere (-1: padding).
struct PaddedRows {
  const int32_t* offsets;  // [E+1], on the device
  int64_t rows;            // R, per expert
  __device__ int64_t sorted_row(int64_t p) const {
    const int64_t e = p / rows, r = p % rows;
    return r < offsets[e + 1] - offsets[e] ? offsets[e] + r : -1;
  }
};

// The kernels below: one block per padded row p (blockIdx.x), its threads over the row's columns.

// padded[p] = sorted[sorted_row(p)] as an operand, 0 on padding.
template <class S, class Out>
__global__ void pad_rows_kernel(const S* sorted, PaddedRows layout, int64_t cols, Out* padded) {
  const int64_t p = blockIdx.x, row = layout.sorted_row(p);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    padded[p * cols + c] = row < 0 ? converted<Out>(0.0f) : converted<Out>(sorted[row * cols + c]);
}

// sorted[sorted_row(p)] = padded[p], padding left out (elements of type S, copied).
template <class S> __global__ void unpad_rows_kernel(const S* padded, PaddedRows layout, int64_t cols, S* sorted) {
  const int64_t p = blockIdx.x, row = layout.sorted_row(p);
  if (row < 0) return;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sorted[row * cols + c] = padded[p * cols + c];
}

// From the padded gate and up products (type Out: bf16 under BF16, the kept activations' type): gate_pre, up_pre and
// act in the sorted rows (the backward's), act computed in F and stored as Out, and act again in the padded buffer
// act_operand as the down product's operand (0 on padding).
template <class F, class Out>
__global__ void padded_swiglu_forward_kernel(const Out* gate_padded, const Out* up_padded, PaddedRows layout, int64_t h,
                                             Out* gate_pre, Out* up_pre, Out* act, Out* act_operand) {
  const int64_t p = blockIdx.x, row = layout.sorted_row(p);
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const int64_t i = p * h + c, at = row * h + c;
    if (row < 0) {
      act_operand[i] = converted<Out>(F(0));
      continue;
    }
    const Out z = gate_padded[i], up = up_padded[i];
    const Out a = converted<Out>(swiglu(widened<F>(z), widened<F>(up)));
    gate_pre[at] = z, up_pre[at] = up, act[at] = a;
    act_operand[i] = a;
  }
}

// From the padded d_act and the kept gate_pre, up_pre (all type Out): d_gate_pre and d_up_pre as operands in the
// padded rows [d_gate | d_up] of d_gate_up [E R, 2h] (0 on padding).
template <class F, class Out>
__global__ void padded_swiglu_backward_kernel(const Out* gate_pre, const Out* up_pre, const Out* d_act_padded,
                                              PaddedRows layout, int64_t h, Out* d_gate_up) {
  const int64_t p = blockIdx.x, row = layout.sorted_row(p);
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const int64_t i = p * h + c, at = row * h + c;
    F d_gate = 0, d_up = 0;
    if (row >= 0)
      swiglu_gradients(widened<F>(gate_pre[at]), widened<F>(up_pre[at]), widened<F>(d_act_padded[i]), d_gate, d_up);
    d_gate_up[p * 2 * h + c] = converted<Out>(d_gate);
    d_gate_up[p * 2 * h + h + c] = converted<Out>(d_up);
  }
}

// One MoE layer's padded layout: R, the offsets on the device (queued, no wait), the products over the experts, and
// the operands' dtype: bf16 under BF16, else the tensors'.
class PaddedExperts {
 public:
  PaddedExperts(const std::vector<int32_t>& offsets, DType dtype, bool rounds)
      : experts_(static_cast<int64_t>(offsets.size()) - 1),
        rows_(longest_expert(offsets)),
        dtype_(dtype),
        rounds_(rounds),
        offsets_(offsets) {}

  int64_t rows() const { return rows_; }
  bool rounds() const { return rounds_; }  // to bf16
  DType operand_dtype() const { return rounds_ ? DType::BF16 : dtype_; }

  // Runs f(F{}, Out{}) with F the tensors' type and Out the operands'.
  template <class Fn> void with_types(const char* what, Fn&& f) const {
    dispatch_float(what, dtype_, [&](auto tag) {
      using F = decltype(tag);
      if constexpr (std::is_same_v<F, float>)
        if (rounds_) return f(F{}, __nv_bfloat16{});
      f(F{}, F{});
    });
  }

  // [E R, cols]: the sorted rows (the tensors' dtype, or the operands') as operands, 0 on padding.
  Tensor pad(const Tensor& sorted) const {
    const int64_t cols = sorted.size(1);
    Tensor padded = Tensor::empty({experts_ * rows_, cols}, operand_dtype(), Device::CUDA);
    with_types("moe_pad_rows", [&](auto f, auto out) {
      using Out = decltype(out);
      with_storage<decltype(f)>("moe_pad_rows", sorted.dtype(), [&](auto stored_as) {
        using S = decltype(stored_as);
        launch("moe_pad_rows", pad_rows_kernel<S, Out>, row_blocks(), dim3(kRowThreads), 0, stored<const S>(sorted),
               layout(), cols, stored<Out>(padded));
      });
    });
    return padded;
  }
  // An output [E R, cols] of a product, of the operands' dtype (bf16 under BF16: every product's output is).
  Tensor output(int64_t cols) const { return Tensor::empty({experts_ * rows_, cols}, operand_dtype(), Device::CUDA); }
  // The rows of padded that are not padding, to sorted (one dtype: the tensors', or the operands').
  void unpad(const Tensor& padded, const Tensor& sorted) const {
    if (padded.dtype() != sorted.dtype())  // copied as sorted's type below
      fail("moe_unpad_rows: padded rows of {} into sorted rows of {}", dtype_name(padded.dtype()),
           dtype_name(sorted.dtype()));
    with_types("moe_unpad_rows", [&](auto f, auto) {
      with_storage<decltype(f)>("moe_unpad_rows", sorted.dtype(), [&](auto stored_as) {
        using S = decltype(stored_as);
        launch("moe_unpad_rows", unpad_rows_kernel<S>, row_blocks(), dim3(kRowThreads), 0, stored<const S>(padded),
               layout(), padded.size(1), stored<S>(sorted));
      });
    });
  }
  // C_e = op(A_e) op(B_e) for every expert e, each matrix stored whole after the one of expert e - 1 (A_e [m, k], or
  // [k, m] when trans_a; B_e [k, n] or [n, k]; C_e [m, n]), with row strides lda, ldb, ldc. A and B are operands
  // (operand_dtype(), from their first elements: a tensor, or the columns of one, column_of); C has its own dtype.
  void products(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda, const void* B,
                int64_t ldb, const Tensor& C, int64_t ldc) const {
    gemm_strided_batched(trans_a, trans_b, m, n, k, 1.0f, A, lda, (trans_a ? k : m) * lda, B, ldb,
                         (trans_b ? n : k) * ldb, 0.0f, C.raw_data(), ldc, m * ldc, experts_, operand_dtype(),
                         C.dtype());
  }
  PaddedRows layout() const { return {offsets_.get(), rows_}; }
  dim3 row_blocks() const { return dim3(static_cast<unsigned>(experts_ * rows_)); }  // one per padded row

 private:
  int64_t experts_, rows_;
  DType dtype_;
  bool rounds_;
  DeviceArray<int32_t> offsets_;
};

}  // namespace

static void padded_swiglu_forward(const PaddedExperts& p, const Tensor& x_sorted, const Tensor& w_gate,
                                  const Tensor& w_up, const Tensor& w_down, const Tensor& gate_pre,
                                  const Tensor& up_pre, const Tensor& act, const Tensor& out_sorted) {
  const int64_t h = w_gate.size(1), d = w_gate.size(2), R = p.rows();
  const DType rounded = p.operand_dtype();
  const Tensor x = p.pad(x_sorted), wg = operand(w_gate, p.rounds()), wu = operand(w_up, p.rounds()),
               wd = operand(w_down, p.rounds());
  // gate = x W_gate^T, up = x W_up^T: [R, d] x [h, d]^T -> [R, h] per expert, kept as they are written
  const Tensor gate = p.output(h), up = p.output(h);
  p.products(false, true, R, h, d, x.raw_data(), d, wg.raw_data(), d, gate, h);
  p.products(false, true, R, h, d, x.raw_data(), d, wu.raw_data(), d, up, h);
  const Tensor act_operand = Tensor::empty(gate.shape(), rounded, Device::CUDA);
  p.with_types("moe_padded_swiglu_forward", [&](auto f, auto out) {
    using F = decltype(f);
    using Out = decltype(out);
    launch("moe_padded_swiglu_forward", padded_swiglu_forward_kernel<F, Out>, p.row_blocks(), dim3(kRowThreads), 0,
           stored<const Out>(gate), stored<const Out>(up), p.layout(), h, stored<Out>(gate_pre), stored<Out>(up_pre),
           stored<Out>(act), stored<Out>(act_operand));
  });
  // out = act W_down^T: [R, h] x [d, h]^T -> [R, d] per expert, kept as it is written
  const Tensor out = p.output(d);
  p.products(false, true, R, d, h, act_operand.raw_data(), h, wd.raw_data(), h, out, d);
  p.unpad(out, out_sorted);
}

// The padded path keeps its own d_act [E R, h]: the sorted one is the other paths' scratch.
static void padded_swiglu_backward(const PaddedExperts& p, const Tensor& x_sorted, const Tensor& w_gate,
                                   const Tensor& w_up, const Tensor& w_down, const Tensor& gate_pre,
                                   const Tensor& up_pre, const Tensor& act, const Tensor& d_out_sorted,
                                   const Tensor& d_x_sorted, const Tensor& dw_gate, const Tensor& dw_up,
                                   const Tensor& dw_down) {
  const int64_t h = w_gate.size(1), d = w_gate.size(2), R = p.rows();
  const DType rounded = p.operand_dtype();
  const Tensor x = p.pad(x_sorted), act_operand = p.pad(act), d_out = p.pad(d_out_sorted);
  const Tensor wd = operand(w_down, p.rounds()), w_gate_up = stacked_gate_up(w_gate, w_up, rounded);
  // d_act = d_out W_down: [R, d] x [d, h] -> [R, h];  dW_down = d_out^T act: [R, d]^T x [R, h] -> [d, h]
  const Tensor d_act = p.output(h);
  p.products(false, false, R, h, d, d_out.raw_data(), d, wd.raw_data(), h, d_act, h);
  p.products(true, false, d, h, R, d_out.raw_data(), d, act_operand.raw_data(), h, dw_down, h);
  const Tensor d_gate_up = Tensor::empty({d_act.size(0), 2 * h}, rounded, Device::CUDA);  // [d_gate | d_up]
  p.with_types("moe_padded_swiglu_backward", [&](auto f, auto out) {
    using F = decltype(f);
    using Out = decltype(out);
    launch("moe_padded_swiglu_backward", padded_swiglu_backward_kernel<F, Out>, p.row_blocks(), dim3(kRowThreads), 0,
           stored<const Out>(gate_pre), stored<const Out>(up_pre), stored<const Out>(d_act), p.layout(), h,
           stored<Out>(d_gate_up));
  });
  // dW_gate = d_gate^T x, dW_up = d_up^T x: [R, h]^T x [R, d] -> [h, d], from the halves of d_gate_up's rows
  p.products(true, false, h, d, R, column_of(d_gate_up, 0), 2 * h, x.raw_data(), d, dw_gate, d);
  p.products(true, false, h, d, R, column_of(d_gate_up, h), 2 * h, x.raw_data(), d, dw_up, d);
  // d_x = [d_gate | d_up] [W_gate ; W_up]: [R, 2h] x [2h, d] -> [R, d], of d_x_sorted's dtype (bf16 under BF16)
  const Tensor dx = p.output(d);
  p.products(false, false, R, d, 2 * h, d_gate_up.raw_data(), 2 * h, w_gate_up.raw_data(), d, dx, d);
  p.unpad(dx, d_x_sorted);
}

void moe_grouped_swiglu_forward(const Tensor& x_sorted, const std::vector<int32_t>& offsets, const Tensor& w_gate,
                                const Tensor& w_up, const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre,
                                const Tensor& act, const Tensor& out_sorted, Precision precision) {
  const int64_t n_experts = w_gate.size(0), h = w_gate.size(1), d = w_gate.size(2);
  const bool bf16 =
      grouped_swiglu_forward_rounds(x_sorted, w_gate, w_up, w_down, gate_pre, up_pre, act, out_sorted, precision);
  if (runs_padded(offsets)) {
    padded_swiglu_forward(PaddedExperts(offsets, grouped_swiglu_dtype(bf16, w_gate), bf16), x_sorted, w_gate, w_up,
                          w_down, gate_pre, up_pre, act, out_sorted);
    return;
  }
  // The three products write the kept activations and output: under BF16 bf16 x bf16 -> bf16 in every mode.
  const DType kept = gate_pre.dtype();
  const Tensor x = operand(x_sorted, bf16), wg = operand(w_gate, bf16), wu = operand(w_up, bf16),
               wd = operand(w_down, bf16);
  std::vector<GemmProblem> gate_and_up, down;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t begin = offsets[e], c = offsets[e + 1] - offsets[e];
    const char* xs = row_of(x, begin, d);  // [c, d]
    // gate_pre = x W_gate^T, up_pre = x W_up^T: [c, d] x [h, d]^T -> [c, h]
    gate_and_up.push_back({c, h, d, xs, d, row_of(wg, e * h, d), d, row_of(gate_pre, begin, h), h});
    gate_and_up.push_back({c, h, d, xs, d, row_of(wu, e * h, d), d, row_of(up_pre, begin, h), h});
  }
  gemm_grouped(false, true, gate_and_up, 1.0f, 0.0f, kept, kept);
  moe_swiglu_forward(gate_pre, up_pre, act);  // every expert's rows in one launch
  // out = act W_down^T: [c, h] x [d, h]^T -> [c, d]
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t begin = offsets[e], c = offsets[e + 1] - offsets[e];
    down.push_back({c, d, h, row_of(act, begin, h), h, row_of(wd, e * d, h), h, row_of(out_sorted, begin, d), d});
  }
  gemm_grouped(false, true, down, 1.0f, 0.0f, kept, kept);
}

void moe_grouped_swiglu_backward(const Tensor& x_sorted, const std::vector<int32_t>& offsets, const Tensor& w_gate,
                                 const Tensor& w_up, const Tensor& w_down, const Tensor& gate_pre, const Tensor& up_pre,
                                 const Tensor& act, const Tensor& d_out_sorted, const Tensor& d_act,
                                 const Tensor& d_x_sorted, const Tensor& dw_gate, const Tensor& dw_up,
                                 const Tensor& dw_down, Precision precision) {
  const int64_t n_experts = w_gate.size(0), h = w_gate.size(1), d = w_gate.size(2);
  const bool bf16 = grouped_swiglu_backward_rounds(x_sorted, w_gate, w_up, w_down, gate_pre, up_pre, act, d_out_sorted,
                                                   d_act, d_x_sorted, dw_gate, dw_up, dw_down, precision);
  if (runs_padded(offsets)) {
    padded_swiglu_backward(PaddedExperts(offsets, grouped_swiglu_dtype(bf16, w_gate), bf16), x_sorted, w_gate, w_up,
                           w_down, gate_pre, up_pre, act, d_out_sorted, d_x_sorted, dw_gate, dw_up, dw_down);
    return;
  }
  // Every operand and output has the kept tensors' dtype (bf16 under BF16, else the tensors'): x_sorted, d_out_sorted
  // and W_down as they are or rounded, act as the forward kept it, the stacked weights, d_gate_up [S, 2h] (the rows
  // [d_gate | d_up] as the SwiGLU backward writes them), d_act, d_x_sorted, and the weight gradients.
  const DType kept = act.dtype();
  const Tensor x = operand(x_sorted, bf16), wd = operand(w_down, bf16), d_out = operand(d_out_sorted, bf16);
  const Tensor w_gate_up = stacked_gate_up(w_gate, w_up, kept);
  const Tensor d_gate_up = Tensor::empty({d_act.size(0), 2 * h}, kept, Device::CUDA);
  const int64_t element = static_cast<int64_t>(dtype_size(kept));
  std::vector<GemmProblem> d_act_products, dw_down_products, dw_gate_and_up, dx_products;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t begin = offsets[e], c = offsets[e + 1] - offsets[e];
    const char* xs = row_of(x, begin, d);                  // [c, d]
    const char* d_outs = row_of(d_out, begin, d);          // [c, d]
    const char* d_gate = row_of(d_gate_up, begin, 2 * h);  // [c, h], rows 2h apart
    const char* d_up = d_gate + h * element;               // [c, h], the same
    // d_act = d_out W_down: [c, d] x [d, h] -> [c, h]
    d_act_products.push_back({c, h, d, d_outs, d, row_of(wd, e * d, h), h, row_of(d_act, begin, h), h});
    // dW_down = d_out^T act: [c, d]^T x [c, h] -> [d, h]
    dw_down_products.push_back({d, h, c, d_outs, d, row_of(act, begin, h), h, row_of(dw_down, e * d, h), h});
    // dW_gate = d_gate^T x, dW_up = d_up^T x: [c, h]^T x [c, d] -> [h, d]
    dw_gate_and_up.push_back({h, d, c, d_gate, 2 * h, xs, d, row_of(dw_gate, e * h, d), d});
    dw_gate_and_up.push_back({h, d, c, d_up, 2 * h, xs, d, row_of(dw_up, e * h, d), d});
    // d_x = [d_gate | d_up] [W_gate,e ; W_up,e]: [c, 2h] x [2h, d] -> [c, d]
    dx_products.push_back(
        {c, d, 2 * h, d_gate, 2 * h, row_of(w_gate_up, e * 2 * h, d), d, row_of(d_x_sorted, begin, d), d});
  }
  gemm_grouped(false, false, d_act_products, 1.0f, 0.0f, kept, kept);
  gemm_grouped(true, false, dw_down_products, 1.0f, 0.0f, kept, kept);
  // every expert's rows in one launch, into the two halves of d_gate_up's rows
  swiglu_backward_rows(gate_pre, up_pre, d_act, h, 2 * h, kept, d_gate_up.raw_data(), column_of(d_gate_up, h));
  gemm_grouped(true, false, dw_gate_and_up, 1.0f, 0.0f, kept, kept);
  gemm_grouped(false, false, dx_products, 1.0f, 0.0f, kept, kept);
}

// ---- (f) weighted un-permute and its backward -----------------------------------------------------------------------

namespace {

// One block per token n: y[n] = residual[n] + sum_j gates[n, j] * out_sorted[position_of_slot[n, j]], j in order
// (residual null: none), out_sorted's elements (type S) widened to F.
template <class F, class S>
__global__ void weighted_unpermute_kernel(const S* out_sorted, const F* gates, const int32_t* position_of_slot,
                                          const F* residual, int64_t k, int64_t d, F* y) {
  const int64_t n = blockIdx.x;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    F total = 0;
    for (int64_t j = 0; j < k; ++j)
      total += gates[n * k + j] * widened<F>(out_sorted[position_of_slot[n * k + j] * d + i]);
    y[n * d + i] = residual ? residual[n * d + i] + total : total;
  }
}

// One block per token n, its k slots s = n k + j in turn, at positions pos = position_of_slot[s]: d_out_sorted[pos] =
// gates[s] * dy[n] (stored as Out), and d_gates[s] = <dy[n], out_sorted[pos]> as a block reduction (fixed order: the
// same bits on every run). The token's dy row is read from memory once (again from the cache for each slot).
template <class F, class S, class Out>
__global__ void weighted_unpermute_backward_kernel(const F* dy, const S* out_sorted, const F* gates,
                                                   const int32_t* position_of_slot, int64_t k, int64_t d, F* d_gates,
                                                   Out* d_out_sorted) {
  SHARED_ARRAY(F, dot_scratch, 32);  // block_sum's, once for every slot
  const int64_t n = blockIdx.x;
  const F* dy_row = dy + n * d;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t s = n * k + j, pos = position_of_slot[s];
    const F g = gates[s];
    F dot = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      d_out_sorted[pos * d + i] = converted<Out>(g * dy_row[i]);
      dot += dy_row[i] * widened<F>(out_sorted[pos * d + i]);
    }
    dot = block_sum(dot, dot_scratch);
    if (threadIdx.x == 0) d_gates[s] = dot;
  }
}

}  // namespace

void moe_weighted_unpermute(const Tensor& out_sorted, const Tensor& gates, const Tensor& position_of_slot,
                            const Tensor& residual, const Tensor& y) {
  dispatch_float("moe_weighted_unpermute", y.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("moe_weighted_unpermute", out_sorted.dtype(), [&](auto stored_as) {
      using S = decltype(stored_as);
      launch("moe_weighted_unpermute", weighted_unpermute_kernel<F, S>, dim3(y.size(0)), dim3(kRowThreads), 0,
             stored<const S>(out_sorted), gates.data<F>(), position_of_slot.data<int32_t>(),
             residual.defined() ? residual.data<F>() : nullptr, gates.size(1), y.size(1), y.data<F>());
    });
  });
}

void moe_weighted_unpermute_backward(const Tensor& dy, const Tensor& out_sorted, const Tensor& gates,
                                     const Tensor& position_of_slot, const Tensor& d_gates,
                                     const Tensor& d_out_sorted) {
  dispatch_float("moe_weighted_unpermute_backward", dy.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("moe_weighted_unpermute_backward", out_sorted.dtype(), [&](auto in_tag) {
      with_storage<F>("moe_weighted_unpermute_backward", d_out_sorted.dtype(), [&](auto out_tag) {
        using S = decltype(in_tag);
        using Out = decltype(out_tag);
        launch("moe_weighted_unpermute_backward", weighted_unpermute_backward_kernel<F, S, Out>, dim3(dy.size(0)),
               dim3(kRowThreads), 0, dy.data<F>(), stored<const S>(out_sorted), gates.data<F>(),
               position_of_slot.data<int32_t>(), gates.size(1), d_out_sorted.size(1), d_gates.data<F>(),
               stored<Out>(d_out_sorted));
      });
    });
  });
}

// ---- routing: top-k + gates -----------------------------------------------------------------------------------------

namespace {

// topk's total order: larger p first, NaN above everything, ties -> lower id.
template <class F> __device__ bool ranks_before(F pa, int32_t a, F pb, int32_t b) {
  if (isnan(pa) != isnan(pb)) return isnan(pa);
  if (pa != pb && !isnan(pa)) return pa > pb;
  return a < b;
}

// One thread per token: pick j is the best expert ranked after pick j - 1 (k passes over the row); then the chosen
// probabilities' sum in double, j order, and the gates, with the float operations of gather, sum and div.
template <class F>
__global__ void route_gates_forward_kernel(const F* probs, int64_t tokens, int64_t n_experts, int64_t k, bool norm_topk,
                                           int32_t* expert_ids, F* gates, F* chosen_sum) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= tokens) return;
  const F* p = probs + n * n_experts;
  int32_t* ids = expert_ids + n * k;
  for (int64_t j = 0; j < k; ++j) {
    int32_t best = -1;
    for (int32_t e = 0; e < n_experts; ++e) {
      if (j > 0 && !ranks_before(p[ids[j - 1]], ids[j - 1], p[e], e)) continue;
      if (best < 0 || ranks_before(p[e], e, p[best], best)) best = e;
    }
    ids[j] = best;
  }
  double acc = 0;
  for (int64_t j = 0; j < k; ++j) acc += p[ids[j]];
  const F total = static_cast<F>(acc);
  chosen_sum[n] = total;
  for (int64_t j = 0; j < k; ++j) gates[n * k + j] = norm_topk ? p[ids[j]] / total : p[ids[j]];
}

// One thread per token: the row of dprobs is zero but at the chosen experts, which get div's and sum's backward.
template <class F>
__global__ void route_gates_backward_kernel(const F* g, const int32_t* expert_ids, const F* gates, const F* chosen_sum,
                                            int64_t tokens, int64_t n_experts, int64_t k, bool norm_topk, F* dprobs) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= tokens) return;
  const F *gn = g + n * k, *yn = gates + n * k;
  const int32_t* ids = expert_ids + n * k;
  F* dp = dprobs + n * n_experts;
  for (int64_t e = 0; e < n_experts; ++e) dp[e] = 0;
  if (!norm_topk) {
    for (int64_t j = 0; j < k; ++j) dp[ids[j]] += gn[j];
    return;
  }
  const F total = chosen_sum[n];
  double acc = 0;
  for (int64_t j = 0; j < k; ++j) acc += -((gn[j] / total) * yn[j]);
  const F d_total = static_cast<F>(acc);
  for (int64_t j = 0; j < k; ++j) dp[ids[j]] += gn[j] / total + d_total;
}

}  // namespace

void route_gates_forward(const Tensor& probs, bool norm_topk, const Tensor& expert_ids, const Tensor& gates,
                         const Tensor& chosen_sum) {
  const int64_t tokens = probs.size(0);
  dispatch_float("route_gates", probs.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("route_gates_forward", route_gates_forward_kernel<F>, dim3(blocks_for(tokens, kRowThreads)),
           dim3(kRowThreads), 0, probs.data<F>(), tokens, probs.size(1), expert_ids.size(1), norm_topk,
           expert_ids.data<int32_t>(), gates.data<F>(), chosen_sum.data<F>());
  });
}

void route_gates_backward(const Tensor& g, const Tensor& expert_ids, const Tensor& gates, const Tensor& chosen_sum,
                          bool norm_topk, const Tensor& dprobs) {
  const int64_t tokens = dprobs.size(0);
  dispatch_float("route_gates_backward", g.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("route_gates_backward", route_gates_backward_kernel<F>, dim3(blocks_for(tokens, kRowThreads)),
           dim3(kRowThreads), 0, g.data<F>(), expert_ids.data<int32_t>(), gates.data<F>(), chosen_sum.data<F>(), tokens,
           dprobs.size(1), expert_ids.size(1), norm_topk, dprobs.data<F>());
  });
}

}  // namespace moelab::cuda
