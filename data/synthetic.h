// Synthetic domain-labelled text for tests: domains with very different statistics (character sets, line shapes),
// so any working router or classifier can tell them apart. No files, no licenses; the same seed gives the same text.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/document.h"

namespace moelab::data {

// The domains in generation order: "csv" (digits and commas), "code" (brace-heavy lines), "words" (lower-case words
// from a small list), "shout" (upper-case clauses), "cyrillic" (Russian words, 2-byte UTF-8).
const std::vector<std::string>& synthetic_domain_names();

// docs_per_domain documents for each of the first num_domains domains (1..5), interleaved (doc 0 of every domain,
// then doc 1, ...). Each document is whole lines: at least doc_bytes bytes, at most one line more.
std::vector<Document> make_synthetic_corpus(uint64_t seed, int docs_per_domain, int num_domains = 5,
                                            int doc_bytes = 512);

}  // namespace moelab::data
