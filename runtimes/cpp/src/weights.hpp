// A bundle's shared weight files (format v2), read once, hashed on the bytes read, and handed
// to every stage session as user-supplied initializers (AddInitializer: used in place, no copy).
// Each binding of the manifest is first checked against the graph's own initializer table.
#pragma once
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "ort_env.hpp"

namespace flexdit_core {

class SharedWeights {
 public:
  explicit SharedWeights(const Bundle& bundle) : bundle_(bundle) {}
  ~SharedWeights();
  SharedWeights(const SharedWeights&) = delete;
  SharedWeights& operator=(const SharedWeights&) = delete;

  // Throws Error(Bundle) when a binding names an initializer the graph does not reference with
  // the same dtype, dims, location, offset and length.
  void check_bindings(const Artifact& artifact) const;

  // Adds the shared tensors `artifact` uses to `options` (loading the file on first use);
  // -> how many. Thread-safe. Must outlive every session it was bound to.
  size_t bind(Ort::SessionOptions& options, const Artifact& artifact);

  // Tensor `index` of weight file `file_id` as an OrtValue over the bytes read once (no copy),
  // loading the file on first use: a shared graph's stage inputs. Throws Error(Bundle) for a
  // dtype ONNX Runtime cannot take. Thread-safe; valid as long as this object.
  const OrtValue* tensor(const std::string& file_id, size_t index);

  uint64_t resident_bytes() const;  // bytes of weight files read so far (each once)

 private:
  struct File {
    void* data = nullptr;
    size_t size = 0;
    std::vector<Ort::Value> values;  // per tensor; null for a dtype left to ORT's own loader
    File() = default;
    File(const File&) = delete;
    File& operator=(const File&) = delete;
    ~File() {
      values.clear();
      std::free(data);
    }
  };
  File& load(const std::string& id);

  const Bundle& bundle_;
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<File>> files_;
};

}  // namespace flexdit_core
