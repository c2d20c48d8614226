// Kernel timing (engine/profile.h): the seam's calls, gathered per name and device. CPU calls are summed at once;
// CUDA calls keep their two events until totals() reads them, so that timing never waits for the device mid-step.
#include "engine/profile.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "engine/cuda/runtime.h"

namespace moelab {
namespace {

using Clock = std::chrono::steady_clock;

struct PendingCall {  // a CUDA call whose events the device has not necessarily reached yet
  const char* name;
  double bytes;
  std::unique_ptr<cuda::TimingEvent> start, end;
};

struct ProfileState {
  std::mutex mutex;  // ops may run on several host threads
  std::map<std::pair<std::string, Device>, KernelTime> totals;
  std::vector<PendingCall> pending;
};

ProfileState& state() {
  static ProfileState s;
  return s;
}

void add(ProfileState& s, const char* name, Device device, double ms, double bytes) {
  KernelTime& t = s.totals[{name, device}];
  t.name = name, t.device = device;
  t.calls += 1, t.ms += ms, t.bytes += bytes;
}

}  // namespace

KernelProfile::KernelProfile() {
  ProfileState& s = state();
  std::lock_guard lock(s.mutex);
  if (detail::kernel_profile_active) throw std::logic_error("KernelProfile: another profile is active");
  s.totals.clear();
  s.pending.clear();
  detail::kernel_profile_active = true;
}

KernelProfile::~KernelProfile() {
  ProfileState& s = state();
  std::lock_guard lock(s.mutex);
  detail::kernel_profile_active = false;
  s.pending.clear();
}

std::vector<KernelTime> KernelProfile::totals() const {
  ProfileState& s = state();
  std::lock_guard lock(s.mutex);
  for (const PendingCall& call : s.pending)
    add(s, call.name, Device::CUDA, call.end->ms_since(*call.start), call.bytes);
  s.pending.clear();
  std::vector<KernelTime> out;
  for (const auto& [key, time] : s.totals) out.push_back(time);
  std::stable_sort(out.begin(), out.end(), [](const KernelTime& a, const KernelTime& b) { return a.ms > b.ms; });
  return out;
}

namespace detail {

KernelTimer::KernelTimer(const char* name, Device device, double bytes) : name_(name), device_(device), bytes_(bytes) {
  if (device == Device::CUDA) {
    device_start_ = std::make_unique<cuda::TimingEvent>();
    device_start_->record();
  } else {
    host_start_ = Clock::now();
  }
}

KernelTimer::~KernelTimer() = default;

void KernelTimer::stop() {
  ProfileState& s = state();
  if (device_ == Device::CUDA) {
    auto end = std::make_unique<cuda::TimingEvent>();
    end->record();
    std::lock_guard lock(s.mutex);
    if (kernel_profile_active) s.pending.push_back({name_, bytes_, std::move(device_start_), std::move(end)});
  } else {
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - host_start_).count();
    std::lock_guard lock(s.mutex);
    if (kernel_profile_active) add(s, name_, device_, ms, bytes_);
  }
}

}  // namespace detail
}  // namespace moelab
