#include "data/excerpt.h"

#include <algorithm>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace moelab::data {

size_t utf8_length(std::string_view s, size_t i) {
  auto byte = [&](size_t k) -> unsigned { return k < s.size() ? static_cast<unsigned char>(s[k]) : 0u; };
  const unsigned lead = byte(i);
  if (lead < 0x80) return 1;
  // The lead byte gives the length; the second byte's range rules out overlong forms (after E0, F0), surrogates
  // (after ED) and code points above U+10FFFF (after F4).
  size_t length = 0;
  unsigned low = 0x80, high = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return 0;
  }
  if (byte(i + 1) < low || byte(i + 1) > high) return 0;
  for (size_t k = 2; k < length; ++k)
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
  return length;
}

std::string excerpt(std::string_view text, size_t max_chars) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    const size_t n = utf8_length(text, i);
    const bool printable = n > 1 || (n == 1 && c >= 0x20 && c != 0x7F);
    const std::string piece = printable ? std::string(text.substr(i, n)) : fmt::format("\\x{:02x}", c);
    if (out.size() + piece.size() > max_chars) break;
    out += piece;
    i += printable ? n : 1;
  }
  if (i < text.size()) out += fmt::format("... ({} bytes)", text.size());
  return out;
}

std::string json_error(const std::exception& e, std::string_view input) {
  // "[json.exception.parse_error.101] parse error at line 1, column 9: <reason>; last read: '<input so far>'"
  const std::string_view what = e.what();
  std::string reason(what);
  if (const size_t last_read = what.find("; last read: '"); last_read != std::string_view::npos) {
    reason = what.substr(0, last_read);
    if (const size_t expected = what.rfind("'; expected "); expected != std::string_view::npos && expected > last_read)
      reason += what.substr(expected + 1);  // "; expected string literal"
  }
  if (reason.starts_with("[json.exception"))
    if (const size_t id_end = reason.find("] "); id_end != std::string::npos) reason.erase(0, id_end + 2);
  if (reason.starts_with("parse error"))
    if (const size_t colon = reason.find(": "); colon != std::string::npos) reason.erase(0, colon + 2);
  const auto* parse_error = dynamic_cast<const nlohmann::json::parse_error*>(&e);
  if (!parse_error) return fmt::format("invalid JSON: {}", excerpt(reason, 120));
  // e.byte counts the bytes read, the bad one included.
  const size_t end = std::min(parse_error->byte, input.size());
  const size_t start = end > 24 ? end - 24 : 0;
  return fmt::format("invalid JSON at byte {} of {}: {}; near '{}{}'", parse_error->byte, input.size(),
                     excerpt(reason, 120), start > 0 ? "..." : "", excerpt(input.substr(start, end - start)));
}

}  // namespace moelab::data
