// Strict JSON text -> nlohmann::json, as flexdit_bundle.manifest.parse_manifest: NaN, Infinity
// and numbers that overflow are refused, and a document nested deeper than kMaxJsonDepth is one
// error (never a stack overflow).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace flexdit_core {

using json = nlohmann::json;
constexpr int kMaxJsonDepth = 200;

// Throws std::invalid_argument with a short reason (the caller adds which file).
json parse_json_strict(const std::string& text);

// A value shown in a message: compact, at most `limit` characters.
std::string json_preview(const json& value, size_t limit = 60);

}  // namespace flexdit_core
