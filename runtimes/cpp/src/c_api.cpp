// The C API (include/flexdit/flexdit.h) over the C++ core: every exception is caught here and
// turned into a status + thread-local message.
#include <flexdit/flexdit.h>

#include <cstring>
#include <new>
#include <string>

#include "error.hpp"
#include "model.hpp"
#include "ort_env.hpp"

struct flexdit_model {
  std::unique_ptr<flexdit::Model> model;
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
  } catch (const flexdit::Error& e) {
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

}  // namespace

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

void flexdit_load_options_init(flexdit_load_options* o) {
  if (!o) return;
  o->threads = 0;
  o->precision = nullptr;
  o->verify_checksums = 1;
  o->prepack_weights = 1;
  o->shared_graphs = 1;
}

flexdit_status flexdit_model_load(const char* dir, const flexdit_load_options* options, flexdit_model** out) {
  if (!dir) return null_arg("bundle_dir");
  if (!out) return null_arg("out_model");
  *out = nullptr;
  return guarded([&] {
    flexdit_load_options o;
    flexdit_load_options_init(&o);
    if (options) o = *options;
    flexdit::LoadOptions lo;
    lo.threads = o.threads;
    lo.precision = o.precision ? o.precision : "";
    lo.verify_checksums = o.verify_checksums != 0;
    lo.prepack_weights = o.prepack_weights != 0;
    lo.shared_graphs = o.shared_graphs != 0;
    auto handle = std::make_unique<flexdit_model>();
    handle->model = flexdit::Model::load(dir, lo);
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
    info->latent_channels = static_cast<int>(lat[0]);
    info->latent_height = static_cast<int>(lat[1]);
    info->latent_width = static_cast<int>(lat[2]);
    info->image_height = static_cast<int>(img[0]);
    info->image_width = static_cast<int>(img[1]);
    info->image_channels = static_cast<int>(img[2]);
    info->num_classes = m.num_classes;
    info->null_class = m.null_class;
    info->num_stages = static_cast<int>(m.stages.size());
    info->num_timesteps = m.num_timesteps;
    info->has_decoder = m.decoder ? 1 : 0;
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
      flexdit::fail(flexdit::ErrorKind::Prompt, "class id " + std::to_string(id) + " is outside 0.." +
                                                    std::to_string(model->model->manifest().num_classes - 1));
    std::string label = model->model->label(static_cast<int>(id));
    size_t n = std::min(label.size(), capacity - 1);
    std::memcpy(out, label.data(), n);
    out[n] = '\0';
  });
}

void flexdit_sample_options_init(flexdit_sample_options* o) {
  if (!o) return;
  std::memset(o, 0, sizeof *o);
  o->cfg_scale = -1;
  o->eta = -1;
  o->clip_denoised = -1;
}

flexdit_status flexdit_sample(const flexdit_model* model, const int64_t* class_ids, size_t n,
                              const flexdit_sample_options* options, float* samples, size_t samples_capacity,
                              uint8_t* images, size_t images_capacity, flexdit_timing* timing) {
  if (!model) return null_arg("model");
  if (!class_ids && n) return null_arg("class_ids");
  return guarded([&] {
    flexdit_sample_options o;
    flexdit_sample_options_init(&o);
    if (options) o = *options;
    const auto& m = model->model->manifest();
    std::vector<int> ids;
    for (size_t i = 0; i < n; ++i) {
      if (class_ids[i] < 0 || class_ids[i] >= m.num_classes)
        flexdit::fail(flexdit::ErrorKind::Prompt, "class id " + std::to_string(class_ids[i]) + " is outside 0.." +
                                                      std::to_string(m.num_classes - 1));
      ids.push_back(static_cast<int>(class_ids[i]));
    }
    auto lat = model->model->latent_shape();
    auto img = model->model->image_shape();
    size_t need_samples = n * lat[0] * lat[1] * lat[2], need_images = n * img[0] * img[1] * img[2];
    if (samples && samples_capacity < need_samples)
      flexdit::fail(flexdit::ErrorKind::Argument, "samples buffer holds " + std::to_string(samples_capacity) +
                                                      " floats; " + std::to_string(need_samples) + " needed");
    if (images && images_capacity < need_images)
      flexdit::fail(flexdit::ErrorKind::Argument, "images buffer holds " + std::to_string(images_capacity) +
                                                      " bytes; " + std::to_string(need_images) + " needed");
    flexdit::SampleOptions so;
    if (o.steps != 0) so.steps = o.steps;
    if (o.sampler) so.sampler = std::string(o.sampler);
    if (!(o.cfg_scale < 0)) so.cfg_scale = o.cfg_scale;  // NaN reaches the range check
    if (!(o.eta < 0)) so.eta = o.eta;
    if (o.spacing) so.spacing = o.spacing;
    if (o.clip_denoised >= 0) so.clip_denoised = o.clip_denoised != 0;
    if (o.seed > static_cast<uint64_t>(INT64_MAX)) flexdit::fail(flexdit::ErrorKind::Argument, "seed is too large");
    so.seed = static_cast<int64_t>(o.seed);
    so.batch = o.batch;
    so.init_noise = o.init_noise;
    so.init_noise_count = o.init_noise ? o.init_noise_count : 0;
    if (o.noise_fn) {
      auto fn = o.noise_fn;
      void* user = o.noise_user;
      so.noise_fn = [fn, user](int k, const std::vector<int>& idx, float* out) {
        if (fn(user, k, idx.data(), idx.size(), out) != 0)
          flexdit::fail(flexdit::ErrorKind::Argument, "the noise callback failed at step " + std::to_string(k));
      };
    }
    if (o.progress) {
      auto fn = o.progress;
      void* user = o.progress_user;
      so.progress = [fn, user] { fn(user); };
    }
    flexdit::SampleResult r = model->model->sample(ids, so);
    if (samples) std::copy(r.samples.begin(), r.samples.end(), samples);
    if (images) std::copy(r.images.pixels.begin(), r.images.pixels.end(), images);
    if (timing) {
      std::memset(timing, 0, sizeof *timing);
      timing->seconds = r.seconds;
      timing->ort_seconds = r.ort_seconds;
      timing->decoder_seconds = r.decoder_seconds;
      for (size_t i = 0; i < r.stage_seconds.size() && i < 16; ++i) timing->stage_seconds[i] = r.stage_seconds[i];
    }
  });
}

}  // extern "C"
