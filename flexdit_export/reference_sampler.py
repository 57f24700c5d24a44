"""The PyTorch reference sampler that bundles are verified against.

A torch restatement of the improved-DDPM / DiT sampling code (respaced GaussianDiffusion,
``forward_with_cfg``, p_sample and ddim_sample), kept independent of the runtime's numpy
sampler on purpose: ``verify`` and the tests compare the two. The stage (sparse grid) is
chosen from the bundle's schedule by the original timestep, as the runtime does.
"""

from __future__ import annotations

import numpy as np
import torch


def _space(T: int, steps: int, spacing: str) -> list[int]:
    if spacing == "ddim":
        for stride in range(1, T):
            if len(range(0, T, stride)) == steps:
                return list(range(0, T, stride))
        raise ValueError(f"no integer DDIM stride gives {steps} steps")
    frac = 1 if steps <= 1 else (T - 1) / (steps - 1)
    kept, cur = set(), 0.0
    for _ in range(steps):  # accumulate the stride exactly as improved-DDPM does
        kept.add(round(cur))
        cur += frac
    return sorted(kept)


class ReferenceDiffusion:
    def __init__(self, T: int, steps: int, spacing: str = "sections", learn_sigma: bool = True):
        base = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
        ac_base = np.cumprod(1 - base)
        self.map = _space(T, steps, spacing)
        last, betas = 1.0, []
        for i in self.map:
            betas.append(1 - ac_base[i] / last)
            last = ac_base[i]
        b = np.array(betas)
        ac = np.cumprod(1 - b)
        acp = np.append(1.0, ac[:-1])
        pv = b * (1 - acp) / (1 - ac)
        self.learn_sigma = learn_sigma
        self.tab = {
            "log_betas": np.log(b), "ac": ac, "acp": acp,
            "plv": np.log(np.append(pv[1], pv[1:])) if len(b) > 1 else np.log(np.maximum(pv, 1e-20)),
            "fixed_large": np.log(np.append(pv[1], b[1:])) if len(b) > 1 else np.log(b),
            "sr": np.sqrt(1 / ac), "srm1": np.sqrt(1 / ac - 1),
            "c1": b * np.sqrt(acp) / (1 - ac), "c2": (1 - acp) * np.sqrt(1 - b) / (1 - ac),
        }

    def _x(self, name, i, like):
        return torch.from_numpy(self.tab[name])[torch.full((like.shape[0],), i)].float().view(-1, 1, 1, 1)

    def p_mean_variance(self, out, x, i, clip=False):
        C = x.shape[1]
        if self.learn_sigma:
            eps, v = out[:, :C], out[:, C:]
            frac = (v + 1) / 2
            log_var = frac * self._x("log_betas", i, x) + (1 - frac) * self._x("plv", i, x)
        else:
            eps = out
            log_var = self._x("fixed_large", i, x).expand_as(x)
        x0 = self._x("sr", i, x) * x - self._x("srm1", i, x) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self._x("c1", i, x) * x0 + self._x("c2", i, x) * x
        return mean, log_var, x0

    def ddpm_step(self, out, x, i, noise, clip=False):
        mean, log_var, _ = self.p_mean_variance(out, x, i, clip)
        return mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * log_var) * noise

    def ddim_step(self, out, x, i, noise, eta, clip=False):
        _, _, x0 = self.p_mean_variance(out, x, i, clip)
        eps = (self._x("sr", i, x) * x - x0) / self._x("srm1", i, x)
        ab, abp = self._x("ac", i, x), self._x("acp", i, x)
        sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
        mean = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma ** 2) * eps
        return mean + (0.0 if i == 0 else 1.0) * sigma * noise


def forward_with_cfg(model, x, t, y, null, scale, channels, sparse_grid):
    """DiT's forward_with_cfg: batch [cond; uncond], guide the first `channels` channels."""
    n = x.shape[0]
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]), sparse_grid)
    cond, uncond = out[:n], out[n:]
    g = cond.clone()
    g[:, :channels] = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return g


@torch.no_grad()
def reference_sample(model, stages, z, y, *, steps, sampler="ddim", eta=0.0, cfg_scale=1.0, cfg_channels="first3",
                     spacing="sections", num_timesteps=1000, noise_fn=None, clip_denoised=False):
    """Sample from x_T = z with the PyTorch model. ``stages``: [(t_min, t_max, s|None)];
    ``noise_fn(k)`` returns the fresh noise of step k (numpy), as the runtime is given."""
    cfg = model.cfg
    d = ReferenceDiffusion(num_timesteps, steps, spacing, cfg.learn_sigma)
    x = torch.as_tensor(np.asarray(z, np.float32))
    y = torch.as_tensor(np.asarray(y, np.int64))
    channels = 3 if cfg_channels == "first3" else cfg.in_channels
    for i in range(len(d.map) - 1, -1, -1):
        t_orig = d.map[i]
        s = next(s for lo, hi, s in stages if lo <= t_orig <= hi)
        t = torch.full((x.shape[0],), float(t_orig))
        if cfg_scale > 1:
            out = forward_with_cfg(model, x, t, y, cfg.num_classes, cfg_scale, channels, s)
        else:
            out = model(x, t, y, s)
        needs = i > 0 and (sampler == "ddpm" or eta > 0)
        noise = torch.as_tensor(noise_fn(i)) if needs else torch.zeros_like(x)
        if sampler == "ddpm":
            x = d.ddpm_step(out, x, i, noise, clip_denoised)
        else:
            x = d.ddim_step(out, x, i, noise, eta, clip_denoised)
    return x.numpy()
