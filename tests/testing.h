#pragma once
// Test helpers: random inputs, leaves, temp folders, error and equality checks, closeness checks, and gradient checks
// by central differences (in f64).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "engine/ops.h"
#include "nn/config.h"

namespace moelab::testing {

// Normal(0, 1) values from a seed (f64 for gradient checks, f32 otherwise).
inline Tensor random(const Shape& shape, uint64_t seed, DType dtype = DType::F64, double scale = 1.0) {
  Generator gen(seed);
  return randn(shape, gen, 0.0, scale, dtype);
}

// A small MoE layer config: width d, E experts of hidden h, top-k, 2 heads.
inline nn::ModelConfig moe_layer_config(int64_t d, int64_t experts, int64_t hidden, int64_t top_k) {
  nn::ModelConfig c;
  c.d_model = d;
  c.n_heads = 2;
  c.n_experts = experts;
  c.expert_hidden = hidden;
  c.top_k = top_k;
  return c;
}

// A fresh leaf holding t's values in dtype (so f32 and f64 runs see the very same numbers).
inline Tensor leaf(const Tensor& t, DType dtype) {
  Tensor out = clone(to_dtype(t.detach(), dtype)).detach();
  out.set_requires_grad(true);
  return out;
}

// The gradients the node of an op's output returns for the gradient g of that output: its backward function itself,
// so that g may be bf16, which no loss gives.
inline std::vector<Tensor> node_gradients(const Tensor& out, const Tensor& g) {
  NoGradGuard no_grad;
  return out.grad_fn()->backward(g);
}

// i32 [N, k]: per token k distinct experts drawn from those with e % 3 != 1 (so some experts get no token at all),
// or from all experts when that leaves fewer than k.
inline Tensor forced_ids(int64_t N, int64_t k, int64_t E, uint64_t seed) {
  std::vector<int32_t> allowed;
  for (int32_t e = 0; e < E; ++e)
    if (e % 3 != 1) allowed.push_back(e);
  if (static_cast<int64_t>(allowed.size()) < k) {
    allowed.resize(E);
    for (int32_t e = 0; e < E; ++e) allowed[e] = e;
  }
  std::mt19937 gen(static_cast<uint32_t>(seed));
  std::vector<int32_t> ids;
  for (int64_t n = 0; n < N; ++n) {
    std::shuffle(allowed.begin(), allowed.end(), gen);
    ids.insert(ids.end(), allowed.begin(), allowed.begin() + k);
  }
  return from_vector(ids, {N, k});
}

// Row-major coordinates of a flat position in `shape`, and back.
inline std::vector<int64_t> unravel(int64_t flat, const Shape& shape) {
  std::vector<int64_t> c(shape.size());
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) c[d] = flat % shape[d], flat /= shape[d];
  return c;
}
inline int64_t ravel(const std::vector<int64_t>& c, const Shape& shape) {
  int64_t flat = 0;
  for (size_t d = 0; d < shape.size(); ++d) flat = flat * shape[d] + c[d];
  return flat;
}

inline std::vector<double> as_doubles(const Tensor& t) {
  if (t.dtype() == DType::F64) return t.to_vector<double>();
  if (t.dtype() == DType::F32) {
    std::vector<float> v = t.to_vector<float>();
    return {v.begin(), v.end()};
  }
  if (t.dtype() == DType::BF16) {
    std::vector<double> out;
    for (bf16 b : t.to_vector<bf16>()) out.push_back(to_float(b));
    return out;
  }
  std::vector<int32_t> v = t.to_vector<int32_t>();
  return {v.begin(), v.end()};
}

// An empty folder under the system's temp folder, unique to this process (removed first if it exists).
inline std::filesystem::path fresh_temp_dir(const std::string& name) {
  std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("moelab_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir;
}

// A fresh folder under the system temp dir for a test's files, removed at scope end unless keep() was called (a
// failing test keeps its inputs and outputs so the run can be repeated by hand).
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& prefix) {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ignored;
    if (!keep_) std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  void keep() { keep_ = true; }

 private:
  std::filesystem::path path_;
  bool keep_ = false;
};

// The repository's root: MOELAB_SOURCE_DIR from the environment (a build prepared on one machine and run on another,
// scripts/gpu_check.sh), else the source folder CMake compiled in, else the current folder.
inline std::filesystem::path source_dir() {
  const char* env = std::getenv("MOELAB_SOURCE_DIR");
  if (env && *env) return env;
#ifdef MOELAB_SOURCE_DIR
  return MOELAB_SOURCE_DIR;
#else
  return ".";
#endif
}

// The message of the exception f throws, or "<no exception>".
template <class F> std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no exception>";
}

// Asserts `message` contains every one of `parts`.
inline void check_mentions(const std::string& message, const std::vector<std::string>& parts) {
  for (const std::string& part : parts)
    CHECK_MESSAGE(message.find(part) != std::string::npos, "'" << message << "' does not mention '" << part << "'");
}

// Asserts that f throws E whose message mentions every one of `parts`.
template <class E = std::invalid_argument>
void check_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const E& e) {
    check_mentions(e.what(), parts);
    return;
  }
  FAIL_CHECK("expected an exception mentioning " << parts.front());
}

// Asserts the same shape and exactly the same values (compared as doubles: for results that copy values, or that must
// not depend on the thread count).
inline void check_equal(const Tensor& actual, const Tensor& expected, const std::string& what) {
  REQUIRE_MESSAGE(actual.shape() == expected.shape(), what << ": " << actual.str() << " vs " << expected.str());
  CHECK_MESSAGE(as_doubles(actual) == as_doubles(expected), what);
}

// The same shape, dtype and bytes (NaN equals NaN of the same bits; -0 differs from +0). CPU tensors.
inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const size_t bytes = static_cast<size_t>(a.numel()) * dtype_size(a.dtype());
  return bytes == 0 || std::memcmp(a.raw_data(), b.raw_data(), bytes) == 0;
}

// max |a - b| / (atol + |b|) over elements; shapes must match.
inline double max_relative_error(const Tensor& actual, const Tensor& expected, double atol = 1e-6) {
  REQUIRE_MESSAGE(actual.shape() == expected.shape(), actual.str() << " vs " << expected.str());
  std::vector<double> a = as_doubles(actual), b = as_doubles(expected);
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double err = std::abs(a[i] - b[i]) / (atol + std::abs(b[i]));
    if (!(err <= worst)) worst = err;  // NaN-propagating max
  }
  return worst;
}

// ||actual - expected|| / ||expected|| (Euclidean norms over all elements): an error that a few rounding flips move
// little, but a systematic difference in every element moves by its size.
inline double relative_norm_error(const Tensor& actual, const Tensor& expected) {
  REQUIRE_MESSAGE(actual.shape() == expected.shape(), actual.str() << " vs " << expected.str());
  std::vector<double> a = as_doubles(actual), b = as_doubles(expected);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) diff += (a[i] - b[i]) * (a[i] - b[i]), norm += b[i] * b[i];
  return std::sqrt(diff / norm);
}

// Asserts actual ~= expected elementwise within rel (relative to |expected| + atol).
inline void check_close(const Tensor& actual, const Tensor& expected, double rel, double atol = 1e-6,
                        const std::string& what = "") {
  double err = max_relative_error(actual, expected, atol);
  CHECK_MESSAGE(err <= rel, what << ": max relative error " << err << " > " << rel);
}

// A scalar that depends on every element of `out` with distinct weights (so a gradient check sees each one).
inline Tensor weighted_sum(const Tensor& out, uint64_t seed = 4242) {
  return sum(mul(out, random(out.shape(), seed, out.dtype())));
}

// Compares the autograd gradient of loss(inputs) with central differences for every element of every f64 input
// marked requires_grad. Returns the worst relative error (also asserted <= tol).
inline double gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& loss, std::vector<Tensor> inputs,
                        double tol = 1e-6, double eps = 1e-6, const std::string& what = "") {
  for (Tensor& x : inputs) x.zero_grad();
  Tensor l = loss(inputs);
  l.backward();
  double worst = 0;
  NoGradGuard no_grad;
  for (size_t k = 0; k < inputs.size(); ++k) {
    Tensor& x = inputs[k];
    if (!x.requires_grad()) continue;
    REQUIRE_MESSAGE(x.dtype() == DType::F64, "gradcheck inputs must be f64");
    Tensor analytic = x.grad();
    std::vector<double> a = analytic.defined() ? analytic.to_vector<double>() : std::vector<double>(x.numel(), 0.0);
    double* p = x.data<double>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      double saved = p[i];
      p[i] = saved + eps;
      double up = loss(inputs).item();
      p[i] = saved - eps;
      double down = loss(inputs).item();
      p[i] = saved;
      double numeric = (up - down) / (2 * eps);
      double err = std::abs(numeric - a[i]) / (1e-4 + std::abs(numeric));
      if (err > worst) worst = err;
      if (err > tol) {
        FAIL_CHECK(what << ": input " << k << " element " << i << ": autograd " << a[i] << " vs numeric " << numeric);
        return err;
      }
    }
  }
  return worst;
}

}  // namespace moelab::testing
