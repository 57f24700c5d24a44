"""Gaussian diffusion tables and timestep respacing, as the reference computes them.

Tables are float64 like the reference; each coefficient is cast to float32 where it meets
the float32 sample, exactly as the reference's ``_extract_into_tensor`` does.
"""

from __future__ import annotations

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
