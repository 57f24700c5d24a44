// The C API (include/flexdit/flexdit.h) over the C++ core: every exception is caught here and
// turned into a status + thread-local message.
#include <flexdit/flexdit.h>

#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <unordered_set>

#include "error.hpp"
#include "model.hpp"
#include "ort_env.hpp"

struct flexdit_model {
  std::unique_ptr<flexdit_core::Model> model;
  std::vector<std::string> precisions;
};

namespace {

thread_local std::string g_last_error;

flexdit_status set_error(flexdit_status s, const std::string& message) {
  g_last_error = message;
  return s;
}

template <typename F>
flexdit_status guarded(F&& body) {
  try {
    body();
    return FLEXDIT_OK;
  } catch (const flexdit_core::Error& e) {
    return set_error(static_cast<flexdit_status>(static_cast<int>(e.kind())), e.what());
  } catch (const std::bad_alloc&) {
    return set_error(FLEXDIT_ERR_MEMORY, "out of memory (try a smaller batch)");
  } catch (const Ort::Exception& e) {
    return set_error(FLEXDIT_ERR_RUNTIME, std::string("ONNX Runtime: ") + e.what());
  } catch (const std::exception& e) {
    return set_error(FLEXDIT_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return set_error(FLEXDIT_ERR_INTERNAL, "internal error: unknown exception");
  }
}

flexdit_status null_arg(const char* what) { return set_error(FLEXDIT_ERR_ARGUMENT, std::string(what) + " is NULL"); }

// The size of each struct at API 4, the smallest a caller may pass. When a field is appended,
// pin the struct's entry to offsetof(T, new_field), so callers built before it keep working.
template <typename T>
constexpr size_t kApi4Size = sizeof(T);

[[noreturn]] void arg_fail(const std::string& m) { flexdit_core::fail(flexdit_core::ErrorKind::Argument, m); }

// A caller's struct in this library's layout: `defaults` overlaid with the caller's first
// struct_size bytes. Fields the library does not know (a newer header) must be zero.
template <typename T>
T versioned_in(const T& given, T defaults, const char* what) {
  const size_t size = given.struct_size;
  if (size < kApi4Size<T>)
    arg_fail(std::string(what) + ".struct_size is " + std::to_string(size) + " (initialise it with " + what + "_init)");
  const auto* bytes = reinterpret_cast<const unsigned char*>(&given);
  for (size_t i = sizeof(T); i < size; ++i)
    if (bytes[i] != 0)
      arg_fail(std::string(what) + " sets fields this library (API " + std::to_string(FLEXDIT_API_VERSION) +
               ") does not know: upgrade the library or leave them zero");
  std::memcpy(&defaults, &given, std::min(size, sizeof(T)));
  defaults.struct_size = sizeof(T);
  return defaults;
}

// Writes `value` into the caller's struct: its first struct_size bytes, struct_size kept.
template <typename T>
void versioned_out(T* out, T value, const char* what) {
  const size_t size = out->struct_size;
  if (size < kApi4Size<T>)
    arg_fail(std::string(what) + ".struct_size is " + std::to_string(size) + " (initialise it with " + what + "_init)");
  value.struct_size = size;
  std::memcpy(out, &value, std::min(size, sizeof(T)));
}

// The request handles alive now: every request call checks its handle here first, so a freed or
// foreign pointer is an error rather than undefined behaviour.
std::mutex g_requests_mu;
std::unordered_set<const flexdit_request*> g_requests;

void check_live(const flexdit_request* r) {
  std::lock_guard<std::mutex> lock(g_requests_mu);
  if (!g_requests.count(r)) arg_fail("not a live request (freed already, or never started)");
}

std::vector<int> checked_ids(const flexdit_model* model, const int64_t* class_ids, size_t n) {
  const auto& m = model->model->manifest();
  std::vector<int> ids;
  for (size_t i = 0; i < n; ++i) {
    if (class_ids[i] < 0 || class_ids[i] >= m.num_classes)
      flexdit_core::fail(flexdit_core::ErrorKind::Prompt, "class id " + std::to_string(class_ids[i]) +
                                                              " is outside 0.." + std::to_string(m.num_classes - 1));
    ids.push_back(static_cast<int>(class_ids[i]));
  }
  return ids;
}

flexdit_sample_options sample_defaults() {
  flexdit_sample_options o;
  flexdit_sample_options_init(&o);
  return o;
}

flexdit_core::SampleOptions core_options(const flexdit_sample_options* options) {
  flexdit_sample_options o = options ? versioned_in(*options, sample_defaults(), "flexdit_sample_options")
                                     : sample_defaults();
  flexdit_core::SampleOptions so;
  if (o.steps != 0) so.steps = o.steps;
  if (o.sampler) so.sampler = std::string(o.sampler);
  if (!(o.cfg_scale < 0)) so.cfg_scale = o.cfg_scale;  // NaN reaches the range check
  if (!(o.eta < 0)) so.eta = o.eta;
  if (o.spacing) so.spacing = o.spacing;
  if (o.clip_denoised >= 0) so.clip_denoised = o.clip_denoised != 0;
  if (o.seed > static_cast<uint64_t>(INT64_MAX)) arg_fail("seed is too large");
  so.seed = static_cast<int64_t>(o.seed);
  so.batch = o.batch;
  so.init_noise = o.init_noise;
  so.init_noise_count = o.init_noise ? o.init_noise_count : 0;
  if (o.noise_fn) {
    auto fn = o.noise_fn;
    void* user = o.noise_user;
    so.noise_fn = [fn, user](int k, const std::vector<int>& idx, float* out) {
      if (fn(user, k, idx.data(), idx.size(), out) != 0)
        arg_fail("the noise callback failed at step " + std::to_string(k));
    };
  }
  if (o.progress) {
    auto fn = o.progress;
    void* user = o.progress_user;
    so.progress = [fn, user] { fn(user); };
  }
  return so;
}

// The outputs of n images: refuses buffers too small (before any work) and a timing struct the
// library cannot fill.
struct Outputs {
  float* samples;
  size_t samples_capacity;
  uint8_t* images;
  size_t images_capacity;
  flexdit_timing* timing;

  void check(const flexdit_model* model, size_t n) const {
    auto lat = model->model->latent_shape();
    auto img = model->model->image_shape();
    size_t need_samples = n * lat[0] * lat[1] * lat[2], need_images = n * img[0] * img[1] * img[2];
    if (samples && samples_capacity < need_samples)
      arg_fail("samples buffer holds " + std::to_string(samples_capacity) + " floats; " +
               std::to_string(need_samples) + " needed");
    if (images && images_capacity < need_images)
      arg_fail("images buffer holds " + std::to_string(images_capacity) + " bytes; " + std::to_string(need_images) +
               " needed");
    if (!timing) return;
    if (timing->struct_size < kApi4Size<flexdit_timing>)
      arg_fail("flexdit_timing.struct_size is " + std::to_string(timing->struct_size) +
               " (initialise it with flexdit_timing_init)");
    const size_t stages = model->model->manifest().stages.size();
    if (timing->stage_seconds && timing->stage_seconds_capacity < stages)
      arg_fail("stage_seconds holds " + std::to_string(timing->stage_seconds_capacity) + " values; " +
               std::to_string(stages) + " stages");
  }

  void write(const flexdit_core::SampleResult& r) const {
    if (samples) std::copy(r.samples.begin(), r.samples.end(), samples);
    if (images) std::copy(r.images.pixels.begin(), r.images.pixels.end(), images);
    if (!timing) return;
    flexdit_timing t;
    std::memset(&t, 0, sizeof t);
    t.seconds = r.seconds;
    t.ort_seconds = r.ort_seconds;
    t.decoder_seconds = r.decoder_seconds;
    t.stage_seconds = timing->stage_seconds;
    t.stage_seconds_capacity = timing->stage_seconds_capacity;
    t.num_stages = t.stage_seconds ? r.stage_seconds.size() : 0;
    if (t.stage_seconds) std::copy(r.stage_seconds.begin(), r.stage_seconds.end(), t.stage_seconds);
    versioned_out(timing, t, "flexdit_timing");
  }
};

// An *_init_size: the library's defaults `d` into the caller's struct_size bytes, the fields
// newer than this library zero (their default); a size below API 4's writes nothing.
template <typename T>
void write_defaults(T* o, size_t struct_size, T d) {
  if (!o || struct_size < kApi4Size<T>) return;
  std::memset(static_cast<void*>(o), 0, struct_size);
  d.struct_size = struct_size;
  std::memcpy(static_cast<void*>(o), &d, std::min(struct_size, sizeof d));
}

}  // namespace

struct flexdit_request {
  const flexdit_model* model;
  std::unique_ptr<flexdit_core::Request> request;
  bool finished = false;
};

extern "C" {

const char* flexdit_version(void) { return FLEXDIT_VERSION_STRING; }
int flexdit_api_version(void) { return FLEXDIT_API_VERSION; }
const char* flexdit_last_error(void) { return g_last_error.c_str(); }

const char* flexdit_status_name(flexdit_status s) {
  switch (s) {
    case FLEXDIT_OK: return "ok";
    case FLEXDIT_ERR_BUNDLE: return "bundle error";
    case FLEXDIT_ERR_PROMPT: return "prompt error";
    case FLEXDIT_ERR_ARGUMENT: return "invalid argument";
    case FLEXDIT_ERR_RUNTIME: return "ONNX Runtime error";
    case FLEXDIT_ERR_IO: return "I/O error";
    case FLEXDIT_ERR_MEMORY: return "out of memory";
    default: return "internal error";
  }
}

void flexdit_load_options_init_size(flexdit_load_options* o, size_t struct_size) {
  flexdit_load_options d;
  std::memset(&d, 0, sizeof d);
  d.threads = 0;
  d.precision = nullptr;
  d.verify_checksums = 1;
  d.prepack_weights = 1;
  d.shared_graphs = 1;
  write_defaults(o, struct_size, d);
}

flexdit_status flexdit_model_load(const char* dir, const flexdit_load_options* options, flexdit_model** out) {
  if (!dir) return null_arg("bundle_dir");
  if (!out) return null_arg("out_model");
  *out = nullptr;
  return guarded([&] {
    flexdit_load_options defaults;
    flexdit_load_options_init(&defaults);
    flexdit_load_options o = options ? versioned_in(*options, defaults, "flexdit_load_options") : defaults;
    flexdit_core::LoadOptions lo;
    lo.threads = o.threads;
    lo.precision = o.precision ? o.precision : "";
    lo.verify_checksums = o.verify_checksums != 0;
    lo.prepack_weights = o.prepack_weights != 0;
    lo.shared_graphs = o.shared_graphs != 0;
    auto handle = std::make_unique<flexdit_model>();
    handle->model = flexdit_core::Model::load(dir, lo);
    handle->precisions = handle->model->precisions();
    *out = handle.release();
  });
}

void flexdit_model_free(flexdit_model* model) { delete model; }

flexdit_status flexdit_model_info_get(const flexdit_model* model, flexdit_model_info* info) {
  if (!model) return null_arg("model");
  if (!info) return null_arg("out_info");
  return guarded([&] {
    const auto& m = model->model->manifest();
    auto lat = model->model->latent_shape();
    auto img = model->model->image_shape();
    flexdit_model_info v;
    std::memset(&v, 0, sizeof v);
    v.latent_channels = static_cast<int>(lat[0]);
    v.latent_height = static_cast<int>(lat[1]);
    v.latent_width = static_cast<int>(lat[2]);
    v.image_height = static_cast<int>(img[0]);
    v.image_width = static_cast<int>(img[1]);
    v.image_channels = static_cast<int>(img[2]);
    v.num_classes = m.num_classes;
    v.null_class = m.null_class;
    v.num_stages = static_cast<int>(m.stages.size());
    v.num_timesteps = m.num_timesteps;
    v.has_decoder = m.decoder ? 1 : 0;
    versioned_out(info, v, "flexdit_model_info");
  });
}

const char* flexdit_model_stage_precision(const flexdit_model* model, int stage) {
  if (!model || stage < 0 || stage >= static_cast<int>(model->precisions.size())) return nullptr;
  return model->precisions[stage].c_str();
}

flexdit_status flexdit_model_resolve_class(const flexdit_model* model, const char* prompt, int64_t* out) {
  if (!model) return null_arg("model");
  if (!prompt) return null_arg("prompt");
  if (!out) return null_arg("out_class_id");
  return guarded([&] { *out = model->model->resolve_class(prompt); });
}

flexdit_status flexdit_model_class_label(const flexdit_model* model, int64_t id, char* out, size_t capacity) {
  if (!model) return null_arg("model");
  if (!out || capacity == 0) return null_arg("out");
  return guarded([&] {
    if (id < 0 || id >= model->model->manifest().num_classes)
      flexdit_core::fail(flexdit_core::ErrorKind::Prompt, "class id " + std::to_string(id) + " is outside 0.." +
                                                    std::to_string(model->model->manifest().num_classes - 1));
    std::string label = model->model->label(static_cast<int>(id));
    size_t n = std::min(label.size(), capacity - 1);
    std::memcpy(out, label.data(), n);
    out[n] = '\0';
  });
}

void flexdit_sample_options_init_size(flexdit_sample_options* o, size_t struct_size) {
  flexdit_sample_options d;
  std::memset(&d, 0, sizeof d);
  d.cfg_scale = -1;
  d.eta = -1;
  d.clip_denoised = -1;
  write_defaults(o, struct_size, d);
}

flexdit_status flexdit_sample(const flexdit_model* model, const int64_t* class_ids, size_t n,
                              const flexdit_sample_options* options, float* samples, size_t samples_capacity,
                              uint8_t* images, size_t images_capacity, flexdit_timing* timing) {
  if (!model) return null_arg("model");
  if (!class_ids && n) return null_arg("class_ids");
  return guarded([&] {
    std::vector<int> ids = checked_ids(model, class_ids, n);
    Outputs outputs{samples, samples_capacity, images, images_capacity, timing};
    outputs.check(model, n);
    flexdit_core::SampleOptions so = core_options(options);
    outputs.write(model->model->sample(ids, so));
  });
}

flexdit_status flexdit_request_start(const flexdit_model* model, const int64_t* class_ids, size_t n,
                                     const flexdit_sample_options* options, flexdit_request** out) {
  if (!model) return null_arg("model");
  if (!class_ids && n) return null_arg("class_ids");
  if (!out) return null_arg("out_request");
  *out = nullptr;
  return guarded([&] {
    std::vector<int> ids = checked_ids(model, class_ids, n);
    auto handle = std::make_unique<flexdit_request>();
    handle->model = model;
    handle->request = model->model->start(ids, core_options(options));
    std::lock_guard<std::mutex> lock(g_requests_mu);
    g_requests.insert(handle.get());
    *out = handle.release();
  });
}

flexdit_status flexdit_request_step(const flexdit_model* model, flexdit_request* const* requests, size_t count) {
  if (!model) return null_arg("model");
  if (!requests && count) return null_arg("requests");
  return guarded([&] {
    std::vector<flexdit_core::Request*> core;
    for (size_t i = 0; i < count; ++i) {
      if (!requests[i]) arg_fail("requests[" + std::to_string(i) + "] is NULL");
      check_live(requests[i]);
      if (requests[i]->model != model) arg_fail("requests[" + std::to_string(i) + "] belongs to another model");
      if (requests[i]->request->done())
        arg_fail("requests[" + std::to_string(i) + "] has no steps left (finish it; step only requests with steps left)");
      core.push_back(requests[i]->request.get());
    }
    model->model->step(core);
  });
}

flexdit_status flexdit_request_steps_left(const flexdit_request* request, int* out) {
  if (!request) return null_arg("request");
  if (!out) return null_arg("out_steps_left");
  return guarded([&] {
    check_live(request);
    *out = request->request->k + 1;
  });
}

flexdit_status flexdit_request_finish(flexdit_request* request, float* samples, size_t samples_capacity,
                                      uint8_t* images, size_t images_capacity, flexdit_timing* timing) {
  if (!request) return null_arg("request");
  return guarded([&] {
    check_live(request);
    if (request->finished) arg_fail("the request was finished already");
    const flexdit_core::Request& r = *request->request;
    if (!r.done()) arg_fail("the request has " + std::to_string(r.k + 1) + " steps left (step it until none are)");
    Outputs outputs{samples, samples_capacity, images, images_capacity, timing};
    outputs.check(request->model, r.n());
    request->finished = true;
    outputs.write(request->model->model->finish(r));
  });
}

flexdit_status flexdit_request_free(flexdit_request* request) {
  if (!request) return FLEXDIT_OK;
  return guarded([&] {
    {
      std::lock_guard<std::mutex> lock(g_requests_mu);
      if (!g_requests.erase(request)) arg_fail("not a live request (freed already, or never started)");
    }
    delete request;
  });
}

}  // extern "C"
