#include "schema_check.hpp"

#include <map>
#include <mutex>
#include <regex>

#include "error.hpp"

namespace flexdit_core {

extern const char* const kManifestSchemaText;  // generated: manifest_schema_data.cpp

namespace {

struct Violation {
  std::vector<std::string> path;
  std::string message;
};

bool is_type(const json& v, const std::string& t) {
  if (t == "integer") return v.is_number_integer();
  if (t == "number") return v.is_number();
  if (t == "object") return v.is_object();
  if (t == "array") return v.is_array();
  if (t == "string") return v.is_string();
  if (t == "boolean") return v.is_boolean();
  if (t == "null") return v.is_null();
  return false;
}

const std::regex& pattern(const std::string& p) {
  static std::mutex mu;
  static std::map<std::string, std::regex> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(p);
  if (it == cache.end()) it = cache.emplace(p, std::regex(p, std::regex::ECMAScript)).first;
  return it->second;
}

// a number as Python's str() writes it (integers whole, floats in shortest round-trip form),
// so both runtimes word a range violation alike
std::string fmt_num(const json& n) { return n.dump(); }

void validate(const json& value, const json& schema, const json& root, std::vector<std::string>& path) {
  auto bad = [&](const std::string& msg) { throw Violation{path, msg}; };
  if (schema.contains("$ref")) {
    const json* node = &root;
    std::string ref = schema["$ref"].get<std::string>();
    size_t i = ref.find_first_not_of("#/");
    ref = i == std::string::npos ? "" : ref.substr(i);
    size_t start = 0;
    while (start <= ref.size() && !ref.empty()) {
      size_t end = ref.find('/', start);
      std::string part = ref.substr(start, end == std::string::npos ? std::string::npos : end - start);
      node = &node->at(part);
      if (end == std::string::npos) break;
      start = end + 1;
    }
    validate(value, *node, root, path);
    return;
  }
  if (schema.contains("type")) {
    std::vector<std::string> types;
    if (schema["type"].is_array())
      for (auto& t : schema["type"]) types.push_back(t.get<std::string>());
    else
      types.push_back(schema["type"].get<std::string>());
    bool ok = false;
    for (auto& t : types) ok = ok || is_type(value, t);
    if (!ok) {
      std::string joined;
      for (size_t k = 0; k < types.size(); ++k) joined += (k ? " or " : "") + types[k];
      bad(json_preview(value) + " is not of type " + joined);
    }
  }
  if (schema.contains("const") && value != schema["const"]) bad(json_preview(value) + " is not " + schema["const"].dump());
  if (schema.contains("enum")) {
    bool found = false;
    for (auto& e : schema["enum"]) found = found || e == value;
    if (!found) bad(json_preview(value) + " is not one of " + schema["enum"].dump());
  }
  if (schema.contains("oneOf")) {
    int ok = 0;
    for (auto& sub : schema["oneOf"]) {
      try {
        validate(value, sub, root, path);
        ++ok;
      } catch (const Violation&) {
      }
    }
    if (ok != 1) bad(json_preview(value) + " is not valid under exactly one of the allowed forms");
  }
  if (value.is_number()) {
    double v = value.get<double>();
    auto bound = [&](const char* key) { return schema[key].get<double>(); };
    if (schema.contains("minimum") && v < bound("minimum"))
      bad(fmt_num(value) + " is less than the minimum of " + fmt_num(schema["minimum"]));
    if (schema.contains("exclusiveMinimum") && v <= bound("exclusiveMinimum"))
      bad(fmt_num(value) + " is less than or equal to the minimum of " + fmt_num(schema["exclusiveMinimum"]));
    if (schema.contains("maximum") && v > bound("maximum"))
      bad(fmt_num(value) + " is greater than the maximum of " + fmt_num(schema["maximum"]));
    if (schema.contains("exclusiveMaximum") && v >= bound("exclusiveMaximum"))
      bad(fmt_num(value) + " is greater than or equal to the maximum of " + fmt_num(schema["exclusiveMaximum"]));
  }
  if (value.is_string() && schema.contains("pattern")) {
    const std::string& p = schema["pattern"].get_ref<const std::string&>();
    if (!std::regex_search(value.get_ref<const std::string&>(), pattern(p)))
      bad(json_preview(value) + " does not match " + p);
  }
  if (value.is_object()) {
    if (schema.contains("required"))
      for (auto& key : schema["required"])
        if (!value.contains(key.get<std::string>())) bad("'" + key.get<std::string>() + "' is a required property");
    const json* props = schema.contains("properties") ? &schema["properties"] : nullptr;
    const json* extra = schema.contains("additionalProperties") && schema["additionalProperties"].is_object()
                            ? &schema["additionalProperties"]
                            : nullptr;
    for (auto it = value.begin(); it != value.end(); ++it) {
      const json* sub = props && props->contains(it.key()) ? &(*props)[it.key()] : extra;
      if (!sub) continue;
      path.push_back(it.key());
      validate(it.value(), *sub, root, path);
      path.pop_back();
    }
  }
  if (value.is_array()) {
    if (schema.contains("minItems") && value.size() < schema["minItems"].get<size_t>())
      bad(json_preview(value) + " should have at least " + schema["minItems"].dump() + " items");
    if (schema.contains("maxItems") && value.size() > schema["maxItems"].get<size_t>())
      bad(json_preview(value) + " has more than " + schema["maxItems"].dump() + " items");
    if (schema.contains("items")) {
      for (size_t i = 0; i < value.size(); ++i) {
        path.push_back(std::to_string(i));
        validate(value[i], schema["items"], root, path);
        path.pop_back();
      }
    }
  }
}

}  // namespace

bool schema_validate(const json& value, const json& schema, SchemaViolation* violation) {
  std::vector<std::string> path;
  try {
    validate(value, schema, schema, path);
    return true;
  } catch (const Violation& v) {
    if (violation) {
      violation->path.clear();
      for (size_t i = 0; i < v.path.size(); ++i) violation->path += (i ? "/" : "") + v.path[i];
      if (violation->path.empty()) violation->path = "(top)";
      violation->message = v.message;
    }
    return false;
  }
}

const json& manifest_schema() {
  static const json schema = json::parse(kManifestSchemaText);
  return schema;
}

}  // namespace flexdit_core
