#include "model.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <future>
#include <set>
#include <thread>

#include "error.hpp"
#include "noise.hpp"
#include "precision.hpp"
#include "samplers.hpp"
#include "stage_engine.hpp"

namespace flexdit_core {

struct Model::Impl {
  Bundle bundle;
  OrtProcess* ort = nullptr;
  std::unique_ptr<SharedWeights> weights;
  std::unique_ptr<PrepackedWeights> prepacked;
  std::vector<std::unique_ptr<StageEngine>> engines;  // by stage id
  std::unique_ptr<DecoderEngine> decoder;
  ~Impl() {  // sessions before the buffers and pre-packed weights they use
    decoder.reset();
    engines.clear();
    prepacked.reset();
    weights.reset();
  }
};

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

[[noreturn]] void arg_error(const std::string& m) { fail(ErrorKind::Argument, m); }

std::string fmt_g(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// the spacing a sampler runs with (unset: its own), or one line on what it cannot use
std::string spacing_for(const std::string& sampler, const std::optional<std::string>& spacing) {
  if (!spacing) return is_solver(sampler) ? "linspace" : "sections";
  const std::string& s = *spacing;
  if (s != "sections" && s != "ddim" && s != "linspace")
    arg_error("unknown spacing '" + s + "' (choose from sections, ddim, linspace)");
  if (s == "linspace" && !is_solver(sampler))
    arg_error("--spacing linspace is for " + joined(kSolvers) + "; " + sampler + " takes sections or ddim");
  if (s != "linspace" && sampler == "euler")
    arg_error("--spacing " + s + " does not apply to euler (it places fractional timesteps, linspace only)");
  return s;
}

// a timestep as Python prints it: an integer without ".0", else the shortest repr of the float
std::string timestep_text(double t) {
  if (t == std::floor(t)) return std::to_string(static_cast<long long>(t));
  char buf[64];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, t);
    if (std::strtod(buf, nullptr) == t) break;
  }
  return buf;
}

// first image indices (positions in the prompt list) whose rows hold a non-finite value
std::vector<int> nonfinite_images(const float* v, size_t rows, size_t row_len, size_t g, size_t lo) {
  std::vector<int> bad;
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < row_len; ++i)
      if (!std::isfinite(v[r * row_len + i])) {
        int img = static_cast<int>(lo + r % g);
        if (std::find(bad.begin(), bad.end(), img) == bad.end()) bad.push_back(img);
        break;
      }
  std::sort(bad.begin(), bad.end());
  return bad;
}

// a request whose state stopped being finite would end as a black image: refuse it, naming where and why
[[noreturn]] void nonfinite(const std::vector<int>& bad, int k, int K, int sid, double t, const std::string& cause,
                            ErrorKind kind = ErrorKind::Argument) {
  std::string shown;
  for (size_t i = 0; i < bad.size() && i < 8; ++i) shown += (i ? ", " : "") + std::to_string(bad[i]);
  if (bad.size() > 8) shown += ", ...";
  fail(kind, "sampling produced NaN or infinite values for image(s) " + shown + " at step " + std::to_string(K - k) +
                 " of " + std::to_string(K) + " (stage " + std::to_string(sid) + ", t=" + timestep_text(t) + "): " + cause);
}

double check_real(const std::string& name, double v, double lo, std::optional<double> hi) {
  if (!std::isfinite(v)) arg_error("--" + name + " must be a finite number, got " + fmt_g(v));
  if (v < lo || (hi && v > *hi))
    arg_error("--" + name + " must be " + (hi ? "in [" + fmt_g(lo) + ", " + fmt_g(*hi) + "]" : "at least " + fmt_g(lo)) +
              ", got " + fmt_g(v));
  return v;
}

// the artifact a stage runs: the requested precision, else its default_precision, else the first
const Artifact& choose_artifact(const Stage& st, const std::string& want) {
  std::string what = "stage " + std::to_string(st.id);
  if (!want.empty()) return find_artifact(st.artifacts, "onnx", want, what);
  if (!st.default_precision.empty())
    for (auto& a : st.artifacts)
      if (a.backend == "onnx" && a.precision == st.default_precision) return a;
  return find_artifact(st.artifacts, "onnx", "", what);
}

}  // namespace

Model::Model(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)), classes_(impl_->bundle.manifest.class_names, impl_->bundle.manifest.num_classes) {}

Model::~Model() = default;

std::unique_ptr<Model> Model::load(const std::string& dir, const LoadOptions& o) {
  if (o.threads < 0) arg_error("--threads must be a positive integer, got " + std::to_string(o.threads));
  if (o.backend != "onnx")
    arg_error("backend '" + o.backend + "' is not available in the C++ runtime (it runs the bundle's ONNX graphs: --backend onnx)");
  if (!o.providers.empty()) {
    std::string p = o.providers;
    std::transform(p.begin(), p.end(), p.begin(), ::tolower);
    size_t start = 0;
    while (start <= p.size()) {
      size_t c = p.find(',', start);
      std::string name = p.substr(start, c == std::string::npos ? std::string::npos : c - start);
      if (!name.empty() && name != "cpu" && name != "cpuexecutionprovider")
        arg_error("execution provider '" + name + "' is not available in this onnxruntime (available: CPUExecutionProvider)");
      if (c == std::string::npos) break;
      start = c + 1;
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->bundle = load_bundle(dir, o.verify_checksums, /*defer_weights=*/true);
  const Manifest& m = impl->bundle.manifest;
  std::map<int, std::string> overrides;
  if (!o.precision.empty()) overrides = parse_precision_policy(o.precision, static_cast<int>(m.stages.size()), "onnx", "");
  std::vector<const Artifact*> arts;
  for (auto& st : m.stages) arts.push_back(&choose_artifact(st, overrides.count(st.id) ? overrides[st.id] : ""));
  impl->ort = &OrtProcess::get(o.threads);
  impl->weights = std::make_unique<SharedWeights>(impl->bundle);
  if (o.prepack_weights) impl->prepacked = std::make_unique<PrepackedWeights>();
  SessionSettings settings{o.prepack_weights, impl->prepacked.get(), o.shared_graphs};
  SharedSessions shared;  // the shared graphs' sessions, made by the first stage that needs each
  impl->engines.resize(m.stages.size());
  // sessions are built in parallel (the shared weights are read once, by the first that needs them)
  size_t workers = std::max<size_t>(1, std::min<size_t>(m.stages.size(), std::thread::hardware_concurrency()));
  std::vector<std::future<void>> jobs;
  std::atomic<size_t> next{0};
  for (size_t w = 0; w < workers; ++w)
    jobs.push_back(std::async(std::launch::async, [&] {
      for (size_t i; (i = next++) < m.stages.size();)
        impl->engines[i] = std::make_unique<StageEngine>(*impl->ort, impl->bundle, m.stages[i], *arts[i],
                                                         *impl->weights, settings, &shared);
    }));
  std::exception_ptr first;
  for (auto& j : jobs) {
    try {
      j.get();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
  if (m.decoder) impl->decoder = std::make_unique<DecoderEngine>(*impl->ort, impl->bundle, *m.decoder, *impl->weights, settings);
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

const Manifest& Model::manifest() const { return impl_->bundle.manifest; }

std::vector<std::string> Model::precisions() const {
  std::vector<std::string> out;
  for (auto& e : impl_->engines) out.push_back(e->artifact.precision);
  return out;
}

std::vector<int64_t> Model::latent_shape() const {
  const Manifest& m = manifest();
  return {m.in_channels, m.input_size, m.input_size};
}

std::vector<int64_t> Model::image_shape() const {
  std::vector<int64_t> chw = impl_->decoder ? impl_->decoder->out_shape : latent_shape();
  int64_t c = (chw[0] == 1 || chw[0] == 3) ? chw[0] : 3;
  return {chw[1], chw[2], c};
}

uint64_t Model::shared_weight_bytes() const { return impl_->weights->resident_bytes(); }

std::vector<std::string> Model::shared_graph_paths() const {
  std::vector<std::string> out;
  for (auto& e : impl_->engines) out.push_back(e->shared_graph() ? e->shared_graph()->graph.path : "");
  return out;
}

size_t Model::session_count() const {
  std::set<const GraphSession*> sessions;
  for (auto& e : impl_->engines) sessions.insert(&e->graph());
  return sessions.size();
}

int Model::capacity(double cfg_scale) const {
  int B = impl_->engines.front()->batch();
  for (auto& e : impl_->engines) B = std::min(B, e->batch());
  return cfg_scale > 1 ? std::max(1, B / 2) : B;
}

SamplingParams Model::params(const SampleOptions& o) const {
  const Manifest& m = manifest();
  const SamplingDefaults& d = m.defaults;
  SamplingParams p;
  p.sampler = o.sampler.value_or(d.sampler);
  if (std::find(kSamplers.begin(), kSamplers.end(), p.sampler) == kSamplers.end())
    arg_error("unknown sampler '" + p.sampler + "' (choose from " + joined(kSamplers) + ")");
  p.spacing = spacing_for(p.sampler, o.spacing);
  const bool solver = is_solver(p.sampler);
  if (solver && o.eta) arg_error("--eta is for ddim; " + p.sampler + " takes none");
  p.clip_denoised = o.clip_denoised.value_or(d.clip_denoised);
  p.steps = o.steps.value_or(d.steps);
  if (p.steps < 1 || p.steps > m.num_timesteps)
    arg_error("--steps must be in 1.." + std::to_string(m.num_timesteps) + ", got " + std::to_string(p.steps));
  // dpmpp-2m/unipc with linspace round T-1 .. 0 into N+1 timesteps: more than T-1 steps repeat one
  const int most = p.spacing == "linspace" && p.sampler != "euler" ? m.num_timesteps - 1 : m.num_timesteps;
  if (p.steps > most)
    arg_error("--steps must be in 1.." + std::to_string(most) + " for " + p.sampler + " with " + p.spacing +
              " spacing (more would repeat a timestep), got " + std::to_string(p.steps));
  p.cfg_scale = check_real("cfg-scale", o.cfg_scale.value_or(d.cfg_scale), 0.0, std::nullopt);
  p.eta = solver ? 0.0 : check_real("eta", o.eta.value_or(d.eta), 0.0, 1.0);
  return p;
}

Diffusion Model::diffusion(int steps, const std::string& spacing) const {
  const Manifest& m = manifest();
  std::string spec = spacing == "ddim" ? "ddim" + std::to_string(steps) : std::to_string(steps);
  return Diffusion(linear_betas(m.num_timesteps, m.beta_start, m.beta_end), space_timesteps(m.num_timesteps, spec),
                   m.variance_type);
}

SolverSchedule Model::solver_schedule(const std::string& sampler, int steps, const std::string& spacing) const {
  const Manifest& m = manifest();
  return SolverSchedule(linear_betas(m.num_timesteps, m.beta_start, m.beta_end),
                        solver_timesteps(sampler, m.num_timesteps, steps, spacing));
}

void Model::check_request(const std::vector<int>& ids, const SampleOptions& o) const {
  const Manifest& m = manifest();
  if (ids.empty()) fail(ErrorKind::Prompt, "no prompts given");
  for (int id : ids)
    if (id < 0 || id >= m.num_classes)
      fail(ErrorKind::Prompt, "class id " + std::to_string(id) + " is outside 0.." + std::to_string(m.num_classes - 1));
  if (o.seed < 0) arg_error("--seed must be at least 0, got " + std::to_string(o.seed));
  if (o.batch < 0) arg_error("--batch must be at least 1, got " + std::to_string(o.batch));
  const size_t n = ids.size(), C = m.in_channels, H = m.input_size, per = C * H * H;
  if (o.init_noise) {
    if (o.init_noise_count != n * per && o.init_noise_count != per)
      arg_error("initial noise has " + std::to_string(o.init_noise_count) + " values; expected " +
                std::to_string(n) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" + std::to_string(H) +
                " or " + std::to_string(per));
    for (size_t i = 0; i < o.init_noise_count; ++i)
      if (!std::isfinite(o.init_noise[i])) arg_error("initial noise holds NaN or infinite values (after conversion to float32)");
  }
}

std::unique_ptr<Request> Model::start(const std::vector<int>& ids, const SampleOptions& o, size_t first) const {
  const Manifest& m = manifest();
  auto r = std::make_unique<Request>();
  r->params = params(o);
  check_request(ids, o);
  r->model = this;
  r->class_ids = ids;
  r->first = first;
  // ddpm/ddim walk a respaced Diffusion, the solvers a SolverSchedule with per-request history
  if (is_solver(r->params.sampler))
    r->schedule = solver_schedule(r->params.sampler, r->params.steps, r->params.spacing);
  else
    r->diffusion = diffusion(r->params.steps, r->params.spacing);
  const size_t n = ids.size(), per = static_cast<size_t>(m.in_channels) * m.input_size * m.input_size;
  r->x.resize(n * per);
  for (size_t i = 0; i < n; ++i) {
    r->rngs.emplace_back(static_cast<uint64_t>(o.seed), first + i);
    float* xi = r->x.data() + i * per;
    if (o.init_noise) {
      const float* src = o.init_noise + (o.init_noise_count == per ? 0 : i * per);
      std::copy(src, src + per, xi);
    } else {
      r->rngs[i].standard_normal(xi, per);
    }
  }
  if (r->solver()) solver_initial_sample(*r->schedule, r->params.sampler, r->x.data(), n * per);
  r->k = r->num_steps() - 1;
  r->noise_fn = o.noise_fn;
  r->progress = o.progress;
  r->stage_seconds.assign(m.stages.size(), 0.0);
  r->started = now();
  return r;
}

void Model::step(const std::vector<Request*>& requests) const {
  const Manifest& m = manifest();
  std::set<const Request*> seen;
  for (const Request* r : requests) {
    if (!r) arg_error("a request to step is null");
    if (r->model != this) arg_error("a request to step belongs to another model");
    if (r->done()) arg_error("a request to step has no steps left (finish it)");
    if (!seen.insert(r).second) arg_error("a request is given twice in one step");
  }
  // requests whose next timestep falls in the same stage share its calls (fractional euler
  // timesteps run the stage whose range holds floor(t)), stages in order of first appearance
  std::vector<std::pair<int, std::vector<Request*>>> by_stage;
  for (Request* r : requests) {
    int sid = m.stage_for(static_cast<int>(std::floor(r->timestep()))).id;
    auto it = std::find_if(by_stage.begin(), by_stage.end(), [&](auto& e) { return e.first == sid; });
    if (it == by_stage.end()) it = by_stage.insert(by_stage.end(), {sid, {}});
    it->second.push_back(r);
  }
  const size_t C = m.in_channels, hw = static_cast<size_t>(m.input_size) * m.input_size, per = C * hw;
  const size_t cout = m.learn_sigma ? 2 * C : C;
  for (auto& [sid, group] : by_stage) {
    std::vector<size_t> rows;
    size_t total = 0;
    for (Request* r : group) total += rows.emplace_back(r->params.guided() ? 2 * r->n() : r->n());
    std::vector<float> xin(total * per), ts(total), out(total * cout * hw);
    std::vector<int64_t> ys(total);
    size_t lo = 0;
    for (size_t j = 0; j < group.size(); ++j) {  // rows [0, n) conditional, [n, 2n) unconditional
      const Request& r = *group[j];
      const size_t n = r.n();
      float* xr = xin.data() + lo * per;
      if (r.solver())
        solver_model_input(*r.schedule, r.params.sampler, r.x.data(), r.k, n * per, xr);
      else
        std::copy(r.x.begin(), r.x.end(), xr);
      if (r.params.guided()) std::copy(xr, xr + n * per, xr + n * per);
      std::fill(ts.begin() + lo, ts.begin() + lo + rows[j], static_cast<float>(r.timestep()));
      for (size_t i = 0; i < rows[j]; ++i) ys[lo + i] = i < n ? r.class_ids[i] : m.null_class;
      lo += rows[j];
    }
    const StageEngine& engine = *impl_->engines[sid];
    double ort = 0, t0 = now();
    std::exception_ptr failed;
    try {
      engine.run_rows(total, xin.data(), ts.data(), ys.data(), out.data(), &ort);
    } catch (...) {
      failed = std::current_exception();
    }
    const double seconds = now() - t0;
    lo = 0;
    for (size_t j = 0; j < group.size(); ++j) {
      Request& r = *group[j];
      const double share = static_cast<double>(rows[j]) / static_cast<double>(total);
      r.stage_seconds[sid] += seconds * share;
      r.ort_seconds += ort * share;
      try {
        if (failed) std::rethrow_exception(failed);
        advance(r, out.data() + lo * cout * hw, sid);
      } catch (...) {
        r.failure = std::current_exception();
        r.k = -1;
      }
      lo += rows[j];
    }
  }
}

// one step of a request from the stage's output for its rows; throws (naming where and why)
// when its state stops being finite, which would end as a black image
void Model::advance(Request& r, const float* out, int sid) const {
  const Manifest& m = manifest();
  const SamplingParams& p = r.params;
  const size_t g = r.n(), rows = p.guided() ? 2 * g : g, C = m.in_channels;
  const size_t hw = static_cast<size_t>(m.input_size) * m.input_size, per = C * hw, cout = m.learn_sigma ? 2 * C : C;
  const int k = r.k, K = r.num_steps();
  const double t = r.timestep();
  float* x = r.x.data();
  auto bad = nonfinite_images(out, rows, cout * hw, g, r.first);
  if (!bad.empty()) nonfinite(bad, k, K, sid, t, "the stage graph returned NaN or infinite values", ErrorKind::Runtime);
  const float* model_out = out;
  std::vector<float> guided;
  if (p.guided()) {
    guided.resize(g * cout * hw);
    guide(out, g, cout, hw, static_cast<float>(p.cfg_scale), m.cfg_channels, C, guided.data());
    model_out = guided.data();
    bad = nonfinite_images(guided.data(), g, cout * hw, g, r.first);
    if (!bad.empty()) nonfinite(bad, k, K, sid, t, "guidance with cfg-scale " + fmt_g(p.cfg_scale) + " overflowed float32");
  }
  std::vector<float> noise;
  if (needs_noise(p.sampler, k, p.eta)) {
    noise.resize(g * per);
    if (r.noise_fn) {
      std::vector<int> indices(g);
      for (size_t i = 0; i < g; ++i) indices[i] = static_cast<int>(r.first + i);
      r.noise_fn(k, indices, noise.data());
    } else {
      for (size_t i = 0; i < g; ++i) r.rngs[i].standard_normal(noise.data() + i * per, per);
    }
  }
  const float* step_noise = noise.empty() ? nullptr : noise.data();
  StepShape shape{g, C, cout, hw};
  if (r.solver())
    solver_step(*r.schedule, p.sampler, r.state, shape, x, model_out, k, p.clip_denoised);
  else if (p.sampler == "ddpm")
    ddpm_step(*r.diffusion, shape, x, model_out, k, step_noise, p.clip_denoised, x);
  else
    ddim_step(*r.diffusion, shape, x, model_out, k, step_noise, p.eta, p.clip_denoised, x);
  bad = nonfinite_images(x, g, per, g, r.first);
  if (!bad.empty()) {
    bool noisy = step_noise && !nonfinite_images(step_noise, g, per, g, r.first).empty();
    nonfinite(bad, k, K, sid, t, noisy ? "the step's noise held NaN or infinite values"
                                       : "the " + p.sampler + " update (eta " + fmt_g(p.eta) + ", cfg-scale " +
                                             fmt_g(p.cfg_scale) + ") overflowed float32");
  }
  r.k -= 1;
  if (r.progress) r.progress();
}

void Model::decode(SampleResult& res) const {
  const Manifest& m = manifest();
  const size_t n = res.class_ids.size();
  std::vector<float> decoded;
  const float* pixels = res.samples.data();
  std::vector<int64_t> chw = latent_shape();
  if (impl_->decoder) {
    double t0 = now();
    decoded = impl_->decoder->run_rows(n, res.samples.data(), &res.ort_seconds);
    for (float v : decoded)
      if (!std::isfinite(v)) fail(ErrorKind::Runtime, "the decoder returned NaN or infinite values for finite samples");
    res.decoder_seconds = now() - t0;
    pixels = decoded.data();
    chw = impl_->decoder->out_shape;
  }
  res.images = to_uint8(pixels, n, chw[0], chw[1], chw[2], m.value_lo, m.value_hi);
}

namespace {

SampleResult result_for(const Model& model, const std::vector<int>& ids) {
  SampleResult res;
  res.class_ids = ids;
  for (int id : ids) res.labels.push_back(model.label(id));
  std::vector<int64_t> chw = model.latent_shape();
  res.sample_shape = {static_cast<int64_t>(ids.size()), chw[0], chw[1], chw[2]};
  res.stage_seconds.assign(model.manifest().stages.size(), 0.0);
  return res;
}

void add_times(SampleResult& res, const Request& r) {
  for (size_t s = 0; s < res.stage_seconds.size(); ++s) res.stage_seconds[s] += r.stage_seconds[s];
  res.ort_seconds += r.ort_seconds;
}

}  // namespace

SampleResult Model::finish(const Request& r) const {
  if (r.model != this) arg_error("the request to finish belongs to another model");
  if (!r.done()) arg_error("the request has " + std::to_string(r.k + 1) + " steps left (step it until done)");
  if (r.failure) std::rethrow_exception(r.failure);
  SampleResult res = result_for(*this, r.class_ids);
  res.samples = r.x;
  add_times(res, r);
  decode(res);
  res.seconds = now() - r.started;
  return res;
}

SampleResult Model::sample(const std::vector<int>& ids, const SampleOptions& o) const {
  const double start_time = now();
  SamplingParams p = params(o);
  check_request(ids, o);
  const Manifest& m = manifest();
  const size_t n = ids.size(), per = static_cast<size_t>(m.in_channels) * m.input_size * m.input_size;
  const size_t per_call = o.batch > 0 ? static_cast<size_t>(o.batch) : static_cast<size_t>(capacity(p.cfg_scale));
  SampleResult res = result_for(*this, ids);
  res.samples.resize(n * per);
  for (size_t lo = 0; lo < n; lo += per_call) {
    const size_t g = std::min(per_call, n - lo);
    SampleOptions go = o;
    if (o.init_noise && o.init_noise_count != per) {
      go.init_noise = o.init_noise + lo * per;
      go.init_noise_count = g * per;
    }
    auto r = start(std::vector<int>(ids.begin() + lo, ids.begin() + lo + g), go, lo);
    while (!r->done()) step({r.get()});
    if (r->failure) std::rethrow_exception(r->failure);
    std::copy(r->x.begin(), r->x.end(), res.samples.begin() + lo * per);
    add_times(res, *r);
  }
  decode(res);
  res.seconds = now() - start_time;
  return res;
}

}  // namespace flexdit_core
