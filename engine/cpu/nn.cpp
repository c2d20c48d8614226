// CPU kernels of engine/kernels/nn.h: cross-entropy, RMSNorm, RoPE and causal attention. A forward saves only the
// small per-row statistic its backward needs (logsumexp, 1/rms); the backward recomputes the rest.
// In this file F is the element type (float or double); B, T, H, Dh, V, d are sizes named as in docs/model.md.
// RoPE, attention and the LM head's cross-entropy compute bf16 tensors in f32 (engine/cpu/bf16.h).
#include "engine/kernels/nn.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "engine/cpu/bf16.h"
#include "engine/cpu/math.h"
#include "engine/cpu/parallel.h"

namespace moelab::cpu {

namespace {

// Inner loops over one contiguous row; `omp simd` lets the compiler reorder the sum so it vectorizes.
template <class F> [[gnu::always_inline]] inline F dot(const F* a, const F* b, int64_t n) {
  F s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class F>
[[gnu::always_inline]] inline void axpy(F alpha, const F* x, F* y, int64_t n) {  // y += alpha * x, apart
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// ---- cross-entropy --------------------------------------------------------------------------------------------------

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t count,
                           const Tensor& loss, const Tensor& lse, const Tensor& row_loss) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int32_t* tgt = targets.data<int32_t>();
  double* rows = row_loss.data<double>();
  dispatch_float("cross_entropy", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F* x = logits.data<F>();
    F* plse = lse.data<F>();
    parallel_for(N, V * 4, [&](int64_t r) {
      const F* xr = x + r * V;  // [V]
      double l = row_logsumexp(xr, V);
      plse[r] = static_cast<F>(l);
      rows[r] = tgt[r] == ignore_index ? 0.0 : l - static_cast<double>(xr[tgt[r]]);
    });
    double total = 0;  // in row order: the same loss for any thread count
    for (int64_t r = 0; r < N; ++r) total += rows[r];
    *loss.data<F>() = static_cast<F>(count ? total / static_cast<double>(count) : 0.0);
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& g,
                            int32_t ignore_index, int64_t count, const Tensor& dlogits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  dispatch_float("cross_entropy_backward", logits.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *px = logits.data<F>(), *plse = lse.data<F>();
    const int32_t* tgt = targets.data<int32_t>();
    F* pd = dlogits.data<F>();
    const F scale = static_cast<F>(count ? static_cast<double>(*g.data<F>()) / static_cast<double>(count) : 0.0);
    parallel_for(N, V * 4, [&](int64_t r) {
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
}

void cross_entropy_with_gradient(const Tensor& logits, const Tensor& targets, int32_t ignore_index, int64_t count,
                                 const Tensor& row_loss, const Tensor& dlogits) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int32_t* tgt = targets.data<int32_t>();
  double* rows = row_loss.data<double>();
  const Tensor logits_f = as_f32(logits);  // bf16 logits widened (dlogits may be them: it is read from the copy)
  dispatch_float("cross_entropy_with_gradient", logits_f.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F* px = logits_f.data<F>();
    const F scale = static_cast<F>(count ? 1.0 / static_cast<double>(count) : 0.0);
    // Row r's gradient into d, as the backward kernel computes it, converted to Out as it is stored.
    auto write_gradient = [&](int64_t r, const F* xr, F l, auto* d) {
      using Out = std::remove_pointer_t<decltype(d)>;
      const int64_t t = tgt[r];
      auto store = [](F v) {
        if constexpr (std::is_same_v<Out, bf16>)
          return to_bf16(static_cast<float>(v));
        else
          return v;
      };
      if (t == ignore_index) {
        std::fill(d, d + V, store(F(0)));
        return;
      }
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) d[j] = store(exp_simd(xr[j] - l) * scale - (j == t ? scale : F(0)));
    };
    parallel_for(N, V * 4, [&](int64_t r) {
      const F* xr = px + r * V;  // [V]
      const double l = row_logsumexp(xr, V);
      rows[r] = tgt[r] == ignore_index ? 0.0 : l - static_cast<double>(xr[tgt[r]]);  // read before any write
      if (!dlogits.defined()) return;
      if (dlogits.dtype() == DType::BF16)
        write_gradient(r, xr, static_cast<F>(l), dlogits.data<bf16>() + r * V);
      else
        write_gradient(r, xr, static_cast<F>(l), dlogits.data<F>() + r * V);
    });
  });
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------------

void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const Tensor y_f32 = f32_scratch(y);
  dispatch_float("rms_norm", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *px = x.data<F>(), *pw = weight.data<F>();
    F *py = y_f32.data<F>(), *prstd = rstd.data<F>();
    parallel_for(rows, d * 2, [&](int64_t r) {
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
  store_rounded(y_f32, y);
}

// dweight is summed per fixed block of rows (blocks depend on `rows` only), then the blocks in order: the result is
// the same bits for any thread count.
void rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& g,
                       const Tensor& dx_added_to, const Tensor& dx, const Tensor& dweight) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const bool added = dx_added_to.defined();
  const Tensor g_f32 = as_f32(g);
  dispatch_float("rms_norm_backward", x.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *px = x.data<F>(), *pw = weight.data<F>(), *prstd = rstd.data<F>(), *pg = g_f32.data<F>();
    F* pdx = dx.data<F>();
    const int64_t block = std::max<int64_t>(32, (rows + 255) / 256);  // at most 256 blocks
    const int64_t blocks = (rows + block - 1) / block;
    std::vector<double> partial(blocks * d, 0.0);  // [blocks, d]
    parallel_for(blocks, block * d * 4, [&](int64_t bi) {
      double* dw_part = partial.data() + bi * d;
      for (int64_t r = bi * block; r < std::min(rows, (bi + 1) * block); ++r) {
        const F *xr = px + r * d, *gr = pg + r * d;
        F* dxr = pdx + r * d;
        const F s = prstd[r];
        double gwx = 0;  // sum of g * w * x over the row
#pragma omp simd reduction(+ : gwx)
        for (int64_t j = 0; j < d; ++j) gwx += static_cast<double>(gr[j]) * pw[j] * xr[j];
        const F c = static_cast<F>(gwx / static_cast<double>(d)) * s * s * s;
        for (int64_t j = 0; j < d; ++j) {
          const F term = s * gr[j] * pw[j] - c * xr[j];
          dxr[j] = added ? dxr[j] + term : term;
        }
        for (int64_t j = 0; j < d; ++j) dw_part[j] += static_cast<double>(gr[j] * xr[j] * s);
      }
    });
    std::vector<double> total(d, 0.0);
    for (int64_t bi = 0; bi < blocks; ++bi)
      for (int64_t j = 0; j < d; ++j) total[j] += partial[bi * d + j];
    F* pdw = dweight.data<F>();
    for (int64_t j = 0; j < d; ++j) pdw[j] = static_cast<F>(total[j]);
  });
}

// ---- RoPE -----------------------------------------------------------------------------------------------------------

namespace {

// out = rotate(in) by +angle (forward) or -angle (backward). in, out [B, T, H, Dh]; table [T, Dh/2, 2].
template <class F> void rope_rotate(const Tensor& in_t, const Tensor& table_t, const Tensor& out_t, bool inverse) {
  const int64_t B = in_t.size(0), T = in_t.size(1), H = in_t.size(2), Dh = in_t.size(3);
  const F *in = in_t.data<F>(), *table = table_t.data<F>();
  F* out = out_t.data<F>();
  const F sign = inverse ? F(-1) : F(1);
  parallel_for(B * T, H * Dh * 2, [&](int64_t bt) {
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

}  // namespace

void rope_forward(const Tensor& x, const Tensor& table, const Tensor& y) {
  require_one_dtype("rope", {x, y});
  const Tensor x_f = as_f32(x), y_f = f32_scratch(y);
  dispatch_float("rope", x_f.dtype(),
                 [&](auto tag) { rope_rotate<decltype(tag)>(x_f, table, y_f, /*inverse=*/false); });
  store_rounded(y_f, y);
}

void rope_backward(const Tensor& g, const Tensor& table, const Tensor& dx) {
  require_one_dtype("rope", {g, dx});
  const Tensor g_f = as_f32(g), dx_f = f32_scratch(dx);
  dispatch_float("rope_backward", g_f.dtype(),
                 [&](auto tag) { rope_rotate<decltype(tag)>(g_f, table, dx_f, /*inverse=*/true); });
  store_rounded(dx_f, dx);
}

// ---- causal attention -----------------------------------------------------------------------------------------------
// The forward keeps lse_i [B, H, T]; the backward recomputes p_ij = exp(s_ij - lse_i) rather than storing the T x T
// matrix (as FlashAttention does).
// Row (b, t, h) of a [B, T, H, Dh] tensor starts at ((b*T + t)*H + h)*Dh: one head's consecutive t are H*Dh apart.
// Both kernels work on one head (b, h) at a time. Scores and g_i . v_j run along the keys j, on K and V copied
// transposed to [Dh, T] (unit stride, i+1 long, vectorizable, no sum at the end); the sums of rows (o_i, dq_i, dk_j,
// dv_j) run along the head dim, adding whole Dh-long rows.

namespace {

// xt[e, t] = x[b, t, h, e] for the head starting at `head`: [T, Dh] rows H*Dh apart -> [Dh, T].
template <class F>
[[gnu::always_inline]] inline void head_to_transposed(const F* x, int64_t head, int64_t T, int64_t Dh, int64_t stride,
                                                      F* xt) {
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
  int64_t stride() const { return H * Dh; }                                     // from row t to row t + 1
  int64_t start(int64_t bh) const { return ((bh / H) * T * H + bh % H) * Dh; }  // row (b, 0, h), bh = b * H + h
};

// p[0, n) = bf16(p[0, n)): the probabilities as the operands of a bf16 product (Precision::BF16).
template <class F> [[gnu::always_inline]] inline void round_to_bf16_values(F* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = to_float(to_bf16(static_cast<float>(p[j])));
}

// The forward of head bh: o and lse for its T query rows. kt [Dh, T] and p [T] are the caller's scratch.
// bf16_p: the probabilities are rounded to bf16 before they weight v (q, k, v are the caller's to round).
template <class F>
[[gnu::always_inline]] inline void attention_head_forward(const F* pq, const F* pk, const F* pv, F* po, F* plse,
                                                          int64_t bh, HeadLayout L, bool bf16_p, F* kt, F* p) {
  const int64_t T = L.T, Dh = L.Dh, stride = L.stride(), head = L.start(bh);
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(Dh)));
  head_to_transposed(pk, head, T, Dh, stride, kt);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = i + 1;                                               // keys 0..i
    row_times_transposed(pq + head + i * stride, scale, kt, T, Dh, n, p);  // p = s_i
    F m = -std::numeric_limits<F>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
    F z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; ++j) z += (p[j] = exp_simd(p[j] - m));
    const F inv_z = F(1) / z;
    for (int64_t j = 0; j < n; ++j) p[j] *= inv_z;
    if (bf16_p) round_to_bf16_values(p, n);
    weighted_row_sum(p, pv + head, stride, n, Dh, po + head + i * stride);  // o_i = sum_j p_j v_j
    plse[bh * T + i] = m + std::log(z);
  }
}

// The backward of head bh: its rows of dq, dk, dv. kt, vt [Dh, T] and p, ds [T] are the caller's scratch.
// With p_ij = exp(s_ij - lse_i), g = dL/do and D_i = g_i . o_i (= sum_j p_ij g_i . v_j):
//   dv_j += p_ij g_i,   ds_ij = p_ij (g_i . v_j - D_i) / sqrt(Dh),
//   dq_i = sum_j ds_ij k_j,   dk_j += ds_ij q_i.
// bf16_p_ds: p_ij and ds_ij (with its 1 / sqrt(Dh)) are rounded to bf16 before they weight g_i, k_j and q_i (the
// caller rounds q, k, v, g).
template <class F>
[[gnu::always_inline]] inline void attention_head_backward(const F* pq, const F* pk, const F* pv, const F* po,
                                                           const F* plse, const F* pg, F* pdq, F* pdk, F* pdv,
                                                           int64_t bh, HeadLayout L, bool bf16_p_ds, F* kt, F* vt, F* p,
                                                           F* ds) {
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
    if (bf16_p_ds) {
      round_to_bf16_values(p, n);
      round_to_bf16_values(ds, n);
    }
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
[[gnu::target("avx512f,fma")]] void attention_head_forward_avx512(const float* pq, const float* pk, const float* pv,
                                                                  float* po, float* plse, int64_t bh, HeadLayout L,
                                                                  bool bf16_p, float* kt, float* p) {
  attention_head_forward(pq, pk, pv, po, plse, bh, L, bf16_p, kt, p);
}
[[gnu::target("avx512f,fma")]] void attention_head_backward_avx512(const float* pq, const float* pk, const float* pv,
                                                                   const float* po, const float* plse, const float* pg,
                                                                   float* pdq, float* pdk, float* pdv, int64_t bh,
                                                                   HeadLayout L, bool bf16_p_ds, float* kt, float* vt,
                                                                   float* p, float* ds) {
  attention_head_backward(pq, pk, pv, po, plse, pg, pdq, pdk, pdv, bh, L, bf16_p_ds, kt, vt, p, ds);
}
const bool kAttentionAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
const bool kAttentionAvx512 = false;
#endif

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                       Precision precision) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3);
  const HeadLayout layout{T, H, Dh};
  const bool parallel = B * H * T * T * Dh > 2 * kParallelGrain, bf16 = precision == Precision::BF16;
  require_one_dtype("causal_attention", {q, k, v, out});
  const Tensor qo = bf16_operand(q, bf16), ko = bf16_operand(k, bf16), vo = bf16_operand(v, bf16),
               out_f = f32_scratch(out);
  dispatch_float("causal_attention", qo.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *pq = qo.data<F>(), *pk = ko.data<F>(), *pv = vo.data<F>();
    F *po = out_f.data<F>(), *plse = lse.data<F>();
#pragma omp parallel if (parallel)
    {
      std::vector<F> kt(Dh * T + kTransposedPad), p(T);  // per thread
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
#if defined(__x86_64__)
        if constexpr (std::is_same_v<F, float>)
          if (kAttentionAvx512) {
            attention_head_forward_avx512(pq, pk, pv, po, plse, bh, layout, bf16, kt.data(), p.data());
            continue;
          }
#endif
        attention_head_forward(pq, pk, pv, po, plse, bh, layout, bf16, kt.data(), p.data());
      }
    }
  });
  store_rounded(out_f, out);
}

// Parallel over heads (b, h): a thread owns that head's rows of dk and dv, so the sums over query rows i need no
// atomics.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& g, const Tensor& dq, const Tensor& dk, const Tensor& dv, Precision precision) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dh = q.size(3), BH = B * H;
  const HeadLayout layout{T, H, Dh};
  const bool parallel = B * H * T * T * Dh > 2 * kParallelGrain, bf16 = precision == Precision::BF16;
  require_one_dtype("causal_attention_backward", {q, k, v, out, g, dq, dk, dv});
  const Tensor qo = bf16_operand(q, bf16), ko = bf16_operand(k, bf16), vo = bf16_operand(v, bf16),
               go = bf16_operand(g, bf16), out_f = as_f32(out), dq_f = f32_scratch(dq), dk_f = f32_scratch(dk),
               dv_f = f32_scratch(dv);
  dispatch_float("causal_attention_backward", qo.dtype(), [&](auto tag) {
    using F = decltype(tag);
    const F *pq = qo.data<F>(), *pk = ko.data<F>(), *pv = vo.data<F>(), *po = out_f.data<F>(), *plse = lse.data<F>(),
            *pg = go.data<F>();
    F *pdq = dq_f.data<F>(), *pdk = dk_f.data<F>(), *pdv = dv_f.data<F>();
#pragma omp parallel if (parallel)
    {
      std::vector<F> kt(Dh * T + kTransposedPad), vt(Dh * T + kTransposedPad), p(T), ds(T);
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < BH; ++bh) {
#if defined(__x86_64__)
        if constexpr (std::is_same_v<F, float>)
          if (kAttentionAvx512) {
            attention_head_backward_avx512(pq, pk, pv, po, plse, pg, pdq, pdk, pdv, bh, layout, bf16, kt.data(),
                                           vt.data(), p.data(), ds.data());
            continue;
          }
#endif
        attention_head_backward(pq, pk, pv, po, plse, pg, pdq, pdk, pdv, bh, layout, bf16, kt.data(), vt.data(),
                                p.data(), ds.data());
      }
    }
  });
  store_rounded(dq_f, dq);
  store_rounded(dk_f, dk);
  store_rounded(dv_f, dv);
}

}  // namespace moelab::cpu
