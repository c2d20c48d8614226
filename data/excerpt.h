// Quoting bytes read from a file in an error message. A corrupt file can hold a 20 MB line or a name full of control
// bytes, and an error must stay one short line that a terminal shows as it is.
#pragma once

#include <cstddef>
#include <exception>
#include <string>
#include <string_view>

namespace moelab::data {

// The length (1-4) of the UTF-8 character that starts at s[i], or 0 when the bytes there are not one (overlong forms,
// surrogates and code points above U+10FFFF included: what a strict decoder refuses).
size_t utf8_length(std::string_view s, size_t i);

// At most about max_chars characters of `text`: control bytes and bytes that are not UTF-8 written as \xNN, never a
// character cut in two; a cut text ends in "... (N bytes)" with the length of the whole text.
std::string excerpt(std::string_view text, size_t max_chars = 80);

// An error of nlohmann::json while parsing `input` (any json::exception: a parse error, or a number too large) as one
// short line. nlohmann's own message quotes everything read so far ("last read: '<20 MB>'"); this keeps its reason,
// cut short, and for a parse error quotes only the bytes just before the error:
//   "invalid JSON at byte 20000001 of 20000002: syntax error while parsing value - invalid string: ill-formed UTF-8
//    byte; near '...aaaa\xff'"
std::string json_error(const std::exception& e, std::string_view input);

}  // namespace moelab::data
