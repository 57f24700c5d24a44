"""What a deployment is configured with: one frozen object, checked once, shared by the CLI,
``build_app`` (Ray's own ``serve run``/config files) and the tests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

BATCHING = ("stage", "request", "none")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    """``batching``: ``stage`` (stage-aware continuous batching, the default), ``request``
    (Ray Serve's request batching of whole trajectories: the static baseline) or ``none`` (one
    request at a time). ``max_inflight``: images being denoised at once per replica (default:
    the rows of one stage call); ``max_queue``: images waiting beyond that, more answer 429 at
    once (default: no fixed number; a request is refused when the work queued ahead of it and
    its own would not end within its time-out); ``max_wait_calls``: the starvation bound of the
    stage policy (engine calls an image may wait between its steps; default 2 x stages);
    ``timeout_s``: the longest a request may take, queue included (a request may ask for less);
    ``threads``: ONNX Runtime intra-op threads per replica; ``ray_cpus``: the CPUs Ray reserves
    for each replica (default: ``threads``, else 1); ``device``/``gpus``: where each replica's
    engines run (as ``flexdit-run --device``) and the GPUs Ray reserves for it."""

    bundle: str
    batching: str = "stage"
    replicas: int = 1
    threads: int | None = None
    ray_cpus: float | None = None  # CPUs Ray reserves per replica (default: threads, or 1)
    backend: str | None = None  # None: onnx, or what --device picks
    device: str | None = None  # cpu | cuda: flexdit_runtime.device picks engine kind and providers
    gpus: float = 0.0  # GPUs Ray reserves per replica (a fraction lets replicas share one)
    precision: str | None = None
    max_inflight: int | None = None
    max_queue: int | None = None
    max_wait_calls: int | None = None
    max_images_per_request: int = 16
    timeout_s: float = 120.0
    batch_wait_s: float = 0.05  # batching="request": how long Ray Serve waits to fill a batch
    drain_s: float = 30.0  # graceful shutdown: time in-flight requests get to finish
    verify_checksums: bool = True

    def __post_init__(self):
        if self.batching not in BATCHING:
            raise ConfigError(f"unknown batching {self.batching!r} (choose from {', '.join(BATCHING)})")
        for name in ("replicas", "threads", "max_inflight", "max_queue", "max_wait_calls", "max_images_per_request"):
            v = getattr(self, name)
            if v is None and name not in ("replicas", "max_images_per_request"):
                continue
            lo = 0 if name == "max_queue" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, (int, float)) or not math.isfinite(self.gpus) \
                or self.gpus < 0:
            raise ConfigError(f"gpus must be a number >= 0, got {self.gpus!r}")
        if self.ray_cpus is not None and (isinstance(self.ray_cpus, bool) or not isinstance(self.ray_cpus, (int, float))
                                          or not math.isfinite(self.ray_cpus) or self.ray_cpus < 0):
            raise ConfigError(f"ray_cpus must be a number >= 0, got {self.ray_cpus!r}")
        for name in ("timeout_s", "batch_wait_s", "drain_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (name == "timeout_s" and v == 0):
                raise ConfigError(f"{name} must be a finite positive number, got {v!r}")

    @classmethod
    def from_dict(cls, args: dict) -> "ServeConfig":
        """From ``serve run flexdit_serve.app:build_app bundle=... batching=...`` (strings) or a
        config file's ``args`` (typed)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(known)})")
        typed = {}
        for k, v in args.items():
            if isinstance(v, str) and k not in ("bundle", "batching", "backend", "precision", "device"):
                try:
                    v = {"true": True, "false": False}[v.lower()] if k == "verify_checksums" else \
                        (float(v) if k.endswith("_s") or k in ("ray_cpus", "gpus") else int(v))
                except (ValueError, KeyError):
                    raise ConfigError(f"{k}={v!r} is not a valid value") from None
            typed[k] = v
        if "bundle" not in typed:
            raise ConfigError("missing bundle=PATH")
        return cls(**typed)

    def to_dict(self) -> dict:
        return asdict(self)
