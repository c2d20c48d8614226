#include "data/synthetic.h"

#include <array>
#include <stdexcept>

#include <fmt/format.h>

#include "data/rng.h"

namespace moelab::data {
namespace {

template <size_t N>
const char* pick(SplitMix64& rng, const std::array<const char*, N>& words) {
  return words[rng.below(N)];
}

// "412,7,90318,55\n": 3-6 numeric fields.
std::string csv_line(SplitMix64& rng) {
  std::string line;
  const int fields = 3 + static_cast<int>(rng.below(4));
  for (int f = 0; f < fields; f++) {
    if (f > 0) line += ',';
    const uint64_t value = rng.below(100000), shift = rng.below(14);
    line += std::to_string(value >> shift);  // mostly short numbers, some long ones
  }
  return line + '\n';
}

// "if (n3 > 17) { total = add(n3, k); }\n" and friends, with nesting. Every draw is a named local: the order in which
// function arguments are evaluated is unspecified, and the text must not depend on the compiler.
std::string code_line(SplitMix64& rng) {
  static constexpr std::array<const char*, 8> names = {"x", "n", "k", "total", "buf", "idx", "acc", "ptr"};
  static constexpr std::array<const char*, 5> funcs = {"add", "load", "step", "max", "scan"};
  const std::string name = pick(rng, names);
  const std::string a = name + std::to_string(rng.below(10));
  const std::string b = pick(rng, names);
  const std::string f = pick(rng, funcs);
  const std::string indent(2 * rng.below(4), ' ');
  const uint64_t n = rng.below(100), m = rng.below(9);
  switch (rng.below(4)) {
    case 0: return fmt::format("{}if ({} > {}) {{ {} = {}({}, {}); }}\n", indent, a, n, b, f, a, b);
    case 1: return fmt::format("{}for (int i = 0; i < {}; i++) {{ {}[i] += {}; }}\n", indent, n, b, a);
    case 2: return fmt::format("{}{} = {{{}, {}, {{{}}}}};\n", indent, a, n % 9, m, b);
    default: return fmt::format("{}}} else {{ return {}({}); }}\n", indent, f, a);
  }
}

// "the small cat sees a red house near the river.\n"
std::string words_line(SplitMix64& rng) {
  static constexpr std::array<const char*, 16> words = {"the", "a", "cat", "dog", "sees", "likes", "red", "small",
                                                        "house", "river", "near", "over", "runs", "green", "tree",
                                                        "and"};
  std::string line;
  const int n = 5 + static_cast<int>(rng.below(8));
  for (int i = 0; i < n; i++) line += std::string(i ? " " : "") + pick(rng, words);
  return line + ".\n";
}

// "THE KING SHALL SEND HIS ARMY, AND THE PEOPLE SHALL WAIT!\n"
std::string shout_line(SplitMix64& rng) {
  static constexpr std::array<const char*, 12> words = {"THE", "KING", "SHALL", "SEND", "HIS", "ARMY", "PEOPLE",
                                                        "WAIT", "NORTH", "GATE", "NEVER", "FALL"};
  std::string line;
  const int clauses = 1 + static_cast<int>(rng.below(3));
  for (int c = 0; c < clauses; c++) {
    if (c > 0) line += ", AND ";
    const int n = 3 + static_cast<int>(rng.below(4));
    for (int i = 0; i < n; i++) line += std::string(i ? " " : "") + pick(rng, words);
  }
  return line + (rng.below(2) ? "!\n" : ".\n");
}

// "мир дом книга вода река.\n"
std::string cyrillic_line(SplitMix64& rng) {
  static constexpr std::array<const char*, 12> words = {"мир", "дом", "книга", "вода", "река", "город", "лес",
                                                        "снег", "окно", "друг", "время", "дорога"};
  std::string line;
  const int n = 4 + static_cast<int>(rng.below(6));
  for (int i = 0; i < n; i++) line += std::string(i ? " " : "") + pick(rng, words);
  return line + ".\n";
}

}  // namespace

const std::vector<std::string>& synthetic_domain_names() {
  static const std::vector<std::string> names = {"csv", "code", "words", "shout", "cyrillic"};
  return names;
}

std::vector<Document> make_synthetic_corpus(uint64_t seed, int docs_per_domain, int num_domains, int doc_bytes) {
  using LineFn = std::string (*)(SplitMix64&);
  static constexpr std::array<LineFn, 5> line_fns = {csv_line, code_line, words_line, shout_line, cyrillic_line};
  if (num_domains < 1 || num_domains > static_cast<int>(line_fns.size()))
    throw std::invalid_argument(fmt::format("make_synthetic_corpus: num_domains should be 1..{}, got {}",
                                            line_fns.size(), num_domains));
  if (docs_per_domain < 0 || doc_bytes < 1)
    throw std::invalid_argument(fmt::format("make_synthetic_corpus: need docs_per_domain >= 0 and doc_bytes >= 1, got "
                                            "{} and {}", docs_per_domain, doc_bytes));
  std::vector<Document> docs;
  for (int i = 0; i < docs_per_domain; i++) {
    for (int d = 0; d < num_domains; d++) {
      // One stream per document: adding domains or documents does not change the existing ones.
      SplitMix64 rng(derive_seed(seed, d, i));
      Document doc{"", synthetic_domain_names()[d]};
      while (static_cast<int>(doc.text.size()) < doc_bytes) doc.text += line_fns[d](rng);
      docs.push_back(std::move(doc));
    }
  }
  return docs;
}

}  // namespace moelab::data
