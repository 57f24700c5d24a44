#include "weights.hpp"

#include <cstdio>
#include <cstdlib>

#include "error.hpp"
#include "files.hpp"
#include "onnx_scan.hpp"

namespace flexdit_core {
namespace {

ONNXTensorElementDataType ort_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "float16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (dtype == "bfloat16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  if (dtype == "int8") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if (dtype == "uint8") return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (dtype == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dtype == "bool") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

std::string checksum_message(const std::string& path) {
  return "checksum mismatch for " + path + ": the bundle was modified or truncated; re-run flexdit-export convert";
}

}  // namespace

SharedWeights::~SharedWeights() = default;

void SharedWeights::check_bindings(const Artifact& a) const {
  const WeightFile* w = bundle_.manifest.weight_file(a.weights->file);
  std::map<std::string, OnnxInitializer> graph;
  try {
    graph = onnx_initializers(bundle_.path_of(a));
  } catch (const std::invalid_argument& e) {
    fail(ErrorKind::Bundle, "cannot read graph " + a.path + ": " + e.what());
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::Bundle) throw;
    fail(ErrorKind::Bundle, "cannot read graph " + a.path + ": " + e.what());
  }
  std::string location = w->path.substr(w->path.rfind('/') == std::string::npos ? 0 : w->path.rfind('/') + 1);
  for (auto& [name, index] : a.weights->bindings) {
    const WeightTensor& t = w->tensors[index];
    auto it = graph.find(name);
    bool ok = it != graph.end();
    if (ok) {
      const OnnxInitializer& g = it->second;
      auto ext = [&](const char* key, const std::string& dflt) {
        auto e = g.external.find(key);
        return e == g.external.end() ? dflt : e->second;
      };
      ok = g.dtype() == t.dtype && g.dims == t.shape && ext("location", "") == location &&
           ext("offset", "0") == std::to_string(t.offset) && ext("length", "-1") == std::to_string(t.bytes);
    }
    if (!ok)
      fail(ErrorKind::Bundle, a.path + ": the manifest binds initializer '" + name.substr(0, 80) + "' to tensor " +
                                  std::to_string(index) + " of " + w->path +
                                  ", which is not what the graph references; re-run flexdit-export convert");
  }
}

SharedWeights::File& SharedWeights::load(const std::string& id) {
  auto it = files_.find(id);
  if (it != files_.end()) return *it->second;
  const WeightFile& entry = *bundle_.manifest.weight_file(id);
  auto path = bundle_.path_of(entry);
  auto file = std::make_unique<File>();
  file->size = entry.bytes;
  file->data = std::aligned_alloc(64, (entry.bytes + 63) / 64 * 64 + 64);
  if (!file->data) fail(ErrorKind::Runtime, "out of memory reading " + entry.path);
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  size_t got = f ? std::fread(file->data, 1, entry.bytes + 1, f.get()) : 0;
  if (!f) fail(ErrorKind::Bundle, "cannot read weight file " + entry.path);
  if (got != entry.bytes || sha256_hex(file->data, got) != entry.sha256) fail(ErrorKind::Bundle, checksum_message(entry.path));
  Ort::MemoryInfo info = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  for (auto& t : entry.tensors) {
    auto type = ort_type(t.dtype);
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) {
      file->values.emplace_back(nullptr);
      continue;
    }
    file->values.push_back(Ort::Value::CreateTensor(info, static_cast<char*>(file->data) + t.offset, t.bytes,
                                                    t.shape.data(), t.shape.size(), type));
  }
  return *files_.emplace(id, std::move(file)).first->second;
}

size_t SharedWeights::bind(Ort::SessionOptions& options, const Artifact& artifact) {
  if (!artifact.weights) return 0;
  check_bindings(artifact);
  std::lock_guard<std::mutex> lock(mu_);
  File& f = load(artifact.weights->file);
  size_t n = 0;
  for (auto& [name, index] : artifact.weights->bindings) {
    if (!f.values[index]) continue;
    options.AddInitializer(name.c_str(), f.values[index]);
    ++n;
  }
  return n;
}

const OrtValue* SharedWeights::tensor(const std::string& file_id, size_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  File& f = load(file_id);
  if (!f.values.at(index)) {
    const WeightFile& w = *bundle_.manifest.weight_file(file_id);
    fail(ErrorKind::Bundle, "tensor " + std::to_string(index) + " of " + w.path + " is " + w.tensors[index].dtype +
                                ", which cannot be fed as a graph input");
  }
  return f.values[index];
}

uint64_t SharedWeights::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t n = 0;
  for (auto& [id, f] : files_) n += f->size;
  return n;
}

}  // namespace flexdit_core
