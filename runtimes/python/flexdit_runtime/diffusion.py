"""Gaussian diffusion tables and timestep respacing, as the reference computes them.

Tables are float64 like the reference; each coefficient is cast to float32 where it meets
the float32 sample, exactly as the reference's ``_extract_into_tensor`` does.
"""

from __future__ import annotations

import math

import numpy as np


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    scale = 1000 / T
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def space_timesteps(T: int, spec: str) -> list[int]:
    """Original timesteps kept by respacing: 'N' or 'a,b,c' (equal sections, improved-DDPM)
    or 'ddimN' (striding). Returned ascending."""
    spec = str(spec)
    if spec.startswith("ddim"):
        n = int(spec[len("ddim"):])
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"cannot take exactly {n} steps with an integer DDIM stride over {T} timesteps")
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        frac = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac
        start += size
    return sorted(set(kept))


class Diffusion:
    """Tables of a (possibly respaced) process; index k runs over kept steps, and
    ``timestep_map[k]`` is the original timestep the network must receive."""

    def __init__(self, base_betas: np.ndarray, use_timesteps=None, variance_type: str = "learned_range"):
        T = len(base_betas)
        keep = sorted(use_timesteps) if use_timesteps is not None else list(range(T))
        ac_base = np.cumprod(1.0 - base_betas)
        betas, last = [], 1.0
        for i in keep:
            betas.append(1 - ac_base[i] / last)
            last = ac_base[i]
        self.timestep_map = np.array(keep, dtype=np.int64)
        self.variance_type = variance_type
        b = self.betas = np.array(betas, dtype=np.float64)
        ac = self.alphas_cumprod = np.cumprod(1.0 - b)
        acp = self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        pv = self.posterior_variance = b * (1.0 - acp) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(b) > 1 else np.log(np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def f32(self, name: str, k: int) -> np.float32:
        return np.float32(getattr(self, name)[k])

    def split_output(self, out: np.ndarray, k: int, cin: int):
        """-> (eps, log variance) for step k from the network output (B, Cout, H, W)."""
        eps = out[:, :cin]
        if self.variance_type == "learned_range":
            min_log = self.f32("posterior_log_variance_clipped", k)
            max_log = np.float32(np.log(self.betas)[k])
            frac = (out[:, cin:] + np.float32(1)) / np.float32(2)
            return eps, frac * max_log + (np.float32(1) - frac) * min_log
        if self.variance_type == "fixed_large":
            var = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_steps > 1 else self.betas
            return eps, np.full_like(eps, np.float32(np.log(var)[k]))
        return eps, np.full_like(eps, self.f32("posterior_log_variance_clipped", k))

    def pred_xstart(self, x, eps, k, clip: bool = False):
        x0 = self.f32("sqrt_recip_alphas_cumprod", k) * x - self.f32("sqrt_recipm1_alphas_cumprod", k) * eps
        return np.clip(x0, -1, 1) if clip else x0


def solver_timesteps(sampler: str, T: int, steps: int, spacing: str) -> np.ndarray:
    """What the network receives at each step of a solver (dpmpp-2m, unipc, euler), first step
    first (descending), float64. 'linspace' is each solver's diffusers default: integer
    ``round(linspace(0, T-1, steps+1))`` without its last (0) for dpmpp-2m and unipc, fractional
    ``float32(linspace(0, T-1, steps))`` for euler; 'sections'/'ddim' take the respaced kept
    timesteps instead."""
    if spacing != "linspace":
        keep = space_timesteps(T, f"ddim{steps}" if spacing == "ddim" else str(steps))
        return np.array(keep[::-1], dtype=np.float64)
    if sampler == "euler":
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()


class SolverSchedule:
    """Noise levels of a solver run over the base process. Step i = 0..N-1 moves from
    ``sigmas[i]`` to ``sigmas[i+1]`` (``sigmas[N] = 0``); ``alphas``/``sigmas_vp``/``lambdas``
    are the variance-preserving alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t and
    lambda_t = log(alpha_t) - log(sigma_t) (none at sigma 0), float64. Like ``Diffusion``,
    kept index k = N-1-i counts down and ``timestep_map[k]`` is what the network receives.

    The sigma table is diffusers' float32 one (its alphas_cumprod is a float32 tensor, whose
    rounding moves sigma at t = 0 by 8e-5 relative, which a one-step Euler run shows in full):
    sigma(t) = sqrt((1 - ac32) / ac32) in float32, ac32 = float32 of the float64 running product
    of float32(1 - float32(beta)), linearly interpolated (float64) at the timesteps and rounded
    to float32."""

    def __init__(self, base_betas: np.ndarray, timesteps: np.ndarray):
        a32 = np.float32(1) - np.asarray(base_betas).astype(np.float32)
        ac32 = np.cumprod(a32.astype(np.float64)).astype(np.float32)
        sig = np.sqrt((np.float32(1) - ac32) / ac32).astype(np.float64)
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        self.timestep_map = self.timesteps[::-1].copy()
        at = np.interp(self.timesteps, np.arange(len(sig), dtype=np.float64), sig).astype(np.float32)
        self.sigmas = np.append(at, np.float32(0)).astype(np.float64)
        # math (the C library) rather than numpy's vectorised log: one value on every platform
        self.alphas = [1.0 / math.sqrt(s * s + 1.0) for s in self.sigmas.tolist()]
        self.sigmas_vp = [s * a for s, a in zip(self.sigmas.tolist(), self.alphas)]
        self.lambdas = [math.log(a) - math.log(s) for a, s in zip(self.alphas[:-1], self.sigmas_vp[:-1])]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)
