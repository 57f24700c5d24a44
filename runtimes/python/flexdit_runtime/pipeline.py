"""The embeddable API: ``Pipeline.from_bundle(path)(prompts, ...)`` -> images.

A thin loop over ``Model``'s step-wise sampler: prompts are cut into groups of ``batch`` images,
each group is one request taken through every step, and all groups are decoded together.
Noise is drawn per image from ``default_rng([seed, index])``, so an image depends only on the
seed and its position in the prompt list, never on how prompts are batched.
"""

from __future__ import annotations

import time

from flexdit_bundle.manifest import BundleError, load_bundle

from .model import Model
from .prompts import shown
from .request import Result
from .sampling_params import check_batch, check_init_noise
from .settings import RuntimeSettings

__all__ = ["Pipeline", "Result"]


class Pipeline:
    def __init__(self, bundle, providers=None, threads=None, precision=None, backend=None,
                 settings: RuntimeSettings | None = None, device: str | None = None):
        """``precision``: None (each stage's default from the bundle's policy), a spec string
        ("fp32", "int8:stages=0-2,fp16:stages=3"), or {stage id or "*": precision}.
        ``providers``/``threads`` are shorthand for ``settings=RuntimeSettings(providers, threads)``.
        ``backend``: an engine kind (default onnx). ``device``: "cpu" or "cuda" picks the engine and
        providers that run the bundle there (``device.resolve``: AOTI packages built for that
        device, else the ONNX graphs on ONNX Runtime's CPU or CUDA provider), refusing with one
        line what the bundle or this machine cannot do; None keeps ``backend`` and ``providers``."""
        if settings is None:
            settings = RuntimeSettings(providers=providers, threads=threads)
        elif providers is not None or threads is not None:
            raise TypeError("give providers/threads inside settings, not next to it")
        from .device import resolve

        backend, settings = resolve(bundle, device, backend, settings)
        self.device = device
        self.model = Model(bundle, settings, precision, backend)

    @classmethod
    def from_bundle(cls, path, providers=None, threads=None, precision=None, verify_checksums=True, backend=None,
                    settings: RuntimeSettings | None = None, device: str | None = None):
        return cls(load_bundle(path, verify_checksums, defer_weights=True), providers, threads, precision, backend,
                   settings, device)

    # the loaded model's parts, as before the split
    bundle = property(lambda self: self.model.bundle)
    cfg = property(lambda self: self.model.cfg)
    classes = property(lambda self: self.model.classes)
    defaults = property(lambda self: self.model.defaults)
    runner = property(lambda self: self.model.runner)
    decoder = property(lambda self: self.model.decoder)

    def diffusion(self, steps: int, spacing: str | None = None, sampler: str = "ddpm"):
        p = self.model.params(steps=steps, spacing=spacing, sampler=sampler)
        return self.model.diffusion(p.steps, p.spacing, p.sampler)

    def capacity(self, cfg_scale: float) -> int:
        return self.model.capacity(cfg_scale)

    def __call__(self, prompts, *, steps=None, sampler=None, cfg_scale=None, eta=None, seed=0, init_noise=None,
                 batch=None, spacing=None, noise_fn=None, progress=None, clip_denoised=None) -> Result:
        """``batch``: images denoised together (default: what one graph call holds);
        ``noise_fn(k, indices)``: the fresh noise of step k for the images at ``indices``;
        ``progress(1)`` is called after every step of every group."""
        model = self.model
        if isinstance(prompts, (str, bytes, int)) or not hasattr(prompts, "__iter__"):
            raise BundleError(f"prompts must be a list of class names or ids, got {type(prompts).__name__} "
                              f"(for one image: [{shown(prompts)}])")
        params = model.params(steps=steps, sampler=sampler, cfg_scale=cfg_scale, eta=eta, spacing=spacing,
                              clip_denoised=clip_denoised)
        ids = model.class_ids(prompts)
        n = len(ids)
        per_call = check_batch(batch) or model.capacity(params.cfg_scale)
        if init_noise is not None:
            init_noise = check_init_noise(init_noise, n, model.latent_shape)
        start = time.perf_counter()
        requests = []
        for lo in range(0, n, per_call):
            idx = list(range(lo, min(n, lo + per_call)))
            req = model.start([ids[i] for i in idx], params, seed=seed, noise_fn=noise_fn, indices=idx,
                              init_noise=None if init_noise is None else init_noise[lo:lo + len(idx)])
            requests.append(model.run(req, progress))
        res = model.finish(requests)
        res.seconds = time.perf_counter() - start
        return res
