#pragma once
// Enums chosen by name (config values, command-line flags). Each such enum lists its names once, next to its
// declaration, as an overload of enum_names found by argument-dependent lookup:
//   enum class EDScope { MicroBatch, Step };
//   constexpr EnumNames<EDScope, 2> enum_names(EDScope) { return {{{EDScope::MicroBatch, "micro_batch"}, ...}}; }
// Then parse_enum<EDScope>("step", "moe.ed_scope") gives the value, or an error that lists every allowed name, and
// enum_name(value) gives the name back (for logs and checkpoints).
#include <fmt/format.h>

#include <array>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace moelab {

template <class E, size_t N> using EnumNames = std::array<std::pair<E, const char*>, N>;

template <class E> const char* enum_name(E value) {
  for (const auto& [v, name] : enum_names(E{}))
    if (v == value) return name;
  return "?";
}

// `what` names the setting in the error, e.g. "moe.ed_scope".
template <class E> E parse_enum(std::string_view text, std::string_view what) {
  std::string allowed;
  for (const auto& [v, name] : enum_names(E{})) {
    if (text == name) return v;
    allowed += allowed.empty() ? name : std::string(" | ") + name;
  }
  throw std::invalid_argument(fmt::format("{} must be one of {}, got '{}'", what, allowed, text));
}

}  // namespace moelab
