// The per-stage precision grammar of flexdit_bundle/precision.py:
//   fp16 | int8:stages=0-2,fp16:stages=3 | fp16,int8:stages=0,1
// Errors are Error(Argument) with the Python module's messages.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace flexdit_core {

// A precision name or the alias int8 -> canonical name for the backend (onnx: int8-dynamic).
std::string canonical_precision(const std::string& name, const std::string& backend = "onnx");

// -> [(precision, stage ids or nullopt for "the rest")]
std::vector<std::pair<std::string, std::optional<std::vector<int>>>> parse_precision_items(const std::string& spec,
                                                                                           const std::string& backend = "onnx");

// -> {stage id: precision}; stages no item names get the item without stages=, else `fallback`
// ("" = leave them out: a runtime override keeps the bundle's default for them).
std::map<int, std::string> parse_precision_policy(const std::string& spec, int num_stages,
                                                  const std::string& backend = "onnx", const std::string& fallback = "");

}  // namespace flexdit_core
