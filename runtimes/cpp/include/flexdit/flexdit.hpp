// flexdit.hpp - a thin header-only C++ wrapper over the C API (flexdit.h): RAII model handle,
// flexdit::Error exceptions carrying the status, std::vector outputs.
#pragma once
#include <flexdit/flexdit.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace flexdit {

class Error : public std::runtime_error {
 public:
  Error(flexdit_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  flexdit_status status() const { return status_; }

 private:
  flexdit_status status_;
};

inline void check(flexdit_status s) {
  if (s != FLEXDIT_OK) throw Error(s, flexdit_last_error());
}

inline std::string version() { return flexdit_version(); }

struct Images {
  std::vector<float> samples;   // n * C * H * W
  std::vector<uint8_t> pixels;  // n * H * W * C (uint8)
  flexdit_timing timing{};
};

struct SampleOptions {
  std::optional<int> steps;
  std::optional<std::string> sampler;
  std::optional<double> cfg_scale, eta;
  std::string spacing;  // "": the sampler's own (sections; linspace for the solvers)
  std::optional<bool> clip_denoised;
  uint64_t seed = 0;
  int batch = 0;
  std::vector<float> init_noise;  // empty: generated
  // k, indices -> (indices.size(), C, H, W) floats written to out
  std::function<void(int k, const std::vector<int>& indices, float* out)> noise_fn;
};

class Model {
 public:
  explicit Model(const std::string& bundle_dir, int threads = 0, const std::string& precision = "") {
    flexdit_load_options o;
    flexdit_load_options_init(&o);
    o.threads = threads;
    o.precision = precision.empty() ? nullptr : precision.c_str();
    check(flexdit_model_load(bundle_dir.c_str(), &o, &model_));
    check(flexdit_model_info_get(model_, &info_));
  }
  ~Model() { flexdit_model_free(model_); }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  Model(Model&& other) noexcept : model_(other.model_), info_(other.info_) { other.model_ = nullptr; }

  const flexdit_model_info& info() const { return info_; }
  flexdit_model* handle() const { return model_; }

  int64_t resolve(const std::string& prompt) const {
    int64_t id = 0;
    check(flexdit_model_resolve_class(model_, prompt.c_str(), &id));
    return id;
  }

  std::string label(int64_t id) const {
    char buf[256];
    check(flexdit_model_class_label(model_, id, buf, sizeof buf));
    return buf;
  }

  Images sample(const std::vector<int64_t>& class_ids, const SampleOptions& opt = {}) const {
    flexdit_sample_options o;
    flexdit_sample_options_init(&o);
    if (opt.steps) o.steps = *opt.steps;
    if (opt.sampler) o.sampler = opt.sampler->c_str();
    if (opt.cfg_scale) o.cfg_scale = *opt.cfg_scale;
    if (opt.eta) o.eta = *opt.eta;
    o.spacing = opt.spacing.empty() ? nullptr : opt.spacing.c_str();
    if (opt.clip_denoised) o.clip_denoised = *opt.clip_denoised ? 1 : 0;
    o.seed = opt.seed;
    o.batch = opt.batch;
    if (!opt.init_noise.empty()) {
      o.init_noise = opt.init_noise.data();
      o.init_noise_count = opt.init_noise.size();
    }
    struct Ctx {
      const SampleOptions* opt;
      std::string error;
    } ctx{&opt, {}};
    if (opt.noise_fn) {
      o.noise_user = &ctx;
      o.noise_fn = [](void* user, int k, const int* idx, size_t count, float* out) -> int {
        auto* c = static_cast<Ctx*>(user);
        try {
          c->opt->noise_fn(k, std::vector<int>(idx, idx + count), out);
          return 0;
        } catch (const std::exception& e) {
          c->error = e.what();
          return 1;
        }
      };
    }
    const size_t n = class_ids.size();
    Images out;
    out.samples.resize(n * info_.latent_channels * info_.latent_height * info_.latent_width);
    out.pixels.resize(n * info_.image_height * info_.image_width * info_.image_channels);
    flexdit_status s = flexdit_sample(model_, class_ids.data(), n, &o, out.samples.data(), out.samples.size(),
                                      out.pixels.data(), out.pixels.size(), &out.timing);
    if (s != FLEXDIT_OK) throw Error(s, ctx.error.empty() ? flexdit_last_error() : ctx.error);
    return out;
  }

 private:
  flexdit_model* model_ = nullptr;
  flexdit_model_info info_{};
};

}  // namespace flexdit
