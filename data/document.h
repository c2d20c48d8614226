// A domain-labelled document and the registry of domain names <-> ids.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moelab::data {

struct Document {
  std::string text{};    // raw bytes (UTF-8 from JSONL; any bytes from text files)
  std::string domain{};  // e.g. "code_c"
};

// The ordered domain names; a domain's id is its index. Stored in every shard header, so an id means the same domain
// in the train shard, the validation shard and the trainer's per-domain losses.
class Domains {
 public:
  Domains() = default;
  explicit Domains(std::vector<std::string> names);  // names must be non-empty and unique

  // The sorted distinct domains of `docs`: independent of document order, so train and validation agree.
  static Domains from_documents(const std::vector<Document>& docs);

  int size() const { return static_cast<int>(names_.size()); }
  bool empty() const { return names_.empty(); }
  const std::vector<std::string>& names() const { return names_; }
  const std::string& name(int id) const;    // throws when id is out of range
  int find(std::string_view name) const;    // -1 when unknown
  int id(std::string_view name) const;      // throws "unknown domain 'x' (known: a, b, c)"
  bool contains(std::string_view name) const { return find(name) >= 0; }
  std::string joined() const;               // "a, b, c" for messages

  bool operator==(const Domains&) const = default;

 private:
  std::vector<std::string> names_;
};

}  // namespace moelab::data
