#include "data/sentencepiece_tokenizer.h"

#include <stdexcept>

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "data/file_io.h"

// Exported by libsentencepiece but not declared in its public headers; the only way to quiet the training log.
namespace sentencepiece::logging {
int GetMinLogLevel();
void SetMinLogLevel(int v);
}  // namespace sentencepiece::logging

namespace moelab::data {
namespace {

// Feeds our sentences to the trainer without a temporary file.
class VectorSentenceIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit VectorSentenceIterator(const std::vector<std::string>& sentences) : sentences_(sentences) {}
  bool done() const override { return i_ >= sentences_.size(); }
  void Next() override { i_++; }
  const std::string& value() const override { return sentences_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& sentences_;
  size_t i_ = 0;
};

// FNV-1a, to tell models apart by name.
uint32_t fnv1a32(const std::string& bytes) {
  uint32_t h = 2166136261u;
  for (unsigned char c : bytes) h = (h ^ c) * 16777619u;
  return h;
}

bool is_utf8_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

}  // namespace

std::vector<std::string> balanced_training_sentences(const std::vector<Document>& docs,
                                                     int64_t sample_bytes_per_domain, int max_sentence_bytes) {
  if (max_sentence_bytes < 8)
    throw std::invalid_argument(fmt::format("max_sentence_bytes should be >= 8, got {}", max_sentence_bytes));
  const Domains domains = Domains::from_documents(docs);
  std::vector<std::string> sentences;
  for (const std::string& domain : domains.names()) {
    int64_t taken_bytes = 0;
    for (const Document& doc : docs) {
      if (doc.domain != domain) continue;
      size_t start = 0;
      while (start < doc.text.size() && taken_bytes < sample_bytes_per_domain) {
        size_t end = doc.text.find('\n', start);
        if (end == std::string::npos) end = doc.text.size();
        // Cut long lines into pieces of at most max_sentence_bytes, never inside a UTF-8 character.
        size_t piece = start;
        while (piece < end) {
          size_t piece_end = std::min(end, piece + static_cast<size_t>(max_sentence_bytes));
          while (piece_end < end && piece_end > piece + 1 && is_utf8_continuation(doc.text[piece_end])) piece_end--;
          sentences.emplace_back(doc.text, piece, piece_end - piece);
          taken_bytes += static_cast<int64_t>(piece_end - piece);
          piece = piece_end;
        }
        start = end + 1;
      }
      if (taken_bytes >= sample_bytes_per_domain) break;
    }
  }
  return sentences;
}

SentencePieceTokenizer SentencePieceTokenizer::train(const std::vector<Document>& docs,
                                                     const std::filesystem::path& model_file,
                                                     const SentencePieceOptions& options) {
  if (docs.empty()) throw std::invalid_argument("SentencePieceTokenizer::train: empty corpus (no documents)");
  const std::vector<std::string> sentences =
      balanced_training_sentences(docs, options.sample_bytes_per_domain, options.max_sentence_bytes);
  if (sentences.empty()) throw std::invalid_argument("SentencePieceTokenizer::train: the documents hold no text");

  const std::unordered_map<std::string, std::string> spec = {
      {"model_type", options.model_type},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"character_coverage", fmt::format("{}", options.character_coverage)},
      {"byte_fallback", "true"},
      // Exactness: decode(encode(x)) == x for any UTF-8 x.
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},  // runs of spaces (code indentation) become pieces
      // Determinism: every sentence, in our order.
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"num_threads", std::to_string(options.num_threads)},
      {"max_sentence_length", std::to_string(options.max_sentence_bytes)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
  };
  sentencepiece::SetRandomGeneratorSeed(options.seed);
  const int old_log_level = sentencepiece::logging::GetMinLogLevel();
  if (options.quiet) sentencepiece::logging::SetMinLogLevel(2);  // errors only
  VectorSentenceIterator it(sentences);
  std::string model_bytes;
  const auto status = sentencepiece::SentencePieceTrainer::Train(spec, &it, &model_bytes);
  sentencepiece::logging::SetMinLogLevel(old_log_level);
  if (!status.ok())
    throw std::runtime_error(fmt::format("SentencePiece training ({} {}, {} sentences) failed: {}", options.model_type,
                                         options.vocab_size, sentences.size(), status.ToString()));
  write_file_atomic(model_file, [&](std::ostream& out) { out.write(model_bytes.data(), std::ssize(model_bytes)); });
  return SentencePieceTokenizer(std::move(model_bytes), model_file.string());
}

SentencePieceTokenizer SentencePieceTokenizer::load(const std::filesystem::path& model_file) {
  return SentencePieceTokenizer(read_file(model_file), model_file.string());
}

SentencePieceTokenizer::SentencePieceTokenizer(std::string model_bytes, const std::string& origin)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()), model_bytes_(std::move(model_bytes)) {
  const auto status = sp_->LoadFromSerializedProto(model_bytes_);
  if (!status.ok())
    throw std::runtime_error(fmt::format("'{}' is not a SentencePiece model: {}", origin, status.ToString()));
  if (sp_->eos_id() < 0) throw std::runtime_error(fmt::format("SentencePiece model '{}' has no EOS piece", origin));
  name_ = fmt::format("spm-{}-{:08x}", sp_->GetPieceSize(), fnv1a32(model_bytes_));
}

SentencePieceTokenizer::SentencePieceTokenizer(SentencePieceTokenizer&&) noexcept = default;
SentencePieceTokenizer& SentencePieceTokenizer::operator=(SentencePieceTokenizer&&) noexcept = default;
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw std::runtime_error(fmt::format("SentencePiece encode failed: {}", status.ToString()));
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string SentencePieceTokenizer::decode(std::span<const int32_t> ids) const {
  const int vocab = vocab_size();
  for (size_t i = 0; i < ids.size(); i++)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw std::invalid_argument(fmt::format("SentencePieceTokenizer::decode: token id {} at position {} is out of "
                                              "range (expected 0..{})", ids[i], i, vocab - 1));
  std::string text;
  const auto status = sp_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  if (!status.ok()) throw std::runtime_error(fmt::format("SentencePiece decode failed: {}", status.ToString()));
  return text;
}

int SentencePieceTokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int32_t SentencePieceTokenizer::eos_id() const { return sp_->eos_id(); }

bool sentencepiece_available() { return true; }

std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& model_file) {
  return std::make_unique<SentencePieceTokenizer>(SentencePieceTokenizer::load(model_file));
}

std::unique_ptr<Tokenizer> train_sentencepiece(const std::vector<Document>& docs,
                                               const std::filesystem::path& model_file,
                                               const SentencePieceOptions& options) {
  return std::make_unique<SentencePieceTokenizer>(SentencePieceTokenizer::train(docs, model_file, options));
}

}  // namespace moelab::data
