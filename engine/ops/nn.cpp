// Fused neural-net ops: cross-entropy, RMSNorm, RoPE and causal attention. Each op checks its inputs, allocates its
// outputs, runs its kernel (engine/kernels/nn.h: engine/cpu/nn.cpp, engine/cuda/nn.cu) and records a backward that
// runs the paired backward kernel. A forward saves only the small per-row statistic its backward needs.
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "engine/kernels/matmul.h"
#include "engine/kernels/nn.h"
#include "engine/ops/common.h"

namespace moelab {
using namespace detail;

// ---- cross-entropy --------------------------------------------------------------------------------------------------
// loss = mean over counted rows r of (logsumexp(x_r) - x_r[t_r]); rows whose target is ignore_index do not count.
// If every row is ignored the loss is defined as 0 with a zero gradient (PyTorch gives NaN; a batch that is all
// padding should not poison training).

// The number of rows that count toward the mean; throws on a target outside [0, V) other than ignore_index. Reads
// the targets on the host (a copy from the GPU). `of` names the logits in the message.
static int64_t counted_rows(const char* op, int64_t V, const Tensor& targets, int32_t ignore_index,
                            const std::string& of) {
  const std::vector<int32_t> tgt = targets.to_vector<int32_t>();
  int64_t count = 0;
  for (size_t r = 0; r < tgt.size(); ++r) {
    if (tgt[r] == ignore_index) continue;
    if (tgt[r] < 0 || tgt[r] >= V)
      fail("{}: target {} of row {} is outside [0, {}) and is not ignore_index ({}); {}", op, tgt[r], r, V,
           ignore_index, of);
    ++count;
  }
  return count;
}

static Tensor cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& g,
                                     int32_t ignore_index, int64_t count) {
  Tensor dlogits = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
  KERNEL(cross_entropy_backward, logits.device())(logits, targets, lse, g, ignore_index, count, dlogits);
  return dlogits;
}

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index, Tensor* row_losses) {
  const char* op = "cross_entropy";
  check_float(op, logits);
  check_index(op, targets);
  if (logits.device() != targets.device())
    fail("{}: logits {} and targets {} are on different devices", op, logits.str(), targets.str());
  if (logits.dim() != 2 || targets.dim() != 1 || targets.size(0) != logits.size(0))
    fail("{}: needs logits [N, V] and targets [N], got {} and {}", op, logits.str(), targets.str());
  const int64_t N = logits.size(0);
  const int64_t count = counted_rows(op, logits.size(1), targets, ignore_index, "logits " + logits.str());
  Tensor loss = Tensor::empty({}, logits.dtype(), logits.device());
  Tensor lse = Tensor::empty({N}, logits.dtype(), logits.device());   // [N], for the backward
  Tensor row_loss = Tensor::empty({N}, DType::F64, logits.device());  // [N]
  KERNEL(cross_entropy_forward, logits.device())(logits, targets, ignore_index, count, loss, lse, row_loss);
  if (row_losses) *row_losses = row_loss;
  return record(op, loss, {logits, targets},
                [logits = logits.detach(), targets = targets.detach(), lse, count,
                 ignore_index](const Tensor& g) -> std::vector<Tensor> {
                  return {cross_entropy_backward(logits, targets, lse, g, ignore_index, count), Tensor()};
                });
}

// ---- the LM head's cross-entropy ------------------------------------------------------------------------------------
// cross_entropy(x @ weight^T, targets) without the logits [N, V] ever existing whole (for M: 2.1 GB in f32, and as
// much again for their gradient). Chunks of rows: each chunk's logits are one product, the CE kernel reads them once
// and writes their gradient over them (for an upstream gradient of 1; both bf16 under mixed precision), and
// the chunk's two gradient products follow at once: dx into the chunk's rows, dweight added up over the chunks (beta
// = 1). So the forward computes the gradients, when one is needed; the backward scales them by the upstream gradient.

// A chunk has as many rows as this many bytes of f32 logits hold (bf16 ones take half): few enough chunks for large
// products, little memory.
constexpr int64_t kLogitsChunkBytes = int64_t(256) << 20;

Tensor linear_cross_entropy(const Tensor& x, const Tensor& weight, const Tensor& targets, int32_t ignore_index,
                            Tensor* row_losses, int64_t chunk_rows) {
  const char* op = "linear_cross_entropy";
  check_same_dtype_device(op, x, weight);
  check_index(op, targets);
  if (x.dtype() != DType::F32 && x.dtype() != DType::F64)
    fail("{}: needs f32 or f64 x and weight, got {}", op, x.str());
  if (x.device() != targets.device())
    fail("{}: x {} and targets {} are on different devices", op, x.str(), targets.str());
  if (x.dim() != 2 || weight.dim() != 2 || weight.size(1) != x.size(1) || targets.dim() != 1 ||
      targets.size(0) != x.size(0))
    fail("{}: needs x [N, d], weight [V, d] and targets [N], got {}, {} and {}", op, x.str(), weight.str(),
         targets.str());
  const int64_t N = x.size(0), V = weight.size(0), d = x.size(1);
  const Device device = x.device();
  const int64_t count = counted_rows(op, V, targets, ignore_index, "weight " + weight.str());
  const bool need_dx = grad_enabled() && x.requires_grad(), need_dweight = grad_enabled() && weight.requires_grad();

  // Under BF16 precision the products take bf16 copies of x and weight (as matmul's would) and the logits and their
  // gradient are bf16 tensors.
  const bool mixed = multiplied_in_bf16(x);
  const Tensor x_operand = mixed ? rounded_to_bf16(x) : x.detach();
  const Tensor weight_operand = mixed ? rounded_to_bf16(weight) : weight.detach();

  // Every chunk's logits in turn, bf16 under mixed precision (the product rounded as it is written, autocast's bf16
  // logits), and their gradient written over them.
  const int64_t rows = std::min(N, chunk_rows > 0 ? chunk_rows : std::max<int64_t>(1, kLogitsChunkBytes / (4 * V)));
  const Tensor logits = Tensor::empty({rows, V}, mixed ? DType::BF16 : x.dtype(), device);
  const Tensor dlogits = need_dx || need_dweight ? logits : Tensor();
  const Tensor row_loss = Tensor::empty({N}, DType::F64, device);
  const Tensor dx = need_dx ? Tensor::empty({N, d}, x.dtype(), device) : Tensor();
  Tensor dweight;  // the products add to it from the second chunk on: zeros when there is none (N = 0)
  if (need_dweight) dweight = N ? Tensor::empty({V, d}, x.dtype(), device) : zeros({V, d}, x.dtype(), device);
  const auto product = KERNEL(batched_matmul, device);
  const auto cross_entropy_rows = KERNEL(cross_entropy_with_gradient, device);
  for (int64_t begin = 0; begin < N; begin += rows) {
    const int64_t end = std::min(N, begin + rows);
    const Tensor chunk_x = slice_rows(x_operand, begin, end), chunk_logits = slice_rows(logits, 0, end - begin);
    const Tensor chunk_dlogits = dlogits.defined() ? slice_rows(dlogits, 0, end - begin) : Tensor();
    product(chunk_x, weight_operand, false, true, false, Tensor(), chunk_logits);  // [n, d] @ [V, d]^T
    cross_entropy_rows(chunk_logits, slice_rows(targets, begin, end), ignore_index, count,
                       slice_rows(row_loss, begin, end), chunk_dlogits);
    // dx's rows [n, V] @ [V, d]; dweight += [n, V]^T @ [n, d], the first chunk's product written over it.
    if (need_dx) product(chunk_dlogits, weight_operand, false, false, false, Tensor(), slice_rows(dx, begin, end));
    if (need_dweight) product(chunk_dlogits, chunk_x, true, false, false, begin > 0 ? dweight : Tensor(), dweight);
  }
  if (row_losses) *row_losses = row_loss;
  const double inverse_count = count ? 1.0 / static_cast<double>(count) : 0.0;
  Tensor loss = to_dtype(mul(sum(row_loss), inverse_count), x.dtype());
  return record(op, loss, {x, weight, targets}, [dx, dweight](const Tensor& g) -> std::vector<Tensor> {
    return {dx.defined() ? mul(dx, g) : Tensor(), dweight.defined() ? mul(dweight, g) : Tensor(), Tensor()};
  });
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------------
// y = x * rstd * w per row of the last dim, rstd = 1 / sqrt(mean(x^2) + eps). The forward saves rstd [rows].
// The backward adds dx to the gradient x holds when it holds one alone (AccumulatingBackwardFn): a block's input is
// also the residual add's, whose gradient is there first, so no add kernel reads both and writes a third tensor.

static std::vector<Tensor> rms_norm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& g,
                                             const std::vector<Tensor>& held) {
  const Tensor held_dx = held.empty() ? Tensor() : held[0];
  const bool add_to_held = held_dx.defined() && held_dx.dtype() == x.dtype();
  Tensor dx = add_to_held ? held_dx : Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor dweight = Tensor::empty(weight.shape(), x.dtype(), x.device());
  KERNEL(rms_norm_backward, x.device())(x, weight, rstd, g, add_to_held ? dx : Tensor(), dx, dweight);
  return {dx, dweight};
}

// rms_norm (y in x's dtype) and rms_norm_to_bf16 (y bf16).
static Tensor rms_norm_op(const char* op, const Tensor& x, const Tensor& weight, double eps, DType y_dtype) {
  check_same_dtype_device(op, x, weight);
  check_float(op, x);
  if (x.dim() < 1 || weight.dim() != 1 || x.size(-1) == 0 || weight.size(0) != x.size(-1))
    fail("{}: needs x [..., d] and weight [d] with d > 0, got {} and {}", op, x.str(), weight.str());
  if (!(eps >= 0)) fail("{}: eps must be >= 0, got {}", op, eps);
  if (y_dtype == DType::BF16 && x.dtype() != DType::F32) fail("{}: needs an f32 x, got {}", op, x.str());
  const int64_t rows = x.numel() / x.size(-1);
  Tensor y = Tensor::empty(x.shape(), y_dtype, x.device());
  Tensor rstd = Tensor::empty({rows}, x.dtype(), x.device());  // [rows]
  KERNEL(rms_norm_forward, x.device())(x, weight, eps, y, rstd);
  return record_accumulating(
      op, y, {x, weight},
      [x = x.detach(), weight = weight.detach(), rstd](const Tensor& g, const std::vector<Tensor>& held) {
        return rms_norm_backward(x, weight, rstd, g, held);
      });
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  return rms_norm_op("rms_norm", x, weight, eps, x.dtype());
}

Tensor rms_norm_to_bf16(const Tensor& x, const Tensor& weight, double eps) {
  return rms_norm_op("rms_norm_to_bf16", x, weight, eps, DType::BF16);
}

// ---- RoPE -----------------------------------------------------------------------------------------------------------
// Pair (2i, 2i+1) of every head at position t rotates by angle a = (pos_offset + t) * theta^(-2i/Dh):
//   y0 = x0 cos a - x1 sin a,   y1 = x0 sin a + x1 cos a.
// The rotation is orthogonal, so the backward is the inverse rotation (angle -a) of g.

// cos/sin table [T, Dh/2, 2] in the element dtype, angles computed in double on the host (so both devices rotate by
// the same numbers). Every rope call with the same (T, Dh, theta, pos_offset, dtype, device) shares it: q and k of
// every layer, forward and backward, every step.
static Tensor rope_table(int64_t T, int64_t Dh, double theta, int64_t pos_offset, DType dtype, Device device) {
  using Key = std::tuple<int64_t, int64_t, double, int64_t, DType, Device>;
  static std::mutex mutex;
  static std::map<Key, Tensor> cache;
  std::lock_guard<std::mutex> lock(mutex);
  Key key{T, Dh, theta, pos_offset, dtype, device};
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
  if (device != Device::CPU) table = to_device(table, device);
  cache.emplace(key, table);
  return table;
}

Tensor rope(const Tensor& x, double theta, int64_t pos_offset) {
  const char* op = "rope";
  check_float(op, x);
  if (x.dim() != 4) fail("{}: needs x [B, T, H, Dh], got {}", op, x.str());
  if (x.size(3) % 2 != 0) fail("{}: head size Dh must be even to form pairs (2i, 2i+1), got x {}", op, x.str());
  if (!(theta > 0)) fail("{}: theta must be > 0, got {}", op, theta);
  if (pos_offset < 0) fail("{}: pos_offset must be >= 0, got {}", op, pos_offset);
  // A bf16 x rotates in f32 (its table f32) and is rounded as it is stored, as its gradient.
  const DType dtype = x.dtype(), math = dtype == DType::BF16 ? DType::F32 : dtype;
  Tensor table = rope_table(x.size(1), x.size(3), theta, pos_offset, math, x.device());
  Tensor y = Tensor::empty(x.shape(), dtype, x.device());
  KERNEL(rope_forward, x.device())(x, table, y);
  return record(op, y, {x}, [table, dtype](const Tensor& g) -> std::vector<Tensor> {
    const Tensor g_x = g.dtype() == dtype ? g : to_dtype(g, dtype);  // x's gradient has x's dtype
    Tensor dx = Tensor::empty(g.shape(), dtype, g.device());
    KERNEL(rope_backward, g.device())(g_x, table, dx);
    return {dx};
  });
}

// ---- causal attention -----------------------------------------------------------------------------------------------
// Causal softmax(q k^T / sqrt(Dh)) v per head. The forward keeps lse [B, H, T]; the backward recomputes the
// probabilities from it rather than storing the T x T matrix. Under Precision::BF16 its two products take bf16
// operands (engine/kernels/nn.h says which values are rounded) for heads of up to 128 dims, what the GPU's
// tensor-core kernels take; longer heads, and f64, are not rounded (on either device, so that the CPU stays the
// GPU's reference). bf16 tensors (q, k, v, out and their gradients; lse stays f32) always multiply so, and take heads
// of up to kMaxBf16HeadDim dims only.

static std::vector<Tensor> attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                              const Tensor& lse, const Tensor& g, Precision precision) {
  Tensor dq = Tensor::empty(q.shape(), q.dtype(), q.device()), dk = Tensor::empty(q.shape(), q.dtype(), q.device()),
         dv = Tensor::empty(q.shape(), q.dtype(), q.device());
  const Tensor g_out = g.dtype() == q.dtype() ? g : to_dtype(g, q.dtype());  // out's gradient has out's dtype
  KERNEL(attention_backward, q.device())(q, k, v, out, lse, g_out, dq, dk, dv, precision);
  return {dq, dk, dv};
}

Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const char* op = "causal_attention";
  check_same_dtype_device(op, q, k);
  check_same_dtype_device(op, q, v);
  check_float(op, q);
  if (q.dim() != 4 || k.shape() != q.shape() || v.shape() != q.shape() || q.size(3) == 0)
    fail("{}: needs q, k, v of one shape [B, T, H, Dh] with Dh > 0, got {}, {}, {}", op, q.str(), k.str(), v.str());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  const bool bf16_tensors = q.dtype() == DType::BF16;
  if (bf16_tensors && q.size(3) > kMaxBf16HeadDim)
    fail("{}: bf16 q, k, v take head dims up to {}, got {}", op, kMaxBf16HeadDim, q.str());
  const bool may_round = q.dtype() == DType::F32 && q.size(3) <= kMaxBf16HeadDim;
  const Precision precision = bf16_tensors ? Precision::BF16 : may_round ? product_precision() : Precision::FP32;
  Tensor out = Tensor::empty(q.shape(), q.dtype(), q.device());                              // [B, T, H, Dh]
  Tensor lse = Tensor::empty({B, H, T}, bf16_tensors ? DType::F32 : q.dtype(), q.device());  // [B, H, T]
  KERNEL(attention_forward, q.device())(q, k, v, out, lse, precision);
  return record(op, out, {q, k, v},
                [q = q.detach(), k = k.detach(), v = v.detach(), out = out.detach(), lse, precision](const Tensor& g) {
                  return attention_backward(q, k, v, out, lse, g, precision);
                });
}

}  // namespace moelab
