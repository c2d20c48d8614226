#include "tests/fuzz/fuzz_targets.h"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "apps/train/checkpoint.h"
#include "apps/train/train_config.h"
#include "data/readers.h"
#include "data/shard.h"
#include "nn/safetensors.h"

namespace moelab::fuzz {

namespace fs = std::filesystem;

namespace {

void write_file(const fs::path& file, std::string_view bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("fuzz: cannot write the scratch file " + file.string());
}

void load_safetensors(std::string_view bytes, const std::string& source) {
  write_file(source, bytes);
  nn::load_safetensors(source);
}

// A checkpoint's state.safetensors as resuming reads it before touching the optimizer: the file, its tensors' values,
// and every number of its metadata.
void read_training_state(std::string_view bytes, const std::string& source) {
  write_file(source, bytes);
  const nn::SafeTensors state = nn::load_safetensors(source);
  apps::check_finite(state.tensors, source);
  apps::read_training_state(state.metadata, source);
}

void read_jsonl(std::string_view bytes, const std::string& source) {
  write_file(source, bytes);
  data::read_jsonl(source);
}

void read_shard(std::string_view bytes, const std::string& source) {
  write_file(source, bytes);
  data::read_shard(source);
}

void apply_toml(std::string_view bytes, const std::string& source) {
  apps::TrainConfig config = apps::train_preset("tiny");
  apps::apply_toml(config, std::string(bytes), source);
  config.validate(source);
}

// One argument per line, after the program's name, as a shell would pass them.
void parse_flags(std::string_view bytes, const std::string& /*source: the flags themselves*/) {
  std::vector<std::string> args;
  size_t start = 0;
  while (start <= bytes.size()) {
    const size_t end = std::min(bytes.find('\n', start), bytes.size());
    args.emplace_back(bytes.substr(start, end - start));
    start = end + 1;
  }
  if (!args.empty() && args.back().empty()) args.pop_back();
  CLI::App app;
  apps::TrainOptions options(app);
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them last first
  app.parse(reversed);
  options.resolve();
}

}  // namespace

const std::vector<Target>& targets() {
  static const std::vector<Target> all = {
      {"safetensors", load_safetensors, true},
      {"checkpoint", read_training_state, true},
      {"jsonl", read_jsonl, true},
      {"shard", read_shard, true},
      {"toml", apply_toml, true},
      {"flags", parse_flags, false},
  };
  return all;
}

const Target& target(std::string_view name) {
  for (const Target& t : targets())
    if (name == t.name) return t;
  throw std::invalid_argument(fmt::format("no fuzz target '{}'", name));
}

std::string judge(const Target& target, std::string_view bytes, const std::string& scratch_dir) {
  const std::string file_name = fmt::format("fuzz-input.{}", target.name);
  const std::string source = (fs::path(scratch_dir) / file_name).string();
  try {
    target.run(bytes, source);
    return "";
  } catch (const std::exception& e) {
    return judge_message(e.what(), target.names_source ? file_name : "");
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

std::string judge_message(const std::string& message, const std::string& must_name) {
  auto shown = [&] { return message.size() > 200 ? message.substr(0, 200) + "..." : message; };
  if (message.empty()) return "an empty error message";
  if (message.find('\n') != std::string::npos) return "an error of several lines: " + shown();
  if (message.size() > kMaxErrorLength)
    return fmt::format("an error of {} characters (at most {}): {}", message.size(), kMaxErrorLength, shown());
  if (!must_name.empty() && message.find(must_name) == std::string::npos)
    return fmt::format("an error that does not name the file {}: {}", must_name, shown());
  return "";
}

}  // namespace moelab::fuzz
