"""DDPM (ancestral, learned-range variance) and DDIM samplers over a respaced process, plus
classifier-free guidance; pure numpy float32, step for step the reference's arithmetic.

A sampler walks kept steps k = K-1 .. 0; the denoiser is called with the *original*
timestep ``diffusion.timestep_map[k]``, which is also what picks the stage graph.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .diffusion import Diffusion

SAMPLERS = ("ddpm", "ddim")


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
    return k > 0 and (sampler == "ddpm" or eta > 0)


def step(d: Diffusion, sampler: str, x, out, k, cin, noise, eta: float = 0.0, clip=False):
    """One step of ``sampler`` from x at kept step k, given the (guided) model output."""
    if sampler == "ddpm":
        return ddpm_step(d, x, out, k, cin, noise, clip)
    return ddim_step(d, x, out, k, cin, noise, eta, clip)


def sample(d: Diffusion, denoise: Callable, x: np.ndarray, *, cin: int, sampler: str = "ddpm", eta: float = 0.0,
           noise_fn: Callable[[int], np.ndarray] | None = None, on_step: Callable | None = None,
           clip_denoised: bool = False) -> np.ndarray:
    """Run the whole chain from x = x_T. ``denoise(x, t_original) -> model output`` already
    includes guidance; ``noise_fn(k)`` supplies the step's fresh noise (needed by DDPM and
    DDIM with eta > 0). ``clip_denoised`` clips the predicted x0 to [-1, 1] (pixel-space models)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    x = x.astype(np.float32)
    for k in range(d.num_steps - 1, -1, -1):
        t = int(d.timestep_map[k])
        out = denoise(x, t)
        noise = noise_fn(k) if needs_noise(sampler, k, eta) else None
        x = step(d, sampler, x, out, k, cin, noise, eta, clip_denoised)
        if on_step:
            on_step(k, t)
    return x
