"""Per-request sampling state, kept apart from the loaded model so that one model can serve
many requests at once: each request owns its images' class ids, noise generators, sampler state
x, step index, parameters and timings, and nothing about it lives in the model.

Noise is drawn per image from ``default_rng([seed, index])`` (x_T first, then one draw per noisy
step), so an image depends only on the seed and its index, never on what it was batched with.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .diffusion import Diffusion, SolverSchedule
from .samplers import SOLVERS, SolverState, initial_sample, model_input
from .sampling_params import SamplingParams


@dataclass
class Result:
    class_ids: list
    labels: list
    samples: np.ndarray  # final sampler state (latent or pixel space), float32
    images: np.ndarray  # (N, H, W, C) uint8
    seconds: float
    stage_seconds: dict = field(default_factory=dict)
    decoder_seconds: float = 0.0


class Request:
    """One set of images walking the sampler chain together. Created by ``Model.start``,
    advanced by ``Model.step`` (one thread at a time per request), read by ``Model.finish``."""

    def __init__(self, class_ids: list[int], params: SamplingParams, diffusion: Diffusion | SolverSchedule,
                 x_T: np.ndarray, seed: int, indices: list[int], rngs: list, noise_fn: Callable | None, shape: tuple):
        self.class_ids = list(class_ids)
        self.params = params
        self.diffusion = diffusion
        self.solver = params.sampler in SOLVERS
        self.state = SolverState() if self.solver else None  # this request's solver history
        self.x = initial_sample(diffusion, params.sampler, x_T) if self.solver else x_T
        self.k = diffusion.num_steps - 1  # the next kept step to take; -1 when done
        self.seed, self.indices = seed, list(indices)
        self._rngs, self._noise_fn, self._shape = rngs, noise_fn, shape
        self.started = time.perf_counter()
        self.stage_seconds: dict[int, float] = defaultdict(float)  # this request's share of each stage's calls
        self.failure: str | None = None  # why sampling stopped (non-finite values), set by Model

    @property
    def n(self) -> int:
        return len(self.class_ids)

    @property
    def done(self) -> bool:
        return self.k < 0

    @property
    def timestep(self) -> int | float:
        """The original timestep the network receives at the next step (fractional for euler)."""
        t = float(self.diffusion.timestep_map[self.k])
        return int(t) if t.is_integer() else t

    def model_input(self) -> np.ndarray:
        """What the network receives as x at the next step (euler scales its sigma-space sample)."""
        return model_input(self.diffusion, self.params.sampler, self.x, self.k) if self.solver else self.x

    def noise(self, k: int) -> np.ndarray:
        """Fresh noise for step k: ``noise_fn(k, indices)`` if the caller gave one, else the next
        draw of each image's own generator."""
        if self._noise_fn is not None:
            return self._noise_fn(k, self.indices)
        return np.stack([r.standard_normal(self._shape, dtype=np.float32) for r in self._rngs])
