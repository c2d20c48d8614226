#include "nn/safetensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <stdexcept>

#include "data/excerpt.h"
#include "data/file_io.h"
#include "engine/ops.h"

namespace moelab::nn {

using nlohmann::json;

// A file that does not hold what it should: std::runtime_error naming the file (bad arguments use engine's fail).
template <class... Args> [[noreturn]] static void fail_read(fmt::format_string<Args...> f, Args&&... args) {
  throw std::runtime_error(fmt::format(f, std::forward<Args>(args)...));
}

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
  fail_read("{}: unsupported dtype '{}' (moelab reads F32, F64, I32, BF16)", where, data::excerpt(s));
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

namespace {

constexpr size_t kMaxDims = 8;  // moelab's tensors have at most 4; a longer shape is corruption

// One header entry.
struct Entry {
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

// Checks the entry's fields and their JSON types. Errors start with `at` (the file and the tensor).
Entry parse_entry(const json& entry, const std::string& at) {
  if (!entry.is_object())
    fail_read("{}: expected an object with dtype, shape and data_offsets, got {}", at, entry.type_name());
  for (const auto& [field, value] : entry.items())
    if (field != "dtype" && field != "shape" && field != "data_offsets")
      fail_read("{}: unknown field '{}' (expected dtype, shape, data_offsets)", at, data::excerpt(field));
  auto field = [&](const char* name) -> const json& {
    if (!entry.contains(name)) fail_read("{}: missing field '{}'", at, name);
    return entry.at(name);
  };
  const json& dtype = field("dtype");
  if (!dtype.is_string()) fail_read("{}: field 'dtype' must be a string, got {}", at, dtype.type_name());
  Entry e{parse_dtype(dtype.get<std::string>(), at), {}, 0, 0};

  const json& shape = field("shape");
  if (!shape.is_array() || shape.size() > kMaxDims)
    fail_read("{}: field 'shape' must be an array of at most {} sizes, got {}", at, kMaxDims,
              shape.is_array() ? fmt::format("{} sizes", shape.size()) : shape.type_name());
  for (const json& size : shape) {
    if (size.is_number_integer() && !size.is_number_unsigned())
      fail_read("{}: negative size in field 'shape' {}", at, shape.dump());
    if (!size.is_number_unsigned() || size.get<uint64_t>() > uint64_t(INT64_MAX))
      fail_read("{}: field 'shape' must hold integers in [0, 2^63), got {}", at, data::excerpt(size.dump()));
    e.shape.push_back(size.get<int64_t>());
  }

  const json& offsets = field("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    fail_read("{}: field 'data_offsets' must be [begin, end] with integers >= 0, got {}", at,
              data::excerpt(offsets.dump()));
  e.begin = offsets[0].get<uint64_t>();
  e.end = offsets[1].get<uint64_t>();
  return e;
}

// The header length: the file's first 8 bytes (little-endian), checked against the file's size.
uint64_t header_length(std::string_view first8, uint64_t file_size, const std::string& where) {
  if (file_size < 8 || first8.size() < 8) fail_read("{}: not a safetensors file (shorter than 8 bytes)", where);
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<uint64_t>(static_cast<unsigned char>(first8[i])) << (8 * i);
  if (length > file_size - 8) fail_read("{}: header length {} exceeds the file size {}", where, length, file_size);
  return length;
}

json parse_header(std::string_view header_text, const std::string& where) {
  json header;
  try {
    header = json::parse(header_text);
  } catch (const json::exception& e) {
    fail_read("{}: header: {}", where, data::json_error(e, header_text));
  }
  if (!header.is_object()) fail_read("{}: the header must be a JSON object, got {}", where, header.type_name());
  return header;
}

Metadata parse_metadata(const json& header, const std::string& where) {
  Metadata metadata;
  if (!header.contains("__metadata__")) return metadata;
  const json& entry = header["__metadata__"];
  if (!entry.is_object()) fail_read("{}: __metadata__ must be an object, got {}", where, entry.type_name());
  for (const auto& [key, value] : entry.items()) {
    if (!value.is_string())
      fail_read("{}: __metadata__ '{}' must be a string, got {}", where, data::excerpt(key), value.type_name());
    metadata[key] = value.get<std::string>();
  }
  return metadata;
}

}  // namespace

Metadata read_safetensors_metadata(const std::filesystem::path& path) {
  const std::string where = path.string();
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_read("cannot open '{}' for reading", where);
  std::string first8(8, '\0');
  in.read(first8.data(), 8);
  const uint64_t length =
      header_length(first8.substr(0, static_cast<size_t>(in.gcount())), std::filesystem::file_size(path), where);
  std::string header_text(length, '\0');
  if (!in.read(header_text.data(), static_cast<std::streamsize>(length)))
    fail_read("{}: cannot read the header", where);
  return parse_metadata(parse_header(header_text, where), where);
}

SafeTensors load_safetensors(const std::filesystem::path& path) {
  std::string bytes = data::read_file(path);
  const std::string where = path.string();
  const uint64_t length = header_length(std::string_view(bytes).substr(0, 8), bytes.size(), where);
  const json header = parse_header(std::string_view(bytes.data() + 8, length), where);
  const char* data = bytes.data() + 8 + length;
  const uint64_t data_size = bytes.size() - 8 - length;
  SafeTensors file;
  file.metadata = parse_metadata(header, where);
  uint64_t covered = 0;
  std::vector<std::pair<uint64_t, uint64_t>> spans;  // [begin, end) of each tensor
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string at = fmt::format("{}: tensor '{}'", where, data::excerpt(name));
    const Entry e = parse_entry(entry, at);
    int64_t expected = 0;  // checked before anything is allocated: the shape must fit the bytes the offsets give
    try {
      expected = shape_bytes(e.shape, e.dtype);
    } catch (const std::invalid_argument& error) {
      fail_read("{}: {}", at, error.what());
    }
    if (e.end < e.begin || e.end > data_size || e.end - e.begin != static_cast<uint64_t>(expected))
      fail_read("{}: data_offsets [{}, {}] do not hold {} bytes for shape {} within {} data bytes", at, e.begin, e.end,
                expected, shape_str(e.shape), data_size);
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (expected) std::memcpy(t.raw_data(), data + e.begin, static_cast<size_t>(expected));
    covered += static_cast<uint64_t>(expected);
    file.tensors.push_back({name, t});
    spans.emplace_back(e.begin, e.end);
  }
  // The tensors must tile the data exactly: sorted by offset, each starts where the previous ended.
  std::sort(spans.begin(), spans.end());
  for (size_t i = 0; i < spans.size(); ++i)
    if (spans[i].first != (i ? spans[i - 1].second : 0))
      fail_read("{}: tensor data overlaps or leaves a gap at byte {}", where, spans[i].first);
  if (covered != data_size)
    fail_read("{}: tensors cover {} of {} data bytes (truncated or corrupt)", where, covered, data_size);
  return file;
}

// ---- checking a model config against a file -------------------------------------------------------------------------

namespace {

// Every parameter of a model of `config` by checkpoint name and shape, in the model's order, from the config alone
// (docs/model.md, "Checkpoint tensor names"; TransformerLM, Block, MoELayer and the layers register these names).
// `visit` returns false to stop early.
void visit_parameter_shapes(const ModelConfig& c, const std::function<bool(const std::string&, const Shape&)>& visit) {
  const int64_t d = c.d_model, E = c.n_experts, h = c.expert_hidden, hd = c.dense_ffn_hidden();
  if (!visit("tok_emb.weight", {c.vocab_size, d})) return;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string p = fmt::format("layers.{}.", l);
    std::vector<std::pair<std::string, Shape>> layer = {{p + "attn_norm.weight", {d}},
                                                        {p + "attn.wqkv.weight", {3 * d, d}},
                                                        {p + "attn.wo.weight", {d, d}},
                                                        {p + "ffn_norm.weight", {d}}};
    if (c.is_moe_layer(l)) {
      layer.insert(layer.end(), {{p + "moe.router.weight", {E, d}},
                                 {p + "moe.experts.w_gate", {E, h, d}},
                                 {p + "moe.experts.w_up", {E, h, d}},
                                 {p + "moe.experts.w_down", {E, d, h}}});
      if (c.shared_experts > 0)
        layer.insert(layer.end(), {{p + "moe.shared.w_gate", {c.shared_experts * h, d}},
                                   {p + "moe.shared.w_up", {c.shared_experts * h, d}},
                                   {p + "moe.shared.w_down", {d, c.shared_experts * h}}});
    } else {
      layer.insert(layer.end(), {{p + "mlp.w_gate", {hd, d}}, {p + "mlp.w_up", {hd, d}}, {p + "mlp.w_down", {d, hd}}});
    }
    for (const auto& [name, shape] : layer)
      if (!visit(name, shape)) return;
  }
  if (!visit("final_norm.weight", {d})) return;
  if (!c.tie_embeddings) visit("lm_head.weight", {c.vocab_size, d});
}

}  // namespace

void check_parameters_match(const ModelConfig& config, const SafeTensors& file, const std::string& what) {
  config.validate();
  std::map<std::string, const Tensor*> present;
  for (const NamedTensor& t : file.tensors) present[t.name] = &t.tensor;
  std::set<std::string> needed;
  // Stops at the first tensor that does not fit: a config that claims 100000 layers fails at the first missing one.
  visit_parameter_shapes(config, [&](const std::string& name, const Shape& shape) {
    auto it = present.find(name);
    if (it == present.end())
      fail_read("{}: the model config needs tensor '{}' {} but the file has none of that name ({} tensors)", what, name,
                shape_str(shape), file.tensors.size());
    if (it->second->shape() != shape)
      fail_read("{}: tensor '{}' is {} in the file but the model config needs {}", what, name, it->second->str(),
                shape_str(shape));
    needed.insert(name);
    return true;
  });
  for (const NamedTensor& t : file.tensors)
    if (!needed.contains(t.name))
      fail_read("{}: tensor '{}' is not a parameter of a model with this config", what, data::excerpt(t.name));
}

std::optional<std::pair<int64_t, double>> first_non_finite(const Tensor& t) {
  auto scan = [&](const auto* values) -> std::optional<std::pair<int64_t, double>> {
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double v = static_cast<double>(values[i]);
      if (!std::isfinite(v)) return std::pair{i, v};
    }
    return std::nullopt;
  };
  switch (t.dtype()) {
    case DType::F32: return scan(t.data<float>());
    case DType::F64: return scan(t.data<double>());
    case DType::BF16: return first_non_finite(to_dtype(t, DType::F32));
    case DType::I32: return std::nullopt;
  }
  return std::nullopt;
}

void load_parameters(const Module& module, const SafeTensors& file, const std::string& what) {
  std::vector<NamedTensor> params = module.named_parameters();
  std::set<std::string> names;
  // Every check before the first copy: a file that fails leaves the module as it was.
  for (const NamedTensor& p : params) {
    const Tensor* t = file.find(p.name);
    if (!t) fail_read("{}: missing parameter '{}' {}", what, p.name, p.tensor.str());
    if (t->shape() != p.tensor.shape() || t->dtype() != p.tensor.dtype())
      fail_read("{}: parameter '{}' is {} in the file but the model has {}", what, p.name, t->str(), p.tensor.str());
    if (auto bad = first_non_finite(*t))
      fail_read("{}: parameter '{}' holds a non-finite value ({}) at element {}", what, p.name, bad->second,
                bad->first);
    names.insert(p.name);
  }
  for (const NamedTensor& t : file.tensors)
    if (!names.contains(t.name))
      fail_read("{}: tensor '{}' is not a parameter of this model", what, data::excerpt(t.name));
  NoGradGuard no_grad;
  for (NamedTensor& p : params) copy_(p.tensor, to_device(*file.find(p.name), p.tensor.device()));
}

}  // namespace moelab::nn
