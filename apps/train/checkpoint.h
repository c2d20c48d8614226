#pragma once
// A checkpoint is a folder:
//   model.safetensors  the parameters under the names of docs/model.md; __metadata__: "config" (model JSON), "train_config",
//                      "step" — loadable on its own by PyTorch / the twin
//   state.safetensors  the training state: AdamW moments ("m.<param>", "v.<param>"); __metadata__: "step",
//                      "optimizer_steps", "loader" (data position), "tokens_seen"
// Each file is written atomically; resuming from it continues bit-exactly.
#include <filesystem>
#include <string>

#include "nn/config.h"
#include "nn/safetensors.h"

namespace moelab::apps {

inline constexpr const char* kModelFile = "model.safetensors";
inline constexpr const char* kStateFile = "state.safetensors";

// The model config stored in a checkpoint's model.safetensors (errors name the file when it is missing or invalid).
nn::ModelConfig checkpoint_model_config(const std::filesystem::path& checkpoint_dir);

}  // namespace moelab::apps
