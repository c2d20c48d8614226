// Fused neural-net ops: cross-entropy, RMSNorm, RoPE and causal attention. Each forward kernel sits right above its
// backward kernel. A forward saves only the small per-row statistic its backward needs (logsumexp, 1/rms), never a
// large intermediate: the backward recomputes the rest.
//
// In this file F is the element type (float or double); B, T, H, Dh, V, d are sizes named as in docs/model.md.
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "engine/cpu/math.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;
using cpu::exp_simd;
using cpu::row_logsumexp;

// Inner loops over one contiguous row; `omp simd` lets the compiler reorder the sum so it vectorizes.
template <class F> [[gnu::always_inline]] inline F dot(const F* a, const F* b, int64_t n) {
  F s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class F> [[gnu::always_inline]] inline void axpy(F alpha, const F* x, F* y, int64_t n) {  // y += alpha * x, apart
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// ---- cross-entropy --------------------------------------------------------------------------------------------------
// loss = mean over counted rows r of (logsumexp(x_r) - x_r[t_r]); rows whose target is ignore_index do not count.
// If every row is ignored the loss is defined as 0 with a zero gradient (PyTorch gives NaN; a batch that is all
// padding should not poison training). The forward saves lse [N] for the backward.

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index, std::vector<double>* row_losses) {
  const char* op = "cross_entropy";
  check_float(op, logits);
  check_index(op, targets);
  check_cpu(op, logits);
  check_cpu(op, targets);
  if (logits.dim() != 2 || targets.dim() != 1 || targets.size(0) != logits.size(0))
    fail("{}: needs logits [N, V] and targets [N], got {} and {}", op, logits.str(), targets.str());
  const int64_t N = logits.size(0), V = logits.size(1);
  const int32_t* tgt = targets.data<int32_t>();
  int64_t count = 0;  // rows that count toward the mean
  for (int64_t r = 0; r < N; ++r) {
    if (tgt[r] == ignore_index) continue;
    if (tgt[r] < 0 || tgt[r] >= V)
      fail("{}: target {} of row {} is outside [0, {}) and is not ignore_index ({}); logits {}", op, tgt[r], r, V,
           ignore_index, logits.str());
    ++count;
  }

  Tensor loss = Tensor::empty({}, logits.dtype());
  Tensor lse = Tensor::empty({N}, logits.dtype());  // [N]
  dispatch_float(op, logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F* x = logits.data<F>();
    F* plse = lse.data<F>();
    std::vector<double> row_loss(N);  // summed in row order below: the same loss for any thread count
    cpu::parallel_for(N, V * 4, [&](int64_t r) {
      const F* xr = x + r * V;  // [V]
      double l = row_logsumexp(xr, V);
      plse[r] = static_cast<F>(l);
      row_loss[r] = tgt[r] == ignore_index ? 0.0 : l - static_cast<double>(xr[tgt[r]]);
    });
    double total = 0;
    for (int64_t r = 0; r < N; ++r) total += row_loss[r];
    *loss.data<F>() = static_cast<F>(count ? total / static_cast<double>(count) : 0.0);
    if (row_losses) *row_losses = std::move(row_loss);
  });

  // dlogits[r] = (softmax(x_r) - onehot(t_r)) * g / count; ignored rows get zero.
  return record(op, loss, {logits, targets},
                [x = logits.detach(), targets = targets.detach(), lse, count, ignore_index](const Tensor& g)
                    -> std::vector<Tensor> {
                  const int64_t N = x.size(0), V = x.size(1);
                  Tensor dx = Tensor::empty(x.shape(), x.dtype());
                  dispatch_float("cross_entropy_backward", x.dtype(), [&](auto tag) {
                    using F = decltype(tag);
                    const F *px = x.data<F>(), *plse = lse.data<F>();
                    const int32_t* tgt = targets.data<int32_t>();
                    F* pd = dx.data<F>();
                    const F scale = static_cast<F>(count ? g.item() / static_cast<double>(count) : 0.0);
                    cpu::parallel_for(N, V * 4, [&](int64_t r) {
                      const F* xr = px + r * V;
                      F* dr = pd + r * V;
                      if (tgt[r] == ignore_index) {
                        std::fill(dr, dr + V, F(0));
                        return;
                      }
                      const F l = plse[r];
                      for (int64_t j = 0; j < V; ++j) dr[j] = exp_simd(xr[j] - l) * scale;
                      dr[tgt[r]] -= scale;
                    });
                  });
                  return {dx, Tensor()};
                });
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------------
// y = x * rstd * w per row of the last dim, rstd = 1 / sqrt(mean(x^2) + eps). The forward saves rstd [rows].
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_same_dtype_device(op, x, weight);
  check_float(op, x);
  check_cpu(op, x);
  if (x.dim() < 1 || weight.dim() != 1 || x.size(-1) == 0 || weight.size(0) != x.size(-1))
    fail("{}: needs x [..., d] and weight [d] with d > 0, got {} and {}", op, x.str(), weight.str());
  if (!(eps >= 0)) fail("{}: eps must be >= 0, got {}", op, eps);
  const int64_t d = x.size(-1), rows = x.numel() / d;

  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Tensor rstd = Tensor::empty({rows}, x.dtype());  // [rows]
  dispatch_float(op, x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *px = x.data<F>(), *pw = weight.data<F>();
    F *py = y.data<F>(), *prstd = rstd.data<F>();
    cpu::parallel_for(rows, d * 2, [&](int64_t r) {
      const F* xr = px + r * d;  // [d]
      F* yr = py + r * d;
      double ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const F s = static_cast<F>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
      prstd[r] = s;
      for (int64_t j = 0; j < d; ++j) yr[j] = xr[j] * s * pw[j];
    });
  });

  // With s = rstd and gw = g * w:  dx = s * gw - x * s^3 * mean(gw * x),  dw = sum over rows of g * x * s.
  // dw is summed per fixed block of rows (blocks depend on `rows` only), then the blocks in order: the result is the
  // same bits for any thread count.
  return record(op, y, {x, weight},
                [x = x.detach(), weight = weight.detach(), rstd, d, rows](const Tensor& g) -> std::vector<Tensor> {
                  Tensor dx = Tensor::empty(x.shape(), x.dtype());
                  Tensor dw = Tensor::empty({d}, x.dtype());
                  dispatch_float("rms_norm_backward", x.dtype(), [&](auto tag) {
                    using F = decltype(tag);
                    const F *px = x.data<F>(), *pw = weight.data<F>(), *prstd = rstd.data<F>(), *pg = g.data<F>();
                    F* pdx = dx.data<F>();
                    const int64_t block = std::max<int64_t>(32, (rows + 255) / 256);  // at most 256 blocks
                    const int64_t blocks = (rows + block - 1) / block;
                    std::vector<double> partial(blocks * d, 0.0);  // [blocks, d]
                    cpu::parallel_for(blocks, block * d * 4, [&](int64_t bi) {
                      double* dw_part = partial.data() + bi * d;
                      for (int64_t r = bi * block; r < std::min(rows, (bi + 1) * block); ++r) {
                        const F *xr = px + r * d, *gr = pg + r * d;
                        F* dxr = pdx + r * d;
                        const F s = prstd[r];
                        double gwx = 0;  // sum of g * w * x over the row
#pragma omp simd reduction(+ : gwx)
                        for (int64_t j = 0; j < d; ++j) gwx += static_cast<double>(gr[j]) * pw[j] * xr[j];
                        const F c = static_cast<F>(gwx / static_cast<double>(d)) * s * s * s;
                        for (int64_t j = 0; j < d; ++j) dxr[j] = s * gr[j] * pw[j] - c * xr[j];
                        for (int64_t j = 0; j < d; ++j) dw_part[j] += static_cast<double>(gr[j] * xr[j] * s);
                      }
                    });
                    std::vector<double> total(d, 0.0);
                    for (int64_t bi = 0; bi < blocks; ++bi)
                      for (int64_t j = 0; j < d; ++j) total[j] += partial[bi * d + j];
                    F* pdw = dw.data<F>();
                    for (int64_t j = 0; j < d; ++j) pdw[j] = static_cast<F>(total[j]);
                  });
                  return {dx, dw};
                });
}

// ---- RoPE -----------------------------------------------------------------------------------------------------------
// Pair (2i, 2i+1) of every head at position t rotates by angle a = (pos_offset + t) * theta^(-2i/Dh):
//   y0 = x0 cos a - x1 sin a,   y1 = x0 sin a + x1 cos a.
// The rotation is orthogonal, so the backward is the inverse rotation (angle -a) of g.

// cos/sin table [T, Dh/2, 2] in the element dtype, angles computed in double. Every rope call with the same
// (T, Dh, theta, pos_offset, dtype) shares it: q and k of every layer, forward and backward, every step.
static Tensor rope_table(int64_t T, int64_t Dh, double theta, int64_t pos_offset, DType dtype) {
  using Key = std::tuple<int64_t, int64_t, double, int64_t, DType>;
  static std::mutex mutex;
  static std::map<Key, Tensor> cache;
  std::lock_guard<std::mutex> lock(mutex);
  Key key{T, Dh, theta, pos_offset, dtype};
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  if (cache.size() >= 64) cache.clear();  // bounded: decoding with a moving pos_offset would otherwise grow it
  Tensor table = Tensor::empty({T, Dh / 2, 2}, dtype);
  dispatch_float("rope", dtype, [&](auto tag) {
    using F = decltype(tag);
    F* p = table.data<F>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < Dh / 2; ++i) {
        double angle = static_cast<double>(pos_offset + t) * std::pow(theta, -2.0 * static_cast<double>(i) / Dh);
        p[(t * (Dh / 2) + i) * 2] = static_cast<F>(std::cos(angle));
        p[(t * (Dh / 2) + i) * 2 + 1] = static_cast<F>(std::sin(angle));
      }
  });
  cache.emplace(key, table);
  return table;
}

// out = rotate(in) by +angle (forward) or -angle (backward). in, out [B, T, H, Dh]; table [T, Dh/2, 2].
template <class F>
static void rope_kernel(const F* in, F* out, const F* table, int64_t B, int64_t T, int64_t H, int64_t Dh,
                        bool inverse) {
  const F sign = inverse ? F(-1) : F(1);
  cpu::parallel_for(B * T, H * Dh * 2, [&](int64_t bt) {
    const F* cs = table + (bt % T) * Dh;  // this position's (cos, sin) pairs, [Dh/2, 2]
    for (int64_t h = 0; h < H; ++h) {
      const F* x = in + (bt * H + h) * Dh;
      F* y = out + (bt * H + h) * Dh;
      for (int64_t i = 0; i < Dh; i += 2) {
        const F c = cs[i], s = sign * cs[i + 1], x0 = x[i], x1 = x[i + 1];
        y[i] = x0 * c - x1 * s;
        y[i + 1] = x0 * s + x1 * c;
      }
    }
  });
}

Tensor rope(const Tensor& x, double theta, int64_t pos_offset) {
  const char* op = "rope";
  check_float(op, x);
  check_cpu(op, x);
  if (x.dim() != 4) fail("{}: needs x [B, T, H, Dh], got {}", op, x.str());
  if (x.size(3) % 2 != 0) fail("{}: head size Dh must be even to form pairs (2i, 2i+1), got x {}", op, x.str());
  if (!(theta > 0)) fail("{}: theta must be > 0, got {}", op, theta);
  if (pos_offset < 0) fail("{}: pos_offset must be >= 0, got {}", op, pos_offset);
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), Dh = x.size(3);
  Tensor table = rope_table(T, Dh, theta, pos_offset, x.dtype());
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  dispatch_float(op, x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    rope_kernel<F>(x.data<F>(), y.data<F>(), table.data<F>(), B, T, H, Dh, /*inverse=*/false);
  });
  return record(op, y, {x}, [table, B, T, H, Dh](const Tensor& g) -> std::vector<Tensor> {
    Tensor dx = Tensor::empty(g.shape(), g.dtype());
    dispatch_float("rope_backward", g.dtype(), [&](auto tag) {
      using F = decltype(tag);
      rope_kernel<F>(g.data<F>(), dx.data<F>(), table.data<F>(), B, T, H, Dh, /*inverse=*/true);
    });
    return {dx};
  });
}

// ---- causal attention -----------------------------------------------------------------------------------------------
// For each (b, h) and query row i: s_j = q_i . k_j / sqrt(Dh) for j <= i, p = softmax(s), o_i = sum_j p_j v_j.
// The forward keeps lse_i = logsumexp_j s_j [B, H, T]; the backward recomputes p_ij = exp(s_ij - lse_i) rather than
// storing the T x T matrix (as FlashAttention does).
// Row (b, t, h) of a [B, T, H, Dh] tensor starts at ((b*T + t)*H + h)*Dh: one head's consecutive t are H*Dh apart.
// Both kernels work on one head (b, h) at a time. Scores and g_i . v_j run along the keys j, on K and V copied
// transposed to [Dh, T] (unit stride, i+1 long, vectorizable, no sum at the end); the sums of rows (o_i, dq_i, dk_j,
// dv_j) run along the head dim, adding whole Dh-long rows.

// xt[e, t] = x[b, t, h, e] for the head starting at `head`: [T, Dh] rows H*Dh apart -> [Dh, T].
template <class F>
[[gnu::always_inline]] inline void head_to_transposed(const F* x, int64_t head, int64_t T, int64_t Dh, int64_t stride, F* xt) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < Dh; ++e) xt[e * T + t] = x[head + t * stride + e];
}

// s[0, n) = alpha * sum_e a[e] * xt[e, 0..n): one query's scores against the first n keys (xt = K^T,
// alpha = 1/sqrt(Dh)), or one output-gradient row against the values (xt = V^T). Summed in registers 16 keys at a
// time; the last chunk may read up to 15 values past n (past row e's end into the next row, and past the buffer's
// end for the last row: callers give xt kTransposedPad values of room after Dh * T).
constexpr int64_t kTransposedPad = 16;
template <class F>
[[gnu::always_inline]] inline void row_times_transposed(const F* a, F alpha, const F* xt, int64_t T, int64_t Dh,
                                                        int64_t n, F* s) {
  constexpr int64_t kChunk = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    F acc[kChunk] = {};
    for (int64_t e = 0; e < Dh; ++e) {
      const F* x = xt + e * T + j0;
#pragma omp simd
      for (int64_t j = 0; j < kChunk; ++j) acc[j] += a[e] * x[j];
    }
    for (int64_t j = 0; j < std::min(kChunk, n - j0); ++j) s[j0 + j] = alpha * acc[j];
  }
}

// out[0, Dh) = sum_{j < n} w[j] * rows[j * stride + (0, Dh)]: a weighted sum of n rows, kept in registers 16 columns
// at a time (adding into `out` itself would wait for the previous j's store on every j).
template <class F>
[[gnu::always_inline]] inline void weighted_row_sum(const F* w, const F* rows, int64_t stride, int64_t n, int64_t Dh,
                                                    F* out) {
  constexpr int64_t kChunk = 16;
  int64_t e0 = 0;
  for (; e0 + kChunk <= Dh; e0 += kChunk) {
    F acc[kChunk] = {};
    for (int64_t j = 0; j < n; ++j) {
      const F* row = rows + j * stride + e0;
#pragma omp simd
      for (int64_t e = 0; e < kChunk; ++e) acc[e] += w[j] * row[e];
    }
    std::copy(acc, acc + kChunk, out + e0);
  }
  for (; e0 < Dh; ++e0) {
    F acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += w[j] * rows[j * stride + e0];
    out[e0] = acc;
  }
}

// Where the rows of one head (b, h) lie in a [B, T, H, Dh] tensor.
struct HeadLayout {
  int64_t T, H, Dh;
  int64_t stride() const { return H * Dh; }                                // from row t to row t + 1
  int64_t start(int64_t bh) const { return ((bh / H) * T * H + bh % H) * Dh; }  // row (b, 0, h), bh = b * H + h
};

// The forward of head bh: o and lse for its T query rows. kt [Dh, T] and p [T] are the caller's scratch.
template <class F>
[[gnu::always_inline]] inline void attention_head_forward(const F* pq, const F* pk, const F* pv, F* po, F* plse,
                                                          int64_t bh, HeadLayout L, F* kt, F* p) {
  const int64_t T = L.T, Dh = L.Dh, stride = L.stride(), head = L.start(bh);
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(Dh)));
  head_to_transposed(pk, head, T, Dh, stride, kt);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = i + 1;  // keys 0..i
    row_times_transposed(pq + head + i * stride, scale, kt, T, Dh, n, p);  // p = s_i
    F m = -std::numeric_limits<F>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
    F z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; ++j) z += (p[j] = exp_simd(p[j] - m));
    const F inv_z = F(1) / z;
    for (int64_t j = 0; j < n; ++j) p[j] *= inv_z;
    weighted_row_sum(p, pv + head, stride, n, Dh, po + head + i * stride);  // o_i = sum_j p_j v_j
    plse[bh * T + i] = m + std::log(z);
  }
}

// The backward of head bh: its rows of dq, dk, dv. kt, vt [Dh, T] and p, ds [T] are the caller's scratch.
// With p_ij = exp(s_ij - lse_i), g = dL/do and D_i = g_i . o_i (= sum_j p_ij g_i . v_j):
//   dv_j += p_ij g_i,   ds_ij = p_ij (g_i . v_j - D_i),
//   dq_i = sum_j ds_ij k_j / sqrt(Dh),   dk_j += ds_ij q_i / sqrt(Dh).
template <class F>
[[gnu::always_inline]] inline void attention_head_backward(const F* pq, const F* pk, const F* pv, const F* po,
                                                           const F* plse, const F* pg, F* pdq, F* pdk, F* pdv,
                                                           int64_t bh, HeadLayout L, F* kt, F* vt, F* p, F* ds) {
  const int64_t T = L.T, Dh = L.Dh, stride = L.stride(), head = L.start(bh);
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(Dh)));
  head_to_transposed(pk, head, T, Dh, stride, kt);
  head_to_transposed(pv, head, T, Dh, stride, vt);
  for (int64_t t = 0; t < T; ++t) {
    std::fill_n(pdk + head + t * stride, Dh, F(0));
    std::fill_n(pdv + head + t * stride, Dh, F(0));
  }
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = i + 1;
    const F *qi = pq + head + i * stride, *gi = pg + head + i * stride;
    const F Di = dot(gi, po + head + i * stride, Dh), l = plse[bh * T + i];
    row_times_transposed(qi, scale, kt, T, Dh, n, p);
    for (int64_t j = 0; j < n; ++j) p[j] = exp_simd(p[j] - l);
    row_times_transposed(gi, F(1), vt, T, Dh, n, ds);  // g_i . v_j
    for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - Di) * scale;
    weighted_row_sum(ds, pk + head, stride, n, Dh, pdq + head + i * stride);  // dq_i = sum_j ds_ij k_j
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = head + j * stride;
      axpy(ds[j], qi, pdk + row, Dh);  // dk_j += ds_ij q_i
      axpy(p[j], gi, pdv + row, Dh);   // dv_j += p_ij g_i
    }
  }
}

// This file is compiled for baseline x86-64 (SSE2, 4 floats per instruction). The f32 heads are compiled a second
// time for AVX-512 (16 floats, FMA) and picked at run time when the CPU has it: the same code, which makes a tiny
// training step 9-10% faster here (docs/benchmarks.md).
#if defined(__x86_64__)
[[gnu::target("avx512f,fma")]] static void attention_head_forward_avx512(
    const float* pq, const float* pk, const float* pv, float* po, float* plse, int64_t bh, HeadLayout L, float* kt,
    float* p) {
  attention_head_forward(pq, pk, pv, po, plse, bh, L, kt, p);
}
[[gnu::target("avx512f,fma")]] static void attention_head_backward_avx512(
    const float* pq, const float* pk, const float* pv, const float* po, const float* plse, const float* pg, float* pdq,
    float* pdk, float* pdv, int64_t bh, HeadLayout L, float* kt, float* vt, float* p, float* ds) {
  attention_head_backward(pq, pk, pv, po, plse, pg, pdq, pdk, pdv, bh, L, kt, vt, p, ds);
}
static const bool kAttentionAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
static const bool kAttentionAvx512 = false;
#endif

Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* op = "causal_attention";
  check_same_dtype_device(op, q, k);
  check_same_dtype_device(op, q, v);
  check_float(op, q);
  check_cpu(op, q);
  if (q.dim() != 4 || k.shape() != q.shape() || v.shape() != q.shape() || q.size(3) == 0)
    fail("{}: needs q, k, v of one shape [B, T, H, Dh] with Dh > 0, got {}, {}, {}", op, q.str(), k.str(), v.str());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const HeadLayout layout{T, H, Dh};
  const bool parallel = B * H * T * T * Dh > 2 * cpu::kParallelGrain;

  Tensor out = Tensor::empty(q.shape(), q.dtype());  // [B, T, H, Dh]
  Tensor lse = Tensor::empty({B, H, T}, q.dtype());  // [B, H, T]
  dispatch_float(op, q.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *pq = q.data<F>(), *pk = k.data<F>(), *pv = v.data<F>();
    F *po = out.data<F>(), *plse = lse.data<F>();
#pragma omp parallel if (parallel)
    {
      std::vector<F> kt(Dh * T + kTransposedPad), p(T);  // per thread
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
#if defined(__x86_64__)
        if constexpr (std::is_same_v<F, float>)
          if (kAttentionAvx512) {
            attention_head_forward_avx512(pq, pk, pv, po, plse, bh, layout, kt.data(), p.data());
            continue;
          }
#endif
        attention_head_forward(pq, pk, pv, po, plse, bh, layout, kt.data(), p.data());
      }
    }
  });

  // Parallel over heads (b, h): a thread owns that head's rows of dk and dv, so the sums over query rows i need no
  // atomics.
  return record(op, out, {q, k, v},
                [q = q.detach(), k = k.detach(), v = v.detach(), out = out.detach(), lse, layout, parallel](
                    const Tensor& g) -> std::vector<Tensor> {
                  const int64_t BH = q.size(0) * q.size(2), T = layout.T, Dh = layout.Dh;
                  Tensor dq = Tensor::empty(q.shape(), q.dtype()), dk = Tensor::empty(q.shape(), q.dtype()),
                         dv = Tensor::empty(q.shape(), q.dtype());
                  dispatch_float("causal_attention_backward", q.dtype(), [&](auto tag) {
                    using F = decltype(tag);
                    const F *pq = q.data<F>(), *pk = k.data<F>(), *pv = v.data<F>(), *po = out.data<F>(),
                            *plse = lse.data<F>(), *pg = g.data<F>();
                    F *pdq = dq.data<F>(), *pdk = dk.data<F>(), *pdv = dv.data<F>();
#pragma omp parallel if (parallel)
                    {
                      std::vector<F> kt(Dh * T + kTransposedPad), vt(Dh * T + kTransposedPad), p(T), ds(T);
#pragma omp for schedule(static)
                      for (int64_t bh = 0; bh < BH; ++bh) {
#if defined(__x86_64__)
                        if constexpr (std::is_same_v<F, float>)
                          if (kAttentionAvx512) {
                            attention_head_backward_avx512(pq, pk, pv, po, plse, pg, pdq, pdk, pdv, bh, layout,
                                                           kt.data(), vt.data(), p.data(), ds.data());
                            continue;
                          }
#endif
                        attention_head_backward(pq, pk, pv, po, plse, pg, pdq, pdk, pdv, bh, layout, kt.data(),
                                                vt.data(), p.data(), ds.data());
                      }
                    }
                  });
                  return {dq, dk, dv};
                });
}

}  // namespace moelab
