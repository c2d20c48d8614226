#pragma once
// Text helpers shared by the analysis files and the HTML report. Names and token pieces from runs, corpora and traces
// may be any bytes (a byte tokenizer splits multi-byte characters), so JSON and HTML get them as valid UTF-8; metric
// values print the same way in the terminal and in the report's tables.
#include <string>
#include <string_view>

namespace moelab::apps {

bool is_valid_utf8(std::string_view s);
std::string valid_utf8(std::string_view text);  // invalid bytes -> U+FFFD

// A metric value for tables: "–" for NaN, fewer decimals for larger numbers.
std::string num(double v, int decimals = 3);

}  // namespace moelab::apps
