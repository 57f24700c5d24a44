"""DDPM (ancestral, learned-range variance) and DDIM samplers over a respaced process, the
few-step solvers DPM-Solver++ 2M, UniPC (bh2) and Euler as diffusers' schedulers define them,
plus classifier-free guidance; pure numpy float32, step for step the reference's arithmetic.

A sampler walks kept steps k = K-1 .. 0; the denoiser is called with the *original*
timestep ``diffusion.timestep_map[k]``, which is also what picks the stage graph. The solvers
keep their history (earlier data predictions, UniPC's last sample) in a ``SolverState`` per
request; their per-step coefficients are computed in float64 with the C library's log/expm1
and cast to float32 where they meet the sample, so another runtime can match them bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from .diffusion import Diffusion, SolverSchedule

SOLVERS = ("dpmpp-2m", "unipc", "euler")  # sigma-space schedules, no eta, no noise
SAMPLERS = ("ddpm", "ddim") + SOLVERS


def guide(out: np.ndarray, n: int, scale: float, policy: str, cin: int) -> np.ndarray:
    """Rows [0, n) conditional, [n, 2n) unconditional -> guided output for the n conditional
    rows. 'first3' guides channels 0..2 only (the reference's quirk); 'eps' all eps channels.
    Unguided channels keep the conditional row's own output."""
    g = 3 if policy == "first3" else cin
    cond, uncond = out[:n], out[n:]
    guided = cond.copy()
    guided[:, :g] = uncond[:, :g] + np.float32(scale) * (cond[:, :g] - uncond[:, :g])
    return guided


def ddpm_step(d: Diffusion, x, out, k, cin, noise, clip=False):
    eps, log_var = d.split_output(out, k, cin)
    x0 = d.pred_xstart(x, eps, k, clip)
    mean = d.f32("posterior_mean_coef1", k) * x0 + d.f32("posterior_mean_coef2", k) * x
    if k == 0:
        return mean
    return mean + np.exp(np.float32(0.5) * log_var) * noise


def ddim_step(d: Diffusion, x, out, k, cin, noise, eta: float = 0.0, clip=False):
    eps, _ = d.split_output(out, k, cin)
    x0 = d.pred_xstart(x, eps, k, clip)
    eps = (d.f32("sqrt_recip_alphas_cumprod", k) * x - x0) / d.f32("sqrt_recipm1_alphas_cumprod", k)
    ab, abp = d.f32("alphas_cumprod", k), d.f32("alphas_cumprod_prev", k)
    one = np.float32(1)
    sigma = np.float32(eta) * np.sqrt((one - abp) / (one - ab)) * np.sqrt(one - ab / abp)
    mean = x0 * np.sqrt(abp) + np.sqrt(one - abp - sigma ** 2) * eps
    if k == 0 or eta == 0:
        return mean.astype(np.float32)
    return (mean + sigma * noise).astype(np.float32)


def needs_noise(sampler: str, k: int, eta: float) -> bool:
    """Whether step k draws fresh noise (DDPM except at k = 0; DDIM only with eta > 0)."""
    return k > 0 and (sampler == "ddpm" or (sampler == "ddim" and eta > 0))


# ---- the solvers ---------------------------------------------------------------------------
# Written once for numpy arrays and torch tensors (torch_sampler.py): ``c`` turns a float64
# coefficient into the float32 scalar that multiplies the sample (np.float32, or the Python float
# equal to it for torch); only +, -, *, / and clipping touch the sample.

class SolverState:
    """What a solver carries from step to step: the last two data predictions (oldest first),
    and for UniPC's corrector the sample its last predictor started from and that step's order."""

    def __init__(self):
        self.m: list = []
        self.last_x = None
        self.last_order = 0


def _clip(a):
    return a.clamp(-1, 1) if hasattr(a, "clamp") else np.clip(a, -1, 1)


def solver_order(s: SolverSchedule, i: int) -> int:
    """First order on the first step (no history) and on the last (to sigma 0), else second."""
    return 1 if i == 0 or i == s.num_steps - 1 else 2


def multistep_coefs(s: SolverSchedule, i: int, order: int) -> tuple[float, float, float]:
    """(c_x, c_m, c_d) of the step from sigmas[i] to sigmas[i+1] > 0: DPM-Solver++ 2M midpoint,
    which is also UniPC's bh2 predictor: x' = c_x x - c_m m_i - c_d (m_i - m_{i-1})."""
    h = s.lambdas[i + 1] - s.lambdas[i]
    c_x = s.sigmas_vp[i + 1] / s.sigmas_vp[i]
    c_m = s.alphas[i + 1] * math.expm1(-h)
    if order == 1:
        return c_x, c_m, 0.0
    r = (s.lambdas[i] - s.lambdas[i - 1]) / h
    return c_x, c_m, 0.5 * c_m / r


def unipc_corrector_coefs(s: SolverSchedule, i: int, order: int) -> tuple[float, float, float, float]:
    """(c_x, c_m, c_d, c_t) of UniC at step i (bh2, B(h) = expm1(-h)), correcting the sample the
    predictor of step i-1 (of ``order``) made: x = c_x x_{i-1} - c_m m_{i-1}
    - c_d (m_{i-1} - m_{i-2}) - c_t (m_i - m_{i-1})."""
    h = s.lambdas[i] - s.lambdas[i - 1]
    hh = -h
    phi = math.expm1(hh)
    c_x = s.sigmas_vp[i] / s.sigmas_vp[i - 1]
    c_m = s.alphas[i] * phi
    if order == 1:
        return c_x, c_m, 0.0, c_m * 0.5
    rk = (s.lambdas[i - 2] - s.lambdas[i - 1]) / h
    b1 = (phi / hh - 1.0) / phi
    b2 = ((phi / hh - 1.0) / hh - 0.5) * 2.0 / phi
    rho0 = (b1 - b2) / (1.0 - rk)
    rho1 = b1 - rho0
    return c_x, c_m, -c_m * rho0 / rk, c_m * rho1


def _combine(c, x, m, coefs, m_prev=None, m_new=None):
    """c_x x - c_m m [- c_d (m - m_prev)] [- c_t (m_new - m)], float32, in this order."""
    c_x, c_m, c_d = coefs[:3]
    y = c(c_x) * x - c(c_m) * m
    if m_prev is not None:
        y = y - c(c_d) * (m - m_prev)
    if m_new is not None:
        y = y - c(coefs[3]) * (m_new - m)
    return y


def model_input(s: SolverSchedule, sampler: str, x, k: int, c=np.float32):
    """What the network receives for sample x at step k: Euler's sigma-space sample scaled by
    1/sqrt(sigma^2 + 1), the others' sample as it is."""
    if sampler != "euler":
        return x
    sig = float(s.sigmas[s.num_steps - 1 - k])
    return x / c(math.sqrt(sig * sig + 1.0))


def initial_sample(s: SolverSchedule, sampler: str, x_T, c=np.float32):
    """Euler starts from x_T * sigma_max (its state lives in sigma space); the others from x_T."""
    return x_T * c(float(s.sigmas[0])) if sampler == "euler" else x_T


def solver_step(s: SolverSchedule, sampler: str, state: SolverState, x, out, k: int, cin: int, clip=False,
                c=np.float32):
    """One step of a solver at kept index k (step i = N-1-k) from sample x, given the (guided)
    model output for ``model_input(x)``."""
    i = s.num_steps - 1 - k
    eps = out[:, :cin]
    if sampler == "euler":
        sig = float(s.sigmas[i])
        x0 = x - c(sig) * eps
        if clip:
            x0 = _clip(x0)
        return x + (x - x0) / c(sig) * c(float(s.sigmas[i + 1]) - sig)
    m = (x - c(s.sigmas_vp[i]) * eps) / c(s.alphas[i])
    if clip:
        m = _clip(m)
    if sampler == "unipc" and i > 0:
        coefs = unipc_corrector_coefs(s, i, state.last_order)
        x = _combine(c, state.last_x, state.m[-1], coefs, state.m[-2] if state.last_order == 2 else None, m)
    order = solver_order(s, i)
    state.last_x, state.last_order = x, order
    state.m = (state.m + [m])[-2:]
    if s.sigmas[i + 1] == 0:  # to sigma 0: the data prediction itself
        return m
    return _combine(c, x, m, multistep_coefs(s, i, order), state.m[0] if order == 2 else None)


def step(d, sampler: str, x, out, k, cin, noise, eta: float = 0.0, clip=False, state: SolverState | None = None):
    """One step of ``sampler`` from x at kept step k, given the (guided) model output; ``d`` is
    the ``Diffusion`` (ddpm, ddim) or ``SolverSchedule`` (the solvers, with their ``state``)."""
    if sampler in SOLVERS:
        return solver_step(d, sampler, state, x, out, k, cin, clip)
    if sampler == "ddpm":
        return ddpm_step(d, x, out, k, cin, noise, clip)
    return ddim_step(d, x, out, k, cin, noise, eta, clip)
