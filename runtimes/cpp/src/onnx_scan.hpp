// The initializer table of an ONNX model read straight from the protobuf wire format (as
// flexdit_bundle/onnx_scan.py): ModelProto.graph (7) -> GraphProto.initializer (5) ->
// TensorProto dims (1), data_type (2), name (8), external_data (13).
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace flexdit_core {

struct OnnxInitializer {
  std::string name;
  int data_type = 0;
  std::vector<int64_t> dims;
  std::map<std::string, std::string> external;  // location / offset / length as stored

  std::string dtype() const;  // the weight table's dtype name, "" for others
};

// Throws std::invalid_argument("truncated or malformed ...") on a bad buffer.
std::map<std::string, OnnxInitializer> onnx_initializers(const uint8_t* data, size_t size);
std::map<std::string, OnnxInitializer> onnx_initializers(const std::filesystem::path& path);  // + Error(Io)

}  // namespace flexdit_core
