// Built instead of sentencepiece_tokenizer.cpp when SentencePiece is not installed: BPE tokenizers are unavailable
// and say so (the byte tokenizer needs nothing).
#include <stdexcept>

#include "data/tokenizer.h"

namespace moelab::data {

[[noreturn]] static void missing(const std::filesystem::path& model_file) {
  throw std::runtime_error("tokenizer '" + model_file.string() +
                           "': this moelab build has no SentencePiece, so only the byte tokenizer is available "
                           "(install libsentencepiece-dev and rebuild)");
}

bool sentencepiece_available() { return false; }

std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& model_file) { missing(model_file); }

std::unique_ptr<Tokenizer> train_sentencepiece(const std::vector<Document>&, const std::filesystem::path& model_file,
                                               const SentencePieceOptions&) {
  missing(model_file);
}

}  // namespace moelab::data
