"""A whole sampling chain around any denoiser (a PyTorch model in the tests): the runtime's own
step functions driven the way ``Model.step`` drives them, for comparisons against references
that have no bundle."""

from __future__ import annotations

from typing import Callable

import numpy as np

from flexdit_runtime.diffusion import Diffusion
from flexdit_runtime.samplers import (SAMPLERS, SOLVERS, SolverState, initial_sample, model_input, needs_noise,
                                      step)


def sample(d: Diffusion, denoise: Callable, x: np.ndarray, *, cin: int, sampler: str = "ddpm", eta: float = 0.0,
           noise_fn: Callable[[int], np.ndarray] | None = None, on_step: Callable | None = None,
           clip_denoised: bool = False) -> np.ndarray:
    """Run the whole chain from x = x_T (``d``: a ``Diffusion``, or a ``SolverSchedule`` for the
    solvers). ``denoise(x, t_original) -> model output`` already includes guidance; ``noise_fn(k)`` supplies the step's fresh noise (needed by DDPM and
    DDIM with eta > 0). ``clip_denoised`` clips the predicted x0 to [-1, 1] (pixel-space models)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    x = x.astype(np.float32)
    solver = sampler in SOLVERS
    state = SolverState() if solver else None
    if solver:
        x = initial_sample(d, sampler, x)
    for k in range(d.num_steps - 1, -1, -1):
        t = d.timestep_map[k]
        t = float(t) if solver else int(t)
        out = denoise(model_input(d, sampler, x, k) if solver else x, t)
        noise = noise_fn(k) if needs_noise(sampler, k, eta) else None
        x = step(d, sampler, x, out, k, cin, noise, eta, clip_denoised, state)
        if on_step:
            on_step(k, t)
    return x
