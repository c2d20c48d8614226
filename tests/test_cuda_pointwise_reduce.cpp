// The CUDA kernels of engine/kernels/pointwise.h and engine/kernels/reduce.h against their CPU twins on the same
// inputs, at sizes that are not multiples of a warp or a block; then the ops through autograd on both devices.
//
// Bounds. f32 results within 1e-5 relative, f64 within 1e-12: the GPU's exp/log/tanh differ from libm's by an ulp
// or two, and its sums run in another (fixed) order. Relative to what: to the value itself where a kernel's rounding
// errors are relative to its result (atol 1e-6); to the size of the terms (atol 1, the inputs being of order 1) where
// the result is a difference of terms that can cancel (silu's and the softmaxes' backwards, log_softmax, the chained
// ops), since an ulp of a term is then no ulp of the result. Where the kernels do exactly the CPU's arithmetic in the
// CPU's order (arithmetic, copies, sums and scans along a dim other than the last, cumsum, max and its positions) the
// test asks for the same bits. (On the emulator the GPU's math is libm's: nearly every result is the CPU's bits.)
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "engine/kernels/pointwise.h"
#include "engine/kernels/reduce.h"
#include "tests/cuda_testing.h"

using namespace moelab;
using namespace moelab::testing;

namespace {

const std::vector<DType> kFloatTypes = {DType::F32, DType::F64};
const std::vector<Shape> kShapes = {{1}, {7}, {33}, {4097}, {3, 5, 7}, {33, 65}};

double float_bound(DType dtype) { return dtype == DType::F32 ? 1e-5 : 1e-12; }
constexpr double kValueScale = 1e-6;  // atol where errors are relative to the result
constexpr double kTermScale = 1.0;    // atol where the result is a difference of terms of order 1

// Inputs in [low, high) (log, sqrt and rsqrt need positive ones; div's divisor stays away from 0).
Tensor uniform_values(const Shape& shape, uint64_t seed, DType dtype, double low, double high) {
  Generator gen(seed);
  return uniform(shape, gen, low, high, dtype);
}

Tensor unary_input(UnaryOp op, const Shape& shape, uint64_t seed, DType dtype) {
  if (op == UnaryOp::log || op == UnaryOp::sqrt || op == UnaryOp::rsqrt)
    return uniform_values(shape, seed, dtype, 0.1, 4.0);
  return random(shape, seed, dtype, 2.0);
}

// Normal values rounded to integers: rows with ties, for max's "first maximum".
Tensor tied_values(const Shape& shape, uint64_t seed, DType dtype) {
  std::vector<double> v = as_doubles(random(shape, seed, DType::F64, 2.0));
  for (double& e : v) e = std::round(e);
  return from_vector(v, shape, dtype);
}

Tensor integer_values(const Shape& shape, uint64_t seed) {
  std::vector<double> v = as_doubles(random(shape, seed, DType::F64, 1000.0));
  return from_vector(std::vector<int32_t>(v.begin(), v.end()), shape);
}

const std::vector<UnaryOp> kUnaryOps = {UnaryOp::neg,    UnaryOp::exp,  UnaryOp::log,     UnaryOp::sqrt, UnaryOp::rsqrt,
                                        UnaryOp::square, UnaryOp::tanh, UnaryOp::sigmoid, UnaryOp::silu};
const std::vector<BinaryOp> kBinaryOps = {BinaryOp::add, BinaryOp::sub, BinaryOp::mul, BinaryOp::div};

}  // namespace

// ---- pointwise kernels --------------------------------------------------------------------------------------------

TEST_CASE("cuda: pointwise: unary forward and backward kernels match the CPU" * cuda_only()) {
  uint64_t seed = 1;
  for (DType dtype : kFloatTypes)
    for (UnaryOp op : kUnaryOps)
      for (const Shape& shape : kShapes) {
        const std::string what = fmt::format("{} {} {}", enum_name(op), dtype_name(dtype), shape_str(shape));
        Tensor x = unary_input(op, shape, ++seed, dtype);
        Tensor y = Tensor::empty(shape, dtype);
        cpu::unary_forward(op, x, y);
        Tensor y_gpu = empty_like_on(y, Device::CUDA);
        cuda::unary_forward(op, to_gpu(x), y_gpu);
        check_gpu_matches(y_gpu, y, float_bound(dtype), kValueScale, what + " forward");

        Tensor g = random(shape, ++seed, dtype);
        const BackwardReads reads = backward_reads(op);
        Tensor saved = reads == BackwardReads::output ? y : reads == BackwardReads::input ? x : g;
        Tensor dx = Tensor::empty(shape, dtype);
        cpu::unary_backward(op, g, saved, dx);
        Tensor dx_gpu = empty_like_on(dx, Device::CUDA);
        cuda::unary_backward(op, to_gpu(g), to_gpu(saved), dx_gpu);
        // silu's backward, g s (1 + x (1 - s)), crosses 0 near x = -1.28: an ulp of s is no ulp of the result there.
        check_gpu_matches(dx_gpu, dx, float_bound(dtype), op == UnaryOp::silu ? kTermScale : kValueScale,
                          what + " backward");
      }
}

TEST_CASE("cuda: pointwise: broadcasting binary kernels match the CPU bit for bit" * cuda_only()) {
  // Same shapes; a row or a column broadcast; a scalar on either side; dims that broadcast alternately (nothing to
  // merge); added leading dims; an operand that is all ones.
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{4097}, {4097}},       {{33, 7}, {7}},         {{33, 7}, {33, 1}},       {{}, {3, 5}},
      {{6, 33}, {}},          {{1}, {5, 3}},          {{2, 1, 5}, {3, 1}},      {{7, 1, 3, 1, 2}, {1, 4, 1, 5, 1}},
      {{1, 1, 1}, {2, 1, 9}}, {{2, 3, 4, 5}, {4, 1}}, {{2, 1, 4097}, {1, 3, 1}}};
  uint64_t seed = 100;
  for (DType dtype : kFloatTypes)
    for (BinaryOp op : kBinaryOps)
      for (const auto& [sa, sb] : cases) {
        const std::string what =
            fmt::format("{} {} {} {}", enum_name(op), dtype_name(dtype), shape_str(sa), shape_str(sb));
        Tensor a = random(sa, ++seed, dtype);
        Tensor b = op == BinaryOp::div ? uniform_values(sb, ++seed, dtype, 0.5, 2.0) : random(sb, ++seed, dtype);
        Tensor out = add(a, b);  // only for the broadcast shape
        cpu::binary_forward(op, a, b, out);
        Tensor out_gpu = empty_like_on(out, Device::CUDA);
        cuda::binary_forward(op, to_gpu(a), to_gpu(b), out_gpu);
        // One IEEE operation per element, correctly rounded on both devices.
        check_same_bits(out_gpu, out, what);
      }
}

TEST_CASE("cuda: pointwise: scalar and expand kernels match the CPU bit for bit" * cuda_only()) {
  uint64_t seed = 200;
  for (DType dtype : kFloatTypes) {
    for (BinaryOp op : kBinaryOps)
      for (ScalarSide side : {ScalarSide::right, ScalarSide::left})
        for (const Shape& shape : kShapes) {
          Tensor x = uniform_values(shape, ++seed, dtype, 0.5, 2.0);
          const double s = side == ScalarSide::left ? -1.3 : 0.7;
          Tensor out = Tensor::empty(shape, dtype);
          cpu::scalar_forward(op, x, s, side, out);
          Tensor out_gpu = empty_like_on(out, Device::CUDA);
          cuda::scalar_forward(op, to_gpu(x), s, side, out_gpu);
          check_same_bits(out_gpu, out,
                          fmt::format("{} scalar {} {} {}", enum_name(op), side == ScalarSide::left ? "left" : "right",
                                      dtype_name(dtype), shape_str(shape)));
        }
    const std::vector<std::pair<Shape, Shape>> expansions = {
        {{}, {4097}}, {{1, 7}, {33, 7}}, {{33, 1}, {33, 7}}, {{5}, {2, 3, 5}}, {{3, 1, 2}, {4, 3, 5, 2}}};
    for (const auto& [from, to] : expansions) {
      Tensor x = random(from, ++seed, dtype);
      Tensor out = Tensor::empty(to, dtype);
      cpu::expand_forward(x, out);
      Tensor out_gpu = empty_like_on(out, Device::CUDA);
      cuda::expand_forward(to_gpu(x), out_gpu);
      check_same_bits(out_gpu, out,
                      fmt::format("expand {} {} -> {}", dtype_name(dtype), shape_str(from), shape_str(to)));
    }
  }
}

// ---- reduce kernels -----------------------------------------------------------------------------------------------

TEST_CASE("cuda: reduce: sum of all elements matches the CPU and is the same every run" * cuda_only()) {
  // Both sum in double, in different orders: the doubles differ by about n * 1e-16 (inputs of order 1), far below an
  // f32 ulp, so the f32 results differ by one ulp at most (2e-7 relative), when the double sits on a rounding
  // boundary; the f64 results by that difference (1e-12 relative).
  uint64_t seed = 300;
  for (DType dtype : kFloatTypes)
    for (int64_t n : {0, 1, 7, 33, 4096, 4097, 3 * 4096 + 5}) {
      Tensor x = random({n}, ++seed, dtype);
      Tensor out = Tensor::empty({}, dtype);
      cpu::sum_all(x, out);
      Tensor x_gpu = to_gpu(x), out_gpu = empty_like_on(out, Device::CUDA), again = empty_like_on(out, Device::CUDA);
      cuda::sum_all(x_gpu, out_gpu);
      cuda::sum_all(x_gpu, again);
      const std::string what = fmt::format("sum {} [{}]", dtype_name(dtype), n);
      check_gpu_matches(out_gpu, out, dtype == DType::F32 ? 2e-7 : 1e-12, kValueScale, what);
      check_same_bits(again, to_cpu(out_gpu), what + " (second run)");
    }
}

TEST_CASE("cuda: reduce: sum over a dim matches the CPU" * cuda_only()) {
  const std::vector<std::pair<Shape, int64_t>> cases = {
      {{7}, 0},        {{33, 7}, 0},     {{33, 7}, 1},     {{3, 4097}, 1}, {{4097, 3}, 0},
      {{5, 33, 3}, 0}, {{5, 33, 3}, 1},  {{5, 33, 3}, 2},  {{1, 1}, 1},    {{2, 0, 3}, 1},
      {{256, 5}, 0},   {{16384, 16}, 0}, {{3, 1000, 5}, 1}};
  uint64_t seed = 400;
  for (DType dtype : kFloatTypes)
    for (const auto& [shape, dim] : cases) {
      const std::string what = fmt::format("sum {} {} dim {}", dtype_name(dtype), shape_str(shape), dim);
      Tensor x = random(shape, ++seed, dtype);
      Tensor out = sum(x, dim);  // for the output shape
      cpu::sum_dim(x, dim, out);
      Tensor out_gpu = empty_like_on(out, Device::CUDA);
      cuda::sum_dim(to_gpu(x), dim, out_gpu);
      if (dim == static_cast<int64_t>(shape.size()) - 1) {
        check_gpu_matches(out_gpu, out, float_bound(dtype), kValueScale, what);  // a block's double sum
      } else if (shape[dim] > 256) {
        // Long columns are summed in chunks, in double, rounded once: the exact sum's rounding, closer to it than the
        // CPU's walk in T.
        const Tensor exact = sum(to_dtype(x, DType::F64), dim);
        check_gpu_matches(out_gpu, exact, dtype == DType::F32 ? 1e-6 : 1e-13, 1e-6, what + " (chunks)");
      } else {
        check_same_bits(out_gpu, out, what);  // one thread per column walking up to 256 rows, in the CPU's order
      }
    }
}

TEST_CASE("cuda: reduce: max and its first position match the CPU, ties and NaN included" * cuda_only()) {
  const std::vector<std::pair<Shape, int64_t>> cases = {{{1}, 0},       {{7}, 0},       {{33, 7}, 1},    {{33, 7}, 0},
                                                        {{3, 4097}, 1}, {{4097, 3}, 0}, {{5, 33, 3}, 1}, {{2, 300}, 1}};
  uint64_t seed = 500;
  for (DType dtype : kFloatTypes)
    for (const auto& [shape, dim] : cases) {
      const std::string what = fmt::format("max {} {} dim {}", dtype_name(dtype), shape_str(shape), dim);
      Tensor x = tied_values(shape, ++seed, dtype);
      if (x.numel() > 40) {  // a NaN and a -inf in the middle of some rows
        std::vector<double> v = as_doubles(x);
        v[x.numel() / 3] = std::numeric_limits<double>::quiet_NaN();
        v[x.numel() / 2] = std::numeric_limits<double>::quiet_NaN();
        v[x.numel() / 5] = -std::numeric_limits<double>::infinity();
        x = from_vector(v, shape, dtype);
      }
      Tensor out = sum(x, dim), where = Tensor::empty(out.shape(), DType::I32);
      cpu::max_forward(x, dim, out, where);
      Tensor out_gpu = empty_like_on(out, Device::CUDA), where_gpu = empty_like_on(where, Device::CUDA);
      cuda::max_forward(to_gpu(x), dim, out_gpu, where_gpu);
      check_same_bits(out_gpu, out, what + " values");
      check_same_bits(where_gpu, where, what + " positions");

      Tensor g = random(out.shape(), ++seed, dtype), dx = Tensor::empty(shape, dtype);
      cpu::max_backward(g, where, dim, dx);
      Tensor dx_gpu = empty_like_on(dx, Device::CUDA);
      cuda::max_backward(to_gpu(g), to_gpu(where), dim, dx_gpu);
      check_same_bits(dx_gpu, dx, what + " backward");
    }
  // The first of equal maxima, far apart in one long row (different threads of the block hold them).
  std::vector<float> row(4097, 1.0f);
  row[3000] = 5.0f, row[300] = 5.0f, row[4000] = 5.0f;
  Tensor out_gpu = Tensor::empty({1}, DType::F32, Device::CUDA),
         where_gpu = Tensor::empty({1}, DType::I32, Device::CUDA);
  cuda::max_forward(to_gpu(from_vector(row, {1, 4097})), 1, out_gpu, where_gpu);
  CHECK(to_cpu(where_gpu).to_vector<int32_t>()[0] == 300);
}

TEST_CASE("cuda: reduce: softmax and log_softmax kernels match the CPU" * cuda_only()) {
  // Rows of up to 32 entries go to one warp each, 8 to a block ({19, 32}, {33, 1}: a partial last block); longer ones
  // to a whole block.
  const std::vector<Shape> shapes = {{1, 1}, {7, 33}, {3, 4097}, {33, 1}, {2, 3, 7}, {0, 5}, {19, 32}, {100, 16}};
  uint64_t seed = 600;
  for (DType dtype : kFloatTypes)
    for (const Shape& shape : shapes)
      for (bool log_space : {false, true}) {
        const std::string what =
            fmt::format("{} {} {}", log_space ? "log_softmax" : "softmax", dtype_name(dtype), shape_str(shape));
        Tensor x = random(shape, ++seed, dtype, 3.0), y = Tensor::empty(shape, dtype);
        Tensor y_gpu = empty_like_on(y, Device::CUDA);
        (log_space ? cpu::log_softmax_forward : cpu::softmax_forward)(x, y);
        (log_space ? cuda::log_softmax_forward : cuda::softmax_forward)(to_gpu(x), y_gpu);
        // softmax: exp(x - m) / z, relative errors; log_softmax: x - (log z + m), a difference of terms.
        check_gpu_matches(y_gpu, y, float_bound(dtype), log_space ? kTermScale : kValueScale, what + " forward");

        Tensor g = random(shape, ++seed, dtype), dx = Tensor::empty(shape, dtype);
        Tensor dx_gpu = empty_like_on(dx, Device::CUDA);
        (log_space ? cpu::log_softmax_backward : cpu::softmax_backward)(y, g, dx);
        (log_space ? cuda::log_softmax_backward : cuda::softmax_backward)(to_gpu(y), to_gpu(g), dx_gpu);
        check_gpu_matches(dx_gpu, dx, float_bound(dtype), kTermScale, what + " backward");
      }
}

TEST_CASE("cuda: reduce: cumsum matches the CPU bit for bit in f32, f64 and i32" * cuda_only()) {
  uint64_t seed = 700;
  for (DType dtype : {DType::F32, DType::F64, DType::I32})
    for (const Shape& shape : std::vector<Shape>{{1}, {4097}, {33, 7}, {7, 33}, {2, 3, 5}, {3, 0}}) {
      Tensor x = dtype == DType::I32 ? integer_values(shape, ++seed) : random(shape, ++seed, dtype);
      Tensor out = Tensor::empty(shape, dtype);
      cpu::cumsum(x, out);
      Tensor out_gpu = empty_like_on(out, Device::CUDA);
      cuda::cumsum(to_gpu(x), out_gpu);
      check_same_bits(out_gpu, out, fmt::format("cumsum {} {}", dtype_name(dtype), shape_str(shape)));
    }
}

// ---- the ops through autograd -------------------------------------------------------------------------------------

// A loss that uses every op of pointwise.cpp and reduce.cpp with a gradient: broadcasting, scalar forms, unary math,
// sums (whose backward is expand, and sum_to for the broadcast operands), mean, max, softmax and log_softmax.
static Tensor every_op_loss(const Tensor& x, const Tensor& w, const Tensor& b) {
  Tensor h = add(mul(x, w), b);                                        // x [R, C], w [C], b [R, 1]
  Tensor t1 = sum(mul(softmax(h), tanh(h)));                           //
  Tensor t2 = mean(sum(log_softmax(div(h, add(square(w), 1.0))), 0));  // sum over a dim other than the last
  Tensor t3 = add(max(h), mean(max(h, 1)));                            // max of all, max over a dim
  Tensor t4 = sum(div(1.0, add(exp(neg(square(h))), 1.0)));            // rdiv
  Tensor t5 = mean(sub(2.0, mul(sigmoid(h), silu(h))));                // rsub
  Tensor t6 = sum(mul(log(sqrt(add(square(h), 1.0))), rsqrt(add(square(b), 0.5))));
  Tensor t7 = sum(sub(expand(b, h.shape()), mean(h, 0, true)));
  return add(add(add(t1, t2), add(t3, t4)), add(add(t5, t6), mul(t7, 0.01)));
}

TEST_CASE("cuda: pointwise and reduce ops: values and gradients through autograd match the CPU" * cuda_only()) {
  for (DType dtype : kFloatTypes) {
    const int64_t R = 5, C = 33;
    Tensor x = random({R, C}, 801, dtype), w = random({C}, 802, dtype), b = random({R, 1}, 803, dtype);
    std::vector<Tensor> cpu_in = {x.detach(), w.detach(), b.detach()}, gpu_in = {to_gpu(x), to_gpu(w), to_gpu(b)};
    for (Tensor& t : cpu_in) t.set_requires_grad();
    for (Tensor& t : gpu_in) t.set_requires_grad();
    Tensor loss = every_op_loss(cpu_in[0], cpu_in[1], cpu_in[2]);
    Tensor loss_gpu = every_op_loss(gpu_in[0], gpu_in[1], gpu_in[2]);
    REQUIRE(loss_gpu.is_cuda());
    loss.backward();
    loss_gpu.backward();
    // A chain of about 40 ops, each within an ulp or two of the CPU's, with gradients that are sums of terms of
    // order 1 (over broadcast dims, and where h is used several times): to 1e-5 of the terms' size in f32, 1e-10 in
    // f64.
    const double rel = dtype == DType::F32 ? 1e-5 : 1e-10, atol = kTermScale;
    check_gpu_matches(loss_gpu, loss, rel, atol, fmt::format("loss {}", dtype_name(dtype)));
    const char* names[] = {"x", "w", "b"};
    for (int k = 0; k < 3; ++k) {
      REQUIRE(gpu_in[k].grad().defined());
      CHECK(gpu_in[k].grad().is_cuda());
      check_gpu_matches(gpu_in[k].grad(), cpu_in[k].grad(), rel, atol,
                        fmt::format("d{} {}", names[k], dtype_name(dtype)));
    }
  }
}

TEST_CASE("cuda: pointwise and reduce ops: cumsum on the GPU, and operands on two devices are refused" * cuda_only()) {
  Tensor ids = from_vector(std::vector<int32_t>{3, 1, 4, 1, 5, 9, 2, 6}, {2, 4});
  CHECK(to_cpu(cumsum(to_gpu(ids))).to_vector<int32_t>() == std::vector<int32_t>{3, 4, 8, 9, 5, 14, 16, 22});
  Tensor a = random({3}, 900, DType::F32);
  check_mentions(error_of([&] { add(a, to_gpu(a)); }), {"add", "dtype and device"});
}
