// One graph (a stage, or the decoder) in an ONNX Runtime session, fed by the tensor names the
// manifest declares and checked at load against the graph's own inputs and outputs. Runs any
// number of rows in chunks of the graph's static batch (the last chunk padded with copies of its
// first row; padded rows' outputs are dropped). Run is safe from several threads at once.
// Stages whose graphs differ only in constants may share one session of the manifest's shared
// graph (`shared_graphs`), each feeding its own constants as extra inputs.
#pragma once
#include <atomic>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "ort_env.hpp"
#include "weights.hpp"

namespace flexdit_core {

// ONNX Runtime's container of pre-packed weights, shared by the sessions of one model so that
// the packed form of each shared weight exists once (the C++ API of 1.21 has no wrapper).
class PrepackedWeights {
 public:
  PrepackedWeights() { Ort::ThrowOnError(Ort::GetApi().CreatePrepackedWeightsContainer(&p_)); }
  ~PrepackedWeights() { Ort::GetApi().ReleasePrepackedWeightsContainer(p_); }
  PrepackedWeights(const PrepackedWeights&) = delete;
  PrepackedWeights& operator=(const PrepackedWeights&) = delete;
  OrtPrepackedWeightsContainer* get() const { return p_; }

 private:
  OrtPrepackedWeightsContainer* p_ = nullptr;
};

struct SessionSettings {
  bool prepack_weights = true;             // share pre-packed forms via `prepacked`
  PrepackedWeights* prepacked = nullptr;  // one per model
  bool shared_graphs = true;               // run stages through the manifest's shared graphs
};

// ONNX Runtime's level for a manifest's name of it (none | basic | extended | all).
GraphOptimizationLevel ort_level(const std::string& name);
GraphOptimizationLevel cpu_level(const std::string& precision);  // the level a stage graph runs at

class GraphSession {
 public:
  GraphSession(OrtProcess& ort, const Bundle& bundle, const Artifact& artifact, SharedWeights& weights,
               const SessionSettings& settings, GraphOptimizationLevel level = ORT_ENABLE_ALL);
  // A graph input the runtime feeds from a constant of its own (a shared graph's stage input).
  struct ExtraInput {
    std::string name, dtype;
    std::vector<int64_t> shape;
  };
  // Refuses (Error(Bundle)) graph inputs/outputs that disagree with the manifest's declarations.
  // `extra`: inputs fed beside the declared ones; each must be a graph input of that dtype and
  // rank (else "<extra_where> feeds ..."), and they are left out of the comparison.
  void check_io(const std::vector<TensorDecl>& inputs, const TensorDecl& output, const std::string& where,
                const std::vector<ExtraInput>& extra = {}, const std::string& extra_where = "") const;

  mutable Ort::Session session{nullptr};  // Run is thread-safe in ONNX Runtime
  const Artifact* artifact;
};

// The sessions of a model's shared graphs: one per graph, made by the first stage engine that
// asks for it (engines are built in parallel; the others wait for it). Used while loading.
class SharedSessions {
 public:
  using Ptr = std::shared_ptr<const GraphSession>;
  Ptr get(const std::string& id, const std::function<Ptr()>& make);  // rethrows make's error
  size_t size() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_future<Ptr>> sessions_;
};

class StageEngine {
 public:
  // With settings.shared_graphs, a stage whose artifact names a shared graph runs through that
  // graph's one session (from `shared`), fed its constants from the shared weight file.
  StageEngine(OrtProcess& ort, const Bundle& bundle, const Stage& stage, const Artifact& artifact,
              SharedWeights& weights, const SessionSettings& settings, SharedSessions* shared = nullptr);

  // rows of x (rows, C, H, W), a timestep per row t (fractional for euler: converted to the
  // declared dtype as numpy converts float32), labels y -> out (rows, Cout, H, W).
  // Adds the time spent inside Session::Run to *ort_seconds.
  void run_rows(size_t rows, const float* x, const float* t, const int64_t* y, float* out, double* ort_seconds) const;

  const Stage& stage;
  const Artifact& artifact;
  int batch() const { return stage.batch; }
  const SharedGraph* shared_graph() const { return shared_; }  // null: the stage's own graph
  const GraphSession& graph() const { return *graph_; }

 private:
  void run_batch(const float* x, const float* t, const int64_t* y, float* out) const;
  std::shared_ptr<const GraphSession> graph_;
  const SharedGraph* shared_ = nullptr;
  std::vector<std::string> const_names_;       // the shared graph's stage inputs
  std::vector<const OrtValue*> const_values_;  // this stage's constants (over the weight file bytes)
  size_t x_row_, out_row_;
  std::string t_dtype_;
};

class DecoderEngine {
 public:
  DecoderEngine(OrtProcess& ort, const Bundle& bundle, const DecoderEntry& dec, SharedWeights& weights,
                const SessionSettings& settings);
  // (rows, Cin, H, W) -> (rows, C_img, H_img, W_img)
  std::vector<float> run_rows(size_t rows, const float* z, double* ort_seconds) const;
  std::vector<int64_t> out_shape;  // per row: C, H, W

 private:
  const DecoderEntry& dec_;
  GraphSession graph_;
  size_t batch_, in_row_, out_row_;
};

}  // namespace flexdit_core
