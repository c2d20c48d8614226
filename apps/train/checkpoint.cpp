#include "apps/train/checkpoint.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

namespace moelab::apps {

nn::ModelConfig checkpoint_model_config(const std::filesystem::path& checkpoint_dir) {
  std::filesystem::path file = checkpoint_dir / kModelFile;
  if (!std::filesystem::exists(file))
    throw std::runtime_error(fmt::format("checkpoint {}: missing {}", checkpoint_dir.string(), kModelFile));
  nn::SafeTensors st = nn::load_safetensors(file);
  auto it = st.metadata.find("config");
  if (it == st.metadata.end()) throw std::runtime_error(file.string() + ": no model config in __metadata__");
  return nlohmann::json::parse(it->second).get<nn::ModelConfig>();
}

}  // namespace moelab::apps
