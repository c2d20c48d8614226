#pragma once
// From the [data] config to token shards and loaders: read the corpus (JSONL folder/file or the synthetic generator),
// make or load the tokenizer, pack domain-pure sequences into shards under <out_dir>/data, and split off validation.
#include <memory>

#include "apps/train/train_config.h"
#include "data/data.h"

namespace moelab::apps {

struct TrainingData {
  std::unique_ptr<data::Tokenizer> tokenizer;
  data::Domains domains;
  std::shared_ptr<const data::Shard> train, validation;
};

// Deterministic for a given config. Sets nothing in the config: the caller checks config.model.vocab_size against
// tokenizer->vocab_size() (see check_vocab).
TrainingData prepare_data(const TrainConfig& config);

// A BPE tokenizer fixes the vocabulary: when model.vocab_size differs, it is set from the tokenizer (and said).
void check_vocab(TrainConfig& config, const data::Tokenizer& tokenizer);

}  // namespace moelab::apps
