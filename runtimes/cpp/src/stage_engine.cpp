#include "stage_engine.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>

#include "error.hpp"

namespace flexdit_core {
namespace {

std::string dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "type" + std::to_string(static_cast<int>(t));
  }
}

size_t product(const std::vector<int64_t>& s, size_t from = 1) {
  size_t n = 1;
  for (size_t i = from; i < s.size(); ++i) n *= static_cast<size_t>(s[i]);
  return n;
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + (s[i] < 0 ? std::string("?") : std::to_string(s[i]));
  return out + "]";
}

uint16_t float_to_half(float f) {  // round to nearest even, as numpy (timesteps are normal or 0)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7FFFFF;
  int exp = static_cast<int>((x >> 23) & 0xFF) - 127 + 15;
  if (f == 0.0f) return static_cast<uint16_t>(sign);
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00);
  if (exp <= 0) return static_cast<uint16_t>(sign);
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  if ((mant & 0x1FFF) > 0x1000 || ((mant & 0x1FFF) == 0x1000 && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

GraphOptimizationLevel ort_level(const std::string& name) {
  if (name == "none") return ORT_DISABLE_ALL;
  if (name == "basic") return ORT_ENABLE_BASIC;
  if (name == "extended") return ORT_ENABLE_EXTENDED;
  if (name == "all") return ORT_ENABLE_ALL;
  fail(ErrorKind::Bundle, "unknown graph optimisation level '" + name + "'");
}

GraphOptimizationLevel cpu_level(const std::string& precision) {
  return precision == "fp32" || precision == "fp16" ? ORT_ENABLE_BASIC : ORT_ENABLE_ALL;
}

GraphSession::GraphSession(OrtProcess& ort, const Bundle& bundle, const Artifact& art, SharedWeights& weights,
                           const SessionSettings& settings, GraphOptimizationLevel level)
    : artifact(&art) {
  if (art.backend != "onnx")
    fail(ErrorKind::Argument, "the C++ runtime runs ONNX graphs only, not " + art.backend + " artifacts");
  auto path = bundle.path_of(art);
  try {
    Ort::SessionOptions so;
    so.SetGraphOptimizationLevel(level);
    so.SetLogSeverityLevel(4);
    so.DisablePerSessionThreads();
    so.AddConfigEntry("session.use_env_allocators", "1");
    bool shared = weights.bind(so, art) > 0;
    if (shared && !settings.prepack_weights) so.AddConfigEntry("session.disable_prepacking", "1");
    if (shared && settings.prepack_weights && settings.prepacked)
      session = Ort::Session(ort.env(), path.c_str(), so, settings.prepacked->get());
    else
      session = Ort::Session(ort.env(), path.c_str(), so);
  } catch (const Ort::Exception& e) {
    fail(ErrorKind::Runtime, "cannot load graph " + path.string() + ": " + ort_message(e));
  }
}

void GraphSession::check_io(const std::vector<TensorDecl>& inputs, const TensorDecl& output, const std::string& where,
                            const std::vector<ExtraInput>& extra, const std::string& extra_where) const {
  Ort::AllocatorWithDefaultOptions alloc;
  std::map<std::string, std::pair<std::string, std::vector<int64_t>>> gin, gout;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    Ort::TypeInfo type = session.GetInputTypeInfo(i);  // owns the shape info below
    auto info = type.GetTensorTypeAndShapeInfo();
    gin[session.GetInputNameAllocated(i, alloc).get()] = {dtype_name(info.GetElementType()), info.GetShape()};
  }
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    Ort::TypeInfo type = session.GetOutputTypeInfo(i);
    auto info = type.GetTensorTypeAndShapeInfo();
    gout[session.GetOutputNameAllocated(i, alloc).get()] = {dtype_name(info.GetElementType()), info.GetShape()};
  }
  for (auto& e : extra) {  // a shared graph's stage inputs: checked here, then out of the comparison
    auto it = gin.find(e.name);
    if (it == gin.end() || it->second.first != e.dtype || it->second.second.size() != e.shape.size())
      fail(ErrorKind::Bundle, extra_where + " feeds '" + e.name + "' as " + e.dtype + " " + shape_text(e.shape) +
                                  ", which the graph does not take; re-run flexdit-export convert");
    gin.erase(it);
  }
  auto names = [](const auto& m) {
    std::string s = "[";
    for (auto& [k, v] : m) s += (s.size() > 1 ? ", '" : "'") + k + "'";
    return s + "]";
  };
  std::map<std::string, int> declared;
  for (auto& e : inputs) declared[e.name] = 0;
  bool same = declared.size() == gin.size();
  for (auto& [k, v] : gin) same = same && declared.count(k);
  if (!same)
    fail(ErrorKind::Bundle, where + ": the manifest names the inputs " + names(declared) + " but the graph has " +
                                names(gin) + "; re-run flexdit-export convert");
  if (!gout.count(output.name))
    fail(ErrorKind::Bundle, where + ": the manifest names the output '" + output.name + "' but the graph has " +
                                names(gout) + "; re-run flexdit-export convert");
  std::vector<TensorDecl> wanted = inputs;
  wanted.push_back(output);
  for (auto& e : wanted) {
    auto& [dtype, shape] = gin.count(e.name) ? gin[e.name] : gout[e.name];
    bool ok = dtype == e.dtype && shape.size() == e.shape.size();
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || shape[i] == e.shape[i];
    if (!ok)
      fail(ErrorKind::Bundle, where + ": the manifest declares '" + e.name + "' as " + e.dtype + " " +
                                  shape_text(e.shape) + " but the graph has " + dtype + " " + shape_text(shape) +
                                  "; re-run flexdit-export convert");
  }
}

SharedSessions::Ptr SharedSessions::get(const std::string& id, const std::function<Ptr()>& make) {
  std::promise<Ptr> made;
  std::shared_future<Ptr> session;
  bool mine = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) {
      session = sessions_[id] = made.get_future().share();
      mine = true;
    } else {
      session = it->second;
    }
  }
  if (mine) {
    try {
      made.set_value(make());
    } catch (...) {
      made.set_exception(std::current_exception());
    }
  }
  return session.get();
}

size_t SharedSessions::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_.size();
}

StageEngine::StageEngine(OrtProcess& ort, const Bundle& bundle, const Stage& st, const Artifact& art,
                         SharedWeights& weights, const SessionSettings& settings, SharedSessions* shared)
    : stage(st), artifact(art) {
  // The Python runtime's level rule (flexdit_runtime.ort_engine.optimization_level, CPU provider):
  // `basic` for fp32/fp16 graphs, where the higher levels cost load time and measured no faster
  // steps, `all` for int8, whose quantised-MatMul fusions are extended-level. Same graphs, same
  // level: the two runtimes compute the same bits. A shared graph is used only at the level it
  // was checked bit-identical at, so turning it off changes the session count, never the results.
  const SharedGraph* group = art.shared_graph ? bundle.manifest.shared_graph(art.shared_graph->id) : nullptr;
  GraphOptimizationLevel level = cpu_level(art.precision);
  if (group && ort_level(group->graph_optimization) != level) group = nullptr;
  std::string where = art.path + " (stage " + std::to_string(st.id) + ")";
  if (group && settings.shared_graphs && shared) {
    shared_ = group;
    graph_ = shared->get(group->id, [&] {
      return std::make_shared<const GraphSession>(ort, bundle, group->graph, weights, settings, level);
    });
    const WeightFile& file = *bundle.manifest.weight_file(group->graph.weights->file);
    std::vector<GraphSession::ExtraInput> extra;
    for (auto& [name, index] : art.shared_graph->inputs) {
      const_names_.push_back(name);
      const_values_.push_back(weights.tensor(file.id, index));
      extra.push_back({name, file.tensors[index].dtype, file.tensors[index].shape});
    }
    where = group->graph.path + " (stage " + std::to_string(st.id) + ")";
    graph_->check_io(st.inputs, st.outputs[0], where, extra, group->graph.path + ": stage " + std::to_string(st.id));
  } else {
    graph_ = std::make_shared<const GraphSession>(ort, bundle, art, weights, settings, level);
    graph_->check_io(st.inputs, st.outputs[0], where);
  }
  x_row_ = product(st.inputs[0].shape);
  out_row_ = product(st.outputs[0].shape);
  t_dtype_ = st.inputs[1].dtype;
  if (t_dtype_ != "float32" && t_dtype_ != "float16" && t_dtype_ != "int64")
    fail(ErrorKind::Bundle, art.path + ": timestep input dtype " + t_dtype_ + " is not float32, float16 or int64");
  if (st.inputs[0].dtype != "float32" || st.inputs[2].dtype != "int64" || st.outputs[0].dtype != "float32")
    fail(ErrorKind::Bundle, art.path + ": the latent and output must be float32 and the class label int64");
}

void StageEngine::run_batch(const float* x, const float* t, const int64_t* y, float* out) const {
  const size_t B = stage.batch;
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  std::vector<float> tf;
  std::vector<uint16_t> th;
  std::vector<int64_t> ti;
  Ort::Value values[3] = {Ort::Value(nullptr), Ort::Value(nullptr), Ort::Value(nullptr)};
  const auto& xs = stage.inputs[0].shape;
  values[0] = Ort::Value::CreateTensor<float>(mem, const_cast<float*>(x), B * x_row_, xs.data(), xs.size());
  const int64_t tshape[1] = {static_cast<int64_t>(B)};
  if (t_dtype_ == "float32") {
    tf.assign(t, t + B);
    values[1] = Ort::Value::CreateTensor<float>(mem, tf.data(), B, tshape, 1);
  } else if (t_dtype_ == "float16") {
    for (size_t i = 0; i < B; ++i) th.push_back(float_to_half(t[i]));
    values[1] = Ort::Value::CreateTensor(mem, th.data(), B * 2, tshape, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  } else {
    for (size_t i = 0; i < B; ++i) ti.push_back(static_cast<int64_t>(t[i]));  // truncation, as numpy's float32 -> int64
    values[1] = Ort::Value::CreateTensor<int64_t>(mem, ti.data(), B, tshape, 1);
  }
  values[2] = Ort::Value::CreateTensor<int64_t>(mem, const_cast<int64_t*>(y), B, tshape, 1);
  const auto& os = stage.outputs[0].shape;
  Ort::Value output = Ort::Value::CreateTensor<float>(mem, out, B * out_row_, os.data(), os.size());
  const size_t n_in = 3 + const_names_.size();
  std::vector<const char*> in_names = {stage.inputs[0].name.c_str(), stage.inputs[1].name.c_str(),
                                       stage.inputs[2].name.c_str()};
  std::vector<const OrtValue*> in_values = {values[0], values[1], values[2]};
  for (size_t i = 0; i < const_names_.size(); ++i) {  // a shared graph: this stage's constants
    in_names.push_back(const_names_[i].c_str());
    in_values.push_back(const_values_[i]);
  }
  const char* out_names[1] = {stage.outputs[0].name.c_str()};
  OrtValue* out_values[1] = {output};
  try {
    Ort::ThrowOnError(Ort::GetApi().Run(graph_->session, nullptr, in_names.data(), in_values.data(), n_in, out_names,
                                        1, out_values));
  } catch (const Ort::Exception& e) {
    fail(ErrorKind::Runtime, "stage " + std::to_string(stage.id) + " (" + artifact.path +
                                 ") failed in ONNX Runtime: " + ort_message(e));
  }
}

void StageEngine::run_rows(size_t rows, const float* x, const float* t, const int64_t* y, float* out,
                           double* ort_seconds) const {
  const size_t B = stage.batch;
  std::vector<float> px, pt, pout;
  std::vector<int64_t> py;
  for (size_t lo = 0; lo < rows; lo += B) {
    size_t n = std::min(B, rows - lo);
    const float* cx = x + lo * x_row_;
    const int64_t* cy = y + lo;
    const float* ct = t + lo;
    float* cout = out + lo * out_row_;
    if (n < B) {  // pad with copies of the chunk's first row
      px.assign(cx, cx + n * x_row_);
      py.assign(cy, cy + n);
      pt.assign(ct, ct + n);
      for (size_t r = n; r < B; ++r) {
        px.insert(px.end(), cx, cx + x_row_);
        py.push_back(cy[0]);
        pt.push_back(ct[0]);
      }
      pout.resize(B * out_row_);
      double t0 = now();
      run_batch(px.data(), pt.data(), py.data(), pout.data());
      if (ort_seconds) *ort_seconds += now() - t0;
      std::copy(pout.begin(), pout.begin() + n * out_row_, cout);
    } else {
      double t0 = now();
      run_batch(cx, ct, cy, cout);
      if (ort_seconds) *ort_seconds += now() - t0;
    }
  }
}

DecoderEngine::DecoderEngine(OrtProcess& ort, const Bundle& bundle, const DecoderEntry& dec, SharedWeights& weights,
                             const SessionSettings& settings)
    : dec_(dec), graph_(ort, bundle, find_artifact(dec.artifacts, "onnx", "", "this graph"), weights, settings) {
  graph_.check_io(dec.inputs, dec.outputs[0], graph_.artifact->path + " (decoder)");
  batch_ = static_cast<size_t>(dec.inputs[0].shape.at(0));
  in_row_ = product(dec.inputs[0].shape);
  out_row_ = product(dec.outputs[0].shape);
  out_shape.assign(dec.outputs[0].shape.begin() + 1, dec.outputs[0].shape.end());
}

std::vector<float> DecoderEngine::run_rows(size_t rows, const float* z, double* ort_seconds) const {
  std::vector<float> out(rows * out_row_), in(batch_ * in_row_), o(batch_ * out_row_);
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  const char* in_names[1] = {dec_.inputs[0].name.c_str()};
  const char* out_names[1] = {dec_.outputs[0].name.c_str()};
  for (size_t lo = 0; lo < rows; lo += batch_) {
    size_t n = std::min(batch_, rows - lo);
    for (size_t r = 0; r < batch_; ++r) {
      const float* src = z + (lo + (r < n ? r : 0)) * in_row_;
      std::copy(src, src + in_row_, in.begin() + r * in_row_);
    }
    Ort::Value input = Ort::Value::CreateTensor<float>(mem, in.data(), in.size(), dec_.inputs[0].shape.data(),
                                                       dec_.inputs[0].shape.size());
    Ort::Value output = Ort::Value::CreateTensor<float>(mem, o.data(), o.size(), dec_.outputs[0].shape.data(),
                                                        dec_.outputs[0].shape.size());
    double t0 = now();
    try {
      graph_.session.Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, &output, 1);
    } catch (const Ort::Exception& e) {
      fail(ErrorKind::Runtime, "the decoder (" + graph_.artifact->path + ") failed in ONNX Runtime: " + ort_message(e));
    }
    if (ort_seconds) *ort_seconds += now() - t0;
    std::copy(o.begin(), o.begin() + n * out_row_, out.begin() + lo * out_row_);
  }
  return out;
}

}  // namespace flexdit_core
