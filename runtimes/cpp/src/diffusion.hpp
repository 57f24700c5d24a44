// Gaussian diffusion tables, timestep respacing and the few-step solvers' noise levels
// (runtimes/python/flexdit_runtime/diffusion.py): tables in float64, each coefficient cast to
// float32 where it meets the float32 sample.
#pragma once
#include <string>
#include <vector>

namespace flexdit_core {

// numpy.linspace(a, b, n) in float64: a + j * ((b - a) / (n - 1)), the last element b exactly; n = 1: [a]
std::vector<double> linspace(double a, double b, int n);
std::vector<double> linear_betas(int T, double beta_start = 1e-4, double beta_end = 0.02);

// Original timesteps kept by respacing, ascending: "N" / "a,b,c" (equal sections, round half to
// even) or "ddimN" (striding). Throws Error(Argument) when the spec cannot be met.
std::vector<int> space_timesteps(int T, const std::string& spec);

struct Diffusion {
  Diffusion(const std::vector<double>& base_betas, const std::vector<int>& keep, const std::string& variance_type);

  std::vector<int> timestep_map;
  std::string variance_type;
  std::vector<double> betas, log_betas, alphas_cumprod, alphas_cumprod_prev, sqrt_recip_alphas_cumprod,
      sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1,
      posterior_mean_coef2, fixed_large_log_variance;

  int num_steps() const { return static_cast<int>(betas.size()); }
};

// What the network receives at each step of a solver (dpmpp-2m, unipc, euler), first step first
// (descending; fractional for euler with linspace). spacing "linspace": diffusers' placement;
// "sections"/"ddim": the respaced kept timesteps (bundle-format 6.6).
std::vector<double> solver_timesteps(const std::string& sampler, int T, int steps, const std::string& spacing);

// Noise levels of a solver run: step i = 0..N-1 moves from sigmas[i] to sigmas[i+1] (sigmas[N] = 0,
// float32 values from diffusers' float32 table); alphas, sigmas_vp and lambdas (i < N) are the
// variance-preserving alpha_t, sigma_t and log(alpha_t) - log(sigma_t), float64.
struct SolverSchedule {
  SolverSchedule(const std::vector<double>& base_betas, const std::vector<double>& timesteps);

  std::vector<double> timesteps, sigmas, alphas, sigmas_vp, lambdas;

  int num_steps() const { return static_cast<int>(timesteps.size()); }
  // kept index k counts down as in Diffusion: step i = N-1-k
  double timestep(int k) const { return timesteps[num_steps() - 1 - k]; }
};

}  // namespace flexdit_core
