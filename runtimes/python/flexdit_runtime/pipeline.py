"""The embeddable API: ``Pipeline.from_bundle(path)(prompts, ...)`` -> images.

Noise is drawn per image from ``default_rng([seed, index])``, so an image depends only on
the seed and its position in the prompt list, never on how prompts are batched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .diffusion import Diffusion, linear_betas, space_timesteps
from .engines import Decoder, StageRunner, precision_overrides
from .images import to_uint8
from flexdit_bundle.manifest import BundleError, load_bundle
from .prompts import ClassIndex
from .samplers import SAMPLERS, guide, sample


@dataclass
class Result:
    class_ids: list
    labels: list
    samples: np.ndarray  # final sampler state (latent or pixel space), float32
    images: np.ndarray  # (N, H, W, C) uint8
    seconds: float
    stage_seconds: dict = field(default_factory=dict)
    decoder_seconds: float = 0.0


class Pipeline:
    def __init__(self, bundle, providers=None, threads=None, precision=None, backend="onnx"):
        """``precision``: None (each stage's default from the bundle's policy), a spec string
        ("fp32", "int8:stages=0-2,fp16:stages=3"), or {stage id or "*": precision}."""
        self.bundle = bundle
        m = bundle.manifest
        self.cfg = m["model"]["config"]
        self.classes = ClassIndex(m["model"]["class_names"], m["model"]["num_classes"])
        if isinstance(precision, str):
            precision = precision_overrides(bundle, precision, backend)
        self.runner = StageRunner(bundle, providers, threads, precision, backend)
        self.decoder = Decoder(bundle, providers, threads) if bundle.decoder else None
        self.defaults = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "eta": 0.0, "clip_denoised": False,
                         **m["diffusion"].get("defaults", {})}

    @classmethod
    def from_bundle(cls, path, providers=None, threads=None, precision=None, verify_checksums=True, backend="onnx"):
        return cls(load_bundle(path, verify_checksums, defer_weights=True), providers, threads, precision, backend)

    def diffusion(self, steps: int, spacing: str = "sections") -> Diffusion:
        d = self.bundle.diffusion
        T = d["num_timesteps"]
        if not 1 <= steps <= T:
            raise BundleError(f"--steps must be in 1..{T}, got {steps}")
        spec = f"ddim{steps}" if spacing == "ddim" else str(steps)
        try:
            keep = space_timesteps(T, spec)
        except ValueError as e:
            raise BundleError(str(e)) from None
        return Diffusion(linear_betas(T, d["beta_start"], d["beta_end"]), keep, d["variance_type"])

    def capacity(self, cfg_scale: float) -> int:
        B = min(self.runner.batches)
        return max(1, B // 2) if cfg_scale > 1 else B

    def __call__(self, prompts, *, steps=None, sampler=None, cfg_scale=None, eta=None, seed=0, init_noise=None,
                 batch=None, spacing="sections", noise_fn=None, progress=None, clip_denoised=None) -> Result:
        steps = int(steps or self.defaults["steps"])
        sampler = sampler or self.defaults["sampler"]
        cfg_scale = float(self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale)
        eta = float(self.defaults["eta"] if eta is None else eta)
        clip = bool(self.defaults["clip_denoised"] if clip_denoised is None else clip_denoised)
        if sampler not in SAMPLERS:
            raise BundleError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        ids = [p if isinstance(p, (int, np.integer)) else self.classes.resolve(str(p)) for p in prompts]
        n = len(ids)
        if n == 0:
            raise BundleError("no prompts given")
        C, H = self.cfg["in_channels"], self.cfg["input_size"]
        shape = (C, H, H)
        rngs = [np.random.default_rng([int(seed), i]) for i in range(n)]
        if init_noise is not None:
            x_T = np.asarray(init_noise, dtype=np.float32)
            if x_T.shape == shape:
                x_T = np.broadcast_to(x_T, (n,) + shape).copy()
            if x_T.shape != (n,) + shape:
                raise BundleError(f"initial noise has shape {x_T.shape}; expected {(n,) + shape} or {shape}")
        else:
            x_T = np.stack([r.standard_normal(shape, dtype=np.float32) for r in rngs])
        per_call = int(batch or self.capacity(cfg_scale))
        if per_call < 1:
            raise BundleError(f"--batch must be at least 1, got {per_call}")
        d = self.diffusion(steps, spacing)
        null = self.bundle.model["null_class"]
        policy = self.bundle.diffusion["cfg_channels"]
        self.runner.time_per_stage.clear()
        start = time.perf_counter()
        results = []
        for lo in range(0, n, per_call):
            idx = list(range(lo, min(n, lo + per_call)))
            y = np.array([ids[i] for i in idx], dtype=np.int64)
            m = len(idx)

            def denoise(x, t, y=y, m=m):
                if cfg_scale > 1:
                    out = self.runner(np.concatenate([x, x]), t, np.concatenate([y, np.full(m, null, np.int64)]))
                    return guide(out, m, cfg_scale, policy, C)
                return self.runner(x, t, y)

            def chunk_noise(k, idx=idx):
                if noise_fn is not None:
                    return noise_fn(k, idx)
                return np.stack([rngs[i].standard_normal(shape, dtype=np.float32) for i in idx])

            results.append(sample(d, denoise, x_T[idx], cin=C, sampler=sampler, eta=eta, noise_fn=chunk_noise, clip_denoised=clip,
                                  on_step=(lambda k, t: progress(1)) if progress else None))
        samples = np.concatenate(results)
        dec_t = time.perf_counter()
        decoded = self.decoder(samples) if self.decoder else samples
        dec_s = time.perf_counter() - dec_t if self.decoder else 0.0
        value_range = self.bundle.manifest["output"]["value_range"]
        images = to_uint8(decoded, value_range)
        return Result(ids, [self.classes.label(i) for i in ids], samples, images, time.perf_counter() - start,
                      dict(self.runner.time_per_stage), dec_s)
