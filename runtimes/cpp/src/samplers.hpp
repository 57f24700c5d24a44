// DDPM (ancestral, learned-range variance) and DDIM steps, the few-step solvers DPM-Solver++ 2M,
// UniPC (bh2) and Euler, plus classifier-free guidance, float32 step for step as
// runtimes/python/flexdit_runtime/samplers.py (compiled without FP contraction).
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "diffusion.hpp"

namespace flexdit_core {

// Shapes: x, noise, result (n, cin, hw); out (n, cout, hw) with cout = 2 cin (learned sigma) or cin.
struct StepShape {
  size_t n, cin, cout, hw;
};

// out rows [0, n) conditional, [n, 2n) unconditional -> guided (n, cout, hw). policy "first3"
// guides channels 0..2 only, "eps" all cin channels; the other channels keep the conditional row.
void guide(const float* out, size_t n, size_t cout, size_t hw, float scale, const std::string& policy, size_t cin,
           float* guided);

extern const std::vector<std::string> kSamplers;  // ddpm, ddim, then the solvers
extern const std::vector<std::string> kSolvers;   // dpmpp-2m, unipc, euler: no eta, no noise
bool is_solver(const std::string& sampler);

bool needs_noise(const std::string& sampler, int k, double eta);

// One step at kept index k; `noise` may be null when !needs_noise. `result` may alias x.
void ddpm_step(const Diffusion& d, const StepShape& s, const float* x, const float* out, int k, const float* noise,
               bool clip, float* result);
void ddim_step(const Diffusion& d, const StepShape& s, const float* x, const float* out, int k, const float* noise,
               double eta, bool clip, float* result);

// What a solver carries from step to step for one request: the last two data predictions
// (m1 = m_{i-1}, m2 = m_{i-2}), and for UniPC's corrector the sample the last predictor started
// from and that step's order. Sized on the first step.
struct SolverState {
  std::vector<float> m1, m2, last_x;
  int last_order = 0;
};

// Euler's sample lives in sigma space: x_T * sigmas[0] (in place); the others start from x_T.
void solver_initial_sample(const SolverSchedule& s, const std::string& sampler, float* x, size_t count);
// What the network receives for sample x at kept index k: Euler's x / sqrt(sigma^2 + 1), else x.
void solver_model_input(const SolverSchedule& s, const std::string& sampler, const float* x, int k, size_t count,
                        float* out);
// One solver step at kept index k (step i = N-1-k) from sample x, in place, given the (guided)
// model output for solver_model_input(x); only its eps channels are read.
void solver_step(const SolverSchedule& s, const std::string& sampler, SolverState& state, const StepShape& shape,
                 float* x, const float* out, int k, bool clip);

}  // namespace flexdit_core
