// flexdit-run-cpp: prompts.txt -> one PNG per prompt plus a grid, from a bundle; the C++ twin of
// flexdit-run (runtimes/python/flexdit_runtime/cli.py). Every failure a user can cause ends with
// one line "flexdit-run-cpp: error: ..." on stderr and exit code 2; the output directory only
// receives files once all images are done.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <regex>
#include <sstream>

#include "cli_args.hpp"
#include "error.hpp"
#include "images.hpp"
#include "json_text.hpp"
#include "model.hpp"
#include "npy.hpp"
#include "ort_env.hpp"
#include "output_dir.hpp"
#include "prompts.hpp"

namespace fs = std::filesystem;
using namespace flexdit_core;

namespace {

const char* kProg = "flexdit-run-cpp";

class Progress {
 public:
  Progress(size_t total, bool enabled) : total_(total), enabled_(enabled), tty_(isatty(2)), start_(now()) {}
  void tick() {
    ++done_;
    if (!enabled_ || !tty_) return;
    double frac = static_cast<double>(done_) / std::max<size_t>(1, total_);
    std::string bar(static_cast<size_t>(frac * 30), '#');
    bar.resize(30, ' ');
    std::fprintf(stderr, "\rsampling [%s] %zu/%zu steps %.1f it/s", bar.c_str(), done_, total_,
                 done_ / std::max(1e-9, now() - start_));
    std::fflush(stderr);
  }
  void close() {
    if (enabled_) std::fprintf(stderr, "%ssampling: %zu steps in %.1fs\n", tty_ ? "\n" : "", done_, now() - start_);
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  size_t total_, done_ = 0;
  bool enabled_, tty_;
  double start_;
};

std::string safe_name(const std::string& label) {
  std::string s = std::regex_replace(label, std::regex("[^A-Za-z0-9_-]+"), "_");
  size_t a = s.find_first_not_of('_'), b = s.find_last_not_of('_');
  s = a == std::string::npos ? "" : s.substr(a, b - a + 1);
  s = s.substr(0, 40);
  return s.empty() ? "class" : s;
}

std::vector<float> to_f32(const NpyArray& a) {
  std::vector<float> out(a.values.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(a.values[i]);
  return out;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

int run(const flexdit_cli::Args& args) {
  if (args.grid_scale && (*args.grid_scale < 1 || *args.grid_scale > static_cast<int>(kGridScaleMax)))
    fail(ErrorKind::Argument, "--grid-scale must be in 1.." + std::to_string(kGridScaleMax) + ", got " +
                                  std::to_string(*args.grid_scale));
  std::vector<std::string> prompts = read_prompts(args.prompts);
  fs::path out = args.out ? fs::path(*args.out) : flexdit_cli::fresh_output_dir();
  flexdit_cli::check_output_dir(out, args.force);
  LoadOptions lo;
  lo.threads = args.threads.value_or(0);
  if (args.threads && *args.threads < 1)
    fail(ErrorKind::Argument, "--threads must be a positive integer, got " + std::to_string(*args.threads));
  lo.precision = args.precision.value_or("");
  lo.providers = args.providers.value_or("");
  lo.backend = args.backend;
  lo.prepack_weights = args.prepack;
  lo.shared_graphs = args.shared_graphs;
  auto model = Model::load(args.bundle, lo);
  std::vector<int> ids;
  for (auto& p : prompts) ids.push_back(model->resolve_class(p, args.prompts + ": "));
  SampleOptions so;
  so.steps = args.steps;
  so.sampler = args.sampler;
  so.cfg_scale = args.cfg_scale;
  so.eta = args.eta;
  so.spacing = args.spacing;
  so.clip_denoised = args.clip_denoised;
  so.seed = args.seed;
  if (args.seed < 0) fail(ErrorKind::Argument, "--seed must be at least 0, got " + std::to_string(args.seed));
  if (args.batch && *args.batch < 1) fail(ErrorKind::Argument, "--batch must be at least 1, got " + std::to_string(*args.batch));
  so.batch = args.batch.value_or(0);
  auto lat = model->latent_shape();
  const size_t n = ids.size(), per = lat[0] * lat[1] * lat[2];
  // noise files are read once the bundle says how large they are: no more bytes than that
  std::vector<float> init;
  if (args.init_noise) {
    std::vector<int64_t> want = {static_cast<int64_t>(n), lat[0], lat[1], lat[2]};
    std::vector<int64_t> one(lat.begin(), lat.end());
    NpyArray init_arr;
    try {
      init_arr = read_npy(*args.init_noise, [&](const std::vector<int64_t>& shape) {
        if (shape != want && shape != one)
          fail(ErrorKind::Argument, "initial noise has shape " + shape_str(shape) + "; expected " + shape_str(want) +
                                        " or " + shape_str(one));
      });
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::Io) throw;
      fail(ErrorKind::Io, std::string("cannot read --init-noise ") + *args.init_noise + ": " +
                              std::string(e.what()).substr(std::string(e.what()).find(": ") + 2));
    }
    init = to_f32(init_arr);
    so.init_noise = init.data();
    so.init_noise_count = init.size();
  }
  SamplingParams params = model->params(so);
  std::vector<float> step_noise;
  if (args.step_noise) {
    std::vector<int64_t> want = {params.steps, static_cast<int64_t>(n), lat[0], lat[1], lat[2]};
    step_noise = to_f32(read_npy(*args.step_noise, [&](const std::vector<int64_t>& shape) {
      if (shape != want)
        fail(ErrorKind::Argument, "--step-noise has shape " + shape_str(shape) + "; expected " + shape_str(want));
    }));
    for (float v : step_noise)
      if (!std::isfinite(v)) fail(ErrorKind::Argument, "--step-noise holds NaN or infinite values");
    so.noise_fn = [&](int k, const std::vector<int>& idx, float* dst) {
      for (size_t i = 0; i < idx.size(); ++i) {
        const float* src = step_noise.data() + (static_cast<size_t>(k) * n + idx[i]) * per;
        std::copy(src, src + per, dst + i * per);
      }
    };
  }
  size_t per_call = so.batch > 0 ? so.batch : model->capacity(params.cfg_scale);
  Progress bar(params.steps * ((n + per_call - 1) / per_call), !args.quiet && !args.json);
  so.progress = [&] { bar.tick(); };
  SampleResult res = model->sample(ids, so);
  bar.close();
  flexdit_cli::write_outputs(out, args.force, [&](const fs::path& tmp) {
    const Images& im = res.images;
    size_t img_bytes = im.h * im.w * im.c;
    for (size_t i = 0; i < im.n; ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "%03zu_", i);
      write_png(tmp / (name + safe_name(res.labels[i]) + ".png"), im.pixels.data() + i * img_bytes, im.h, im.w, im.c);
    }
    Images g = make_grid(im, 0, 2, static_cast<size_t>(args.grid_scale.value_or(0)));
    write_png(tmp / "grid.png", g.pixels.data(), g.h, g.w, g.c);
    if (args.save_npy) write_npy_f32(tmp / "samples.npy", res.samples.data(), res.sample_shape);
  });
  double total = res.seconds;
  auto precisions = model->precisions();
  auto shared = model->shared_graph_paths();
  if (args.json) {
    json j = {{"out", out.string()}, {"images", res.images.n}, {"labels", res.labels}, {"seconds", total},
              {"ort_seconds", res.ort_seconds}, {"decoder_seconds", res.decoder_seconds}};
    j["stage_seconds"] = json::object();
    j["engines"] = json::array();
    for (size_t s = 0; s < res.stage_seconds.size(); ++s) {
      j["stage_seconds"][std::to_string(s)] = res.stage_seconds[s];
      const Stage& st = model->manifest().stages[s];
      j["engines"].push_back({{"stage", st.id}, {"kind", "onnx"}, {"precision", precisions[s]}, {"batch", st.batch}});
      if (!shared[s].empty()) j["engines"].back()["shared_graph"] = shared[s];
    }
    std::printf("%s\n", j.dump(2).c_str());
  } else if (!args.quiet) {
    std::ostringstream shares, precs;
    char buf[64];
    for (size_t s = 0; s < res.stage_seconds.size(); ++s) {
      std::snprintf(buf, sizeof buf, "%sstage %zu: %.0f%%", s ? ", " : "", s, 100.0 * res.stage_seconds[s] / total);
      shares << buf;
    }
    if (res.decoder_seconds > 0) {
      std::snprintf(buf, sizeof buf, ", decoder: %.0f%%", 100.0 * res.decoder_seconds / total);
      shares << buf;
    }
    std::ostringstream engines;
    for (size_t s = 0; s < precisions.size(); ++s) {
      precs << (s ? ", " : "") << s << ": " << precisions[s];
      engines << (s ? ", " : "") << s << ": onnx " << precisions[s];
    }
    std::printf("wrote %zu images and grid.png to %s/\n", res.images.n, out.string().c_str());
    std::printf("precision per stage: %s\n", precs.str().c_str());
    std::printf("engine per stage: %s\n", engines.str().c_str());
    std::printf("%.2f s per image (%.1f s total; %s)\n", total / n, total, shares.str().c_str());
    std::printf("outside ONNX Runtime: %.2f%% of the trajectory\n", 100.0 * (total - res.ort_seconds) / total);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  flexdit_cli::Args args;
  try {
    args = flexdit_cli::parse_args(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const flexdit_cli::UsageError& e) {
    std::fprintf(stderr, "%s: error: %s (see --help)\n", kProg, e.what());
    return 2;
  }
  if (args.help) {
    std::fputs(flexdit_cli::usage_text().c_str(), stdout);
    return 0;
  }
  if (args.version) {
    std::printf("flexdit-run-cpp %s (onnxruntime %s)\n", FLEXDIT_VERSION_STRING, OrtProcess::library_version().c_str());
    return 0;
  }
  try {
    return run(args);
  } catch (const Error& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    std::fprintf(stderr, "%s: error: %s\n", kProg, msg.c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: error: out of memory (try a smaller --batch)\n", kProg);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: internal error: %s\n", kProg, e.what());
    return 1;
  }
}
