#pragma once
// safetensors files (the format PyTorch and Hugging Face tools load): an 8-byte little-endian header length, a JSON
// header {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {string: string}},
// then the raw little-endian tensor bytes. Used for model checkpoints and for the training state.
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "nn/config.h"
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

// Reads and validates a file: header bounds, every header field's JSON type, dtypes (F32, F64, I32, BF16), shapes whose
// bytes fit in 63 bits and equal their data_offsets' span (checked before allocating), offsets covering the data
// exactly, string __metadata__ values. Errors name the file, the tensor and the field; quoted bytes are cut short.
SafeTensors load_safetensors(const std::filesystem::path& path);

// The __metadata__ of a file, reading only its header (cheap for large files), checked as load_safetensors checks it.
Metadata read_safetensors_metadata(const std::filesystem::path& path);

// Checks that `file` holds exactly the parameters of a TransformerLM (with MoE layers, as moe::MoEModel builds it) of
// `config`, by name and shape, from the config alone: call it before building the model, so that a corrupt config
// (100000 layers in a 1 MB file) fails at the first missing tensor instead of allocating the model. Validates the
// config too. Errors name `what` (the file), the tensor and both shapes.
void check_parameters_match(const ModelConfig& config, const SafeTensors& file, const std::string& what);

// The first NaN or Inf of a host tensor (f32, f64 or bf16) as {flat index, value}; none for i32.
std::optional<std::pair<int64_t, double>> first_non_finite(const Tensor& t);

// Copies tensors into `module`'s parameters by name. Every parameter must be present with its exact shape and dtype
// and hold only finite values, and every tensor in the file must be a parameter (a mismatched config fails loudly
// instead of half-loading). Errors name `what` and the parameter.
void load_parameters(const Module& module, const SafeTensors& file, const std::string& what);

}  // namespace moelab::nn
