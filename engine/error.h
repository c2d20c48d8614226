#pragma once
// Bad use of the engine or of a layer above it: std::invalid_argument with a message that names the op (or the
// component) and the offending shapes, dtypes or values.
#include <fmt/format.h>

#include <stdexcept>
#include <utility>

namespace moelab {

template <class... Args> [[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw std::invalid_argument(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace moelab
