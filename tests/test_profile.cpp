// Kernel timing (engine/profile.h): what a KernelProfile counts, on the CPU and on the CUDA backend.
#include <doctest/doctest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "engine/ops.h"
#include "engine/profile.h"
#include "tests/cuda_testing.h"
#include "tests/testing.h"

namespace moelab::testing {
namespace {

const KernelTime* find_kernel(const std::vector<KernelTime>& totals, const std::string& name) {
  for (const KernelTime& t : totals)
    if (t.name == name) return &t;
  return nullptr;
}

// Two products and a sum on `device` under a profile: the seam's calls by name, nothing before or after it.
void check_profile_counts(Device device) {
  const Tensor a = on(random({64, 48}, 1, DType::F32), device), b = on(random({48, 32}, 2, DType::F32), device);
  const Tensor before = matmul(a, b);  // before the profile: not counted
  std::vector<KernelTime> totals;
  {
    KernelProfile profile;
    CHECK_THROWS_AS(KernelProfile(), std::logic_error);  // one at a time
    const Tensor c = matmul(a, b), d = matmul(a, b), total = sum(c);
    totals = profile.totals();
  }
  const Tensor after = matmul(a, b);  // after: not counted either
  const KernelTime* products = find_kernel(totals, "batched_matmul");
  REQUIRE(products != nullptr);
  CHECK(products->calls == 2);
  CHECK(products->device == device);
  CHECK(products->ms > 0);
  const KernelTime* sums = find_kernel(totals, "sum_all");
  REQUIRE(sums != nullptr);
  CHECK(sums->calls == 1);
  for (size_t i = 1; i < totals.size(); ++i) CHECK(totals[i - 1].ms >= totals[i].ms);  // the most time first
  KernelProfile fresh;                                                                 // a new profile starts empty
  CHECK(fresh.totals().empty());
}

}  // namespace

TEST_CASE("profile: a KernelProfile counts and times the seam's calls while it is alive (CPU)") {
  check_profile_counts(Device::CPU);
}

TEST_CASE("profile: the same on the CUDA backend, timed by events on the stream" * cuda_only()) {
  check_profile_counts(Device::CUDA);
}

}  // namespace moelab::testing
