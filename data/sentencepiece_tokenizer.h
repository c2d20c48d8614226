// BPE (or unigram) subword tokenizer from Debian's SentencePiece, trained from C++ on a domain-balanced sample.
// Settings make it exact and deterministic: identity normalization, no dummy prefix, no whitespace cleanup, byte
// fallback (so any UTF-8 text round-trips), all sentences used in file order (no sampling, no shuffling), one thread.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "data/document.h"
#include "data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moelab::data {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Trains on a domain-balanced sample of `docs` and writes `model_file` atomically (a standard SentencePiece .model,
  // loadable by the Python package too). Same docs + options -> byte-identical model file.
  static SentencePieceTokenizer train(const std::vector<Document>& docs, const std::filesystem::path& model_file,
                                      const SentencePieceOptions& options = {});
  static SentencePieceTokenizer load(const std::filesystem::path& model_file);

  SentencePieceTokenizer(SentencePieceTokenizer&&) noexcept;
  SentencePieceTokenizer& operator=(SentencePieceTokenizer&&) noexcept;
  ~SentencePieceTokenizer() override;

  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int vocab_size() const override;
  std::string name() const override { return name_; }
  std::vector<int32_t> document_separator() const override { return {eos_id()}; }  // the EOS piece </s>
  int32_t eos_id() const;
  const std::string& model_bytes() const { return model_bytes_; }  // the serialized .model

 private:
  explicit SentencePieceTokenizer(std::string model_bytes, const std::string& origin);
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string model_bytes_;
  std::string name_;
};

// The training sentences: per domain (in Domains::from_documents order), its documents' non-empty lines in order until
// `sample_bytes_per_domain` bytes; lines longer than `max_sentence_bytes` cut at UTF-8 character boundaries.
std::vector<std::string> balanced_training_sentences(const std::vector<Document>& docs,
                                                     int64_t sample_bytes_per_domain, int max_sentence_bytes);

}  // namespace moelab::data
