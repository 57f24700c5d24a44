// The runtime's one exception type: a kind (what class of problem, as the C API's status
// codes) and a one-line message that says what is wrong and what to do.
#pragma once
#include <stdexcept>
#include <string>

namespace flexdit_core {

enum class ErrorKind {
  Bundle = 1,    // the bundle cannot be trusted or used (missing, tampered, malformed)
  Prompt = 2,    // a prompt / class name or id the model does not have, or a bad prompt file
  Argument = 3,  // a sampling or load option out of range (steps, eta, cfg scale, precision...)
  Runtime = 4,   // ONNX Runtime failed while loading or running a graph
  Io = 5,        // a file the caller named cannot be read or written
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

}  // namespace flexdit_core
