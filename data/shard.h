// Pre-tokenized binary shards: fixed-length training sequences, one domain per sequence, so training never
// re-tokenizes. Byte layout in docs/data_formats.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "data/document.h"
#include "data/tokenizer.h"

namespace moelab::data {

inline constexpr char kShardMagic[8] = {'M', 'O', 'E', 'L', 'A', 'B', 'S', 'H'};
inline constexpr uint32_t kShardVersion = 2;  // 2: checksums of the header and the body

struct ShardHeader {
  int32_t vocab_size = 0;
  int32_t seq_len = 0;          // T: a row holds T+1 tokens, inputs [0, T) and next-token targets [1, T+1)
  int64_t num_sequences = 0;    // N
  std::string tokenizer{};      // Tokenizer::name() of the tokenizer that wrote it
  Domains domains{};            // domain id -> name
};

struct Shard {
  ShardHeader header{};
  std::vector<int32_t> rows{};  // [N, T+2]: per row the domain id, then T+1 tokens (the file body as is)

  int64_t size() const { return header.num_sequences; }
  int seq_len() const { return header.seq_len; }
  int64_t row_ints() const { return int64_t(header.seq_len) + 2; }
  int32_t domain(int64_t i) const { return rows[size_t(i * row_ints())]; }
  std::span<const int32_t> tokens(int64_t i) const {  // [T+1]
    return {rows.data() + i * row_ints() + 1, size_t(header.seq_len) + 1};
  }
  std::vector<int64_t> sequences_per_domain() const;  // [D]
};

// Tokenizes documents and packs them into rows of T+1 tokens. Documents of one domain are concatenated (in the given
// order), each followed by tokenizer.document_separator(); the domain's stream is cut into rows starting every T tokens
// (consecutive rows share one token, so every token after the first is a target exactly once); the tail shorter than
// T+1 tokens is dropped. A row never mixes domains. Rows are grouped by domain id. Throws on an unknown domain.
Shard pack_documents(const std::vector<Document>& docs, const Tokenizer& tokenizer, const Domains& domains,
                     int seq_len);

// The rows `ids` of `shard`, in that order (e.g. a held-out split).
Shard select_sequences(const Shard& shard, std::span<const int64_t> ids);

// Atomic (temporary file + rename). Throws when rows.size() does not match the header.
void write_shard(const std::filesystem::path& file, const Shard& shard);

// Validates magic, version, the header's fields and checksum, exact file size, domain ids and token ids
// (< vocab_size), then the body's checksum; errors name the file and, for a bad id, the sequence and byte offset.
Shard read_shard(const std::filesystem::path& file);
ShardHeader read_shard_header(const std::filesystem::path& file);  // header only (cheap): all but the body's checks

}  // namespace moelab::data
