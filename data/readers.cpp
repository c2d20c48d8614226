#include "data/readers.h"

#include <algorithm>
#include <fstream>
#include <stdexcept>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "data/excerpt.h"
#include "data/file_io.h"

namespace moelab::data {
namespace {

using nlohmann::json;

// Finds `key` in `object`: the literal key first, then the dotted path a.b.c. nullptr when absent.
const json* find_key(const json& object, const std::string& key) {
  if (auto it = object.find(key); it != object.end()) return &*it;
  const json* node = &object;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    const std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!node->is_object()) return nullptr;
    auto it = node->find(part);
    if (it == node->end()) return nullptr;
    node = &*it;
    if (dot == std::string::npos) return node;
    start = dot + 1;
  }
}

const std::string& string_field(const json& object, const std::string& key, const std::string& where) {
  const json* value = find_key(object, key);
  if (value == nullptr) throw std::runtime_error(fmt::format("{}: missing key '{}'", where, key));
  if (!value->is_string())
    throw std::runtime_error(fmt::format("{}: key '{}' should be a string, got {}", where, key, value->type_name()));
  return value->get_ref<const std::string&>();
}

}  // namespace

std::vector<Document> read_jsonl(const std::filesystem::path& file, const JsonlOptions& options) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(fmt::format("cannot open corpus file '{}'", file.string()));
  std::vector<Document> docs;
  std::string line;
  int64_t line_no = 0, skipped = 0;
  while (std::getline(in, line)) {
    line_no++;
    if (!line.empty() && line.back() == '\r') line.pop_back();  // CRLF files
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", file.string(), line_no);
    json object;
    try {
      object = json::parse(line);
    } catch (const json::exception& e) {
      throw std::runtime_error(fmt::format("{}: {}", where, json_error(e, line)));
    }
    if (!object.is_object())
      throw std::runtime_error(fmt::format("{}: expected a JSON object per line, got {}", where, object.type_name()));
    Document doc{string_field(object, options.text_key, where), string_field(object, options.domain_key, where)};
    if (!options.domains.empty() &&
        std::find(options.domains.begin(), options.domains.end(), doc.domain) == options.domains.end()) {
      if (options.skip_unknown_domains) {
        skipped++;
        continue;
      }
      throw std::runtime_error(fmt::format("{}: unknown domain '{}' (expected one of: {})", where, excerpt(doc.domain),
                                           excerpt(fmt::format("{}", fmt::join(options.domains, ", ")), 160)));
    }
    docs.push_back(std::move(doc));
  }
  if (in.bad()) throw std::runtime_error(fmt::format("error while reading '{}'", file.string()));
  if (docs.empty())
    throw std::runtime_error(fmt::format("{}: empty corpus: no documents in {} lines ({} skipped as unknown domains)",
                                         file.string(), line_no, skipped));
  return docs;
}

std::vector<Document> read_text_folder(const std::filesystem::path& root, const TextFolderOptions& options) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(root))
    throw std::runtime_error(fmt::format("corpus folder '{}' does not exist", root.string()));
  std::vector<fs::path> domain_dirs;
  for (const auto& entry : fs::directory_iterator(root))
    if (entry.is_directory()) domain_dirs.push_back(entry.path());
  std::sort(domain_dirs.begin(), domain_dirs.end());

  std::vector<Document> docs;
  for (const fs::path& dir : domain_dirs) {
    const std::string domain = dir.filename().string();
    if (!options.domains.empty() &&
        std::find(options.domains.begin(), options.domains.end(), domain) == options.domains.end()) {
      if (options.skip_unknown_domains) continue;
      throw std::runtime_error(fmt::format("{}: unknown domain '{}' (expected one of: {})", dir.string(), domain,
                                           fmt::join(options.domains, ", ")));
    }
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.is_regular_file() && entry.path().extension() == options.extension) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    for (const fs::path& f : files) docs.push_back({read_file(f), domain});
  }
  if (docs.empty())
    throw std::runtime_error(fmt::format("{}: empty corpus: no <domain>/*{} files", root.string(), options.extension));
  return docs;
}

}  // namespace moelab::data
