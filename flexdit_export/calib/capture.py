"""Capture the real inputs of every stage graph from real denoising trajectories.

The PyTorch model samples seeded images (classes cycled over all labels, seeded noise) with
the bundle's sampler, step count, guidance scale and schedule, through the sampling function
the caller passes (the compiler passes its PyTorch reference sampler, the one ``verify`` uses:
calib itself never imports the compiler). Every network call is recorded as the stage graph would see
it: the rows (x_t, t, y) of the batch, conditional and unconditional rows alike when guidance
is on, and the call is filed under the one stage whose timestep range holds its t. A stage
therefore holds only its own timesteps.

Memory is bounded: the number of calls and rows each stage will see is known before sampling
(the respaced timestep map), so a seeded choice of at most ``max_rows`` row indices per stage
is made up front and only those rows are kept. The visited timesteps are the runtime's own
respacing (``flexdit_runtime.diffusion.space_timesteps``). Images are sampled in chunks of
``chunk_images``. Calibration and held-out rows come from different images (different seeds).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flexdit_bundle.errors import BundleError
from flexdit_runtime.diffusion import space_timesteps

from .store import CalibError, CalibSet, write_set

SPLIT_SALT = {"calib": 1, "holdout": 2}


@dataclass(frozen=True)
class CaptureSettings:
    sampler: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 4.0
    eta: float = 0.0
    spacing: str = "sections"
    clip_denoised: bool = False
    images: int = 32
    holdout_images: int = 16
    seed: int = 0
    max_rows: int = 512  # per stage, calibration rows
    max_holdout_rows: int = 128  # per stage, held-out rows
    batch: int = 2  # the stage graphs' batch: row counts are multiples of it
    chunk_images: int = 64

    @classmethod
    def from_defaults(cls, defaults: dict, batch: int, overrides: dict) -> "CaptureSettings":
        """The bundle's sampling defaults (sampler, steps, cfg_scale, eta, clip_denoised), the
        graph batch, then explicit overrides; ValueError for a bad one."""
        base = {"sampler": defaults["sampler"], "steps": int(defaults["steps"]), "cfg_scale": float(defaults["cfg_scale"]),
                "eta": float(defaults.get("eta", 0.0)), "clip_denoised": bool(defaults.get("clip_denoised", False)),
                "batch": int(batch)}
        try:
            s = cls(**{**base, **overrides})
        except TypeError as e:
            raise ValueError(str(e)) from None
        bad = s.validate()
        if bad:
            raise ValueError("; ".join(bad))
        return s

    def validate(self) -> list[str]:
        bad = []
        if self.sampler not in ("ddpm", "ddim"):
            bad.append(f"sampler must be ddpm or ddim, not {self.sampler!r}")
        for name in ("steps", "images", "holdout_images", "batch", "chunk_images"):
            if getattr(self, name) < 1:
                bad.append(f"{name.replace('_', '-')} must be at least 1")
        if self.max_rows < self.batch or self.max_holdout_rows < self.batch:
            bad.append(f"max rows per stage must be at least the graph batch ({self.batch})")
        for name in ("cfg_scale", "eta"):  # recorded in calib.json: NaN is no JSON, and guidance < 0 no sampler
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                bad.append(f"{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        return bad


def model_sha256(model) -> str:
    """Fingerprint of the weights: names, dtypes, shapes and bytes of the state dict."""
    h = hashlib.sha256()
    for name, v in sorted(model.state_dict().items()):
        v = v.detach().contiguous().cpu()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _labels(n: int, num_classes: int, seed: int, split: str) -> np.ndarray:
    return np.random.default_rng([seed, SPLIT_SALT[split], 0]).permutation(np.arange(n) % num_classes).astype(np.int64)


PROGRESS_LINES = 10  # progress lines per chunk of images: a chunk of a long trajectory takes minutes


class _Recorder:
    """Stands in for the model inside the sampler: files each call's rows under its stage
    (keeping only the pre-chosen row indices), reports progress through the chunk's steps, and
    returns the model's output."""

    def __init__(self, model, stages, keep: dict):
        self.model, self.cfg, self.stages = model, model.cfg, stages
        self.keep = keep  # sid -> sorted array of kept global row indices
        self.seen = {st["id"]: 0 for st in stages}
        self.rows = {st["id"]: [] for st in stages}
        self.progress = None

    def start_chunk(self, steps: int, log, what: str) -> None:
        every = max(1, -(-steps // PROGRESS_LINES))
        self.progress = (steps, every, log, what)
        self.calls = 0

    def _report(self) -> None:
        self.calls += 1
        steps, every, log, what = self.progress
        if self.calls % every == 0 and self.calls < steps:
            log(f"{what}: step {self.calls}/{steps}")

    def __call__(self, x, t, y, sparse_grid):
        if self.progress is not None:
            self._report()
        ts = {float(v) for v in t}
        assert len(ts) == 1, "a sampler call has one timestep"
        sid = _stage_id(self.stages, ts.pop())
        n, lo = x.shape[0], self.seen[sid]
        k = self.keep[sid]
        sel = k[(k >= lo) & (k < lo + n)] - lo
        if len(sel):
            idx = torch.as_tensor(sel)
            self.rows[sid].append((x[idx].numpy().copy(), t[idx].numpy().copy(), y[idx].numpy().copy()))
        self.seen[sid] = lo + n
        return self.model(x, t, y, sparse_grid)


def _stage_id(stages, t) -> int:
    """The id of the schedule stage whose [t_min, t_max] holds ``t``. Read from the plan's stage
    dicts (id and timestep range only), which are no manifest entries yet."""
    for st in stages:
        if st["t_min"] <= t <= st["t_max"]:
            return st["id"]
    raise BundleError(f"no stage serves timestep {t}")


def _calls_per_stage(stages, num_timesteps, s: CaptureSettings) -> dict:
    try:
        tmap = space_timesteps(num_timesteps, f"ddim{s.steps}" if s.spacing == "ddim" else str(s.steps))
    except ValueError as e:
        raise CalibError(f"calibration settings: {e}") from None
    return {st["id"]: sum(1 for t in tmap if st["t_min"] <= t <= st["t_max"]) for st in stages}


def _capture_split(model, stages, s: CaptureSettings, split: str, sample, num_timesteps: int, cfg_channels: str, log):
    cfg = model.cfg
    n_img = s.images if split == "calib" else s.holdout_images
    cap = s.max_rows if split == "calib" else s.max_holdout_rows
    rows_per_image = 2 if s.cfg_scale > 1 else 1
    calls = _calls_per_stage(stages, num_timesteps, s)
    keep = {}
    for st in stages:
        total = calls[st["id"]] * n_img * rows_per_image
        want = min(total, cap) // s.batch * s.batch
        rng = np.random.default_rng([s.seed, SPLIT_SALT[split], 100 + st["id"]])
        keep[st["id"]] = np.sort(rng.choice(total, size=want, replace=False)) if want else np.zeros(0, np.int64)
    rec = _Recorder(model, stages, keep)
    labels = _labels(n_img, cfg.num_classes, s.seed, split)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    tuples = [(st["t_min"], st["t_max"], st["sparse_grid"]) for st in stages]
    for lo in range(0, n_img, s.chunk_images):
        idx = np.arange(lo, min(n_img, lo + s.chunk_images))
        z = np.stack([np.random.default_rng([s.seed, SPLIT_SALT[split], 1, int(i)]).standard_normal(shape, dtype=np.float32)
                      for i in idx])

        def noise(k, idx=idx):
            return np.stack([np.random.default_rng([s.seed, SPLIT_SALT[split], 2, int(i), int(k)])
                             .standard_normal(shape, dtype=np.float32) for i in idx])

        rec.start_chunk(s.steps, log, f"calibration capture ({split}): images {idx[0] + 1}-{idx[-1] + 1} of {n_img}")
        sample(rec, tuples, z, labels[idx], steps=s.steps, sampler=s.sampler, eta=s.eta,
                         cfg_scale=s.cfg_scale, cfg_channels=cfg_channels, spacing=s.spacing,
                         num_timesteps=num_timesteps, noise_fn=noise, clip_denoised=s.clip_denoised)
        log(f"calibration capture ({split}): {idx[-1] + 1}/{n_img} images")
    out = {}
    for st in stages:
        parts = rec.rows[st["id"]]
        if parts:
            out[st["id"]] = tuple(np.concatenate([p[j] for p in parts]) for j in range(3))
        else:
            out[st["id"]] = (np.zeros((0,) + shape, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    return out


def capture(model, stages: list[dict], settings: CaptureSettings, out, *, sample, num_timesteps: int,
            cfg_channels: str, replace: bool = False, log=print) -> CalibSet:
    """Sample, record per stage, and write the set to ``out`` (atomically). ``stages``:
    [{id, t_min, t_max, sparse_grid}] of the bundle; ``sample``: a sampling function with the
    signature of ``flexdit_export.reference_sampler.reference_sample``."""
    meta = settings_record(model, settings, num_timesteps, cfg_channels)
    arrays = {}
    flush = torch.set_flush_denormal(True)  # trained weights drive CPU arithmetic into denormals: ~15x slower
    try:
        with torch.no_grad():
            for split in ("calib", "holdout"):
                rows = _capture_split(model, stages, settings, split, sample, num_timesteps, cfg_channels, log)
                for sid, a in rows.items():
                    arrays[(sid, split)] = a
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return write_set(out, meta, stages, arrays, replace=replace)


def settings_record(model, settings: CaptureSettings, num_timesteps: int, cfg_channels: str) -> dict:
    """What a capture records as its settings (and hashes): also decides whether a cached set
    can be reused."""
    return {"model_sha256": model_sha256(model), "model_name": model.cfg.name, "num_timesteps": num_timesteps,
            "cfg_channels": cfg_channels, "num_classes": model.cfg.num_classes, **asdict(settings),
            "labels": "seeded permutation of (image index mod num_classes)"}


def capture_or_reuse(model, stages: list[dict], settings: CaptureSettings, out, *, sample, num_timesteps: int,
                     cfg_channels: str, log=print) -> CalibSet:
    """The set at ``out`` if it was captured with exactly these settings (same weights, schedule,
    sampler, seeds, counts), else a fresh capture that replaces it."""
    from .store import INDEX

    want = settings_record(model, settings, num_timesteps, cfg_channels)
    out = Path(out)
    if (out / INDEX).is_file():
        try:
            cs = CalibSet.open(out)
            same = [(s["id"], s["t_min"], s["t_max"], s["sparse_grid"]) for s in cs.stages] == \
                [(s["id"], s["t_min"], s["t_max"], s["sparse_grid"]) for s in stages]
            if cs.settings == want and same:
                log(f"calibration: reusing {out} ({cs.sha256[:12]}), captured with the same settings")
                return cs
        except CalibError:
            pass
    log(f"calibration: capturing {settings.images} + {settings.holdout_images} held-out trajectories "
        f"({settings.sampler}, {settings.steps} steps, cfg {settings.cfg_scale}) into {out}")
    return capture(model, stages, settings, out, sample=sample, num_timesteps=num_timesteps,
                   cfg_channels=cfg_channels, replace=True, log=log)
