// flexdit.hpp - a thin header-only C++ wrapper over the C API (flexdit.h): RAII model handle,
// flexdit::Error exceptions carrying the status, std::vector outputs.
#pragma once
#include <flexdit/flexdit.h>

#include <functional>
#include <memory>
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
  flexdit_timing timing{};      // timing.stage_seconds points into stage_seconds
  std::vector<double> stage_seconds;  // per stage id
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

namespace detail {

// SampleOptions as the C struct, with the noise callback's context; lives as long as the call
// or request that uses it (the C struct points into it).
struct CallOptions {
  explicit CallOptions(const SampleOptions& opt) : opt(opt) {
    flexdit_sample_options_init(&c);
    if (opt.steps) c.steps = *opt.steps;
    if (opt.sampler) c.sampler = this->opt.sampler->c_str();
    if (opt.cfg_scale) c.cfg_scale = *opt.cfg_scale;
    if (opt.eta) c.eta = *opt.eta;
    c.spacing = opt.spacing.empty() ? nullptr : this->opt.spacing.c_str();
    if (opt.clip_denoised) c.clip_denoised = *opt.clip_denoised ? 1 : 0;
    c.seed = opt.seed;
    c.batch = opt.batch;
    if (!opt.init_noise.empty()) {
      c.init_noise = this->opt.init_noise.data();
      c.init_noise_count = opt.init_noise.size();
    }
    if (opt.noise_fn) {
      c.noise_user = this;
      c.noise_fn = [](void* user, int k, const int* idx, size_t count, float* out) -> int {
        auto* self = static_cast<CallOptions*>(user);
        try {
          self->opt.noise_fn(k, std::vector<int>(idx, idx + count), out);
          return 0;
        } catch (const std::exception& e) {
          self->error = e.what();
          return 1;
        }
      };
    }
  }
  CallOptions(const CallOptions&) = delete;
  CallOptions& operator=(const CallOptions&) = delete;
  // the callback's own message where it threw, else the library's
  void check(flexdit_status s) const {
    if (s != FLEXDIT_OK) throw Error(s, error.empty() ? flexdit_last_error() : error);
  }

  SampleOptions opt;
  flexdit_sample_options c;
  std::string error;
};

inline Images make_images(const flexdit_model_info& info, size_t n) {
  Images out;
  out.samples.resize(n * info.latent_channels * info.latent_height * info.latent_width);
  out.pixels.resize(n * info.image_height * info.image_width * info.image_channels);
  out.stage_seconds.resize(static_cast<size_t>(info.num_stages));
  flexdit_timing_init(&out.timing, out.stage_seconds.data(), out.stage_seconds.size());
  return out;
}

}  // namespace detail

class Model;

// One set of images walking the sampler chain (Model::start, Model::step, finish()).
class Request {
 public:
  Request(Request&& other) noexcept
      : request_(other.request_), info_(other.info_), n_(other.n_), options_(std::move(other.options_)) {
    other.request_ = nullptr;
  }
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request() { flexdit_request_free(request_); }

  int steps_left() const {
    int left = 0;
    check(flexdit_request_steps_left(request_, &left));
    return left;
  }
  bool done() const { return steps_left() == 0; }
  // The request's images, or the error that stopped it.
  Images finish() {
    Images out = detail::make_images(info_, n_);
    options_->check(flexdit_request_finish(request_, out.samples.data(), out.samples.size(), out.pixels.data(),
                                           out.pixels.size(), &out.timing));
    return out;
  }
  flexdit_request* handle() const { return request_; }

 private:
  friend class Model;
  Request(flexdit_request* r, const flexdit_model_info& info, size_t n, std::unique_ptr<detail::CallOptions> o)
      : request_(r), info_(info), n_(n), options_(std::move(o)) {}
  flexdit_request* request_;
  flexdit_model_info info_;
  size_t n_;
  std::unique_ptr<detail::CallOptions> options_;
};

class Model {
 public:
  explicit Model(const std::string& bundle_dir, int threads = 0, const std::string& precision = "") {
    flexdit_load_options o;
    flexdit_load_options_init(&o);
    o.threads = threads;
    o.precision = precision.empty() ? nullptr : precision.c_str();
    check(flexdit_model_load(bundle_dir.c_str(), &o, &model_));
    flexdit_model_info_init(&info_);
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
    detail::CallOptions o(opt);
    Images out = detail::make_images(info_, class_ids.size());
    o.check(flexdit_sample(model_, class_ids.data(), class_ids.size(), &o.c, out.samples.data(), out.samples.size(),
                           out.pixels.data(), out.pixels.size(), &out.timing));
    return out;
  }

  // The step-wise sampler: start requests, step them together until done, finish each.
  Request start(const std::vector<int64_t>& class_ids, const SampleOptions& opt = {}) const {
    auto o = std::make_unique<detail::CallOptions>(opt);
    flexdit_request* r = nullptr;
    o->check(flexdit_request_start(model_, class_ids.data(), class_ids.size(), &o->c, &r));
    return Request(r, info_, class_ids.size(), std::move(o));
  }
  void step(const std::vector<Request*>& requests) const {
    std::vector<flexdit_request*> handles;
    for (Request* r : requests) handles.push_back(r->handle());
    check(flexdit_request_step(model_, handles.data(), handles.size()));
  }

 private:
  flexdit_model* model_ = nullptr;
  flexdit_model_info info_{};
};

}  // namespace flexdit
