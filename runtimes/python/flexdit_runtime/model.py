"""A loaded bundle, ready to serve: stage engines, decoder, class index and sampling defaults.

A ``Model`` is immutable after loading and safe to share between threads: every call reads it
and writes only to the requests it is given. The sampler is exposed step by step so that a
server can advance many requests at once:

    req = model.start([3, "sneaker"], seed=7, steps=50)
    while not req.done:
        model.step([req, *other_requests])  # one denoising step each, rows packed per stage
    result = model.finish(req)

``step`` packs the rows of all requests whose next timestep falls in the same stage into shared
engine calls (each row carries its own timestep). A request's images are the same whatever
else shares its calls: noise is per image, rows are independent in the graph, and the sampler
arithmetic is per request.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Iterable

import numpy as np

from flexdit_bundle.manifest import Bundle, BundleError, load_bundle

from .decoder import Decoder
from .diffusion import Diffusion, SolverSchedule, linear_betas, solver_timesteps, space_timesteps
from .engines import StageRunner, precision_overrides
from .images import to_uint8
from .prompts import ClassIndex
from .request import Request, Result
from .samplers import SOLVERS, guide, needs_noise, step
from .sampling_params import SamplingParams, check_init_noise, check_seed, resolve_params
from .settings import RuntimeSettings
from .stage_engine import DEFAULT_KIND


class Model:
    def __init__(self, bundle: Bundle, settings: RuntimeSettings | None = None, precision=None,
                 backend: str = DEFAULT_KIND, *, runner: StageRunner | None = None, decoder: bool = True):
        """``precision``: None (each stage's default from the bundle's policy), a spec string
        ("fp32", "int8:stages=0-2,fp16:stages=3"), or {stage id or "*": precision}.
        ``backend``: an engine kind of ``stage_engine.ENGINE_KINDS``, or "auto" (per stage the
        fastest installed engine and precision the policy allows: ``engine_select``).
        ``runner``: engines already open (``StageRunner.from_engines``) instead of opening them;
        ``decoder=False``: leave the bundle's decoder unloaded (for timing the sampler)."""
        self.bundle = bundle
        self.settings = settings = settings or RuntimeSettings()
        settings.apply()
        m = bundle.manifest
        self.cfg = m.model.config
        self.classes = ClassIndex(m.model.class_names, m.model.num_classes)
        if isinstance(precision, str):
            precision = precision_overrides(bundle, precision, backend)
        self.runner = runner if runner is not None else StageRunner(bundle, settings, precision, backend)
        self.decoder = Decoder(bundle, settings, self.runner.weights) if bundle.decoder and decoder else None
        self.defaults = bundle.sampling_defaults
        self.latent_shape = (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size)

    @classmethod
    def from_bundle(cls, path, settings: RuntimeSettings | None = None, precision=None,
                    backend: str = DEFAULT_KIND, verify_checksums: bool = True) -> "Model":
        return cls(load_bundle(path, verify_checksums, defer_weights=True), settings, precision, backend)

    def engines(self) -> list[dict]:
        """Per stage, what runs it: ``StageRunner.describe()`` (kind, precision, path; with
        ``backend="auto"`` the timings behind the choice). For summaries: say what was picked."""
        return self.runner.describe()

    # ---- what a request asks for ----------------------------------------------------------

    def params(self, *, steps=None, sampler=None, cfg_scale=None, eta=None, spacing=None,
               clip_denoised=None) -> SamplingParams:
        """Sampling parameters with the bundle's defaults filled in, every value checked."""
        return resolve_params(self.defaults, self.bundle.diffusion.num_timesteps, steps=steps, sampler=sampler,
                              cfg_scale=cfg_scale, eta=eta, spacing=spacing, clip_denoised=clip_denoised)

    def diffusion(self, steps: int, spacing: str = "sections", sampler: str = "ddpm") -> Diffusion | SolverSchedule:
        """The tables a run of ``sampler`` walks: a respaced ``Diffusion`` (ddpm, ddim) or the
        ``SolverSchedule`` of a solver."""
        d = self.bundle.diffusion
        T = d.num_timesteps
        betas = linear_betas(T, d.beta_start, d.beta_end)
        try:
            if sampler in SOLVERS:
                return SolverSchedule(betas, solver_timesteps(sampler, T, steps, spacing))
            keep = space_timesteps(T, f"ddim{steps}" if spacing == "ddim" else str(steps))
        except ValueError as e:
            raise BundleError(str(e)) from None
        return Diffusion(betas, keep, d.variance_type)

    def class_ids(self, prompts: Iterable) -> list[int]:
        """Class names or ids -> ids, each checked against the model's classes."""
        ids = []
        for p in prompts:
            if isinstance(p, (int, np.integer)) and not isinstance(p, bool):
                p = str(int(p))
            ids.append(self.classes.resolve(str(p)))
        if not ids:
            raise BundleError("no prompts given")
        return ids

    def capacity(self, cfg_scale: float) -> int:
        """Images one call of the smallest stage graph holds (half of it under guidance)."""
        B = min(self.runner.batches)
        return max(1, B // 2) if cfg_scale > 1 else B

    # ---- the step-wise sampler ---------------------------------------------------------------

    def start(self, prompts, params: SamplingParams | None = None, *, seed=0, init_noise=None,
              noise_fn: Callable | None = None, indices=None, **sampling) -> Request:
        """A new request for ``prompts`` (class names or ids). ``params`` or the keywords of
        ``params()``. Image i uses ``default_rng([seed, indices[i]])`` (indices: 0..n-1 unless
        given); ``init_noise``: x_T, (n, C, H, W) or (C, H, W); ``noise_fn(k, indices)``
        replaces the per-image generators for the fresh noise of step k."""
        if params is None:
            params = self.params(**sampling)
        elif sampling:
            raise TypeError(f"give either params or sampling keywords, not both ({', '.join(sampling)})")
        ids = self.class_ids(prompts)
        seed = check_seed(seed)
        n = len(ids)
        indices = list(range(n)) if indices is None else [int(i) for i in indices]
        if len(indices) != n:
            raise BundleError(f"{len(indices)} image indices for {n} prompts")
        x_T = None if init_noise is None else check_init_noise(init_noise, n, self.latent_shape)
        d = self.diffusion(params.steps, params.spacing, params.sampler)
        rngs = [np.random.default_rng([seed, i]) for i in indices]
        if x_T is None:
            x_T = np.stack([r.standard_normal(self.latent_shape, dtype=np.float32) for r in rngs])
        return Request(ids, params, d, x_T, seed, indices, rngs, noise_fn, self.latent_shape)

    def step(self, requests: Iterable[Request]) -> None:
        """Advance every unfinished request by one denoising step. Rows of requests whose next
        timestep falls in the same stage share engine calls; the time of each call is shared
        among its requests by rows."""
        by_stage = defaultdict(list)
        for r in requests:
            if not r.done:
                by_stage[self.runner.stage_for(r.timestep)].append(r)
        null = self.bundle.model.null_class
        for sid, group in by_stage.items():
            xs, ts, ys = [], [], []
            for r in group:
                y = np.asarray(r.class_ids, np.int64)
                x = r.model_input()
                if r.params.guided:  # rows [0, n) conditional, [n, 2n) unconditional
                    x, y = np.concatenate([x, x]), np.concatenate([y, np.full(r.n, null, np.int64)])
                xs.append(x)
                ys.append(y)
                ts.append(np.full(len(y), r.timestep, np.float32))
            start = time.perf_counter()
            out = self.runner.run_rows(sid, np.concatenate(xs), np.concatenate(ts), np.concatenate(ys))
            seconds = time.perf_counter() - start
            lo = 0
            for r, y in zip(group, ys):
                rows = out[lo:lo + len(y)]
                lo += len(y)
                r.stage_seconds[sid] += seconds * len(y) / len(out)
                self._advance(r, rows, sid)

    def _advance(self, r: Request, out: np.ndarray, sid: int | None = None) -> None:
        p, k = r.params, r.k
        cin = self.cfg.in_channels
        if not np.isfinite(out).all():
            return self._fail(r, out, sid, "the stage graph returned NaN or infinite values")
        if p.guided:
            with np.errstate(over="ignore", invalid="ignore"):
                out = guide(out, r.n, p.cfg_scale, self.bundle.diffusion.cfg_channels, cin)
            if not np.isfinite(out).all():
                return self._fail(r, out, sid, f"guidance with cfg-scale {p.cfg_scale:g} overflowed float32")
        noise = r.noise(k) if needs_noise(p.sampler, k, p.eta) else None
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            r.x = step(r.diffusion, p.sampler, r.x, out, k, cin, noise, p.eta, p.clip_denoised, r.state)
        if not np.isfinite(r.x).all():
            cause = "the step's noise held NaN or infinite values" if noise is not None and not np.isfinite(noise).all() \
                else f"the {p.sampler} update (eta {p.eta:g}, cfg-scale {p.cfg_scale:g}) overflowed float32"
            return self._fail(r, r.x, sid, cause)
        r.k -= 1

    def _fail(self, r: Request, values: np.ndarray, sid, cause: str) -> None:
        """Stop a request whose state stopped being finite (it would end as a black image); the
        message, naming where and why, is raised by ``finish``."""
        rows = values.reshape(len(values), -1)
        bad = [r.indices[i % r.n] for i in range(len(rows)) if not np.isfinite(rows[i]).all()]
        bad = sorted(set(bad))
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        where = f"stage {sid}, " if sid is not None else ""
        r.failure = (f"sampling produced NaN or infinite values for image(s) {shown} at step "
                     f"{r.diffusion.num_steps - r.k} of {r.diffusion.num_steps} ({where}t={r.timestep}): {cause}")
        r.k = -1

    def run(self, request: Request, progress: Callable | None = None) -> Request:
        """Take all remaining steps of one request (``progress(1)`` after each). When every stage
        runs on one engine kind that keeps the trajectory on its device
        (``StageEngine.keeps_trajectory_on_device``), that kind's sampler takes it there."""
        kinds = {type(e) for e in self.runner.engines}
        if not request.done and len(kinds) == 1:
            (kind,) = kinds
            if kind.keeps_trajectory_on_device:
                kind.run_trajectory(self, request, progress)
                return request
        while not request.done:
            self.step([request])
            if progress:
                progress(1)
        return request

    def finish(self, requests: Request | list[Request]) -> Result:
        """Decode finished requests (together, in order) into one ``Result``."""
        requests = [requests] if isinstance(requests, Request) else list(requests)
        if not requests or any(not r.done for r in requests):
            raise BundleError("finish() needs finished requests (step them until request.done)")
        for r in requests:
            if r.failure:
                raise BundleError(r.failure)
        samples = np.concatenate([r.x for r in requests])
        dec_s = 0.0
        decoded = samples
        if self.decoder is not None:
            dec_t = time.perf_counter()
            decoded = self.decoder(samples)
            dec_s = time.perf_counter() - dec_t
            if not np.isfinite(decoded).all():
                raise BundleError("the decoder returned NaN or infinite values for finite samples")
        images = to_uint8(decoded, self.bundle.manifest.output.value_range)
        stage_seconds = defaultdict(float)
        for r in requests:
            for sid, s in r.stage_seconds.items():
                stage_seconds[sid] += s
        ids = [i for r in requests for i in r.class_ids]
        seconds = time.perf_counter() - min(r.started for r in requests)
        return Result(ids, [self.classes.label(i) for i in ids], samples, images, seconds, dict(stage_seconds), dec_s)
