// A loaded bundle, ready to sample: stage engines (weights shared), decoder, class index,
// sampling defaults. Immutable after load; sample() may be called from several threads at once.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "diffusion.hpp"
#include "images.hpp"
#include "manifest.hpp"
#include "prompts.hpp"

namespace flexdit {

struct LoadOptions {
  int threads = 0;             // size of the process's shared intra-op pool (0: ORT's default)
  std::string precision;       // precision grammar override ("" = each stage's default)
  std::string providers;       // "" or "cpu" (this build runs the CPU execution provider)
  std::string backend = "onnx";
  bool verify_checksums = true;
  bool prepack_weights = true;  // share ORT's pre-packed weights between stage sessions
  bool shared_graphs = true;    // one session per shared graph of the manifest instead of one per stage
};

struct SamplingParams {
  int steps = 0;
  std::string sampler, spacing;  // spacing resolved: sections, ddim or linspace
  double cfg_scale = 0, eta = 0;
  bool clip_denoised = false;
  bool guided() const { return cfg_scale > 1; }
};

// noise_fn(k, indices, out): the fresh noise of step k for the images at `indices` (positions in
// the prompt list), written as (indices.size(), C, H, W) float32.
using NoiseFn = std::function<void(int k, const std::vector<int>& indices, float* out)>;

struct SampleOptions {
  std::optional<int> steps;
  std::optional<std::string> sampler;
  std::optional<double> cfg_scale, eta;      // eta: ddim only (a solver refuses one)
  std::optional<std::string> spacing;        // unset: the sampler's own (solvers linspace, else sections)
  std::optional<bool> clip_denoised;
  int64_t seed = 0;
  int batch = 0;                      // images denoised together (0: what one graph call holds)
  const float* init_noise = nullptr;  // x_T: n*C*H*W values, or C*H*W for every image
  size_t init_noise_count = 0;
  NoiseFn noise_fn;                   // null: the documented per-image generator (noise.hpp)
  std::function<void()> progress;     // after every step of every group
};

struct SampleResult {
  std::vector<int> class_ids;
  std::vector<std::string> labels;
  std::vector<int64_t> sample_shape;  // (n, C, H, W)
  std::vector<float> samples;         // final sampler state, float32
  Images images;                      // (n, h, w, c) uint8
  double seconds = 0, decoder_seconds = 0;
  double ort_seconds = 0;             // inside ONNX Runtime Run calls (stages + decoder)
  std::vector<double> stage_seconds;  // per stage id
};

class Model {
 public:
  static std::unique_ptr<Model> load(const std::string& bundle_dir, const LoadOptions& options = {});
  ~Model();

  SamplingParams params(const SampleOptions& o) const;  // defaults filled, every value checked
  Diffusion diffusion(int steps, const std::string& spacing) const;  // ddpm, ddim
  SolverSchedule solver_schedule(const std::string& sampler, int steps, const std::string& spacing) const;
  int resolve_class(const std::string& prompt, const std::string& where = "") const { return classes_.resolve(prompt, where); }
  std::string label(int id) const { return classes_.label(id); }
  int capacity(double cfg_scale) const;  // images per call of the smallest stage graph
  SampleResult sample(const std::vector<int>& class_ids, const SampleOptions& options) const;

  const Manifest& manifest() const;
  std::vector<std::string> precisions() const;  // the artifact precision each stage runs
  std::vector<int64_t> latent_shape() const;    // C, H, W
  std::vector<int64_t> image_shape() const;     // H, W, C of the uint8 images
  uint64_t shared_weight_bytes() const;
  // The shared graph each stage runs through ("" for a stage with its own session).
  std::vector<std::string> shared_graph_paths() const;
  size_t session_count() const;  // ONNX Runtime sessions of the stages (the decoder not counted)

  struct Impl;

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  ClassIndex classes_;
};

}  // namespace flexdit
