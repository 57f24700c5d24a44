// The JSON-Schema subset the manifest schema uses (flexdit_bundle/schema_check.py, same rules
// and messages): $ref, type, const, enum, oneOf, minimum, exclusiveMinimum, pattern, required,
// properties, additionalProperties (schema form), minItems, maxItems, items. The schema itself is
// flexdit_bundle/manifest.schema.json, embedded into the library at build time.
#pragma once
#include <string>
#include <vector>

#include "json_text.hpp"

namespace flexdit_core {

struct SchemaViolation {
  std::string path;  // "stages/0/batch" or "(top)"
  std::string message;
};

// -> the first violation, or an empty path+message when `value` validates.
bool schema_validate(const json& value, const json& schema, SchemaViolation* violation);

const json& manifest_schema();  // parsed once from the embedded text

}  // namespace flexdit_core
