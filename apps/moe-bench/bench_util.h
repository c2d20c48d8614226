#pragma once
// Helpers the moe-bench subcommands share: medians, the presets' batch sizes, and running a PyTorch baseline script.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <source_location>
#include <string>
#include <vector>

namespace moelab::bench {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The batch (sequences) of a named config's benchmarks (docs/model.md, "Named configs").
inline int64_t preset_batch(const std::string& preset) {
  if (preset == "S") return 32;
  if (preset == "M") return 16;
  return 8;  // tiny
}

// scripts/NAME of the source tree the calling apps/moe-bench/*.cpp was compiled from (CMake passes absolute paths;
// this header's own path runs through the build's include links).
inline std::string source_script(const std::string& name,
                                 const std::source_location& caller = std::source_location::current()) {
  const std::filesystem::path repo_root =
      std::filesystem::path(caller.file_name()).parent_path().parent_path().parent_path();
  return (repo_root / "scripts" / name).string();
}

// s in single quotes for sh.
inline std::string shell_quote(const std::string& s) {
  std::string quoted = "'";
  for (char c : s) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// The environment prefix for running `python`: Debian's /usr/bin/python3 (where python3-torch is) gets no
// PYTHONHOME/PYTHONPATH, which belong to the python on PATH.
inline std::string python_env(const std::string& python) {
  return python == "/usr/bin/python3" ? "-u PYTHONHOME -u PYTHONPATH " : "";
}

}  // namespace moelab::bench
