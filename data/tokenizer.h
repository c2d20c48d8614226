// Tokenizers: text <-> token ids. The data layer only needs encode, the vocabulary size and the separator put
// between documents; decode is for samples and tests.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moelab::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(std::span<const int32_t> ids) const = 0;
  virtual int vocab_size() const = 0;
  // Names the tokenizer and its vocabulary: "byte", or "spm-8192-1a2b3c4d" (size and hash of the model). Stored in
  // shard headers so a shard is never read with another tokenizer than the one that wrote it.
  virtual std::string name() const = 0;
  // Appended after every document when documents are packed into sequences (see docs/data_formats.md).
  virtual std::vector<int32_t> document_separator() const = 0;
};

// One token per byte, V = 256. Exact for any bytes, including invalid UTF-8. There is no spare id for an
// end-of-document token, so documents are separated by the bytes "\n\n" (a paragraph break, which text already uses).
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;  // throws on an id outside 0..255
  int vocab_size() const override { return 256; }
  std::string name() const override { return "byte"; }
  std::vector<int32_t> document_separator() const override { return {'\n', '\n'}; }
};

// "byte" -> ByteTokenizer; anything else is a SentencePiece .model file to load.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& spec);

}  // namespace moelab::data
