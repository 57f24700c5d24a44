// A loaded bundle, ready to sample: stage engines (weights shared), decoder, class index,
// sampling defaults. Immutable after load; sample() may be called from several threads at once.
#pragma once
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "diffusion.hpp"
#include "images.hpp"
#include "manifest.hpp"
#include "noise.hpp"
#include "prompts.hpp"
#include "samplers.hpp"

namespace flexdit_core {

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

class Model;

// One set of images walking the sampler chain together: made by Model::start, advanced by
// Model::step (one thread at a time per request), read by Model::finish. Mirrors the Python
// runtime's Request.
struct Request {
  const Model* model = nullptr;
  std::vector<int> class_ids;
  size_t first = 0;  // image index of class_ids[0]: its generator, noise_fn indices, messages
  SamplingParams params;
  std::optional<Diffusion> diffusion;     // ddpm, ddim
  std::optional<SolverSchedule> schedule;  // the solvers, with their history in `state`
  SolverState state;
  std::vector<ImageNoise> rngs;
  std::vector<float> x;  // the sampler state, (n, C, H, W)
  int k = -1;            // the next kept step to take; -1 when done
  NoiseFn noise_fn;
  std::function<void()> progress;
  std::exception_ptr failure;  // why sampling stopped early (finish rethrows it)
  std::vector<double> stage_seconds;  // this request's share of each stage's calls, by stage id
  double ort_seconds = 0, started = 0;

  size_t n() const { return class_ids.size(); }
  bool done() const { return k < 0; }
  bool solver() const { return schedule.has_value(); }
  int num_steps() const { return solver() ? schedule->num_steps() : diffusion->num_steps(); }
  double timestep() const { return solver() ? schedule->timestep(k) : diffusion->timestep_map[k]; }
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
  // One-shot: groups of `batch` images, each a request stepped to its end, decoded together.
  SampleResult sample(const std::vector<int>& class_ids, const SampleOptions& options) const;
  // The step-wise sampler. start checks everything sample() checks; `first` is the image index
  // of class_ids[0]. step advances every request by one step, rows of requests in the same
  // stage sharing engine calls; a request that fails stops with its own error (finish rethrows
  // it) while the others go on. Refused: a null, finished, repeated or other model's request.
  std::unique_ptr<Request> start(const std::vector<int>& class_ids, const SampleOptions& options, size_t first = 0) const;
  void step(const std::vector<Request*>& requests) const;
  SampleResult finish(const Request& request) const;

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
  void check_request(const std::vector<int>& class_ids, const SampleOptions& o) const;
  void advance(Request& r, const float* out, int sid) const;
  void decode(SampleResult& res) const;  // res.samples -> res.images
  std::unique_ptr<Impl> impl_;
  ClassIndex classes_;
};

}  // namespace flexdit_core
