// Every recorded conformance vector of flexdit_bundle/conformance (see its README): diffusion
// tables and respaced timesteps, guide and single sampler steps, and the tiny bundle's three
// trajectories from recorded noise, each within the tolerance its JSON states.
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
using namespace flexdit;
using testing_min::rel_max_error;

static const fs::path kConf = fs::path(FLEXDIT_REPO_ROOT) / "flexdit_bundle" / "conformance";
static const fs::path kVec = kConf / "vectors";

static json load_json(const fs::path& p) { return parse_json_strict(read_text_file(p)); }

static std::vector<float> f32(const NpyArray& a) { return std::vector<float>(a.values.begin(), a.values.end()); }

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
    SampleOptions o;
    o.steps = c["steps"].get<int>();
    o.sampler = c["sampler"].get<std::string>();
    o.spacing = c["spacing"];
    o.eta = c["eta"].get<double>();
    o.cfg_scale = c["cfg_scale"].get<double>();
    o.init_noise = init.data();
    o.init_noise_count = init.size();
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

int main(int argc, char** argv) { return testing_min::run_all(argc, argv); }
