// Gaussian diffusion tables and timestep respacing (runtimes/python/flexdit_runtime/diffusion.py):
// tables in float64, each coefficient cast to float32 where it meets the float32 sample.
#pragma once
#include <string>
#include <vector>

namespace flexdit {

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

}  // namespace flexdit
