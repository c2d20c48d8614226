// The CUDA kernels of engine/kernels/shape.h, create.h and index.h against their CPU twins on the same inputs, and the
// shape, creation and indexing ops through autograd on both devices. Sizes are odd on purpose (1, 7, 33, 4097: not
// multiples of a warp or a block), and index positions cross the GPU sort's 256-position tiles.
//
// Tolerance: bits. Every kernel here copies values, converts them, or (add_slices, scatter_add_elements) adds each
// destination's sources one after the other in increasing index position, as the CPU does, so the GPU's results are
// the CPU's bits (i32 exact, floats bit for bit, NaN payloads included for bf16). Two exceptions: randn on a GPU,
// whose log and cos are CUDA's (engine/kernels/create.h gives the bound that is checked), and where's gradients,
// which sum over broadcast dims in the reduce kernels (1e-5 relative there, as in test_cuda_pointwise_reduce.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "engine/kernels/create.h"
#include "engine/kernels/index.h"
#include "engine/kernels/shape.h"
#include "tests/cuda_testing.h"

namespace moelab {
using testing::cuda_only;
using testing::on;
using testing::op_and_gradients;
using testing::random;
using testing::to_cpu;
using testing::to_gpu;

namespace {

// The tensor's bytes, copied to the host.
std::vector<unsigned char> bytes_of(const Tensor& x) {
  const Tensor c = to_cpu(x);
  std::vector<unsigned char> out(c.numel() * dtype_size(c.dtype()));
  if (!out.empty()) std::memcpy(out.data(), c.raw_data(), out.size());
  return out;
}

// Asserts that a GPU result is on the GPU with the CPU result's dtype, shape and bits (naming the first element
// that differs).
void check_same_bits(const Tensor& gpu, const Tensor& cpu, const std::string& what) {
  CHECK_MESSAGE(gpu.device() == Device::CUDA, what << ": " << gpu.str() << " is not on the GPU");
  REQUIRE_MESSAGE((gpu.dtype() == cpu.dtype() && gpu.shape() == cpu.shape()),
                  what << ": " << gpu.str() << " vs " << cpu.str());
  const std::vector<unsigned char> a = bytes_of(gpu), b = bytes_of(cpu);
  const size_t size = dtype_size(cpu.dtype());
  for (size_t i = 0; i < a.size(); i += size)
    if (std::memcmp(&a[i], &b[i], size) != 0) {
      FAIL_CHECK(what << ": element " << i / size << " of " << cpu.str() << " differs");
      return;
    }
}

// splitmix64: reproducible integers without the engine.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// n ids in [0, bound); with `heavy`, about half of them are the id 3 % bound (long runs of one destination).
Tensor random_ids(const Shape& shape, int32_t bound, uint64_t seed, bool heavy = false) {
  std::vector<int32_t> ids(shape_numel(shape));
  for (size_t i = 0; i < ids.size(); ++i) {
    const uint64_t r = mix(seed * 1000003 + i);
    ids[i] = heavy && r % 2 ? 3 % bound : static_cast<int32_t>((r >> 8) % bound);
  }
  return from_vector(ids, shape);
}

// Values of any dtype on the CPU: N(0, 1) floats (bf16: rounded from f32), or integers in about [-100, 100].
Tensor values_of(const Shape& shape, DType dtype, uint64_t seed) {
  if (dtype == DType::I32) return to_dtype(random(shape, seed, DType::F64, 40.0), DType::I32);
  if (dtype == DType::BF16) return to_dtype(random(shape, seed, DType::F32), DType::BF16);
  return random(shape, seed, dtype);
}

constexpr DType kCopyTypes[] = {DType::F32, DType::F64, DType::I32};

}  // namespace

// ---- (a) shape kernels ----------------------------------------------------------------------------------------------

TEST_CASE("cuda: shape: permute_copy matches the CPU for every dim order" * cuda_only()) {
  const std::vector<std::pair<Shape, std::vector<int64_t>>> cases = {{{}, {}},
                                                                     {{1}, {0}},
                                                                     {{4097}, {0}},
                                                                     {{7, 33}, {1, 0}},
                                                                     {{3, 5, 7}, {2, 0, 1}},
                                                                     {{33, 1, 7}, {1, 2, 0}},
                                                                     {{2, 3, 4, 5}, {3, 1, 0, 2}},
                                                                     {{2, 3, 4, 5}, {0, 1, 2, 3}}};
  for (DType dtype : kCopyTypes)
    for (const auto& [shape, dims] : cases) {
      const Tensor x = values_of(shape, dtype, 1);
      Shape out_shape;
      for (int64_t d : dims) out_shape.push_back(shape[d]);
      auto run = [&](Device device) {
        const Tensor out = Tensor::empty(out_shape, dtype, device);
        KERNEL(permute_copy, device)(on(x, device), dims, out);
        return out;
      };
      check_same_bits(run(Device::CUDA), run(Device::CPU),
                      fmt::format("{} {} -> {}", dtype_name(dtype), shape_str(shape), shape_str(out_shape)));
    }
}

TEST_CASE("cuda: shape: copy_columns copies blocks of columns of any element size" * cuda_only()) {
  struct Case {
    int64_t outer, src_row, src_col, dst_row, dst_col, width;
  };
  const std::vector<Case> cases = {
      {1, 1, 0, 1, 0, 1}, {7, 33, 5, 40, 20, 13}, {1, 4097, 0, 4100, 3, 4097}, {33, 7, 6, 9, 0, 1}, {0, 7, 0, 7, 0, 7}};
  for (DType dtype : {DType::F32, DType::F64, DType::I32, DType::BF16})
    for (const Case& c : cases) {
      const Tensor src = values_of({c.outer, c.src_row}, dtype, 2), dst = values_of({c.outer, c.dst_row}, dtype, 3);
      auto run = [&](Device device) {
        const Tensor out = device == Device::CPU ? clone(dst).detach() : to_gpu(dst);
        KERNEL(copy_columns, device)
        (on(src, device), c.src_row, c.src_col, out, c.dst_row, c.dst_col, c.outer, c.width);
        return out;
      };
      check_same_bits(run(Device::CUDA), run(Device::CPU),
                      fmt::format("{} outer {} width {}", dtype_name(dtype), c.outer, c.width));
    }
}

namespace {

// A CPU tensor of `dtype` holding these bit patterns (T: uint16_t for bf16, uint32_t for f32, uint64_t for f64).
template <class T> Tensor from_bits(const std::vector<T>& bits, DType dtype) {
  Tensor out = Tensor::empty({static_cast<int64_t>(bits.size())}, dtype);
  if (!bits.empty()) std::memcpy(out.raw_data(), bits.data(), bits.size() * sizeof(T));
  return out;
}

// x converted to `dtype` by the convert_dtype kernel of `device`.
Tensor converted_on(const Tensor& x, DType dtype, Device device) {
  const Tensor out = Tensor::empty(x.shape(), dtype, device);
  KERNEL(convert_dtype, device)(on(x, device), out);
  return out;
}

// f32 bit patterns that probe bf16 rounding: signed zeros, infinities, quiet and signalling NaNs with payloads, ties
// to even (down and up), neighbours of ties, the largest floats (one rounds to inf), subnormals and their ties; then
// 4097 random patterns (about 0.4% of them NaN).
std::vector<uint32_t> f32_probes() {
  std::vector<uint32_t> bits = {0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000, 0x7f800001,
                                0x7fbfffff, 0xff812345, 0x7fffffff, 0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff,
                                0xbf818000, 0x7f7fffff, 0x7f7f7fff, 0x7f7f8000, 0x7f7e8000, 0x00000001, 0x00008000,
                                0x00018000, 0x007fffff, 0x00800000, 0x80008001, 0x3f800000, 0x4b800001};
  for (uint64_t i = 0; i < 4097; ++i) bits.push_back(static_cast<uint32_t>(mix(i)));
  return bits;
}

// f64 bit patterns: NaNs with payloads (quiet, signalling, negative), infinities, zeros, values whose f32 rounding
// lands exactly on a bf16 tie (1 + 2^-8 + 2^-30 becomes 1, not 1 + 2^-7: two roundings, as the CPU), values too small
// or too large for f32, a subnormal double; then random patterns.
std::vector<uint64_t> f64_probes() {
  auto bits_of = [](double d) {
    uint64_t u;
    std::memcpy(&u, &d, sizeof u);
    return u;
  };
  std::vector<uint64_t> bits = {0x7ff0000000000001ull,
                                0x7ff8000000000000ull,
                                0xfff8000000000000ull,
                                0x7ff4000000000000ull,
                                0x7fffffffffffffffull,
                                0xfff0000012345678ull,
                                0x7ff0000000000000ull,
                                0xfff0000000000000ull,
                                0x0000000000000000ull,
                                0x8000000000000000ull,
                                0x0000000000000001ull,
                                bits_of(1 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30)),
                                bits_of(1 + std::ldexp(1.0, -8)),
                                bits_of(1e-300),
                                bits_of(-1e300),
                                bits_of(0.1),
                                bits_of(3.4028235677973366e38)};
  for (uint64_t i = 0; i < 4097; ++i) bits.push_back(mix(i + 77));
  return bits;
}

// Element i of a CPU f32 or f64 tensor.
double element(const Tensor& x, int64_t i) {
  return x.dtype() == DType::F32 ? x.data<float>()[i] : x.data<double>()[i];
}
void set_element(const Tensor& x, int64_t i, double value) {
  if (x.dtype() == DType::F32)
    x.data<float>()[i] = static_cast<float>(value);
  else
    x.data<double>()[i] = value;
}

}  // namespace

TEST_CASE("cuda: shape: bf16 conversions give the CPU's bits, NaN, inf, ties and subnormals included" * cuda_only()) {
  // Every bf16 pattern to f32 and f64.
  std::vector<uint16_t> every_bf16(65536);
  for (uint32_t i = 0; i < 65536; ++i) every_bf16[i] = static_cast<uint16_t>(i);
  const Tensor all_bf16 = from_bits(every_bf16, DType::BF16);
  for (DType to : {DType::F32, DType::F64})
    check_same_bits(converted_on(all_bf16, to, Device::CUDA), converted_on(all_bf16, to, Device::CPU),
                    fmt::format("bf16 -> {}", dtype_name(to)));
  const Tensor f32 = from_bits(f32_probes(), DType::F32), f64 = from_bits(f64_probes(), DType::F64);
  check_same_bits(converted_on(f32, DType::BF16, Device::CUDA), converted_on(f32, DType::BF16, Device::CPU),
                  "f32 -> bf16");
  check_same_bits(converted_on(f64, DType::BF16, Device::CUDA), converted_on(f64, DType::BF16, Device::CPU),
                  "f64 -> bf16");
  // The reference: to_bf16 (round to nearest even; NaN kept, quieted).
  const std::vector<bf16> gpu = converted_on(f32, DType::BF16, Device::CUDA).to_vector<bf16>();
  const std::vector<float> values = f32.to_vector<float>();
  for (size_t i = 0; i < values.size(); ++i) REQUIRE(gpu[i].bits == to_bf16(values[i]).bits);
  CHECK(gpu[10].bits == 0x3f80);  // 1 + 2^-8: a tie, to even (down)
  CHECK(gpu[11].bits == 0x3f82);  // 1 + 3 * 2^-8: a tie, to even (up)
  CHECK(gpu[15].bits == 0x7f80);  // the largest float rounds to inf
  CHECK(gpu[20].bits == 0x0000);  // half the smallest bf16 subnormal: a tie, to even (zero)
  CHECK(gpu[8].bits == 0xffc1);   // -NaN with payload 0x012345: sign and leading payload kept, quieted
  CHECK(converted_on(f64, DType::BF16, Device::CUDA).to_vector<bf16>()[11].bits == 0x3f80);  // two roundings
  CHECK(std::isnan(to_gpu(from_bits(std::vector<uint16_t>{0x7f81}, DType::BF16)).item()));
  // i32 does not convert to or from bf16, on either device.
  for (Device device : {Device::CPU, Device::CUDA}) {
    testing::check_mentions(testing::error_of([&] { converted_on(all_bf16, DType::I32, device); }),
                            {"to_dtype", "i32"});
    testing::check_mentions(
        testing::error_of([&] { converted_on(from_vector(std::vector<int32_t>{1}, {1}), DType::BF16, device); }),
        {"to_dtype", "i32"});
  }
}

TEST_CASE("cuda: shape: conversions among f32, f64 and i32 match the CPU" * cuda_only()) {
  const Tensor f32 = from_bits(f32_probes(), DType::F32), f64 = from_bits(f64_probes(), DType::F64);
  // Float to float: the same bits, except that a NaN only has to stay a NaN (a GPU's own NaN may differ).
  for (const auto& [x, to] : {std::pair<Tensor, DType>{f32, DType::F64}, {f64, DType::F32}}) {
    const Tensor gpu = to_cpu(converted_on(x, to, Device::CUDA)), cpu = converted_on(x, to, Device::CPU);
    int64_t nans = 0;
    for (int64_t i = 0; i < x.numel(); ++i)
      if (std::isnan(element(x, i))) {
        ++nans;
        REQUIRE(std::isnan(element(gpu, i)));
        set_element(gpu, i, 0.0);  // compared: NaN-ness above, every other element's bits below
        set_element(cpu, i, 0.0);
      }
    CHECK(nans > 0);
    check_same_bits(to_gpu(gpu), cpu, fmt::format("{} -> {}", dtype_name(x.dtype()), dtype_name(to)));
  }
  // Integers: exact in f64; rounded to nearest even in f32 (16777217 -> 16777216); floats truncate toward zero.
  const Tensor ints = from_vector(std::vector<int32_t>{0, -7, 16777217, std::numeric_limits<int32_t>::max(),
                                                       std::numeric_limits<int32_t>::min(), 123456789},
                                  {6});
  const Tensor reals = from_vector(std::vector<double>{-7.9, 2.5, -0.5, 1e9, -2147483648.0, 2147483520.0, 0.0}, {7});
  for (DType to : {DType::F32, DType::F64})
    check_same_bits(converted_on(ints, to, Device::CUDA), converted_on(ints, to, Device::CPU),
                    fmt::format("i32 -> {}", dtype_name(to)));
  for (DType from : {DType::F32, DType::F64}) {
    const Tensor x = converted_on(reals, from, Device::CPU);
    check_same_bits(converted_on(x, DType::I32, Device::CUDA), converted_on(x, DType::I32, Device::CPU),
                    fmt::format("{} -> i32", dtype_name(from)));
  }
  CHECK(converted_on(ints, DType::F32, Device::CUDA).to_vector<float>()[2] == 16777216.f);
  CHECK(converted_on(reals, DType::I32, Device::CUDA).to_vector<int32_t>()[0] == -7);
}

// ---- (b) creation ---------------------------------------------------------------------------------------------------

TEST_CASE("cuda: create: full, zeros, ones and arange fill on the device with the CPU's values" * cuda_only()) {
  for (DType dtype : kCopyTypes)
    for (int64_t n : {0, 1, 7, 33, 4097}) {
      const std::string what = fmt::format("{} [{}]", dtype_name(dtype), n);
      for (double value : {0.0, 1.0, -3.7, 0.1, 1e9}) {
        const Tensor gpu = full({n, 1}, value, dtype, Device::CUDA);
        check_same_bits(gpu, full({n, 1}, value, dtype), what + fmt::format(" full {}", value));
      }
      check_same_bits(zeros({n}, dtype, Device::CUDA), zeros({n}, dtype), what + " zeros");
      check_same_bits(ones({n}, dtype, Device::CUDA), ones({n}, dtype), what + " ones");
      check_same_bits(arange(n, dtype, Device::CUDA), arange(n, dtype), what + " arange");
    }
  CHECK(full({}, -3.7, DType::I32, Device::CUDA).item() == -3);
  CHECK(arange(4097, DType::F32, Device::CUDA).to_vector<float>()[4096] == 4096.f);
}

TEST_CASE("cuda: create: from_vector converts host values on the device" * cuda_only()) {
  const std::vector<float> floats = {1.5f, -2.25f, 0.1f, 3e38f, -0.0f, 7.9f, 1.00390625f};
  const std::vector<double> doubles = {
      1.5, -2.25, 0.1, 1e300, -0.0, -7.9, 1 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30)};
  for (DType dtype : {DType::F32, DType::F64, DType::I32, DType::BF16}) {
    if (dtype != DType::I32) {
      check_same_bits(from_vector(floats, {7}, dtype, Device::CUDA), from_vector(floats, {7}, dtype),
                      fmt::format("floats as {}", dtype_name(dtype)));
    }
    const std::vector<double> in_range(doubles.begin(), doubles.begin() + (dtype == DType::I32 ? 3 : 7));
    check_same_bits(from_vector(in_range, {static_cast<int64_t>(in_range.size())}, dtype, Device::CUDA),
                    from_vector(in_range, {static_cast<int64_t>(in_range.size())}, dtype),
                    fmt::format("doubles as {}", dtype_name(dtype)));
  }
  const std::vector<int32_t> ints = {3, -1, 0, 2147483647};
  check_same_bits(from_vector(ints, {2, 2}, Device::CUDA), from_vector(ints, {2, 2}), "ints");
  CHECK(from_vector(ints, {2, 2}, Device::CUDA).to_vector<int32_t>() == ints);
  CHECK(from_vector(std::vector<float>{}, {0, 3}, DType::F32, Device::CUDA).numel() == 0);
}

TEST_CASE("cuda: create: uniform is bit-identical to the CPU's and randn within its bound" * cuda_only()) {
  for (DType dtype : {DType::F32, DType::F64})
    for (int64_t n : {1, 7, 33, 4097}) {
      const std::string what = fmt::format("{} [{}]", dtype_name(dtype), n);
      Generator cpu_gen(11, 5), gpu_gen(11, 5);
      check_same_bits(uniform({n}, gpu_gen, -2.0, 3.0, dtype, Device::CUDA), uniform({n}, cpu_gen, -2.0, 3.0, dtype),
                      what + " uniform");
      check_same_bits(uniform({n}, gpu_gen, 0.0, 1.0, dtype, Device::CUDA), uniform({n}, cpu_gen, 0.0, 1.0, dtype),
                      what + " uniform [0, 1)");
      const Tensor gpu = randn({n}, gpu_gen, 0.5, 2.0, dtype, Device::CUDA), cpu = randn({n}, cpu_gen, 0.5, 2.0, dtype);
      CHECK(gpu_gen.offset == cpu_gen.offset);
      if (cuda::is_simulator()) {
        // The emulator's device code calls the host's log and cos: the same bits.
        check_same_bits(gpu, cpu, what + " randn");
        continue;
      }
      // A GPU: CUDA's log and cos are within 1 and 2 ulps, the C library's within 1: f64 values agree to a few ulps
      // of the term stddev * z; f32 values are the same bits unless the double lies that close to an f32 rounding
      // boundary (about 1 in 10^8 elements), and then one f32 ulp apart.
      const std::vector<double> g = testing::as_doubles(to_cpu(gpu)), c = testing::as_doubles(cpu);
      int64_t off_by_one_ulp = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (dtype == DType::F64) {
          REQUIRE(std::abs(g[i] - c[i]) <= 1e-14 * (1 + std::abs(c[i])));
        } else if (g[i] != c[i]) {
          ++off_by_one_ulp;
          REQUIRE(static_cast<float>(g[i]) == std::nextafter(static_cast<float>(c[i]), static_cast<float>(g[i])));
        }
      }
      CHECK(off_by_one_ulp <= 1);
    }
}

// ---- (c) index kernels ----------------------------------------------------------------------------------------------

TEST_CASE("cuda: index: select_slices copies the chosen slices of any dtype" * cuda_only()) {
  struct Case {
    int64_t outer, src_n, inner, n;
  };
  for (DType dtype : {DType::F32, DType::F64, DType::I32, DType::BF16})
    for (const Case& c : {Case{1, 1, 1, 1}, Case{5, 9, 33, 40}, Case{1, 33, 7, 4097}, Case{7, 3, 1, 0}}) {
      const Tensor src = values_of({c.outer, c.src_n, c.inner}, dtype, 5);
      const Tensor index = random_ids({c.n}, static_cast<int32_t>(c.src_n), 6);
      auto run = [&](Device device) {
        const Tensor out = Tensor::empty({c.outer, c.n, c.inner}, dtype, device);
        KERNEL(select_slices, device)(on(src, device), c.outer, c.src_n, c.inner, on(index, device), out);
        return out;
      };
      check_same_bits(run(Device::CUDA), run(Device::CPU),
                      fmt::format("{} [{}, {}, {}] by {}", dtype_name(dtype), c.outer, c.src_n, c.inner, c.n));
    }
}

TEST_CASE("cuda: index: add_slices sums repeated indices in index order, the CPU's bits, run after run" * cuda_only()) {
  struct Case {
    int64_t outer, dst_n, inner, n;
    bool heavy;  // half the indices on one row: a long group crossing many 256-position tiles
  };
  const std::vector<Case> cases = {{1, 1, 1, 1, false},   {5, 9, 33, 40, false}, {1, 33, 7, 4097, true},
                                   {3, 1, 5, 300, false}, {2, 65, 1, 513, true}, {4, 7, 3, 0, false}};
  for (DType dtype : kCopyTypes)
    for (const Case& c : cases) {
      const std::string what =
          fmt::format("{} dst [{}, {}, {}] += {} slices", dtype_name(dtype), c.outer, c.dst_n, c.inner, c.n);
      const Tensor dst = values_of({c.outer, c.dst_n, c.inner}, dtype, 7),
                   src = values_of({c.outer, c.n, c.inner}, dtype, 8);
      const Tensor index = random_ids({c.n}, static_cast<int32_t>(c.dst_n), 9, c.heavy);
      auto run = [&](Device device) {
        const Tensor out = device == Device::CPU ? clone(dst).detach() : to_gpu(dst);
        KERNEL(add_slices, device)(out, c.outer, c.dst_n, c.inner, on(index, device), on(src, device));
        return out;
      };
      const Tensor cpu = run(Device::CPU), first = run(Device::CUDA), second = run(Device::CUDA);
      check_same_bits(first, cpu, what);
      check_same_bits(second, cpu, what + " (second run)");
    }
  // The order shows: in f32, ((0 + 1e8) + 1 - 1e8) + 1 = 1, while 1 + 1 + 1e8 - 1e8 = 0 or (1e8 - 1e8) + 1 + 1 = 2.
  const Tensor src = from_vector(std::vector<float>{1e8f, 5.f, 1.f, -1e8f, 1.f}, {5, 1});
  const Tensor index = from_vector(std::vector<int32_t>{0, 1, 0, 0, 0}, {5});
  const Tensor dst = zeros({2, 1}, DType::F32, Device::CUDA);
  KERNEL(add_slices, Device::CUDA)(dst, 1, 2, 1, to_gpu(index), to_gpu(src));
  CHECK(dst.to_vector<float>() == std::vector<float>{1.f, 5.f});
}

TEST_CASE("cuda: index: gather_elements and scatter_add_elements match the CPU along every dim" * cuda_only()) {
  struct Case {
    Shape x, index;
    int64_t dim;
  };
  const std::vector<Case> cases = {
      {{4, 6, 5}, {3, 8, 4}, 1}, {{4, 6, 5}, {7, 6, 2}, 0}, {{4, 6, 5}, {4, 2, 9}, 2}, {{33}, {4097}, 0}, {{1}, {1}, 0},
      {{7, 33}, {7, 0}, 1}};
  for (DType dtype : kCopyTypes)
    for (const Case& c : cases) {
      const std::string what =
          fmt::format("{} x {} index {} dim {}", dtype_name(dtype), shape_str(c.x), shape_str(c.index), c.dim);
      const Tensor x = values_of(c.x, dtype, 10), src = values_of(c.index, dtype, 11);
      const Tensor index = random_ids(c.index, static_cast<int32_t>(c.x[c.dim]), 12, c.x.size() == 1);
      auto run = [&](Device device) {
        const Tensor out = Tensor::empty(c.index, dtype, device);
        KERNEL(gather_elements, device)(on(x, device), c.dim, on(index, device), out);
        const Tensor added = device == Device::CPU ? clone(x).detach() : to_gpu(x);
        KERNEL(scatter_add_elements, device)(added, c.dim, on(index, device), on(src, device));
        return std::pair<Tensor, Tensor>{out, added};
      };
      const auto [gpu_gathered, gpu_added] = run(Device::CUDA);
      const auto [cpu_gathered, cpu_added] = run(Device::CPU);
      check_same_bits(gpu_gathered, cpu_gathered, what + " gather");
      check_same_bits(gpu_added, cpu_added, what + " scatter_add");
    }
}

TEST_CASE("cuda: index: select_where broadcasts like the CPU" * cuda_only()) {
  struct Case {
    Shape cond, a, b, out;
  };
  const std::vector<Case> cases = {{{7, 1, 33}, {1, 5, 33}, {33}, {7, 5, 33}},
                                   {{}, {}, {}, {}},
                                   {{4097}, {1}, {4097}, {4097}},
                                   {{1}, {2, 3}, {3, 1, 1}, {3, 2, 3}}};
  for (DType dtype : kCopyTypes)
    for (const auto& [cs, as, bs, shape] : cases) {
      const Tensor cond = random_ids(cs, 3, 13), a = values_of(as, dtype, 14), b = values_of(bs, dtype, 15);
      auto run = [&](Device device) {
        const Tensor out = Tensor::empty(shape, dtype, device);
        KERNEL(select_where, device)(on(cond, device), on(a, device), on(b, device), out);
        return out;
      };
      check_same_bits(
          run(Device::CUDA), run(Device::CPU),
          fmt::format("{} where({}, {}, {})", dtype_name(dtype), shape_str(cs), shape_str(as), shape_str(bs)));
    }
}

namespace {

// Rows with ties (multiples of 1/2), NaNs at a few places (floats), and both signed zeros.
Tensor rows_with_ties(int64_t rows, int64_t n, DType dtype, uint64_t seed) {
  std::vector<double> v(rows * n);
  for (size_t i = 0; i < v.size(); ++i) {
    const uint64_t r = mix(seed + i);
    v[i] = static_cast<double>(static_cast<int64_t>(r % 9) - 4) / 2;
    if (r % 97 == 5) v[i] = -0.0;
    if (dtype != DType::I32 && r % 31 == 7) v[i] = std::numeric_limits<double>::quiet_NaN();
  }
  if (dtype == DType::I32) {
    for (double& e : v) e *= 2;
    return to_dtype(from_vector(v, {rows, n}), DType::I32);
  }
  return from_vector(v, {rows, n}, dtype);
}

}  // namespace

TEST_CASE("cuda: index: topk_rows and argsort_rows order ties, NaNs and signed zeros as the CPU" * cuda_only()) {
  for (DType dtype : kCopyTypes)
    for (auto [rows, n] : {std::pair<int64_t, int64_t>{1, 1}, {5, 7}, {33, 33}, {3, 300}, {0, 4}}) {
      const std::string what = fmt::format("{} [{}, {}]", dtype_name(dtype), rows, n);
      const Tensor x = rows_with_ties(rows, n, dtype, 16 + n);
      for (int64_t k : {int64_t{0}, int64_t{1}, std::min<int64_t>(3, n), n}) {
        auto run = [&](Device device) {
          std::pair<Tensor, Tensor> out{Tensor::empty({rows, k}, dtype, device),
                                        Tensor::empty({rows, k}, DType::I32, device)};
          KERNEL(topk_rows, device)(on(x, device), k, out.first, out.second);
          return out;
        };
        const auto [gpu_values, gpu_indices] = run(Device::CUDA);
        const auto [cpu_values, cpu_indices] = run(Device::CPU);
        check_same_bits(gpu_values, cpu_values, what + fmt::format(" top {} values", k));
        check_same_bits(gpu_indices, cpu_indices, what + fmt::format(" top {} indices", k));
      }
      for (bool descending : {false, true}) {
        auto run = [&](Device device) {
          const Tensor out = Tensor::empty({rows, n}, DType::I32, device);
          KERNEL(argsort_rows, device)(on(x, device), descending, out);
          return out;
        };
        check_same_bits(run(Device::CUDA), run(Device::CPU), what + (descending ? " argsort descending" : " argsort"));
      }
    }
  // Ties: lower index first; NaN above everything.
  const Tensor x = to_gpu(from_vector(std::vector<float>{1.f, NAN, 2.f, 1.f, 2.f}, {1, 5}));
  const Tensor values = Tensor::empty({1, 3}, DType::F32, Device::CUDA),
               indices = Tensor::empty({1, 3}, DType::I32, Device::CUDA);
  KERNEL(topk_rows, Device::CUDA)(x, 3, values, indices);
  CHECK(indices.to_vector<int32_t>() == std::vector<int32_t>{1, 2, 4});
  const Tensor order = Tensor::empty({1, 5}, DType::I32, Device::CUDA);
  KERNEL(argsort_rows, Device::CUDA)(x, false, order);
  CHECK(order.to_vector<int32_t>() == std::vector<int32_t>{0, 3, 2, 4, 1});
}

TEST_CASE("cuda: index: count_ids counts like the CPU" * cuda_only()) {
  for (auto [n, bins] : {std::pair<int64_t, int32_t>{1, 1}, {4097, 33}, {33, 4097}, {0, 5}}) {
    const Tensor ids = random_ids({n}, bins, 17, true);
    auto run = [&](Device device) {
      const Tensor counts = zeros({bins}, DType::I32, device);
      KERNEL(count_ids, device)(on(ids, device), counts);
      return counts;
    };
    check_same_bits(run(Device::CUDA), run(Device::CPU), fmt::format("{} ids in {} bins", n, bins));
  }
}

// ---- (d) the ops through autograd -----------------------------------------------------------------------------------

namespace {

using Op = std::function<Tensor(const std::vector<Tensor>&)>;

// An index (a CPU tensor) on x's device.
Tensor beside(const Tensor& index, const Tensor& x) { return on(index, x.device()); }

// Runs op on both devices with the same inputs and upstream gradient; checks the output and every gradient: bits, or
// within rel (relative to 1 + |cpu|) where rel > 0.
void check_op(const std::string& what, const Op& op, const std::vector<Tensor>& inputs, double rel = 0) {
  const Tensor probe = op(inputs);
  const Tensor g = values_of(probe.shape(), probe.dtype(), 99);
  const std::vector<Tensor> cpu = op_and_gradients(op, inputs, g, Device::CPU);
  const std::vector<Tensor> gpu = op_and_gradients(op, inputs, g, Device::CUDA);
  REQUIRE(cpu.size() == gpu.size());
  for (size_t i = 0; i < cpu.size(); ++i) {
    const std::string name = what + (i == 0 ? " out" : fmt::format(" d input {}", i - 1));
    REQUIRE_MESSAGE(cpu[i].defined() == gpu[i].defined(), name);
    if (!cpu[i].defined()) continue;
    if (rel > 0)
      testing::check_gpu_matches(gpu[i], cpu[i], rel, 1.0, name);
    else
      check_same_bits(gpu[i], cpu[i], name);
  }
}

}  // namespace

TEST_CASE("cuda: shape: the shape ops and their gradients match the CPU" * cuda_only()) {
  for (DType dtype : {DType::F32, DType::F64}) {
    const std::string t = dtype_name(dtype);
    const Tensor x = values_of({3, 5, 7}, dtype, 20), y = values_of({3, 2, 7}, dtype, 21);
    check_op(t + " permute", [](const auto& in) { return permute(in[0], {2, 0, 1}); }, {x});
    check_op(t + " transpose", [](const auto& in) { return transpose(in[0], 0, -1); }, {x});
    check_op(t + " concat", [](const auto& in) { return concat({in[0], in[1], in[0]}, 1); }, {x, y});
    check_op(t + " split", [](const auto& in) { return split(in[0], {1, 4, 2}, 2)[1]; }, {x});
    check_op(t + " slice_rows", [](const auto& in) { return slice_rows(in[0], 1, 3); }, {x});
    check_op(t + " reshape", [](const auto& in) { return reshape(in[0], {-1, 7}); }, {x});
    check_op(t + " clone", [](const auto& in) { return clone(in[0]); }, {x});
    const DType other = dtype == DType::F32 ? DType::F64 : DType::BF16;
    check_op(t + " to_dtype", [other](const auto& in) { return to_dtype(in[0], other); }, {x});
  }
  // bf16 round trip through autograd: the gradient comes back in bf16.
  check_op("bf16 to f32", [](const auto& in) { return to_dtype(in[0], DType::F32); },
           {values_of({33}, DType::BF16, 22)});
}

TEST_CASE("cuda: index: the indexing ops and their gradients match the CPU" * cuda_only()) {
  for (DType dtype : {DType::F32, DType::F64}) {
    const std::string t = dtype_name(dtype);
    const Tensor x = values_of({6, 9, 5}, dtype, 30);
    const Tensor rows = random_ids({300}, 9, 31, true);  // repeats: gradients accumulate
    check_op(t + " index_select", [&](const auto& in) { return index_select(in[0], 1, beside(rows, in[0])); }, {x});
    check_op(t + " index_add", [&](const auto& in) { return index_add(in[0], 1, beside(rows, in[0]), in[1]); },
             {x, values_of({6, 300, 5}, dtype, 32)});
    const Tensor table = values_of({33, 7}, dtype, 33), ids = random_ids({3, 4097}, 33, 34, true);
    check_op(t + " embedding", [&](const auto& in) { return embedding(in[0], beside(ids, in[0])); }, {table});
    const Tensor picks = random_ids({6, 4, 5}, 9, 35);
    check_op(t + " gather", [&](const auto& in) { return gather(in[0], 1, beside(picks, in[0])); }, {x});
    check_op(t + " scatter_add", [&](const auto& in) { return scatter_add(in[0], 1, beside(picks, in[0]), in[1]); },
             {x, values_of({6, 4, 5}, dtype, 36)});
    const Tensor mask = random_ids({9, 1}, 2, 37);
    check_op(t + " masked_fill", [&](const auto& in) { return masked_fill(in[0], beside(mask, in[0]), -1e9); }, {x});
    check_op(
        t + " where", [&](const auto& in) { return where(beside(mask, in[0]), in[0], in[1]); },
        {x, values_of({5}, dtype, 38)}, dtype == DType::F32 ? 1e-5 : 1e-12);
  }
  // The no-grad ops on GPU tensors.
  const Tensor x = rows_with_ties(33, 65, DType::F32, 40);
  const auto [values, indices] = topk(to_gpu(x), 5);
  check_same_bits(values, topk(x, 5).first, "topk values");
  check_same_bits(indices, topk(x, 5).second, "topk indices");
  check_same_bits(argsort(to_gpu(x), true), argsort(x, true), "argsort");
  const Tensor ids = random_ids({4097}, 64, 41);
  check_same_bits(bincount(to_gpu(ids), 64), bincount(ids, 64), "bincount");
}

TEST_CASE("cuda: index: out-of-range indices on the GPU throw as on the CPU" * cuda_only()) {
  const Tensor x = to_gpu(values_of({4, 3}, DType::F32, 50));
  const Tensor bad = to_gpu(from_vector(std::vector<int32_t>{0, 4, 1}, {3}));
  testing::check_mentions(testing::error_of([&] { index_select(x, 0, bad); }),
                          {"index_select", "index 4", "position 1"});
  testing::check_mentions(testing::error_of([&] { embedding(x, bad); }), {"embedding", "index 4"});
  testing::check_mentions(testing::error_of([&] { bincount(bad, 4); }), {"bincount", "id 4"});
  testing::check_mentions(testing::error_of([&] { gather(x, 1, reshape(bad, {1, 3})); }), {"gather", "index 4"});
  testing::check_mentions(testing::error_of([&] { index_select(x, 0, from_vector(std::vector<int32_t>{0}, {1})); }),
                          {"index_select", "different devices"});
}

TEST_CASE("cuda: shape: copies on and between devices, item and to_vector of bf16, empty tensors" * cuda_only()) {
  const Tensor host = values_of({5, 7}, DType::F32, 60);
  const Tensor gpu = to_gpu(host);
  // copy_ on the GPU, into a whole tensor and into a view of rows.
  Tensor whole = zeros({5, 7}, DType::F32, Device::CUDA);
  copy_(whole, gpu);
  check_same_bits(whole, host, "copy_ device to device");
  Tensor rows = slice_rows(whole, 1, 3);
  copy_(rows, to_gpu(zeros({2, 7})));
  CHECK(to_cpu(whole).to_vector<float>()[7] == 0.f);
  CHECK(to_cpu(whole).to_vector<float>()[0] == host.to_vector<float>()[0]);
  CHECK(to_cpu(whole).to_vector<float>()[21] == host.to_vector<float>()[21]);
  // copy_ between devices, both ways.
  Tensor back = zeros({5, 7});
  copy_(back, gpu);
  CHECK(back.to_vector<float>() == host.to_vector<float>());
  check_same_bits(clone(gpu), host, "clone");
  // bf16 on the GPU: item and to_vector copy the bits back.
  const Tensor b = to_dtype(gpu, DType::BF16);
  CHECK(b.to_vector<bf16>()[3].bits == to_bf16(host.to_vector<float>()[3]).bits);
  CHECK(reshape(slice_rows(b, 2, 3), {7}).to_vector<bf16>().size() == 7);
  CHECK(slice_rows(b, 4, 5).to_vector<bf16>()[6].bits == to_bf16(host.to_vector<float>()[34]).bits);
  CHECK(to_gpu(from_bits(std::vector<uint16_t>{0x3fc0}, DType::BF16)).item() == 1.5);
  // Empty tensors on the GPU own no memory and copy nothing.
  const Tensor empty = Tensor::empty({0, 3}, DType::F32, Device::CUDA);
  CHECK(empty.to_vector<float>().empty());
  CHECK(to_cpu(empty).numel() == 0);
  CHECK(concat({empty, to_gpu(zeros({2, 3}))}, 0).shape() == Shape{2, 3});
  CHECK(permute(Tensor::empty({0, 3, 2}, DType::F32, Device::CUDA), {2, 0, 1}).shape() == Shape{2, 0, 3});
}

}  // namespace moelab
