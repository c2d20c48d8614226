#include "data/tokenizer.h"

#include <stdexcept>

#include <fmt/format.h>

namespace moelab::data {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); i++) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids) const {
  std::string text(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); i++) {
    if (ids[i] < 0 || ids[i] > 255)
      throw std::invalid_argument(
          fmt::format("ByteTokenizer::decode: token id {} at position {} is not a byte (expected 0..255)", ids[i], i));
    text[i] = static_cast<char>(ids[i]);
  }
  return text;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  return load_sentencepiece(spec);
}

}  // namespace moelab::data
