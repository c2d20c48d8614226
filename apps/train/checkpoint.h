#pragma once
// A checkpoint is a folder checkpoints/<name>/ in the run's out_dir:
//   model.safetensors  the parameters under the names of docs/model.md; __metadata__: "config" (model JSON), "train_config",
//                      "step" — loadable on its own by PyTorch / the twin
//   state.safetensors  the training state: AdamW moments ("m.<param>", "v.<param>"); __metadata__: "step",
//                      "optimizer_steps", "loader" (data position), "tokens_seen"
// Both files are written into checkpoints/.tmp-<name>-<pid>/, which one rename then makes checkpoints/<name>: a
// killed run leaves either the complete checkpoint or a temporary that the next start removes. Resuming from it
// continues bit-exactly.
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "data/loader.h"
#include "nn/config.h"
#include "nn/safetensors.h"

namespace moelab::apps {

inline constexpr const char* kModelFile = "model.safetensors";
inline constexpr const char* kStateFile = "state.safetensors";
inline constexpr const char* kCheckpointsFolder = "checkpoints";

// The model config stored in a checkpoint's model.safetensors (errors name the file when it is missing or invalid).
nn::ModelConfig checkpoint_model_config(const std::filesystem::path& checkpoint_dir);

// The metadata field `field` of `file` as a whole decimal integer in [min, max]; errors name the file, the field and
// the value ("abc", "12abc", out of range).
int64_t metadata_int(const nn::Metadata& metadata, const std::filesystem::path& file, const std::string& field,
                     int64_t min, int64_t max = std::numeric_limits<int64_t>::max());

// The numbers of a state.safetensors' __metadata__, each parsed strictly before any is used (the schedule, Adam's bias
// correction and the loader trust them): step >= 0, optimizer_steps in [0, step], tokens_seen >= 0, the loader's
// position as JSON. Errors name the file, the field and the value.
struct TrainingState {
  int64_t step = 0, optimizer_steps = 0, tokens_seen = 0;
  data::LoaderState loader;
};
TrainingState read_training_state(const nn::Metadata& metadata, const std::filesystem::path& file);

// Throws naming `where` and the tensor when a (host) tensor holds a NaN or an Inf.
void check_finite(const std::vector<nn::NamedTensor>& tensors, const std::string& where);

struct ResumePoint {
  std::filesystem::path dir;  // the checkpoint folder
  std::string choice;         // how it was chosen, for the log ("" when `resume` named the checkpoint itself)
};

// `resume` is a checkpoint folder, or a run's out_dir or its checkpoints/ folder: then the newest complete
// checkpoint (both files present, highest "step" in its state metadata) is chosen, skipping incomplete ones.
ResumePoint find_checkpoint(const std::filesystem::path& resume);

// Removes what a killed run left in `out_dir` (checkpoints/.tmp-* folders, *.tmp-<pid> files in out_dir, data/ and
// the checkpoints) and returns their paths. Call before this process writes there.
std::vector<std::filesystem::path> remove_stale_temporaries(const std::filesystem::path& out_dir);

}  // namespace moelab::apps
