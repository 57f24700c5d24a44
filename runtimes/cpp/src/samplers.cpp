#include "samplers.hpp"

#include "numpy_expf.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace flexdit {
namespace {

inline float f32(const std::vector<double>& table, int k) { return static_cast<float>(table[k]); }

// log variance of output channel block v at element i (float32, the reference's arithmetic)
struct LogVar {
  const Diffusion& d;
  int k;
  float min_log, max_log, fixed;
  LogVar(const Diffusion& d_, int k_) : d(d_), k(k_) {
    min_log = f32(d.posterior_log_variance_clipped, k);
    max_log = f32(d.log_betas, k);
    fixed = d.variance_type == "fixed_large" ? f32(d.fixed_large_log_variance, k) : min_log;
  }
  float operator()(const float* v) const {
    if (d.variance_type != "learned_range") return fixed;
    float frac = (*v + 1.0f) / 2.0f;
    return frac * max_log + (1.0f - frac) * min_log;
  }
};

inline float xstart(float a, float b, float x, float eps, bool clip) {
  float x0 = a * x - b * eps;
  return clip ? std::min(1.0f, std::max(-1.0f, x0)) : x0;
}

}  // namespace

void guide(const float* out, size_t n, size_t cout, size_t hw, float scale, const std::string& policy, size_t cin,
           float* guided) {
  size_t g = policy == "first3" ? 3 : cin;
  for (size_t r = 0; r < n; ++r) {
    const float* cond = out + r * cout * hw;
    const float* uncond = out + (n + r) * cout * hw;
    float* dst = guided + r * cout * hw;
    for (size_t i = 0; i < cout * hw; ++i) {
      if (i < g * hw) {
        float u = uncond[i];
        dst[i] = u + scale * (cond[i] - u);
      } else {
        dst[i] = cond[i];
      }
    }
  }
}

bool needs_noise(const std::string& sampler, int k, double eta) { return k > 0 && (sampler == "ddpm" || eta > 0); }

// fma clone: std::fma is one instruction; default clone: glibc's (exact, slower) fma
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("fma", "default")))
#endif
void ddpm_step(const Diffusion& d, const StepShape& s, const float* x, const float* out, int k, const float* noise,
               bool clip, float* result) {
  const float a = f32(d.sqrt_recip_alphas_cumprod, k), b = f32(d.sqrt_recipm1_alphas_cumprod, k);
  const float c1 = f32(d.posterior_mean_coef1, k), c2 = f32(d.posterior_mean_coef2, k);
  LogVar log_var(d, k);
  const size_t per = s.cin * s.hw;
  for (size_t r = 0; r < s.n; ++r) {
    const float* o = out + r * s.cout * s.hw;
    for (size_t i = 0; i < per; ++i) {
      size_t idx = r * per + i;
      float xi = x[idx];
      float x0 = xstart(a, b, xi, o[i], clip);
      float mean = c1 * x0 + c2 * xi;
      if (k == 0) {
        result[idx] = mean;
      } else {
        float lv = log_var(o + per + i);
        result[idx] = mean + numpy_expf(0.5f * lv) * noise[idx];
      }
    }
  }
}

void ddim_step(const Diffusion& d, const StepShape& s, const float* x, const float* out, int k, const float* noise,
               double eta, bool clip, float* result) {
  const float a = f32(d.sqrt_recip_alphas_cumprod, k), b = f32(d.sqrt_recipm1_alphas_cumprod, k);
  const float ab = f32(d.alphas_cumprod, k), abp = f32(d.alphas_cumprod_prev, k);
  const float one = 1.0f;
  const float sigma = static_cast<float>(eta) * std::sqrt((one - abp) / (one - ab)) * std::sqrt(one - ab / abp);
  const float sqrt_abp = std::sqrt(abp), dir = std::sqrt(one - abp - sigma * sigma);
  const bool noisy = !(k == 0 || eta == 0);
  const size_t per = s.cin * s.hw;
  for (size_t r = 0; r < s.n; ++r) {
    const float* o = out + r * s.cout * s.hw;
    for (size_t i = 0; i < per; ++i) {
      size_t idx = r * per + i;
      float xi = x[idx];
      float x0 = xstart(a, b, xi, o[i], clip);
      float eps = (a * xi - x0) / b;
      float mean = x0 * sqrt_abp + dir * eps;
      result[idx] = noisy ? mean + sigma * noise[idx] : mean;
    }
  }
}

}  // namespace flexdit
