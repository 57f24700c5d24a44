#include "json_text.hpp"

#include <stdexcept>

namespace flexdit {

json parse_json_strict(const std::string& text) {
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
    throw std::invalid_argument(std::string("a number is out of range (a manifest holds finite numbers): ") + e.what());
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

}  // namespace flexdit
