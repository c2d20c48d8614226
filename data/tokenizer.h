// Tokenizers: text <-> token ids. The data layer only needs encode, the vocabulary size and the separator put
// between documents; decode is for samples and tests.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/document.h"

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

// BPE (or unigram) tokenizers come from SentencePiece (data/sentencepiece_tokenizer.h), an optional dependency:
// a build without it has only the byte tokenizer, and these throw saying so.
bool sentencepiece_available();
struct SentencePieceOptions {
  int vocab_size = 8192;                      // includes 3 special ids (unk 0, bos 1, eos 2) and 256 byte pieces
  std::string model_type = "bpe";             // or "unigram"
  int64_t sample_bytes_per_domain = 4 << 20;  // training sample: up to this many bytes of every domain, so large
                                              // domains do not own the vocabulary
  double character_coverage = 0.9995;         // rarer characters fall back to bytes
  int max_sentence_bytes = 4192;              // training lines longer than this are cut (SentencePiece drops them)
  uint32_t seed = 1234;
  int num_threads = 1;  // 1: identical models on any machine
  bool quiet = true;    // silence SentencePiece's training log on stderr
};
std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& model_file);
// Trains on a domain-balanced sample of `docs` and writes `model_file` (see SentencePieceTokenizer::train).
std::unique_ptr<Tokenizer> train_sentencepiece(const std::vector<Document>& docs,
                                               const std::filesystem::path& model_file,
                                               const SentencePieceOptions& options = {});

}  // namespace moelab::data
