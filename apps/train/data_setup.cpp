#include "apps/train/data_setup.h"

#include <fmt/format.h>

#include <filesystem>
#include <stdexcept>

#include "data/file_io.h"
#include "data/rng.h"

namespace moelab::apps {

namespace fs = std::filesystem;

static std::unique_ptr<data::Tokenizer> make_tokenizer(const TrainConfig& c, const std::vector<data::Document>& docs) {
  if (c.data.tokenizer == "byte") return std::make_unique<data::ByteTokenizer>();
  if (c.data.tokenizer == "bpe") {
    data::SentencePieceOptions options;
    options.vocab_size = static_cast<int>(c.data.bpe_vocab);
    fs::path model_file = fs::path(c.out_dir) / "data" / fmt::format("bpe-{}.model", c.data.bpe_vocab);
    if (!fs::exists(model_file)) return data::train_sentencepiece(docs, model_file, options);
    // A cached tokenizer must load and have the asked vocabulary; training is deterministic, so a new one is the same.
    std::string problem;
    try {
      std::unique_ptr<data::Tokenizer> cached = data::load_sentencepiece(model_file);
      if (cached->vocab_size() == options.vocab_size) return cached;
      problem =
          fmt::format("its vocabulary has {} tokens, data.bpe_vocab is {}", cached->vocab_size(), options.vocab_size);
    } catch (const std::exception& e) {
      problem = e.what();
    }
    fmt::print(stderr, "note: retraining the cached tokenizer {}: {}\n", model_file.string(), problem);
    return data::train_sentencepiece(docs, model_file, options);
  }
  return data::load_tokenizer(c.data.tokenizer);
}

// The training split with the labels data.labels asks for (the random-label controls; the shards on disk keep the
// true ones, and so does the validation split).
static std::shared_ptr<const data::Shard> training_split(data::Shard shard, const TrainConfig& c) {
  constexpr uint64_t kLabelStream = 0x1abe15;  // the labels' own seed stream, apart from the model's and the order's
  data::relabel_domains(shard, c.data.labels, data::derive_seed(c.seed, kLabelStream));
  return std::make_shared<const data::Shard>(std::move(shard));
}

TrainingData prepare_data(const TrainConfig& c) {
  TrainingData out;
  const int seq_len = static_cast<int>(c.model.seq_len);
  fs::path data_dir = fs::path(c.out_dir) / "data";
  fs::create_directories(data_dir);
  if (c.data.corpus == "synthetic") {
    std::vector<data::Document> docs = data::make_synthetic_corpus(
        c.seed, static_cast<int>(c.data.synthetic_docs), static_cast<int>(c.data.synthetic_domains));
    out.tokenizer = make_tokenizer(c, docs);
    out.domains = data::Domains::from_documents(docs);
    data::Shard all = data::pack_documents(docs, *out.tokenizer, out.domains, seq_len);
    data::Split split = data::split_every_kth(all.size(), 10);
    out.train = training_split(data::select_sequences(all, split.train), c);
    out.validation = std::make_shared<data::Shard>(data::select_sequences(all, split.validation));
    return out;
  }
  const fs::path corpus = data::expand_home(c.data.corpus);
  data::ShardBuildOptions options;
  options.jsonl.text_key = c.data.text_key;
  options.jsonl.domain_key = c.data.domain_key;
  options.seq_len = seq_len;
  options.out_dir = data_dir;
  if (fs::is_directory(corpus)) {
    options.train_jsonl = corpus / "train.jsonl";
    for (const char* name : {"val.jsonl", "validation.jsonl"})  // the corpus builder writes val.jsonl
      if (fs::exists(corpus / name)) options.validation_jsonl = corpus / name;
  } else {
    options.train_jsonl = corpus;
  }
  if (!fs::exists(options.train_jsonl))
    throw std::runtime_error(fmt::format("data.corpus: no corpus at {} (expected a folder with train.jsonl, a .jsonl "
                                         "file, or 'synthetic')", options.train_jsonl.string()));
  std::vector<data::Document> docs;
  if (c.data.tokenizer == "bpe") docs = data::read_jsonl(options.train_jsonl, options.jsonl);
  out.tokenizer = make_tokenizer(c, docs);
  data::BuiltShards built = data::build_and_read_shards(options, *out.tokenizer);
  if (!built.build.cache_problem.empty())
    fmt::print(stderr, "note: rebuilt the cached shards in {}: {}\n", data_dir.string(), built.build.cache_problem);
  out.domains = built.build.domains;
  out.train = training_split(std::move(built.train), c);
  out.validation = std::make_shared<data::Shard>(std::move(built.validation));
  return out;
}

void check_vocab(TrainConfig& config, const data::Tokenizer& tokenizer) {
  if (config.model.vocab_size != tokenizer.vocab_size()) {
    fmt::print("note: model.vocab_size {} -> {} (from tokenizer {})\n", config.model.vocab_size,
               tokenizer.vocab_size(), tokenizer.name());
    config.model.vocab_size = tokenizer.vocab_size();
  }
}

}  // namespace moelab::apps
