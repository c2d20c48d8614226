// CUDA kernels of engine/kernels/nn.h: cross-entropy, RMSNorm, RoPE and causal attention. Each row-wise kernel gives
// one row to one block, so every sum over a row is a block reduction in a fixed order (reduce.cuh). The CPU kernels
// (engine/cpu/nn.cpp) are their reference in the tests. F is the element type (float or double; bf16 tensors are
// stored beside float math: S, T, L), A the type sums are accumulated in (double for the losses, as on the CPU).
#include "engine/kernels/nn.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "engine/cuda/device.cuh"
#include "engine/cuda/mma.cuh"
#include "engine/cuda/reduce.cuh"

namespace moelab::cuda {

constexpr int kRowThreads = 256;

// ---- cross-entropy --------------------------------------------------------------------------------------------------

// One block per row r: lse[r] = logsumexp(x_r) and row_loss[r] = lse[r] - x_r[t_r] (0 when ignored).
template <class F>
__global__ void cross_entropy_rows_kernel(const F* logits, const int32_t* targets, int64_t V, int32_t ignore_index,
                                          F* lse, double* row_loss) {
  const int64_t r = blockIdx.x;
  const F* x = logits + r * V;
  double m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, static_cast<double>(x[j]));
  m = block_max(m);
  double z = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) z += exp(static_cast<double>(x[j]) - m);
  z = block_sum(z);
  if (threadIdx.x == 0) {
    const double l = m + log(z);
    lse[r] = static_cast<F>(l);
    row_loss[r] = targets[r] == ignore_index ? 0.0 : l - static_cast<double>(x[targets[r]]);
  }
}

// One block: loss = sum_r row_loss[r] / count, summed in a fixed order.
template <class F>
__global__ void cross_entropy_mean_kernel(const double* row_loss, int64_t N, int64_t count, F* loss) {
  double total = 0;
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) total += row_loss[r];
  total = block_sum(total);
  if (threadIdx.x == 0) *loss = static_cast<F>(count ? total / static_cast<double>(count) : 0.0);
}

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t count,
                           const Tensor& loss, const Tensor& lse, const Tensor& row_loss) {
  const int64_t N = logits.size(0), V = logits.size(1);
  dispatch_float("cross_entropy", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("cross_entropy_rows", cross_entropy_rows_kernel<F>, dim3(N), dim3(kRowThreads), 0, logits.data<F>(),
           targets.data<int32_t>(), V, ignore_index, lse.data<F>(), row_loss.data<double>());
    launch("cross_entropy_mean", cross_entropy_mean_kernel<F>, dim3(1), dim3(1024), 0, row_loss.data<double>(), N,
           count, loss.data<F>());
  });
}

// One block per row: dlogits[r] = (softmax(x_r) - onehot(t_r)) * g / count.
template <class F>
__global__ void cross_entropy_backward_kernel(const F* logits, const int32_t* targets, const F* lse, const F* g,
                                              int64_t V, int32_t ignore_index, int64_t count, F* dlogits) {
  const int64_t r = blockIdx.x;
  const F* x = logits + r * V;
  F* d = dlogits + r * V;
  const bool ignored = targets[r] == ignore_index;
  const F scale = static_cast<F>(count ? static_cast<double>(*g) / static_cast<double>(count) : 0.0);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    F value = ignored ? F(0) : exp(x[j] - lse[r]) * scale;
    if (!ignored && j == targets[r]) value -= scale;
    d[j] = value;
  }
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& g,
                            int32_t ignore_index, int64_t count, const Tensor& dlogits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  dispatch_float("cross_entropy_backward", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("cross_entropy_backward", cross_entropy_backward_kernel<F>, dim3(N), dim3(kRowThreads), 0, logits.data<F>(),
           targets.data<int32_t>(), lse.data<F>(), g.data<F>(), V, ignore_index, count, dlogits.data<F>());
  });
}

// One block per row: row_loss[r] as cross_entropy_rows_kernel, and with d, the row's gradient for an upstream
// gradient of 1, converted to Out as it is stored. d may be the logits: thread 0 reads the target's logit, and every
// thread its part of the row, before the barriers of the sums, so before any thread writes.
// The logits are stored as L: F, or bf16 beside f32 math.
template <class F, class L, class Out>
__global__ void cross_entropy_with_gradient_kernel(const L* logits, const int32_t* targets, int64_t V,
                                                   int32_t ignore_index, int64_t count, double* row_loss, Out* d) {
  const int64_t r = blockIdx.x;
  const L* x = logits + r * V;
  const int32_t t = targets[r];
  const bool ignored = t == ignore_index;
  const double x_target = threadIdx.x == 0 && !ignored ? widened<double>(x[t]) : 0.0;
  double m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, widened<double>(x[j]));
  m = block_max(m);
  double z = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) z += exp(widened<double>(x[j]) - m);
  z = block_sum(z);
  const double l = m + log(z);
  if (threadIdx.x == 0) row_loss[r] = ignored ? 0.0 : l - x_target;
  if (!d) return;
  Out* dr = d + r * V;
  const F lse = static_cast<F>(l);
  const F scale = static_cast<F>(count ? 1.0 / static_cast<double>(count) : 0.0);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    F value = ignored ? F(0) : exp(widened<F>(x[j]) - lse) * scale;
    if (!ignored && j == t) value -= scale;
    if constexpr (std::is_same_v<Out, __nv_bfloat16>)
      dr[j] = __float2bfloat16_rn(static_cast<float>(value));
    else
      dr[j] = value;
  }
}

void cross_entropy_with_gradient(const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t count,
                                 const Tensor& row_loss, const Tensor& dlogits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const DType math = logits.dtype() == DType::BF16 ? DType::F32 : logits.dtype();
  dispatch_float("cross_entropy_with_gradient", math, [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("cross_entropy_with_gradient", logits.dtype(), [&](auto stored_as) {
      using L = decltype(stored_as);
      auto run = [&](auto* d) {
        using Out = std::remove_pointer_t<decltype(d)>;
        launch("cross_entropy_with_gradient", cross_entropy_with_gradient_kernel<F, L, Out>, dim3(N), dim3(kRowThreads),
               0, stored<const L>(logits), targets.data<int32_t>(), V, ignore_index, count, row_loss.data<double>(), d);
      };
      if (!dlogits.defined())
        run(static_cast<F*>(nullptr));
      else if (dlogits.dtype() == DType::BF16)
        run(stored<__nv_bfloat16>(dlogits));
      else
        run(dlogits.data<F>());
    });
  });
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------------

// One block per row: rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w (computed in F, stored as Y).
template <class F, class Y>
__global__ void rms_norm_forward_kernel(const F* x, const F* w, int64_t d, double eps, Y* y, F* rstd) {
  const int64_t r = blockIdx.x;
  const F* xr = x + r * d;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  ss = block_sum(ss);
  const F s = static_cast<F>(1.0 / sqrt(ss / static_cast<double>(d) + eps));
  if (threadIdx.x == 0) rstd[r] = s;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) y[r * d + j] = converted<Y>(xr[j] * s * w[j]);
}

void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  dispatch_float("rms_norm", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("rms_norm", y.dtype(), [&](auto stored_as) {
      using Y = decltype(stored_as);
      launch("rms_norm_forward", rms_norm_forward_kernel<F, Y>, dim3(rows), dim3(kRowThreads), 0, x.data<F>(),
             weight.data<F>(), d, eps, stored<Y>(y), rstd.data<F>());
    });
  });
}

// dx and dweight in one pass over x and g. Block (c, t) takes chunk c of kRowsPerChunk rows, in order, and tile t of
// kColumnsPerTile columns: per row the block's sum of g * w * x over the whole row, then on its columns dx = s * g *
// w - x * s^3 * mean(g * w * x) (added to what dx holds when added), while the thread that owns column j adds g * x *
// s to the chunk's dweight partial for j in shared memory (rows in order). Then partial [chunks, d] holds each chunk's
// sums, which a second kernel adds up in chunk order: the same bits on every run. A row wider than a tile is read
// once more for each further tile's sum (none up to 4096 columns). Chunks of 32 rows are a guess for the GPU to tune:
// smaller ones give more blocks for a few rows, larger ones a smaller partial.
constexpr int64_t kRowsPerChunk = 32;
constexpr int64_t kColumnsPerTile = 4096;  // at most 32 KB of doubles: no opt-in past 48 KB needed

template <class F, class G>
__global__ void rms_norm_backward_kernel(const F* x, const F* w, const F* rstd, const G* g_stored, int64_t rows,
                                         int64_t d, bool added, F* dx, double* partial) {
  SHARED_ARRAY(double, row_sum_scratch, 32);  // block_sum's, once for every row
  DYNAMIC_SHARED(double, dweight_part);       // this tile's columns, min(d, kColumnsPerTile) of them
  const int64_t begin = blockIdx.x * kRowsPerChunk, end = begin + kRowsPerChunk < rows ? begin + kRowsPerChunk : rows;
  const int64_t first = blockIdx.y * kColumnsPerTile, last = first + kColumnsPerTile < d ? first + kColumnsPerTile : d;
  for (int64_t j = first + threadIdx.x; j < last; j += blockDim.x) dweight_part[j - first] = 0;
  for (int64_t r = begin; r < end; ++r) {
    const F* xr = x + r * d;
    const G* gr = g_stored + r * d;
    double gwx = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) gwx += static_cast<double>(widened<F>(gr[j])) * w[j] * xr[j];
    gwx = block_sum(gwx, row_sum_scratch);
    const F s = rstd[r];
    const F c = static_cast<F>(gwx / static_cast<double>(d)) * s * s * s;
    for (int64_t j = first + threadIdx.x; j < last; j += blockDim.x) {
      const F g = widened<F>(gr[j]);
      const F term = s * g * w[j] - c * xr[j];
      dx[r * d + j] = added ? dx[r * d + j] + term : term;
      dweight_part[j - first] += static_cast<double>(g * xr[j] * s);
    }
  }
  for (int64_t j = first + threadIdx.x; j < last; j += blockDim.x)
    partial[blockIdx.x * d + j] = dweight_part[j - first];
}

template <class F>
__global__ void rms_norm_dweight_total_kernel(const double* partial, int64_t chunks, int64_t d, F* dweight) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * d + j];
  dweight[j] = static_cast<F>(total);
}

void rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& g,
                       const Tensor& dx_added_to, const Tensor& dx, const Tensor& dweight) {
  const int64_t d = x.size(-1), rows = x.numel() / d, chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t tiles = (d + kColumnsPerTile - 1) / kColumnsPerTile;
  Tensor partial = Tensor::empty({chunks, d}, DType::F64, Device::CUDA);
  dispatch_float("rms_norm_backward", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("rms_norm_backward", g.dtype(), [&](auto stored_as) {
      using G = decltype(stored_as);
      launch("rms_norm_backward", rms_norm_backward_kernel<F, G>, dim3(chunks, tiles), dim3(kRowThreads),
             sizeof(double) * static_cast<size_t>(std::min(d, kColumnsPerTile)), x.data<F>(), weight.data<F>(),
             rstd.data<F>(), stored<const G>(g), rows, d, dx_added_to.defined(), dx.data<F>(), partial.data<double>());
    });
    launch("rms_norm_dweight_total", rms_norm_dweight_total_kernel<F>, dim3(blocks_for(d, 128)), dim3(128), 0,
           partial.data<double>(), chunks, d, dweight.data<F>());
  });
}

// ---- RoPE -----------------------------------------------------------------------------------------------------------

// One thread per pair (2i, 2i+1) of x [B, T, H, Dh], stored as S (F, or bf16 beside an f32 table) and rotated in F;
// sign -1 rotates by the opposite angle (the backward).
template <class F, class S>
__global__ void rope_kernel(const S* in, const F* table, int64_t pairs, int64_t T, int64_t H, int64_t Dh, F sign,
                            S* out) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int64_t half = Dh / 2, i = p % half, t = (p / half / H) % T;
  const F c = table[(t * half + i) * 2], s = sign * table[(t * half + i) * 2 + 1];
  const F x0 = widened<F>(in[2 * p]), x1 = widened<F>(in[2 * p + 1]);
  out[2 * p] = converted<S>(x0 * c - x1 * s);
  out[2 * p + 1] = converted<S>(x0 * s + x1 * c);
}

static void rope_rotate(const Tensor& in, const Tensor& table, const Tensor& out, double sign) {
  const int64_t T = in.size(1), H = in.size(2), Dh = in.size(3), pairs = in.numel() / 2;
  require_one_dtype("rope", {in, out});
  dispatch_float("rope", table.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_storage<F>("rope", in.dtype(), [&](auto stored_as) {
      using S = decltype(stored_as);
      launch("rope", rope_kernel<F, S>, dim3(blocks_for(pairs, 256)), dim3(256), 0, stored<const S>(in),
             table.data<F>(), pairs, T, H, Dh, static_cast<F>(sign), stored<S>(out));
    });
  });
}

void rope_forward(const Tensor& x, const Tensor& table, const Tensor& y) { rope_rotate(x, table, y, 1.0); }
void rope_backward(const Tensor& g, const Tensor& table, const Tensor& dx) { rope_rotate(g, table, dx, -1.0); }

// ---- causal attention -----------------------------------------------------------------------------------------------
// Flash-style tiling (FlashAttention-2's loop order) on CUDA cores, in the tensors' dtype. A block takes one tile of
// `Tile` rows of one head (b, h): query rows for the forward and dq, key rows for dk and dv. It walks the tiles of the
// other side through shared memory, so a row of K and V (or of Q and the output gradient) is read from global memory
// once per tile instead of once per row, and the T x T scores never leave the block. The forward keeps a running max
// and sum per query row (online softmax) and rescales its output accumulator when the max grows; the backward
// recomputes p_ij = exp(s_ij - lse_i) from the forward's lse. The dq and dk/dv kernels each own the rows they write:
// no atomics, and the same sums in the same order on every run.
//
// Threads: 256 as a 16 x 16 grid (ty, tx). Thread (ty, tx) owns the tile's rows ty + 16 a (a < Tile / 16), the
// other side's rows tx + 16 c in the score tile, and the head dims tx + 16 e (e < Dims) of its accumulators. The 16
// threads of a row are one half of a warp, so row maxima and sums are shuffles within those 16 lanes. Shared tiles
// are [Tile][Dh + 1]: the padding puts the 16 rows that a half-warp reads at once in 16 different banks.
// Row (b, t, h) of a [B, T, H, Dh] tensor starts at ((b*T + t)*H + h)*Dh.

struct HeadRows {
  int64_t T, H, Dh;
  __device__ int64_t row(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * Dh; }
};

// A block's head bh = b*H + h and tile, the grid being B*H*tiles blocks. A head's tiles are neighbours in the grid:
// they read the same K and V (or Q and dO), which L2 then serves to all of them. The causal mask makes them unequal
// (a query tile walks the key tiles up to it, a key tile the query tiles from it): within a head the longest go first,
// so that the grid ends on short blocks.
struct HeadTile {
  int64_t bh, tile;
};
__device__ inline HeadTile query_tile_of_block(int64_t tiles) {
  return {blockIdx.x / tiles, tiles - 1 - blockIdx.x % tiles};  // the last query tiles first
}
__device__ inline HeadTile key_tile_of_block(int64_t tiles) {
  return {blockIdx.x / tiles, blockIdx.x % tiles};  // the first key tiles first
}

// A tiling: Tile rows per block, each thread accumulating Dims head dims (Dh <= 16 * Dims).
template <int TileRows, int DimsPerThread> struct Tiling {
  static constexpr int Tile = TileRows, Dims = DimsPerThread, Rows = TileRows / 16;
};

constexpr int kAttentionThreads = 256;
constexpr int kHalfWarpGroup = 16;  // the lanes that share a row

template <class F> __device__ F half_warp_max(F v) {
  for (int offset = kHalfWarpGroup / 2; offset > 0; offset /= 2) {
    const F other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}
template <class F> __device__ F half_warp_sum(F v) {
  for (int offset = kHalfWarpGroup / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Rows t0 .. t0 + Tile - 1 of head (b, h) into tile [Tile][Dh + 1]; rows past T are zeros.
template <class F, int Tile>
__device__ void load_tile(const F* x, const HeadRows& L, int64_t b, int64_t h, int64_t t0, F* tile) {
  const int64_t stride = L.Dh + 1;
  for (int64_t idx = threadIdx.x; idx < Tile * L.Dh; idx += blockDim.x) {
    const int64_t r = idx / L.Dh, e = idx % L.Dh;
    tile[r * stride + e] = t0 + r < L.T ? x[L.row(b, t0 + r, h) + e] : F(0);
  }
}

// s[a][c] = x_tile row (ty + 16 a) . y_tile row (tx + 16 c): the thread's Rows x Rows dot products, each loaded value
// used Rows times.
template <class F, int Rows>
__device__ void tile_dots(const F* x_tile, const F* y_tile, int64_t stride, int64_t Dh, F (&s)[Rows][Rows]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int a = 0; a < Rows; ++a)
    for (int c = 0; c < Rows; ++c) s[a][c] = 0;
  for (int64_t e = 0; e < Dh; ++e) {
    F x[Rows], y[Rows];
    for (int a = 0; a < Rows; ++a) x[a] = x_tile[(ty + 16 * a) * stride + e];
    for (int c = 0; c < Rows; ++c) y[c] = y_tile[(tx + 16 * c) * stride + e];
    for (int a = 0; a < Rows; ++a)
      for (int c = 0; c < Rows; ++c) s[a][c] += x[a] * y[c];
  }
}

// acc[a][e] += sum_j w_tile[ty + 16 a][j] * x_tile[j][tx + 16 e] over the tile's rows j: weights from a
// [Tile][Tile + 1] score tile times the rows of a [Tile][Dh + 1] tile.
template <class F, int Tile, int Rows, int Dims>
__device__ void add_weighted_rows(const F* w_tile, const F* x_tile, int64_t stride, int64_t Dh, F (&acc)[Rows][Dims]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int j = 0; j < Tile; ++j) {
    F w[Rows], x[Dims];
    for (int a = 0; a < Rows; ++a) w[a] = w_tile[(ty + 16 * a) * (Tile + 1) + j];
    for (int e = 0; e < Dims; ++e) x[e] = tx + 16 * e < Dh ? x_tile[j * stride + tx + 16 * e] : F(0);
    for (int a = 0; a < Rows; ++a)
      for (int e = 0; e < Dims; ++e) acc[a][e] += w[a] * x[e];
  }
}

// Writes the thread's accumulator rows t0 + ty + 16 a (those before T) to x.
template <class F, int Rows, int Dims>
__device__ void store_rows(const F (&acc)[Rows][Dims], const HeadRows& L, int64_t b, int64_t h, int64_t t0, F* x) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int a = 0; a < Rows; ++a) {
    const int64_t t = t0 + ty + 16 * a;
    for (int e = 0; e < Dims; ++e)
      if (t < L.T && tx + 16 * e < L.Dh) x[L.row(b, t, h) + tx + 16 * e] = acc[a][e];
  }
}

// A block per query tile of a head (query_tile_of_block): out and lse of the tile's query rows.
template <class F, class Tg>
__global__ void attention_forward_kernel(const F* q, const F* k, const F* v, HeadRows L, F scale, F* out, F* lse) {
  constexpr int Tile = Tg::Tile, Rows = Tg::Rows, Dims = Tg::Dims;
  DYNAMIC_SHARED(F, shared);
  const int64_t stride = L.Dh + 1, tiles = (L.T + Tile - 1) / Tile;
  F* q_tile = shared;                  // [Tile][Dh + 1]
  F* k_tile = q_tile + Tile * stride;  // [Tile][Dh + 1]
  F* v_tile = k_tile + Tile * stride;  // [Tile][Dh + 1]
  F* p_tile = v_tile + Tile * stride;  // [Tile][Tile + 1]: the probabilities of the current key tile
  const auto [bh, qt] = query_tile_of_block(tiles);
  const int64_t b = bh / L.H, h = bh % L.H, q0 = qt * Tile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_tile<F, Tile>(q, L, b, h, q0, q_tile);
  F row_max[Rows], row_sum[Rows], acc[Rows][Dims];
  for (int a = 0; a < Rows; ++a) {
    row_max[a] = -INFINITY, row_sum[a] = 0;
    for (int e = 0; e < Dims; ++e) acc[a][e] = 0;
  }
  for (int64_t kt = 0; kt <= qt; ++kt) {  // causal: the key tiles after the query tile are all masked
    const int64_t k0 = kt * Tile;
    __syncthreads();  // the previous key tile is no longer read
    load_tile<F, Tile>(k, L, b, h, k0, k_tile);
    load_tile<F, Tile>(v, L, b, h, k0, v_tile);
    __syncthreads();
    F s[Rows][Rows];
    tile_dots<F, Rows>(q_tile, k_tile, stride, L.Dh, s);
    for (int a = 0; a < Rows; ++a) {
      const int i = ty + 16 * a;
      F m = row_max[a];
      for (int c = 0; c < Rows; ++c) {
        const int j = tx + 16 * c;
        s[a][c] = k0 + j <= q0 + i && k0 + j < L.T ? s[a][c] * scale : F(-INFINITY);
        m = s[a][c] > m ? s[a][c] : m;
      }
      m = half_warp_max(m);                   // row i's new running max: finite, as key 0 is never masked
      const F rescale = exp(row_max[a] - m);  // 0 on the first key tile, whose row_max is -inf
      F z = 0;
      for (int c = 0; c < Rows; ++c) {
        const F p = s[a][c] == F(-INFINITY) ? F(0) : exp(s[a][c] - m);
        p_tile[i * (Tile + 1) + tx + 16 * c] = p;
        z += p;
      }
      row_sum[a] = row_sum[a] * rescale + half_warp_sum(z);
      row_max[a] = m;
      for (int e = 0; e < Dims; ++e) acc[a][e] *= rescale;
    }
    __syncwarp();  // a row's probabilities come from its own half-warp
    add_weighted_rows<F, Tile, Rows, Dims>(p_tile, v_tile, stride, L.Dh, acc);
  }
  for (int a = 0; a < Rows; ++a) {
    for (int e = 0; e < Dims; ++e) acc[a][e] /= row_sum[a];
    const int64_t t = q0 + ty + 16 * a;
    if (tx == 0 && t < L.T) lse[bh * L.T + t] = row_max[a] + log(row_sum[a]);
  }
  store_rows(acc, L, b, h, q0, out);
}

// A block per query tile of a head, its query rows i: D_i = g_i . out_i (written for the dk/dv kernel), then over
// the key tiles j <= i, with p_ij = exp(s_ij - lse_i) and ds_ij = p_ij (g_i . v_j - D_i) * scale:
// dq_i = sum_j ds_ij k_j.
template <class F, class Tg>
__global__ void attention_backward_dq_kernel(const F* q, const F* k, const F* v, const F* out, const F* lse, const F* g,
                                             HeadRows L, F scale, F* dq, F* D) {
  constexpr int Tile = Tg::Tile, Rows = Tg::Rows, Dims = Tg::Dims;
  DYNAMIC_SHARED(F, shared);
  const int64_t stride = L.Dh + 1, tiles = (L.T + Tile - 1) / Tile;
  F* q_tile = shared;                   // [Tile][Dh + 1]
  F* g_tile = q_tile + Tile * stride;   // [Tile][Dh + 1]
  F* k_tile = g_tile + Tile * stride;   // [Tile][Dh + 1]
  F* v_tile = k_tile + Tile * stride;   // [Tile][Dh + 1]
  F* ds_tile = v_tile + Tile * stride;  // [Tile][Tile + 1]
  const auto [bh, qt] = query_tile_of_block(tiles);
  const int64_t b = bh / L.H, h = bh % L.H, q0 = qt * Tile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_tile<F, Tile>(q, L, b, h, q0, q_tile);
  load_tile<F, Tile>(g, L, b, h, q0, g_tile);
  F row_lse[Rows], row_D[Rows], acc[Rows][Dims];
  for (int a = 0; a < Rows; ++a) {
    const int64_t t = q0 + ty + 16 * a;
    F partial = 0;
    for (int64_t e = tx; e < L.Dh && t < L.T; e += 16) partial += g[L.row(b, t, h) + e] * out[L.row(b, t, h) + e];
    row_D[a] = half_warp_sum(partial);
    row_lse[a] = t < L.T ? lse[bh * L.T + t] : F(0);
    if (tx == 0 && t < L.T) D[bh * L.T + t] = row_D[a];
    for (int e = 0; e < Dims; ++e) acc[a][e] = 0;
  }
  for (int64_t kt = 0; kt <= qt; ++kt) {
    const int64_t k0 = kt * Tile;
    __syncthreads();  // the previous key tile is no longer read
    load_tile<F, Tile>(k, L, b, h, k0, k_tile);
    load_tile<F, Tile>(v, L, b, h, k0, v_tile);
    __syncthreads();
    F s[Rows][Rows], gv[Rows][Rows];
    tile_dots<F, Rows>(q_tile, k_tile, stride, L.Dh, s);
    tile_dots<F, Rows>(g_tile, v_tile, stride, L.Dh, gv);
    for (int a = 0; a < Rows; ++a) {
      const int i = ty + 16 * a;
      for (int c = 0; c < Rows; ++c) {
        const int j = tx + 16 * c;
        const F p = k0 + j <= q0 + i && k0 + j < L.T ? exp(s[a][c] * scale - row_lse[a]) : F(0);
        ds_tile[i * (Tile + 1) + j] = p * (gv[a][c] - row_D[a]) * scale;
      }
    }
    __syncwarp();  // a row's ds come from its own half-warp
    add_weighted_rows<F, Tile, Rows, Dims>(ds_tile, k_tile, stride, L.Dh, acc);
  }
  store_rows(acc, L, b, h, q0, dq);
}

// A block per key tile of a head (key_tile_of_block), its key rows j: over the query tiles i >= j,
// dv_j = sum_i p_ij g_i and dk_j = sum_i ds_ij q_i (ds_ij with the scale, as in the dq kernel).
template <class F, class Tg>
__global__ void attention_backward_dkdv_kernel(const F* q, const F* k, const F* v, const F* lse, const F* g, const F* D,
                                               HeadRows L, F scale, F* dk, F* dv) {
  constexpr int Tile = Tg::Tile, Rows = Tg::Rows, Dims = Tg::Dims;
  DYNAMIC_SHARED(F, shared);
  const int64_t stride = L.Dh + 1, tiles = (L.T + Tile - 1) / Tile;
  F* k_tile = shared;                         // [Tile][Dh + 1]
  F* v_tile = k_tile + Tile * stride;         // [Tile][Dh + 1]
  F* q_tile = v_tile + Tile * stride;         // [Tile][Dh + 1]
  F* g_tile = q_tile + Tile * stride;         // [Tile][Dh + 1]
  F* p_tile = g_tile + Tile * stride;         // [Tile][Tile + 1]: p_ij at [j][i] (key rows first)
  F* ds_tile = p_tile + Tile * (Tile + 1);    // [Tile][Tile + 1]: ds_ij at [j][i]
  F* lse_tile = ds_tile + Tile * (Tile + 1);  // [Tile]
  F* D_tile = lse_tile + Tile;                // [Tile]
  const auto [bh, kt] = key_tile_of_block(tiles);
  const int64_t b = bh / L.H, h = bh % L.H, k0 = kt * Tile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  load_tile<F, Tile>(k, L, b, h, k0, k_tile);
  load_tile<F, Tile>(v, L, b, h, k0, v_tile);
  F acc_k[Rows][Dims], acc_v[Rows][Dims];
  for (int a = 0; a < Rows; ++a)
    for (int e = 0; e < Dims; ++e) acc_k[a][e] = 0, acc_v[a][e] = 0;
  for (int64_t qt = kt; qt < tiles; ++qt) {  // causal: the query tiles before the key tile see none of its keys
    const int64_t q0 = qt * Tile;
    __syncthreads();  // the previous query tile is no longer read
    load_tile<F, Tile>(q, L, b, h, q0, q_tile);
    load_tile<F, Tile>(g, L, b, h, q0, g_tile);
    for (int64_t r = threadIdx.x; r < Tile; r += blockDim.x) {
      lse_tile[r] = q0 + r < L.T ? lse[bh * L.T + q0 + r] : F(0);
      D_tile[r] = q0 + r < L.T ? D[bh * L.T + q0 + r] : F(0);
    }
    __syncthreads();
    F s[Rows][Rows], vg[Rows][Rows];
    tile_dots<F, Rows>(k_tile, q_tile, stride, L.Dh, s);
    tile_dots<F, Rows>(v_tile, g_tile, stride, L.Dh, vg);
    for (int a = 0; a < Rows; ++a) {
      const int j = ty + 16 * a;
      for (int c = 0; c < Rows; ++c) {
        const int i = tx + 16 * c;
        const F p = k0 + j <= q0 + i && q0 + i < L.T ? exp(s[a][c] * scale - lse_tile[i]) : F(0);
        p_tile[j * (Tile + 1) + i] = p;
        ds_tile[j * (Tile + 1) + i] = p * (vg[a][c] - D_tile[i]) * scale;
      }
    }
    __syncwarp();  // a key row's p and ds come from its own half-warp
    add_weighted_rows<F, Tile, Rows, Dims>(p_tile, g_tile, stride, L.Dh, acc_v);
    add_weighted_rows<F, Tile, Rows, Dims>(ds_tile, q_tile, stride, L.Dh, acc_k);
  }
  store_rows(acc_k, L, b, h, k0, dk);
  store_rows(acc_v, L, b, h, k0, dv);
}

// ---- causal attention on the tensor cores (Precision::BF16) ---------------------------------------------------------
// The same loop order, with both products of each step as nvcuda::wmma tiles: bf16 operands, f32 accumulators. A
// block of 4 warps takes 64 rows (query rows for the forward and dq, key rows for dk and dv), and warp w owns rows
// 16 w .. 16 w + 15 with their accumulators, one 16 x 16 fragment per 16 head dims. Tiles of 64 rows live in shared
// memory as bf16 (rounded as they are loaded from f32 tensors, copied from bf16 ones), as [64][D + 8]: D is the head
// dim padded with zeros to 16, 32, 64 or 128, and the 8 extra columns move each row 16 bytes further across the
// banks. A warp's 16 x 64 block of scores goes through its own f32 scratch, where its lanes apply the mask and the
// softmax (two lanes a row, every other column each, so that the two read neighbouring banks), and comes back as bf16
// for the next product. T is the element type of q, k, v, out and their gradients (float, or __nv_bfloat16: results
// rounded as they are stored); lse is f32.
//
// The forward makes two passes over the key tiles: the first finds each row's max and sum (lse), the second forms
// p = exp(s - lse), already final, rounds it to bf16 and adds p v to the accumulators. That is one q k^T more than
// FlashAttention-2's single pass with a rescaled accumulator, but p is then the final probability before it is
// rounded, as in the CPU kernel and the backward's recomputation (the same numbers up to f32 rounding, whatever the
// tiling). Within a tile on the diagonal, the 16-row blocks that the mask hides entirely are skipped.

// bf16 wmma fragments need sm_80 or later (Ampere); moelab's `gpu` preset builds for sm_90.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "moelab's tensor-core attention needs sm_80 or later (bf16 nvcuda::wmma): set CMAKE_CUDA_ARCHITECTURES"
#endif

namespace wmma = nvcuda::wmma;
using Scores = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr int kMmaWarps = 4, kMmaThreads = 32 * kMmaWarps, kMmaTile = 16 * kMmaWarps;  // 64 rows a block
constexpr int kMmaBlocks = kMmaTile / 16;  // 16-row (or 16-column) blocks of a tile: one per warp
constexpr int kScratchLd = kMmaTile + 4;  // a warp's f32 scratch: [16][64 + 4]
constexpr int kWeightsLd = kMmaTile + 8;  // a warp's bf16 weights: [16][64 + 8]

// Query row i sees key row j: causal, and i is a real row (the tiles' rows past T are zeros).
__device__ inline bool sees(int64_t i, int64_t j, int64_t T) { return j <= i && i < T; }

// Carves dynamic shared memory into arrays, each 128-byte aligned. On a base of 0 (the host) it only measures.
struct SharedCarve {
  uintptr_t base;
  size_t used = 0;
  template <class T> __host__ __device__ T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(base + used);
    used += (static_cast<size_t>(count) * sizeof(T) + 127) / 128 * 128;
    return p;
  }
};

// How many of each shared array a kernel takes.
struct MmaArrays {
  int tiles, scratches, weight_tiles, row_arrays;
};
constexpr MmaArrays kForwardArrays{3, 1, 1, 0}, kDqArrays{4, 2, 1, 0}, kDkdvArrays{4, 2, 2, 2};
constexpr bool fits_mma_shared(MmaArrays a) {  // within MmaShared's arrays
  return a.tiles <= 4 && a.scratches <= 2 && a.weight_tiles <= 2 && a.row_arrays <= 2;
}
static_assert(fits_mma_shared(kForwardArrays) && fits_mma_shared(kDqArrays) && fits_mma_shared(kDkdvArrays));

// A kernel's shared arrays: [64][D + 8] bf16 tiles, f32 scratch and bf16 weights ([64][...]: rows 16 w .. 16 w + 15
// are warp w's) and [64] f32 rows.
template <int D> struct MmaShared {
  __nv_bfloat16 *tile[4] = {}, *weights[2] = {};
  float *scratch[2] = {}, *rows[2] = {};
  __host__ __device__ MmaShared(SharedCarve& carve, MmaArrays arrays) {
    for (int t = 0; t < arrays.tiles; ++t) tile[t] = carve.take<__nv_bfloat16>(kMmaTile * (D + 8));
    for (int t = 0; t < arrays.scratches; ++t) scratch[t] = carve.take<float>(kMmaTile * kScratchLd);
    for (int t = 0; t < arrays.weight_tiles; ++t) weights[t] = carve.take<__nv_bfloat16>(kMmaTile * kWeightsLd);
    for (int t = 0; t < arrays.row_arrays; ++t) rows[t] = carve.take<float>(kMmaTile);
  }
};

// Rows t0 .. t0 + 63 of head (b, h), as bf16, into tile [64][D + 8]; rows past T and dims past Dh are zeros. Four
// f32 dims a load (16 bytes) where the rows allow it (Dh a multiple of 4, x 16-byte aligned), two bf16 ones (4 bytes:
// Dh even, x 4-byte aligned).
template <int D, class T>
__device__ void load_bf16_tile(const T* x, const HeadRows& L, int64_t b, int64_t h, int64_t t0, __nv_bfloat16* tile) {
  if constexpr (std::is_same_v<T, float>) {
    if (L.Dh % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
      for (int idx = threadIdx.x; idx < kMmaTile * D / 4; idx += blockDim.x) {
        const int r = idx / (D / 4), e = 4 * (idx % (D / 4));
        float4 four = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (t0 + r < L.T && e < L.Dh) four = *reinterpret_cast<const float4*>(x + L.row(b, t0 + r, h) + e);
        auto* pairs = reinterpret_cast<__nv_bfloat162*>(tile + r * (D + 8) + e);  // 8-byte aligned: e % 4 == 0
        pairs[0] = __floats2bfloat162_rn(four.x, four.y);
        pairs[1] = __floats2bfloat162_rn(four.z, four.w);
      }
      return;
    }
  } else {
    if (L.Dh % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 4 == 0) {
      for (int idx = threadIdx.x; idx < kMmaTile * D / 2; idx += blockDim.x) {
        const int r = idx / (D / 2), e = 2 * (idx % (D / 2));
        __nv_bfloat162 two = __floats2bfloat162_rn(0.0f, 0.0f);
        if (t0 + r < L.T && e < L.Dh) two = *reinterpret_cast<const __nv_bfloat162*>(x + L.row(b, t0 + r, h) + e);
        *reinterpret_cast<__nv_bfloat162*>(tile + r * (D + 8) + e) = two;
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < kMmaTile * D; idx += blockDim.x) {
    const int r = idx / D, e = idx % D;
    tile[r * (D + 8) + e] =
        __float2bfloat16_rn(t0 + r < L.T && e < L.Dh ? widened<float>(x[L.row(b, t0 + r, h) + e]) : 0.0f);
  }
}

// scratch[16][kScratchLd], 16-column blocks [first, last) = x_rows (16 rows of a tile) times y_tile's 64 rows
// transposed: the warp's block of x y^T. Each 16 dims of x are loaded once for all the column blocks. (The loops
// over n run over all four blocks, so that nvcc unrolls them, acc's index is a constant and acc stays in registers.)
template <int D>
__device__ void warp_scores(const __nv_bfloat16* x_rows, const __nv_bfloat16* y_tile, int first, int last,
                            float* scratch) {
  Scores acc[kMmaBlocks];  // column block n in acc[n]
  for (Scores& a : acc) wmma::fill_fragment(a, 0.0f);
  for (int d = 0; d < D; d += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> x;
    wmma::load_matrix_sync(x, x_rows + d, D + 8);
    for (int n = 0; n < kMmaBlocks; ++n) {
      if (n < first || n >= last) continue;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> y_t;  // y^T's tile: y is [64][D]
      wmma::load_matrix_sync(y_t, y_tile + 16 * n * (D + 8) + d, D + 8);
      wmma::mma_sync(acc[n], x, y_t, acc[n]);
    }
  }
  for (int n = 0; n < kMmaBlocks; ++n)
    if (n >= first && n < last) wmma::store_matrix_sync(scratch + 16 * n, acc[n], kScratchLd, wmma::mem_row_major);
}

// acc[d] += weights (the warp's [16][kWeightsLd], 16-column blocks [first, last)) times the matching rows of tile
// ([64][D + 8]): sum_j w_ij x_j.
template <int D>
__device__ void add_weighted_tile(const __nv_bfloat16* weights, int first, int last, const __nv_bfloat16* tile,
                                  Scores (&acc)[D / 16]) {
  for (int n = first; n < last; ++n) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> w;
    wmma::load_matrix_sync(w, weights + 16 * n, kWeightsLd);
    for (int d = 0; d < D / 16; ++d) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> x;
      wmma::load_matrix_sync(x, tile + 16 * n * (D + 8) + 16 * d, D + 8);
      wmma::mma_sync(acc[d], w, x, acc[d]);
    }
  }
}

// Writes the warp's 16 rows t0 .. t0 + 15 of accumulators to x (rows before T, dims before Dh), through its scratch.
template <int D, class T>
__device__ void store_warp_rows(const Scores (&acc)[D / 16], const HeadRows& L, int64_t b, int64_t h, int64_t t0,
                                float* scratch, T* x) {
  const int lane = threadIdx.x % 32;
  for (int d = 0; d < D / 16; ++d) {
    wmma::store_matrix_sync(scratch, acc[d], kScratchLd, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = e % 16;
      if (t0 + r < L.T && 16 * d + c < L.Dh)
        x[L.row(b, t0 + r, h) + 16 * d + c] = converted<T>(scratch[r * kScratchLd + c]);
    }
    __syncwarp();  // the scratch is rewritten next
  }
}

// A block per query tile of a head (query_tile_of_block): out and lse of the tile's query rows. Lane (row, half) of
// warp w handles query row i = q0 + 16 w + row and the tile's columns c = half, half + 2, ...
template <int D, class T>
__global__ void attention_forward_mma_kernel(const T* q, const T* k, const T* v, HeadRows L, float scale, T* out,
                                             float* lse) {
  DYNAMIC_SHARED(unsigned char, shared);
  SharedCarve carve{reinterpret_cast<uintptr_t>(shared)};
  const MmaShared<D> sm(carve, kForwardArrays);
  __nv_bfloat16 *q_tile = sm.tile[0], *k_tile = sm.tile[1], *v_tile = sm.tile[2];
  const int64_t tiles = (L.T + kMmaTile - 1) / kMmaTile;
  const auto [bh, qt] = query_tile_of_block(tiles);
  const int64_t b = bh / L.H, h = bh % L.H, q0 = qt * kMmaTile;
  const int warp = threadIdx.x / 32, row = threadIdx.x % 32 / 2, half = threadIdx.x % 2;
  const int64_t i = q0 + 16 * warp + row;
  float* s = sm.scratch[0] + 16 * warp * kScratchLd;
  __nv_bfloat16* p = sm.weights[0] + 16 * warp * kWeightsLd;
  const __nv_bfloat16* q_rows = q_tile + 16 * warp * (D + 8);
  load_bf16_tile<D, T>(q, L, b, h, q0, q_tile);

  // Pass 1: the running max and sum of the lane's half row, then the row's lse.
  float m = -INFINITY, z = 0;
  for (int64_t kt = 0; kt <= qt; ++kt) {  // causal: the key tiles after the query tile are all masked
    const int64_t k0 = kt * kMmaTile;
    const int blocks = kt == qt ? warp + 1 : kMmaBlocks;  // on the diagonal, key blocks past the warp's rows are masked
    __syncthreads();                                     // the previous key tile is no longer read
    load_bf16_tile<D, T>(k, L, b, h, k0, k_tile);
    __syncthreads();
    warp_scores<D>(q_rows, k_tile, 0, blocks, s);
    __syncwarp();
    for (int c = half; c < kMmaTile; c += 2) {
      if (!sees(i, k0 + c, L.T)) continue;
      const float x = s[row * kScratchLd + c] * scale;
      if (x > m) {  // a new max: rescale the sum so far
        z = z * expf(m - x) + 1;
        m = x;
      } else {
        z += expf(x - m);
      }
    }
    __syncwarp();  // the scratch is rewritten by the next tile's scores
  }
  const float m_other = __shfl_xor_sync(kFullMask, m, 1), z_other = __shfl_xor_sync(kFullMask, z, 1);
  float row_lse = 0;  // rows past T see no key
  if (i < L.T) {
    const float m_row = fmaxf(m, m_other);  // finite: key 0 is seen; a half that saw no key has m = -inf, z = 0
    row_lse = m_row + logf(z * expf(m - m_row) + z_other * expf(m_other - m_row));
    if (half == 0) lse[bh * L.T + i] = row_lse;
  }

  // Pass 2: out_i = sum_j bf16(exp(s_ij - lse_i)) v_j.
  Scores acc[D / 16];
  for (Scores& a : acc) wmma::fill_fragment(a, 0.0f);
  for (int64_t kt = 0; kt <= qt; ++kt) {
    const int64_t k0 = kt * kMmaTile;
    const int blocks = kt == qt ? warp + 1 : kMmaBlocks;
    __syncthreads();
    load_bf16_tile<D, T>(k, L, b, h, k0, k_tile);
    load_bf16_tile<D, T>(v, L, b, h, k0, v_tile);
    __syncthreads();
    warp_scores<D>(q_rows, k_tile, 0, blocks, s);
    __syncwarp();
    for (int c = half; c < kMmaTile; c += 2)
      p[row * kWeightsLd + c] =
          __float2bfloat16_rn(sees(i, k0 + c, L.T) ? expf(s[row * kScratchLd + c] * scale - row_lse) : 0.0f);
    __syncwarp();  // a row's weights come from two lanes, the product reads all of them
    add_weighted_tile<D>(p, 0, blocks, v_tile, acc);
  }
  store_warp_rows<D, T>(acc, L, b, h, q0 + 16 * warp, s, out);
}

// A block per query tile of a head, lanes as in the forward: D_i = bf16(g_i) . out_i (written for the dk/dv
// kernel), then over the key tiles, with p_ij = exp(s_ij - lse_i): dq_i = sum_j bf16(p_ij (g_i . v_j - D_i) scale) k_j.
template <int D, class T>
__global__ void attention_backward_dq_mma_kernel(const T* q, const T* k, const T* v, const T* out, const float* lse,
                                                 const T* g, HeadRows L, float scale, T* dq, float* D_rows) {
  DYNAMIC_SHARED(unsigned char, shared);
  SharedCarve carve{reinterpret_cast<uintptr_t>(shared)};
  const MmaShared<D> sm(carve, kDqArrays);
  __nv_bfloat16 *q_tile = sm.tile[0], *g_tile = sm.tile[1], *k_tile = sm.tile[2], *v_tile = sm.tile[3];
  const int64_t tiles = (L.T + kMmaTile - 1) / kMmaTile;
  const auto [bh, qt] = query_tile_of_block(tiles);
  const int64_t b = bh / L.H, h = bh % L.H, q0 = qt * kMmaTile;
  const int warp = threadIdx.x / 32, row = threadIdx.x % 32 / 2, half = threadIdx.x % 2;
  const int64_t i = q0 + 16 * warp + row;
  float *s = sm.scratch[0] + 16 * warp * kScratchLd, *gv = sm.scratch[1] + 16 * warp * kScratchLd;
  __nv_bfloat16* ds = sm.weights[0] + 16 * warp * kWeightsLd;
  const __nv_bfloat16 *q_rows = q_tile + 16 * warp * (D + 8), *g_rows = g_tile + 16 * warp * (D + 8);
  load_bf16_tile<D, T>(q, L, b, h, q0, q_tile);
  load_bf16_tile<D, T>(g, L, b, h, q0, g_tile);
  __syncthreads();
  float partial = 0;  // the lane's half of D_i: every other head dim
  for (int64_t e = half; e < L.Dh && i < L.T; e += 2)
    partial += __bfloat162float(g_rows[row * (D + 8) + e]) * widened<float>(out[L.row(b, i, h) + e]);
  const float row_D = partial + __shfl_xor_sync(kFullMask, partial, 1);
  const float row_lse = i < L.T ? lse[bh * L.T + i] : 0.0f;
  if (half == 0 && i < L.T) D_rows[bh * L.T + i] = row_D;

  Scores acc[D / 16];
  for (Scores& a : acc) wmma::fill_fragment(a, 0.0f);
  for (int64_t kt = 0; kt <= qt; ++kt) {
    const int64_t k0 = kt * kMmaTile;
    const int blocks = kt == qt ? warp + 1 : kMmaBlocks;
    __syncthreads();  // the previous key tile is no longer read
    load_bf16_tile<D, T>(k, L, b, h, k0, k_tile);
    load_bf16_tile<D, T>(v, L, b, h, k0, v_tile);
    __syncthreads();
    warp_scores<D>(q_rows, k_tile, 0, blocks, s);
    warp_scores<D>(g_rows, v_tile, 0, blocks, gv);
    __syncwarp();
    for (int c = half; c < kMmaTile; c += 2) {
      float ds_ij = 0;
      if (sees(i, k0 + c, L.T)) {
        const float p = expf(s[row * kScratchLd + c] * scale - row_lse);
        ds_ij = p * (gv[row * kScratchLd + c] - row_D) * scale;
      }
      ds[row * kWeightsLd + c] = __float2bfloat16_rn(ds_ij);
    }
    __syncwarp();
    add_weighted_tile<D>(ds, 0, blocks, k_tile, acc);
  }
  store_warp_rows<D, T>(acc, L, b, h, q0 + 16 * warp, s, dq);
}

// A block per key tile of a head (key_tile_of_block): lane (row, half) of warp w handles key row j = k0 + 16 w + row
// and the query tile's columns c = half, half + 2, ... Over the query tiles i >= j: dv_j = sum_i bf16(p_ij) g_i and
// dk_j = sum_i bf16(ds_ij) q_i (ds_ij as in the dq kernel).
template <int D, class T>
__global__ void attention_backward_dkdv_mma_kernel(const T* q, const T* k, const T* v, const float* lse, const T* g,
                                                   const float* D_rows, HeadRows L, float scale, T* dk, T* dv) {
  DYNAMIC_SHARED(unsigned char, shared);
  SharedCarve carve{reinterpret_cast<uintptr_t>(shared)};
  const MmaShared<D> sm(carve, kDkdvArrays);
  __nv_bfloat16 *k_tile = sm.tile[0], *v_tile = sm.tile[1], *q_tile = sm.tile[2], *g_tile = sm.tile[3];
  float *lse_tile = sm.rows[0], *D_tile = sm.rows[1];  // [64]: the query tile's lse_i and D_i
  const int64_t tiles = (L.T + kMmaTile - 1) / kMmaTile;
  const auto [bh, kt] = key_tile_of_block(tiles);
  const int64_t b = bh / L.H, h = bh % L.H, k0 = kt * kMmaTile;
  const int warp = threadIdx.x / 32, row = threadIdx.x % 32 / 2, half = threadIdx.x % 2;
  const int64_t j = k0 + 16 * warp + row;
  float *s = sm.scratch[0] + 16 * warp * kScratchLd, *vg = sm.scratch[1] + 16 * warp * kScratchLd;
  __nv_bfloat16 *p = sm.weights[0] + 16 * warp * kWeightsLd, *ds = sm.weights[1] + 16 * warp * kWeightsLd;
  const __nv_bfloat16 *k_rows = k_tile + 16 * warp * (D + 8), *v_rows = v_tile + 16 * warp * (D + 8);
  load_bf16_tile<D, T>(k, L, b, h, k0, k_tile);
  load_bf16_tile<D, T>(v, L, b, h, k0, v_tile);

  Scores acc_k[D / 16], acc_v[D / 16];
  for (Scores& a : acc_k) wmma::fill_fragment(a, 0.0f);
  for (Scores& a : acc_v) wmma::fill_fragment(a, 0.0f);
  for (int64_t qt = kt; qt < tiles; ++qt) {  // causal: the query tiles before the key tile see none of its keys
    const int64_t q0 = qt * kMmaTile;
    const int first = qt == kt ? warp : 0;  // on the diagonal, query blocks before the warp's key rows are masked
    __syncthreads();                        // the previous query tile is no longer read
    load_bf16_tile<D, T>(q, L, b, h, q0, q_tile);
    load_bf16_tile<D, T>(g, L, b, h, q0, g_tile);
    for (int r = threadIdx.x; r < kMmaTile; r += blockDim.x) {
      lse_tile[r] = q0 + r < L.T ? lse[bh * L.T + q0 + r] : 0.0f;
      D_tile[r] = q0 + r < L.T ? D_rows[bh * L.T + q0 + r] : 0.0f;
    }
    __syncthreads();
    warp_scores<D>(k_rows, q_tile, first, kMmaBlocks, s);   // s[j][i] = k_j . q_i
    warp_scores<D>(v_rows, g_tile, first, kMmaBlocks, vg);  // vg[j][i] = v_j . g_i
    __syncwarp();
    for (int c = half; c < kMmaTile; c += 2) {
      float p_ij = 0, ds_ij = 0;
      if (sees(q0 + c, j, L.T)) {
        p_ij = expf(s[row * kScratchLd + c] * scale - lse_tile[c]);
        ds_ij = p_ij * (vg[row * kScratchLd + c] - D_tile[c]) * scale;
      }
      p[row * kWeightsLd + c] = __float2bfloat16_rn(p_ij);
      ds[row * kWeightsLd + c] = __float2bfloat16_rn(ds_ij);
    }
    __syncwarp();
    add_weighted_tile<D>(p, first, kMmaBlocks, g_tile, acc_v);
    add_weighted_tile<D>(ds, first, kMmaBlocks, q_tile, acc_k);
  }
  store_warp_rows<D, T>(acc_k, L, b, h, k0 + 16 * warp, s, dk);
  store_warp_rows<D, T>(acc_v, L, b, h, k0 + 16 * warp, s, dv);
}

// Calls run(std::integral_constant<int, D>{}) with the padded head dim D for Dh: 16, 32, 64 or 128.
template <class Run> void with_mma_head_dim(const char* op, int64_t Dh, Run&& run) {
  if (Dh <= 16) return run(std::integral_constant<int, 16>{});
  if (Dh <= 32) return run(std::integral_constant<int, 32>{});
  if (Dh <= 64) return run(std::integral_constant<int, 64>{});
  if (Dh <= 128) return run(std::integral_constant<int, 128>{});
  fail("{}: bf16 attention on the tensor cores takes head dims up to 128, got {} (--precision fp32 takes up to 256)",
       op, Dh);
}

// The dynamic shared bytes of a kernel that takes these arrays.
template <int D> size_t mma_shared_bytes(MmaArrays arrays) {
  SharedCarve carve{0};
  MmaShared<D>(carve, arrays);
  return carve.used;
}

// The dynamic shared memory of each kernel: its [Tile][Dh + 1] tiles, [Tile][Tile + 1] score tiles and [Tile] rows.
template <class F> struct AttentionShared {
  int64_t tile, Dh;
  size_t bytes(int row_tiles, int score_tiles, int rows) const {
    return sizeof(F) * static_cast<size_t>(row_tiles * tile * (Dh + 1) + score_tiles * tile * (tile + 1) + rows * tile);
  }
  size_t forward() const { return bytes(3, 1, 0); }
  size_t dq() const { return bytes(4, 1, 0); }
  size_t dkdv() const { return bytes(4, 2, 2); }
};

// Calls run(Tiling{}) with the tiling for this head dim and dtype: 64-row tiles while their shared memory fits (at
// most 227 KB a block on sm_90), 32-row tiles for longer heads.
template <class F, class Run> void with_attention_tiling(const char* op, int64_t Dh, Run&& run) {
  if (Dh <= 64) return run(Tiling<64, 4>{});
  if constexpr (sizeof(F) == sizeof(float)) {
    if (Dh <= 128) return run(Tiling<64, 8>{});
    if (Dh <= 256) return run(Tiling<32, 16>{});
  } else {
    if (Dh <= 128) return run(Tiling<32, 16>{});
  }
  fail("{}: the CUDA kernels take head dims up to 256 (f32) or 128 (f64), got {}", op, Dh);
}

// Kernels past 48 KB of dynamic shared memory must opt in (cudaFuncSetAttribute) before they launch.
template <class... Params> void allow_shared_bytes(void (*kernel)(Params...), size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                       Precision precision) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  if (precision == Precision::BF16) {
    const int64_t tiles = (T + kMmaTile - 1) / kMmaTile;
    return with_mma_head_dim("causal_attention", Dh, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      require_one_dtype("causal_attention", {q, k, v, out});
      with_storage<float>("causal_attention", q.dtype(), [&](auto stored_as) {
        using S = decltype(stored_as);
        const auto kernel = attention_forward_mma_kernel<D, S>;
        const size_t shared = mma_shared_bytes<D>(kForwardArrays);
        allow_shared_bytes(kernel, shared);
        launch("attention_forward_mma", kernel, dim3(B * H * tiles), dim3(kMmaThreads), shared, stored<const S>(q),
               stored<const S>(k), stored<const S>(v), HeadRows{T, H, Dh}, static_cast<float>(scale), stored<S>(out),
               lse.data<float>());
      });
    });
  }
  dispatch_float("causal_attention", q.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_attention_tiling<F>("causal_attention", Dh, [&](auto tiling) {
      using Tg = decltype(tiling);
      const int64_t tiles = (T + Tg::Tile - 1) / Tg::Tile;
      const size_t shared = AttentionShared<F>{Tg::Tile, Dh}.forward();
      allow_shared_bytes(attention_forward_kernel<F, Tg>, shared);
      launch("attention_forward", attention_forward_kernel<F, Tg>, dim3(B * H * tiles), dim3(kAttentionThreads), shared,
             q.data<F>(), k.data<F>(), v.data<F>(), HeadRows{T, H, Dh}, static_cast<F>(scale), out.data<F>(),
             lse.data<F>());
    });
  });
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& g, const Tensor& dq, const Tensor& dk, const Tensor& dv, Precision precision) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  const HeadRows L{T, H, Dh};
  Tensor D_rows = Tensor::empty({B, H, T}, lse.dtype(), Device::CUDA);  // D_i = g_i . out_i, for the dk/dv kernel
  if (precision == Precision::BF16) {
    const int64_t tiles = (T + kMmaTile - 1) / kMmaTile;
    return with_mma_head_dim("causal_attention_backward", Dh, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      require_one_dtype("causal_attention_backward", {q, k, v, out, g, dq, dk, dv});
      with_storage<float>("causal_attention_backward", q.dtype(), [&](auto stored_as) {
        using S = decltype(stored_as);
        const auto dq_kernel = attention_backward_dq_mma_kernel<D, S>;
        const auto dkdv_kernel = attention_backward_dkdv_mma_kernel<D, S>;
        const size_t dq_shared = mma_shared_bytes<D>(kDqArrays), dkdv_shared = mma_shared_bytes<D>(kDkdvArrays);
        allow_shared_bytes(dq_kernel, dq_shared);
        launch("attention_backward_dq_mma", dq_kernel, dim3(B * H * tiles), dim3(kMmaThreads), dq_shared,
               stored<const S>(q), stored<const S>(k), stored<const S>(v), stored<const S>(out), lse.data<float>(),
               stored<const S>(g), L, static_cast<float>(scale), stored<S>(dq), D_rows.data<float>());
        allow_shared_bytes(dkdv_kernel, dkdv_shared);
        launch("attention_backward_dkdv_mma", dkdv_kernel, dim3(B * H * tiles), dim3(kMmaThreads), dkdv_shared,
               stored<const S>(q), stored<const S>(k), stored<const S>(v), lse.data<float>(), stored<const S>(g),
               D_rows.data<float>(), L, static_cast<float>(scale), stored<S>(dk), stored<S>(dv));
      });
    });
  }
  dispatch_float("causal_attention_backward", q.dtype(), [&](auto tag) {
    using F = decltype(tag);
    with_attention_tiling<F>("causal_attention_backward", Dh, [&](auto tiling) {
      using Tg = decltype(tiling);
      const int64_t tiles = (T + Tg::Tile - 1) / Tg::Tile;
      const AttentionShared<F> shared{Tg::Tile, Dh};
      allow_shared_bytes(attention_backward_dq_kernel<F, Tg>, shared.dq());
      launch("attention_backward_dq", attention_backward_dq_kernel<F, Tg>, dim3(B * H * tiles), dim3(kAttentionThreads),
             shared.dq(), q.data<F>(), k.data<F>(), v.data<F>(), out.data<F>(), lse.data<F>(), g.data<F>(), L,
             static_cast<F>(scale), dq.data<F>(), D_rows.data<F>());
      allow_shared_bytes(attention_backward_dkdv_kernel<F, Tg>, shared.dkdv());
      launch("attention_backward_dkdv", attention_backward_dkdv_kernel<F, Tg>, dim3(B * H * tiles),
             dim3(kAttentionThreads), shared.dkdv(), q.data<F>(), k.data<F>(), v.data<F>(), lse.data<F>(), g.data<F>(),
             D_rows.data<F>(), L, static_cast<F>(scale), dk.data<F>(), dv.data<F>());
    });
  });
}

}  // namespace moelab::cuda
