// libFuzzer's entry for one fuzz target (MOELAB_FUZZ_TARGET, set per executable by tests/CMakeLists.txt): a finding
// is a crash or sanitizer report, or an input whose error is not one clear line naming its file (then this aborts
// with the judgement). Run with scripts/fuzz.sh (docs/reliability.md).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <unistd.h>

#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const moelab::fuzz::Target& target = moelab::fuzz::target(MOELAB_FUZZ_TARGET);
  static const std::string scratch = [] {
    const auto dir = std::filesystem::temp_directory_path() / ("moelab_libfuzzer_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir);
    return dir.string();
  }();
  const std::string verdict = moelab::fuzz::judge(target, {reinterpret_cast<const char*>(data), size}, scratch);
  if (!verdict.empty()) {
    std::fprintf(stderr, "moelab fuzz %s: %s\n", target.name, verdict.c_str());
    std::abort();
  }
  return 0;
}
