// DDPM (ancestral, learned-range variance) and DDIM steps plus classifier-free guidance, float32
// step for step as runtimes/python/flexdit_runtime/samplers.py (compiled without FP contraction).
#pragma once
#include <cstddef>
#include <string>

#include "diffusion.hpp"

namespace flexdit {

// Shapes: x, noise, result (n, cin, hw); out (n, cout, hw) with cout = 2 cin (learned sigma) or cin.
struct StepShape {
  size_t n, cin, cout, hw;
};

// out rows [0, n) conditional, [n, 2n) unconditional -> guided (n, cout, hw). policy "first3"
// guides channels 0..2 only, "eps" all cin channels; the other channels keep the conditional row.
void guide(const float* out, size_t n, size_t cout, size_t hw, float scale, const std::string& policy, size_t cin,
           float* guided);

bool needs_noise(const std::string& sampler, int k, double eta);

// One step at kept index k; `noise` may be null when !needs_noise. `result` may alias x.
void ddpm_step(const Diffusion& d, const StepShape& s, const float* x, const float* out, int k, const float* noise,
               bool clip, float* result);
void ddim_step(const Diffusion& d, const StepShape& s, const float* x, const float* out, int k, const float* noise,
               double eta, bool clip, float* result);

}  // namespace flexdit
