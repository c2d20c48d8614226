#pragma once
// safetensors files (the format PyTorch and Hugging Face tools load): an 8-byte little-endian header length, a JSON
// header {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {string: string}},
// then the raw little-endian tensor bytes. Used for model checkpoints and for the training state.
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "nn/module.h"

namespace moelab::nn {

using Metadata = std::map<std::string, std::string>;

// Writes atomically (temporary name, then rename). GPU tensors are copied to the host.
void save_safetensors(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
                      const Metadata& metadata = {});

struct SafeTensors {
  std::vector<NamedTensor> tensors;  // CPU tensors, in file order
  Metadata metadata;
  const Tensor* find(const std::string& name) const;
};

// Reads and validates a file: header bounds, dtypes (F32, F64, I32), offsets covering the data exactly.
// Errors name the file and what is wrong.
SafeTensors load_safetensors(const std::filesystem::path& path);

// Copies tensors into `module`'s parameters by name. Every parameter must be present with its exact shape, and
// every tensor in the file must be a parameter (a mismatched config fails loudly instead of half-loading).
void load_parameters(const Module& module, const SafeTensors& file, const std::string& what);

}  // namespace moelab::nn
