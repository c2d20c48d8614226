#pragma once
// Fuzz targets: every reader of bytes from outside (files and flags), fed arbitrary bytes. The expected outcome of
// every input is a clean load or one clear error line: a std::exception whose message is a single line of at most
// kMaxErrorLength characters that names where the bytes came from (the file, or the flag). Anything else (a crash, a
// sanitizer report, a hang, another exception, a multi-line or huge message, a message that names no source) is a
// finding. Two drivers run them: tests/test_fuzz.cpp (seeded mutations of the seed corpus in tests/data/fuzz/, in
// ctest) and tests/fuzz/libfuzzer_main.cpp (libFuzzer, the `fuzz` preset; docs/reliability.md).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moelab::fuzz {

inline constexpr size_t kMaxErrorLength = 400;

struct Target {
  const char* name;  // also the seed folder: tests/data/fuzz/<name>/
  // Feeds `bytes` to the reader through the scratch file `source`. Returns normally on a clean load; throws
  // std::exception on an error.
  void (*run)(std::string_view bytes, const std::string& source);
  bool names_source;  // its errors must name the file (flags have none: their errors name the flag)
};

// safetensors (a model file), checkpoint (a checkpoint's state.safetensors), jsonl (a corpus file), shard (a token
// shard), toml (a train config file), flags (moe-train's command line, one argument per line).
const std::vector<Target>& targets();
const Target& target(std::string_view name);  // throws std::invalid_argument for an unknown name

// Runs one input through `target` (its scratch file in scratch_dir) and judges the outcome: "" for a clean load or a
// good error, else what is wrong. Crashes are not caught: they end the process, which is the point.
std::string judge(const Target& target, std::string_view bytes, const std::string& scratch_dir);

// "" when `message` is a good error (one line, not empty, at most kMaxErrorLength, naming must_name if given).
std::string judge_message(const std::string& message, const std::string& must_name);

}  // namespace moelab::fuzz
