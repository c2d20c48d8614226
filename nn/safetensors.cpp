#include "nn/safetensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "engine/ops.h"
#include "data/file_io.h"

namespace moelab::nn {

using nlohmann::json;

static const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
    case DType::BF16: return "BF16";
  }
  return "?";
}

static DType parse_dtype(const std::string& s, const std::string& where) {
  if (s == "F32") return DType::F32;
  if (s == "F64") return DType::F64;
  if (s == "I32") return DType::I32;
  if (s == "BF16") return DType::BF16;
  throw std::runtime_error(fmt::format("{}: unsupported dtype '{}' (moelab reads F32, F64, I32, BF16)", where, s));
}

void save_safetensors(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
                      const Metadata& metadata) {
  json header = json::object();
  uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    if (header.contains(t.name)) throw std::invalid_argument(fmt::format("{}: tensor name '{}' given twice", path.string(), t.name));
    uint64_t bytes = t.tensor.numel() * dtype_size(t.tensor.dtype());
    header[t.name] = {{"dtype", safetensors_dtype(t.tensor.dtype())},
                      {"shape", t.tensor.shape()},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data starts 8-byte aligned
  data::write_file_atomic(path, [&](std::ostream& out) {
    uint64_t length = text.size();
    unsigned char le[8];
    for (int i = 0; i < 8; ++i) le[i] = static_cast<unsigned char>(length >> (8 * i));
    out.write(reinterpret_cast<const char*>(le), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const NamedTensor& t : tensors) {
      Tensor host = to_device(t.tensor.detach(), Device::CPU);
      out.write(static_cast<const char*>(host.raw_data()),
                static_cast<std::streamsize>(host.numel() * dtype_size(host.dtype())));
    }
  });
}

const Tensor* SafeTensors::find(const std::string& name) const {
  for (const NamedTensor& t : tensors)
    if (t.name == name) return &t.tensor;
  return nullptr;
}

SafeTensors load_safetensors(const std::filesystem::path& path) {
  std::string bytes = data::read_file(path);
  const std::string where = path.string();
  if (bytes.size() < 8) throw std::runtime_error(where + ": not a safetensors file (shorter than 8 bytes)");
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (length > bytes.size() - 8)
    throw std::runtime_error(fmt::format("{}: header length {} exceeds the file size {}", where, length, bytes.size()));
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<int64_t>(length));
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("{}: invalid JSON header: {}", where, e.what()));
  }
  const char* data = bytes.data() + 8 + length;
  uint64_t data_size = bytes.size() - 8 - length;
  SafeTensors file;
  uint64_t covered = 0;
  std::vector<std::pair<uint64_t, uint64_t>> spans;  // [begin, end) of each tensor
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      for (const auto& [key, value] : entry.items()) file.metadata[key] = value.get<std::string>();
      continue;
    }
    std::string at = fmt::format("{}: tensor '{}'", where, name);
    DType dtype = parse_dtype(entry.at("dtype").get<std::string>(), at);
    Shape shape = entry.at("shape").get<Shape>();
    for (int64_t s : shape)
      if (s < 0) throw std::runtime_error(fmt::format("{}: negative size in shape {}", at, shape_str(shape)));
    auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
    uint64_t expected = shape_numel(shape) * dtype_size(dtype);
    if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] > data_size || offsets[1] - offsets[0] != expected)
      throw std::runtime_error(fmt::format("{}: data_offsets {} do not hold {} bytes for shape {} within {} data bytes",
                                           at, json(offsets).dump(), expected, shape_str(shape), data_size));
    Tensor t = Tensor::empty(shape, dtype);
    if (expected) std::memcpy(t.raw_data(), data + offsets[0], expected);
    covered += expected;
    file.tensors.push_back({name, t});
    spans.emplace_back(offsets[0], offsets[1]);
  }
  // The tensors must tile the data exactly: sorted by offset, each starts where the previous ended.
  std::sort(spans.begin(), spans.end());
  for (size_t i = 0; i < spans.size(); ++i)
    if (spans[i].first != (i ? spans[i - 1].second : 0))
      throw std::runtime_error(fmt::format("{}: tensor data overlaps or leaves a gap at byte {}", where, spans[i].first));
  if (covered != data_size)
    throw std::runtime_error(fmt::format("{}: tensors cover {} of {} data bytes (truncated or corrupt)", where, covered,
                                         data_size));
  return file;
}

void load_parameters(const Module& module, const SafeTensors& file, const std::string& what) {
  std::vector<NamedTensor> params = module.named_parameters();
  for (NamedTensor& p : params) {
    const Tensor* t = file.find(p.name);
    if (!t) throw std::runtime_error(fmt::format("{}: missing parameter '{}' {}", what, p.name, p.tensor.str()));
    if (t->shape() != p.tensor.shape() || t->dtype() != p.tensor.dtype())
      throw std::runtime_error(fmt::format("{}: parameter '{}' is {} in the file but the model has {}", what, p.name,
                                           t->str(), p.tensor.str()));
    NoGradGuard no_grad;
    copy_(p.tensor, to_device(*t, p.tensor.device()));
  }
  for (const NamedTensor& t : file.tensors) {
    bool known = false;
    for (const NamedTensor& p : params) known = known || p.name == t.name;
    if (!known) throw std::runtime_error(fmt::format("{}: tensor '{}' is not a parameter of this model", what, t.name));
  }
}

}  // namespace moelab::nn
