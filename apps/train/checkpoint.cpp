#include "apps/train/checkpoint.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "data/file_io.h"
#include "engine/error.h"

namespace moelab::apps {

namespace fs = std::filesystem;
using nlohmann::json;

nn::ModelConfig checkpoint_model_config(const fs::path& checkpoint_dir) {
  fs::path file = checkpoint_dir / kModelFile;
  if (!fs::exists(file)) fail("checkpoint {}: missing {}", checkpoint_dir.string(), kModelFile);
  nn::Metadata metadata = nn::read_safetensors_metadata(file);
  auto it = metadata.find("config");
  if (it == metadata.end()) fail("{}: no model config in __metadata__", file.string());
  try {
    return json::parse(it->second).get<nn::ModelConfig>();
  } catch (const json::exception& e) {
    fail("{}: metadata 'config' is not a model config: {}", file.string(), e.what());
  }
}

int64_t metadata_int(const nn::Metadata& metadata, const fs::path& file, const std::string& field, int64_t min,
                     int64_t max) {
  auto it = metadata.find(field);
  if (it == metadata.end()) fail("{}: no '{}' in __metadata__", file.string(), field);
  const std::string& text = it->second;
  int64_t value = 0;
  auto [stop, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error == std::errc::result_out_of_range)
    fail("{}: metadata '{}' = \"{}\" does not fit in 64 bits", file.string(), field, text);
  if (error != std::errc{} || stop != text.data() + text.size() || text.empty())
    fail("{}: metadata '{}' = \"{}\" is not an integer", file.string(), field, text);
  if (value < min || value > max) {
    if (max == std::numeric_limits<int64_t>::max())
      fail("{}: metadata '{}' = {} must be >= {}", file.string(), field, value, min);
    fail("{}: metadata '{}' = {} is out of range [{}, {}]", file.string(), field, value, min, max);
  }
  return value;
}

TrainingState read_training_state(const nn::Metadata& metadata, const fs::path& file) {
  TrainingState state;
  state.step = metadata_int(metadata, file, "step", 0);
  state.optimizer_steps = metadata_int(metadata, file, "optimizer_steps", 0, state.step);
  state.tokens_seen = metadata_int(metadata, file, "tokens_seen", 0);
  auto loader = metadata.find("loader");
  if (loader == metadata.end()) fail("{}: no 'loader' in __metadata__", file.string());
  json loader_json = json::parse(loader->second, nullptr, /*allow_exceptions=*/false);
  if (loader_json.is_discarded()) fail("{}: metadata 'loader' is not valid JSON", file.string());
  try {
    state.loader = loader_json.get<data::LoaderState>();
  } catch (const std::exception& e) {
    fail("{}: metadata 'loader': {}", file.string(), e.what());
  }
  return state;
}

void check_finite(const std::vector<nn::NamedTensor>& tensors, const std::string& where) {
  for (const nn::NamedTensor& t : tensors)
    if (auto bad = nn::first_non_finite(t.tensor))
      fail("{}: tensor '{}' {} holds {} at element {} (the run had diverged)", where, t.name, t.tensor.str(),
           bad->second, bad->first);
}

ResumePoint find_checkpoint(const fs::path& resume) {
  if (fs::exists(resume / kModelFile)) return {resume, ""};
  const fs::path folder = fs::is_directory(resume / kCheckpointsFolder) ? resume / kCheckpointsFolder : resume;
  fs::path best;
  int64_t best_step = -1;
  std::vector<std::string> skipped;
  if (fs::is_directory(folder))
    for (const fs::directory_entry& entry : fs::directory_iterator(folder)) {
      const std::string name = entry.path().filename().string();
      if (!entry.is_directory() || name.starts_with(".tmp-")) continue;
      const char* missing = !fs::exists(entry.path() / kModelFile)   ? kModelFile
                            : !fs::exists(entry.path() / kStateFile) ? kStateFile
                                                                     : nullptr;
      if (missing) {
        skipped.push_back(fmt::format("{} (no {})", name, missing));
        continue;
      }
      const fs::path state = entry.path() / kStateFile;
      int64_t step = 0;
      try {
        step = metadata_int(nn::read_safetensors_metadata(state), state, "step", 0);
      } catch (const std::exception& e) {
        skipped.push_back(fmt::format("{} ({})", name, e.what()));
        continue;
      }
      if (step > best_step || (step == best_step && entry.path() > best)) best = entry.path(), best_step = step;
    }
  std::string skipped_list;
  for (const std::string& s : skipped) skipped_list += (skipped_list.empty() ? "" : ", ") + s;
  if (best.empty())
    fail("train.resume: {}: missing {}, and no complete checkpoint in {}{}", resume.string(), kModelFile,
         folder.string(), skipped.empty() ? "" : "; incomplete: " + skipped_list);
  return {best, fmt::format("resume: {} (step {}), the newest complete checkpoint in {}{}", best.string(), best_step,
                            folder.string(), skipped.empty() ? "" : "; skipped " + skipped_list)};
}

std::vector<fs::path> remove_stale_temporaries(const fs::path& out_dir) {
  // The folders this trainer writes into; nothing else of out_dir is touched.
  std::vector<fs::path> folders = {out_dir, out_dir / "data", out_dir / kCheckpointsFolder};
  if (fs::is_directory(out_dir / kCheckpointsFolder))
    for (const fs::directory_entry& entry : fs::directory_iterator(out_dir / kCheckpointsFolder))
      if (entry.is_directory() && !data::is_stale_temporary(entry.path())) folders.push_back(entry.path());
  std::vector<fs::path> removed;
  for (const fs::path& folder : folders) {
    if (!fs::is_directory(folder)) continue;
    for (const fs::directory_entry& entry : fs::directory_iterator(folder))
      if (data::is_stale_temporary(entry.path())) removed.push_back(entry.path());
  }
  for (const fs::path& path : removed) fs::remove_all(path);
  return removed;
}

}  // namespace moelab::apps
