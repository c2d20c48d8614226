// CUDA kernels of engine/kernels/nn.h: cross-entropy, RMSNorm, RoPE and causal attention. Each row-wise kernel gives
// one row to one block, so every sum over a row is a block reduction in a fixed order (reduce.cuh). The CPU kernels
// (engine/cpu/nn.cpp) are their reference in the tests. F is the element type (float or double), A the type sums are
// accumulated in (double for the losses, as on the CPU).
#include "engine/kernels/nn.h"

#include <cmath>

#include "engine/cuda/device.cuh"
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

// ---- RMSNorm --------------------------------------------------------------------------------------------------------

// One block per row: rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w.
template <class F>
__global__ void rms_norm_forward_kernel(const F* x, const F* w, int64_t d, double eps, F* y, F* rstd) {
  const int64_t r = blockIdx.x;
  const F* xr = x + r * d;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  ss = block_sum(ss);
  const F s = static_cast<F>(1.0 / sqrt(ss / static_cast<double>(d) + eps));
  if (threadIdx.x == 0) rstd[r] = s;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) y[r * d + j] = xr[j] * s * w[j];
}

void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  dispatch_float("rms_norm", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("rms_norm_forward", rms_norm_forward_kernel<F>, dim3(rows), dim3(kRowThreads), 0, x.data<F>(),
           weight.data<F>(), d, eps, y.data<F>(), rstd.data<F>());
  });
}

// One block per row: dx = s * g * w - x * s^3 * mean(g * w * x).
template <class F>
__global__ void rms_norm_backward_dx_kernel(const F* x, const F* w, const F* rstd, const F* g, int64_t d, F* dx) {
  const int64_t r = blockIdx.x;
  const F *xr = x + r * d, *gr = g + r * d;
  double gwx = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) gwx += static_cast<double>(gr[j]) * w[j] * xr[j];
  gwx = block_sum(gwx);
  const F s = rstd[r];
  const F c = static_cast<F>(gwx / static_cast<double>(d)) * s * s * s;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dx[r * d + j] = s * gr[j] * w[j] - c * xr[j];
}

// dweight[j] = sum over rows of g * x * rstd, in two deterministic stages: each block sums a fixed chunk of rows per
// column j (partial [blocks, d]), then one thread per column adds the chunks in order.
constexpr int64_t kRowsPerChunk = 64;

template <class F>
__global__ void rms_norm_dweight_partial_kernel(const F* x, const F* rstd, const F* g, int64_t rows, int64_t d,
                                                double* partial) {
  const int64_t chunk = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t end = (chunk + 1) * kRowsPerChunk < rows ? (chunk + 1) * kRowsPerChunk : rows;
  double acc = 0;
  for (int64_t r = chunk * kRowsPerChunk; r < end; ++r)
    acc += static_cast<double>(g[r * d + j] * x[r * d + j] * rstd[r]);
  partial[chunk * d + j] = acc;
}

template <class F>
__global__ void rms_norm_dweight_total_kernel(const double* partial, int64_t chunks, int64_t d, F* dweight) {
  const int64_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * d + j];
  dweight[j] = static_cast<F>(total);
}

void rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& g, const Tensor& dx,
                       const Tensor& dweight) {
  const int64_t d = x.size(-1), rows = x.numel() / d, chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  Tensor partial = Tensor::empty({chunks, d}, DType::F64, Device::CUDA);
  dispatch_float("rms_norm_backward", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("rms_norm_backward_dx", rms_norm_backward_dx_kernel<F>, dim3(rows), dim3(kRowThreads), 0, x.data<F>(),
           weight.data<F>(), rstd.data<F>(), g.data<F>(), d, dx.data<F>());
    launch("rms_norm_dweight_partial", rms_norm_dweight_partial_kernel<F>, dim3(blocks_for(d, 128), chunks), dim3(128),
           0, x.data<F>(), rstd.data<F>(), g.data<F>(), rows, d, partial.data<double>());
    launch("rms_norm_dweight_total", rms_norm_dweight_total_kernel<F>, dim3(blocks_for(d, 128)), dim3(128), 0,
           partial.data<double>(), chunks, d, dweight.data<F>());
  });
}

// ---- RoPE -----------------------------------------------------------------------------------------------------------

// One thread per pair (2i, 2i+1) of x [B, T, H, Dh]; sign -1 rotates by the opposite angle (the backward).
template <class F>
__global__ void rope_kernel(const F* in, const F* table, int64_t pairs, int64_t T, int64_t H, int64_t Dh, F sign,
                            F* out) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int64_t half = Dh / 2, i = p % half, t = (p / half / H) % T;
  const F c = table[(t * half + i) * 2], s = sign * table[(t * half + i) * 2 + 1];
  const F x0 = in[2 * p], x1 = in[2 * p + 1];
  out[2 * p] = x0 * c - x1 * s;
  out[2 * p + 1] = x0 * s + x1 * c;
}

static void rope_rotate(const Tensor& in, const Tensor& table, const Tensor& out, double sign) {
  const int64_t T = in.size(1), H = in.size(2), Dh = in.size(3), pairs = in.numel() / 2;
  dispatch_float("rope", in.dtype(), [&](auto tag) {
    using F = decltype(tag);
    launch("rope", rope_kernel<F>, dim3(blocks_for(pairs, 256)), dim3(256), 0, in.data<F>(), table.data<F>(), pairs, T,
           H, Dh, static_cast<F>(sign), out.data<F>());
  });
}

void rope_forward(const Tensor& x, const Tensor& table, const Tensor& y) { rope_rotate(x, table, y, 1.0); }
void rope_backward(const Tensor& g, const Tensor& table, const Tensor& dx) { rope_rotate(g, table, dx, -1.0); }

// ---- causal attention -----------------------------------------------------------------------------------------------
// A first, plain version (no tensor cores, no tiling): one block per query row for the forward and dq, one block per
// key row for dk and dv, with the scores of that row in shared memory ([T] values). Row (b, t, h) of a [B, T, H, Dh]
// tensor starts at ((b*T + t)*H + h)*Dh.

struct HeadRows {
  int64_t T, H, Dh;
  __device__ int64_t row(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * Dh; }
};

template <class F> __device__ F dot_row(const F* a, const F* b, int64_t n) {
  F s = 0;
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

// Block (b*H + h)*T + i: p_j = softmax_j(q_i . k_j / sqrt(Dh)) over j <= i, out_i = sum_j p_j v_j, lse_i.
template <class F>
__global__ void attention_forward_kernel(const F* q, const F* k, const F* v, HeadRows L, F scale, F* out, F* lse) {
  DYNAMIC_SHARED(F, p);  // [T]
  const int64_t i = blockIdx.x % L.T, bh = blockIdx.x / L.T, b = bh / L.H, h = bh % L.H, n = i + 1;
  const F* qi = q + L.row(b, i, h);
  F m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    p[j] = dot_row(qi, k + L.row(b, j, h), L.Dh) * scale;
    m = p[j] > m ? p[j] : m;
  }
  m = block_max(m);
  F z = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) z += (p[j] = exp(p[j] - m));
  z = block_sum(z);  // also the barrier after which every p_j is written
  for (int64_t e = threadIdx.x; e < L.Dh; e += blockDim.x) {
    F acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * v[L.row(b, j, h) + e];
    out[L.row(b, i, h) + e] = acc / z;
  }
  if (threadIdx.x == 0) lse[bh * L.T + i] = m + log(z);
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  dispatch_float("causal_attention", q.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(Dh)));
    launch("attention_forward", attention_forward_kernel<F>, dim3(B * H * T), dim3(128), T * sizeof(F), q.data<F>(),
           k.data<F>(), v.data<F>(), HeadRows{T, H, Dh}, scale, out.data<F>(), lse.data<F>());
  });
}

// Block (b*H + h)*T + i, the query row i: D_i = g_i . out_i (kept for the key rows), then with
// p_ij = exp(s_ij - lse_i) and ds_ij = p_ij (g_i . v_j - D_i) / sqrt(Dh): dq_i = sum_j ds_ij k_j.
template <class F>
__global__ void attention_backward_dq_kernel(const F* q, const F* k, const F* v, const F* out, const F* lse, const F* g,
                                             HeadRows L, F scale, F* dq, F* D) {
  DYNAMIC_SHARED(F, ds);  // [T]
  const int64_t i = blockIdx.x % L.T, bh = blockIdx.x / L.T, b = bh / L.H, h = bh % L.H, n = i + 1;
  const int64_t row_i = L.row(b, i, h);
  F gi_out = 0;
  for (int64_t e = threadIdx.x; e < L.Dh; e += blockDim.x) gi_out += g[row_i + e] * out[row_i + e];
  const F Di = block_sum(gi_out), li = lse[bh * L.T + i];
  if (threadIdx.x == 0) D[bh * L.T + i] = Di;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t row_j = L.row(b, j, h);
    const F p = exp(dot_row(q + row_i, k + row_j, L.Dh) * scale - li);
    ds[j] = p * (dot_row(g + row_i, v + row_j, L.Dh) - Di) * scale;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < L.Dh; e += blockDim.x) {
    F acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += ds[j] * k[L.row(b, j, h) + e];
    dq[row_i + e] = acc;
  }
}

// Block (b*H + h)*T + j, the key row j: over the query rows i >= j, dv_j = sum_i p_ij g_i and
// dk_j = sum_i ds_ij q_i. Summing over i inside one block keeps it free of atomics (and deterministic).
template <class F>
__global__ void attention_backward_dkdv_kernel(const F* q, const F* k, const F* v, const F* lse, const F* g, const F* D,
                                               HeadRows L, F scale, F* dk, F* dv) {
  DYNAMIC_SHARED(F, shared);  // p [T], then ds [T]
  F* p = shared;
  F* ds = shared + L.T;
  const int64_t j = blockIdx.x % L.T, bh = blockIdx.x / L.T, b = bh / L.H, h = bh % L.H;
  const int64_t row_j = L.row(b, j, h);
  for (int64_t i = j + threadIdx.x; i < L.T; i += blockDim.x) {
    const int64_t row_i = L.row(b, i, h);
    p[i] = exp(dot_row(q + row_i, k + row_j, L.Dh) * scale - lse[bh * L.T + i]);
    ds[i] = p[i] * (dot_row(g + row_i, v + row_j, L.Dh) - D[bh * L.T + i]) * scale;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < L.Dh; e += blockDim.x) {
    F acc_k = 0, acc_v = 0;
    for (int64_t i = j; i < L.T; ++i) {
      const int64_t row_i = L.row(b, i, h);
      acc_k += ds[i] * q[row_i + e];
      acc_v += p[i] * g[row_i + e];
    }
    dk[row_j + e] = acc_k;
    dv[row_j + e] = acc_v;
  }
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& g, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  Tensor D = Tensor::empty({B, H, T}, q.dtype(), Device::CUDA);
  dispatch_float("causal_attention_backward", q.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(Dh)));
    const HeadRows L{T, H, Dh};
    launch("attention_backward_dq", attention_backward_dq_kernel<F>, dim3(B * H * T), dim3(128), T * sizeof(F),
           q.data<F>(), k.data<F>(), v.data<F>(), out.data<F>(), lse.data<F>(), g.data<F>(), L, scale, dq.data<F>(),
           D.data<F>());
    launch("attention_backward_dkdv", attention_backward_dkdv_kernel<F>, dim3(B * H * T), dim3(128), 2 * T * sizeof(F),
           q.data<F>(), k.data<F>(), v.data<F>(), lse.data<F>(), g.data<F>(), D.data<F>(), L, scale, dk.data<F>(),
           dv.data<F>());
  });
}

}  // namespace moelab::cuda
