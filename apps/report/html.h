#pragma once
// Text into HTML: every name and text from runs, corpora and traces goes through html_escape before it reaches the
// report (as SVG labels and tooltips too), so none of it can add markup.
#include <string>
#include <string_view>

namespace moelab::apps {

std::string html_escape(std::string_view text);  // & < > " ' -> entities; invalid UTF-8 -> U+FFFD

}  // namespace moelab::apps
