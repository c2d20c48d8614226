// Corpus JSONL (train + validation files) + tokenizer + seq_len -> train and validation shards in one folder.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "data/readers.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moelab::data {

struct ShardBuildOptions {
  std::filesystem::path train_jsonl{};       // e.g. <corpus>/train.jsonl (scripts/build_corpus.py)
  std::filesystem::path validation_jsonl{};  // e.g. <corpus>/val.jsonl; empty: hold out every k-th train
  int holdout_every = 20;                    // sequence (k) instead
  JsonlOptions jsonl{};                      // keys and allowed domains; the domain ids are jsonl.domains in that
                                             // order, or the sorted domains of the train file when it is empty
  int seq_len = 64;
  std::filesystem::path out_dir{};
  std::string train_name = "train.bin";
  std::string validation_name = "validation.bin";
  bool skip_if_up_to_date = true;            // a manifest records the inputs; same inputs -> nothing rebuilt
};

struct ShardBuildResult {
  std::filesystem::path train_shard{}, validation_shard{}, manifest{};
  Domains domains{};
  std::vector<int64_t> train_sequences_per_domain{}, validation_sequences_per_domain{};  // [D]
  bool up_to_date = false;  // true: the shards were already built from the same inputs
  // Why shards cached from the same inputs were not reused (a corrupt or stale file), as one line; "" otherwise.
  std::string cache_problem{};
};

// Writes <out_dir>/<train_name>, <out_dir>/<validation_name> and <out_dir>/<train_name>.manifest.json (inputs: file
// paths, sizes and modification times, tokenizer name, seq_len, keys, domains; outputs: domains and sequences per
// domain). Shards of the same inputs are reused only when their headers (checksums included) agree with the manifest
// and with the run: tokenizer name, vocabulary size, seq_len, domains and sequence counts; otherwise they are rebuilt
// and cache_problem says why. Throws on any reader error, on a validation domain missing from the train domains
// (file:line), and when the train shard would be empty (documents shorter than seq_len + 1 tokens in every domain).
ShardBuildResult build_shards(const ShardBuildOptions& options, const Tokenizer& tokenizer);

struct BuiltShards {
  ShardBuildResult build{};
  Shard train{}, validation{};
};

// build_shards, then read_shard of both. Cached shards that fail a check of the whole file (a token id, the body's
// checksum) are rebuilt once, with build.cache_problem saying why; a failed rebuild throws, naming both problems.
BuiltShards build_and_read_shards(const ShardBuildOptions& options, const Tokenizer& tokenizer);

}  // namespace moelab::data
