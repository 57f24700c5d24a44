#include "json_text.hpp"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <stdexcept>

namespace flexdit_core {

json parse_json_strict(const std::string& text) {
  // nlohmann skips a byte-order mark; JSON has none, and Python's reader refuses it: one rule
  if (text.compare(0, 3, "\xEF\xBB\xBF") == 0)
    throw std::invalid_argument("it starts with a byte-order mark, which JSON does not allow (save it as UTF-8 without one)");
  bool too_deep = false;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonDepth) {
      too_deep = true;
      throw std::invalid_argument("it is nested too deeply to be a manifest");
    }
    return true;
  };
  try {
    return json::parse(text, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const json::out_of_range& e) {
    std::string what = e.what(), token = "a number";
    size_t q = what.find('\'');
    if (q != std::string::npos && what.find('\'', q + 1) != std::string::npos)
      token = "the number " + what.substr(q + 1, std::min<size_t>(40, what.find('\'', q + 1) - q - 1));
    throw std::invalid_argument(token + " is out of range (a manifest holds finite numbers)");
  } catch (const json::parse_error& e) {
    // NaN / Infinity: Python's json would take them; a manifest must not hold them
    size_t at = e.byte > 0 ? std::min<size_t>(e.byte - 1, text.size()) : 0;
    while (at > 0 && (std::isalpha(static_cast<unsigned char>(text[at - 1])) || text[at - 1] == '-')) --at;
    for (const char* name : {"NaN", "-Infinity", "Infinity"})
      if (text.compare(at, std::strlen(name), name) == 0)
        throw std::invalid_argument(std::string(name) + " is not JSON (a manifest holds finite numbers)");
    std::string what = e.what();
    auto pos = what.find("] ");
    throw std::invalid_argument(pos == std::string::npos ? what : what.substr(pos + 2));
  } catch (const json::exception& e) {
    std::string what = e.what();
    auto pos = what.find("] ");
    throw std::invalid_argument(pos == std::string::npos ? what : what.substr(pos + 2));
  }
}

std::string json_preview(const json& value, size_t limit) {
  std::string s = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > limit) s = s.substr(0, limit);
  return s;
}

}  // namespace flexdit_core
