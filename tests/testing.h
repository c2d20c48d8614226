#pragma once
// Test helpers: random inputs, closeness checks, and gradient checks by central differences (in f64).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "engine/ops.h"

namespace moelab::testing {

// Normal(0, 1) values from a seed (f64 for gradient checks, f32 otherwise).
inline Tensor random(const Shape& shape, uint64_t seed, DType dtype = DType::F64, double scale = 1.0) {
  Generator gen(seed);
  return randn(shape, gen, 0.0, scale, dtype);
}

inline std::vector<double> as_doubles(const Tensor& t) {
  if (t.dtype() == DType::F64) return t.to_vector<double>();
  if (t.dtype() == DType::F32) {
    std::vector<float> v = t.to_vector<float>();
    return {v.begin(), v.end()};
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
