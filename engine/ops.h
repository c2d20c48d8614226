#pragma once
// Every tensor operation of the engine. Differentiable ops record their backward on the tape (autograd.h); ops
// marked "no grad" return plain tensors. Where an op lives:
//   engine/ops/create.cpp      creation and random numbers
//   engine/ops/shape.cpp       reshape, slices, transpose/permute, concat/split, device copies
//   engine/ops/pointwise.cpp   broadcasting arithmetic and elementwise math
//   engine/ops/reduce.cpp      sum/mean/max, softmax, log_softmax, cumsum
//   engine/ops/matmul.cpp      matrix products (CPU: engine/cpu/gemm.h; CUDA: cuBLAS)
//   engine/ops/index.cpp       index_select, gather, scatter_add, index_add, embedding, where, topk, argsort, bincount
//   engine/ops/nn.cpp          fused cross-entropy, RMSNorm, RoPE, causal attention
// Bad use throws std::invalid_argument naming the op and the offending shapes/dtypes.
#include <cstdint>
#include <utility>
#include <vector>

#include "engine/autograd.h"
#include "engine/rng.h"
#include "engine/tensor.h"

namespace moelab {

// ---- creation (create.cpp) -----------------------------------------------------------------------------------------
Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
Tensor ones(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
Tensor full(const Shape& shape, double value, DType dtype = DType::F32, Device device = Device::CPU);
Tensor zeros_like(const Tensor& x);
Tensor ones_like(const Tensor& x);
Tensor arange(int64_t n, DType dtype = DType::I32, Device device = Device::CPU);  // 0, 1, ..., n-1
// From host values (converted to dtype).
Tensor from_vector(const std::vector<float>& values, const Shape& shape, DType dtype = DType::F32,
                   Device device = Device::CPU);
Tensor from_vector(const std::vector<double>& values, const Shape& shape, DType dtype = DType::F64,
                   Device device = Device::CPU);
Tensor from_vector(const std::vector<int32_t>& values, const Shape& shape, Device device = Device::CPU);
// Seeded, counter-based random numbers (rng.h): element i of the result depends only on (seed, counter + i), so the
// same generator state gives the same numbers on every backend. Each call advances the generator.
Tensor randn(const Shape& shape, Generator& gen, double mean = 0.0, double stddev = 1.0, DType dtype = DType::F32,
             Device device = Device::CPU);
Tensor uniform(const Shape& shape, Generator& gen, double low = 0.0, double high = 1.0, DType dtype = DType::F32,
               Device device = Device::CPU);

// ---- shape and memory (shape.cpp) ----------------------------------------------------------------------------------
Tensor reshape(const Tensor& x, Shape shape);                         // view; one dim may be -1
Tensor slice_rows(const Tensor& x, int64_t start, int64_t end);       // view of x[start:end] along dim 0
Tensor transpose(const Tensor& x, int64_t dim0, int64_t dim1);        // copy
Tensor permute(const Tensor& x, const std::vector<int64_t>& dims);    // copy
Tensor concat(const std::vector<Tensor>& xs, int64_t dim);
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim);
Tensor clone(const Tensor& x);                                        // differentiable copy
Tensor to_device(const Tensor& x, Device device);                     // differentiable copy between devices
Tensor to_dtype(const Tensor& x, DType dtype);                        // differentiable among float types
void copy_(Tensor& dst, const Tensor& src);                           // in place, no grad, same shape

// ---- pointwise (pointwise.cpp) -------------------------------------------------------------------------------------
// Binary ops broadcast like NumPy (align trailing dims; a dim of size 1 stretches). Both operands: same dtype/device.
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, double s);
Tensor mul(const Tensor& a, double s);
Tensor sub(double s, const Tensor& a);  // s - a
Tensor div(double s, const Tensor& a);  // s / a
Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor square(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor silu(const Tensor& x);  // x * sigmoid(x)
// Broadcasts x to `shape` (a copy); the gradient is summed back with sum_to.
Tensor expand(const Tensor& x, const Shape& shape);
// Sums a broadcast gradient back to `shape` (the inverse of broadcasting; used by backward functions).
Tensor sum_to(const Tensor& g, const Shape& shape);

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& a, double s) { return add(a, s); }
inline Tensor operator-(const Tensor& a, double s) { return add(a, -s); }
inline Tensor operator*(const Tensor& a, double s) { return mul(a, s); }
inline Tensor operator*(double s, const Tensor& a) { return mul(a, s); }
inline Tensor operator/(const Tensor& a, double s) { return mul(a, 1.0 / s); }
inline Tensor operator-(const Tensor& a) { return neg(a); }

// ---- reductions (reduce.cpp) ---------------------------------------------------------------------------------------
Tensor sum(const Tensor& x);  // all elements -> shape []
Tensor sum(const Tensor& x, int64_t dim, bool keepdim = false);
Tensor mean(const Tensor& x);
Tensor mean(const Tensor& x, int64_t dim, bool keepdim = false);
Tensor max(const Tensor& x);                                      // gradient goes to the first maximum
Tensor max(const Tensor& x, int64_t dim, bool keepdim = false);
Tensor softmax(const Tensor& x);      // over the last dim
Tensor log_softmax(const Tensor& x);  // over the last dim
Tensor cumsum(const Tensor& x);       // no grad; over the last dim; f32/f64/i32

// ---- matrix products (matmul.cpp) ----------------------------------------------------------------------------------
// op(a) @ op(b) with op(x) = x or x^T (the last two dims). 2-D: [m,k] @ [k,n] -> [m,n].
// Batched: a [..., m, k] and b [..., k, n] with the same leading dims, or b 2-D (shared by every batch).
// f32 and f64 give their own type. A bf16 product (an operand in bf16, or f32 operands under Precision::BF16,
// engine/precision.h) multiplies bf16 copies of its f32 operands (round to nearest even) with f32 accumulation into an
// f32 result (the CPU widens the operands to f32 and runs its f32 GEMM, the GPU's reference); bf16 and f32 operands
// mix only so. Its gradients are bf16 products of G's bf16 copy, each in its operand's dtype: a bf16 operand gets a
// bf16 gradient, as under PyTorch's autocast, an f32 one (a master weight) an f32 gradient.
// a_rounded, when given, is a's copy made once by product_operand(a) for several products of the same a.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false,
              const Tensor& a_rounded = Tensor());
// matmul's bf16 product with its result rounded to bf16 as it is written (autocast's bf16 activations: attention's
// q, k and v under mixed precision, nn/layers.cpp). Anything but a bf16 product throws.
Tensor matmul_to_bf16(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false,
                      const Tensor& a_rounded = Tensor());
// The bf16 copy of x that matmul multiplies under Precision::BF16 (undefined where it makes none: f32 precision, or x
// not f32), for matmul's a_rounded: attention's q, k and v multiply one input, which is then rounded once, not thrice.
// A parameter's is the copy the precision guard holds, when it holds the parameters' (engine/bf16_weights.h).
Tensor product_operand(const Tensor& x);

// ---- indexing (index.cpp) ------------------------------------------------------------------------------------------
// Indices are i32. Out-of-range indices throw, naming the op, the index and the bound.
Tensor index_select(const Tensor& x, int64_t dim, const Tensor& index);  // x.shape[dim] -> index.numel()
Tensor gather(const Tensor& x, int64_t dim, const Tensor& index);        // out[i][j] = x[i][index[i][j]] (dim=1)
// out = x with src added at positions index along dim (torch.scatter_add semantics; index has src's shape).
Tensor scatter_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src);
// out = x with src's slices added at x's slices index[i] along dim (torch.index_add semantics).
Tensor index_add(const Tensor& x, int64_t dim, const Tensor& index, const Tensor& src);
Tensor embedding(const Tensor& weight, const Tensor& ids);  // weight [V, d], ids [...] -> [..., d]
// cond is i32 (nonzero = true), broadcast against a and b.
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value);
// No grad. Over the last dim: the k largest values (descending; ties -> lower index first) and their i32 indices.
std::pair<Tensor, Tensor> topk(const Tensor& x, int64_t k);
Tensor argsort(const Tensor& x, bool descending = false);  // no grad, stable, over the last dim -> i32
Tensor bincount(const Tensor& ids, int64_t bins);          // no grad, i32 ids in [0, bins) -> i32 counts [bins]

// ---- fused neural-net ops (nn.cpp) ---------------------------------------------------------------------------------
// The target that marks a token as not counted (padding), as in PyTorch.
constexpr int32_t kIgnoreIndex = -100;
// Mean cross-entropy of logits [N, V] against i32 targets [N]; targets equal to ignore_index are skipped.
// Softmax and log are fused: dlogits = (softmax - onehot) / count.
// All rows ignored (or N = 0): loss 0 and zero gradient (PyTorch gives NaN). Targets outside [0, V) other than
// ignore_index throw. row_losses, when given, receives every row's loss logsumexp(x_r) - x_r[t_r] (0 for ignored
// rows), f64 [N] on the logits' device, as summed for the mean (e.g. for per-domain sums; no gradient).
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int32_t ignore_index = kIgnoreIndex,
                     Tensor* row_losses = nullptr);
// cross_entropy(matmul(x, weight, false, true), targets, ignore_index, row_losses) for x [N, d] and weight [V, d]
// (the LM head), f32 or f64, without the logits [N, V]: chunks of chunk_rows rows (0: as many as fit in 256 MB of
// f32 logits), each chunk's gradients computed in the forward when x or weight needs one (a backward then only scales
// them). Under mixed precision (engine/precision.h) its products are bf16 products, like matmul's, and the logits
// are bf16 (the product rounded as it is written, as autocast's); the logits' gradient is rounded to bf16 before the
// upstream gradient scales it (matmul's backward: after), the same bits when that is a power of two (the trainer's
// 1 / micro-batches for 1, 2, 4, ...), else within a bf16 rounding.
Tensor linear_cross_entropy(const Tensor& x, const Tensor& weight, const Tensor& targets,
                            int32_t ignore_index = kIgnoreIndex, Tensor* row_losses = nullptr, int64_t chunk_rows = 0);
// y = x / sqrt(mean(x^2 over the last dim) + eps) * weight, weight [d].
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps = 1e-5);
// rms_norm of an f32 x with y rounded to bf16 as it is written: the operand of bf16 products (attention's input under
// mixed precision, nn/layers.cpp), in the bits product_operand(rms_norm(x, weight, eps)) has. Its gradient is bf16
// (the products' sum, rounded once each time one is added) and x's is f32.
Tensor rms_norm_to_bf16(const Tensor& x, const Tensor& weight, double eps = 1e-5);
// Rotary embedding on x [B, T, H, Dh] (Dh even): pairs (2i, 2i+1) of each head rotate by angle
// (pos_offset + t) * theta^(-2i/Dh). A bf16 x rotates in f32 and is rounded back (its gradient too).
Tensor rope(const Tensor& x, double theta = 10000.0, int64_t pos_offset = 0);
// Causal softmax(q k^T / sqrt(Dh)) v for q, k, v [B, T, H, Dh] -> [B, T, H, Dh]. Under Precision::BF16 its two
// products take bf16 operands (f32 heads of up to kMaxBf16HeadDim dims; engine/kernels/nn.h). bf16 q, k, v (heads of
// up to kMaxBf16HeadDim dims) always multiply so and give a bf16 output, and bf16 gradients.
constexpr int64_t kMaxBf16HeadDim = 128;
Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v);

}  // namespace moelab
