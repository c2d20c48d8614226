#include "data/pipeline.h"

#include <optional>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/excerpt.h"
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

// The manifest's sequences per domain: D counts >= 0.
std::vector<int64_t> manifest_counts(const json& manifest, const char* key, size_t num_domains) {
  const json& counts = manifest.contains(key) ? manifest.at(key) : json();
  bool ok = counts.is_array() && counts.size() == num_domains;
  for (size_t d = 0; ok && d < num_domains; d++) ok = counts[d].is_number_unsigned();
  if (!ok) throw std::runtime_error(fmt::format("'{}' is not a list of {} counts", key, num_domains));
  return counts.get<std::vector<int64_t>>();
}

// The manifest's domains: a list of distinct, non-empty names.
Domains manifest_domains(const json& manifest) {
  const json& names = manifest.contains("domains") ? manifest.at("domains") : json();
  bool ok = names.is_array() && !names.empty();
  for (size_t d = 0; ok && d < names.size(); d++) ok = names[d].is_string();
  if (!ok) throw std::runtime_error("'domains' is not a list of names");
  try {
    return Domains(names.get<std::vector<std::string>>());
  } catch (const std::invalid_argument&) {
    throw std::runtime_error("'domains' holds an empty or a repeated name");
  }
}

// A cached shard's header must describe what this run asks for and what the manifest recorded.
void check_cached_header(const fs::path& file, const ShardHeader& h, const Tokenizer& tokenizer, int seq_len,
                         const Domains& domains, const std::vector<int64_t>& counts) {
  const auto stale = [&](std::string_view what, const auto& have, const auto& want) {
    throw std::runtime_error(fmt::format("shard '{}': {} {}, but the run needs {}", file.string(), what, have, want));
  };
  if (h.tokenizer != tokenizer.name()) stale("was written by tokenizer", excerpt(h.tokenizer), tokenizer.name());
  if (h.vocab_size != tokenizer.vocab_size()) stale("has vocab_size", h.vocab_size, tokenizer.vocab_size());
  if (h.seq_len != seq_len) stale("has seq_len", h.seq_len, seq_len);
  if (h.domains != domains)
    throw std::runtime_error(fmt::format("shard '{}': domains '{}' differ from the manifest's '{}'", file.string(),
                                         excerpt(h.domains.joined()), excerpt(domains.joined())));
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  if (total != h.num_sequences)
    throw std::runtime_error(
        fmt::format("shard '{}': {} sequences, but the manifest counts {}", file.string(), h.num_sequences, total));
}

// The shards cached in out_dir when its manifest records `inputs` and their headers fit the manifest and the run.
// nullopt otherwise; `problem` says what did not fit when the inputs are the same (a corrupt or stale cache).
std::optional<ShardBuildResult> cached_build(const ShardBuildResult& paths, const json& inputs,
                                             const ShardBuildOptions& options, const Tokenizer& tokenizer,
                                             std::string& problem) {
  ShardBuildResult result = paths;
  try {
    const json manifest = json::parse(read_file(paths.manifest), nullptr, /*allow_exceptions=*/false);
    if (manifest.is_discarded()) throw std::runtime_error("not valid JSON");
    if (!manifest.is_object() || manifest.value("inputs", json()) != inputs) return std::nullopt;  // other inputs
    result.domains = manifest_domains(manifest);
    const size_t D = result.domains.names().size();
    result.train_sequences_per_domain = manifest_counts(manifest, "train_sequences_per_domain", D);
    result.validation_sequences_per_domain = manifest_counts(manifest, "validation_sequences_per_domain", D);
  } catch (const std::exception& e) {
    problem = fmt::format("manifest '{}': {}", paths.manifest.string(), e.what());
    return std::nullopt;
  }
  try {
    check_cached_header(result.train_shard, read_shard_header(result.train_shard), tokenizer, options.seq_len,
                        result.domains, result.train_sequences_per_domain);
    check_cached_header(result.validation_shard, read_shard_header(result.validation_shard), tokenizer, options.seq_len,
                        result.domains, result.validation_sequences_per_domain);
  } catch (const std::exception& e) {
    problem = e.what();
    return std::nullopt;
  }
  result.up_to_date = true;
  return result;
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
  if (options.skip_if_up_to_date && fs::exists(result.manifest)) {
    if (std::optional<ShardBuildResult> cached = cached_build(result, inputs, options, tokenizer, result.cache_problem))
      return *cached;
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

BuiltShards build_and_read_shards(const ShardBuildOptions& options, const Tokenizer& tokenizer) {
  BuiltShards out{build_shards(options, tokenizer)};
  try {
    out.train = read_shard(out.build.train_shard);
    out.validation = read_shard(out.build.validation_shard);
    return out;
  } catch (const std::exception& e) {
    if (!out.build.up_to_date) throw;  // written just now: rebuilding would not help
    const std::string problem = e.what();
    ShardBuildOptions rebuild = options;
    rebuild.skip_if_up_to_date = false;
    try {
      out.build = build_shards(rebuild, tokenizer);
      out.train = read_shard(out.build.train_shard);
      out.validation = read_shard(out.build.validation_shard);
    } catch (const std::exception& again) {
      throw std::runtime_error(fmt::format("cached {} and rebuilding failed: {}", problem, again.what()));
    }
    out.build.cache_problem = problem;
    return out;
  }
}

}  // namespace moelab::data
