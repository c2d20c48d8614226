// Small file helpers shared by the readers, the tokenizer and the shards.
#pragma once

#include <filesystem>
#include <functional>
#include <ostream>
#include <string>

namespace moelab::data {

// The whole file as bytes; throws naming the file when it cannot be read.
std::string read_file(const std::filesystem::path& file);

// Writes through a temporary file in the same folder, then renames it over `file`: readers never see a half-written
// file, even when the process dies mid-write. `write` fills the stream; stream errors (disk full) throw.
void write_file_atomic(const std::filesystem::path& file, const std::function<void(std::ostream&)>& write);

}  // namespace moelab::data
