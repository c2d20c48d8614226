// The CUDA emulator (MOELAB_CUDA=SIM, engine/cuda/sim/, docs/cuda_emulator.md): the scheduler's barriers and
// schedules, deadlock and error reports, warp collectives, atomics, launch limits, shared memory, the runtime, and the
// cuBLAS stand-in against a naive row-major reference. Built only in the emulator build; ctest runs these cases under
// both schedules (tests/CMakeLists.txt).
#include <cublas_v2.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <ctime>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/cuda/device.cuh"
#include "engine/cuda/mma.cuh"
#include "tests/testing.h"

namespace {

using moelab::cuda::launch;
using moelab::sim::Schedule;
using moelab::testing::error_of;

constexpr unsigned kFullMask = 0xffffffffu;

// Device memory holding a copy of `values`; to_host() reads it back.
template <class T> class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& values) : size_(values.size()) {
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&data_), std::max<size_t>(size_, 1) * sizeof(T)) == cudaSuccess);
    if (size_) REQUIRE(cudaMemcpy(data_, values.data(), size_ * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  explicit DeviceArray(size_t size, T fill = T()) : DeviceArray(std::vector<T>(size, fill)) {}
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(data_); }
  T* get() const { return data_; }
  std::vector<T> to_host() const {
    std::vector<T> values(size_);
    if (size_) REQUIRE(cudaMemcpy(values.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return values;
  }

 private:
  size_t size_;
  T* data_ = nullptr;
};

// Runs a scope under one schedule, then restores the one the environment chose.
class ScheduleScope {
 public:
  ScheduleScope(Schedule schedule, uint64_t seed = 1)
      : previous_(moelab::sim::schedule()), previous_seed_(moelab::sim::schedule_seed()) {
    moelab::sim::set_schedule(schedule, seed);
  }
  ~ScheduleScope() { moelab::sim::set_schedule(previous_, previous_seed_); }

 private:
  Schedule previous_;
  uint64_t previous_seed_;
};

template <class T> uint64_t bits_of(T value) {
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

// ---- kernels ---------------------------------------------------------------------------------------------------------

// Each thread adds a value that names its block and thread to its own slot: every slot must be hit once.
__global__ void record_coordinates(uint32_t* out) {
  uint32_t block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  uint32_t thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  uint32_t threads = blockDim.x * blockDim.y * blockDim.z;
  atomicAdd(&out[block * threads + thread], 1u + block * 10000u + thread);
}

__global__ void rotate_through_shared(const int* in, int* out) {
  SHARED_ARRAY(int, values, 128);
  unsigned t = threadIdx.x, first = blockIdx.x * blockDim.x;
  values[t] = in[first + t];
  __syncthreads();
  out[first + t] = values[(t + 1) % blockDim.x];
}

__global__ void vote_in_block(int* out) {
  int t = int(threadIdx.x);
  int count = __syncthreads_count(t % 3 == 0);
  int all = __syncthreads_and(t < 1000);
  int any = __syncthreads_or(t == 77);
  int none = __syncthreads_or(0);
  if (t == 0) out[0] = count, out[1] = all, out[2] = any, out[3] = none;
}

// The classic shared-memory tree sum; `sync_each_step` false leaves out the barrier between the halving steps.
__global__ void block_sum(const float* in, float* out, bool sync_each_step) {
  SHARED_ARRAY(float, partial, 256);
  unsigned t = threadIdx.x;
  partial[t] = in[t];
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    if (sync_each_step) __syncthreads();
  }
  if (t == 0) *out = partial[0];
}

// One warp: the lanes write a 16 x 16 bf16 tile into shared memory, each its 32nd share, multiply it (as LayoutA
// reads it: the tile or its transpose) by the shift matrix with wmma, and store the product to out in the matching
// layout. Without the __syncwarp a lane can load the tile before the others have written it. shift moves the tile's
// pointer by that many elements (misaligned when not a multiple of 16); split_calls puts lane 0 at another mma_sync.
template <class LayoutA>
__global__ void wmma_shared_tile(const __nv_bfloat16* shift_matrix, float* out, bool sync, int shift,
                                 bool split_calls) {
  using namespace nvcuda;
  DYNAMIC_SHARED(__nv_bfloat16, tile);
  for (int e = static_cast<int>(threadIdx.x); e < 256; e += 32) tile[shift + e] = __float2bfloat16(float(e + 1));
  if (sync) __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::load_matrix_sync(a, tile + shift, 16);
  wmma::load_matrix_sync(b, shift_matrix, 16);
  wmma::fill_fragment(c, 0);
  if (split_calls && threadIdx.x == 0)
    wmma::mma_sync(c, a, b, c);
  else
    wmma::mma_sync(c, a, b, c);
  constexpr bool transposed = std::is_same_v<LayoutA, wmma::col_major>;
  wmma::store_matrix_sync(out, c, 16, transposed ? wmma::mem_col_major : wmma::mem_row_major);
}

// Each thread adds its left neighbour's input, which that neighbour stored just before; `sync` false leaves out the
// barrier in between.
__global__ void add_left_neighbour(const float* in, float* out, bool sync) {
  SHARED_ARRAY(float, values, 256);
  unsigned t = threadIdx.x;
  values[t] = in[t];
  if (sync) __syncthreads();
  out[t] = values[t] + (t > 0 ? values[t - 1] : 0.0f);
}

__global__ void return_before_barrier(int returning_from) {
  if (int(threadIdx.x) >= returning_from) return;
  __syncthreads();
}

__global__ void mismatched_collectives(int* out) {
  unsigned lane = threadIdx.x % 32;
  if (lane < 16) {
    out[lane] = __shfl_sync(kFullMask, int(lane), 0);
  } else {
    __syncwarp();
  }
}

// Lanes 16-31 return; lanes 0-15 name them in their mask.
__global__ void collective_with_returned_lanes(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, int(threadIdx.x), 1);
}

enum ShuffleKind { kIdx, kUp, kDown, kXor };

template <class T> __global__ void shuffle(const T* in, T* out, ShuffleKind kind, int arg, int width) {
  unsigned t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  T value = in[t];
  switch (kind) {
    case kIdx: out[t] = __shfl_sync(kFullMask, value, int(lane * 7 + unsigned(arg)) % 32, width); break;
    case kUp: out[t] = __shfl_up_sync(kFullMask, value, unsigned(arg), width); break;
    case kDown: out[t] = __shfl_down_sync(kFullMask, value, unsigned(arg), width); break;
    case kXor: out[t] = __shfl_xor_sync(kFullMask, value, arg, width); break;
  }
}

// The shuffles by CUDA's documentation, lane by lane, for one warp of 32.
template <class T> std::vector<T> expected_shuffle(const std::vector<T>& in, ShuffleKind kind, int arg, int width) {
  std::vector<T> out(in.size());
  for (int lane = 0; lane < int(in.size()); ++lane) {
    int segment = lane / width * width;  // the first lane of this lane's group of `width`
    int source = lane;
    switch (kind) {
      case kIdx: source = segment + (lane * 7 + arg) % 32 % width; break;
      case kUp: source = lane - arg >= segment ? lane - arg : lane; break;
      case kDown: source = lane + arg < segment + width ? lane + arg : lane; break;
      case kXor: source = (lane ^ arg) < segment + width ? lane ^ arg : lane; break;
    }
    out[size_t(lane)] = in[size_t(source)];
  }
  return out;
}

template <class T> void check_shuffles() {
  std::vector<T> in;
  for (int lane = 0; lane < 32; ++lane) in.push_back(T(lane * 3 + 1));
  DeviceArray<T> device_in(in);
  DeviceArray<T> device_out(32);
  for (int width : {32, 16, 8, 2}) {
    for (ShuffleKind kind : {kIdx, kUp, kDown, kXor}) {
      for (int arg : {0, 1, 3, 5, 16}) {
        launch("shuffle", shuffle<T>, dim3(1), dim3(32), 0, device_in.get(), device_out.get(), kind, arg, width);
        CAPTURE(width);
        CAPTURE(int(kind));
        CAPTURE(arg);
        CHECK(device_out.to_host() == expected_shuffle(in, kind, arg, width));
      }
    }
  }
}

// Lanes 0-15 shuffle among themselves (mask 0x0000ffff); lanes 16-31 do something else.
__global__ void shuffle_half_warp(const float* in, float* out, int width) {
  unsigned lane = threadIdx.x;
  if (lane < 16) {
    out[lane] = __shfl_down_sync(0x0000ffffu, in[lane], 8, width);
  } else {
    out[lane] = -in[lane];
  }
}

// A block of 48: its second warp has 16 lanes, and the full mask names only those.
__global__ void partial_warp(const int* in, int* out, unsigned* ballots) {
  unsigned t = threadIdx.x, lane = t % 32;
  out[2 * t] = __shfl_xor_sync(kFullMask, in[t], 1);
  out[2 * t + 1] = __shfl_down_sync(kFullMask, in[t], 8);
  unsigned ballot = __ballot_sync(kFullMask, 1);
  if (lane == 0) ballots[t / 32] = ballot;
}

__global__ void votes(unsigned* out) {
  unsigned lane = threadIdx.x;
  if (lane == 1) out[3] = __activemask();  // no lane has returned yet
  unsigned even = __ballot_sync(kFullMask, lane % 2 == 0);
  int any_big = __any_sync(kFullMask, lane > 30);
  int all_small = __all_sync(kFullMask, lane < 31);
  if (lane < 8) {
    // Only lanes 0-7 take part: a vote over their mask, and what __activemask says.
    unsigned low = __ballot_sync(0xffu, lane >= 4);
    int all_low = __all_sync(0xffu, lane < 8);
    if (lane == 0) out[4] = low, out[5] = unsigned(all_low), out[6] = __activemask();
  }
  if (lane == 0) out[0] = even, out[1] = unsigned(any_big), out[2] = unsigned(all_small);
  __syncwarp();
}

__global__ void shuffle_bf16(const __nv_bfloat16* in, __nv_bfloat16* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, in[threadIdx.x], 1);
}

__global__ void shuffle_with_mask(unsigned mask, int* out) { out[threadIdx.x] = __shfl_sync(mask, 1, 0); }
__global__ void shuffle_with_width(int width, int* out) { out[threadIdx.x] = __shfl_down_sync(kFullMask, 1, 1, width); }

struct AtomicCounters {
  float f;
  double d;
  int i;
  unsigned u;
  unsigned long long ull;
  int max, min;
  unsigned umax, umin;
  int cas_sum;
  int exchanged;
  unsigned wrapped;
};

__global__ void update_counters(AtomicCounters* c) {
  int t = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&c->f, 1.0f);
  atomicAdd(&c->d, 0.5);
  atomicAdd(&c->i, t);
  atomicAdd(&c->u, 2u);
  atomicAdd(&c->ull, 1ull << 33);
  atomicMax(&c->max, t * 7 % 101);
  atomicMin(&c->min, t * 7 % 101 - 50);
  atomicMax(&c->umax, unsigned(t));
  atomicMin(&c->umin, unsigned(t) + 5);
  int old = c->cas_sum, assumed;  // an add made of compare-and-swap, as kernels write them
  do {
    assumed = old;
    old = atomicCAS(&c->cas_sum, assumed, assumed + t);
  } while (old != assumed);
  atomicExch(&c->exchanged, t);
  atomicInc(&c->wrapped, 9u);  // counts 0..9, then wraps to 0
}

__global__ void empty_kernel() {}

__global__ void uses_dynamic_shared(float* out) {
  DYNAMIC_SHARED(float, buffer);
  buffer[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = buffer[threadIdx.x];
}

__global__ void uses_64k_static_shared(float* out) {
  SHARED_ARRAY(float, first, 8192);
  SHARED_ARRAY(float, second, 8192);
  out[0] = first[0] + second[0];
}

__global__ void uses_40k_static_and_dynamic_shared(float* out) {
  SHARED_ARRAY(float, fixed, 10240);
  DYNAMIC_SHARED(float, dynamic);
  out[0] = fixed[0] + dynamic[0];
}

// Thread 0 of each block reports whether the block's shared memory started as NaN bytes, then overwrites it.
__global__ void read_shared_before_writing(int* fresh) {
  SHARED_ARRAY(float, values, 64);
  DYNAMIC_SHARED(float, dynamic);
  if (threadIdx.x != 0) return;
  bool nan = true;
  for (int i = 0; i < 64; ++i) {
    nan = nan && __float_as_uint(values[i]) == 0xffffffffu && __float_as_uint(dynamic[i]) == 0xffffffffu;
  }
  fresh[blockIdx.x] = nan;
  for (int i = 0; i < 64; ++i) values[i] = dynamic[i] = 1.0f;
}

__global__ void shared_addresses(uintptr_t* out) {
  SHARED_ARRAY(int, small, 4);
  SHARED_ARRAY(double, large, 3);
  out[2 * threadIdx.x] = reinterpret_cast<uintptr_t>(small);
  out[2 * threadIdx.x + 1] = reinterpret_cast<uintptr_t>(large);
}

__global__ void shared_array_in_a_loop(float* out) {
  for (int i = 0; i < 2; ++i) {
    SHARED_ARRAY(float, scratch, 4);
    scratch[0] = float(i);
    out[0] = scratch[0];
  }
}

__global__ void throw_in_one_thread() {
  if (blockIdx.x == 2 && threadIdx.x == 5) throw std::runtime_error("thread 5 gives up");
  __syncthreads();
}

__global__ void trapping() {
  if (threadIdx.x == 3) __trap();
}

__global__ void launching_a_kernel() { launch("empty_kernel", empty_kernel, dim3(1), dim3(1), 0); }

// Each thread counts its own copy of n down to 0.
__global__ void count_down(int n, int* total) {
  while (n > 0) {
    --n;
    atomicAdd(total, 1);
  }
}

// nvcc's keywords compile as plain C++ (with no warnings under -Wall -Wextra).
struct Halve {
  __host__ __device__ float operator()(float x) const { return 0.5f * x; }
};
__device__ __forceinline__ float twice(float x) { return 2.0f * x; }
__global__ void __launch_bounds__(64) keywords(float* out) { out[threadIdx.x] = Halve()(twice(float(threadIdx.x))); }

__global__ void write_index(int* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = int(threadIdx.x); }

__global__ void neighbour_through_shared(int* out) {
  SHARED_ARRAY(int, values, 256);
  values[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

}  // namespace

// ---- the scheduler ---------------------------------------------------------------------------------------------------

TEST_CASE("sim: every thread of every block runs once, with its coordinates") {
  dim3 grid(3, 2, 2), block(5, 4, 3);  // 60 threads: not a multiple of a warp
  DeviceArray<uint32_t> out(12 * 60);
  launch("record_coordinates", record_coordinates, grid, block, 0, out.get());
  std::vector<uint32_t> expected;
  for (uint32_t b = 0; b < 12; ++b) {
    for (uint32_t t = 0; t < 60; ++t) expected.push_back(1 + b * 10000 + t);
  }
  CHECK(out.to_host() == expected);
}

TEST_CASE("sim: __syncthreads separates the phases of a block, under both schedules") {
  std::vector<int> in(300);
  for (int i = 0; i < 300; ++i) in[size_t(i)] = i * i;
  std::vector<int> expected(300);
  for (int b = 0; b < 3; ++b) {
    for (int t = 0; t < 100; ++t) expected[size_t(b * 100 + t)] = in[size_t(b * 100 + (t + 1) % 100)];
  }
  for (Schedule schedule : {Schedule::forward, Schedule::shuffled}) {
    ScheduleScope scope(schedule);
    DeviceArray<int> device_in(in), out(300);
    launch("rotate_through_shared", rotate_through_shared, dim3(3), dim3(100), 0, device_in.get(), out.get());
    CHECK(out.to_host() == expected);
  }
}

TEST_CASE("sim: __syncthreads_count, _and and _or reduce over the block") {
  DeviceArray<int> out(4);
  launch("vote_in_block", vote_in_block, dim3(1), dim3(100), 0, out.get());
  CHECK(out.to_host() == std::vector<int>{34, 1, 1, 0});
}

// A missing __syncthreads shows up as a wrong result (shared memory starts as NaN). Forward order catches a thread
// that reads what a later thread writes; only a shuffled order catches one that reads what an earlier thread writes
// (and reverse order would hide the first kind): hence two schedules.
TEST_CASE("sim: a missing __syncthreads is caught") {
  std::vector<float> in(256);
  for (int i = 0; i < 256; ++i) in[size_t(i)] = float(i + 1);
  DeviceArray<float> device_in(in), sum(1), out(256);
  auto block_sum_with = [&](bool sync_each_step) {
    launch("block_sum", block_sum, dim3(1), dim3(256), 0, device_in.get(), sum.get(), sync_each_step);
    return sum.to_host()[0];
  };
  auto neighbours_right = [&](bool sync) {
    launch("add_left_neighbour", add_left_neighbour, dim3(1), dim3(256), 0, device_in.get(), out.get(), sync);
    std::vector<float> got = out.to_host();
    for (int t = 0; t < 256; ++t) {
      if (got[size_t(t)] != in[size_t(t)] + (t > 0 ? in[size_t(t - 1)] : 0.0f)) return false;
    }
    return true;
  };
  const float exact = 256.0f * 257.0f / 2.0f;
  {
    ScheduleScope scope(Schedule::forward);
    CHECK(block_sum_with(true) == exact);
    CHECK(block_sum_with(false) != exact);  // thread 0 reads partial sums that later threads have not added yet
    CHECK(neighbours_right(true));
    CHECK(neighbours_right(false));  // hidden: each left neighbour ran first
  }
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    ScheduleScope scope(Schedule::shuffled, seed);
    CAPTURE(seed);
    CHECK(block_sum_with(true) == exact);
    CHECK(block_sum_with(false) != exact);
    CHECK(neighbours_right(true));
    CHECK_FALSE(neighbours_right(false));
  }
}

// The emulator's wmma (engine/cuda/sim/mma.h), stricter than NVIDIA's documentation about memory: a missing
// __syncwarp before a load of what other lanes stored reads stale shared memory (NaN) under both schedules. The
// shift matrix is not symmetric, so a swapped layout of b or of the store shows; a col_major a with a mem_col_major
// store gives (a^T S)^T. A tile the tensor cores cannot take, lanes at different calls, and a partial warp fail the
// launch.
TEST_CASE("sim: wmma: layouts, a load without __syncwarp after the lanes' stores, and launches that must fail") {
  using nvcuda::wmma::col_major;
  using nvcuda::wmma::row_major;
  std::vector<__nv_bfloat16> shift(256, __float2bfloat16(0.0f));  // S[k][(k + 1) % 16] = 1: (A S)[r][n] = A[r][n - 1]
  for (int k = 0; k < 16; ++k) shift[size_t(k * 16 + (k + 1) % 16)] = __float2bfloat16(1.0f);
  DeviceArray<__nv_bfloat16> device_shift(shift);
  DeviceArray<float> out(256);
  const size_t shared = 512 * sizeof(__nv_bfloat16);
  auto run = [&](auto kernel, bool sync, int offset, bool split, unsigned threads) {
    launch("wmma_shared_tile", kernel, dim3(1), dim3(threads), shared, device_shift.get(), out.get(), sync, offset,
           split);
  };
  // The tile holds e + 1 at e = 16 r + c. Row-major a: out[16 r + n] = tile[r][n - 1]; col-major a and store:
  // out[16 n + r] = (a^T S)[r][n] = tile[n - 1][r].
  auto product_is_right = [&](bool transposed, bool sync) {
    if (transposed)
      run(wmma_shared_tile<col_major>, sync, 0, false, 32);
    else
      run(wmma_shared_tile<row_major>, sync, 0, false, 32);
    std::vector<float> got = out.to_host();
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) {
        const float expected = transposed ? float(16 * ((n + 15) % 16) + r + 1) : float(16 * r + (n + 15) % 16 + 1);
        if (got[size_t(transposed ? 16 * n + r : 16 * r + n)] != expected) return false;
      }
    return true;
  };
  for (Schedule schedule : {Schedule::forward, Schedule::shuffled}) {
    ScheduleScope scope(schedule);
    for (bool transposed : {false, true}) {
      CAPTURE(transposed);
      CHECK(product_is_right(transposed, true));
      CHECK_FALSE(product_is_right(transposed, false));
    }
  }
  auto report_of = [&](int offset, bool split, unsigned threads) {
    return error_of([&] { run(wmma_shared_tile<row_major>, true, offset, split, threads); });
  };
  std::string report = report_of(8, false, 32);
  CHECK(report.find("wmma_shared_tile") != std::string::npos);
  CHECK(report.find("32-byte aligned") != std::string::npos);
  report = report_of(0, true, 32);
  CHECK(report.find("deadlocked") != std::string::npos);
  CHECK(report.find("wmma::*_sync") != std::string::npos);
  report = report_of(0, false, 16);
  CHECK(report.find("whole warps") != std::string::npos);
}

TEST_CASE("sim: deadlocks name the kernel, the block and where each thread waits") {
  std::string report =
      error_of([] { launch("return_before_barrier", return_before_barrier, dim3(2), dim3(64), 0, 32); });
  CHECK(report.find("kernel 'return_before_barrier' deadlocked in block (0,0,0)") != std::string::npos);
  CHECK(report.find("threads 0-31 wait at __syncthreads at test_cuda_sim.cpp:") != std::string::npos);
  CHECK(report.find("threads 32-63 have returned") != std::string::npos);

  DeviceArray<int> out(32);
  report = error_of([&] { launch("mismatched_collectives", mismatched_collectives, dim3(1), dim3(32), 0, out.get()); });
  CHECK(report.find("kernel 'mismatched_collectives' deadlocked") != std::string::npos);
  CHECK(report.find("threads 0-15 wait at __shfl_sync (mask 0xffffffff) at test_cuda_sim.cpp:") != std::string::npos);
  CHECK(report.find("threads 16-31 wait at __syncwarp (mask 0xffffffff)") != std::string::npos);

  report = error_of([&] {
    launch("collective_with_returned_lanes", collective_with_returned_lanes, dim3(1), dim3(32), 0, out.get());
  });
  CHECK(report.find("threads 0-15 wait at __shfl_xor_sync (mask 0xffffffff)") != std::string::npos);
  CHECK(report.find("threads 16-31 have returned") != std::string::npos);

  // The abandoned threads were unwound: the emulator runs the next kernel as usual.
  DeviceArray<int> neighbours(2 * 64);
  launch("neighbour_through_shared", neighbour_through_shared, dim3(2), dim3(64), 0, neighbours.get());
  std::vector<int> got = neighbours.to_host();
  CHECK(got[0] == 1);
  CHECK(got[127] == 0);
}

TEST_CASE("sim: an exception in a kernel leaves the launch naming the kernel, block and thread") {
  std::string error = error_of([] { launch("throw_in_one_thread", throw_in_one_thread, dim3(4), dim3(32), 0); });
  CHECK(error == "kernel 'throw_in_one_thread' failed in block (2,0,0), thread (5,0,0): thread 5 gives up");
  error = error_of([] { launch("trapping", trapping, dim3(1), dim3(8), 0); });
  CHECK(error.find("kernel 'trapping' failed in block (0,0,0), thread (3,0,0): __trap() at test_cuda_sim.cpp:") == 0);
  error = error_of([] { launch("launching_a_kernel", launching_a_kernel, dim3(1), dim3(1), 0); });
  CHECK(error.find("kernel 'empty_kernel' launched from inside kernel 'launching_a_kernel'") != std::string::npos);
  CHECK(error_of([] { __syncthreads(); }) == "__syncthreads called outside a kernel");

  DeviceArray<int> out(64);
  launch("write_index", write_index, dim3(2), dim3(32), 0, out.get());
  CHECK(out.to_host()[33] == 1);
}

TEST_CASE("sim: __host__ __device__ functors, __forceinline__ helpers and __launch_bounds__ compile and run") {
  DeviceArray<float> out(64);
  launch("keywords", keywords, dim3(1), dim3(64), 0, out.get());
  CHECK(out.to_host()[63] == 63.0f);
  CHECK(Halve()(3.0f) == 1.5f);  // and the functor on the host
}

TEST_CASE("sim: every thread gets its own copy of the kernel's parameters") {
  DeviceArray<int> total(1);
  launch("count_down", count_down, dim3(2), dim3(32), 0, 3, total.get());
  CHECK(total.to_host()[0] == 2 * 32 * 3);
}

// ---- warp collectives ------------------------------------------------------------------------------------------------

TEST_CASE("sim: warp shuffles of every type, kind, offset and width") {
  check_shuffles<int>();
  check_shuffles<unsigned>();
  check_shuffles<float>();
  check_shuffles<double>();
  check_shuffles<long long>();
  check_shuffles<unsigned long long>();
}

TEST_CASE("sim: shuffles with a partial mask, in a partial warp, and of bf16") {
  std::vector<float> in(32);
  for (int i = 0; i < 32; ++i) in[size_t(i)] = float(i);
  DeviceArray<float> device_in(in), out(32);
  // Width 32: lanes 8-15 read lanes 16-23, which are not in the mask: undefined, read as NaN.
  launch("shuffle_half_warp", shuffle_half_warp, dim3(1), dim3(32), 0, device_in.get(), out.get(), 32);
  std::vector<float> got = out.to_host();
  for (int lane = 0; lane < 8; ++lane) CHECK(got[size_t(lane)] == float(lane + 8));
  for (int lane = 8; lane < 16; ++lane) CHECK(bits_of(got[size_t(lane)]) == 0xffffffffu);
  for (int lane = 16; lane < 32; ++lane) CHECK(got[size_t(lane)] == -float(lane));
  // Width 16: lanes 8-15 would leave their segment, so they keep their own value.
  launch("shuffle_half_warp", shuffle_half_warp, dim3(1), dim3(32), 0, device_in.get(), out.get(), 16);
  got = out.to_host();
  for (int lane = 0; lane < 16; ++lane) CHECK(got[size_t(lane)] == float(lane < 8 ? lane + 8 : lane));

  std::vector<int> values(48);
  for (int i = 0; i < 48; ++i) values[size_t(i)] = 100 + i;
  DeviceArray<int> device_values(values), pairs(96);
  DeviceArray<unsigned> ballots(2);
  launch("partial_warp", partial_warp, dim3(1), dim3(48), 0, device_values.get(), pairs.get(), ballots.get());
  std::vector<int> shuffled = pairs.to_host();
  for (int t = 0; t < 48; ++t) {
    CAPTURE(t);
    CHECK(shuffled[size_t(2 * t)] == 100 + (t ^ 1));
    int down = t % 32 + 8 < 32 ? t + 8 : t;  // in the second warp, lanes 8-15 read lanes 16-23, which do not exist
    CHECK(shuffled[size_t(2 * t + 1)] == (t >= 40 ? -1 : 100 + down));
  }
  CHECK(ballots.to_host() == std::vector<unsigned>{kFullMask, 0xffffu});

  std::vector<__nv_bfloat16> halves;
  for (int i = 0; i < 32; ++i) halves.push_back(__float2bfloat16(float(i) / 4));
  DeviceArray<__nv_bfloat16> device_halves(halves), swapped(32);
  launch("shuffle_bf16", shuffle_bf16, dim3(1), dim3(32), 0, device_halves.get(), swapped.get());
  std::vector<__nv_bfloat16> got_halves = swapped.to_host();
  for (int i = 0; i < 32; ++i) CHECK(__bfloat162float(got_halves[size_t(i)]) == float(i ^ 1) / 4);
}

TEST_CASE("sim: ballot, any, all and activemask") {
  DeviceArray<unsigned> out(7);
  launch("votes", votes, dim3(1), dim3(32), 0, out.get());
  std::vector<unsigned> got = out.to_host();
  CHECK(got[0] == 0x55555555u);
  CHECK(got[1] == 1);
  CHECK(got[2] == 0);
  CHECK(got[3] == kFullMask);
  CHECK(got[4] == 0xf0u);
  CHECK(got[5] == 1);
  CHECK(got[6] == kFullMask);  // the emulator does not know which lanes took the branch: the running ones
}

TEST_CASE("sim: a collective whose mask leaves out its own lane, or with a bad width, is an error") {
  DeviceArray<int> out(32);
  std::string error =
      error_of([&] { launch("shuffle_with_mask", shuffle_with_mask, dim3(1), dim3(2), 0, 1u, out.get()); });
  CHECK(error.find("kernel 'shuffle_with_mask' failed in block (0,0,0), thread (1,0,0): __shfl_sync at "
                   "test_cuda_sim.cpp:") == 0);
  CHECK(error.find("with mask 0x00000001, which does not include the calling lane 1") != std::string::npos);
  error = error_of([&] { launch("shuffle_with_width", shuffle_with_width, dim3(1), dim3(32), 0, 3, out.get()); });
  CHECK(error.find("with width 3: it must be a power of 2 from 1 to 32") != std::string::npos);
}

// ---- atomics, limits, shared memory ----------------------------------------------------------------------------------

TEST_CASE("sim: atomics") {
  AtomicCounters initial{};
  initial.min = 1000;
  initial.umin = 1000;
  DeviceArray<AtomicCounters> counters(std::vector<AtomicCounters>{initial});
  launch("update_counters", update_counters, dim3(4), dim3(64), 0, counters.get());
  AtomicCounters c = counters.to_host()[0];
  CHECK(c.f == 256.0f);
  CHECK(c.d == 128.0);
  CHECK(c.i == 255 * 256 / 2);
  CHECK(c.u == 512u);
  CHECK(c.ull == 256ull << 33);
  CHECK(c.max == 100);
  CHECK(c.min == -50);
  CHECK(c.umax == 255u);
  CHECK(c.umin == 5u);
  CHECK(c.cas_sum == 255 * 256 / 2);
  CHECK((c.exchanged >= 0 && c.exchanged < 256));
  CHECK(c.wrapped == 256 % 10);
}

TEST_CASE("sim: launches outside CUDA's limits are refused, naming the kernel") {
  auto error_of_launch = [](dim3 grid, dim3 block) {
    return error_of([&] { moelab::sim::launch("empty_kernel", empty_kernel, grid, block, 0); });
  };
  CHECK(error_of_launch(dim3(1), dim3(32, 33)) == "kernel 'empty_kernel': block (32,33,1) has 1056 threads, more "
                                                  "than 1024");
  CHECK(error_of_launch(dim3(1), dim3(1, 1, 65)).find("kernel 'empty_kernel': block (1,1,65) exceeds") == 0);
  CHECK(error_of_launch(dim3(1), dim3(1025)).find("block (1025,1,1) exceeds") != std::string::npos);
  CHECK(error_of_launch(dim3(1, 65536), dim3(1)).find("grid (1,65536,1) exceeds") != std::string::npos);
  CHECK(error_of_launch(dim3(0), dim3(1)) == "kernel 'empty_kernel': grid (0,1,1) is empty");
  CHECK(error_of_launch(dim3(1), dim3(0)) == "kernel 'empty_kernel': block (0,1,1) is empty");
  CHECK(error_of_launch(dim3(2147483648u), dim3(1)).find("grid (2147483648,1,1) exceeds") != std::string::npos);
}

TEST_CASE("sim: shared memory limits, and the opt-in to more than 48 KB") {
  DeviceArray<float> out(64);
  launch("uses_dynamic_shared", uses_dynamic_shared, dim3(1), dim3(64), 48 * 1024, out.get());
  std::string error =
      error_of([&] { launch("uses_dynamic_shared", uses_dynamic_shared, dim3(1), dim3(64), 100 * 1024, out.get()); });
  CHECK(error == "kernel 'uses_dynamic_shared': 102400 bytes of dynamic shared memory: more than 48 KB needs "
                 "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first");
  REQUIRE(cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024) ==
          cudaSuccess);
  launch("uses_dynamic_shared", uses_dynamic_shared, dim3(1), dim3(64), 100 * 1024, out.get());
  CHECK(out.to_host()[63] == 63.0f);
  error = error_of(
      [&] { launch("uses_dynamic_shared", uses_dynamic_shared, dim3(1), dim3(64), 100 * 1024 + 4, out.get()); });
  CHECK(error.find("more than the 102400 its cudaFuncSetAttribute allowed") != std::string::npos);
  CHECK(cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
        cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaSuccess);

  error = error_of([&] { launch("uses_64k_static_shared", uses_64k_static_shared, dim3(1), dim3(1), 0, out.get()); });
  CHECK(error.find("kernel 'uses_64k_static_shared' failed") == 0);
  CHECK(error.find("65536 bytes of static shared memory in all, more than 48 KB") != std::string::npos);

  REQUIRE(cudaFuncSetAttribute(uses_40k_static_and_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               200 * 1024) == cudaSuccess);
  error = error_of([&] {
    launch("uses_40k_static_and_dynamic_shared", uses_40k_static_and_dynamic_shared, dim3(1), dim3(1), 200 * 1024,
           out.get());
  });
  CHECK(error.find("40960 bytes of static and 204800 of dynamic shared memory, more than 227 KB") != std::string::npos);
}

TEST_CASE("sim: shared memory starts as NaN bytes in every block, and every thread sees the same arrays") {
  DeviceArray<int> fresh(3);
  launch("read_shared_before_writing", read_shared_before_writing, dim3(3), dim3(32), 64 * sizeof(float), fresh.get());
  CHECK(fresh.to_host() == std::vector<int>{1, 1, 1});

  DeviceArray<uintptr_t> addresses(2 * 40);
  launch("shared_addresses", shared_addresses, dim3(1), dim3(40), 0, addresses.get());
  std::vector<uintptr_t> got = addresses.to_host();
  for (int t = 0; t < 40; ++t) {
    CHECK(got[size_t(2 * t)] == got[0]);
    CHECK(got[size_t(2 * t + 1)] == got[1]);
  }
  CHECK(got[0] != got[1]);
  CHECK(got[1] % alignof(double) == 0);

  DeviceArray<float> out(1);
  std::string error =
      error_of([&] { launch("shared_array_in_a_loop", shared_array_in_a_loop, dim3(1), dim3(1), 0, out.get()); });
  CHECK(error.find("declared twice by one thread (in a loop?)") != std::string::npos);
}

// ---- the runtime -----------------------------------------------------------------------------------------------------

TEST_CASE("sim: the runtime's device, memory, errors and events") {
  CHECK(moelab::cuda::built_with_cuda());
  CHECK(moelab::cuda::is_simulator());
  CHECK(moelab::cuda::device_count() == 1);
  CHECK(moelab::cuda::device_name() == "moelab CUDA emulator");
  cudaDeviceProp props;
  REQUIRE(cudaGetDeviceProperties(&props, 0) == cudaSuccess);
  CHECK(props.major == 9);
  CHECK(props.warpSize == 32);
  CHECK(props.maxThreadsPerBlock == 1024);
  CHECK(props.sharedMemPerBlock == 48 * 1024);
  CHECK(props.sharedMemPerBlockOptin == 227 * 1024);

  // CUDA's last error: a failing call sets it, cudaPeekAtLastError reads it, cudaGetLastError reads and clears it.
  CHECK(cudaSetDevice(1) == cudaErrorInvalidDevice);
  CHECK(cudaPeekAtLastError() == cudaErrorInvalidDevice);
  CHECK(cudaGetLastError() == cudaErrorInvalidDevice);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(std::string(cudaGetErrorString(cudaErrorInvalidValue)) == "invalid argument");

  // Fresh device memory holds NaN bytes; copies check that their device side is device memory.
  size_t free_before, total;
  REQUIRE(cudaMemGetInfo(&free_before, &total) == cudaSuccess);
  void* device = moelab::cuda::allocate(16);
  size_t free_after;
  REQUIRE(cudaMemGetInfo(&free_after, &total) == cudaSuccess);
  CHECK(free_before - free_after == 16);
  std::vector<uint32_t> host(4);
  moelab::cuda::copy_to_host(host.data(), device, 16);
  CHECK(host == std::vector<uint32_t>(4, 0xffffffffu));
  moelab::cuda::set_zero(device, 16);
  moelab::cuda::copy_to_host(host.data(), device, 16);
  CHECK(host == std::vector<uint32_t>(4, 0));
  std::vector<uint32_t> other(4);
  CHECK(cudaMemcpy(other.data(), host.data(), 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
  CHECK(cudaMemcpy(host.data(), device, 17, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
  CHECK(cudaFree(host.data()) == cudaErrorInvalidValue);
  cudaGetLastError();
  moelab::cuda::release(device);

  // The pool's high-water mark: a reset restarts it from what is in use now; a release leaves it.
  moelab::cuda::reset_peak_memory();
  const size_t in_use = moelab::cuda::peak_memory_bytes();
  void* block = moelab::cuda::allocate(1 << 20);
  moelab::cuda::release(block);
  CHECK(moelab::cuda::peak_memory_bytes() == in_use + (1 << 20));
  moelab::cuda::reset_peak_memory();
  CHECK(moelab::cuda::peak_memory_bytes() == in_use);
  cudaMemPool_t pool;
  REQUIRE(cudaDeviceGetDefaultMemPool(&pool, 0) == cudaSuccess);
  uint64_t nonzero = 1;
  CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &nonzero) == cudaErrorInvalidValue);  // only 0
  cudaGetLastError();

  cudaEvent_t start, end;
  REQUIRE(cudaEventCreate(&start) == cudaSuccess);
  REQUIRE(cudaEventCreate(&end) == cudaSuccess);
  float ms = -1;
  CHECK(cudaEventElapsedTime(&ms, start, end) == cudaErrorInvalidResourceHandle);  // not recorded yet
  cudaGetLastError();
  CHECK(cudaEventRecord(start, moelab::cuda::stream()) == cudaSuccess);
  CHECK(cudaEventRecord(end, moelab::cuda::stream()) == cudaSuccess);
  CHECK(cudaEventSynchronize(end) == cudaSuccess);
  CHECK(cudaEventElapsedTime(&ms, start, end) == cudaSuccess);
  CHECK(ms >= 0);
  cudaEventDestroy(start);
  cudaEventDestroy(end);

  moelab::cuda::TimingEvent before, after;  // the same through the engine's wrapper
  before.record();
  after.record();
  CHECK(after.ms_since(before) >= 0);
}

TEST_CASE("sim: bf16 arithmetic on the host, and the math cuda_bf16.h leaves to the device") {
  __nv_bfloat16 a = __float2bfloat16(1.5f), b = __float2bfloat16(-2.25f);
  CHECK(__bfloat162float(a * b) == -3.375f);
  CHECK(__bfloat162float(a + b) == -0.75f);
  CHECK(__bfloat162float(__hfma(a, b, a)) == -1.875f);
  CHECK(__bfloat162float(__float2bfloat16(1.00390625f)) == 1.0f);  // halfway: ties to even
  CHECK(__bfloat162float(hexp(__float2bfloat16(0.0f))) == 1.0f);
  CHECK(__bfloat162float(hsqrt(__float2bfloat16(4.0f))) == 2.0f);
  CHECK(__bfloat162float(hrsqrt(__float2bfloat16(4.0f))) == 0.5f);
  CHECK(__bfloat162float(htanh(__float2bfloat16(0.0f))) == 0.0f);
  __nv_bfloat162 pair = __floats2bfloat162_rn(1.0f, 2.0f);
  pair = __hfma2(pair, pair, pair);
  CHECK(__low2float(pair) == 2.0f);
  CHECK(__high2float(pair) == 6.0f);
  CHECK(__bfloat162int_rn(__float2bfloat16(2.5f)) == 2);
}

TEST_CASE("sim: intrinsics behave as on the GPU where C++ would not") {
  CHECK(__float2int_rn(NAN) == 0);  // conversions saturate, NaN gives 0
  CHECK(__float2int_rn(3e9f) == 2147483647);
  CHECK(__float2int_rz(-3e9f) == -2147483647 - 1);
  CHECK(__float2uint_rn(-1.0f) == 0u);
  CHECK(__float2int_rn(2.5f) == 2);  // ties to even
  CHECK(__saturatef(NAN) == 0.0f);
  CHECK(__saturatef(1.5f) == 1.0f);
  CHECK(__brev(1u) == 0x80000000u);
  CHECK(__clz(0) == 32);
  CHECK(__popc(0xf0f0u) == 8);
  CHECK(max(3, 7u) == 7u);  // CUDA's mixed overloads: the common type
  CHECK(min(-1, 2) == -1);
  CHECK(max(int64_t(5), int64_t(-5)) == 5);
  CHECK(max(1.0f, NAN) == 1.0f);  // fmaxf skips a NaN
  CHECK(__int_as_float(0x3f800000) == 1.0f);
}

// ---- the cuBLAS stand-in ---------------------------------------------------------------------------------------------

namespace {

// Random multiples of 1/8 in [-2, 2]: exact in bf16 and TF32, and their products and sums exact in float.
std::vector<float> dyadic_values(size_t count, uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_int_distribution<int> eighths(-16, 16);
  std::vector<float> values(count);
  for (float& value : values) value = float(eighths(generator)) / 8.0f;
  return values;
}

std::vector<float> random_values(size_t count, uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(count);
  for (float& value : values) value = uniform(generator);
  return values;
}

// A row-major matrix as moelab stores it: `rows` x `cols`, each row `ld` elements apart (ld >= cols).
struct RowMajor {
  int rows, cols, ld;
  std::vector<float> data;
  float at(int r, int c) const { return data[size_t(r * ld + c)]; }
};

RowMajor row_major(int rows, int cols, int ld, std::vector<float> values) {
  return RowMajor{rows, cols, ld, std::move(values)};
}

// C = alpha op(A) op(B) + beta C, row-major, in double: the reference.
std::vector<double> reference_gemm(bool transa, bool transb, int M, int N, int K, double alpha, const RowMajor& A,
                                   const RowMajor& B, double beta, const RowMajor& C) {
  std::vector<double> out(size_t(M * C.ld));
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      double sum = 0;
      for (int p = 0; p < K; ++p) sum += double(transa ? A.at(p, i) : A.at(i, p)) * (transb ? B.at(j, p) : B.at(p, j));
      out[size_t(i * C.ld + j)] = alpha * sum + (beta != 0 ? beta * C.at(i, j) : 0.0);
    }
  }
  return out;
}

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& values) {
  std::vector<__nv_bfloat16> out;
  for (float value : values) out.push_back(__float2bfloat16(value));
  return out;
}

cublasOperation_t op(bool transposed) { return transposed ? CUBLAS_OP_T : CUBLAS_OP_N; }

struct Handle {
  cublasHandle_t handle = nullptr;
  Handle() { REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS); }
  ~Handle() { cublasDestroy(handle); }
};

// Row-major C = op(A) op(B) through column-major cuBLAS: a row-major matrix read column-major is its transpose, so
// call cuBLAS for C^T = op(B)^T op(A)^T: B first, the sizes N, M, K, the transpose flags as they are.
void check_row_major_gemm(cublasHandle_t handle, bool transa, bool transb, int M, int N, int K, int pad, float alpha,
                          float beta, cudaDataType ab_type, cudaDataType c_type, uint32_t seed) {
  CAPTURE(transa);
  CAPTURE(transb);
  CAPTURE(M);
  CAPTURE(N);
  CAPTURE(K);
  CAPTURE(pad);
  int a_rows = transa ? K : M, a_cols = transa ? M : K;
  int b_rows = transb ? N : K, b_cols = transb ? K : N;
  bool bf16 = ab_type == CUDA_R_16BF;
  auto values = [&](size_t count, uint32_t s) { return bf16 ? dyadic_values(count, s) : random_values(count, s); };
  RowMajor A = row_major(a_rows, a_cols, a_cols + pad, values(size_t(a_rows * (a_cols + pad)), seed));
  RowMajor B = row_major(b_rows, b_cols, b_cols + pad, values(size_t(b_rows * (b_cols + pad)), seed + 1));
  RowMajor C = row_major(M, N, N + pad, values(size_t(M * (N + pad)), seed + 2));
  if (beta == 0) std::fill(C.data.begin(), C.data.end(), NAN);  // beta == 0: C must not be read
  std::vector<double> expected = reference_gemm(transa, transb, M, N, K, alpha, A, B, beta, C);

  cublasStatus_t status;
  std::vector<double> got(expected.size());
  if (bf16) {
    DeviceArray<__nv_bfloat16> a(to_bf16(A.data)), b(to_bf16(B.data));
    if (c_type == CUDA_R_16BF) {
      DeviceArray<__nv_bfloat16> c(to_bf16(C.data));
      status =
          cublasGemmEx(handle, op(transb), op(transa), N, M, K, &alpha, b.get(), CUDA_R_16BF, B.ld, a.get(),
                       CUDA_R_16BF, A.ld, &beta, c.get(), CUDA_R_16BF, C.ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      std::vector<__nv_bfloat16> out = c.to_host();
      for (size_t i = 0; i < got.size(); ++i) got[i] = __bfloat162float(out[i]);
      for (double& e : expected) e = __bfloat162float(__double2bfloat16(e));  // the exact sum, rounded once
    } else {
      DeviceArray<float> c(C.data);
      status =
          cublasGemmEx(handle, op(transb), op(transa), N, M, K, &alpha, b.get(), CUDA_R_16BF, B.ld, a.get(),
                       CUDA_R_16BF, A.ld, &beta, c.get(), CUDA_R_32F, C.ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      std::vector<float> out = c.to_host();
      got.assign(out.begin(), out.end());
    }
  } else {
    DeviceArray<float> a(A.data), b(B.data), c(C.data);
    status = cublasGemmEx(handle, op(transb), op(transa), N, M, K, &alpha, b.get(), CUDA_R_32F, B.ld, a.get(),
                          CUDA_R_32F, A.ld, &beta, c.get(), CUDA_R_32F, C.ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    std::vector<float> out = c.to_host();
    got.assign(out.begin(), out.end());
  }
  REQUIRE(status == CUBLAS_STATUS_SUCCESS);
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      size_t at = size_t(i * C.ld + j);
      CAPTURE(i);
      CAPTURE(j);
      CHECK(std::abs(got[at] - expected[at]) <= 1e-6 * (1 + std::abs(expected[at])));
    }
  }
}

}  // namespace

TEST_CASE("sim: cuBLAS GemmEx matches a row-major reference: every transpose, odd sizes, padded rows") {
  Handle h;
  uint32_t seed = 1;
  for (bool transa : {false, true}) {
    for (bool transb : {false, true}) {
      check_row_major_gemm(h.handle, transa, transb, 5, 7, 3, 0, 1.0f, 0.0f, CUDA_R_32F, CUDA_R_32F, seed++);
      check_row_major_gemm(h.handle, transa, transb, 17, 13, 11, 3, 0.75f, -0.5f, CUDA_R_32F, CUDA_R_32F, seed++);
      check_row_major_gemm(h.handle, transa, transb, 1, 9, 4, 1, 2.0f, 1.0f, CUDA_R_32F, CUDA_R_32F, seed++);
      check_row_major_gemm(h.handle, transa, transb, 6, 5, 9, 2, 1.0f, 0.0f, CUDA_R_16BF, CUDA_R_16BF, seed++);
      check_row_major_gemm(h.handle, transa, transb, 6, 5, 9, 2, 0.5f, 2.0f, CUDA_R_16BF, CUDA_R_16BF, seed++);
      check_row_major_gemm(h.handle, transa, transb, 7, 3, 5, 1, 1.0f, 0.25f, CUDA_R_16BF, CUDA_R_32F, seed++);
    }
  }
}

TEST_CASE("sim: cuBLAS alpha == 0 reads no A or B, Sgemm and GemmEx agree, f64 works") {
  Handle h;
  std::vector<float> nan_a(6, NAN), b = dyadic_values(6, 3), c = dyadic_values(4, 4);
  DeviceArray<float> da(nan_a), db(b), dc(c);
  float zero = 0.0f, two = 2.0f;
  REQUIRE(cublasSgemm(h.handle, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 3, &zero, da.get(), 2, db.get(), 3, &two, dc.get(),
                      2) == CUBLAS_STATUS_SUCCESS);
  std::vector<float> got = dc.to_host();
  for (size_t i = 0; i < 4; ++i) CHECK(got[i] == 2 * c[i]);

  std::vector<float> a = random_values(12, 5), bb = random_values(20, 6);
  DeviceArray<float> a1(a), b1(bb), c1(15), c2(15);
  float one = 1.0f;
  REQUIRE(cublasSgemm(h.handle, CUBLAS_OP_T, CUBLAS_OP_N, 3, 5, 4, &one, a1.get(), 4, b1.get(), 4, &zero, c1.get(),
                      3) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasGemmEx(h.handle, CUBLAS_OP_T, CUBLAS_OP_N, 3, 5, 4, &one, a1.get(), CUDA_R_32F, 4, b1.get(), CUDA_R_32F,
                       4, &zero, c2.get(), CUDA_R_32F, 3, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(c1.to_host() == c2.to_host());

  std::vector<double> x{1, 2, 3, 4}, y{0.5, -1, 2, 0.25};  // column-major 2 x 2
  DeviceArray<double> dx(x), dy(y), dz(4);
  double alpha = 1, beta = 0;
  REQUIRE(cublasGemmEx(h.handle, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &alpha, dx.get(), CUDA_R_64F, 2, dy.get(),
                       CUDA_R_64F, 2, &beta, dz.get(), CUDA_R_64F, 2, CUBLAS_COMPUTE_64F,
                       CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(dz.to_host() == std::vector<double>{1 * 0.5 + 3 * -1, 2 * 0.5 + 4 * -1, 1 * 2 + 3 * 0.25, 2 * 2 + 4 * 0.25});
}

TEST_CASE("sim: cuBLAS TF32 compute rounds fp32 inputs to 10 mantissa bits") {
  Handle h;
  float x = 1.0f + 1.0f / 4096, one = 1.0f, zero = 0.0f;  // not a TF32 number: rounds to 1
  DeviceArray<float> a(std::vector<float>{x}), b(std::vector<float>{1.0f}), c(1);
  auto product = [&](cublasComputeType_t compute) {
    REQUIRE(cublasGemmEx(h.handle, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, a.get(), CUDA_R_32F, 1, b.get(), CUDA_R_32F,
                         1, &zero, c.get(), CUDA_R_32F, 1, compute, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
    return c.to_host()[0];
  };
  CHECK(product(CUBLAS_COMPUTE_32F) == x);
  CHECK(product(CUBLAS_COMPUTE_32F_FAST_TF32) == 1.0f);
  REQUIRE(cublasSetMathMode(h.handle, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS);
  CHECK(product(CUBLAS_COMPUTE_32F) == 1.0f);
  CHECK(product(CUBLAS_COMPUTE_32F_PEDANTIC) == x);
}

TEST_CASE("sim: cuBLAS GemmStridedBatchedEx runs each batch at its strides") {
  Handle h;
  const int M = 3, N = 4, K = 5, batch = 3;
  std::vector<float> A = dyadic_values(size_t(batch * M * K + 2), 7), B = dyadic_values(size_t(batch * K * N), 8);
  DeviceArray<float> a(A), b(B), c(size_t(batch * M * N));
  float one = 1.0f, zero = 0.0f;
  // Row-major C_i = A_i B_i with A_i at i * (M * K + 1): strides need not be the matrices' sizes.
  REQUIRE(cublasGemmStridedBatchedEx(h.handle, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, b.get(), CUDA_R_32F, N, K * N,
                                     a.get(), CUDA_R_32F, K, M * K + 1, &zero, c.get(), CUDA_R_32F, N, M * N, batch,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  std::vector<float> got = c.to_host();
  for (int i = 0; i < batch; ++i) {
    RowMajor Ai = row_major(M, K, K, {A.begin() + i * (M * K + 1), A.begin() + i * (M * K + 1) + M * K});
    RowMajor Bi = row_major(K, N, N, {B.begin() + i * K * N, B.begin() + (i + 1) * K * N});
    RowMajor Ci = row_major(M, N, N, std::vector<float>(size_t(M * N)));
    std::vector<double> expected = reference_gemm(false, false, M, N, K, 1.0, Ai, Bi, 0.0, Ci);
    for (int e = 0; e < M * N; ++e) CHECK(got[size_t(i * M * N + e)] == float(expected[size_t(e)]));
  }
}

// Three groups of different sizes, transposes, alphas and betas, with 1, 2 and 3 problems: the MoE expert products.
template <class T> void check_grouped(cudaDataType type, cublasComputeType_t compute) {
  Handle h;
  struct Group {
    bool transa, transb;
    int M, N, K, count;
    float alpha, beta;
  };
  std::vector<Group> groups = {{false, false, 3, 5, 4, 1, 1.0f, 0.0f},
                               {true, false, 6, 2, 7, 2, 0.5f, 1.0f},
                               {false, true, 1, 9, 3, 3, 2.0f, 0.25f}};
  std::vector<cublasOperation_t> transa, transb;
  std::vector<int> m, n, k, lda, ldb, ldc, sizes;
  std::vector<float> alphas, betas;
  std::vector<std::unique_ptr<DeviceArray<T>>> storage;
  std::vector<const void*> a_pointers, b_pointers;
  std::vector<void*> c_pointers;
  std::vector<std::vector<double>> expected;
  uint32_t seed = 100;
  for (const Group& g : groups) {
    transa.push_back(op(g.transb));  // C^T = op(B)^T op(A)^T, as in check_row_major_gemm
    transb.push_back(op(g.transa));
    m.push_back(g.N);
    n.push_back(g.M);
    k.push_back(g.K);
    lda.push_back(g.transb ? g.K : g.N);
    ldb.push_back(g.transa ? g.M : g.K);
    ldc.push_back(g.N);
    sizes.push_back(g.count);
    alphas.push_back(g.alpha);
    betas.push_back(g.beta);
    for (int p = 0; p < g.count; ++p) {
      RowMajor A = g.transa ? row_major(g.K, g.M, g.M, dyadic_values(size_t(g.K * g.M), seed++))
                            : row_major(g.M, g.K, g.K, dyadic_values(size_t(g.M * g.K), seed++));
      RowMajor B = g.transb ? row_major(g.N, g.K, g.K, dyadic_values(size_t(g.N * g.K), seed++))
                            : row_major(g.K, g.N, g.N, dyadic_values(size_t(g.K * g.N), seed++));
      RowMajor C = row_major(g.M, g.N, g.N, dyadic_values(size_t(g.M * g.N), seed++));
      expected.push_back(reference_gemm(g.transa, g.transb, g.M, g.N, g.K, g.alpha, A, B, g.beta, C));
      for (const RowMajor* matrix : {&B, &A, &C}) {
        if constexpr (std::is_same_v<T, float>) {
          storage.push_back(std::make_unique<DeviceArray<T>>(matrix->data));
        } else {
          storage.push_back(std::make_unique<DeviceArray<T>>(to_bf16(matrix->data)));
        }
      }
      a_pointers.push_back(storage[storage.size() - 3]->get());  // cuBLAS's A is our B
      b_pointers.push_back(storage[storage.size() - 2]->get());
      c_pointers.push_back(storage[storage.size() - 1]->get());
    }
  }
  // The pointer arrays live in device memory; the per-group arrays on the host.
  DeviceArray<const void*> a_array(a_pointers), b_array(b_pointers);
  DeviceArray<void*> c_array(c_pointers);
  REQUIRE(cublasGemmGroupedBatchedEx(h.handle, transa.data(), transb.data(), m.data(), n.data(), k.data(),
                                     alphas.data(), a_array.get(), type, lda.data(), b_array.get(), type, ldb.data(),
                                     betas.data(), c_array.get(), type, ldc.data(), 3, sizes.data(),
                                     compute) == CUBLAS_STATUS_SUCCESS);
  for (size_t p = 0; p < expected.size(); ++p) {
    std::vector<T> got = storage[3 * p + 2]->to_host();
    CAPTURE(p);
    REQUIRE(got.size() == expected[p].size());
    for (size_t e = 0; e < got.size(); ++e) {
      if constexpr (std::is_same_v<T, float>) {
        CHECK(got[e] == float(expected[p][e]));
      } else {
        CHECK(__bfloat162float(got[e]) == __bfloat162float(__double2bfloat16(expected[p][e])));
      }
    }
  }
}

TEST_CASE("sim: cuBLAS GemmGroupedBatchedEx: 3 groups of different sizes, bf16 and fp32 with TF32") {
  check_grouped<__nv_bfloat16>(CUDA_R_16BF, CUBLAS_COMPUTE_32F);
  check_grouped<float>(CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32);
}

TEST_CASE("sim: cuBLAS refuses invalid arguments and combinations outside its type tables") {
  Handle h;
  DeviceArray<float> a(64), b(64), c(64);
  float one = 1.0f, zero = 0.0f;
  auto gemm = [&](cublasOperation_t ta, cublasOperation_t tb, int M, int N, int K, int lda, int ldb, int ldc,
                  cudaDataType at, cudaDataType ct, cublasComputeType_t compute) {
    return cublasGemmEx(h.handle, ta, tb, M, N, K, &one, a.get(), at, lda, b.get(), at, ldb, &zero, c.get(), ct, ldc,
                        compute, CUBLAS_GEMM_DEFAULT);
  };
  const auto N = CUBLAS_OP_N, T = CUBLAS_OP_T;
  const cudaDataType f32 = CUDA_R_32F, bf16 = CUDA_R_16BF;
  const cublasComputeType_t c32 = CUBLAS_COMPUTE_32F;
  CHECK(gemm(N, N, 4, 3, 2, 4, 2, 4, f32, f32, c32) == CUBLAS_STATUS_SUCCESS);
  CHECK(gemm(N, N, 4, 3, 2, 3, 2, 4, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);  // lda < m
  CHECK(gemm(T, N, 4, 3, 2, 2, 2, 4, f32, f32, c32) == CUBLAS_STATUS_SUCCESS);        // A^T: lda >= k
  CHECK(gemm(T, N, 4, 3, 2, 1, 2, 4, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(N, N, 4, 3, 2, 4, 1, 4, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);  // ldb < k
  CHECK(gemm(N, T, 4, 3, 2, 4, 2, 4, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);  // B^T: ldb >= n
  CHECK(gemm(N, N, 4, 3, 2, 4, 2, 3, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);  // ldc < m
  CHECK(gemm(N, N, -1, 3, 2, 4, 2, 4, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(CUBLAS_OP_CONJG, N, 4, 3, 2, 4, 2, 4, f32, f32, c32) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(gemm(N, N, 0, 3, 2, 1, 2, 1, f32, f32, c32) == CUBLAS_STATUS_SUCCESS);  // empty: nothing to do
  CHECK(gemm(N, N, 4, 3, 2, 4, 2, 4, bf16, CUDA_R_16F, c32) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(N, N, 4, 3, 2, 4, 2, 4, bf16, bf16, CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(N, N, 4, 3, 2, 4, 2, 4, f32, f32, CUBLAS_COMPUTE_16F) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(gemm(N, N, 4, 3, 2, 4, 2, 4, CUDA_R_16F, CUDA_R_16F, c32) == CUBLAS_STATUS_NOT_SUPPORTED);  // not emulated
  CHECK(cublasGemmEx(nullptr, N, N, 4, 3, 2, &one, a.get(), f32, 4, b.get(), f32, 2, &zero, c.get(), f32, 4, c32,
                     CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(cublasGemmStridedBatchedEx(h.handle, N, N, 4, 3, 2, &one, a.get(), f32, 4, 0, b.get(), f32, 2, 0, &zero,
                                   c.get(), f32, 4, 0, -1, c32, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);

  // Grouped: bf16 gives bf16 only, fp32 needs TF32 compute; each group's shape is checked.
  cublasOperation_t ops[2] = {N, N};
  int m[2] = {4, 4}, n[2] = {3, 3}, k[2] = {2, 2}, lda[2] = {4, 3}, ldb[2] = {2, 2}, ldc[2] = {4, 4}, sizes[2] = {1, 1};
  float alphas[2] = {1, 1}, betas[2] = {0, 0};
  const void* as[2] = {a.get(), a.get()};
  const void* bs[2] = {b.get(), b.get()};
  void* cs[2] = {c.get(), c.get()};
  DeviceArray<const void*> a_array(std::vector<const void*>(as, as + 2)), b_array(std::vector<const void*>(bs, bs + 2));
  DeviceArray<void*> c_array(std::vector<void*>(cs, cs + 2));
  auto grouped = [&](int groups, cudaDataType at, cudaDataType ct, cublasComputeType_t compute) {
    return cublasGemmGroupedBatchedEx(h.handle, ops, ops, m, n, k, alphas, a_array.get(), at, lda, b_array.get(), at,
                                      ldb, betas, c_array.get(), ct, ldc, groups, sizes, compute);
  };
  CHECK(grouped(1, bf16, bf16, c32) == CUBLAS_STATUS_SUCCESS);
  CHECK(grouped(1, bf16, f32, c32) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(grouped(1, f32, f32, c32) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(grouped(1, f32, f32, CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_SUCCESS);
  CHECK(grouped(2, f32, f32, CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_INVALID_VALUE);  // group 1: lda < m
  CHECK(grouped(-1, f32, f32, CUBLAS_COMPUTE_32F_FAST_TF32) == CUBLAS_STATUS_INVALID_VALUE);

  CHECK(std::string(cublasGetStatusName(CUBLAS_STATUS_NOT_SUPPORTED)) == "CUBLAS_STATUS_NOT_SUPPORTED");
  CHECK(std::string(cublasGetStatusString(CUBLAS_STATUS_INVALID_VALUE)) == "an argument has an invalid value");
  cudaStream_t stream = nullptr;
  CHECK(cublasSetStream(h.handle, moelab::cuda::stream()) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasGetStream(h.handle, &stream) == CUBLAS_STATUS_SUCCESS);
  CHECK(stream == moelab::cuda::stream());
}

// ---- speed -----------------------------------------------------------------------------------------------------------

TEST_CASE("sim: throughput (threads per second, reported)") {
  const int blocks = 4096, threads = 256;
  DeviceArray<int> out(size_t(blocks * threads));
  auto rate = [&](const char* name, void (*kernel)(int*), int grid) {
    launch(name, kernel, dim3(grid), dim3(threads), 0, out.get());  // warm up: the workers' stacks exist afterwards
    std::clock_t start = std::clock();  // processor time: other processes on the machine do not count
    launch(name, kernel, dim3(grid), dim3(threads), 0, out.get());
    return double(grid) * threads / (double(std::clock() - start) / CLOCKS_PER_SEC);
  };
  double plain = rate("write_index", write_index, blocks);
  double synced = rate("neighbour_through_shared", neighbour_through_shared, blocks / 4);
  MESSAGE("emulator: ", plain / 1e6, "M threads per CPU second without barriers, ", synced / 1e6,
          "M with one "
          "__syncthreads");
  CHECK(plain > 0);
}
