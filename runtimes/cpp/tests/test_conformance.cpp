// Every recorded conformance vector of flexdit_bundle/conformance (see its README): diffusion
// tables and respaced timesteps, guide and single sampler steps, the tiny bundle's three
// trajectories from recorded noise, and the few-step solvers' schedules, update sequences and
// tiny-bundle trajectories, each within the tolerance its JSON states.
#include <filesystem>
#include <map>
#include <set>

#include "check.hpp"
#include "diffusion.hpp"
#include "error.hpp"
#include "files.hpp"
#include "json_text.hpp"
#include "manifest.hpp"
#include "model.hpp"
#include "npy.hpp"
#include "samplers.hpp"

namespace fs = std::filesystem;
using namespace flexdit_core;
using testing_min::rel_max_error;

static const fs::path kConf = fs::path(FLEXDIT_REPO_ROOT) / "flexdit_bundle" / "conformance";
static const fs::path kVec = kConf / "vectors";

static json load_json(const fs::path& p) { return parse_json_strict(read_text_file(p)); }

static std::vector<float> f32(const NpyArray& a) { return std::vector<float>(a.values.begin(), a.values.end()); }

// a recorded trajectory's settings, starting from `init` (eta only where the case has one)
static SampleOptions trajectory_options(const json& c, const std::vector<float>& init) {
  SampleOptions o;
  o.steps = c["steps"].get<int>();
  o.sampler = c["sampler"].get<std::string>();
  o.spacing = c["spacing"].get<std::string>();
  if (c.contains("eta")) o.eta = c["eta"].get<double>();
  o.cfg_scale = c["cfg_scale"].get<double>();
  o.init_noise = init.data();
  o.init_noise_count = init.size();
  return o;
}

TEST_CASE(tables_and_timesteps) {
  json procs = load_json(kVec / "diffusion" / "processes.json");
  int T = procs["num_timesteps"];
  double tol = procs["tolerance"]["rel"];
  auto base = linear_betas(T, procs["beta_start"], procs["beta_end"]);
  CHECK(procs["processes"].size() >= 6);
  for (auto& proc : procs["processes"]) {
    NpyArray tab = read_npy(kVec / "diffusion" / proc["tables"].get<std::string>());
    std::vector<std::string> fields = proc["fields"];
    size_t K = proc["num_steps"];
    CHECK(tab.descr == "<f8" && tab.shape == std::vector<int64_t>({(int64_t)fields.size(), (int64_t)K}));
    std::map<std::string, std::vector<double>> got;
    if (proc["spec"].is_null()) {
      got["betas"] = base;
      double prod = 1;
      for (double b : base) got["alphas_cumprod"].push_back(prod *= 1 - b);
    } else {
      auto keep = space_timesteps(T, proc["spec"].get<std::string>());
      CHECK(keep == proc["timesteps"].get<std::vector<int>>()) << proc["name"];
      Diffusion d(base, keep, "learned_range");
      CHECK(d.timestep_map == keep);
      got = {{"betas", d.betas},
             {"log_betas", d.log_betas},
             {"alphas_cumprod", d.alphas_cumprod},
             {"alphas_cumprod_prev", d.alphas_cumprod_prev},
             {"sqrt_recip_alphas_cumprod", d.sqrt_recip_alphas_cumprod},
             {"sqrt_recipm1_alphas_cumprod", d.sqrt_recipm1_alphas_cumprod},
             {"posterior_variance", d.posterior_variance},
             {"posterior_log_variance_clipped", d.posterior_log_variance_clipped},
             {"posterior_mean_coef1", d.posterior_mean_coef1},
             {"posterior_mean_coef2", d.posterior_mean_coef2}};
    }
    for (size_t f = 0; f < fields.size(); ++f) {
      const auto& g = got.at(fields[f]);
      CHECK(g.size() == K) << fields[f];
      size_t bad = 0;
      for (size_t k = 0; k < K && k < g.size(); ++k) {
        double ref = tab.values[f * K + k];
        if (!(std::abs(g[k] - ref) <= tol * std::abs(ref))) ++bad;
      }
      CHECK(bad == 0) << proc["name"] << " " << fields[f] << ": " << bad << " values off";
    }
  }
}

TEST_CASE(guide_both_policies) {
  json steps = load_json(kVec / "steps" / "steps.json");
  auto& g = steps["guide"];
  NpyArray out = read_npy(kVec / "steps" / g["model_out"].get<std::string>());
  size_t n = g["n"], cout = out.shape[1], hw = out.shape[2] * out.shape[3], cin = steps["in_channels"];
  auto o = f32(out);
  for (auto& c : g["cases"]) {
    auto ref = f32(read_npy(kVec / "steps" / c["expected"].get<std::string>()));
    std::vector<float> got(n * cout * hw);
    guide(o.data(), n, cout, hw, g["scale"].get<float>(), c["policy"], cin, got.data());
    CHECK(rel_max_error(got, ref) <= steps["tolerance"]["max_abs_over_max_ref"].get<double>()) << c["policy"];
    size_t gc = c["guided_channels"];
    bool same = true;  // unguided channels: the conditional rows' own output, bit for bit
    for (size_t r = 0; r < n; ++r)
      for (size_t i = gc * hw; i < cout * hw; ++i) same = same && got[r * cout * hw + i] == o[r * cout * hw + i];
    CHECK(same) << c["policy"];
  }
}

TEST_CASE(single_sampler_steps) {
  json steps = load_json(kVec / "steps" / "steps.json");
  auto x = read_npy(kVec / "steps" / steps["step_inputs"]["x"].get<std::string>());
  auto out = f32(read_npy(kVec / "steps" / steps["step_inputs"]["model_out"].get<std::string>()));
  auto noise = f32(read_npy(kVec / "steps" / steps["step_inputs"]["noise"].get<std::string>()));
  auto xv = f32(x);
  size_t cin = steps["in_channels"];
  StepShape s{(size_t)x.shape[0], cin, 2 * cin, (size_t)(x.shape[2] * x.shape[3])};
  CHECK(steps["steps"].size() == 5);
  for (auto& c : steps["steps"]) {
    auto keep = space_timesteps(1000, c["process"].get<std::string>());
    int k = c["k"];
    CHECK(keep[k] == c["t"].get<int>());
    Diffusion d(linear_betas(1000), keep, c["variance_type"]);
    const float* nz = c["uses_noise"].get<bool>() ? noise.data() : nullptr;
    std::vector<float> got(xv.size());
    if (c["sampler"] == "ddpm")
      ddpm_step(d, s, xv.data(), out.data(), k, nz, c["clip_denoised"], got.data());
    else
      ddim_step(d, s, xv.data(), out.data(), k, nz, c["eta"], c["clip_denoised"], got.data());
    CHECK(needs_noise(c["sampler"], k, c.value("eta", 0.0)) == c["uses_noise"].get<bool>()) << c["name"];
    auto ref = f32(read_npy(kVec / "steps" / c["expected"].get<std::string>()));
    double err = rel_max_error(got, ref);
    CHECK(err <= steps["tolerance"]["max_abs_over_max_ref"].get<double>()) << c["name"] << " error " << err;
  }
}

TEST_CASE(tiny_bundle_trajectories_from_recorded_noise) {
  json traj = load_json(kVec / "trajectories" / "trajectories.json");
  LoadOptions lo;
  lo.threads = 1;
  auto model = Model::load((kVec / "trajectories" / traj["bundle"].get<std::string>()).string(), lo);
  double tol = traj["tolerance"]["max_abs_over_max_ref"];
  for (auto& c : traj["trajectories"]) {
    auto init = f32(read_npy(kVec / "trajectories" / c["init_noise"].get<std::string>()));
    auto final_ref = f32(read_npy(kVec / "trajectories" / c["final"].get<std::string>()));
    std::vector<float> step;
    if (!c["step_noise"].is_null()) step = f32(read_npy(kVec / "trajectories" / c["step_noise"].get<std::string>()));
    std::vector<int> ids = c["class_ids"];
    const size_t n = ids.size(), per = init.size() / n;
    SampleOptions o = trajectory_options(c, init);
    std::vector<int> calls;
    if (!step.empty())
      o.noise_fn = [&](int k, const std::vector<int>& idx, float* dst) {
        calls.push_back(k);
        for (size_t i = 0; i < idx.size(); ++i)
          std::copy(step.begin() + (k * n + idx[i]) * per, step.begin() + (k * n + idx[i] + 1) * per, dst + i * per);
      };
    SampleResult r = model->sample(ids, o);
    double err = rel_max_error(r.samples, final_ref);
    CHECK(err <= tol) << c["name"] << " error " << err;
    std::cout << "  " << c["name"].get<std::string>() << ": max rel error " << err << "\n";
    if (!step.empty()) {  // noise taken at k = K-1 .. 1, never at k = 0
      std::set<int> ks(calls.begin(), calls.end());
      CHECK(!ks.count(0) && ks.size() == c["timesteps"].size() - 1) << c["name"];
    }
    // stage selection by original timestep, in execution order
    std::vector<int> ts = c["timesteps"], stages;
    for (auto it = ts.rbegin(); it != ts.rend(); ++it) stages.push_back(model->manifest().stage_for(*it).id);
    CHECK(stages == c["stage_per_step"].get<std::vector<int>>()) << c["name"];
  }
}

TEST_CASE(solver_schedules) {
  json v = load_json(kVec / "solvers" / "solvers.json");
  const int T = v["num_timesteps"];
  const double tol = v["tolerance"]["sigmas_rel"];
  const auto base = linear_betas(T, v["beta_start"], v["beta_end"]);
  std::set<std::string> samplers;
  for (auto& c : v["schedules"]) {
    std::string what = c["sampler"].get<std::string>() + std::to_string(c["steps"].get<int>()) + "-" +
                       c["spacing"].get<std::string>();
    samplers.insert(c["sampler"].get<std::string>());
    auto ts = solver_timesteps(c["sampler"], T, c["steps"], c["spacing"]);
    CHECK(ts == c["timesteps"].get<std::vector<double>>()) << what;  // exact, euler's fractional ones too
    SolverSchedule s(base, ts);
    std::vector<double> want = c["sigmas"];
    CHECK(s.sigmas.size() == want.size() && s.sigmas.back() == 0.0 && want.back() == 0.0) << what;
    size_t bad = 0;
    for (size_t i = 0; i < want.size() && i < s.sigmas.size(); ++i)
      if (!(std::abs(s.sigmas[i] - want[i]) <= tol * std::abs(want[i]))) ++bad;
    CHECK(bad == 0) << what << ": " << bad << " sigmas off";
    CHECK(s.lambdas.size() + 1 == s.sigmas.size() && s.alphas.size() == s.sigmas.size()) << what;
  }
  CHECK(samplers == std::set<std::string>({"dpmpp-2m", "unipc", "euler"}));
}

TEST_CASE(solver_update_sequences) {
  json v = load_json(kVec / "solvers" / "solvers.json");
  const int T = v["num_timesteps"];
  const double tol = v["tolerance"]["max_abs_over_max_ref"];
  CHECK(v["sequences"].size() == 3);
  for (auto& c : v["sequences"]) {
    NpyArray x_T = read_npy(kVec / "solvers" / c["x_T"].get<std::string>());
    auto eps = f32(read_npy(kVec / "solvers" / c["eps"].get<std::string>()));
    auto want = f32(read_npy(kVec / "solvers" / c["expected"].get<std::string>()));
    const std::string sampler = c["sampler"];
    const int N = c["steps"];
    SolverSchedule s(linear_betas(T, v["beta_start"], v["beta_end"]), solver_timesteps(sampler, T, N, c["spacing"]));
    auto x = f32(x_T);
    const size_t per_step = x.size(), cin = x_T.shape[1];
    StepShape shape{(size_t)x_T.shape[0], cin, cin, (size_t)(x_T.shape[2] * x_T.shape[3])};
    CHECK(eps.size() == N * per_step && want.size() == N * per_step) << c["name"];
    SolverState state;
    solver_initial_sample(s, sampler, x.data(), x.size());
    for (int i = 0; i < N; ++i) {  // step i is kept index N-1-i
      solver_step(s, sampler, state, shape, x.data(), eps.data() + i * per_step, N - 1 - i, false);
      std::vector<float> ref(want.begin() + i * per_step, want.begin() + (i + 1) * per_step);
      double err = rel_max_error(x, ref);
      CHECK(err <= tol) << c["name"] << " step " << i << " error " << err;
    }
  }
}

TEST_CASE(solver_tiny_bundle_trajectories) {
  json traj = load_json(kVec / "solver_trajectories" / "solver_trajectories.json");
  LoadOptions lo;
  lo.threads = 1;
  auto model = Model::load((kVec / "solver_trajectories" / traj["bundle"].get<std::string>()).string(), lo);
  const double tol = traj["tolerance"]["max_abs_over_max_ref"];
  std::set<std::string> samplers;
  for (auto& c : traj["trajectories"]) {
    auto init = f32(read_npy(kVec / "solver_trajectories" / c["init_noise"].get<std::string>()));
    auto final_ref = f32(read_npy(kVec / "solver_trajectories" / c["final"].get<std::string>()));
    std::vector<int> ids = c["class_ids"];
    SampleOptions o = trajectory_options(c, init);
    o.clip_denoised = traj["clip_denoised"].get<bool>();
    int draws = 0;  // the solvers draw no noise
    o.noise_fn = [&](int, const std::vector<int>&, float*) { ++draws; };
    SampleResult r = model->sample(ids, o);
    double err = rel_max_error(r.samples, final_ref);
    CHECK(err <= tol) << c["name"] << " error " << err;
    CHECK(draws == 0) << c["name"];
    std::cout << "  " << c["name"].get<std::string>() << ": max rel error " << err << "\n";
    samplers.insert(*o.sampler);
    // the timesteps the run walks, and the stage each picks (floor of a fractional timestep)
    auto ts = model->solver_schedule(*o.sampler, *o.steps, *o.spacing).timesteps;
    CHECK(ts == c["timesteps"].get<std::vector<double>>()) << c["name"];
    std::vector<int> stages;
    for (double t : ts) stages.push_back(model->manifest().stage_for(static_cast<int>(std::floor(t))).id);
    CHECK(stages == c["stage_per_step"].get<std::vector<int>>()) << c["name"];
  }
  CHECK(samplers == std::set<std::string>({"dpmpp-2m", "unipc", "euler"}));
}

int main(int argc, char** argv) { return testing_min::run_all(argc, argv); }
