#include "ort_env.hpp"

#include <memory>

#include "error.hpp"

namespace flexdit_core {
namespace {

std::mutex g_mu;
std::unique_ptr<OrtProcess> g_process;

void init_api() {
  static bool done = false;
  if (done) return;
  const OrtApiBase* base = OrtGetApiBase();
  const OrtApi* api = base ? base->GetApi(ORT_API_VERSION) : nullptr;
  if (!api)
    fail(ErrorKind::Runtime, std::string("the ONNX Runtime library (") + (base ? base->GetVersionString() : "?") +
                                 ") does not provide C API version " + std::to_string(ORT_API_VERSION) +
                                 " that this runtime was compiled against; use onnxruntime >= 1." +
                                 std::to_string(ORT_API_VERSION) + " or build against older headers");
  Ort::InitApi(api);
  done = true;
}

}  // namespace

std::string OrtProcess::library_version() {
  const OrtApiBase* base = OrtGetApiBase();
  return base ? base->GetVersionString() : "";
}

OrtProcess::OrtProcess(int threads) : threads_(threads) {
  Ort::ThreadingOptions to;
  to.SetGlobalIntraOpNumThreads(threads);
  to.SetGlobalInterOpNumThreads(1);
  to.SetGlobalSpinControl(1);
  env_ = Ort::Env(to, ORT_LOGGING_LEVEL_FATAL, "flexdit");
  Ort::MemoryInfo info("Cpu", OrtArenaAllocator, 0, OrtMemTypeDefault);
  Ort::ArenaCfg arena(0, -1, -1, -1);
  env_.CreateAndRegisterAllocator(info, arena);
}

OrtProcess& OrtProcess::get(int threads) {
  std::lock_guard<std::mutex> lock(g_mu);
  init_api();
  if (g_process) {
    if (threads != g_process->threads_)
      fail(ErrorKind::Argument, "this process already shares an ONNX Runtime thread pool of " +
                                    (g_process->threads_ ? std::to_string(g_process->threads_) : std::string("the default number of")) +
                                    " threads, which cannot be resized to " + std::to_string(threads) +
                                    ": use the same --threads in one process");
    return *g_process;
  }
  try {
    g_process.reset(new OrtProcess(threads));
  } catch (const Ort::Exception& e) {
    fail(ErrorKind::Runtime, "cannot create the ONNX Runtime environment: " + ort_message(e));
  }
  return *g_process;
}

std::string ort_message(const Ort::Exception& e) {
  std::string s = e.what();
  s = s.substr(0, s.find('\n'));
  if (s.rfind("[ONNXRuntimeError]", 0) == 0) {
    auto pos = s.rfind(" : ");
    if (pos != std::string::npos) s = s.substr(pos + 3);
  }
  return s.substr(0, 300);
}

}  // namespace flexdit_core
