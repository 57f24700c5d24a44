// The process's one ONNX Runtime environment: the C API version check, the global intra-op
// thread pool every stage session shares, one shared CPU arena (session.use_env_allocators).
#pragma once
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <mutex>
#include <string>

namespace flexdit_core {

class OrtProcess {
 public:
  // The environment, created on first use with a global pool of `threads` intra-op threads
  // (0: ONNX Runtime's default, one per core). A later call asking for another size fails with
  // Error(Argument): the pool of a process cannot be resized.
  static OrtProcess& get(int threads);
  Ort::Env& env() { return env_; }
  int threads() const { return threads_; }

  static std::string library_version();  // e.g. "1.32.0"

 private:
  explicit OrtProcess(int threads);
  Ort::Env env_{nullptr};
  int threads_;
};

std::string ort_message(const Ort::Exception& e);  // one line, without ORT's prefix

}  // namespace flexdit_core
