#include "samplers.hpp"

#include "numpy_expf.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace flexdit_core {
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

// numpy.clip(v, -1, 1): NaN stays NaN (so a broken step is seen as one)
inline float clip1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

inline float xstart(float a, float b, float x, float eps, bool clip) {
  float x0 = a * x - b * eps;
  return clip ? clip1(x0) : x0;
}

// the step from sigmas[i] to sigmas[i+1] > 0: DPM-Solver++ 2M midpoint, which is also UniPC's bh2
// predictor: x' = c_x x - c_m m_i - c_d (m_i - m_{i-1})
struct MultistepCoefs {
  double c_x, c_m, c_d = 0;
  MultistepCoefs(const SolverSchedule& s, int i, int order) {
    double h = s.lambdas[i + 1] - s.lambdas[i];
    c_x = s.sigmas_vp[i + 1] / s.sigmas_vp[i];
    c_m = s.alphas[i + 1] * std::expm1(-h);
    if (order == 2) {
      double r = (s.lambdas[i] - s.lambdas[i - 1]) / h;
      c_d = 0.5 * c_m / r;
    }
  }
};

// UniC (bh2) at step i, correcting the sample the predictor of step i-1 (of `order`) made:
// x = c_x x_{i-1} - c_m m_{i-1} - c_d (m_{i-1} - m_{i-2}) - c_t (m_i - m_{i-1})
struct CorrectorCoefs {
  double c_x, c_m, c_d = 0, c_t;
  CorrectorCoefs(const SolverSchedule& s, int i, int order) {
    double h = s.lambdas[i] - s.lambdas[i - 1], hh = -h, phi = std::expm1(hh);
    c_x = s.sigmas_vp[i] / s.sigmas_vp[i - 1];
    c_m = s.alphas[i] * phi;
    if (order == 1) {
      c_t = c_m * 0.5;
      return;
    }
    double rk = (s.lambdas[i - 2] - s.lambdas[i - 1]) / h;
    double b1 = (phi / hh - 1.0) / phi;
    double b2 = ((phi / hh - 1.0) / hh - 0.5) * 2.0 / phi;
    double rho0 = (b1 - b2) / (1.0 - rk), rho1 = b1 - rho0;
    c_d = -c_m * rho0 / rk;
    c_t = c_m * rho1;
  }
};

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

const std::vector<std::string> kSolvers = {"dpmpp-2m", "unipc", "euler"};
const std::vector<std::string> kSamplers = {"ddpm", "ddim", "dpmpp-2m", "unipc", "euler"};

bool is_solver(const std::string& sampler) {
  return std::find(kSolvers.begin(), kSolvers.end(), sampler) != kSolvers.end();
}

bool needs_noise(const std::string& sampler, int k, double eta) {
  return k > 0 && (sampler == "ddpm" || (sampler == "ddim" && eta > 0));
}

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

void solver_initial_sample(const SolverSchedule& s, const std::string& sampler, float* x, size_t count) {
  if (sampler != "euler") return;
  const float scale = static_cast<float>(s.sigmas[0]);
  for (size_t i = 0; i < count; ++i) x[i] = x[i] * scale;
}

void solver_model_input(const SolverSchedule& s, const std::string& sampler, const float* x, int k, size_t count,
                        float* out) {
  if (sampler != "euler") {
    std::copy(x, x + count, out);
    return;
  }
  const double sig = s.sigmas[s.num_steps() - 1 - k];
  const float div = static_cast<float>(std::sqrt(sig * sig + 1.0));
  for (size_t i = 0; i < count; ++i) out[i] = x[i] / div;
}

void solver_step(const SolverSchedule& s, const std::string& sampler, SolverState& st, const StepShape& sh, float* x,
                 const float* out, int k, bool clip) {
  const int N = s.num_steps(), i = N - 1 - k;
  const size_t per = sh.cin * sh.hw;
  if (sampler == "euler") {  // x0 = x - sigma eps; x' = x + (x - x0) / sigma * (sigma' - sigma)
    const double sig = s.sigmas[i];
    const float fs = static_cast<float>(sig), fd = static_cast<float>(s.sigmas[i + 1] - sig);
    for (size_t r = 0; r < sh.n; ++r) {
      const float* eps = out + r * sh.cout * sh.hw;
      float* xr = x + r * per;
      for (size_t e = 0; e < per; ++e) {
        float xi = xr[e], x0 = xi - fs * eps[e];
        if (clip) x0 = clip1(x0);
        xr[e] = xi + (xi - x0) / fs * fd;
      }
    }
    return;
  }
  if (st.m1.empty()) {
    st.m1.assign(sh.n * per, 0.0f);
    st.m2.assign(sh.n * per, 0.0f);
    st.last_x.assign(sh.n * per, 0.0f);
  }
  const float sv = static_cast<float>(s.sigmas_vp[i]), al = static_cast<float>(s.alphas[i]);
  const bool correct = sampler == "unipc" && i > 0, two_back = st.last_order == 2;
  float cx = 0, cm = 0, cd = 0, ct = 0;
  if (correct) {
    CorrectorCoefs c(s, i, st.last_order);
    cx = static_cast<float>(c.c_x), cm = static_cast<float>(c.c_m), cd = static_cast<float>(c.c_d),
    ct = static_cast<float>(c.c_t);
  }
  const int order = (i == 0 || i == N - 1) ? 1 : 2;
  const bool last = s.sigmas[i + 1] == 0;  // to sigma 0: the data prediction itself
  float px = 0, pm = 0, pd = 0;
  if (!last) {
    MultistepCoefs c(s, i, order);
    px = static_cast<float>(c.c_x), pm = static_cast<float>(c.c_m), pd = static_cast<float>(c.c_d);
  }
  for (size_t r = 0; r < sh.n; ++r) {
    const float* eps = out + r * sh.cout * sh.hw;
    for (size_t e = 0; e < per; ++e) {
      const size_t idx = r * per + e;
      float xi = x[idx], m1 = st.m1[idx];
      float m = (xi - sv * eps[e]) / al;
      if (clip) m = clip1(m);
      if (correct) {
        float y = cx * st.last_x[idx] - cm * m1;
        if (two_back) y = y - cd * (m1 - st.m2[idx]);
        xi = y - ct * (m - m1);
      }
      st.last_x[idx] = xi;
      float res = m;
      if (!last) {
        res = px * xi - pm * m;
        if (order == 2) res = res - pd * (m - m1);
      }
      st.m2[idx] = m1;
      st.m1[idx] = m;
      x[idx] = res;
    }
  }
  st.last_order = order;
}

}  // namespace flexdit_core
