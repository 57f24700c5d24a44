#include "diffusion.hpp"

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <set>

#include "error.hpp"

namespace flexdit_core {

std::vector<double> linspace(double a, double b, int n) {
  std::vector<double> out(n);
  if (n == 1) {
    out[0] = a;
    return out;
  }
  double step = (b - a) / (n - 1);
  for (int i = 0; i < n; ++i) out[i] = i * step + a;
  out[n - 1] = b;
  return out;
}

std::vector<double> linear_betas(int T, double beta_start, double beta_end) {
  double scale = 1000.0 / T;
  return linspace(scale * beta_start, scale * beta_end, T);
}

std::vector<int> space_timesteps(int T, const std::string& spec) {
  if (spec.rfind("ddim", 0) == 0) {
    int n = std::stoi(spec.substr(4));
    for (int stride = 1; stride < T; ++stride) {
      if ((T + stride - 1) / stride == n) {
        std::vector<int> out;
        for (int t = 0; t < T; t += stride) out.push_back(t);
        return out;
      }
    }
    fail(ErrorKind::Argument, "cannot take exactly " + std::to_string(n) + " steps with an integer DDIM stride over " +
                                  std::to_string(T) + " timesteps");
  }
  std::vector<int> counts;
  size_t start = 0;
  while (true) {
    size_t comma = spec.find(',', start);
    counts.push_back(std::stoi(spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  int sections = static_cast<int>(counts.size());
  int size_per = T / sections, extra = T % sections, begin = 0;
  std::set<int> kept;
  for (int i = 0; i < sections; ++i) {
    int size = size_per + (i < extra ? 1 : 0), count = counts[i];
    if (size < count)
      fail(ErrorKind::Argument, "cannot take " + std::to_string(count) + " steps from a section of " +
                                    std::to_string(size) + " timesteps");
    double frac = count <= 1 ? 1.0 : static_cast<double>(size - 1) / (count - 1);
    double cur = 0.0;
    for (int j = 0; j < count; ++j) {
      kept.insert(begin + static_cast<int>(std::nearbyint(cur)));  // round half to even, as Python's round
      cur += frac;
    }
    begin += size;
  }
  return {kept.begin(), kept.end()};
}

Diffusion::Diffusion(const std::vector<double>& base, const std::vector<int>& keep_in, const std::string& vt)
    : variance_type(vt) {
  std::vector<int> keep = keep_in;
  std::sort(keep.begin(), keep.end());
  std::vector<double> ac_base(base.size());
  double prod = 1.0;
  for (size_t i = 0; i < base.size(); ++i) ac_base[i] = prod = prod * (1.0 - base[i]);
  double last = 1.0;
  for (int i : keep) {
    betas.push_back(1 - ac_base[i] / last);
    last = ac_base[i];
  }
  timestep_map = keep;
  size_t K = betas.size();
  alphas_cumprod.resize(K);
  prod = 1.0;
  for (size_t k = 0; k < K; ++k) alphas_cumprod[k] = prod = prod * (1.0 - betas[k]);
  alphas_cumprod_prev.resize(K);
  for (size_t k = 0; k < K; ++k) alphas_cumprod_prev[k] = k == 0 ? 1.0 : alphas_cumprod[k - 1];
  auto each = [&](auto f) {
    std::vector<double> v(K);
    for (size_t k = 0; k < K; ++k) v[k] = f(k);
    return v;
  };
  const auto &b = betas, &ac = alphas_cumprod, &acp = alphas_cumprod_prev;
  log_betas = each([&](size_t k) { return std::log(b[k]); });
  sqrt_recip_alphas_cumprod = each([&](size_t k) { return std::sqrt(1.0 / ac[k]); });
  sqrt_recipm1_alphas_cumprod = each([&](size_t k) { return std::sqrt(1.0 / ac[k] - 1); });
  posterior_variance = each([&](size_t k) { return b[k] * (1.0 - acp[k]) / (1.0 - ac[k]); });
  const auto& pv = posterior_variance;
  posterior_log_variance_clipped = each([&](size_t k) {
    if (K == 1) return std::log(std::max(pv[k], 1e-20));
    return std::log(k == 0 ? pv[1] : pv[k]);
  });
  posterior_mean_coef1 = each([&](size_t k) { return b[k] * std::sqrt(acp[k]) / (1.0 - ac[k]); });
  posterior_mean_coef2 = each([&](size_t k) { return (1.0 - acp[k]) * std::sqrt(1.0 - b[k]) / (1.0 - ac[k]); });
  fixed_large_log_variance = each([&](size_t k) {
    if (K == 1) return std::log(b[0]);
    return std::log(k == 0 ? pv[1] : b[k]);
  });
}

std::vector<double> solver_timesteps(const std::string& sampler, int T, int steps, const std::string& spacing) {
  std::vector<double> out;
  if (spacing != "linspace") {
    for (int t : space_timesteps(T, spacing == "ddim" ? "ddim" + std::to_string(steps) : std::to_string(steps)))
      out.insert(out.begin(), t);
    return out;
  }
  if (sampler == "euler") {  // numpy.linspace(..., dtype=float32): float64 values rounded to float32
    for (double t : linspace(0, T - 1, steps)) out.insert(out.begin(), static_cast<float>(t));
    return out;
  }
  std::vector<double> ts = linspace(0, T - 1, steps + 1);
  for (int j = steps; j >= 1; --j) out.push_back(std::nearbyint(ts[j]));  // round half to even; 0 dropped
  return out;
}

SolverSchedule::SolverSchedule(const std::vector<double>& base, const std::vector<double>& ts) : timesteps(ts) {
  // diffusers' float32 table: ac32 = float32 of the float64 running product of float32(1 - float32(beta))
  std::vector<float> sig(base.size());
  double prod = 1.0;
  for (size_t j = 0; j < base.size(); ++j) {
    prod *= static_cast<double>(1.0f - static_cast<float>(base[j]));
    float ac = static_cast<float>(prod);
    sig[j] = std::sqrt((1.0f - ac) / ac);
  }
  const double last = static_cast<double>(sig.size() - 1);
  for (double t : ts) {  // numpy.interp over 0..T-1: slope * (t - f) + sig[f], exact at integers
    double v;
    if (t <= 0) {
      v = sig.front();
    } else if (t >= last) {
      v = sig.back();
    } else {
      double f = std::floor(t);
      size_t j = static_cast<size_t>(f);
      v = t == f ? sig[j] : (static_cast<double>(sig[j + 1]) - sig[j]) * (t - f) + sig[j];
    }
    sigmas.push_back(static_cast<float>(v));
  }
  sigmas.push_back(0.0);
  for (double s : sigmas) {  // the C library's sqrt and log, as Python's math module
    double a = 1.0 / std::sqrt(s * s + 1.0);
    alphas.push_back(a);
    sigmas_vp.push_back(s * a);
  }
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) lambdas.push_back(std::log(alphas[i]) - std::log(sigmas_vp[i]));
}

}  // namespace flexdit_core
