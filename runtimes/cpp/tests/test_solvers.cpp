// The few-step solvers through the C API (flexdit.h), as an application calls them: by name, with
// the sampler's own spacing when spacing is NULL, no step noise drawn, per-group history (the
// same images whatever the batching), the recorded tiny-bundle trajectories, and each bad input
// refused with FLEXDIT_ERR_ARGUMENT and the Python runtime's line.
#include <flexdit/flexdit.h>

#include <filesystem>
#include <string>
#include <vector>

#include "check.hpp"
#include "files.hpp"
#include "json_text.hpp"
#include "npy.hpp"

namespace fs = std::filesystem;
using testing_min::rel_max_error;

static const fs::path kTraj = fs::path(FLEXDIT_REPO_ROOT) / "flexdit_bundle" / "conformance" / "vectors" /
                              "solver_trajectories";

static std::vector<float> read_f32(const fs::path& p) {
  auto a = flexdit_core::read_npy(p);
  return std::vector<float>(a.values.begin(), a.values.end());
}

static flexdit_model* load_tiny() {
  flexdit_load_options lo;
  flexdit_load_options_init(&lo);
  lo.threads = 1;
  flexdit_model* m = nullptr;
  flexdit_status s = flexdit_model_load((kTraj / "../../tiny-bundle").string().c_str(), &lo, &m);
  CHECK(s == FLEXDIT_OK) << flexdit_last_error();
  return m;
}

static int count_draws(void* user, int, const int*, size_t, float*) {
  ++*static_cast<int*>(user);
  return 0;
}

TEST_CASE(api_version_names_the_solvers) {
  CHECK(flexdit_api_version() >= 3 && flexdit_api_version() == FLEXDIT_API_VERSION);
}

TEST_CASE(solvers_by_name_reproduce_the_recorded_trajectories) {
  auto traj = flexdit_core::parse_json_strict(flexdit_core::read_text_file(kTraj / "solver_trajectories.json"));
  const double tol = traj["tolerance"]["max_abs_over_max_ref"];
  flexdit_model* m = load_tiny();
  for (auto& c : traj["trajectories"]) {
    const std::string name = c["name"], sampler = c["sampler"], spacing = c["spacing"];
    auto init = read_f32(kTraj / c["init_noise"].get<std::string>());
    auto want = read_f32(kTraj / c["final"].get<std::string>());
    std::vector<int64_t> ids = c["class_ids"];
    int draws = 0;
    flexdit_sample_options o;
    flexdit_sample_options_init(&o);
    o.steps = c["steps"];
    o.sampler = sampler.c_str();
    o.spacing = spacing == "linspace" ? nullptr : spacing.c_str();  // NULL: the solver's own, linspace
    o.cfg_scale = c["cfg_scale"];
    o.init_noise = init.data();
    o.init_noise_count = init.size();
    o.noise_fn = count_draws;
    o.noise_user = &draws;
    std::vector<float> got(want.size()), one_by_one(want.size());
    flexdit_status s = flexdit_sample(m, ids.data(), ids.size(), &o, got.data(), got.size(), nullptr, 0, nullptr);
    CHECK(s == FLEXDIT_OK) << name << ": " << flexdit_last_error();
    double err = rel_max_error(got, want);
    CHECK(err <= tol) << name << " error " << err;
    o.batch = 1;  // one group per image: each group keeps its own solver history
    s = flexdit_sample(m, ids.data(), ids.size(), &o, one_by_one.data(), one_by_one.size(), nullptr, 0, nullptr);
    CHECK(s == FLEXDIT_OK && one_by_one == got) << name << ": batch 1 differs";
    CHECK(draws == 0) << name << ": " << draws << " noise draws";
  }
  flexdit_model_free(m);
}

TEST_CASE(solver_bad_inputs_are_one_line_argument_errors) {
  flexdit_model* m = load_tiny();
  struct Case {
    const char* sampler;
    const char* spacing;
    int steps;
    double eta;
    const char* message;
  } cases[] = {
      {"heun", nullptr, 4, -1, "unknown sampler 'heun' (choose from ddpm, ddim, dpmpp-2m, unipc, euler)"},
      {"dpmpp-2m", nullptr, 4, 0.0, "--eta is for ddim; dpmpp-2m takes none"},
      {"unipc", "sections", 4, 0.5, "--eta is for ddim; unipc takes none"},
      {"euler", "ddim", 4, -1, "--spacing ddim does not apply to euler (it places fractional timesteps, linspace only)"},
      {"euler", "sections", 4, -1,
       "--spacing sections does not apply to euler (it places fractional timesteps, linspace only)"},
      {"ddpm", "linspace", 4, -1, "--spacing linspace is for dpmpp-2m, unipc, euler; ddpm takes sections or ddim"},
      {"unipc", "bogus", 4, -1, "unknown spacing 'bogus' (choose from sections, ddim, linspace)"},
      {"unipc", nullptr, 1000, -1,
       "--steps must be in 1..999 for unipc with linspace spacing (more would repeat a timestep), got 1000"},
      {"dpmpp-2m", "linspace", 1000, -1,
       "--steps must be in 1..999 for dpmpp-2m with linspace spacing (more would repeat a timestep), got 1000"},
      {"euler", nullptr, 1001, -1, "--steps must be in 1..1000, got 1001"},
      {"dpmpp-2m", "ddim", 999, -1, "cannot take exactly 999 steps with an integer DDIM stride over 1000 timesteps"},
  };
  const int64_t id = 1;
  for (auto& c : cases) {
    flexdit_sample_options o;
    flexdit_sample_options_init(&o);
    o.sampler = c.sampler;
    o.spacing = c.spacing;
    o.steps = c.steps;
    o.eta = c.eta;
    float out[4 * 8 * 8];
    flexdit_status s = flexdit_sample(m, &id, 1, &o, out, sizeof out / sizeof *out, nullptr, 0, nullptr);
    CHECK(s == FLEXDIT_ERR_ARGUMENT && std::string(flexdit_last_error()) == c.message)
        << c.sampler << ": status " << s << ", " << flexdit_last_error();
  }
  flexdit_model_free(m);
}

int main(int argc, char** argv) { return testing_min::run_all(argc, argv); }
