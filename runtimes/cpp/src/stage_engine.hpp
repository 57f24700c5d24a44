// One graph (a stage, or the decoder) in an ONNX Runtime session, fed by the tensor names the
// manifest declares and checked at load against the graph's own inputs and outputs. Runs any
// number of rows in chunks of the graph's static batch (the last chunk padded with copies of its
// first row; padded rows' outputs are dropped). Run is safe from several threads at once.
#pragma once
#include <atomic>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "ort_env.hpp"
#include "weights.hpp"

namespace flexdit {

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
};

class GraphSession {
 public:
  GraphSession(OrtProcess& ort, const Bundle& bundle, const Artifact& artifact, SharedWeights& weights,
               const SessionSettings& settings);
  // Refuses (Error(Bundle)) graph inputs/outputs that disagree with the manifest's declarations.
  void check_io(const std::vector<TensorDecl>& inputs, const TensorDecl& output, const std::string& where) const;

  mutable Ort::Session session{nullptr};  // Run is thread-safe in ONNX Runtime
  const Artifact* artifact;
};

class StageEngine {
 public:
  StageEngine(OrtProcess& ort, const Bundle& bundle, const Stage& stage, const Artifact& artifact,
              SharedWeights& weights, const SessionSettings& settings);

  // rows of x (rows, C, H, W), one timestep for every row, labels y -> out (rows, Cout, H, W).
  // Adds the time spent inside Session::Run to *ort_seconds.
  void run_rows(size_t rows, const float* x, int t, const int64_t* y, float* out, double* ort_seconds) const;

  const Stage& stage;
  const Artifact& artifact;
  int batch() const { return stage.batch; }

 private:
  void run_batch(const float* x, int t, const int64_t* y, float* out) const;
  GraphSession graph_;
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

}  // namespace flexdit
