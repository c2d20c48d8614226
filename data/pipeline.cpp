#include "data/pipeline.h"

#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/file_io.h"
#include "data/loader.h"
#include "data/shard.h"

namespace moelab::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json file_stamp(const fs::path& file) {
  if (file.empty()) return nullptr;
  return {{"path", fs::absolute(file).string()},
          {"bytes", fs::file_size(file)},
          {"mtime", fs::last_write_time(file).time_since_epoch().count()}};
}

}  // namespace

ShardBuildResult build_shards(const ShardBuildOptions& options, const Tokenizer& tokenizer) {
  if (options.out_dir.empty()) throw std::invalid_argument("build_shards: out_dir is empty");
  ShardBuildResult result;
  result.train_shard = options.out_dir / options.train_name;
  result.validation_shard = options.out_dir / options.validation_name;
  result.manifest = options.out_dir / (options.train_name + ".manifest.json");

  const json inputs = {{"format_version", kShardVersion},
                       {"train", file_stamp(options.train_jsonl)},
                       {"validation", file_stamp(options.validation_jsonl)},
                       {"holdout_every", options.validation_jsonl.empty() ? options.holdout_every : 0},
                       {"text_key", options.jsonl.text_key},
                       {"domain_key", options.jsonl.domain_key},
                       {"domains", options.jsonl.domains},
                       {"skip_unknown_domains", options.jsonl.skip_unknown_domains},
                       {"tokenizer", tokenizer.name()},
                       {"seq_len", options.seq_len}};
  if (options.skip_if_up_to_date && fs::exists(result.manifest) && fs::exists(result.train_shard) &&
      fs::exists(result.validation_shard)) {
    const json manifest = json::parse(read_file(result.manifest), nullptr, /*allow_exceptions=*/false);
    if (manifest.is_object() && manifest.value("inputs", json()) == inputs &&
        manifest.contains("train_sequences_per_domain") && manifest.contains("validation_sequences_per_domain")) {
      const ShardHeader header = read_shard_header(result.train_shard);  // also checks the file size
      read_shard_header(result.validation_shard);
      result.domains = header.domains;
      using Counts = std::vector<int64_t>;
      result.train_sequences_per_domain = manifest.at("train_sequences_per_domain").get<Counts>();
      result.validation_sequences_per_domain = manifest.at("validation_sequences_per_domain").get<Counts>();
      result.up_to_date = true;
      return result;
    }
  }

  const std::vector<Document> train_docs = read_jsonl(options.train_jsonl, options.jsonl);
  result.domains = options.jsonl.domains.empty() ? Domains::from_documents(train_docs) : Domains(options.jsonl.domains);
  Shard train = pack_documents(train_docs, tokenizer, result.domains, options.seq_len);
  Shard validation;
  if (!options.validation_jsonl.empty()) {
    JsonlOptions validation_options = options.jsonl;
    validation_options.domains = result.domains.names();  // ids must mean the same in both shards
    const std::vector<Document> validation_docs = read_jsonl(options.validation_jsonl, validation_options);
    validation = pack_documents(validation_docs, tokenizer, result.domains, options.seq_len);
  } else {
    const Split split = split_every_kth(train.size(), options.holdout_every);
    validation = select_sequences(train, split.validation);
    train = select_sequences(train, split.train);
  }
  if (train.size() == 0)
    throw std::runtime_error(fmt::format("build_shards: '{}' gives no train sequence of {} + 1 tokens",
                                         options.train_jsonl.string(), options.seq_len));

  write_shard(result.train_shard, train);
  write_shard(result.validation_shard, validation);
  result.train_sequences_per_domain = train.sequences_per_domain();
  result.validation_sequences_per_domain = validation.sequences_per_domain();
  const json manifest = {{"inputs", inputs},
                         {"domains", result.domains.names()},
                         {"train_sequences_per_domain", result.train_sequences_per_domain},
                         {"validation_sequences_per_domain", result.validation_sequences_per_domain}};
  write_file_atomic(result.manifest, [&](std::ostream& out) { out << manifest.dump(2) << '\n'; });
  return result;
}

}  // namespace moelab::data
