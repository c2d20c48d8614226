#include "data/document.h"

#include <algorithm>
#include <map>
#include <stdexcept>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "data/excerpt.h"

namespace moelab::data {

Domains::Domains(std::vector<std::string> names) : names_(std::move(names)) {
  std::map<std::string_view, size_t> ids;  // a map, not a pairwise loop: names may come from a corrupt file
  for (size_t i = 0; i < names_.size(); i++) {
    if (names_[i].empty()) throw std::invalid_argument(fmt::format("Domains: domain name {} is empty", i));
    if (auto [it, added] = ids.emplace(names_[i], i); !added)
      throw std::invalid_argument(
          fmt::format("Domains: domain '{}' is listed twice (ids {} and {})", excerpt(names_[i]), it->second, i));
  }
}

Domains Domains::from_documents(const std::vector<Document>& docs) {
  std::vector<std::string> names;
  for (const Document& doc : docs) names.push_back(doc.domain);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return Domains(std::move(names));
}

const std::string& Domains::name(int id) const {
  if (id < 0 || id >= size())
    throw std::out_of_range(fmt::format("Domains: domain id {} is out of range (expected 0..{})", id, size() - 1));
  return names_[id];
}

int Domains::find(std::string_view name) const {
  for (int i = 0; i < size(); i++)
    if (names_[i] == name) return i;
  return -1;
}

int Domains::id(std::string_view name) const {
  const int i = find(name);
  if (i < 0) throw std::invalid_argument(fmt::format("unknown domain '{}' (known: {})", name, joined()));
  return i;
}

std::string Domains::joined() const { return fmt::format("{}", fmt::join(names_, ", ")); }

}  // namespace moelab::data
