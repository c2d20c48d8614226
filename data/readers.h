// Corpus readers: JSONL (one document per line) and a folder of text files per domain. Both return documents in file
// order, so everything downstream is deterministic.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "data/document.h"

namespace moelab::data {

struct JsonlOptions {
  std::string text_key = "text";
  // A top-level key or a dotted path into nested objects, e.g. "meta.pile_set_name" for Pile-style files.
  // A literal top-level key that contains dots wins over the path.
  std::string domain_key = "domain";
  // When non-empty: the allowed domains. A document of another domain is an error (file:line) ...
  std::vector<std::string> domains{};
  bool skip_unknown_domains = false;  // ... or is skipped when this is set.
};

// One document per non-blank line: {"text": "...", "domain": "...", ...}; other keys are ignored.
// Throws with file:line on invalid JSON, a missing/non-string text or domain key, or an unknown domain; throws when
// the file holds no documents.
std::vector<Document> read_jsonl(const std::filesystem::path& file, const JsonlOptions& options = {});

struct TextFolderOptions {
  std::string extension = ".txt";
  std::vector<std::string> domains{};  // when non-empty: the allowed domain folders (others: error, or skipped)
  bool skip_unknown_domains = false;
};

// root/<domain>/*.txt: one document per file, the folder name is the domain. Domains and files in sorted (byte)
// order. Bytes are kept as they are (no UTF-8 check). Throws when the root is missing or holds no documents.
std::vector<Document> read_text_folder(const std::filesystem::path& root, const TextFolderOptions& options = {});

}  // namespace moelab::data
