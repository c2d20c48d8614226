// Small file helpers shared by the readers, the tokenizer, the shards and the checkpoints.
#pragma once

#include <filesystem>
#include <functional>
#include <ostream>
#include <string>

namespace moelab::data {

// `path` with a leading "~/" replaced by $HOME (as a shell would): config files name corpora under the home folder
// (the demo's ~/.cache/moelab/corpus-demo). Anything else, or no $HOME, is returned as is.
std::filesystem::path expand_home(const std::string& path);

// The whole file as bytes; throws naming the file when it cannot be read.
std::string read_file(const std::filesystem::path& file);

// Writes through a temporary file in the same folder ("<file>.tmp-<pid>"), then renames it over `file`: readers never
// see a half-written file, even when the process dies mid-write. `write` fills the stream; stream errors (disk full)
// throw.
void write_file_atomic(const std::filesystem::path& file, const std::function<void(std::ostream&)>& write);

// ".tmp-<name>-<pid>" beside `folder`: where a folder is filled before replace_folder moves it into place.
std::filesystem::path temporary_folder(const std::filesystem::path& folder);

// Moves the folder `from` to `to` in one rename, so `to` is either absent, the old folder or the complete new one. An
// existing `to` is swapped out atomically (renameat2 RENAME_EXCHANGE; on file systems without it, moved aside first)
// and then removed.
void replace_folder(const std::filesystem::path& from, const std::filesystem::path& to);

// Whether `path` is a temporary of write_file_atomic or temporary_folder (".tmp-" in its name, "-<pid>" at its end)
// whose process is gone. A temporary of this process's own pid counts as stale too (a restarted container reuses
// pids), so call it before this process writes any.
bool is_stale_temporary(const std::filesystem::path& path);

}  // namespace moelab::data
